//! A hosted sparse extent (KDMV): lookups through the grain directory and grain tables, reads
//! of plain, zeroed and compressed grains, and allocation of grains (and grain tables) at the
//! end of the file, written back in the safe order on flush. See the module doc of `vmdk` for
//! the layout, write order and lock order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{request_part, request_part_mut, split_aligned};
use crate::meta::budget::TableBudget;
use crate::meta::compress::{inflate, Deflate, LastInflated};
use crate::meta::table_cache::TableCache;
use crate::meta::write_back::WriteBack;

use super::descriptor::SECTOR_SIZE;
use super::header::{SparseHeader, SparseKind};
use super::tables::{to_sector, Directory, Grain, GrainTable, Layout, GTE_ZEROED};

/// Budget of the grain table cache of one extent: 2 MiB of 2 KiB tables maps 64 GiB of disk at
/// 64 KiB grains.
const GT_CACHE_BYTES: u64 = 2 << 20;
/// Grain marker: lba u64, size u32, then the zlib stream.
const MARKER_LEN: u64 = 12;

/// Fills a buffer with what lies below the extent at an extent-relative offset.
pub type Below<'a> = &'a dyn Fn(&mut [u8], u64) -> Result<()>;

/// Pieces of a table to write back: (file offset, bytes).
type Pieces = Vec<(u64, Vec<u8>)>;

/// A run of the extent with one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub grain: Grain,
}

struct AllocState {
    /// Where the next grain table or grain goes, grain aligned.
    next_free: u64,
}

/// An open hosted sparse extent.
pub struct SparseExtent {
    file: Arc<HostFile>,
    pub header: SparseHeader,
    layout: Layout,
    /// Bytes of the extent served (the descriptor's size for it, at most the capacity).
    size: u64,
    directory: RwLock<Directory>,
    tables: TableCache<GrainTable>,
    alloc: Mutex<AllocState>,
    /// The file's length as far as we know it: grain tables loaded later are checked against it.
    file_len: AtomicU64,
    /// Bytes of grains allocated by this session.
    allocated: AtomicU64,
    /// The last inflated compressed grain, by its file offset.
    inflated: LastInflated,
    /// Why this extent cannot be written, if it cannot.
    pub read_only_reason: Option<String>,
}

impl SparseExtent {
    /// Opens the sparse extent in `file` with header `header`, serving its first `sectors`.
    /// Its grain directories count against the image's `budget`.
    pub fn open(
        file: Arc<HostFile>,
        header: SparseHeader,
        sectors: u64,
        budget: &mut TableBudget,
    ) -> Result<SparseExtent> {
        if sectors > header.capacity {
            return Err(Error::corrupt(format!(
                "the descriptor gives the sparse extent {sectors} sectors, its header's \
                 capacity is only {}",
                header.capacity
            )));
        }
        let file_len = file.len()?;
        let layout = Layout::new(&header);
        let directory = Directory::read(&file, &header, &layout, file_len, budget)?;
        let mut reasons = Vec::new();
        if header.kind == SparseKind::Cowd {
            reasons.push("VMDK3 / vmfsSparse (COWD) extents are served read-only".to_string());
        } else if let SparseKind::SeSparse { .. } = header.kind {
            reasons.push("seSparse extents are served read-only".to_string());
        } else if header.compressed() {
            reasons.push(
                "streamOptimized extents (compressed grains) are served read-only".to_string(),
            );
        } else if header.version == 3 {
            reasons.push(
                "version 3 sparse extents (changed block tracking) are served read-only, as \
                 QEMU does"
                    .to_string(),
            );
        }
        if let Some(overlap) = directory.overlap.clone() {
            log::warn!("{}: {overlap}; serving it read-only", file.path().display());
            reasons.push(overlap);
        }
        let grain = layout.grain_bytes;
        let next_free = file_len
            .checked_next_multiple_of(grain)
            .ok_or_else(|| Error::corrupt(format!("file length {file_len} overflows")))?;
        let capacity = (GT_CACHE_BYTES / layout.gt_bytes.max(1)) as usize;
        Ok(SparseExtent {
            size: sectors * SECTOR_SIZE,
            tables: TableCache::new(capacity),
            directory: RwLock::new(directory),
            alloc: Mutex::new(AllocState { next_free }),
            file_len: AtomicU64::new(file_len),
            allocated: AtomicU64::new(
                file_len.saturating_sub(header.overhead.saturating_mul(SECTOR_SIZE)),
            ),
            inflated: LastInflated::default(),
            read_only_reason: (!reasons.is_empty()).then(|| reasons.join("; ")),
            layout,
            header,
            file,
        })
    }

    pub fn file(&self) -> &Arc<HostFile> {
        &self.file
    }

    pub fn grain_bytes(&self) -> u64 {
        self.layout.grain_bytes
    }

    pub fn allocated_bytes(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn table_count(&self) -> usize {
        self.read_directory().tables()
    }

    // Poisoning is ignored: the guarded updates are single assignments, and `next_free` only
    // moves forward.
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.alloc.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn read_directory(&self) -> RwLockReadGuard<'_, Directory> {
        self.directory
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn write_directory(&self) -> RwLockWriteGuard<'_, Directory> {
        self.directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The grain table of directory entry `index`, `None` when there is none.
    fn table(&self, index: u64) -> Result<Option<Arc<GrainTable>>> {
        let Some(at) = self.read_directory().table_at(index)? else {
            return Ok(None);
        };
        let file_len = self.file_len.load(Ordering::Acquire);
        self.tables
            .get_or_load(at, || {
                GrainTable::read(&self.file, &self.layout, index, at, file_len)
            })
            .map(Some)
    }

    /// Describes `[offset, offset + len)` of the extent as runs.
    pub fn lookup(&self, offset: u64, len: u64) -> Result<Vec<Run>> {
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| Error::out_of_range("internal: lookup beyond the sparse extent"))?;
        let grain = self.layout.grain_bytes;
        let per_table = u64::from(self.header.gtes_per_gt);
        let mut runs: Vec<Run> = Vec::new();
        let mut at = offset;
        while at < end {
            let grain_index = at / grain;
            let table_index = grain_index / per_table;
            let (kind, piece) = match self.table(table_index)? {
                None => {
                    let table_end = (table_index + 1) * per_table * grain;
                    (Grain::Unallocated, table_end - at)
                }
                Some(table) => {
                    let raw = table
                        .entries
                        .get((grain_index % per_table) as usize)
                        .copied()
                        .unwrap_or(0);
                    let in_grain = at % grain;
                    let kind = match self.layout.decode(raw) {
                        Grain::Data(host) => Grain::Data(host + in_grain),
                        other => other,
                    };
                    (kind, grain - in_grain)
                }
            };
            let piece = piece.min(end - at);
            push_run(
                &mut runs,
                Run {
                    offset: at,
                    len: piece,
                    grain: kind,
                },
            );
            at += piece;
        }
        Ok(runs)
    }

    /// Fills `buf` from extent offset `offset`.
    pub fn read(&self, buf: &mut [u8], offset: u64, below: Below) -> Result<()> {
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = request_part_mut(buf, offset, run.offset, run.len)?;
            match run.grain {
                Grain::Data(host) => self.file.read_exact_at(part, host)?,
                Grain::Zero => part.fill(0),
                Grain::Unallocated => below(part, run.offset)?,
                Grain::Compressed(at) => {
                    let data = self.inflate(at, run.offset / self.layout.grain_bytes)?;
                    let start = (run.offset % self.layout.grain_bytes) as usize;
                    let src = start
                        .checked_add(part.len())
                        .and_then(|end| data.get(start..end))
                        .ok_or_else(|| Error::out_of_range("internal: read past a grain"))?;
                    part.copy_from_slice(src);
                }
            }
        }
        Ok(())
    }

    /// The whole inflated grain number `grain_index` whose marker (or stream) is at `at`.
    fn inflate(&self, at: u64, grain_index: u64) -> Result<Arc<Vec<u8>>> {
        self.inflated
            .get_or_inflate(at, || self.inflate_uncached(at, grain_index))
    }

    fn inflate_uncached(&self, at: u64, grain_index: u64) -> Result<Vec<u8>> {
        let grain = self.layout.grain_bytes;
        let file_len = self.file_len.load(Ordering::Acquire);
        let (data_at, len) = if self.header.has_markers() {
            let mut marker = [0u8; MARKER_LEN as usize];
            self.file.read_exact_at(&mut marker, at)?;
            let size = u64::from(u32::from_le_bytes([
                marker[8], marker[9], marker[10], marker[11],
            ]));
            if size == 0 || size > 2 * grain {
                return Err(Error::corrupt(format!(
                    "the VMDK grain marker of grain {grain_index} gives {size} compressed bytes, \
                     outside 1..={}",
                    2 * grain
                ))
                .at_offset(at));
            }
            (at + MARKER_LEN, size)
        } else {
            (at, grain.min(file_len.saturating_sub(at)))
        };
        if data_at
            .checked_add(len)
            .filter(|&end| end <= file_len)
            .is_none()
        {
            return Err(Error::corrupt(format!(
                "the compressed grain {grain_index} ({len} bytes at {data_at:#x}) is beyond the \
                 end of the file"
            )));
        }
        let mut compressed = vec![0u8; len as usize];
        self.file.read_exact_at(&mut compressed, data_at)?;
        let mut out = vec![0u8; grain as usize];
        // The grain must cover the part of it inside the extent.
        let needed = grain.min(self.size.saturating_sub(grain_index * grain)) as usize;
        inflate(&compressed, &mut out, Deflate::Zlib, needed).map_err(|e| {
            e.context(format!("the compressed grain {grain_index}"))
                .at_offset(at)
        })?;
        Ok(out)
    }

    /// Writes `buf` at extent offset `offset`, allocating grains as needed; a write-back it
    /// has to do on the way stops the disk (`write_back`) if it fails.
    pub fn write(
        &self,
        buf: &[u8],
        offset: u64,
        below: Below,
        write_back: &WriteBack,
    ) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        for run in self.lookup(offset, buf.len() as u64)? {
            let part = request_part(buf, offset, run.offset, run.len)?;
            match run.grain {
                Grain::Data(host) => self.file.write_all_at(part, host)?,
                _ => self.write_allocating(part, run.offset, below, write_back)?,
            }
        }
        Ok(())
    }

    /// Writes `payload` at `offset`, a range that needed allocation at lookup time, one grain
    /// at a time under the allocation mutex.
    fn write_allocating(
        &self,
        payload: &[u8],
        offset: u64,
        below: Below,
        write_back: &WriteBack,
    ) -> Result<()> {
        let mut alloc = self.lock_alloc();
        let grain = self.layout.grain_bytes;
        let end = offset + payload.len() as u64;
        let mut at = offset;
        while at < end {
            if at % grain == 0 && end - at >= grain {
                let rest = request_part(payload, offset, at, end - at)?;
                let whole = self.write_fresh_grains(&mut alloc, rest, at)?;
                if whole > 0 {
                    at += whole;
                    continue;
                }
            }
            let piece = (grain - at % grain).min(end - at);
            let part = request_part(payload, offset, at, piece)?;
            self.allocate_grain(&mut alloc, part, at, below)?;
            at += piece;
        }
        if self.tables.over_capacity() {
            write_back.run(self.file.path(), || self.flush_locked(&alloc))?;
        }
        Ok(())
    }

    /// Writes the whole grains at the start of `payload` (extent offset `offset`, grain
    /// aligned) that are unallocated or zeroed and share one grain table as new grains at the
    /// end of the file, with one host write, and only then points their entries at them.
    /// Returns the bytes written: 0 when the first grain needs `allocate_grain`.
    fn write_fresh_grains(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        offset: u64,
    ) -> Result<u64> {
        let grain = self.layout.grain_bytes;
        let per_table = u64::from(self.header.gtes_per_gt);
        let (table_index, table, slot) = self.table_of_grain(alloc, offset / grain)?;
        let most = (payload.len() as u64 / grain)
            .min(per_table - slot as u64)
            .min(MAX_RUN_BYTES / grain)
            .max(1) as usize;
        let count = table
            .entries
            .iter()
            .skip(slot)
            .take(most)
            .take_while(|&&raw| matches!(self.layout.decode(raw), Grain::Unallocated | Grain::Zero))
            .count();
        if count == 0 {
            return Ok(0);
        }
        let bytes = count as u64 * grain;
        let data = payload
            .get(..bytes as usize)
            .ok_or_else(|| Error::out_of_range("internal: grains past their payload"))?;
        self.append_grains(alloc, data, table_index, &table, slot)?;
        Ok(bytes)
    }

    /// The grain table of grain `grain_index` (made if it is missing), its index, and the
    /// grain's slot in it.
    fn table_of_grain(
        &self,
        alloc: &mut AllocState,
        grain_index: u64,
    ) -> Result<(u64, Arc<GrainTable>, usize)> {
        let per_table = u64::from(self.header.gtes_per_gt);
        let table_index = grain_index / per_table;
        let table = match self.table(table_index)? {
            Some(table) => table,
            None => self.allocate_table(alloc, table_index)?,
        };
        Ok((table_index, table, (grain_index % per_table) as usize))
    }

    /// Writes `data`, whole grains, at the end of the file, then points the entries from
    /// `slot` of grain table `table_index` (`table`) at them.
    fn append_grains(
        &self,
        alloc: &mut AllocState,
        data: &[u8],
        table_index: u64,
        table: &GrainTable,
        slot: usize,
    ) -> Result<()> {
        let grain = self.layout.grain_bytes;
        let host = alloc.next_free;
        let next = reserve(host, data.len() as u64)?;
        // Every grain's sector number must fit a table entry.
        to_sector(next.saturating_sub(grain))?;
        self.file.write_all_at(data, host)?;
        alloc.next_free = next;
        self.file_len.fetch_max(next, Ordering::AcqRel);
        self.allocated
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let count = data.len() / grain as usize;
        let mut entries = table.entries.clone();
        for (i, entry) in entries.iter_mut().skip(slot).take(count).enumerate() {
            *entry = u64::from(to_sector(host + i as u64 * grain)?);
        }
        self.tables.insert_dirty(
            self.key_of(table_index)?,
            Arc::new(GrainTable {
                gd_index: table_index,
                entries,
            }),
        );
        Ok(())
    }

    /// Stores `part` at `offset` (inside one grain), allocating the grain and its grain table
    /// if they are still missing now that nobody else allocates.
    fn allocate_grain(
        &self,
        alloc: &mut AllocState,
        part: &[u8],
        offset: u64,
        below: Below,
    ) -> Result<()> {
        let grain = self.layout.grain_bytes;
        let grain_index = offset / grain;
        let (table_index, table, slot) = self.table_of_grain(alloc, grain_index)?;
        let raw = table.entries.get(slot).copied().unwrap_or(0);
        let grain_start = grain_index * grain;
        let head = (offset - grain_start) as usize;
        let mut data = vec![0u8; grain as usize];
        match self.layout.decode(raw) {
            // Allocated meanwhile; its data was written before it was published.
            Grain::Data(host) => return self.file.write_all_at(part, host + head as u64),
            Grain::Compressed(_) => {
                return Err(Error::read_only("compressed grains are not rewritten"))
            }
            Grain::Zero => {}
            Grain::Unallocated => {
                // Past the extent's end the grain stays zero.
                let inside = self.size.saturating_sub(grain_start).min(grain) as usize;
                below(data.get_mut(..inside).unwrap_or_default(), grain_start)?;
            }
        }
        data.get_mut(head..head + part.len())
            .ok_or_else(|| Error::out_of_range("internal: write outside the grain"))?
            .copy_from_slice(part);
        self.append_grains(alloc, &data, table_index, &table, slot)
    }

    fn key_of(&self, table_index: u64) -> Result<u64> {
        self.read_directory()
            .table_at(table_index)?
            .ok_or_else(|| Error::corrupt("internal: grain table vanished"))
    }

    /// Reserves a new, empty grain table (and its redundant copy) at the end of the file and
    /// points the directories at it; the tables are written whole on flush.
    fn allocate_table(&self, alloc: &mut AllocState, index: u64) -> Result<Arc<GrainTable>> {
        let gt_space = self.layout.gt_bytes.next_multiple_of(SECTOR_SIZE);
        let redundant = self.read_directory().rgd_at.is_some();
        let copies = if redundant { 2 } else { 1 };
        let host = alloc.next_free;
        let used = reserve(host, gt_space * copies)?;
        let next = used
            .checked_next_multiple_of(self.layout.grain_bytes)
            .ok_or_else(|| Error::out_of_range("file offset overflows"))?;
        to_sector(next)?;
        let table = Arc::new(GrainTable {
            gd_index: index,
            entries: vec![0; self.header.gtes_per_gt as usize],
        });
        // Cached before the directory names it, so no lookup misses it on disk.
        self.tables.insert_dirty(host, Arc::clone(&table));
        let redundant_at = redundant.then_some(host + gt_space);
        self.write_directory().set(index, host, redundant_at)?;
        alloc.next_free = next;
        self.file_len.fetch_max(used, Ordering::AcqRel);
        Ok(table)
    }

    /// Discards `[offset, offset + len)` of the extent (see the `vmdk` module doc): whole
    /// grains become zeroed grains where the header allows them, else stay mapped; either way
    /// their host range is punched. `below_data` says whether a parent may show through an
    /// unallocated grain. Returns the ranges still to be written with zeros (partial grains,
    /// and grains that cannot say "zero" over a parent).
    pub fn discard(
        &self,
        offset: u64,
        len: u64,
        below_data: bool,
        write_back: &WriteBack,
    ) -> Result<Vec<(u64, u64)>> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        let grain = self.layout.grain_bytes;
        let (head, (first, count), tail) = split_aligned(offset, len, grain);
        let mut rest: Vec<(u64, u64)> = [head, tail].into_iter().filter(|r| r.1 > 0).collect();
        if count == 0 {
            return Ok(rest);
        }
        let zeroed = self.layout.zeroed_grains;
        let per_table = u64::from(self.header.gtes_per_gt);
        let mut alloc = self.lock_alloc();
        for grain_index in first..first + count {
            let table_index = grain_index / per_table;
            let table = self.table(table_index)?;
            let slot = (grain_index % per_table) as usize;
            let raw = table
                .as_ref()
                .and_then(|t| t.entries.get(slot).copied())
                .unwrap_or(0);
            let start = grain_index * grain;
            match self.layout.decode(raw) {
                Grain::Zero => continue,
                Grain::Unallocated if !below_data => continue,
                Grain::Data(host) => {
                    // Grains are only ever appended, never reused: punched now, a grain reads
                    // as zeros whether the table on disk still names it or not.
                    self.file.punch_hole(host, grain)?;
                    let _ =
                        self.allocated
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |a| {
                                Some(a.saturating_sub(grain))
                            });
                    if !zeroed {
                        continue;
                    }
                }
                Grain::Unallocated if zeroed => {}
                Grain::Unallocated | Grain::Compressed(_) => {
                    rest.push((start, grain));
                    continue;
                }
            }
            let table = match table {
                Some(table) => table,
                None => self.allocate_table(&mut alloc, table_index)?,
            };
            let mut entries = table.entries.clone();
            if let Some(e) = entries.get_mut(slot) {
                *e = u64::from(GTE_ZEROED);
            }
            self.tables.insert_dirty(
                self.key_of(table_index)?,
                Arc::new(GrainTable {
                    gd_index: table_index,
                    entries,
                }),
            );
        }
        if self.tables.over_capacity() {
            write_back.run(self.file.path(), || self.flush_locked(&alloc))?;
        }
        rest.sort_unstable();
        Ok(rest)
    }

    pub fn is_dirty(&self) -> bool {
        self.tables.is_dirty() || self.read_directory().is_dirty()
    }

    pub fn flush(&self) -> Result<()> {
        let alloc = self.lock_alloc();
        self.flush_locked(&alloc)
    }

    /// Data -> sync -> grain tables (both copies) -> sync -> directories -> sync.
    fn flush_locked(&self, _alloc: &AllocState) -> Result<()> {
        let tables = self.tables.dirty_tables();
        let (gd_pieces, redundant): (Pieces, Vec<Option<u64>>) = {
            let directory = self.read_directory();
            let redundant = tables
                .iter()
                .map(|(_, t)| directory.redundant_at(t.gd_index))
                .collect();
            (directory.dirty_pieces(), redundant)
        };
        self.file.sync_data()?;
        if tables.is_empty() && gd_pieces.is_empty() {
            return Ok(());
        }
        for ((at, table), redundant_at) in tables.iter().zip(&redundant) {
            let bytes = table.to_bytes();
            self.file.write_all_at(&bytes, *at)?;
            if let Some(r) = redundant_at {
                self.file.write_all_at(&bytes, *r)?;
            }
        }
        if !gd_pieces.is_empty() {
            // New grain tables must be durable before a directory entry points at them.
            self.file.sync_data()?;
            for (at, bytes) in &gd_pieces {
                self.file.write_all_at(bytes, *at)?;
            }
        }
        self.file.sync_data()?;
        for (at, table) in &tables {
            self.tables.mark_clean(*at, table);
        }
        // Only allocations dirty the directory, and they hold the mutex this flush holds.
        self.write_directory().mark_clean();
        Ok(())
    }
}

/// At most this many bytes of whole new grains go out in one host write.
const MAX_RUN_BYTES: u64 = 32 << 20;

/// The end of `len` bytes reserved at `host`, refusing offsets that overflow.
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

/// Appends `run`, merging it into the last one where it continues it (data contiguous in the
/// file, or the same kind of hole).
fn push_run(runs: &mut Vec<Run>, run: Run) {
    if let Some(last) = runs.last_mut() {
        let continues = last.offset + last.len == run.offset
            && match (last.grain, run.grain) {
                (Grain::Unallocated, Grain::Unallocated) | (Grain::Zero, Grain::Zero) => true,
                (Grain::Data(a), Grain::Data(b)) => a + last.len == b,
                _ => false,
            };
        if continues {
            last.len += run.len;
            return;
        }
    }
    runs.push(run);
}
