//! The VHDX header section (the first MiB of the file): the file type identifier, the two
//! 4 KiB headers and the two copies of the region table, plus the GUID and CRC-32C helpers
//! every VHDX structure uses.
//!
//! ```text
//! 0        file type identifier: "vhdxfile", creator (UTF-16); never written by us
//! 64 KiB   header 1 (4 KiB): "head", CRC-32C, sequence number, file write / data write / log
//!          GUIDs, log version (0), version (1), log length, log offset
//! 128 KiB  header 2, same layout; the valid one with the higher sequence number is current
//! 192 KiB  region table 1 (64 KiB): "regi", CRC-32C, entry count, entries of
//!          (GUID, file offset, length, required)
//! 256 KiB  region table 2, a copy of table 1
//! ```
//!
//! Headers are never written through the log: an update writes a whole new header with the
//! next sequence number into the slot that is not current, then syncs.

use std::ops::Range;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::meta::bytes::{bytes16, put_bytes, u16_le, u32_le, u64_le};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SLOTS: [u64; 2] = [64 * KIB, 128 * KIB];
pub const HEADER_LEN: usize = 4096;
pub const REGION_TABLE_SLOTS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_LEN: usize = 64 * 1024;
/// The header section every other structure must stay out of.
pub const HEADER_SECTION_LEN: u64 = MIB;

const HEADER_SIGNATURE: &[u8; 4] = b"head";
const REGION_SIGNATURE: &[u8; 4] = b"regi";
const MAX_REGION_ENTRIES: u32 = 2047;

pub const BAT_REGION: Uuid = Uuid::from_u128(0x2dc27766_f623_4200_9d64_115e9bfd4a08);
pub const METADATA_REGION: Uuid = Uuid::from_u128(0x8b7ca206_4790_4b9a_b8fe_575f050f886e);

/// Reads a GUID stored the Microsoft way (first three fields little-endian).
pub fn guid(buf: &[u8], offset: usize, name: &str) -> Result<Uuid> {
    bytes16(buf, offset, name).map(Uuid::from_bytes_le)
}

pub fn put_guid(buf: &mut [u8], offset: usize, value: Uuid) -> Result<()> {
    put_bytes(buf, offset, &value.to_bytes_le())
}

/// CRC-32C of `buf` with the 4-byte checksum field at `checksum_at` taken as zero.
pub fn crc_with_zeroed_field(buf: &[u8], checksum_at: usize) -> u32 {
    let Some((head, rest)) = buf.split_at_checked(checksum_at) else {
        return crc32c::crc32c(buf);
    };
    let tail = rest.get(4..).unwrap_or_default();
    let crc = crc32c::crc32c_append(crc32c::crc32c(head), &[0u8; 4]);
    crc32c::crc32c_append(crc, tail)
}

/// Stores the CRC-32C of `buf` (computed with the field zeroed) at `checksum_at`.
pub fn seal(buf: &mut [u8], checksum_at: usize) -> Result<()> {
    put_bytes(buf, checksum_at, &[0; 4])?;
    let crc = crc32c::crc32c(buf);
    put_bytes(buf, checksum_at, &crc.to_le_bytes())
}

/// A fresh random GUID. Read from the kernel's random source: the uniqueness of these GUIDs is
/// what other implementations rely on, and a time-based value could repeat across hosts.
pub fn new_guid() -> Result<Uuid> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("read /dev/urandom for a new GUID", e))?;
    Ok(uuid::Builder::from_random_bytes(bytes).into_uuid())
}

/// One of the two 4 KiB headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub sequence: u64,
    pub file_write_guid: Uuid,
    pub data_write_guid: Uuid,
    pub log_guid: Uuid,
    pub log_version: u16,
    pub version: u16,
    pub log_length: u32,
    pub log_offset: u64,
}

impl Header {
    /// Parses a header slot; `Err` says why it is not a valid header (signature or checksum).
    pub fn parse(raw: &[u8]) -> Result<Header> {
        let raw = raw
            .get(..HEADER_LEN)
            .ok_or_else(|| Error::corrupt("header is shorter than 4 KiB"))?;
        if raw.get(..4) != Some(&HEADER_SIGNATURE[..]) {
            return Err(Error::corrupt("no \"head\" signature"));
        }
        let stored = u32_le(raw, 4, "header checksum")?;
        let computed = crc_with_zeroed_field(raw, 4);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "checksum {stored:#010x} does not match the contents ({computed:#010x})"
            )));
        }
        Ok(Header {
            sequence: u64_le(raw, 8, "SequenceNumber")?,
            file_write_guid: guid(raw, 16, "FileWriteGuid")?,
            data_write_guid: guid(raw, 32, "DataWriteGuid")?,
            log_guid: guid(raw, 48, "LogGuid")?,
            log_version: u16_le(raw, 64, "LogVersion")?,
            version: u16_le(raw, 66, "Version")?,
            log_length: u32_le(raw, 68, "LogLength")?,
            log_offset: u64_le(raw, 72, "LogOffset")?,
        })
    }

    /// The 4 KiB on-disk form, checksum included; the reserved space is zero.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut raw = vec![0u8; HEADER_LEN];
        put_bytes(&mut raw, 0, HEADER_SIGNATURE)?;
        put_bytes(&mut raw, 8, &self.sequence.to_le_bytes())?;
        put_guid(&mut raw, 16, self.file_write_guid)?;
        put_guid(&mut raw, 32, self.data_write_guid)?;
        put_guid(&mut raw, 48, self.log_guid)?;
        put_bytes(&mut raw, 64, &self.log_version.to_le_bytes())?;
        put_bytes(&mut raw, 66, &self.version.to_le_bytes())?;
        put_bytes(&mut raw, 68, &self.log_length.to_le_bytes())?;
        put_bytes(&mut raw, 72, &self.log_offset.to_le_bytes())?;
        seal(&mut raw, 4)?;
        Ok(raw)
    }

    /// The log region in the file, checked for alignment and against the header section and
    /// the file length; empty when the header has no log.
    pub fn log_range(&self, file_len: u64) -> Result<Range<u64>> {
        if self.log_length == 0 {
            return Ok(self.log_offset..self.log_offset);
        }
        let length = u64::from(self.log_length);
        if self.log_offset % MIB != 0 || length % MIB != 0 {
            return Err(Error::corrupt(format!(
                "log at {:#x}, {} bytes, is not aligned to 1 MiB",
                self.log_offset, self.log_length
            )));
        }
        let end = self
            .log_offset
            .checked_add(length)
            .filter(|&end| self.log_offset >= HEADER_SECTION_LEN && end <= file_len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "log at {:#x}, {} bytes, lies outside the file ({file_len} bytes) or in the \
                     header section",
                    self.log_offset, self.log_length
                ))
            })?;
        Ok(self.log_offset..end)
    }
}

/// Picks the current header from the two slots' raw bytes: the valid one with the higher
/// sequence number. Returns it and its slot index.
pub fn current_header(slots: [&[u8]; 2]) -> Result<(Header, usize)> {
    let parsed = slots.map(Header::parse);
    let (header, slot) = match parsed {
        [Ok(a), Ok(b)] if b.sequence > a.sequence => (b, 1),
        [Ok(a), _] => (a, 0),
        [Err(_), Ok(b)] => (b, 1),
        [Err(a), Err(b)] => {
            return Err(Error::corrupt(format!(
                "neither VHDX header is valid: header 1 (at 64 KiB): {}; header 2 (at 128 KiB): {}",
                a.message_text(),
                b.message_text()
            )))
        }
    };
    if header.version != 1 {
        return Err(Error::unsupported(format!(
            "VHDX header version {} (only version 1 is defined)",
            header.version
        ))
        .at_offset(HEADER_SLOTS[slot]));
    }
    if header.log_version != 0 && !header.log_guid.is_nil() {
        return Err(Error::unsupported(format!(
            "VHDX log version {} with a log to replay (only version 0 is defined)",
            header.log_version
        ))
        .at_offset(HEADER_SLOTS[slot]));
    }
    Ok((header, slot))
}

/// What the region table says about one region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionEntry {
    pub guid: Uuid,
    pub offset: u64,
    pub length: u32,
    pub required: bool,
}

/// Parses one copy of the region table (64 KiB).
pub fn parse_region_table(raw: &[u8]) -> Result<Vec<RegionEntry>> {
    let raw = raw
        .get(..REGION_TABLE_LEN)
        .ok_or_else(|| Error::corrupt("region table is shorter than 64 KiB"))?;
    if raw.get(..4) != Some(&REGION_SIGNATURE[..]) {
        return Err(Error::corrupt("no \"regi\" signature"));
    }
    let stored = u32_le(raw, 4, "region table checksum")?;
    let computed = crc_with_zeroed_field(raw, 4);
    if stored != computed {
        return Err(Error::corrupt(format!(
            "checksum {stored:#010x} does not match the contents ({computed:#010x})"
        )));
    }
    let count = u32_le(raw, 8, "EntryCount")?;
    if count > MAX_REGION_ENTRIES {
        return Err(Error::corrupt(format!(
            "{count} region entries, more than the {MAX_REGION_ENTRIES} allowed"
        )));
    }
    (0..count as usize)
        .map(|i| {
            let at = 16 + 32 * i;
            Ok(RegionEntry {
                guid: guid(raw, at, "region Guid")?,
                offset: u64_le(raw, at + 16, "region FileOffset")?,
                length: u32_le(raw, at + 24, "region Length")?,
                required: u32_le(raw, at + 28, "region Required")? & 1 != 0,
            })
        })
        .collect()
}

/// The BAT and metadata regions, checked against each other, the log and the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Regions {
    pub bat: Range<u64>,
    pub metadata: Range<u64>,
}

/// Validates the region entries: alignment, inside the file, no unknown required region, no
/// duplicates, no overlaps with each other, the header section or the log.
pub fn check_regions(entries: &[RegionEntry], log: &Range<u64>, file_len: u64) -> Result<Regions> {
    let mut bat = None;
    let mut metadata = None;
    let mut taken: Vec<(String, Range<u64>)> =
        vec![("the header section".into(), 0..HEADER_SECTION_LEN)];
    if !log.is_empty() {
        taken.push(("the log".into(), log.clone()));
    }
    for entry in entries {
        let name = match entry.guid {
            BAT_REGION => "BAT region",
            METADATA_REGION => "metadata region",
            _ if entry.required => {
                return Err(Error::unsupported(format!(
                    "the image needs region {{{}}}, which imgfs does not know",
                    entry.guid
                )))
            }
            _ => "unknown region",
        };
        let length = u64::from(entry.length);
        if entry.offset % MIB != 0 || length % MIB != 0 || length == 0 {
            return Err(Error::corrupt(format!(
                "{name} at {:#x}, {} bytes, is empty or not aligned to 1 MiB",
                entry.offset, entry.length
            )));
        }
        let end = entry
            .offset
            .checked_add(length)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "{name} at {:#x}, {} bytes, reaches beyond the end of the file ({file_len} \
                     bytes)",
                    entry.offset, entry.length
                ))
            })?;
        let range = entry.offset..end;
        if let Some((other, _)) = taken.iter().find(|(_, r)| overlaps(r, &range)) {
            return Err(Error::corrupt(format!(
                "{name} at {:#x}, {} bytes, overlaps {other}",
                entry.offset, entry.length
            )));
        }
        let slot = match entry.guid {
            BAT_REGION => &mut bat,
            METADATA_REGION => &mut metadata,
            _ => {
                taken.push((format!("region {{{}}}", entry.guid), range));
                continue;
            }
        };
        if slot.is_some() {
            return Err(Error::corrupt(format!(
                "the region table lists the {name} twice"
            )));
        }
        *slot = Some(range.clone());
        taken.push((format!("the {name}"), range));
    }
    match (bat, metadata) {
        (Some(bat), Some(metadata)) => Ok(Regions { bat, metadata }),
        (None, _) => Err(Error::corrupt("the region table has no BAT region")),
        (_, None) => Err(Error::corrupt("the region table has no metadata region")),
    }
}

pub fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Error text without the kind prefix, for combining two errors into one message.
trait MessageText {
    fn message_text(&self) -> String;
}

impl MessageText for Error {
    fn message_text(&self) -> String {
        let text = self.to_string();
        text.strip_prefix("corrupt image: ")
            .map(str::to_string)
            .unwrap_or(text)
    }
}

#[cfg(test)]
pub mod testing {
    use super::*;

    pub fn header(sequence: u64) -> Header {
        Header {
            sequence,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    pub fn region_table(entries: &[RegionEntry]) -> Vec<u8> {
        let mut raw = vec![0u8; REGION_TABLE_LEN];
        raw[..4].copy_from_slice(REGION_SIGNATURE);
        raw[8..12].copy_from_slice(&(entries.len() as u32).to_le_bytes());
        for (i, e) in entries.iter().enumerate() {
            let at = 16 + 32 * i;
            put_guid(&mut raw, at, e.guid).unwrap();
            raw[at + 16..at + 24].copy_from_slice(&e.offset.to_le_bytes());
            raw[at + 24..at + 28].copy_from_slice(&e.length.to_le_bytes());
            raw[at + 28..at + 32].copy_from_slice(&u32::from(e.required).to_le_bytes());
        }
        seal(&mut raw, 4).unwrap();
        raw
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn header_round_trips_and_checks_its_crc() {
        let h = header(7);
        let raw = h.to_bytes().unwrap();
        assert_eq!(Header::parse(&raw).unwrap(), h);
        let mut bad = raw.clone();
        bad[100] ^= 1;
        let e = Header::parse(&bad).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        // The checksum covers the whole 4 KiB with the field zeroed.
        assert_eq!(
            crc_with_zeroed_field(&raw, 4),
            u32_le(&raw, 4, "c").unwrap()
        );
    }

    #[test]
    fn current_header_is_the_valid_one_with_the_higher_sequence() {
        let (a, b) = (header(5).to_bytes().unwrap(), header(6).to_bytes().unwrap());
        assert_eq!(current_header([&a, &b]).unwrap().1, 1);
        assert_eq!(current_header([&b, &a]).unwrap().1, 0);
        let mut broken = b.clone();
        broken[4] ^= 0xff;
        let (h, slot) = current_header([&a, &broken]).unwrap();
        assert_eq!((h.sequence, slot), (5, 0), "the other header is used");
        let mut broken_a = a.clone();
        broken_a[0] = b'x';
        let e = current_header([&broken_a, &broken]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let text = e.to_string();
        assert!(
            text.contains("neither VHDX header") && text.contains("signature"),
            "{text}"
        );
        assert!(text.contains("checksum"), "{text}");
        let mut v2 = header(9);
        v2.version = 2;
        let v2 = v2.to_bytes().unwrap();
        assert_eq!(
            current_header([&a, &v2]).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }

    #[test]
    fn log_range_is_checked() {
        let mut h = header(1);
        assert_eq!(h.log_range(4 * MIB).unwrap(), MIB..2 * MIB);
        assert!(h.log_range(MIB + 4096).is_err(), "beyond the file");
        h.log_offset = 0;
        assert!(h.log_range(4 * MIB).is_err(), "in the header section");
        h.log_offset = MIB + 4096;
        assert!(h.log_range(4 * MIB).is_err(), "unaligned");
        h.log_offset = u64::MAX - MIB + 1;
        assert!(h.log_range(u64::MAX).is_err(), "overflow");
    }

    fn region(guid: Uuid, offset: u64, length: u32) -> RegionEntry {
        RegionEntry {
            guid,
            offset,
            length,
            required: true,
        }
    }

    #[test]
    fn region_table_checks_crc_overlaps_and_unknown_required_regions() {
        let entries = [
            region(BAT_REGION, 2 * MIB, MIB as u32),
            region(METADATA_REGION, 3 * MIB, MIB as u32),
        ];
        let raw = region_table(&entries);
        let parsed = parse_region_table(&raw).unwrap();
        assert_eq!(parsed, entries);
        let log = MIB..2 * MIB;
        let regions = check_regions(&parsed, &log, 4 * MIB).unwrap();
        assert_eq!(
            (regions.bat, regions.metadata),
            (2 * MIB..3 * MIB, 3 * MIB..4 * MIB)
        );

        let mut bad = raw.clone();
        bad[40] ^= 1;
        assert!(parse_region_table(&bad)
            .unwrap_err()
            .to_string()
            .contains("checksum"));

        let check = |entries: &[RegionEntry], needle: &str, kind: ErrorKind| {
            let e = check_regions(entries, &log, 8 * MIB).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            );
        };
        check(
            &[
                region(BAT_REGION, 2 * MIB, 2 * MIB as u32),
                region(METADATA_REGION, 3 * MIB, MIB as u32),
            ],
            "metadata region at 0x300000, 1048576 bytes, overlaps the BAT region",
            ErrorKind::Corrupt,
        );
        check(
            &[
                region(BAT_REGION, MIB, MIB as u32),
                region(METADATA_REGION, 3 * MIB, MIB as u32),
            ],
            "overlaps the log",
            ErrorKind::Corrupt,
        );
        check(
            &[region(BAT_REGION, 0, MIB as u32)],
            "overlaps the header section",
            ErrorKind::Corrupt,
        );
        check(
            &[region(BAT_REGION, 7 * MIB, 2 * MIB as u32)],
            "beyond the end of the file",
            ErrorKind::Corrupt,
        );
        check(
            &[region(BAT_REGION, 2 * MIB + 512, MIB as u32)],
            "not aligned",
            ErrorKind::Corrupt,
        );
        let unknown = Uuid::from_u128(0x1234);
        check(
            &[region(unknown, 5 * MIB, MIB as u32)],
            "region {00000000-0000-0000-0000-000000001234}",
            ErrorKind::Unsupported,
        );
        let optional = RegionEntry {
            required: false,
            ..region(unknown, 5 * MIB, MIB as u32)
        };
        check(
            &[optional, region(BAT_REGION, 5 * MIB, MIB as u32)],
            "overlaps region {00000000-0000-0000-0000-000000001234}",
            ErrorKind::Corrupt,
        );
        check(
            &[region(BAT_REGION, 2 * MIB, MIB as u32)],
            "no metadata region",
            ErrorKind::Corrupt,
        );
    }
}
