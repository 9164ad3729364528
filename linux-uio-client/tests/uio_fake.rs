//! The UIO backend against a faithful fake of a `uio_ivshmem` device:
//! - a temporary sysfs tree written in the kernel's formats (`name`/`version` `"%s\n"`, `event`
//!   `"%u\n"`, map `addr`/`size` `"%pa\n"` = `0x` + 16 zero-padded hex digits, `offset`
//!   `"0x%llx\n"`),
//! - a memfd as the device memory, reached through a `dev/uioN` symlink to `/proc/self/fd/N`,
//!   with map N at file offset N * page size (as UIO selects maps by mmap offset),
//! - a SOCK_SEQPACKET socketpair as the interrupt fd (exact 4-byte messages, pollable).
//!
//! Every map in these tests fits in one page, so map N's bytes at file offset N * page size do
//! not overlap map N+1's (a real UIO device node has no such limit; the offset only selects).

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_uio_client::uio::{
    page_size, InterruptError, MapRole, RegionError, SysfsProblem, UioDevice, UioDevicePaths,
    UioError, UioPaths,
};

// ---------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "uio-fake-{}-{}",
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

fn page() -> usize {
    page_size().unwrap()
}

#[derive(Clone)]
struct MapSpec {
    name: &'static str,
    size: u64,
    offset: u64,
}

fn map(name: &'static str, size: usize) -> MapSpec {
    MapSpec {
        name,
        size: size as u64,
        offset: 0,
    }
}

/// The usual maps of a 2-peer link with a R/W section, each within one page.
fn maps_with_rw() -> Vec<MapSpec> {
    let p = page();
    vec![
        map("registers", p),
        map("state_table", p),
        map("rw_section", p),
        map("input_sections", p),
        map("output_section", p / 2),
    ]
}

/// The same link without a R/W section: uio_ivshmem leaves the map out, later indexes shift.
fn maps_without_rw() -> Vec<MapSpec> {
    let mut maps = maps_with_rw();
    maps.remove(2);
    maps
}

const DEVICE_NAME: &str = "uio_ivshmem[0000:00:0c.0]";

/// Byte pattern of map `index` at byte `i` (distinct per map, varies inside a map).
fn pattern(index: usize, i: usize) -> u8 {
    (index as u8 + 1).wrapping_mul(0x31) ^ (i as u8)
}

struct Fake {
    _dir: TempDir,
    paths: UioPaths,
    memfd: File,
    /// The test's end of the interrupt socketpair.
    irq_peer: File,
    /// The device's end, until given to `open`.
    irq_device: Option<OwnedFd>,
}

fn write_attr(path: &Path, content: &[u8]) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

fn seqpacket_pair() -> (File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two new fds into `fds` on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"uio-fake-device".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh fd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    file
}

impl Fake {
    /// Device `uio<index>` with `maps`, registers ID = `id` and MAX_PEERS = `max_peers`, the
    /// `event` count `event`, and every map filled with its pattern.
    fn build(index: u32, maps: &[MapSpec], id: u32, max_peers: u32, event: u32) -> Fake {
        let dir = TempDir::new();
        let paths = UioPaths {
            sysfs_root: dir.0.join("sys/class/uio"),
            dev_root: dir.0.join("dev"),
        };
        fs::create_dir_all(&paths.dev_root).unwrap();
        let p = page();
        let memfd = memfd((maps.len().max(1) * p) as u64);
        let (irq_peer, irq_device) = seqpacket_pair();
        let fake = Fake {
            paths,
            memfd,
            irq_peer,
            irq_device: Some(irq_device),
            _dir: dir,
        };
        let sys = fake.sysfs_dir(index);
        write_attr(&sys.join("name"), format!("{DEVICE_NAME}\n").as_bytes());
        write_attr(&sys.join("version"), b"1\n");
        write_attr(&sys.join("event"), format!("{event}\n").as_bytes());
        for (n, spec) in maps.iter().enumerate() {
            let m = sys.join(format!("maps/map{n}"));
            write_attr(&m.join("name"), format!("{}\n", spec.name).as_bytes());
            let addr = 0xfe00_0000u64 + (n * p) as u64;
            write_attr(&m.join("addr"), format!("0x{addr:016x}\n").as_bytes());
            write_attr(
                &m.join("size"),
                format!("0x{:016x}\n", spec.size).as_bytes(),
            );
            write_attr(
                &m.join("offset"),
                format!("0x{:x}\n", spec.offset).as_bytes(),
            );
            // Fill the page that map n is selected by with its pattern.
            let bytes: Vec<u8> = (0..p).map(|i| pattern(n, i)).collect();
            fake.pwrite((n * p) as u64, &bytes);
        }
        fake.write_reg(0x00, id);
        fake.write_reg(0x04, max_peers);
        fake.write_reg(0x08, 0);
        fake.write_reg(0x0c, 0);
        fake.write_reg(0x10, 0);
        symlink(
            format!("/proc/self/fd/{}", fake.memfd.as_raw_fd()),
            fake.paths.dev_root.join(format!("uio{index}")),
        )
        .unwrap();
        fake
    }

    fn sysfs_dir(&self, index: u32) -> PathBuf {
        self.paths.sysfs_root.join(format!("uio{index}"))
    }

    fn pwrite(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        self.memfd.write_all_at(data, offset).unwrap();
    }

    fn pread(&self, offset: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0; len];
        self.memfd.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    fn write_reg(&self, offset: u64, value: u32) {
        self.pwrite(offset, &value.to_ne_bytes());
    }

    fn read_reg(&self, offset: u64) -> u32 {
        u32::from_ne_bytes(self.pread(offset, 4).try_into().unwrap())
    }

    fn device_paths(&self, index: u32) -> UioDevicePaths {
        self.paths.device_paths(index)
    }

    /// Open device `index` with the socketpair as its interrupt fd.
    fn open(&mut self, index: u32) -> Result<UioDevice, UioError> {
        let fd = self.irq_device.take().expect("opened twice");
        UioDevice::open_with_interrupt_fd(&self.device_paths(index), fd)
    }

    /// The "kernel" side: deliver an interrupt count as one 4-byte message.
    fn send_count(&mut self, count: u32) {
        assert_eq!(self.irq_peer.write(&count.to_ne_bytes()).unwrap(), 4);
    }
}

fn region_bytes(device: &UioDevice, role: MapRole) -> Vec<u8> {
    let region = device.region(role).unwrap();
    let mut buf = vec![0; region.len()];
    region.read(0, &mut buf).unwrap();
    buf
}

fn expected(index: usize, skip: usize, len: usize) -> Vec<u8> {
    (skip..skip + len).map(|i| pattern(index, i)).collect()
}

/// The permissions `/proc/self/maps` shows for the mapping containing `addr` (like "r--s").
fn mapping_perms(addr: usize) -> String {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let range = fields.next().unwrap();
        let perms = fields.next().unwrap();
        let (start, end) = range.split_once('-').unwrap();
        let start = usize::from_str_radix(start, 16).unwrap();
        let end = usize::from_str_radix(end, 16).unwrap();
        if (start..end).contains(&addr) {
            return perms.to_owned();
        }
    }
    panic!("address {addr:#x} is not mapped");
}

// ---------------------------------------------------------------------------------------------
// Layouts
// ---------------------------------------------------------------------------------------------

#[test]
fn normal_device_with_rw_section_maps_every_region_at_its_page() {
    let mut fake = Fake::build(0, &maps_with_rw(), 1, 2, 0);
    let device = fake.open(0).unwrap();
    let p = page();

    let layout = device.layout();
    assert_eq!(
        (
            layout.registers,
            layout.state_table,
            layout.rw,
            layout.input,
            layout.output
        ),
        (0, 1, Some(2), Some(3), Some(4))
    );
    assert_eq!(device.id(), 1);
    assert_eq!(device.max_peers(), 2);
    assert_eq!(device.info().name, DEVICE_NAME);
    assert_eq!(device.info().version, "1");
    assert_eq!(
        device.info().maps[4].name.as_deref(),
        Some("output_section")
    );
    assert_eq!(device.info().maps[3].addr, 0xfe00_0000 + 3 * p as u64);

    // Each map sees the bytes at page index N of the device memory.
    assert_eq!(
        region_bytes(&device, MapRole::StateTable),
        expected(1, 0, p)
    );
    assert_eq!(region_bytes(&device, MapRole::RwSection), expected(2, 0, p));
    assert_eq!(
        region_bytes(&device, MapRole::InputSections),
        expected(3, 0, p)
    );
    assert_eq!(
        region_bytes(&device, MapRole::OutputSection),
        expected(4, 0, p / 2)
    );
    // Registers are the memfd's first page too (ID and MAX_PEERS were written there).
    assert_eq!(device.registers().try_read32(0x00), Ok(1));
    assert_eq!(device.registers().try_read32(0x04), Ok(2));
    assert_eq!(
        device.registers().try_read32(0x20),
        Ok(u32::from_ne_bytes(expected(0, 0x20, 4).try_into().unwrap()))
    );

    // Peer 0's output is the first half of the input map; our own (peer 1) is the output map.
    let peer0 = device.peer_output(0).unwrap();
    assert!(!peer0.is_writable());
    let mut buf = vec![0; peer0.len()];
    peer0.read(0, &mut buf).unwrap();
    assert_eq!(buf, expected(3, 0, p / 2));
    let own = device.peer_output(1).unwrap();
    assert!(own.is_writable());
    assert_eq!(
        own.as_ptr(),
        device.region(MapRole::OutputSection).unwrap().as_ptr()
    );
    assert!(device.peer_output(2).is_none());

    // Writes through the RW maps land in the device memory at their pages.
    own.write(8, b"hello").unwrap();
    assert_eq!(fake.pread((4 * p + 8) as u64, 5), b"hello");
    device
        .region(MapRole::RwSection)
        .unwrap()
        .write(0, b"rw")
        .unwrap();
    assert_eq!(fake.pread((2 * p) as u64, 2), b"rw");
    device.registers().try_write32(0x10, 3).unwrap();
    assert_eq!(fake.read_reg(0x10), 3);
    // And the device memory changing is seen through the maps (shared, not copied).
    fake.pwrite(p as u64 + 4, &[0xAB]);
    let mut one = [0u8];
    device
        .region(MapRole::StateTable)
        .unwrap()
        .read(4, &mut one)
        .unwrap();
    assert_eq!(one, [0xAB]);

    // Read-only maps are refused writes by the view and are mapped without PROT_WRITE.
    let state = device.region(MapRole::StateTable).unwrap();
    assert_eq!(state.write(0, b"x"), Err(RegionError::ReadOnly));
    assert_eq!(peer0.write(0, b"x"), Err(RegionError::ReadOnly));
    assert!(matches!(
        state.read(p, &mut [0]),
        Err(RegionError::OutOfRange { .. })
    ));
    assert_eq!(mapping_perms(state.as_ptr().as_ptr() as usize), "r--s");
    let input = device.region(MapRole::InputSections).unwrap();
    assert_eq!(mapping_perms(input.as_ptr().as_ptr() as usize), "r--s");
    assert_eq!(mapping_perms(own.as_ptr().as_ptr() as usize), "rw-s");
    let regs_addr = device.region(MapRole::Registers).unwrap().as_ptr().as_ptr() as usize;
    assert_eq!(mapping_perms(regs_addr), "rw-s");
}

#[test]
fn missing_rw_section_shifts_the_later_maps_and_everything_is_still_found() {
    let mut fake = Fake::build(0, &maps_without_rw(), 0, 2, 0);
    let device = fake.open(0).unwrap();
    let p = page();
    let layout = device.layout();
    assert_eq!(
        (layout.rw, layout.input, layout.output),
        (None, Some(2), Some(3))
    );
    assert!(device.region(MapRole::RwSection).is_none());
    assert_eq!(
        region_bytes(&device, MapRole::StateTable),
        expected(1, 0, p)
    );
    assert_eq!(
        region_bytes(&device, MapRole::InputSections),
        expected(2, 0, p)
    );
    assert_eq!(
        region_bytes(&device, MapRole::OutputSection),
        expected(3, 0, p / 2)
    );
    // Peer 1's output is the second half of the input map.
    let peer1 = device.peer_output(1).unwrap();
    let mut buf = vec![0; peer1.len()];
    peer1.read(0, &mut buf).unwrap();
    assert_eq!(buf, expected(2, p / 2, p / 2));
    assert_eq!(device.map_index(MapRole::OutputSection), Some(3));
}

#[test]
fn maps_without_names_are_identified_by_order() {
    let mut maps = maps_with_rw();
    for m in &mut maps {
        m.name = "";
    }
    let mut fake = Fake::build(0, &maps, 0, 2, 0);
    let device = fake.open(0).unwrap();
    assert_eq!(device.layout().rw, Some(2));
    assert_eq!(device.info().maps[2].name, None);
    assert_eq!(
        region_bytes(&device, MapRole::RwSection),
        expected(2, 0, page())
    );
}

#[test]
fn link_without_output_sections_has_two_maps() {
    let maps = vec![map("registers", page()), map("state_table", page())];
    let mut fake = Fake::build(0, &maps, 0, 2, 0);
    let device = fake.open(0).unwrap();
    assert_eq!(
        (device.layout().input, device.layout().output),
        (None, None)
    );
    assert!(device.peer_output(0).is_none());
    assert!(device.peer_output(1).is_none());
}

#[test]
fn a_map_offset_inside_the_page_moves_the_data_start() {
    let mut maps = maps_with_rw();
    maps[1].offset = 0x20;
    maps[1].size = 0x100;
    let mut fake = Fake::build(0, &maps, 0, 2, 0);
    let device = fake.open(0).unwrap();
    assert_eq!(
        region_bytes(&device, MapRole::StateTable),
        expected(1, 0x20, 0x100)
    );
}

#[test]
fn a_map_name_that_contradicts_its_position_is_refused() {
    let mut maps = maps_with_rw();
    maps[2].name = "input_sections";
    let mut fake = Fake::build(0, &maps, 0, 2, 0);
    let err = fake.open(0).unwrap_err();
    assert!(
        matches!(&err, UioError::MapName { index: 2, expected: "rw_section", found, .. } if found == "input_sections"),
        "{err}"
    );
}

#[test]
fn wrong_map_sizes_are_refused_with_the_rule_they_break() {
    let p = page();
    struct Case {
        what: &'static str,
        edit: fn(&mut Vec<MapSpec>, &mut u32, &mut u32),
        check: fn(&UioError) -> bool,
    }
    let cases = [
        Case {
            what: "register map smaller than 0x100",
            edit: |m, _, _| m[0].size = 0x80,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 0,
                        role: MapRole::Registers,
                        ..
                    }
                )
            },
        },
        Case {
            what: "state table not a multiple of 4",
            edit: |m, _, _| m[1].size = 6,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 1,
                        role: MapRole::StateTable,
                        ..
                    }
                )
            },
        },
        Case {
            what: "state table smaller than 4 * MAX_PEERS",
            edit: |m, _, _| m[1].size = 4,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 1,
                        role: MapRole::StateTable,
                        size: 4,
                        ..
                    }
                )
            },
        },
        Case {
            what: "input sections not MAX_PEERS output sections",
            edit: |m, max, _| {
                *max = 3; // input = 2 * output, but MAX_PEERS says 3
                m[1].size = 12;
            },
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 3,
                        role: MapRole::InputSections,
                        ..
                    }
                )
            },
        },
        Case {
            what: "input sections not a multiple of the output size",
            edit: |m, _, _| m[3].size = m[4].size + 4,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 3,
                        role: MapRole::InputSections,
                        ..
                    }
                )
            },
        },
        Case {
            what: "zero-sized R/W section",
            edit: |m, _, _| m[2].size = 0,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 2,
                        role: MapRole::RwSection,
                        ..
                    }
                )
            },
        },
        Case {
            what: "MAX_PEERS of 1",
            edit: |_, max, _| *max = 1,
            check: |e| matches!(e, UioError::MaxPeers { max_peers: 1, .. }),
        },
        Case {
            what: "ID not below MAX_PEERS",
            edit: |_, _, id| *id = 2,
            check: |e| {
                matches!(
                    e,
                    UioError::PeerId {
                        id: 2,
                        max_peers: 2
                    }
                )
            },
        },
        Case {
            what: "offset outside the first page",
            edit: |m, _, _| m[1].offset = 1 << 40,
            check: |e| matches!(e, UioError::MapOffset { index: 1, .. }),
        },
        Case {
            what: "offset plus size overflowing 64 bits",
            edit: |m, _, _| {
                m[0].offset = 0x10;
                m[0].size = u64::MAX - 0xf;
            },
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 0,
                        role: MapRole::Registers,
                        ..
                    }
                )
            },
        },
        Case {
            what: "a map larger than the address space",
            edit: |m, _, _| m[2].size = 1 << 63,
            check: |e| {
                matches!(
                    e,
                    UioError::MapSize {
                        index: 2,
                        role: MapRole::RwSection,
                        ..
                    }
                )
            },
        },
        Case {
            what: "six maps",
            edit: |m, _, _| m.push(map("extra", 0x1000)),
            check: |e| matches!(e, UioError::MapCount { count: 6, .. }),
        },
    ];
    for case in cases {
        let (mut maps, mut max_peers, mut id) = (maps_with_rw(), 2, 0);
        (case.edit)(&mut maps, &mut max_peers, &mut id);
        let mut fake = Fake::build(0, &maps, id, max_peers, 0);
        let err = fake.open(0).expect_err(case.what);
        assert!((case.check)(&err), "{}: unexpected error {err}", case.what);
        assert!(!err.to_string().is_empty());
    }
    let _ = p;
}

#[test]
fn device_memory_smaller_than_the_maps_is_refused_instead_of_faulting() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    fake.memfd.set_len((4 * page()) as u64).unwrap(); // map 4 is gone
    let err = fake.open(0).unwrap_err();
    assert!(
        matches!(
            err,
            UioError::DeviceTooSmall {
                index: 4,
                role: MapRole::OutputSection,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn missing_device_node_names_the_path() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let node = fake.paths.dev_root.join("uio0");
    fs::remove_file(&node).unwrap();
    let err = fake.open(0).unwrap_err();
    assert!(
        matches!(&err, UioError::DeviceNode { path, .. } if *path == node),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains(&node.display().to_string()), "{text}");
    assert!(text.contains("No such file"), "{text}");
}

#[test]
fn missing_interrupt_source_names_the_path() {
    let fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let mut paths = fake.device_paths(0);
    paths.interrupt = Some(fake.paths.dev_root.join("no-such-irq"));
    let err = UioDevice::open(&paths).unwrap_err();
    assert!(err.to_string().contains("no-such-irq"), "{err}");
    assert!(matches!(err, UioError::InterruptSource { .. }));
}

#[test]
fn map_directories_with_a_gap_are_refused() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let maps_dir = fake.sysfs_dir(0).join("maps");
    fs::remove_dir_all(maps_dir.join("map2")).unwrap();
    let err = fake.open(0).unwrap_err();
    assert!(matches!(err, UioError::MapGap { missing: 2, .. }), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Malformed sysfs files: a clear error naming the file, never a panic
// ---------------------------------------------------------------------------------------------

#[test]
fn malformed_sysfs_files_give_an_error_naming_the_file() {
    enum Content {
        Bytes(&'static [u8]),
        Owned(Vec<u8>),
        Missing,
    }
    use Content::*;
    type Check = fn(&SysfsProblem) -> bool;
    let cases: Vec<(&str, Content, Check)> = vec![
        ("name", Bytes(b""), |p| matches!(p, SysfsProblem::Empty)),
        ("name", Bytes(b"\n"), |p| {
            matches!(p, SysfsProblem::EmptyName)
        }),
        ("name", Missing, |p| matches!(p, SysfsProblem::Missing)),
        ("version", Bytes(b"1"), |p| {
            matches!(p, SysfsProblem::NoNewline { .. })
        }),
        ("event", Bytes(b"abc\n"), |p| {
            matches!(p, SysfsProblem::BadDecimal { .. })
        }),
        ("event", Bytes(b"-1\n"), |p| {
            matches!(p, SysfsProblem::BadDecimal { .. })
        }),
        ("event", Bytes(b"4294967296\n"), |p| {
            matches!(p, SysfsProblem::BadDecimal { .. })
        }),
        ("event", Missing, |p| matches!(p, SysfsProblem::Missing)),
        ("maps/map0/size", Bytes(b""), |p| {
            matches!(p, SysfsProblem::Empty)
        }),
        ("maps/map0/size", Bytes(b"0x\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map0/size", Bytes(b"1000\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map0/size", Bytes(b"0x10g0\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map0/size", Bytes(b" 0x1000\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map0/size", Bytes(b"0x1000 \n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map0/size", Bytes(b"0x00000000000010000\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map1/addr", Bytes(b"0x\xff\xfe\n"), |p| {
            matches!(p, SysfsProblem::NotUtf8)
        }),
        ("maps/map1/addr", Bytes(b"0x00000000fe00"), |p| {
            matches!(p, SysfsProblem::NoNewline { .. })
        }),
        ("maps/map2/offset", Bytes(b"0x0\n0x0\n"), |p| {
            matches!(p, SysfsProblem::ExtraLines { .. })
        }),
        ("maps/map2/offset", Bytes(b"-0x1\n"), |p| {
            matches!(p, SysfsProblem::BadHex { .. })
        }),
        ("maps/map3/name", Bytes(b"input_sections"), |p| {
            matches!(p, SysfsProblem::NoNewline { .. })
        }),
        ("maps/map3/size", Missing, |p| {
            matches!(p, SysfsProblem::Missing)
        }),
        ("maps/map4/offset", Owned(vec![b'0'; 5000]), |p| {
            matches!(p, SysfsProblem::TooLong { .. })
        }),
    ];
    assert!(cases.len() >= 8);
    for (file, content, check) in cases {
        let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
        let path = fake.sysfs_dir(0).join(file);
        match &content {
            Bytes(b) => fs::write(&path, b).unwrap(),
            Owned(b) => fs::write(&path, b).unwrap(),
            Missing => fs::remove_file(&path).unwrap(),
        }
        let err = fake.open(0).expect_err(file);
        match &err {
            UioError::Sysfs {
                path: named,
                problem,
            } => {
                assert_eq!(named, &path, "{file}: wrong file named in {err}");
                assert!(check(problem), "{file}: unexpected problem {problem}");
            }
            other => panic!("{file}: expected a sysfs error, got {other}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
}

#[test]
fn older_kernel_hex_formats_are_accepted() {
    // Before %pa, addr was printed "0x%llx\n" and size "0x%lx\n" (no zero padding).
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let map2 = fake.sysfs_dir(0).join("maps/map2");
    fs::write(map2.join("addr"), b"0xfe002000\n").unwrap();
    fs::write(map2.join("size"), format!("0x{:x}\n", page()).as_bytes()).unwrap();
    let device = fake.open(0).unwrap();
    assert_eq!(device.info().maps[2].addr, 0xfe00_2000);
    assert_eq!(device.info().maps[2].size, page() as u64);
}

// ---------------------------------------------------------------------------------------------
// Discovery
// ---------------------------------------------------------------------------------------------

#[test]
fn discovery_lists_devices_and_finds_ivshmem_by_name() {
    let fake = Fake::build(3, &maps_with_rw(), 0, 2, 5);
    // Another UIO device with a different name and no maps of interest.
    let other = fake.paths.sysfs_root.join("uio1");
    write_attr(&other.join("name"), b"uio_pdrv_genirq\n");
    write_attr(&other.join("version"), b"0.0.1\n");
    write_attr(&other.join("event"), b"0\n");
    // Entries that are not uioN are ignored.
    fs::create_dir_all(fake.paths.sysfs_root.join("uioX")).unwrap();
    fs::create_dir_all(fake.paths.sysfs_root.join("uio01")).unwrap();

    assert_eq!(fake.paths.device_indexes().unwrap(), vec![1, 3]);
    assert_eq!(
        fake.paths.list().unwrap(),
        vec![
            (1, "uio_pdrv_genirq".to_owned()),
            (3, DEVICE_NAME.to_owned())
        ]
    );
    let info = fake.paths.find(DEVICE_NAME).unwrap();
    assert_eq!(info.index, Some(3));
    assert_eq!(info.event, 5);
    assert_eq!(info.maps.len(), 5);
    let info = fake
        .paths
        .find_by("from uio_ivshmem", |n| n.starts_with("uio_ivshmem["))
        .unwrap();
    assert_eq!(info.sysfs_dir, fake.sysfs_dir(3));

    let err = fake.paths.find("uio_ivshmem[0000:00:0d.0]").unwrap_err();
    match &err {
        UioError::NotFound { found, .. } => assert_eq!(found.len(), 2),
        other => panic!("expected NotFound, got {other}"),
    }
    assert!(err.to_string().contains("uio_pdrv_genirq"), "{err}");

    // Open by name: the device node is dev_root/uio3, interrupts from the node itself.
    let mut device = fake.paths.open(DEVICE_NAME).unwrap();
    assert_eq!(device.info().index, Some(3));
    assert_eq!(
        device.interrupt().source(),
        fake.paths.dev_root.join("uio3")
    );
}

#[test]
fn missing_sysfs_root_is_a_clear_error() {
    let paths = UioPaths {
        sysfs_root: PathBuf::from("/nonexistent/sys/class/uio"),
        dev_root: PathBuf::from("/nonexistent/dev"),
    };
    let err = paths.list().unwrap_err();
    assert!(matches!(err, UioError::NoUioClass { .. }), "{err}");
    assert!(err.to_string().contains("no UIO driver is loaded"), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/sys/class/uio"),
        "{err}"
    );
    assert_eq!(
        UioPaths::default().sysfs_root,
        PathBuf::from("/sys/class/uio")
    );
    assert_eq!(UioPaths::default().dev_root, PathBuf::from("/dev"));
}

// ---------------------------------------------------------------------------------------------
// Interrupts
// ---------------------------------------------------------------------------------------------

fn poll_readable(fd: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, timeout 0 (no waiting).
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    assert!(n >= 0);
    n == 1 && pfd.revents & libc::POLLIN != 0
}

#[test]
fn interrupt_counts_report_missed_interrupts_and_rearm_one_shot() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let mut device = fake.open(0).unwrap();
    let fd = device.as_raw_fd();
    assert_eq!(device.interrupt().last_count(), 0);
    assert!(!poll_readable(fd), "nothing pending yet");

    // One-shot: the device clears INT_CONTROL when it delivers.
    fake.write_reg(0x08, 0);
    fake.send_count(1);
    assert!(poll_readable(fd), "the interrupt fd is pollable");
    let got = device.wait_interrupt().unwrap();
    assert_eq!((got.count, got.missed), (1, 0));
    assert_eq!(fake.read_reg(0x08), 1, "wait re-armed INT_CONTROL = 1");
    assert!(!poll_readable(fd));

    fake.write_reg(0x08, 0);
    fake.send_count(3);
    let got = device.wait_interrupt().unwrap();
    assert_eq!((got.count, got.missed), (3, 1));
    assert_eq!(fake.read_reg(0x08), 1);

    fake.write_reg(0x08, 0);
    fake.send_count(7);
    let got = device.wait_interrupt().unwrap();
    assert_eq!(
        (got.count, got.missed),
        (7, 3),
        "3 -> 7 means 3 interrupts coalesced"
    );
    assert_eq!(fake.read_reg(0x08), 1);
    assert_eq!(device.interrupt().last_count(), 7);
}

#[test]
fn the_first_count_is_measured_from_the_sysfs_event_count() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 40);
    let mut device = fake.open(0).unwrap();
    fake.send_count(41);
    assert_eq!(device.wait_interrupt().unwrap().missed, 0);
    // Counts wrap at 2^32 like the kernel's atomic_t.
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, u32::MAX - 1);
    let mut device = fake.open(0).unwrap();
    fake.send_count(1);
    let got = device.wait_interrupt().unwrap();
    assert_eq!((got.count, got.missed), (1, 2));
}

#[test]
fn a_blocked_wait_wakes_when_the_count_arrives() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let mut device = fake.open(0).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        ready_tx.send(()).unwrap();
        let got = device.wait_interrupt();
        (got, device)
    });
    ready_rx.recv().unwrap();
    fake.write_reg(0x08, 0);
    fake.send_count(1);
    let (got, _device) = waiter.join().unwrap();
    assert_eq!(got.unwrap().count, 1);
    assert_eq!(fake.read_reg(0x08), 1);
}

#[test]
fn short_reads_eof_and_inconsistent_counts_are_typed_errors() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let mut device = fake.open(0).unwrap();

    // A 2-byte message: the 4-byte read returns 2.
    assert_eq!(fake.irq_peer.write(&[1, 0]).unwrap(), 2);
    fake.write_reg(0x08, 0);
    let err = device.wait_interrupt().unwrap_err();
    assert!(matches!(err, InterruptError::ShortRead { got: 2 }), "{err}");
    assert_eq!(fake.read_reg(0x08), 0, "no re-arm without a complete count");

    fake.send_count(5);
    assert_eq!(device.wait_interrupt().unwrap().count, 5);
    fake.send_count(5);
    let err = device.wait_interrupt().unwrap_err();
    assert!(
        matches!(err, InterruptError::CountUnchanged { count: 5 }),
        "{err}"
    );
    fake.send_count(2);
    let err = device.wait_interrupt().unwrap_err();
    assert!(
        matches!(
            err,
            InterruptError::CountBackwards {
                previous: 5,
                current: 2
            }
        ),
        "{err}"
    );

    // Non-blocking fd with nothing pending: WouldBlock, for a poll-driven caller.
    device.interrupt().set_nonblocking(true).unwrap();
    let err = device.wait_interrupt().unwrap_err();
    assert!(err.is_would_block(), "{err}");
    assert_eq!(
        device.interrupt().last_count(),
        2,
        "a would-block read changes nothing"
    );
    fake.send_count(3);
    assert_eq!(device.wait_interrupt().unwrap().count, 3);
    device.interrupt().set_nonblocking(false).unwrap();

    // The other end closes: EOF.
    let Fake { irq_peer, .. } = &mut fake;
    let closed = std::mem::replace(irq_peer, seqpacket_pair().0);
    drop(closed);
    let err = device.wait_interrupt().unwrap_err();
    assert!(matches!(err, InterruptError::Eof), "{err}");
}

#[test]
fn irqcontrol_writes_exactly_four_bytes() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let mut device = fake.open(0).unwrap();
    device.interrupt().irqcontrol(1).unwrap();
    let mut buf = [0u8; 8];
    let n = fake.irq_peer.read(&mut buf).unwrap();
    assert_eq!(n, 4);
    assert_eq!(u32::from_ne_bytes(buf[..4].try_into().unwrap()), 1);
}

#[test]
fn register_offsets_are_bounds_checked() {
    let mut fake = Fake::build(0, &maps_with_rw(), 0, 2, 0);
    let device = fake.open(0).unwrap();
    let regs = device.registers();
    assert_eq!(regs.len(), page());
    assert!(regs.try_read32(2).is_err(), "misaligned");
    assert!(regs.try_read32(page() as u32).is_err(), "past the map");
    assert!(regs.try_write32(page() as u32 - 2, 1).is_err());
    regs.try_write32(page() as u32 - 4, 0xdead_beef).unwrap();
    assert_eq!(fake.read_reg((page() - 4) as u64), 0xdead_beef);
}

// ---------------------------------------------------------------------------------------------
// The ivshmem-dev driver on the UIO maps
// ---------------------------------------------------------------------------------------------

#[test]
fn ivshmem_driver_runs_on_the_uio_registers_and_sections() {
    use ivshmem_dev::regs::{DOORBELL, INT_CONTROL, STATE};
    let mut fake = Fake::build(0, &maps_with_rw(), 1, 2, 0);
    let mut device = fake.open(0).unwrap();
    let p = page() as u64;
    // The "hypervisor" wrote the state table: peer 0 is in state 3, we (peer 1) in 0.
    fake.pwrite(p, &3u32.to_ne_bytes());
    fake.pwrite(p + 4, &0u32.to_ne_bytes());

    let driver = device.driver().unwrap();
    assert_eq!((driver.id(), driver.max_peers()), (1, 2));
    assert_eq!(driver.peer_state(0), Some(3));
    assert_eq!(driver.peer_state(1), Some(0));
    assert_eq!(driver.peer_state(2), None);

    driver.set_state(2);
    assert_eq!(fake.read_reg(u64::from(STATE)), 2);
    driver.enable_interrupts();
    assert_eq!(fake.read_reg(u64::from(INT_CONTROL)), 1);
    driver.ring(0, 5);
    assert_eq!(
        fake.read_reg(u64::from(DOORBELL)),
        ivshmem_dev::Doorbell { peer: 0, vector: 5 }.encode()
    );

    // Sections: own output is the RW output map, the peer's a RO slice of the input map.
    let own = driver.own_output();
    assert!(own.is_writable());
    assert_eq!(own.len(), page() / 2);
    assert_eq!(
        own.as_non_null(),
        device.region(MapRole::OutputSection).unwrap().as_ptr()
    );
    let peer0 = driver.peer_output(0).unwrap();
    assert!(!peer0.is_writable());
    assert_eq!(
        peer0.as_non_null(),
        device.region(MapRole::InputSections).unwrap().as_ptr()
    );
    assert!(driver.rw().unwrap().is_writable());
    assert!(!driver.state_table().is_writable());

    // One-shot: delivery clears INT_CONTROL; wait_interrupt re-arms through the same page.
    fake.write_reg(u64::from(INT_CONTROL), 0);
    assert!(!driver.interrupts_enabled());
    fake.send_count(1);
    device.wait_interrupt().unwrap();
    assert!(driver.interrupts_enabled());

    // The driver keeps the mappings alive after the device is dropped.
    drop(device);
    fake.pwrite(p, &9u32.to_ne_bytes());
    assert_eq!(driver.peer_state(0), Some(9));
}

#[test]
fn ivshmem_driver_accepts_a_link_without_output_sections() {
    let maps = vec![map("registers", page()), map("state_table", page())];
    let mut fake = Fake::build(0, &maps, 0, 2, 0);
    let device = fake.open(0).unwrap();
    let driver = device.driver().unwrap();
    assert!(driver.own_output().is_empty());
    assert!(driver.peer_output(1).is_none());
    assert!(driver.rw().is_none());
}
