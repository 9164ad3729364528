//! The telemetry pipe with a bare-metal producer: the telemetry inmate (`inmates/telemetry`,
//! `telemetry::ProducerCell` in a KVM cell, main loop in ring 3) streams to the tokio consumer
//! (`linux_uio_client::Channel`) in this process, over one MSI-X link of a system run by
//! `hypervisor::cells::run_system` on a thread (`ivshmem_stack::bench::hosted::HostedSystem`;
//! the system is `configs/telemetry-kvm.toml` with the test's socket, image and command line,
//! the consumer attached by the test instead of spawned).
//!
//! Checked: N samples in order from 0, no gap, none torn, each timestamp (the inmate's TSC on
//! the host's `CLOCK_MONOTONIC`, via the comm region's clock epoch) between the cell's start
//! and its receipt; `cell stop` mid-stream → the consumer sees the producer leave, named, with
//! nothing torn; `cell start` → the stream resumes from 0 with the same checks; a producer that
//! faults (an illegal port write) → peer gone, named, and the hypervisor's `FATAL:` report.
//!
//! N = 100,000 per run: with the producer's loop in ring 3 (native under PVM) that takes a
//! second or two here; in ring 0 (emulated, ~300 samples/s on this machine) it would take
//! minutes, which is why the inmate defaults to ring 3 (README, KVM telemetry).
//!
//! Synchronisation is by what the consumer receives and by the hypervisor's output lines;
//! timeouts only guard against hangs. Skipped with a message without `/dev/kvm`.

#[path = "../hypervisor/tests/process_common/mod.rs"]
#[allow(dead_code)]
mod process_common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hypervisor::control::CellAction;
use hypervisor::kvm::kvm_available;
use hypervisor::status;
use ivshmem_stack::bench::hosted::{private_config, HostedSystem};
use linux_uio_client::channel::ChannelError;
use linux_uio_client::{Channel, ChannelOptions, Endpoint, WaitMode};
use process_common::{Lines, TempDir};
use telemetry::process::monotonic_ns;
use telemetry::{Sample, SampleCheck};

/// The producer and consumer cells of `configs/telemetry-kvm.toml`.
const PRODUCER: &str = "rtos-telemetry";
const CONSUMER: &str = "linux-consumer";
/// Samples per run.
const N: u64 = 100_000;
/// Guard on every wait for a sample or a departure.
const GUARD: Duration = Duration::from_secs(60);

fn inmate_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(root.join("scripts/build-inmates"))
        .status()
        .expect("running scripts/build-inmates");
    assert!(status.success(), "scripts/build-inmates failed: {status}");
    root.join("inmates/target/x86_64-unknown-none/release/telemetry-inmate.bin")
}

/// A running `configs/telemetry-kvm.toml` (socket, image and command line the test's): the
/// producer inmate (peer 0, [`PRODUCER`]) and the consumer cell (peer 1, [`CONSUMER`],
/// attached by the test instead of spawned).
struct System {
    hosted: HostedSystem,
    lines: Lines,
    _dir: TempDir,
}

impl System {
    fn start(tag: &str, cmdline: &str) -> Self {
        let image = inmate_image();
        let dir = TempDir::new(&format!("kvm-telemetry-{tag}"));
        let socket = dir.0.join("control.sock");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shipped = std::fs::read_to_string(root.join("configs/telemetry-kvm.toml")).unwrap();
        let name = format!("kvm-telemetry-{tag}-{}", std::process::id());
        let toml = private_config(&shipped, &name, &socket).replace(
            "cmdline = \"rate=10000 count=0 size=40 batch=32\"",
            &format!("cmdline = \"{cmdline}\""),
        );
        assert!(
            toml.contains(&format!("image = \"{}\"", image.display()))
                && toml.contains(&format!("cmdline = \"{cmdline}\"")),
            "configs/telemetry-kvm.toml changed shape: {toml}"
        );
        let mut hosted = HostedSystem::start(&toml).unwrap_or_else(|e| panic!("{e:#}"));
        let lines = Lines {
            rx: hosted.lines(),
            seen: Vec::new(),
        };
        System {
            hosted,
            lines,
            _dir: dir,
        }
    }

    fn consumer(&self) -> Channel {
        let endpoint = Endpoint::attach_hosted(self.hosted.socket(), CONSUMER, Some("telemetry"))
            .expect("attaching the consumer");
        // As examples/telemetry_consumer.rs: the hosted hypervisor names every peer.
        let peer_name = endpoint
            .the_peer()
            .and_then(|peer| endpoint.peer_name(peer))
            .map(str::to_owned);
        assert_eq!(peer_name.as_deref(), Some(PRODUCER));
        Channel::new(
            endpoint,
            ChannelOptions {
                peer_name,
                wait: WaitMode::Interrupt,
                ..ChannelOptions::default()
            },
        )
        .unwrap()
    }

    fn control(&self, action: CellAction) {
        status::control_cell(self.hosted.socket(), PRODUCER, action)
            .unwrap_or_else(|e| panic!("cell {action:?} {PRODUCER}: {e}"));
    }
}

/// What one run delivered.
struct Run {
    first_seq: Option<u64>,
    /// Samples whose timestamp lies outside [started, received].
    bad_timestamps: u64,
    /// The largest latency seen (receipt − timestamp).
    max_latency_ns: u64,
}

/// Receives `want` samples (or, with `None`, until the producer leaves); `on_sample` runs
/// after each. Returns the run and the departure, if it came.
async fn receive(
    channel: &mut Channel,
    check: &mut SampleCheck,
    started_ns: u64,
    want: Option<u64>,
    mut on_sample: impl FnMut(u64),
) -> (Run, Option<ChannelError>) {
    let mut run = Run {
        first_seq: None,
        bad_timestamps: 0,
        max_latency_ns: 0,
    };
    let mut got = 0;
    let mut records = channel.records::<Sample>();
    while want.is_none_or(|w| got < w) {
        let item = tokio::time::timeout(GUARD, records.next())
            .await
            .unwrap_or_else(|_| panic!("no sample and no departure after {got}: {check:?}"))
            .expect("the stream ends only after reporting the departure");
        match item {
            Ok(sample) => {
                let now = monotonic_ns();
                check.check(&sample);
                run.first_seq.get_or_insert(sample.seq);
                if sample.timestamp_ns < started_ns || sample.timestamp_ns > now {
                    run.bad_timestamps += 1;
                }
                run.max_latency_ns = run
                    .max_latency_ns
                    .max(now.saturating_sub(sample.timestamp_ns));
                got += 1;
                on_sample(got);
            }
            Err(e) => return (run, Some(e)),
        }
    }
    (run, None)
}

fn assert_named_departure(err: &ChannelError) {
    assert!(matches!(err, ChannelError::PeerGone { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("peer 0 (`rtos-telemetry`)") && text.contains("left link `telemetry`"),
        "{text}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_kvm_producer_streams_in_order_survives_cell_stop_and_resumes_on_cell_start() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    // Endless, as fast as the ring takes samples, main loop in ring 3.
    let mut system = System::start("stream", "rate=0 count=0 ring=3");
    let mut channel = system.consumer();
    let mut check = SampleCheck::default();

    // 1. N samples from 0, in order, whole, on the host's clock.
    let started = monotonic_ns();
    let (run, departed) = receive(&mut channel, &mut check, started, Some(N), |_| {}).await;
    assert!(departed.is_none(), "{departed:?}");
    system
        .lines
        .expect("[rtos-telemetry] telemetry: main loop in ring 3");
    assert_eq!(run.first_seq, Some(0));
    assert_eq!(check.received, N);
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(
        run.bad_timestamps, 0,
        "timestamps must lie between the cell's start and their receipt"
    );
    eprintln!(
        "run 1: {N} samples, max latency {} µs",
        run.max_latency_ns / 1000
    );

    // 2. `cell stop` mid-stream: what the producer published arrives whole and in order,
    //    then the departure naming it.
    system.control(CellAction::Stop);
    let (run, departed) = receive(&mut channel, &mut check, started, None, |_| {}).await;
    assert_named_departure(&departed.expect("a departure"));
    assert!(check.is_clean(), "lost, reordered or torn: {check:?}");
    assert_eq!(run.bad_timestamps, 0);

    // 3. `cell start`: a fresh boot streams from 0 again, same checks.
    check.restart();
    let before = check.received;
    let restarted = monotonic_ns();
    system.control(CellAction::Start);
    let (run, departed) = receive(&mut channel, &mut check, restarted, Some(N), |_| {}).await;
    assert!(departed.is_none(), "{departed:?}");
    assert_eq!(run.first_seq, Some(0));
    assert_eq!(check.received - before, N);
    assert!(check.is_clean(), "{check:?}");
    assert_eq!(run.bad_timestamps, 0);
    assert_eq!(channel.stats().departures, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_faulting_kvm_producer_is_seen_as_peer_gone_named() {
    if let Err(why) = kvm_available() {
        eprintln!("skipping: KVM is not usable here: {why}");
        return;
    }
    // 5000 samples, then a write to a port no KVM cell has.
    let mut system = System::start("fault", "rate=0 count=5000 fault=1");
    let mut channel = system.consumer();
    let mut check = SampleCheck::default();
    let (run, departed) = receive(&mut channel, &mut check, monotonic_ns(), None, |_| {}).await;
    assert_named_departure(&departed.expect("a departure"));
    assert_eq!(run.first_seq, Some(0));
    assert_eq!(
        check.received, 5000,
        "everything published arrives: {check:?}"
    );
    assert!(check.is_clean(), "{check:?}");
    let fatal = system.lines.expect("FATAL: cell \"rtos-telemetry\"");
    assert!(fatal.contains("port write at 0x99"), "{fatal}");
}
