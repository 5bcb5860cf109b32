//! The VHDX metadata log: finding and replaying the active sequence of a dirty log, and
//! building the entries our own BAT updates go through.
//!
//! # Layout (a ring buffer of 4 KiB sectors at the header's log offset)
//!
//! ```text
//! entry      descriptor sectors, then one data sector per data descriptor
//! sector 0   header (64 bytes): "loge", CRC-32C over the whole entry, entry length, tail
//!            (log offset of the oldest entry of the sequence), sequence number, descriptor
//!            count, log GUID, flushed file offset, last file offset; then up to 126
//!            descriptors of 32 bytes; further descriptor sectors hold 128 each
//! "zero"     zero length, file offset, sequence number: zero a 4 KiB-aligned range
//! "desc"     trailing 4 bytes, leading 8 bytes, file offset, sequence number: write one 4 KiB
//!            sector, whose middle 4084 bytes are in the matching data sector
//! "data"     sequence high u32, 4084 bytes, sequence low u32
//! ```
//!
//! An entry is valid when its signature, CRC, lengths and sequence numbers (header, every
//! descriptor, every data sector) agree and its GUID is the header's log GUID. The active
//! sequence is found as section 2.3.3 of the spec says: scan for chains of valid entries with
//! consecutive sequence numbers whose head's tail lies inside the chain, keep the one with the
//! highest head sequence number, and replay it from its tail entry on.

use std::collections::HashMap;
use std::ops::Range;

use uuid::Uuid;

use super::header::{
    crc_with_zeroed_field, guid, overlaps, put_guid, seal, MIB, REGION_TABLE_SLOTS,
};
use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{put_bytes, u32_le, u64_le};

pub const SECTOR: u64 = 4096;
const SECTOR_LEN: usize = SECTOR as usize;
const ENTRY_SIGNATURE: &[u8; 4] = b"loge";
const ZERO_SIGNATURE: &[u8; 4] = b"zero";
const DESC_SIGNATURE: &[u8; 4] = b"desc";
const DATA_SIGNATURE: &[u8; 4] = b"data";
const HEADER_LEN: usize = 64;
const DESCRIPTOR_LEN: usize = 32;
const FIRST_SECTOR_DESCRIPTORS: u64 = 126;
const SECTOR_DESCRIPTORS: u64 = 128;
/// Dirty logs larger than this are refused rather than scanned: Hyper-V and QEMU use 1 MiB,
/// and the entries of the active sequence are held in memory while they are replayed (for a
/// read-only image, as long as it is open), so the per-image table budget bounds them.
pub const MAX_LOG_LEN: u64 = crate::meta::budget::MAX_TABLE_MEMORY;
/// Zero descriptors may make a replay write this many zero bytes at most.
const MAX_REPLAY_ZEROS: u64 = 4 << 30;
/// Bounds the active-sequence scan of a hostile log (chains re-walked from every sector).
const MAX_SCAN_STEPS: u64 = 1 << 22;

/// How many descriptor sectors `count` descriptors take.
pub fn descriptor_sectors(count: u64) -> u64 {
    if count <= FIRST_SECTOR_DESCRIPTORS {
        1
    } else {
        1 + (count - FIRST_SECTOR_DESCRIPTORS).div_ceil(SECTOR_DESCRIPTORS)
    }
}

/// The byte offset of descriptor `i` inside its entry.
fn descriptor_at(i: u64) -> usize {
    if i < FIRST_SECTOR_DESCRIPTORS {
        HEADER_LEN + DESCRIPTOR_LEN * i as usize
    } else {
        let rest = i - FIRST_SECTOR_DESCRIPTORS;
        SECTOR_LEN * (1 + (rest / SECTOR_DESCRIPTORS) as usize)
            + DESCRIPTOR_LEN * (rest % SECTOR_DESCRIPTORS) as usize
    }
}

/// The most 4 KiB sectors one entry can carry in a log of `log_len` bytes.
pub fn max_sectors_per_entry(log_len: u64) -> u64 {
    let total = log_len / SECTOR;
    let mut n = total.saturating_sub(1);
    while n > 0 && descriptor_sectors(n) + n > total {
        n -= 1;
    }
    n
}

/// One change a log entry makes to the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Zero { offset: u64, len: u64 },
    Write { offset: u64, sector: Vec<u8> },
}

impl Change {
    fn range(&self) -> Range<u64> {
        match self {
            Change::Zero { offset, len } => *offset..offset.saturating_add(*len),
            Change::Write { offset, .. } => *offset..offset.saturating_add(SECTOR),
        }
    }
}

/// What the header of a valid entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Summary {
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// A valid entry with its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub log_offset: u64,
    pub sequence: u64,
    pub changes: Vec<Change>,
}

/// The active sequence of a log: the entries to replay, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    pub entries: Vec<Entry>,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// Reads the log region `log` of `file`.
pub struct LogReader<'a> {
    file: &'a HostFile,
    log: Range<u64>,
    log_guid: Uuid,
}

impl<'a> LogReader<'a> {
    pub fn new(file: &'a HostFile, log: Range<u64>, log_guid: Uuid) -> Result<Self> {
        let len = log.end.saturating_sub(log.start);
        if len == 0 || len % SECTOR != 0 {
            return Err(Error::corrupt(format!(
                "the header names log GUID {{{log_guid}}} but the log region is {len} bytes"
            )));
        }
        if len > MAX_LOG_LEN {
            return Err(Error::unsupported(format!(
                "a {len}-byte log (imgfs replays logs of up to {MAX_LOG_LEN} bytes)"
            )));
        }
        Ok(LogReader {
            file,
            log,
            log_guid,
        })
    }

    fn len(&self) -> u64 {
        self.log.end - self.log.start
    }

    /// Reads `len` bytes of the ring from `at`, wrapping at its end.
    fn read_ring(&self, at: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        let first = (self.len() - at).min(len) as usize;
        let (head, tail) = buf.split_at_mut(first);
        self.file.read_exact_at(head, self.log.start + at)?;
        if !tail.is_empty() {
            self.file.read_exact_at(tail, self.log.start)?;
        }
        Ok(buf)
    }

    /// Checks the entry header at ring offset `at`; `None` if it is not a valid entry.
    fn summary(&self, at: u64) -> Result<Option<Summary>> {
        let raw = self.read_ring(at, SECTOR)?;
        let Some(summary) = self.parse_header(&raw) else {
            return Ok(None);
        };
        let whole = self.read_ring(at, summary.length)?;
        Ok(self.parse_changes(&whole, &summary).map(|_| summary))
    }

    fn parse_header(&self, raw: &[u8]) -> Option<Summary> {
        if raw.get(..4) != Some(&ENTRY_SIGNATURE[..]) {
            return None;
        }
        let length = u64::from(u32_le(raw, 8, "EntryLength").ok()?);
        let tail = u64::from(u32_le(raw, 12, "Tail").ok()?);
        let sequence = u64_le(raw, 16, "SequenceNumber").ok()?;
        let count = u64::from(u32_le(raw, 24, "DescriptorCount").ok()?);
        let entry_guid = guid(raw, 32, "LogGuid").ok()?;
        let ok = length >= SECTOR
            && length % SECTOR == 0
            && length <= self.len()
            && tail % SECTOR == 0
            && tail < self.len()
            && sequence > 0
            && entry_guid == self.log_guid
            && descriptor_sectors(count) <= length / SECTOR;
        ok.then_some(Summary {
            length,
            tail,
            sequence,
            flushed_file_offset: u64_le(raw, 48, "FlushedFileOffset").ok()?,
            last_file_offset: u64_le(raw, 56, "LastFileOffset").ok()?,
        })
    }

    /// Checks the CRC and every descriptor and data sector of a whole entry; its changes.
    fn parse_changes(&self, whole: &[u8], summary: &Summary) -> Option<Vec<Change>> {
        let stored = u32_le(whole, 4, "entry checksum").ok()?;
        if crc_with_zeroed_field(whole, 4) != stored {
            return None;
        }
        let count = u64::from(u32_le(whole, 24, "DescriptorCount").ok()?);
        let seq = summary.sequence;
        let mut data_sector = descriptor_sectors(count) as usize;
        let mut changes = Vec::new();
        for i in 0..count {
            let d = whole.get(descriptor_at(i)..descriptor_at(i) + DESCRIPTOR_LEN)?;
            if u64_le(d, 24, "descriptor SequenceNumber").ok()? != seq {
                return None;
            }
            let offset = u64_le(d, 16, "descriptor FileOffset").ok()?;
            if offset % SECTOR != 0 {
                return None;
            }
            match d.get(..4)? {
                s if s == ZERO_SIGNATURE => {
                    let len = u64_le(d, 8, "ZeroLength").ok()?;
                    if len % SECTOR != 0 {
                        return None;
                    }
                    changes.push(Change::Zero { offset, len });
                }
                s if s == DESC_SIGNATURE => {
                    let at = data_sector * SECTOR_LEN;
                    let data = whole.get(at..at + SECTOR_LEN)?;
                    let high = u32_le(data, 4, "SequenceHigh").ok()?;
                    let low = u32_le(data, SECTOR_LEN - 4, "SequenceLow").ok()?;
                    if data.get(..4)? != DATA_SIGNATURE
                        || (u64::from(high) << 32 | u64::from(low)) != seq
                    {
                        return None;
                    }
                    let mut sector = Vec::with_capacity(SECTOR_LEN);
                    sector.extend_from_slice(d.get(8..16)?);
                    sector.extend_from_slice(data.get(8..SECTOR_LEN - 4)?);
                    sector.extend_from_slice(d.get(4..8)?);
                    changes.push(Change::Write { offset, sector });
                    data_sector += 1;
                }
                _ => return None,
            }
        }
        Some(changes)
    }

    /// Finds the active sequence. `Ok(None)` when the log holds no valid sequence.
    pub fn active_sequence(&self) -> Result<Option<Sequence>> {
        let len = self.len();
        let mut cache: HashMap<u64, Option<Summary>> = HashMap::new();
        let mut steps = 0u64;
        let mut valid_at = |at: u64| -> Result<Option<Summary>> {
            steps += 1;
            if steps > MAX_SCAN_STEPS {
                return Err(Error::corrupt(
                    "the log is too tangled to find its active sequence",
                ));
            }
            if let Some(known) = cache.get(&at) {
                return Ok(*known);
            }
            let summary = self.summary(at)?;
            cache.insert(at, summary);
            Ok(summary)
        };
        // (offsets of the chain from its tail entry, head summary)
        let mut candidate: Option<(Vec<u64>, Summary)> = None;
        let (mut tail, mut old_tail) = (0u64, 0u64);
        loop {
            let mut chain: Vec<(u64, Summary)> = Vec::new();
            let mut head = tail;
            while let Some(s) = valid_at(head)? {
                if let Some((_, last)) = chain.last() {
                    if last.sequence.checked_add(1) != Some(s.sequence) {
                        break;
                    }
                }
                if chain.len() as u64 >= len / SECTOR {
                    break;
                }
                chain.push((head, s));
                head = (head + s.length) % len;
            }
            let complete = chain.last().and_then(|(_, last)| {
                chain
                    .iter()
                    .position(|(at, _)| *at == last.tail)
                    .map(|from| (from, *last))
            });
            if let Some((from, last)) = complete {
                let newer = match &candidate {
                    Some((_, c)) => last.sequence > c.sequence,
                    None => true,
                };
                if newer {
                    candidate = Some((chain[from..].iter().map(|(at, _)| *at).collect(), last));
                }
                tail = head;
            } else {
                tail = (tail + SECTOR) % len;
            }
            // No progress means the whole ring was scanned (a chain may wrap back to where the
            // scan started).
            if tail <= old_tail {
                break;
            }
            old_tail = tail;
        }
        let Some((offsets, head)) = candidate else {
            return Ok(None);
        };
        let mut entries = Vec::with_capacity(offsets.len());
        for at in offsets {
            let raw = self.read_ring(at, SECTOR)?;
            let summary = self
                .parse_header(&raw)
                .ok_or_else(|| self.changed_under_us(at))?;
            let whole = self.read_ring(at, summary.length)?;
            let changes = self
                .parse_changes(&whole, &summary)
                .ok_or_else(|| self.changed_under_us(at))?;
            entries.push(Entry {
                log_offset: at,
                sequence: summary.sequence,
                changes,
            });
        }
        Ok(Some(Sequence {
            entries,
            flushed_file_offset: head.flushed_file_offset,
            last_file_offset: head.last_file_offset,
        }))
    }

    fn changed_under_us(&self, at: u64) -> Error {
        Error::corrupt(format!(
            "log entry at log offset {at:#x} changed while it was read"
        ))
    }
}

impl Sequence {
    /// Checks that replaying cannot damage what it must not touch: the file type identifier
    /// and headers (never logged), the log itself; and that it stays within sane bounds.
    pub fn check_targets(&self, log: &Range<u64>, file_len: u64) -> Result<()> {
        if self.flushed_file_offset > file_len {
            return Err(Error::corrupt(format!(
                "the log says the file was at least {} bytes, but it is {file_len}: it was \
                 truncated",
                self.flushed_file_offset
            )));
        }
        // QEMU refuses to grow the file past i64::MAX bytes, as the host would.
        let limit = file_len
            .max(self.last_file_offset)
            .checked_next_multiple_of(MIB)
            .filter(|&limit| i64::try_from(limit).is_ok())
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "the log says the file was {} bytes long, more than any file can be",
                    self.last_file_offset
                ))
            })?;
        let protected = 0..REGION_TABLE_SLOTS[0];
        let mut zeros = 0u64;
        for entry in &self.entries {
            for change in &entry.changes {
                let range = change.range();
                let why = if overlaps(&range, &protected) {
                    Some("the file identifier or the headers".to_string())
                } else if overlaps(&range, log) {
                    Some("the log itself".to_string())
                } else if range.end > limit {
                    Some(format!("beyond the end of the file ({limit} bytes)"))
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(Error::corrupt(format!(
                        "log entry {} (at log offset {:#x}) writes {:#x}..{:#x}, into {why}",
                        entry.sequence, entry.log_offset, range.start, range.end
                    )));
                }
                if let Change::Zero { len, .. } = change {
                    zeros = zeros.saturating_add(*len);
                }
            }
        }
        if zeros > MAX_REPLAY_ZEROS {
            return Err(Error::unsupported(format!(
                "the log zeroes {zeros} bytes (imgfs replays at most {MAX_REPLAY_ZEROS})"
            )));
        }
        Ok(())
    }

    /// Writes every change into `file`, oldest first, extends the file to the head entry's
    /// last file offset, and syncs.
    pub fn replay_into(&self, file: &HostFile) -> Result<()> {
        let zeros = vec![0u8; MIB as usize];
        for change in self.entries.iter().flat_map(|e| &e.changes) {
            match change {
                Change::Write { offset, sector } => file.write_all_at(sector, *offset)?,
                Change::Zero { offset, len } => {
                    let mut at = *offset;
                    let end = offset.saturating_add(*len);
                    while at < end {
                        let n = (end - at).min(MIB) as usize;
                        file.write_all_at(zeros.get(..n).unwrap_or_default(), at)?;
                        at += n as u64;
                    }
                }
            }
        }
        let len = file.len()?;
        if self.last_file_offset > len {
            file.write_all_at(&[0], self.last_file_offset - 1)?;
        }
        file.sync_data()
    }

    /// Applies every change to `overlay` instead of the file.
    pub fn replay_into_overlay(&self, overlay: &mut super::overlay::Overlay) {
        for change in self.entries.iter().flat_map(|e| &e.changes) {
            match change {
                Change::Write { offset, sector } => {
                    overlay.write(*offset, sector.as_slice().into())
                }
                Change::Zero { offset, len } => overlay.zero(*offset, *len),
            }
        }
    }

    pub fn change_count(&self) -> usize {
        self.entries.iter().map(|e| e.changes.len()).sum()
    }
}

/// What a new log entry records besides its sectors.
#[derive(Debug, Clone, Copy)]
pub struct EntryParams {
    pub log_guid: Uuid,
    pub sequence: u64,
    /// Ring offset of the oldest entry still to be applied (the entry itself for ours).
    pub tail: u32,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// Builds a log entry that writes each `(file offset, 4 KiB sector)` of `sectors`.
pub fn build_entry(params: &EntryParams, sectors: &[(u64, Vec<u8>)]) -> Result<Vec<u8>> {
    let count = sectors.len() as u64;
    let desc_sectors = descriptor_sectors(count);
    let entry_len = (desc_sectors + count) * SECTOR;
    let entry_len32 = u32::try_from(entry_len)
        .map_err(|_| Error::out_of_range("internal: log entry longer than 4 GiB"))?;
    let count32 =
        u32::try_from(count).map_err(|_| Error::out_of_range("internal: descriptor count"))?;
    let seq = params.sequence;
    let mut raw = vec![0u8; entry_len as usize];
    put_bytes(&mut raw, 0, ENTRY_SIGNATURE)?;
    put_bytes(&mut raw, 8, &entry_len32.to_le_bytes())?;
    put_bytes(&mut raw, 12, &params.tail.to_le_bytes())?;
    put_bytes(&mut raw, 16, &seq.to_le_bytes())?;
    put_bytes(&mut raw, 24, &count32.to_le_bytes())?;
    put_guid(&mut raw, 32, params.log_guid)?;
    put_bytes(&mut raw, 48, &params.flushed_file_offset.to_le_bytes())?;
    put_bytes(&mut raw, 56, &params.last_file_offset.to_le_bytes())?;
    for (i, (offset, sector)) in sectors.iter().enumerate() {
        if sector.len() != SECTOR_LEN || offset % SECTOR != 0 {
            return Err(Error::out_of_range(
                "internal: logged sector not 4 KiB aligned",
            ));
        }
        let d = descriptor_at(i as u64);
        put_bytes(&mut raw, d, DESC_SIGNATURE)?;
        put_bytes(&mut raw, d + 4, &sector[SECTOR_LEN - 4..])?;
        put_bytes(&mut raw, d + 8, &sector[..8])?;
        put_bytes(&mut raw, d + 16, &offset.to_le_bytes())?;
        put_bytes(&mut raw, d + 24, &seq.to_le_bytes())?;
        let at = (desc_sectors as usize + i) * SECTOR_LEN;
        put_bytes(&mut raw, at, DATA_SIGNATURE)?;
        put_bytes(&mut raw, at + 4, &((seq >> 32) as u32).to_le_bytes())?;
        put_bytes(&mut raw, at + 8, &sector[8..SECTOR_LEN - 4])?;
        put_bytes(&mut raw, at + SECTOR_LEN - 4, &(seq as u32).to_le_bytes())?;
    }
    seal(&mut raw, 4)?;
    Ok(raw)
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// Appends a zero descriptor to an entry built by `build_entry` with no sectors (the only
    /// shape tests need), and reseals it.
    pub fn add_zero_descriptor(entry: &mut [u8], offset: u64, len: u64) {
        let count = u32_le(entry, 24, "c").unwrap();
        assert_eq!(count, 0, "only for entries without data descriptors");
        let seq = u64_le(entry, 16, "s").unwrap();
        let d = descriptor_at(0);
        entry[d..d + 4].copy_from_slice(ZERO_SIGNATURE);
        entry[d + 8..d + 16].copy_from_slice(&len.to_le_bytes());
        entry[d + 16..d + 24].copy_from_slice(&offset.to_le_bytes());
        entry[d + 24..d + 32].copy_from_slice(&seq.to_le_bytes());
        entry[24..28].copy_from_slice(&1u32.to_le_bytes());
        seal(entry, 4).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    const GUID: Uuid = Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888);

    fn params(sequence: u64, tail: u32) -> EntryParams {
        EntryParams {
            log_guid: GUID,
            sequence,
            tail,
            flushed_file_offset: MIB,
            last_file_offset: 2 * MIB,
        }
    }

    fn sector(byte: u8) -> Vec<u8> {
        let mut s = vec![byte; SECTOR_LEN];
        s[0] = 0xf0; // leading and trailing bytes live in the descriptor
        s[SECTOR_LEN - 1] = 0x0f;
        s
    }

    /// A file with a 1 MiB log at offset 0 holding `entries` at their ring offsets.
    fn log_file(dir: &TempDir, entries: &[(u64, Vec<u8>)]) -> HostFile {
        let mut log = vec![0u8; MIB as usize];
        for (at, e) in entries {
            for (i, b) in e.iter().enumerate() {
                log[(*at as usize + i) % MIB as usize] = *b;
            }
        }
        let path = dir.path().join("log");
        std::fs::write(&path, &log).unwrap();
        HostFile::open(&path, false).unwrap()
    }

    fn active(file: &HostFile) -> Option<Sequence> {
        LogReader::new(file, 0..MIB, GUID)
            .unwrap()
            .active_sequence()
            .unwrap()
    }

    /// A dirty log is held in memory while replayed: one larger than the per-image table
    /// budget is refused before anything is read.
    #[test]
    fn dirty_logs_beyond_the_memory_budget_are_refused() {
        let dir = TempDir::new();
        let file = log_file(&dir, &[]);
        assert!(LogReader::new(&file, 0..MAX_LOG_LEN, GUID).is_ok());
        let e = LogReader::new(&file, 0..MAX_LOG_LEN + SECTOR, GUID)
            .err()
            .unwrap();
        assert!(e.to_string().contains("imgfs replays logs of up to"), "{e}");
    }

    #[test]
    fn descriptor_geometry() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(descriptor_sectors(254), 2);
        assert_eq!(descriptor_sectors(255), 3);
        assert_eq!(descriptor_at(126), SECTOR_LEN);
        assert_eq!(max_sectors_per_entry(MIB), 254);
    }

    #[test]
    fn built_entries_parse_back_to_their_changes() {
        let dir = TempDir::new();
        let sectors: Vec<(u64, Vec<u8>)> = (0..130)
            .map(|i| (3 * MIB + i * SECTOR, sector(i as u8)))
            .collect();
        let entry = build_entry(&params(7, 0), &sectors).unwrap();
        assert_eq!(entry.len(), (2 + 130) * SECTOR_LEN);
        let file = log_file(&dir, &[(0, entry)]);
        let seq = active(&file).unwrap();
        assert_eq!(seq.entries.len(), 1);
        assert_eq!(seq.entries[0].sequence, 7);
        let expected: Vec<Change> = sectors
            .iter()
            .map(|(offset, s)| Change::Write {
                offset: *offset,
                sector: s.clone(),
            })
            .collect();
        assert_eq!(seq.entries[0].changes, expected);
        assert_eq!(
            (seq.flushed_file_offset, seq.last_file_offset),
            (MIB, 2 * MIB)
        );
    }

    #[test]
    fn the_newest_complete_chain_wins_and_replays_from_its_tail() {
        let dir = TempDir::new();
        let s = |b| vec![(4 * MIB, sector(b))];
        let e = |seq, tail, b| build_entry(&params(seq, tail), &s(b)).unwrap();
        // An old chain 5 at 0; a newer chain 10, 11, 12 at 64K whose head's tail is entry 11.
        let entries = [
            (0, e(5, 0, 1)),
            (0x10000, e(10, 0x10000, 2)),
            (0x12000, e(11, 0x12000, 3)),
            (0x14000, e(12, 0x12000, 4)),
        ];
        let file = log_file(&dir, &entries);
        let seq = active(&file).unwrap();
        let got: Vec<u64> = seq.entries.iter().map(|e| e.sequence).collect();
        assert_eq!(got, [11, 12]);

        // A chain whose head's tail points outside it is incomplete; the old one is used.
        let entries = [(0, e(5, 0, 1)), (0x10000, e(10, 0x20000, 2))];
        let seq = active(&log_file(&dir, &entries)).unwrap();
        assert_eq!(seq.entries[0].sequence, 5);

        // Wrapping: an entry crossing the end of the ring.
        let entries = [(MIB - SECTOR, e(3, (MIB - SECTOR) as u32, 9))];
        let seq = active(&log_file(&dir, &entries)).unwrap();
        assert_eq!(
            seq.entries[0].changes,
            [Change::Write {
                offset: 4 * MIB,
                sector: sector(9)
            }]
        );
    }

    #[test]
    fn damaged_or_foreign_entries_are_not_valid() {
        let dir = TempDir::new();
        let good = build_entry(&params(2, 0), &[(4 * MIB, sector(1))]).unwrap();
        assert!(active(&log_file(&dir, &[(0, good.clone())])).is_some());
        let damage = |at: usize| {
            let mut e = good.clone();
            e[at] ^= 1;
            e
        };
        // CRC, descriptor, data sector body.
        for at in [200, 64, SECTOR_LEN + 100] {
            assert!(
                active(&log_file(&dir, &[(0, damage(at))])).is_none(),
                "byte {at}"
            );
        }
        // A data sector whose sequence number differs, CRC fixed up.
        let mut e = good.clone();
        e[SECTOR_LEN + 4] ^= 1;
        seal(&mut e, 4).unwrap();
        assert!(active(&log_file(&dir, &[(0, e)])).is_none());
        // Another log GUID.
        let other = EntryParams {
            log_guid: Uuid::from_u128(9),
            ..params(2, 0)
        };
        let e = build_entry(&other, &[(4 * MIB, sector(1))]).unwrap();
        assert!(active(&log_file(&dir, &[(0, e)])).is_none());
        // Sequence number zero, tail outside the log.
        for p in [params(0, 0), params(1, MIB as u32)] {
            let e = build_entry(&p, &[]).unwrap();
            assert!(active(&log_file(&dir, &[(0, e)])).is_none());
        }
    }

    #[test]
    fn targets_outside_their_place_are_refused() {
        let seq = |changes: Vec<Change>| Sequence {
            entries: vec![Entry {
                log_offset: 0,
                sequence: 1,
                changes,
            }],
            flushed_file_offset: MIB,
            last_file_offset: 8 * MIB,
        };
        let log = MIB..2 * MIB;
        let ok = seq(vec![Change::Zero {
            offset: 192 * 1024,
            len: SECTOR,
        }]);
        assert!(
            ok.check_targets(&log, 4 * MIB).is_ok(),
            "region tables go through the log"
        );
        for (change, needle) in [
            (
                Change::Zero {
                    offset: 64 * 1024,
                    len: SECTOR,
                },
                "headers",
            ),
            (
                Change::Write {
                    offset: MIB + SECTOR,
                    sector: sector(0),
                },
                "the log itself",
            ),
            (
                Change::Zero {
                    offset: 7 * MIB,
                    len: 2 * MIB,
                },
                "beyond the end",
            ),
        ] {
            let e = seq(vec![change]).check_targets(&log, 4 * MIB).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
        let truncated = seq(vec![]).check_targets(&log, MIB - 1).unwrap_err();
        assert!(truncated.to_string().contains("truncated"), "{truncated}");
        // Found by fuzzing: rounding a last file offset near u64::MAX up to 1 MiB overflowed.
        for last_file_offset in [u64::MAX, u64::MAX - MIB, 1 << 63] {
            let huge = Sequence {
                last_file_offset,
                ..seq(vec![])
            };
            let e = huge.check_targets(&log, 4 * MIB).unwrap_err();
            assert!(e.to_string().contains("more than any file"), "{e}");
        }
    }
}
