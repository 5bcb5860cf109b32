//! The 1024-byte dynamic disk header ("cxsparse", big-endian) of dynamic VHDs: where the BAT
//! is, how many entries it has, and the block size. (The parent fields of differencing disks
//! are not read yet.)

use super::footer::checksum;
use crate::error::{Error, Result};
use crate::meta::bytes::{u32_be, u64_be};

pub const HEADER_LEN: usize = 1024;
pub const COOKIE: &[u8; 8] = b"cxsparse";
/// A BAT entry, or the header's unused next-structure offset: no block.
pub const UNUSED: u32 = 0xffff_ffff;

const OFF_TABLE_OFFSET: usize = 16;
const OFF_VERSION: usize = 24;
const OFF_MAX_ENTRIES: usize = 28;
const OFF_BLOCK_SIZE: usize = 32;
const OFF_CHECKSUM: usize = 36;

/// A parsed dynamic disk header, checksum checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynHeader {
    pub table_offset: u64,
    pub version: u32,
    pub max_table_entries: u32,
    pub block_size: u32,
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
        Ok(DynHeader {
            table_offset: u64_be(raw, OFF_TABLE_OFFSET, "table offset")?,
            version: u32_be(raw, OFF_VERSION, "header version")?,
            max_table_entries: u32_be(raw, OFF_MAX_ENTRIES, "max table entries")?,
            block_size: u32_be(raw, OFF_BLOCK_SIZE, "block size")?,
        })
    }
}

/// What `build` puts into a header (for tests).
#[cfg(test)]
pub struct NewHeader {
    pub table_offset: u64,
    pub max_table_entries: u32,
    pub block_size: u32,
}

/// Serialises a dynamic disk header with its checksum sealed.
#[cfg(test)]
pub fn build(new: &NewHeader) -> Result<[u8; HEADER_LEN]> {
    let mut raw = [0u8; HEADER_LEN];
    raw[..8].copy_from_slice(COOKIE);
    raw[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
    raw[OFF_TABLE_OFFSET..OFF_TABLE_OFFSET + 8].copy_from_slice(&new.table_offset.to_be_bytes());
    raw[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&0x0001_0000u32.to_be_bytes());
    raw[OFF_MAX_ENTRIES..OFF_MAX_ENTRIES + 4].copy_from_slice(&new.max_table_entries.to_be_bytes());
    raw[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&new.block_size.to_be_bytes());
    let sum = checksum(&raw, OFF_CHECKSUM);
    raw[OFF_CHECKSUM..OFF_CHECKSUM + 4].copy_from_slice(&sum.to_be_bytes());
    Ok(raw)
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
        build(&NewHeader {
            table_offset: 0xa00,
            max_table_entries: 5,
            block_size: 2 << 20,
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
}
