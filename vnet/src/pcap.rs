//! Classic libpcap capture files (`LINKTYPE_ETHERNET`), readable by tcpdump and Wireshark.
//!
//! File layout (all fields little-endian, as written by this module):
//!
//! | offset | size | field | value |
//! |-------:|-----:|-------|-------|
//! | 0 | 4 | magic | `0xa1b2c3d4` (microsecond timestamps) |
//! | 4 | 2 | version major | 2 |
//! | 6 | 2 | version minor | 4 |
//! | 8 | 4 | this zone | 0 |
//! | 12 | 4 | sigfigs | 0 |
//! | 16 | 4 | snapshot length | [`SNAPLEN`] |
//! | 20 | 4 | link type | 1 (`LINKTYPE_ETHERNET`) |
//!
//! then per frame a 16-byte record header (seconds, microseconds, captured length, original
//! length) followed by the captured bytes.
//!
//! # Why not smoltcp's `PcapSink`
//!
//! smoltcp (0.14) has a pcap writer, [`smoltcp::phy::PcapSink`], implemented for every
//! `std::io::Write`. It writes the same format, but it does not fit the TAP bridge, which
//! must keep issue 12's guarantees (records flushed after every burst and at least once a
//! second, a live reader sees them, `kill -9` cuts at most the last record, and the capture
//! never stops the forwarding):
//!
//! - **It flushes after every packet** (`PcapSink::packet` ends in `flush`): one `write(2)`
//!   per frame on the bridge's hot path. The bridge batches instead: it writes a burst into a
//!   buffer and flushes once per burst (and after at most [`crate::bridge`]'s one-second
//!   interval under continuous traffic). Overriding `packet` to skip the flush leaves only the
//!   header layout from smoltcp, which is the 40 lines below.
//! - **It panics on I/O errors**: the `Write` implementation calls `expect("cannot write")`
//!   and `expect("cannot flush")`. A full disk or a closed pipe to a live `tcpdump -r -`
//!   would take the whole bridge down; here an error is returned, and the bridge logs it and
//!   keeps forwarding.
//! - Its timestamps are smoltcp `Instant`s (time since an arbitrary epoch); the bridge has
//!   no smoltcp clock and stamps frames with the wall clock, which readers expect.
//! - Its `PcapWriter` wraps a smoltcp `Device`; the bridge forwards frames between a TAP and
//!   a ring without a smoltcp device, so only the sink trait could be used at all.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

/// Magic number of a classic pcap file with microsecond timestamps.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// `LINKTYPE_ETHERNET`.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Snapshot length written into the header: frames longer than this are truncated in the
/// file (262144 is tcpdump's own maximum; every vnet frame fits).
pub const SNAPLEN: u32 = 262_144;

/// Writes frames into a pcap stream.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    frames: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut header = [0u8; 24];
        header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        header[4..6].copy_from_slice(&2u16.to_le_bytes());
        header[6..8].copy_from_slice(&4u16.to_le_bytes());
        // this zone and sigfigs: 0
        header[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
        header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
        out.write_all(&header)?;
        Ok(PcapWriter { out, frames: 0 })
    }

    /// Appends one frame stamped with the current time.
    pub fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.write_frame_at(now.as_secs(), now.subsec_micros(), frame)
    }

    /// Appends one frame with an explicit timestamp (seconds since the epoch and
    /// microseconds).
    pub fn write_frame_at(&mut self, secs: u64, micros: u32, frame: &[u8]) -> io::Result<()> {
        let orig = u32::try_from(frame.len()).unwrap_or(u32::MAX);
        let incl = orig.min(SNAPLEN);
        let mut rec = [0u8; 16];
        // The classic format has 32-bit seconds (wraps in 2106).
        rec[0..4].copy_from_slice(&(secs as u32).to_le_bytes());
        rec[4..8].copy_from_slice(&micros.min(999_999).to_le_bytes());
        rec[8..12].copy_from_slice(&incl.to_le_bytes());
        rec[12..16].copy_from_slice(&orig.to_le_bytes());
        self.out.write_all(&rec)?;
        self.out.write_all(&frame[..incl as usize])?;
        self.frames += 1;
        Ok(())
    }

    /// Frames written so far.
    pub fn frames(&self) -> u64 {
        self.frames
    }

    /// Flushes the underlying writer.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_format_bytes() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let frame: Vec<u8> = (0u8..60).collect();
        w.write_frame_at(0x0102_0304, 567_890, &frame).unwrap();
        w.write_frame_at(7, 1, &[0xAA; 3]).unwrap();
        assert_eq!(w.frames(), 2);
        let bytes = w.into_inner();
        let expected_header: [u8; 24] = [
            0xd4, 0xc3, 0xb2, 0xa1, // magic, little-endian
            2, 0, 4, 0, // version 2.4
            0, 0, 0, 0, // this zone
            0, 0, 0, 0, // sigfigs
            0x00, 0x00, 0x04, 0x00, // snaplen 262144
            1, 0, 0, 0, // LINKTYPE_ETHERNET
        ];
        assert_eq!(&bytes[..24], &expected_header);
        let rec1: [u8; 16] = [
            0x04, 0x03, 0x02, 0x01, // seconds
            0x52, 0xAA, 0x08, 0x00, // 567890 microseconds
            60, 0, 0, 0, // captured
            60, 0, 0, 0, // original
        ];
        assert_eq!(&bytes[24..40], &rec1);
        assert_eq!(&bytes[40..100], &frame[..]);
        assert_eq!(
            &bytes[100..116],
            &[7, 0, 0, 0, 1, 0, 0, 0, 3, 0, 0, 0, 3, 0, 0, 0]
        );
        assert_eq!(&bytes[116..], &[0xAA; 3]);
    }

    #[test]
    fn oversized_frames_are_truncated_to_the_snaplen() {
        let mut w = PcapWriter::new(Vec::new()).unwrap();
        let big = vec![1u8; SNAPLEN as usize + 10];
        w.write_frame_at(0, 0, &big).unwrap();
        let bytes = w.into_inner();
        assert_eq!(&bytes[32..36], &SNAPLEN.to_le_bytes());
        assert_eq!(&bytes[36..40], &(SNAPLEN + 10).to_le_bytes());
        assert_eq!(bytes.len(), 24 + 16 + SNAPLEN as usize);
    }
}
