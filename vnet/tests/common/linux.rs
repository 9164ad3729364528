//! Linux-side helpers for the root-only tests: a network namespace, entering it from a
//! thread, ICMP echo over a raw socket, and TCP transfers through the kernel's stack.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use vnet::services::{source_byte, Crc32, PORT_SINK, PORT_SOURCE};

/// Whether the test may run (root); prints why not otherwise.
pub fn root_or_skip(test: &str) -> bool {
    if vnet::tap::is_root() {
        return true;
    }
    println!("SKIPPED {test}: needs root (network namespaces and TAP devices); CI runs it as root");
    false
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vnet-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip -n NAME ARGS...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command run inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into the namespace (sockets it opens and processes it
    /// starts live there).
    pub fn enter(&self) {
        let path = format!("/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on a valid namespace fd; affects only this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn icmp_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `count` ICMP echo requests to `dst` over a raw socket (the calling thread's
/// namespace) and returns the round-trip times of the replies.
pub fn ping(dst: Ipv4Addr, count: u16, payload: usize) -> Vec<Duration> {
    // SAFETY: plain syscall, checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_ICMP,
        )
    };
    assert!(
        fd >= 0,
        "raw ICMP socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: valid option value.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    let id = (std::process::id() & 0xFFFF) as u16;
    let mut rtts = Vec::new();
    for seq in 0..count {
        let mut pkt = vec![0u8; 8 + payload];
        pkt[0] = 8; // echo request
        pkt[4..6].copy_from_slice(&id.to_be_bytes());
        pkt[6..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in pkt[8..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let c = icmp_checksum(&pkt);
        pkt[2..4].copy_from_slice(&c.to_be_bytes());
        let start = Instant::now();
        // SAFETY: valid buffer and address.
        let n = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert_eq!(
            n as usize,
            pkt.len(),
            "sendto: {}",
            std::io::Error::last_os_error()
        );
        loop {
            let mut buf = [0u8; 65536];
            // SAFETY: valid buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n > 0,
                "no echo reply from {dst} (seq {seq}): {}",
                std::io::Error::last_os_error()
            );
            let n = n as usize;
            let ihl = usize::from(buf[0] & 0xF) * 4;
            let icmp = &buf[ihl..n];
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                assert_eq!(&icmp[8..], &pkt[8..], "echo payload");
                rtts.push(start.elapsed());
                break;
            }
        }
    }
    rtts
}

/// Sends `total` bytes to the cell's sink through Linux TCP and checks its CRC answer.
pub fn linux_sink(dst: Ipv4Addr, total: u64) {
    let mut s = TcpStream::connect_timeout(
        &SocketAddrV4::new(dst, PORT_SINK).into(),
        Duration::from_secs(10),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut crc = Crc32::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < total {
        let n = buf.len().min((total - sent) as usize);
        for (k, b) in buf[..n].iter_mut().enumerate() {
            *b = super::pattern(sent + k as u64);
        }
        s.write_all(&buf[..n]).unwrap();
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
        let n = s.read(&mut buf[..want]).unwrap();
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
