//! Virtual PC / Hyper-V gen 1 / Azure VHD images (fixed, dynamic and differencing), served as
//! a raw disk.
//!
//! # On-disk layout (all big-endian, 512-byte sectors)
//!
//! ```text
//! fixed:          data (the virtual disk) | footer (512 bytes, footer.rs)
//! dynamic and     footer copy at 0 | dynamic header at the footer's data_offset (1024 bytes,
//! differencing:   header.rs) | parent locator data (differencing) | BAT at table_offset
//!                 (bat.rs) | blocks | footer
//! block:          sector bitmap (one bit per sector, padded to sectors; bitmap.rs) | data
//! ```
//!
//! The footer at the end of the file is the one in force; a dynamic disk keeps a copy at
//! offset 0, used when the last one is damaged (a crash while a block was being appended).
//! A fixed disk has no copy, and no magic at its start: `probe_tail` recognises it by its end.
//! The virtual size follows QEMU's rule (`Footer::virtual_size`): the CHS geometry for disks
//! Virtual PC and QEMU made, `current_size` for every other creator.
//!
//! A BAT entry is the sector where a block's bitmap starts. A set bit means the sector is in
//! this file; a clear one reads from the parent (differencing) or as zeros (dynamic).
//!
//! # Metadata write order
//!
//! - Fixed disks are written in place; there is no metadata to change.
//! - An allocating write appends consecutive blocks where the file ends, densely as QEMU lays
//!   them out (bitmap, data, next bitmap, ...), in three steps: (1) unless an earlier
//!   allocation made room already, the footer is written behind the new blocks and synced,
//!   so the file reaches past them; (2) their bitmaps (all ones in a dynamic disk, all zeros
//!   in a differencing one), their BAT entries, and the footer one block further on (room
//!   for the next allocation), then a sync; (3) the data. A differencing disk's data is the
//!   sectors written, widened to whole sectors with the parent's bytes, and their bits are
//!   set in the cached bitmap afterwards.
//! - Entries go before data because of QEMU's allocator: it puts a new block right behind the
//!   last block the BAT names and writes only the guest's bytes into it, trusting the rest to
//!   be zeros. A block written before it is named could be left behind by a crash and show
//!   through QEMU's next block; a block named first is room that reads as zeros (a hole), the
//!   same as no block at all, for QEMU and imgfs alike. The stale footer each allocation
//!   leaves lies where QEMU (or imgfs, next time) puts the next bitmap.
//! - A write into sectors whose bits are clear writes the whole sectors first (the rest from
//!   below), then sets the bits in the cached bitmap.
//! - `flush`: data -> sync -> changed bitmaps -> sync -> footer copies -> sync. The footer
//!   copies are written only to repair one found damaged when the image was opened (by the
//!   first flush after a write): the footer holds no pointers.
//!
//! - Discard keeps blocks and bits as they are (the format has no "zero" block) and punches
//!   the sectors the file holds, an in-place write of zeros that frees the host's space;
//!   sectors read from a parent are written with zeros.
//! - Resize (resize.rs) grows a dynamic or differencing disk where the BAT's last sector has
//!   room: the new (unused) entries, a sync, the dynamic header's `max_table_entries`, a
//!   sync, the footer at the end (new size and geometry), a sync, the copy at offset 0, a
//!   sync.
//!
//! A crash leaves bits set only for synced data, and entries only for blocks the file
//! reaches; a torn footer at the end is replaced by the copy at offset 0 on the next open.
//!
//! # Failures
//!
//! A failed write of a new block's bitmap, or of data, fails only its request. A failed
//! write or sync from the BAT entries on, and any failure of a flush or a resize, stops the
//! disk (`meta::write_back`): it is served read-only with the reason in `info`, and every
//! later flush fails. The file is left as a crash at that step would leave it.

//! # Locks (taken in this order, never the reverse)
//!
//! 1. `alloc` (Mutex): serialises allocations, bitmap changes, flushes and resizes; holds the
//!    offset where the next block goes. Held across the data write of a new block or of
//!    sectors whose bits it sets, so no block is allocated twice and no two writers fill up the
//!    same sector.
//! 2. `bat` (RwLock): the BAT. Read-locked for lookups, write-locked to publish a block, mark
//!    the table clean or grow it; never held during I/O.
//! 3. The bitmap cache's own lock (`meta::table_cache`), never held during I/O; the per-block
//!    "full" flags are atomics in a vector behind an RwLock, write-locked only by a resize to
//!    add flags.
//! 4. `footer` (RwLock): held only to copy the footer, or for a resize to replace it.
//!
//! Reads and writes of present sectors take the BAT read lock for the lookup only (and the
//! cache's for a bitmap), and do their I/O with no lock held.

mod bat;
mod bitmap;
mod check;
mod footer;
mod header;
mod make;
mod open;
mod parent;
mod resize;
mod write;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing, ParentSource};
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{check_range, push_extent, request_part_mut, Extent, Image, ImageInfo};
use crate::meta::write_back::WriteBack;

use bat::{Bat, Geometry, Run, RunKind};
use bitmap::Bitmaps;
use footer::{DiskType, Footer, SizeFrom, FOOTER_LEN, SECTOR};
use header::DynHeader;
use open::{open_sparse, read_footers};

pub use check::check;
pub use make::{build_differencing, make_differencing, ChildSpec};
pub use parent::{footer_of, open_parent, ParentRef};

/// Whether the last 512 bytes of `file` start with the footer cookie: the only mark of a fixed
/// VHD (the caller looked at the start of the file first).
pub fn probe_tail(file: &HostFile) -> Result<bool> {
    let len = file.len()?;
    if len < FOOTER_LEN as u64 {
        return Ok(false);
    }
    let mut cookie = [0u8; 8];
    file.read_exact_at(&mut cookie, len - FOOTER_LEN as u64)?;
    Ok(&cookie == footer::COOKIE)
}

/// State only allocation, bitmap changes and flush touch, guarded by the allocation mutex.
struct AllocState {
    /// Where the next block goes: past every block and structure, over the footer there.
    next_free: u64,
    /// How far the file is known to reach on disk (synced).
    durable_end: u64,
    /// The footer at the end, and the copy at offset 0, need rewriting (found damaged).
    repair_end: bool,
    repair_copy: bool,
}

/// What dynamic and differencing disks have on top of a fixed one.
struct Sparse {
    /// The dynamic header as opened (a resize grows `max_table_entries`: the BAT's length).
    header: DynHeader,
    /// As opened: a resize changes the disk's `entries` and `virtual_size` (the BAT's copy is
    /// current), never its block and bitmap sizes.
    geometry: Geometry,
    alloc: Mutex<AllocState>,
    bat: RwLock<Bat>,
    bitmaps: Bitmaps,
}

/// An open VHD image.
pub struct VhdImage {
    file: HostFile,
    /// The footer in force; a resize replaces it (taken inside the allocation mutex).
    footer: RwLock<Footer>,
    disk_type: DiskType,
    /// The virtual size; grows with `resize` (resize.rs).
    size: AtomicU64,
    size_from: SizeFrom,
    sparse: Option<Sparse>,
    parent: Option<Backing>,
    parent_ref: Option<ParentRef>,
    read_only_reason: Option<String>,
    /// Which footer is in force, when it is not simply the last one.
    footer_note: Option<String>,
    /// Set by the first write, which lets a flush repair damaged footer copies.
    written: AtomicBool,
    /// Stops the disk for writes after a failed metadata write or sync (`meta::write_back`).
    write_back: WriteBack,
}

impl VhdImage {
    /// Opens the VHD in `file`. `parent` is the opened parent of a differencing disk (without
    /// it the disk is read-only); `read_only_reason` is set when the caller serves it read-only.
    pub fn open(
        file: HostFile,
        parent: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VhdImage> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, ParentSource::Given(parent), read_only_reason)
            .map_err(|e| e.with_path(&path))
    }

    /// Opens the VHD in `file`; for a differencing disk, `find_parent` gets where the child
    /// says its parent is and opens it.
    pub fn open_finding_parent(
        file: HostFile,
        find_parent: &mut dyn FnMut(&ParentRef) -> Result<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VhdImage> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, ParentSource::Find(find_parent), read_only_reason)
            .map_err(|e| e.with_path(&path))
    }

    fn open_inner(
        file: HostFile,
        parent: ParentSource<'_, ParentRef>,
        read_only_reason: Option<String>,
    ) -> Result<VhdImage> {
        let file_len = file.len()?;
        let found = read_footers(&file, file_len)?;
        let footer = found.footer.clone();
        let disk_type = footer.disk_type()?;
        let (size, size_from) = footer.virtual_size()?;
        let mut reasons = Vec::new();
        match read_only_reason {
            Some(reason) => reasons.push(reason),
            None if !file.is_writable() => {
                reasons.push("the image file is opened read-only".into())
            }
            None => {}
        }
        let mut sparse = None;
        let mut parent_ref = None;
        let mut parent_image = None;
        if disk_type == DiskType::Fixed {
            let data = file_len - FOOTER_LEN as u64;
            if size > data {
                return Err(Error::corrupt(format!(
                    "the fixed disk holds {data} bytes of data, less than its virtual size \
                     {size}"
                )));
            }
        } else {
            let opened = open_sparse(&file, file_len, &footer, &found, size, disk_type)?;
            if let Some(overlap) = &opened.overlap {
                log::warn!("{}: {overlap}; serving it read-only", file.path().display());
                reasons.push(overlap.clone());
            }
            if disk_type == DiskType::Differencing {
                let wanted = opened.parent_ref.clone();
                parent_image = match parent {
                    ParentSource::Given(given) => given,
                    ParentSource::Find(find) => Some(find(&wanted)?),
                };
                if parent_image.is_none() {
                    // Sectors filled up on write would take zeros instead of the parent's.
                    reasons.push("the parent of this differencing image is not open".into());
                }
                parent_ref = Some(wanted);
            }
            sparse = Some(opened.sparse);
        }
        if let Some(note) = &found.note {
            log::warn!("{}: {note}", file.path().display());
        }
        Ok(VhdImage {
            file,
            disk_type,
            size: AtomicU64::new(size),
            size_from,
            sparse,
            parent: parent_image,
            parent_ref,
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            footer_note: found.note,
            footer: RwLock::new(footer),
            written: AtomicBool::new(false),
            write_back: WriteBack::new(),
        })
    }

    /// The virtual size now (it grows with `resize`).
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// A copy of the footer in force.
    fn current_footer(&self) -> Footer {
        self.footer
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len())?;
        let Some(sparse) = &self.sparse else {
            return self.file.read_exact_at(buf, offset);
        };
        for run in sparse.lookup(offset, buf.len() as u64)? {
            let part = request_part_mut(buf, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => self.file.read_exact_at(part, host_offset)?,
                RunKind::Below => read_below(self.parent.as_ref(), part, run.offset)?,
                RunKind::Partial { .. } => {
                    for (piece, here) in self.pieces(sparse, &run)? {
                        let part = request_part_mut(buf, offset, piece.offset, piece.len)?;
                        match here {
                            Some(host) => self.file.read_exact_at(part, host)?,
                            None => read_below(self.parent.as_ref(), part, piece.offset)?,
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Splits a run in a block of unknown or partial bitmap into pieces in this file
    /// (`Some(host offset)`) and pieces below (`None`), by the block's bitmap.
    fn pieces(&self, sparse: &Sparse, run: &Run) -> Result<Vec<(Run, Option<u64>)>> {
        let RunKind::Partial {
            block,
            bitmap_at,
            host_offset,
        } = run.kind
        else {
            return Ok(vec![(*run, host_of(run))]);
        };
        let bits = sparse
            .bitmaps
            .get(block, bitmap_at, |buf, at| self.file.read_exact_at(buf, at))?;
        let block_start = block * sparse.geometry.block_size;
        let first = (run.offset - block_start) / SECTOR;
        let end = run.offset + run.len;
        let mut pieces: Vec<(Run, Option<u64>)> = Vec::new();
        let mut sector = first;
        loop {
            let start = (block_start + sector * SECTOR).max(run.offset);
            if start >= end {
                break;
            }
            let stop = (block_start + (sector + 1) * SECTOR).min(end);
            let here = bitmap::bit(&bits, sector).then(|| host_offset + (start - run.offset));
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
            sector += 1;
        }
        Ok(pieces)
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        let Some(sparse) = &self.sparse else {
            push_stored(&mut extents, &self.file, offset, offset, len)?;
            return Ok(extents);
        };
        for run in sparse.lookup(offset, len)? {
            for (piece, here) in self.pieces(sparse, &run)? {
                if let Some(host) = here {
                    push_stored(&mut extents, &self.file, piece.offset, host, piece.len)?;
                } else {
                    for e in status_below(self.parent.as_ref(), piece.offset, piece.len)? {
                        push_extent(&mut extents, e);
                    }
                }
            }
        }
        Ok(extents)
    }

    fn details(&self) -> Vec<(&'static str, String)> {
        let f = &self.current_footer();
        let mut details = vec![
            ("creator_app", f.creator_app_text()),
            (
                "creator_version",
                format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xffff),
            ),
            ("creator_os", f.creator_os_text()),
            (
                "chs_geometry",
                format!(
                    "{}/{}/{} ({} sectors)",
                    f.cylinders,
                    f.heads,
                    f.sectors_per_track,
                    f.geometry_sectors()
                ),
            ),
            ("current_size", f.current_size.to_string()),
            ("original_size", f.original_size.to_string()),
            (
                "size_from",
                match self.size_from {
                    SizeFrom::Geometry => format!(
                        "CHS geometry (creator {:?}, as QEMU and Virtual PC)",
                        f.creator_app_text()
                    ),
                    SizeFrom::CurrentSize => {
                        format!("current_size (creator {:?})", f.creator_app_text())
                    }
                },
            ),
            ("timestamp", footer::timestamp_text(f.timestamp)),
            ("uuid", uuid::Uuid::from_bytes(f.unique_id).to_string()),
            ("saved_state", (f.saved_state != 0).to_string()),
            (
                "footer",
                self.footer_note
                    .clone()
                    .unwrap_or_else(|| "at the end of the file".into()),
            ),
        ];
        if let Some(sparse) = &self.sparse {
            let h = &sparse.header;
            details.push(("block_size", sparse.geometry.block_size.to_string()));
            details.push((
                "bat",
                format!(
                    "{} entries at {:#x}",
                    sparse.read_bat().len(),
                    h.table_offset
                ),
            ));
            details.push((
                "blocks_allocated",
                sparse.read_bat().allocated().to_string(),
            ));
        }
        if let Some(p) = &self.parent_ref {
            details.push(("parent_uuid", uuid::Uuid::from_bytes(p.uuid).to_string()));
            details.push(("parent_timestamp", footer::timestamp_text(p.timestamp)));
            details.push(("parent_name", p.unicode_name.clone()));
            for (code, path) in &p.locators {
                let text = match path {
                    Ok(path) => format!("{code}: {path}"),
                    Err(why) => format!("{code}: ({why})"),
                };
                details.push(("parent_locator", text));
            }
        }
        if let Some(parent) = &self.parent {
            details.push(("parent", parent.path.display().to_string()));
        }
        details
    }
}

/// The host offset of a run's first byte, when the run is stored in the file.
fn host_of(run: &Run) -> Option<u64> {
    match run.kind {
        RunKind::Data { host_offset } => Some(host_offset),
        RunKind::Partial { .. } | RunKind::Below => None,
    }
}

impl Sparse {
    // Poisoning is ignored on purpose: the critical sections leave the guarded state
    // consistent at every step (an entry is published only once the file reaches its block,
    // and `next_free` moves before any write, so a failed one only leaks space).
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_bat(&self) -> RwLockReadGuard<'_, Bat> {
        self.bat.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_bat(&self) -> RwLockWriteGuard<'_, Bat> {
        self.bat.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `[offset, offset + len)` up under the BAT's read lock and releases it.
    fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        self.read_bat()
            .runs(offset, len, |block| self.bitmaps.is_full(block))
    }
}

impl Image for VhdImage {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)
            .map_err(|e| e.with_path(self.file.path()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset)
            .map_err(|e| e.with_path(self.file.path()))
    }

    fn flush(&self) -> Result<()> {
        let path = self.file.path();
        self.write_back
            .run(path, || self.flush_inner().map_err(|e| e.with_path(path)))
    }

    fn is_dirty(&self) -> bool {
        let Some(sparse) = &self.sparse else {
            return false;
        };
        if self.write_back.is_stopped() {
            return false;
        }
        // One lock at a time: the BAT guard is gone before `repair_pending` takes the mutex.
        let bat_dirty = sparse.read_bat().is_dirty();
        bat_dirty || sparse.bitmaps.is_dirty() || self.repair_pending(sparse)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_inner(offset, len)
            .map_err(|e| e.with_path(self.file.path()))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_inner(offset, len)
            .and_then(|()| self.file.sync_data())
            .map_err(|e| e.with_path(self.file.path()))
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_inner(new_size)
            .map_err(|e| e.with_path(self.file.path()))
    }

    /// Discarded blocks stay in the BAT with their data punched (and a fixed image may be a
    /// sparse file), so the host file's own count is the smaller one then.
    fn allocated_bytes(&self) -> u64 {
        let mapped = match &self.sparse {
            Some(s) => s
                .read_bat()
                .allocated()
                .saturating_mul(s.geometry.block_size),
            None => self.virtual_size(),
        };
        mapped.min(self.file.allocated_bytes())
    }

    fn read_only_reason(&self) -> Option<String> {
        self.write_back.reason_after(&self.read_only_reason)
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "vpc",
            subformat: self.disk_type.name().to_string(),
            virtual_size: self.virtual_size(),
            cluster_size: self.sparse.as_ref().map(|s| s.geometry.block_size),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details: self.details(),
        }
    }
}

impl VhdImage {
    /// Whether a damaged footer copy waits for the first flush after a write.
    fn repair_pending(&self, sparse: &Sparse) -> bool {
        if !self.written.load(Ordering::Relaxed) {
            return false;
        }
        let alloc = sparse.lock_alloc();
        alloc.repair_end || alloc.repair_copy
    }
}
