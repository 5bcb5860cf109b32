//! The sector bitmaps in front of every block of a dynamic or differencing VHD: one bit per
//! 512-byte sector of the block, most significant bit of byte 0 first; a set bit means the
//! sector is in this file, a clear one that it reads from the parent (differencing) or as
//! zeros (dynamic).
//!
//! Nearly every block QEMU, Virtual PC or imgfs writes into a dynamic disk has all bits set, so
//! each block carries a flag, set once its bitmap was seen (read or written) with every bit
//! set: lookups then treat the block as plain data and need no bitmap. Other bitmaps are read
//! on demand into a bounded cache. The flag is never cleared: bits are only ever set. Changed
//! bitmaps stay in the cache, dirty, until a flush has written them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::meta::table_cache::TableCache;

/// Clean bitmaps kept in memory: 8 MiB of them (16384 blocks of 2 MiB).
const CACHE_BYTES: u64 = 8 << 20;

/// Whether sector `sector` of a block is in the file.
pub fn bit(bits: &[u8], sector: u64) -> bool {
    usize::try_from(sector / 8)
        .ok()
        .and_then(|i| bits.get(i))
        .is_some_and(|b| b & (0x80 >> (sector % 8)) != 0)
}

/// Sets the bits of `sectors`; those past the bitmap are ignored.
pub fn set_bits(bits: &mut [u8], sectors: std::ops::Range<u64>) {
    for sector in sectors {
        if let Some(b) = usize::try_from(sector / 8)
            .ok()
            .and_then(|i| bits.get_mut(i))
        {
            *b |= 0x80 >> (sector % 8);
        }
    }
}

/// Whether every bit of the `sectors` first bits of `bits` is set.
pub fn all_set(bits: &[u8], sectors: u64) -> bool {
    let whole = usize::try_from(sectors / 8).unwrap_or(usize::MAX);
    bits.get(..whole)
        .is_some_and(|b| b.iter().all(|&x| x == 0xff))
        && (whole as u64 * 8..sectors).all(|s| bit(bits, s))
}

/// The states of all blocks and the bitmaps of partial ones.
pub struct Bitmaps {
    /// Bytes of one bitmap on disk.
    size: usize,
    /// Sectors per block: the bits that count.
    sectors: u64,
    /// Per block: its bitmap is known to have every bit set. Grows with a resize (taken
    /// after the BAT's lock where both are held).
    full: RwLock<Vec<AtomicBool>>,
    cache: TableCache<Vec<u8>>,
}

impl Bitmaps {
    pub fn new(blocks: u32, size: u64, sectors: u64) -> Self {
        let capacity = (CACHE_BYTES / size.max(1)).max(16) as usize;
        Bitmaps {
            size: size as usize,
            sectors,
            full: RwLock::new((0..blocks).map(|_| AtomicBool::new(false)).collect()),
            cache: TableCache::new(capacity),
        }
    }

    /// Runs `f` on the flag of `block`, if there is one.
    fn with_flag<T>(&self, block: u64, f: impl FnOnce(&AtomicBool) -> T) -> Option<T> {
        let full = self.full.read().unwrap_or_else(PoisonError::into_inner);
        usize::try_from(block).ok().and_then(|b| full.get(b)).map(f)
    }

    /// Whether the block's bitmap is known to have every bit set.
    pub fn is_full(&self, block: u64) -> bool {
        self.with_flag(block, |f| f.load(Ordering::Acquire)) == Some(true)
    }

    /// Records that the block's bitmap has every bit set.
    fn mark_full(&self, block: u64) {
        self.with_flag(block, |f| f.store(true, Ordering::Release));
    }

    /// Adds flags for the blocks a resize added, up to `blocks`.
    pub fn grow(&self, blocks: u32) {
        let mut full = self.full.write().unwrap_or_else(PoisonError::into_inner);
        let blocks = blocks as usize;
        if full.len() < blocks {
            full.resize_with(blocks, || AtomicBool::new(false));
        }
    }

    /// The bitmap of `block`, which starts at file offset `at`, read with `read_file` on a
    /// miss (outside any lock); a bitmap found full marks the block full.
    pub fn get(
        &self,
        block: u64,
        at: u64,
        read_file: impl FnOnce(&mut [u8], u64) -> Result<()>,
    ) -> Result<Arc<Vec<u8>>> {
        let bits = self.cache.get_or_load(at, || {
            let mut bits = vec![0u8; self.size];
            read_file(&mut bits, at)?;
            Ok(bits)
        })?;
        if all_set(&bits, self.sectors) {
            self.mark_full(block);
        }
        Ok(bits)
    }

    /// Sets the bits of `sectors` in the bitmap of `block` at `at` and keeps it dirty until
    /// `mark_clean`. Callers serialise changes (the allocation mutex).
    pub fn set(
        &self,
        block: u64,
        at: u64,
        sectors: std::ops::Range<u64>,
        read_file: impl FnOnce(&mut [u8], u64) -> Result<()>,
    ) -> Result<()> {
        if sectors.end > self.sectors {
            return Err(Error::out_of_range(
                "internal: sector bits beyond the block",
            ));
        }
        let current = self.get(block, at, read_file)?;
        let mut bits = current.as_ref().clone();
        set_bits(&mut bits, sectors);
        if bits != *current {
            let full = all_set(&bits, self.sectors);
            self.cache.insert_dirty(at, Arc::new(bits));
            if full {
                self.mark_full(block);
            }
        }
        Ok(())
    }

    /// Notes the bitmap `bits` that a new block was written with. Nothing needs caching: the
    /// file (its page cache) has it, and no stale copy of a place that held no bitmap before
    /// can be cached.
    pub fn record_new(&self, block: u64, bits: &[u8]) {
        if all_set(bits, self.sectors) {
            self.mark_full(block);
        }
    }

    /// The changed bitmaps, by file offset.
    pub fn dirty(&self) -> Vec<(u64, Arc<Vec<u8>>)> {
        self.cache.dirty_tables()
    }

    pub fn mark_clean(&self, at: u64, written: &Arc<Vec<u8>>) {
        self.cache.mark_clean(at, written);
    }

    pub fn is_dirty(&self) -> bool {
        self.cache.is_dirty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(fill: u8) -> impl FnOnce(&mut [u8], u64) -> Result<()> {
        move |buf: &mut [u8], _| {
            buf.fill(fill);
            Ok(())
        }
    }

    #[test]
    fn bits_count_from_the_most_significant_bit() {
        let mut bits = [0u8; 2];
        set_bits(&mut bits, 0..1);
        set_bits(&mut bits, 9..11);
        set_bits(&mut bits, 15..40);
        assert_eq!(bits, [0x80, 0x61]);
        assert!(bit(&bits, 0) && !bit(&bits, 1) && bit(&bits, 10) && !bit(&bits, 99));
        assert!(all_set(&[0xff, 0xe0], 11));
        assert!(!all_set(&[0xff, 0xe0], 12));
        assert!(!all_set(&[0xff], 9));
    }

    #[test]
    fn blocks_are_full_once_every_bit_is_seen_set() {
        // Blocks of 16 sectors: 2 bitmap bytes padded to 512.
        let b = Bitmaps::new(3, 512, 16);
        assert!(!b.is_full(0));
        let bits = b.get(0, 4096, file(0xff)).unwrap();
        assert_eq!(bits.len(), 512);
        assert!(b.is_full(0), "all bits set");
        b.get(1, 8192, file(0x0f)).unwrap();
        assert!(!b.is_full(1));
        b.set(1, 8192, 0..4, file(0)).unwrap();
        assert!(b.is_dirty());
        let bits = b.get(1, 8192, file(0)).unwrap();
        assert_eq!(&bits[..2], &[0xff, 0x0f]);
        b.set(1, 8192, 8..12, file(0)).unwrap();
        assert!(b.is_full(1), "the set bits filled it");
        let dirty = b.dirty();
        assert_eq!(dirty.len(), 1);
        b.mark_clean(dirty[0].0, &dirty[0].1);
        assert!(!b.is_dirty());
        assert!(b.set(2, 0, 0..17, file(0)).is_err());
        b.record_new(2, &[0xff, 0xff]);
        assert!(b.is_full(2));
        assert!(!b.is_full(7), "out of range is not full");
    }
}
