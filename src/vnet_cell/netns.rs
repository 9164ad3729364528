//! Linux-side helpers shared by the root-only tests and `ivbench`: a named network namespace
//! (made and removed with `ip netns`, entered per thread with `setns(2)`) and ICMP echo over a
//! raw socket, the Linux end of every ping to a cell.
//!
//! Both need root (`CAP_SYS_ADMIN` for namespaces, `CAP_NET_RAW` for the raw socket) and the
//! `ip` tool from iproute2.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

/// A named network namespace (`ip netns add NAME`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace `NAME` (an old one of that name is deleted first) and sets its
    /// loopback up.
    pub fn create(name: &str) -> io::Result<Netns> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ip(&["netns", "add", name])?;
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS...` and returns its standard output; a failure carries `ip`'s
    /// standard error.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec NAME PROGRAM`).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Moves the calling thread into the namespace: sockets it opens and processes it starts
    /// from then on live there. Other threads are not affected.
    pub fn enter(&self) -> io::Result<()> {
        enter(&self.name)
    }
}

/// Moves the calling thread into the network namespace named `name` (`/run/netns/NAME`),
/// without holding a [`Netns`] (which would keep the namespace from being deleted).
pub fn enter(name: &str) -> io::Result<()> {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("open {path}: {e}")))?;
    // SAFETY: setns on an open namespace fd; it affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("setns {path}: {e}")));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Runs `ip ARGS...`; returns its standard output, or an error with its standard error.
pub fn run_ip(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP echo request (type 8, code 0) with its checksum: `ident`, `seq`, and a payload of
/// `payload_len` bytes counting up from 0 (mod 256).
pub fn echo_request(ident: u16, seq: u16, payload_len: usize) -> Vec<u8> {
    let mut pkt = vec![0u8; 8 + payload_len];
    pkt[0] = 8;
    pkt[4..6].copy_from_slice(&ident.to_be_bytes());
    pkt[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in pkt[8..].iter_mut().enumerate() {
        *b = i as u8;
    }
    let c = internet_checksum(&pkt);
    pkt[2..4].copy_from_slice(&c.to_be_bytes());
    pkt
}

/// Sends `packet` on socket `fd` to `dst` (`sendto(2)` with an IPv4 address; for raw
/// sockets, whose address types in nix need its `net` feature, which the workspace does not
/// enable). Returns the bytes sent.
pub fn send_to_ipv4(fd: BorrowedFd<'_>, packet: &[u8], dst: Ipv4Addr) -> io::Result<usize> {
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a valid buffer and address on an open socket.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A raw ICMP socket in the calling thread's network namespace, for echo requests.
#[derive(Debug)]
pub struct EchoSocket {
    fd: OwnedFd,
    ident: u16,
    timeout: Duration,
}

impl EchoSocket {
    /// Opens the socket; a reply must arrive within `timeout` (receive time-out). Echo
    /// requests carry the low 16 bits of the process ID as their identifier.
    pub fn open(timeout: Duration) -> io::Result<EchoSocket> {
        // SAFETY: plain syscall, checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMP,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: a valid option value of the right size on an open socket.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EchoSocket {
            fd,
            ident: (std::process::id() & 0xFFFF) as u16,
            timeout,
        })
    }

    /// Sends echo request `seq` with a `payload_len`-byte payload to `dst` and waits for its
    /// reply (other ICMP traffic is skipped); returns the round-trip time. A reply whose
    /// payload differs from the request's is an `InvalidData` error; no reply within the
    /// time-out is the receive error (`WouldBlock`/`TimedOut`).
    pub fn ping(&self, dst: Ipv4Addr, seq: u16, payload_len: usize) -> io::Result<Duration> {
        let pkt = echo_request(self.ident, seq, payload_len);
        let start = Instant::now();
        send_to_ipv4(self.fd.as_fd(), &pkt, dst)?;
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: a valid buffer on an open socket.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return Err(io::Error::new(
                    e.kind(),
                    format!("no echo reply from {dst} (seq {seq}): {e}"),
                ));
            }
            // A raw IPv4 socket delivers the IP header first; its length is untrusted input.
            let got = &buf[..n as usize];
            // Other ICMP traffic does not extend the wait beyond the time-out.
            if start.elapsed() > self.timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no echo reply from {dst} (seq {seq}) within {:?}",
                        self.timeout
                    ),
                ));
            }
            let Some(&first) = got.first() else { continue };
            let ihl = usize::from(first & 0xF) * 4;
            let Some(icmp) = got.get(ihl..) else { continue };
            if icmp.len() >= 8
                && icmp[0] == 0
                && icmp[4..6] == self.ident.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                let rtt = start.elapsed();
                if icmp[8..] != pkt[8..] {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("echo reply {seq} from {dst} carries another payload"),
                    ));
                }
                return Ok(rtt);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_request_checksums_to_zero() {
        for len in [0, 1, 56, 1000] {
            let pkt = echo_request(0x1234, 7, len);
            assert_eq!(pkt.len(), 8 + len);
            assert_eq!(&pkt[..2], &[8, 0]);
            assert_eq!(&pkt[4..8], &[0x12, 0x34, 0, 7]);
            // A packet with its checksum in place sums to zero.
            assert_eq!(internet_checksum(&pkt), 0, "len {len}");
        }
        // RFC 1071's example bytes.
        assert_eq!(
            internet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }
}
