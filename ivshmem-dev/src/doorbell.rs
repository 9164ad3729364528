//! The `DOORBELL` register value: target peer in bits 16–31, vector in bits 0–15.

/// One doorbell ring: which peer to interrupt and on which vector.
///
/// With INTx (this project's default) only vector 0 exists; ringing another vector has no
/// effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Doorbell {
    /// Target peer ID (bits 16–31).
    pub peer: u16,
    /// Interrupt vector on the target (bits 0–15).
    pub vector: u16,
}

impl Doorbell {
    /// A doorbell for `peer` on `vector`.
    pub const fn new(peer: u16, vector: u16) -> Self {
        Self { peer, vector }
    }

    /// The value to write to `DOORBELL`.
    pub const fn encode(self) -> u32 {
        (self.peer as u32) << 16 | self.vector as u32
    }

    /// Splits a `DOORBELL` value into target and vector. Every `u32` is a valid encoding.
    pub const fn decode(value: u32) -> Self {
        Self {
            peer: (value >> 16) as u16,
            vector: value as u16,
        }
    }
}

impl From<Doorbell> for u32 {
    fn from(doorbell: Doorbell) -> u32 {
        doorbell.encode()
    }
}

impl From<u32> for Doorbell {
    fn from(value: u32) -> Doorbell {
        Doorbell::decode(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_puts_the_peer_in_the_high_half() {
        assert_eq!(Doorbell::new(1, 0).encode(), 0x0001_0000);
        assert_eq!(Doorbell::new(0x1234, 0xABCD).encode(), 0x1234_ABCD);
        assert_eq!(Doorbell::decode(0x0003_0002), Doorbell::new(3, 2));
    }

    #[test]
    fn encode_decode_roundtrip() {
        for peer in [0u16, 1, 2, 15, 0x7FFF, u16::MAX] {
            for vector in [0u16, 1, 3, 0x8000, u16::MAX] {
                let doorbell = Doorbell::new(peer, vector);
                assert_eq!(Doorbell::decode(doorbell.encode()), doorbell);
            }
        }
        for value in [0u32, 1, 0xFFFF, 0x1_0000, 0xDEAD_BEEF, u32::MAX] {
            assert_eq!(Doorbell::decode(value).encode(), value);
        }
    }
}
