//! Values written either as numbers or as strings: sizes ("4K") and protocols ("telemetry").

use std::fmt;

use ivshmem_dev::protocol::{Protocol, ProtocolClass};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A size as written in the file: an integer number of bytes, or a string such as `"4K"`,
/// `"1M"`, `"64KiB"`, `"0x1000"`. Parsed by [`SizeSpec::bytes`] during validation, so that
/// every bad size is reported with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeSpec {
    /// A TOML integer (bytes).
    Bytes(u64),
    /// A TOML string, parsed by [`parse_size`].
    Text(String),
}

impl SizeSpec {
    /// The size in bytes, or why the text is not a size.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeSpec::Bytes(n) => Ok(*n),
            SizeSpec::Text(text) => parse_size(text),
        }
    }
}

impl fmt::Display for SizeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeSpec::Bytes(n) => write!(f, "{n}"),
            SizeSpec::Text(text) => write!(f, "\"{text}\""),
        }
    }
}

impl<'de> Deserialize<'de> for SizeSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = SizeSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a size: a number of bytes or a string such as \"4K\", \"1M\", \"64KiB\"",
                )
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SizeSpec, E> {
                Ok(SizeSpec::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SizeSpec, E> {
                u64::try_from(v)
                    .map(SizeSpec::Bytes)
                    .map_err(|_| E::custom(format!("a size cannot be negative (got {v})")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SizeSpec, E> {
                Ok(SizeSpec::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses a size: a decimal or `0x` hexadecimal number followed by an optional binary unit,
/// `B`, `K`/`KiB`, `M`/`MiB` or `G`/`GiB` (1K = 1024). Whitespace between number and unit is
/// allowed. `KB`/`MB`/`GB` are refused because they are ambiguous (1000 or 1024?).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) =
        if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
            let end = hex
                .find(|c: char| !c.is_ascii_hexdigit())
                .unwrap_or(hex.len());
            let value = u64::from_str_radix(&hex[..end], 16)
                .map_err(|_| format!("\"{text}\" is not a size: bad hexadecimal number"))?;
            (value, hex[end..].trim())
        } else {
            let end = text
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(text.len());
            if end == 0 {
                return Err(format!(
                    "\"{text}\" is not a size: it must start with a number"
                ));
            }
            let value = text[..end]
                .parse::<u64>()
                .map_err(|_| format!("\"{text}\" is not a size: the number is too large"))?;
            (value, text[end..].trim())
        };
    let multiplier: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" | "kB" | "MB" | "GB" => {
            return Err(format!(
                "\"{text}\": unit \"{unit}\" is ambiguous; write K/KiB, M/MiB or G/GiB (binary, 1K = 1024)"
            ))
        }
        _ => {
            return Err(format!(
                "\"{text}\": unknown unit \"{unit}\"; use B, K/KiB, M/MiB or G/GiB"
            ))
        }
    };
    digits
        .checked_mul(multiplier)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Formats a byte count for people: `0`, `512 B`, `4 KiB`, `1.5 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    if bytes == 0 {
        return "0".to_owned();
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return if bytes % unit == 0 {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{:.1} {name}", bytes as f64 / unit as f64)
            };
        }
    }
    format!("{bytes} B")
}

/// A protocol as written in the file: a number (`0x4001`) or a name (`"telemetry"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolSpec {
    /// A TOML integer; must fit in 16 bits.
    Number(i64),
    /// A name from [`PROTOCOL_NAMES`], or a number written as a string (`"0x4001"`).
    Name(String),
}

/// The protocol names a configuration may use, with their 16-bit values.
pub const PROTOCOL_NAMES: &[(&str, u16)] = &[
    ("undefined", Protocol::UNDEFINED.value()),
    ("ethernet", Protocol::ETHERNET.value()),
    // The same 0001h, named for a link whose cells speak Linux's `ivshmem-net` wire format
    // (vnet's `--format ivshmem-net`) rather than vnet's shmring frames.
    ("ivshmem-net", Protocol::ETHERNET.value()),
    ("telemetry", Protocol::TELEMETRY.value()),
];

impl ProtocolSpec {
    /// The 16-bit protocol value, or why it is not one.
    pub fn value(&self) -> Result<u16, String> {
        match self {
            ProtocolSpec::Number(n) => u16::try_from(*n).map_err(|_| {
                format!("protocol {n} is out of range: it must be 0..=65535 (0x0000..=0xFFFF)")
            }),
            ProtocolSpec::Name(name) => {
                if let Some((_, value)) = PROTOCOL_NAMES.iter().find(|(n, _)| n == name) {
                    return Ok(*value);
                }
                let number = if let Some(hex) =
                    name.strip_prefix("0x").or_else(|| name.strip_prefix("0X"))
                {
                    i64::from_str_radix(hex, 16).ok()
                } else {
                    name.parse::<i64>().ok()
                };
                match number {
                    Some(n) => ProtocolSpec::Number(n).value(),
                    None => Err(format!("unknown protocol name \"{name}\"")),
                }
            }
        }
    }
}

impl<'de> Deserialize<'de> for ProtocolSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProtocolVisitor;
        impl Visitor<'_> for ProtocolVisitor {
            type Value = ProtocolSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a protocol: a 16-bit number or a name such as \"ethernet\" or \"telemetry\"",
                )
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ProtocolSpec, E> {
                Ok(ProtocolSpec::Number(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ProtocolSpec, E> {
                Ok(ProtocolSpec::Number(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ProtocolSpec, E> {
                Ok(ProtocolSpec::Name(v.to_owned()))
            }
        }
        deserializer.deserialize_any(ProtocolVisitor)
    }
}

/// A readable description of a protocol value: its name if it has one, and its class per the
/// ivshmem v2 specification.
pub fn describe_protocol(value: u16) -> String {
    let class = match Protocol(value).class() {
        ProtocolClass::Undefined => "undefined",
        ProtocolClass::Ethernet => "peer-to-peer Ethernet",
        ProtocolClass::Reserved => "reserved by the specification",
        ProtocolClass::UserDefined => "user-defined",
        ProtocolClass::VirtioFrontend => "virtio front-end",
        ProtocolClass::VirtioBackend => "virtio back-end",
    };
    match PROTOCOL_NAMES.iter().find(|(_, v)| *v == value) {
        Some((name, _)) if *name != "undefined" && *name != "ethernet" => {
            format!("{value:#06x} ({name}, {class})")
        }
        _ => format!("{value:#06x} ({class})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size(" 2 GiB "), Ok(2 << 30));
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0x10K"), Ok(16 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("4KB").unwrap_err().contains("ambiguous"));
        assert!(parse_size("4X").unwrap_err().contains("unknown unit"));
        assert!(parse_size("K").unwrap_err().contains("start with a number"));
        assert!(parse_size("99999999999G")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn protocols_resolve_by_name_or_number() {
        assert_eq!(ProtocolSpec::Name("ethernet".into()).value(), Ok(0x0001));
        assert_eq!(ProtocolSpec::Name("telemetry".into()).value(), Ok(0x4001));
        assert_eq!(ProtocolSpec::Name("0x4002".into()).value(), Ok(0x4002));
        assert_eq!(ProtocolSpec::Number(0xFFFF).value(), Ok(0xFFFF));
        assert!(ProtocolSpec::Number(0x10000)
            .value()
            .unwrap_err()
            .contains("out of range"));
        assert!(ProtocolSpec::Number(-1)
            .value()
            .unwrap_err()
            .contains("out of range"));
        assert!(ProtocolSpec::Name("ethernt".into())
            .value()
            .unwrap_err()
            .contains("unknown protocol name"));
    }

    #[test]
    fn protocol_descriptions_name_the_class() {
        assert_eq!(
            describe_protocol(0x4001),
            "0x4001 (telemetry, user-defined)"
        );
        assert_eq!(describe_protocol(1), "0x0001 (peer-to-peer Ethernet)");
        assert_eq!(describe_protocol(0x8001), "0x8001 (virtio front-end)");
        assert_eq!(
            describe_protocol(0x0002),
            "0x0002 (reserved by the specification)"
        );
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0");
        assert_eq!(human_size(100), "100 B");
        assert_eq!(human_size(4096), "4 KiB");
        assert_eq!(human_size(3 << 19), "1.5 MiB");
    }
}
