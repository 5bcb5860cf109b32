//! The metadata guard: which host clusters hold metadata, so that the allocator never hands
//! one out because a hostile or damaged image gives it refcount 0, and no guest data is written
//! over one because a hostile L2 entry names it.
//!
//! The allocator trusts refcounts, as QEMU does. QEMU also refuses to write over metadata it
//! knows about (its "cached" overlap check); this is the same protection, computed at the
//! first write from what is in memory then (the header cluster, the active L1 table and the L2
//! tables it names, the refcount table and its blocks, the snapshot table and the snapshots'
//! L1 tables, an encrypted image's LUKS header) and kept up to date with the L2 tables and refcount structures imgfs writes
//! later. Without it, data or a new table written over, say, the L1 table corrupts the image
//! further and reads back as something else; data written in place over an L2 table changes it
//! on disk behind its cached copy. A structure imgfs itself frees (an L2 table replaced on
//! copy, an old refcount table) leaves the guard once its refcount drops to 0. An L2 entry
//! naming a guarded cluster does not free it when the entry is overwritten: that reference was
//! the damage, and the structure's own reference stays.

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, Result};

use super::alloc::AllocState;
use super::cluster::OFFSET_MASK;
use super::Qcow2Image;

/// Disjoint ranges of host cluster numbers, `start -> (end, what they hold)`.
#[derive(Debug, Default)]
pub struct MetadataGuard {
    ranges: BTreeMap<u64, (u64, &'static str)>,
}

impl MetadataGuard {
    /// Adds clusters `[first, end)`, merging with the ranges they overlap, and with those they
    /// touch that hold the same thing (so each range keeps naming what it holds).
    fn add(&mut self, mut first: u64, mut end: u64, mut what: &'static str) {
        if first >= end {
            return;
        }
        // The range starting at or before `first` may reach into it.
        if let Some((&start, &(stop, name))) = self.ranges.range(..=first).next_back() {
            if stop > first || (stop == first && name == what) {
                self.ranges.remove(&start);
                first = start;
                end = end.max(stop);
                what = name;
            }
        }
        let later: Vec<(u64, &'static str)> = self
            .ranges
            .range(first..=end)
            .map(|(&s, &(_, name))| (s, name))
            .collect();
        for (start, name) in later {
            if start == end && name != what {
                continue;
            }
            if let Some((stop, _)) = self.ranges.remove(&start) {
                end = end.max(stop);
            }
        }
        self.ranges.insert(first, (end, what));
    }

    /// Adds the clusters of bytes `[offset, offset + len)` for clusters of `1 << bits` bytes.
    fn add_bytes(&mut self, offset: u64, len: u64, bits: u32, what: &'static str) {
        if len == 0 {
            return;
        }
        let first = offset >> bits;
        let last = offset.saturating_add(len - 1) >> bits;
        self.add(first, last.saturating_add(1), what);
    }

    /// What cluster `cluster` holds, if it is guarded.
    pub fn holder(&self, cluster: u64) -> Option<&'static str> {
        let (_, &(end, what)) = self.ranges.range(..=cluster).next_back()?;
        (cluster < end).then_some(what)
    }

    /// Refuses to use clusters `[first, first + count)` if any of them holds metadata.
    pub fn check(&self, first: u64, count: u64) -> Result<()> {
        let end = first.saturating_add(count);
        let hit = self.holder(first).map(|what| (first, what)).or_else(|| {
            let (&start, &(_, what)) = self.ranges.range(first..end).next()?;
            Some((start, what))
        });
        match hit {
            None => Ok(()),
            Some((cluster, what)) => Err(Error::corrupt(format!(
                "host cluster {cluster:#x} has refcount 0 but holds {what}: the image's \
                 refcounts are wrong (`qemu-img check -r all` repairs them); refusing to write \
                 over it"
            ))),
        }
    }

    /// Clusters `[first, first + count)` now hold `what`, new metadata imgfs wrote.
    pub fn hold(&mut self, first: u64, count: u64, what: &'static str) {
        self.add(first, first.saturating_add(count), what);
    }

    /// Cluster `cluster` was freed by imgfs (its refcount dropped to 0): it may be reused.
    pub fn release(&mut self, cluster: u64) {
        let Some((&start, &(end, what))) = self.ranges.range(..=cluster).next_back() else {
            return;
        };
        if cluster >= end {
            return;
        }
        self.ranges.remove(&start);
        if start < cluster {
            self.ranges.insert(start, (cluster, what));
        }
        if cluster + 1 < end {
            self.ranges.insert(cluster + 1, (end, what));
        }
    }
}

impl Qcow2Image {
    pub(super) fn guard(&self) -> RwLockReadGuard<'_, MetadataGuard> {
        self.shared
            .guard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn guard_mut(&self) -> RwLockWriteGuard<'_, MetadataGuard> {
        self.shared
            .guard
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The guard of the metadata this image holds now (see the module doc). An L2 table or a
    /// refcount block that lies on the header, an L1 table, the refcount table or the snapshot
    /// table is refused as corrupt: writing its entries would rewrite that structure (QEMU's
    /// overlap check refuses the same writes).
    pub(super) fn metadata_guard(&self, alloc: &mut AllocState) -> Result<MetadataGuard> {
        let shared = &self.shared;
        let bits = shared.geometry.cluster_bits;
        let cluster_size = shared.geometry.cluster_size();
        let mut guard = MetadataGuard::default();
        guard.add_bytes(0, cluster_size, bits, "the header");
        let l1 = self.l1.read().unwrap_or_else(|p| p.into_inner()).clone();
        guard.add_bytes(self.l1_offset(), l1.len() as u64 * 8, bits, "the L1 table");
        let (table_offset, table_clusters) = alloc.refcounts.table_location();
        guard.add_bytes(
            table_offset,
            table_clusters.saturating_mul(cluster_size),
            bits,
            "the refcount table",
        );
        // An encrypted image's key slots: data written over them would lock the image.
        if let Some((offset, length)) = shared.header.luks_area() {
            guard.add_bytes(offset, length, bits, "the LUKS header");
        }
        if shared.header.nb_snapshots > 0 {
            guard.add_bytes(
                shared.header.snapshots_offset,
                shared.snapshot_table_len,
                bits,
                "the snapshot table",
            );
        }
        for snapshot in &shared.snapshots {
            guard.add_bytes(
                snapshot.l1_table_offset,
                u64::from(snapshot.l1_size) * 8,
                bits,
                "a snapshot's L1 table",
            );
        }
        let mut tables = Vec::new();
        for &entry in alloc.refcounts.table(&shared.file)? {
            tables.push((entry & OFFSET_MASK, "a refcount block"));
        }
        for &entry in l1.iter() {
            tables.push((entry & OFFSET_MASK, "an L2 table"));
        }
        // An L2 table may be named twice (shared, copied on write); nothing else may overlap.
        let mut l2_tables = std::collections::BTreeSet::new();
        for (offset, what) in tables.into_iter().filter(|&(offset, _)| offset != 0) {
            if what == "an L2 table" && !l2_tables.insert(offset) {
                continue;
            }
            if let Some(held) = guard.holder(offset >> bits) {
                return Err(Error::corrupt(format!(
                    "{what} at {offset:#x} lies on {held}: writing it would rewrite that, so \
                     writes are refused (`qemu-img check` reports the image)"
                )));
            }
            guard.add_bytes(offset, cluster_size, bits, what);
        }
        Ok(guard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_answer_for_every_cluster() {
        let mut g = MetadataGuard::default();
        g.add(10, 12, "a");
        g.add(20, 21, "b");
        g.add(11, 15, "c");
        g.add(5, 6, "d");
        g.add(15, 20, "e");
        // Overlapping ranges merge; touching ones keep naming what they hold.
        assert_eq!(g.ranges.len(), 4, "{:?}", g.ranges);
        assert_eq!(g.holder(14), Some("a"));
        assert_eq!(g.holder(15), Some("e"));
        assert_eq!(g.holder(20), Some("b"));
        g.add(21, 23, "b");
        assert_eq!(g.ranges.len(), 4, "same holder, touching: merged");
        assert_eq!(g.holder(4), None);
        assert_eq!(g.holder(5), Some("d"));
        assert_eq!(g.holder(6), None);
        assert!((10..23).all(|c| g.holder(c).is_some()));
        assert_eq!(g.holder(23), None);
        assert!(g.check(0, 5).is_ok());
        assert!(g.check(0, 6).is_err(), "a run reaching into a range");
        assert!(g.check(6, 4).is_ok());
        let e = g.check(12, 1).unwrap_err();
        assert!(e.to_string().contains("refcount 0 but holds"), "{e}");
    }

    #[test]
    fn released_clusters_leave_the_guard() {
        let mut g = MetadataGuard::default();
        g.add_bytes(4096, 3 * 4096, 12, "t");
        assert!(g.check(1, 3).is_err());
        g.release(2);
        assert!(g.check(2, 1).is_ok());
        assert!(g.check(1, 1).is_err() && g.check(3, 1).is_err());
        g.release(1);
        g.release(3);
        g.release(7);
        assert!(g.ranges.is_empty());
    }
}
