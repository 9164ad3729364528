//! The guest-side driver against a fake register file that records every access.

use std::cell::RefCell;
use std::ptr::NonNull;

use ivshmem_dev::regs::{DOORBELL, ID, INT_CONTROL, MAX_PEERS, STATE};
use ivshmem_dev::{
    DriverError, Ivshmem, LayoutParams, RegisterAccess, Section, Sections, SharedMemoryLayout,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read(u32),
    Write(u32, u32),
}

/// Registers as plain storage plus a log of accesses.
#[derive(Debug)]
struct FakeRegs {
    values: RefCell<[u32; 8]>,
    log: RefCell<Vec<Access>>,
}

impl FakeRegs {
    fn new(id: u32, max_peers: u32) -> Self {
        let mut values = [0; 8];
        values[(ID / 4) as usize] = id;
        values[(MAX_PEERS / 4) as usize] = max_peers;
        Self {
            values: RefCell::new(values),
            log: RefCell::new(Vec::new()),
        }
    }

    fn take_log(&self) -> Vec<Access> {
        std::mem::take(&mut *self.log.borrow_mut())
    }
}

impl RegisterAccess for FakeRegs {
    fn read32(&self, offset: u32) -> u32 {
        self.log.borrow_mut().push(Access::Read(offset));
        self.values.borrow()[(offset / 4) as usize]
    }

    fn write32(&self, offset: u32, value: u32) {
        self.log.borrow_mut().push(Access::Write(offset, value));
        self.values.borrow_mut()[(offset / 4) as usize] = value;
    }
}

/// Backing memory for a link: state table, R/W and outputs, contiguous.
struct Memory {
    words: Vec<u32>,
    layout: SharedMemoryLayout,
}

impl Memory {
    fn new(max_peers: u16) -> Self {
        let layout = SharedMemoryLayout::new(LayoutParams {
            max_peers,
            state_table_size: 4096,
            rw_size: 4096,
            output_size: 8192,
            page_size: 4096,
        })
        .unwrap();
        Self {
            words: vec![0; layout.total_size() as usize / 4],
            layout,
        }
    }

    fn sections(&mut self, id: u16) -> Sections {
        let base = NonNull::new(self.words.as_mut_ptr().cast::<u8>()).unwrap();
        // SAFETY: `words` covers the whole layout and outlives every driver in these tests
        // (each test keeps `Memory` alive until the end).
        unsafe { Sections::from_contiguous(base, &self.layout, id) }
    }

    fn base(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }
}

#[test]
fn new_reads_id_and_max_peers() {
    let mut memory = Memory::new(3);
    let regs = FakeRegs::new(2, 3);
    let device = Ivshmem::new(&regs, memory.sections(2)).unwrap();
    assert_eq!((device.id(), device.max_peers()), (2, 3));
    assert_eq!(
        regs.take_log(),
        vec![Access::Read(MAX_PEERS), Access::Read(ID)]
    );
}

#[test]
fn new_refuses_inconsistent_registers_and_sections() {
    let mut memory = Memory::new(2);
    for max_peers in [0, 1, 17, u32::MAX] {
        let err = Ivshmem::new(FakeRegs::new(0, max_peers), memory.sections(0)).unwrap_err();
        assert_eq!(err, DriverError::BadMaxPeers { max_peers });
    }
    let err = Ivshmem::new(FakeRegs::new(2, 2), memory.sections(0)).unwrap_err();
    assert_eq!(
        err,
        DriverError::BadId {
            id: 2,
            max_peers: 2
        }
    );

    let mut sections = memory.sections(0);
    // SAFETY: a 4-byte prefix of the state table, which is mapped.
    sections.state_table = unsafe { Section::new(sections.state_table.as_non_null(), 4, false) };
    let err = Ivshmem::new(FakeRegs::new(0, 2), sections).unwrap_err();
    assert_eq!(err, DriverError::BadStateTable { len: 4, needed: 8 });

    let mut sections = memory.sections(0);
    sections.outputs[0] = None;
    assert_eq!(
        Ivshmem::new(FakeRegs::new(0, 2), sections).unwrap_err(),
        DriverError::BadOwnOutput { id: 0 }
    );
    // Peer 1's sections handed to a device that says it is peer 0: its own output is read-only.
    let sections = memory.sections(1);
    assert_eq!(
        Ivshmem::new(FakeRegs::new(0, 2), sections).unwrap_err(),
        DriverError::BadOwnOutput { id: 0 }
    );
}

#[test]
fn state_goes_through_the_state_register() {
    let mut memory = Memory::new(2);
    let regs = FakeRegs::new(0, 2);
    let device = Ivshmem::new(&regs, memory.sections(0)).unwrap();
    regs.take_log();
    device.set_state(3);
    assert_eq!(device.state(), 3);
    assert_eq!(
        regs.take_log(),
        vec![Access::Write(STATE, 3), Access::Read(STATE)]
    );
}

#[test]
fn interrupt_control_enable_disable_and_rearm() {
    let mut memory = Memory::new(2);
    let regs = FakeRegs::new(0, 2);
    let device = Ivshmem::new(&regs, memory.sections(0)).unwrap();
    regs.take_log();
    device.enable_interrupts();
    assert!(device.interrupts_enabled());
    device.disable_interrupts();
    assert!(!device.interrupts_enabled());
    device.rearm();
    assert_eq!(
        regs.take_log(),
        vec![
            Access::Write(INT_CONTROL, 1),
            Access::Read(INT_CONTROL),
            Access::Write(INT_CONTROL, 0),
            Access::Read(INT_CONTROL),
            Access::Write(INT_CONTROL, 1),
        ]
    );
}

#[test]
fn ring_encodes_target_and_vector() {
    let mut memory = Memory::new(4);
    let regs = FakeRegs::new(1, 4);
    let device = Ivshmem::new(&regs, memory.sections(1)).unwrap();
    regs.take_log();
    device.ring(3, 2);
    device.ring_peer(0);
    device.ring(1, 0);
    assert_eq!(
        regs.take_log(),
        vec![
            Access::Write(DOORBELL, 0x0003_0002),
            Access::Write(DOORBELL, 0x0000_0000),
            Access::Write(DOORBELL, 0x0001_0000),
        ]
    );
}

#[test]
fn peer_state_reads_the_state_table_and_bounds_the_peer() {
    let mut memory = Memory::new(3);
    memory.words[0] = 1;
    memory.words[1] = u32::MAX; // any value is a valid (untrusted) state
    memory.words[2] = 0;
    memory.words[3] = 77; // beyond max_peers: never read
    let regs = FakeRegs::new(0, 3);
    let device = Ivshmem::new(&regs, memory.sections(0)).unwrap();
    regs.take_log();
    assert_eq!(device.peer_state(0), Some(1));
    assert_eq!(device.peer_state(1), Some(u32::MAX));
    assert_eq!(device.peer_state(2), Some(0));
    assert_eq!(device.peer_state(3), None);
    assert_eq!(device.peer_state(u16::MAX), None);
    assert!(
        regs.take_log().is_empty(),
        "state table reads do not touch registers"
    );
}

#[test]
fn peer_state_sees_later_changes() {
    let mut memory = Memory::new(2);
    let table = memory.base().cast::<u32>();
    let regs = FakeRegs::new(0, 2);
    let device = Ivshmem::new(&regs, memory.sections(0)).unwrap();
    assert_eq!(device.peer_state(1), Some(0));
    // SAFETY: entry 1 of the state table inside `memory`, which is alive.
    unsafe { table.add(1).write_volatile(2) };
    assert_eq!(device.peer_state(1), Some(2));
}

#[test]
fn section_accessors_follow_the_layout() {
    let mut memory = Memory::new(3);
    let base = memory.base() as usize;
    let layout = memory.layout;
    let regs = FakeRegs::new(1, 3);
    let device = Ivshmem::new(&regs, memory.sections(1)).unwrap();
    let state = device.state_table();
    assert_eq!(
        (state.as_ptr() as usize, state.len(), state.is_writable()),
        (base, 4096, false)
    );
    let rw = device.rw().unwrap();
    assert_eq!(
        (rw.as_ptr() as usize - base, rw.len(), rw.is_writable()),
        (4096, 4096, true)
    );
    let own = device.own_output();
    assert_eq!(
        own.as_ptr() as usize - base,
        layout.output(1).unwrap().offset as usize
    );
    assert!(own.is_writable() && own.len() == 8192);
    for peer in [0, 2] {
        let output = device.peer_output(peer).unwrap();
        assert_eq!(
            output.as_ptr() as usize - base,
            layout.output(peer).unwrap().offset as usize
        );
        assert!(!output.is_writable());
    }
    assert_eq!(device.peer_output(1), Some(own));
    assert_eq!(device.peer_output(3), None);
}

#[test]
fn link_without_rw_or_outputs() {
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers: 2,
        state_table_size: 4096,
        rw_size: 0,
        output_size: 0,
        page_size: 4096,
    })
    .unwrap();
    let mut words = vec![0u32; 1024];
    let base = NonNull::new(words.as_mut_ptr().cast::<u8>()).unwrap();
    // SAFETY: `words` is the whole 4 KiB layout and outlives `device`.
    let sections = unsafe { Sections::from_contiguous(base, &layout, 0) };
    assert!(sections.rw.is_none());
    let device = Ivshmem::new(FakeRegs::new(0, 2), sections).unwrap();
    assert!(device.own_output().is_empty());
    assert!(device.rw().is_none());
}
