//! The command line: 256 bytes at 0x1000 that the loader overwrites (Jailhouse: `jailhouse cell
//! load CELL image.bin -s "target=1" -a 0x1000`; KVM cells: the config's `cmdline`), a
//! NUL-terminated string of `key=value` words separated by spaces.

use core::cell::UnsafeCell;

/// Size of the area.
pub const CMDLINE_SIZE: usize = ivshmem_dev::comm::CMDLINE_MAX + 1;
/// Its address.
pub const CMDLINE_ADDRESS: usize = ivshmem_dev::comm::CMDLINE_ADDRESS as usize;

/// The area itself, placed at 0x1000 by the linker script. An `UnsafeCell` so the compiler
/// never assumes its compiled-in zeros: the loader writes it before the cell starts.
#[repr(transparent)]
pub struct Area(UnsafeCell<[u8; CMDLINE_SIZE]>);

// SAFETY: the area is written by the loader before the CPU starts and only read (with volatile
// copies into `snapshot`) afterwards.
unsafe impl Sync for Area {}

#[used]
#[link_section = ".cmdline"]
static CMDLINE: Area = Area(UnsafeCell::new([0; CMDLINE_SIZE]));

/// A copy of the command line taken once at start.
#[derive(Clone, Copy)]
pub struct Cmdline {
    bytes: [u8; CMDLINE_SIZE],
    len: usize,
}

impl core::fmt::Debug for Cmdline {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_tuple("Cmdline").field(&self.as_str()).finish()
    }
}

impl Cmdline {
    /// Copies the area (volatile, byte by byte) up to the first NUL.
    pub fn snapshot() -> Self {
        let mut bytes = [0u8; CMDLINE_SIZE];
        let base = CMDLINE.0.get().cast::<u8>();
        let mut len = CMDLINE_SIZE - 1;
        for (i, byte) in bytes.iter_mut().enumerate().take(CMDLINE_SIZE - 1) {
            // SAFETY: `i < CMDLINE_SIZE`: inside the static area.
            *byte = unsafe { base.add(i).read_volatile() };
            if *byte == 0 {
                len = i;
                break;
            }
        }
        Self::from_bytes_truncated(&bytes[..len])
    }

    /// A command line from text (at most 255 bytes are kept).
    pub fn from_bytes_truncated(text: &[u8]) -> Self {
        let len = text.len().min(CMDLINE_SIZE - 1);
        let mut bytes = [0u8; CMDLINE_SIZE];
        bytes[..len].copy_from_slice(&text[..len]);
        Self { bytes, len }
    }

    /// The text (the valid UTF-8 prefix).
    pub fn as_str(&self) -> &str {
        let bytes = &self.bytes[..self.len];
        match core::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => core::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or(""),
        }
    }

    /// The value of `key=value` (the last one wins), or `Some("")` for a bare `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.as_str()
            .split_ascii_whitespace()
            .rev()
            .find_map(|word| match word.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if word == key => Some(""),
                _ => None,
            })
    }

    /// `key` parsed as an integer (decimal, or hex with `0x`), or `default` when absent or
    /// malformed (as Jailhouse's `cmdline_parse_int`).
    pub fn int(&self, key: &str, default: i64) -> i64 {
        self.get(key).and_then(parse_int).unwrap_or(default)
    }
}

/// Parses a decimal or `0x` hexadecimal integer with an optional sign.
pub fn parse_int(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let value = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => i64::from_str_radix(hex, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_values_and_bare_words() {
        let c = Cmdline::from_bytes_truncated(b"target=1 irq_base=0x40  verbose target=2");
        assert_eq!(c.get("target"), Some("2"), "the last one wins");
        assert_eq!(c.int("target", 0), 2);
        assert_eq!(c.int("irq_base", 32), 0x40);
        assert_eq!(c.get("verbose"), Some(""));
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.int("missing", 7), 7);
        assert_eq!(c.get("targ"), None, "no prefix matches");
    }

    #[test]
    fn malformed_numbers_fall_back_to_the_default() {
        let c = Cmdline::from_bytes_truncated(b"a=12x b=0x c=-5 d=0XfF");
        assert_eq!(c.int("a", -1), -1);
        assert_eq!(c.int("b", -1), -1);
        assert_eq!(c.int("c", 0), -5);
        assert_eq!(c.int("d", 0), 255);
    }

    #[test]
    fn long_and_non_utf8_lines_are_cut() {
        let long = [b'x'; 400];
        assert_eq!(
            Cmdline::from_bytes_truncated(&long).as_str().len(),
            CMDLINE_SIZE - 1
        );
        let c = Cmdline::from_bytes_truncated(b"mode=config \xff target=1");
        assert_eq!(c.as_str(), "mode=config ");
        assert_eq!(c.get("mode"), Some("config"));
    }
}
