//! The 16-bit protocol in config space (prog-IF at 09h = low byte, sub-class at 0Ah = high
//! byte) that tells a guest what runs over the link.

use core::fmt;

/// Protocol identifier of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Protocol(pub u16);

/// The range a protocol value falls in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolClass {
    /// 0000h: undefined.
    Undefined,
    /// 0001h: peer-to-peer Ethernet (`ivshmem-net`, this project's `vnet`).
    Ethernet,
    /// 0002h–3FFFh: reserved by the specification.
    Reserved,
    /// 4000h–7FFFh: user-defined.
    UserDefined,
    /// 8000h–BFFFh: virtio front-end.
    VirtioFrontend,
    /// C000h–FFFFh: virtio back-end.
    VirtioBackend,
}

impl Protocol {
    /// 0000h: undefined.
    pub const UNDEFINED: Protocol = Protocol(0x0000);
    /// 0001h: peer-to-peer Ethernet, used by `vnet`.
    pub const ETHERNET: Protocol = Protocol(0x0001);
    /// 4001h: this project's telemetry pipe (user-defined range).
    pub const TELEMETRY: Protocol = Protocol(0x4001);

    /// The raw 16-bit value.
    pub const fn value(self) -> u16 {
        self.0
    }

    /// The range this value falls in.
    pub const fn class(self) -> ProtocolClass {
        match self.0 {
            0x0000 => ProtocolClass::Undefined,
            0x0001 => ProtocolClass::Ethernet,
            0x0002..=0x3FFF => ProtocolClass::Reserved,
            0x4000..=0x7FFF => ProtocolClass::UserDefined,
            0x8000..=0xBFFF => ProtocolClass::VirtioFrontend,
            _ => ProtocolClass::VirtioBackend,
        }
    }

    /// 4000h–7FFFh.
    pub const fn is_user_defined(self) -> bool {
        matches!(self.class(), ProtocolClass::UserDefined)
    }

    /// 8000h–BFFFh.
    pub const fn is_virtio_frontend(self) -> bool {
        matches!(self.class(), ProtocolClass::VirtioFrontend)
    }

    /// C000h–FFFFh.
    pub const fn is_virtio_backend(self) -> bool {
        matches!(self.class(), ProtocolClass::VirtioBackend)
    }

    /// The config-space bytes: `(prog_if at 09h, sub_class at 0Ah)`.
    pub const fn to_config_bytes(self) -> (u8, u8) {
        (self.0 as u8, (self.0 >> 8) as u8)
    }

    /// The protocol from the config-space bytes at 09h (prog-IF) and 0Ah (sub-class).
    pub const fn from_config_bytes(prog_if: u8, sub_class: u8) -> Self {
        Protocol((sub_class as u16) << 8 | prog_if as u16)
    }
}

impl From<u16> for Protocol {
    fn from(value: u16) -> Self {
        Protocol(value)
    }
}

impl From<Protocol> for u16 {
    fn from(protocol: Protocol) -> u16 {
        protocol.0
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match (*self, self.class()) {
            (Protocol::TELEMETRY, _) => "telemetry",
            (_, ProtocolClass::Undefined) => "undefined",
            (_, ProtocolClass::Ethernet) => "ethernet",
            (_, ProtocolClass::Reserved) => "reserved",
            (_, ProtocolClass::UserDefined) => "user-defined",
            (_, ProtocolClass::VirtioFrontend) => "virtio front-end",
            (_, ProtocolClass::VirtioBackend) => "virtio back-end",
        };
        write!(f, "{:04X}h ({name})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_the_specification_ranges() {
        assert_eq!(Protocol::UNDEFINED.class(), ProtocolClass::Undefined);
        assert_eq!(Protocol::ETHERNET.class(), ProtocolClass::Ethernet);
        assert_eq!(Protocol(0x3FFF).class(), ProtocolClass::Reserved);
        assert!(Protocol::TELEMETRY.is_user_defined());
        assert!(Protocol(0x4000).is_user_defined() && Protocol(0x7FFF).is_user_defined());
        assert!(Protocol(0x8000).is_virtio_frontend() && Protocol(0xBFFF).is_virtio_frontend());
        assert!(Protocol(0xC000).is_virtio_backend() && Protocol(0xFFFF).is_virtio_backend());
        assert!(!Protocol(0x8000).is_user_defined());
    }

    #[test]
    fn config_bytes_put_the_low_byte_in_prog_if() {
        assert_eq!(Protocol(0x4001).to_config_bytes(), (0x01, 0x40));
        assert_eq!(Protocol::from_config_bytes(0x01, 0x40), Protocol(0x4001));
    }

    #[test]
    fn display_names_the_value_and_its_meaning() {
        assert_eq!(Protocol::ETHERNET.to_string(), "0001h (ethernet)");
        assert_eq!(Protocol::TELEMETRY.to_string(), "4001h (telemetry)");
        assert_eq!(Protocol(0x4002).to_string(), "4002h (user-defined)");
        assert_eq!(Protocol(0xC001).to_string(), "C001h (virtio back-end)");
    }
}
