//! The write path of the VHD driver: writes in place, allocating writes (new blocks appended
//! at the end of the file, referenced before their data is written), sectors whose bitmap bits
//! are clear, and flushing the bitmaps. The module doc of `vhd` gives the metadata write order and
//! the lock order this follows.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use super::bat::{Run, RunKind};
use super::footer::{DiskType, FOOTER_LEN, SECTOR};
use super::{AllocState, Sparse, VhdImage};
use crate::error::{Error, Result};
use crate::format::backing::read_below;
use crate::image::{check_range, check_span, request_part, zero_fill};

/// A BAT entry is a 32-bit sector number, and 0xffffffff means "no block".
const MAX_SECTOR: u64 = 0xffff_fffe;

impl VhdImage {
    pub(super) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_range(self.virtual_size(), offset, buf.len())?;
        if !self.written.load(Ordering::Relaxed) {
            self.written.store(true, Ordering::Relaxed);
        }
        let Some(sparse) = &self.sparse else {
            return self.file.write_all_at(buf, offset);
        };
        for run in sparse.lookup(offset, buf.len() as u64)? {
            let part = request_part(buf, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => self.file.write_all_at(part, host_offset)?,
                RunKind::Partial { .. } => {
                    // Sectors already in the file are written in place; the others need their
                    // bits set, which is serialised with allocation.
                    for (piece, here) in self.pieces(sparse, &run)? {
                        let part = request_part(buf, offset, piece.offset, piece.len)?;
                        match here {
                            Some(host) => self.file.write_all_at(part, host)?,
                            None => self.write_locked(sparse, part, piece.offset)?,
                        }
                    }
                }
                RunKind::Below => self.write_locked(sparse, part, run.offset)?,
            }
        }
        Ok(())
    }

    /// Discard: VHD has no "zero" block, so blocks stay in the BAT and the sectors this file
    /// holds are punched (they read as zeros and the host file's space is freed); sectors that
    /// read from a parent are written with zeros. A fixed disk is punched where it lies.
    pub(super) fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_span(self.virtual_size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.written.store(true, Ordering::Relaxed);
        let Some(sparse) = &self.sparse else {
            return self.file.punch_hole(offset, len);
        };
        let mut below = Vec::new();
        for run in sparse.lookup(offset, len)? {
            for (piece, here) in self.pieces(sparse, &run)? {
                match here {
                    Some(host) => self.file.punch_hole(host, piece.len)?,
                    None if self.parent.is_some() => below.push(piece),
                    None => {}
                }
            }
        }
        for piece in below {
            zero_fill(self, piece.offset, piece.len)?;
        }
        Ok(())
    }

    /// Writes `payload` at virtual `offset`, a range that was not in the file at lookup time,
    /// under the allocation mutex.
    fn write_locked(&self, sparse: &Sparse, payload: &[u8], offset: u64) -> Result<()> {
        let mut alloc = sparse.lock_alloc();
        // Another writer may have allocated blocks or set bits between our lookup and the
        // mutex: look again now that nobody else can.
        for run in sparse.lookup(offset, payload.len() as u64)? {
            let part = request_part(payload, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => self.file.write_all_at(part, host_offset)?,
                RunKind::Partial { .. } => self.write_partial(sparse, part, &run)?,
                RunKind::Below => self.allocate(sparse, &mut alloc, part, run.offset)?,
            }
        }
        Ok(())
    }

    /// Writes `part` (the bytes of `run`, a run in a block whose bitmap is not all ones):
    /// sectors whose bits are set in place, the others as whole sectors (the rest of a sector
    /// from below), setting their bits once the data is written. Caller holds the mutex.
    fn write_partial(&self, sparse: &Sparse, part: &[u8], run: &Run) -> Result<()> {
        let RunKind::Partial {
            block,
            bitmap_at,
            host_offset,
        } = run.kind
        else {
            return Err(internal("a partial write outside a block"));
        };
        let block_start = block * sparse.geometry.block_size;
        for (piece, here) in self.pieces(sparse, run)? {
            let bytes = request_part(part, run.offset, piece.offset, piece.len)?;
            if let Some(host) = here {
                self.file.write_all_at(bytes, host)?;
                continue;
            }
            let (start, sectors) = self.whole_sectors(bytes, piece.offset)?;
            let host = (host_offset + (piece.offset - run.offset))
                .checked_sub(piece.offset - start)
                .ok_or_else(|| internal("a widened sector before its block"))?;
            self.file.write_all_at(&sectors, host)?;
            let first = (start - block_start) / SECTOR;
            let count = sectors.len() as u64 / SECTOR;
            sparse
                .bitmaps
                .set(block, bitmap_at, first..first + count, |buf, at| {
                    self.file.read_exact_at(buf, at)
                })?;
        }
        Ok(())
    }

    /// Gives the blocks under `[offset, offset + payload.len())`, none of them in the file,
    /// consecutive new blocks where the file ends, then writes the payload into them, in the
    /// order the module doc gives: room for the blocks durable, then their bitmaps, BAT entries
    /// and the room for the next block durable, then the data. Caller holds the mutex.
    fn allocate(
        &self,
        sparse: &Sparse,
        alloc: &mut AllocState,
        payload: &[u8],
        offset: u64,
    ) -> Result<()> {
        let geo = sparse.geometry;
        let span = geo.bitmap_size + geo.block_size;
        let (first_block, head) = geo.split(offset);
        let count = (head + payload.len() as u64).div_ceil(geo.block_size);
        let start = alloc.next_free;
        let end = count
            .checked_mul(span)
            .and_then(|len| start.checked_add(len))
            .filter(|&end| (end - span) / SECTOR <= MAX_SECTOR)
            .ok_or_else(no_room)?;
        let next_room = end.checked_add(span).ok_or_else(no_room)?;
        // Taken before anything is written: a failure leaves leaked room, never a later block
        // over bytes that were written.
        alloc.next_free = end;
        let footer = *self.current_footer().bytes();
        if alloc.durable_end < end + FOOTER_LEN as u64 {
            // The footer behind the new blocks makes the file long enough for them: no entry
            // may name a block the file does not reach.
            self.file.write_all_at(&footer, end)?;
            // A failed sync may have lost earlier writes that flushes acknowledged nothing of.
            self.write_back
                .run(self.file.path(), || self.file.sync_data())?;
            alloc.durable_end = end + FOOTER_LEN as u64;
        }
        let differencing = self.disk_type == DiskType::Differencing;
        // A dynamic disk's bitmap says every sector is here: the room reads as zeros until the
        // data is written, for QEMU (which ignores bitmaps) and for us alike. A differencing
        // disk's says none is, and gets its bits once the data is synced (`flush`).
        let bits = vec![if differencing { 0 } else { 0xff }; geo.bitmap_size as usize];
        for i in 0..count {
            self.file.write_all_at(&bits, start + i * span)?;
        }
        // From the entries on, a failure leaves the disk naming what may not be there: it stops
        // the disk for writes (`meta::write_back`).
        self.write_back.run(self.file.path(), || {
            {
                let mut bat = sparse.write_bat();
                for i in 0..count {
                    bat.publish(first_block + i, start + i * span)?;
                }
                for (at, bytes) in bat.dirty_sectors() {
                    self.file.write_all_at(&bytes, at)?;
                }
                bat.mark_clean();
            }
            if !differencing {
                for i in 0..count {
                    sparse.bitmaps.record_new(first_block + i, &bits);
                }
            }
            // The room for the next block, where QEMU would put it too (see the module doc).
            self.file.write_all_at(&footer, next_room)?;
            self.file.sync_data()
        })?;
        alloc.durable_end = next_room + FOOTER_LEN as u64;
        alloc.repair_end = false;

        let mut done = 0usize;
        for i in 0..count {
            let at = offset + done as u64;
            let in_block = if i == 0 { head } else { 0 };
            let take = ((geo.block_size - in_block) as usize).min(payload.len() - done);
            let piece = payload
                .get(done..done + take)
                .ok_or_else(|| internal("an allocation outside the payload"))?;
            let block = first_block + i;
            let bitmap_at = start + i * span;
            let data_at = bitmap_at + geo.bitmap_size;
            if differencing {
                let (first, sectors) = self.whole_sectors(piece, at)?;
                let in_block = first - block * geo.block_size;
                self.file.write_all_at(&sectors, data_at + in_block)?;
                let sector = in_block / SECTOR;
                let count = sectors.len() as u64 / SECTOR;
                sparse
                    .bitmaps
                    .set(block, bitmap_at, sector..sector + count, |buf, at| {
                        self.file.read_exact_at(buf, at)
                    })?;
            } else {
                self.file.write_all_at(piece, data_at + in_block)?;
            }
            done += take;
        }
        Ok(())
    }

    /// `piece` (at virtual `offset`) widened to whole sectors with the bytes below it (the
    /// parent's, or zeros), and the virtual offset it then starts at.
    fn whole_sectors<'a>(&self, piece: &'a [u8], offset: u64) -> Result<(u64, Cow<'a, [u8]>)> {
        let end = offset + piece.len() as u64;
        let start = offset - offset % SECTOR;
        let stop = end
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| internal("widening past 2^64"))?;
        if start == offset && stop == end {
            return Ok((offset, Cow::Borrowed(piece)));
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        let len = buf.len();
        let parent = self.parent.as_ref();
        let sector = SECTOR as usize;
        if start != offset {
            let head = buf.get_mut(..sector).ok_or_else(|| internal("widening"))?;
            read_below(parent, head, start)?;
        }
        if stop != end {
            let tail = buf
                .get_mut(len - sector..)
                .ok_or_else(|| internal("widening"))?;
            read_below(parent, tail, stop - SECTOR)?;
        }
        let at = (offset - start) as usize;
        buf.get_mut(at..at + piece.len())
            .ok_or_else(|| internal("widening"))?
            .copy_from_slice(piece);
        Ok((start, Cow::Owned(buf)))
    }

    pub(super) fn flush_inner(&self) -> Result<()> {
        if self.read_only_reason.is_some() {
            return Ok(());
        }
        let Some(sparse) = &self.sparse else {
            return self.file.sync_data();
        };
        let mut alloc = sparse.lock_alloc();
        self.flush_locked(sparse, &mut alloc)
    }

    /// The write-back of `flush_inner`, for a caller holding the allocation mutex.
    pub(super) fn flush_locked(&self, sparse: &Sparse, alloc: &mut AllocState) -> Result<()> {
        let tables = {
            let bat = sparse.read_bat();
            if bat.is_dirty() {
                bat.dirty_sectors()
            } else {
                Vec::new()
            }
        };
        let bitmaps = sparse.bitmaps.dirty();
        let repair =
            self.written.load(Ordering::Relaxed) && (alloc.repair_end || alloc.repair_copy);
        self.file.sync_data()?;
        if !tables.is_empty() || !bitmaps.is_empty() {
            for (at, bits) in &bitmaps {
                self.file.write_all_at(bits, *at)?;
            }
            for (at, bytes) in &tables {
                self.file.write_all_at(bytes, *at)?;
            }
            self.file.sync_data()?;
            // Nothing changed meanwhile: publishing and setting bits need the mutex we hold.
            sparse.write_bat().mark_clean();
            for (at, bits) in &bitmaps {
                sparse.bitmaps.mark_clean(*at, bits);
            }
        }
        if repair {
            let footer = self.current_footer();
            if alloc.repair_end {
                self.file.write_all_at(footer.bytes(), alloc.next_free)?;
            }
            if alloc.repair_copy {
                self.file.write_all_at(footer.bytes(), 0)?;
            }
            self.file.sync_data()?;
            alloc.repair_end = false;
            alloc.repair_copy = false;
        }
        Ok(())
    }
}

fn internal(what: &str) -> Error {
    Error::out_of_range(format!("internal: {what}"))
}

fn no_room() -> Error {
    Error::io(
        "no room for a new block: a VHD file cannot grow beyond 2 TiB (32-bit sector numbers)",
        std::io::Error::from_raw_os_error(libc::ENOSPC),
    )
}
