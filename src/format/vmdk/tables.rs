//! The grain directory and grain tables of a hosted sparse extent in memory: the whole grain
//! directory (and its redundant copy) with dirty tracking, grain tables decoded and validated
//! when they are loaded, and the checks that keep every table and grain inside the file and
//! off the header and the directories.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::budget::TableBudget;
use crate::meta::dirty::DirtyChunks;

use super::descriptor::SECTOR_SIZE;
use super::header::{SparseHeader, SparseKind};

/// Grain table entry of a zeroed grain (with the zeroed-grain flag): reads as zeros, whatever
/// the parent holds.
pub const GTE_ZEROED: u32 = 1;
const GTE_ZEROED_U64: u64 = GTE_ZEROED as u64;
/// Bytes of a KDMV directory or table entry, the only kind imgfs writes.
const ENTRY_LEN: u64 = 4;
/// seSparse directory entries name a grain table by number under this tag.
const SE_TABLE_TAG: u64 = 0x1000_0000_0000_0000;
/// Directories are read in pieces of this many bytes.
const DIRECTORY_PIECE: u64 = 1 << 20;

/// What one grain table entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grain {
    /// Nothing here: the parent shows through, or zeros.
    Unallocated,
    Zero,
    /// Plain grain at this byte offset of the extent file.
    Data(u64),
    /// A compressed grain whose marker (or bare zlib stream) starts at this byte offset.
    Compressed(u64),
}

/// The places in the extent file nothing may overlap: the header and both directories.
#[derive(Debug, Clone)]
pub struct Layout {
    reserved: Vec<(u64, u64, &'static str)>,
    pub grain_bytes: u64,
    pub gt_bytes: u64,
    pub compressed: bool,
    pub zeroed_grains: bool,
    pub kind: SparseKind,
    pub entry_bytes: u64,
    grain_sectors: u64,
}

impl Layout {
    pub fn new(header: &SparseHeader) -> Layout {
        let gd_bytes = header.gd_entries() * header.entry_bytes();
        let mut reserved = vec![
            (0, SECTOR_SIZE, "the header"),
            (
                header.gd_offset * SECTOR_SIZE,
                gd_bytes,
                "the grain directory",
            ),
        ];
        // `header` was checked against the file, so its descriptor range is valid.
        if let Ok(Some((at, len))) = header.descriptor_range() {
            reserved.push((at, len, "the embedded descriptor"));
        }
        if header.has_redundant_gd() {
            reserved.push((
                header.rgd_offset * SECTOR_SIZE,
                gd_bytes,
                "the redundant grain directory",
            ));
        }
        Layout {
            reserved,
            grain_bytes: header.grain_bytes(),
            gt_bytes: header.gt_bytes(),
            compressed: header.compressed(),
            zeroed_grains: header.has_zeroed_grains(),
            kind: header.kind,
            entry_bytes: header.entry_bytes(),
            grain_sectors: header.grain_sectors,
        }
    }

    /// Checks that `len` bytes at `at` lie inside a file of `file_len` bytes and off the
    /// header and directories.
    pub fn check(
        &self,
        what: &dyn std::fmt::Display,
        at: u64,
        len: u64,
        file_len: u64,
    ) -> Result<()> {
        let end = at
            .checked_add(len)
            .filter(|&end| end <= file_len)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "the VMDK {what} at {at:#x} ({len} bytes) is beyond the end of the file \
                     ({file_len} bytes)"
                ))
            })?;
        for &(start, rlen, name) in &self.reserved {
            if at < start.saturating_add(rlen) && start < end {
                return Err(Error::corrupt(format!(
                    "the VMDK {what} at {at:#x} overlaps {name}"
                )));
            }
        }
        Ok(())
    }

    /// Decodes table entry `raw`; entries `check_entry` refuses decode as unallocated.
    pub fn decode(&self, raw: u64) -> Grain {
        self.try_decode(raw).unwrap_or(Grain::Unallocated)
    }

    fn try_decode(&self, raw: u64) -> Option<Grain> {
        let sector_grain = |sector: u64| sector.checked_mul(SECTOR_SIZE);
        Some(match (self.kind, raw) {
            (_, 0) => Grain::Unallocated,
            (SparseKind::SeSparse { grains_at, .. }, _) => match raw >> 60 {
                1 | 2 => Grain::Zero,
                3 => {
                    let index =
                        ((raw & 0x0fff_0000_0000_0000) >> 48) | ((raw & 0xffff_ffff_ffff) << 12);
                    let at = index
                        .checked_mul(self.grain_sectors)
                        .and_then(sector_grain)
                        .and_then(|b| b.checked_add(grains_at))?;
                    Grain::Data(at)
                }
                _ => return None,
            },
            (_, GTE_ZEROED_U64) if self.zeroed_grains => Grain::Zero,
            _ if self.compressed => Grain::Compressed(sector_grain(raw)?),
            _ => Grain::Data(sector_grain(raw)?),
        })
    }

    /// The byte offset of the grain table directory entry `raw` names, `None` for no table.
    pub fn table_offset(&self, raw: u64) -> Result<Option<u64>> {
        if raw == 0 {
            return Ok(None);
        }
        match self.kind {
            SparseKind::SeSparse { tables_at, .. } => {
                if raw & 0xffff_ffff_0000_0000 != SE_TABLE_TAG {
                    return Err(Error::corrupt(format!(
                        "seSparse grain directory entry {raw:#x} is not a grain table number"
                    )));
                }
                Ok((raw & 0xffff_ffff)
                    .checked_mul(self.gt_bytes)
                    .and_then(|b| b.checked_add(tables_at)))
                .and_then(|at| {
                    at.ok_or_else(|| Error::corrupt("seSparse grain table offset overflows"))
                        .map(Some)
                })
            }
            _ => Ok(Some(raw * SECTOR_SIZE)),
        }
    }

    /// Checks what entry `raw` points at against a file of `file_len` bytes.
    pub fn check_entry(&self, raw: u64, file_len: u64, what: &dyn std::fmt::Display) -> Result<()> {
        match self.try_decode(raw) {
            None => Err(Error::corrupt(format!(
                "the VMDK {what} has the invalid entry {raw:#x}"
            ))),
            Some(Grain::Unallocated | Grain::Zero) => Ok(()),
            Some(Grain::Data(at)) => self.check(what, at, self.grain_bytes, file_len),
            // The marker's 12 bytes at least; its length is checked when it is read.
            Some(Grain::Compressed(at)) => self.check(what, at, 12, file_len),
        }
    }
}

/// A grain table: its entries and which directory entry points at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrainTable {
    pub gd_index: u64,
    pub entries: Vec<u64>,
}

impl GrainTable {
    /// Reads and validates the grain table of directory entry `gd_index` at byte `at`.
    pub fn read(
        file: &HostFile,
        layout: &Layout,
        gd_index: u64,
        at: u64,
        file_len: u64,
    ) -> Result<GrainTable> {
        let mut raw = vec![0u8; layout.gt_bytes as usize];
        file.read_exact_at(&mut raw, at)?;
        let entries = decode_entries(&raw, layout.entry_bytes);
        for (index, &entry) in entries.iter().enumerate() {
            let what = format_args!("grain of grain table {gd_index} entry {index}");
            layout
                .check_entry(entry, file_len, &what)
                .map_err(|e| e.at_offset(at + index as u64 * layout.entry_bytes))?;
        }
        Ok(GrainTable { gd_index, entries })
    }

    /// The table as KDMV stores it (u32 entries; only KDMV extents are written).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries
            .iter()
            .flat_map(|&e| (e as u32).to_le_bytes())
            .collect()
    }
}

/// The grain directory and its redundant copy, in memory, as the byte offsets of the grain
/// tables they name (0: none).
pub struct Directory {
    pub gd_at: u64,
    pub rgd_at: Option<u64>,
    pub primary: Vec<u64>,
    pub redundant: Option<Vec<u64>>,
    dirty: DirtyChunks,
    /// Two grain tables found overlapping each other (or a primary and a redundant one) when
    /// the directories were read. Writes through one would then change the other: the extent
    /// is served read-only.
    pub overlap: Option<String>,
}

/// Which directory entry names a grain table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct TableName {
    redundant: bool,
    index: u64,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let copy = if self.redundant { "redundant " } else { "" };
        write!(f, "{copy}grain table {}", self.index)
    }
}

/// Names two of the grain tables at `tables` (byte offset, name) that overlap.
fn find_overlap(mut tables: Vec<(u64, TableName)>, gt_bytes: u64) -> Option<String> {
    tables.sort_unstable();
    tables.windows(2).find_map(|pair| {
        let [(a_at, a), (b_at, b)] = [pair[0], pair[1]];
        (a_at.saturating_add(gt_bytes) > b_at)
            .then(|| format!("{a} and {b} overlap at {b_at:#x} in the file"))
    })
}

impl Directory {
    /// Reads both directories and checks every grain table they name; their memory counts
    /// against the image's `budget`.
    pub fn read(
        file: &HostFile,
        header: &SparseHeader,
        layout: &Layout,
        file_len: u64,
        budget: &mut TableBudget,
    ) -> Result<Directory> {
        let count = usize::try_from(header.gd_entries())
            .map_err(|_| Error::unsupported("VMDK grain directory too large for this host"))?;
        let width = layout.entry_bytes;
        // Each copy is held decoded (8 bytes an entry); the raw bytes of one while reading it.
        let copies: u64 = if header.has_redundant_gd() { 2 } else { 1 };
        budget.take(
            "VMDK grain directory",
            header.gd_entries().saturating_mul(copies * 8 + width),
        )?;
        // Non-zero entries of both copies, for the overlap check.
        let mut named: Vec<(u64, TableName)> = Vec::new();
        let mut read = |redundant: bool, at: u64| -> Result<Vec<u64>> {
            let copy = if redundant { "redundant " } else { "" };
            let mut tables = vec![0u64; count];
            // Past the end of the file a directory reads as zeros, and a hostile header can
            // claim millions of entries there: only the part inside the file is read, in
            // pieces, and the zeroed vector costs no memory where nothing is stored.
            let in_file = file_len.saturating_sub(at).min(count as u64 * width) / width;
            let per_piece = (DIRECTORY_PIECE / width).max(1);
            let mut raw = vec![0u8; (in_file.min(per_piece) * width) as usize];
            let mut first = 0;
            while first < in_file {
                let piece = &mut raw[..((in_file - first).min(per_piece) * width) as usize];
                file.read_exact_at(piece, at + first * width)?;
                for (offset, raw_entry) in nonzero_entries(piece, width) {
                    let index = first + offset as u64;
                    let entry_at = at + index * width;
                    let table = layout
                        .table_offset(raw_entry)
                        .map_err(|e| e.at_offset(entry_at))?
                        .unwrap_or(0);
                    if table == 0 {
                        continue;
                    }
                    let what = format_args!("{copy}grain table {index}");
                    layout
                        .check(&what, table, layout.gt_bytes, file_len)
                        .map_err(|e| e.at_offset(entry_at))?;
                    if let Some(slot) = tables.get_mut(index as usize) {
                        *slot = table;
                        named.push((table, TableName { redundant, index }));
                    }
                }
                first += per_piece;
            }
            Ok(tables)
        };
        let gd_at = header.gd_offset * SECTOR_SIZE;
        let rgd_at = header
            .has_redundant_gd()
            .then(|| header.rgd_offset * SECTOR_SIZE);
        let primary = read(false, gd_at)?;
        let redundant = rgd_at.map(|at| read(true, at)).transpose()?;
        Ok(Directory {
            gd_at,
            rgd_at,
            dirty: DirtyChunks::new(count * ENTRY_LEN as usize, SECTOR_SIZE as usize),
            primary,
            redundant,
            overlap: find_overlap(named, layout.gt_bytes),
        })
    }

    /// The byte offset of grain table `index`, `None` when the directory names none.
    pub fn table_at(&self, index: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(index)
            .ok()
            .and_then(|i| self.primary.get(i))
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "grain directory index {index} is beyond its {} entries",
                    self.primary.len()
                ))
            })?;
        Ok((*entry != 0).then_some(*entry))
    }

    /// The byte offset of the redundant copy of grain table `index`, if it has one.
    pub fn redundant_at(&self, index: u64) -> Option<u64> {
        let entry = *self.redundant.as_ref()?.get(usize::try_from(index).ok()?)?;
        (entry != 0).then_some(entry)
    }

    /// Points entry `index` at new tables at `at` (and `redundant_at`), byte offsets that
    /// must be sector numbers a KDMV directory can hold.
    pub fn set(&mut self, index: u64, at: u64, redundant_at: Option<u64>) -> Result<()> {
        let i = usize::try_from(index).map_err(|_| Error::out_of_range("grain directory index"))?;
        to_sector(at)?;
        let slot = self
            .primary
            .get_mut(i)
            .ok_or_else(|| Error::out_of_range("grain directory index"))?;
        *slot = at;
        if let (Some(table), Some(r)) = (self.redundant.as_mut(), redundant_at) {
            to_sector(r)?;
            if let Some(slot) = table.get_mut(i) {
                *slot = r;
            }
        }
        self.dirty.mark(i * ENTRY_LEN as usize);
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The dirty pieces of both directories as (file offset, bytes), as KDMV stores them
    /// (u32 sector numbers; only KDMV extents are written).
    pub fn dirty_pieces(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for range in self.dirty.ranges() {
            for (base, table) in [
                (Some(self.gd_at), Some(&self.primary)),
                (self.rgd_at, self.redundant.as_ref()),
            ] {
                if let (Some(base), Some(table)) = (base, table) {
                    let first = range.start / ENTRY_LEN as usize;
                    let last = range.end.div_ceil(ENTRY_LEN as usize).min(table.len());
                    let bytes = table
                        .get(first..last)
                        .unwrap_or_default()
                        .iter()
                        .flat_map(|&at| ((at / SECTOR_SIZE) as u32).to_le_bytes())
                        .collect();
                    out.push((base + range.start as u64, bytes));
                }
            }
        }
        out
    }

    pub fn mark_clean(&mut self) {
        self.dirty.clear();
    }

    /// Grain tables the directory names.
    pub fn tables(&self) -> usize {
        self.primary.iter().filter(|&&e| e != 0).count()
    }
}

/// Little-endian entries of `width` (4 or 8) bytes.
pub(super) fn decode_entries(raw: &[u8], width: u64) -> Vec<u64> {
    raw.chunks_exact(width as usize).map(decode_entry).collect()
}

/// The non-zero entries of `width` (4 or 8) bytes in `raw`, by index. Directories are mostly
/// zeros, so they are skipped 16 bytes at a time.
fn nonzero_entries(raw: &[u8], width: u64) -> impl Iterator<Item = (usize, u64)> + '_ {
    const BLOCK: usize = 16;
    let width = width as usize;
    raw.chunks(BLOCK)
        .enumerate()
        .filter(|(_, block)| {
            <[u8; BLOCK]>::try_from(*block).map_or(true, |b| u128::from_ne_bytes(b) != 0)
        })
        .flat_map(move |(block_index, block)| {
            block
                .chunks_exact(width)
                .enumerate()
                .map(move |(i, entry)| (block_index * BLOCK / width + i, decode_entry(entry)))
        })
        .filter(|&(_, entry)| entry != 0)
}

/// One little-endian entry of 4 or 8 bytes.
fn decode_entry(raw: &[u8]) -> u64 {
    match raw.len() {
        8 => u64::from_le_bytes(raw.try_into().unwrap_or_default()),
        _ => u64::from(u32::from_le_bytes(raw.try_into().unwrap_or_default())),
    }
}

/// A byte offset as a 32-bit sector number, the only kind of offset the tables can hold.
pub fn to_sector(at: u64) -> Result<u32> {
    u32::try_from(at / SECTOR_SIZE).map_err(|_| {
        Error::io(
            format!("the VMDK extent is full: offset {at:#x} does not fit a 32-bit sector number"),
            std::io::Error::from_raw_os_error(libc::EFBIG),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::vmdk::header::testing::header_bytes;

    fn layout(flags: u32) -> Layout {
        // 1 GiB, 64 KiB grains, 512-entry tables: 32 directory entries (128 bytes).
        let h = SparseHeader::parse(&header_bytes(1, flags, 1 << 21, 128, 512, 21, 22)).unwrap();
        Layout::new(&h)
    }

    #[test]
    fn entries_decode_by_flags() {
        assert_eq!(layout(2).decode(0), Grain::Unallocated);
        assert_eq!(layout(2).decode(1), Grain::Data(512));
        assert_eq!(layout(2 | 4).decode(1), Grain::Zero);
        assert_eq!(layout(2 | 4).decode(128), Grain::Data(65536));
        assert_eq!(layout(1 << 16).decode(7), Grain::Compressed(3584));
    }

    #[test]
    fn grains_must_stay_inside_the_file_and_off_the_metadata() {
        let l = layout(2);
        let what = "grain";
        l.check(&what, 0x10000, 0x10000, 0x20000).unwrap();
        let e = l.check(&what, 0x10000, 0x10000, 0x1ffff).unwrap_err();
        assert!(e.to_string().contains("beyond the end"), "{e}");
        let e = l.check(&what, 0, 512, 0x20000).unwrap_err();
        assert!(e.to_string().contains("overlaps the header"), "{e}");
        let e = l.check(&what, 21 * 512 + 100, 8, 0x20000).unwrap_err();
        assert!(
            e.to_string()
                .contains("overlaps the redundant grain directory"),
            "{e}"
        );
        let e = l.check(&what, 22 * 512, 8, 0x20000).unwrap_err();
        assert!(
            e.to_string().contains("overlaps the grain directory"),
            "{e}"
        );
        assert!(l.check(&what, u64::MAX, 2, u64::MAX).is_err());
        assert!(
            l.check_entry(1, 0x20000, &what).is_err(),
            "sector 1 is the header's"
        );
        assert!(
            layout(6).check_entry(1, 0x20000, &what).is_ok(),
            "a zeroed grain"
        );
    }

    #[test]
    fn directory_updates_dirty_both_copies() {
        let mut d = Directory {
            gd_at: 0x2c00,
            rgd_at: Some(0x2a00),
            primary: vec![0; 200],
            redundant: Some(vec![0u64; 200]),
            dirty: DirtyChunks::new(800, 512),
            overlap: None,
        };
        assert_eq!(d.table_at(3).unwrap(), None);
        assert!(d.table_at(200).is_err());
        d.set(130, 0x10000, Some(0x10800)).unwrap();
        assert_eq!(d.table_at(130).unwrap(), Some(0x10000));
        assert_eq!(d.redundant_at(130), Some(0x10800));
        let pieces = d.dirty_pieces();
        assert_eq!(pieces.len(), 2);
        assert_eq!((pieces[0].0, pieces[0].1.len()), (0x2c00 + 512, 288));
        assert_eq!(pieces[0].1[8..12], 0x80u32.to_le_bytes());
        assert_eq!(
            (pieces[1].0, pieces[1].1[8..12].to_vec()),
            (0x2a00 + 512, 0x84u32.to_le_bytes().to_vec())
        );
        d.mark_clean();
        assert!(!d.is_dirty());
        assert!(to_sector(1 << 41).is_err());
    }

    #[test]
    fn only_nonzero_entries_are_visited_and_overlaps_are_named() {
        let mut raw = vec![0u8; 100];
        raw[20..24].copy_from_slice(&7u32.to_le_bytes());
        raw[96..100].copy_from_slice(&9u32.to_le_bytes());
        assert_eq!(
            nonzero_entries(&raw, 4).collect::<Vec<_>>(),
            [(5, 7), (24, 9)]
        );
        assert_eq!(
            nonzero_entries(&raw[..96], 8).collect::<Vec<_>>(),
            [(2, 7 << 32)]
        );
        let name = |redundant, index| TableName { redundant, index };
        let apart = vec![(0x10000, name(false, 3)), (0x10800, name(true, 3))];
        assert_eq!(find_overlap(apart, 2048), None);
        let overlapping = vec![(0x10400, name(false, 131)), (0x10000, name(true, 130))];
        assert_eq!(
            find_overlap(overlapping, 2048).as_deref(),
            Some("redundant grain table 130 and grain table 131 overlap at 0x10400 in the file")
        );
    }
}
