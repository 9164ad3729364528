//! The guest side of the contract against the emulated device: `ivshmem-dev`'s PCI discovery
//! and driver, unchanged, talking to `hypervisor::device::Link` through config-space and
//! register adapters, with the state table in memory both sides share.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use hypervisor::device::{Interrupt, InterruptMode, Link, LinkParams, StateTable};
use ivshmem_dev::layout::{LayoutParams, SharedMemoryLayout};
use ivshmem_dev::pci::{self, find_ivshmem};
use ivshmem_dev::{ConfigAccess, Ivshmem, PciAddress, Protocol, RegisterAccess, Section, Sections};

const SLOT: PciAddress = PciAddress::new(0, 4, 0);
const BAR0: u32 = 0xFEB0_0000;

/// The state table as shared memory: the device writes it, guests read it through a
/// `Section`.
#[derive(Clone)]
struct SharedStateTable(Arc<Vec<AtomicU32>>);

impl StateTable for SharedStateTable {
    fn read(&self, peer: u16) -> u32 {
        self.0
            .get(usize::from(peer))
            .map_or(0, |e| e.load(Ordering::SeqCst))
    }
    fn write(&mut self, peer: u16, value: u32) {
        if let Some(entry) = self.0.get(usize::from(peer)) {
            entry.store(value, Ordering::SeqCst);
        }
    }
    fn clear(&mut self) {
        self.0.iter().for_each(|e| e.store(0, Ordering::SeqCst));
    }
}

/// One machine with both peers' guests; every access goes through the device model.
struct Machine {
    link: RefCell<Link>,
    delivered: RefCell<Vec<Interrupt>>,
}

/// What peer `peer`'s guest sees: the device at `SLOT`, nothing elsewhere.
struct GuestPci<'a> {
    machine: &'a Machine,
    peer: u16,
}

impl ConfigAccess for GuestPci<'_> {
    fn read32(&self, address: PciAddress, offset: u8) -> u32 {
        if address != SLOT {
            return u32::MAX;
        }
        self.machine
            .link
            .borrow()
            .config_read(self.peer, offset.into(), 4)
            .unwrap()
    }
    fn write32(&self, address: PciAddress, offset: u8, value: u32) {
        if address == SLOT {
            self.machine
                .link
                .borrow_mut()
                .config_write(self.peer, offset.into(), 4, value)
                .unwrap();
        }
    }
}

/// Peer `peer`'s register page (BAR0), as MMIO exits would reach the model.
struct GuestRegs<'a> {
    machine: &'a Machine,
    peer: u16,
}

impl RegisterAccess for GuestRegs<'_> {
    fn read32(&self, offset: u32) -> u32 {
        self.machine
            .link
            .borrow()
            .mmio_read(self.peer, offset.into(), 4)
            .unwrap()
    }
    fn write32(&self, offset: u32, value: u32) {
        let effects = self
            .machine
            .link
            .borrow_mut()
            .mmio_write(self.peer, offset.into(), 4, value.into())
            .unwrap();
        self.machine
            .delivered
            .borrow_mut()
            .extend(effects.interrupts);
    }
}

fn take(machine: &Machine) -> Vec<Interrupt> {
    std::mem::take(&mut *machine.delivered.borrow_mut())
}

#[test]
fn guests_find_set_up_and_drive_the_emulated_device() {
    let layout = SharedMemoryLayout::new(LayoutParams {
        max_peers: 2,
        state_table_size: 4096,
        rw_size: 0,
        output_size: 4096,
        page_size: 4096,
    })
    .unwrap();
    let table = SharedStateTable(Arc::new((0..2).map(|_| AtomicU32::new(7)).collect()));
    let params = LinkParams {
        name: "net".into(),
        max_peers: 2,
        protocol: Protocol::ETHERNET,
        layout,
        interrupts: InterruptMode::Intx,
    };
    let machine = Machine {
        link: RefCell::new(Link::new(params, Box::new(table.clone())).unwrap()),
        delivered: RefCell::new(Vec::new()),
    };
    machine.link.borrow_mut().set_shmem_base(1, 0x2_0000_0000);
    for peer in 0..2 {
        assert!(machine.link.borrow_mut().peer_attached(peer).is_empty());
    }

    // Discovery, BAR0 programming and one-shot, as the bare-metal demo does it.
    let mut drivers = Vec::new();
    let mut outputs = [[0u8; 64]; 2];
    for peer in 0..2u16 {
        let pci = GuestPci {
            machine: &machine,
            peer,
        };
        let device = find_ivshmem(&pci, Some(Protocol::ETHERNET)).unwrap();
        assert_eq!(
            (device.address, device.protocol, device.interrupt_pin),
            (SLOT, Protocol::ETHERNET, 1)
        );
        assert_eq!(device.capability.state_table_size, 4096);
        assert_eq!(device.capability.output_section_size, 4096);
        assert_eq!(
            device.capability.base_address,
            Some(if peer == 1 { 0x2_0000_0000 } else { 0 })
        );
        assert_eq!(device.bar0_size(&pci), Ok(0x1000));
        device.setup(&pci, BAR0).unwrap();
        assert_eq!(
            machine.link.borrow().bar0_mapping(peer),
            Some(u64::from(BAR0))
        );
        let command = machine.link.borrow().command(peer).unwrap();
        assert_eq!(command, pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER);
        assert_eq!(device.set_one_shot(&pci, peer == 1), peer == 1);

        // SAFETY: the state table vector and `outputs` outlive the drivers (dropped at the end
        // of the test); AtomicU32 has u32's layout.
        let sections = unsafe {
            let state = NonNull::new(table.0.as_ptr() as *mut u8).unwrap();
            let mut sections = Sections::new(Section::new(state, 8, false));
            for (i, output) in outputs.iter_mut().enumerate() {
                let ptr = NonNull::new(output.as_mut_ptr()).unwrap();
                sections.outputs[i] = Some(Section::new(ptr, 64, i == usize::from(peer)));
            }
            sections
        };
        let driver = Ivshmem::new(
            GuestRegs {
                machine: &machine,
                peer,
            },
            sections,
        )
        .unwrap();
        assert_eq!((driver.id(), driver.max_peers()), (peer, 2));
        drivers.push(driver);
    }
    let [d0, d1] = &drivers[..] else {
        unreachable!()
    };
    assert_eq!(
        d0.peer_state(1),
        Some(0),
        "the first attach cleared the stale 7s"
    );

    // Interrupts off: a state change is stored but interrupts nobody.
    d0.set_state(1);
    assert_eq!(d1.peer_state(0), Some(1));
    assert!(take(&machine).is_empty());

    d0.enable_interrupts();
    d1.enable_interrupts();
    d0.set_state(2);
    assert_eq!(
        take(&machine),
        vec![Interrupt {
            target: 1,
            vector: 0
        }]
    );
    assert_eq!(d1.peer_state(0), Some(2));
    // Peer 1 is in one-shot mode: the delivery disarmed it.
    assert!(!d1.interrupts_enabled());
    d0.ring_peer(1);
    assert!(take(&machine).is_empty());
    d1.rearm();
    d0.ring_peer(1);
    assert_eq!(
        take(&machine),
        vec![Interrupt {
            target: 1,
            vector: 0
        }]
    );

    // Peer 0 is not one-shot: it stays armed.
    d1.ring_peer(0);
    d1.ring_peer(0);
    assert_eq!(take(&machine).len(), 2);
    assert!(d0.interrupts_enabled());

    // Peer 1's cell stops: its state reads 0 and peer 0 hears about it.
    d1.set_state(3);
    take(&machine);
    let effects = machine.link.borrow_mut().peer_detached(1);
    assert_eq!(
        effects.interrupts,
        vec![Interrupt {
            target: 0,
            vector: 0
        }]
    );
    assert_eq!(d0.peer_state(1), Some(0));
    d0.ring_peer(1);
    assert!(
        take(&machine).is_empty(),
        "a detached peer is never a doorbell target"
    );
}
