//! The Block Allocation Table of dynamic and differencing VHDs: one big-endian u32 per block,
//! the sector at which the block's sector bitmap starts (the data follows the bitmap), or
//! 0xffffffff for a block not in the file. Kept in memory whole (4 bytes per block, at most
//! the file's own size); entries changed since the last flush are tracked by 512-byte sector.

use std::ops::Range;

use super::footer::SECTOR;
use super::header::{DynHeader, UNUSED};
use crate::error::{Error, Result};
use crate::meta::dirty::DirtyChunks;

/// QEMU accepts any power of two from a sector up; real tools write 512 KiB or 2 MiB. A
/// larger block is refused, as for VDI and VHDX: a hostile value must not make a partial
/// write widen to gigabytes.
pub const MAX_BLOCK_SIZE: u64 = 256 << 20;
/// A 2040 GiB disk needs 1 Mi entries of 2 MiB blocks (4 Mi of 512 KiB); the table, and the
/// checks of it, stay bounded whatever the header says.
pub const MAX_ENTRIES: u32 = 8 << 20;

/// Block size, bitmap size and table size of a sparse disk, checked against each other and
/// the virtual size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    /// One bit per sector of a block, padded to whole sectors.
    pub bitmap_size: u64,
    pub entries: u32,
    pub virtual_size: u64,
}

impl Geometry {
    pub fn new(header: &DynHeader, virtual_size: u64) -> Result<Geometry> {
        let block_size = u64::from(header.block_size);
        if !block_size.is_power_of_two() || block_size < SECTOR {
            return Err(Error::corrupt(format!(
                "block size {block_size} is not a power of two of at least 512 bytes"
            )));
        }
        if block_size > MAX_BLOCK_SIZE {
            return Err(Error::unsupported(format!(
                "block size {block_size} is above the 256 MiB imgfs accepts"
            )));
        }
        let entries = header.max_table_entries;
        if entries > MAX_ENTRIES {
            return Err(Error::unsupported(format!(
                "max table entries {entries} is above the {MAX_ENTRIES} imgfs reads"
            )));
        }
        let covered = u64::from(entries) * block_size;
        if covered < virtual_size {
            return Err(Error::corrupt(format!(
                "max table entries {entries} of {block_size} bytes cover {covered} bytes, less \
                 than the virtual size {virtual_size}"
            )));
        }
        let bitmap_size = (block_size / SECTOR).div_ceil(8).next_multiple_of(SECTOR);
        Ok(Geometry {
            block_size,
            bitmap_size,
            entries,
            virtual_size,
        })
    }

    /// Sectors per block.
    pub fn sectors(&self) -> u64 {
        self.block_size / SECTOR
    }

    /// (block index, byte offset inside the block) of virtual offset `offset`.
    pub fn split(&self, offset: u64) -> (u64, u64) {
        (offset / self.block_size, offset % self.block_size)
    }

    /// The file range a block whose bitmap starts at `bitmap_at` occupies.
    pub fn block_span(&self, bitmap_at: u64) -> Range<u64> {
        bitmap_at..bitmap_at + self.bitmap_size + self.block_size
    }
}

/// How a run of the virtual disk is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// In the file at `host_offset`, every sector present (the block's bitmap is all ones).
    Data { host_offset: u64 },
    /// In a block of the file whose bitmap is not known to be all ones: each sector is in the
    /// file at `host_offset` + its place in the run if its bit is set, else below.
    Partial {
        block: u64,
        bitmap_at: u64,
        host_offset: u64,
    },
    /// No block in the file: the parent's data, or zeros.
    Below,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub kind: RunKind,
}

/// What checking the table found that does not stop the image from opening.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Two blocks sharing file space: writes to one would change the other.
    pub overlap: Option<String>,
    /// The end of the last block in the file.
    pub blocks_end: u64,
}

/// The in-memory BAT.
#[derive(Debug)]
pub struct Bat {
    geometry: Geometry,
    table_offset: u64,
    entries: Vec<u32>,
    dirty: DirtyChunks,
    allocated: u64,
}

impl Bat {
    /// The table in `raw` (big-endian entries, as read at `table_offset`), checked: every block
    /// must lie inside the file (`file_len` bytes) and clear of the `metadata` ranges; blocks
    /// sharing space are reported in the scan.
    pub fn load(
        geometry: Geometry,
        table_offset: u64,
        raw: &[u8],
        metadata: &[(&str, Range<u64>)],
        file_len: u64,
    ) -> Result<(Bat, Scan)> {
        let entries: Vec<u32> = raw
            .chunks_exact(4)
            .map(|e| u32::from_be_bytes([e[0], e[1], e[2], e[3]]))
            .collect();
        if entries.len() != geometry.entries as usize {
            return Err(Error::corrupt(format!(
                "internal: {} BAT entries read, {} expected",
                entries.len(),
                geometry.entries
            )));
        }
        // Block starts and indexes: at most MAX_ENTRIES of them, whatever the entries say.
        let mut starts: Vec<(u64, u32)> = Vec::new();
        for (index, &entry) in entries.iter().enumerate() {
            if entry == UNUSED {
                continue;
            }
            let span = geometry.block_span(u64::from(entry) * SECTOR);
            let at = table_offset + 4 * index as u64;
            if span.end > file_len {
                return Err(Error::corrupt(format!(
                    "BAT entry {index} puts block {index} at file offset {:#x}..{:#x}, beyond \
                     the end of the file ({file_len} bytes)",
                    span.start, span.end
                ))
                .at_offset(at));
            }
            if let Some((name, _)) = metadata
                .iter()
                .find(|(_, m)| m.start < span.end && span.start < m.end)
            {
                return Err(Error::corrupt(format!(
                    "BAT entry {index} puts block {index} at file offset {:#x}, over {name}",
                    span.start
                ))
                .at_offset(at));
            }
            starts.push((span.start, index as u32));
        }
        starts.sort_unstable();
        // Every block spans the same length, so only neighbours in file order can overlap.
        let span_len = geometry.bitmap_size + geometry.block_size;
        let overlap = starts.windows(2).find_map(|pair| {
            let [(a, i), (b, j)] = pair else { return None };
            (*b < a + span_len).then(|| {
                format!(
                    "BAT entries {} and {} share file space at {b:#x}",
                    i.min(j),
                    i.max(j)
                )
            })
        });
        let blocks_end = starts.last().map_or(0, |(start, _)| start + span_len);
        let bat = Bat {
            geometry,
            table_offset,
            dirty: DirtyChunks::new(entries.len() * 4, SECTOR as usize),
            allocated: starts.len() as u64,
            entries,
        };
        Ok((
            bat,
            Scan {
                overlap,
                blocks_end,
            },
        ))
    }

    /// The file offset of the bitmap of `block`, if the block is in the file.
    pub fn bitmap_at(&self, block: u64) -> Result<Option<u64>> {
        let entry = usize::try_from(block)
            .ok()
            .and_then(|b| self.entries.get(b))
            .copied()
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "block {block} is beyond the {} BAT entries",
                    self.entries.len()
                ))
            })?;
        Ok((entry != UNUSED).then(|| u64::from(entry) * SECTOR))
    }

    /// Describes `[offset, offset + len)` as runs. `is_full(block)` says whether an allocated
    /// block's bitmap is known to be all ones. Data runs never cross a block (a bitmap lies
    /// between two blocks); runs below the file merge across blocks.
    pub fn runs(&self, offset: u64, len: u64, is_full: impl Fn(u64) -> bool) -> Result<Vec<Run>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} overflows")))?;
        let geo = self.geometry;
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (block, in_block) = geo.split(pos);
            let len = (geo.block_size - in_block).min(end - pos);
            let kind = match self.bitmap_at(block)? {
                None => RunKind::Below,
                Some(bitmap_at) => {
                    let host_offset = bitmap_at + geo.bitmap_size + in_block;
                    if is_full(block) {
                        RunKind::Data { host_offset }
                    } else {
                        RunKind::Partial {
                            block,
                            bitmap_at,
                            host_offset,
                        }
                    }
                }
            };
            match runs.last_mut() {
                Some(last) if last.kind == RunKind::Below && kind == RunKind::Below => {
                    last.len += len
                }
                _ => runs.push(Run {
                    offset: pos,
                    len,
                    kind,
                }),
            }
            pos += len;
        }
        Ok(runs)
    }

    /// Points `block` at the block whose bitmap starts at `bitmap_at`, once its data and
    /// bitmap are written. Refuses (changing nothing) a block already in the file.
    pub fn publish(&mut self, block: u64, bitmap_at: u64) -> Result<()> {
        let sector = u32::try_from(bitmap_at / SECTOR)
            .ok()
            .filter(|&s| s != UNUSED && bitmap_at % SECTOR == 0)
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "internal: file offset {bitmap_at:#x} is no 32-bit sector number"
                ))
            })?;
        let index = usize::try_from(block).unwrap_or(usize::MAX);
        let slot = self
            .entries
            .get_mut(index)
            .ok_or_else(|| Error::out_of_range(format!("block {block} is beyond the BAT")))?;
        if *slot != UNUSED {
            return Err(Error::corrupt(format!(
                "internal: block {block} allocated twice"
            )));
        }
        *slot = sector;
        self.dirty.mark(index * 4);
        self.allocated += 1;
        Ok(())
    }

    /// Entries in the table.
    pub fn len(&self) -> u32 {
        self.geometry.entries
    }

    /// The lowest file offset at or after `from` where a block of the file starts.
    pub fn first_block_from(&self, from: u64) -> Option<u64> {
        let starts = self.entries.iter().filter(|&&e| e != UNUSED);
        starts
            .map(|&e| u64::from(e) * SECTOR)
            .filter(|&at| at >= from)
            .min()
    }

    /// Takes the geometry of a grown disk (a resize): its new entries hold no block, as they
    /// do on disk already. The table must be clean; its dirty tracking starts over.
    pub fn grow(&mut self, geometry: Geometry) -> Result<()> {
        if self.is_dirty() || geometry.entries < self.geometry.entries {
            return Err(Error::out_of_range(
                "internal: the VHD BAT grows only, and only when clean",
            ));
        }
        self.entries.resize(geometry.entries as usize, UNUSED);
        self.dirty = DirtyChunks::new(self.entries.len() * 4, SECTOR as usize);
        self.geometry = geometry;
        Ok(())
    }

    /// Blocks in the file.
    pub fn allocated(&self) -> u64 {
        self.allocated
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The changed sectors of the on-disk table as (file offset, big-endian bytes).
    pub fn dirty_sectors(&self) -> Vec<(u64, Vec<u8>)> {
        self.dirty
            .ranges()
            .into_iter()
            .map(|range| {
                let bytes = self
                    .entries
                    .get(range.start / 4..range.end / 4)
                    .unwrap_or_default()
                    .iter()
                    .flat_map(|e| e.to_be_bytes())
                    .collect();
                (self.table_offset + range.start as u64, bytes)
            })
            .collect()
    }

    pub fn mark_clean(&mut self) {
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    const MIB: u64 = 1 << 20;

    fn geometry(entries: u32, block_size: u32) -> Geometry {
        let header = DynHeader {
            table_offset: 1536,
            version: 0x0001_0000,
            max_table_entries: entries,
            block_size,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        };
        Geometry::new(&header, u64::from(entries) * u64::from(block_size)).unwrap()
    }

    fn table(entries: &[u32]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.to_be_bytes()).collect()
    }

    #[test]
    fn geometry_checks_block_size_and_table_coverage() {
        let g = geometry(4, 2 << 20);
        assert_eq!((g.bitmap_size, g.sectors()), (512, 4096));
        assert_eq!(geometry(1, 32 << 20).bitmap_size, 8192);
        assert_eq!(geometry(1, 512).bitmap_size, 512);
        let mut h = DynHeader {
            table_offset: 0,
            version: 0,
            max_table_entries: 2,
            block_size: 0,
            parent_uuid: [0; 16],
            parent_timestamp: 0,
            parent_name: String::new(),
            locators: Vec::new(),
        };
        for (block_size, kind) in [
            (0, ErrorKind::Corrupt),
            (256, ErrorKind::Corrupt),
            (3 << 20, ErrorKind::Corrupt),
            (512 << 20, ErrorKind::Unsupported),
            (1 << 31, ErrorKind::Unsupported),
        ] {
            h.max_table_entries = 2;
            h.block_size = block_size;
            assert_eq!(
                Geometry::new(&h, 0).unwrap_err().kind(),
                kind,
                "{block_size}"
            );
        }
        h.block_size = MIB as u32;
        h.max_table_entries = MAX_ENTRIES + 1;
        let e = Geometry::new(&h, 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        h.max_table_entries = 2;
        let e = Geometry::new(&h, 2 * MIB + 512).unwrap_err();
        assert!(e.to_string().contains("less than the virtual size"), "{e}");
    }

    #[test]
    fn blocks_are_checked_against_the_file_and_the_metadata() {
        let g = geometry(4, MIB as u32);
        let block = MIB + 512;
        let meta = [("the BAT", 1536..2048)];
        // Block 0 at sector 4 (2048), block 2 right after it.
        let entries = [4, UNUSED, 4 + (block / 512) as u32, UNUSED];
        let len = 2048 + 2 * block;
        let (bat, scan) = Bat::load(g, 1536, &table(&entries), &meta, len).unwrap();
        assert_eq!(
            scan,
            Scan {
                overlap: None,
                blocks_end: len
            }
        );
        assert_eq!(bat.allocated(), 2);
        assert_eq!(bat.bitmap_at(2).unwrap(), Some(2048 + block));
        assert_eq!(bat.bitmap_at(1).unwrap(), None);
        assert_eq!(bat.bitmap_at(4).unwrap_err().kind(), ErrorKind::OutOfRange);

        let e = Bat::load(g, 1536, &table(&entries), &meta, len - 1).unwrap_err();
        assert!(e.to_string().contains("BAT entry 2 puts block 2"), "{e}");
        assert!(e.to_string().contains("beyond the end of the file"), "{e}");
        assert!(e.to_string().contains("at offset 0x608"), "{e}");
        let e = Bat::load(g, 1536, &table(&[3, UNUSED, UNUSED, UNUSED]), &meta, len).unwrap_err();
        assert!(e.to_string().contains("over the BAT"), "{e}");
        let e = Bat::load(g, 1536, &table(&[UNUSED; 3]), &meta, len).unwrap_err();
        assert!(e.to_string().contains("internal"), "{e}");

        let shared = [4, UNUSED, 5, UNUSED];
        let (_, scan) = Bat::load(g, 1536, &table(&shared), &meta, len).unwrap();
        assert!(scan
            .overlap
            .unwrap()
            .contains("BAT entries 0 and 2 share file space"),);
    }

    #[test]
    fn runs_split_at_blocks_and_merge_below() {
        let g = geometry(4, 4096);
        let block = 4096 + 512;
        let entries = [UNUSED, UNUSED, 10, 10 + (block / 512) as u32];
        let len = 10 * 512 + 2 * block;
        let (bat, _) = Bat::load(g, 1536, &table(&entries), &[], len).unwrap();
        let runs = bat.runs(100, 4 * 4096 - 200, |b| b == 2).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 100,
                    len: 2 * 4096 - 100,
                    kind: RunKind::Below
                },
                Run {
                    offset: 2 * 4096,
                    len: 4096,
                    kind: RunKind::Data {
                        host_offset: 5120 + 512
                    }
                },
                Run {
                    offset: 3 * 4096,
                    len: 4096 - 100,
                    kind: RunKind::Partial {
                        block: 3,
                        bitmap_at: 5120 + block,
                        host_offset: 5120 + block + 512
                    }
                },
            ]
        );
        assert!(bat.runs(u64::MAX, 2, |_| true).is_err());
    }

    #[test]
    fn publish_marks_sectors_and_refuses_double_allocation() {
        let g = geometry(300, 4096);
        let (mut bat, _) = Bat::load(g, 1536, &table(&[UNUSED; 300]), &[], 0).unwrap();
        assert!(!bat.is_dirty());
        bat.publish(10, 0x10_0000).unwrap();
        bat.publish(299, 0x20_0000).unwrap();
        assert_eq!(bat.allocated(), 2);
        let sectors = bat.dirty_sectors();
        assert_eq!(sectors.len(), 2);
        assert_eq!((sectors[0].0, sectors[0].1.len()), (1536, 512));
        assert_eq!(&sectors[0].1[40..44], &(0x10_0000u32 / 512).to_be_bytes());
        // The last sector holds 44 entries: nothing past the table is written.
        assert_eq!((sectors[1].0, sectors[1].1.len()), (1536 + 1024, 176));
        assert_eq!(
            bat.publish(10, 0x30_0000).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        assert_eq!(
            bat.publish(300, 0x30_0000).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert!(bat.publish(1, 100).is_err(), "not a sector");
        assert!(bat.publish(1, u64::from(UNUSED) * 512).is_err());
        assert_eq!(bat.allocated(), 2, "refused publishes change nothing");
        bat.mark_clean();
        assert!(!bat.is_dirty());
    }
}
