//! The bridge without root: its port is a Unix datagram socket (one datagram = one frame)
//! and its link an in-process `LocalLink`; the other peer is a raw `VnetLink` the test drives.
//! Shows back-pressure: with the receiving peer not reading, the bridge fills the ring, waits
//! for space (the producer's wait-for-space notification) instead of dropping, and every
//! frame arrives, in order, once the peer reads.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;

use nix::sys::eventfd::{EfdFlags, EventFd};
use std::sync::Arc;
use std::time::Duration;

use ivshmem_stack::vnet_cell::cell::{Cell, CellConfig};
use ivshmem_stack::vnet_cell::services::ServiceConfig;
use linux_uio_client::{Endpoint, LocalLink};
use vnet::bridge::{Bridge, BridgeConfig, FdCondition, Interrupt, LoopError, LoopFd};
use vnet::{LinkConfig, VnetLink};

const FRAMES: u64 = 3000;
const FRAME_LEN: usize = 1000;

fn frame(seq: u64) -> Vec<u8> {
    let mut f = vec![(seq % 253) as u8; FRAME_LEN];
    f[..8].copy_from_slice(&seq.to_le_bytes());
    f
}

fn wait(irq: &impl Interrupt) {
    let mut pfd = libc::pollfd {
        fd: irq.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; 10 s is a safety net, not synchronisation.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    assert_eq!(rc, 1, "no interrupt within 10 s");
}

#[test]
fn bridge_waits_for_ring_space_and_loses_nothing() {
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (bridge_end, writer_end) = UnixDatagram::pair().unwrap();
    bridge_end.set_nonblocking(true).unwrap();
    let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());

    let bridge = {
        let link = Arc::clone(&link);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut b = Bridge::new(l, irq, bridge_end, BridgeConfig::default());
            b.run(Some(stop.as_fd())).unwrap();
            b.stats()
        })
    };

    // The receiving peer comes up.
    let (dev, mut irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let mut peer = VnetLink::new(dev, LinkConfig::default()).unwrap();
    peer.poll_link();
    while !peer.carrier() {
        wait(&irq);
        Interrupt::take(&mut irq).unwrap();
        peer.poll_link();
    }

    // Frames pour into the port, far more than the ring holds.
    let writer = std::thread::spawn(move || {
        for seq in 0..FRAMES {
            writer_end.send(&frame(seq)).unwrap();
        }
    });

    // Not reading: wait until the ring is nearly full (woken by the bridge's doorbells).
    let capacity = peer.rings_mut().unwrap().rx.capacity();
    loop {
        let rx = &mut peer.rings_mut().unwrap().rx;
        if rx.available() + 2 * (FRAME_LEN + 16) > capacity {
            break;
        }
        if rx.prepare_sleep().unwrap() {
            wait(&irq);
            Interrupt::take(&mut irq).unwrap();
        }
    }

    // Now read everything, releasing in batches (each flush may ring the waiting bridge).
    let mut next = 0u64;
    let mut buf = vec![0u8; 2048];
    while next < FRAMES {
        let mut got = 0;
        {
            let rx = &mut peer.rings_mut().unwrap().rx;
            while let Some(f) = rx.peek().unwrap() {
                assert_eq!(f.len(), FRAME_LEN);
                f.payload().copy_to(&mut buf[..FRAME_LEN]);
                f.release();
                assert_eq!(&buf[..FRAME_LEN], &frame(next)[..], "frame {next}");
                next += 1;
                got += 1;
            }
        }
        peer.flush();
        if got == 0 && next < FRAMES {
            let may_sleep = peer.rings_mut().unwrap().rx.prepare_sleep().unwrap();
            if may_sleep {
                wait(&irq);
                Interrupt::take(&mut irq).unwrap();
            }
        }
    }
    writer.join().unwrap();

    assert_eq!(stop.write(1).unwrap(), 8);
    let stats = bridge.join().unwrap();
    assert_eq!(stats.from_port_frames, FRAMES);
    assert!(
        stats.ring_full_waits >= 1,
        "the ring never filled: {stats:?}"
    );
    assert!(stats.sleeps >= 1);
}

/// A `Write` the test can read back, also while the bridge runs (a live reader).
#[derive(Clone, Default)]
struct Shared(Arc<(std::sync::Mutex<Vec<u8>>, std::sync::Condvar)>);

impl Shared {
    fn bytes(&self) -> Vec<u8> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits (bounded) until `len` bytes were written.
    fn wait_for(&self, len: usize) -> Vec<u8> {
        let (data, written) = &*self.0;
        let guard = written
            .wait_timeout_while(data.lock().unwrap(), Duration::from_secs(10), |d| {
                d.len() < len
            })
            .unwrap()
            .0;
        guard.clone()
    }
}

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 .0.lock().unwrap().extend_from_slice(buf);
        self.0 .1.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn frames_longer_than_the_mtu_are_dropped_whole_and_counted_not_cut() {
    let mtu = vnet::nic::DEFAULT_MTU;
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (bridge_end, writer_end) = UnixDatagram::pair().unwrap();
    bridge_end.set_nonblocking(true).unwrap();
    let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());
    let capture = Shared::default();

    let bridge = {
        let link = Arc::clone(&link);
        let stop = Arc::clone(&stop);
        let capture = capture.clone();
        std::thread::spawn(move || {
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut b = Bridge::new(l, irq, bridge_end, BridgeConfig::default());
            b.set_pcap(vnet::pcap::PcapWriter::new(Box::new(capture) as Box<_>).unwrap());
            b.run(Some(stop.as_fd())).unwrap();
            b.stats()
        })
    };
    let (dev, mut irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let mut peer = VnetLink::new(dev, LinkConfig::default()).unwrap();
    peer.poll_link();
    while !peer.carrier() {
        wait(&irq);
        Interrupt::take(&mut irq).unwrap();
        peer.poll_link();
    }

    // Over-MTU frames (one byte over, and a VLAN-tagged-size one) between good ones.
    let sent: [(usize, u8); 5] = [(60, 1), (mtu + 1, 2), (mtu, 3), (mtu + 4, 4), (100, 5)];
    for &(len, byte) in &sent {
        writer_end.send(&vec![byte; len]).unwrap();
    }
    let expected: Vec<(usize, u8)> = sent.iter().copied().filter(|&(l, _)| l <= mtu).collect();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let rx = &mut peer.rings_mut().unwrap().rx;
        while let Some(f) = rx.peek().unwrap() {
            let mut copy = vec![0u8; f.len()];
            f.payload().copy_to(&mut copy);
            f.release();
            assert!(copy.iter().all(|&b| b == copy[0]), "a mixed frame");
            got.push((copy.len(), copy[0]));
        }
        if got.len() < expected.len() && rx.prepare_sleep().unwrap() {
            wait(&irq);
            Interrupt::take(&mut irq).unwrap();
        }
    }
    assert_eq!(
        got, expected,
        "only whole frames of at most the MTU, in order"
    );

    assert_eq!(stop.write(1).unwrap(), 8);
    let stats = bridge.join().unwrap();
    assert_eq!(stats.from_port_oversize, 2);
    assert_eq!(stats.from_port_frames, 3);
    // The capture holds exactly the forwarded frames, each whole (incl_len == orig_len).
    let pcap = capture.bytes();
    let mut at = 24;
    let mut records = Vec::new();
    while at < pcap.len() {
        let field = |o: usize| u32::from_le_bytes(pcap[at + o..at + o + 4].try_into().unwrap());
        let (incl, orig) = (field(8) as usize, field(12) as usize);
        assert_eq!(incl, orig, "a cut record");
        records.push((incl, pcap[at + 16]));
        at += 16 + incl;
    }
    assert_eq!(records, expected);
}

#[test]
fn the_capture_is_flushed_after_each_burst_while_the_bridge_runs() {
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (bridge_end, writer_end) = UnixDatagram::pair().unwrap();
    bridge_end.set_nonblocking(true).unwrap();
    let stop = Arc::new(EventFd::from_flags(EfdFlags::EFD_CLOEXEC).unwrap());
    let capture = Shared::default();
    let bridge = {
        let link = Arc::clone(&link);
        let stop = Arc::clone(&stop);
        let capture = capture.clone();
        std::thread::spawn(move || {
            let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
            let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
            let mut b = Bridge::new(l, irq, bridge_end, BridgeConfig::default());
            // Buffered like a file capture: only flushes make records visible.
            let out = std::io::BufWriter::with_capacity(64 * 1024, capture);
            b.set_pcap(vnet::pcap::PcapWriter::new(Box::new(out) as Box<_>).unwrap());
            b.run(Some(stop.as_fd())).unwrap();
        })
    };
    let (dev, mut irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let mut peer = VnetLink::new(dev, LinkConfig::default()).unwrap();
    peer.poll_link();
    while !peer.carrier() {
        wait(&irq);
        Interrupt::take(&mut irq).unwrap();
        peer.poll_link();
    }
    for burst in 1..=2u8 {
        for _ in 0..3 {
            writer_end.send(&[burst; 100]).unwrap();
        }
        // A live reader sees the whole burst while the bridge keeps running.
        let want = 24 + usize::from(burst) * 3 * (16 + 100);
        let pcap = capture.wait_for(want);
        assert_eq!(pcap.len(), want, "burst {burst} not flushed");
        assert!(pcap[want - 100..].iter().all(|&b| b == burst));
    }
    assert_eq!(stop.write(1).unwrap(), 8);
    bridge.join().unwrap();
}

/// An interrupt whose fd the test controls (here: a pipe's read end).
struct PipeInterrupt(OwnedFd);

impl Interrupt for PipeInterrupt {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
    fn take(&mut self) -> std::io::Result<bool> {
        Ok(false)
    }
}

/// A pipe: (read end, write end).
fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: plain syscall into a 2-element array, checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Runs `f` on a thread and waits for its result; the timeout only turns a regression (a
/// loop that never returns) into a failure instead of a hung test.
fn returns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(20))
        .expect("the loop did not return: a hung-up fd makes it spin")
}

#[test]
fn bridge_stops_with_an_error_naming_a_hung_up_port() {
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (port, other) = UnixDatagram::pair().unwrap();
    port.set_nonblocking(true).unwrap();
    // Both directions shut down: poll reports POLLHUP on the port from now on.
    port.shutdown(std::net::Shutdown::Both).unwrap();
    let raw = port.as_raw_fd();
    let result = returns(move || {
        let (dev, irq) = Endpoint::attach_local(&link, 1).unwrap().into_parts();
        let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
        let mut b = Bridge::new(l, irq, port, BridgeConfig::default());
        // No peer: no carrier, the port is not even polled for input; only the hang-up.
        b.run(None)
    });
    drop(other);
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            LoopError::Fd {
                fd: LoopFd::Port,
                raw: r,
                condition: FdCondition::HangUp
            } if r == raw
        ),
        "{err:?}"
    );
}

#[test]
fn bridge_and_cell_stop_with_an_error_naming_a_hung_up_interrupt() {
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let (read, write) = pipe();
    drop(write);
    let raw = read.as_raw_fd();
    let (port, _other) = UnixDatagram::pair().unwrap();
    port.set_nonblocking(true).unwrap();
    let bridge_link = Arc::clone(&link);
    let result = returns(move || {
        let (dev, _irq) = Endpoint::attach_local(&bridge_link, 1)
            .unwrap()
            .into_parts();
        let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
        let mut b = Bridge::new(l, PipeInterrupt(read), port, BridgeConfig::default());
        b.run(None)
    });
    let err = result.unwrap_err();
    assert!(
        matches!(err, LoopError::Fd { fd: LoopFd::Interrupt, raw: r, condition: FdCondition::HangUp } if r == raw),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("interrupt fd"), "{err}");

    // The cell's loop too.
    let (read, write) = pipe();
    drop(write);
    let raw = read.as_raw_fd();
    let result = returns(move || {
        let (dev, _irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
        let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
        let address = "10.9.0.2/24".parse().unwrap();
        let mut cell = Cell::new(
            l,
            PipeInterrupt(read),
            &ServiceConfig::new(address),
            CellConfig::default(),
        );
        cell.run(None)
    });
    let err = result.unwrap_err();
    assert!(
        matches!(err, LoopError::Fd { fd: LoopFd::Interrupt, raw: r, condition: FdCondition::HangUp } if r == raw),
        "{err:?}"
    );
}

const PCAP_CHILD_ENV: &str = "VNC_PCAP_BRIDGE_CHILD";
const PCAP_FRAME_LEN: usize = 200;

/// A file writer that reports each completed flush on stdout (`flushed N`): the test's
/// event that the capture's first N bytes are in the file.
struct ReportingFile {
    file: std::fs::File,
    written: usize,
}

impl std::io::Write for ReportingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        println!("flushed {}", self.written);
        std::io::stdout().flush()
    }
}

/// The bridge process of `a_pcap_survives_kill_9_and_a_restarted_bridge_appends_to_it`: runs only when
/// re-executed by it (with `--ignored`), until killed. Bridge on a Unix datagram port bound
/// at the path the test gives, capture into the file it gives; a peer thread reads the ring.
#[test]
#[ignore = "helper: the bridge process of `a_pcap_survives_kill_9_and_a_restarted_bridge_appends_to_it`"]
fn pcap_bridge_process_child() {
    use std::io::Write as _;
    let (Some(port), Some(pcap)) = (
        std::env::var_os(PCAP_CHILD_ENV),
        std::env::var_os("VNC_PCAP_FILE"),
    ) else {
        return;
    };
    let link = LocalLink::new("net0", 2, 256 * 1024).unwrap();
    let port = UnixDatagram::bind(port).unwrap();
    port.set_nonblocking(true).unwrap();
    let bridge_link = Arc::clone(&link);
    std::thread::spawn(move || {
        let (dev, irq) = Endpoint::attach_local(&bridge_link, 1)
            .unwrap()
            .into_parts();
        let l = VnetLink::new(dev, LinkConfig::default()).unwrap();
        let mut b = Bridge::new(l, irq, port, BridgeConfig::default());
        // Opened as the bridge program (`vnet_tap --pcap`) opens it: appended to.
        let capture = vnet::pcap::open_append(std::path::Path::new(&pcap)).unwrap();
        let file = ReportingFile {
            file: capture.file,
            written: 0,
        };
        let out = std::io::BufWriter::with_capacity(64 * 1024, file);
        b.set_pcap(vnet::pcap::PcapWriter::appending(Box::new(out) as Box<_>));
        b.run(None).unwrap();
    });
    // The peer: reads and releases every frame, forever.
    let (dev, mut irq) = Endpoint::attach_local(&link, 0).unwrap().into_parts();
    let mut peer = VnetLink::new(dev, LinkConfig::default()).unwrap();
    peer.poll_link();
    // On a line of its own (the test harness has just printed "test NAME ... ").
    println!("\nready");
    std::io::stdout().flush().unwrap();
    loop {
        if let Some(d) = peer.rings_mut() {
            while let Some(f) = d.rx.peek().unwrap() {
                f.release();
            }
        }
        peer.flush();
        let idle = peer
            .rings_mut()
            .map_or(Ok(true), |d| d.rx.prepare_sleep())
            .unwrap();
        if idle {
            wait_forever(&irq);
            Interrupt::take(&mut irq).unwrap();
            peer.poll_link();
        }
    }
}

fn wait_forever(irq: &impl Interrupt) {
    let mut pfd = libc::pollfd {
        fd: irq.fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, -1) };
}

/// A bridge process (`pcap_bridge_process_child`) capturing into `pcap_path`, ready, with
/// its stdout lines.
fn start_pcap_bridge(
    port_path: &std::path::Path,
    pcap_path: &std::path::Path,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let _ = std::fs::remove_file(port_path);
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    // SAFETY: prctl is async-signal-safe; the child dies with the test process.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .args([
            "--exact",
            "pcap_bridge_process_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PCAP_CHILD_ENV, port_path)
        .env("VNC_PCAP_FILE", pcap_path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    while next_line(&lines, "ready") != "ready" {}
    (child, lines)
}

fn next_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("bridge process: no line ({what}): {e}"))
}

/// Waits until the bridge process says it has flushed at least `bytes` of its capture.
fn wait_flushed(lines: &std::sync::mpsc::Receiver<String>, bytes: usize) {
    loop {
        let line = next_line(lines, "flushed");
        let n: usize = line
            .strip_prefix("flushed ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        if n >= bytes {
            return;
        }
    }
}

fn pcap_frame(seq: u32) -> Vec<u8> {
    let mut f = vec![(seq % 251) as u8; PCAP_FRAME_LEN];
    f[..4].copy_from_slice(&seq.to_le_bytes());
    f
}

/// The whole records of a capture (its one header checked), and whether a last one is cut.
fn pcap_records(pcap: &[u8]) -> (Vec<Vec<u8>>, bool) {
    assert_eq!(&pcap[..4], &vnet::pcap::MAGIC.to_le_bytes());
    let (mut at, mut records) = (24, Vec::new());
    while at < pcap.len() {
        let Some(header) = pcap.get(at..at + 16) else {
            return (records, true);
        };
        let incl = u32::from_le_bytes(header[8..12].try_into().unwrap()) as usize;
        let orig = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
        assert_eq!(
            (incl, orig),
            (PCAP_FRAME_LEN, PCAP_FRAME_LEN),
            "record {}",
            records.len()
        );
        let Some(data) = pcap.get(at + 16..at + 16 + incl) else {
            return (records, true);
        };
        records.push(data.to_vec());
        at += 16 + incl;
    }
    (records, false)
}

/// The pcap guarantee of issue 12 against `kill -9`: a bridge process killed while frames
/// flow leaves a file whose records are all whole except at most the last one, and which
/// holds at least everything flushed before the kill.
#[test]
fn a_pcap_survives_kill_9_and_a_restarted_bridge_appends_to_it() {
    let dir = std::env::temp_dir().join(format!("vnc-pcap-kill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let port_path = dir.join("port");
    let pcap_path = dir.join("capture.pcap");
    let (mut child, lines) = start_pcap_bridge(&port_path, &pcap_path);
    let frame = pcap_frame;

    let sender = UnixDatagram::unbound().unwrap();
    sender
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A first burst, flushed into the file (the child says so)...
    const FIRST: u32 = 50;
    for seq in 0..FIRST {
        sender.send_to(&frame(seq), &port_path).unwrap();
    }
    // (The child counts the records' bytes: the header is written when the file is opened.)
    let flushed_before_kill = 24 + FIRST as usize * (16 + PCAP_FRAME_LEN);
    wait_flushed(&lines, flushed_before_kill - 24);
    // ...then frames keep flowing while the process is killed.
    let (sent_tx, sent) = std::sync::mpsc::channel();
    let streaming = {
        let port_path = port_path.clone();
        std::thread::spawn(move || {
            for seq in FIRST..FIRST + 20_000 {
                if seq == FIRST + 2_000 {
                    let _ = sent_tx.send(());
                }
                if sender.send_to(&frame(seq), &port_path).is_err() {
                    break; // the bridge is gone
                }
            }
        })
    };
    sent.recv_timeout(Duration::from_secs(20))
        .expect("2000 more frames sent");
    child.kill().unwrap();
    child.wait().unwrap();
    streaming.join().unwrap();

    let pcap = std::fs::read(&pcap_path).unwrap();
    assert!(
        pcap.len() >= flushed_before_kill,
        "{} bytes, {flushed_before_kill} were flushed before the kill",
        pcap.len()
    );
    let (records, cut) = pcap_records(&pcap);
    for (seq, record) in records.iter().enumerate() {
        assert_eq!(record, &frame(seq as u32), "record {seq}");
    }
    let whole = records.len() as u32;
    assert!(whole >= FIRST, "{whole} whole records");
    println!("{whole} whole records, last one cut: {cut}");

    // The bridge restarts on the same capture file: it appends (one header, the cut record
    // cut off), it does not truncate the first life's capture.
    let (mut child, lines) = start_pcap_bridge(&port_path, &pcap_path);
    let sender = UnixDatagram::unbound().unwrap();
    const SECOND: u32 = 30;
    for seq in 0..SECOND {
        sender.send_to(&frame(1_000_000 + seq), &port_path).unwrap();
    }
    wait_flushed(&lines, SECOND as usize * (16 + PCAP_FRAME_LEN));
    child.kill().unwrap();
    child.wait().unwrap();
    let (after, cut) = pcap_records(&std::fs::read(&pcap_path).unwrap());
    assert!(!cut, "the second life's records are whole");
    assert_eq!(
        after.len(),
        records.len() + SECOND as usize,
        "the first life's {whole} records and the second's {SECOND}"
    );
    assert_eq!(
        &after[..records.len()],
        &records[..],
        "the first life is kept"
    );
    for (i, record) in after[records.len()..].iter().enumerate() {
        assert_eq!(
            record,
            &frame(1_000_000 + i as u32),
            "second life, record {i}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
