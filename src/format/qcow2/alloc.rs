//! Host cluster allocation and write-back: the state behind the allocation mutex (refcounts,
//! the free-cluster cursor, references waiting to be dropped, the dirty parts of L1 and the
//! live header fields), and the flush that writes it all back in the safe order.
//!
//! # Allocation
//!
//! A new cluster is the first one with refcount 0 at or after a cursor. Its refcount is set to
//! 1 in the (cached, dirty) refcount block before the caller writes anything into it. When the
//! refcount of that cluster has no block, a block is placed at the first cluster of the range
//! it covers: every refcount there is 0, so that cluster is free, and the block describes itself.
//! When the cluster lies past the refcount table, `refcount::plan_fresh` lays out a larger table
//! and the blocks it needs at the start of that (wholly free) range, describing themselves too.
//! New blocks and tables are written to their fresh clusters at once (nothing on disk points at
//! them yet); the table entries and the header that publish them are written by the flush.
//!
//! Dropped references (a cluster copied on write, a compressed cluster rewritten, an L2 table
//! copied away from a snapshot, an old refcount table) are only queued: their refcounts drop
//! after the flush wrote the entries that no longer use them, so a refcount is never lower than
//! the references on disk, and a freed cluster is only reused after that flush.
//!
//! # Flush order
//!
//! 1. `fdatasync` of the data file and the image file: new data clusters, and new L2 tables,
//!    refcount blocks and tables written to fresh clusters, are durable.
//! 2. Dirty refcount blocks -> sync -> dirty refcount table pieces (the whole table when it
//!    moved) -> sync: every new cluster is counted before anything points at it.
//! 3. When the table moved: the header's refcount_table_offset/clusters -> sync.
//! 4. Dirty L2 slices -> sync.
//! 5. Dirty L1 pieces -> sync.
//! 6. Queued reference drops: refcounts decremented in memory, in-flight reads and in-place
//!    writes that may still use a freed cluster waited for (`io_gate`), clusters whose
//!    refcount reached 0 punched in the host file, blocks written -> sync.
//!
//! A crash anywhere leaves at most leaked clusters (counted but unreferenced).

use std::collections::BTreeSet;
use std::sync::{MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::meta::dirty::DirtyChunks;

use super::cluster::OFFSET_MASK;
use super::counts::ClusterCounts;
use super::refcount::{plan_fresh, BlockSlot, FreshPlan, RefcountBlock, RefcountShape, Refcounts};
use super::Qcow2Image;

/// Header offset of refcount_table_offset (u64), followed by refcount_table_clusters (u32).
const OFF_REFCOUNT_TABLE: u64 = 48;
/// QEMU's cap on the refcount table (8 MiB), in entries.
const MAX_REFCOUNT_TABLE_ENTRIES: u64 = (8 << 20) / 8;

/// What held a reference that is dropped: it decides whether a cluster guarded as metadata
/// may become free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Referrer {
    /// An L2 entry (guest data). If the cluster holds metadata the image still uses, the
    /// entry aliased it in a hostile or damaged image: the metadata's own reference stays.
    Data,
    /// The structure itself (an old refcount table, an L2 table replaced on copy): it is
    /// free for real once its count reaches 0.
    Metadata,
}

/// Everything the allocation path changes, behind the allocation mutex.
pub(super) struct AllocState {
    pub refcounts: Refcounts,
    /// Cluster number where the search for a free cluster starts.
    pub cursor: u64,
    /// Byte ranges of the image file whose clusters each lose one reference after the next
    /// flush wrote the entries that dropped it, and what held the reference.
    pub pending_free: Vec<(u64, u64, Referrer)>,
    /// Dirty 512-byte pieces of the active L1 table.
    pub l1_dirty: DirtyChunks,
    /// The header's feature fields as they are on disk now (version 3).
    pub incompatible: u64,
    pub autoclear: u64,
    /// The first write's header changes (and refcount rebuild) are done.
    pub prepared: bool,
}

impl AllocState {
    pub fn new(refcounts: Refcounts, l1_entries: usize, incompatible: u64, autoclear: u64) -> Self {
        AllocState {
            refcounts,
            cursor: 0,
            pending_free: Vec::new(),
            l1_dirty: DirtyChunks::new(l1_entries * 8, 512),
            incompatible,
            autoclear,
            prepared: false,
        }
    }

    /// Queues the drop of one reference to each cluster `[offset, offset + len)` touches.
    pub fn defer_free(&mut self, offset: u64, len: u64, referrer: Referrer) {
        if len > 0 {
            self.pending_free.push((offset, len, referrer));
        }
    }

    pub fn is_dirty(&self) -> bool {
        !self.pending_free.is_empty() || !self.l1_dirty.is_empty() || self.refcounts.is_dirty()
    }
}

impl Qcow2Image {
    // Poisoning is ignored: every critical section keeps the state consistent at each step
    // (a refcount is set before the cluster is used, entries are published whole), so a panic
    // elsewhere leaves at worst a leaked cluster.
    pub(super) fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        self.shared
            .alloc
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cluster_bits(&self) -> u32 {
        self.shared.geometry.cluster_bits
    }

    /// A new cluster of the image file, its refcount set to 1; returns its byte offset.
    pub(super) fn alloc_cluster(&self, alloc: &mut AllocState) -> Result<u64> {
        let file = &self.shared.file;
        loop {
            let cluster = alloc.refcounts.first_free(file, alloc.cursor)?;
            let index = cluster >> alloc.refcounts.block_bits();
            match alloc.refcounts.slot(file, index)? {
                BlockSlot::At(_) => {
                    let offset = self.cluster_offset(cluster)?;
                    self.guard().check(cluster, 1)?;
                    alloc.refcounts.set(file, cluster, 1)?;
                    alloc.cursor = cluster + 1;
                    return Ok(offset);
                }
                BlockSlot::Missing => self.add_block_at_range_start(alloc, index)?,
                BlockSlot::Beyond => self.grow_refcounts(alloc, index)?,
            }
        }
    }

    /// `count` new consecutive clusters past the end of the image file, their refcounts set
    /// to 1; returns the first one's byte offset. Past the end every cluster is free but for
    /// the refcount blocks (and tables) placed there on the way, one at the start of each
    /// range a block covers, so a run of fewer clusters than a block covers is found within
    /// about two ranges; clusters taken that do not start a long enough run are queued to be
    /// freed by the next flush. Free clusters inside the file stay for later allocations.
    pub(super) fn alloc_cluster_run(&self, alloc: &mut AllocState, count: u64) -> Result<u64> {
        let bits = self.cluster_bits();
        let per_block = 1u64 << alloc.refcounts.block_bits();
        let file_clusters = self.shared.file.len()?.div_ceil(1 << bits);
        let saved_cursor = alloc.cursor;
        alloc.cursor = saved_cursor.max(file_clusters);
        let found = self.take_run(
            alloc,
            count,
            count.saturating_add(per_block).saturating_mul(3),
        );
        alloc.cursor = saved_cursor;
        found
    }

    /// The first run of `count` consecutive clusters `alloc_cluster` hands out, within
    /// `budget` clusters taken.
    fn take_run(&self, alloc: &mut AllocState, count: u64, mut budget: u64) -> Result<u64> {
        let bits = self.cluster_bits();
        let (mut first, mut len) = (0u64, 0u64);
        while len < count {
            if budget == 0 {
                alloc.defer_free(first << bits, len << bits, Referrer::Metadata);
                return Err(Error::unsupported(format!(
                    "no run of {count} free clusters found past the end of the file"
                )));
            }
            budget -= 1;
            let cluster = self.alloc_cluster(alloc)? >> bits;
            if len > 0 && first + len == cluster {
                len += 1;
            } else {
                alloc.defer_free(first << bits, len << bits, Referrer::Metadata);
                (first, len) = (cluster, 1);
            }
        }
        Ok(first << bits)
    }

    /// The byte offset of host cluster `cluster`, refused where an L2 entry cannot hold it.
    fn cluster_offset(&self, cluster: u64) -> Result<u64> {
        cluster
            .checked_shl(self.cluster_bits())
            .filter(|&o| o >> self.cluster_bits() == cluster && o & !OFFSET_MASK == 0)
            .filter(|&o| o <= i64::MAX as u64)
            .ok_or_else(|| {
                Error::io(
                    format!("no room to allocate cluster {cluster} in a qcow2 image"),
                    std::io::Error::from_raw_os_error(libc::EFBIG),
                )
            })
    }

    /// Creates the missing block of table index `index` in the first cluster of its own range.
    fn add_block_at_range_start(&self, alloc: &mut AllocState, index: u64) -> Result<()> {
        let file = &self.shared.file;
        let bits = alloc.refcounts.block_bits();
        let cluster = index
            .checked_shl(bits)
            .ok_or_else(|| Error::out_of_range("refcount block index overflows"))?;
        let offset = self.cluster_offset(cluster)?;
        self.guard().check(cluster, 1)?;
        let mut block = RefcountBlock::from_bytes(vec![0; 1 << self.cluster_bits()]);
        block.set(alloc.refcounts.order(), 0, 1)?;
        // On disk before anything can point at it; `slot` also wants it inside the file.
        file.write_all_at(block.as_bytes(), offset)?;
        self.guard_mut().hold(cluster, 1, "a refcount block");
        alloc.refcounts.install_block(file, index, offset, block)
    }

    /// Makes the refcount table reach index `index` (past its end), with a new, larger table
    /// and the blocks it needs at the start of that index's range.
    fn grow_refcounts(&self, alloc: &mut AllocState, index: u64) -> Result<()> {
        let file = &self.shared.file;
        let bits = alloc.refcounts.block_bits();
        let table = alloc.refcounts.table(file)?.to_vec();
        let has_block = |i: u64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| table.get(i))
                .is_some_and(|&e| e & OFFSET_MASK != 0)
        };
        let start = index
            .checked_shl(bits)
            .ok_or_else(|| Error::out_of_range("refcount block index overflows"))?;
        let shape = self.refcount_shape(alloc, table.len() as u64);
        let plan = plan_fresh(shape, &has_block, &BTreeSet::from([index]), start)?;
        let old = alloc.refcounts.table_location();
        let counts: ClusterCounts = (start..plan.end).collect();
        // The new table is in memory before its blocks are written: a failure part way
        // leaves the plan's clusters uncounted, so nothing may be allocated or flushed after.
        let write_back = &self.shared.write_back;
        write_back.run(file.path(), || {
            self.apply_plan(alloc, &plan, &counts, table)
        })?;
        if plan.table.is_some() {
            alloc.defer_free(old.0, old.1 << self.cluster_bits(), Referrer::Metadata);
        }
        alloc.cursor = plan.end;
        log::debug!(
            "{}: refcount table grown for cluster index {index} ({plan:?})",
            file.path().display()
        );
        Ok(())
    }

    /// Tells checks made without the allocation mutex where the refcount table is now. The
    /// old table is only freed (and its clusters reused) after this.
    pub(super) fn note_table_location(&self, alloc: &AllocState) {
        let (offset, clusters) = alloc.refcounts.table_location();
        let at = &self.shared.refcount_table_at;
        at.0.store(offset, std::sync::atomic::Ordering::Release);
        at.1.store(clusters, std::sync::atomic::Ordering::Release);
    }

    pub(super) fn refcount_shape(&self, alloc: &AllocState, table_entries: u64) -> RefcountShape {
        RefcountShape {
            cluster_bits: self.cluster_bits(),
            block_bits: alloc.refcounts.block_bits(),
            table_entries,
            max_entries: MAX_REFCOUNT_TABLE_ENTRIES,
        }
    }

    /// Installs what `plan` laid out: a new table holding `table`'s entries when planned, and
    /// new blocks holding `counts` for their ranges (the plan's own clusters among them).
    /// Clusters of the plan whose block existed already get refcount 1 there.
    pub(super) fn apply_plan(
        &self,
        alloc: &mut AllocState,
        plan: &FreshPlan,
        counts: &ClusterCounts,
        table: Vec<u64>,
    ) -> Result<()> {
        let file = &self.shared.file;
        let bits = alloc.refcounts.block_bits();
        let region_start = plan
            .table
            .map(|(c, _, _)| c)
            .or_else(|| plan.blocks.first().map(|&(_, c)| c))
            .unwrap_or(plan.end);
        self.guard()
            .check(region_start, plan.end.saturating_sub(region_start))?;
        if let Some((cluster, clusters, entries)) = plan.table {
            let mut entries_vec = table;
            entries_vec.resize(entries as usize, 0);
            let offset = self.cluster_offset(cluster)?;
            alloc.refcounts.install_table(offset, clusters, entries_vec);
            self.note_table_location(alloc);
            self.guard_mut()
                .hold(cluster, clusters, "the refcount table");
        }
        let new_indices: BTreeSet<u64> = plan.blocks.iter().map(|&(i, _)| i).collect();
        for &(index, cluster) in &plan.blocks {
            let block = self.block_from_counts(alloc, index, counts)?;
            let offset = self.cluster_offset(cluster)?;
            file.write_all_at(block.as_bytes(), offset)?;
            alloc.refcounts.install_block(file, index, offset, block)?;
            self.guard_mut().hold(cluster, 1, "a refcount block");
        }
        for cluster in region_start..plan.end {
            if !new_indices.contains(&(cluster >> bits)) {
                alloc.refcounts.set(file, cluster, 1)?;
            }
        }
        if let Some((cluster, _, _)) = plan.table {
            let bytes = alloc.refcounts.table_bytes(file)?;
            file.write_all_at(&bytes, self.cluster_offset(cluster)?)?;
        }
        Ok(())
    }

    /// A block for table index `index` holding the refcounts `counts` gives its range.
    pub(super) fn block_from_counts(
        &self,
        alloc: &AllocState,
        index: u64,
        counts: &ClusterCounts,
    ) -> Result<RefcountBlock> {
        let bits = alloc.refcounts.block_bits();
        let first = index << bits;
        let mut block = RefcountBlock::from_bytes(vec![0; 1 << self.cluster_bits()]);
        for (cluster, count) in counts.in_range(first..first.saturating_add(1 << bits)) {
            if count > alloc.refcounts.max_value() {
                return Err(Error::corrupt(format!(
                    "cluster {cluster} has {count} references, more than {}-bit refcounts hold",
                    1u32 << alloc.refcounts.order()
                )));
            }
            block.set(alloc.refcounts.order(), cluster - first, count)?;
        }
        Ok(block)
    }

    /// Writes back everything dirty in the order the module doc gives; a failure stops the
    /// image (`meta::write_back`). The caller holds the allocation mutex (`alloc`), so
    /// nothing is dirtied meanwhile.
    pub(super) fn flush_locked(&self, alloc: &mut AllocState) -> Result<()> {
        let shared = &self.shared;
        shared
            .write_back
            .run(shared.file.path(), || self.write_back_locked(alloc))
    }

    fn write_back_locked(&self, alloc: &mut AllocState) -> Result<()> {
        let file = &self.shared.file;
        if let Some(data) = &self.shared.data_file {
            data.sync_data()?;
        }
        file.sync_data()?;
        if !alloc.is_dirty() && !self.shared.l2_cache.is_dirty() {
            return Ok(());
        }
        self.write_refcount_blocks(alloc)?;
        let moved = alloc.refcounts.table_moved();
        let pieces = alloc.refcounts.table_pieces(file)?;
        if !pieces.is_empty() {
            for (at, bytes) in &pieces {
                file.write_all_at(bytes, *at)?;
            }
            file.sync_data()?;
        }
        if moved {
            let (offset, clusters) = alloc.refcounts.table_location();
            let clusters = u32::try_from(clusters)
                .map_err(|_| Error::out_of_range("refcount table clusters overflow"))?;
            let mut field = offset.to_be_bytes().to_vec();
            field.extend_from_slice(&clusters.to_be_bytes());
            file.write_all_at(&field, OFF_REFCOUNT_TABLE)?;
            file.sync_data()?;
        }
        alloc.refcounts.mark_table_clean();

        let slices = self.shared.l2_cache.dirty_tables();
        if !slices.is_empty() {
            for (key, slice) in &slices {
                let bytes: Vec<u8> = slice.words.iter().flat_map(|w| w.to_be_bytes()).collect();
                file.write_all_at(&bytes, *key)?;
            }
            file.sync_data()?;
            for (key, slice) in &slices {
                self.shared.l2_cache.mark_clean(*key, slice);
            }
        }

        let ranges = alloc.l1_dirty.ranges();
        if !ranges.is_empty() {
            let pieces: Vec<(u64, Vec<u8>)> = {
                let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
                ranges
                    .into_iter()
                    .map(|r| {
                        let bytes = l1
                            .get(r.start / 8..r.end / 8)
                            .unwrap_or_default()
                            .iter()
                            .flat_map(|e| e.to_be_bytes())
                            .collect();
                        (self.l1_offset() + r.start as u64, bytes)
                    })
                    .collect()
            };
            for (at, bytes) in &pieces {
                file.write_all_at(bytes, *at)?;
            }
            file.sync_data()?;
            alloc.l1_dirty.clear();
        }

        if !alloc.pending_free.is_empty() {
            self.apply_frees(alloc)?;
            self.write_refcount_blocks(alloc)?;
        }
        Ok(())
    }

    /// Writes the dirty refcount blocks, syncs, and marks them clean.
    fn write_refcount_blocks(&self, alloc: &mut AllocState) -> Result<()> {
        let file = &self.shared.file;
        let blocks = alloc.refcounts.dirty_blocks();
        if blocks.is_empty() {
            return Ok(());
        }
        for (offset, block) in &blocks {
            file.write_all_at(block.as_bytes(), *offset)?;
        }
        file.sync_data()?;
        for (offset, block) in &blocks {
            alloc.refcounts.mark_block_clean(*offset, block);
        }
        Ok(())
    }

    /// Drops the queued references, now that no entry on disk uses them.
    fn apply_frees(&self, alloc: &mut AllocState) -> Result<()> {
        let file = &self.shared.file;
        let bits = self.cluster_bits();
        let slice_bytes = self.shared.slice_bytes;
        let mut freed: Vec<(u64, u64)> = Vec::new();
        for (offset, len, referrer) in std::mem::take(&mut alloc.pending_free) {
            let first = offset >> bits;
            let last = offset.saturating_add(len - 1) >> bits;
            for cluster in first..=last {
                let count = alloc.refcounts.get(file, cluster)?;
                if let (1, Referrer::Data, Some(held)) =
                    (count, referrer, self.guard().holder(cluster))
                {
                    // Freeing it would hand the structure out, or punch a hole in it.
                    log::warn!(
                        "{}: an L2 entry named cluster {cluster:#x}, which holds {held}; its \
                         refcount stays 1 for that",
                        file.path().display()
                    );
                    continue;
                }
                if count == 0 {
                    // A reference the refcounts never counted: the image was inconsistent
                    // already; keeping it at 0 loses nothing.
                    log::warn!(
                        "{}: dropping a reference to cluster {cluster:#x}, whose refcount is 0",
                        file.path().display()
                    );
                    continue;
                }
                alloc.refcounts.set(file, cluster, count - 1)?;
                if count == 1 {
                    match freed.last_mut() {
                        Some((first, n)) if *first + *n == cluster => *n += 1,
                        _ => freed.push((cluster, 1)),
                    }
                    alloc.cursor = alloc.cursor.min(cluster);
                    self.guard_mut().release(cluster);
                    // A freed L2 table must not be served from the cache once reused.
                    let at = cluster << bits;
                    for key in (at..at + (1 << bits)).step_by(slice_bytes as usize) {
                        self.shared.l2_cache.remove(key);
                    }
                }
            }
        }
        // Reads and in-place writes that looked a freed cluster up before its entry changed
        // finish before the cluster can be handed out again.
        drop(
            self.shared
                .io_gate
                .write()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // Nor may a freed compressed cluster be served from the decompression cache (after
        // the gate: a read that finished just now may have put it there).
        self.shared.last_compressed.clear();
        // Freed clusters give their space back to the host file system: nothing on disk
        // refers to them any more, and nothing can allocate them while we hold the mutex.
        for (first, n) in freed {
            file.punch_hole(first << bits, n << bits)?;
        }
        Ok(())
    }
}
