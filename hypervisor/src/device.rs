//! The emulated ivshmem v2 device, independent of how cells run (processes or KVM).
//!
//! One [`Link`] models one link: the state table (through [`StateTable`]), and for every peer
//! the register file behind BAR0, the MSI-X table behind BAR1 and the config space that
//! peer's guest sees. Backends feed it guest accesses and life-cycle events and carry out the
//! [`Effects`] it returns: interrupts that are already filtered (the target exists, is
//! active and accepts interrupts) and for which one-shot mode has already been applied.
//!
//! # The API a VMM calls
//!
//! | guest event | call | the VMM then |
//! |---|---|---|
//! | BAR0 load / store | [`Link::mmio_read`] / [`Link::mmio_write`] | raises [`Effects::interrupts`] |
//! | BAR1 load / store | [`Link::msix_read`] / [`Link::msix_write`] | re-syncs routes if [`Link::route_generation`] moved |
//! | config load / store | [`Link::config_read`] / [`Link::config_write`] | moves its BAR handlers ([`Link::bar0_mapping`], [`Link::bar1_mapping`]); re-syncs routes |
//! | cell starts / stops | [`Link::peer_attached`] / [`Link::peer_detached`] | raises [`Effects::interrupts`]; re-syncs routes |
//! | an [`AccessError`] | — | stops the cell with [`AccessError::fatal_report`] |
//!
//! Raising an [`Interrupt`] of [`Effects::interrupts`] (or of [`Link::deliver`]) means: for a
//! device-gated MSI-X target inject [`Link::msi_message`]`(target, vector)` directly
//! (`KVM_SIGNAL_MSI`); for a device-gated INTx target pulse its line; for an endpoint-gated
//! target ([`Route::Endpoint`], process cells) write its eventfd for that vector. The model
//! has already checked the gating and applied one-shot mode, so the VMM must not gate these
//! again — in particular it must not write them into a device-gated target's doorbell
//! eventfd when that eventfd feeds a user-space one-shot path that calls [`Link::deliver`]
//! (the second delivery would find `INT_CONTROL` cleared and drop the interrupt). Doorbell
//! eventfds carry **ungated** doorbells; interrupts from the model are **gated** ones.
//!
//! ## Doorbells without the model (the KVM fast path)
//!
//! [`Link::route`]`(peer, vector)` says how an interrupt for (peer, vector) would be delivered
//! **now** ([`Route`]): dropped ([`Route::Blocked`]), as an MSI with a given message
//! ([`Route::Msi`]), on the INTx line ([`Route::Intx`]), or by the peer's endpoint
//! ([`Route::Endpoint`], process cells). A backend that lets `DOORBELL` writes bypass the model
//! (ioeventfd with datamatch → the target's eventfd for that vector → irqfd on an MSI route)
//! keeps its routes equal to [`Link::routes`] and re-reads them whenever
//! [`Link::route_generation`] of a peer changes. The generation changes **exactly** when the
//! route set of that peer changed (INT_CONTROL, command register, MSI-X control, a table
//! entry, one-shot, attach/detach, or a one-shot delivery); compare it after each access and
//! each [`Effects`]. Routes with `one_shot: true` must not be wired in the kernel: every
//! delivery clears `INT_CONTROL` bit 0, so it must pass through [`Link::deliver`] (user space),
//! which returns the [`Interrupt`] to raise (or `None` when it is blocked) and applies one-shot.
//! A doorbell for a [`Route::Blocked`] pair has no effect: an irqfd must not stay assigned to
//! it, and its eventfd must be drained before the irqfd is assigned again (KVM injects at
//! once if the eventfd is already signalled when the irqfd is assigned).
//!
//! Behaviour follows `ivshmem-v2.md` and `kvm-cells.md`; where they leave a choice:
//! - Writes to the read-only `ID` and `MAX_PEERS` registers are ignored (as Jailhouse does).
//!   Illegal register accesses are only the misaligned or non-32-bit ones.
//! - Config space is 256 bytes. Accesses must be 1, 2 or 4 bytes wide and must not cross a
//!   dword boundary (that is what PCI byte enables can express); any such access of any
//!   register works, BARs included. Anything else is an [`AccessError`]. Writes to registers
//!   that are read-only or unimplemented are ignored (Jailhouse stops the cell on some of
//!   them; this model never does for in-range config writes).
//! - The command register keeps only memory, bus master and INTx disable
//!   ([`ivshmem_dev::pci::COMMAND_WRITABLE`]).
//! - The shared memory is announced through the vendor capability's base-address field
//!   (length 20h, no BAR2); its value is per peer ([`Link::set_shmem_base`]).
//! - Interrupts are per link [`InterruptMode::Intx`] (one vector, pin 1, honours INTx disable)
//!   or [`InterruptMode::Msix`] (1..=16 vectors, pin 0, vendor capability → MSI-X capability at
//!   60h, table and PBA in BAR1). Ringing a vector the device does not have has no effect.
//! - MSI-X has no pending bits: an interrupt raised while its entry or the function is masked,
//!   MSI-X is disabled or bus mastering is off is dropped, not remembered (the PBA reads 0);
//!   event state lives in shared memory (Jailhouse behaves the same). Table entries are masked
//!   after reset, as PCI requires.
//! - A doorbell to a peer that is attached but whose state is 0 is delivered: "active" means
//!   attached (the cell runs), not a non-zero state (Jailhouse does the same).
//! - A peer's state entry changes to 0 on attach (reset) and detach; the other peers are
//!   notified when the entry actually changed, like a `STATE` write.
//! - Register and BAR1 writes from a peer that is not attached are refused (it has no
//!   device); its reads are served. Config space is served either way (a VMM may set up
//!   config space before the cell runs; attaching resets it).

use std::fmt;

use ivshmem_dev::doorbell::Doorbell;
use ivshmem_dev::layout::SharedMemoryLayout;
use ivshmem_dev::msix::{
    MsixCapabilityLayout, BAR1_SIZE, BAR1_SIZE_MASK, CAP_ID_MSIX, MAX_VECTORS, MSIX_BAR,
    MSIX_CAP_OFFSET, MSIX_CONTROL, MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK,
    MSIX_CONTROL_WRITABLE, MSIX_ENTRY_ADDR_HI, MSIX_ENTRY_ADDR_LO, MSIX_ENTRY_DATA,
    MSIX_ENTRY_MASKED, MSIX_ENTRY_SIZE, MSIX_ENTRY_VECTOR_CONTROL, MSIX_PBA_OFFSET_IN_BAR,
    MSIX_TABLE_OFFSET_IN_BAR,
};
use ivshmem_dev::pci::{
    ConfigHeader, VendorCapabilityLayout, BAR0, BAR0_SIZE_MASK, BAR1, CAP_ID_VENDOR,
    CAP_LEN_WITH_BASE, CAP_PRIV_CONTROL, CLASS_CODE, COMMAND, COMMAND_BUS_MASTER,
    COMMAND_INTX_DISABLE, COMMAND_MEMORY, COMMAND_WRITABLE, CONFIG_SPACE_SIZE, DEVICE_ID,
    INTERRUPT_LINE, INTX_PIN, PRIV_CONTROL_ONESHOT, REVISION_ID, STATUS_CAP_LIST, VENDOR_ID,
};
use ivshmem_dev::protocol::Protocol;
use ivshmem_dev::regs::{
    DOORBELL, ID, INT_CONTROL, INT_CONTROL_ENABLE, MAX_PEERS, REGISTER_PAGE_SIZE, STATE,
};
use ivshmem_dev::zerocopy::IntoBytes;

/// Number of interrupt vectors per peer with INTx: one, vector 0.
pub const INTX_VECTORS: u16 = 1;

/// Most MSI-X vectors per peer (re-exported from [`ivshmem_dev::msix::MAX_VECTORS`]).
pub const MAX_MSIX_VECTORS: u16 = MAX_VECTORS;

/// Where the vendor capability sits in the emulated config space (right after the header).
pub const VENDOR_CAP_OFFSET: u8 = 0x40;

/// Where the MSI-X capability sits (MSI-X mode only): Jailhouse's x86 layout.
pub const MSIX_CAP: u8 = MSIX_CAP_OFFSET;

/// Offset of the interrupt pin (3Dh). The Jailhouse specification's table says 3Eh, a typo:
/// PCI and Jailhouse's code use 3Dh.
pub const INTERRUPT_PIN: u8 = ivshmem_dev::pci::INTERRUPT_PIN;
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
    /// How the device interrupts its peers (every peer of a link the same way).
    pub interrupts: InterruptMode,
}

/// How a link's device interrupts: the `interrupts` and `vectors` keys of a link's config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum InterruptMode {
    /// One vector (0) on INTx pin 1 (ARM-Jailhouse style; what process cells used first).
    #[default]
    Intx,
    /// MSI-X with `vectors` vectors (`1..=16`), Jailhouse's x86 layout.
    Msix {
        /// Number of vectors, `1..=`[`MAX_MSIX_VECTORS`].
        vectors: u16,
    },
}

impl InterruptMode {
    /// Number of vectors per peer.
    pub const fn vectors(self) -> u16 {
        match self {
            InterruptMode::Intx => INTX_VECTORS,
            InterruptMode::Msix { vectors } => vectors,
        }
    }

    /// Whether this is MSI-X.
    pub const fn is_msix(self) -> bool {
        matches!(self, InterruptMode::Msix { .. })
    }
}

/// `intx`, or `msix (16 vectors)`: the config file's words.
impl fmt::Display for InterruptMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InterruptMode::Intx => f.write_str("intx"),
            InterruptMode::Msix { vectors: 1 } => f.write_str("msix (1 vector)"),
            InterruptMode::Msix { vectors } => write!(f, "msix ({vectors} vectors)"),
        }
    }
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
    /// An MSI-X vector count outside `1..=16`.
    #[error("link `{link}`: {vectors} MSI-X vectors; the device offers 1 to {MAX_MSIX_VECTORS}")]
    BadVectorCount {
        /// Link name.
        link: String,
        /// The count asked for.
        vectors: u16,
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

/// An MSI message: what the device writes when it raises an MSI-X vector (the table entry's
/// address and data). On x86 the address is `0xFEE0_0000 | apic_id << 12` and the data the
/// IDT vector; a KVM backend puts both into a `kvm_irq_routing_msi` or a `KVM_SIGNAL_MSI`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Message address (upper half from the entry's upper-address dword).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MsixEntry {
    /// Address and data.
    pub message: MsiMessage,
    /// The entry's mask bit (vector control bit 0); set after reset.
    pub masked: bool,
}

impl Default for MsixEntry {
    fn default() -> Self {
        Self {
            message: MsiMessage::default(),
            masked: true,
        }
    }
}

/// How an interrupt for one (peer, vector) is delivered right now; see [`Link::route`] and the
/// module docs ("Doorbells without the model").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    /// Not deliverable: the peer is detached, the vector does not exist, or the gating is
    /// closed (`INT_CONTROL` bit 0, MSI-X enable / function mask / entry mask / bus master,
    /// or INTx disable). A doorbell has no effect.
    Blocked,
    /// An MSI with this message.
    Msi {
        /// Address and data to signal.
        message: MsiMessage,
        /// One-shot mode: delivering clears `INT_CONTROL` bit 0, so each delivery must go
        /// through [`Link::deliver`] (no in-kernel fast path).
        one_shot: bool,
    },
    /// The INTx line (vector 0 only).
    Intx {
        /// One-shot mode, as for [`Route::Msi`].
        one_shot: bool,
    },
    /// The peer's endpoint gates its own interrupts ([`InterruptGate::Endpoint`], process
    /// cells): signal its eventfd for this vector.
    Endpoint,
}

impl Route {
    /// Whether an interrupt would be delivered.
    pub fn is_deliverable(self) -> bool {
        self != Route::Blocked
    }

    /// Whether the route may be wired in the kernel (irqfd / eventfd) with no user-space
    /// step: deliverable and not one-shot.
    pub fn is_direct(self) -> bool {
        match self {
            Route::Blocked => false,
            Route::Msi { one_shot, .. } | Route::Intx { one_shot } => !one_shot,
            Route::Endpoint => true,
        }
    }
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
    /// BAR1: the MSI-X table and PBA.
    Msix,
}

impl fmt::Display for AccessSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccessSpace::Registers => "register",
            AccessSpace::Config => "config space",
            AccessSpace::Msix => "MSI-X (BAR1)",
        })
    }
}

/// Why an access was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccessReason {
    /// Register accesses must be 4 bytes; BAR1 accesses 4 or 8 bytes; config accesses 1, 2
    /// or 4 bytes.
    WrongSize,
    /// The offset is not a multiple of the access size (registers, BAR1), or a config access
    /// crosses a dword boundary.
    Misaligned,
    /// The offset is beyond the 4 KiB register page or BAR1 page.
    OutsideRegisterPage,
    /// BAR1 was accessed on a link without MSI-X (it has no BAR1).
    NoMsix,
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
            AccessReason::OutsideRegisterPage => "outside the 4 KiB page",
            AccessReason::NoMsix => "the device has no MSI-X (BAR1) on this link",
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
    cache_line_size: u8,
    latency_timer: u8,
    interrupt_line: u8,
    bar0: u32,
    bar1: u32,
    msix_control: u16,
    msix_table: [MsixEntry; MAX_VECTORS as usize],
    shmem_base: u64,
    route_generation: u64,
}

impl PeerDevice {
    /// Guest-visible reset: everything the guest can change goes back to its reset value.
    fn reset(&mut self) {
        self.int_control = 0;
        self.one_shot = false;
        self.command = 0;
        self.cache_line_size = 0;
        self.latency_timer = 0;
        self.interrupt_line = 0;
        self.bar0 = 0;
        self.bar1 = 0;
        self.msix_control = 0;
        self.msix_table = [MsixEntry::default(); MAX_VECTORS as usize];
    }
}

/// The emulated ivshmem v2 device of one link: state table, and per peer the register file,
/// the MSI-X table and config space.
pub struct Link {
    name: String,
    protocol: Protocol,
    layout: SharedMemoryLayout,
    interrupts: InterruptMode,
    state_table: Box<dyn StateTable>,
    peers: Vec<PeerDevice>,
    route_generation: u64,
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("name", &self.name)
            .field("protocol", &self.protocol)
            .field("layout", &self.layout)
            .field("interrupts", &self.interrupts)
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
        if let InterruptMode::Msix { vectors } = params.interrupts {
            if !(1..=MAX_MSIX_VECTORS).contains(&vectors) {
                return Err(LinkError::BadVectorCount {
                    link: params.name,
                    vectors,
                });
            }
        }
        Ok(Self {
            name: params.name,
            protocol: params.protocol,
            layout: params.layout,
            interrupts: params.interrupts,
            state_table,
            peers: vec![PeerDevice::default(); usize::from(params.max_peers)],
            route_generation: 0,
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

    /// How the device interrupts (the same for every peer).
    pub fn interrupt_mode(&self) -> InterruptMode {
        self.interrupts
    }

    /// Number of vectors per peer (1 with INTx).
    pub fn vectors(&self) -> u16 {
        self.interrupts.vectors()
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

    /// `peer`'s BAR1 register value (address bits only; always 0 without MSI-X).
    pub fn bar1(&self, peer: u16) -> Option<u32> {
        self.peer(peer).map(|p| p.bar1)
    }

    /// Where `peer`'s guest decodes the register page: BAR0's address while memory decoding
    /// is on and BAR0 is non-zero, else `None`. A backend re-reads this after every config
    /// write to move its MMIO handler.
    pub fn bar0_mapping(&self, peer: u16) -> Option<u64> {
        let p = self.peer(peer)?;
        (p.command & COMMAND_MEMORY != 0 && p.bar0 != 0).then_some(u64::from(p.bar0))
    }

    /// Where `peer`'s guest decodes BAR1 (MSI-X table and PBA, [`BAR1_SIZE`] bytes): BAR1's
    /// address while memory decoding is on, BAR1 is non-zero and the link uses MSI-X, else
    /// `None`. Re-read after every config write, like [`bar0_mapping`](Self::bar0_mapping).
    pub fn bar1_mapping(&self, peer: u16) -> Option<u64> {
        let p = self.peer(peer)?;
        (self.interrupts.is_msix() && p.command & COMMAND_MEMORY != 0 && p.bar1 != 0)
            .then_some(u64::from(p.bar1))
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
        self.tracking_routes(peer, |link| {
            if let Some(p) = link.peer_mut(peer) {
                p.gate = gate;
            }
        })
    }

    /// Who applies `INT_CONTROL` for `peer`.
    pub fn interrupt_gate(&self, peer: u16) -> Option<InterruptGate> {
        self.peer(peer).map(|p| p.gate)
    }

    /// `peer`'s MSI-X message control (enable bit 15, function mask bit 14; the read-only
    /// table size is not included). 0 without MSI-X.
    pub fn msix_control(&self, peer: u16) -> Option<u16> {
        self.peer(peer).map(|p| p.msix_control)
    }

    /// `peer`'s MSI-X table entry for `vector`, or `None` without MSI-X, for a vector the
    /// device does not have, or a peer not on the link.
    pub fn msix_entry(&self, peer: u16, vector: u16) -> Option<MsixEntry> {
        let p = self.peer(peer)?;
        (self.interrupts.is_msix() && vector < self.vectors())
            .then(|| p.msix_table[usize::from(vector)])
    }

    /// The MSI message of (`peer`, `vector`), whatever the gating: what to inject for an
    /// [`Interrupt`] of [`Effects::interrupts`] or of [`deliver`](Self::deliver). `None`
    /// without MSI-X or for a vector the device does not have.
    pub fn msi_message(&self, peer: u16, vector: u16) -> Option<MsiMessage> {
        self.msix_entry(peer, vector).map(|entry| entry.message)
    }

    /// How an interrupt for (`target`, `vector`) would be delivered now (see [`Route`]):
    /// - [`Route::Blocked`] unless the target is on the link, attached, and `vector` is one of
    ///   its vectors;
    /// - [`Route::Endpoint`] for a target gated by its endpoint;
    /// - with INTx: [`Route::Intx`] while `INT_CONTROL` bit 0 is set and the command
    ///   register's INTx disable is clear;
    /// - with MSI-X: [`Route::Msi`] while `INT_CONTROL` bit 0 is set, MSI-X is enabled and
    ///   not function-masked, the entry is unmasked and bus mastering is on.
    pub fn route(&self, target: u16, vector: u16) -> Route {
        let Some(p) = self.peer(target) else {
            return Route::Blocked;
        };
        if !p.active || vector >= self.vectors() {
            return Route::Blocked;
        }
        if p.gate == InterruptGate::Endpoint {
            return Route::Endpoint;
        }
        if p.int_control & INT_CONTROL_ENABLE == 0 {
            return Route::Blocked;
        }
        let one_shot = p.one_shot;
        match self.interrupts {
            InterruptMode::Intx => {
                if p.command & COMMAND_INTX_DISABLE != 0 {
                    Route::Blocked
                } else {
                    Route::Intx { one_shot }
                }
            }
            InterruptMode::Msix { .. } => {
                let entry = p.msix_table[usize::from(vector)];
                let open = p.msix_control & MSIX_CONTROL_ENABLE != 0
                    && p.msix_control & MSIX_CONTROL_FUNCTION_MASK == 0
                    && !entry.masked
                    && p.command & COMMAND_BUS_MASTER != 0;
                if open {
                    Route::Msi {
                        message: entry.message,
                        one_shot,
                    }
                } else {
                    Route::Blocked
                }
            }
        }
    }

    /// The routes of every vector of `peer`, indexed by vector (empty for a peer not on the
    /// link).
    pub fn routes(&self, peer: u16) -> Vec<Route> {
        if self.peer(peer).is_none() {
            return Vec::new();
        }
        (0..self.vectors())
            .map(|vector| self.route(peer, vector))
            .collect()
    }

    /// A counter that changes exactly when [`routes`](Self::routes)`(peer)` changes (0 for a
    /// peer not on the link). A backend that wires routes in the kernel compares it after
    /// every call into the model and re-syncs that peer's routes when it moved.
    pub fn route_generation(&self, peer: u16) -> u64 {
        self.peer(peer).map_or(0, |p| p.route_generation)
    }

    /// A counter that changes whenever any peer's [`route_generation`](Self::route_generation)
    /// changes: one cheap check for "did any route of this link change".
    pub fn link_route_generation(&self) -> u64 {
        self.route_generation
    }

    /// Runs `f` and bumps `peer`'s route generation if its routes changed.
    fn tracking_routes<T>(&mut self, peer: u16, f: impl FnOnce(&mut Self) -> T) -> T {
        let before = self.routes(peer);
        let result = f(self);
        if self.routes(peer) != before {
            self.route_generation += 1;
            if let Some(p) = self.peer_mut(peer) {
                p.route_generation += 1;
            }
        }
        result
    }

    /// Whether an interrupt on `vector` would reach `target` now (its [`route`](Self::route)
    /// is not [`Route::Blocked`]).
    pub fn deliverable(&self, target: u16, vector: u16) -> bool {
        self.route(target, vector).is_deliverable()
    }

    /// Delivers `vector` to `target` if [`deliverable`](Self::deliverable), applying one-shot
    /// mode (clears `INT_CONTROL` bit 0, which changes the target's route generation). For
    /// backends that route a doorbell themselves; the caller then raises the returned
    /// interrupt (for MSI-X: injects [`msi_message`](Self::msi_message)).
    pub fn deliver(&mut self, target: u16, vector: u16) -> Option<Interrupt> {
        if !self.deliverable(target, vector) {
            return None;
        }
        let p = &self.peers[usize::from(target)];
        if p.gate == InterruptGate::Device && p.one_shot {
            self.tracking_routes(target, |link| {
                link.peers[usize::from(target)].int_control &= !INT_CONTROL_ENABLE;
            });
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

    #[allow(clippy::too_many_arguments)]
    fn access_error(
        &self,
        peer: u16,
        space: AccessSpace,
        offset: u64,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
        reason: AccessReason,
    ) -> AccessError {
        AccessError {
            link: self.name.clone(),
            peer,
            space,
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
            Some(reason) => Err(self.access_error(
                peer,
                AccessSpace::Registers,
                offset,
                kind,
                size,
                value,
                reason,
            )),
            None => Ok(offset as u32),
        }
    }

    /// Why a register access of `kind` and `size` at `offset` by `peer` would be refused, or
    /// `None` if the device allows it. No side effects: for backends that emulate the
    /// register page elsewhere (process cells) and must tell a legal access from an illegal
    /// one the cell reports.
    pub fn register_access_error(
        &self,
        peer: u16,
        offset: u64,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Option<AccessError> {
        self.check_register_access(peer, offset, kind, size, value)
            .err()
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
    /// - `DOORBELL`: interrupts the target if its [`route`](Self::route) is open; otherwise
    ///   nothing. Ringing oneself is allowed.
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
            INT_CONTROL => self.tracking_routes(peer, |link| {
                link.peers[usize::from(peer)].int_control = value & INT_CONTROL_ENABLE;
                Effects::none()
            }),
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

    fn check_msix_access(
        &self,
        peer: u16,
        offset: u64,
        kind: AccessKind,
        size: u8,
        value: Option<u64>,
    ) -> Result<u32, AccessError> {
        let reason = if self.peer(peer).is_none() {
            Some(AccessReason::UnknownPeer)
        } else if !self.interrupts.is_msix() {
            Some(AccessReason::NoMsix)
        } else if offset >= u64::from(BAR1_SIZE) {
            Some(AccessReason::OutsideRegisterPage)
        } else if !matches!(size, 4 | 8) {
            Some(AccessReason::WrongSize)
        } else if offset % u64::from(size) != 0 {
            Some(AccessReason::Misaligned)
        } else if kind == AccessKind::Write && !self.is_active(peer) {
            Some(AccessReason::PeerNotAttached)
        } else {
            None
        };
        match reason {
            Some(reason) => {
                Err(self.access_error(peer, AccessSpace::Msix, offset, kind, size, value, reason))
            }
            None => Ok(offset as u32),
        }
    }

    /// The dword at `offset` (4-aligned) of `peer`'s BAR1.
    fn msix_dword(&self, peer: u16, offset: u32) -> u32 {
        let p = &self.peers[usize::from(peer)];
        let table_end = MSIX_TABLE_OFFSET_IN_BAR + u32::from(self.vectors()) * MSIX_ENTRY_SIZE;
        if !(MSIX_TABLE_OFFSET_IN_BAR..table_end).contains(&offset) {
            // The PBA (always 0: no pending bits) and everything else in the page.
            return 0;
        }
        let relative = offset - MSIX_TABLE_OFFSET_IN_BAR;
        let entry = &p.msix_table[(relative / MSIX_ENTRY_SIZE) as usize];
        match relative % MSIX_ENTRY_SIZE {
            MSIX_ENTRY_ADDR_LO => entry.message.address as u32,
            MSIX_ENTRY_ADDR_HI => (entry.message.address >> 32) as u32,
            MSIX_ENTRY_DATA => entry.message.data,
            MSIX_ENTRY_VECTOR_CONTROL => u32::from(entry.masked),
            // Unreachable: `offset` is 4-aligned.
            _ => 0,
        }
    }

    fn write_msix_dword(&mut self, peer: u16, offset: u32, value: u32) {
        let table_end = MSIX_TABLE_OFFSET_IN_BAR + u32::from(self.vectors()) * MSIX_ENTRY_SIZE;
        if !(MSIX_TABLE_OFFSET_IN_BAR..table_end).contains(&offset) {
            return;
        }
        let relative = offset - MSIX_TABLE_OFFSET_IN_BAR;
        let entry =
            &mut self.peers[usize::from(peer)].msix_table[(relative / MSIX_ENTRY_SIZE) as usize];
        let address = &mut entry.message.address;
        match relative % MSIX_ENTRY_SIZE {
            MSIX_ENTRY_ADDR_LO => *address = *address & !0xFFFF_FFFF | u64::from(value),
            MSIX_ENTRY_ADDR_HI => *address = *address & 0xFFFF_FFFF | u64::from(value) << 32,
            MSIX_ENTRY_DATA => entry.message.data = value,
            // Only the mask bit of vector control is implemented; the rest reads 0.
            MSIX_ENTRY_VECTOR_CONTROL => entry.masked = value & MSIX_ENTRY_MASKED != 0,
            // Unreachable: `offset` is 4-aligned.
            _ => {}
        }
    }

    /// A load of `size` (4 or 8, naturally aligned) bytes at `offset` in `peer`'s BAR1 (MSI-X
    /// mode only). The table (entries `0..vectors` at [`MSIX_TABLE_OFFSET_IN_BAR`], 16 bytes
    /// each: address low, address high, data, vector control) reads back what was written
    /// (vector control: the mask bit only); the PBA at [`MSIX_PBA_OFFSET_IN_BAR`] and the rest
    /// of the page read 0.
    pub fn msix_read(&self, peer: u16, offset: u64, size: u8) -> Result<u64, AccessError> {
        let offset = self.check_msix_access(peer, offset, AccessKind::Read, size, None)?;
        let low = u64::from(self.msix_dword(peer, offset));
        Ok(if size == 8 {
            low | u64::from(self.msix_dword(peer, offset + 4)) << 32
        } else {
            low
        })
    }

    /// A store of `size` (4 or 8, naturally aligned) bytes at `offset` in `peer`'s BAR1
    /// (MSI-X mode only, attached peers only). Table entries take address, data and the mask
    /// bit; the PBA and the rest of the page ignore writes. Raises nothing (there are no
    /// pending bits to flush on unmask) but may change [`route`](Self::route)s: check
    /// [`route_generation`](Self::route_generation).
    pub fn msix_write(
        &mut self,
        peer: u16,
        offset: u64,
        size: u8,
        value: u64,
    ) -> Result<(), AccessError> {
        let offset = self.check_msix_access(peer, offset, AccessKind::Write, size, Some(value))?;
        self.tracking_routes(peer, |link| {
            link.write_msix_dword(peer, offset, value as u32);
            if size == 8 {
                link.write_msix_dword(peer, offset + 4, (value >> 32) as u32);
            }
        });
        Ok(())
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
        let reason = if self.peer(peer).is_none() {
            Some(AccessReason::UnknownPeer)
        } else if !matches!(size, 1 | 2 | 4) {
            Some(AccessReason::WrongSize)
        } else if usize::from(offset % 4) + usize::from(size) > 4 {
            Some(AccessReason::Misaligned)
        } else if end > CONFIG_SPACE_SIZE {
            Some(AccessReason::OutsideConfigSpace)
        } else {
            None
        };
        match reason {
            Some(reason) => Err(self.access_error(
                peer,
                AccessSpace::Config,
                u64::from(offset),
                kind,
                size,
                value,
                reason,
            )),
            None => Ok(()),
        }
    }

    /// The 256-byte config space `peer`'s guest sees right now, or `None` if `peer` is not on
    /// the link.
    pub fn config_space(&self, peer: u16) -> Option<[u8; CONFIG_SPACE_SIZE]> {
        let p = self.peer(peer)?;
        let msix = self.interrupts.is_msix();
        let (prog_if, subclass) = self.protocol.to_config_bytes();
        let mut bars = [0u32.into(); 6];
        bars[0] = p.bar0.into();
        bars[usize::from(MSIX_BAR)] = p.bar1.into();
        let header = ConfigHeader {
            vendor_id: VENDOR_ID.into(),
            device_id: DEVICE_ID.into(),
            command: p.command.into(),
            status: STATUS_CAP_LIST.into(),
            revision: REVISION_ID,
            prog_if,
            subclass,
            class: CLASS_CODE,
            cache_line_size: p.cache_line_size,
            latency_timer: p.latency_timer,
            bars,
            subsystem_vendor_id: VENDOR_ID.into(),
            subsystem_id: DEVICE_ID.into(),
            cap_pointer: VENDOR_CAP_OFFSET,
            interrupt_line: p.interrupt_line,
            interrupt_pin: if msix { 0 } else { INTX_PIN },
            ..ConfigHeader::default()
        };
        let params = self.layout.params();
        let capability = VendorCapabilityLayout {
            id: CAP_ID_VENDOR,
            next: if msix { MSIX_CAP } else { 0 },
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
        if msix {
            let msix_cap = MsixCapabilityLayout {
                id: CAP_ID_MSIX,
                next: 0,
                control: (p.msix_control | (self.vectors() - 1)).into(),
                table: (MSIX_TABLE_OFFSET_IN_BAR | u32::from(MSIX_BAR)).into(),
                pba: (MSIX_PBA_OFFSET_IN_BAR | u32::from(MSIX_BAR)).into(),
            };
            let at = usize::from(MSIX_CAP);
            image[at..at + msix_cap.as_bytes().len()].copy_from_slice(msix_cap.as_bytes());
        }
        Some(image)
    }

    /// A config-space load of `size` (1, 2 or 4) bytes at `offset`, not crossing a dword
    /// boundary (any register, BARs included, may be read piecewise). Unimplemented registers
    /// read 0.
    pub fn config_read(&self, peer: u16, offset: u16, size: u8) -> Result<u32, AccessError> {
        self.check_config_access(peer, offset, AccessKind::Read, size, None)?;
        let image = self.config_space(peer).unwrap_or([0; CONFIG_SPACE_SIZE]);
        let start = usize::from(offset);
        let mut bytes = [0u8; 4];
        bytes[..usize::from(size)].copy_from_slice(&image[start..start + usize::from(size)]);
        Ok(u32::from_le_bytes(bytes))
    }

    /// A config-space store of `size` (1, 2 or 4) bytes at `offset`, not crossing a dword
    /// boundary. Each byte lands where it belongs (PCI byte enables),
    /// so a BAR or the command register may be written piecewise. Writable:
    /// - the command register's memory, bus-master and INTx-disable bits;
    /// - cache line size and latency timer (no effect), the interrupt line;
    /// - BAR0's address bits, and BAR1's with MSI-X (writing all ones then reading returns
    ///   the 4 KiB size mask; without MSI-X BAR1 reads 0: not implemented);
    /// - the one-shot bit of the vendor capability's privileged control byte;
    /// - with MSI-X, the capability's ENABLE and FUNCTION MASK control bits.
    ///
    /// Every other bit is ignored. Changes of the gating bits change
    /// [`route_generation`](Self::route_generation).
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
        let msix = self.interrupts.is_msix();
        self.tracking_routes(peer, |link| {
            let p = &mut link.peers[usize::from(peer)];
            for (i, byte) in value.to_le_bytes()[..usize::from(size)].iter().enumerate() {
                write_config_byte(p, msix, offset + i as u16, *byte);
            }
        });
        Ok(())
    }

    /// `peer`'s cell started (or restarted): if no peer is attached yet, the whole state
    /// table is cleared (stale states from a previous run must not fool anyone); the peer's
    /// registers, MSI-X table and config space are reset; its state entry becomes 0 (the
    /// others are notified if it was not 0, i.e. on a reset of an attached peer); it becomes
    /// active. A peer not on the link is ignored (with a warning).
    pub fn peer_attached(&mut self, peer: u16) -> Effects {
        if self.peer(peer).is_none() {
            tracing::warn!(link = %self.name, peer, "attach of a peer that is not on the link");
            return Effects::none();
        }
        if self.active_peers().next().is_none() {
            tracing::debug!(link = %self.name, "first peer attaches: clearing the state table");
            self.state_table.clear();
        }
        self.tracking_routes(peer, |link| {
            let p = &mut link.peers[usize::from(peer)];
            p.reset();
            p.active = true;
        });
        self.change_state(peer, 0)
    }

    /// `peer`'s cell stopped, exited or died: it becomes inactive (never again a doorbell
    /// target until it attaches), its registers reset, and its state entry becomes 0; the
    /// other peers are notified if the entry was not 0 already.
    pub fn peer_detached(&mut self, peer: u16) -> Effects {
        if self.peer(peer).is_none() {
            tracing::warn!(link = %self.name, peer, "detach of a peer that is not on the link");
            return Effects::none();
        }
        self.tracking_routes(peer, |link| {
            let p = &mut link.peers[usize::from(peer)];
            p.reset();
            p.active = false;
        });
        self.change_state(peer, 0)
    }
}

/// Replaces byte `shift / 8` of `register` with `byte`.
fn merge_byte32(register: u32, shift: u16, byte: u8) -> u32 {
    register & !(0xFF << shift) | u32::from(byte) << shift
}

/// One byte of a config-space write (see [`Link::config_write`] for what is writable).
fn write_config_byte(p: &mut PeerDevice, msix: bool, at: u16, byte: u8) {
    let command = u16::from(COMMAND);
    let bar0 = u16::from(BAR0);
    let bar1 = u16::from(BAR1);
    let priv_control = u16::from(VENDOR_CAP_OFFSET) + u16::from(CAP_PRIV_CONTROL);
    // The writable control bits (14, 15) are in the control word's high byte.
    let msix_control_high = u16::from(MSIX_CAP) + u16::from(MSIX_CONTROL) + 1;
    match at {
        _ if at == command || at == command + 1 => {
            let shift = (at - command) * 8;
            let merged = p.command & !(0xFF << shift) | u16::from(byte) << shift;
            p.command = merged & COMMAND_WRITABLE;
        }
        0x0C => p.cache_line_size = byte,
        0x0D => p.latency_timer = byte,
        _ if (bar0..bar0 + 4).contains(&at) => {
            p.bar0 = merge_byte32(p.bar0, (at - bar0) * 8, byte) & BAR0_SIZE_MASK;
        }
        _ if msix && (bar1..bar1 + 4).contains(&at) => {
            p.bar1 = merge_byte32(p.bar1, (at - bar1) * 8, byte) & BAR1_SIZE_MASK;
        }
        _ if at == u16::from(INTERRUPT_LINE) => p.interrupt_line = byte,
        _ if at == priv_control => p.one_shot = byte & PRIV_CONTROL_ONESHOT != 0,
        _ if msix && at == msix_control_high => {
            p.msix_control = u16::from(byte) << 8 & MSIX_CONTROL_WRITABLE;
        }
        _ => {}
    }
}
