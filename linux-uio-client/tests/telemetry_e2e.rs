//! The telemetry pipe end to end: the producer cell in its own process (this test binary
//! re-executed with `TELEMETRY_E2E_ROLE=producer`) attached to the hosted hypervisor (the
//! `hypervisor` library's `run` loop on a thread of this process), and the tokio consumer
//! ([`Channel`] record stream) in this process.
//!
//! Synchronisation is by what the consumer receives (counts, the departure error) and the
//! hypervisor's "listening on" line; timeouts only guard against hangs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hypervisor::cells::{self, RunOptions, StopHandle};
use hypervisor::config::SystemConfig;
use hypervisor::control::SystemSpec;
use linux_uio_client::channel::ChannelError;
use linux_uio_client::telemetry::{
    ProcessPlatform, ProducerCell, ProducerConfig, Sample, SampleCheck,
};
use linux_uio_client::{Channel, ChannelOptions, Endpoint, WaitMode};

const ROLE_ENV: &str = "TELEMETRY_E2E_ROLE";
const SOCKET_ENV: &str = "TELEMETRY_E2E_SOCKET";
const COUNT_ENV: &str = "TELEMETRY_E2E_COUNT";
const GUARD: Duration = Duration::from_secs(120);

/// Entry point of the re-executed producer process; a no-op in a normal test run.
#[test]
fn producer_role() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "producer");
    let socket = std::env::var(SOCKET_ENV).unwrap();
    let count = std::env::var(COUNT_ENV)
        .ok()
        .map(|c| c.parse::<u64>().unwrap());
    let endpoint = Endpoint::attach_hosted(socket, "producer", Some("telemetry")).unwrap();
    let peer = endpoint.the_peer().unwrap();
    let (dev, interrupt) = endpoint.into_parts();
    let mut platform = ProcessPlatform::new(interrupt);
    let mut cell = ProducerCell::new(
        &dev,
        ProducerConfig {
            peer,
            count,
            // A small ring: the consumer's back-pressure is exercised all the time.
            max_capacity: Some(16 * 1024),
            ..ProducerConfig::default()
        },
    );
    let stats = cell.run(&mut platform).unwrap();
    eprintln!("producer: {stats:?}");
    std::process::exit(0);
}

/// Collects the hypervisor's output lines and reports the "listening on" line.
struct Lines {
    tx: mpsc::Sender<String>,
    buf: Vec<u8>,
}

impl Write for Lines {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
            self.buf.drain(..=end);
            let _ = self.tx.send(line);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Hypervisor {
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    _dir: TempDir,
}

impl Hypervisor {
    fn start() -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("telemetry.sock");
        let toml = format!(
            r#"
[system]
name = "telemetry-e2e"
control_socket = "{}"

[[cells]]
name = "producer"
kind = "process"
cpus = [0]
# Never spawned (spawn = false): the test starts the cell processes itself.
command = "/bin/true"

[[cells]]
name = "consumer"
kind = "process"
cpus = [1]
command = "/bin/true"

[[links]]
name = "telemetry"
peers = ["producer", "consumer"]
protocol = "telemetry"
state_table_size = "4K"
rw_size = 0
output_size = "64K"
interrupts = "intx"
"#,
            socket.display()
        );
        let valid = SystemConfig::from_toml_str(&toml)
            .and_then(|c| c.validate())
            .unwrap_or_else(|e| panic!("test config: {e}"));
        let system = SystemSpec::from_config(&valid);
        let stop = StopHandle::new().unwrap();
        let (tx, rx) = mpsc::channel();
        let options = RunOptions {
            spawn: false,
            ..RunOptions::new(socket.clone())
        };
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Lines {
                tx,
                buf: Vec::new(),
            };
            cells::run(&system, &options, Some(&stop2), &mut out).expect("hypervisor run");
        });
        loop {
            let line = rx.recv_timeout(GUARD).expect("hypervisor never listened");
            if line.contains("listening on") {
                break;
            }
        }
        Hypervisor {
            stop,
            thread: Some(thread),
            socket,
            _dir: dir,
        }
    }

    fn spawn_producer(&self, count: Option<u64>) -> Child {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "producer_role",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, "producer")
        .env(SOCKET_ENV, &self.socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        match count {
            Some(c) => cmd.env(COUNT_ENV, c.to_string()),
            None => cmd.env_remove(COUNT_ENV),
        };
        cmd.spawn().expect("spawning the producer")
    }
}

impl Drop for Hypervisor {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let base = std::env::temp_dir().join(format!("telemetry-e2e-{}", std::process::id()));
        std::fs::create_dir_all(&base).unwrap();
        Self(base)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn consumer(socket: &Path, wait: WaitMode) -> Channel {
    let endpoint = Endpoint::attach_hosted(socket, "consumer", Some("telemetry")).unwrap();
    Channel::new(
        endpoint,
        ChannelOptions {
            peer_name: Some("producer".into()),
            wait,
            ..ChannelOptions::default()
        },
    )
    .unwrap()
}

/// Receives until the producer leaves; returns what was checked.
async fn receive_until_departure(
    channel: &mut Channel,
    check: &mut SampleCheck,
    mut on_sample: impl FnMut(&Sample),
) -> ChannelError {
    let mut records = channel.records::<Sample>();
    loop {
        let item = tokio::time::timeout(GUARD, records.next())
            .await
            .expect("no sample and no departure")
            .expect("the stream ends only after reporting the departure");
        match item {
            Ok(sample) => {
                check.check(&sample);
                on_sample(&sample);
            }
            Err(e) => return e,
        }
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    child.wait().expect("waitpid")
}

#[tokio::test(flavor = "current_thread")]
async fn one_million_samples_then_kill_and_restart() {
    // Only the parent runs the scenario.
    if std::env::var(ROLE_ENV).is_ok() {
        return;
    }
    let hv = Hypervisor::start();
    let mut channel = consumer(&hv.socket, WaitMode::Interrupt);

    // 1. One million samples, none lost, in order, none torn; then the producer exits and
    //    the consumer is told.
    const MILLION: u64 = 1_000_000;
    let mut producer = hv.spawn_producer(Some(MILLION));
    let mut check = SampleCheck::default();
    let mut first_seq = None;
    let err = receive_until_departure(&mut channel, &mut check, |s| {
        first_seq.get_or_insert(s.seq);
    })
    .await;
    assert!(wait_exit(&mut producer).success());
    assert!(matches!(err, ChannelError::PeerGone { .. }), "{err}");
    assert_eq!(first_seq, Some(0));
    assert_eq!(check.received, MILLION, "{check:?}");
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(check.expected(), Some(MILLION));

    // 2. An endless producer killed with SIGKILL mid-stream: everything it published arrives
    //    whole and in order, then the departure naming it.
    check.restart();
    let mut producer = hv.spawn_producer(None);
    let mut killed_at = None;
    let err = receive_until_departure(&mut channel, &mut check, |s| {
        if s.seq == 200_000 && killed_at.is_none() {
            producer.kill().expect("SIGKILL");
            killed_at = Some(s.seq);
        }
    })
    .await;
    let status = wait_exit(&mut producer);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(9)
    );
    assert_eq!(killed_at, Some(200_000));
    let text = err.to_string();
    assert!(
        text.contains("peer 0 (`producer`)") && text.contains("left link `telemetry`"),
        "{text}"
    );
    assert!(check.received > MILLION + 200_000, "{check:?}");
    assert!(
        check.is_clean(),
        "lost, reordered or torn samples: {check:?}"
    );

    // 3. The producer restarted by hand under the same cell name: the consumer re-attaches
    //    and receives the new run from sequence 0 (now in polling mode).
    channel.set_wait_mode(WaitMode::Poll {
        spin: Duration::from_micros(200),
    });
    check.restart();
    let before = check.received;
    let mut producer = hv.spawn_producer(Some(50_000));
    let mut first_seq = None;
    let err = receive_until_departure(&mut channel, &mut check, |s| {
        first_seq.get_or_insert(s.seq);
    })
    .await;
    assert!(wait_exit(&mut producer).success());
    assert!(matches!(err, ChannelError::PeerGone { .. }), "{err}");
    assert_eq!(first_seq, Some(0));
    assert_eq!(check.received - before, 50_000);
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(channel.stats().departures, 3);
}
