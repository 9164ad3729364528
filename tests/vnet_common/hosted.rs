//! The hosted hypervisor for the root-only vnet process-cell tests: its library runs in a
//! thread of the test process (links, control socket, cells attached by hand), and a cell
//! process is this test binary re-executed to run one `#[ignore]`d helper test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::Duration;

use hypervisor::cells::{self, RunOptions, StopHandle};
use hypervisor::config::SystemConfig;
use hypervisor::control::SystemSpec;
use vnet::LinkEvent;

use super::linux::Netns;

/// A running hosted hypervisor with its control socket in a private directory.
pub struct Hosted {
    stop: StopHandle,
    thread: Option<JoinHandle<cells::RunReport>>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Hosted {
    /// Starts the system described by `toml` (cells not spawned) with its socket in a
    /// directory named after `tag` and the process ID; returns once it listens.
    pub fn start(toml: &str, tag: &str) -> Hosted {
        let dir = std::env::temp_dir().join(format!("vnet-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vnet.sock");
        let valid = SystemConfig::from_toml_str(toml)
            .unwrap()
            .validate()
            .unwrap();
        let system = SystemSpec::from_config(&valid);
        let stop = StopHandle::new().unwrap();
        let (listening_tx, listening) = mpsc::channel();
        let thread = {
            let stop = stop.clone();
            let socket = socket.clone();
            std::thread::spawn(move || {
                let options = RunOptions {
                    spawn: false,
                    ..RunOptions::new(socket)
                };
                // The first output line is "listening on ...": the socket is ready.
                struct Lines(mpsc::Sender<()>, bool);
                impl std::io::Write for Lines {
                    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                        if !self.1 && b.windows(9).any(|w| w == b"listening") {
                            self.1 = true;
                            let _ = self.0.send(());
                        }
                        Ok(b.len())
                    }
                    fn flush(&mut self) -> std::io::Result<()> {
                        Ok(())
                    }
                }
                let mut out = Lines(listening_tx, false);
                cells::run(&system, &options, Some(&stop), &mut out).unwrap()
            })
        };
        listening
            .recv_timeout(Duration::from_secs(10))
            .expect("hypervisor listening");
        Hosted {
            stop,
            thread: Some(thread),
            dir,
            socket,
        }
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts this test binary again as cell `cell`, running only the ignored helper test
    /// `helper` with `env` set; the child dies with the test process.
    pub fn spawn_cell(&self, helper: &str, cell: &str, env: &[(&str, String)]) -> Child {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        // SAFETY: prctl is async-signal-safe; the child dies with the test process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd.args([
            "--exact",
            helper,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("IVSHMEM_SOCKET", &self.socket)
        .env("IVSHMEM_CELL", cell)
        .spawn()
        .unwrap()
    }

    /// Stops the hypervisor and removes the socket directory.
    pub fn stop(mut self) {
        self.stop.stop();
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits (at most 30 s) for the bridge's next link event and checks it is `want`.
pub fn expect_link(events: &Receiver<LinkEvent>, want: LinkEvent) {
    assert_eq!(events.recv_timeout(Duration::from_secs(30)).unwrap(), want);
}

/// Kills cell process `cell` with SIGKILL: the hypervisor sets its state to 0, so the bridge
/// sees the link go down and TAP `tap` in `ns` shows NO-CARRIER.
pub fn kill_cell_see_link_down(
    cell: &mut Child,
    events: &Receiver<LinkEvent>,
    ns: &Netns,
    tap: &str,
) {
    cell.kill().unwrap();
    cell.wait().unwrap();
    expect_link(events, LinkEvent::Down);
    assert!(ns.ip(&["link", "show", tap]).contains("NO-CARRIER"));
}
