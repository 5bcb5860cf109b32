//! VirtualBox VDI images (v1.1, dynamic and static), served as a raw disk.
//!
//! # On-disk layout (all little-endian)
//!
//! ```text
//! 0               header, 512 bytes (header.rs): signature 0xbeda107f at 64, version 1.1,
//!                 image_type (1 dynamic, 2 static, 4 differencing), offset_bmap,
//!                 offset_data, disk_size, block_size, blocks_in_image, blocks_allocated,
//!                 UUIDs (image, modification, parent's image, parent's modification)
//! offset_bmap     bmap: blocks_in_image u32 entries, one per virtual block:
//!                 0xffffffff unallocated, 0xfffffffe discarded (both read as zeros),
//!                 n = the data is physical block n
//! offset_data     physical blocks of block_size bytes: block n at offset_data + n * block_size
//! ```
//!
//! qemu-img writes the bmap at 512 and the data at the next sector after it, with 1 MiB blocks;
//! VirtualBox puts the bmap at 1 MiB and the data at the next MiB after it. We accept any
//! offsets and any power-of-two block size from 512 B to 256 MiB. Physical blocks are handed
//! out in increasing order; a new block goes one past the highest physical block in use.
//!
//! # Differencing images (VirtualBox snapshots)
//!
//! A differencing image (type 4) names its parent by the parent's image UUID (`uuid_link`);
//! `parent.rs` finds it in the source tree. Its unallocated entries (0xffffffff) read from the
//! parent, its discarded ones (0xfffffffe) read as zeros, as in VirtualBox. A write into an
//! unallocated block allocates it in the child whole: the parent's bytes around the payload
//! are copied into the new block before it is published, so a published entry never hides
//! parent data. The parent is opened read-only. The child's modification UUID is left as it
//! is (QEMU does not change it either), so snapshots taken of it later stay linked.
//!
//! # `blocks_allocated`
//!
//! QEMU and VirtualBox put their next new block at `blocks_allocated`, trusting the header: a
//! count below the entries makes them overwrite existing data. `qemu-img check` counts the
//! allocated entries and calls any difference from the header's count a corruption ("allocated
//! blocks mismatch", in either direction). imgfs writes `blocks_allocated` = one past the
//! highest physical block in use, which keeps every allocator off existing data and, for the
//! dense maps QEMU, VirtualBox and imgfs write, equals the count of entries. A header count
//! above that (a crash between header and bmap, ours or theirs) is repaired by the next
//! allocation's flush; until then only unreferenced blocks are above it, which imgfs reuses.
//!
//! # Metadata write order
//!
//! Allocating write: the whole new block (payload padded with zeros) is written at the next
//! free physical index first; only when that succeeded is the entry published in the in-memory
//! bmap (its sector marked dirty, `blocks_allocated` raised). `flush` then does `fdatasync`
//! (new data durable), writes the header and the dirty entries, and does `fdatasync` again.
//! No order of two separate writes satisfies both QEMU's allocator (count never below the
//! entries) and `qemu-img check` (count equal to the entries) at every step, so:
//!
//! - bmap right after the header sector (qemu-img's layout): the header and the bmap up to the
//!   last dirty sector go out in one write. A crash leaves the old header and entries or the
//!   new ones, each consistent. The write rewrites clean bmap sectors below the last dirty one
//!   with what they hold (at most the whole bmap, 4 bytes per block). Caveat: a power loss can
//!   tear one write at page or sector granularity. One that kept a later bmap page but not
//!   the header page leaves a count below the entries: imgfs still allocates past every entry
//!   and its next allocation repairs the count, but QEMU opening the image in that state
//!   would put its next block over existing data. Entries that all lie in the first host page
//!   with the header (the first 896 blocks) are written within that page.
//! - bmap elsewhere (VirtualBox's layout): the header with the new count, `fdatasync`, then
//!   the dirty bmap sectors, the order QEMU and VirtualBox use (they skip the sync). A crash
//!   between them leaves a
//!   count above the entries: QEMU and VirtualBox still allocate clear of all data, but
//!   `qemu-img check` reports the mismatch until the next allocation's flush repairs it. A
//!   crash before the header or after the bmap leaves a consistent image.
//!
//! Either way a crash can leak a written-but-unreferenced block (reused by the next
//! allocation), but never leaves an entry pointing at unwritten data.
//!
//! # Discard (discard.rs)
//!
//! Whole blocks that are the highest in use are released (`DISCARDED`, the count lowered, in
//! the one write of header and bmap of qemu-img's layout); every other block is punched in
//! place and stays mapped, reading as zeros: moving blocks into holes cannot be done without
//! a window in which `qemu-img check` fails. discard.rs gives the full order.
//!
//! # Resize (resize.rs)
//!
//! A dynamic image grows where the bmap has room before the data: the new entries, a sync,
//! then the header with the new size, a sync.
//!
//! # Failures
//!
//! A failed write of a new block fails only its request: the entry is published after the
//! write, so nothing refers to the block (reused by the next allocation). Any failure of a
//! flush (a sync, the header or bmap write) stops the image (`meta::write_back`): it is
//! served read-only with the reason in `info`, and every later flush fails, since what was
//! written since the last successful one may be lost. The file is left as a crash at that
//! step would leave it.
//!
//! # Locks (taken in this order, never the reverse)
//!
//! 1. `alloc` (Mutex): serialises allocations and flushes; holds the next free physical block.
//!    Held across the data write of a new block, so two writers can never allocate the same
//!    virtual block twice, and across a flush, so no allocation dirties the map between the
//!    snapshot of dirty sectors and marking them clean.
//! 2. `map` (RwLock): the bmap. Read-locked for lookups, write-locked only to publish an
//!    allocation or mark the map clean; never held during I/O.
//!
//! Reads and in-place writes take only a brief read lock for the lookup and then do their I/O
//! with no lock held, so they run in parallel with each other and with allocations.

mod block_map;
mod check;
mod discard;
mod header;
mod make;
mod parent;
mod resize;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing};
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{
    check_range, push_extent, request_part, request_part_mut, split_request, Extent, ExtentState,
    Image, ImageInfo,
};
use crate::meta::write_back::WriteBack;

use block_map::{BlockMap, Geometry, Run, RunKind};
use header::{Header, ImageType, HEADER_LEN, SIGNATURE};
pub use make::make_differencing;
pub use parent::{open_parent, ParentLink};
// Apart from the other re-exports, which other branches change.
pub use check::check;

/// The largest block whose zero padding is built in memory around a partial write; larger
/// blocks (up to 256 MiB) are padded from a buffer of this size, so that concurrent writers
/// into fresh blocks never hold a whole block each.
const PAD_IN_MEMORY: usize = 1 << 20;

/// Whether `head` (the first bytes of a file) carries the VDI signature.
pub fn probe(head: &[u8]) -> bool {
    head.get(64..68) == Some(&SIGNATURE.to_le_bytes()[..])
}

/// State only the allocation path touches, guarded by the allocation mutex.
struct AllocState {
    /// The physical block index the next allocation takes.
    next_free: u32,
    /// The `blocks_allocated` the header on disk holds.
    written_count: u32,
    /// The header's `blocks_in_image` and `disk_size`, which a resize grows (resize.rs).
    blocks_in_image: u32,
    disk_size: u64,
}

/// An open VDI image.
pub struct VdiImage {
    file: HostFile,
    /// The header as opened; the live `blocks_allocated` is kept by the block map.
    header: Header,
    geometry: Geometry,
    /// The virtual size; grows with `resize` (resize.rs).
    size: AtomicU64,
    alloc: Mutex<AllocState>,
    map: RwLock<BlockMap>,
    /// The parent of a differencing image.
    backing: Option<Backing>,
    /// Held shared by reads and in-place writes across lookup and I/O; taken exclusively by a
    /// discard while it moves blocks (discard.rs), so no I/O uses a block's old place.
    io_gate: RwLock<()>,
    read_only_reason: Option<String>,
    write_back: WriteBack,
}

impl VdiImage {
    /// Opens the VDI image in `file`; a differencing image is refused, having no way to find
    /// its parent (see `open_finding_parent`).
    pub fn open(file: HostFile, read_only_reason: Option<String>) -> Result<VdiImage> {
        Self::open_finding_parent(
            file,
            &mut |link| {
                Err(Error::unsupported(format!(
                    "a differencing VDI needs its parent (uuid_image {}), which is only looked \
                     up in a source tree",
                    link.uuid
                )))
            },
            read_only_reason,
        )
    }

    /// Opens the VDI image in `file`, calling `find_parent` for the parent of a differencing
    /// image. `read_only_reason` is set when the caller opened the file read-only; the image
    /// may add its own reason (duplicate bmap entries).
    pub fn open_finding_parent(
        file: HostFile,
        find_parent: &mut dyn FnMut(&ParentLink) -> Result<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<VdiImage> {
        let path = file.path().to_path_buf();
        let file_len = file.len()?;
        if file_len < HEADER_LEN as u64 {
            return Err(Error::corrupt(format!(
                "file is {file_len} bytes, shorter than the {HEADER_LEN}-byte VDI header"
            ))
            .with_path(&path));
        }
        let mut head = [0u8; HEADER_LEN];
        file.read_exact_at(&mut head, 0)?;
        let header = Header::parse(&head).map_err(|e| e.with_path(&path))?;
        header
            .check_layout(file_len)
            .map_err(|e| e.with_path(&path))?;
        let (map, scan) =
            BlockMap::load(&file, &header, file_len).map_err(|e| e.with_path(&path))?;
        let backing = match header.image_type {
            ImageType::Differencing => Some(
                find_parent(&ParentLink {
                    uuid: header.uuid_link,
                    modification: header.uuid_parent,
                })
                .map_err(|e| e.with_path(&path))?,
            ),
            ImageType::Dynamic | ImageType::Static => None,
        };

        if let Some(mismatch) = &scan.count_mismatch {
            log::warn!(
                "{}: {mismatch}; new blocks will start at physical block {}",
                path.display(),
                scan.next_free
            );
        }
        let mut reasons = Vec::new();
        if let Some(duplicate) = scan.duplicate {
            log::warn!("{}: {duplicate}; serving it read-only", path.display());
            reasons.push(duplicate);
        }
        match read_only_reason {
            Some(reason) => reasons.push(reason),
            None if !file.is_writable() => {
                reasons.push("the image file is opened read-only".into())
            }
            None => {}
        }

        Ok(VdiImage {
            geometry: map.geometry(),
            size: AtomicU64::new(header.virtual_size()),
            alloc: Mutex::new(AllocState {
                next_free: scan.next_free,
                written_count: header.blocks_allocated,
                blocks_in_image: header.blocks_in_image,
                disk_size: header.disk_size,
            }),
            map: RwLock::new(map),
            backing,
            io_gate: RwLock::new(()),
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            write_back: WriteBack::new(),
            header,
            file,
        })
    }

    // Poisoning is ignored on purpose: the critical sections on the map are a few assignments
    // that cannot stop halfway, and `next_free` only moves after a successful publish, so a
    // panic elsewhere never leaves the guarded state inconsistent.
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The virtual size now (it grows with `resize`).
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn read_map(&self) -> RwLockReadGuard<'_, BlockMap> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, BlockMap> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `[offset, offset + len)` up under the read lock and releases it.
    fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        self.read_map().runs(offset, len)
    }

    fn gate(&self) -> RwLockReadGuard<'_, ()> {
        self.io_gate.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len())?;
        let _gate = self.gate();
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = request_part_mut(buf, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => self.file.read_exact_at(part, host_offset)?,
                RunKind::Unallocated => read_below(self.backing.as_ref(), part, run.offset)?,
                RunKind::Discarded => part.fill(0),
            }
        }
        Ok(())
    }

    fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_range(self.virtual_size(), offset, buf.len())?;
        // In-place parts under the gate; the others after it is released, since allocation
        // takes the allocation mutex, which a discard holds while it waits for the gate.
        let mut unallocated = Vec::new();
        {
            let _gate = self.gate();
            for run in self.lookup(offset, buf.len() as u64)? {
                let part = request_part(buf, offset, run.offset, run.len)?;
                match run.kind {
                    RunKind::Data { host_offset } => self.file.write_all_at(part, host_offset)?,
                    RunKind::Unallocated | RunKind::Discarded => unallocated.push(run),
                }
            }
        }
        for run in unallocated {
            let part = request_part(buf, offset, run.offset, run.len)?;
            self.write_unallocated(part, run.offset)?;
        }
        Ok(())
    }

    /// Writes `payload` at virtual `offset`, a range that was unallocated at lookup time.
    fn write_unallocated(&self, payload: &[u8], offset: u64) -> Result<()> {
        let mut alloc = self.lock_alloc();
        // Another writer may have allocated some of these blocks between our lookup and taking
        // the mutex; look again now that nobody else can.
        for run in self.lookup(offset, payload.len() as u64)? {
            let part = request_part(payload, offset, run.offset, run.len)?;
            match run.kind {
                // Its allocating write finished before it was published, so this write lands
                // after it. Rare, so done under the mutex rather than re-queued.
                RunKind::Data { host_offset } => self.file.write_all_at(part, host_offset)?,
                RunKind::Unallocated => self.allocate(&mut alloc, part, run.offset, true)?,
                RunKind::Discarded => self.allocate(&mut alloc, part, run.offset, false)?,
            }
        }
        Ok(())
    }

    /// Gives the unallocated virtual blocks under `[offset, offset + payload.len())` consecutive
    /// physical blocks, writes them whole, then publishes them. Caller holds the alloc mutex.
    /// The rest of a partly written block is the parent's bytes when `from_below` (blocks that
    /// were unallocated in a differencing image), else zeros.
    fn allocate(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        offset: u64,
        from_below: bool,
    ) -> Result<()> {
        let geo = self.geometry;
        let (first_block, head) = geo.split(offset);
        let count = (head + payload.len() as u64).div_ceil(geo.block_size());
        let first_phys = alloc.next_free;
        // VirtualBox requires blocks_allocated <= blocks_in_image and qemu-img check flags
        // physical indices beyond it, so a map with leaked blocks can run out of indices.
        let end_phys = u32::try_from(count)
            .ok()
            .and_then(|n| first_phys.checked_add(n))
            .filter(|&end| end <= alloc.blocks_in_image)
            .ok_or_else(|| {
                Error::io(
                    format!(
                        "no free VDI block: next physical block {first_phys} + {count} exceeds \
                         blocks_in_image {}",
                        alloc.blocks_in_image
                    ),
                    io::Error::from_raw_os_error(libc::ENOSPC),
                )
            })?;
        let host = geo.host_offset(first_phys)?;
        let below = from_below.then_some(self.backing.as_ref()).flatten();
        let fill = Fill {
            below,
            virtual_start: offset - head,
        };
        self.write_new_blocks(payload, head as usize, host, fill)?;
        self.write_map()
            .publish(first_block, first_phys, end_phys - first_phys)?;
        alloc.next_free = end_phys;
        Ok(())
    }

    /// Writes fresh blocks starting at `host`: `payload` placed `head` bytes into the first one,
    /// `fill` around it. Full blocks go straight from `payload`; only partial ones are built in
    /// a block-sized buffer.
    fn write_new_blocks(
        &self,
        payload: &[u8],
        head: usize,
        mut host: u64,
        mut fill: Fill<'_>,
    ) -> Result<()> {
        let block = self.geometry.block_size() as usize;
        let mut rest = payload;
        if head > 0 || rest.len() < block {
            let (now, later) = split_request(rest, (block - head).min(rest.len()))?;
            self.write_padded(now, head, host, fill)?;
            rest = later;
            host += block as u64;
            fill.virtual_start += block as u64;
        }
        let (full, tail) = split_request(rest, rest.len() / block * block)?;
        if !full.is_empty() {
            self.file.write_all_at(full, host)?;
            host += full.len() as u64;
            fill.virtual_start += full.len() as u64;
        }
        if !tail.is_empty() {
            self.write_padded(tail, 0, host, fill)?;
        }
        Ok(())
    }

    /// Writes one fresh block at `host`: `part` at `head`, `fill` around it.
    fn write_padded(&self, part: &[u8], head: usize, host: u64, fill: Fill<'_>) -> Result<()> {
        let block_size = self.geometry.block_size() as usize;
        let tail = block_size
            .checked_sub(head)
            .and_then(|rest| rest.checked_sub(part.len()))
            .ok_or_else(|| Error::out_of_range("internal: padded write outside its block"))?;
        if block_size > PAD_IN_MEMORY {
            // Blocks can be 256 MiB: their padding goes out through a bounded buffer instead.
            self.write_fill(host, fill, 0, head)?;
            self.file.write_all_at(part, host + head as u64)?;
            return self.write_fill(host, fill, head + part.len(), tail);
        }
        let mut block = vec![0u8; block_size];
        read_below(fill.below, &mut block, fill.virtual_start)?;
        block
            .get_mut(head..head + part.len())
            .ok_or_else(|| Error::out_of_range("internal: padded write outside its block"))?
            .copy_from_slice(part);
        self.file.write_all_at(&block, host)
    }

    /// Writes `len` bytes of `fill` at `skip` bytes into the fresh block at `host`.
    fn write_fill(&self, host: u64, fill: Fill<'_>, skip: usize, len: usize) -> Result<()> {
        let mut buf = vec![0u8; len.min(PAD_IN_MEMORY)];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            let piece = buf
                .get_mut(..n)
                .ok_or_else(|| Error::out_of_range("internal: fill outside its buffer"))?;
            let at = (skip + done) as u64;
            if fill.below.is_some() {
                read_below(fill.below, piece, fill.virtual_start + at)?;
            }
            self.file.write_all_at(piece, host + at)?;
            done += n;
        }
        Ok(())
    }

    /// Writes back the header and the dirty bmap sectors in the order the module doc gives.
    fn flush_inner(&self) -> Result<()> {
        let mut alloc = self.lock_alloc();
        // Holes below the highest block (a VirtualBox discard, a crash of an older imgfs)
        // keep `qemu-img check` unhappy: the first flush that writes anything moves blocks
        // down into them (discard.rs), which leaves the count equal to the entries.
        let repair = {
            let map = self.read_map();
            map.is_dirty() && map.allocated() < map.used_end()
        };
        self.flush_locked(&mut alloc)?;
        if repair {
            self.compact(&mut alloc)?;
        }
        Ok(())
    }

    /// Whether the bmap starts right after the header sector (qemu-img's layout), so that one
    /// write carries the header and the entries.
    fn bmap_follows_header(&self) -> bool {
        self.header.offset_bmap as usize == HEADER_LEN
    }

    /// `flush_inner` with the allocation mutex held. A count that goes down (a discard moved
    /// blocks down, discard.rs) goes out after the entries that stopped using the blocks above
    /// it, the reverse of the order for a count that goes up: never is the count on disk
    /// below an entry on disk.
    fn flush_locked(&self, alloc: &mut AllocState) -> Result<()> {
        let adjacent = self.bmap_follows_header();
        let pending = {
            let map = self.read_map();
            map.is_dirty().then(|| {
                let bmap = if adjacent {
                    vec![(u64::from(self.header.offset_bmap), map.through_last_dirty())]
                } else {
                    map.dirty_sectors()
                };
                (bmap, map.blocks_allocated())
            })
        };
        let Some((bmap, blocks_allocated)) = pending else {
            return self.file.sync_data();
        };
        self.file.sync_data()?;
        let mut header = self.header.clone();
        header.blocks_in_image = alloc.blocks_in_image;
        header.disk_size = alloc.disk_size;
        header.blocks_allocated = blocks_allocated;
        let header = header.to_bytes()?;
        if adjacent {
            let mut bytes = header.to_vec();
            for (_, piece) in &bmap {
                bytes.extend_from_slice(piece);
            }
            self.file.write_all_at(&bytes, 0)?;
        } else if blocks_allocated < alloc.written_count {
            for (at, bytes) in &bmap {
                self.file.write_all_at(bytes, *at)?;
            }
            self.file.sync_data()?;
            self.file.write_all_at(&header, 0)?;
        } else {
            self.file.write_all_at(&header, 0)?;
            self.file.sync_data()?;
            for (at, bytes) in &bmap {
                self.file.write_all_at(bytes, *at)?;
            }
        }
        self.file.sync_data()?;
        alloc.written_count = blocks_allocated;
        self.write_map().mark_clean();
        Ok(())
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        for run in self.lookup(offset, len)? {
            let state = match run.kind {
                // Discarded blocks mostly stay mapped, punched in place (discard.rs).
                RunKind::Data { host_offset } => {
                    push_stored(&mut extents, &self.file, run.offset, host_offset, run.len)?;
                    continue;
                }
                RunKind::Discarded => ExtentState::Zero,
                RunKind::Unallocated if self.backing.is_some() => {
                    for extent in status_below(self.backing.as_ref(), run.offset, run.len)? {
                        push_extent(&mut extents, extent);
                    }
                    continue;
                }
                RunKind::Unallocated => ExtentState::Unallocated,
            };
            push_extent(
                &mut extents,
                Extent {
                    offset: run.offset,
                    len: run.len,
                    state,
                    layer: 0,
                    host: None,
                },
            );
        }
        Ok(extents)
    }
}

/// What surrounds a payload in a fresh block: the parent's bytes (`below`) from virtual offset
/// `virtual_start` (the block's start) on, or zeros.
#[derive(Clone, Copy)]
struct Fill<'a> {
    below: Option<&'a Backing>,
    virtual_start: u64,
}

impl Image for VdiImage {
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
        !self.write_back.is_stopped() && self.read_map().is_dirty()
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

    fn allocated_bytes(&self) -> u64 {
        // Most discarded blocks stay mapped, punched (discard.rs).
        let mapped = u64::from(self.read_map().allocated()) * self.geometry.block_size();
        mapped.min(self.file.allocated_bytes())
    }

    fn read_only_reason(&self) -> Option<String> {
        self.write_back.reason_after(&self.read_only_reason)
    }

    fn info(&self) -> ImageInfo {
        let (blocks_allocated, allocated) = {
            let map = self.read_map();
            (map.blocks_allocated(), map.allocated())
        };
        let h = &self.header;
        let mut details = vec![
            ("uuid", h.uuid_image.to_string()),
            ("uuid_last_snap", h.uuid_last_snap.to_string()),
            ("blocks_in_image", self.read_map().len().to_string()),
            ("blocks_allocated", blocks_allocated.to_string()),
            ("offset_bmap", format!("{:#x}", h.offset_bmap)),
            ("offset_data", format!("{:#x}", h.offset_data)),
        ];
        if let Some(backing) = &self.backing {
            details.push(("parent", backing.path.display().to_string()));
            details.push(("parent_uuid", h.uuid_link.to_string()));
            details.push(("parent_modification_uuid", h.uuid_parent.to_string()));
        }
        if h.image_flags != 0 {
            details.push(("image_flags", format!("{:#x}", h.image_flags)));
        }
        let text = h.text();
        if !text.is_empty() {
            details.push(("creator", text));
        }
        let description = h.description();
        if !description.is_empty() {
            details.push(("description", description));
        }
        ImageInfo {
            format: "vdi",
            subformat: h.image_type.name().to_string(),
            virtual_size: self.virtual_size(),
            cluster_size: Some(self.geometry.block_size()),
            allocated_bytes: u64::from(allocated) * self.geometry.block_size(),
            read_only_reason: self.read_only_reason(),
            details,
        }
    }
}
