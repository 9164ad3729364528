//! The guest-physical memory map and the communication region of a KVM cell
//! (`kvm-cells.md`, after Jailhouse's x86 inmate protocol).

/// Where the image is loaded (a flat binary linked to run at 0).
pub const IMAGE_ADDRESS: u64 = 0;
/// The largest low RAM (from 0 up to the communication region).
pub const MAX_LOW_MEMORY: u64 = COMM_REGION_ADDRESS;
/// Where the command line is written (Jailhouse: `cell load -s "..." -a 0x1000`).
pub const CMDLINE_ADDRESS: u64 = 0x1000;
/// The longest command line, without its NUL (the image's `.cmdline` area is 256 bytes).
pub const CMDLINE_MAX: usize = 255;
/// Guest-physical address of the communication region.
pub const COMM_REGION_ADDRESS: u64 = 0x10_0000;
/// Size of the communication region (one page).
pub const COMM_REGION_SIZE: u64 = 0x1000;
/// The first address extra memory regions may use.
pub const EXTRA_MEMORY_START: u64 = COMM_REGION_ADDRESS + COMM_REGION_SIZE;
/// Guest page size.
pub const GUEST_PAGE: u64 = 0x1000;

/// The communication region's signature.
pub const COMM_SIGNATURE: &[u8; 6] = b"JHCOMM";
/// The communication region revision this VMM writes (Jailhouse's current one).
pub const COMM_REVISION: u16 = 2;
/// The default ACPI PM timer port (announced in the communication region).
pub const DEFAULT_PM_TIMER_PORT: u16 = 0x608;
/// The 8250 console's base port.
pub const UART_BASE: u16 = 0x3F8;
/// Number of 8250 ports.
pub const UART_PORTS: u16 = 8;
/// Jailhouse's console type for an 8250 on port I/O.
pub const CONSOLE_TYPE_8250: u16 = 2;
/// The ACPI PM timer frequency in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

/// Field offsets in the communication region (packed, little-endian).
pub mod comm {
    /// `"JHCOMM"`, 6 bytes.
    pub const SIGNATURE: usize = 0;
    /// u16 revision.
    pub const REVISION: usize = 6;
    /// u32, written by the cell.
    pub const CELL_STATE: usize = 8;
    /// u32, from the hypervisor to the cell.
    pub const MSG_TO_CELL: usize = 12;
    /// u32, written by the cell.
    pub const REPLY_FROM_CELL: usize = 16;
    /// u32 flags (putc permitted/active): 0.
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
    /// Bytes the VMM initialises.
    pub const LEN: usize = 76;
}

/// `cell_state` values (written by the cell).
pub mod cell_state {
    /// Running (the VMM's initial value).
    pub const RUNNING: u32 = 0;
    /// Running, refusing shutdown.
    pub const RUNNING_LOCKED: u32 = 1;
    /// The cell shut itself down.
    pub const SHUT_DOWN: u32 = 2;
    /// The cell failed (e.g. an inmate panic).
    pub const FAILED: u32 = 3;
    /// The cell found a communication region revision it does not support.
    pub const FAILED_COMM_REV: u32 = 4;
}

/// The communication region's initial bytes for a cell with `cpus` vCPUs, the PM timer at
/// `pm_timer_port` and a TSC of `tsc_khz` (0 if unknown).
pub fn comm_region(pm_timer_port: u16, cpus: u16, tsc_khz: u32) -> [u8; comm::LEN] {
    let mut r = [0u8; comm::LEN];
    r[comm::SIGNATURE..comm::SIGNATURE + 6].copy_from_slice(COMM_SIGNATURE);
    r[comm::REVISION..comm::REVISION + 2].copy_from_slice(&COMM_REVISION.to_le_bytes());
    r[comm::CONSOLE_ADDRESS..comm::CONSOLE_ADDRESS + 8]
        .copy_from_slice(&u64::from(UART_BASE).to_le_bytes());
    r[comm::CONSOLE_SIZE..comm::CONSOLE_SIZE + 4]
        .copy_from_slice(&u32::from(UART_PORTS).to_le_bytes());
    r[comm::CONSOLE_TYPE..comm::CONSOLE_TYPE + 2].copy_from_slice(&CONSOLE_TYPE_8250.to_le_bytes());
    r[comm::PM_TIMER_ADDRESS..comm::PM_TIMER_ADDRESS + 2]
        .copy_from_slice(&pm_timer_port.to_le_bytes());
    r[comm::NUM_CPUS..comm::NUM_CPUS + 2].copy_from_slice(&cpus.to_le_bytes());
    r[comm::TSC_KHZ..comm::TSC_KHZ + 4].copy_from_slice(&tsc_khz.to_le_bytes());
    r
}

/// What a `cell_state` value means, for reports.
pub fn describe_cell_state(state: u32) -> &'static str {
    match state {
        cell_state::RUNNING => "running",
        cell_state::RUNNING_LOCKED => "running (locked)",
        cell_state::SHUT_DOWN => "shut down",
        cell_state::FAILED => "failed",
        cell_state::FAILED_COMM_REV => "failed: wrong communication region revision",
        _ => "unknown cell_state",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_region_fields_are_where_jailhouse_puts_them() {
        let r = comm_region(0x608, 1, 2_000_000);
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
    }
}
