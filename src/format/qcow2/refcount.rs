//! Host cluster refcounts: the first piece of the write side, read on demand.
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

use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::table_cache::TableCache;

const TABLE_OFFSET_MASK: u64 = !0x1ff;

/// One refcount block, kept as its on-disk bytes because entry widths vary from 1 to 64 bits.
pub struct RefcountBlock {
    bytes: Vec<u8>,
}

impl RefcountBlock {
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        RefcountBlock { bytes }
    }

    // Writing blocks back is the allocation path's job, which is not wired in yet; the
    // encoding is tested here so that step only adds the write order.
    #[allow(dead_code)]
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
    #[allow(dead_code)]
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

/// The refcount structure of one image file.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    table_entries: u64,
    table: OnceLock<Vec<u64>>,
    blocks: TableCache<RefcountBlock>,
}

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
        Refcounts {
            cluster_bits,
            order,
            table_offset,
            table_entries: (u64::from(table_clusters) << cluster_bits) / 8,
            table: OnceLock::new(),
            blocks: TableCache::new(cache_blocks),
        }
    }

    /// log2 of the refcount entries per block.
    fn block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    fn table(&self, file: &HostFile) -> Result<&[u64]> {
        if let Some(table) = self.table.get() {
            return Ok(table);
        }
        let mut bytes = vec![0u8; self.table_entries as usize * 8];
        file.read_exact_at(&mut bytes, self.table_offset)?;
        let table = bytes
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
            .collect();
        Ok(self.table.get_or_init(|| table))
    }

    /// The refcount of the host cluster holding file offset `host_offset`.
    pub fn get(&self, file: &HostFile, host_offset: u64) -> Result<u64> {
        let cluster = host_offset >> self.cluster_bits;
        let table_index = cluster >> self.block_bits();
        let block_index = cluster & ((1 << self.block_bits()) - 1);
        let entry = usize::try_from(table_index)
            .ok()
            .and_then(|i| self.table(file).map(|t| t.get(i).copied()).transpose())
            .transpose()?
            .unwrap_or(0);
        let block_offset = entry & TABLE_OFFSET_MASK;
        if block_offset == 0 {
            return Ok(0);
        }
        let cluster_size = 1u64 << self.cluster_bits;
        let entry_at = self.table_offset + table_index * 8;
        if block_offset % cluster_size != 0 {
            return Err(Error::corrupt(format!(
                "refcount table entry {table_index} points to a refcount block at \
                 {block_offset:#x}, not cluster aligned"
            ))
            .at_offset(entry_at));
        }
        if block_offset >= file.len()? {
            return Err(Error::corrupt(format!(
                "refcount table entry {table_index} points to a refcount block at \
                 {block_offset:#x}, past the end of the file"
            ))
            .at_offset(entry_at));
        }
        let block = self.blocks.get_or_load(block_offset, || {
            let mut bytes = vec![0u8; cluster_size as usize];
            file.read_exact_at(&mut bytes, block_offset)?;
            Ok(RefcountBlock::from_bytes(bytes))
        })?;
        block
            .get(self.order, block_index)
            .ok_or_else(|| Error::out_of_range("internal: refcount entry outside its block"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
