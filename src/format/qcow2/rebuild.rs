//! What the first write of a writable open does before changing anything: clear the autoclear
//! feature bits imgfs does not maintain, and, when the dirty bit says the refcounts on disk are
//! stale (lazy refcounts, then a crash), rebuild them from every table that references clusters
//! and clear the dirty bit; then note where the metadata is (guard.rs). Opening alone never
//! modifies the file.
//!
//! The rebuild counts one reference per use, as `qemu-img check` does: the header cluster, the
//! active and every snapshot's L1 table, every L2 table each of them reaches (a table shared by
//! two L1 tables counts twice) and every data or compressed cluster those entries name, the
//! refcount table and its blocks, the snapshot table, and an encrypted image's LUKS header.
//! Blocks that are missing for counted clusters (and a larger table when needed) go to fresh
//! clusters after everything counted.
//! The new refcounts are written by a full flush while the dirty bit is still set; only then is
//! the bit cleared, so a crash in between leaves an image QEMU rebuilds again.
//!
//! `imgfs check` (check.rs) counts with the same code, in recording mode: where the rebuild
//! refuses an image (a table past the end of the file, an unaligned entry), the check notes
//! the problem in qemu-img's words and goes on counting.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};

use super::alloc::AllocState;
use super::cluster::{ClusterDescriptor, OFFSET_MASK};
use super::counts::ClusterCounts;
use super::header::{AUTOCLEAR_DATA_FILE_RAW, INCOMPAT_DIRTY};
use super::refcount::plan_fresh;
use super::{read_l1, Qcow2Image};

const OFF_INCOMPATIBLE: u64 = 72;
const OFF_AUTOCLEAR: u64 = 88;

impl Qcow2Image {
    /// Runs the first write's header changes once; later calls return at once.
    pub(super) fn prepare_for_writes(&self, alloc: &mut AllocState) -> Result<()> {
        if alloc.prepared {
            return Ok(());
        }
        let file = &self.shared.file;
        let write_back = &self.shared.write_back;
        if self.shared.header.version >= 3 {
            // The raw data file bit is kept true by writing guest data at guest offsets; every
            // other autoclear bit (persistent bitmaps among them) describes data imgfs does not
            // update, so it must go before the first write, as the spec requires.
            let autoclear = alloc.autoclear & AUTOCLEAR_DATA_FILE_RAW;
            if autoclear != alloc.autoclear {
                write_back.run(file.path(), || {
                    file.write_all_at(&autoclear.to_be_bytes(), OFF_AUTOCLEAR)?;
                    file.sync_data()
                })?;
                alloc.autoclear = autoclear;
            }
            if alloc.incompatible & INCOMPAT_DIRTY != 0 {
                // Metadata that overlaps (a refcount block on an L2 table) is refused before
                // the rebuild writes every refcount block over whatever shares its cluster.
                self.metadata_guard(alloc)?;
                log::info!("{}: rebuilding dirty refcounts", file.path().display());
                let incompatible = alloc.incompatible & !INCOMPAT_DIRTY;
                write_back.run(file.path(), || {
                    self.rebuild_refcounts(alloc)?;
                    self.flush_locked(alloc)?;
                    file.write_all_at(&incompatible.to_be_bytes(), OFF_INCOMPATIBLE)?;
                    file.sync_data()
                })?;
                alloc.incompatible = incompatible;
            }
        }
        *self.guard_mut() = self.metadata_guard(alloc)?;
        alloc.prepared = true;
        self.shared.prepared.store(true, Ordering::Release);
        Ok(())
    }

    /// Recomputes every refcount from the tables and installs them (dirty, for the flush).
    pub(super) fn rebuild_refcounts(&self, alloc: &mut AllocState) -> Result<()> {
        let shared = &self.shared;
        let file = &shared.file;
        if shared.header.bitmaps.is_some() {
            return Err(Error::unsupported(
                "rebuilding the refcounts of an image with persistent bitmaps",
            ));
        }
        let cluster_size = shared.geometry.cluster_size();
        let file_clusters = file.len()?.div_ceil(cluster_size);
        let mut counts = Counts::new(shared.geometry.cluster_bits, file_clusters, false);
        counts.add(0, cluster_size)?;
        let l1 = self.l1.read().map(|l1| l1.clone()).unwrap_or_default();
        counts.add(self.l1_offset(), l1.len() as u64 * 8)?;
        self.count_l1(&mut counts, &l1, &mut |_| {})?;
        for snapshot in &shared.snapshots {
            let l1 = read_l1(file, snapshot.l1_table_offset, snapshot.l1_size)?;
            counts.add(snapshot.l1_table_offset, u64::from(snapshot.l1_size) * 8)?;
            self.count_l1(&mut counts, &l1, &mut |_| {})?;
        }
        if shared.header.nb_snapshots > 0 {
            counts.add(shared.header.snapshots_offset, shared.snapshot_table_len)?;
        }
        if let Some((offset, length)) = shared.header.luks_area() {
            counts.add(offset, length)?;
        }
        let (table_offset, table_clusters) = alloc.refcounts.table_location();
        counts.add(table_offset, table_clusters * cluster_size)?;
        let table = alloc.refcounts.table(file)?.to_vec();
        let bits = alloc.refcounts.block_bits();
        for (index, &entry) in table.iter().enumerate() {
            let block = entry & OFFSET_MASK;
            if block != 0 {
                if block % cluster_size != 0 {
                    return Err(Error::corrupt(format!(
                        "refcount table entry {index} points to {block:#x}, not cluster aligned"
                    )));
                }
                counts.add(block, cluster_size)?;
            }
        }
        let has_block = |i: u64| {
            usize::try_from(i)
                .ok()
                .and_then(|i| table.get(i))
                .is_some_and(|&e| e & OFFSET_MASK != 0)
        };
        let need: BTreeSet<u64> = counts
            .map
            .iter()
            .map(|(c, _)| c >> bits)
            .filter(|&i| !has_block(i))
            .collect();
        let start = counts.map.last().map_or(0, |c| c + 1).max(file_clusters);
        let shape = self.refcount_shape(alloc, table.len() as u64);
        let plan = plan_fresh(shape, &has_block, &need, start)?;
        if plan.table.is_some() {
            // The old table is replaced; its clusters are free once the header points away.
            let first = table_offset / cluster_size;
            for cluster in first..first + table_clusters {
                counts.remove_one(cluster);
            }
        }
        for cluster in start..plan.end {
            counts.map.add_one(cluster);
        }
        let old_blocks: Vec<(u64, u64)> = table
            .iter()
            .enumerate()
            .filter(|(_, &e)| e & OFFSET_MASK != 0)
            .map(|(i, &e)| (i as u64, e & OFFSET_MASK))
            .collect();
        if let Some((cluster, clusters, entries)) = plan.table {
            let mut entries_vec = table;
            entries_vec.resize(entries as usize, 0);
            alloc.refcounts.install_table(
                cluster << shared.geometry.cluster_bits,
                clusters,
                entries_vec,
            );
            self.note_table_location(alloc);
        }
        for &(index, cluster) in &plan.blocks {
            let block = self.block_from_counts(alloc, index, &counts.map)?;
            let offset = cluster << shared.geometry.cluster_bits;
            // In the file before the table can point at it.
            file.write_all_at(block.as_bytes(), offset)?;
            alloc.refcounts.install_block(file, index, offset, block)?;
        }
        for (index, offset) in old_blocks {
            let block = self.block_from_counts(alloc, index, &counts.map)?;
            alloc.refcounts.install_block(file, index, offset, block)?;
        }
        if let Some((cluster, _, _)) = plan.table {
            let bytes = alloc.refcounts.table_bytes(file)?;
            file.write_all_at(&bytes, cluster << shared.geometry.cluster_bits)?;
        }
        alloc.cursor = 0;
        Ok(())
    }

    /// Counts the L2 tables `l1` names and the clusters their entries use, telling `seen`
    /// about each L1 entry and each L2 entry that decodes.
    pub(super) fn count_l1(
        &self,
        counts: &mut Counts,
        l1: &[u64],
        seen: &mut dyn FnMut(Seen),
    ) -> Result<()> {
        let shared = &self.shared;
        let geo = shared.geometry;
        let cluster_size = geo.cluster_size();
        let external = shared.data_file.is_some();
        let mut table = vec![0u8; cluster_size as usize];
        for (index, &entry) in l1.iter().enumerate() {
            seen(Seen::L1 { index, entry });
            let l2 = entry & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if l2 % cluster_size != 0 {
                counts.problem(format!(
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                ))?;
                continue;
            }
            // A table past the end of the file has nothing to read (check mode goes on).
            if !counts.add(l2, cluster_size)? {
                continue;
            }
            shared.file.read_exact_at(&mut table, l2)?;
            let words: Vec<u64> = table
                .chunks_exact(8)
                .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
                .collect();
            for (at, pair) in words.chunks_exact(geo.entry_words()).enumerate() {
                let entry = pair.first().copied().unwrap_or(0);
                let bitmap = pair.get(1).copied().unwrap_or(0);
                let desc = match geo.decode(entry, bitmap) {
                    Ok(desc) => desc,
                    Err(e) if counts.recording() => {
                        counts.problem(decode_problem(entry, cluster_size, &e))?;
                        continue;
                    }
                    Err(e) => return Err(e.at_offset(l2 + (at * pair.len() * 8) as u64)),
                };
                seen(Seen::L2 { entry, desc });
                match desc {
                    ClusterDescriptor::Compressed { host_offset, len } => {
                        counts.add(host_offset, len)?;
                    }
                    ClusterDescriptor::Normal { host_cluster, .. }
                    | ClusterDescriptor::Zero {
                        preallocated: Some(host_cluster),
                    }
                    | ClusterDescriptor::Subclusters {
                        host_cluster: Some(host_cluster),
                        ..
                    } if !external => {
                        counts.add(host_cluster, cluster_size)?;
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// What `count_l1` reports to its caller besides the counts.
#[derive(Debug, Clone, Copy)]
pub(super) enum Seen {
    /// An L1 entry (every one, in order, so a check can show its progress).
    L1 { index: usize, entry: u64 },
    /// An L2 entry that decoded, with its raw value.
    L2 { entry: u64, desc: ClusterDescriptor },
}

/// qemu-img check's line for an L2 entry that does not decode.
fn decode_problem(entry: u64, cluster_size: u64, e: &Error) -> String {
    let offset = entry & OFFSET_MASK;
    if entry & super::cluster::COMPRESSED == 0 && offset % cluster_size != 0 {
        format!("ERROR offset={offset:x}: Cluster is not properly aligned; L2 entry corrupted.")
    } else {
        format!("ERROR L2 entry {entry:#018x}: {e}")
    }
}

/// References per host cluster. Clusters past the end of the file are refused, or in
/// recording mode (`imgfs check`) noted as problems and left uncounted.
pub(super) struct Counts {
    pub map: ClusterCounts,
    bits: u32,
    file_clusters: u64,
    /// The problems found, when recording instead of refusing.
    problems: Option<Vec<String>>,
}

impl Counts {
    pub fn new(bits: u32, file_clusters: u64, recording: bool) -> Self {
        Counts {
            map: ClusterCounts::new(),
            bits,
            file_clusters,
            problems: recording.then(Vec::new),
        }
    }

    pub fn recording(&self) -> bool {
        self.problems.is_some()
    }

    /// Notes a problem when recording; otherwise it is the error that refuses the image.
    pub fn problem(&mut self, message: String) -> Result<()> {
        match &mut self.problems {
            Some(problems) => {
                problems.push(message);
                Ok(())
            }
            None => Err(Error::corrupt(message)),
        }
    }

    /// The problems noted so far (recording mode), taken out.
    pub fn take_problems(&mut self) -> Vec<String> {
        self.problems
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Counts one reference to each cluster of `[offset, offset + len)`; false when the range
    /// lies past the end of the file and was noted instead.
    pub fn add(&mut self, offset: u64, len: u64) -> Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        let first = offset >> self.bits;
        let last = offset.saturating_add(len - 1) >> self.bits;
        if last >= self.file_clusters {
            self.problem(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {len:#x}"
            ))?;
            return Ok(false);
        }
        for cluster in first..=last {
            self.map.add_one(cluster);
        }
        Ok(true)
    }

    /// The references counted for `cluster`.
    pub fn get(&self, cluster: u64) -> u64 {
        self.map.get(cluster)
    }

    fn remove_one(&mut self, cluster: u64) {
        self.map.remove_one(cluster);
    }
}
