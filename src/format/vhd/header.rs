//! The 1024-byte dynamic disk header ("cxsparse", big-endian) of dynamic and differencing
//! VHDs: where the BAT is, how many entries it has, the block size, and for a differencing
//! disk who its parent is (UUID, time stamp, UTF-16 name) and where to find it (eight parent
//! locator entries pointing at platform-specific paths stored elsewhere in the file).

use super::footer::checksum;
use crate::error::{Error, Result};
use crate::meta::bytes::{u32_be, u64_be};

pub const HEADER_LEN: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// A BAT entry, or the header's unused next-structure offset: no block.
pub const UNUSED: u32 = 0xffff_ffff;
/// Windows paths are at most 32767 UTF-16 units; a longer locator is hostile.
pub const MAX_LOCATOR_LEN: u32 = 65_536;

const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_CHECKSUM: usize = 36;
const OFF_PARENT_UUID: usize = 40;
const OFF_PARENT_TIMESTAMP: usize = 56;
const OFF_PARENT_NAME: usize = 64;
const PARENT_NAME_LEN: usize = 512;
const OFF_LOCATORS: usize = 576;
const LOCATOR_ENTRY_LEN: usize = 24;
const LOCATOR_COUNT: usize = 8;

/// Relative Windows path, UTF-16LE (e.g. `.\base.vhd`).
pub const W2RU: [u8; 4] = *b"W2ru";
/// Absolute Windows path, UTF-16LE (e.g. `C:\images\base.vhd`).
pub const W2KU: [u8; 4] = *b"W2ku";

/// One parent locator entry: a platform code and where its data lies in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    pub code: [u8; 4],
    /// Reserved space: sectors per the spec, bytes as Virtual PC and Hyper-V write it.
    pub space: u32,
    pub length: u32,
    pub offset: u64,
}

impl Locator {
    /// The file range holding the locator's data (its length, not its reserved space).
    pub fn data_range(&self) -> Result<std::ops::Range<u64>> {
        let end = self
            .offset
            .checked_add(u64::from(self.length))
            .ok_or_else(|| Error::corrupt("parent locator data offset overflows"))?;
        Ok(self.offset..end)
    }

    pub fn code_text(&self) -> String {
        self.code.escape_ascii().to_string()
    }
}

/// A parsed dynamic disk header, checksum checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    /// The parent's name from the header (UTF-16BE, up to the first NUL).
    pub parent_name: String,
    /// The locator entries in use (platform code not zero), in header order.
    pub locators: Vec<Locator>,
}

impl DynHeader {
    pub fn parse(raw: &[u8]) -> Result<DynHeader> {
        let raw = raw
            .get(..HEADER_LEN)
            .ok_or_else(|| Error::corrupt("the dynamic disk header is shorter than 1024 bytes"))?;
        if &raw[..8] != COOKIE {
            return Err(Error::corrupt(
                "no \"cxsparse\" cookie in the dynamic disk header",
            ));
        }
        let stored = u32_be(raw, OFF_CHECKSUM, "checksum")?;
        let computed = checksum(raw, OFF_CHECKSUM);
        if stored != computed {
            return Err(Error::corrupt(format!(
                "dynamic disk header checksum {stored:#010x} does not match its contents \
                 ({computed:#010x})"
            )));
        }
        let mut parent_uuid = [0u8; 16];
        parent_uuid.copy_from_slice(&raw[OFF_PARENT_UUID..OFF_PARENT_UUID + 16]);
        let name = &raw[OFF_PARENT_NAME..OFF_PARENT_NAME + PARENT_NAME_LEN];
        let units = name
            .chunks_exact(2)
            .map(|u| u16::from_be_bytes([u[0], u[1]]));
        let mut locators = Vec::new();
        for i in 0..LOCATOR_COUNT {
            let at = OFF_LOCATORS + i * LOCATOR_ENTRY_LEN;
            let code = [raw[at], raw[at + 1], raw[at + 2], raw[at + 3]];
            if code == [0; 4] {
                continue;
            }
            locators.push(Locator {
                code,
                space: u32_be(raw, at + 4, "platform data space")?,
                length: u32_be(raw, at + 8, "platform data length")?,
                offset: u64_be(raw, at + 16, "platform data offset")?,
            });
        }
        Ok(DynHeader {
            table_offset: u64_be(raw, OFF_TABLE_OFFSET, "table offset")?,
            version: u32_be(raw, OFF_VERSION, "header version")?,
            max_table_entries: u32_be(raw, OFF_MAX_ENTRIES, "max table entries")?,
            block_size: u32_be(raw, OFF_BLOCK_SIZE, "block size")?,
            parent_uuid,
            parent_timestamp: u32_be(raw, OFF_PARENT_TIMESTAMP, "parent time stamp")?,
            parent_name: utf16_until_nul(units),
            locators,
        })
    }
}

/// The raw header `raw` (checked by `DynHeader::parse`) with another max table entries,
/// resealed; every other byte as read.
pub fn with_max_entries(raw: &[u8], entries: u32) -> Result<[u8; HEADER_LEN]> {
    let mut out: [u8; HEADER_LEN] = raw
        .get(..HEADER_LEN)
        .and_then(|r| r.try_into().ok())
        .ok_or_else(|| Error::corrupt("the dynamic disk header is shorter than 1024 bytes"))?;
    out[OFF_MAX_ENTRIES..OFF_MAX_ENTRIES + 4].copy_from_slice(&entries.to_be_bytes());
    let sum = checksum(&out, OFF_CHECKSUM);
    out[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    Ok(out)
}

/// The text of UTF-16 `units` up to the first NUL; unpaired surrogates become U+FFFD.
pub fn utf16_until_nul(units: impl Iterator<Item = u16>) -> String {
    char::decode_utf16(units.take_while(|&u| u != 0))
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// The path a locator's data holds, for the platforms imgfs follows: W2ru and W2ku are
/// UTF-16LE. `None` for other platforms (Mac aliases, the deprecated Wi2r/Wi2k).
pub fn locator_path(code: [u8; 4], data: &[u8]) -> Option<String> {
    if code != W2RU && code != W2KU {
        return None;
    }
    let units = data
        .chunks_exact(2)
        .map(|u| u16::from_le_bytes([u[0], u[1]]));
    Some(utf16_until_nul(units))
}

/// What `build` puts into a header (for `make`).
pub struct NewHeader<'a> {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
    pub parent_uuid: [u8; 16],
    pub parent_timestamp: u32,
    pub parent_name: &'a str,
    pub locators: &'a [Locator],
}

/// Serialises a dynamic disk header with its checksum sealed.
pub fn build(new: &NewHeader<'_>) -> Result<[u8; HEADER_LEN]> {
    let mut raw = [0u8; HEADER_LEN];
    raw[..8].copy_from_slice(COOKIE);
    raw[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    raw[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&new.table_offset.to_be_bytes());
    raw[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    raw[OFF_MAX_ENTRIES..OFF_MAX_ENTRIES + 4].copy_from_slice(&new.max_table_entries.to_be_bytes());
    raw[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&new.block_size.to_be_bytes());
    raw[OFF_PARENT_UUID..OFF_PARENT_UUID + 16].copy_from_slice(&new.parent_uuid);
    raw[OFF_PARENT_TIMESTAMP..OFF_PARENT_TIMESTAMP + 4]
        .copy_from_slice(&new.parent_timestamp.to_be_bytes());
    let name: Vec<u8> = new
        .parent_name
        .encode_utf16()
        .flat_map(u16::to_be_bytes)
        .collect();
    raw.get_mut(OFF_PARENT_NAME..OFF_PARENT_NAME + name.len())
        .filter(|_| name.len() < PARENT_NAME_LEN)
        .ok_or_else(|| Error::out_of_range("the parent name is longer than 255 characters"))?
        .copy_from_slice(&name);
    if new.locators.len() > LOCATOR_COUNT {
        return Err(Error::out_of_range("more than 8 parent locators"));
    }
    for (i, locator) in new.locators.iter().enumerate() {
        let at = OFF_LOCATORS + i * LOCATOR_ENTRY_LEN;
        raw[at..at + 4].copy_from_slice(&locator.code);
        raw[at + 4..at + 8].copy_from_slice(&locator.space.to_be_bytes());
        raw[at + 8..at + 12].copy_from_slice(&locator.length.to_be_bytes());
        raw[at + 16..at + 24].copy_from_slice(&locator.offset.to_be_bytes());
    }
    let sum = checksum(&raw, OFF_CHECKSUM);
    raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    Ok(raw)
}

/// A path as a W2ru/W2ku locator stores it: UTF-16LE.
pub fn locator_bytes(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(test)]
pub mod testing {
    use super::*;

    /// `raw` (a header) with its checksum recomputed.
    pub fn reseal(raw: &mut [u8]) {
        let sum = checksum(&raw[..HEADER_LEN], OFF_CHECKSUM);
        raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn sample() -> [u8; HEADER_LEN] {
        let locators = [
            Locator {
                code: W2RU,
                space: 512,
                length: 20,
                offset: 0x600,
            },
            Locator {
                code: W2KU,
                space: 512,
                length: 40,
                offset: 0x800,
            },
        ];
        build(&NewHeader {
            table_offset: 0xa00,
            max_table_entries: 5,
            block_size: 2 << 20,
            parent_uuid: [3; 16],
            parent_timestamp: 77,
            parent_name: "base.vhd",
            locators: &locators,
        })
        .unwrap()
    }

    #[test]
    fn headers_round_trip_and_checksums_are_checked() {
        let raw = sample();
        let h = DynHeader::parse(&raw).unwrap();
        assert_eq!(
            (h.table_offset, h.max_table_entries, h.block_size),
            (0xa00, 5, 2 << 20)
        );
        assert_eq!(h.version, 0x0001_0000);
        assert_eq!((h.parent_uuid, h.parent_timestamp), ([3; 16], 77));
        assert_eq!(h.parent_name, "base.vhd");
        assert_eq!(h.locators.len(), 2);
        assert_eq!(h.locators[1].code_text(), "W2ku");
        assert_eq!(h.locators[0].data_range().unwrap(), 0x600..0x614);

        let mut bad = raw;
        bad[33] ^= 1;
        let e = DynHeader::parse(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("header checksum"), "{e}");
        bad[0] = b'X';
        testing::reseal(&mut bad);
        assert!(DynHeader::parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("cxsparse"));
        assert!(DynHeader::parse(&raw[..1000]).is_err());
    }

    #[test]
    fn locator_paths_decode_windows_platforms_only() {
        let bytes = locator_bytes(".\\base.vhd\0junk");
        assert_eq!(locator_path(W2RU, &bytes).as_deref(), Some(".\\base.vhd"));
        assert_eq!(locator_path(*b"Mac ", &bytes), None);
        // An odd length and an unpaired surrogate decode without a panic.
        let odd = [0x41, 0, 0x00, 0xd8, 0x42];
        assert_eq!(locator_path(W2KU, &odd).as_deref(), Some("A\u{fffd}"));
        let long = "x".repeat(300);
        let e = build(&NewHeader {
            table_offset: 0,
            max_table_entries: 0,
            block_size: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: &long,
            locators: &[],
        })
        .unwrap_err();
        assert!(e.to_string().contains("255"), "{e}");
    }
}
