//! Growing a QCOW v1 image (`truncate -s BIGGER` on its raw file) where its L1 table has room.
//!
//! Nothing records the L1 table's length but `size` (ceil(size / 2^(cluster_bits + l2_bits))
//! entries), so a larger disk needs a longer table in the same place. qemu-img writes the table
//! right after the header and the backing file name, padded with zeros to whole sectors, and
//! QEMU puts the first L2 table at the cluster-aligned end of the file: an image it created
//! with 4 KiB clusters has room for 500-odd entries (1 GiB at 2 MiB per entry) before it, one
//! with a backing file and 512-byte clusters for some 120 (240 MiB). The room ends where the
//! next table or cluster goes (`next_free`), and no table or cluster the image references may
//! lie in it: every L2 table is read and checked against the longer table first. Moving the
//! table is not done: a resize that does not fit is refused as unsupported, as is shrinking.
//! A resize that fits, under the allocation mutex:
//!
//! 1. flushes, so nothing else is pending;
//! 2. writes zeros over the new L1 entries, sync;
//! 3. writes the header's `size`, sync.
//!
//! A crash at any step leaves the old image (zeros past its L1 table are never read, and the
//! next table still goes past them) or the new one.

use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::header::{MAX_L1_ENTRIES, SECTOR_SIZE};
use super::tables::Tables;
use super::{AllocState, QcowImage};
use crate::error::{Error, ErrorKind, Result};
use crate::image::check_resize;
use crate::meta::budget::check_table_memory;

/// Header offset of `size` (u64).
const OFF_SIZE: u64 = 24;
const ENTRY_LEN: u64 = 8;

impl QcowImage {
    pub(super) fn resize_inner(&self, new_size: u64) -> Result<()> {
        self.write_back.refuse_writes()?;
        let current = self.virtual_size();
        if !check_resize(
            &self.read_only_reason,
            current,
            new_size,
            SECTOR_SIZE,
            "qcow",
        )? {
            return Ok(());
        }
        let l1_shift = self.geometry.cluster_size().trailing_zeros()
            + self.geometry.l2_entries().trailing_zeros();
        // new_size is below 2^64 and the shift at most 29: no overflow.
        let needed = new_size.div_ceil(1u64 << l1_shift);
        if needed > MAX_L1_ENTRIES {
            return Err(Error::unsupported(format!(
                "{new_size} bytes need {needed} L1 entries, more than the {MAX_L1_ENTRIES} \
                 imgfs holds in memory"
            )));
        }
        check_table_memory("qcow L1 table", needed * ENTRY_LEN)?;
        let alloc = self.lock_alloc();
        let path = self.file.path();
        self.write_back.run(path, || self.flush_locked(&alloc))?;
        let have = self.read_tables().l1().len() as u64;
        if needed > have {
            self.check_room(&alloc, have, needed)?;
        }
        let count = usize::try_from(needed)
            .map_err(|_| Error::out_of_range(format!("{new_size} bytes is too large a disk")))?;
        let start = self.header.l1_table_offset + have * ENTRY_LEN;
        self.write_back.run(path, || {
            if needed > have {
                let zeros = vec![0u8; ((needed - have) * ENTRY_LEN) as usize];
                self.file.write_all_at(&zeros, start)?;
                self.file.sync_data()?;
            }
            self.file.write_all_at(&new_size.to_be_bytes(), OFF_SIZE)?;
            self.file.sync_data()
        })?;
        self.write_tables().grow_l1(count)?;
        let mut layout = self.layout.write().unwrap_or_else(PoisonError::into_inner);
        *layout = layout.with_l1_len(needed * ENTRY_LEN);
        drop(layout);
        let end = start + needed.saturating_sub(have) * ENTRY_LEN;
        self.end_of_data.fetch_max(end, Ordering::Release);
        self.size.store(new_size, Ordering::Release);
        drop(alloc);
        Ok(())
    }

    /// Checks that an L1 table of `needed` entries (now `have`) fits where it is: it must end
    /// before the next table or cluster goes, and no table or cluster the image references
    /// may overlap it. Tables are read from the file, which the caller flushed.
    fn check_room(&self, alloc: &AllocState, have: u64, needed: u64) -> Result<()> {
        let l1_offset = self.header.l1_table_offset;
        let refuse = |why: String| {
            Error::unsupported(format!(
                "the disk needs an L1 table of {needed} entries, {have} fit where it is: {why}; \
                 moving the table is not implemented"
            ))
        };
        let end = needed
            .checked_mul(ENTRY_LEN)
            .and_then(|len| l1_offset.checked_add(len))
            .ok_or_else(|| refuse("it would end beyond 2^64".into()))?;
        if end > alloc.next_free {
            return Err(refuse(format!(
                "it would end at {end:#x}, past {:#x} where the next cluster goes",
                alloc.next_free
            )));
        }
        let layout = self.current_layout();
        let grown = layout.with_l1_len(needed * ENTRY_LEN).grown_to(end);
        // The header and the backing file name: a table of no length checks only those.
        let start = l1_offset + have * ENTRY_LEN;
        let unreserved = layout.with_l1_len(0).grown_to(end);
        let scan = || -> Result<()> {
            unreserved.check_range(&"the new L1 entries", start, end - start)?;
            let geo = self.geometry;
            let tables: Vec<(usize, u64)> = self
                .read_tables()
                .l1()
                .iter()
                .copied()
                .enumerate()
                .filter(|&(_, offset)| offset != 0)
                .collect();
            for (index, offset) in tables {
                let what = format_args!("L2 table {index}");
                grown.check_range(&what, offset, geo.l2_table_len())?;
                Tables::read_l2(&self.file, geo, &grown, index as u64, offset)?;
            }
            Ok(())
        };
        scan().map_err(|e| match e.kind() {
            ErrorKind::Corrupt => refuse(e.to_string()),
            _ => e,
        })
    }
}
