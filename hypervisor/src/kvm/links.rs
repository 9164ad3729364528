//! A KVM cell on a link: its PCI function, BAR0/BAR1 by MMIO exits into the shared device
//! model, the link memory as memory slots, and the interrupt wiring.
//!
//! # Interrupt wiring
//!
//! Every (peer, vector) of a link has one eventfd ([`LinkMemory`]); every doorbell, from a
//! process cell or a KVM cell, is a write to the target's eventfd:
//!
//! - **Source side (fast path).** While a KVM cell's BAR0 is mapped, its VM has one
//!   `KVM_IOEVENTFD` per (target, vector) on BAR0 + `DOORBELL`, 4 bytes, with datamatch
//!   `vector | target << 16`, signalling that target's eventfd. A doorbell write then never
//!   leaves the kernel. Values that match nothing (unknown peer or vector) exit and go
//!   through the device model, which ignores them.
//! - **Target side.** A KVM target's eventfd for vector *v* is either an **irqfd** on an MSI
//!   route of its VM (`KVM_SET_GSI_ROUTING`, the message of its MSI-X entry) — only while the
//!   device model says *v* is deliverable to it and one-shot mode is off — or it is watched
//!   by the cell's service thread (a **relay**), which drains it and asks the model
//!   ([`Link::deliver`]) whether and how to deliver, so that gating and one-shot are applied
//!   in user space. Routes are re-computed after every access of the target that can change
//!   its gating (config writes, BAR0 and BAR1 writes) and after each relayed delivery. A
//!   route that becomes an irqfd first discards what accumulated while it was gated off
//!   (a doorbell to a disabled peer has no effect).
//! - **Interrupts the model decided** (state changes, doorbells that exited, attach and
//!   detach) are already gated and one-shot-applied: [`LinkWiring::deliver`] injects them
//!   into KVM targets with `KVM_SIGNAL_MSI` and signals the eventfd of process targets.

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard};

use ivshmem_dev::msix::BAR1_SIZE;
use ivshmem_dev::regs::{DOORBELL, REGISTER_PAGE_SIZE};
use kvm_bindings::{kvm_irq_routing_entry, kvm_msi, KvmIrqRouting, KVM_IRQ_ROUTING_MSI};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::devices::Bdf;
use super::memory::{GuestMemory, GuestRegion};
use super::KvmError;
use crate::device::{
    AccessError, Effects, InterruptGate, InterruptMode, Link, LinkParams, MsiMessage, Route,
};
use crate::memory::LinkMemory;
use ivshmem_dev::{LayoutParams, SharedMemoryLayout};

/// The first GSI used for MSI routes (below are the irqchip's pins).
const FIRST_MSI_GSI: u32 = 32;
/// GSIs reserved per link of a cell (one per vector).
const GSIS_PER_LINK: u32 = 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The interrupt side of a running KVM cell: its VM, its GSI routing table and the eventfd
/// that wakes its service thread.
pub struct CellIrq {
    pub(crate) vm: VmFd,
    pub(crate) wake: EventFd,
    routes: Mutex<Vec<kvm_irq_routing_entry>>,
}

impl std::fmt::Debug for CellIrq {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CellIrq").finish_non_exhaustive()
    }
}

impl CellIrq {
    /// Wraps a VM.
    pub(crate) fn new(vm: VmFd) -> Result<Self, KvmError> {
        Ok(Self {
            vm,
            wake: EventFd::new(EFD_NONBLOCK).map_err(|source| KvmError::Os {
                call: "eventfd",
                source,
            })?,
            routes: Mutex::new(Vec::new()),
        })
    }

    /// Injects `message` now (`KVM_SIGNAL_MSI`).
    pub fn inject(&self, message: MsiMessage) {
        let msi = kvm_msi {
            address_lo: message.address as u32,
            address_hi: (message.address >> 32) as u32,
            data: message.data,
            ..Default::default()
        };
        if let Err(e) = self.vm.signal_msi(msi) {
            tracing::warn!("KVM_SIGNAL_MSI {message:?} failed: {e}");
        }
    }

    /// Sets (or with `None` removes) the MSI route of `gsi` and loads the table.
    fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), KvmError> {
        let mut routes = lock(&self.routes);
        routes.retain(|r| r.gsi != gsi);
        if let Some(m) = message {
            let mut entry = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            entry.u.msi.address_lo = m.address as u32;
            entry.u.msi.address_hi = (m.address >> 32) as u32;
            entry.u.msi.data = m.data;
            routes.push(entry);
        }
        let mut table = KvmIrqRouting::new(routes.len()).map_err(|e| {
            KvmError::Config(format!(
                "GSI routing table of {} entries: {e:?}",
                routes.len()
            ))
        })?;
        table.as_mut_slice().copy_from_slice(&routes);
        self.vm
            .set_gsi_routing(&table)
            .map_err(|source| KvmError::Kvm {
                call: "KVM_SET_GSI_ROUTING",
                source,
            })
    }

    fn wake(&self) {
        let _ = self.wake.write(1);
    }
}

/// Section sizes of a link, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSizes {
    /// State table (a page multiple, >= 4 bytes per peer).
    pub state_table: u64,
    /// R/W section (may be 0).
    pub rw: u64,
    /// Each output section.
    pub output: u64,
}

/// One link's device model, memory and interrupt lines, shared by every backend that serves
/// one of its peers (the control server for process cells, KVM cells' vCPU threads).
pub struct LinkWiring {
    model: Mutex<Link>,
    memory: Arc<LinkMemory>,
    kvm_targets: Mutex<Vec<Option<Arc<CellIrq>>>>,
}

impl std::fmt::Debug for LinkWiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWiring")
            .field("model", &*lock(&self.model))
            .finish_non_exhaustive()
    }
}

impl LinkWiring {
    /// Puts a link's device model and memory together (the model's state table must be the
    /// memory's).
    pub fn new(model: Link, memory: Arc<LinkMemory>) -> Result<Arc<Self>, KvmError> {
        let peers = usize::from(model.max_peers());
        if memory.interrupts.len() != peers
            || memory
                .interrupts
                .iter()
                .any(|v| v.len() < usize::from(model.vectors()))
        {
            return Err(KvmError::Config(format!(
                "link `{}`: the memory has no eventfd for every (peer, vector)",
                model.name()
            )));
        }
        Ok(Arc::new(Self {
            model: Mutex::new(model),
            memory,
            kvm_targets: Mutex::new(vec![None; peers]),
        }))
    }

    /// Creates a link's memory and device model (every peer gated by the device until an
    /// endpoint-gated backend says otherwise) and puts them together.
    pub fn create(
        name: &str,
        max_peers: u16,
        protocol: u16,
        sizes: LinkSizes,
        interrupts: InterruptMode,
    ) -> Result<Arc<Self>, KvmError> {
        let memory = LinkMemory::create(
            name,
            max_peers,
            interrupts.vectors(),
            sizes.state_table,
            sizes.rw,
            sizes.output,
        )
        .map_err(|e| KvmError::Config(format!("link `{name}`: {e}")))?;
        let state_table_size = u32::try_from(sizes.state_table)
            .map_err(|_| KvmError::Config(format!("link `{name}`: state table too large")))?;
        let layout = SharedMemoryLayout::new(LayoutParams {
            max_peers,
            state_table_size,
            rw_size: sizes.rw,
            output_size: sizes.output,
            page_size: crate::config::PAGE_SIZE,
        })
        .map_err(|e| KvmError::Config(format!("link `{name}`: {e}")))?;
        let model = Link::new(
            LinkParams {
                name: name.to_string(),
                max_peers,
                protocol: protocol.into(),
                layout,
                interrupts,
            },
            Box::new(memory.state_table_map()),
        )
        .map_err(|e| KvmError::Config(e.to_string()))?;
        Self::new(model, Arc::new(memory))
    }

    /// The device model (locked).
    pub fn model(&self) -> MutexGuard<'_, Link> {
        lock(&self.model)
    }

    /// The link memory.
    pub fn memory(&self) -> &Arc<LinkMemory> {
        &self.memory
    }

    /// The link's name.
    pub fn name(&self) -> String {
        self.model().name().to_string()
    }

    /// Raises interrupts the model decided (already gated, one-shot applied): KVM targets
    /// get their MSI injected, process targets their eventfd written.
    pub fn deliver(&self, effects: &Effects) {
        for interrupt in &effects.interrupts {
            let kvm = lock(&self.kvm_targets)
                .get(usize::from(interrupt.target))
                .cloned()
                .flatten();
            match kvm {
                Some(irq) => {
                    if let Some(m) = message(&self.model(), interrupt.target, interrupt.vector) {
                        irq.inject(m);
                    }
                }
                None => {
                    if let Err(e) = self.signal(interrupt.target, interrupt.vector) {
                        tracing::warn!(
                            "link `{}`: raising the interrupt of peer {} failed: {e}",
                            self.name(),
                            interrupt.target
                        );
                    }
                }
            }
        }
    }

    /// Writes the eventfd of (`peer`, `vector`) (a process cell's interrupt line).
    pub fn signal(&self, peer: u16, vector: u16) -> std::io::Result<()> {
        match self.line(peer, vector) {
            Some(line) => line.signal(),
            None => Ok(()),
        }
    }

    fn line(&self, peer: u16, vector: u16) -> Option<&crate::memory::InterruptEventFd> {
        self.memory
            .interrupts
            .get(usize::from(peer))?
            .get(usize::from(vector))
    }

    /// The eventfd of (`peer`, `vector`), duplicated as an [`EventFd`].
    fn interrupt_eventfd(&self, peer: u16, vector: u16) -> Option<EventFd> {
        let owned = self.line(peer, vector)?.fd().try_clone_to_owned().ok()?;
        // SAFETY: `owned` is a fresh duplicate of an eventfd, handed over whole.
        Some(unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) })
    }

    /// Number of vectors per peer.
    fn vectors(&self) -> u16 {
        self.model().vectors()
    }
}

/// The MSI message to inject for an interrupt the model delivered to (`peer`, `vector`).
fn message(model: &Link, peer: u16, vector: u16) -> Option<MsiMessage> {
    model.msi_message(peer, vector)
}

/// The message doorbells on (`peer`, `vector`) may reach the guest with, bypassing user
/// space: only a deliverable MSI route without one-shot (one-shot needs the model to clear
/// `INT_CONTROL` on each delivery).
fn fast_path(model: &Link, peer: u16, vector: u16) -> Option<MsiMessage> {
    match model.route(peer, vector) {
        Route::Msi {
            message,
            one_shot: false,
        } => Some(message),
        _ => None,
    }
}

/// One KVM cell's place on one link.
#[derive(Debug, Clone)]
pub struct KvmLinkConfig {
    /// The link.
    pub wiring: Arc<LinkWiring>,
    /// The cell's peer ID on it.
    pub peer: u16,
    /// Where its PCI function sits.
    pub bdf: Bdf,
    /// Guest-physical address of the link memory (announced in the vendor capability).
    pub address: u64,
}

/// How the target side of one vector is wired now.
enum VectorRoute {
    /// Not wired (the cell is not attached).
    None,
    /// An irqfd on GSI `gsi` with this message.
    Irqfd { fd: EventFd, message: MsiMessage },
    /// Watched by the service thread.
    Relay(Arc<Relay>),
}

struct Routes {
    /// BAR0 address the doorbell ioeventfds are registered at, and the registrations.
    doorbells: Option<(u64, Vec<(EventFd, u32)>)>,
    vectors: Vec<VectorRoute>,
}

/// A KVM cell on one link.
pub(crate) struct Attachment {
    config: KvmLinkConfig,
    index: u32,
    routes: Mutex<Routes>,
}

impl Attachment {
    pub(crate) fn new(config: KvmLinkConfig, index: usize) -> Result<Self, KvmError> {
        let vectors = config.wiring.vectors();
        if u32::from(vectors) > GSIS_PER_LINK {
            return Err(KvmError::Config(format!(
                "link `{}`: {vectors} vectors, at most {GSIS_PER_LINK} per peer",
                config.wiring.name()
            )));
        }
        let max_peers = config.wiring.model().max_peers();
        if config.peer >= max_peers {
            return Err(KvmError::Config(format!(
                "link `{}` has {max_peers} peers; peer {} does not exist",
                config.wiring.name(),
                config.peer
            )));
        }
        Ok(Self {
            config,
            index: index as u32,
            routes: Mutex::new(Routes {
                doorbells: None,
                vectors: (0..vectors).map(|_| VectorRoute::None).collect(),
            }),
        })
    }

    pub(crate) fn bdf(&self) -> Bdf {
        self.config.bdf
    }

    fn peer(&self) -> u16 {
        self.config.peer
    }

    fn wiring(&self) -> &LinkWiring {
        &self.config.wiring
    }

    fn gsi(&self, vector: u16) -> u32 {
        FIRST_MSI_GSI + self.index * GSIS_PER_LINK + u32::from(vector)
    }

    /// Maps the link's sections at the configured address: the state table and the other
    /// peers' output sections read-only, the R/W section and the own output section
    /// writable.
    pub(crate) fn map_memory(&self, memory: &mut GuestMemory) -> Result<(), KvmError> {
        let wiring = self.wiring();
        let layout = *wiring.model().layout();
        let link = wiring.name();
        let base = self.config.address;
        let mem = &wiring.memory;
        let st = layout.state_table();
        memory.add(GuestRegion::link_section(
            &format!("{link}/state-table"),
            mem.state_table.read_only_fd(),
            base + st.offset,
            st.size,
            true,
        )?)?;
        if let Some(rw) = &mem.rw {
            memory.add(GuestRegion::link_section(
                &format!("{link}/rw"),
                rw.read_write_fd(),
                base + layout.rw().offset,
                layout.rw().size,
                false,
            )?)?;
        }
        for (peer, out) in mem.outputs.iter().enumerate() {
            let region = layout.output(peer as u16).ok_or_else(|| {
                KvmError::Config(format!("link `{link}`: no output section {peer}"))
            })?;
            let own = peer == usize::from(self.peer());
            let fd = if own {
                out.read_write_fd()
            } else {
                out.read_only_fd()
            };
            memory.add(GuestRegion::link_section(
                &format!("{link}/output-{peer}"),
                fd,
                base + region.offset,
                region.size,
                !own,
            )?)?;
        }
        Ok(())
    }

    /// The cell starts on the link: the device resets, the peers see state 0, stale
    /// interrupts are dropped, the target side is wired.
    pub(crate) fn attach(&self, irq: &Arc<CellIrq>) {
        let wiring = self.wiring();
        let peer = self.peer();
        for vector in 0..wiring.vectors() {
            if let Some(fd) = wiring.interrupt_eventfd(peer, vector) {
                let _ = fd.read();
            }
        }
        let effects = {
            let mut model = wiring.model();
            model.set_interrupt_gate(peer, InterruptGate::Device);
            model.set_shmem_base(peer, self.config.address);
            model.peer_attached(peer)
        };
        lock(&wiring.kvm_targets)[usize::from(peer)] = Some(irq.clone());
        wiring.deliver(&effects);
        self.sync(irq);
    }

    /// The cell stops: no more doorbells from it or to it by the fast path; its state
    /// becomes 0 and its peers are notified.
    pub(crate) fn detach(&self, irq: &CellIrq) {
        let wiring = self.wiring();
        let peer = self.peer();
        {
            let mut routes = lock(&self.routes);
            unregister_doorbells(&irq.vm, &mut routes);
            for (vector, route) in routes.vectors.iter_mut().enumerate() {
                self.unwire(irq, vector as u16, route);
            }
        }
        lock(&wiring.kvm_targets)[usize::from(peer)] = None;
        let effects = wiring.model().peer_detached(peer);
        wiring.deliver(&effects);
    }

    /// A config-space read.
    pub(crate) fn config_read(&self, register: u16, size: u8) -> Result<u32, AccessError> {
        self.wiring()
            .model()
            .config_read(self.peer(), register, size)
    }

    /// A config-space write; BARs, command and capabilities may have moved routes.
    pub(crate) fn config_write(
        &self,
        irq: &Arc<CellIrq>,
        register: u16,
        size: u8,
        value: u32,
    ) -> Result<(), AccessError> {
        self.wiring()
            .model()
            .config_write(self.peer(), register, size, value)?;
        self.sync(irq);
        Ok(())
    }

    /// The offset in BAR0 if `address` lies in it.
    fn bar0_offset(&self, address: u64) -> Option<u64> {
        let base = self.wiring().model().bar0_mapping(self.peer())?;
        (address >= base && address - base < u64::from(REGISTER_PAGE_SIZE)).then(|| address - base)
    }

    /// The offset in BAR1 (MSI-X table and PBA) if `address` lies in it.
    fn bar1_offset(&self, address: u64) -> Option<u64> {
        let base = self.wiring().model().bar1_mapping(self.peer())?;
        (address >= base && address - base < u64::from(BAR1_SIZE)).then(|| address - base)
    }

    /// An MMIO read, if `address` is in one of this function's BARs.
    pub(crate) fn mmio_read(&self, address: u64, size: u8) -> Option<Result<u64, AccessError>> {
        if let Some(offset) = self.bar0_offset(address) {
            return Some(
                self.wiring()
                    .model()
                    .mmio_read(self.peer(), offset, size)
                    .map(u64::from),
            );
        }
        let offset = self.bar1_offset(address)?;
        Some(self.wiring().model().msix_read(self.peer(), offset, size))
    }

    /// An MMIO write, if `address` is in one of this function's BARs.
    pub(crate) fn mmio_write(
        &self,
        irq: &Arc<CellIrq>,
        address: u64,
        size: u8,
        value: u64,
    ) -> Option<Result<(), AccessError>> {
        if let Some(offset) = self.bar0_offset(address) {
            let result = self
                .wiring()
                .model()
                .mmio_write(self.peer(), offset, size, value);
            return Some(result.map(|effects| {
                self.wiring().deliver(&effects);
                self.sync(irq);
            }));
        }
        let offset = self.bar1_offset(address)?;
        let result = self
            .wiring()
            .model()
            .msix_write(self.peer(), offset, size, value);
        Some(result.map(|()| self.sync(irq)))
    }

    /// The relays the service thread must watch now.
    pub(crate) fn relays(&self) -> Vec<Arc<Relay>> {
        lock(&self.routes)
            .vectors
            .iter()
            .filter_map(|r| match r {
                VectorRoute::Relay(relay) => Some(relay.clone()),
                _ => None,
            })
            .collect()
    }

    /// Brings the doorbell ioeventfds and the vector routes in line with the model.
    pub(crate) fn sync(&self, irq: &Arc<CellIrq>) {
        let wiring = self.wiring();
        let peer = self.peer();
        let mut routes = lock(&self.routes);
        // Source side: the ioeventfds follow BAR0.
        let bar0 = wiring.model().bar0_mapping(peer);
        if routes.doorbells.as_ref().map(|(at, _)| *at) != bar0 {
            unregister_doorbells(&irq.vm, &mut routes);
            if let Some(base) = bar0 {
                routes.doorbells = Some((base, self.register_doorbells(&irq.vm, base)));
            }
        }
        // Target side.
        let mut relays_changed = false;
        for vector in 0..routes.vectors.len() as u16 {
            let want = fast_path(&wiring.model(), peer, vector);
            let route = &mut routes.vectors[usize::from(vector)];
            match (&*route, want) {
                (VectorRoute::Irqfd { message, .. }, Some(m)) if *message == m => {}
                (VectorRoute::Irqfd { .. }, Some(m)) => {
                    if let Err(e) = irq.set_route(self.gsi(vector), Some(m)) {
                        tracing::warn!("{e}");
                    }
                    if let VectorRoute::Irqfd { message, .. } = route {
                        *message = m;
                    }
                }
                (VectorRoute::Relay(_), None) => {}
                (_, want) => {
                    relays_changed |= matches!(route, VectorRoute::Relay(_));
                    self.unwire(irq, vector, route);
                    *route = match want.and_then(|m| self.wire_irqfd(irq, vector, m)) {
                        Some(wired) => wired,
                        None => {
                            relays_changed = true;
                            self.relay(vector)
                        }
                    };
                }
            }
        }
        if relays_changed {
            irq.wake();
        }
    }

    fn relay(&self, vector: u16) -> VectorRoute {
        match self.wiring().interrupt_eventfd(self.peer(), vector) {
            Some(fd) => VectorRoute::Relay(Arc::new(Relay {
                wiring: self.config.wiring.clone(),
                peer: self.peer(),
                vector,
                fd,
                active: Mutex::new(true),
            })),
            None => VectorRoute::None,
        }
    }

    /// Wires `vector` as an irqfd with `message`, discarding what accumulated before.
    fn wire_irqfd(&self, irq: &CellIrq, vector: u16, message: MsiMessage) -> Option<VectorRoute> {
        let fd = self.wiring().interrupt_eventfd(self.peer(), vector)?;
        let gsi = self.gsi(vector);
        let _ = fd.read();
        let wired = irq.set_route(gsi, Some(message)).and_then(|()| {
            irq.vm
                .register_irqfd(&fd, gsi)
                .map_err(|source| KvmError::Kvm {
                    call: "KVM_IRQFD",
                    source,
                })
        });
        match wired {
            Ok(()) => Some(VectorRoute::Irqfd { fd, message }),
            Err(e) => {
                tracing::warn!("link `{}`: {e}; using the relay", self.wiring().name());
                None
            }
        }
    }

    fn unwire(&self, irq: &CellIrq, vector: u16, route: &mut VectorRoute) {
        match std::mem::replace(route, VectorRoute::None) {
            VectorRoute::None => {}
            VectorRoute::Irqfd { fd, .. } => {
                let gsi = self.gsi(vector);
                if let Err(e) = irq.vm.unregister_irqfd(&fd, gsi) {
                    tracing::warn!("KVM_IRQFD deassign of GSI {gsi} failed: {e}");
                }
                if let Err(e) = irq.set_route(gsi, None) {
                    tracing::warn!("{e}");
                }
            }
            VectorRoute::Relay(relay) => *lock(&relay.active) = false,
        }
    }

    fn register_doorbells(&self, vm: &VmFd, bar0: u64) -> Vec<(EventFd, u32)> {
        let wiring = self.wiring();
        let max_peers = wiring.model().max_peers();
        let address = IoEventAddress::Mmio(bar0 + u64::from(DOORBELL));
        let mut registered = Vec::new();
        for target in 0..max_peers {
            for vector in 0..wiring.vectors() {
                let Some(fd) = wiring.interrupt_eventfd(target, vector) else {
                    continue;
                };
                let datamatch = u32::from(vector) | u32::from(target) << 16;
                match vm.register_ioevent(&fd, &address, datamatch) {
                    Ok(()) => registered.push((fd, datamatch)),
                    Err(e) => tracing::warn!(
                        "link `{}`: KVM_IOEVENTFD for doorbell {datamatch:#x} failed: {e}; \
                         that doorbell exits to user space",
                        wiring.name()
                    ),
                }
            }
        }
        registered
    }
}

fn unregister_doorbells(vm: &VmFd, routes: &mut Routes) {
    if let Some((base, registered)) = routes.doorbells.take() {
        let address = IoEventAddress::Mmio(base + u64::from(DOORBELL));
        for (fd, datamatch) in registered {
            if let Err(e) = vm.unregister_ioevent(&fd, &address, datamatch) {
                tracing::warn!("KVM_IOEVENTFD deassign {datamatch:#x} failed: {e}");
            }
        }
    }
}

/// A vector of a KVM target whose doorbells pass through user space.
pub(crate) struct Relay {
    wiring: Arc<LinkWiring>,
    peer: u16,
    vector: u16,
    fd: EventFd,
    /// Cleared (under the lock) when the vector is re-wired; `fire` reads the eventfd only
    /// under the lock while set, so it never steals a count meant for a new irqfd.
    active: Mutex<bool>,
}

impl Relay {
    pub(crate) fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The eventfd was written: the model decides (gating, one-shot) and a delivered
    /// interrupt is injected.
    pub(crate) fn fire(&self, irq: &CellIrq) {
        {
            let active = lock(&self.active);
            if !*active || !matches!(self.fd.read(), Ok(n) if n > 0) {
                return;
            }
        }
        let injected = {
            let mut model = self.wiring.model();
            model
                .deliver(self.peer, self.vector)
                .and_then(|_| message(&model, self.peer, self.vector))
        };
        if let Some(m) = injected {
            irq.inject(m);
        }
    }
}

/// The control server's view of a link shared with KVM cells: STATE writes and attach/detach
/// of process cells go through the shared model, and state interrupts are raised with
/// [`LinkWiring::deliver`] (MSI injection for KVM targets, eventfds for process cells).
#[derive(Debug)]
pub struct WiredModel {
    wiring: Arc<LinkWiring>,
}

impl WiredModel {
    /// The control server's side of `wiring`.
    pub fn new(wiring: Arc<LinkWiring>) -> Self {
        Self { wiring }
    }

    fn notify(effects: &Effects) -> crate::control::Notify {
        effects.targets().collect()
    }
}

impl crate::control::LinkModel for WiredModel {
    fn peer_attached(&mut self, peer: u16) -> crate::control::Notify {
        let mut model = self.wiring.model();
        // A process cell gates its own interrupts.
        model.set_interrupt_gate(peer, InterruptGate::Endpoint);
        Self::notify(&model.peer_attached(peer))
    }

    fn peer_detached(&mut self, peer: u16) -> crate::control::Notify {
        Self::notify(&self.wiring.model().peer_detached(peer))
    }

    fn write_state(
        &mut self,
        peer: u16,
        value: u32,
    ) -> Result<crate::control::Notify, AccessError> {
        self.wiring
            .model()
            .mmio_write(
                peer,
                u64::from(ivshmem_dev::regs::STATE),
                4,
                u64::from(value),
            )
            .map(|effects| Self::notify(&effects))
    }

    fn register_access_error(
        &self,
        peer: u16,
        offset: u64,
        kind: crate::device::AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Option<AccessError> {
        self.wiring
            .model()
            .register_access_error(peer, offset, kind, size, value)
    }

    fn is_active(&self, peer: u16) -> Option<bool> {
        Some(self.wiring.model().is_active(peer))
    }

    fn raise(&self, _memory: &LinkMemory, _link: &str, peers: &[u16]) {
        // State changes are vector 0; the model already gated them.
        let interrupts = peers
            .iter()
            .map(|&target| crate::device::Interrupt { target, vector: 0 })
            .collect();
        self.wiring.deliver(&Effects { interrupts });
    }
}
