//! The VHDX metadata region: a 64 KiB table of (item GUID, offset, length, flags) entries
//! followed by the items themselves, and the parent locator of differencing images.
//!
//! ```text
//! region + 0          "metadata", reserved u16, entry count u16, 20 reserved bytes
//! region + 32 + 32*i  item GUID, offset u32 (>= 64 KiB, relative to the region), length u32
//!                     (<= 1 MiB), flags u32 (bit 0 IsUser, 1 IsVirtualDisk, 2 IsRequired)
//! items               file parameters (block size u32, flags u32: bit 0 leave blocks
//!                     allocated, bit 1 has parent), virtual disk size u64, page 83 id GUID,
//!                     logical sector size u32, physical sector size u32, parent locator
//! ```
//!
//! The parent locator is a locator type GUID, a reserved u16 and a key/value count u16, then
//! 12-byte entries (key offset u32, value offset u32, key length u16, value length u16) that
//! point at UTF-16LE strings inside the item.

use std::ops::Range;

use uuid::Uuid;

use super::header::{guid, MIB};
use crate::error::{Error, Result};
use crate::meta::bytes::u16_le;
use crate::meta::bytes::{u32_le, u64_le};

pub const TABLE_LEN: usize = 64 * 1024;
const SIGNATURE: &[u8; 8] = b"metadata";
const MAX_ENTRIES: u16 = 2047;
const MAX_ITEM_LEN: u32 = 1 << 20;
/// 64 TiB, the largest virtual disk the format allows.
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;

pub const FILE_PARAMETERS: Uuid = Uuid::from_u128(0xcaa16737_fa36_4d43_b3b6_33f0aa44e76b);
pub const VIRTUAL_DISK_SIZE: Uuid = Uuid::from_u128(0x2fa54224_cd1b_4876_b211_5dbed83bf4b8);
pub const PAGE_83_DATA: Uuid = Uuid::from_u128(0xbeca12ab_b2e6_4523_93ef_c309e000c746);
pub const LOGICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0x8141bf1d_a96f_4709_ba47_f233a8faab5f);
pub const PHYSICAL_SECTOR_SIZE: Uuid = Uuid::from_u128(0xcda348c7_445d_4471_9cc9_e9885251c556);
pub const PARENT_LOCATOR: Uuid = Uuid::from_u128(0xa8d35f2d_b30b_454d_abf7_d3d84834ab0c);
pub const VHDX_PARENT_TYPE: Uuid = Uuid::from_u128(0xb04aefb7_d19e_4a81_b789_25b8e9445913);

/// One entry of the metadata table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    pub item: Uuid,
    /// Relative to the start of the metadata region.
    pub offset: u32,
    pub length: u32,
    pub is_user: bool,
    pub required: bool,
}

impl TableEntry {
    pub fn range(&self) -> Range<usize> {
        let start = self.offset as usize;
        start..start.saturating_add(self.length as usize)
    }
}

/// Parses the 64 KiB metadata table of a region `region_len` bytes long, checking every item
/// lies inside the region, no two items overlap and no item appears twice.
pub fn parse_table(raw: &[u8], region_len: u64) -> Result<Vec<TableEntry>> {
    if raw.get(..8) != Some(&SIGNATURE[..]) {
        return Err(Error::corrupt(
            "the metadata table has no \"metadata\" signature",
        ));
    }
    let count = u16_le(raw, 10, "metadata EntryCount")?;
    if count > MAX_ENTRIES {
        return Err(Error::corrupt(format!(
            "the metadata table has {count} entries, more than the {MAX_ENTRIES} allowed"
        )));
    }
    let mut entries: Vec<TableEntry> = Vec::with_capacity(count.into());
    for i in 0..count as usize {
        let at = 32 + 32 * i;
        let flags = u32_le(raw, at + 24, "metadata entry flags")?;
        let entry = TableEntry {
            item: guid(raw, at, "metadata ItemId")?,
            offset: u32_le(raw, at + 16, "metadata entry Offset")?,
            length: u32_le(raw, at + 20, "metadata entry Length")?,
            is_user: flags & 1 != 0,
            required: flags & 4 != 0,
        };
        let name = format!("metadata item {{{}}}", entry.item);
        if entry.length > MAX_ITEM_LEN {
            return Err(Error::corrupt(format!(
                "{name} is {} bytes long, more than 1 MiB",
                entry.length
            )));
        }
        if entry.length == 0 {
            if entry.offset != 0 {
                return Err(Error::corrupt(format!(
                    "{name} is empty but has offset {:#x}",
                    entry.offset
                )));
            }
        } else {
            let end = u64::from(entry.offset) + u64::from(entry.length);
            if (entry.offset as usize) < TABLE_LEN || end > region_len {
                return Err(Error::corrupt(format!(
                    "{name} at {:#x}, {} bytes, lies outside the metadata region's item area \
                     ({TABLE_LEN:#x}..{region_len:#x})",
                    entry.offset, entry.length
                )));
            }
        }
        for other in &entries {
            if other.item == entry.item && other.is_user == entry.is_user {
                return Err(Error::corrupt(format!("{name} is listed twice")));
            }
            let (a, b) = (entry.range(), other.range());
            if !a.is_empty() && !b.is_empty() && a.start < b.end && b.start < a.end {
                return Err(Error::corrupt(format!(
                    "{name} overlaps metadata item {{{}}}",
                    other.item
                )));
            }
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// The system metadata items imgfs needs, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub block_size: u32,
    pub leave_blocks_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page_83_id: Uuid,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    pub parent_locator: Option<ParentLocator>,
}

/// Decodes the items of `entries`; `item` returns an item's bytes (it reads the region).
pub fn parse_items(
    entries: &[TableEntry],
    mut item: impl FnMut(&TableEntry) -> Result<Vec<u8>>,
) -> Result<Metadata> {
    let mut found: [Option<Vec<u8>>; 6] = Default::default();
    let known = [
        FILE_PARAMETERS,
        VIRTUAL_DISK_SIZE,
        PAGE_83_DATA,
        LOGICAL_SECTOR_SIZE,
        PHYSICAL_SECTOR_SIZE,
        PARENT_LOCATOR,
    ];
    for entry in entries {
        match known
            .iter()
            .position(|&k| k == entry.item && !entry.is_user)
        {
            Some(index) => found[index] = Some(item(entry)?),
            None if entry.required => {
                return Err(Error::unsupported(format!(
                    "the image needs metadata item {{{}}}, which imgfs does not know",
                    entry.item
                )))
            }
            None => {}
        }
    }
    let [params, size, page83, logical, physical, locator] = found;
    let need = |bytes: Option<Vec<u8>>, name: &str| {
        bytes.ok_or_else(|| Error::corrupt(format!("the metadata has no {name} item")))
    };
    let params = need(params, "file parameters")?;
    let block_size = u32_le(&params, 0, "BlockSize")?;
    let flags = u32_le(&params, 4, "file parameter flags")?;
    if !block_size.is_power_of_two()
        || u64::from(block_size) < MIB
        || u64::from(block_size) > 256 * MIB
    {
        return Err(Error::corrupt(format!(
            "block size {block_size} is not a power of two between 1 MiB and 256 MiB"
        )));
    }
    let logical_sector_size = u32_le(
        &need(logical, "logical sector size")?,
        0,
        "LogicalSectorSize",
    )?;
    let physical_sector_size = u32_le(
        &need(physical, "physical sector size")?,
        0,
        "PhysicalSectorSize",
    )?;
    for (name, value) in [
        ("logical", logical_sector_size),
        ("physical", physical_sector_size),
    ] {
        if value != 512 && value != 4096 {
            return Err(Error::corrupt(format!(
                "{name} sector size {value} is neither 512 nor 4096"
            )));
        }
    }
    let virtual_size = u64_le(&need(size, "virtual disk size")?, 0, "VirtualDiskSize")?;
    if virtual_size % u64::from(logical_sector_size) != 0 || virtual_size > MAX_VIRTUAL_SIZE {
        return Err(Error::corrupt(format!(
            "virtual disk size {virtual_size} is not a multiple of the {logical_sector_size}-byte \
             logical sector or is larger than 64 TiB"
        )));
    }
    let page_83_id = guid(&need(page83, "page 83 data")?, 0, "Page83Data")?;
    let has_parent = flags & 2 != 0;
    let parent_locator = match (has_parent, locator) {
        (true, Some(bytes)) => Some(ParentLocator::parse(&bytes)?),
        (true, None) => {
            return Err(Error::corrupt(
                "the image has a parent but no parent locator",
            ))
        }
        (false, _) => None,
    };
    Ok(Metadata {
        block_size,
        leave_blocks_allocated: flags & 1 != 0,
        has_parent,
        virtual_size,
        page_83_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

/// Where the parent of a differencing image is and who it must be: the key/value pairs of a
/// VHDX parent locator, decoded from UTF-16LE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    entries: Vec<(String, String)>,
}

impl ParentLocator {
    pub fn parse(raw: &[u8]) -> Result<ParentLocator> {
        let locator_type = guid(raw, 0, "parent LocatorType")?;
        if locator_type != VHDX_PARENT_TYPE {
            return Err(Error::unsupported(format!(
                "parent locator type {{{locator_type}}} (only VHDX parents are known)"
            )));
        }
        let count = u16_le(raw, 18, "parent KeyValueCount")?;
        let mut entries: Vec<(String, String)> = Vec::with_capacity(count.into());
        for i in 0..usize::from(count) {
            let at = 20 + 12 * i;
            let key = utf16_at(
                raw,
                u32_le(raw, at, "parent locator KeyOffset")?,
                u16_le(raw, at + 8, "parent locator KeyLength")?,
            )?;
            let value = utf16_at(
                raw,
                u32_le(raw, at + 4, "parent locator ValueOffset")?,
                u16_le(raw, at + 10, "parent locator ValueLength")?,
            )?;
            if entries.iter().any(|(k, _)| *k == key) {
                return Err(Error::corrupt(format!(
                    "parent locator key {key:?} appears twice"
                )));
            }
            entries.push((key, value));
        }
        let locator = ParentLocator { entries };
        if locator.get("parent_linkage").is_none() {
            return Err(Error::corrupt("the parent locator has no parent_linkage"));
        }
        if ["relative_path", "volume_path", "absolute_win32_path"]
            .iter()
            .all(|k| locator.get(k).is_none())
        {
            return Err(Error::corrupt(
                "the parent locator names no path to the parent",
            ));
        }
        Ok(locator)
    }

    /// The value of `key` (keys are case sensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All key/value pairs, in the order the locator lists them.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// The DataWriteGuid the parent had when this child was created (`{...}` form).
    pub fn parent_linkage(&self) -> Option<Uuid> {
        self.get("parent_linkage").and_then(parse_braced_guid)
    }

    /// An alternative parent identity some writers record.
    pub fn parent_linkage2(&self) -> Option<Uuid> {
        self.get("parent_linkage2").and_then(parse_braced_guid)
    }

    /// The parent's path relative to this image, with Windows separators (`..\dir\p.vhdx`).
    pub fn relative_path(&self) -> Option<&str> {
        self.get("relative_path")
    }

    pub fn volume_path(&self) -> Option<&str> {
        self.get("volume_path")
    }

    pub fn absolute_win32_path(&self) -> Option<&str> {
        self.get("absolute_win32_path")
    }

    /// `relative_path` split into its components (either separator accepted, empty and `.`
    /// components dropped), for resolving on a Unix host.
    pub fn relative_path_components(&self) -> Option<Vec<&str>> {
        self.relative_path().map(|p| {
            p.split(['\\', '/'])
                .filter(|c| !c.is_empty() && *c != ".")
                .collect()
        })
    }
}

fn parse_braced_guid(text: &str) -> Option<Uuid> {
    let inner = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    Uuid::parse_str(inner).ok()
}

fn utf16_at(raw: &[u8], offset: u32, length: u16) -> Result<String> {
    let start = offset as usize;
    let bytes = start
        .checked_add(length.into())
        .and_then(|end| raw.get(start..end))
        .filter(|b| offset > 0 && !b.is_empty() && b.len() % 2 == 0)
        .ok_or_else(|| {
            Error::corrupt(format!(
                "parent locator string at {offset}, {length} bytes, is empty, odd-sized or \
                 outside the item ({} bytes)",
                raw.len()
            ))
        })?;
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16(&units)
        .map_err(|_| Error::corrupt(format!("parent locator string at {offset} is not UTF-16")))
}

#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::format::vhdx::header::put_guid;

    /// A metadata region (table and items) with the given values; `extra` adds raw entries
    /// (item, flags, bytes).
    pub fn region(
        block_size: u32,
        flags: u32,
        virtual_size: u64,
        logical: u32,
        physical: u32,
        extra: &[(Uuid, u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut items: Vec<(Uuid, u32, Vec<u8>)> = vec![
            (
                FILE_PARAMETERS,
                4,
                [block_size.to_le_bytes(), flags.to_le_bytes()].concat(),
            ),
            (VIRTUAL_DISK_SIZE, 6, virtual_size.to_le_bytes().to_vec()),
            (PAGE_83_DATA, 6, vec![0x83; 16]),
            (LOGICAL_SECTOR_SIZE, 6, logical.to_le_bytes().to_vec()),
            (PHYSICAL_SECTOR_SIZE, 6, physical.to_le_bytes().to_vec()),
        ];
        items.extend(extra.iter().cloned());
        let mut raw = vec![0u8; MIB as usize];
        raw[..8].copy_from_slice(SIGNATURE);
        raw[10..12].copy_from_slice(&(items.len() as u16).to_le_bytes());
        let mut next = TABLE_LEN;
        for (i, (item, flags, bytes)) in items.iter().enumerate() {
            let at = 32 + 32 * i;
            put_guid(&mut raw, at, *item).unwrap();
            raw[at + 16..at + 20].copy_from_slice(&(next as u32).to_le_bytes());
            raw[at + 20..at + 24].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            raw[at + 24..at + 28].copy_from_slice(&flags.to_le_bytes());
            raw[next..next + bytes.len()].copy_from_slice(bytes);
            next += bytes.len().max(1).next_multiple_of(8);
        }
        raw
    }

    pub use crate::format::vhdx::make::parent_locator_item as parent_locator;
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::error::ErrorKind;

    fn parse(raw: &[u8]) -> Result<Metadata> {
        let entries = parse_table(raw, raw.len() as u64)?;
        parse_items(&entries, |e| Ok(raw[e.range()].to_vec()))
    }

    #[test]
    fn items_are_decoded() {
        let m = parse(&region(32 << 20, 1, 10 << 20, 4096, 512, &[])).unwrap();
        assert_eq!(m.block_size, 32 << 20);
        assert!(m.leave_blocks_allocated && !m.has_parent);
        assert_eq!(
            (
                m.virtual_size,
                m.logical_sector_size,
                m.physical_sector_size
            ),
            (10 << 20, 4096, 512)
        );
        assert!(m.parent_locator.is_none());
    }

    #[test]
    fn bad_values_are_refused_with_the_field() {
        let check = |raw: Vec<u8>, kind: ErrorKind, needle: &str| {
            let e = parse(&raw).unwrap_err();
            assert_eq!(e.kind(), kind, "{e}");
            assert!(
                e.to_string().contains(needle),
                "{e} should mention {needle}"
            );
        };
        let mib = MIB as u32;
        check(
            region(3 * mib, 0, 1 << 30, 512, 512, &[]),
            ErrorKind::Corrupt,
            "block size 3145728",
        );
        check(
            region(512 * mib, 0, 1 << 30, 512, 512, &[]),
            ErrorKind::Corrupt,
            "not a power of two between",
        );
        check(
            region(mib / 2, 0, 1 << 30, 512, 512, &[]),
            ErrorKind::Corrupt,
            "block size 524288",
        );
        check(
            region(mib, 0, 1 << 30, 1024, 512, &[]),
            ErrorKind::Corrupt,
            "logical sector size 1024",
        );
        check(
            region(mib, 0, 1 << 30, 512, 520, &[]),
            ErrorKind::Corrupt,
            "physical sector size 520",
        );
        check(
            region(mib, 0, 1000, 512, 512, &[]),
            ErrorKind::Corrupt,
            "virtual disk size 1000",
        );
        check(
            region(mib, 0, 65 << 40, 512, 512, &[]),
            ErrorKind::Corrupt,
            "64 TiB",
        );
        let unknown = Uuid::from_u128(0xabcd);
        check(
            region(mib, 0, 1 << 30, 512, 512, &[(unknown, 4, vec![1])]),
            ErrorKind::Unsupported,
            "metadata item {00000000-0000-0000-0000-00000000abcd}",
        );
        assert!(parse(&region(mib, 0, 1 << 30, 512, 512, &[(unknown, 0, vec![1])])).is_ok());
        check(
            region(mib, 2, 1 << 30, 512, 512, &[]),
            ErrorKind::Corrupt,
            "no parent locator",
        );

        // An item pointing into the table or outside the region.
        let mut raw = region(mib, 0, 1 << 30, 512, 512, &[]);
        raw[32 + 16..32 + 20].copy_from_slice(&100u32.to_le_bytes());
        check(
            raw,
            ErrorKind::Corrupt,
            "outside the metadata region's item area",
        );
        let mut raw = region(mib, 0, 1 << 30, 512, 512, &[]);
        raw[64 + 16..64 + 20].copy_from_slice(&(TABLE_LEN as u32).to_le_bytes());
        check(raw, ErrorKind::Corrupt, "overlaps metadata item");
        let mut raw = region(mib, 0, 1 << 30, 512, 512, &[]);
        raw[0] = b'M';
        check(raw, ErrorKind::Corrupt, "signature");
    }

    #[test]
    fn parent_locator_is_decoded() {
        let loc = parent_locator(&[
            ("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}"),
            ("relative_path", "..\\base\\parent.vhdx"),
            ("absolute_win32_path", "\\\\?\\d:\\base\\parent.vhdx"),
        ]);
        let m = parse(&region(
            MIB as u32,
            2,
            1 << 30,
            512,
            512,
            &[(PARENT_LOCATOR, 4, loc)],
        ))
        .unwrap();
        let p = m.parent_locator.unwrap();
        assert_eq!(
            p.parent_linkage(),
            Some(Uuid::from_u128(0x83ed0ec3_24c8_49a6_a959_5e4bf1288bfb))
        );
        assert_eq!(p.parent_linkage2(), None);
        assert_eq!(p.relative_path(), Some("..\\base\\parent.vhdx"));
        assert_eq!(
            p.relative_path_components().unwrap(),
            ["..", "base", "parent.vhdx"]
        );
        assert_eq!(
            p.absolute_win32_path(),
            Some("\\\\?\\d:\\base\\parent.vhdx")
        );
        assert_eq!(p.entries().len(), 3);

        let no_path =
            parent_locator(&[("parent_linkage", "{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}")]);
        assert!(ParentLocator::parse(&no_path)
            .unwrap_err()
            .to_string()
            .contains("no path"));
        let mut odd = parent_locator(&[("parent_linkage", "{x}"), ("relative_path", "a")]);
        odd[20 + 8] = 3;
        assert!(ParentLocator::parse(&odd).is_err());
        let mut other_type = odd.clone();
        other_type[0] ^= 1;
        assert_eq!(
            ParentLocator::parse(&other_type).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }
}
