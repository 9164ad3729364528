//! [`Endpoint`] over the UIO backend, against a minimal fake `uio_ivshmem` device (sysfs
//! tree in the kernel's formats, a memfd as device memory, a SOCK_SEQPACKET socketpair as the
//! interrupt fd delivering 4-byte counts): the same driver, sections and interrupt as the
//! other backends, and the interrupt under tokio's `AsyncFd` with one-shot re-arm.

use std::fs::{self, File};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{symlink, FileExt};
use std::path::PathBuf;
use std::time::Duration;

use ivshmem_dev::regs::{INT_CONTROL, STATE};
use linux_uio_client::endpoint::Backend;
use linux_uio_client::uio::{page_size, UioDevice, UioPaths};
use linux_uio_client::{Channel, ChannelOptions, Endpoint};

struct Fake {
    dir: PathBuf,
    memfd: File,
    irq_kernel: File,
    irq_device: Option<OwnedFd>,
    paths: UioPaths,
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl Fake {
    /// uio0: registers, state table, input sections (2 x half a page), own output (half a
    /// page); this peer is ID 1 of 2.
    fn new(tag: &str) -> Fake {
        let p = page_size().unwrap();
        let dir = std::env::temp_dir().join(format!("endpoint-uio-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let paths = UioPaths {
            sysfs_root: dir.join("sys/class/uio"),
            dev_root: dir.join("dev"),
        };
        fs::create_dir_all(&paths.dev_root).unwrap();
        let sys = paths.sysfs_root.join("uio0");
        let write = |rel: &str, text: String| {
            let path = sys.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, text).unwrap();
        };
        write("name", "uio_ivshmem[0000:00:0c.0]\n".into());
        write("version", "1\n".into());
        write("event", "0\n".into());
        let maps = [
            ("registers", p),
            ("state_table", p),
            ("input_sections", p),
            ("output_section", p / 2),
        ];
        for (n, (name, size)) in maps.iter().enumerate() {
            write(&format!("maps/map{n}/name"), format!("{name}\n"));
            write(
                &format!("maps/map{n}/addr"),
                format!("0x{:016x}\n", 0xfe00_0000u64 + (n * p) as u64),
            );
            write(&format!("maps/map{n}/size"), format!("0x{size:016x}\n"));
            write(&format!("maps/map{n}/offset"), "0x0\n".into());
        }
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"endpoint-uio".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len((maps.len() * p) as u64).unwrap();
        memfd.write_all_at(&1u32.to_ne_bytes(), 0x00).unwrap(); // ID
        memfd.write_all_at(&2u32.to_ne_bytes(), 0x04).unwrap(); // MAX_PEERS
        symlink(
            format!("/proc/self/fd/{}", memfd.as_raw_fd()),
            paths.dev_root.join("uio0"),
        )
        .unwrap();
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two new fds on success.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds are fresh and owned by nobody else.
        let (irq_kernel, irq_device) =
            unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Fake {
            dir,
            memfd,
            irq_kernel,
            irq_device: Some(irq_device),
            paths,
        }
    }

    fn open(&mut self) -> UioDevice {
        UioDevice::open_with_interrupt_fd(
            &self.paths.device_paths(0),
            self.irq_device.take().unwrap(),
        )
        .unwrap()
    }

    fn reg(&self, offset: u32) -> u32 {
        let mut b = [0u8; 4];
        self.memfd.read_exact_at(&mut b, u64::from(offset)).unwrap();
        u32::from_ne_bytes(b)
    }

    /// The "kernel": deliver an interrupt in one-shot mode (INT_CONTROL cleared, count sent).
    fn interrupt(&mut self, count: u32) {
        self.memfd
            .write_all_at(&0u32.to_ne_bytes(), u64::from(INT_CONTROL))
            .unwrap();
        assert_eq!(self.irq_kernel.write(&count.to_ne_bytes()).unwrap(), 4);
    }
}

#[test]
fn uio_endpoint_gives_driver_sections_and_a_rearming_interrupt() {
    let mut fake = Fake::new("sync");
    let mut endpoint = Endpoint::from_uio(fake.open()).unwrap();
    assert_eq!(endpoint.backend(), Backend::Uio);
    assert_eq!(endpoint.id(), 1);
    assert_eq!(endpoint.the_peer(), Some(0));
    let dev = endpoint.ivshmem();
    let p = page_size().unwrap();
    assert!(dev.own_output().is_writable());
    assert_eq!(dev.own_output().len(), p / 2);
    let peer = dev.peer_output(0).unwrap();
    assert!(!peer.is_writable());
    assert_eq!(peer.len(), p / 2);
    // STATE goes to the register page.
    dev.set_state(2);
    assert_eq!(fake.reg(STATE), 2);

    // Nothing pending: no interrupt, nothing consumed.
    assert_eq!(endpoint.take_interrupt().unwrap(), None);
    // Three interrupts merged into one count: taken once, re-armed.
    fake.interrupt(3);
    assert_eq!(fake.reg(INT_CONTROL), 0);
    assert_eq!(endpoint.take_interrupt().unwrap(), Some(3));
    assert_eq!(fake.reg(INT_CONTROL), 1, "one-shot mode must be re-armed");
    assert_eq!(endpoint.take_interrupt().unwrap(), None);
    fake.interrupt(4);
    assert_eq!(
        endpoint
            .wait_interrupt_timeout(Duration::from_secs(10))
            .unwrap(),
        Some(1)
    );
    assert_eq!(fake.reg(INT_CONTROL), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn uio_interrupt_under_asyncfd_rearms() {
    let mut fake = Fake::new("async");
    let endpoint = Endpoint::from_uio(fake.open()).unwrap();
    let mut channel = Channel::new(endpoint, ChannelOptions::default()).unwrap();
    for count in 1..=3u32 {
        fake.interrupt(count);
        let n = tokio::time::timeout(Duration::from_secs(10), channel.interrupt())
            .await
            .expect("the interrupt fd never became readable")
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(fake.reg(INT_CONTROL), 1, "re-armed after interrupt {count}");
    }
}
