//! Host cluster refcounts: the refcount table and blocks in memory, read on demand, updated by
//! the allocator (alloc.rs) under its mutex, and written back by its flush.
//!
//! ```text
//! refcount table   refcount_table_clusters clusters of u64 entries (bits 9..=63: offset of
//!                  a refcount block, cluster aligned; 0 = block not allocated, all refcounts 0)
//! refcount block   one cluster of 2^refcount_order-bit entries, one per host cluster;
//!                  widths below a byte are packed starting at the least significant bit,
//!                  wider ones are big-endian
//! ```
//!
//! Host cluster `c` has its refcount in table entry `c >> b`, block entry `c & (2^b - 1)`, with
//! `b = cluster_bits + 3 - refcount_order` (entries per block). Nothing is read at open: the
//! table (at most 8 MiB, checked by the header) is read on first use, blocks go through the
//! shared table cache.
//!
//! This module does no allocation itself: where a refcount needs a block that does not exist,
//! or a table entry past the table's end, the caller gets `BlockSlot::Missing` / `Beyond` and
//! places the new metadata, using `plan_fresh` to lay out a free region that describes itself
//! (new table clusters and new blocks whose refcounts live in those same new blocks).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::dirty::DirtyChunks;
use crate::meta::table_cache::TableCache;

const TABLE_OFFSET_MASK: u64 = !0x1ff;

/// One refcount block, kept as its on-disk bytes because entry widths vary from 1 to 64 bits.
#[derive(Clone)]
pub struct RefcountBlock {
    bytes: Vec<u8>,
}

impl RefcountBlock {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        RefcountBlock { bytes }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Entry `index` of a block with `2^order`-bit entries.
    pub fn get(&self, order: u32, index: u64) -> Option<u64> {
        let index = usize::try_from(index).ok()?;
        match order {
            0..=2 => {
                let width = 1usize << order;
                let per_byte = 8 / width;
                let byte = *self.bytes.get(index / per_byte)?;
                let shift = (index % per_byte) * width;
                Some(u64::from(byte >> shift) & ((1 << width) - 1))
            }
            3..=6 => {
                let len = 1usize << (order - 3);
                let at = index.checked_mul(len)?;
                let raw = self.bytes.get(at..at.checked_add(len)?)?;
                Some(raw.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
            }
            _ => None,
        }
    }

    /// Stores `value` in entry `index`; refuses values wider than the entries.
    pub fn set(&mut self, order: u32, index: u64, value: u64) -> Result<()> {
        let width = 1u32 << order.min(6);
        if order > 6 || (width < 64 && value >> width != 0) {
            return Err(Error::out_of_range(format!(
                "refcount {value} does not fit in {width} bits"
            )));
        }
        let outside = || Error::out_of_range(format!("refcount entry {index} outside its block"));
        let index = usize::try_from(index).map_err(|_| outside())?;
        match order {
            0..=2 => {
                let width = width as usize;
                let per_byte = 8 / width;
                let byte = self.bytes.get_mut(index / per_byte).ok_or_else(outside)?;
                let shift = (index % per_byte) * width;
                let mask = (((1u16 << width) - 1) as u8) << shift;
                *byte = (*byte & !mask) | ((value as u8) << shift);
            }
            _ => {
                let len = 1usize << (order - 3);
                let at = index.checked_mul(len).ok_or_else(outside)?;
                let slot = at
                    .checked_add(len)
                    .and_then(|end| self.bytes.get_mut(at..end))
                    .ok_or_else(outside)?;
                slot.copy_from_slice(&value.to_be_bytes()[8 - len..]);
            }
        }
        Ok(())
    }
}

/// Where the refcount block for a table index is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockSlot {
    /// Past the end of the refcount table: the table must grow first.
    Beyond,
    /// The table entry is 0: no block, every refcount in its range is 0.
    Missing,
    /// The block at this file offset.
    At(u64),
}

/// The refcount structure of one image file. Used under the allocation mutex only.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    table_clusters: u64,
    /// The table, read on first use.
    table: Option<Vec<u64>>,
    table_dirty: DirtyChunks,
    /// The table moved to new clusters since the header was written: it is written whole and
    /// the header pointed at it on the next flush.
    table_moved: bool,
    blocks: TableCache<RefcountBlock>,
}

const TABLE_DIRTY_CHUNK: usize = 512;

impl Refcounts {
    /// Describes the refcount table of `table_clusters` clusters at `table_offset` (both
    /// validated by the header); `cache_blocks` bounds the cached refcount blocks.
    pub fn new(
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        cache_blocks: usize,
    ) -> Self {
        let table_bytes = u64::from(table_clusters) << cluster_bits;
        Refcounts {
            cluster_bits,
            order,
            table_offset,
            table_clusters: u64::from(table_clusters),
            table: None,
            table_dirty: DirtyChunks::new(table_bytes as usize, TABLE_DIRTY_CHUNK),
            table_moved: false,
            blocks: TableCache::new(cache_blocks),
        }
    }

    /// log2 of the refcount entries per block.
    pub fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    pub fn order(&self) -> u32 {
        self.order
    }

    /// The largest refcount the entries hold.
    pub fn max_value(&self) -> u64 {
        match 1u32 << self.order {
            64 => u64::MAX,
            width => (1 << width) - 1,
        }
    }

    /// (offset, clusters) of the live table.
    pub fn table_location(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    pub fn table_moved(&self) -> bool {
        self.table_moved
    }

    fn table_mut(&mut self, file: &HostFile) -> Result<&mut Vec<u64>> {
        if self.table.is_none() {
            let entries = (self.table_clusters << self.cluster_bits) / 8;
            let mut bytes = vec![0u8; entries as usize * 8];
            file.read_exact_at(&mut bytes, self.table_offset)?;
            let table = bytes
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
                .collect();
            self.table = Some(table);
        }
        Ok(self.table.get_or_insert_with(Vec::new))
    }

    /// The table's entries (reads it on first use).
    pub fn table(&mut self, file: &HostFile) -> Result<&[u64]> {
        Ok(self.table_mut(file)?)
    }

    /// Where the block of table index `index` is, checking the entry against the file.
    pub fn slot(&mut self, file: &HostFile, index: u64) -> Result<BlockSlot> {
        let table_offset = self.table_offset;
        let cluster_size = 1u64 << self.cluster_bits;
        let table = self.table_mut(file)?;
        let Some(entry) = usize::try_from(index)
            .ok()
            .and_then(|i| table.get(i).copied())
        else {
            return Ok(BlockSlot::Beyond);
        };
        let block_offset = entry & TABLE_OFFSET_MASK;
        if block_offset == 0 {
            return Ok(BlockSlot::Missing);
        }
        let entry_at = table_offset.saturating_add(index.saturating_mul(8));
        if block_offset % cluster_size != 0 {
            return Err(Error::corrupt(format!(
                "refcount table entry {index} points to a refcount block at \
                 {block_offset:#x}, not cluster aligned"
            ))
            .at_offset(entry_at));
        }
        if block_offset >= file.len()? {
            return Err(Error::corrupt(format!(
                "refcount table entry {index} points to a refcount block at \
                 {block_offset:#x}, past the end of the file"
            ))
            .at_offset(entry_at));
        }
        Ok(BlockSlot::At(block_offset))
    }

    fn block(&self, file: &HostFile, block_offset: u64) -> Result<Arc<RefcountBlock>> {
        self.blocks.get_or_load(block_offset, || {
            let mut bytes = vec![0u8; 1usize << self.cluster_bits];
            file.read_exact_at(&mut bytes, block_offset)?;
            Ok(RefcountBlock::from_bytes(bytes))
        })
    }

    fn split(&self, cluster: u64) -> (u64, u64) {
        (
            cluster >> self.block_bits(),
            cluster & ((1 << self.block_bits()) - 1),
        )
    }

    /// The refcount of host cluster number `cluster` (0 where no block covers it).
    pub fn get(&mut self, file: &HostFile, cluster: u64) -> Result<u64> {
        let (index, entry) = self.split(cluster);
        match self.slot(file, index)? {
            BlockSlot::Beyond | BlockSlot::Missing => Ok(0),
            BlockSlot::At(offset) => self
                .block(file, offset)?
                .get(self.order, entry)
                .ok_or_else(|| Error::out_of_range("internal: refcount entry outside its block")),
        }
    }

    /// The first cluster at or after `from` whose refcount is 0 (possibly past every block).
    pub fn first_free(&mut self, file: &HostFile, from: u64) -> Result<u64> {
        let mut cluster = from;
        loop {
            let (index, first) = self.split(cluster);
            let offset = match self.slot(file, index)? {
                BlockSlot::Beyond | BlockSlot::Missing => return Ok(cluster),
                BlockSlot::At(offset) => offset,
            };
            let block = self.block(file, offset)?;
            let per_block = 1u64 << self.block_bits();
            if let Some(free) = (first..per_block).find(|&i| block.get(self.order, i) == Some(0)) {
                return Ok((index << self.block_bits()) + free);
            }
            cluster = index
                .checked_add(1)
                .and_then(|next| next.checked_shl(self.block_bits()))
                .ok_or_else(|| Error::out_of_range("no free cluster below 2^64"))?;
        }
    }

    /// Sets the refcount of `cluster`, whose block must exist.
    pub fn set(&mut self, file: &HostFile, cluster: u64, value: u64) -> Result<()> {
        let (index, entry) = self.split(cluster);
        let BlockSlot::At(offset) = self.slot(file, index)? else {
            return Err(Error::out_of_range(format!(
                "internal: refcount of cluster {cluster} set without its block"
            )));
        };
        let mut block = RefcountBlock::clone(&*self.block(file, offset)?);
        block.set(self.order, entry, value)?;
        self.blocks.insert_dirty(offset, Arc::new(block));
        Ok(())
    }

    /// Points table entry `index` at `block`, stored at `offset` (a cluster reserved for it).
    pub fn install_block(
        &mut self,
        file: &HostFile,
        index: u64,
        offset: u64,
        block: RefcountBlock,
    ) -> Result<()> {
        let table = self.table_mut(file)?;
        let slot = usize::try_from(index)
            .ok()
            .and_then(|i| table.get_mut(i))
            .ok_or_else(|| {
                Error::out_of_range(format!(
                    "internal: refcount table index {index} past its end"
                ))
            })?;
        *slot = offset;
        self.table_dirty.mark(index as usize * 8);
        self.blocks.insert_dirty(offset, Arc::new(block));
        Ok(())
    }

    /// Replaces the table by `entries` at `offset` (`clusters` clusters reserved for it).
    pub fn install_table(&mut self, offset: u64, clusters: u64, entries: Vec<u64>) {
        self.table_offset = offset;
        self.table_clusters = clusters;
        self.table_dirty = DirtyChunks::new(entries.len() * 8, TABLE_DIRTY_CHUNK);
        self.table = Some(entries);
        self.table_moved = true;
    }

    /// The table as bytes (for writing a moved table whole).
    pub fn table_bytes(&mut self, file: &HostFile) -> Result<Vec<u8>> {
        Ok(self
            .table_mut(file)?
            .iter()
            .flat_map(|e| e.to_be_bytes())
            .collect())
    }

    /// What the next flush writes of the table: (file offset, bytes) pieces.
    pub fn table_pieces(&mut self, file: &HostFile) -> Result<Vec<(u64, Vec<u8>)>> {
        if self.table_moved {
            return Ok(vec![(self.table_offset, self.table_bytes(file)?)]);
        }
        let ranges = self.table_dirty.ranges();
        if ranges.is_empty() {
            return Ok(Vec::new());
        }
        let offset = self.table_offset;
        let bytes = self.table_bytes(file)?;
        Ok(ranges
            .into_iter()
            .filter_map(|r| Some((offset + r.start as u64, bytes.get(r)?.to_vec())))
            .collect())
    }

    /// The table is on disk as `table_pieces` said, and the header points at it.
    pub fn mark_table_clean(&mut self) {
        self.table_dirty.clear();
        self.table_moved = false;
    }

    pub fn dirty_blocks(&self) -> Vec<(u64, Arc<RefcountBlock>)> {
        self.blocks.dirty_tables()
    }

    pub fn mark_block_clean(&self, offset: u64, written: &Arc<RefcountBlock>) {
        self.blocks.mark_clean(offset, written);
    }

    pub fn is_dirty(&self) -> bool {
        self.table_moved || !self.table_dirty.is_empty() || self.blocks.is_dirty()
    }

    pub fn over_capacity(&self) -> bool {
        self.blocks.over_capacity()
    }
}

/// Where new refcount metadata goes in a free region of the file: an optional new (larger)
/// table and new blocks, all in clusters `start..end`, consecutive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FreshPlan {
    /// A new table: (first cluster, clusters, entries).
    pub table: Option<(u64, u64, u64)>,
    /// New blocks: (table index, cluster).
    pub blocks: Vec<(u64, u64)>,
    pub end: u64,
}

/// The shape of a refcount structure, for `plan_fresh`.
#[derive(Debug, Clone, Copy)]
pub struct RefcountShape {
    pub cluster_bits: u32,
    pub block_bits: u32,
    pub table_entries: u64,
    /// The largest table the image may have, in entries.
    pub max_entries: u64,
}

/// Lays out new refcount metadata in clusters from `start` on, all of which are free: blocks
/// for every table index in `need` and for every index the region itself falls in (so the
/// region describes itself), and a larger table (in the region too) when an index lies past
/// the current table. `has_block` says which indices already have a block. A larger table
/// gets half again the entries it needs, so growth is rare. Pure, for testing.
pub fn plan_fresh(
    shape: RefcountShape,
    has_block: &dyn Fn(u64) -> bool,
    need: &BTreeSet<u64>,
    start: u64,
) -> Result<FreshPlan> {
    let entries_per_cluster = 1u64 << (shape.cluster_bits - 3);
    let mut table_clusters = 0u64;
    let mut table_entries = shape.table_entries;
    let mut blocks: Vec<u64> = Vec::new();
    // Each round can only grow the region; it settles after a few rounds.
    for _ in 0..64 {
        let end = start
            .checked_add(table_clusters)
            .and_then(|e| e.checked_add(blocks.len() as u64))
            .ok_or_else(|| Error::out_of_range("refcount metadata past 2^64"))?;
        let mut want: BTreeSet<u64> = need.clone();
        if end > start {
            want.extend((start >> shape.block_bits)..=((end - 1) >> shape.block_bits));
        }
        want.retain(|&i| !(i < shape.table_entries && has_block(i)));
        let needed_entries = want
            .last()
            .map_or(0, |&i| i.saturating_add(1))
            .max(shape.table_entries);
        let (new_clusters, new_entries) = if needed_entries > shape.table_entries {
            let entries = needed_entries
                .max(shape.table_entries.saturating_add(shape.table_entries / 2))
                .div_ceil(entries_per_cluster)
                .saturating_mul(entries_per_cluster);
            if entries > shape.max_entries {
                return Err(Error::io(
                    format!(
                        "the refcount table would need {entries} entries, more than the {} \
                         QEMU allows",
                        shape.max_entries
                    ),
                    std::io::Error::from_raw_os_error(libc::EFBIG),
                ));
            }
            (entries / entries_per_cluster, entries)
        } else {
            (0, shape.table_entries)
        };
        let wanted: Vec<u64> = want.into_iter().collect();
        if new_clusters == table_clusters && wanted == blocks {
            let table = (table_clusters > 0).then_some((start, table_clusters, table_entries));
            let first_block = start + table_clusters;
            return Ok(FreshPlan {
                table,
                blocks: (first_block..).zip(wanted).map(|(c, i)| (i, c)).collect(),
                end,
            });
        }
        table_clusters = new_clusters.max(table_clusters);
        table_entries = new_entries.max(table_entries);
        blocks = wanted;
    }
    Err(Error::out_of_range(
        "internal: refcount metadata layout does not settle",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(table_entries: u64) -> RefcountShape {
        // 512-byte clusters, 64-bit refcounts: 64 clusters per block, 64 entries per cluster.
        RefcountShape {
            cluster_bits: 9,
            block_bits: 6,
            table_entries,
            max_entries: 1 << 20,
        }
    }

    #[test]
    fn fresh_block_describes_itself() {
        let plan = plan_fresh(shape(64), &|i| i < 3, &BTreeSet::from([3]), 3 * 64).unwrap();
        assert_eq!(
            plan,
            FreshPlan {
                table: None,
                blocks: vec![(3, 192)],
                end: 193
            }
        );
    }

    #[test]
    fn fresh_table_and_blocks_cover_themselves() {
        // The table of 64 entries is full; cluster 4096 (index 64) needs a block.
        let plan = plan_fresh(shape(64), &|_| true, &BTreeSet::from([64]), 4096).unwrap();
        // 96 entries need 2 clusters; both and the block lie in index 64's range.
        assert_eq!(plan.table, Some((4096, 2, 128)));
        assert_eq!(plan.blocks, vec![(64, 4098)]);
        assert_eq!(plan.end, 4099);
        // A region straddling two block ranges gets a block for each.
        let plan = plan_fresh(shape(64), &|_| true, &BTreeSet::from([64]), 64 * 64 + 62).unwrap();
        assert_eq!(plan.table, Some((4158, 2, 128)));
        assert_eq!(plan.blocks, vec![(64, 4160), (65, 4161)]);
        assert_eq!(plan.end, 4162);
    }

    #[test]
    fn fresh_table_that_is_too_large_is_refused() {
        let small = RefcountShape {
            max_entries: 64,
            ..shape(64)
        };
        let e = plan_fresh(small, &|_| true, &BTreeSet::from([64]), 4096).unwrap_err();
        assert!(e.to_string().contains("refcount table"), "{e}");
    }

    #[test]
    fn entries_of_every_width_round_trip() {
        for order in 0..=6u32 {
            let width = 1u32 << order;
            let max = if width == 64 {
                u64::MAX
            } else {
                (1 << width) - 1
            };
            let mut block = RefcountBlock::from_bytes(vec![0; 512]);
            let entries = 512 * 8 / u64::from(width);
            for index in [0, 1, 2, 7, entries - 1] {
                block.set(order, index, max).unwrap();
                assert_eq!(block.get(order, index), Some(max), "order {order}");
                block.set(order, index, 1).unwrap();
                assert_eq!(block.get(order, index), Some(1));
            }
            assert_eq!(block.get(order, 3), Some(0), "neighbours untouched");
            assert_eq!(block.get(order, entries), None);
            assert!(block.set(order, entries, 1).is_err());
            if width < 64 {
                assert!(block.set(order, 0, max + 1).is_err());
            }
        }
        // Sub-byte widths start at the least significant bit.
        let mut block = RefcountBlock::from_bytes(vec![0; 1]);
        block.set(0, 0, 1).unwrap();
        block.set(1, 3, 2).unwrap();
        assert_eq!(block.as_bytes(), [0b1000_0001]);
        // Wider ones are big-endian.
        let mut block = RefcountBlock::from_bytes(vec![0; 4]);
        block.set(4, 1, 0x0102).unwrap();
        assert_eq!(block.as_bytes(), [0, 0, 1, 2]);
    }
}
