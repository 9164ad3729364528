//! The communication region of an x86 cell (`kvm-cells.md`; Jailhouse's `struct
//! jailhouse_comm_region`, revision 2, x86 part), written once for both sides: the VMM that
//! fills it ([`initial`]) and the inmate runtime that reads it.
//!
//! One page at guest-physical [`COMM_REGION_ADDRESS`], packed, little-endian. The VMM writes
//! it before the cell starts; the cell writes `cell_state` and `reply_from_cell`.
//!
//! # The clock extension (this project's, not Jailhouse's)
//!
//! Jailhouse's region ends at offset 76. At [`offset::CLOCK`] (0x100, well past it, so a
//! Jailhouse inmate never sees it) this project's VMM puts a **clock epoch**: the guest's
//! TSC and the host's `CLOCK_MONOTONIC` read back to back when the vCPU was created, tagged
//! with [`CLOCK_MAGIC`]. With the TSC rate of [`offset::TSC_KHZ`] an inmate turns any TSC
//! reading into host `CLOCK_MONOTONIC` nanoseconds ([`ClockEpoch::monotonic_ns`]), so its
//! timestamps compare directly with a Linux cell's. Without the magic (real Jailhouse, which
//! leaves the page zeroed there) the epoch is absent and an inmate can only time relative
//! intervals.

/// Guest-physical address of the region.
pub const COMM_REGION_ADDRESS: u64 = 0x10_0000;
/// Size of the region (one page).
pub const COMM_REGION_SIZE: u64 = 0x1000;
/// Where the command line lies (Jailhouse: `cell load -s "..." -a 0x1000`).
pub const CMDLINE_ADDRESS: u64 = 0x1000;
/// The longest command line, without its NUL (the image's `.cmdline` area is 256 bytes).
pub const CMDLINE_MAX: usize = 255;
/// The region's signature.
pub const SIGNATURE: [u8; 6] = *b"JHCOMM";
/// The revision this project writes and reads (Jailhouse's current one).
pub const REVISION: u16 = 2;
/// Jailhouse's console type for an 8250 on port I/O.
pub const CONSOLE_TYPE_8250: u16 = 2;
/// The 8250 console's base port.
pub const UART_BASE: u16 = 0x3F8;
/// Number of 8250 ports.
pub const UART_PORTS: u16 = 8;
/// The ACPI PM timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// Tag of a valid clock epoch at [`offset::CLOCK_MAGIC`] ("IVCLOCK1" little-endian).
pub const CLOCK_MAGIC: u64 = u64::from_le_bytes(*b"IVCLOCK1");

/// Field offsets (bytes from the region's start).
pub mod offset {
    /// `"JHCOMM"`, 6 bytes.
    pub const SIGNATURE: usize = 0;
    /// u16 revision.
    pub const REVISION: usize = 6;
    /// u32, written by the cell ([`super::CellState`]).
    pub const CELL_STATE: usize = 8;
    /// u32, from the hypervisor to the cell.
    pub const MSG_TO_CELL: usize = 12;
    /// u32, written by the cell.
    pub const REPLY_FROM_CELL: usize = 16;
    /// u32 flags (putc permitted/active).
    pub const FLAGS: usize = 20;
    /// u64 console address.
    pub const CONSOLE_ADDRESS: usize = 24;
    /// u32 console size.
    pub const CONSOLE_SIZE: usize = 32;
    /// u16 console type.
    pub const CONSOLE_TYPE: usize = 36;
    /// u16 console flags.
    pub const CONSOLE_FLAGS: usize = 38;
    /// u32 console divider.
    pub const CONSOLE_DIVIDER: usize = 40;
    /// u32 console gate.
    pub const CONSOLE_GATE: usize = 44;
    /// u64 console clock register.
    pub const CONSOLE_CLOCK_REG: usize = 48;
    /// u64 PCI MMCONFIG base.
    pub const PCI_MMCONFIG_BASE: usize = 56;
    /// u16 PM timer port.
    pub const PM_TIMER_ADDRESS: usize = 64;
    /// u16 number of CPUs.
    pub const NUM_CPUS: usize = 66;
    /// u32 TSC kHz.
    pub const TSC_KHZ: usize = 68;
    /// u32 APIC timer kHz.
    pub const APIC_KHZ: usize = 72;
    /// Bytes of Jailhouse's region the VMM initialises.
    pub const LEN: usize = 76;
    /// Start of the clock extension (see the module docs).
    pub const CLOCK: usize = 0x100;
    /// u64 [`super::CLOCK_MAGIC`] when the epoch below is valid.
    pub const CLOCK_MAGIC: usize = CLOCK;
    /// u64 the guest's TSC at the epoch.
    pub const CLOCK_TSC: usize = CLOCK + 8;
    /// u64 the host's `CLOCK_MONOTONIC` in ns at the epoch.
    pub const CLOCK_MONOTONIC_NS: usize = CLOCK + 16;
    /// End of the clock extension.
    pub const CLOCK_END: usize = CLOCK + 24;
}

/// Values of `cell_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum CellState {
    /// Running (the VMM's initial value).
    Running = 0,
    /// Running and refusing to be shut down.
    RunningLocked = 1,
    /// The cell shut itself down.
    ShutDown = 2,
    /// The cell failed (panic, unexpected exception).
    Failed = 3,
    /// The cell found a region with the wrong signature or revision.
    FailedCommRev = 4,
}

impl CellState {
    /// The state a raw value names, if any.
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            0 => Self::Running,
            1 => Self::RunningLocked,
            2 => Self::ShutDown,
            3 => Self::Failed,
            4 => Self::FailedCommRev,
            _ => return None,
        })
    }

    /// Whether the cell has stopped (shut down or failed).
    pub fn is_stopped(self) -> bool {
        matches!(self, Self::ShutDown | Self::Failed | Self::FailedCommRev)
    }
}

/// What a raw `cell_state` value means, for reports.
pub fn describe_cell_state(raw: u32) -> &'static str {
    match CellState::from_raw(raw) {
        Some(CellState::Running) => "running",
        Some(CellState::RunningLocked) => "running (locked)",
        Some(CellState::ShutDown) => "shut down",
        Some(CellState::Failed) => "failed",
        Some(CellState::FailedCommRev) => "failed: wrong communication region revision",
        None => "unknown cell_state",
    }
}

/// A guest-TSC ↔ host-`CLOCK_MONOTONIC` pair and the TSC rate (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockEpoch {
    /// The guest's TSC at the epoch.
    pub tsc: u64,
    /// The host's `CLOCK_MONOTONIC` (ns) at the epoch.
    pub monotonic_ns: u64,
    /// TSC ticks per millisecond (non-zero).
    pub tsc_khz: u32,
}

impl ClockEpoch {
    /// Host `CLOCK_MONOTONIC` ns of guest TSC reading `tsc` (readings before the epoch map to
    /// the epoch).
    pub fn monotonic_ns(&self, tsc: u64) -> u64 {
        let ticks = tsc.saturating_sub(self.tsc);
        // ns = ticks * 1e6 / kHz, in u128 so hours of ticks at GHz rates cannot overflow.
        let ns = u128::from(ticks) * 1_000_000 / u128::from(self.tsc_khz);
        self.monotonic_ns.saturating_add(ns as u64)
    }

    /// The epoch in a region image `region` (at least [`offset::CLOCK_END`] bytes), if it is
    /// tagged and the TSC rate is known.
    pub fn parse(region: &[u8]) -> Option<Self> {
        let u64_at = |at: usize| {
            region
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        };
        let khz = region.get(offset::TSC_KHZ..offset::TSC_KHZ + 4)?;
        let tsc_khz = u32::from_le_bytes(khz.try_into().ok()?);
        (u64_at(offset::CLOCK_MAGIC)? == CLOCK_MAGIC && tsc_khz != 0).then_some(Self {
            tsc: u64_at(offset::CLOCK_TSC)?,
            monotonic_ns: u64_at(offset::CLOCK_MONOTONIC_NS)?,
            tsc_khz,
        })
    }
}

/// The region's initial bytes, up to [`offset::CLOCK_END`], for a cell with `cpus` vCPUs, the
/// PM timer at `pm_timer_port`, a TSC of `tsc_khz` (0 if unknown) and, if known, a clock
/// epoch (`(guest TSC, host CLOCK_MONOTONIC ns)`, written only with a known TSC rate).
pub fn initial(
    pm_timer_port: u16,
    cpus: u16,
    tsc_khz: u32,
    epoch: Option<(u64, u64)>,
) -> [u8; offset::CLOCK_END] {
    fn put(r: &mut [u8], at: usize, bytes: &[u8]) {
        r[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let mut r = [0u8; offset::CLOCK_END];
    put(&mut r, offset::SIGNATURE, &SIGNATURE);
    put(&mut r, offset::REVISION, &REVISION.to_le_bytes());
    put(
        &mut r,
        offset::CONSOLE_ADDRESS,
        &u64::from(UART_BASE).to_le_bytes(),
    );
    put(
        &mut r,
        offset::CONSOLE_SIZE,
        &u32::from(UART_PORTS).to_le_bytes(),
    );
    put(
        &mut r,
        offset::CONSOLE_TYPE,
        &CONSOLE_TYPE_8250.to_le_bytes(),
    );
    put(
        &mut r,
        offset::PM_TIMER_ADDRESS,
        &pm_timer_port.to_le_bytes(),
    );
    put(&mut r, offset::NUM_CPUS, &cpus.to_le_bytes());
    put(&mut r, offset::TSC_KHZ, &tsc_khz.to_le_bytes());
    if let (Some((tsc, ns)), true) = (epoch, tsc_khz != 0) {
        put(&mut r, offset::CLOCK_MAGIC, &CLOCK_MAGIC.to_le_bytes());
        put(&mut r, offset::CLOCK_TSC, &tsc.to_le_bytes());
        put(&mut r, offset::CLOCK_MONOTONIC_NS, &ns.to_le_bytes());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_where_jailhouse_puts_them() {
        let r = initial(0x608, 1, 2_000_000, None);
        assert_eq!(&r[0..6], b"JHCOMM");
        assert_eq!(u16::from_le_bytes([r[6], r[7]]), 2);
        assert_eq!(
            &r[8..24],
            &[0u8; 16],
            "cell_state, messages and flags start at 0"
        );
        assert_eq!(u64::from_le_bytes(r[24..32].try_into().unwrap()), 0x3F8);
        assert_eq!(u32::from_le_bytes(r[32..36].try_into().unwrap()), 8);
        assert_eq!(u16::from_le_bytes([r[36], r[37]]), 2);
        assert_eq!(&r[38..64], &[0u8; 26]);
        assert_eq!(u16::from_le_bytes([r[64], r[65]]), 0x608);
        assert_eq!(u16::from_le_bytes([r[66], r[67]]), 1);
        assert_eq!(u32::from_le_bytes(r[68..72].try_into().unwrap()), 2_000_000);
        assert_eq!(u32::from_le_bytes(r[72..76].try_into().unwrap()), 0);
        assert!(
            r[76..].iter().all(|&b| b == 0),
            "no clock epoch without one"
        );
        assert_eq!(ClockEpoch::parse(&r), None);
    }

    #[test]
    fn the_clock_epoch_maps_tsc_to_host_nanoseconds() {
        let r = initial(0x608, 1, 2_000_000, Some((1_000, 5_000_000_000)));
        let epoch = ClockEpoch::parse(&r).unwrap();
        assert_eq!(
            epoch,
            ClockEpoch {
                tsc: 1_000,
                monotonic_ns: 5_000_000_000,
                tsc_khz: 2_000_000
            }
        );
        // 2 GHz: 2 ticks per ns.
        assert_eq!(epoch.monotonic_ns(1_000 + 2_000_000_000), 6_000_000_000);
        assert_eq!(epoch.monotonic_ns(0), 5_000_000_000, "before the epoch");
        // No epoch without a TSC rate.
        let r = initial(0x608, 1, 0, Some((1_000, 5)));
        assert_eq!(ClockEpoch::parse(&r), None);
    }

    #[test]
    fn cell_states_round_trip() {
        for raw in 0..5 {
            assert_eq!(CellState::from_raw(raw).map(|s| s as u32), Some(raw));
        }
        assert_eq!(CellState::from_raw(5), None);
        assert!(CellState::Failed.is_stopped() && !CellState::RunningLocked.is_stopped());
        assert_eq!(describe_cell_state(9), "unknown cell_state");
    }
}
