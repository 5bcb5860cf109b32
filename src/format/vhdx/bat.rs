//! The block allocation table: one u64 per payload block, with one sector bitmap entry after
//! every `chunk_ratio` payload entries, held in memory and validated when loaded.
//!
//! ```text
//! entry     bits 0-2 state, 3-19 reserved, 20-63 file offset in MiB
//! payload   0 NOT_PRESENT, 1 UNDEFINED, 2 ZERO, 3 UNMAPPED, 6 FULLY_PRESENT,
//!           7 PARTIALLY_PRESENT (differencing only: the chunk's sector bitmap says which
//!           logical sectors are here and which come from the parent)
//! bitmap    0 NOT_PRESENT, 6 PRESENT (a 1 MiB block of one bit per logical sector)
//! index     payload block b at b + b / chunk_ratio; the bitmap of chunk c at
//!           c * (chunk_ratio + 1) + chunk_ratio
//! ```
//!
//! `chunk_ratio = 2^23 * logical_sector_size / block_size`: one sector bitmap block (2^23 bits)
//! covers that many payload blocks. The in-memory copy keeps the BAT up to the end of the 4 KiB
//! sector holding its last needed entry, because changes go through the log in whole 4 KiB
//! sectors.

use std::ops::Range;

use super::header::{overlaps, MIB};
use super::metadata::Metadata;
use crate::error::{Error, Result};
use crate::meta::dirty::DirtyChunks;

pub const NOT_PRESENT: u64 = 0;
pub const UNDEFINED: u64 = 1;
pub const ZERO: u64 = 2;
pub const UNMAPPED: u64 = 3;
pub const FULLY_PRESENT: u64 = 6;
pub const PARTIALLY_PRESENT: u64 = 7;
pub const SB_PRESENT: u64 = 6;

const STATE_MASK: u64 = 7;
const OFFSET_SHIFT: u32 = 20;
const ENTRY_LEN: u64 = 8;
/// The log writes whole 4 KiB sectors, so the BAT is tracked and written back in them.
pub const BAT_SECTOR: u64 = 4096;
/// A sector bitmap block is always 1 MiB: 2^23 bits, one per logical sector of a chunk.
const BITMAP_BLOCK: u64 = MIB;

pub(super) fn state(entry: u64) -> u64 {
    entry & STATE_MASK
}

pub(super) fn host_of(entry: u64) -> u64 {
    (entry >> OFFSET_SHIFT) << 20
}

/// The shape of the virtual disk as the BAT sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub block_size: u64,
    pub logical_sector: u64,
    pub virtual_size: u64,
    pub chunk_ratio: u64,
    pub payload_blocks: u64,
    pub differencing: bool,
}

impl Geometry {
    pub fn new(meta: &Metadata) -> Geometry {
        let block_size = u64::from(meta.block_size);
        let logical_sector = u64::from(meta.logical_sector_size);
        // Validated: block size 2^20..2^28, sector 2^9 or 2^12, so the ratio is >= 16.
        let chunk_ratio = (1u64 << 23) * logical_sector / block_size;
        Geometry {
            block_size,
            logical_sector,
            virtual_size: meta.virtual_size,
            chunk_ratio,
            payload_blocks: meta.virtual_size.div_ceil(block_size),
            differencing: meta.has_parent,
        }
    }

    /// How many BAT entries the disk needs: up to its last payload entry, or for a
    /// differencing disk up to the bitmap entry of its last chunk.
    pub fn needed_entries(&self) -> u64 {
        if self.payload_blocks == 0 {
            return 0;
        }
        if self.differencing {
            self.payload_blocks.div_ceil(self.chunk_ratio) * (self.chunk_ratio + 1)
        } else {
            self.payload_blocks + (self.payload_blocks - 1) / self.chunk_ratio
        }
    }

    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    pub fn bitmap_index(&self, block: u64) -> u64 {
        (block / self.chunk_ratio) * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Splits a virtual offset into (payload block, offset inside it).
    pub fn split(&self, offset: u64) -> (u64, u64) {
        (offset / self.block_size, offset % self.block_size)
    }

    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.logical_sector
    }

    /// The bit of the chunk's sector bitmap for the sector at `in_block` in payload `block`.
    pub fn chunk_sector(&self, block: u64, in_block: u64) -> u64 {
        (block % self.chunk_ratio) * self.sectors_per_block() + in_block / self.logical_sector
    }
}

/// How one run of the virtual disk is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Stored in the file at this offset.
    Data { host_offset: u64 },
    /// Defined as zeros (ZERO, UNMAPPED, or UNDEFINED in a differencing disk).
    Zero,
    /// Nothing stored, reads as zeros (NOT_PRESENT or UNDEFINED in a disk without parent).
    Unallocated,
    /// Not in this file: the parent has it (NOT_PRESENT in a differencing disk).
    Below,
    /// A partially present block: `host_offset` is where this run's data would be, `bitmap`
    /// the file offset of the bitmap byte holding the run's first sector, `first_bit` its bit.
    Partial {
        host_offset: u64,
        bitmap: u64,
        first_bit: u64,
    },
}

/// A run of the virtual disk with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub kind: RunKind,
}

/// What loading found that the image should know about.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The end of the last block the BAT points at (payload, bitmap, or the retained space of
    /// an unmapped or undefined block).
    pub highest_end: u64,
    /// Why writes would be unsafe (two entries sharing file space), if they would be.
    pub shared_space: Option<String>,
}

/// The in-memory BAT.
pub struct Bat {
    geometry: Geometry,
    region_offset: u64,
    entries: Vec<u64>,
    dirty: DirtyChunks,
    present_blocks: u64,
}

impl Bat {
    /// How many bytes of the BAT region to load for `geometry`: whole 4 KiB sectors up to the
    /// last needed entry. Fails when the region is too small.
    pub fn load_len(geometry: &Geometry, region: &Range<u64>) -> Result<u64> {
        let needed = geometry
            .needed_entries()
            .checked_mul(ENTRY_LEN)
            .ok_or_else(|| Error::corrupt("BAT size overflows"))?;
        let region_len = region.end - region.start;
        if needed > region_len {
            return Err(Error::corrupt(format!(
                "the BAT region ({region_len} bytes) is too small for the {} entries a {}-byte \
                 disk with {}-byte blocks needs",
                geometry.needed_entries(),
                geometry.virtual_size,
                geometry.block_size
            )));
        }
        Ok(needed.next_multiple_of(BAT_SECTOR).min(region_len))
    }

    /// Builds and validates the BAT from the raw bytes of the first `load_len` bytes of its
    /// region. `structures` are the file ranges no block may overlap (header section, log,
    /// regions); `file_len` the length of the file blocks must start inside.
    pub fn from_bytes(
        geometry: Geometry,
        region_offset: u64,
        raw: &[u8],
        structures: &[(&str, Range<u64>)],
        file_len: u64,
    ) -> Result<(Bat, Scan)> {
        let entries: Vec<u64> = raw
            .chunks_exact(ENTRY_LEN as usize)
            .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect();
        if (entries.len() as u64) < geometry.needed_entries() {
            return Err(Error::out_of_range(
                "internal: BAT bytes shorter than needed",
            ));
        }
        let mut bat = Bat {
            geometry,
            region_offset,
            dirty: DirtyChunks::new(raw.len(), BAT_SECTOR as usize),
            entries,
            present_blocks: 0,
        };
        let scan = bat.validate(structures, file_len)?;
        Ok((bat, scan))
    }

    fn validate(&mut self, structures: &[(&str, Range<u64>)], file_len: u64) -> Result<Scan> {
        let geo = self.geometry;
        let mut blocks: Vec<(Range<u64>, u64)> = Vec::new();
        let mut scan = Scan::default();
        for block in 0..geo.payload_blocks {
            let index = geo.payload_index(block);
            let entry = self.entry_at(index)?;
            let at = self.region_offset + index * ENTRY_LEN;
            match state(entry) {
                UNDEFINED | UNMAPPED => {
                    // Other implementations may still read the block's old contents here, so
                    // new blocks must not reuse its space.
                    let end = host_of(entry).saturating_add(geo.block_size);
                    if host_of(entry) != 0 && end <= file_len {
                        scan.highest_end = scan.highest_end.max(end);
                    }
                    continue;
                }
                NOT_PRESENT | ZERO => continue,
                FULLY_PRESENT => {}
                PARTIALLY_PRESENT if geo.differencing => {
                    let bitmap = self.entry_at(geo.bitmap_index(block))?;
                    if state(bitmap) != SB_PRESENT {
                        return Err(Error::corrupt(format!(
                            "payload block {block} is partially present but its chunk has no \
                             sector bitmap"
                        ))
                        .at_offset(at));
                    }
                }
                PARTIALLY_PRESENT => {
                    return Err(Error::corrupt(format!(
                        "payload block {block} is partially present in an image without parent"
                    ))
                    .at_offset(at))
                }
                other => {
                    return Err(Error::corrupt(format!(
                        "payload block {block} has the reserved BAT state {other}"
                    ))
                    .at_offset(at))
                }
            }
            let range =
                check_block(entry, geo.block_size, structures, file_len).map_err(|why| {
                    Error::corrupt(format!("payload block {block} {why}")).at_offset(at)
                })?;
            self.present_blocks += 1;
            blocks.push((range, index));
        }
        if geo.differencing {
            for chunk in 0..geo.payload_blocks.div_ceil(geo.chunk_ratio) {
                let index = chunk * (geo.chunk_ratio + 1) + geo.chunk_ratio;
                let entry = self.entry_at(index)?;
                let at = self.region_offset + index * ENTRY_LEN;
                match state(entry) {
                    NOT_PRESENT => continue,
                    SB_PRESENT => {}
                    other => {
                        return Err(Error::corrupt(format!(
                        "the sector bitmap entry of chunk {chunk} has the reserved state {other}"
                    ))
                        .at_offset(at))
                    }
                }
                let range =
                    check_block(entry, BITMAP_BLOCK, structures, file_len).map_err(|why| {
                        Error::corrupt(format!("the sector bitmap block of chunk {chunk} {why}"))
                            .at_offset(at)
                    })?;
                blocks.push((range, index));
            }
        }
        blocks.sort_by_key(|(range, _)| range.start);
        let present_end = blocks.iter().map(|(r, _)| r.end).max().unwrap_or(0);
        scan.highest_end = scan.highest_end.max(present_end);
        scan.shared_space = blocks
            .windows(2)
            .find(|w| overlaps(&w[0].0, &w[1].0))
            .map(|w| {
                format!(
                    "BAT entries {} and {} share file space at {:#x}",
                    w[0].1, w[1].1, w[1].0.start
                )
            });
        Ok(scan)
    }

    fn entry_at(&self, index: u64) -> Result<u64> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
            .ok_or_else(|| Error::out_of_range(format!("BAT index {index} beyond the table")))
    }

    /// Describes `[offset, offset + len)` as runs; neighbouring blocks that are also
    /// neighbours in the file share one run.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.geometry.virtual_size)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} is beyond the disk")))?;
        let geo = self.geometry;
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let (block, in_block) = geo.split(pos);
            let len = (geo.block_size - in_block).min(end - pos);
            let entry = self.entry_at(geo.payload_index(block))?;
            let kind = match (state(entry), geo.differencing) {
                (FULLY_PRESENT, _) => RunKind::Data {
                    host_offset: host_of(entry) + in_block,
                },
                (PARTIALLY_PRESENT, true) => {
                    let bitmap_entry = self.entry_at(geo.bitmap_index(block))?;
                    let sector = geo.chunk_sector(block, in_block);
                    RunKind::Partial {
                        host_offset: host_of(entry) + in_block,
                        bitmap: host_of(bitmap_entry) + sector / 8,
                        first_bit: sector % 8,
                    }
                }
                (NOT_PRESENT, true) => RunKind::Below,
                (NOT_PRESENT | UNDEFINED, false) => RunKind::Unallocated,
                _ => RunKind::Zero,
            };
            let run = Run {
                offset: pos,
                len,
                kind,
            };
            match runs.last_mut() {
                Some(last) if continues(last, &run) => last.len += len,
                _ => runs.push(run),
            }
            pos += len;
        }
        Ok(runs)
    }

    /// Points payload block `block` at the block written at `host`, fully present or (with
    /// `partial`, in a differencing image whose chunk has a sector bitmap) partially present.
    /// Refuses (changing nothing) if the block is already stored in the file.
    pub fn publish(&mut self, block: u64, host: u64, partial: bool) -> Result<()> {
        let geo = self.geometry;
        if partial && self.bitmap_of(block)?.is_none() {
            return Err(Error::out_of_range(format!(
                "internal: payload block {block} made partially present without a sector bitmap"
            )));
        }
        let index = geo.payload_index(block);
        let slot = usize::try_from(index)
            .ok()
            .filter(|_| block < geo.payload_blocks)
            .and_then(|i| self.entries.get_mut(i))
            .ok_or_else(|| Error::out_of_range(format!("payload block {block} beyond the BAT")))?;
        if matches!(state(*slot), FULLY_PRESENT | PARTIALLY_PRESENT) {
            return Err(Error::corrupt(format!(
                "internal: payload block {block} allocated twice"
            )));
        }
        if host % MIB != 0 || host == 0 {
            return Err(Error::out_of_range(
                "internal: block offset not MiB aligned",
            ));
        }
        *slot = host
            | if partial {
                PARTIALLY_PRESENT
            } else {
                FULLY_PRESENT
            };
        self.dirty.mark((index * ENTRY_LEN) as usize);
        self.present_blocks += 1;
        Ok(())
    }

    /// Makes payload block `block` read as zeros (PAYLOAD_BLOCK_ZERO, no file offset), also
    /// over a parent. Returns the file offset of the block it held, if it held one; `None`
    /// and no change when it reads as zeros already.
    pub fn zero(&mut self, block: u64) -> Result<Option<u64>> {
        let geo = self.geometry;
        let index = geo.payload_index(block);
        let slot = usize::try_from(index)
            .ok()
            .filter(|_| block < geo.payload_blocks)
            .and_then(|i| self.entries.get_mut(i))
            .ok_or_else(|| Error::out_of_range(format!("payload block {block} beyond the BAT")))?;
        let old = *slot;
        let held = match (state(old), geo.differencing) {
            (FULLY_PRESENT | PARTIALLY_PRESENT, _) => Some(host_of(old)),
            (NOT_PRESENT, true) => None,
            _ => return Ok(None),
        };
        *slot = ZERO;
        self.dirty.mark((index * ENTRY_LEN) as usize);
        if held.is_some() {
            self.present_blocks = self.present_blocks.saturating_sub(1);
        }
        Ok(held)
    }

    /// The file offset of the sector bitmap block of the chunk holding payload `block`, if
    /// it has one.
    pub fn bitmap_of(&self, block: u64) -> Result<Option<u64>> {
        let entry = self.entry_at(self.geometry.bitmap_index(block))?;
        Ok((self.geometry.differencing && state(entry) == SB_PRESENT).then(|| host_of(entry)))
    }

    /// Points the sector bitmap entry of the chunk holding payload `block` at the zeroed 1 MiB
    /// block written at `host`. Refuses if the chunk has one, or the image has no parent.
    pub fn publish_bitmap(&mut self, block: u64, host: u64) -> Result<()> {
        let geo = self.geometry;
        if !geo.differencing || block >= geo.payload_blocks || self.bitmap_of(block)?.is_some() {
            return Err(Error::out_of_range(format!(
                "internal: no new sector bitmap for payload block {block}"
            )));
        }
        if host % MIB != 0 || host == 0 {
            return Err(Error::out_of_range(
                "internal: bitmap offset not MiB aligned",
            ));
        }
        let index = geo.bitmap_index(block);
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
            .ok_or_else(|| Error::out_of_range(format!("BAT index {index} beyond the table")))?;
        *slot = host | SB_PRESENT;
        self.dirty.mark((index * ENTRY_LEN) as usize);
        Ok(())
    }

    /// Bytes of the BAT region held in memory.
    pub fn loaded_len(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_LEN
    }

    /// Takes the geometry of a grown disk (a resize), and `tail`, the region's bytes from
    /// `loaded_len` to the grown disk's `load_len`. Every entry past the old payload blocks
    /// but the sector bitmap entries of a differencing disk's old chunks becomes NOT_PRESENT
    /// (marked dirty where it was not). The table must be clean.
    pub fn grow(&mut self, geometry: Geometry, tail: &[u8]) -> Result<()> {
        let old = self.geometry;
        let total = self.entries.len() + tail.len() / ENTRY_LEN as usize;
        if self.is_dirty()
            || geometry.payload_blocks < old.payload_blocks
            || (total as u64) < geometry.needed_entries()
        {
            return Err(Error::out_of_range(
                "internal: the BAT grows only, when clean",
            ));
        }
        let decode = |c: &[u8]| u64::from_le_bytes(c.try_into().unwrap_or_default());
        self.entries
            .extend(tail.chunks_exact(ENTRY_LEN as usize).map(decode));
        self.dirty = DirtyChunks::new(total * ENTRY_LEN as usize, BAT_SECTOR as usize);
        let (span, old_chunks) = (
            old.chunk_ratio + 1,
            old.payload_blocks.div_ceil(old.chunk_ratio),
        );
        for index in old.payload_index(old.payload_blocks)..geometry.needed_entries() {
            let old_bitmap = index % span == old.chunk_ratio && index / span < old_chunks;
            let slot = usize::try_from(index)
                .ok()
                .and_then(|i| self.entries.get_mut(i));
            if let Some(slot) = slot.filter(|s| **s != NOT_PRESENT) {
                if !(old_bitmap && old.differencing) {
                    *slot = NOT_PRESENT;
                    self.dirty.mark((index * ENTRY_LEN) as usize);
                }
            }
        }
        self.geometry = geometry;
        Ok(())
    }

    /// Payload blocks stored in the file.
    pub fn present_blocks(&self) -> u64 {
        self.present_blocks
    }

    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The dirty 4 KiB sectors of the BAT as (file offset, bytes), in file order.
    pub fn dirty_sectors(&self) -> Vec<(u64, Vec<u8>)> {
        let per_sector = (BAT_SECTOR / ENTRY_LEN) as usize;
        let mut out = Vec::new();
        for range in self.dirty.ranges() {
            let mut start = range.start;
            while start < range.end {
                let first = start / ENTRY_LEN as usize;
                let entries = self
                    .entries
                    .get(first..first + per_sector)
                    .unwrap_or_default();
                let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                out.push((self.region_offset + start as u64, bytes));
                start += BAT_SECTOR as usize;
            }
        }
        out
    }

    pub fn mark_clean(&mut self) {
        self.dirty.clear();
    }
}

fn continues(last: &Run, next: &Run) -> bool {
    if last.offset + last.len != next.offset {
        return false;
    }
    match (last.kind, next.kind) {
        (RunKind::Data { host_offset: a }, RunKind::Data { host_offset: b }) => a + last.len == b,
        (RunKind::Partial { .. }, _) | (_, RunKind::Partial { .. }) => false,
        (a, b) => a == b,
    }
}

/// Checks a present block's file range: after the header section, starting inside the file,
/// overlapping no structure. Returns the range or why it is bad.
pub(super) fn check_block(
    entry: u64,
    len: u64,
    structures: &[(&str, Range<u64>)],
    file_len: u64,
) -> std::result::Result<Range<u64>, String> {
    let host = host_of(entry);
    if host == 0 {
        return Err("is present but has file offset 0".into());
    }
    if host >= file_len {
        return Err(format!(
            "points at file offset {host:#x}, beyond the end of the file ({file_len} bytes)"
        ));
    }
    // host < file_len <= u64::MAX and len <= 256 MiB: the file cannot be that close to 2^64.
    let range = host..host.saturating_add(len);
    if let Some((name, _)) = structures.iter().find(|(_, r)| overlaps(r, &range)) {
        return Err(format!("at file offset {host:#x} overlaps {name}"));
    }
    Ok(range)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn geometry(block_size: u64, logical: u64, virtual_size: u64, differencing: bool) -> Geometry {
        let meta = Metadata {
            block_size: block_size as u32,
            leave_blocks_allocated: false,
            has_parent: differencing,
            virtual_size,
            page_83_id: uuid::Uuid::nil(),
            logical_sector_size: logical as u32,
            physical_sector_size: 512,
            parent_locator: None,
        };
        Geometry::new(&meta)
    }

    fn raw(entries: &[u64], len: u64) -> Vec<u8> {
        let mut bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        bytes.resize(len as usize, 0);
        bytes
    }

    const STRUCTURES: [(&str, Range<u64>); 2] = [
        ("the header section", 0..MIB),
        ("the BAT region", 2 * MIB..3 * MIB),
    ];

    fn load(geo: Geometry, entries: &[u64], file_len: u64) -> Result<(Bat, Scan)> {
        let len = Bat::load_len(&geo, &(2 * MIB..3 * MIB))?;
        Bat::from_bytes(geo, 2 * MIB, &raw(entries, len), &STRUCTURES, file_len)
    }

    #[test]
    fn chunk_ratio_and_indices_follow_the_spec() {
        let g = geometry(MIB, 512, 10 * MIB, false);
        assert_eq!(g.chunk_ratio, 4096);
        assert_eq!(geometry(256 * MIB, 512, MIB, false).chunk_ratio, 16);
        assert_eq!(geometry(MIB, 4096, MIB, false).chunk_ratio, 32768);
        let g = geometry(256 * MIB, 512, 40 * 256 * MIB, false);
        assert_eq!(g.payload_index(15), 15);
        assert_eq!(g.payload_index(16), 17, "bitmap entry 16 sits between");
        assert_eq!(g.bitmap_index(20), 33);
        assert_eq!(g.needed_entries(), 40 + 2);
        let d = geometry(256 * MIB, 512, 40 * 256 * MIB, true);
        assert_eq!(d.needed_entries(), 3 * 17);
        assert_eq!(geometry(MIB, 512, 0, false).needed_entries(), 0);
    }

    #[test]
    fn runs_map_states_and_merge_contiguous_blocks() {
        let g = geometry(MIB, 512, 6 * MIB, false);
        let entries = [
            (8 * MIB) | FULLY_PRESENT,
            (9 * MIB) | FULLY_PRESENT,
            ZERO,
            NOT_PRESENT,
            UNDEFINED,
            (4 * MIB) | FULLY_PRESENT,
        ];
        let (bat, scan) = load(g, &entries, 10 * MIB).unwrap();
        assert_eq!(scan.highest_end, 10 * MIB);
        assert_eq!(scan.shared_space, None);
        assert_eq!(bat.present_blocks(), 3);
        let runs = bat.runs(512, 6 * MIB - 512).unwrap();
        let run = |offset, len, kind| Run { offset, len, kind };
        assert_eq!(
            runs,
            [
                run(
                    512,
                    2 * MIB - 512,
                    RunKind::Data {
                        host_offset: 8 * MIB + 512
                    }
                ),
                run(2 * MIB, MIB, RunKind::Zero),
                run(3 * MIB, 2 * MIB, RunKind::Unallocated),
                run(
                    5 * MIB,
                    MIB,
                    RunKind::Data {
                        host_offset: 4 * MIB
                    }
                ),
            ]
        );
        assert!(bat.runs(6 * MIB, 1).is_err());
    }

    #[test]
    fn differencing_runs_read_below_and_find_the_bitmap() {
        let g = geometry(MIB, 512, 3 * MIB, true);
        let mut entries = vec![0u64; 4097];
        entries[0] = NOT_PRESENT;
        entries[1] = (5 * MIB) | PARTIALLY_PRESENT;
        entries[2] = UNDEFINED;
        entries[4096] = (6 * MIB) | SB_PRESENT;
        let (bat, _) = load(g, &entries, 7 * MIB).unwrap();
        let runs = bat.runs(0, 3 * MIB).unwrap();
        assert_eq!(runs[0].kind, RunKind::Below);
        // Block 1 starts at sector 2048 of the chunk: bitmap byte 256, bit 0.
        assert_eq!(
            runs[1].kind,
            RunKind::Partial {
                host_offset: 5 * MIB,
                bitmap: 6 * MIB + 256,
                first_bit: 0
            }
        );
        assert_eq!(runs[2].kind, RunKind::Zero);
        let runs = bat.runs(MIB + 1536, 512).unwrap();
        assert_eq!(
            runs[0].kind,
            RunKind::Partial {
                host_offset: 5 * MIB + 1536,
                bitmap: 6 * MIB + 256,
                first_bit: 3
            }
        );

        entries[4096] = NOT_PRESENT;
        let e = load(g, &entries, 7 * MIB).err().unwrap();
        assert!(e.to_string().contains("no sector bitmap"), "{e}");
    }

    #[test]
    fn partially_present_blocks_are_published_after_their_chunks_bitmap() {
        let g = geometry(MIB, 512, 5000 * MIB, true);
        let (mut bat, _) = load(g, &[], 8 * MIB).unwrap();
        assert_eq!(bat.bitmap_of(4100).unwrap(), None);
        assert!(bat.publish(4100, 8 * MIB, true).is_err(), "no bitmap yet");
        bat.publish_bitmap(4100, 9 * MIB).unwrap();
        assert!(bat.publish_bitmap(4101, 10 * MIB).is_err(), "one per chunk");
        assert_eq!(bat.bitmap_of(4101).unwrap(), Some(9 * MIB));
        assert_eq!(bat.bitmap_of(5).unwrap(), None, "chunk 0 has none");
        bat.publish(4100, 8 * MIB, true).unwrap();
        assert_eq!(bat.present_blocks(), 1);
        // Block 4100 is block 4 of chunk 1: its sector 2 is bit 4 * 2048 + 2 of the bitmap.
        let runs = bat.runs(4100 * MIB + 1024, 512).unwrap();
        assert_eq!(
            runs[0].kind,
            RunKind::Partial {
                host_offset: 8 * MIB + 1024,
                bitmap: 9 * MIB + 1024,
                first_bit: 2
            }
        );
        // Payload entry 4101 in BAT sector 8, the chunk's bitmap entry 8193 in sector 16.
        let offsets: Vec<u64> = bat.dirty_sectors().iter().map(|s| s.0).collect();
        assert_eq!(offsets, [2 * MIB + 8 * 4096, 2 * MIB + 16 * 4096]);
    }

    #[test]
    fn bad_entries_are_refused_with_their_offset() {
        let g = geometry(MIB, 512, 3 * MIB, false);
        let check = |entries: &[u64], needle: &str, at: u64| {
            let e = load(g, entries, 8 * MIB).err().expect("must be refused");
            assert_eq!(e.kind(), ErrorKind::Corrupt);
            let text = e.to_string();
            assert!(text.contains(needle), "{text} should mention {needle}");
            assert!(text.contains(&format!("at offset {at:#x}")), "{text}");
        };
        check(
            &[0, (9 * MIB) | FULLY_PRESENT],
            "payload block 1 points at file offset 0x900000, beyond the end",
            2 * MIB + 8,
        );
        check(&[0, 0, 4], "reserved BAT state 4", 2 * MIB + 16);
        check(
            &[(2 * MIB) | FULLY_PRESENT],
            "overlaps the BAT region",
            2 * MIB,
        );
        check(&[FULLY_PRESENT], "file offset 0", 2 * MIB);
        check(
            &[0, (5 * MIB) | PARTIALLY_PRESENT],
            "without parent",
            2 * MIB + 8,
        );
        let (_, scan) = load(g, &[(3 * MIB) | UNMAPPED, 0, (4 * MIB) | 6], 8 * MIB).unwrap();
        assert_eq!(scan.highest_end, 5 * MIB);
        let (_, scan) = load(g, &[(6 * MIB) | UNMAPPED, 0, (4 * MIB) | 6], 8 * MIB).unwrap();
        assert_eq!(
            scan.highest_end,
            7 * MIB,
            "space of unmapped blocks is not reused"
        );
        let (_, scan) = load(g, &[(5 * MIB) | 6, 0, (5 * MIB) | 6], 8 * MIB).unwrap();
        assert!(scan.shared_space.unwrap().contains("BAT entries 0 and 2"));
        let small = geometry(MIB, 512, 200_000 * MIB, false);
        assert!(Bat::load_len(&small, &(2 * MIB..3 * MIB))
            .unwrap_err()
            .to_string()
            .contains("too small"));
    }

    #[test]
    fn publish_marks_whole_sectors_dirty() {
        let g = geometry(MIB, 512, 1000 * MIB, false);
        let (mut bat, _) = load(g, &[], 8 * MIB).unwrap();
        assert_eq!(
            Bat::load_len(&g, &(2 * MIB..3 * MIB)).unwrap(),
            8192,
            "1000 entries + 0 bitmaps"
        );
        bat.publish(511, 8 * MIB, false).unwrap();
        bat.publish(512, 9 * MIB, false).unwrap();
        assert!(bat.publish(512, 10 * MIB, false).is_err());
        assert!(bat.publish(1000, 10 * MIB, false).is_err());
        assert!(
            bat.publish(3, 10 * MIB, true).is_err(),
            "no parent, no bitmap"
        );
        assert!(bat.publish_bitmap(3, 10 * MIB).is_err());
        let sectors = bat.dirty_sectors();
        assert_eq!(sectors.len(), 2);
        assert_eq!((sectors[0].0, sectors[0].1.len()), (2 * MIB, 4096));
        assert_eq!(&sectors[0].1[4088..], &((8 * MIB) | 6).to_le_bytes());
        assert_eq!(
            (sectors[1].0, &sectors[1].1[..8]),
            (2 * MIB + 4096, &((9 * MIB) | 6).to_le_bytes()[..])
        );
        bat.mark_clean();
        assert!(!bat.is_dirty());
        assert_eq!(
            bat.runs(511 * MIB, 2 * MIB).unwrap().len(),
            1,
            "contiguous in the file"
        );
    }
}
