//! Growing a qcow2 image (`truncate -s BIGGER` on its raw file), as `qemu-img resize` does
//! when the L1 table has room.
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
//! A crash at any step leaves a valid image of the old or the new size. A resize that would
//! need a larger L1 table elsewhere (small clusters, huge growth) is refused as unsupported, as
//! are shrinking and images with an external data file (which would have to grow too).

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::header::MAX_L1_BYTES;
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::image::check_resize;
use crate::meta::dirty::DirtyChunks;

/// Header offsets of `size` (u64) and `l1_size` (u32).
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
        let cluster = geo.cluster_size();
        let room = (have * 8).div_ceil(cluster) * cluster / 8;
        if needed > room || needed * 8 > MAX_L1_BYTES {
            return Err(Error::unsupported(format!(
                "{new_size} bytes need {needed} L1 entries; the L1 table's clusters hold {room} \
                 and moving the table is not implemented (qemu-img resize can)"
            )));
        }
        let l1_size =
            u32::try_from(needed).map_err(|_| Error::out_of_range("l1_size overflows"))?;
        let file = &self.shared.file;
        self.shared.write_back.run(file.path(), || {
            self.flush_locked(&mut alloc)?;
            if needed > have {
                let zeros = vec![0u8; ((needed - have) * 8) as usize];
                file.write_all_at(&zeros, self.l1_table_offset + have * 8)?;
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
}
