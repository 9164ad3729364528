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
//! A capture file outlives the process that writes it: [`open_append`] opens one so that a
//! restarted bridge continues the capture of its earlier lives instead of truncating it. It
//! writes the header only when the file is new or empty, refuses a file that is not a pcap
//! file this module writes (another magic, link type or a corrupt record), and cuts a last
//! record that a killed writer left incomplete, so that every record after it is readable.
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

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Magic number of a classic pcap file with microsecond timestamps.
pub const MAGIC: u32 = 0xa1b2_c3d4;
/// `LINKTYPE_ETHERNET`.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// Snapshot length written into the header: frames longer than this are truncated in the
/// file (262144 is tcpdump's own maximum; every vnet frame fits).
pub const SNAPLEN: u32 = 262_144;

/// Length of the file header.
pub const HEADER_LEN: usize = 24;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 16;

/// Why [`open_append`] refused a capture file.
#[derive(Debug, thiserror::Error)]
pub enum PcapOpenError {
    /// The file could not be opened, read, cut or written.
    #[error("capture file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file has content that is not a capture this module can append to.
    #[error("capture file {} is not a pcap file this bridge can append to: {reason} (give a new path, or remove the file)", path.display())]
    NotPcap {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

/// An opened capture file: records are appended to `file`.
#[derive(Debug)]
pub struct AppendedCapture {
    /// The file, opened for appending, its header in place.
    pub file: File,
    /// How many whole records of earlier captures it holds.
    pub earlier_records: u64,
    /// How many bytes of a last, incomplete record were cut off (left by a killed writer).
    pub cut_bytes: u64,
}

/// The header this module writes.
fn file_header() -> [u8; HEADER_LEN] {
    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4..6].copy_from_slice(&2u16.to_le_bytes());
    header[6..8].copy_from_slice(&4u16.to_le_bytes());
    // this zone and sigfigs: 0
    header[16..20].copy_from_slice(&SNAPLEN.to_le_bytes());
    header[20..24].copy_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    header
}

/// Opens (or creates) the capture file at `path` for appending, never truncating a capture
/// already there: a new or empty file gets the header; an existing one must start with the
/// header of a little-endian, microsecond, Ethernet pcap file (as [`PcapWriter`] writes),
/// and its records must be consistent. A last record cut short (its writer was killed
/// mid-write) is cut off, so that the records appended after it are read correctly. Wrap
/// the returned file with [`PcapWriter::appending`].
pub fn open_append(path: &Path) -> Result<AppendedCapture, PcapOpenError> {
    let io_err = |source| PcapOpenError::Io {
        path: path.to_path_buf(),
        source,
    };
    let not_pcap = |reason: String| PcapOpenError::NotPcap {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len == 0 {
        file.write_all(&file_header()).map_err(io_err)?;
        return Ok(AppendedCapture {
            file,
            earlier_records: 0,
            cut_bytes: 0,
        });
    }
    let mut reader = BufReader::new(&mut file);
    let mut header = [0u8; HEADER_LEN];
    if len < HEADER_LEN as u64 {
        return Err(not_pcap(format!(
            "{len} bytes, shorter than a pcap header ({HEADER_LEN})"
        )));
    }
    reader.read_exact(&mut header).map_err(io_err)?;
    let field = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
    if field(0) != MAGIC {
        return Err(not_pcap(format!(
            "magic {:02x?}, expected {:02x?} (little-endian, microseconds)",
            &header[0..4],
            MAGIC.to_le_bytes()
        )));
    }
    if field(20) != LINKTYPE_ETHERNET {
        return Err(not_pcap(format!(
            "link type {}, expected {LINKTYPE_ETHERNET} (Ethernet)",
            field(20)
        )));
    }
    let snaplen = field(16);
    // Walk the records: each one's captured length must fit the snapshot length.
    let mut at = HEADER_LEN as u64;
    let mut records = 0u64;
    let mut record = [0u8; RECORD_HEADER_LEN];
    while len - at >= RECORD_HEADER_LEN as u64 {
        reader.read_exact(&mut record).map_err(io_err)?;
        let incl = u32::from_le_bytes(record[8..12].try_into().expect("4 bytes"));
        let orig = u32::from_le_bytes(record[12..16].try_into().expect("4 bytes"));
        if incl > snaplen || incl > orig {
            return Err(not_pcap(format!(
                "record {records} at offset {at} claims {incl} captured bytes of {orig}                  (snapshot length {snaplen})"
            )));
        }
        let end = at + RECORD_HEADER_LEN as u64 + u64::from(incl);
        if end > len {
            break;
        }
        reader.seek_relative(i64::from(incl)).map_err(io_err)?;
        records += 1;
        at = end;
    }
    drop(reader);
    let cut_bytes = len - at;
    if cut_bytes > 0 {
        file.set_len(at).map_err(io_err)?;
    }
    // Appending: every write goes to the end, whatever the read position.
    file.seek(SeekFrom::End(0)).map_err(io_err)?;
    Ok(AppendedCapture {
        file,
        earlier_records: records,
        cut_bytes,
    })
}

/// Writes frames into a pcap stream.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    frames: u64,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header.
    pub fn new(mut out: W) -> io::Result<Self> {
        out.write_all(&file_header())?;
        Ok(PcapWriter { out, frames: 0 })
    }

    /// Appends records to a stream that already has its file header (a file opened with
    /// [`open_append`]); writes no header.
    pub fn appending(out: W) -> Self {
        PcapWriter { out, frames: 0 }
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

    fn temp_file(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("pcap-unit-{}-{tag}.pcap", std::process::id()))
    }

    /// Writes `frames` one-byte-tagged 10-byte frames through a writer opened by
    /// `open_append`, as a bridge life would.
    fn life(path: &Path, tag: u8, frames: u8) -> AppendedCapture {
        let opened = open_append(path).unwrap();
        let earlier = AppendedCapture {
            file: opened.file.try_clone().unwrap(),
            ..opened
        };
        let mut w = PcapWriter::appending(opened.file);
        for i in 0..frames {
            w.write_frame_at(u64::from(i), 0, &[tag; 10]).unwrap();
        }
        w.flush().unwrap();
        earlier
    }

    /// The tags of the records of a capture file, checking its one header.
    fn tags(bytes: &[u8]) -> Vec<u8> {
        assert_eq!(&bytes[..HEADER_LEN], &file_header());
        let mut at = HEADER_LEN;
        let mut tags = Vec::new();
        while at < bytes.len() {
            let incl = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
            tags.push(bytes[at + RECORD_HEADER_LEN]);
            at += RECORD_HEADER_LEN + incl;
        }
        assert_eq!(at, bytes.len(), "the last record is whole");
        tags
    }

    #[test]
    fn a_capture_reopened_keeps_its_earlier_records_and_its_one_header() {
        let path = temp_file("reopen");
        let _ = std::fs::remove_file(&path);
        let first = life(&path, 1, 2);
        assert_eq!((first.earlier_records, first.cut_bytes), (0, 0));
        let second = life(&path, 2, 3);
        assert_eq!((second.earlier_records, second.cut_bytes), (2, 0));
        // An empty file (e.g. `touch`ed) gets a header like a new one.
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(tags(&bytes), [1, 1, 2, 2, 2]);
        std::fs::write(&path, b"").unwrap();
        life(&path, 3, 1);
        assert_eq!(tags(&std::fs::read(&path).unwrap()), [3]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_last_record_cut_by_a_killed_writer_is_cut_off_before_appending() {
        let path = temp_file("cut");
        let _ = std::fs::remove_file(&path);
        life(&path, 1, 2);
        let mut bytes = std::fs::read(&path).unwrap();
        // Half of a third record: its header and 4 of its 10 bytes.
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 10, 0, 0, 0, 9, 9, 9, 9]);
        std::fs::write(&path, &bytes).unwrap();
        let second = life(&path, 2, 1);
        assert_eq!((second.earlier_records, second.cut_bytes), (2, 20));
        assert_eq!(tags(&std::fs::read(&path).unwrap()), [1, 1, 2]);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_file_that_is_not_our_pcap_is_refused_and_left_alone() {
        let path = temp_file("foreign");
        let mut other_link = file_header();
        other_link[20] = 101; // LINKTYPE_RAW
        let mut bad_record = file_header().to_vec();
        bad_record.extend_from_slice(&[0; 8]);
        bad_record.extend_from_slice(&(SNAPLEN + 1).to_le_bytes());
        bad_record.extend_from_slice(&(SNAPLEN + 1).to_le_bytes());
        let cases: [(&[u8], &str); 4] = [
            (
                b"#!/bin/sh\necho this is a script, not a capture\n",
                "magic",
            ),
            (b"short", "shorter than a pcap header"),
            (&other_link, "link type 101"),
            (&bad_record, "record 0 at offset 24"),
        ];
        for (content, why) in cases {
            std::fs::write(&path, content).unwrap();
            let err = open_append(&path).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, PcapOpenError::NotPcap { .. }), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(text.contains("not a pcap file"), "{text}");
            assert_eq!(
                std::fs::read(&path).unwrap(),
                content,
                "the file is untouched"
            );
        }
        let _ = std::fs::remove_file(&path);
    }
}
