//! Illegal accesses and the `FATAL:` report that stops a KVM cell.

use std::fmt;

use crate::device::AccessKind;

/// Port I/O or memory-mapped I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressSpace {
    /// An `in`/`out` instruction.
    Port,
    /// A load or store that left guest memory (an MMIO exit).
    Mmio,
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Port => "port",
            AddressSpace::Mmio => "MMIO",
        })
    }
}

/// An access no emulated device accepts: the cell that made it is stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IllegalAccess {
    /// Port number or guest-physical address.
    pub address: u64,
    /// Port or MMIO.
    pub space: AddressSpace,
    /// Read or write.
    pub kind: AccessKind,
    /// Access size in bytes.
    pub size: u8,
    /// The value of a write.
    pub value: Option<u64>,
    /// Why it is illegal (e.g. "no device at this port", or the device's refusal).
    pub detail: String,
}

impl IllegalAccess {
    /// An access to an address nothing is emulated at.
    pub fn unassigned(
        space: AddressSpace,
        kind: AccessKind,
        address: u64,
        size: u8,
        value: Option<u64>,
    ) -> Self {
        let detail = match space {
            AddressSpace::Port => "no device at this port",
            AddressSpace::Mmio => "no memory or device at this address",
        };
        Self {
            address,
            space,
            kind,
            size,
            value,
            detail: detail.to_string(),
        }
    }

    /// The same access with another explanation.
    pub fn because(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// The report line, in the style of Jailhouse's `FATAL:` messages, e.g.
    /// `FATAL: cell "rtos": illegal port write at 0x42, size 1, value 0x5, RIP 0x1c: no
    /// device at this port`.
    pub fn fatal_report(&self, cell: &str, rip: u64) -> String {
        let value = match self.value {
            Some(v) => format!(", value {v:#x}"),
            None => String::new(),
        };
        format!(
            "FATAL: cell \"{cell}\": illegal {} {} at {:#x}, size {}{value}, RIP {rip:#x}: {}",
            self.space, self.kind, self.address, self.size, self.detail
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_cell_address_access_size_and_rip() {
        let a = IllegalAccess::unassigned(AddressSpace::Port, AccessKind::Write, 0x42, 1, Some(5));
        assert_eq!(
            a.fatal_report("rtos", 0x1c),
            "FATAL: cell \"rtos\": illegal port write at 0x42, size 1, value 0x5, RIP 0x1c: \
             no device at this port"
        );
        let b =
            IllegalAccess::unassigned(AddressSpace::Mmio, AccessKind::Read, 0xfee0_0000, 4, None)
                .because("xAPIC MMIO is not emulated");
        assert_eq!(
            b.fatal_report("c", 0x10),
            "FATAL: cell \"c\": illegal MMIO read at 0xfee00000, size 4, RIP 0x10: xAPIC MMIO \
             is not emulated"
        );
    }
}
