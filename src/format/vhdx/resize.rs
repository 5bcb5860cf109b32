//! Growing a dynamic or differencing VHDX (`truncate -s BIGGER` on its raw file) where its BAT
//! region has room, following the MS-VHDX spec: the size is the Virtual Disk Size metadata
//! item, and the BAT must hold an entry for every payload block of the new size (and, in a
//! differencing image, a sector bitmap entry after every `chunk_ratio` of them).
//!
//! The BAT region is as long as the region table says; qemu-img makes it a whole number of
//! MiB, so it has room to spare (one MiB holds 131072 entries: 128 GiB of disk at 1 MiB
//! blocks). A resize whose BAT does not fit is refused as unsupported (moving the regions is
//! not done), as are shrinking, a size that is not a whole number of logical sectors or is
//! above 64 TiB, and fixed images (LeaveBlockAllocated: every new block would have to be
//! allocated). QEMU cannot resize VHDX images at all.
//!
//! A resize that fits, under the allocation mutex, after the data write GUID is renewed (the
//! disk's contents change for any differencing child):
//!
//! 1. flushes, so nothing else is pending;
//! 2. makes every BAT entry past the old payload blocks NOT_PRESENT (the payload entries of the
//!    new blocks, the bitmap entries of new chunks; a differencing image's old chunks keep
//!    theirs): qemu-img leaves zeros there, so usually nothing changes;
//! 3. writes the changed BAT sectors through the log (`journal`), then, in an entry of its
//!    own, the 4 KiB sector holding the Virtual Disk Size item with the new size.
//!
//! Each log entry is written, named by the header, applied in place and retired before the
//! next, so a crash leaves the old image (entries past its payload blocks are never read), an
//! entry that QEMU and imgfs replay to the same state, or the new image.

use std::sync::atomic::Ordering;

use super::bat::{Bat, Geometry};
use super::log::SECTOR;
use super::metadata::{self, MAX_VIRTUAL_SIZE, VIRTUAL_DISK_SIZE};
use super::VhdxImage;
use crate::error::{Error, Result};
use crate::image::check_resize;
use crate::meta::budget::check_table_memory;

impl VhdxImage {
    pub(super) fn resize_inner(&self, new_size: u64) -> Result<()> {
        self.write_back.refuse_writes()?;
        let (current, sector) = (self.virtual_size(), self.geometry.logical_sector);
        if !check_resize(&self.read_only_reason, current, new_size, sector, "VHDX")? {
            return Ok(());
        }
        if new_size > MAX_VIRTUAL_SIZE {
            return Err(Error::unsupported(format!(
                "{new_size} bytes is more than the 64 TiB a VHDX holds"
            )));
        }
        if self.meta.leave_blocks_allocated {
            return Err(Error::unsupported(
                "a fixed VHDX has every block allocated, and growing it would allocate the \
                 new ones, which is not implemented",
            ));
        }
        let geometry = Geometry {
            virtual_size: new_size,
            payload_blocks: new_size.div_ceil(self.geometry.block_size),
            ..self.geometry
        };
        let region = &self.regions.bat;
        let load_len = Bat::load_len(&geometry, region).map_err(|_| {
            Error::unsupported(format!(
                "{new_size} bytes need {} BAT entries, and the BAT region ({} bytes) holds {}; \
                 moving the regions to make room is not implemented",
                geometry.needed_entries(),
                region.end - region.start,
                (region.end - region.start) / 8
            ))
        })?;
        check_table_memory("VHDX BAT", load_len)?;
        self.renew_data_write_guid()?;
        let mut alloc = self.lock_alloc();
        self.flush_locked(&mut alloc)?;
        let size_sectors = self.size_sectors(new_size)?;
        let have = self.read_bat().loaded_len();
        let mut tail = vec![0u8; load_len.saturating_sub(have) as usize];
        self.store.read(&mut tail, region.start + have)?;
        self.write_bat().grow(geometry, &tail)?;
        drop(tail);
        // Lookups stay inside the old size until it grows, after the log is applied.
        let sectors = self.read_bat().dirty_sectors();
        let per_entry = self.sectors_per_entry();
        self.write_back.run(self.store.file.path(), || {
            for batch in sectors.chunks(per_entry) {
                self.journal(&mut alloc, batch)?;
            }
            // In one entry of its own, so an item straddling two sectors never tears.
            self.journal(&mut alloc, &size_sectors)
        })?;
        self.write_bat().mark_clean();
        self.size.store(new_size, Ordering::Release);
        drop(alloc);
        Ok(())
    }

    /// The 4 KiB sectors holding the Virtual Disk Size item (one, or two if it straddles),
    /// as (file offset, bytes) with `new_size` in it. The item is found through the metadata
    /// table, and must hold the size the image is served with.
    fn size_sectors(&self, new_size: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let region = &self.regions.metadata;
        let mut table = vec![0u8; metadata::TABLE_LEN];
        self.store.read(&mut table, region.start)?;
        let entries = metadata::parse_table(&table, region.end - region.start)?;
        let item = entries
            .iter()
            .find(|e| e.item == VIRTUAL_DISK_SIZE && !e.is_user && e.length >= 8)
            .ok_or_else(|| Error::corrupt("the metadata table has no virtual disk size item"))?;
        let at = region.start + u64::from(item.offset);
        let first = at - at % SECTOR;
        let end = (at + 8).next_multiple_of(SECTOR);
        let mut bytes = vec![0u8; (end - first) as usize];
        self.store.read(&mut bytes, first)?;
        let field = bytes
            .get_mut((at - first) as usize..(at - first) as usize + 8)
            .ok_or_else(|| Error::out_of_range("internal: size item outside its sectors"))?;
        if *field != self.virtual_size().to_le_bytes() {
            return Err(Error::corrupt(
                "the virtual disk size item changed under the driver",
            ));
        }
        field.copy_from_slice(&new_size.to_le_bytes());
        Ok(bytes
            .chunks(SECTOR as usize)
            .enumerate()
            .map(|(i, s)| (first + i as u64 * SECTOR, s.to_vec()))
            .collect())
    }
}
