//! Turning a dynamic VHDX made by qemu-img into a differencing image of a parent: qemu-img
//! cannot create differencing VHDX images, and the tests and the crash harness need them.
//! Sets the "has parent" flag in the file parameters and adds a parent locator item to the
//! metadata region, after the items qemu-img wrote.

use std::os::unix::fs::FileExt;
use std::path::Path;

use uuid::Uuid;

use super::header::{parse_region_table, put_guid, METADATA_REGION};
use super::metadata::{self, FILE_PARAMETERS, PARENT_LOCATOR, TABLE_LEN, VHDX_PARENT_TYPE};
use crate::error::{Error, Result};

/// Where the first copy of the region table lies.
const REGION_TABLE_AT: u64 = 192 * 1024;
/// The "has parent" bit of the file parameters' flags.
const HAS_PARENT: u32 = 2;

/// A VHDX parent locator item holding the key/value `pairs` (UTF-16LE strings).
pub fn parent_locator_item(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut raw = vec![0u8; 20 + 12 * pairs.len()];
    // The type GUID fits the 20-byte head by construction.
    let _ = put_guid(&mut raw, 0, VHDX_PARENT_TYPE);
    raw[18..20].copy_from_slice(&(pairs.len() as u16).to_le_bytes());
    for (i, (key, value)) in pairs.iter().enumerate() {
        let mut put = |s: &str| {
            let at = raw.len() as u32;
            let bytes: Vec<u8> = s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
            raw.extend(&bytes);
            (at, bytes.len() as u16)
        };
        let (key_at, key_len) = put(key);
        let (value_at, value_len) = put(value);
        let at = 20 + 12 * i;
        raw[at..at + 4].copy_from_slice(&key_at.to_le_bytes());
        raw[at + 4..at + 8].copy_from_slice(&value_at.to_le_bytes());
        raw[at + 8..at + 10].copy_from_slice(&key_len.to_le_bytes());
        raw[at + 10..at + 12].copy_from_slice(&value_len.to_le_bytes());
    }
    raw
}

/// Makes the dynamic VHDX at `child` (fresh from qemu-img) a differencing image whose parent
/// is found at `parent_name` next to it and carries data write GUID `linkage`.
pub fn make_differencing(child: &Path, parent_name: &str, linkage: Uuid) -> Result<()> {
    let io = |what: &str, e: std::io::Error| Error::io(what.to_string(), e).with_path(child);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(child)
        .map_err(|e| io("open", e))?;
    let mut regions = vec![0u8; 64 * 1024];
    file.read_exact_at(&mut regions, REGION_TABLE_AT)
        .map_err(|e| io("read the region table", e))?;
    let region = parse_region_table(&regions)?
        .into_iter()
        .find(|r| r.guid == METADATA_REGION)
        .ok_or_else(|| Error::corrupt("no metadata region").with_path(child))?;
    let mut table = vec![0u8; TABLE_LEN];
    file.read_exact_at(&mut table, region.offset)
        .map_err(|e| io("read the metadata table", e))?;
    let entries = metadata::parse_table(&table, u64::from(region.length))?;
    let params = entries
        .iter()
        .find(|e| e.item == FILE_PARAMETERS)
        .ok_or_else(|| Error::corrupt("no file parameters").with_path(child))?;
    let flags_at = region.offset + u64::from(params.offset) + 4;
    let mut flags = [0u8; 4];
    file.read_exact_at(&mut flags, flags_at)
        .map_err(|e| io("read the file parameters", e))?;
    let flags = u32::from_le_bytes(flags) | HAS_PARENT;

    let linkage = format!("{{{linkage}}}");
    let relative = format!(".\\{parent_name}");
    let absolute = format!("\\\\?\\C:\\images\\{parent_name}");
    let locator = parent_locator_item(&[
        ("parent_linkage", &linkage),
        ("relative_path", &relative),
        ("absolute_win32_path", &absolute),
    ]);
    let item_at = entries
        .iter()
        .map(|e| e.offset.saturating_add(e.length))
        .chain([TABLE_LEN as u32])
        .max()
        .unwrap_or(TABLE_LEN as u32)
        .next_multiple_of(64);
    let mut entry = [0u8; 32];
    put_guid(&mut entry, 0, PARENT_LOCATOR)?;
    entry[16..20].copy_from_slice(&item_at.to_le_bytes());
    entry[20..24].copy_from_slice(&(locator.len() as u32).to_le_bytes());
    entry[24..28].copy_from_slice(&4u32.to_le_bytes());
    let count = u16::try_from(entries.len() + 1)
        .map_err(|_| Error::corrupt("too many metadata items").with_path(child))?;
    let writes: [(&[u8], u64); 4] = [
        (&flags.to_le_bytes(), flags_at),
        (&entry, region.offset + 32 + 32 * entries.len() as u64),
        (&count.to_le_bytes(), region.offset + 10),
        (&locator, region.offset + u64::from(item_at)),
    ];
    for (bytes, at) in writes {
        file.write_all_at(bytes, at)
            .map_err(|e| io("write the metadata", e))?;
    }
    file.sync_all().map_err(|e| io("sync", e))
}
