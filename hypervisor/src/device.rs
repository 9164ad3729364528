//! The emulated ivshmem v2 device, independent of how cells run (processes or KVM).
//!
//! One [`Link`] models one link: the state table (through [`StateTable`]), and for every peer
//! the register file behind BAR0 and the config space that peer's guest sees. Backends feed
//! it guest accesses ([`Link::mmio_read`], [`Link::mmio_write`], [`Link::config_read`],
//! [`Link::config_write`]) and life-cycle events ([`Link::peer_attached`],
//! [`Link::peer_detached`]) and carry out the [`Effects`] it returns: interrupts that are
//! already filtered (the target exists, is active and accepts interrupts) and for which
//! one-shot mode has already been applied.
//!
//! Behaviour follows `ivshmem-v2.md`; where it leaves a choice:
//! - Writes to the read-only `ID` and `MAX_PEERS` registers are ignored (as Jailhouse does).
//!   Illegal register accesses are only the misaligned or non-32-bit ones.
//! - Config space is 256 bytes. Accesses must be 1, 2 or 4 bytes wide and naturally aligned,
//!   and BAR0 only takes aligned 32-bit accesses; anything else is an [`AccessError`]. Writes
//!   to registers that are read-only or unimplemented are ignored.
//! - The shared memory is announced through the vendor capability's base-address field
//!   (length 20h, no BAR2); its value is per peer ([`Link::set_shmem_base`]).
//! - Interrupts are INTx: one vector (0). Ringing another vector has no effect.
//! - A peer's state entry changes to 0 on attach (reset) and detach; the other peers are
//!   notified when the entry actually changed, like a `STATE` write.
//! - Register writes from a peer that is not attached are refused (it has no device); its
//!   reads are served.

use std::fmt;

use ivshmem_dev::doorbell::Doorbell;
use ivshmem_dev::layout::SharedMemoryLayout;
use ivshmem_dev::pci::{
    ConfigHeader, VendorCapabilityLayout, BAR0, BAR0_SIZE_MASK, CAP_ID_VENDOR, CAP_LEN_WITH_BASE,
    CAP_PRIV_CONTROL, CLASS_CODE, COMMAND, COMMAND_WRITABLE, CONFIG_SPACE_SIZE, DEVICE_ID,
    INTX_PIN, PRIV_CONTROL_ONESHOT, REVISION_ID, STATUS_CAP_LIST, VENDOR_ID,
};
use ivshmem_dev::protocol::Protocol;
use ivshmem_dev::regs::{
    DOORBELL, ID, INT_CONTROL, INT_CONTROL_ENABLE, MAX_PEERS, REGISTER_PAGE_SIZE, STATE,
};
use ivshmem_dev::zerocopy::IntoBytes;

/// Number of interrupt vectors per peer with INTx: one, vector 0.
pub const INTX_VECTORS: u16 = 1;

/// Where the vendor capability sits in the emulated config space (right after the header).
pub const VENDOR_CAP_OFFSET: u8 = 0x40;

/// The state table of a link: one `u32` per peer. Only the device model writes it.
///
/// Implemented by [`VecStateTable`] (tests) and by the process-cells backend over the mapped
/// state-table section (`crate::memory::MappedStateTable`). Peers outside the table read 0
/// and ignore writes.
pub trait StateTable: Send {
    /// `peer`'s entry.
    fn read(&self, peer: u16) -> u32;
    /// Sets `peer`'s entry.
    fn write(&mut self, peer: u16, value: u32);
    /// Sets every entry to 0.
    fn clear(&mut self);
}

/// A state table in a plain vector (for tests and for backends that publish it elsewhere).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VecStateTable {
    entries: Vec<u32>,
}

impl VecStateTable {
    /// A table of `max_peers` zero entries.
    pub fn new(max_peers: u16) -> Self {
        Self {
            entries: vec![0; usize::from(max_peers)],
        }
    }

    /// A table with the given entries (e.g. stale states left by a previous run).
    pub fn from_entries(entries: Vec<u32>) -> Self {
        Self { entries }
    }

    /// The entries.
    pub fn entries(&self) -> &[u32] {
        &self.entries
    }
}

impl StateTable for VecStateTable {
    fn read(&self, peer: u16) -> u32 {
        self.entries.get(usize::from(peer)).copied().unwrap_or(0)
    }

    fn write(&mut self, peer: u16, value: u32) {
        if let Some(entry) = self.entries.get_mut(usize::from(peer)) {
            *entry = value;
        }
    }

    fn clear(&mut self) {
        self.entries.fill(0);
    }
}

/// What a link is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkParams {
    /// The link's name (for reports).
    pub name: String,
    /// Number of peers; must equal `layout.max_peers()`.
    pub max_peers: u16,
    /// The protocol announced in config space.
    pub protocol: Protocol,
    /// The shared-memory layout (sizes announced in the vendor capability).
    pub layout: SharedMemoryLayout,
}

/// Why a [`Link`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// `max_peers` and the layout disagree.
    #[error(
        "link `{link}`: max_peers = {max_peers} but the layout is for {layout_max_peers} peers"
    )]
    MaxPeersMismatch {
        /// Link name.
        link: String,
        /// `LinkParams::max_peers`.
        max_peers: u16,
        /// `layout.max_peers()`.
        layout_max_peers: u16,
    },
}

/// One interrupt to raise: `vector` on peer `target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Interrupt {
    /// The peer to interrupt.
    pub target: u16,
    /// The vector (always 0 with INTx).
    pub vector: u16,
}

/// What the caller must do after an access or life-cycle event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Effects {
    /// Interrupts to raise, already filtered (target exists, is active and accepts
    /// interrupts) and with one-shot mode already applied. In peer order.
    pub interrupts: Vec<Interrupt>,
}

impl Effects {
    /// Nothing to do.
    pub fn none() -> Self {
        Self::default()
    }

    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.interrupts.is_empty()
    }

    /// The peers to interrupt.
    pub fn targets(&self) -> impl Iterator<Item = u16> + '_ {
        self.interrupts.iter().map(|interrupt| interrupt.target)
    }
}

/// Who applies `INT_CONTROL` (enable bit and one-shot) for a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum InterruptGate {
    /// The device model: the peer's `INT_CONTROL` writes reach [`Link::mmio_write`] (KVM
    /// cells). Interrupts go out only while bit 0 is set; one-shot clears it on delivery.
    #[default]
    Device,
    /// The cell-side endpoint (process cells keep `INT_CONTROL` and one-shot in the cell and
    /// drop interrupts that arrive while disabled). The model then reports every interrupt
    /// for an active target and leaves the endpoint to filter.
    Endpoint,
}

/// The kind of access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A load.
    Read,
    /// A store.
    Write,
}

impl fmt::Display for AccessKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessKind::Read => "read",
            AccessKind::Write => "write",
        })
    }
}

/// Which part of the device was accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessSpace {
    /// The BAR0 register page.
    Registers,
    /// PCI config space.
    Config,
}

impl fmt::Display for AccessSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessSpace::Registers => "register",
            AccessSpace::Config => "config space",
        })
    }
}

/// Why an access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessReason {
    /// Register accesses must be 4 bytes; config accesses 1, 2 or 4 bytes.
    WrongSize,
    /// The offset is not a multiple of the access size.
    Misaligned,
    /// BAR0 takes aligned 32-bit accesses only.
    Bar0NotDword,
    /// The offset is beyond the 4 KiB register page.
    OutsideRegisterPage,
    /// The access does not lie inside the 256-byte config space.
    OutsideConfigSpace,
    /// The peer ID is not on this link.
    UnknownPeer,
    /// The peer is not attached (its cell is not running), so it has no device to write.
    PeerNotAttached,
}

impl fmt::Display for AccessReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessReason::WrongSize => "unsupported access size",
            AccessReason::Misaligned => "misaligned access",
            AccessReason::Bar0NotDword => "BAR0 takes aligned 32-bit accesses only",
            AccessReason::OutsideRegisterPage => "outside the 4 KiB register page",
            AccessReason::OutsideConfigSpace => "outside the 256-byte config space",
            AccessReason::UnknownPeer => "no such peer on this link",
            AccessReason::PeerNotAttached => "the peer is not attached",
        })
    }
}

/// An access the device refuses. The caller stops the offending cell and reports it with
/// [`AccessError::fatal_report`], which adds the cell name and the guest address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid ivshmem {space} {kind} at offset {offset:#x}, size {size}{value} (link `{link}`, peer {peer}): {reason}",
    value = WriteValue(*value)
)]
pub struct AccessError {
    /// Link name.
    pub link: String,
    /// The peer that made the access.
    pub peer: u16,
    /// Registers or config space.
    pub space: AccessSpace,
    /// Offset in the register page or config space.
    pub offset: u64,
    /// Read or write.
    pub kind: AccessKind,
    /// Access size in bytes.
    pub size: u8,
    /// The value of a refused write.
    pub value: Option<u64>,
    /// Why it was refused.
    pub reason: AccessReason,
}

struct WriteValue(Option<u64>);

impl fmt::Display for WriteValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(f, ", value {value:#x}"),
            None => Ok(()),
        }
    }
}

impl AccessError {
    /// The line to log when stopping cell `cell` for this access at guest address `address`
    /// (the MMIO address, or the config address 0xCF8 selected), in the style of Jailhouse's
    /// `FATAL:` messages, e.g.
    /// `FATAL: cell "rtos": invalid ivshmem register write at 0xfe000011, size 2, value 0x1
    /// (link `telemetry`, peer 0, offset 0x11): misaligned access`.
    pub fn fatal_report(&self, cell: &str, address: u64) -> String {
        format!(
            "FATAL: cell \"{cell}\": invalid ivshmem {} {} at {address:#x}, size {}{} (link `{}`, peer {}, offset {:#x}): {}",
            self.space,
            self.kind,
            self.size,
            WriteValue(self.value),
            self.link,
            self.peer,
            self.offset,
            self.reason
        )
    }
}

/// The device state of one peer.
#[derive(Debug, Clone, Copy, Default)]
struct PeerDevice {
    active: bool,
    gate: InterruptGate,
    int_control: u32,
    one_shot: bool,
    command: u16,
    bar0: u32,
    shmem_base: u64,
}

impl PeerDevice {
    /// Guest-visible reset: everything the guest can change goes back to its reset value.
    fn reset(&mut self) {
        self.int_control = 0;
        self.one_shot = false;
        self.command = 0;
        self.bar0 = 0;
    }
}

/// The emulated ivshmem v2 device of one link: state table, and per peer the register file
/// and config space.
pub struct Link {
    name: String,
    protocol: Protocol,
    layout: SharedMemoryLayout,
    state_table: Box<dyn StateTable>,
    peers: Vec<PeerDevice>,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("layout", &self.layout)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link with every peer detached, over `state_table` (which is cleared when the first
    /// peer attaches, not here).
    pub fn new(params: LinkParams, state_table: Box<dyn StateTable>) -> Result<Self, LinkError> {
        if params.max_peers != params.layout.max_peers() {
            return Err(LinkError::MaxPeersMismatch {
                link: params.name,
                max_peers: params.max_peers,
                layout_max_peers: params.layout.max_peers(),
            });
        }
        Ok(Self {
            name: params.name,
            protocol: params.protocol,
            layout: params.layout,
            state_table,
            peers: vec![PeerDevice::default(); usize::from(params.max_peers)],
        })
    }

    /// The link's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Number of peers.
    pub fn max_peers(&self) -> u16 {
        self.peers.len() as u16
    }

    /// The protocol announced in config space.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// The shared-memory layout.
    pub fn layout(&self) -> &SharedMemoryLayout {
        &self.layout
    }

    /// The state table.
    pub fn state_table(&self) -> &dyn StateTable {
        &*self.state_table
    }

    fn peer(&self, peer: u16) -> Option<&PeerDevice> {
        self.peers.get(usize::from(peer))
    }

    fn peer_mut(&mut self, peer: u16) -> Option<&mut PeerDevice> {
        self.peers.get_mut(usize::from(peer))
    }

    /// `peer`'s state-table entry, or `None` if `peer` is not on the link.
    pub fn peer_state(&self, peer: u16) -> Option<u32> {
        self.peer(peer).map(|_| self.state_table.read(peer))
    }

    /// `peer`'s `INT_CONTROL` as the device model holds it, or `None` if `peer` is not on the
    /// link. (Meaningless for peers gated by their endpoint, see [`InterruptGate`].)
    pub fn int_control(&self, peer: u16) -> Option<u32> {
        self.peer(peer).map(|p| p.int_control)
    }

    /// Whether `peer` is attached (its cell runs). `false` for peers not on the link.
    pub fn is_active(&self, peer: u16) -> bool {
        self.peer(peer).is_some_and(|p| p.active)
    }

    /// The attached peers, in ID order.
    pub fn active_peers(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.max_peers()).filter(|&peer| self.is_active(peer))
    }

    /// Whether one-shot mode is on for `peer` (privileged control bit 0).
    pub fn one_shot(&self, peer: u16) -> Option<bool> {
        self.peer(peer).map(|p| p.one_shot)
    }

    /// `peer`'s command register.
    pub fn command(&self, peer: u16) -> Option<u16> {
        self.peer(peer).map(|p| p.command)
    }

    /// `peer`'s BAR0 register value (address bits only).
    pub fn bar0(&self, peer: u16) -> Option<u32> {
        self.peer(peer).map(|p| p.bar0)
    }

    /// Where `peer`'s guest decodes the register page: BAR0's address while memory decoding
    /// is on and BAR0 is non-zero, else `None`. A backend re-reads this after every config
    /// write to move its MMIO handler.
    pub fn bar0_mapping(&self, peer: u16) -> Option<u64> {
        let p = self.peer(peer)?;
        (p.command & ivshmem_dev::pci::COMMAND_MEMORY != 0 && p.bar0 != 0)
            .then_some(u64::from(p.bar0))
    }

    /// Sets the shared-memory base address `peer`'s guest finds in the vendor capability
    /// (guest-physical address where the backend maps the link; 0 for process cells).
    pub fn set_shmem_base(&mut self, peer: u16, base: u64) {
        if let Some(p) = self.peer_mut(peer) {
            p.shmem_base = base;
        }
    }

    /// The shared-memory base address announced to `peer`.
    pub fn shmem_base(&self, peer: u16) -> Option<u64> {
        self.peer(peer).map(|p| p.shmem_base)
    }

    /// Chooses who applies `INT_CONTROL` for `peer` (default [`InterruptGate::Device`]).
    /// Process cells use [`InterruptGate::Endpoint`].
    pub fn set_interrupt_gate(&mut self, peer: u16, gate: InterruptGate) {
        if let Some(p) = self.peer_mut(peer) {
            p.gate = gate;
        }
    }

    /// Who applies `INT_CONTROL` for `peer`.
    pub fn interrupt_gate(&self, peer: u16) -> Option<InterruptGate> {
        self.peer(peer).map(|p| p.gate)
    }

    /// Whether an interrupt on `vector` would reach `target` now: the target is on the link,
    /// attached, the vector exists, and (when the device gates it) `INT_CONTROL` bit 0 is set.
    pub fn deliverable(&self, target: u16, vector: u16) -> bool {
        let Some(p) = self.peer(target) else {
            return false;
        };
        p.active
            && vector < INTX_VECTORS
            && (p.gate == InterruptGate::Endpoint || p.int_control & INT_CONTROL_ENABLE != 0)
    }

    /// Delivers `vector` to `target` if [`deliverable`](Self::deliverable), applying one-shot
    /// mode (clears `INT_CONTROL` bit 0). For backends that route a doorbell themselves.
    pub fn deliver(&mut self, target: u16, vector: u16) -> Option<Interrupt> {
        if !self.deliverable(target, vector) {
            return None;
        }
        let p = &mut self.peers[usize::from(target)];
        if p.gate == InterruptGate::Device && p.one_shot {
            p.int_control &= !INT_CONTROL_ENABLE;
        }
        Some(Interrupt { target, vector })
    }

    /// Vector 0 to every peer but `source` that accepts it.
    fn notify_others(&mut self, source: u16) -> Effects {
        let interrupts = (0..self.max_peers())
            .filter(|&peer| peer != source)
            .filter_map(|peer| self.deliver(peer, 0))
            .collect();
        Effects { interrupts }
    }

    /// Sets `peer`'s state entry; a change notifies the others.
    fn change_state(&mut self, peer: u16, value: u32) -> Effects {
        let old = self.state_table.read(peer);
        if old == value {
            return Effects::none();
        }
        self.state_table.write(peer, value);
        tracing::debug!(link = %self.name, peer, old, new = value, "state changed");
        self.notify_others(peer)
    }

    fn register_error(
        &self,
        peer: u16,
        offset: u64,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
        reason: AccessReason,
    ) -> AccessError {
        AccessError {
            link: self.name.clone(),
            peer,
            space: AccessSpace::Registers,
            offset,
            kind,
            size,
            value,
            reason,
        }
    }

    fn check_register_access(
        &self,
        peer: u16,
        offset: u64,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Result<u32, AccessError> {
        let reason = if self.peer(peer).is_none() {
            Some(AccessReason::UnknownPeer)
        } else if offset >= u64::from(REGISTER_PAGE_SIZE) {
            Some(AccessReason::OutsideRegisterPage)
        } else if size != 4 {
            Some(AccessReason::WrongSize)
        } else if offset % 4 != 0 {
            Some(AccessReason::Misaligned)
        } else if kind == AccessKind::Write && !self.is_active(peer) {
            Some(AccessReason::PeerNotAttached)
        } else {
            None
        };
        match reason {
            Some(reason) => Err(self.register_error(peer, offset, kind, size, value, reason)),
            None => Ok(offset as u32),
        }
    }

    /// A load of `size` bytes at `offset` in `peer`'s register page. Only aligned 32-bit
    /// loads are allowed. `ID`, `MAX_PEERS`, `INT_CONTROL`, `STATE` return their values;
    /// `DOORBELL` and every other offset read 0.
    pub fn mmio_read(&self, peer: u16, offset: u64, size: u8) -> Result<u32, AccessError> {
        let offset = self.check_register_access(peer, offset, AccessKind::Read, size, None)?;
        let p = &self.peers[usize::from(peer)];
        Ok(match offset {
            ID => u32::from(peer),
            MAX_PEERS => u32::from(self.max_peers()),
            INT_CONTROL => p.int_control,
            STATE => self.state_table.read(peer),
            _ => 0,
        })
    }

    /// A store of `size` bytes (`value`, low 32 bits used) at `offset` in `peer`'s register
    /// page. Only aligned 32-bit stores from an attached peer are allowed.
    /// - `INT_CONTROL`: keeps bit 0 (enable / re-arm).
    /// - `DOORBELL`: interrupts the target if it exists, is attached and accepts interrupts;
    ///   otherwise nothing. Ringing oneself is allowed.
    /// - `STATE`: a different value goes into the state table and raises vector 0 on every
    ///   other peer that accepts it; the same value does nothing.
    /// - `ID`, `MAX_PEERS` and unknown offsets: ignored.
    pub fn mmio_write(
        &mut self,
        peer: u16,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<Effects, AccessError> {
        let offset =
            self.check_register_access(peer, offset, AccessKind::Write, size, Some(value))?;
        let value = value as u32;
        Ok(match offset {
            INT_CONTROL => {
                self.peers[usize::from(peer)].int_control = value & INT_CONTROL_ENABLE;
                Effects::none()
            }
            DOORBELL => {
                let doorbell = Doorbell::decode(value);
                Effects {
                    interrupts: self
                        .deliver(doorbell.peer, doorbell.vector)
                        .into_iter()
                        .collect(),
                }
            }
            STATE => self.change_state(peer, value),
            _ => Effects::none(),
        })
    }

    fn check_config_access(
        &self,
        peer: u16,
        offset: u16,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Result<(), AccessError> {
        let end = usize::from(offset) + usize::from(size);
        let bar0 = u16::from(BAR0)..u16::from(BAR0) + 4;
        let touches_bar0 = offset < bar0.end && end > usize::from(bar0.start);
        let reason = if self.peer(peer).is_none() {
            Some(AccessReason::UnknownPeer)
        } else if !matches!(size, 1 | 2 | 4) {
            Some(AccessReason::WrongSize)
        } else if offset % u16::from(size) != 0 {
            Some(AccessReason::Misaligned)
        } else if end > CONFIG_SPACE_SIZE {
            Some(AccessReason::OutsideConfigSpace)
        } else if touches_bar0 && (size != 4 || offset != bar0.start) {
            Some(AccessReason::Bar0NotDword)
        } else {
            None
        };
        match reason {
            Some(reason) => Err(AccessError {
                link: self.name.clone(),
                peer,
                space: AccessSpace::Config,
                offset: u64::from(offset),
                kind,
                size,
                value,
                reason,
            }),
            None => Ok(()),
        }
    }

    /// The 256-byte config space `peer`'s guest sees right now, or `None` if `peer` is not on
    /// the link.
    pub fn config_space(&self, peer: u16) -> Option<[u8; CONFIG_SPACE_SIZE]> {
        let p = self.peer(peer)?;
        let (prog_if, subclass) = self.protocol.to_config_bytes();
        let mut bars = [0u32.into(); 6];
        bars[0] = p.bar0.into();
        let header = ConfigHeader {
            vendor_id: VENDOR_ID.into(),
            device_id: DEVICE_ID.into(),
            command: p.command.into(),
            status: STATUS_CAP_LIST.into(),
            revision: REVISION_ID,
            prog_if,
            subclass,
            class: CLASS_CODE,
            bars,
            subsystem_vendor_id: VENDOR_ID.into(),
            subsystem_id: DEVICE_ID.into(),
            cap_pointer: VENDOR_CAP_OFFSET,
            interrupt_pin: INTX_PIN,
            ..ConfigHeader::default()
        };
        let params = self.layout.params();
        let capability = VendorCapabilityLayout {
            id: CAP_ID_VENDOR,
            next: 0,
            length: CAP_LEN_WITH_BASE,
            priv_control: if p.one_shot { PRIV_CONTROL_ONESHOT } else { 0 },
            state_table_size: params.state_table_size.into(),
            rw_section_size: params.rw_size.into(),
            output_section_size: params.output_size.into(),
            base_address: p.shmem_base.into(),
        };
        let mut image = [0u8; CONFIG_SPACE_SIZE];
        image[..header.as_bytes().len()].copy_from_slice(header.as_bytes());
        let cap = usize::from(VENDOR_CAP_OFFSET);
        image[cap..cap + capability.as_bytes().len()].copy_from_slice(capability.as_bytes());
        Some(image)
    }

    /// A config-space load of `size` (1, 2 or 4) bytes at `offset` (naturally aligned; BAR0
    /// only as an aligned dword). Unimplemented registers read 0.
    pub fn config_read(&self, peer: u16, offset: u16, size: u8) -> Result<u32, AccessError> {
        self.check_config_access(peer, offset, AccessKind::Read, size, None)?;
        let image = self.config_space(peer).unwrap_or([0; CONFIG_SPACE_SIZE]);
        let start = usize::from(offset);
        let mut bytes = [0u8; 4];
        bytes[..usize::from(size)].copy_from_slice(&image[start..start + usize::from(size)]);
        Ok(u32::from_le_bytes(bytes))
    }

    /// A config-space store of `size` (1, 2 or 4) bytes at `offset` (naturally aligned; BAR0
    /// only as an aligned dword). Writable: the command register's I/O, memory, bus-master and
    /// INTx-disable bits; BAR0's address bits (writing all ones then reading returns the size
    /// mask); the one-shot bit of the vendor capability's privileged control byte. Every other
    /// bit is ignored.
    pub fn config_write(
        &mut self,
        peer: u16,
        offset: u16,
        size: u8,
        value: u32,
    ) -> Result<(), AccessError> {
        self.check_config_access(
            peer,
            offset,
            AccessKind::Write,
            size,
            Some(u64::from(value)),
        )?;
        let p = &mut self.peers[usize::from(peer)];
        if offset == u16::from(BAR0) {
            p.bar0 = value & BAR0_SIZE_MASK;
            return Ok(());
        }
        let priv_control = u16::from(VENDOR_CAP_OFFSET) + u16::from(CAP_PRIV_CONTROL);
        for (i, byte) in value.to_le_bytes()[..usize::from(size)].iter().enumerate() {
            let at = offset + i as u16;
            if at == u16::from(COMMAND) {
                p.command = (p.command & 0xFF00 | u16::from(*byte)) & COMMAND_WRITABLE;
            } else if at == u16::from(COMMAND) + 1 {
                p.command = (p.command & 0x00FF | u16::from(*byte) << 8) & COMMAND_WRITABLE;
            } else if at == priv_control {
                p.one_shot = byte & PRIV_CONTROL_ONESHOT != 0;
            }
        }
        Ok(())
    }

    /// `peer`'s cell started (or restarted): if no peer is attached yet, the whole state
    /// table is cleared (stale states from a previous run must not fool anyone); the peer's
    /// registers and config space are reset; its state entry becomes 0 (the others are
    /// notified if it was not 0, i.e. on a reset of an attached peer); it becomes active.
    /// A peer not on the link is ignored (with a warning).
    pub fn peer_attached(&mut self, peer: u16) -> Effects {
        if self.peer(peer).is_none() {
            tracing::warn!(link = %self.name, peer, "attach of a peer that is not on the link");
            return Effects::none();
        }
        if self.active_peers().next().is_none() {
            tracing::debug!(link = %self.name, "first peer attaches: clearing the state table");
            self.state_table.clear();
        }
        let p = &mut self.peers[usize::from(peer)];
        p.reset();
        p.active = true;
        self.change_state(peer, 0)
    }

    /// `peer`'s cell stopped, exited or died: it becomes inactive (never again a doorbell
    /// target until it attaches), its registers reset, and its state entry becomes 0; the
    /// other peers are notified if the entry was not 0 already.
    pub fn peer_detached(&mut self, peer: u16) -> Effects {
        let Some(p) = self.peer_mut(peer) else {
            tracing::warn!(link = %self.name, peer, "detach of a peer that is not on the link");
            return Effects::none();
        };
        p.reset();
        p.active = false;
        self.change_state(peer, 0)
    }
}
