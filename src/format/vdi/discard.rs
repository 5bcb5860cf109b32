//! Discard for VDI: whole blocks of a dynamic image give their space back, and the parts of
//! partial blocks, and every block of a static image, are punched in place (they read as
//! zeros; the host frees the pages they cover).
//!
//! # Keeping the image consistent at every step
//!
//! QEMU and VirtualBox put a new block at `blocks_allocated`, and `qemu-img check` wants that
//! count equal to the allocated entries (vdi module doc), so a block freed in the middle of
//! the file cannot be left as an unreferenced hole; VirtualBox moves the highest block into
//! it. That needs the freed entry on disk before the hole can take another block's data, and
//! the count can drop only once the block above is no longer named: between the two, the
//! count is above the entries and `qemu-img check` reports a corruption. No write order
//! avoids that window, so imgfs does not move blocks for a discard:
//!
//! - Blocks that are the highest in use (a discard at the end of what was written, or of a
//!   whole disk) are released, when the bmap lies right after the header (qemu-img's
//!   layout): under the allocation mutex, with the gate taken exclusively (no read or
//!   in-place write in flight), the entries become `DISCARDED` and the count drops to one past
//!   the highest block left; the header and the bmap through the last changed entry go out in
//!   one write (a crash leaves the old state or the new one, each consistent), a sync, and
//!   then the released blocks, referenced by nothing on disk, are punched.
//! - Every other whole block stays mapped and is punched in place: it reads as zeros, its
//!   space goes back to the host file system, SEEK_HOLE and `st_blocks` follow
//!   (`format::host_holes`), and the entries never change, so no crash can leave them
//!   inconsistent.
//! - In a differencing image, unallocated blocks become `DISCARDED` so the parent no longer
//!   shows through (the count does not change), written by a flush.
//!
//! Holes an image already has below its highest block (a VirtualBox discard, a crash of an
//! older imgfs) are filled by `compact` at the first flush that writes anything: their
//! entries are on disk already, so moving the highest blocks down into them and writing the
//! moved entries with the lower count keeps every step consistent.

use std::sync::PoisonError;

use super::block_map::RunKind;
use super::header::ImageType;
use super::{AllocState, VdiImage};
use crate::error::{Error, Result};
use crate::image::{check_span, split_aligned, zero_fill};

/// Blocks are copied in pieces of at most this many bytes (blocks can be 256 MiB).
const COPY_CHUNK: u64 = 1 << 20;

impl VdiImage {
    pub(super) fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_span(self.virtual_size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if self.header.image_type == ImageType::Static {
            return self.punch_in_place(offset, len);
        }
        let (head, (first, count), tail) = split_aligned(offset, len, self.geometry.block_size());
        if self.backing.is_some() {
            // A differencing image: what it does not hold reads from the parent, so partial
            // blocks get zeros written (allocating them, filled from the parent around the
            // zeros) and whole unallocated blocks are marked discarded too.
            zero_fill(self, head.0, head.1)?;
            zero_fill(self, tail.0, tail.1)?;
        } else {
            // Partial blocks: zeroed in place, which frees the host pages they cover whole.
            self.punch_in_place(head.0, head.1)?;
            self.punch_in_place(tail.0, tail.1)?;
        }
        if count == 0 {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        let masked = if self.backing.is_some() {
            self.write_map().discard_unallocated(first, count)?
        } else {
            0
        };
        let released = if self.bmap_follows_header() {
            let _exclusive = self.io_gate.write().unwrap_or_else(PoisonError::into_inner);
            self.write_map().release_top(first, count)?
        } else {
            None
        };
        if masked > 0 || released.is_some() {
            self.write_back.run(self.file.path(), || {
                self.flush_locked(&mut alloc)?;
                let Some(blocks) = &released else {
                    return Ok(());
                };
                alloc.next_free = blocks.start;
                let start = self.geometry.host_offset(blocks.start)?;
                let end = self.geometry.host_offset(blocks.end)?;
                self.file.punch_hole(start, end - start)
            })?;
        }
        drop(alloc);
        let block = self.geometry.block_size();
        self.punch_in_place(first * block, count * block)
    }

    /// Punches the host ranges of `[offset, offset + len)` where blocks hold it, leaving the
    /// blocks where they are; the rest reads as zeros already.
    fn punch_in_place(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let _gate = self.gate();
        for run in self.lookup(offset, len)? {
            if let RunKind::Data { host_offset } = run.kind {
                self.file.punch_hole(host_offset, run.len)?;
            }
        }
        Ok(())
    }

    /// Moves the highest blocks down into holes below them (module doc). Holds the
    /// allocation mutex; every hole must be unreferenced on disk.
    pub(super) fn compact(&self, alloc: &mut AllocState) -> Result<()> {
        let old_end = self.read_map().used_end();
        let moves = self.read_map().compaction();
        {
            let _exclusive = self.io_gate.write().unwrap_or_else(PoisonError::into_inner);
            for &(_, from, to) in &moves {
                self.copy_block(from, to)?;
            }
            if !moves.is_empty() {
                self.file.sync_data()?;
            }
            self.write_map().relocate(&moves)?;
        }
        self.flush_locked(alloc)?;
        let new_end = self.read_map().used_end();
        alloc.next_free = new_end;
        if new_end < old_end {
            let start = self.geometry.host_offset(new_end)?;
            let end = self.geometry.host_offset(old_end)?;
            self.file.punch_hole(start, end - start)?;
        }
        log::debug!(
            "{}: discard moved {} blocks; {} blocks in use",
            self.file.path().display(),
            moves.len(),
            new_end
        );
        Ok(())
    }

    fn copy_block(&self, from: u32, to: u32) -> Result<()> {
        let block = self.geometry.block_size();
        let src = self.geometry.host_offset(from)?;
        let dst = self.geometry.host_offset(to)?;
        let mut buf = vec![0u8; block.min(COPY_CHUNK) as usize];
        let mut done = 0;
        while done < block {
            let n = (block - done).min(COPY_CHUNK) as usize;
            let piece = buf.get_mut(..n).unwrap_or_default();
            self.file.read_exact_at(piece, src + done)?;
            self.file.write_all_at(piece, dst + done)?;
            done += n as u64;
        }
        Ok(())
    }
}
