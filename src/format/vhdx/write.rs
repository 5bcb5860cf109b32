//! The write path of the VHDX driver: writes in place, allocating writes (new blocks at the
//! 1 MiB-aligned end of the file) and flushing the BAT through the log. The module doc of
//! `vhdx` gives the metadata write order and the lock order this follows.

use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::bat::RunKind;
use super::header::{self, MIB};
use super::{internal_range, log, run_range, AllocState, VhdxImage};
use crate::error::{Error, Result};
use crate::format::backing::read_below;
use crate::image::check_range;

impl VhdxImage {
    pub(super) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        check_range(self.geometry.virtual_size, offset, buf.len())?;
        self.renew_data_write_guid()?;
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = buf
                .get(run_range(&run, offset))
                .ok_or_else(|| internal_range(&run))?;
            match run.kind {
                RunKind::Data { host_offset } => self.store.file.write_all_at(part, host_offset)?,
                _ => self.write_unallocated(part, run.offset)?,
            }
        }
        Ok(())
    }

    /// Renews the data write GUID in both headers before the first change of guest data, so
    /// differencing children of this image can tell it changed.
    fn renew_data_write_guid(&self) -> Result<()> {
        if self.data_write_guid_renewed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        if !alloc.headers.data_write_guid_renewed {
            let guid = header::new_guid()?;
            alloc
                .headers
                .update(&self.store.file, |h| h.data_write_guid = guid, true)?;
            alloc.headers.data_write_guid_renewed = true;
        }
        self.data_write_guid_renewed.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes `payload` at virtual `offset`, a range that was not stored in the file at lookup.
    fn write_unallocated(&self, payload: &[u8], offset: u64) -> Result<()> {
        let mut alloc = self.lock_alloc();
        // Another writer may have allocated some of it between our lookup and the mutex.
        for run in self.lookup(offset, payload.len() as u64)? {
            let part = payload
                .get(run_range(&run, offset))
                .ok_or_else(|| internal_range(&run))?;
            match run.kind {
                RunKind::Data { host_offset } => self.store.file.write_all_at(part, host_offset)?,
                RunKind::Partial { host_offset, .. } => {
                    self.make_fully_present(run.offset)?;
                    self.store.file.write_all_at(part, host_offset)?;
                }
                RunKind::Zero | RunKind::Unallocated | RunKind::Below => {
                    self.allocate(&mut alloc, part, run.offset, run.kind)?
                }
            }
        }
        Ok(())
    }

    /// Gives the blocks under `[offset, offset + payload.len())` consecutive new blocks at the
    /// end of the file, writes them whole, then publishes them. Caller holds the alloc mutex.
    fn allocate(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        offset: u64,
        kind: RunKind,
    ) -> Result<()> {
        let geo = self.geometry;
        let (first_block, head) = geo.split(offset);
        let count = (head + payload.len() as u64).div_ceil(geo.block_size);
        let first_host = alloc.next_free;
        let mut host = first_host;
        let mut written = 0usize;
        for i in 0..count {
            let block = first_block + i;
            let skip = if i == 0 { head } else { 0 };
            let take = ((geo.block_size - skip) as usize).min(payload.len() - written);
            let piece = payload
                .get(written..written + take)
                .ok_or_else(|| Error::out_of_range("internal: allocation outside the payload"))?;
            self.write_new_block(block, host, skip, piece, kind)?;
            written += take;
            host = host
                .checked_add(geo.block_size)
                .ok_or_else(|| Error::out_of_range("the file would grow beyond 2^64 bytes"))?;
        }
        let mut bat = self.write_bat();
        for i in 0..count {
            bat.publish(first_block + i, first_host + i * geo.block_size)?;
        }
        drop(bat);
        alloc.next_free = host;
        Ok(())
    }

    /// Writes payload block `block` at `host`: `piece` at `skip` bytes into it, the rest what
    /// the block read as before (zeros, or the parent's bytes for a block not present in a
    /// differencing image). Written in pieces of at most 1 MiB to bound the buffer.
    fn write_new_block(
        &self,
        block: u64,
        host: u64,
        skip: u64,
        piece: &[u8],
        kind: RunKind,
    ) -> Result<()> {
        let block_size = self.geometry.block_size;
        let block_start = block * block_size;
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
                if kind == RunKind::Below {
                    // Only the part inside the virtual disk has parent bytes.
                    let inside = self
                        .geometry
                        .virtual_size
                        .saturating_sub(block_start + at)
                        .min(len) as usize;
                    if let Some(part) = buf.get_mut(..inside) {
                        read_below(self.parent.as_ref(), part, block_start + at)?;
                    }
                }
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

    /// Copies the sectors that the bitmap of the partially present block holding virtual
    /// `offset` leaves to the parent into the block, then marks it fully present, so writes
    /// into it need no bitmap updates. Caller holds the alloc mutex.
    fn make_fully_present(&self, offset: u64) -> Result<()> {
        let geo = self.geometry;
        let (block, _) = geo.split(offset);
        let start = block * geo.block_size;
        let len = geo.block_size.min(geo.virtual_size - start);
        let mut chunk = Vec::new();
        for run in self.lookup(start, len)? {
            for (piece, here) in self.partial_pieces(&run)? {
                if here.is_some() {
                    continue;
                }
                let RunKind::Partial { host_offset, .. } = run.kind else {
                    return Err(internal_range(&run));
                };
                // Pieces of a run are sector aligned, so this copies whole sectors.
                let mut at = piece.offset;
                while at < piece.offset + piece.len {
                    let n = MIB.min(piece.offset + piece.len - at) as usize;
                    chunk.resize(n, 0);
                    read_below(self.parent.as_ref(), &mut chunk, at)?;
                    self.store
                        .file
                        .write_all_at(&chunk, host_offset + (at - run.offset))?;
                    at += n as u64;
                }
            }
        }
        self.write_bat().make_fully_present(block)
    }

    pub(super) fn flush_inner(&self) -> Result<()> {
        if self.read_only_reason.is_some() {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        let sectors = {
            let bat = self.read_bat();
            bat.is_dirty().then(|| bat.dirty_sectors())
        };
        self.store.file.sync_data()?;
        let Some(sectors) = sectors else {
            return Ok(());
        };
        let per_entry = log::max_sectors_per_entry(self.log.end - self.log.start).max(1) as usize;
        for batch in sectors.chunks(per_entry) {
            self.journal(&mut alloc, batch)?;
        }
        self.write_bat().mark_clean();
        Ok(())
    }

    /// Writes `sectors` (file offset, 4 KiB) to their place through the log, in the order the
    /// module doc gives. Caller holds the alloc mutex.
    fn journal(&self, alloc: &mut AllocState, sectors: &[(u64, Vec<u8>)]) -> Result<()> {
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
