//! Property tests: arbitrary sysfs contents and arbitrary map geometry never make the UIO
//! backend panic or fault; kernel-formatted values always parse back exactly.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{symlink, FileExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_uio_client::uio::{
    page_size, parse_hex, parse_line, parse_u32, MapLayout, UioDevice, UioDeviceInfo, UioPaths,
};
use proptest::prelude::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "uio-props-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

const FILES: [&str; 3] = ["name", "version", "event"];
const MAP_FILES: [&str; 4] = ["name", "addr", "size", "offset"];

/// Bytes that are often almost right: kernel-like values, truncated, garbled, or random.
fn attribute() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        "0x[0-9a-fA-F]{0,18}\n?".prop_map(String::into_bytes),
        "[0-9]{0,12}\n?".prop_map(String::into_bytes),
        "[ -~]{0,12}\n{0,2}".prop_map(String::into_bytes),
    ]
}

/// Map sizes biased to the edges: overflow-prone near 2^64, and small page-ish values.
fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (u64::MAX - 0x2000..=u64::MAX).prop_map(|s| s & !3),
        u64::MAX - 0x2000..=u64::MAX,
        (0u64..0x6000).prop_map(|s| s & !3),
    ]
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"uio-props".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh fd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Any content in any attribute file: reading the device gives a value or an error.
    #[test]
    fn arbitrary_sysfs_files_never_panic(
        device_files in proptest::collection::vec(attribute(), 3),
        map_files in proptest::collection::vec(proptest::collection::vec(attribute(), 4), 0..7),
    ) {
        let dir = TempDir::new();
        let sys = dir.0.join("uio0");
        for (file, content) in FILES.iter().zip(&device_files) {
            write(&sys.join(file), content);
        }
        for (n, files) in map_files.iter().enumerate() {
            for (file, content) in MAP_FILES.iter().zip(files) {
                write(&sys.join(format!("maps/map{n}/{file}")), content);
            }
        }
        fs::create_dir_all(sys.join("maps")).unwrap();
        match UioDeviceInfo::read(&sys) {
            Ok(info) => {
                let _ = MapLayout::identify(&sys.join("maps"), &info.maps);
            }
            Err(err) => prop_assert!(!err.to_string().is_empty()),
        }
    }

    /// Any map geometry and register values against a 5-page device: open succeeds or gives
    /// an error, and never maps past the device memory.
    #[test]
    fn arbitrary_map_geometry_never_panics_or_faults(
        geometry in proptest::collection::vec((size(), 0u64..0x3000), 2..6),
        small in proptest::collection::vec((0u64..0x6000, 0u64..0x40), 2..6),
        use_small in any::<bool>(),
        id in 0u32..20,
        max_peers in 0u32..20,
    ) {
        let dir = TempDir::new();
        let paths = UioPaths { sysfs_root: dir.0.join("sys"), dev_root: dir.0.join("dev") };
        let sys = paths.sysfs_root.join("uio0");
        write(&sys.join("name"), b"uio_ivshmem[0000:00:0c.0]\n");
        write(&sys.join("version"), b"1\n");
        write(&sys.join("event"), b"0\n");
        let maps = if use_small { &small } else { &geometry };
        for (n, (size, offset)) in maps.iter().enumerate() {
            let m = sys.join(format!("maps/map{n}"));
            write(&m.join("name"), b"\n");
            write(&m.join("addr"), b"0x00000000fe000000\n");
            write(&m.join("size"), format!("0x{size:016x}\n").as_bytes());
            write(&m.join("offset"), format!("0x{offset:x}\n").as_bytes());
        }
        let device_memory = memfd(5 * page_size().unwrap() as u64);
        device_memory.write_all_at(&id.to_ne_bytes(), 0).unwrap();
        device_memory.write_all_at(&max_peers.to_ne_bytes(), 4).unwrap();
        fs::create_dir_all(&paths.dev_root).unwrap();
        symlink(
            format!("/proc/self/fd/{}", device_memory.as_raw_fd()),
            paths.dev_root.join("uio0"),
        )
        .unwrap();
        if let Ok(device) = UioDevice::open(&paths.device_paths(0)) {
            // Whatever was accepted is fully readable.
            for region in [
                device.region(linux_uio_client::uio::MapRole::StateTable),
                device.region(linux_uio_client::uio::MapRole::OutputSection),
            ]
            .into_iter()
            .flatten()
            {
                let mut buf = vec![0; region.len()];
                region.read(0, &mut buf).unwrap();
            }
            prop_assert!(device.id() < device.max_peers());
        }
    }

    /// Two-map devices (registers and state table only) pass the size checks that need no
    /// registers far more often, so edge sizes and offsets reach the mapping arithmetic.
    #[test]
    fn edge_geometry_of_two_maps_never_panics_or_faults(
        maps in proptest::collection::vec((size(), prop_oneof![Just(0u64), 0u64..0x1100]), 2),
        max_peers in 0u32..20,
    ) {
        let dir = TempDir::new();
        let paths = UioPaths { sysfs_root: dir.0.join("sys"), dev_root: dir.0.join("dev") };
        let sys = paths.sysfs_root.join("uio0");
        write(&sys.join("name"), b"uio_ivshmem[0000:00:0c.0]\n");
        write(&sys.join("version"), b"1\n");
        write(&sys.join("event"), b"0\n");
        for (n, (size, offset)) in maps.iter().enumerate() {
            let m = sys.join(format!("maps/map{n}"));
            write(&m.join("name"), b"\n");
            write(&m.join("addr"), b"0x00000000fe000000\n");
            write(&m.join("size"), format!("0x{size:x}\n").as_bytes());
            write(&m.join("offset"), format!("0x{offset:x}\n").as_bytes());
        }
        let device_memory = memfd(2 * page_size().unwrap() as u64);
        device_memory.write_all_at(&max_peers.to_ne_bytes(), 4).unwrap();
        fs::create_dir_all(&paths.dev_root).unwrap();
        symlink(
            format!("/proc/self/fd/{}", device_memory.as_raw_fd()),
            paths.dev_root.join("uio0"),
        )
        .unwrap();
        if let Ok(device) = UioDevice::open(&paths.device_paths(0)) {
            let table = device.region(linux_uio_client::uio::MapRole::StateTable).unwrap();
            let mut buf = vec![0; table.len()];
            table.read(0, &mut buf).unwrap();
        }
    }

    /// Values printed the kernel's ways ("%pa" zero-padded, "0x%llx") parse back exactly.
    #[test]
    fn kernel_hex_formats_round_trip(value in any::<u64>()) {
        let padded = parse_line(format!("0x{value:016x}\n").as_bytes()).unwrap();
        prop_assert_eq!(parse_hex(&padded).unwrap(), value);
        let plain = parse_line(format!("0x{value:x}\n").as_bytes()).unwrap();
        prop_assert_eq!(parse_hex(&plain).unwrap(), value);
    }

    /// "%u\n" event counts parse back exactly.
    #[test]
    fn event_counts_round_trip(value in any::<u32>()) {
        let line = parse_line(format!("{value}\n").as_bytes()).unwrap();
        prop_assert_eq!(parse_u32(&line).unwrap(), value);
    }

    /// The line and number parsers never panic on any input.
    #[test]
    fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        if let Ok(line) = parse_line(&bytes) {
            let _ = parse_hex(&line);
            let _ = parse_u32(&line);
        }
    }
}
