//! The QCOW v1 block map in memory: the whole L1 table, and the L2 tables loaded on first use
//! (one table-sized read each, validated entry by entry when loaded), at most `capacity` of
//! them: past that the least recently used clean tables that no allocation has pinned are
//! dropped (they are read again when needed), so memory stays bounded however much of a big
//! disk is read. Answers range lookups as
//! runs, records allocations, and knows which 512-byte pieces of which tables they dirtied.
//! Does no I/O except `load_l1` and `read_l2`, which the caller runs without holding the lock
//! that guards a `Tables`.
//!
//! A table read with no lock held is kept only if no allocation changed any table since the
//! lookup found it missing (`generation`). Otherwise the copy may predate an allocation into
//! that very table which was written back and dropped from memory meanwhile: kept, it would
//! hide the new cluster from reads, and the next write-back of the table would drop the
//! cluster's entry on disk.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::dirty::DirtyChunks;

use super::header::{Entry, Geometry, Layout, QcowHeader, SECTOR_SIZE};

const ENTRY_LEN: u64 = 8;
/// Memory for loaded L2 tables before clean ones are dropped: 8 MiB maps 4 GiB of disk with
/// qemu-img's default geometry (4 KiB tables of 4 KiB clusters).
const L2_MEMORY: u64 = 8 << 20;
/// The fewest tables kept whatever their size, so an allocation's tables always fit.
const MIN_TABLES: usize = 16;
/// Write-back granularity of the tables: one sector, the unit the host writes atomically.
const DIRTY_CHUNK: usize = SECTOR_SIZE as usize;

/// Where a run of guest bytes lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// No cluster in this image: the layer below shows through.
    Unallocated,
    /// Plain data starting at `host_offset` (for the run's first byte).
    Data { host_offset: u64 },
    /// Part of one compressed cluster: `len` deflated bytes at `host_offset`.
    Compressed { host_offset: u64, len: u64 },
}

/// A range of the guest disk with one `RunKind`. `Data` runs are contiguous in the host file;
/// a `Compressed` run never leaves its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub offset: u64,
    pub len: u64,
    pub kind: RunKind,
}

impl Run {
    /// Whether `next` continues this run, on the guest disk and (for data) in the host file.
    fn continued_by(&self, next: &Run) -> bool {
        if self.offset.checked_add(self.len) != Some(next.offset) {
            return false;
        }
        match (self.kind, next.kind) {
            (RunKind::Unallocated, RunKind::Unallocated) => true,
            (RunKind::Data { host_offset: a }, RunKind::Data { host_offset: b }) => {
                a.checked_add(self.len) == Some(b)
            }
            _ => false,
        }
    }
}

/// Appends `run` to `runs`, merging it into the last one where it continues it.
pub fn push_run(runs: &mut Vec<Run>, run: Run) {
    match runs.last_mut() {
        Some(last) if last.continued_by(&run) => last.len += run.len,
        _ => runs.push(run),
    }
}

/// An L2 table a lookup needs but that is not in memory yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MissingTable {
    pub l1_index: u64,
    pub host_offset: u64,
    /// The guest offset the lookup stopped at; everything before it is in the runs returned.
    pub resume_at: u64,
    /// `Tables::generation` when the table was found missing, for `insert_l2`.
    pub generation: u64,
}

/// What the L1 entry of a guest offset says about its L2 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableState {
    /// No L2 table yet: the whole range it would cover is unallocated.
    Absent,
    /// On disk at this offset, not loaded yet.
    OnDisk(u64),
    Loaded,
}

struct L2Table {
    host_offset: u64,
    entries: Vec<u64>,
    dirty: DirtyChunks,
    /// The `Tables::tick` of the last lookup that used the table (LRU order).
    last_used: AtomicU64,
}

/// The L1 table and the loaded L2 tables of one image.
pub struct Tables {
    geometry: Geometry,
    l1_table_offset: u64,
    l1: Vec<u64>,
    l1_dirty: DirtyChunks,
    l2: HashMap<u64, L2Table>,
    /// How many L2 tables stay loaded before clean ones are dropped.
    capacity: usize,
    /// Counts table uses, for the LRU order.
    tick: AtomicU64,
    /// Tables the allocation in progress needs (loaded, not yet published): never dropped.
    pinned: Vec<u64>,
    /// Bumped by every change to a table's entries (`publish`, `add_l2`), so a table read
    /// with no lock held can tell whether an allocation overlapped the read.
    generation: u64,
}

impl Tables {
    /// Reads the L1 table `header` describes (bounded by the file and a hard cap, both checked
    /// when the header was read) and validates every entry.
    pub fn load_l1(file: &HostFile, header: &QcowHeader, layout: Layout) -> Result<Tables> {
        let count = usize::try_from(header.l1_entries)
            .map_err(|_| Error::unsupported("qcow L1 table too large for this host"))?;
        crate::meta::budget::check_table_memory(
            "qcow L1 table",
            header.l1_entries.saturating_mul(ENTRY_LEN),
        )?;
        // Read in pieces, so that the raw bytes and the decoded table are never both whole.
        const PIECE: usize = 64 << 10;
        let mut l1 = Vec::with_capacity(count);
        let mut raw = vec![0u8; PIECE];
        let mut at = header.l1_table_offset;
        while l1.len() < count {
            let want = ((count - l1.len()) * ENTRY_LEN as usize).min(PIECE);
            let piece = raw.get_mut(..want).unwrap_or_default();
            file.read_exact_at(piece, at)?;
            l1.extend(piece.chunks_exact(ENTRY_LEN as usize).map(be_u64));
            at += want as u64;
        }
        Tables::new(header.geometry(), layout, header.l1_table_offset, l1)
    }

    /// Takes the L1 `l1` read from `l1_table_offset`, checking each entry against `layout`.
    pub fn new(
        geometry: Geometry,
        layout: Layout,
        l1_table_offset: u64,
        l1: Vec<u64>,
    ) -> Result<Tables> {
        for (index, &l2_offset) in l1.iter().enumerate() {
            if l2_offset == 0 {
                continue;
            }
            let at = l1_table_offset.saturating_add(index as u64 * ENTRY_LEN);
            if l2_offset % SECTOR_SIZE != 0 {
                return Err(Error::corrupt(format!(
                    "qcow L1 entry {index} points to L2 table offset {l2_offset:#x}, which is \
                     not sector aligned"
                ))
                .at_offset(at));
            }
            layout
                .check_range(
                    &format_args!("L2 table {index}"),
                    l2_offset,
                    geometry.l2_table_len(),
                )
                .map_err(|e| e.at_offset(at))?;
        }
        let capacity = usize::try_from(L2_MEMORY / geometry.l2_table_len().max(1))
            .unwrap_or(MIN_TABLES)
            .max(MIN_TABLES);
        Ok(Tables {
            geometry,
            l1_table_offset,
            l1_dirty: DirtyChunks::new(l1.len() * ENTRY_LEN as usize, DIRTY_CHUNK),
            l1,
            l2: HashMap::new(),
            capacity,
            tick: AtomicU64::new(0),
            pinned: Vec::new(),
            generation: 0,
        })
    }

    /// Reads L2 table `l1_index` from `host_offset` and validates its entries against the file
    /// as it was opened. Runs without any lock; the result goes to `insert_l2`.
    pub fn read_l2(
        file: &HostFile,
        geometry: Geometry,
        layout: &Layout,
        l1_index: u64,
        host_offset: u64,
    ) -> Result<Vec<u64>> {
        let mut raw = vec![0u8; geometry.l2_entries() * ENTRY_LEN as usize];
        file.read_exact_at(&mut raw, host_offset)?;
        let entries: Vec<u64> = raw.chunks_exact(ENTRY_LEN as usize).map(be_u64).collect();
        for (index, &raw_entry) in entries.iter().enumerate() {
            let at = host_offset.saturating_add(index as u64 * ENTRY_LEN);
            let what = format_args!("cluster of L2 table {l1_index} entry {index}");
            match geometry.decode(raw_entry) {
                Entry::Unallocated => {}
                Entry::Normal { host_offset } => {
                    if host_offset % SECTOR_SIZE != 0 {
                        return Err(Error::corrupt(format!(
                            "qcow {what} at {host_offset:#x} is not sector aligned"
                        ))
                        .at_offset(at));
                    }
                    layout
                        .check_range(&what, host_offset, geometry.cluster_size())
                        .map_err(|e| e.at_offset(at))?;
                }
                Entry::Compressed { host_offset, len } => {
                    layout
                        .check_range(&format_args!("compressed {what}"), host_offset, len)
                        .map_err(|e| e.at_offset(at))?;
                }
            }
        }
        Ok(entries)
    }

    /// Keeps a table `read_l2` read after a lookup reported it missing at `generation`,
    /// unless another thread got there first (its copy may already carry allocations) or the
    /// L1 entry no longer names that table. Returns false, keeping nothing, when an allocation
    /// changed a table since `generation`: the copy may be older than that table's last
    /// write-back, so the caller must read it again with allocations held off.
    pub fn insert_l2(
        &mut self,
        l1_index: u64,
        host_offset: u64,
        entries: Vec<u64>,
        generation: u64,
    ) -> bool {
        if self.l1_entry(l1_index) != Some(host_offset)
            || entries.len() != self.l2_len()
            || self.l2.contains_key(&l1_index)
        {
            return true;
        }
        if generation != self.generation {
            return false;
        }
        let last_used = AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed));
        self.l2.insert(
            l1_index,
            L2Table {
                host_offset,
                dirty: DirtyChunks::new(entries.len() * ENTRY_LEN as usize, DIRTY_CHUNK),
                entries,
                last_used,
            },
        );
        self.evict(l1_index);
        true
    }

    /// The count of table changes so far, for `insert_l2`.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Keeps table `l1_index` loaded until `unpin_all`: the allocation in progress needs it.
    pub fn pin(&mut self, l1_index: u64) {
        if !self.pinned.contains(&l1_index) {
            self.pinned.push(l1_index);
        }
    }

    /// Ends the pins of the previous allocation (allocations are serialised, so the next one
    /// starting means the last one is done, successful or not).
    pub fn unpin_all(&mut self) {
        self.pinned.clear();
    }

    /// Drops the least recently used clean, unpinned tables (never `keep`, just inserted)
    /// down to three quarters of the capacity once it is exceeded, so the sort is paid for
    /// once per quarter of the capacity.
    fn evict(&mut self, keep: u64) {
        if self.l2.len() <= self.capacity {
            return;
        }
        let target = self.capacity - self.capacity / 4;
        let mut victims: Vec<(u64, u64)> = self
            .l2
            .iter()
            .filter(|(&index, t)| {
                index != keep && t.dirty.is_empty() && !self.pinned.contains(&index)
            })
            .map(|(&index, t)| (t.last_used.load(Ordering::Relaxed), index))
            .collect();
        victims.sort_unstable();
        let excess = self.l2.len().saturating_sub(target);
        for (_, index) in victims.into_iter().take(excess) {
            self.l2.remove(&index);
        }
    }

    /// How many L2 tables are loaded.
    #[cfg(test)]
    pub fn loaded_tables(&self) -> usize {
        self.l2.len()
    }

    #[cfg(test)]
    pub fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    fn l2_len(&self) -> usize {
        self.geometry.l2_entries()
    }

    fn l1_entry(&self, l1_index: u64) -> Option<u64> {
        usize::try_from(l1_index)
            .ok()
            .and_then(|i| self.l1.get(i))
            .copied()
    }

    pub fn table_state(&self, l1_index: u64) -> Result<TableState> {
        match self.l1_entry(l1_index) {
            None => Err(self.beyond_l1(l1_index)),
            Some(0) => Ok(TableState::Absent),
            Some(_) if self.l2.contains_key(&l1_index) => Ok(TableState::Loaded),
            Some(host_offset) => Ok(TableState::OnDisk(host_offset)),
        }
    }

    fn beyond_l1(&self, l1_index: u64) -> Error {
        Error::out_of_range(format!(
            "L1 index {l1_index} is beyond the {}-entry L1 table",
            self.l1.len()
        ))
    }

    /// Describes `[offset, offset + len)` as runs, neighbours merged. Stops at the first L2
    /// table that is not loaded and says which one; the caller loads it and resumes.
    pub fn lookup(
        &self,
        offset: u64,
        len: u64,
        runs: &mut Vec<Run>,
    ) -> Result<Option<MissingTable>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::out_of_range(format!("{offset} + {len} overflows")))?;
        let geo = self.geometry;
        let mut at = offset;
        while at < end {
            let pos = geo.split(at);
            let cluster_rest = geo.cluster_size() - pos.in_cluster;
            let (kind, piece) = match self.table_state(pos.l1_index)? {
                TableState::Absent => {
                    // The whole span of the missing table is unallocated: skip it at once.
                    let span = (geo.l2_entries() - pos.l2_index) as u64 * geo.cluster_size()
                        - pos.in_cluster;
                    (RunKind::Unallocated, span)
                }
                TableState::OnDisk(host_offset) => {
                    return Ok(Some(MissingTable {
                        l1_index: pos.l1_index,
                        host_offset,
                        resume_at: at,
                        generation: self.generation,
                    }))
                }
                TableState::Loaded => {
                    let table = self.l2.get(&pos.l1_index);
                    if let Some(table) = table {
                        let now = self.tick.fetch_add(1, Ordering::Relaxed);
                        table.last_used.store(now, Ordering::Relaxed);
                    }
                    let raw = table
                        .and_then(|t| t.entries.get(pos.l2_index))
                        .copied()
                        .unwrap_or(0);
                    let kind = match geo.decode(raw) {
                        Entry::Unallocated => RunKind::Unallocated,
                        Entry::Normal { host_offset } => RunKind::Data {
                            host_offset: host_offset + pos.in_cluster,
                        },
                        Entry::Compressed { host_offset, len } => {
                            RunKind::Compressed { host_offset, len }
                        }
                    };
                    (kind, cluster_rest)
                }
            };
            let piece = piece.min(end - at);
            push_run(
                runs,
                Run {
                    offset: at,
                    len: piece,
                    kind,
                },
            );
            at += piece;
        }
        Ok(None)
    }

    /// Points L1 entry `l1_index` at a new, zeroed L2 table at `host_offset` (space the caller
    /// reserved), to be written whole on the next flush.
    pub fn add_l2(&mut self, l1_index: u64, host_offset: u64) -> Result<()> {
        if self.table_state(l1_index)? != TableState::Absent {
            return Err(Error::corrupt(format!(
                "internal: L2 table {l1_index} allocated twice"
            )));
        }
        let index = l1_index as usize; // table_state checked it indexes `l1`
        let mut dirty = DirtyChunks::new(self.l2_len() * ENTRY_LEN as usize, DIRTY_CHUNK);
        for chunk in (0..self.l2_len() * ENTRY_LEN as usize).step_by(DIRTY_CHUNK) {
            dirty.mark(chunk);
        }
        self.l2.insert(
            l1_index,
            L2Table {
                host_offset,
                entries: vec![0; self.l2_len()],
                dirty,
                last_used: AtomicU64::new(self.tick.fetch_add(1, Ordering::Relaxed)),
            },
        );
        if let Some(slot) = self.l1.get_mut(index) {
            *slot = host_offset;
        }
        self.l1_dirty.mark(index * ENTRY_LEN as usize);
        self.generation += 1;
        Ok(())
    }

    /// Points the `count` clusters starting at guest offset `first` (cluster aligned) at the
    /// consecutive host clusters from `host_offset`, once their data is written. Their tables
    /// must be loaded; none of them may hold a normal cluster already (a compressed one is
    /// replaced, and its bytes leak: QCOW v1 has no refcounts to free them).
    pub fn publish(&mut self, first: u64, host_offset: u64, count: u64) -> Result<()> {
        let geo = self.geometry;
        let cluster = geo.cluster_size();
        let slots: Vec<_> = (0..count).map(|i| geo.split(first + i * cluster)).collect();
        for pos in &slots {
            let raw = self
                .l2
                .get(&pos.l1_index)
                .and_then(|t| t.entries.get(pos.l2_index))
                .copied()
                .ok_or_else(|| {
                    Error::out_of_range(format!(
                        "internal: L2 table {} is not loaded for an allocation",
                        pos.l1_index
                    ))
                })?;
            if let Entry::Normal { .. } = geo.decode(raw) {
                return Err(Error::corrupt(format!(
                    "internal: cluster at guest offset {:#x} allocated twice",
                    first
                )));
            }
        }
        for (i, pos) in (0u64..).zip(&slots) {
            if let Some(table) = self.l2.get_mut(&pos.l1_index) {
                if let Some(slot) = table.entries.get_mut(pos.l2_index) {
                    *slot = host_offset + i * cluster;
                    table.dirty.mark(pos.l2_index * ENTRY_LEN as usize);
                }
            }
        }
        self.generation += 1;
        Ok(())
    }

    /// Names two L1 entries whose L2 tables overlap in the file. Each would be loaded and
    /// written back as a table of its own, so writes through one could undo or alias writes
    /// through the other: such an image must be served read-only.
    pub fn overlapping_tables(&self) -> Option<String> {
        let len = self.geometry.l2_table_len();
        let mut tables: Vec<(u64, usize)> = (0..)
            .zip(&self.l1)
            .filter(|&(_, &offset)| offset != 0)
            .map(|(index, &offset)| (offset, index))
            .collect();
        tables.sort_unstable();
        tables.windows(2).find_map(|pair| {
            let [(a_offset, a), (b_offset, b)] = [pair[0], pair[1]];
            (a_offset.saturating_add(len) > b_offset).then(|| {
                format!(
                    "L1 entries {a} and {b} point to overlapping L2 tables at {a_offset:#x} and \
                     {b_offset:#x}"
                )
            })
        })
    }

    pub fn is_dirty(&self) -> bool {
        !self.l1_dirty.is_empty() || self.l2.values().any(|t| !t.dirty.is_empty())
    }

    /// The dirty pieces of the L2 tables as (file offset, bytes), in file order.
    pub fn dirty_l2(&self) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = self
            .l2
            .values()
            .flat_map(|t| {
                t.dirty.ranges().into_iter().map(|range| {
                    (
                        t.host_offset + range.start as u64,
                        be_bytes(&t.entries, range),
                    )
                })
            })
            .collect();
        out.sort_unstable_by_key(|(at, _)| *at);
        out
    }

    /// The dirty pieces of the L1 table as (file offset, bytes).
    pub fn dirty_l1(&self) -> Vec<(u64, Vec<u8>)> {
        self.l1_dirty
            .ranges()
            .into_iter()
            .map(|range| {
                (
                    self.l1_table_offset + range.start as u64,
                    be_bytes(&self.l1, range),
                )
            })
            .collect()
    }

    /// Forgets the dirty state after the dirty pieces were written.
    pub fn mark_clean(&mut self) {
        self.l1_dirty.clear();
        self.l2.values_mut().for_each(|t| t.dirty.clear());
        // Tables that had to stay while dirty may go now.
        self.evict(u64::MAX);
    }

    /// L2 tables the L1 table points at (loaded or not).
    pub fn l2_tables(&self) -> u64 {
        self.l1.iter().filter(|&&e| e != 0).count() as u64
    }

    pub fn l1(&self) -> &[u64] {
        &self.l1
    }

    /// Grows a clean L1 table to `count` entries without tables (zeros on disk already).
    pub fn grow_l1(&mut self, count: usize) -> Result<()> {
        if !self.l1_dirty.is_empty() || count < self.l1.len() {
            return Err(Error::out_of_range("internal: L1 grows only when clean"));
        }
        self.l1.resize(count, 0);
        self.l1_dirty = DirtyChunks::new(count * ENTRY_LEN as usize, DIRTY_CHUNK);
        Ok(())
    }
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap_or_default())
}

/// The entries covering byte `range` of a table, big-endian.
fn be_bytes(entries: &[u64], range: std::ops::Range<usize>) -> Vec<u8> {
    let first = range.start / ENTRY_LEN as usize;
    let last = range.end.div_ceil(ENTRY_LEN as usize);
    entries
        .get(first..last.min(entries.len()))
        .unwrap_or_default()
        .iter()
        .flat_map(|e| e.to_be_bytes())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::format::qcow::header::testing::header_bytes;

    const CLUSTER: u64 = 4096;

    /// Tables for a 10 MiB image with 4 KiB clusters and 512-entry L2 tables (2 MiB each),
    /// L1 at 48, in a file of `file_len` bytes.
    fn tables(l1: Vec<u64>, file_len: u64) -> Result<Tables> {
        let header = QcowHeader::parse(&header_bytes(10 << 20, 12, 9)).unwrap();
        Tables::new(header.geometry(), header.layout(file_len), 48, l1)
    }

    fn lookup_all(t: &Tables, offset: u64, len: u64) -> (Vec<Run>, Option<MissingTable>) {
        let mut runs = Vec::new();
        let missing = t.lookup(offset, len, &mut runs).unwrap();
        (runs, missing)
    }

    #[test]
    fn l1_entries_must_be_aligned_inside_the_file_and_off_the_metadata() {
        tables(vec![0, 0x1000, 0, 0, 0], 0x2000).unwrap();
        let e = tables(vec![0, 0x1000, 0, 0, 0], 0x1fff).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("L2 table 1 at 0x1000"), "{e}");
        assert!(e.to_string().contains("(at offset 0x38)"), "{e}");
        let e = tables(vec![0x1001, 0, 0, 0, 0], 0x4000).err().unwrap();
        assert!(e.to_string().contains("not sector aligned"), "{e}");
    }

    #[test]
    fn overlapping_l2_tables_are_reported() {
        assert_eq!(
            tables(vec![0x3000, 0x1000, 0, 0x2000, 0], 0x10000)
                .unwrap()
                .overlapping_tables(),
            None
        );
        let shared = tables(vec![0x3000, 0x1000, 0, 0x3000, 0], 0x10000).unwrap();
        assert_eq!(
            shared.overlapping_tables().as_deref(),
            Some("L1 entries 0 and 3 point to overlapping L2 tables at 0x3000 and 0x3000")
        );
        let partly = tables(vec![0x1000, 0x1200, 0, 0, 0], 0x10000).unwrap();
        assert!(partly
            .overlapping_tables()
            .unwrap()
            .contains("entries 0 and 1"));
    }

    #[test]
    fn lookup_reports_missing_tables_and_resumes() {
        let mut t = tables(vec![0, 0x1000, 0, 0, 0], 0x10000).unwrap();
        let (runs, missing) = lookup_all(&t, 100, 3 << 20);
        assert_eq!(
            runs,
            [Run {
                offset: 100,
                len: (2 << 20) - 100,
                kind: RunKind::Unallocated
            }]
        );
        let missing = missing.unwrap();
        assert_eq!(
            missing,
            MissingTable {
                l1_index: 1,
                host_offset: 0x1000,
                resume_at: 2 << 20,
                generation: 0,
            }
        );
        let mut entries = vec![0u64; 512];
        entries[0] = 0x3000;
        entries[1] = 0x4000;
        entries[3] = 0x8000_0000_0000_0000 | (0x18 << 51) | 0x2200;
        assert!(t.insert_l2(1, 0x1000, entries, missing.generation));
        let mut runs = runs;
        assert_eq!(
            t.lookup(missing.resume_at, (1 << 20) + 100, &mut runs)
                .unwrap(),
            None
        );
        let base = 2 << 20;
        assert_eq!(
            &runs[1..],
            [
                Run {
                    offset: base,
                    len: 2 * CLUSTER,
                    kind: RunKind::Data {
                        host_offset: 0x3000
                    }
                },
                Run {
                    offset: base + 2 * CLUSTER,
                    len: CLUSTER,
                    kind: RunKind::Unallocated
                },
                Run {
                    offset: base + 3 * CLUSTER,
                    len: CLUSTER,
                    kind: RunKind::Compressed {
                        host_offset: 0x2200,
                        len: 0x18
                    }
                },
                Run {
                    offset: base + 4 * CLUSTER,
                    len: (1 << 20) + 100 - 4 * CLUSTER,
                    kind: RunKind::Unallocated
                },
            ]
        );
    }

    #[test]
    fn allocations_dirty_only_what_they_touch() {
        let mut t = tables(vec![0, 0x1000, 0, 0, 0], 0x10000).unwrap();
        assert!(t.insert_l2(1, 0x1000, vec![0; 512], 0));
        assert!(!t.is_dirty());
        t.publish((2 << 20) + 65 * CLUSTER, 0x20000, 2).unwrap();
        assert_eq!(
            t.dirty_l2(),
            [(0x1000 + 512, {
                let mut v = vec![0u8; 512];
                v[8..16].copy_from_slice(&0x20000u64.to_be_bytes());
                v[16..24].copy_from_slice(&0x21000u64.to_be_bytes());
                v
            })]
        );
        assert!(t.dirty_l1().is_empty());
        // Allocating the same cluster twice is refused and changes nothing.
        let e = t.publish((2 << 20) + 66 * CLUSTER, 0x30000, 1).unwrap_err();
        assert!(e.to_string().contains("allocated twice"), "{e}");

        t.add_l2(4, 0x40000).unwrap();
        assert!(t.add_l2(4, 0x50000).is_err());
        assert_eq!(t.table_state(4).unwrap(), TableState::Loaded);
        assert_eq!(
            t.dirty_l1(),
            [(48, {
                let mut v = vec![0u8; 40];
                v[8..16].copy_from_slice(&0x1000u64.to_be_bytes());
                v[32..40].copy_from_slice(&0x40000u64.to_be_bytes());
                v
            })]
        );
        let l2 = t.dirty_l2();
        assert_eq!(l2.len(), 2);
        assert_eq!(
            (l2[1].0, l2[1].1.len()),
            (0x40000, 4096),
            "a new table is written whole"
        );
        assert_eq!(t.l2_tables(), 2);
        t.mark_clean();
        assert!(!t.is_dirty());
        assert!(t.table_state(5).is_err());
    }

    #[test]
    fn a_table_read_across_an_allocation_is_not_kept() {
        let mut t = tables(vec![0x1000, 0x3000, 0, 0, 0], 0x10000).unwrap();
        let (_, missing) = lookup_all(&t, 0, 1);
        let missing = missing.unwrap();
        // While table 0 is read, an allocation goes into table 1.
        assert!(t.insert_l2(1, 0x3000, vec![0; 512], t.generation()));
        t.publish(2 << 20, 0x8000, 1).unwrap();
        assert!(!t.insert_l2(0, 0x1000, vec![0; 512], missing.generation));
        assert_eq!(t.table_state(0).unwrap(), TableState::OnDisk(0x1000));
        assert!(t.insert_l2(0, 0x1000, vec![0; 512], t.generation()));
        assert_eq!(t.table_state(0).unwrap(), TableState::Loaded);
        // A table already loaded stays as it is, whatever the generation.
        assert!(t.insert_l2(0, 0x1000, vec![7; 512], 0));
        assert_eq!(lookup_all(&t, 0, 1).0[0].kind, RunKind::Unallocated);
    }

    #[test]
    fn l2_entries_are_validated_when_loaded() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("t");
        let header = QcowHeader::parse(&header_bytes(10 << 20, 12, 9)).unwrap();
        let layout = header.layout(0x8000);
        let geo = header.geometry();
        let check = |entry: u64| {
            let mut table = vec![0u8; 4096];
            table[16..24].copy_from_slice(&entry.to_be_bytes());
            let mut file = vec![0u8; 0x1000];
            file.extend(table);
            file.resize(0x8000, 0);
            std::fs::write(&path, &file).unwrap();
            let f = HostFile::open(&path, false).unwrap();
            Tables::read_l2(&f, geo, &layout, 0, 0x1000).map(|_| ())
        };
        check(0x3000).unwrap();
        check(0x7000).unwrap();
        let msg = |entry| check(entry).unwrap_err().to_string();
        assert!(msg(0x7200).contains("beyond the end"), "{}", msg(0x7200));
        assert!(msg(0x3100).contains("not sector aligned"));
        assert!(msg(0x3100).contains("L2 table 0 entry 2"));
        assert!(msg(0x3100).contains("(at offset 0x1010)"));
        assert!(msg(0x1_0000_0000).contains("beyond the end"));
        check(0).unwrap();
        let compressed = |len: u64, at: u64| COMPRESSED_FLAG | (len << 51) | at;
        check(compressed(0x18, 0x7fe8)).unwrap();
        assert!(check(compressed(0x18, 0x7ff0)).is_err());
        assert!(check(compressed(0x18, 0x10))
            .unwrap_err()
            .to_string()
            .contains("header"));
    }

    const COMPRESSED_FLAG: u64 = 1 << 63;
}
