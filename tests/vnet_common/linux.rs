//! Linux-side helpers for the root-only tests: a network namespace, entering it from a
//! thread, ICMP echo over a raw socket, and TCP transfers through the kernel's stack.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::process::Command;
use std::time::Duration;

use ivshmem_stack::vnet_cell::netns::EchoSocket;
use ivshmem_stack::vnet_cell::services::{source_byte, Crc32, PORT_SINK, PORT_SOURCE};

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

/// Fetches `http://dst/` with curl (inside `ns`) if installed, else with a std HTTP/1.1
/// client from the calling thread; returns the body.
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
    let mut s =
        TcpStream::connect_timeout(&SocketAddrV4::new(dst, 80).into(), Duration::from_secs(10))
            .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {dst}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}
