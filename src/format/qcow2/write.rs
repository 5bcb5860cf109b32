//! Guest writes: in place where the cluster is the active image's own (a normal cluster, or the
//! allocated subclusters of one, with COPIED set in its L2 and L1 entries), through the
//! allocation path everywhere else.
//!
//! The allocation path runs under the allocation mutex and looks the cluster up again there,
//! so two writers never allocate one guest cluster twice. Per guest cluster it:
//!
//! 1. makes the L2 table the active image's own: a new zeroed table where the L1 entry is
//!    empty, a copy (COPIED flags cleared) where the table is shared with a snapshot, the old
//!    table's reference queued for dropping; the table is written to its fresh cluster at once
//!    and the L1 entry changed in memory;
//! 2. builds the cluster's new content: the payload over what the guest saw there before
//!    (the backing file for unallocated clusters, zeros for zero clusters, the old cluster for
//!    one shared with a snapshot, the inflated data of a compressed cluster);
//! 3. writes it to a new cluster (refcount 1), or in place for a preallocated zero cluster
//!    that is the image's own, and only then publishes the L2 entry (dirty slice);
//! 4. queues the drop of the old cluster's reference (the compressed data's host clusters, a
//!    shared cluster's), applied by the next flush after the entry is on disk.
//!
//! With extended L2 entries only the subclusters a write touches become allocated; partly
//! written ones are completed from the backing file or zeros as they read before. With an
//! external data file a guest cluster always lives at its own offset in the data file, as
//! QEMU places it, and data clusters have no refcounts.

use std::sync::{Arc, PoisonError};

use crate::error::{Error, Result};
use crate::format::backing::read_below;
use crate::image::check_range;

use super::alloc::{AllocState, Referrer};
use super::cluster::{ClusterDescriptor, COPIED, OFFSET_MASK, SUBCLUSTERS};
use super::{L2Slice, Qcow2Image};

/// At most this many whole clusters are gathered into one host write (32 MiB with 64 KiB
/// clusters), so that a large request does not hold many allocated clusters unpublished.
const MAX_RUN_CLUSTERS: usize = 512;

/// New host clusters, contiguous from `host`, and the entries that will point at them.
#[derive(Default)]
struct FreshRun {
    host: u64,
    /// The guest offset of the first cluster.
    guest: u64,
    clusters: Vec<(Entry, u64)>,
}

/// Where one L2 entry lives: the cached slice holding it and its word in the slice.
#[derive(Debug, Clone, Copy)]
pub(super) struct EntrySlot {
    key: u64,
    word: usize,
}

/// An L2 entry as read for a write.
pub(super) struct Entry {
    pub desc: ClusterDescriptor,
    raw: u64,
    pub slot: EntrySlot,
}

impl Qcow2Image {
    pub(super) fn write_inner(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.shared.write_back.refuse_writes()?;
        check_range(self.virtual_size(), offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        if !self
            .shared
            .prepared
            .load(std::sync::atomic::Ordering::Acquire)
        {
            let mut alloc = self.lock_alloc();
            self.prepare_for_writes(&mut alloc)?;
        }
        let geo = self.shared.geometry;
        let end = offset + buf.len() as u64;
        // Guest ranges that need the allocation path, neighbours merged.
        let mut allocating: Vec<(u64, u64)> = Vec::new();
        {
            let _gate = self
                .shared
                .io_gate
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            let mut in_place: Vec<(u64, u64, u64)> = Vec::new();
            let mut pos = offset;
            while pos < end {
                let len = (geo.cluster_size() - geo.split(pos).in_cluster).min(end - pos);
                match self.in_place_host(pos, len)? {
                    Some(host) => match in_place.last_mut() {
                        Some((g, h, l)) if *g + *l == pos && *h + *l == host => *l += len,
                        _ => in_place.push((pos, host, len)),
                    },
                    None => match allocating.last_mut() {
                        Some((g, l)) if *g + *l == pos => *l += len,
                        _ => allocating.push((pos, len)),
                    },
                }
                pos += len;
            }
            for (guest, host, len) in in_place {
                self.write_data(request_part(buf, offset, guest, len)?, host, guest)?;
            }
        }
        for (guest, len) in allocating {
            self.write_allocating(request_part(buf, offset, guest, len)?, guest)?;
        }
        Ok(())
    }

    /// The host offset where `len` bytes at guest `pos` (inside one cluster) can be written
    /// without allocating, or `None`.
    fn in_place_host(&self, pos: u64, len: u64) -> Result<Option<u64>> {
        let geo = self.shared.geometry;
        let at = geo.split(pos);
        if self.l1_entry(at.l1_index) & COPIED == 0 {
            return Ok(None);
        }
        let Some(l2_offset) = self.l2_table_offset(at.l1_index)? else {
            return Ok(None);
        };
        let entry = self.read_entry(l2_offset, at.l2_index)?;
        let host = match entry.desc {
            ClusterDescriptor::Normal {
                host_cluster,
                copied: true,
            } => host_cluster,
            ClusterDescriptor::Subclusters {
                host_cluster: Some(host_cluster),
                alloc,
                copied: true,
                ..
            } if alloc & self.touched(at.in_cluster, len) == self.touched(at.in_cluster, len) => {
                host_cluster
            }
            _ => return Ok(None),
        };
        self.check_data_target(host)?;
        Ok(Some(host + at.in_cluster))
    }

    /// The subcluster bits `[in_cluster, in_cluster + len)` touches (`len` > 0).
    fn touched(&self, in_cluster: u64, len: u64) -> u32 {
        let bits = self.shared.geometry.subcluster_bits();
        let first = in_cluster >> bits;
        let last = (in_cluster + len - 1) >> bits;
        (((1u64 << (last + 1)) - (1u64 << first)) & u64::from(u32::MAX)) as u32
    }

    /// The raw L1 entry `l1_index` of this view (0 past its end).
    fn l1_entry(&self, l1_index: u64) -> u64 {
        let l1 = self.l1.read().unwrap_or_else(PoisonError::into_inner);
        usize::try_from(l1_index)
            .ok()
            .and_then(|i| l1.get(i).copied())
            .unwrap_or(0)
    }

    /// Entry `l2_index` of the L2 table at `l2_offset`.
    pub(super) fn read_entry(&self, l2_offset: u64, l2_index: u64) -> Result<Entry> {
        let geo = self.shared.geometry;
        let slice_bytes = self.shared.slice_bytes;
        let entry_bytes = l2_index * geo.entry_words() as u64 * 8;
        let key = l2_offset + entry_bytes / slice_bytes * slice_bytes;
        let word = (entry_bytes % slice_bytes / 8) as usize;
        let slice = self.l2_slice(key)?;
        let raw = slice.words.get(word).copied().unwrap_or(0);
        let bitmap = if geo.extended_l2 {
            slice.words.get(word + 1).copied().unwrap_or(0)
        } else {
            0
        };
        let desc = geo
            .decode(raw, bitmap)
            .map_err(|e| e.at_offset(key + word as u64 * 8))?;
        Ok(Entry {
            desc,
            raw,
            slot: EntrySlot { key, word },
        })
    }

    /// Refuses to write guest data over the image's own header, L1 or refcount table, any
    /// metadata the guard holds, or past the end of the file: an entry pointing there is
    /// corrupt (or hostile).
    pub(super) fn check_data_target(&self, host: u64) -> Result<()> {
        if self.shared.data_file.is_some() {
            return Ok(());
        }
        let cluster_size = self.shared.geometry.cluster_size();
        let h = &self.shared.header;
        let overlaps =
            |start: u64, len: u64| host < start.saturating_add(len) && start < host + cluster_size;
        let l1_bytes = u64::from(h.l1_size) * 8;
        let (table, clusters) = self.refcount_table_location();
        if host < cluster_size
            || overlaps(self.l1_offset(), l1_bytes)
            || overlaps(table, clusters * cluster_size)
            || !self.inside_file(host)?
        {
            return Err(Error::corrupt(format!(
                "an L2 entry points to host offset {host:#x}, over the image's metadata or \
                 past the end of the file"
            )));
        }
        // Data written there would change a table behind its cached copy.
        if let Some(what) = self
            .guard()
            .holder(host >> self.shared.geometry.cluster_bits)
        {
            return Err(Error::corrupt(format!(
                "an L2 entry points to host offset {host:#x}, which holds {what}"
            )));
        }
        Ok(())
    }

    /// The live refcount table's (offset, clusters).
    fn refcount_table_location(&self) -> (u64, u64) {
        let (offset, clusters) = &self.shared.refcount_table_at;
        (
            offset.load(std::sync::atomic::Ordering::Acquire),
            clusters.load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Writes `payload` at guest `offset` through the allocation path.
    fn write_allocating(&self, payload: &[u8], offset: u64) -> Result<()> {
        let geo = self.shared.geometry;
        let mut alloc = self.lock_alloc();
        let mut pos = offset;
        let mut rest = payload;
        while !rest.is_empty() {
            if geo.split(pos).in_cluster == 0 {
                let whole = self.write_fresh_clusters_locked(&mut alloc, rest, pos)?;
                if whole > 0 {
                    rest = rest.get(whole..).unwrap_or_default();
                    pos += whole as u64;
                    continue;
                }
            }
            let len = ((geo.cluster_size() - geo.split(pos).in_cluster) as usize).min(rest.len());
            let (now, later) = rest.split_at(len);
            self.write_cluster_locked(&mut alloc, now, pos)?;
            rest = later;
            pos += len as u64;
        }
        if self.shared.l2_cache.over_capacity() || alloc.refcounts.over_capacity() {
            self.flush_locked(&mut alloc)?;
        }
        Ok(())
    }

    /// Writes the whole clusters at the start of `payload` (guest `pos` is cluster aligned)
    /// that go to a new host cluster anyway, as `write_cluster_locked` would, but a run of
    /// physically contiguous new clusters with one host write, its entries published after
    /// it. Returns the bytes written: 0 when the first cluster needs the per-cluster path.
    /// Holds the allocation mutex.
    fn write_fresh_clusters_locked(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        pos: u64,
    ) -> Result<usize> {
        let geo = self.shared.geometry;
        if geo.extended_l2 {
            return Ok(0);
        }
        let cluster_size = geo.cluster_size() as usize;
        let mut done = 0;
        let mut run = FreshRun::default();
        while done + (run.clusters.len() + 1) * cluster_size <= payload.len()
            && run.clusters.len() < MAX_RUN_CLUSTERS
        {
            let guest = pos + (done + run.clusters.len() * cluster_size) as u64;
            let next = self.fresh_cluster(alloc, guest);
            let next = match next {
                Ok(Some(next)) => next,
                Ok(None) => break,
                // What the run allocated is written and published first: a failure leaves
                // no cluster counted that nothing points at.
                Err(e) => {
                    self.write_run(alloc, payload.get(done..).unwrap_or_default(), &mut run)?;
                    return Err(e);
                }
            };
            let contiguous = run.clusters.len() as u64 * cluster_size as u64;
            if !run.clusters.is_empty() && next.1 != run.host + contiguous {
                done += self.write_run(alloc, payload.get(done..).unwrap_or_default(), &mut run)?;
            }
            if run.clusters.is_empty() {
                run.host = next.1;
                run.guest = guest;
            }
            run.clusters.push(next);
        }
        done += self.write_run(alloc, payload.get(done..).unwrap_or_default(), &mut run)?;
        Ok(done)
    }

    /// The L2 entry of guest cluster `guest` and a new host cluster for it, if a whole-cluster
    /// write there takes a new one (`None`: written in place, or by subclusters).
    fn fresh_cluster(&self, alloc: &mut AllocState, guest: u64) -> Result<Option<(Entry, u64)>> {
        let at = self.shared.geometry.split(guest);
        let l2_offset = self.writable_l2(alloc, at.l1_index)?;
        let entry = self.read_entry(l2_offset, at.l2_index)?;
        let in_place = match entry.desc {
            ClusterDescriptor::Normal { copied, .. } => copied,
            ClusterDescriptor::Zero {
                preallocated: Some(_),
            } => entry.raw & COPIED != 0,
            ClusterDescriptor::Subclusters { .. } => true,
            _ => false,
        };
        if in_place {
            return Ok(None);
        }
        let host = self.alloc_data_cluster(alloc, guest)?;
        Ok(Some((entry, host)))
    }

    /// Writes `run`'s clusters from the start of `payload` with one host write, then
    /// publishes their entries and queues the drop of what they replaced; empties the run
    /// and returns the bytes written.
    fn write_run(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        run: &mut FreshRun,
    ) -> Result<usize> {
        if run.clusters.is_empty() {
            return Ok(0);
        }
        let bytes = run.clusters.len() * self.shared.geometry.cluster_size() as usize;
        let data = payload
            .get(..bytes)
            .ok_or_else(|| Error::out_of_range("internal: cluster run past its payload"))?;
        self.write_data(data, run.host, run.guest)?;
        let updates: Vec<(EntrySlot, u64)> = run
            .clusters
            .iter()
            .map(|(entry, host)| (entry.slot, host | COPIED))
            .collect();
        self.publish_all(&updates)?;
        for (entry, _) in run.clusters.drain(..) {
            self.drop_reference(alloc, &entry.desc);
        }
        Ok(bytes)
    }

    /// Writes `payload` at guest `pos`, all inside one cluster. Holds the allocation mutex.
    fn write_cluster_locked(&self, alloc: &mut AllocState, payload: &[u8], pos: u64) -> Result<()> {
        let geo = self.shared.geometry;
        let cluster_size = geo.cluster_size() as usize;
        let at = geo.split(pos);
        let in_cluster = at.in_cluster as usize;
        let guest_cluster = pos - at.in_cluster;
        let l2_offset = self.writable_l2(alloc, at.l1_index)?;
        let entry = self.read_entry(l2_offset, at.l2_index)?;
        if let ClusterDescriptor::Subclusters { .. } = entry.desc {
            return self.write_subclusters_locked(alloc, payload, pos, &entry);
        }
        match entry.desc {
            ClusterDescriptor::Normal {
                host_cluster,
                copied: true,
            } => {
                // Allocated by another writer since our lookup.
                self.check_data_target(host_cluster)?;
                return self.write_data(payload, host_cluster + at.in_cluster, pos);
            }
            ClusterDescriptor::Zero {
                preallocated: Some(host_cluster),
            } if entry.raw & COPIED != 0 => {
                // The image's own preallocated cluster: zero the rest and keep using it.
                self.check_data_target(host_cluster)?;
                let mut cluster = vec![0u8; cluster_size];
                merge(&mut cluster, payload, in_cluster)?;
                self.write_data(&cluster, host_cluster, guest_cluster)?;
                return self.publish(entry.slot, host_cluster | COPIED, None);
            }
            _ => {}
        }
        let mut cluster = if payload.len() == cluster_size {
            vec![0u8; cluster_size]
        } else {
            self.old_content(&entry.desc, guest_cluster)?
        };
        merge(&mut cluster, payload, in_cluster)?;
        let host = self.alloc_data_cluster(alloc, guest_cluster)?;
        self.write_data(&cluster, host, guest_cluster)?;
        // A compressed cluster of an extended L2 image becomes a wholly allocated one.
        let bitmap = geo.extended_l2.then_some(u64::from(u32::MAX));
        self.publish(entry.slot, host | COPIED, bitmap)?;
        self.drop_reference(alloc, &entry.desc);
        Ok(())
    }

    /// What guest cluster `guest_cluster` described by `desc` reads as, whole.
    fn old_content(&self, desc: &ClusterDescriptor, guest_cluster: u64) -> Result<Vec<u8>> {
        let cluster_size = self.shared.geometry.cluster_size() as usize;
        let mut cluster = vec![0u8; cluster_size];
        match *desc {
            ClusterDescriptor::Unallocated => {
                self.read_below_clipped(&mut cluster, guest_cluster)?
            }
            ClusterDescriptor::Zero { .. } => {}
            ClusterDescriptor::Normal { host_cluster, .. } => {
                self.read_data(&mut cluster, host_cluster, guest_cluster)?
            }
            ClusterDescriptor::Compressed { host_offset, len } => {
                cluster.copy_from_slice(&self.decompressed(host_offset, len)?)
            }
            ClusterDescriptor::Subclusters { .. } => {
                return Err(Error::out_of_range(
                    "internal: subclusters read as one cluster",
                ))
            }
        }
        Ok(cluster)
    }

    /// Fills `part` with what lies below guest offset `guest`, zeros past the disk's end.
    fn read_below_clipped(&self, part: &mut [u8], guest: u64) -> Result<()> {
        let inside = self
            .virtual_size()
            .saturating_sub(guest)
            .min(part.len() as u64) as usize;
        let (head, tail) = part.split_at_mut(inside);
        read_below(self.shared.backing.as_ref(), head, guest)?;
        tail.fill(0);
        Ok(())
    }

    /// A host cluster for new data of guest cluster `guest_cluster`: in an external data file
    /// the guest cluster's own offset (no refcount), else a new cluster of the image file.
    fn alloc_data_cluster(&self, alloc: &mut AllocState, guest_cluster: u64) -> Result<u64> {
        if self.shared.data_file.is_some() {
            return Ok(guest_cluster);
        }
        self.alloc_cluster(alloc)
    }

    /// Queues the drop of the reference an entry described by `desc` held, now replaced.
    pub(super) fn drop_reference(&self, alloc: &mut AllocState, desc: &ClusterDescriptor) {
        let cluster_size = self.shared.geometry.cluster_size();
        let external = self.shared.data_file.is_some();
        match *desc {
            ClusterDescriptor::Compressed { host_offset, len } => {
                alloc.defer_free(host_offset, len, Referrer::Data)
            }
            ClusterDescriptor::Normal { host_cluster, .. }
            | ClusterDescriptor::Zero {
                preallocated: Some(host_cluster),
            }
            | ClusterDescriptor::Subclusters {
                host_cluster: Some(host_cluster),
                ..
            } if !external => alloc.defer_free(host_cluster, cluster_size, Referrer::Data),
            _ => {}
        }
    }

    /// Stores new L2 entries (no extended bitmaps), each slice copied once for the entries in
    /// it that follow one another.
    fn publish_all(&self, updates: &[(EntrySlot, u64)]) -> Result<()> {
        let missing = || Error::out_of_range("internal: L2 entry outside its slice");
        for group in updates.chunk_by(|a, b| a.0.key == b.0.key) {
            let key = group[0].0.key;
            let mut words = self.l2_slice(key)?.words.clone();
            for &(slot, entry) in group {
                *words.get_mut(slot.word).ok_or_else(missing)? = entry;
            }
            self.shared
                .l2_cache
                .insert_dirty(key, Arc::new(L2Slice { words }));
        }
        Ok(())
    }

    /// Stores a new L2 entry (and extended bitmap) as a dirty slice.
    pub(super) fn publish(&self, slot: EntrySlot, entry: u64, bitmap: Option<u64>) -> Result<()> {
        let slice = self.l2_slice(slot.key)?;
        let mut words = slice.words.clone();
        let missing = || Error::out_of_range("internal: L2 entry outside its slice");
        *words.get_mut(slot.word).ok_or_else(missing)? = entry;
        if let Some(bitmap) = bitmap {
            *words.get_mut(slot.word + 1).ok_or_else(missing)? = bitmap;
        }
        self.shared
            .l2_cache
            .insert_dirty(slot.key, Arc::new(L2Slice { words }));
        Ok(())
    }

    /// The L2 table of L1 entry `l1_index`, made the active image's own (see the module doc).
    pub(super) fn writable_l2(&self, alloc: &mut AllocState, l1_index: u64) -> Result<u64> {
        let entry = self.l1_entry(l1_index);
        let old = self.l2_table_offset(l1_index)?;
        if let Some(old) = old {
            if entry & COPIED != 0 {
                return Ok(old);
            }
        }
        let index = usize::try_from(l1_index)
            .ok()
            .filter(|&i| i < self.l1.read().map(|l1| l1.len()).unwrap_or(0))
            .ok_or_else(|| {
                Error::out_of_range(format!("L1 index {l1_index} past the end of the L1 table"))
            })?;
        let geo = self.shared.geometry;
        let cluster_size = geo.cluster_size();
        let file = &self.shared.file;
        let new = self.alloc_cluster(alloc)?;
        let mut table = vec![0u8; cluster_size as usize];
        if let Some(old) = old {
            file.read_exact_at(&mut table, old)?;
            // The copy's clusters are shared with the snapshot that keeps the old table.
            for entry in table.chunks_exact_mut(8 * geo.entry_words()) {
                if let Some(first) = entry.first_mut() {
                    *first &= 0x7f;
                }
            }
        }
        for key in (new..new + cluster_size).step_by(self.shared.slice_bytes as usize) {
            self.shared.l2_cache.remove(key);
        }
        file.write_all_at(&table, new)?;
        self.guard_mut()
            .hold(new >> geo.cluster_bits, 1, "an L2 table");
        // Only now does the L1 entry stop using the old table: dropped earlier, a failed
        // write would leave the entry on it and its reference dropped by the next flush.
        if let Some(old) = old {
            alloc.defer_free(old, cluster_size, Referrer::Metadata);
        }
        {
            let mut l1 = self.l1.write().unwrap_or_else(PoisonError::into_inner);
            if let Some(slot) = l1.get_mut(index) {
                *slot = new | COPIED;
            }
        }
        alloc.l1_dirty.mark(index * 8);
        Ok(new & OFFSET_MASK)
    }

    /// Writes `payload` at guest `pos` into a cluster with extended L2 entries.
    fn write_subclusters_locked(
        &self,
        alloc: &mut AllocState,
        payload: &[u8],
        pos: u64,
        entry: &Entry,
    ) -> Result<()> {
        let ClusterDescriptor::Subclusters {
            host_cluster,
            alloc: allocated,
            zero,
            copied,
        } = entry.desc
        else {
            return Err(Error::out_of_range("internal: not a subcluster entry"));
        };
        let geo = self.shared.geometry;
        let bits = geo.subcluster_bits();
        let cluster_size = geo.cluster_size();
        let at = geo.split(pos);
        let guest_cluster = pos - at.in_cluster;
        let start = at.in_cluster;
        let end = start + payload.len() as u64;
        let touched = self.touched(start, payload.len() as u64);
        let first = start >> bits;
        let last = (end - 1) >> bits;
        let bitmap = |alloc: u32, zero: u32| (u64::from(zero) << 32) | u64::from(alloc);
        let new_alloc = allocated | touched;
        let new_zero = zero & !touched;
        match host_cluster {
            Some(host) if copied => {
                // The image's own cluster: complete the touched subclusters that were not
                // allocated; allocated ones keep every byte outside the payload, which other
                // writers may be writing in place right now.
                self.check_data_target(host)?;
                let span_start = first << bits;
                let span_end = (last + 1) << bits;
                let mut buf = vec![0u8; (span_end - span_start) as usize];
                self.fill_subclusters(&mut buf, span_start, guest_cluster, allocated, zero)?;
                merge(&mut buf, payload, (start - span_start) as usize)?;
                let lo = if allocated & (1 << first) != 0 {
                    start
                } else {
                    span_start
                };
                let hi = if allocated & (1 << last) != 0 {
                    end
                } else {
                    span_end
                };
                let part = buf
                    .get((lo - span_start) as usize..(hi - span_start) as usize)
                    .ok_or_else(|| Error::out_of_range("internal: subcluster span"))?;
                self.write_data(part, host + lo, guest_cluster + lo)?;
                self.publish(entry.slot, host | COPIED, Some(bitmap(new_alloc, new_zero)))
            }
            _ => {
                // A new cluster: the old one's allocated subclusters are copied, the touched
                // ones completed; untouched unallocated or zero ones stay so.
                let keep_old = host_cluster.is_some() && allocated & !touched != 0;
                let (lo, hi) = if keep_old {
                    (0, cluster_size)
                } else {
                    (first << bits, (last + 1) << bits)
                };
                let mut buf = vec![0u8; (hi - lo) as usize];
                if let Some(old) = host_cluster {
                    self.read_data(&mut buf, old + lo, guest_cluster + lo)?;
                }
                self.fill_subclusters(&mut buf, lo, guest_cluster, allocated | !touched, zero)?;
                merge(&mut buf, payload, (start - lo) as usize)?;
                let host = self.alloc_data_cluster(alloc, guest_cluster)?;
                self.write_data(&buf, host + lo, guest_cluster + lo)?;
                self.publish(entry.slot, host | COPIED, Some(bitmap(new_alloc, new_zero)))?;
                self.drop_reference(alloc, &entry.desc);
                Ok(())
            }
        }
    }

    /// Fills the subclusters of `buf` (which starts `buf_start` bytes into guest cluster
    /// `guest_cluster`) whose `keep` bit is clear: zeros where their `zero` bit is set, the
    /// layer below otherwise.
    fn fill_subclusters(
        &self,
        buf: &mut [u8],
        buf_start: u64,
        guest_cluster: u64,
        keep: u32,
        zero: u32,
    ) -> Result<()> {
        let bits = self.shared.geometry.subcluster_bits();
        let sub = 1usize << bits;
        let first = (buf_start >> bits) as u32;
        for (i, part) in buf.chunks_mut(sub).enumerate() {
            let sc = first + i as u32;
            if sc >= SUBCLUSTERS || keep & (1 << sc) != 0 {
                continue;
            }
            if zero & (1 << sc) != 0 {
                part.fill(0);
            } else {
                self.read_below_clipped(part, guest_cluster + (u64::from(sc) << bits))?;
            }
        }
        Ok(())
    }
}

/// The part of request buffer `buf` (for guest offset `base`) covering `[guest, guest + len)`.
fn request_part(buf: &[u8], base: u64, guest: u64, len: u64) -> Result<&[u8]> {
    let start = (guest - base) as usize;
    start
        .checked_add(len as usize)
        .and_then(|end| buf.get(start..end))
        .ok_or_else(|| Error::out_of_range("internal: write run outside the request"))
}

/// Stores `part` into `cluster` at `at`.
fn merge(cluster: &mut [u8], part: &[u8], at: usize) -> Result<()> {
    at.checked_add(part.len())
        .and_then(|end| cluster.get_mut(at..end))
        .ok_or_else(|| Error::out_of_range("internal: merge outside the cluster"))?
        .copy_from_slice(part);
    Ok(())
}
