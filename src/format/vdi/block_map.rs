//! The VDI block map (bmap) in memory: one little-endian u32 per virtual block, naming the
//! physical block that holds it (or `UNALLOCATED` / `DISCARDED`). Validated once on load,
//! answers range lookups as runs coalesced by host contiguity, records allocations and knows
//! which 512-byte sectors of the on-disk bmap they dirtied. Does no I/O except loading.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::dirty::DirtyChunks;

use super::header::{Header, DISCARDED, SECTOR_SIZE, UNALLOCATED};

const ENTRY_LEN: u64 = 4;
/// The bmap is read in pieces of this many bytes so loading never holds two full copies.
const LOAD_CHUNK: usize = 64 << 10;

fn is_allocated(entry: u32) -> bool {
    entry < DISCARDED
}

/// Where a run of virtual bytes lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// Never written: reads as zeros.
    Unallocated,
    /// Discarded by the guest: reads as zeros.
    Discarded,
    /// Stored in the image file starting at `host_offset`.
    Data { host_offset: u64 },
}

/// A range of the virtual disk with one `RunKind`; `Data` runs are contiguous in the host file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub kind: RunKind,
}

impl Run {
    /// Whether `next` starts where this run ends, both on the virtual disk and (for data) in
    /// the host file, so one I/O can serve both.
    fn continued_by(&self, next: &Run) -> bool {
        if self.offset + self.len != next.offset {
            return false;
        }
        match (self.kind, next.kind) {
            (RunKind::Data { host_offset: a }, RunKind::Data { host_offset: b }) => {
                a + self.len == b
            }
            (a, b) => a == b,
        }
    }
}

/// What loading found besides the map itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// The physical block index the next allocation takes: one past the highest entry,
    /// whatever the header's `blocks_allocated` says. A count below that would make a new
    /// block overlap an existing one; a count above it (a crash between the header write and
    /// the bmap write, QEMU's and VirtualBox's order too) names unreferenced blocks only,
    /// which are reused.
    pub next_free: u32,
    /// Set when two virtual blocks share a physical block: writing either would change the
    /// other, so the image must be served read-only.
    pub duplicate: Option<String>,
    /// Set when the header's `blocks_allocated` disagrees with the entries.
    pub count_mismatch: Option<String>,
}

/// The fixed arithmetic of an image: splitting guest offsets and placing physical blocks.
/// `Copy`, so the I/O paths use it without holding the map's lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    block_shift: u32,
    offset_data: u64,
}

impl Geometry {
    pub fn new(header: &Header) -> Geometry {
        Geometry {
            block_shift: header.block_size.trailing_zeros(),
            offset_data: u64::from(header.offset_data),
        }
    }

    pub fn block_size(&self) -> u64 {
        1 << self.block_shift
    }

    /// Splits a virtual offset into (virtual block, offset inside the block).
    pub fn split(&self, offset: u64) -> (u64, u64) {
        (offset >> self.block_shift, offset & (self.block_size() - 1))
    }

    /// Where physical block `phys` starts in the file.
    pub fn host_offset(&self, phys: u32) -> Result<u64> {
        u64::from(phys)
            .checked_mul(self.block_size())
            .and_then(|o| o.checked_add(self.offset_data))
            .ok_or_else(|| Error::corrupt(format!("VDI physical block {phys} overflows")))
    }
}

/// The block map of one image plus its allocation bookkeeping.
#[derive(Debug)]
pub struct BlockMap {
    entries: Vec<u32>,
    geometry: Geometry,
    offset_bmap: u64,
    /// Entries currently pointing at a physical block.
    allocated: u32,
    /// One past the highest physical block an entry points at.
    used_end: u32,
    /// The header's `blocks_allocated`: as read until the first allocation, then `used_end`,
    /// written on flush (the module doc of `vdi` says why).
    blocks_allocated: u32,
    /// Dirty 512-byte sectors of the on-disk bmap. The header is dirty exactly when this is
    /// non-empty, since only allocations change either.
    dirty: DirtyChunks,
}

impl BlockMap {
    /// Reads and validates the bmap that `header` describes from `file` (`file_len` bytes long;
    /// `header.check_layout(file_len)` must have passed, which bounds the bmap by the file).
    pub fn load(file: &HostFile, header: &Header, file_len: u64) -> Result<(BlockMap, Scan)> {
        crate::meta::budget::check_table_memory("VDI block map", header.bmap_len())?;
        let count = header.blocks_in_image as usize;
        let mut entries = Vec::with_capacity(count);
        let mut chunk = vec![0u8; LOAD_CHUNK];
        let mut at = u64::from(header.offset_bmap);
        while entries.len() < count {
            let want = ((count - entries.len()) * ENTRY_LEN as usize).min(LOAD_CHUNK);
            let piece = chunk.get_mut(..want).unwrap_or_default();
            file.read_exact_at(piece, at)?;
            entries.extend(
                piece
                    .chunks_exact(ENTRY_LEN as usize)
                    .map(|e| u32::from_le_bytes(e.try_into().unwrap_or_default())),
            );
            at += want as u64;
        }
        Self::from_entries(entries, header, file_len)
    }

    /// Builds the map from decoded `entries` (one per block of `header`) and validates them
    /// against a file of `file_len` bytes.
    pub fn from_entries(
        entries: Vec<u32>,
        header: &Header,
        file_len: u64,
    ) -> Result<(BlockMap, Scan)> {
        if entries.len() != header.blocks_in_image as usize {
            return Err(Error::out_of_range(format!(
                "{} bmap entries for blocks_in_image {}",
                entries.len(),
                header.blocks_in_image
            )));
        }
        let map = BlockMap {
            geometry: Geometry::new(header),
            offset_bmap: u64::from(header.offset_bmap),
            allocated: 0,
            used_end: 0,
            blocks_allocated: header.blocks_allocated,
            dirty: DirtyChunks::new(entries.len() * ENTRY_LEN as usize, SECTOR_SIZE as usize),
            entries,
        };
        map.validate(header, file_len)
    }

    fn validate(mut self, header: &Header, file_len: u64) -> Result<(BlockMap, Scan)> {
        let mut highest: Option<u32> = None;
        for (block, &entry) in self.entries.iter().enumerate() {
            if !is_allocated(entry) {
                continue;
            }
            let host = self.geometry.host_offset(entry)?;
            if host >= file_len {
                return Err(Error::corrupt(format!(
                    "VDI bmap entry {block} points to physical block {entry} at file offset \
                     {host:#x}, beyond the end of the file ({file_len} bytes)"
                ))
                .at_offset(self.offset_bmap + block as u64 * ENTRY_LEN));
            }
            self.allocated += 1;
            highest = highest.max(Some(entry));
        }
        // entry < DISCARDED, so + 1 cannot overflow.
        self.used_end = highest.map_or(0, |h| h + 1);
        let next_free = self.used_end;
        let count_mismatch = (self.allocated != header.blocks_allocated).then(|| {
            format!(
                "VDI header says blocks_allocated {} but the bmap has {} allocated entries",
                header.blocks_allocated, self.allocated
            )
        });
        let duplicate = highest.and_then(|h| self.find_duplicate(h));
        Ok((
            self,
            Scan {
                next_free,
                duplicate,
                count_mismatch,
            },
        ))
    }

    /// Finds two virtual blocks sharing a physical block. One bit per physical index up to
    /// `highest`, which validation bounded by the file length (file_len / block_size bits).
    fn find_duplicate(&self, highest: u32) -> Option<String> {
        let mut seen = vec![0u64; (highest as usize / 64) + 1];
        let mut seen_before = |phys: u32| -> bool {
            let (word, bit) = (phys as usize / 64, phys % 64);
            match seen.get_mut(word) {
                Some(w) if *w & (1 << bit) != 0 => true,
                Some(w) => {
                    *w |= 1 << bit;
                    false
                }
                None => false,
            }
        };
        let (second, phys) = self
            .entries
            .iter()
            .enumerate()
            .find(|&(_, &e)| is_allocated(e) && seen_before(e))
            .map(|(block, &e)| (block, e))?;
        let first = self
            .entries
            .iter()
            .position(|&e| e == phys)
            .unwrap_or(second);
        Some(format!(
            "duplicate block map entries: virtual blocks {first} and {second} both map to \
             physical block {phys}"
        ))
    }

    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn entry(&self, block: u64) -> Result<u32> {
        usize::try_from(block)
            .ok()
            .and_then(|b| self.entries.get(b))
            .copied()
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "virtual block {block} is beyond blocks_in_image {}",
                    self.entries.len()
                ))
            })
    }

    /// Describes `[offset, offset + len)` as runs; neighbouring blocks that are also neighbours
    /// in the host file share one run.
    pub fn runs(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} overflows")))?;
        let mut runs: Vec<Run> = Vec::new();
        let geo = self.geometry;
        let mut pos = offset;
        while pos < end {
            let (block, in_block) = geo.split(pos);
            let len = (geo.block_size() - in_block).min(end - pos);
            let kind = match self.entry(block)? {
                UNALLOCATED => RunKind::Unallocated,
                DISCARDED => RunKind::Discarded,
                phys => RunKind::Data {
                    host_offset: geo.host_offset(phys)? + in_block,
                },
            };
            let run = Run {
                offset: pos,
                len,
                kind,
            };
            match runs.last_mut() {
                Some(last) if last.continued_by(&run) => last.len += len,
                _ => runs.push(run),
            }
            pos += len;
        }
        Ok(runs)
    }

    /// Points `count` virtual blocks from `first_block` at physical blocks `first_phys..`, once
    /// their data is on disk. Refuses (changing nothing) if any of them is already allocated.
    pub fn publish(&mut self, first_block: u64, first_phys: u32, count: u32) -> Result<()> {
        let last_phys = first_phys
            .checked_add(count)
            .filter(|&end| end <= DISCARDED)
            .ok_or_else(|| Error::out_of_range("physical block index overflows"))?;
        let first = usize::try_from(first_block).unwrap_or(usize::MAX);
        let slots = first
            .checked_add(count as usize)
            .and_then(|end| self.entries.get_mut(first..end))
            .ok_or_else(|| {
                Error::out_of_range(format!("virtual blocks {first_block}+{count} out of range"))
            })?;
        if slots.iter().any(|&e| is_allocated(e)) {
            return Err(Error::corrupt(format!(
                "internal: virtual block in {first_block}+{count} allocated twice"
            )));
        }
        for (slot, phys) in slots.iter_mut().zip(first_phys..last_phys) {
            *slot = phys;
        }
        for block in first..first + count as usize {
            self.dirty.mark(block * ENTRY_LEN as usize);
        }
        self.allocated += count;
        self.used_end = self.used_end.max(last_phys);
        self.blocks_allocated = self.used_end;
        Ok(())
    }

    /// Releases the allocated blocks among virtual blocks `[first, first + count)` whose
    /// physical blocks are the highest in use, so the blocks stay dense with nothing moved:
    /// their entries become `DISCARDED`, and `used_end` and `blocks_allocated` drop to one
    /// past the highest block still in use. Returns the physical blocks released, `None` when
    /// the highest block in use is not in the range.
    pub fn release_top(&mut self, first: u64, count: u64) -> Result<Option<Range<u32>>> {
        let old_end = self.used_end;
        let (start, slots) = self.slots_mut(first, count)?;
        let mut phys: Vec<u32> = slots.iter().copied().filter(|&e| is_allocated(e)).collect();
        phys.sort_unstable();
        let mut cut = old_end;
        while cut > 0 && phys.last() == Some(&(cut - 1)) {
            phys.pop();
            cut -= 1;
        }
        if cut == old_end {
            return Ok(None);
        }
        let mut released = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            if is_allocated(*slot) && *slot >= cut {
                *slot = DISCARDED;
                released.push(start + i);
            }
        }
        for block in &released {
            self.dirty.mark(block * ENTRY_LEN as usize);
        }
        self.allocated -= released.len() as u32;
        let highest = self.entries.iter().filter(|&&e| is_allocated(e)).max();
        self.used_end = highest.map_or(0, |h| h + 1);
        self.blocks_allocated = self.used_end;
        Ok(Some(self.used_end..old_end))
    }

    /// The entries of virtual blocks `[first, first + count)`, and the index of the first.
    fn slots_mut(&mut self, first: u64, count: u64) -> Result<(usize, &mut [u32])> {
        let start = usize::try_from(first).unwrap_or(usize::MAX);
        let slots = usize::try_from(count)
            .ok()
            .and_then(|n| start.checked_add(n))
            .and_then(|end| self.entries.get_mut(start..end))
            .ok_or_else(|| {
                Error::out_of_range(format!("virtual blocks {first}+{count} out of range"))
            })?;
        Ok((start, slots))
    }

    /// Marks the unallocated entries among virtual blocks `[first, first + count)` discarded:
    /// in a differencing image they read from the parent, and a discard must make them read
    /// as zeros. Returns how many changed.
    pub fn discard_unallocated(&mut self, first: u64, count: u64) -> Result<u32> {
        self.mark_discarded(first, count, |entry| entry == UNALLOCATED)
    }

    /// Sets the entries among virtual blocks `[first, first + count)` for which `which` holds
    /// to `DISCARDED`, marking their sectors dirty; returns how many changed.
    fn mark_discarded(&mut self, first: u64, count: u64, which: fn(u32) -> bool) -> Result<u32> {
        let (start, slots) = self.slots_mut(first, count)?;
        let mut changed = Vec::new();
        for (i, slot) in slots.iter_mut().enumerate() {
            if which(*slot) {
                *slot = DISCARDED;
                changed.push(start + i);
            }
        }
        for block in &changed {
            self.dirty.mark(block * ENTRY_LEN as usize);
        }
        Ok(changed.len() as u32)
    }

    /// The moves that make the physical blocks dense again: each (virtual block, from, to)
    /// moves the highest block in use into the lowest hole below it, until none is left.
    pub fn compaction(&self) -> Vec<(u64, u32, u32)> {
        let mut owner: Vec<Option<u64>> = vec![None; self.used_end as usize];
        for (block, &entry) in self.entries.iter().enumerate() {
            if let Some(slot) = owner
                .get_mut(entry as usize)
                .filter(|_| is_allocated(entry))
            {
                *slot = Some(block as u64);
            }
        }
        let mut moves = Vec::new();
        let mut low = 0usize;
        let mut high = owner.len();
        loop {
            while low < high && owner.get(low).is_some_and(|o| o.is_some()) {
                low += 1;
            }
            while high > low && owner.get(high - 1).is_some_and(|o| o.is_none()) {
                high -= 1;
            }
            if high <= low + 1 {
                break;
            }
            if let Some(Some(block)) = owner.get(high - 1).copied() {
                moves.push((block, (high - 1) as u32, low as u32));
            }
            owner.swap(low, high - 1);
        }
        moves
    }

    /// Points the virtual blocks of `moves` (from `compaction`, their data copied) at their new
    /// physical blocks; `used_end` and `blocks_allocated` become one past the highest block
    /// still in use.
    pub fn relocate(&mut self, moves: &[(u64, u32, u32)]) -> Result<()> {
        for &(block, from, to) in moves {
            let slot = usize::try_from(block)
                .ok()
                .and_then(|b| self.entries.get_mut(b))
                .filter(|e| **e == from)
                .ok_or_else(|| {
                    Error::out_of_range(format!(
                        "internal: virtual block {block} no longer at physical block {from}"
                    ))
                })?;
            *slot = to;
            self.dirty.mark(block as usize * ENTRY_LEN as usize);
        }
        let highest = self.entries.iter().filter(|&&e| is_allocated(e)).max();
        self.used_end = highest.map_or(0, |h| h + 1);
        self.blocks_allocated = self.used_end;
        Ok(())
    }

    /// One past the highest physical block an entry points at.
    pub fn used_end(&self) -> u32 {
        self.used_end
    }

    /// Entries (virtual blocks) in the map.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Adds unallocated entries up to `count` once they are on disk (a resize). The map must
    /// be clean: the dirty tracking starts over at the new length.
    pub fn grow(&mut self, count: u32) -> Result<()> {
        if self.is_dirty() || (count as usize) < self.entries.len() {
            return Err(Error::out_of_range(
                "internal: the VDI block map grows only, and only when clean",
            ));
        }
        self.entries.resize(count as usize, UNALLOCATED);
        self.dirty = DirtyChunks::new(
            self.entries.len() * ENTRY_LEN as usize,
            SECTOR_SIZE as usize,
        );
        Ok(())
    }

    /// Entries pointing at a physical block.
    pub fn allocated(&self) -> u32 {
        self.allocated
    }

    /// The `blocks_allocated` value the header should carry.
    pub fn blocks_allocated(&self) -> u32 {
        self.blocks_allocated
    }

    /// Whether allocations since the last `mark_clean` still need writing (bmap and header).
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The dirty parts of the on-disk bmap as (file offset, bytes), neighbouring sectors merged.
    pub fn dirty_sectors(&self) -> Vec<(u64, Vec<u8>)> {
        self.dirty
            .ranges()
            .into_iter()
            .map(|range| {
                let entries = self
                    .entries
                    .get(range.start / ENTRY_LEN as usize..range.end / ENTRY_LEN as usize)
                    .unwrap_or_default();
                let bytes = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
                (self.offset_bmap + range.start as u64, bytes)
            })
            .collect()
    }

    /// The on-disk bmap from its start through the last dirty sector (empty when clean), for
    /// writing it in one piece with the header sector before it.
    pub fn through_last_dirty(&self) -> Vec<u8> {
        let end = self.dirty.ranges().last().map_or(0, |r| r.end);
        self.entries
            .get(..end / ENTRY_LEN as usize)
            .unwrap_or_default()
            .iter()
            .flat_map(|e| e.to_le_bytes())
            .collect()
    }

    /// Forgets the dirty state after the bmap sectors and the header were written.
    pub fn mark_clean(&mut self) {
        self.dirty.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::testing::header;
    use super::super::header::ImageType;
    use super::*;
    use crate::error::ErrorKind;

    const MIB: u64 = 1 << 20;
    const U: u32 = UNALLOCATED;
    const D: u32 = DISCARDED;

    /// A map for a 1 MiB-block image with `entries`, in a file holding `file_blocks` blocks.
    fn map(entries: &[u32], blocks_allocated: u32, file_blocks: u64) -> Result<(BlockMap, Scan)> {
        let mut h = header(ImageType::Dynamic, entries.len() as u64 * MIB, MIB as u32);
        h.blocks_allocated = blocks_allocated;
        let file_len = u64::from(h.offset_data) + file_blocks * MIB;
        BlockMap::from_entries(entries.to_vec(), &h, file_len)
    }

    #[test]
    fn lookups_distinguish_unallocated_discarded_and_data() {
        let (m, scan) = map(&[U, D, 0], 1, 1).unwrap();
        assert_eq!(
            scan,
            Scan {
                next_free: 1,
                duplicate: None,
                count_mismatch: None
            }
        );
        let runs = m.runs(MIB - 512, MIB + 1024).unwrap();
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: MIB - 512,
                    len: 512,
                    kind: RunKind::Unallocated
                },
                Run {
                    offset: MIB,
                    len: MIB,
                    kind: RunKind::Discarded
                },
                Run {
                    offset: 2 * MIB,
                    len: 512,
                    kind: RunKind::Data { host_offset: 1024 }
                },
            ]
        );
        assert_eq!(m.allocated(), 1);
        assert_eq!(m.geometry().split(2 * MIB + 7), (2, 7));
        assert_eq!(m.geometry().host_offset(3).unwrap(), 1024 + 3 * MIB);
        assert_eq!(
            m.runs(3 * MIB, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn runs_coalesce_only_host_contiguous_blocks() {
        // Virtual 0,1 -> physical 3,4 (adjacent); virtual 2 -> 0; 3 -> 1; 4 unallocated.
        let (m, _) = map(&[3, 4, 0, 1, U, U], 5, 5).unwrap();
        let runs = m.runs(512, 6 * MIB - 1024).unwrap();
        let host = |block: u64| 1024 + block * MIB;
        assert_eq!(
            runs,
            vec![
                Run {
                    offset: 512,
                    len: 2 * MIB - 512,
                    kind: RunKind::Data {
                        host_offset: host(3) + 512
                    }
                },
                Run {
                    offset: 2 * MIB,
                    len: 2 * MIB,
                    kind: RunKind::Data {
                        host_offset: host(0)
                    }
                },
                Run {
                    offset: 4 * MIB,
                    len: 2 * MIB - 512,
                    kind: RunKind::Unallocated
                },
            ]
        );
        // Adjacent in the guest, reversed in the file: two runs.
        let (m, _) = map(&[1, 0], 2, 2).unwrap();
        assert_eq!(m.runs(0, 2 * MIB).unwrap().len(), 2);
    }

    #[test]
    fn entry_beyond_end_of_file_is_corrupt_and_named() {
        let e = map(&[0, U, 7], 2, 3).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        let text = e.to_string();
        assert!(
            text.contains("bmap entry 2") && text.contains("physical block 7"),
            "{text}"
        );
        assert!(text.contains("at offset 0x208"), "{text}");
        // An entry whose block starts inside the file is fine even if the file ends early.
        assert!(map(&[0, U, 2], 2, 2).is_err());
        let h = header(ImageType::Dynamic, 3 * MIB, MIB as u32);
        let len = u64::from(h.offset_data) + 2 * MIB + 1;
        assert!(BlockMap::from_entries(vec![0, U, 2], &h, len).is_ok());
    }

    #[test]
    fn duplicates_and_stale_counts_are_reported() {
        let (_, scan) = map(&[2, U, 0, 2], 3, 3).unwrap();
        let dup = scan.duplicate.unwrap();
        assert!(
            dup.contains("virtual blocks 0 and 3") && dup.contains("physical block 2"),
            "{dup}"
        );
        assert_eq!(scan.count_mismatch, None);

        let (m, scan) = map(&[5, U, 0], 1, 6).unwrap();
        assert_eq!(scan.next_free, 6, "past the highest entry");
        assert!(scan.count_mismatch.unwrap().contains("blocks_allocated 1"));
        assert_eq!(m.allocated(), 2);

        let (mut m, scan) = map(&[0, U, U], 4, 4).unwrap();
        assert_eq!(
            scan.next_free, 1,
            "a larger header count names leaked blocks"
        );
        assert_eq!(m.blocks_allocated(), 4, "kept until the first allocation");
        m.publish(1, 1, 1).unwrap();
        assert_eq!(m.blocks_allocated(), 2, "then one past the highest block");
    }

    #[test]
    fn only_the_highest_blocks_are_released() {
        // Virtual 0..5 -> physical 0..5 (virtual 3 and 4 swapped).
        let (mut m, _) = map(&[0, 1, 2, 4, 3, U], 5, 5).unwrap();
        m.mark_clean();
        // Virtual 1 and 2 are in the middle of the file: nothing is released.
        assert_eq!(m.release_top(1, 2).unwrap(), None);
        assert!(!m.is_dirty());
        // Virtual 3 holds the highest block, virtual 4 the one below: both go.
        assert_eq!(m.release_top(3, 3).unwrap(), Some(3..5));
        assert_eq!(
            (m.allocated(), m.blocks_allocated(), m.used_end()),
            (3, 3, 3)
        );
        assert!(m.is_dirty());
        assert_eq!(m.runs(3 * MIB, 1).unwrap()[0].kind, RunKind::Discarded);
        assert_eq!(m.runs(5 * MIB, 1).unwrap()[0].kind, RunKind::Unallocated);
        assert_eq!(
            m.runs(2 * MIB, 1).unwrap()[0].kind,
            RunKind::Data {
                host_offset: 1024 + 2 * MIB
            }
        );
        assert!(m.release_top(9, 1).is_err());
    }

    #[test]
    fn compaction_fills_holes_from_the_top() {
        // Holes at physical 1 and 2 (a VirtualBox discard, or a crash of an older imgfs).
        let (mut m, _) = map(&[0, D, D, 3, 4, U], 5, 5).unwrap();
        assert_eq!(
            (m.allocated(), m.blocks_allocated(), m.used_end()),
            (3, 5, 5)
        );
        let moves = m.compaction();
        assert_eq!(moves, vec![(4, 4, 1), (3, 3, 2)]);
        m.relocate(&moves).unwrap();
        assert_eq!((m.blocks_allocated(), m.used_end()), (3, 3));
        assert_eq!(m.runs(MIB, MIB).unwrap()[0].kind, RunKind::Discarded);
        assert_eq!(
            m.runs(4 * MIB, 1).unwrap()[0].kind,
            RunKind::Data {
                host_offset: 1024 + MIB
            }
        );
        assert!(m.compaction().is_empty());
        // A hole at the top only shrinks the end.
        let (mut m, _) = map(&[0, 1, D], 3, 3).unwrap();
        assert!(m.compaction().is_empty());
        m.relocate(&[]).unwrap();
        assert_eq!(m.blocks_allocated(), 2);
        assert!(m.relocate(&[(0, 5, 1)]).is_err());
    }

    #[test]
    fn publish_marks_sectors_and_refuses_double_allocation() {
        // 600 blocks, 128 entries per bmap sector: 127 and 128 straddle sectors 0 and 1,
        // 599 is in the last, partial sector 4.
        let entries = vec![U; 600];
        let (mut m, scan) = map(&entries, 0, 0).unwrap();
        assert_eq!(scan.next_free, 0);
        assert!(!m.is_dirty());
        m.publish(127, 0, 2).unwrap();
        m.publish(599, 2, 1).unwrap();
        assert!(m.is_dirty());
        assert_eq!((m.allocated(), m.blocks_allocated()), (3, 3));
        let sectors = m.dirty_sectors();
        assert_eq!(sectors.len(), 2);
        assert_eq!((sectors[0].0, sectors[0].1.len()), (512, 1024));
        assert_eq!(&sectors[0].1[508..516], &[0, 0, 0, 0, 1, 0, 0, 0]);
        // The last sector holds only 88 entries: nothing past the bmap is written.
        assert_eq!((sectors[1].0, sectors[1].1.len()), (512 + 2048, 352));
        assert_eq!(&sectors[1].1[348..], &[2, 0, 0, 0]);
        let data_at = |host_offset| {
            vec![Run {
                offset: 127 * MIB,
                len: MIB,
                kind: RunKind::Data { host_offset },
            }]
        };
        assert_eq!(
            m.runs(127 * MIB, MIB).unwrap(),
            data_at(3072),
            "data after 5 bmap sectors"
        );

        let e = m.publish(128, 3, 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(m.blocks_allocated(), 3, "a refused publish changes nothing");
        assert_eq!(
            m.publish(600, 3, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        let leading = m.through_last_dirty();
        assert_eq!(leading.len(), 600 * 4, "through the last, partial sector");
        assert_eq!(&leading[508..516], &[0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&leading[2396..], &[2, 0, 0, 0]);
        m.mark_clean();
        assert!(!m.is_dirty());
        assert!(m.dirty_sectors().is_empty());
        assert!(m.through_last_dirty().is_empty());
        m.publish(0, 3, 1).unwrap();
        assert_eq!(m.through_last_dirty().len(), 512, "the first sector only");
    }
}
