//! Growing a dynamic VDI (`truncate -s BIGGER` on its raw file), where its block map has room.
//!
//! The bmap lies between `offset_bmap` and `offset_data`; growing `blocks_in_image` needs the
//! larger bmap (rounded up to whole sectors, as QEMU reads it) to fit there. VirtualBox leaves
//! a MiB for it (256 Ki blocks, 256 GiB at 1 MiB blocks); qemu-img leaves only the rest of the
//! bmap's last sector. Moving the data blocks to make room is not done: such a resize is
//! refused as unsupported, as are shrinking and static images. A resize that fits, under the
//! allocation mutex:
//!
//! 1. flushes, so nothing else is pending;
//! 2. writes the new bmap entries (unallocated), sync;
//! 3. writes the header with the new `disk_size` and `blocks_in_image`, sync.
//!
//! A crash at any step leaves the old image (entries past `blocks_in_image` are not read) or
//! the new one.

use std::sync::atomic::Ordering;

use super::header::{ImageType, SECTOR_SIZE, UNALLOCATED};
use super::VdiImage;
use crate::error::{Error, Result};
use crate::image::check_resize;

impl VdiImage {
    pub(super) fn resize_inner(&self, new_size: u64) -> Result<()> {
        self.write_back.refuse_writes()?;
        let current = self.virtual_size();
        if !check_resize(
            &self.read_only_reason,
            current,
            new_size,
            SECTOR_SIZE,
            "VDI",
        )? {
            return Ok(());
        }
        if self.header.image_type == ImageType::Static {
            return Err(Error::unsupported(
                "a static VDI has all its blocks and cannot grow",
            ));
        }
        let blocks = u32::try_from(new_size.div_ceil(self.geometry.block_size()))
            .ok()
            .filter(|&b| b < UNALLOCATED - 1)
            .ok_or_else(|| Error::out_of_range(format!("{new_size} bytes is too large a VDI")))?;
        let room = u64::from(self.header.offset_data) - u64::from(self.header.offset_bmap);
        let bmap = (u64::from(blocks) * 4).next_multiple_of(SECTOR_SIZE);
        if bmap > room {
            return Err(Error::unsupported(format!(
                "{blocks} blocks need a {bmap}-byte block map, and there are {room} bytes \
                 before the data; moving the data blocks to make room is not implemented"
            )));
        }
        let mut alloc = self.lock_alloc();
        let old_blocks = alloc.blocks_in_image;
        let path = self.file.path();
        self.write_back.run(path, || {
            self.flush_locked(&mut alloc)?;
            if blocks > old_blocks {
                let entries = vec![0xffu8; (blocks - old_blocks) as usize * 4];
                let at = u64::from(self.header.offset_bmap) + u64::from(old_blocks) * 4;
                self.file.write_all_at(&entries, at)?;
                self.file.sync_data()?;
            }
            let mut header = self.header.clone();
            header.blocks_in_image = blocks;
            header.disk_size = new_size;
            header.blocks_allocated = alloc.written_count;
            self.file.write_all_at(&header.to_bytes()?, 0)?;
            self.file.sync_data()
        })?;
        alloc.blocks_in_image = blocks;
        alloc.disk_size = new_size;
        self.write_map().grow(blocks)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }
}
