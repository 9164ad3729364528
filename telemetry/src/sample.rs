//! The telemetry record and the consumer's check of a sample stream.

use bytemuck::{Pod, Zeroable};

/// Number of channel values in a sample.
pub const CHANNELS: usize = 6;

/// One telemetry sample (40 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Pod, Zeroable)]
pub struct Sample {
    /// When the producer wrote it: `CLOCK_MONOTONIC` in ns (comparable across processes on
    /// one machine).
    pub timestamp_ns: u64,
    /// Sequence number: 0, 1, 2, ... from the producer's start.
    pub seq: u64,
    /// Channel values ([`Sample::expected_channels`] of `seq`).
    pub channels: [f32; CHANNELS],
}

impl Sample {
    /// Size of a sample on the wire.
    pub const SIZE: usize = core::mem::size_of::<Sample>();

    /// The channel values of sample `seq`: a sawtooth per channel with periods 1000, 2000, ...
    /// (exact in `f32`), so any torn or corrupted record is detectable.
    pub fn expected_channels(seq: u64) -> [f32; CHANNELS] {
        let mut values = [0.0; CHANNELS];
        for (i, v) in values.iter_mut().enumerate() {
            let period = 1000 * (i as u64 + 1);
            *v = (seq % period) as f32 * 0.5 + i as f32;
        }
        values
    }

    /// A sample as the producer makes it.
    pub fn new(seq: u64, timestamp_ns: u64) -> Self {
        Self {
            timestamp_ns,
            seq,
            channels: Self::expected_channels(seq),
        }
    }

    /// Whether the channel values match the sequence number.
    pub fn is_consistent(&self) -> bool {
        self.channels == Self::expected_channels(self.seq)
    }
}

/// What a consumer found wrong with the samples it received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SampleCheck {
    /// Samples checked.
    pub received: u64,
    /// Samples missing: the sum of forward jumps in the sequence.
    pub missing: u64,
    /// Gaps: how many forward jumps.
    pub gaps: u64,
    /// Samples whose sequence number went backwards (reordered or duplicated).
    pub out_of_order: u64,
    /// Samples whose channel values do not match their sequence number (torn or corrupt).
    pub torn: u64,
    /// Restarts of the producer seen by [`SampleCheck::restart`].
    pub restarts: u64,
    next: Option<u64>,
}

impl SampleCheck {
    /// Checks one sample against the one before.
    pub fn check(&mut self, sample: &Sample) {
        self.received += 1;
        if !sample.is_consistent() {
            self.torn += 1;
        }
        match self.next {
            Some(next) if sample.seq > next => {
                self.gaps += 1;
                self.missing += sample.seq - next;
            }
            Some(next) if sample.seq < next => {
                // Late or duplicated: counted, and the expectation does not move back.
                self.out_of_order += 1;
                return;
            }
            _ => {}
        }
        self.next = Some(sample.seq.wrapping_add(1));
    }

    /// The producer left: its successor starts its sequence again.
    pub fn restart(&mut self) {
        self.restarts += 1;
        self.next = None;
    }

    /// The sequence number expected next (`None` before the first sample or after a restart).
    pub fn expected(&self) -> Option<u64> {
        self.next
    }

    /// Nothing lost, reordered or torn.
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.out_of_order == 0 && self.torn == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_40_bytes_and_self_checking() {
        assert_eq!(Sample::SIZE, 40);
        let s = Sample::new(123_456, 99);
        assert!(s.is_consistent());
        let mut torn = s;
        torn.channels[3] += 1.0;
        assert!(!torn.is_consistent());
        let mut torn = s;
        torn.seq += 1;
        assert!(
            !torn.is_consistent(),
            "a seq from another sample does not match its values"
        );
    }

    #[test]
    fn sample_check_counts_gaps_reorders_tears_and_restarts() {
        let mut c = SampleCheck::default();
        for seq in [0, 1, 2, 5, 6, 4, 7] {
            c.check(&Sample::new(seq, 0));
        }
        let mut torn = Sample::new(8, 0);
        torn.channels[0] = -1.0;
        c.check(&torn);
        assert_eq!(c.received, 8);
        assert_eq!((c.gaps, c.missing), (1, 2));
        assert_eq!(c.out_of_order, 1);
        assert_eq!(c.torn, 1);
        assert!(!c.is_clean());
        c.restart();
        assert_eq!(c.expected(), None);
        let before = (c.gaps, c.out_of_order);
        c.check(&Sample::new(0, 0));
        assert_eq!(
            (c.gaps, c.out_of_order),
            before,
            "a restart at 0 is not a reorder"
        );
        assert_eq!(c.restarts, 1);
    }
}
