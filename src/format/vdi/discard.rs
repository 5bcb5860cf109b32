//! Discard for VDI: whole blocks of a dynamic image become `DISCARDED` (0xfffffffe) and the
//! file gives their space back; the parts of partial blocks, and every block of a static
//! image, are punched in place (they read as zeros; the host frees the pages they cover).
//!
//! # Keeping the blocks dense
//!
//! QEMU and VirtualBox put a new block at `blocks_allocated`, and `qemu-img check` wants that
//! count equal to the allocated entries (vdi module doc), so a block freed in the middle of
//! the file cannot just be left as a hole: the highest block in use moves into it, as
//! VirtualBox's own discard does, and the count drops. In this order, under the allocation
//! mutex:
//!
//! 1. The entries become `DISCARDED` in memory; a flush writes them (the count unchanged, so
//!    above the entries: every allocator stays clear of the holes) and syncs. From now on no
//!    entry on disk names a hole.
//! 2. With the gate taken exclusively (no read or in-place write in flight or starting), the
//!    highest blocks in use are copied into the lowest holes, then synced. A crash here leaves
//!    copies in unreferenced holes.
//! 3. The moved entries and the lower count are written: with the bmap right after the header
//!    in one write; elsewhere the bmap first, a sync, then the header (`flush_locked`), so the
//!    count on disk is never below an entry on disk.
//! 4. The blocks past the new count, referenced by nothing on disk, are punched.
//!
//! A crash between steps 1 and 3 leaves a count above the entries, with holes below it:
//! every allocator stays clear of data, but `qemu-img check` reports the mismatch until the
//! first flush of imgfs that writes anything moves blocks into the holes (steps 2 to 4). No
//! order avoids that window: the hole can take another block's data only once no entry on
//! disk names it, and the count can drop only once the block above is no longer named. A
//! crash never leaves an entry naming another block's data.

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
        if self.write_map().discard(first, count)? == 0 {
            if masked > 0 {
                let path = self.file.path();
                self.write_back
                    .run(path, || self.flush_locked(&mut alloc))?;
            }
            return Ok(());
        }
        let path = self.file.path();
        self.write_back
            .run(path, || self.flush_locked(&mut alloc))?;
        self.write_back.run(path, || self.compact(&mut alloc))
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

    /// Steps 2 to 4 of the module doc. Holds the allocation mutex; every hole must be
    /// unreferenced on disk (the entries written since they were freed, or never naming them).
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
