//! Helpers shared by the vnet integration tests: a smoltcp client peer with its own event
//! loop over a vnet link, and TCP transfer checks against the cell's services.
#![allow(dead_code)]

pub mod linux;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant as StdInstant};

use ivshmem_dev::RegisterAccess;
use ivshmem_stack::vnet_cell::services::{source_byte, Crc32};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::Device;
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, Ipv4Address, Ipv4Cidr};
use vnet::bridge::Interrupt;
use vnet::VnetLink;

/// Safety net for a hung test (never used for synchronisation).
pub const TEST_DEADLINE: Duration = Duration::from_secs(120);

/// A smoltcp interface with client sockets, over some device, driven by an interrupt.
pub struct Client<D: Device, I: Interrupt> {
    pub device: D,
    pub irq: I,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    epoch: StdInstant,
    /// Called after every interrupt (link state machine).
    pub on_interrupt: fn(&mut D),
    /// Called after every poll (flush + doorbell).
    pub after_poll: fn(&mut D),
    /// Sleep handshake: true if the caller may sleep.
    pub may_sleep: fn(&mut D) -> bool,
    next_port: u16,
    /// Debug description of the device.
    pub describe: fn(&D) -> String,
}

pub fn link_on_interrupt<R: RegisterAccess>(l: &mut LinkDevice<R>) {
    l.0.poll_link();
}
pub fn link_after_poll<R: RegisterAccess>(l: &mut LinkDevice<R>) {
    if l.0.nic_ref().fault().is_some() {
        l.0.poll_link();
    }
    l.0.flush();
}
pub fn link_may_sleep<R: RegisterAccess>(l: &mut LinkDevice<R>) -> bool {
    l.0.prepare_sleep()
}

/// A VnetLink as a smoltcp device (forwarding to its NIC).
pub struct LinkDevice<R: RegisterAccess>(pub VnetLink<R>);

impl<R: RegisterAccess> Device for LinkDevice<R> {
    type RxToken<'a>
        = vnet::nic::ShmRxToken<'a>
    where
        Self: 'a;
    type TxToken<'a>
        = vnet::nic::ShmTxToken<'a>
    where
        Self: 'a;
    fn receive(&mut self, t: Instant) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        self.0.receive(t)
    }
    fn transmit(&mut self, t: Instant) -> Option<Self::TxToken<'_>> {
        self.0.transmit(t)
    }
    fn capabilities(&self) -> smoltcp::phy::DeviceCapabilities {
        self.0.capabilities()
    }
}

impl<R: RegisterAccess, I: Interrupt> Client<LinkDevice<R>, I> {
    /// A client on a vnet link.
    pub fn on_link(link: VnetLink<R>, irq: I, address: Ipv4Cidr) -> Self {
        let mut c = Client::new(LinkDevice(link), irq, address);
        c.on_interrupt = link_on_interrupt::<R>;
        c.after_poll = link_after_poll::<R>;
        c.may_sleep = link_may_sleep::<R>;
        c.describe = |l| {
            format!(
                "{:?} carrier {} {:?} {:?}",
                l.0.state(),
                l.0.carrier(),
                l.0.stats(),
                l.0.nic_ref().stats()
            )
        };
        (c.on_interrupt)(&mut c.device);
        c
    }
}

impl<D: Device, I: Interrupt> Client<D, I> {
    pub fn new(mut device: D, irq: I, address: Ipv4Cidr) -> Self {
        let [_, _, c, d] = address.address().octets();
        let mac = EthernetAddress([0x02, 0xc1, 0, 0, c, d]);
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = u64::from(d) * 7919;
        let mut iface = Interface::new(config, &mut device, Instant::from_micros(0));
        iface.update_ip_addrs(|a| a.push(IpCidr::Ipv4(address)).unwrap());
        Client {
            device,
            irq,
            iface,
            sockets: SocketSet::new(Vec::new()),
            epoch: StdInstant::now(),
            on_interrupt: |_| {},
            after_poll: |_| {},
            may_sleep: |_| true,
            next_port: 49152,
            describe: |_| String::new(),
        }
    }

    pub fn now(&self) -> Instant {
        Instant::from_micros(self.epoch.elapsed().as_micros() as i64)
    }

    /// Opens a TCP connection to `remote:port` with `buffer`-byte socket buffers.
    pub fn connect(&mut self, remote: Ipv4Address, port: u16, buffer: usize) -> SocketHandle {
        let mut s = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; buffer]),
            tcp::SocketBuffer::new(vec![0; buffer]),
        );
        s.set_nagle_enabled(false);
        self.next_port += 1;
        s.connect(
            self.iface.context(),
            (IpAddress::Ipv4(remote), port),
            self.next_port,
        )
        .unwrap();
        self.sockets.add(s)
    }

    /// One round: interrupt, smoltcp, flush.
    pub fn poll(&mut self) {
        if self.irq.take().unwrap() {
            (self.on_interrupt)(&mut self.device);
        }
        let now = self.now();
        self.iface.poll(now, &mut self.device, &mut self.sockets);
        (self.after_poll)(&mut self.device);
    }

    /// Blocks until the interrupt or smoltcp's next deadline (after the sleep handshake).
    pub fn wait(&mut self) {
        if !(self.may_sleep)(&mut self.device) {
            return;
        }
        let now = self.now();
        let ms = self
            .iface
            .poll_delay(now, &self.sockets)
            .map_or(100, |d| d.total_millis().min(100) as i32);
        let mut pfd = libc::pollfd {
            fd: self.irq.fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }

    /// Polls until `f` returns `Some`, or panics after [`TEST_DEADLINE`].
    pub fn run_until<T>(&mut self, mut f: impl FnMut(&mut SocketSet<'static>) -> Option<T>) -> T {
        let start = StdInstant::now();
        loop {
            self.poll();
            if let Some(t) = f(&mut self.sockets) {
                self.poll();
                return t;
            }
            self.poll();
            if let Some(t) = f(&mut self.sockets) {
                self.poll();
                return t;
            }
            if start.elapsed() > Duration::from_secs(5) && std::env::var_os("VNET_DEBUG").is_some()
            {
                eprintln!("{}", (self.describe)(&self.device));
            }
            assert!(start.elapsed() < TEST_DEADLINE, "test deadline exceeded");
            self.wait();
        }
    }

    /// Sends `total` bytes (a deterministic pattern) to the sink, half-closes, and returns
    /// (bytes, crc) from the sink's answer line together with the locally computed CRC.
    pub fn sink_transfer(
        &mut self,
        remote: Ipv4Address,
        total: u64,
        buffer: usize,
    ) -> (u64, u32, u32) {
        let h = self.connect(
            remote,
            ivshmem_stack::vnet_cell::services::PORT_SINK,
            buffer,
        );
        let mut sent = 0u64;
        let mut crc = Crc32::new();
        let mut closed = false;
        let mut answer = Vec::new();
        let line = self.run_until(|sockets| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            while sent < total && s.can_send() {
                let n = s
                    .send(|buf| {
                        let n = buf.len().min((total - sent) as usize);
                        for (k, b) in buf[..n].iter_mut().enumerate() {
                            *b = pattern(sent + k as u64);
                        }
                        crc.update(&buf[..n]);
                        (n, n)
                    })
                    .unwrap();
                sent += n as u64;
                if n == 0 {
                    break;
                }
            }
            if sent == total && !closed {
                s.close();
                closed = true;
            }
            while s.can_recv() {
                s.recv(|d| {
                    answer.extend_from_slice(d);
                    (d.len(), ())
                })
                .unwrap();
            }
            if std::env::var_os("VNET_DEBUG").is_some() && closed {
                eprintln!(
                    "client sink socket {:?} sq {} sent {sent}",
                    s.state(),
                    s.send_queue()
                );
            }
            if answer.ends_with(b"\n") || (!s.is_open() && closed) {
                return Some(String::from_utf8(answer.clone()).unwrap());
            }
            None
        });
        let mut parts = line.split_whitespace();
        let bytes: u64 = parts.next().expect("byte count").parse().unwrap();
        let remote_crc = u32::from_str_radix(parts.next().expect("crc"), 16).unwrap();
        self.sockets.remove(h);
        (bytes, remote_crc, crc.finish())
    }

    /// Reads `total` bytes from the source and checks every byte; returns the bytes read.
    pub fn source_transfer(&mut self, remote: Ipv4Address, total: u64, buffer: usize) -> u64 {
        let h = self.connect(
            remote,
            ivshmem_stack::vnet_cell::services::PORT_SOURCE,
            buffer,
        );
        let mut got = 0u64;
        let mut bad = None;
        self.run_until(|sockets| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            while s.can_recv() && got < total {
                s.recv(|d| {
                    let n = d.len().min((total - got) as usize);
                    for (k, &b) in d[..n].iter().enumerate() {
                        if b != source_byte(got + k as u64) && bad.is_none() {
                            bad = Some(got + k as u64);
                        }
                    }
                    got += n as u64;
                    (n, ())
                })
                .unwrap();
            }
            (got >= total).then_some(())
        });
        assert_eq!(bad, None, "source byte mismatch at offset {bad:?}");
        let s = self.sockets.get_mut::<tcp::Socket>(h);
        s.abort();
        self.poll();
        self.sockets.remove(h);
        got
    }

    /// Sends `total` bytes to the echo port and checks they come back identical.
    pub fn echo_transfer(&mut self, remote: Ipv4Address, total: u64, buffer: usize) {
        let h = self.connect(
            remote,
            ivshmem_stack::vnet_cell::services::PORT_ECHO,
            buffer,
        );
        let (mut sent, mut got) = (0u64, 0u64);
        let mut bad = None;
        self.run_until(|sockets| {
            let s = sockets.get_mut::<tcp::Socket>(h);
            while sent < total && s.can_send() {
                let n = s
                    .send(|buf| {
                        let n = buf.len().min((total - sent) as usize);
                        for (k, b) in buf[..n].iter_mut().enumerate() {
                            *b = pattern(sent + k as u64);
                        }
                        (n, n)
                    })
                    .unwrap();
                if n == 0 {
                    break;
                }
                sent += n as u64;
            }
            while s.can_recv() {
                s.recv(|d| {
                    for (k, &b) in d.iter().enumerate() {
                        if b != pattern(got + k as u64) && bad.is_none() {
                            bad = Some(got + k as u64);
                        }
                    }
                    got += d.len() as u64;
                    (d.len(), ())
                })
                .unwrap();
            }
            (got >= total).then_some(())
        });
        assert_eq!(bad, None, "echo mismatch at offset {bad:?}");
        assert_eq!(got, total);
        self.sockets.get_mut::<tcp::Socket>(h).close();
        self.poll();
        self.sockets.remove(h);
    }
}

/// The client's data pattern (distinct from the source's).
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

struct StderrLog;
impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, r: &log::Record) {
        eprintln!(
            "{:?} {}: {}",
            std::thread::current().name(),
            r.target(),
            r.args()
        );
    }
    fn flush(&self) {}
}
static LOGGER: StderrLog = StderrLog;

/// smoltcp's log output on stderr when `VNET_LOG` is set.
pub fn init_log() {
    if std::env::var_os("VNET_LOG").is_some() {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// The threads of a test, each reporting its end (return or panic) on one channel, so the
/// test waits for a thread with a deadline and fails with a message naming the thread that
/// hung or ended too early, instead of blocking CI forever in `join`.
pub struct Threads {
    ended_tx: std::sync::mpsc::Sender<&'static str>,
    ended: std::sync::mpsc::Receiver<&'static str>,
}

impl Default for Threads {
    fn default() -> Self {
        let (ended_tx, ended) = std::sync::mpsc::channel();
        Threads { ended_tx, ended }
    }
}

impl Threads {
    /// Spawns `f` as thread `name` (unique within the test).
    pub fn spawn<T: Send + 'static>(
        &self,
        name: &'static str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        /// Reports the end even when `f` panics (dropped while unwinding).
        struct Ended(std::sync::mpsc::Sender<&'static str>, &'static str);
        impl Drop for Ended {
            fn drop(&mut self) {
                let _ = self.0.send(self.1);
            }
        }
        let ended = Ended(self.ended_tx.clone(), name);
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let _ended = ended;
                f()
            })
            .expect("spawning a test thread")
    }

    /// Waits until thread `name` has ended, at most `limit`, and joins it. Fails the test if
    /// it did not end in time, if it panicked, or if another thread ended first (a cell or
    /// bridge that stops while a client waits for it is the bug to report, not a hang).
    pub fn join<T>(
        &self,
        name: &'static str,
        handle: std::thread::JoinHandle<T>,
        limit: Duration,
    ) -> T {
        match self.ended.recv_timeout(limit) {
            Ok(n) if n == name => {}
            Ok(other) => panic!(
                "thread `{other}` ended while the test waited for `{name}` (its panic, if any, \
                 is printed above)"
            ),
            Err(_) => panic!("thread `{name}` did not finish within {limit:?}: hung"),
        }
        handle
            .join()
            .unwrap_or_else(|_| panic!("thread `{name}` panicked (message above)"))
    }
}
