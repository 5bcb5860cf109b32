//! Growing a qcow2 image (`truncate -s BIGGER` on its raw file), as `qemu-img resize` does.
//!
//! The L1 table's clusters often hold far more entries than `l1_size` uses (one 64 KiB
//! cluster holds 8192 entries, 4 TiB of guest disk at 64 KiB clusters), and those clusters are
//! the table's alone. A resize that fits there, under the allocation mutex:
//!
//! 1. flushes, so nothing else is pending;
//! 2. writes zeros over the new L1 entries (past `l1_size`, inside the table's clusters), sync;
//! 3. writes the header's `l1_size`, sync: a longer table than the size needs is valid;
//! 4. writes the header's `size`, sync.
//!
//! A resize that needs more entries than the table's clusters hold (small clusters, large
//! growth) moves the table, as QEMU's `qcow2_grow_l1_table` does:
//!
//! 1. flushes;
//! 2. allocates a run of clusters past the end of the file for the larger table, writes the
//!    current entries and zeros there;
//! 3. flushes: the new table and the refcounts that count it are durable;
//! 4. writes the header's `l1_size` and `l1_table_offset` in one 12-byte write, sync;
//! 5. writes the header's `size`, sync;
//! 6. queues the drop of the old table's reference: the next flush frees its clusters.
//!
//! A crash at any step leaves a valid image of the old or the new size, at worst with the
//! clusters of one of the two tables leaked (counted, unreferenced; `imgfs check --repair
//! leaks` takes them back). Shrinking and images with an external data file (which would have
//! to grow too) are refused as unsupported.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::alloc::{AllocState, Referrer};
use super::header::MAX_L1_BYTES;
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::image::check_resize;
use crate::meta::dirty::DirtyChunks;

/// Header offsets of `size` (u64) and `l1_size` (u32, followed by `l1_table_offset`, u64).
const OFF_SIZE: u64 = 24;
const OFF_L1_SIZE: u64 = 36;

impl Qcow2Image {
    pub(super) fn resize_inner(&self, new_size: u64) -> Result<()> {
        self.shared.write_back.refuse_writes()?;
        let current = self.virtual_size();
        if !check_resize(&self.read_only_reason, current, new_size, 512, "qcow2")? {
            return Ok(());
        }
        if new_size > i64::MAX as u64 {
            return Err(Error::out_of_range(format!(
                "{new_size} bytes is too large a qcow2 disk"
            )));
        }
        if self.shared.data_file.is_some() {
            return Err(Error::unsupported(
                "an image with an external data file is not resized",
            ));
        }
        let geo = self.shared.geometry;
        let mut alloc = self.lock_alloc();
        self.prepare_for_writes(&mut alloc)?;
        let have = self.l1.read().unwrap_or_else(PoisonError::into_inner).len() as u64;
        let needed = new_size.div_ceil(1u64 << geo.l2_coverage_bits()).max(have);
        if needed.saturating_mul(8) > MAX_L1_BYTES {
            return Err(Error::out_of_range(format!(
                "{new_size} bytes need {needed} L1 entries, more than a qcow2 L1 table may \
                 hold ({MAX_L1_BYTES} bytes) with {}-byte clusters",
                geo.cluster_size()
            )));
        }
        let cluster = geo.cluster_size();
        let table_clusters = (needed * 8).div_ceil(cluster);
        let moves = table_clusters > (have * 8).div_ceil(cluster);
        let l1_size =
            u32::try_from(needed).map_err(|_| Error::out_of_range("l1_size overflows"))?;
        let per_block = 1u64 << alloc.refcounts.block_bits();
        if moves && table_clusters >= per_block {
            // A fresh run of clusters is cut by a refcount block every `per_block` clusters.
            return Err(Error::unsupported(format!(
                "{new_size} bytes need an L1 table of {table_clusters} clusters, which does not \
                 fit between two refcount blocks ({per_block} clusters apart); qemu-img resize \
                 can place it"
            )));
        }
        let file = &self.shared.file;
        self.shared.write_back.run(file.path(), || {
            self.flush_locked(&mut alloc)?;
            if moves {
                self.move_l1_table(&mut alloc, l1_size, table_clusters)?;
            } else if needed > have {
                let zeros = vec![0u8; ((needed - have) * 8) as usize];
                file.write_all_at(&zeros, self.l1_offset() + have * 8)?;
                file.sync_data()?;
                file.write_all_at(&l1_size.to_be_bytes(), OFF_L1_SIZE)?;
                file.sync_data()?;
            }
            file.write_all_at(&new_size.to_be_bytes(), OFF_SIZE)?;
            file.sync_data()
        })?;
        self.l1
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .resize(needed as usize, 0);
        alloc.l1_dirty = DirtyChunks::new(needed as usize * 8, 512);
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    /// Steps 2-4 and 6 of the move in the module doc, to a table of `l1_size` entries in
    /// `clusters` clusters, fewer than one refcount block covers; the caller has flushed and
    /// holds the allocation mutex, so the in-memory table is what is on disk.
    fn move_l1_table(&self, alloc: &mut AllocState, l1_size: u32, clusters: u64) -> Result<()> {
        let file = &self.shared.file;
        let cluster = self.shared.geometry.cluster_size();
        let new_offset = self.alloc_cluster_run(alloc, clusters)?;
        self.guard_mut().hold(
            new_offset >> self.shared.geometry.cluster_bits,
            clusters,
            "the L1 table",
        );
        let old_offset = self.l1_offset();
        let old_bytes = {
            let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
            let mut table: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            let old_bytes = table.len() as u64;
            table.resize((clusters * cluster) as usize, 0);
            file.write_all_at(&table, new_offset)?;
            old_bytes
        };
        self.flush_locked(alloc)?;
        let mut field = l1_size.to_be_bytes().to_vec();
        field.extend_from_slice(&new_offset.to_be_bytes());
        file.write_all_at(&field, OFF_L1_SIZE)?;
        file.sync_data()?;
        self.l1_table_offset.store(new_offset, Ordering::Release);
        alloc.defer_free(old_offset, old_bytes, Referrer::Metadata);
        Ok(())
    }
}
