//! The write path of the VHDX driver: writes in place, allocating writes (new blocks at the
//! 1 MiB-aligned end of the file), sector bitmap updates of differencing images, and flushing
//! the BAT and bitmap pages through the log. The module doc of `vhdx` gives the metadata write
//! order and the lock order this follows.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::bat::{Run, RunKind};
use super::header::{self, MIB};
use super::{internal_range, log, run_range, AllocState, VhdxImage};
use crate::error::{Error, Result};
use crate::format::backing::read_below;
use crate::image::{check_range, check_span, split_aligned, zero_fill};

/// Zeros written at the end of a new block past the end of the file, to extend the file over
/// it: one host page.
const TAIL_BYTES: u64 = 4096;

impl VhdxImage {
    pub(super) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_range(self.virtual_size(), offset, buf.len())?;
        self.renew_data_write_guid()?;
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = buf
                .get(run_range(&run, offset))
                .ok_or_else(|| internal_range(&run))?;
            match run.kind {
                RunKind::Data { host_offset } => self.store.file.write_all_at(part, host_offset)?,
                RunKind::Partial { .. } => {
                    // Sectors already in this file are written in place like data; the others
                    // need their bits set, which is serialised with allocation.
                    for (piece, here) in self.partial_pieces(&run)? {
                        let part = buf
                            .get(run_range(&piece, offset))
                            .ok_or_else(|| internal_range(&piece))?;
                        match here {
                            Some(host) => self.store.file.write_all_at(part, host)?,
                            None => self.write_locked(part, piece.offset)?,
                        }
                    }
                }
                _ => self.write_locked(part, run.offset)?,
            }
        }
        Ok(())
    }

    /// Discard (module doc): whole blocks become PAYLOAD_BLOCK_ZERO through the log with the
    /// next flush, their old space punched at once; partial blocks are written with zeros. A
    /// fixed image keeps its blocks and has them punched in place.
    pub(super) fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_span(self.virtual_size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        self.renew_data_write_guid()?;
        let geo = self.geometry;
        let (head, (first, count), tail) = if self.meta.leave_blocks_allocated {
            ((offset, len), (0, 0), (offset + len, 0))
        } else {
            split_aligned(offset, len, geo.block_size)
        };
        if count > 0 {
            let alloc = self.lock_alloc();
            for block in first..first + count {
                // Blocks are only ever appended at the end of the file, never reused: punched
                // now, a block reads as zeros whether the BAT on disk still names it or not.
                if let Some(host) = self.write_bat().zero(block)? {
                    self.store.file.punch_hole(host, geo.block_size)?;
                }
            }
            drop(alloc);
        }
        // Partial blocks: the parts stored in this file are zeroed in place, which frees the
        // host pages they cover whole; parts read from a parent are written with zeros.
        for (at, piece) in [head, tail] {
            if piece == 0 {
                continue;
            }
            for run in self.lookup(at, piece)? {
                match run.kind {
                    RunKind::Data { host_offset } => {
                        self.store.file.punch_hole(host_offset, run.len)?
                    }
                    _ => zero_fill(self, run.offset, run.len)?,
                }
            }
        }
        Ok(())
    }

    /// Renews the data write GUID in both headers before the first change of guest data, so
    /// differencing children of this image can tell it changed.
    pub(super) fn renew_data_write_guid(&self) -> Result<()> {
        if self.data_write_guid_renewed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        if !alloc.headers.data_write_guid_renewed {
            let guid = header::new_guid()?;
            let file = &self.store.file;
            self.write_back.run(file.path(), || {
                alloc
                    .headers
                    .update(file, |h| h.data_write_guid = guid, true)
            })?;
            alloc.headers.data_write_guid_renewed = true;
        }
        self.data_write_guid_renewed.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes `payload` at virtual `offset`, a range that was not stored in the file (or whose
    /// sectors' bits were clear) at lookup, under the alloc mutex.
    fn write_locked(&self, payload: &[u8], offset: u64) -> Result<()> {
        let mut alloc = self.lock_alloc();
        // Another writer may have allocated some of it between our lookup and the mutex.
        for run in self.lookup(offset, payload.len() as u64)? {
            let part = payload
                .get(run_range(&run, offset))
                .ok_or_else(|| internal_range(&run))?;
            match run.kind {
                RunKind::Data { host_offset } => self.store.file.write_all_at(part, host_offset)?,
                RunKind::Partial { .. } => self.write_partial(part, &run)?,
                RunKind::Below => self.allocate_partial(&mut alloc, part, run.offset)?,
                RunKind::Zero | RunKind::Unallocated => {
                    self.allocate(&mut alloc, part, run.offset)?
                }
            }
        }
        Ok(())
    }

    /// Gives the blocks under `[offset, offset + payload.len())` consecutive new blocks at the
    /// end of the file, writes them whole (zeros around the payload), then publishes them
    /// fully present. Caller holds the alloc mutex.
    fn allocate(&self, alloc: &mut AllocState, payload: &[u8], offset: u64) -> Result<()> {
        let geo = self.geometry;
        let (first_block, head) = geo.split(offset);
        let count = (head + payload.len() as u64).div_ceil(geo.block_size);
        let first_host = alloc.next_free;
        let mut host = first_host;
        let mut written = 0usize;
        for i in 0..count {
            let skip = if i == 0 { head } else { 0 };
            let take = ((geo.block_size - skip) as usize).min(payload.len() - written);
            let piece = payload
                .get(written..written + take)
                .ok_or_else(|| Error::out_of_range("internal: allocation outside the payload"))?;
            self.write_new_block(host, geo.block_size, skip, piece)?;
            written += take;
            host = grow(host, geo.block_size)?;
        }
        let mut bat = self.write_bat();
        for i in 0..count {
            bat.publish(first_block + i, first_host + i * geo.block_size, false)?;
        }
        drop(bat);
        alloc.next_free = host;
        Ok(())
    }

    /// Writes `payload` at virtual `offset` into blocks a differencing image does not hold:
    /// each gets a new zeroed block holding only the sectors written (the part of a sector
    /// the payload leaves out taken from the parent), their bits set in the chunk's sector
    /// bitmap (allocated first if the chunk has none), and is published partially present.
    /// Caller holds the alloc mutex.
    fn allocate_partial(&self, alloc: &mut AllocState, payload: &[u8], offset: u64) -> Result<()> {
        let geo = self.geometry;
        let mut written = 0usize;
        while written < payload.len() {
            let at = offset + written as u64;
            let (block, in_block) = geo.split(at);
            let take = ((geo.block_size - in_block) as usize).min(payload.len() - written);
            let piece = payload
                .get(written..written + take)
                .ok_or_else(|| Error::out_of_range("internal: allocation outside the payload"))?;
            let bitmap = self.bitmap_for(alloc, block)?;
            let (start, sectors) = self.whole_sectors(piece, at)?;
            let skip = start - block * geo.block_size;
            let host = alloc.next_free;
            self.write_new_block(host, geo.block_size, skip, &sectors)?;
            let next = grow(host, geo.block_size)?;
            // The bits go in before the entry (bits of a block not present are ignored), and
            // the whole block's range is written: stale bits may be left from an earlier life.
            let first = geo.chunk_sector(block, 0);
            self.assign_bits(bitmap, first..first + geo.sectors_per_block(), false)?;
            let first = geo.chunk_sector(block, skip);
            let count = sectors.len() as u64 / geo.logical_sector;
            self.assign_bits(bitmap, first..first + count, true)?;
            self.write_bat().publish(block, host, true)?;
            alloc.next_free = next;
            written += take;
        }
        Ok(())
    }

    /// Writes `part`, the piece of the partially present `run` at the same virtual offset,
    /// into the run's block: sectors whose bits are set in place, the others as whole sectors
    /// (the rest of a sector from the parent), setting their bits after the data is written.
    /// Caller holds the alloc mutex.
    fn write_partial(&self, part: &[u8], run: &Run) -> Result<()> {
        let geo = self.geometry;
        let RunKind::Partial { host_offset, .. } = run.kind else {
            return Err(internal_range(run));
        };
        let (block, _) = geo.split(run.offset);
        let bitmap = self
            .read_bat()
            .bitmap_of(block)?
            .ok_or_else(|| internal_range(run))?;
        for (piece, here) in self.partial_pieces(run)? {
            let bytes = part
                .get(run_range(&piece, run.offset))
                .ok_or_else(|| internal_range(&piece))?;
            if let Some(host) = here {
                self.store.file.write_all_at(bytes, host)?;
                continue;
            }
            let (start, sectors) = self.whole_sectors(bytes, piece.offset)?;
            let host = (host_offset + (piece.offset - run.offset))
                .checked_sub(piece.offset - start)
                .ok_or_else(|| internal_range(&piece))?;
            self.store.file.write_all_at(&sectors, host)?;
            let first = geo.chunk_sector(block, start - block * geo.block_size);
            let count = sectors.len() as u64 / geo.logical_sector;
            self.assign_bits(bitmap, first..first + count, true)?;
        }
        Ok(())
    }

    /// `piece` (at virtual `offset`) widened to whole logical sectors with the parent's bytes,
    /// and the virtual offset it then starts at.
    fn whole_sectors<'a>(&self, piece: &'a [u8], offset: u64) -> Result<(u64, Cow<'a, [u8]>)> {
        let sector = self.geometry.logical_sector;
        let end = offset + piece.len() as u64;
        let start = offset - offset % sector;
        let stop = end
            .checked_next_multiple_of(sector)
            .ok_or_else(sector_error)?;
        if start == offset && stop == end {
            return Ok((offset, Cow::Borrowed(piece)));
        }
        let mut buf = vec![0u8; (stop - start) as usize];
        let len = buf.len();
        let parent = self.parent.as_ref();
        if start != offset {
            let head = buf.get_mut(..sector as usize).ok_or_else(sector_error)?;
            read_below(parent, head, start)?;
        }
        if stop != end {
            let tail = buf
                .get_mut(len - sector as usize..)
                .ok_or_else(sector_error)?;
            read_below(parent, tail, stop - sector)?;
        }
        let at = (offset - start) as usize;
        buf.get_mut(at..at + piece.len())
            .ok_or_else(sector_error)?
            .copy_from_slice(piece);
        Ok((start, Cow::Owned(buf)))
    }

    /// The file offset of the sector bitmap of the chunk holding payload `block`, allocating
    /// it if the chunk has none: a zeroed 1 MiB block at the end of the file whose BAT entry
    /// is made durable through the log before any payload entry can name it. Caller holds the
    /// alloc mutex.
    fn bitmap_for(&self, alloc: &mut AllocState, block: u64) -> Result<u64> {
        if let Some(at) = self.read_bat().bitmap_of(block)? {
            return Ok(at);
        }
        let host = alloc.next_free;
        let next = grow(host, MIB)?;
        self.write_new_block(host, MIB, 0, &[])?;
        self.write_bat().publish_bitmap(block, host)?;
        alloc.next_free = next;
        // Flushed at once: the dirty BAT sectors may take several log entries, and none may
        // make a block of this chunk partially present before this entry is in place.
        self.flush_locked(alloc)?;
        Ok(host)
    }

    fn assign_bits(&self, bitmap: u64, bits: Range<u64>, value: bool) -> Result<()> {
        self.bitmaps
            .assign(bitmap, bits, value, |buf, at| self.store.read(buf, at))
    }

    /// Writes a new block of `block_size` bytes at `host`: `piece` at `skip` bytes into it,
    /// zeros around it. Written in pieces of at most 1 MiB to bound the buffer.
    fn write_new_block(&self, host: u64, block_size: u64, skip: u64, piece: &[u8]) -> Result<()> {
        if host >= self.store.file.len()? {
            return self.write_block_past_end(host, block_size, skip, piece);
        }
        let piece_range = skip..skip + piece.len() as u64;
        let mut chunk = vec![0u8; MIB.min(block_size) as usize];
        let mut at = 0u64;
        while at < block_size {
            let len = MIB.min(block_size - at);
            let range = at..at + len;
            if piece_range.start <= range.start && range.end <= piece_range.end {
                let from = (range.start - skip) as usize;
                let src = piece
                    .get(from..from + len as usize)
                    .ok_or_else(|| Error::out_of_range("internal: block piece"))?;
                self.store.file.write_all_at(src, host + at)?;
            } else {
                let buf = chunk
                    .get_mut(..len as usize)
                    .ok_or_else(|| Error::out_of_range("internal: block chunk"))?;
                buf.fill(0);
                let from = piece_range.start.max(range.start);
                let to = piece_range.end.min(range.end);
                if from < to {
                    let dst = buf
                        .get_mut((from - at) as usize..(to - at) as usize)
                        .ok_or_else(|| Error::out_of_range("internal: block chunk"))?;
                    let src = piece
                        .get((from - skip) as usize..(to - skip) as usize)
                        .ok_or_else(|| Error::out_of_range("internal: block piece"))?;
                    dst.copy_from_slice(src);
                }
                self.store.file.write_all_at(buf, host + at)?;
            }
            at += len;
        }
        Ok(())
    }

    /// `write_new_block` for a block that starts at or past the end of the file, where
    /// everything not written is a hole that reads as zeros: the payload, then zeros for the
    /// block's last bytes so that the file covers the block. A sequential stream into a fresh
    /// image then writes each byte once, not a block of zeros first.
    fn write_block_past_end(
        &self,
        host: u64,
        block_size: u64,
        skip: u64,
        piece: &[u8],
    ) -> Result<()> {
        let file = &self.store.file;
        if !piece.is_empty() {
            file.write_all_at(piece, host + skip)?;
        }
        let end = host + block_size;
        let piece_end = host + skip + piece.len() as u64;
        if piece_end < end {
            let tail_start = piece_end.max(end.saturating_sub(TAIL_BYTES));
            file.write_all_at(
                &[0u8; TAIL_BYTES as usize][..(end - tail_start) as usize],
                tail_start,
            )?;
        }
        Ok(())
    }

    pub(super) fn flush_inner(&self) -> Result<()> {
        if self.read_only_reason.is_some() {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        self.flush_locked(&mut alloc)
    }

    /// Syncs the data, then writes the changed sector bitmap pages and BAT sectors through
    /// the log; a failure stops the image (`meta::write_back`). Caller holds the alloc mutex,
    /// so neither changes meanwhile.
    pub(super) fn flush_locked(&self, alloc: &mut AllocState) -> Result<()> {
        let path = self.store.file.path();
        self.write_back.run(path, || self.write_back_locked(alloc))
    }

    fn write_back_locked(&self, alloc: &mut AllocState) -> Result<()> {
        let bat_sectors = {
            let bat = self.read_bat();
            if bat.is_dirty() {
                bat.dirty_sectors()
            } else {
                Vec::new()
            }
        };
        let pages = self.bitmaps.dirty_pages();
        self.store.file.sync_data()?;
        if bat_sectors.is_empty() && pages.is_empty() {
            return Ok(());
        }
        let page_offsets: Vec<u64> = pages.iter().map(|(at, _)| *at).collect();
        // Bitmap pages first: when the changes need several log entries, a block's bits are
        // in place no later than the entry that makes it partially present.
        let sectors: Vec<(u64, Vec<u8>)> = pages.into_iter().chain(bat_sectors).collect();
        for batch in sectors.chunks(self.sectors_per_entry()) {
            self.journal(alloc, batch)?;
        }
        self.write_bat().mark_clean();
        self.bitmaps.forget(page_offsets);
        Ok(())
    }

    /// How many 4 KiB sectors one log entry carries.
    pub(super) fn sectors_per_entry(&self) -> usize {
        let per_entry = log::max_sectors_per_entry(self.log.end - self.log.start).max(1) as usize;
        #[cfg(test)]
        let per_entry = match self.entry_sector_cap.load(Ordering::Relaxed) {
            0 => per_entry,
            cap => per_entry.min(cap),
        };
        per_entry
    }

    /// Writes `sectors` (file offset, 4 KiB) to their place through the log, in the order the
    /// module doc gives. Caller holds the alloc mutex.
    pub(super) fn journal(&self, alloc: &mut AllocState, sectors: &[(u64, Vec<u8>)]) -> Result<()> {
        let file = &self.store.file;
        let file_len = file.len()?;
        let log_guid = header::new_guid()?;
        let params = log::EntryParams {
            log_guid,
            sequence: 1,
            tail: 0,
            flushed_file_offset: file_len - file_len % MIB,
            last_file_offset: file_len.max(alloc.next_free).next_multiple_of(MIB),
        };
        let entry = log::build_entry(&params, sectors)?;
        file.write_all_at(&entry, self.log.start)?;
        file.sync_data()?;
        alloc
            .headers
            .update(file, |h| h.log_guid = log_guid, false)?;
        #[cfg(test)]
        if self.crash_after_log_entry.load(Ordering::Relaxed) {
            return Err(Error::io(
                "simulated crash",
                std::io::Error::other("test hook"),
            ));
        }
        for (offset, bytes) in sectors {
            file.write_all_at(bytes, *offset)?;
        }
        file.sync_data()?;
        alloc
            .headers
            .update(file, |h| h.log_guid = Uuid::nil(), true)
    }
}

/// `host + len`, the end of a new block, unless the file would grow beyond 2^64 bytes.
fn grow(host: u64, len: u64) -> Result<u64> {
    host.checked_add(len)
        .ok_or_else(|| Error::out_of_range("the file would grow beyond 2^64 bytes"))
}

fn sector_error() -> Error {
    Error::out_of_range("internal: widening a write to whole sectors")
}
