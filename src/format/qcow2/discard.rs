//! Discard for qcow2: whole guest clusters lose their data cluster; in partial ones the
//! image's own data is punched in place, and what else would not read as zeros is written
//! with zeros.
//!
//! A whole cluster's L2 entry becomes unallocated (0) when the image has no backing file, or
//! a zero cluster when it has one (the zero flag in version 3, all subclusters zero with
//! extended L2), so it reads as zeros and never falls through to the backing file. Its old
//! data cluster's reference is queued like any dropped reference (alloc.rs): the refcount
//! drops only in the flush after the L2 entry is on disk, and a cluster whose refcount
//! reaches 0 there has its host range punched (`apply_frees`), after in-flight I/O that
//! looked it up drained (`io_gate`) and before the allocator can hand it out again. A cluster
//! still shared with an internal snapshot keeps its data.
//!
//! Where an entry cannot say "zero" (version 2 with a backing file) or data clusters live in
//! an external data file (no refcounts), the clusters stay mapped: the image's own data is
//! punched in place, and whatever would still read non-zero (backing data, shared or
//! compressed clusters) is written with zeros.
//!
//! A crash before the flush leaves the old entries (the discard is lost, as an unflushed
//! write is); after the L2 write but before the refcounts, a leaked cluster; never an entry
//! pointing at a punched or reused cluster.

use super::cluster::{ClusterDescriptor, Mapping, ZERO_FLAG};
use super::Qcow2Image;
use crate::error::{Error, Result};
use crate::image::{check_span, split_aligned, zero_fill};

impl Qcow2Image {
    pub(super) fn discard_inner(&self, offset: u64, len: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        self.shared.write_back.refuse_writes()?;
        check_span(self.virtual_size(), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // As before any write: the first one's header changes (autoclear bits, a refcount
        // rebuild) go first.
        self.prepare_for_writes(&mut self.lock_alloc())?;
        let geo = self.shared.geometry;
        let (head, (first, count), tail) = split_aligned(offset, len, geo.cluster_size());
        self.punch_in_place(head.0, head.1)?;
        self.punch_in_place(tail.0, tail.1)?;
        if count == 0 {
            return Ok(());
        }
        let start = first << geo.cluster_bits;
        let whole = count << geo.cluster_bits;
        let backing = self.shared.backing.is_some();
        if self.shared.data_file.is_some() || (backing && !geo.zero_flag_allowed) {
            return self.punch_in_place(start, whole);
        }
        let mut alloc = self.lock_alloc();
        let mut index = first;
        let end = first + count;
        while index < end {
            let pos = index << geo.cluster_bits;
            let at = geo.split(pos);
            let Some(l2_offset) = self.l2_table_offset(at.l1_index)? else {
                if !backing {
                    // No L2 table: the whole table's range is unallocated already.
                    let next_table = (at.l1_index + 1) << geo.l2_bits;
                    index = next_table.max(index + 1);
                    continue;
                }
                self.zero_cluster_locked(&mut alloc, at.l1_index, at.l2_index)?;
                index += 1;
                continue;
            };
            let entry = self.read_entry(l2_offset, at.l2_index)?;
            let done = match entry.desc {
                ClusterDescriptor::Unallocated => !backing,
                ClusterDescriptor::Zero { preallocated: None } => true,
                ClusterDescriptor::Subclusters {
                    host_cluster: None,
                    alloc: 0,
                    zero,
                    ..
                } => !backing || zero == u32::MAX,
                _ => false,
            };
            if !done {
                self.zero_cluster_locked(&mut alloc, at.l1_index, at.l2_index)?;
            }
            index += 1;
        }
        if self.shared.l2_cache.over_capacity() || alloc.refcounts.over_capacity() {
            self.flush_locked(&mut alloc)?;
        }
        Ok(())
    }

    /// Makes guest cluster (`l1_index`, `l2_index`) unallocated, or zero when there is a
    /// backing file, and queues the drop of its old data cluster's reference.
    fn zero_cluster_locked(
        &self,
        alloc: &mut super::alloc::AllocState,
        l1_index: u64,
        l2_index: u64,
    ) -> Result<()> {
        let geo = self.shared.geometry;
        let backing = self.shared.backing.is_some();
        let l2_offset = self.writable_l2(alloc, l1_index)?;
        let entry = self.read_entry(l2_offset, l2_index)?;
        let (raw, bitmap) = match (geo.extended_l2, backing) {
            (true, true) => (0, Some(u64::from(u32::MAX) << 32)),
            (true, false) => (0, Some(0)),
            (false, true) => (ZERO_FLAG, None),
            (false, false) => (0, None),
        };
        self.publish(entry.slot, raw, bitmap)?;
        self.drop_reference(alloc, &entry.desc);
        Ok(())
    }

    /// Discard where entries stay as they are: the image's own data is punched in place (it
    /// reads as zeros), everything else that would not read as zeros is written with zeros.
    fn punch_in_place(&self, start: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut rest = Vec::new();
        {
            let _gate = self
                .shared
                .io_gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for run in self.lookup(start, len)? {
                match run.mapping {
                    // A hole in an encrypted image's data would decrypt to noise.
                    Mapping::Data { host_offset }
                        if self.shared.cipher.is_none()
                            && self.owns_cluster_data(run.offset, run.len)? =>
                    {
                        self.data_file().punch_hole(host_offset, run.len)?
                    }
                    _ => rest.push((run.offset, run.len)),
                }
            }
        }
        for (offset, len) in rest {
            zero_fill(self, offset, len)?;
        }
        Ok(())
    }

    /// Whether every cluster of `[offset, offset + len)` is this image's alone (COPIED: no
    /// snapshot shares it), so punching it changes nothing else.
    fn owns_cluster_data(&self, offset: u64, len: u64) -> Result<bool> {
        let geo = self.shared.geometry;
        let mut pos = offset;
        while pos < offset + len {
            let at = geo.split(pos);
            let Some(l2_offset) = self.l2_table_offset(at.l1_index)? else {
                return Ok(false);
            };
            let entry = self.read_entry(l2_offset, at.l2_index)?;
            let (own, host) = match entry.desc {
                ClusterDescriptor::Normal {
                    copied,
                    host_cluster,
                } => (copied, Some(host_cluster)),
                ClusterDescriptor::Subclusters {
                    copied,
                    host_cluster,
                    ..
                } => (copied, host_cluster),
                _ => (false, None),
            };
            // A hole punched in metadata a hostile entry names would change it on disk only.
            if let (true, Some(host)) = (own, host) {
                self.check_data_target(host)?;
            }
            if !own {
                return Ok(false);
            }
            pos = (pos - at.in_cluster) + geo.cluster_size();
        }
        Ok(true)
    }
}
