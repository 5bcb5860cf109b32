//! Partition tables of a virtual disk: MBR (with an extended partition's chain of EBRs) and
//! GPT (protective MBR, both headers and their entry arrays checked by CRC32, the backup used
//! when the primary is damaged). Read through the `Image` trait, so any format (and any layer
//! of a chain) works the same. Every value is checked: partitions must lie inside the disk and
//! must not overlap, the EBR chain is bounded and loops are caught; a hostile table is refused
//! with the reason and the disk itself is served all the same.
//!
//! Numbering follows Linux: MBR primaries 1-4 by slot, logical partitions from 5 in chain
//! order; GPT entries by their index in the array plus one.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::image::Image;

/// The sector size partition tables are read in (GPT is also tried with 4096).
const SECTOR: u64 = 512;
/// How many logical partitions an EBR chain may hold.
const MAX_LOGICAL: usize = 128;
/// The most GPT entry bytes read (the usual array is 16 KiB).
const MAX_GPT_ENTRY_BYTES: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    Mbr,
    Gpt,
}

/// One partition: where it lies on the disk, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// The MBR type byte (`0x83`) or the GPT type GUID.
    pub kind: String,
    /// The GPT partition name, if it has one.
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTable {
    pub kind: TableKind,
    pub partitions: Vec<Partition>,
    /// Something worth saying about how it was read (a damaged GPT header, a backup used).
    pub note: Option<String>,
}

fn read(disk: &dyn Image, offset: u64, len: u64) -> Result<Vec<u8>> {
    let end = offset
        .checked_add(len)
        .filter(|&end| end <= disk.size())
        .ok_or_else(|| Error::corrupt(format!("{len} bytes at {offset:#x} lie beyond the disk")))?;
    let mut buf = vec![0u8; (end - offset) as usize];
    disk.read_at(&mut buf, offset)?;
    Ok(buf)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = flate2::Crc::new();
    crc.update(bytes);
    crc.sum()
}

/// The partition table of `disk`, `None` when it has none (no boot signature, or boot code
/// rather than a table), an error for a table that cannot be trusted.
pub fn read_table(disk: &dyn Image) -> Result<Option<PartitionTable>> {
    if disk.size() < 2 * SECTOR {
        return Ok(None);
    }
    let mbr = read(disk, 0, SECTOR)?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Ok(None);
    }
    let slots: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    // Boot code of an unpartitioned (superfloppy) disk has other status bytes.
    if slots.iter().any(|s| s[0] != 0 && s[0] != 0x80) {
        return Ok(None);
    }
    if slots.iter().any(|s| s[4] == 0xee) {
        return read_gpt(disk).map(Some);
    }
    read_mbr(disk, &slots).map(|t| (!t.partitions.is_empty()).then_some(t))
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

/// Start and length in bytes of an MBR slot whose LBAs count from `base`.
fn slot_range(slot: &[u8], base: u64) -> Result<(u64, u64)> {
    let start = base
        .checked_add(u64::from(u32_at(slot, 8)))
        .and_then(|lba| lba.checked_mul(SECTOR))
        .ok_or_else(|| Error::corrupt("partition start overflows"))?;
    Ok((start, u64::from(u32_at(slot, 12)) * SECTOR))
}

fn read_mbr(disk: &dyn Image, slots: &[&[u8]]) -> Result<PartitionTable> {
    let mut partitions = Vec::new();
    let mut extended = None;
    for (i, slot) in slots.iter().enumerate() {
        let kind = slot[4];
        let (start, len) = slot_range(slot, 0)?;
        if kind == 0 || len == 0 {
            continue;
        }
        if is_extended(kind) {
            if extended.is_some() {
                return Err(Error::corrupt("the MBR has two extended partitions"));
            }
            extended = Some((start / SECTOR, len));
            continue;
        }
        partitions.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            kind: format!("{kind:#04x}"),
            name: None,
        });
    }
    if let Some((ext_lba, ext_len)) = extended {
        check_inside(disk, ext_lba * SECTOR, ext_len, "the extended partition")?;
        read_logical(disk, ext_lba, ext_len, &mut partitions)?;
    }
    check_layout(disk, &partitions)?;
    Ok(PartitionTable {
        kind: TableKind::Mbr,
        partitions,
        note: None,
    })
}

/// Follows the EBR chain of the extended partition at `ext_lba`.
fn read_logical(
    disk: &dyn Image,
    ext_lba: u64,
    ext_len: u64,
    partitions: &mut Vec<Partition>,
) -> Result<()> {
    let mut seen = HashSet::new();
    let mut ebr_lba = ext_lba;
    let mut number = 5;
    loop {
        if !seen.insert(ebr_lba) {
            return Err(Error::corrupt(format!(
                "the EBR chain loops back to sector {ebr_lba}"
            )));
        }
        if seen.len() > MAX_LOGICAL {
            return Err(Error::corrupt(format!(
                "the EBR chain has more than {MAX_LOGICAL} links"
            )));
        }
        let ebr = read(disk, ebr_lba * SECTOR, SECTOR)
            .map_err(|e| e.context(format!("EBR at sector {ebr_lba}")))?;
        if ebr[510..512] != [0x55, 0xaa] {
            return Err(Error::corrupt(format!(
                "the EBR at sector {ebr_lba} has no boot signature"
            )));
        }
        let (own, next) = (&ebr[446..462], &ebr[462..478]);
        let (start, len) = slot_range(own, ebr_lba)?;
        if own[4] != 0 && len > 0 {
            let ends = start.checked_add(len);
            if start < ext_lba * SECTOR || ends.map_or(true, |e| e > ext_lba * SECTOR + ext_len) {
                return Err(Error::corrupt(format!(
                    "logical partition {number} lies outside its extended partition"
                )));
            }
            partitions.push(Partition {
                number,
                start,
                len,
                kind: format!("{:#04x}", own[4]),
                name: None,
            });
            number += 1;
        }
        if next[4] == 0 || u32_at(next, 12) == 0 {
            return Ok(());
        }
        ebr_lba = ext_lba
            .checked_add(u64::from(u32_at(next, 8)))
            .ok_or_else(|| Error::corrupt("the next EBR's sector overflows"))?;
    }
}

fn check_inside(disk: &dyn Image, start: u64, len: u64, what: &str) -> Result<()> {
    match start.checked_add(len) {
        Some(end) if end <= disk.size() => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{what} ({len} bytes at {start:#x}) reaches beyond the end of the disk ({} bytes)",
            disk.size()
        ))),
    }
}

/// Every partition inside the disk, none overlapping another.
fn check_layout(disk: &dyn Image, partitions: &[Partition]) -> Result<()> {
    for p in partitions {
        check_inside(disk, p.start, p.len, &format!("partition {}", p.number))?;
    }
    let mut sorted: Vec<&Partition> = partitions.iter().collect();
    sorted.sort_by_key(|p| p.start);
    for pair in sorted.windows(2) {
        if pair[0].start + pair[0].len > pair[1].start {
            return Err(Error::corrupt(format!(
                "partitions {} and {} overlap",
                pair[0].number, pair[1].number
            )));
        }
    }
    Ok(())
}

/// A GPT header and its entries, checked.
struct Gpt {
    entries: Vec<u8>,
    entry_size: u64,
    first_usable: u64,
    last_usable: u64,
    alternate: u64,
}

fn read_gpt(disk: &dyn Image) -> Result<PartitionTable> {
    // 4096-byte sectors first only if the 512-byte place holds no header at all.
    let sector = match read(disk, SECTOR, SECTOR)?.starts_with(b"EFI PART") {
        true => SECTOR,
        false if disk.size() >= 2 * 4096 && read(disk, 4096, 8)? == *b"EFI PART" => 4096,
        false => SECTOR,
    };
    let primary = read_gpt_header(disk, 1, sector);
    let backup_lba = match &primary {
        Ok(gpt) => gpt.alternate,
        Err(_) => disk.size() / sector - 1,
    };
    let (gpt, note) = match primary {
        Ok(gpt) => {
            let note = read_gpt_header(disk, backup_lba, sector)
                .err()
                .map(|e| format!("the backup GPT header is damaged ({e})"));
            (gpt, note)
        }
        Err(primary_error) => match read_gpt_header(disk, backup_lba, sector) {
            Ok(gpt) => (
                gpt,
                Some(format!(
                    "the primary GPT header is damaged ({primary_error}); the backup is used"
                )),
            ),
            Err(e) => {
                return Err(Error::corrupt(format!(
                    "both GPT headers are damaged: {primary_error}; backup: {e}"
                )))
            }
        },
    };
    let mut partitions = Vec::new();
    for (i, entry) in gpt
        .entries
        .chunks_exact(gpt.entry_size as usize)
        .enumerate()
    {
        if entry[..16].iter().all(|&b| b == 0) {
            continue;
        }
        let (first, last) = (u64_at(entry, 32), u64_at(entry, 40));
        if first < gpt.first_usable || last > gpt.last_usable || last < first {
            return Err(Error::corrupt(format!(
                "GPT partition {} (sectors {first}-{last}) lies outside the usable sectors \
                 {}-{}",
                i + 1,
                gpt.first_usable,
                gpt.last_usable
            )));
        }
        let name: Vec<u16> = entry[56..128.min(entry.len())]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let name = String::from_utf16_lossy(&name);
        partitions.push(Partition {
            number: i as u32 + 1,
            start: first * sector,
            len: (last - first + 1) * sector,
            kind: uuid::Uuid::from_bytes_le(entry[..16].try_into().unwrap_or([0; 16])).to_string(),
            name: (!name.is_empty()).then_some(name),
        });
    }
    check_layout(disk, &partitions)?;
    Ok(PartitionTable {
        kind: TableKind::Gpt,
        partitions,
        note,
    })
}

fn read_gpt_header(disk: &dyn Image, lba: u64, sector: u64) -> Result<Gpt> {
    let at = lba
        .checked_mul(sector)
        .ok_or_else(|| Error::corrupt("GPT header sector overflows"))?;
    let raw = read(disk, at, sector)?;
    if !raw.starts_with(b"EFI PART") {
        return Err(Error::corrupt(format!("no GPT header at sector {lba}")));
    }
    let size = u32_at(&raw, 12) as usize;
    if !(92..=sector as usize).contains(&size) {
        return Err(Error::corrupt(format!("GPT header size {size} is invalid")));
    }
    let mut header = raw[..size].to_vec();
    header[16..20].fill(0);
    if crc32(&header) != u32_at(&raw, 16) {
        return Err(Error::corrupt(format!(
            "the GPT header at sector {lba} fails its CRC32"
        )));
    }
    if u64_at(&raw, 24) != lba {
        return Err(Error::corrupt(format!(
            "the GPT header at sector {lba} says it is at sector {}",
            u64_at(&raw, 24)
        )));
    }
    let (count, entry_size) = (u64::from(u32_at(&raw, 80)), u64::from(u32_at(&raw, 84)));
    if entry_size < 128
        || entry_size % 8 != 0
        || count.saturating_mul(entry_size) > MAX_GPT_ENTRY_BYTES
    {
        return Err(Error::corrupt(format!(
            "{count} GPT entries of {entry_size} bytes are not a valid array"
        )));
    }
    let entries_at = u64_at(&raw, 72)
        .checked_mul(sector)
        .ok_or_else(|| Error::corrupt("GPT entry array sector overflows"))?;
    let entries = read(disk, entries_at, count * entry_size)
        .map_err(|e| e.context(format!("GPT entries of the header at sector {lba}")))?;
    if crc32(&entries) != u32_at(&raw, 88) {
        return Err(Error::corrupt(format!(
            "the GPT entries of the header at sector {lba} fail their CRC32"
        )));
    }
    Ok(Gpt {
        entries,
        entry_size,
        first_usable: u64_at(&raw, 40),
        last_usable: u64_at(&raw, 48),
        alternate: u64_at(&raw, 32),
    })
}

#[cfg(test)]
mod tests;
