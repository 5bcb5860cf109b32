//! QEMU qcow2 images (version 2, "compat 0.10", and version 3, "compat 1.1"), served as a raw
//! disk, with their internal snapshots as read-only views.
//!
//! # On-disk layout (all big-endian)
//!
//! ```text
//! cluster 0        header (header.rs), extensions, backing file name
//! l1_table_offset  L1 table: l1_size u64 entries, each the offset of an L2 table (or 0)
//! L2 tables        one cluster each: cluster_size / 8 entries (cluster_size / 16 with
//!                  extended L2), each describing one guest cluster (cluster.rs)
//! refcount table   refcount_table_clusters clusters of u64 refcount block offsets
//! refcount blocks  one cluster each: refcounts of 2^refcount_order bits per host cluster
//! snapshots_offset snapshot table (snapshot.rs), each entry with its own L1 table
//! data clusters    anywhere after the header, in the image or in an external data file
//! ```
//!
//! Opening reads the header, the active L1 table and the snapshot table, nothing else: L2
//! tables are read on demand, 4 KiB slices at a time, into a bounded LRU cache keyed by host
//! offset, so a 1 TiB image opens in milliseconds. Refcounts are not read at all until writes
//! need them.
//!
//! # Reading
//!
//! A request is first turned into runs (`cluster::Run`) of one mapping each: data at a host
//! offset (neighbours that are contiguous in the host file merged into one read), zeros,
//! unallocated (read from the backing image, or zeros), or part of a compressed cluster.
//! Then the runs are read with no lock held, so requests proceed in parallel.
//!
//! With an external data file, data clusters are read from it at the L2 entry's offset (the
//! guest offset, per the spec). Unallocated clusters read from the backing image or as zeros
//! even when the data file is marked raw, as the spec's read rule and QEMU do: the raw bit
//! only promises that the data file agrees, which QEMU keeps true by writing zeros there.
//!
//! # Writes (write.rs, alloc.rs, rebuild.rs)
//!
//! A write to a cluster that is the active image's own (COPIED set in its L1 and L2 entries,
//! for extended L2 every touched subcluster allocated) goes straight to the host cluster with
//! no metadata lock held. Everything else takes the allocation mutex, looks the cluster up
//! again, and allocates: new L2 tables, copies of L2 tables shared with snapshots, new data
//! clusters completed from the backing file, zeros, the old shared cluster or the inflated
//! compressed one. Data is written before its entry is published; dropped references are
//! applied only after the entries that dropped them are on disk. The first write of an open
//! clears the autoclear bits imgfs does not maintain and rebuilds dirty (lazy) refcounts;
//! opening never modifies the file. imgfs never uses lazy refcounts itself.
//!
//! Discard (discard.rs) makes whole clusters unallocated, or zero clusters over a backing
//! file; their data clusters are dropped like any replaced cluster and punched once their
//! refcount reaches 0 in the flush. Partial clusters are written with zeros.
//!
//! Resize (resize.rs) grows the disk where the L1 table's clusters have room: new entries
//! zeroed, then `l1_size`, then `size`, each synced.
//!
//! Flush order (alloc.rs): data sync -> refcount blocks -> sync -> refcount table -> sync ->
//! header (when the table moved) -> sync -> L2 slices -> sync -> L1 -> sync -> dropped
//! references applied -> refcount blocks -> sync. A crash can leak clusters but never leave an
//! entry pointing at unwritten data or a refcount below the references on disk. Write-back
//! also runs from the write path when dirty tables keep a cache over its capacity.
//!
//! # Failures
//!
//! A failed write of a new data cluster or L2 table fails only its request: the entry that
//! would name it is set only after the write, so the cluster merely leaks (its refcount was
//! set first). Any failure of a flush, of the first write's header changes, or of laying out
//! a larger refcount table (whose new location is in memory before its blocks are written)
//! stops the image (`meta::write_back`): it is served read-only with the reason in `info`,
//! and every later flush fails, since what was written since the last successful one may be
//! lost. The file is left as a crash at that step would leave it.
//!
//! # Locks (taken in this order, never the reverse)
//!
//! 1. `alloc` (Mutex, shared): allocation, refcounts, flush, the first write's preparation.
//!    Held across the data write of a new cluster and the copy-on-write merge, so concurrent
//!    partial writes into one cluster never lose each other's bytes.
//! 2. `io_gate` (RwLock, shared): read-held by reads and in-place writes across lookup and
//!    I/O (never while waiting for `alloc`); write-taken by a flush, after dropping references,
//!    so a freed cluster is reused only once no I/O looked it up before.
//! 3. `l1` (RwLock, per view): the L1 table. Read-locked for one entry at a time, write-locked
//!    by the allocator to publish a new L2 table.
//! 4. The table caches' internal mutexes: held only to look up or insert a table; tables are
//!    read from the file outside them.
//! 5. `last_compressed` (Mutex): the most recently decompressed cluster; held for a swap only.

mod alloc;
mod check;
mod cluster;
mod counts;
pub mod create;
mod crypt;
mod details;
mod discard;
mod guard;
mod header;
mod rebuild;
mod refcount;
mod resize;
mod snapshot;
mod write;

#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::format::backing::{read_below, status_below, Backing};
use crate::host::HostFile;
use crate::image::{
    check_range, push_extent, Extent, ExtentState, Image, ImageInfo, SnapshotEntry,
};
use crate::meta::compress::{inflate, zstd_frame, Deflate, LastInflated};
use crate::meta::table_cache::TableCache;
use crate::meta::write_back::WriteBack;

use alloc::AllocState;
use cluster::{push_run, Geometry, Mapping, Run, OFFSET_MASK};
use refcount::Refcounts;

pub use check::check;
pub use header::{CompressionType, FeatureKind, Qcow2Header};
pub use snapshot::SnapshotInfo;

/// The unit in which L2 tables are read and cached; a 2 MiB cluster's L2 table is not read
/// whole for one lookup.
const L2_SLICE_BYTES: u64 = 4096;
/// Default budget of the L2 cache; 4 MiB of slices maps 32 GiB of guest disk at 64 KiB
/// clusters.
const L2_CACHE_BYTES: u64 = 4 << 20;
/// Refcount blocks cover clusters of the host file, far more per block than an L2 slice maps.
const REFCOUNT_CACHE_BYTES: u64 = 1 << 20;
const CORRUPT_REASON: &str = "the image is marked corrupt";
const SNAPSHOT_REASON: &str = "internal snapshots are served read-only";

/// One cached slice of an L2 table, decoded to native u64 words.
struct L2Slice {
    words: Vec<u64>,
}

/// What the active image and its snapshot views share.
struct Shared {
    file: HostFile,
    /// Shared with the kernel when it reads the raw data file itself (`raw_file`).
    data_file: Option<Arc<HostFile>>,
    header: Qcow2Header,
    geometry: Geometry,
    slice_bytes: u64,
    l2_cache: TableCache<L2Slice>,
    backing: Option<Backing>,
    snapshots: Vec<SnapshotInfo>,
    /// The file name each snapshot is served under (`snapshot::file_names`), and the reverse.
    snapshot_files: Vec<String>,
    snapshot_by_file: std::collections::HashMap<String, usize>,
    /// Bytes of the snapshot table (counted when refcounts are rebuilt).
    snapshot_table_len: u64,
    /// The allocator, refcounts and write-back state (alloc.rs).
    alloc: Mutex<AllocState>,
    /// Held shared by reads and in-place writes across lookup and I/O; taken exclusively (and
    /// released at once) before freed clusters can be reused, so no I/O still in flight uses a
    /// cluster that was handed out again.
    io_gate: RwLock<()>,
    /// The first write's preparation is done (a fast path around the allocation mutex).
    prepared: AtomicBool,
    /// Clusters holding metadata (guard.rs), which no allocation hands out and no data write
    /// goes over. Taken after the allocation mutex, never before it.
    guard: RwLock<guard::MetadataGuard>,
    /// The live refcount table's (offset, clusters), for checks made without the allocation
    /// mutex; set by the allocator whenever the table moves.
    refcount_table_at: (AtomicU64, AtomicU64),
    /// The image file's length as last seen; refreshed before calling an offset past it
    /// corrupt, since the file only grows.
    file_len: AtomicU64,
    /// The most recently decompressed cluster (host offset, bytes): small sequential reads
    /// through a compressed cluster decompress it once.
    last_compressed: LastInflated,
    /// Stopped by a failed write-back (the active image's writes, flushes and reason).
    write_back: WriteBack,
    /// The cipher of an encrypted image's data clusters (crypt.rs).
    cipher: Option<crate::format::encrypted::DataCipher>,
}

/// What `Qcow2Image::open` is given.
struct OpenParts {
    file: HostFile,
    header: Qcow2Header,
    data_file: Option<HostFile>,
    backing: Option<Backing>,
    read_only_reason: Option<String>,
}

/// An open qcow2 image: the active disk, or a read-only view of one internal snapshot.
pub struct Qcow2Image {
    shared: Arc<Shared>,
    l1: RwLock<Vec<u64>>,
    /// Where the L1 table is; moves when a resize needs a larger one (resize.rs).
    l1_table_offset: AtomicU64,
    /// The virtual size; grows with `resize` (resize.rs).
    size: AtomicU64,
    /// The snapshot this view shows, `None` for the active disk.
    snapshot: Option<usize>,
    read_only_reason: Option<String>,
}

impl Qcow2Image {
    /// Opens the image in `file` described by `header` (from `Qcow2Header::read` on the same
    /// file). `data_file` is the opened external data file when the header names one;
    /// `backing` the opened backing image; `read_only_reason` is set when the caller serves
    /// the image read-only.
    pub fn open(
        file: HostFile,
        header: Qcow2Header,
        data_file: Option<HostFile>,
        backing: Option<Backing>,
        read_only_reason: Option<String>,
    ) -> Result<Qcow2Image> {
        let path = file.path().to_path_buf();
        let parts = OpenParts {
            file,
            header,
            data_file,
            backing,
            read_only_reason,
        };
        Self::open_parts(parts, L2_CACHE_BYTES).map_err(|e| e.with_path(&path))
    }

    /// Opens with an L2 cache of `l2_cache_bytes` (at least one slice).
    fn open_parts(parts: OpenParts, l2_cache_bytes: u64) -> Result<Qcow2Image> {
        let OpenParts {
            file,
            header,
            data_file,
            backing,
            read_only_reason,
        } = parts;
        match (header.has_data_file(), &data_file) {
            (true, None) => {
                return Err(Error::unsupported(
                    "the image keeps its data in an external data file, which was not opened",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::out_of_range(
                    "an external data file was given for an image without one",
                ))
            }
            _ => {}
        }
        let file_len = file.len()?;
        let cipher = crypt::data_cipher(&file, &header)?;
        let l1 = read_l1(&file, header.l1_table_offset, header.l1_size)?;
        let (snapshots, snapshot_table_len) = snapshot::read_table(
            &file,
            header.snapshots_offset,
            header.nb_snapshots,
            file_len,
            header.size,
        )?;
        let geometry = Geometry {
            cluster_bits: header.cluster_bits,
            l2_bits: header.l2_bits(),
            extended_l2: header.extended_l2(),
            zero_flag_allowed: header.version >= 3,
            external_data: header.has_data_file(),
        };
        let slice_bytes = L2_SLICE_BYTES.min(header.cluster_size());
        if header.is_dirty() {
            log::info!(
                "{}: refcounts are dirty (lazy refcounts); they will be rebuilt before a write",
                file.path().display()
            );
        }
        let mut reasons = Vec::new();
        if header.is_corrupt() {
            log::warn!("{}: {CORRUPT_REASON}", file.path().display());
            reasons.push(CORRUPT_REASON.to_string());
        }
        match read_only_reason {
            Some(reason) => reasons.push(reason),
            None if !file.is_writable() => {
                reasons.push("the image file is opened read-only".to_string())
            }
            None => {}
        }
        if data_file.as_ref().is_some_and(|f| !f.is_writable()) && reasons.is_empty() {
            reasons.push("the external data file is opened read-only".to_string());
        }
        let refcounts = Refcounts::new(
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            (REFCOUNT_CACHE_BYTES >> header.cluster_bits).max(4) as usize,
        );
        let alloc = AllocState::new(
            refcounts,
            l1.len(),
            header.incompatible_features,
            header.autoclear_features,
        );
        let snapshot_files = snapshot::file_names(&snapshots);
        let shared = Shared {
            alloc: Mutex::new(alloc),
            io_gate: RwLock::new(()),
            guard: RwLock::default(),
            prepared: AtomicBool::new(false),
            refcount_table_at: (
                AtomicU64::new(header.refcount_table_offset),
                AtomicU64::new(u64::from(header.refcount_table_clusters)),
            ),
            snapshot_table_len,
            data_file: data_file.map(Arc::new),
            geometry,
            slice_bytes,
            l2_cache: TableCache::new((l2_cache_bytes / slice_bytes) as usize),
            backing,
            snapshot_by_file: snapshot_files
                .iter()
                .enumerate()
                .map(|(index, name)| (name.clone(), index))
                .collect(),
            snapshot_files,
            snapshots,
            file_len: AtomicU64::new(file_len),
            last_compressed: LastInflated::default(),
            write_back: WriteBack::new(),
            cipher,
            file,
            header,
        };
        Ok(Qcow2Image {
            l1: RwLock::new(l1),
            l1_table_offset: AtomicU64::new(shared.header.l1_table_offset),
            size: AtomicU64::new(shared.header.size),
            snapshot: None,
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            shared: Arc::new(shared),
        })
    }

    /// The virtual size now (it grows with `resize`).
    fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Where the active L1 table is now (a resize may move it).
    fn l1_offset(&self) -> u64 {
        self.l1_table_offset.load(Ordering::Acquire)
    }

    pub fn header(&self) -> &Qcow2Header {
        &self.shared.header
    }

    /// The image's internal snapshots, in table order.
    pub fn snapshots(&self) -> &[SnapshotInfo] {
        &self.shared.snapshots
    }

    /// The refcount of the host cluster holding image file offset `host_offset` (0 for clusters
    /// no refcount block covers). Reads the refcount table on first use.
    pub fn refcount(&self, host_offset: u64) -> Result<u64> {
        let shared = &self.shared;
        let cluster = host_offset >> shared.geometry.cluster_bits;
        self.lock_alloc()
            .refcounts
            .get(&shared.file, cluster)
            .map_err(|e| e.with_path(shared.file.path()))
    }

    /// Whether `offset` lies inside the image file, re-checking its length before saying no.
    fn inside_file(&self, offset: u64) -> Result<bool> {
        let file_len = &self.shared.file_len;
        if offset < file_len.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let now = self.shared.file.len()?;
        file_len.fetch_max(now, Ordering::Relaxed);
        Ok(offset < now)
    }

    /// The L2 table offset of L1 entry `l1_index`, `None` where no L2 table is allocated
    /// (including indices past the end of a snapshot's shorter L1 table).
    /// The entries of the L1 table.
    fn l1_len(&self) -> usize {
        self.l1.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn l2_table_offset(&self, l1_index: u64) -> Result<Option<u64>> {
        let entry = {
            let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
            usize::try_from(l1_index)
                .ok()
                .and_then(|i| l1.get(i).copied())
                .unwrap_or(0)
        };
        let offset = entry & OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        let entry_at = self.l1_offset().saturating_add(l1_index.saturating_mul(8));
        if offset % self.shared.geometry.cluster_size() != 0 {
            return Err(Error::corrupt(format!(
                "L1 entry {l1_index} points to an L2 table at {offset:#x}, not cluster aligned"
            ))
            .at_offset(entry_at));
        }
        if !self.inside_file(offset)? {
            return Err(Error::corrupt(format!(
                "L1 entry {l1_index} points to an L2 table at {offset:#x}, past the end of the \
                 file"
            ))
            .at_offset(entry_at));
        }
        Ok(Some(offset))
    }

    /// The cached L2 slice starting at host offset `key`.
    fn l2_slice(&self, key: u64) -> Result<Arc<L2Slice>> {
        let shared = &self.shared;
        shared.l2_cache.get_or_load(key, || {
            let mut bytes = vec![0u8; shared.slice_bytes as usize];
            shared.file.read_exact_at(&mut bytes, key)?;
            let words = bytes
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
                .collect();
            Ok(L2Slice { words })
        })
    }

    /// Describes `[offset, offset + len)` as runs of one mapping each.
    fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let geo = self.shared.geometry;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} overflows")))?;
        let mut runs = Vec::new();
        let mut current: Option<(u64, Arc<L2Slice>)> = None;
        let mut pos = offset;
        while pos < end {
            let at = geo.split(pos);
            let run = match self.l2_table_offset(at.l1_index)? {
                None => {
                    // Past the L1 table nothing is allocated: one run to the end, so that a
                    // disk far larger than its table (a hostile snapshot) costs nothing.
                    let past_table = at.l1_index >= self.l1_len() as u64;
                    let table_end = (at.l1_index + 1)
                        .checked_shl(geo.l2_coverage_bits())
                        .filter(|&e| e > pos && !past_table)
                        .unwrap_or(end);
                    Run {
                        offset: pos,
                        len: table_end.min(end) - pos,
                        mapping: Mapping::Unallocated,
                    }
                }
                Some(l2_offset) => {
                    let entry_bytes = at.l2_index * geo.entry_words() as u64 * 8;
                    let slice_bytes = self.shared.slice_bytes;
                    let key = l2_offset + entry_bytes / slice_bytes * slice_bytes;
                    let slice = match current.take() {
                        Some((k, slice)) if k == key => slice,
                        _ => self.l2_slice(key)?,
                    };
                    let word = (entry_bytes % slice_bytes / 8) as usize;
                    let entry_at = key + word as u64 * 8;
                    let entry = slice.words.get(word).copied().unwrap_or(0);
                    let bitmap = if geo.extended_l2 {
                        slice.words.get(word + 1).copied().unwrap_or(0)
                    } else {
                        0
                    };
                    current = Some((key, slice));
                    let desc = geo
                        .decode(entry, bitmap)
                        .map_err(|e| e.at_offset(entry_at))?;
                    let (mapping, len) = geo.span(desc, at.in_cluster, end - pos);
                    self.check_mapping(&mapping, entry_at)?;
                    Run {
                        offset: pos,
                        len,
                        mapping,
                    }
                }
            };
            pos += run.len;
            push_run(&mut runs, run);
        }
        Ok(runs)
    }

    /// Refuses mappings into the image file that point past its end.
    fn check_mapping(&self, mapping: &Mapping, entry_at: u64) -> Result<()> {
        let host = match *mapping {
            Mapping::Data { host_offset } if self.shared.data_file.is_none() => host_offset,
            Mapping::Compressed { host_offset, .. } => host_offset,
            _ => return Ok(()),
        };
        if self.inside_file(host)? {
            return Ok(());
        }
        Err(Error::corrupt(format!(
            "L2 entry points to host offset {host:#x}, past the end of the file"
        ))
        .at_offset(entry_at))
    }

    fn read_inner(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.virtual_size(), offset, buf.len())?;
        let _gate = self
            .shared
            .io_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        for run in self.lookup(offset, buf.len() as u64)? {
            let start = (run.offset - offset) as usize;
            let part = start
                .checked_add(run.len as usize)
                .and_then(|end| buf.get_mut(start..end))
                .ok_or_else(|| {
                    Error::out_of_range(format!("internal: run {run:?} outside the request"))
                })?;
            match run.mapping {
                Mapping::Unallocated => read_below(self.shared.backing.as_ref(), part, run.offset)?,
                Mapping::Zero => part.fill(0),
                Mapping::Data { host_offset } => self.read_data(part, host_offset, run.offset)?,
                Mapping::Compressed {
                    host_offset,
                    len,
                    in_cluster,
                } => self.read_compressed(host_offset, len, in_cluster, part)?,
            }
        }
        Ok(())
    }

    /// The file guest data clusters live in.
    fn data_file(&self) -> &HostFile {
        self.shared
            .data_file
            .as_deref()
            .unwrap_or(&self.shared.file)
    }

    /// Fills `part` from `in_cluster` on of the compressed cluster at `host_offset`.
    fn read_compressed(
        &self,
        host_offset: u64,
        len: u64,
        in_cluster: u64,
        part: &mut [u8],
    ) -> Result<()> {
        let cluster = self.decompressed(host_offset, len)?;
        let start = in_cluster as usize;
        let bytes = start
            .checked_add(part.len())
            .and_then(|end| cluster.get(start..end))
            .ok_or_else(|| Error::out_of_range("internal: read outside a compressed cluster"))?;
        part.copy_from_slice(bytes);
        Ok(())
    }

    fn decompressed(&self, host_offset: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        let shared = &self.shared;
        shared.last_compressed.get_or_inflate(host_offset, || {
            // len is at most 8192 sectors (4 MiB), bounded by the descriptor's field width.
            let mut input = vec![0u8; len as usize];
            shared.file.read_exact_at(&mut input, host_offset)?;
            let cluster_len = shared.geometry.cluster_size() as usize;
            let mut cluster = vec![0u8; cluster_len];
            let decoded = match shared.header.compression_type {
                CompressionType::Zlib => {
                    inflate(&input, &mut cluster, Deflate::Raw, cluster_len).map(|_| ())
                }
                CompressionType::Zstd => zstd_frame(&input, &mut cluster),
            };
            decoded.map_err(|e| e.context("compressed cluster").at_offset(host_offset))?;
            Ok(cluster)
        })
    }

    fn block_status_inner(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.virtual_size().saturating_sub(offset));
        let mut extents = Vec::new();
        if len == 0 {
            return Ok(extents);
        }
        for run in self.lookup(offset, len)? {
            let (state, host) = match run.mapping {
                Mapping::Unallocated => {
                    let below = status_below(self.shared.backing.as_ref(), run.offset, run.len)?;
                    for extent in below {
                        push_extent(&mut extents, extent);
                    }
                    continue;
                }
                Mapping::Zero => (ExtentState::Zero, None),
                Mapping::Data { host_offset } => (ExtentState::Data, Some(host_offset)),
                Mapping::Compressed { .. } => (ExtentState::Data, None),
            };
            push_extent(
                &mut extents,
                Extent {
                    offset: run.offset,
                    len: run.len,
                    state,
                    layer: 0,
                    host,
                },
            );
        }
        Ok(extents)
    }
}

/// Reads an L1 table of `entries` u64s at `offset`; the caller has bounded `entries`.
fn read_l1(file: &HostFile, offset: u64, entries: u32) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; entries as usize * 8];
    if !bytes.is_empty() {
        file.read_exact_at(&mut bytes, offset)?;
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
        .collect())
}

impl Image for Qcow2Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    /// Writes back what writes through the active image changed; a snapshot view has nothing
    /// of its own to write.
    fn flush(&self) -> Result<()> {
        if self.snapshot.is_some() || self.read_only_reason.is_some() {
            return Ok(());
        }
        let mut alloc = self.lock_alloc();
        self.flush_locked(&mut alloc)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    fn is_dirty(&self) -> bool {
        if self.snapshot.is_some() || self.shared.write_back.is_stopped() {
            return false;
        }
        let busy = match self.shared.alloc.try_lock() {
            Ok(alloc) => alloc.is_dirty(),
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner().is_dirty(),
            // Someone is allocating or flushing: there is, or is about to be, work.
            Err(std::sync::TryLockError::WouldBlock) => true,
        };
        busy || self.shared.l2_cache.is_dirty()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.block_status_inner(offset, len)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.discard_inner(offset, len)
            .and_then(|()| self.data_file().sync_data())
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        self.resize_inner(new_size)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    /// The host blocks of the image file (and its data file), metadata included: counting
    /// guest clusters exactly would mean reading every L2 table.
    fn allocated_bytes(&self) -> u64 {
        let data = self.shared.data_file.as_ref();
        self.shared.file.allocated_bytes() + data.map_or(0, |f| f.allocated_bytes())
    }

    fn read_only_reason(&self) -> Option<String> {
        self.shared.write_back.reason_after(&self.read_only_reason)
    }

    /// A raw external data file ("can be read as a consistent standalone raw image without
    /// looking at the qcow2 metadata", as the spec says; imgfs keeps it so by writing guest
    /// data at guest offsets) of exactly the disk's length, for the active disk when no
    /// backing file supplies what it has not allocated.
    fn raw_file(&self) -> Option<Arc<HostFile>> {
        let data = self.shared.data_file.as_ref()?;
        let whole = self.snapshot.is_none()
            && self.shared.backing.is_none()
            && self.shared.header.data_file_raw()
            && data.len().is_ok_and(|len| len == self.virtual_size());
        whole.then(|| Arc::clone(data))
    }

    /// Snapshots are listed from the active disk only; a snapshot view has none of its own.
    fn snapshot_names(&self) -> Vec<String> {
        match self.snapshot {
            None => self.shared.snapshot_files.clone(),
            Some(_) => Vec::new(),
        }
    }

    fn snapshot(&self, name: &str) -> Result<Arc<dyn Image>> {
        let index = self
            .shared
            .snapshot_by_file
            .get(name)
            .filter(|_| self.snapshot.is_none())
            .ok_or_else(|| Error::out_of_range(format!("no internal snapshot called {name:?}")))?;
        Ok(Arc::new(self.snapshot_image(*index)?))
    }

    /// From the snapshot table alone: opening each view would read every snapshot's L1 table.
    fn snapshot_entries(&self) -> Vec<SnapshotEntry> {
        let names = self.snapshot_names();
        let allocated = self.allocated_bytes();
        names
            .into_iter()
            .enumerate()
            .filter(|(index, _)| self.check_snapshot(*index).is_ok())
            .filter_map(|(index, name)| {
                Some(SnapshotEntry {
                    size: self.shared.snapshots.get(index)?.disk_size,
                    allocated,
                    name,
                })
            })
            .collect()
    }

    fn info(&self) -> ImageInfo {
        let h = &self.shared.header;
        let compat = if h.version >= 3 {
            "compat 1.1"
        } else {
            "compat 0.10"
        };
        ImageInfo {
            format: "qcow2",
            subformat: compat.to_string(),
            virtual_size: self.virtual_size(),
            cluster_size: Some(h.cluster_size()),
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason(),
            details: self.details(),
        }
    }
}
