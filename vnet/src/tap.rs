//! A Linux TAP device (`/dev/net/tun`, `IFF_TAP | IFF_NO_PI`): raw Ethernet frames to and
//! from the kernel's network stack.
//!
//! The device is created with the `TUNSETIFF` ioctl (needs `CAP_NET_ADMIN`) and disappears
//! when the file descriptor is closed. Address, MTU and link state are set by running the
//! `ip` command from iproute2 ([`Tap::configure`]): simple, visible in logs, and exactly
//! what an administrator would type. The carrier follows the vnet link through
//! `TUNSETCARRIER`, so Linux shows `NO-CARRIER` while the peer cell is away.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETCARRIER` = `_IOW('T', 226, int)`.
const TUNSETCARRIER: libc::c_ulong = 0x4004_54e2;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as far as `TUNSETIFF` uses it (name, flags, padded to 40 bytes).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Creates (or attaches to) the TAP device `name` (at most 15 bytes; empty: the kernel
    /// picks `tapN`). The fd is non-blocking.
    pub fn open(name: &str) -> io::Result<Tap> {
        if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name `{name}` longer than 15 bytes or with a NUL"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/net/tun: {e}")))?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `req` is (40 bytes).
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("TUNSETIFF `{name}` (needs CAP_NET_ADMIN): {e}"),
            ));
        }
        // SAFETY: the kernel wrote a NUL-terminated name into the array (IFNAMSIZ includes it).
        let name = unsafe { CStr::from_ptr(req.name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tap { file, name })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the carrier (Linux shows `NO-CARRIER` and stops transmitting while it is off).
    pub fn set_carrier(&self, on: bool) -> io::Result<()> {
        let value: libc::c_int = on.into();
        // SAFETY: TUNSETCARRIER reads one int from the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETCARRIER, &value) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Runs `ip link set dev NAME mtu IP_MTU`, `ip address add CIDR dev NAME` (if given) and
    /// `ip link set dev NAME up`.
    pub fn configure(&self, address: Option<&str>, ip_mtu: usize) -> io::Result<()> {
        let mtu = ip_mtu.to_string();
        run_ip(&["link", "set", "dev", &self.name, "mtu", &mtu])?;
        if let Some(cidr) = address {
            run_ip(&["address", "add", cidr, "dev", &self.name])?;
        }
        run_ip(&["link", "set", "dev", &self.name, "up"])
    }

    /// Reads one frame (`WouldBlock` when none is queued).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reads at most buf.len() bytes into buf.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame.
    pub fn write(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: writes frame.len() bytes from frame.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// Runs `ip ARGS...`, failing with its stderr.
pub fn run_ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running `ip {}`: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Whether this process may create TAP devices (effective UID 0; a non-root process with
/// `CAP_NET_ADMIN` is not detected and gets a clear error from [`Tap::open`] instead).
pub fn is_root() -> bool {
    // SAFETY: plain syscall without arguments.
    unsafe { libc::geteuid() == 0 }
}
