//! An in-process ivshmem link: the device semantics of the hosted backend (state table,
//! `STATE` notifies the other peers, `DOORBELL` writes the target's eventfd, `INT_CONTROL`
//! with one-shot mode and doorbells discarded while disabled) over heap memory, with one real
//! eventfd per peer as its interrupt. For tests and benchmarks of everything above the
//! endpoint, without a hypervisor.
//!
//! Dropping an [`Endpoint`](crate::Endpoint) attached with
//! [`Endpoint::attach_local`](crate::Endpoint::attach_local) detaches the peer like a closed
//! control socket: its state becomes 0 and the other peers are interrupted. The same ID can
//! then attach again (a restarted peer); the memory keeps whatever the old peer left there.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use ivshmem_dev::regs::{self, RegisterAccess, INT_CONTROL_ENABLE};
use ivshmem_dev::{Section, Sections, MAX_SUPPORTED_PEERS};
use nix::errno::Errno;
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::endpoint::EndpointError;

const PAGE: usize = 4096;

/// One zeroed, page-aligned heap allocation.
#[derive(Debug)]
struct Memory {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: plain memory; all concurrent access goes through atomics or the rings' protocol.
unsafe impl Send for Memory {}
// SAFETY: as above.
unsafe impl Sync for Memory {}

impl Memory {
    fn new(len: usize) -> Result<Self, EndpointError> {
        let layout = Layout::from_size_align(len.max(PAGE), PAGE)
            .map_err(|e| EndpointError::Local(format!("bad size {len}: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })
            .ok_or_else(|| EndpointError::Local(format!("cannot allocate {len} bytes")))?;
        Ok(Self { ptr, layout })
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

#[derive(Debug)]
struct PeerSlot {
    interrupt: EventFd,
    output: Memory,
    attached: AtomicBool,
    int_control: AtomicU32,
    oneshot: AtomicBool,
    state: AtomicU32,
}

/// An in-process link of `max_peers` peers with one output section each (no R/W section).
#[derive(Debug)]
pub struct LocalLink {
    name: String,
    output_size: usize,
    state_table: Memory,
    peers: Vec<PeerSlot>,
}

fn eventfd() -> Result<EventFd, EndpointError> {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK).map_err(|e| {
        EndpointError::Io {
            what: "creating an eventfd",
            source: e.into(),
        }
    })
}

impl LocalLink {
    /// A link named `name` with `max_peers` peers and output sections of `output_size` bytes
    /// (rounded up to a page).
    pub fn new(name: &str, max_peers: u16, output_size: usize) -> Result<Arc<Self>, EndpointError> {
        if !(2..=MAX_SUPPORTED_PEERS as u16).contains(&max_peers) {
            return Err(EndpointError::Local(format!(
                "max_peers {max_peers} outside 2..={MAX_SUPPORTED_PEERS}"
            )));
        }
        let output_size = output_size.div_ceil(PAGE).max(1) * PAGE;
        let peers = (0..max_peers)
            .map(|_| {
                Ok(PeerSlot {
                    interrupt: eventfd()?,
                    output: Memory::new(output_size)?,
                    attached: AtomicBool::new(false),
                    int_control: AtomicU32::new(0),
                    oneshot: AtomicBool::new(true),
                    state: AtomicU32::new(0),
                })
            })
            .collect::<Result<Vec<_>, EndpointError>>()?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            output_size,
            state_table: Memory::new(PAGE)?,
            peers,
        }))
    }

    /// The link name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of peers.
    pub fn max_peers(&self) -> u16 {
        self.peers.len() as u16
    }

    /// Size of each output section.
    pub fn output_size(&self) -> usize {
        self.output_size
    }

    fn entry(&self, peer: u16) -> &AtomicU32 {
        debug_assert!(usize::from(peer) < self.peers.len());
        // SAFETY: the state table page holds 1024 aligned u32 entries and peer < 16; it lives
        // as long as `self`; every access to it is atomic.
        unsafe {
            &*self
                .state_table
                .ptr
                .as_ptr()
                .cast::<AtomicU32>()
                .add(usize::from(peer))
        }
    }

    /// Peer `peer`'s state-table entry (`None` for a peer that does not exist).
    pub fn peer_state(&self, peer: u16) -> Option<u32> {
        self.peers
            .get(usize::from(peer))
            .map(|_| self.entry(peer).load(Ordering::SeqCst))
    }

    fn signal(&self, target: u16) {
        if let Some(slot) = self.peers.get(usize::from(target)) {
            // EAGAIN (counter full) means an interrupt is pending anyway.
            let _ = slot.interrupt.write(1);
        }
    }

    fn drain(&self, id: u16) -> Result<u64, EndpointError> {
        match self.peers[usize::from(id)].interrupt.read() {
            Ok(count) => Ok(count),
            Err(Errno::EAGAIN) => Ok(0),
            Err(e) => Err(EndpointError::Io {
                what: "reading the interrupt eventfd",
                source: e.into(),
            }),
        }
    }

    fn set_state(&self, id: u16, value: u32) {
        let slot = &self.peers[usize::from(id)];
        if slot.state.swap(value, Ordering::SeqCst) == value {
            return;
        }
        self.entry(id).store(value, Ordering::SeqCst);
        for other in 0..self.max_peers() {
            if other != id
                && self.peers[usize::from(other)]
                    .attached
                    .load(Ordering::SeqCst)
            {
                self.signal(other);
            }
        }
    }

    pub(crate) fn attach(self: &Arc<Self>, id: u16) -> Result<LocalRegisters, EndpointError> {
        let slot = self.peers.get(usize::from(id)).ok_or_else(|| {
            EndpointError::Local(format!("no peer {id} on a {}-peer link", self.peers.len()))
        })?;
        if slot.attached.swap(true, Ordering::SeqCst) {
            return Err(EndpointError::Local(format!(
                "peer {id} is already attached"
            )));
        }
        // A fresh peer: registers reset, interrupts on in one-shot mode, stale doorbells gone.
        slot.state.store(0, Ordering::SeqCst);
        self.entry(id).store(0, Ordering::SeqCst);
        slot.oneshot.store(true, Ordering::SeqCst);
        slot.int_control.store(INT_CONTROL_ENABLE, Ordering::SeqCst);
        self.drain(id)?;
        Ok(LocalRegisters {
            link: Arc::clone(self),
            id,
            _detach: Arc::new(Detach {
                link: Arc::clone(self),
                id,
            }),
        })
    }

    pub(crate) fn sections_for(&self, id: u16) -> Sections {
        // SAFETY: the state table page lives as long as `self`, which the registers (and so
        // the driver) keep alive; it is only read through the driver.
        let mut sections =
            Sections::new(unsafe { Section::new(self.state_table.ptr, PAGE, false) });
        for (peer, slot) in self.peers.iter().enumerate() {
            // SAFETY: each output section lives as long as `self`; only its owner writes it.
            sections.outputs[peer] = Some(unsafe {
                Section::new(slot.output.ptr, self.output_size, peer == usize::from(id))
            });
        }
        sections
    }

    pub(crate) fn interrupt_fd(&self, id: u16) -> BorrowedFd<'_> {
        self.peers[usize::from(id)].interrupt.as_fd()
    }

    pub(crate) fn take_interrupt(&self, id: u16) -> Result<Option<u64>, EndpointError> {
        let slot = &self.peers[usize::from(id)];
        let count = self.drain(id)?;
        if count == 0 || slot.int_control.load(Ordering::SeqCst) & INT_CONTROL_ENABLE == 0 {
            return Ok(None);
        }
        if slot.oneshot.load(Ordering::SeqCst) {
            slot.int_control.store(0, Ordering::SeqCst);
        }
        Ok(Some(count))
    }

    pub(crate) fn rearm(&self, id: u16) {
        self.write_int_control(id, INT_CONTROL_ENABLE);
    }

    fn write_int_control(&self, id: u16, value: u32) {
        let slot = &self.peers[usize::from(id)];
        let enable = value & INT_CONTROL_ENABLE;
        if slot.int_control.swap(enable, Ordering::SeqCst) == 0 && enable != 0 {
            // Doorbells that arrived while disabled are discarded, as on the device.
            let _ = self.drain(id);
        }
    }
}

/// Detaches a peer when the last register handle of its endpoint goes away.
#[derive(Debug)]
struct Detach {
    link: Arc<LocalLink>,
    id: u16,
}

impl Drop for Detach {
    fn drop(&mut self) {
        self.link.set_state(self.id, 0);
        let slot = &self.link.peers[usize::from(self.id)];
        slot.int_control.store(0, Ordering::SeqCst);
        slot.attached.store(false, Ordering::SeqCst);
    }
}

/// The register page of one peer of a [`LocalLink`].
#[derive(Debug, Clone)]
pub struct LocalRegisters {
    link: Arc<LocalLink>,
    id: u16,
    _detach: Arc<Detach>,
}

impl RegisterAccess for LocalRegisters {
    fn read32(&self, offset: u32) -> u32 {
        let slot = &self.link.peers[usize::from(self.id)];
        match offset {
            regs::ID => u32::from(self.id),
            regs::MAX_PEERS => u32::from(self.link.max_peers()),
            regs::INT_CONTROL => slot.int_control.load(Ordering::SeqCst),
            regs::STATE => slot.state.load(Ordering::SeqCst),
            _ => 0,
        }
    }

    fn write32(&self, offset: u32, value: u32) {
        match offset {
            regs::INT_CONTROL => self.link.write_int_control(self.id, value),
            regs::DOORBELL => {
                let (target, vector) = ((value >> 16) as u16, value & 0xFFFF);
                let active = self
                    .link
                    .peers
                    .get(usize::from(target))
                    .is_some_and(|s| s.attached.load(Ordering::SeqCst));
                if vector == 0 && active {
                    self.link.signal(target);
                }
            }
            regs::STATE => self.link.set_state(self.id, value),
            _ => {}
        }
    }
}
