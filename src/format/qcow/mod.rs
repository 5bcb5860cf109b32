//! QCOW version 1 images (QEMU's original copy-on-write format), served as a raw disk.
//!
//! # On-disk layout (all big-endian)
//!
//! ```text
//! 0                    header, 48 bytes (header.rs): magic "QFI\xfb", version 1,
//!                      backing_file_offset u64, backing_file_size u32, mtime u32, size u64,
//!                      cluster_bits u8 (9..=16), l2_bits u8 (6..=13), padding u16,
//!                      crypt_method u32 (0 none, 1 AES: refused), l1_table_offset u64
//! backing_file_offset  backing file name, backing_file_size bytes (no NUL; at most 1023)
//! l1_table_offset      L1 table: ceil(size / 2^(cluster_bits + l2_bits)) u64 entries, each the
//!                      file offset of an L2 table, 0 where there is none
//! (anywhere after)     L2 tables of 2^l2_bits u64 entries: 0 = unallocated (the backing file
//!                      shows through, or zeros), bit 63 set = compressed cluster (raw deflate,
//!                      its byte length in the cluster_bits bits below bit 63, its file offset
//!                      in the low 63 - cluster_bits bits), else the file offset of a cluster
//! ```
//!
//! qemu-img writes the L1 table right after the header and the backing name (8-byte aligned),
//! then L2 tables and clusters at the cluster-aligned end of the file as they are allocated;
//! compressed clusters are packed at sector granularity. There are no refcounts: space is only
//! ever appended, and a cluster that stops being referenced (a compressed cluster rewritten as
//! a normal one) leaks. The disk is `size` rounded down to whole sectors, as QEMU serves it.
//!
//! Every table and cluster an entry names must lie inside the file as it was opened and clear
//! of the header, backing name and L1 table, so appended space never overlaps anything
//! referenced. Two L1 entries naming overlapping L2 tables would make writes through one undo
//! the other: such an image is served read-only. Clusters shared between L2 entries cannot be
//! found without reading every table and are not looked for (QEMU does not either); a data
//! cluster lying on an L2 table can, since L1 names every table: writes and punches through
//! it are refused (spans.rs), so nothing changes a table behind its copy in memory.
//!
//! # Metadata write order
//!
//! Allocation appends: new clusters (the payload merged with what the layer below holds at that
//! place, or with the inflated compressed cluster being replaced) are written at the end of the
//! file first, and only then published in the in-memory L2 table. A new L2 table is only
//! reserved at the end of the file (and its L1 entry set in memory); it is written, whole, on
//! flush. `flush` does `fdatasync` (new data durable) -> dirty L2 sectors -> `fdatasync` ->
//! dirty L1 sectors -> `fdatasync`, writing only what allocations dirtied. A crash therefore
//! leaks appended clusters at worst; no L1 entry ever points at an unwritten L2 table and no L2
//! entry at unwritten data.
//!
//! Discard keeps clusters mapped (the format has no zero entry, and unmapping would leak the
//! space for good) and punches their host ranges, an in-place write of zeros that frees the
//! host file's blocks; compressed and backed clusters are written with zeros instead.
//!
//! Resize (resize.rs) grows the disk where the L1 table has room before the first table or
//! cluster: the new L1 entries (zeros), a sync, then the header's `size`, a sync.
//!
//! # Failures
//!
//! A failed write of new clusters fails only its request (they are published after it, and
//! the space is taken again by the next allocation); a table reserved for them is written,
//! zeroed, by the next flush. Any failure of a flush stops the image (`meta::write_back`): it
//! is served read-only with the reason in `info`, and every later flush fails, since what
//! was written since the last successful one may be lost. The file is left as a crash at that
//! step would leave it.
//!
//! # Locks (taken in this order, never the reverse)
//!
//! 1. `alloc` (Mutex): serialises allocations, flushes and resizes; holds the next free file
//!    offset.
//!    Held across the data write of new clusters, so two writers never allocate the same guest
//!    cluster twice (the second one looks again under the mutex and finds it allocated), and
//!    across a flush, so no allocation dirties a table between the snapshot and marking clean.
//! 2. `tables` (RwLock): L1 and the loaded L2 tables. Read-locked for lookups, write-locked to
//!    keep a freshly read L2 table or publish an allocation; never held during I/O (an L2 table
//!    is read from the file with no lock held, then inserted). A table read while an
//!    allocation changed some table is not kept (tables.rs says why); the lookup reads it
//!    again holding `alloc`, where no allocation can overlap the read.
//! 3. `inflated` (`LastInflated`'s mutex): the last inflated compressed cluster, held only to
//!    clone or replace it.
//! 4. `layout` (RwLock): held only to copy the layout, or for a resize to lengthen its L1
//!    table.
//! 5. `spans` (RwLock): held only to look up or add where an L2 table lies.
//!
//! Reads and in-place writes take the read lock just for the lookup and do their I/O with no
//! lock held, so they run in parallel with each other and with allocations.

mod check;
mod crypt;
mod header;
mod resize;
mod spans;
mod tables;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing};
use crate::format::encrypted::DataCipher;
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{
    check_range, check_span, push_extent, request_part, request_part_mut, split_request, zero_fill,
    Extent, ExtentState, Image, ImageInfo,
};
use crate::meta::compress::{inflate, Deflate, LastInflated};
use crate::meta::write_back::WriteBack;

pub use check::check;
pub use header::QcowHeader;

/// How often a lookup reads the same L2 table again (because other readers' loads dropped it
/// from the bounded table memory) before giving up.
const MAX_RELOADS: u32 = 8;
use header::{Geometry, Layout};
use spans::TableSpans;
use tables::{push_run, Run, RunKind, TableState, Tables};

/// The pause point between reading a missing L2 table and keeping it.
#[cfg(test)]
const PAUSE_L2_READ: &str = "qcow lookup: L2 table read, not yet kept";

/// State only the allocation path touches, guarded by the allocation mutex.
struct AllocState {
    /// Where the next cluster or L2 table goes: the cluster-aligned end of everything written
    /// or reserved so far.
    next_free: u64,
}

/// An open QCOW v1 image.
pub struct QcowImage {
    file: HostFile,
    header: QcowHeader,
    geometry: Geometry,
    /// The file ranges the header claims; the L1 table's grows with `resize` (resize.rs).
    layout: RwLock<Layout>,
    /// The virtual size; grows with `resize` (resize.rs).
    size: AtomicU64,
    backing: Option<Backing>,
    alloc: Mutex<AllocState>,
    tables: RwLock<Tables>,
    /// Where the L2 tables lie, for refusing writes through a data cluster placed on one.
    spans: RwLock<TableSpans>,
    /// The last compressed cluster inflated, by its file offset. Compressed bytes are never
    /// rewritten (a write moves the cluster), so an entry never goes stale.
    inflated: LastInflated,
    /// Estimated bytes of guest data in the file, see `open`.
    data_bytes: AtomicU64,
    /// The end of the space in use: the file as opened, grown by every allocation. An L2
    /// table read again after it was dropped from memory may point anywhere below it.
    end_of_data: AtomicU64,
    read_only_reason: Option<String>,
    write_back: WriteBack,
    /// The cipher of an encrypted image's data clusters.
    cipher: Option<DataCipher>,
}

impl QcowImage {
    /// Opens the QCOW v1 image in `file` whose header `QcowHeader::read` returned. `backing` is
    /// the opened backing image (`None`: unallocated clusters read as zeros);
    /// `read_only_reason` is set when the caller serves the image read-only.
    pub fn open(
        file: HostFile,
        header: QcowHeader,
        backing: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<QcowImage> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, header, backing, read_only_reason).map_err(|e| e.with_path(&path))
    }

    fn open_inner(
        file: HostFile,
        header: QcowHeader,
        backing: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<QcowImage> {
        // The header may have been read a while ago: check it against the file as it is now.
        let file_len = file.len()?;
        header.check_layout(file_len)?;
        let layout = header.layout(file_len);
        let geometry = header.geometry();
        let tables = Tables::load_l1(&file, &header, layout)?;
        let cluster = geometry.cluster_size();
        let next_free = file_len
            .checked_next_multiple_of(cluster)
            .ok_or_else(|| Error::corrupt(format!("file length {file_len} overflows")))?;
        // Counting allocated clusters exactly would mean reading every L2 table at open. The
        // file holds nothing but metadata and (possibly leaked) clusters, so what is left
        // after the header, L1 and L2 tables is a close estimate: exact for images qemu-img
        // created and QEMU or we grew, counting compressed clusters at their compressed size
        // and leaked clusters as allocated.
        let l2_bytes = tables.l2_tables().saturating_mul(geometry.l2_table_len());
        let first_cluster = layout
            .metadata_end()
            .checked_next_multiple_of(cluster)
            .unwrap_or(u64::MAX);
        let data_bytes = file_len
            .saturating_sub(first_cluster)
            .saturating_sub(l2_bytes);
        let cipher = crypt::data_cipher(&header)?;
        let mut reasons = Vec::new();
        if let Some(overlap) = tables.overlapping_tables() {
            log::warn!("{}: {overlap}; serving it read-only", file.path().display());
            reasons.push(overlap);
        }
        match read_only_reason {
            Some(reason) => reasons.push(reason),
            None if !file.is_writable() => {
                reasons.push("the image file is opened read-only".into())
            }
            None => {}
        }
        let read_only_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
        Ok(QcowImage {
            size: AtomicU64::new(header.virtual_size()),
            geometry,
            layout: RwLock::new(layout),
            backing,
            alloc: Mutex::new(AllocState { next_free }),
            spans: RwLock::new(TableSpans::new(tables.l1(), geometry.l2_table_len())),
            tables: RwLock::new(tables),
            inflated: LastInflated::default(),
            data_bytes: AtomicU64::new(data_bytes),
            end_of_data: AtomicU64::new(file_len),
            read_only_reason,
            write_back: WriteBack::new(),
            cipher,
            header,
            file,
        })
    }

    // Poisoning is ignored on purpose: the critical sections on the tables are assignments
    // that cannot stop halfway, and `next_free` only moves forward, so a panic elsewhere never
    // leaves the guarded state inconsistent (at worst some file space is skipped).
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_tables(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The layout that tables read now are checked against: the file grown by our allocations.
    fn current_layout(&self) -> Layout {
        self.layout
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .grown_to(self.end_of_data.load(Ordering::Acquire))
    }

    /// The virtual size now (it grows with `resize`).
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Test hook: how many L2 tables stay in memory, and how many are loaded now.
    #[cfg(test)]
    fn set_table_capacity(&self, capacity: usize) -> usize {
        let mut tables = self.write_tables();
        tables.set_capacity(capacity);
        tables.loaded_tables()
    }

    fn write_tables(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Looks `[offset, offset + len)` up, loading the L2 tables it needs along the way (read
    /// with no lock held).
    fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        self.lookup_with(offset, len, None)
    }

    /// `lookup` for a caller holding the allocation mutex (`held` proves it).
    fn lookup_locked(&self, offset: u64, len: u64, held: &AllocState) -> Result<Vec<Run>> {
        self.lookup_with(offset, len, Some(held))
    }

    fn lookup_with(&self, offset: u64, len: u64, held: Option<&AllocState>) -> Result<Vec<Run>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} overflows")))?;
        let mut runs = Vec::new();
        let mut at = offset;
        let mut last_missing = None;
        let mut repeats = 0;
        loop {
            let missing = self.read_tables().lookup(at, end - at, &mut runs)?;
            let Some(missing) = missing else {
                return Ok(runs);
            };
            // Another thread's load may drop the table again before we look (a tiny table
            // cache under many readers); give up only if that keeps happening.
            if last_missing == Some(missing) {
                repeats += 1;
                if repeats > MAX_RELOADS {
                    return Err(Error::corrupt(format!(
                        "internal: L2 table {} does not stay loaded",
                        missing.l1_index
                    )));
                }
            }
            let entries = Tables::read_l2(
                &self.file,
                self.geometry,
                &self.current_layout(),
                missing.l1_index,
                missing.host_offset,
            )?;
            #[cfg(test)]
            crate::testutil::pause::point(PAUSE_L2_READ);
            let kept = self.write_tables().insert_l2(
                missing.l1_index,
                missing.host_offset,
                entries,
                missing.generation,
            );
            if !kept {
                // An allocation overlapped the read. Allocations hold the mutex, so with it
                // held the table is read again without one.
                if held.is_some() {
                    return Err(Error::corrupt(
                        "internal: an L2 table changed under the allocation mutex",
                    ));
                }
                let alloc = self.lock_alloc();
                let rest = missing.resume_at;
                for run in self.lookup_locked(rest, end - rest, &alloc)? {
                    push_run(&mut runs, run);
                }
                return Ok(runs);
            }
            at = missing.resume_at;
            last_missing = Some(missing);
        }
    }

    /// The whole inflated cluster whose `len` compressed bytes are at `host_offset`.
    fn inflate(&self, host_offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        self.inflated.get_or_inflate(host_offset, || {
            // `len` is below the cluster size (it is masked to cluster_bits bits).
            let mut compressed = vec![0u8; len as usize];
            self.file.read_exact_at(&mut compressed, host_offset)?;
            let cluster = self.geometry.cluster_size() as usize;
            let mut out = vec![0u8; cluster];
            inflate(&compressed, &mut out, Deflate::Raw, cluster).map_err(|e| {
                e.context(format!("qcow compressed cluster ({len} bytes)"))
                    .at_offset(host_offset)
            })?;
            Ok(out)
        })
    }

    /// Copies the part of the compressed cluster at `host_offset` that guest offset `offset`
    /// starts into `buf`.
    fn read_compressed(
        &self,
        buf: &mut [u8],
        offset: u64,
        host_offset: u64,
        len: u64,
    ) -> Result<()> {
        let data = self.inflate(host_offset, len)?;
        let start = self.geometry.split(offset).in_cluster as usize;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| data.get(start..end))
            .ok_or_else(|| Error::out_of_range("internal: read past a compressed cluster"))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len())?;
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = request_part_mut(buf, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => self.read_data(part, host_offset, run.offset)?,
                RunKind::Unallocated => read_below(self.backing.as_ref(), part, run.offset)?,
                RunKind::Compressed { host_offset, len } => {
                    self.read_compressed(part, run.offset, host_offset, len)?
                }
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
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = request_part(buf, offset, run.offset, run.len)?;
            match run.kind {
                RunKind::Data { host_offset } => {
                    self.check_off_tables(run.offset, host_offset, run.len)?;
                    self.write_data(part, host_offset, run.offset)?
                }
                RunKind::Unallocated | RunKind::Compressed { .. } => {
                    self.write_allocating(part, run.offset)?
                }
            }
        }
        Ok(())
    }

    /// Discard: qcow v1 cannot say "zero" and never reuses space, so clusters stay mapped and
    /// their host ranges are punched (they read as zeros, and the host file's space is freed);
    /// compressed clusters and backed unallocated ones are written with zeros.
    fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.write_back.refuse_writes()?;
        check_span(self.virtual_size(), offset, len)?;
        let runs = self.lookup(offset, len)?;
        // All or nothing: every cluster is checked before any is punched.
        for run in &runs {
            if let RunKind::Data { host_offset } = run.kind {
                self.check_off_tables(run.offset, host_offset, run.len)?;
            }
        }
        let mut rest = Vec::new();
        for run in runs {
            match run.kind {
                RunKind::Data { host_offset } if self.may_punch() => {
                    self.file.punch_hole(host_offset, run.len)?
                }
                RunKind::Data { .. } => rest.push(run),
                RunKind::Unallocated if self.backing.is_none() => {}
                RunKind::Unallocated | RunKind::Compressed { .. } => rest.push(run),
            }
        }
        for run in rest {
            zero_fill(self, run.offset, run.len)?;
        }
        Ok(())
    }

    /// Refuses a write or punch of `len` bytes of guest `offset` at `host_offset` when that
    /// lies on an L2 table (spans.rs).
    fn check_off_tables(&self, offset: u64, host_offset: u64, len: u64) -> Result<()> {
        let spans = self.spans.read().unwrap_or_else(PoisonError::into_inner);
        match spans.under(host_offset, len) {
            None => Ok(()),
            Some(table) => Err(Error::corrupt(format!(
                "the qcow cluster of disk offset {offset:#x} lies at {host_offset:#x}, on the \
                 L2 table at {table:#x}: writing it would change the table"
            ))),
        }
    }

    /// Writes `payload` at guest `offset`, a range that needed allocation at lookup time.
    fn write_allocating(&self, payload: &[u8], offset: u64) -> Result<()> {
        let mut alloc = self.lock_alloc();
        // Another writer may have allocated some of these clusters between our lookup and
        // taking the mutex; look again now that nobody else can.
        for run in self.lookup_locked(offset, payload.len() as u64, &alloc)? {
            let part = request_part(payload, offset, run.offset, run.len)?;
            match run.kind {
                // Its allocating write finished before it was published, so this write lands
                // after it. Rare, so done under the mutex rather than re-queued.
                RunKind::Data { host_offset } => self.write_data(part, host_offset, run.offset)?,
                RunKind::Unallocated => self.allocate(&mut alloc, part, run.offset)?,
                RunKind::Compressed { host_offset, len } => {
                    self.rewrite_compressed(&mut alloc, part, run.offset, host_offset, len)?
                }
            }
        }
        Ok(())
    }

    /// Gives the unallocated clusters under `[offset, offset + payload.len())` consecutive new
    /// clusters at the end of the file, writes them whole, then publishes them. Caller holds
    /// the alloc mutex.
    fn allocate(&self, alloc: &mut AllocState, payload: &[u8], offset: u64) -> Result<()> {
        let geo = self.geometry;
        let cluster = geo.cluster_size();
        let first = geo.cluster_start(offset);
        let end = offset + payload.len() as u64; // inside the disk: checked by the caller
        let count = (end - first).div_ceil(cluster);
        self.ensure_tables(alloc, first, end)?;
        let host = alloc.next_free;
        let next_free = reserve(host, count * cluster)?;
        self.write_new_clusters(payload, offset, host)?;
        self.write_tables().publish(first, host, count)?;
        alloc.next_free = next_free;
        self.end_of_data.fetch_max(next_free, Ordering::Release);
        self.data_bytes
            .fetch_add(count * cluster, Ordering::Relaxed);
        Ok(())
    }

    /// Replaces the compressed cluster under `[offset, offset + part.len())` (one cluster at
    /// most) by a normal one holding its inflated content with `part` merged in. The
    /// compressed bytes stay where they are, unreferenced.
    fn rewrite_compressed(
        &self,
        alloc: &mut AllocState,
        part: &[u8],
        offset: u64,
        host_offset: u64,
        len: u64,
    ) -> Result<()> {
        let geo = self.geometry;
        let cluster_len = geo.cluster_size();
        let first = geo.cluster_start(offset);
        let mut cluster = if part.len() as u64 == cluster_len {
            vec![0u8; cluster_len as usize]
        } else {
            self.inflate(host_offset, len)?.to_vec()
        };
        merge(&mut cluster, part, geo.split(offset).in_cluster as usize)?;
        self.ensure_tables(alloc, first, first + 1)?;
        let host = alloc.next_free;
        let next_free = reserve(host, cluster_len)?;
        self.write_data(&cluster, host, first)?;
        self.write_tables().publish(first, host, 1)?;
        alloc.next_free = next_free;
        self.end_of_data.fetch_max(next_free, Ordering::Release);
        self.data_bytes.fetch_add(cluster_len, Ordering::Relaxed);
        Ok(())
    }

    /// Makes sure the L2 tables covering guest `[first, end)` are in memory: loads existing
    /// ones, and reserves new zeroed ones at the end of the file where the L1 entry is empty.
    fn ensure_tables(&self, alloc: &mut AllocState, first: u64, end: u64) -> Result<()> {
        let geo = self.geometry;
        let first_table = geo.split(first).l1_index;
        let last_table = geo.split(end.saturating_sub(1).max(first)).l1_index;
        // Tables a reader loads meanwhile could push ours out before we publish into them.
        self.write_tables().unpin_all();
        for l1_index in first_table..=last_table {
            self.write_tables().pin(l1_index);
            let (state, generation) = {
                let tables = self.read_tables();
                (tables.table_state(l1_index)?, tables.generation())
            };
            match state {
                TableState::Loaded => {}
                TableState::OnDisk(host_offset) => {
                    let entries = Tables::read_l2(
                        &self.file,
                        geo,
                        &self.current_layout(),
                        l1_index,
                        host_offset,
                    )?;
                    // Only allocations change tables, and this one holds the mutex.
                    if !self
                        .write_tables()
                        .insert_l2(l1_index, host_offset, entries, generation)
                    {
                        return Err(Error::corrupt(
                            "internal: an L2 table changed under the allocation mutex",
                        ));
                    }
                }
                TableState::Absent => {
                    let host = alloc.next_free;
                    // A table shorter than a cluster still takes a whole one, as in QEMU, so
                    // clusters stay cluster aligned.
                    let space = geo
                        .l2_table_len()
                        .checked_next_multiple_of(geo.cluster_size())
                        .unwrap_or(u64::MAX);
                    let next_free = reserve(host, space)?;
                    self.write_tables().add_l2(l1_index, host)?;
                    self.spans
                        .write()
                        .unwrap_or_else(PoisonError::into_inner)
                        .add(host);
                    alloc.next_free = next_free;
                    self.end_of_data.fetch_max(next_free, Ordering::Release);
                }
            }
        }
        Ok(())
    }

    /// Writes fresh clusters from `host`: `payload` placed at guest `offset`, completed to
    /// whole clusters with what lies below. Full clusters go straight from `payload`; only
    /// partial ones are built in a cluster-sized buffer.
    fn write_new_clusters(&self, payload: &[u8], offset: u64, mut host: u64) -> Result<()> {
        let geo = self.geometry;
        let cluster = geo.cluster_size() as usize;
        let head = geo.split(offset).in_cluster as usize;
        let mut guest = geo.cluster_start(offset);
        let mut rest = payload;
        if head > 0 || rest.len() < cluster {
            let (now, later) = split_request(rest, (cluster - head).min(rest.len()))?;
            self.write_merged(now, head, guest, host)?;
            rest = later;
            guest += cluster as u64;
            host += cluster as u64;
        }
        let (full, tail) = split_request(rest, rest.len() / cluster * cluster)?;
        if !full.is_empty() {
            self.write_data(full, host, guest)?;
            host += full.len() as u64;
            guest += full.len() as u64;
        }
        if !tail.is_empty() {
            self.write_merged(tail, 0, guest, host)?;
        }
        Ok(())
    }

    /// Writes one new cluster at `host`: the layer below at guest cluster `guest`, with `part`
    /// stored `head` bytes in.
    fn write_merged(&self, part: &[u8], head: usize, guest: u64, host: u64) -> Result<()> {
        let mut cluster = vec![0u8; self.geometry.cluster_size() as usize];
        // Past the end of the disk the cluster stays zero, whatever the backing file holds.
        let inside = self
            .virtual_size()
            .saturating_sub(guest)
            .min(cluster.len() as u64) as usize;
        read_below(
            self.backing.as_ref(),
            cluster.get_mut(..inside).unwrap_or_default(),
            guest,
        )?;
        merge(&mut cluster, part, head)?;
        self.write_data(&cluster, host, guest)
    }

    fn flush_inner(&self) -> Result<()> {
        let alloc = self.lock_alloc();
        self.flush_locked(&alloc)
    }

    /// The write-back of `flush_inner`, for a caller holding the allocation mutex (`_held`
    /// proves it), so no allocation dirties a table between the snapshot and marking clean.
    fn flush_locked(&self, _held: &AllocState) -> Result<()> {
        let (l2_pieces, l1_pieces) = {
            let tables = self.read_tables();
            (tables.dirty_l2(), tables.dirty_l1())
        };
        self.file.sync_data()?;
        if l2_pieces.is_empty() && l1_pieces.is_empty() {
            return Ok(());
        }
        for (at, bytes) in &l2_pieces {
            self.file.write_all_at(bytes, *at)?;
        }
        if !l1_pieces.is_empty() {
            // New L2 tables must be durable before an L1 entry points at them.
            self.file.sync_data()?;
            for (at, bytes) in &l1_pieces {
                self.file.write_all_at(bytes, *at)?;
            }
        }
        self.file.sync_data()?;
        self.write_tables().mark_clean();
        Ok(())
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        for run in self.lookup(offset, len)? {
            match run.kind {
                RunKind::Data { host_offset } => {
                    push_stored(&mut extents, &self.file, run.offset, host_offset, run.len)?
                }
                RunKind::Compressed { .. } => push_extent(
                    &mut extents,
                    Extent {
                        offset: run.offset,
                        len: run.len,
                        state: ExtentState::Data,
                        layer: 0,
                        host: None,
                    },
                ),
                RunKind::Unallocated => {
                    for extent in status_below(self.backing.as_ref(), run.offset, run.len)? {
                        push_extent(&mut extents, extent);
                    }
                }
            }
        }
        Ok(extents)
    }
}

/// The end of `len` bytes reserved at `host`, refusing a file offset that overflows.
fn reserve(host: u64, len: u64) -> Result<u64> {
    host.checked_add(len)
        .filter(|&end| end <= i64::MAX as u64)
        .ok_or_else(|| {
            Error::io(
                format!("no room to allocate {len} bytes at file offset {host:#x}"),
                std::io::Error::from_raw_os_error(libc::EFBIG),
            )
        })
}

/// Stores `part` into `cluster` at `head`.
fn merge(cluster: &mut [u8], part: &[u8], head: usize) -> Result<()> {
    head.checked_add(part.len())
        .and_then(|end| cluster.get_mut(head..end))
        .ok_or_else(|| Error::out_of_range("internal: merge outside the cluster"))?
        .copy_from_slice(part);
    Ok(())
}

impl Image for QcowImage {
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
        !self.write_back.is_stopped() && self.read_tables().is_dirty()
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

    /// Discarded clusters stay mapped with their host range punched, so the host file's own
    /// count, less the metadata, is the smaller one after a discard.
    fn allocated_bytes(&self) -> u64 {
        let data = self.data_bytes.load(Ordering::Relaxed);
        // Everything in the file that is not data is metadata, which is never punched.
        let metadata = self
            .end_of_data
            .load(Ordering::Acquire)
            .saturating_sub(data);
        data.min(self.file.allocated_bytes().saturating_sub(metadata))
    }

    fn read_only_reason(&self) -> Option<String> {
        self.write_back.reason_after(&self.read_only_reason)
    }

    fn info(&self) -> ImageInfo {
        let h = &self.header;
        let mut details = Vec::new();
        if let Some(name) = h.backing_file() {
            details.push(("backing file", name.to_string_lossy().into_owned()));
        }
        if let Some(backing) = &self.backing {
            details.push(("backing path", backing.path.display().to_string()));
        }
        details.extend([
            ("l1_table_offset", format!("{:#x}", h.l1_table_offset)),
            ("l1 entries", self.read_tables().l1().len().to_string()),
            ("l2 entries", self.geometry.l2_entries().to_string()),
            ("l2 tables", self.read_tables().l2_tables().to_string()),
        ]);
        if h.mtime != 0 {
            details.push(("mtime", h.mtime.to_string()));
        }
        ImageInfo {
            format: "qcow",
            subformat: String::new(),
            virtual_size: self.virtual_size(),
            cluster_size: Some(self.geometry.cluster_size()),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details,
        }
    }
}
