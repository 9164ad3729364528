//! Which UIO map holds what: the order `uio_ivshmem` registers its maps in.
//!
//! 0 registers, 1 state table (read-only), then the R/W section only if its size is > 0
//! (its absence shifts the later indexes down by one), then, only if the output-section size
//! is > 0, the input sections (every peer's output section, read-only, one map) and this peer's
//! output section (read-write). So the number of maps alone fixes every role:
//!
//! | maps | roles |
//! |---|---|
//! | 2 | registers, state table |
//! | 3 | registers, state table, R/W |
//! | 4 | registers, state table, input, output |
//! | 5 | registers, state table, R/W, input, output |
//!
//! Names the driver gives (`registers`, `state_table`, `rw_section`, `input_sections`,
//! `output_section`) are checked when present; a map without a name is accepted.

use std::fmt;
use std::path::Path;

use super::error::UioError;
use super::sysfs::UioMapInfo;

/// Smallest register map accepted (the registers in use end at 0x14; the page is 4 KiB).
pub const MIN_REGISTER_MAP_SIZE: u64 = 0x100;

/// What one UIO map holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MapRole {
    /// BAR0, the register page.
    Registers,
    /// The state table (read-only).
    StateTable,
    /// The R/W section shared by all peers.
    RwSection,
    /// All peers' output sections, read-only, one after another.
    InputSections,
    /// This peer's own output section (read-write).
    OutputSection,
}

impl MapRole {
    /// The map name `uio_ivshmem` gives this role.
    pub const fn driver_name(self) -> &'static str {
        match self {
            MapRole::Registers => "registers",
            MapRole::StateTable => "state_table",
            MapRole::RwSection => "rw_section",
            MapRole::InputSections => "input_sections",
            MapRole::OutputSection => "output_section",
        }
    }

    /// Whether this peer may write the map (`uio_ivshmem` marks the others read-only).
    pub const fn writable(self) -> bool {
        matches!(
            self,
            MapRole::Registers | MapRole::RwSection | MapRole::OutputSection
        )
    }
}

impl fmt::Display for MapRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MapRole::Registers => "registers",
            MapRole::StateTable => "state table",
            MapRole::RwSection => "R/W section",
            MapRole::InputSections => "input sections",
            MapRole::OutputSection => "output section",
        })
    }
}

/// The map index of every role present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLayout {
    /// Index of the register map (always 0).
    pub registers: usize,
    /// Index of the state table map (always 1).
    pub state_table: usize,
    /// Index of the R/W section map, if the link has one.
    pub rw: Option<usize>,
    /// Index of the input-sections map, if the link has output sections.
    pub input: Option<usize>,
    /// Index of this peer's output-section map, if the link has output sections.
    pub output: Option<usize>,
}

impl MapLayout {
    /// The roles in map order.
    pub fn roles(&self) -> Vec<MapRole> {
        let mut roles = vec![MapRole::Registers, MapRole::StateTable];
        if self.rw.is_some() {
            roles.push(MapRole::RwSection);
        }
        if self.input.is_some() {
            roles.push(MapRole::InputSections);
            roles.push(MapRole::OutputSection);
        }
        roles
    }

    /// Assign roles to `maps` by their number and order, check names where present, and check
    /// the sizes that do not need the registers. `maps_dir` is used in error messages.
    pub fn identify(maps_dir: &Path, maps: &[UioMapInfo]) -> Result<MapLayout, UioError> {
        let layout = match maps.len() {
            2 => MapLayout {
                registers: 0,
                state_table: 1,
                rw: None,
                input: None,
                output: None,
            },
            3 => MapLayout {
                registers: 0,
                state_table: 1,
                rw: Some(2),
                input: None,
                output: None,
            },
            4 => MapLayout {
                registers: 0,
                state_table: 1,
                rw: None,
                input: Some(2),
                output: Some(3),
            },
            5 => MapLayout {
                registers: 0,
                state_table: 1,
                rw: Some(2),
                input: Some(3),
                output: Some(4),
            },
            count => {
                return Err(UioError::MapCount {
                    dir: maps_dir.to_path_buf(),
                    count,
                })
            }
        };
        for (map, role) in maps.iter().zip(layout.roles()) {
            if let Some(found) = &map.name {
                if found != role.driver_name() {
                    return Err(UioError::MapName {
                        index: map.index,
                        count: maps.len(),
                        expected: role.driver_name(),
                        found: found.clone(),
                    });
                }
            }
        }
        layout.check_static_sizes(maps)?;
        Ok(layout)
    }

    fn check_static_sizes(&self, maps: &[UioMapInfo]) -> Result<(), UioError> {
        let size_err = |index: usize, role, rule: &str| UioError::MapSize {
            index,
            role,
            size: maps[index].size,
            rule: rule.to_owned(),
        };
        if maps[self.registers].size < MIN_REGISTER_MAP_SIZE {
            return Err(size_err(
                self.registers,
                MapRole::Registers,
                "the register map must be at least 0x100 bytes (a 4 KiB page normally)",
            ));
        }
        let state = maps[self.state_table].size;
        if state == 0 || state % 4 != 0 {
            return Err(size_err(
                self.state_table,
                MapRole::StateTable,
                "the state table holds one u32 per peer: its size must be a non-zero multiple of 4",
            ));
        }
        if let Some(rw) = self.rw {
            if maps[rw].size == 0 {
                return Err(size_err(
                    rw,
                    MapRole::RwSection,
                    "uio_ivshmem only exposes the R/W section when its size is > 0",
                ));
            }
        }
        if let (Some(input), Some(output)) = (self.input, self.output) {
            let out = maps[output].size;
            if out == 0 {
                return Err(size_err(
                    output,
                    MapRole::OutputSection,
                    "uio_ivshmem only exposes output sections when their size is > 0",
                ));
            }
            if maps[input].size == 0 || maps[input].size % out != 0 {
                return Err(size_err(
                    input,
                    MapRole::InputSections,
                    &format!(
                        "the input sections are max_peers output sections of {out:#x} bytes: \
                         the size must be a non-zero multiple of {out:#x}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Check the sizes that depend on MAX_PEERS (read from the registers).
    pub fn check_peer_sizes(&self, maps: &[UioMapInfo], max_peers: u32) -> Result<(), UioError> {
        let state = maps[self.state_table].size;
        if state < 4 * u64::from(max_peers) {
            return Err(UioError::MapSize {
                index: self.state_table,
                role: MapRole::StateTable,
                size: state,
                rule: format!(
                    "MAX_PEERS is {max_peers}, so the state table needs at least {:#x} bytes",
                    4 * u64::from(max_peers)
                ),
            });
        }
        if let (Some(input), Some(output)) = (self.input, self.output) {
            let out = maps[output].size;
            let expected = out.checked_mul(u64::from(max_peers));
            if expected != Some(maps[input].size) {
                return Err(UioError::MapSize {
                    index: input,
                    role: MapRole::InputSections,
                    size: maps[input].size,
                    rule: format!(
                        "MAX_PEERS is {max_peers} and the output section is {out:#x} bytes, so the \
                         input sections must be {max_peers} x {out:#x} bytes"
                    ),
                });
            }
        }
        Ok(())
    }
}
