//! Linux-side helpers for the root-only tests: a network namespace, entering it from a
//! thread, ICMP echo over a raw socket, and TCP transfers through the kernel's stack.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::Duration;

use ivshmem_stack::vnet_cell::netns::{internet_checksum, send_to_ipv4, EchoSocket};
use ivshmem_stack::vnet_cell::services::{
    source_byte, Crc32, PORT_ECHO, PORT_HTTP, PORT_SINK, PORT_SOURCE,
};

/// Whether the test may run (root); prints why not otherwise.
pub fn root_or_skip(test: &str) -> bool {
    if vnet::tap::is_root() {
        return true;
    }
    println!("SKIPPED {test}: needs root (network namespaces and TAP devices); CI runs it as root");
    false
}

/// A named network namespace ([`ivshmem_stack::vnet_cell::netns::Netns`], `vnet-TAG-PID`), deleted on drop;
/// panics on failure.
pub struct Netns(ivshmem_stack::vnet_cell::netns::Netns);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vnet-{tag}-{}", std::process::id());
        Netns(
            ivshmem_stack::vnet_cell::netns::Netns::create(&name)
                .unwrap_or_else(|e| panic!("netns {name}: {e}")),
        )
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        self.0
            .ip(args)
            .unwrap_or_else(|e| panic!("ip {args:?}: {e}"))
    }

    /// A command run inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: &str) -> Command {
        self.0.command(program)
    }

    /// Moves the calling thread into the namespace (sockets it opens and processes it
    /// starts live there).
    pub fn enter(&self) {
        self.0.enter().unwrap();
    }
}

/// Sends `count` ICMP echo requests to `dst` over a raw socket (the calling thread's
/// namespace) and returns the round-trip times of the replies (each reply's payload is
/// checked against the request's).
pub fn ping(dst: Ipv4Addr, count: u16, payload: usize) -> Vec<Duration> {
    let socket = EchoSocket::open(Duration::from_secs(5)).expect("raw ICMP socket");
    (0..count)
        .map(|seq| {
            socket
                .ping(dst, seq, payload)
                .unwrap_or_else(|e| panic!("echo {seq} to {dst}: {e}"))
        })
        .collect()
}

/// Sends one ICMP echo request with a `payload`-byte payload to `dst` and asserts that no
/// reply comes within `wait` (something the cell must drop).
pub fn ping_unanswered(dst: Ipv4Addr, payload: usize, wait: Duration) {
    let socket = EchoSocket::open(wait).expect("raw ICMP socket");
    if let Ok(rtt) = socket.ping(dst, 0xfff0, payload) {
        panic!("a {payload}-byte echo to {dst} was answered after {rtt:?}");
    }
}

/// The number after `key ` on the cell's status page (a line `key N`); panics if missing.
pub fn status_value(page: &str, key: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no `{key} N` line on the status page:\n{page}"))
}

/// Sends `total` bytes to the cell's sink through Linux TCP and checks its CRC answer.
pub fn linux_sink(dst: Ipv4Addr, total: u64) {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(dst, PORT_SINK).into(),
        Duration::from_secs(10),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    // A cell that stops reading fails the test instead of blocking it.
    s.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut crc = Crc32::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < total {
        let n = buf.len().min((total - sent) as usize);
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = super::pattern(sent + k as u64);
        }
        s.write_all(&buf[..n])
            .unwrap_or_else(|e| panic!("sending to the cell's sink at byte {sent}: {e}"));
        crc.update(&buf[..n]);
        sent += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut line = String::new();
    s.read_to_string(&mut line).unwrap();
    assert_eq!(
        line,
        format!("{total} {:08x}\n", crc.finish()),
        "sink answer"
    );
}

/// Reads `total` bytes from the cell's source through Linux TCP, checking every byte.
pub fn linux_source(dst: Ipv4Addr, total: u64) {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(dst, PORT_SOURCE).into(),
        Duration::from_secs(10),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    while got < total {
        let want = buf.len().min((total - got) as usize);
        let n = s
            .read(&mut buf[..want])
            .unwrap_or_else(|e| panic!("reading the cell's source at byte {got}: {e}"));
        assert!(n > 0, "source closed early at {got}");
        for (k, &b) in buf[..n].iter().enumerate() {
            assert_eq!(
                b,
                source_byte(got + k as u64),
                "source byte at {}",
                got + k as u64
            );
        }
        got += n as u64;
    }
}

/// Fetches `http://dst/` with curl (inside `ns`) if installed, else with [`http_get_std`];
/// returns the body.
pub fn http_get(ns: &Netns, dst: Ipv4Addr) -> String {
    if Command::new("curl").arg("--version").output().is_ok() {
        let out = ns
            .command("curl")
            .args(["-sS", "--max-time", "20", &format!("http://{dst}/")])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8(out.stdout).unwrap();
    }
    http_get_std(dst)
}

/// Fetches `http://dst/` with a std HTTP/1.1 client from the calling thread (one
/// connection, no retry); returns the body.
pub fn http_get_std(dst: Ipv4Addr) -> String {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(dst, PORT_HTTP).into(),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("HTTP connect to {dst}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .unwrap_or_else(|e| panic!("HTTP response from {dst}: {e}"));
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// `count` TCP connections to the cell's echo service open at once (all connected before
/// any data moves), then each echoes `len` bytes of its own pattern. No retries.
pub fn echo_concurrently(dst: Ipv4Addr, count: usize, len: usize) {
    let mut conns: Vec<TcpStream> = (0..count)
        .map(|i| {
            let s = TcpStream::connect_timeout(
                &SocketAddrV4::new(dst, PORT_ECHO).into(),
                Duration::from_secs(20),
            )
            .unwrap_or_else(|e| panic!("echo connection {i} of {count}: {e}"));
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
            s
        })
        .collect();
    for (i, s) in conns.iter_mut().enumerate() {
        let data: Vec<u8> = (0..len).map(|k| (i + k) as u8).collect();
        s.write_all(&data).unwrap();
        let mut back = vec![0u8; len];
        s.read_exact(&mut back)
            .unwrap_or_else(|e| panic!("echo connection {i} of {count}: {e}"));
        assert_eq!(back, data, "echo connection {i}");
    }
}

/// Sends a TCP SYN to `dst:port` from `src`, an address nobody on the link answers ARP
/// for: the cell's SYN-ACK never gets out, a half-open connection (raw IPv4 socket; root).
pub fn syn_from_nowhere(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, port: u16) {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = 5 << 4; // data offset: 20 bytes
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12 + tcp.len());
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&[0, 6, 0, tcp.len() as u8]);
    pseudo.extend_from_slice(&tcp);
    let sum = internet_checksum(&pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = internet_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&tcp);
    // An IPPROTO_RAW socket sends the packet with our own header (IP_HDRINCL implied).
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Raw,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        nix::sys::socket::SockProtocol::Raw,
    )
    .expect("raw IPv4 socket");
    let n = send_to_ipv4(std::os::fd::AsFd::as_fd(&socket), &ip, dst)
        .expect("sending a SYN from nowhere");
    assert_eq!(n, ip.len());
}
