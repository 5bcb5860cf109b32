//! Hyper-V VHDX images (fixed, dynamic and differencing), served as a raw disk.
//!
//! # On-disk layout (all little-endian, every structure 1 MiB aligned)
//!
//! ```text
//! 0 .. 1 MiB      header section (header.rs): file identifier, two headers, two region tables
//! log offset      the metadata log (log.rs), a ring of 4 KiB sectors named by the header
//! BAT region      one u64 per payload block, interleaved with sector bitmap entries (bat.rs)
//! metadata region table and items: block size, sizes, sector sizes, parent (metadata.rs)
//! payload blocks  block_size bytes each, anywhere after the header section
//! ```
//!
//! # Opening
//!
//! The current header is chosen first (valid CRC, highest sequence number). If its log GUID is
//! set the log is replayed before anything else is read: into the file when the image is
//! writable (file write GUID renewed first, then the changes, a sync, and the log GUID cleared
//! in both headers), otherwise into an in-memory overlay (overlay.rs) that every later read of
//! the file goes through, so a read-only image is never written. Then the region tables (the
//! first valid copy), the metadata and the BAT are read and checked against the file and each
//! other.
//!
//! # Metadata write order
//!
//! - The first write of a session updates both headers with a new data write GUID (and a new
//!   file write GUID) before any data is written, as the spec requires.
//! - An allocating write puts the whole block (payload and zeros around it) at the 1 MiB-aligned
//!   end of the file, and only then publishes it in the in-memory BAT.
//! - Differencing images (write.rs, bitmap.rs): a write into a block the child does not hold
//!   gets a new zeroed block holding only the logical sectors written (a sector the write
//!   covers partly is filled up from the parent first); then the block's bits are set in the
//!   chunk's sector bitmap (in memory, bitmap.rs), and only then is the block published
//!   partially present. A write into a partially present block writes sectors whose bits are
//!   set in place, and the others as whole sectors, setting their bits after the data. A chunk
//!   without a sector bitmap first gets one: a zeroed 1 MiB block at the end of the file whose
//!   BAT entry is flushed through the log at once, so no log entry can ever make a block
//!   partially present while its chunk's bitmap entry is not present in the file.
//! - `flush`: sync the data -> write a log entry holding the changed 4 KiB sector bitmap pages,
//!   then the dirty 4 KiB BAT sectors, sync -> point the current header's log GUID at it
//!   (written to the other slot), sync -> write the sectors in place, sync -> clear the log GUID
//!   in both headers, syncing each. When the changes need more than one log entry, the bitmap
//!   pages go first, so a block's bits are in place no later than its BAT entry (bits of a
//!   block that is not present are ignored, and set anew when it is allocated).
//!
//! - Discard (write.rs): whole blocks become PAYLOAD_BLOCK_ZERO in the in-memory BAT (also
//!   over a parent, which they then hide), written through the log by the next flush like
//!   any BAT change; the space of a block they held is punched at once, which is safe because
//!   blocks are only ever appended, never reused, so a BAT on disk still naming the block
//!   reads zeros from it. The stored parts of partial blocks are punched in place, parts
//!   read from a parent written with zeros; a fixed image
//!   (LeaveBlockAllocated) keeps its blocks and has them punched in place.
//! - Resize (resize.rs): a dynamic or differencing image grows where the BAT region has room
//!   for the entries; the new entries (zeroed) and the Virtual Disk Size item go through the
//!   log like any BAT change, the size last.
//!
//! The entry is written before the header names its GUID: until then the header says the log
//! is empty, so a crash leaves either an empty log (the new blocks leak, the BAT and bitmaps are
//! untouched) or a complete entry that Hyper-V, QEMU and imgfs replay. A crash never leaves a
//! header whose log GUID names no valid entry, which the spec would call a corrupt file, nor a
//! bit set for a sector whose data was not synced.
//!
//! # Failures
//!
//! A failed write of a new block (a payload block, or a sector bitmap block before its entry
//! is journalled) fails only its request: the block is published after it, and its space is
//! taken again by the next allocation. Any failure of a flush (the log entry, a header, the
//! sectors in place, a sync) or of a header update on the first write stops the image
//! (`meta::write_back`): it is served read-only with the reason in `info`, and every later
//! flush fails, since what was written since the last successful one may be lost. The file is
//! left as a crash at that step would leave it, which the log makes safe to open: a complete
//! entry the header names is replayed, anything else is ignored.
//!
//! # Locks (taken in this order, never the reverse)
//!
//! 1. `alloc` (Mutex): serialises allocations, sector bitmap changes, flushes, header updates
//!    and resizes; holds the headers and the file offset of the next block. Held across the data
//!    write of a new block or of sectors whose bits it sets, so no block is ever allocated
//!    twice and no two writers fill up the same sector from the parent.
//! 2. `bat` (RwLock): the BAT. Read-locked for lookups, write-locked to publish a block or mark
//!    it clean; never held during I/O.
//! 3. `bitmaps` (RwLock inside `Bitmaps`): the changed sector bitmap pages; never held during
//!    I/O. A page leaves memory only after the flush wrote it in place.
//!
//! Reads and in-place writes (including writes of sectors whose bits are set) take the BAT
//! read lock for the lookup and the bitmap lock for a copy of the bits only, and do their I/O
//! with no lock held, so they run in parallel with each other and with allocations.

mod bat;
mod bitmap;
mod check;
mod header;
mod log;
mod make;
mod metadata;
mod open;
mod overlay;
mod resize;
mod write;

#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing, ParentSource};
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{check_range, push_extent, Extent, ExtentState, Image, ImageInfo};
use crate::meta::budget::TableBudget;
use crate::meta::write_back::WriteBack;

use bat::{Bat, Geometry, Run, RunKind};
use bitmap::Bitmaps;
use header::{Header, Regions, HEADER_LEN, HEADER_SECTION_LEN, HEADER_SLOTS, MIB};
use metadata::Metadata;
use overlay::Overlay;

pub use check::check;
pub use make::make_differencing;
pub use metadata::ParentLocator;

/// The data write GUID of the VHDX image in `file` (its current header's), without opening
/// the rest: what a child's parent_linkage names. A log replay never changes it.
pub fn data_write_guid_of(file: &HostFile) -> Result<Uuid> {
    let mut slots = [vec![0u8; HEADER_LEN], vec![0u8; HEADER_LEN]];
    for (raw, at) in slots.iter_mut().zip(HEADER_SLOTS) {
        file.read_exact_at(raw, at)?;
    }
    let (current, _) = header::current_header([&slots[0], &slots[1]])?;
    Ok(current.data_write_guid)
}

/// The file as the driver sees it: the host file, with the changes of a log that could not be
/// replayed into it (read-only images) laid over every read.
struct Store {
    file: HostFile,
    overlay: Option<Overlay>,
}

impl Store {
    fn read(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file.read_exact_at(buf, offset)?;
        if let Some(overlay) = &self.overlay {
            overlay.apply(buf, offset);
        }
        Ok(())
    }
}

/// The current header and where it is, with what this session already changed.
struct Headers {
    current: Header,
    slot: usize,
    /// Whether this session has written a header (and so renewed the file write GUID).
    session_started: bool,
    /// Whether this session has renewed the data write GUID.
    data_write_guid_renewed: bool,
}

impl Headers {
    /// Writes a new header made by `change` into the other slot and syncs; with `both`, does it
    /// a second time so both slots hold the new contents. The first update of a session also
    /// renews the file write GUID.
    fn update(
        &mut self,
        file: &HostFile,
        change: impl FnOnce(&mut Header),
        both: bool,
    ) -> Result<()> {
        let mut next = self.current.clone();
        change(&mut next);
        if !self.session_started {
            next.file_write_guid = header::new_guid()?;
        }
        for _ in 0..if both { 2 } else { 1 } {
            next.sequence = self
                .current
                .sequence
                .checked_add(1)
                .ok_or_else(|| Error::corrupt("header sequence number overflows"))?;
            let slot = 1 - self.slot;
            file.write_all_at(&next.to_bytes()?, HEADER_SLOTS[slot])?;
            file.sync_data()?;
            self.session_started = true;
            self.current = next.clone();
            self.slot = slot;
        }
        Ok(())
    }
}

/// State only allocation, flush and header updates touch, guarded by the allocation mutex.
struct AllocState {
    headers: Headers,
    /// Where the next new block goes: 1 MiB aligned, past every structure and block.
    next_free: u64,
}

/// An open VHDX image.
pub struct VhdxImage {
    store: Store,
    /// As opened: a resize changes the virtual size (`size`) and nothing else in it.
    meta: Metadata,
    /// As opened: a resize changes `virtual_size` and `payload_blocks` (`size` and the BAT's
    /// copy are current), never the block and sector sizes this is read for.
    geometry: Geometry,
    /// The virtual size; grows with `resize` (resize.rs).
    size: AtomicU64,
    regions: Regions,
    log: Range<u64>,
    parent: Option<Backing>,
    alloc: Mutex<AllocState>,
    bat: RwLock<Bat>,
    /// Sector bitmap pages changed since the last flush (differencing images).
    bitmaps: Bitmaps,
    /// Set once the data write GUID was renewed, so writes skip the mutex afterwards.
    data_write_guid_renewed: AtomicBool,
    read_only_reason: Option<String>,
    write_back: WriteBack,
    /// What replaying a dirty log on open did, if there was one.
    log_replay: Option<String>,
    /// Test hook: make `flush` stop right after the log entry is durable, like a crash.
    #[cfg(test)]
    crash_after_log_entry: AtomicBool,
    /// Test hook: at most this many sectors per log entry (0: as many as the log holds).
    #[cfg(test)]
    entry_sector_cap: std::sync::atomic::AtomicUsize,
}

impl VhdxImage {
    /// Opens the VHDX image in `file`. `parent` is the opened parent of a differencing image
    /// (its absence reads as zeros); `read_only_reason` is set when the caller serves the image
    /// read-only, which also keeps a dirty log out of the file.
    pub fn open(
        file: HostFile,
        parent: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VhdxImage> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, ParentSource::Given(parent), read_only_reason)
            .map_err(|e| e.with_path(&path))
    }

    /// Opens the VHDX image in `file`; for a differencing image, `find_parent` gets its parent
    /// locator (after the log is replayed, so the locator is current) and opens the parent.
    pub fn open_finding_parent(
        file: HostFile,
        find_parent: &mut dyn FnMut(&ParentLocator) -> Result<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VhdxImage> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, ParentSource::Find(find_parent), read_only_reason)
            .map_err(|e| e.with_path(&path))
    }

    fn open_inner(
        file: HostFile,
        parent: ParentSource<'_, ParentLocator>,
        read_only_reason: Option<String>,
    ) -> Result<VhdxImage> {
        let file_len = file.len()?;
        if file_len < HEADER_SECTION_LEN {
            return Err(Error::corrupt(format!(
                "file is {file_len} bytes, shorter than the 1 MiB VHDX header section"
            )));
        }
        let mut signature = [0u8; 8];
        file.read_exact_at(&mut signature, 0)?;
        if &signature != header::FILE_SIGNATURE {
            return Err(Error::corrupt("no \"vhdxfile\" signature at offset 0"));
        }
        let mut slots = [vec![0u8; HEADER_LEN], vec![0u8; HEADER_LEN]];
        for (raw, at) in slots.iter_mut().zip(HEADER_SLOTS) {
            file.read_exact_at(raw, at)?;
        }
        let (current, slot) = header::current_header([&slots[0], &slots[1]])?;
        let log = current.log_range(file_len)?;
        let mut reasons = Vec::new();
        match read_only_reason {
            Some(reason) => reasons.push(reason),
            None if !file.is_writable() => {
                reasons.push("the image file is opened read-only".into())
            }
            None => {}
        }
        let writable = reasons.is_empty();
        let mut headers = Headers {
            current,
            slot,
            session_started: false,
            data_write_guid_renewed: false,
        };
        let (overlay, log_replay, replayed_len) =
            open::replay_log(&file, &mut headers, &log, writable)?;
        let store = Store { file, overlay };
        // A replay kept in memory extends the file only in our view.
        let file_len = store.file.len()?.max(replayed_len);

        let regions = open::read_regions(&store, &log, file_len)?;
        let meta = open::read_metadata(&store, &regions.metadata)?;
        let parent = match (parent, &meta.parent_locator) {
            (ParentSource::Given(parent), _) => parent,
            (ParentSource::Find(find), Some(locator)) if meta.has_parent => Some(find(locator)?),
            (ParentSource::Find(_), _) => None,
        };
        let geometry = Geometry::new(&meta);
        let load_len = Bat::load_len(&geometry, &regions.bat)?;
        // A log replayed in memory stays there; the BAT is read whole, then decoded, so both
        // copies are in memory at once.
        let mut budget = TableBudget::default();
        if let Some(overlay) = &store.overlay {
            budget.take("VHDX log replayed in memory", overlay.memory())?;
        }
        budget.take("VHDX BAT", load_len.saturating_mul(2))?;
        let mut raw = vec![0u8; load_len as usize];
        store.read(&mut raw, regions.bat.start)?;
        let structures = [
            ("the header section", 0..HEADER_SECTION_LEN),
            ("the log", log.clone()),
            ("the BAT region", regions.bat.clone()),
            ("the metadata region", regions.metadata.clone()),
        ];
        let (bat, scan) =
            Bat::from_bytes(geometry, regions.bat.start, &raw, &structures, file_len)?;
        drop(raw);

        if let Some(shared) = scan.shared_space {
            ::log::warn!(
                "{}: {shared}; serving it read-only",
                store.file.path().display()
            );
            reasons.push(shared);
        }
        if log.is_empty() {
            reasons.push("the image has no log, so its BAT cannot be updated safely".into());
        }
        if meta.has_parent && parent.is_none() {
            // Blocks copied up on write would take zeros instead of the parent's data.
            reasons.push("the parent of this differencing image is not open".into());
        }
        let next_free = structures
            .iter()
            .map(|(_, r)| r.end)
            .chain([file_len, scan.highest_end])
            .max()
            .unwrap_or(file_len)
            .checked_next_multiple_of(MIB)
            .ok_or_else(|| Error::corrupt("the file is too large to grow"))?;
        Ok(VhdxImage {
            size: AtomicU64::new(geometry.virtual_size),
            geometry,
            regions,
            log,
            parent,
            alloc: Mutex::new(AllocState { headers, next_free }),
            bat: RwLock::new(bat),
            bitmaps: Bitmaps::new(),
            data_write_guid_renewed: AtomicBool::new(false),
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            write_back: WriteBack::new(),
            log_replay,
            meta,
            store,
            #[cfg(test)]
            crash_after_log_entry: AtomicBool::new(false),
            #[cfg(test)]
            entry_sector_cap: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Where to find the parent of a differencing image and who it must be.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.meta.parent_locator.as_ref()
    }

    /// The current header's data write GUID: what a child's parent_linkage must match.
    pub fn data_write_guid(&self) -> Uuid {
        self.lock_alloc().headers.current.data_write_guid
    }

    // Poisoning is ignored on purpose: the critical sections leave the guarded state
    // consistent at every step (a header or BAT entry changes only after its write succeeded).
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_bat(&self) -> RwLockReadGuard<'_, Bat> {
        self.bat.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_bat(&self) -> RwLockWriteGuard<'_, Bat> {
        self.bat.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        self.read_bat().runs(offset, len)
    }

    /// The virtual size now (it grows with `resize`).
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len())?;
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = buf
                .get_mut(run_range(&run, offset))
                .ok_or_else(|| internal_range(&run))?;
            match run.kind {
                RunKind::Data { host_offset } => self.store.read(part, host_offset)?,
                RunKind::Zero | RunKind::Unallocated => part.fill(0),
                RunKind::Below => read_below(self.parent.as_ref(), part, run.offset)?,
                RunKind::Partial { .. } => {
                    for (piece, here) in self.partial_pieces(&run)? {
                        let part = buf
                            .get_mut(run_range(&piece, offset))
                            .ok_or_else(|| internal_range(&piece))?;
                        match here {
                            Some(host) => self.store.read(part, host)?,
                            None => read_below(self.parent.as_ref(), part, piece.offset)?,
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Splits a partially present run by its sector bitmap into pieces that are in this file
    /// (`Some(host offset)`) or in the parent (`None`).
    fn partial_pieces(&self, run: &Run) -> Result<Vec<(Run, Option<u64>)>> {
        let RunKind::Partial {
            host_offset,
            bitmap,
            first_bit,
        } = run.kind
        else {
            return Err(internal_range(run));
        };
        let sector = self.geometry.logical_sector;
        let lead = run.offset % sector;
        let sectors = (lead + run.len).div_ceil(sector);
        let mut bits = vec![0u8; (first_bit + sectors).div_ceil(8) as usize];
        self.bitmaps
            .read(&mut bits, bitmap, |buf, at| self.store.read(buf, at))?;
        let present = |i: u64| {
            let bit = first_bit + i;
            bits.get((bit / 8) as usize)
                .is_some_and(|b| b & (1 << (bit % 8)) != 0)
        };
        let mut pieces: Vec<(Run, Option<u64>)> = Vec::new();
        let end = run.offset + run.len;
        for i in 0..sectors {
            let start = (run.offset - lead + i * sector).max(run.offset);
            let stop = (run.offset - lead + (i + 1) * sector).min(end);
            let here = present(i).then(|| host_offset + (start - run.offset));
            match pieces.last_mut() {
                Some((last, last_here)) if last_here.is_some() == here.is_some() => {
                    last.len += stop - start
                }
                _ => pieces.push((
                    Run {
                        offset: start,
                        len: stop - start,
                        kind: run.kind,
                    },
                    here,
                )),
            }
        }
        Ok(pieces)
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        let own = |run: &Run, state, host| Extent {
            offset: run.offset,
            len: run.len,
            state,
            layer: 0,
            host,
        };
        for run in self.lookup(offset, len)? {
            match run.kind {
                // A fixed image keeps discarded blocks and has them punched in place.
                RunKind::Data { host_offset } if self.meta.leave_blocks_allocated => {
                    let file = &self.store.file;
                    push_stored(&mut extents, file, run.offset, host_offset, run.len)?
                }
                RunKind::Data { host_offset } => push_extent(
                    &mut extents,
                    own(&run, ExtentState::Data, Some(host_offset)),
                ),
                RunKind::Zero => push_extent(&mut extents, own(&run, ExtentState::Zero, None)),
                RunKind::Unallocated => {
                    push_extent(&mut extents, own(&run, ExtentState::Unallocated, None))
                }
                RunKind::Below => {
                    for e in status_below(self.parent.as_ref(), run.offset, run.len)? {
                        push_extent(&mut extents, e);
                    }
                }
                RunKind::Partial { .. } => {
                    for (piece, here) in self.partial_pieces(&run)? {
                        if let Some(host) = here {
                            push_extent(&mut extents, own(&piece, ExtentState::Data, Some(host)));
                        } else {
                            for e in status_below(self.parent.as_ref(), piece.offset, piece.len)? {
                                push_extent(&mut extents, e);
                            }
                        }
                    }
                }
            }
        }
        Ok(extents)
    }

    fn subformat(&self) -> &'static str {
        if self.meta.has_parent {
            "differencing"
        } else if self.meta.leave_blocks_allocated {
            "fixed"
        } else {
            "dynamic"
        }
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let headers = &self.lock_alloc().headers;
        let mut details = vec![
            (
                "logical_sector_size",
                self.meta.logical_sector_size.to_string(),
            ),
            (
                "physical_sector_size",
                self.meta.physical_sector_size.to_string(),
            ),
            ("chunk_ratio", self.geometry.chunk_ratio.to_string()),
            (
                "leave_blocks_allocated",
                self.meta.leave_blocks_allocated.to_string(),
            ),
            ("has_parent", self.meta.has_parent.to_string()),
            (
                "log",
                format!(
                    "{} bytes at {:#x}",
                    self.log.end - self.log.start,
                    self.log.start
                ),
            ),
            (
                "log_replayed",
                self.log_replay
                    .clone()
                    .unwrap_or_else(|| "no (the log was empty)".into()),
            ),
            (
                "bat",
                format!("{:#x}..{:#x}", self.regions.bat.start, self.regions.bat.end),
            ),
            (
                "metadata",
                format!(
                    "{:#x}..{:#x}",
                    self.regions.metadata.start, self.regions.metadata.end
                ),
            ),
            ("header_sequence", headers.current.sequence.to_string()),
            (
                "data_write_guid",
                headers.current.data_write_guid.to_string(),
            ),
            ("page_83_id", self.meta.page_83_id.to_string()),
        ];
        if let Some(locator) = self.parent_locator() {
            for (key, value) in locator.entries() {
                let name = match key.as_str() {
                    "parent_linkage" => "parent_linkage",
                    "parent_linkage2" => "parent_linkage2",
                    "relative_path" => "parent_relative_path",
                    "volume_path" => "parent_volume_path",
                    "absolute_win32_path" => "parent_absolute_win32_path",
                    _ => continue,
                };
                details.push((name, value.clone()));
            }
        }
        if let Some(parent) = &self.parent {
            details.push(("parent", parent.path.display().to_string()));
        }
        details
    }
}

/// The part of a request buffer starting at virtual `base` that `run` covers.
fn run_range(run: &Run, base: u64) -> Range<usize> {
    let start = run.offset.saturating_sub(base) as usize;
    start..start.saturating_add(run.len as usize)
}

fn internal_range(run: &Run) -> Error {
    Error::out_of_range(format!("internal: run {run:?} outside the request"))
}

impl Image for VhdxImage {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset)
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn flush(&self) -> Result<()> {
        self.flush_inner()
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn is_dirty(&self) -> bool {
        !self.write_back.is_stopped() && (self.read_bat().is_dirty() || self.bitmaps.is_dirty())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_inner(offset, len)
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_inner(offset, len)
            .and_then(|()| self.store.file.sync_data())
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_inner(new_size)
            .map_err(|e| e.with_path(self.store.file.path()))
    }

    fn allocated_bytes(&self) -> u64 {
        let present = self
            .read_bat()
            .present_blocks()
            .saturating_mul(self.geometry.block_size);
        match self.meta.leave_blocks_allocated {
            // Discarded blocks of a fixed image stay present, punched.
            true => present.min(self.store.file.allocated_bytes()),
            false => present,
        }
    }

    fn read_only_reason(&self) -> Option<String> {
        self.write_back.reason_after(&self.read_only_reason)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "vhdx",
            subformat: self.subformat().to_string(),
            virtual_size: self.virtual_size(),
            cluster_size: Some(self.geometry.block_size),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details: self.details(),
        }
    }
}
