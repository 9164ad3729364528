//! Shared-memory layout arithmetic: where the state table, the R/W section and the output
//! sections of a link lie, relative to the start of the link's shared memory.
//!
//! Layout (every part starts page-aligned, in this order):
//! 1. state table (`state_table_size` bytes, one `u32` per peer at the start),
//! 2. R/W section (`rw_size` bytes, may be 0),
//! 3. output sections `0..max_peers`, `output_size` bytes each (0 = no output sections).
//!
//! This crate requires every size to be a multiple of the page size (instead of silently
//! rounding it up), so that each part can be mapped with its own protection.

/// Largest `max_peers` this implementation supports (the driver keeps a fixed array of output
/// sections of this length).
pub const MAX_SUPPORTED_PEERS: usize = 16;

/// The parameters a layout is computed from (the vendor capability's sizes plus `MAX_PEERS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayoutParams {
    /// Number of peers on the link (`2..=MAX_SUPPORTED_PEERS`).
    pub max_peers: u16,
    /// State table size in bytes: at least `4 * max_peers`, a multiple of `page_size`.
    pub state_table_size: u32,
    /// R/W section size in bytes: a multiple of `page_size`, may be 0.
    pub rw_size: u64,
    /// Size of each output section in bytes: a multiple of `page_size`, may be 0.
    pub output_size: u64,
    /// Page size in bytes: a power of two (4096 on x86).
    pub page_size: u64,
}

/// A part of the shared memory: offset from the start of the link's memory and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Region {
    /// Offset in bytes from the start of the shared memory.
    pub offset: u64,
    /// Size in bytes (may be 0).
    pub size: u64,
}

impl Region {
    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.offset + self.size
    }

    /// Whether the region has no bytes.
    pub const fn is_empty(&self) -> bool {
        self.size == 0
    }
}

/// Why a set of [`LayoutParams`] was refused. Every variant names the parameter at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// `max_peers` is below 2.
    #[error("max_peers = {max_peers}: a link needs at least 2 peers")]
    TooFewPeers {
        /// The value given.
        max_peers: u16,
    },
    /// `max_peers` is above [`MAX_SUPPORTED_PEERS`].
    #[error("max_peers = {max_peers}: at most {MAX_SUPPORTED_PEERS} peers are supported")]
    TooManyPeers {
        /// The value given.
        max_peers: u16,
    },
    /// `page_size` is 0 or not a power of two.
    #[error("page_size = {page_size:#x}: must be a power of two")]
    BadPageSize {
        /// The value given.
        page_size: u64,
    },
    /// `state_table_size` cannot hold one `u32` per peer.
    #[error("state_table_size = {state_table_size:#x}: must hold 4 bytes per peer, at least {needed:#x}")]
    StateTableTooSmall {
        /// The value given.
        state_table_size: u32,
        /// `4 * max_peers`.
        needed: u32,
    },
    /// A size is not a multiple of the page size.
    #[error("{parameter} = {size:#x}: must be a multiple of the page size {page_size:#x}")]
    NotPageAligned {
        /// `"state_table_size"`, `"rw_size"` or `"output_size"`.
        parameter: &'static str,
        /// The value given.
        size: u64,
        /// The page size.
        page_size: u64,
    },
    /// The total size does not fit in 64 bits.
    #[error("{parameter} = {size:#x}: the total shared memory size overflows 64 bits")]
    Overflow {
        /// The parameter whose addition overflowed.
        parameter: &'static str,
        /// Its value.
        size: u64,
    },
}

impl LayoutError {
    /// The name of the parameter at fault (as in [`LayoutParams`]).
    pub const fn parameter(&self) -> &'static str {
        match self {
            LayoutError::TooFewPeers { .. } | LayoutError::TooManyPeers { .. } => "max_peers",
            LayoutError::BadPageSize { .. } => "page_size",
            LayoutError::StateTableTooSmall { .. } => "state_table_size",
            LayoutError::NotPageAligned { parameter, .. }
            | LayoutError::Overflow { parameter, .. } => parameter,
        }
    }
}

/// A validated layout of one link's shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SharedMemoryLayout {
    params: LayoutParams,
    rw_offset: u64,
    output_offset: u64,
    total_size: u64,
}

impl SharedMemoryLayout {
    /// Checks `params` and computes the layout.
    pub fn new(params: LayoutParams) -> Result<Self, LayoutError> {
        let LayoutParams {
            max_peers,
            state_table_size,
            rw_size,
            output_size,
            page_size,
        } = params;
        if max_peers < 2 {
            return Err(LayoutError::TooFewPeers { max_peers });
        }
        if usize::from(max_peers) > MAX_SUPPORTED_PEERS {
            return Err(LayoutError::TooManyPeers { max_peers });
        }
        if !page_size.is_power_of_two() {
            return Err(LayoutError::BadPageSize { page_size });
        }
        let needed = 4 * u32::from(max_peers);
        if state_table_size < needed {
            return Err(LayoutError::StateTableTooSmall {
                state_table_size,
                needed,
            });
        }
        for (parameter, size) in [
            ("state_table_size", u64::from(state_table_size)),
            ("rw_size", rw_size),
            ("output_size", output_size),
        ] {
            if size % page_size != 0 {
                return Err(LayoutError::NotPageAligned {
                    parameter,
                    size,
                    page_size,
                });
            }
        }
        let rw_offset = u64::from(state_table_size);
        let output_offset = rw_offset
            .checked_add(rw_size)
            .ok_or(LayoutError::Overflow {
                parameter: "rw_size",
                size: rw_size,
            })?;
        let total_size = output_size
            .checked_mul(u64::from(max_peers))
            .and_then(|outputs| output_offset.checked_add(outputs))
            .ok_or(LayoutError::Overflow {
                parameter: "output_size",
                size: output_size,
            })?;
        Ok(Self {
            params,
            rw_offset,
            output_offset,
            total_size,
        })
    }

    /// The parameters this layout was computed from.
    pub const fn params(&self) -> &LayoutParams {
        &self.params
    }

    /// Number of peers.
    pub const fn max_peers(&self) -> u16 {
        self.params.max_peers
    }

    /// The state table, at offset 0.
    pub const fn state_table(&self) -> Region {
        Region {
            offset: 0,
            size: self.params.state_table_size as u64,
        }
    }

    /// The R/W section (its size may be 0).
    pub const fn rw(&self) -> Region {
        Region {
            offset: self.rw_offset,
            size: self.params.rw_size,
        }
    }

    /// Output section of `peer`; `None` if `peer >= max_peers`. Its size is 0 when the link has
    /// no output sections.
    pub const fn output(&self, peer: u16) -> Option<Region> {
        if peer >= self.params.max_peers {
            return None;
        }
        Some(Region {
            offset: self.output_offset + peer as u64 * self.params.output_size,
            size: self.params.output_size,
        })
    }

    /// All output sections together (`max_peers * output_size` bytes).
    pub const fn outputs(&self) -> Region {
        Region {
            offset: self.output_offset,
            size: self.total_size - self.output_offset,
        }
    }

    /// Total size of the shared memory.
    pub const fn total_size(&self) -> u64 {
        self.total_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn params(max_peers: u16, state: u32, rw: u64, output: u64) -> LayoutParams {
        LayoutParams {
            max_peers,
            state_table_size: state,
            rw_size: rw,
            output_size: output,
            page_size: PAGE,
        }
    }

    #[test]
    fn two_peers_with_all_sections() {
        let layout = SharedMemoryLayout::new(params(2, 4096, 2 * PAGE, 16 * PAGE)).unwrap();
        assert_eq!(
            layout.state_table(),
            Region {
                offset: 0,
                size: 4096
            }
        );
        assert_eq!(
            layout.rw(),
            Region {
                offset: 4096,
                size: 8192
            }
        );
        assert_eq!(
            layout.output(0),
            Some(Region {
                offset: 12288,
                size: 65536
            })
        );
        assert_eq!(
            layout.output(1),
            Some(Region {
                offset: 12288 + 65536,
                size: 65536
            })
        );
        assert_eq!(layout.output(2), None);
        assert_eq!(
            layout.outputs(),
            Region {
                offset: 12288,
                size: 2 * 65536
            }
        );
        assert_eq!(layout.total_size(), 12288 + 2 * 65536);
        assert_eq!(layout.output(1).unwrap().end(), layout.total_size());
    }

    #[test]
    fn empty_rw_and_output_sections_are_allowed() {
        let layout = SharedMemoryLayout::new(params(3, 4096, 0, 0)).unwrap();
        assert!(layout.rw().is_empty());
        assert_eq!(layout.rw().offset, 4096);
        assert_eq!(
            layout.output(2),
            Some(Region {
                offset: 4096,
                size: 0
            })
        );
        assert_eq!(layout.total_size(), 4096);
    }

    #[test]
    fn every_part_is_page_aligned() {
        let layout = SharedMemoryLayout::new(params(16, 8192, 3 * PAGE, PAGE)).unwrap();
        assert_eq!(layout.rw().offset % PAGE, 0);
        for peer in 0..16 {
            assert_eq!(layout.output(peer).unwrap().offset % PAGE, 0);
        }
        assert_eq!(layout.total_size(), 8192 + 3 * PAGE + 16 * PAGE);
    }

    #[test]
    fn bad_peer_counts_are_refused() {
        let err = SharedMemoryLayout::new(params(1, 4096, 0, 0)).unwrap_err();
        assert_eq!(err, LayoutError::TooFewPeers { max_peers: 1 });
        assert_eq!(err.parameter(), "max_peers");
        let err = SharedMemoryLayout::new(params(17, 4096, 0, 0)).unwrap_err();
        assert_eq!(err, LayoutError::TooManyPeers { max_peers: 17 });
        assert_eq!(err.parameter(), "max_peers");
    }

    #[test]
    fn bad_page_size_is_refused() {
        for page_size in [0, 3000, 4097] {
            let p = LayoutParams {
                page_size,
                ..params(2, 4096, 0, 0)
            };
            let err = SharedMemoryLayout::new(p).unwrap_err();
            assert_eq!(err, LayoutError::BadPageSize { page_size });
            assert_eq!(err.parameter(), "page_size");
        }
    }

    #[test]
    fn small_state_table_is_refused_before_alignment() {
        let p = LayoutParams {
            page_size: 4,
            ..params(4, 12, 0, 0)
        };
        let err = SharedMemoryLayout::new(p).unwrap_err();
        assert_eq!(
            err,
            LayoutError::StateTableTooSmall {
                state_table_size: 12,
                needed: 16
            }
        );
        assert_eq!(err.parameter(), "state_table_size");
        let err = SharedMemoryLayout::new(params(2, 0, 0, 0)).unwrap_err();
        assert_eq!(err.parameter(), "state_table_size");
    }

    #[test]
    fn unaligned_sizes_name_their_parameter() {
        let cases = [
            (params(2, 100, 0, 0), "state_table_size", 100),
            (params(2, 4096, 100, 0), "rw_size", 100),
            (params(2, 4096, 0, PAGE + 1), "output_size", PAGE + 1),
        ];
        for (p, parameter, size) in cases {
            let err = SharedMemoryLayout::new(p).unwrap_err();
            assert_eq!(
                err,
                LayoutError::NotPageAligned {
                    parameter,
                    size,
                    page_size: PAGE
                }
            );
            assert_eq!(err.parameter(), parameter);
        }
    }

    #[test]
    fn overflow_is_refused() {
        let huge = !(PAGE - 1);
        let err = SharedMemoryLayout::new(params(2, 4096, huge, 0)).unwrap_err();
        assert_eq!(
            err,
            LayoutError::Overflow {
                parameter: "rw_size",
                size: huge
            }
        );
        let err =
            SharedMemoryLayout::new(params(3, 4096, 0, (huge / 2) & !(PAGE - 1))).unwrap_err();
        assert_eq!(err.parameter(), "output_size");
    }
}
