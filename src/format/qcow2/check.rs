//! `imgfs check` for qcow2: the refcounts rebuilt from every table that references clusters
//! (rebuild.rs's counting, in recording mode) compared with the refcounts stored in the file,
//! as `qemu-img check` does, with its messages and counts:
//!
//! - a stored refcount below the references is a corruption ("ERROR cluster N refcount=A
//!   reference=B"): the allocator could hand the cluster out again while it is in use;
//! - one above them is a leak ("Leaked cluster N refcount=A reference=B"): wasted space;
//! - tables and clusters past the end of the file, unaligned entries and unusable refcount
//!   blocks are corruptions, and so is a COPIED flag that disagrees with a refcount of 1
//!   (QEMU would write in place into a shared cluster, or copy needlessly).
//!
//! Only clusters inside the file are compared, as QEMU does. Allocation statistics (allocated,
//! fragmented, compressed clusters) come from the active L1 table.
//!
//! Repairs, on an image opened writable with QEMU's locks: leaks get their refcount lowered
//! to the references (`--repair leaks`); `--repair all` rebuilds every refcount from the
//! references with the driver's dirty-refcount rebuild, which also fixes refcounts that are
//! too low. Neither runs when a table that references clusters could not be read (its
//! references are unknown, so a cluster that looks leaked may be in use), nor on an image with
//! persistent bitmaps for `--repair all` (the rebuild does not count them). COPIED flags and
//! bad entries are not repaired. After a repair the image is checked again, and the dirty bit
//! (lazy refcounts, then a crash) and the corrupt bit are cleared once it is consistent, as
//! QEMU does.

use std::collections::HashMap;

use crate::error::Result;
use crate::format::check::{CheckReport, Progress, Repair};
use crate::format::{Format, INSPECT_REASON};
use crate::host::HostFile;

use super::cluster::{ClusterDescriptor, COPIED, OFFSET_MASK};
use super::header::{Qcow2Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use super::rebuild::{Counts, Seen};
use super::refcount::RefcountBlock;
use super::{read_l1, Qcow2Image};

/// Where the header keeps the incompatible feature bits.
const OFF_INCOMPATIBLE: u64 = 72;
/// Refcount table entries: bits 9..=63 are the block's offset.
const TABLE_OFFSET_MASK: u64 = !0x1ff;
/// Progress is reported every this many clusters of the comparison.
const PROGRESS_STEP: u64 = 1 << 16;

/// Checks the qcow2 image in `file` (header already read from it); repairs what `repair`
/// allows when the file is open for writing.
pub fn check(
    file: HostFile,
    header: Qcow2Header,
    data_file: Option<HostFile>,
    repair: Option<Repair>,
    progress: Progress,
) -> Result<CheckReport> {
    let reason = repair.is_none().then(|| INSPECT_REASON.to_string());
    let image = Qcow2Image::open(file, header, data_file, None, reason)?;
    let (mut report, pass) = image.check_pass(progress)?;
    let Some(repair) = repair else {
        return Ok(report);
    };
    if image.repair(&mut report, repair, pass)? {
        let (after, _) = image.check_pass(progress)?;
        report = report.then_rechecked(after);
    }
    if report.corruptions == 0 && report.check_errors == 0 {
        image.mark_clean(&mut report)?;
    }
    Ok(report)
}

/// What a pass found about each cluster, kept for the repair.
struct Mismatch {
    cluster: u64,
    stored: u64,
    references: u64,
}

/// Per-pass state the repair needs besides the report.
struct Pass {
    mismatches: Vec<Mismatch>,
    /// Every reference was counted: no table was unreadable, unaligned or past the end.
    complete: bool,
}

impl Qcow2Image {
    /// One check pass over the file as it is now.
    fn check_pass(&self, progress: Progress) -> Result<(CheckReport, Pass)> {
        let shared = &self.shared;
        let file = &shared.file;
        let header = &shared.header;
        let cluster_size = shared.geometry.cluster_size();
        let bits = shared.geometry.cluster_bits;
        let file_len = file.len()?;
        let nb_clusters = file_len.div_ceil(cluster_size);
        let mut report = CheckReport::new(Format::Qcow2);
        let mut stored = self.stored_refcounts(file_len)?;
        let mut counts = Counts::new(bits, nb_clusters, true);
        let external = shared.data_file.is_some();

        let l1 = self.l1.read().map(|l1| l1.clone()).unwrap_or_default();
        let snapshot_l1s: u64 = shared.snapshots.iter().map(|s| u64::from(s.l1_size)).sum();
        // Progress in units of clusters: an L1 entry weighs the L2 entries it names, which is
        // where the counting spends its time; each refcount compared weighs one.
        let per_l1 = 1u64 << shared.geometry.l2_bits;
        let total = (l1.len() as u64)
            .saturating_add(snapshot_l1s)
            .saturating_mul(per_l1)
            .saturating_add(nb_clusters);
        let mut done = 0u64;

        counts.add(0, cluster_size)?;
        counts.add(self.l1_offset(), l1.len() as u64 * 8)?;
        let mut stats = Stats::default();
        let mut copied_errors = Vec::new();
        self.count_l1(&mut counts, &l1, &mut |seen| {
            if let Seen::L1 { index, entry } = seen {
                done = done.saturating_add(per_l1);
                progress(done, total);
                stats.next_contiguous = 0;
                let l2 = entry & OFFSET_MASK;
                if l2 != 0 && l2 % cluster_size == 0 {
                    if let Some(refcount) = stored.get(l2 >> bits) {
                        if (refcount == 1) != (entry & COPIED != 0) {
                            copied_errors.push(format!(
                                "ERROR OFLAG_COPIED L2 cluster: l1_index={index} \
                                 l1_entry={entry:x} refcount={refcount}"
                            ));
                        }
                    }
                }
                return;
            }
            if let Seen::L2 { entry, desc } = seen {
                let Some(host) = stats.note(desc, cluster_size) else {
                    return;
                };
                let refcount = if external {
                    Some(1)
                } else {
                    stored.get(host >> bits)
                };
                if let Some(refcount) = refcount {
                    if (refcount == 1) != (entry & COPIED != 0) {
                        copied_errors.push(format!(
                            "ERROR OFLAG_COPIED data cluster: l2_entry={entry:x} \
                             refcount={refcount}"
                        ));
                    }
                }
            }
        })?;
        for snapshot in &shared.snapshots {
            let l1 = read_l1(file, snapshot.l1_table_offset, snapshot.l1_size)?;
            counts.add(snapshot.l1_table_offset, u64::from(snapshot.l1_size) * 8)?;
            self.count_l1(&mut counts, &l1, &mut |seen| {
                if let Seen::L1 { .. } = seen {
                    done = done.saturating_add(per_l1);
                    progress(done, total);
                }
            })?;
        }
        if header.nb_snapshots > 0 {
            counts.add(header.snapshots_offset, shared.snapshot_table_len)?;
        }
        if let Some((offset, length)) = header.luks_area() {
            counts.add(offset, length)?;
        }
        if let Some(bitmaps) = &header.bitmaps {
            self.count_bitmaps(&mut counts, bitmaps, file_len)?;
        }
        let (table_offset, table_clusters) = stored.table_location;
        counts.add(table_offset, table_clusters.saturating_mul(cluster_size))?;
        let mut problems = counts.take_problems();
        let complete = problems.is_empty();
        for (index, &entry) in stored.table.iter().enumerate() {
            let block = entry & TABLE_OFFSET_MASK;
            if block == 0 {
                continue;
            }
            if block % cluster_size != 0 {
                problems.push(format!(
                    "ERROR refcount block {index} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
            } else if block >> bits >= nb_clusters {
                problems.push(format!("ERROR refcount block {index} is outside image"));
            } else {
                counts.add(block, cluster_size)?;
                let references = counts.get(block >> bits);
                if references != 1 {
                    problems.push(format!(
                        "ERROR refcount block {index} refcount={references}"
                    ));
                }
            }
        }
        for problem in problems {
            report.corruption(problem);
        }

        let mut mismatches = Vec::new();
        let mut highest = None;
        let mut unusable_block = None;
        for cluster in 0..nb_clusters {
            if cluster % PROGRESS_STEP == 0 {
                progress(done.saturating_add(cluster), total);
            }
            let references = counts.get(cluster);
            let Some(refcount) = stored.get(cluster) else {
                // One line per unusable block, not one per cluster it covers.
                let index = cluster >> stored.block_bits;
                if unusable_block != Some(index) {
                    unusable_block = Some(index);
                    report.check_error(format!(
                        "ERROR: the refcounts of clusters from {cluster} on cannot be read: \
                         refcount block {index} is unusable"
                    ));
                }
                continue;
            };
            if refcount > 0 || references > 0 {
                highest = Some(cluster);
            }
            if refcount == references {
                continue;
            }
            let line = format!("cluster {cluster} refcount={refcount} reference={references}");
            if refcount < references {
                report.corruption(format!("ERROR {line}"));
            } else {
                report.leak(format!("Leaked {line}"));
            }
            mismatches.push(Mismatch {
                cluster,
                stored: refcount,
                references,
            });
        }
        for line in copied_errors {
            report.corruption(line);
        }
        progress(total, total);

        report.image_end_offset = highest.map(|h| (h + 1) * cluster_size);
        report.total_clusters = Some(header.size.div_ceil(cluster_size));
        report.allocated_clusters = Some(stats.allocated);
        report.fragmented_clusters = Some(stats.fragmented);
        report.compressed_clusters = Some(stats.compressed);
        Ok((
            report,
            Pass {
                mismatches,
                complete,
            },
        ))
    }

    /// Repairs what `repair` allows of what `pass` found; true when something was written.
    fn repair(&self, report: &mut CheckReport, repair: Repair, pass: Pass) -> Result<bool> {
        let leaks: Vec<&Mismatch> = pass
            .mismatches
            .iter()
            .filter(|m| m.stored > m.references)
            .collect();
        let low = pass.mismatches.len() - leaks.len();
        if pass.mismatches.is_empty() {
            return Ok(false);
        }
        if !pass.complete {
            report.not_repaired.push(
                "refcounts are not repaired while tables that reference clusters are damaged: \
                 their references could not be counted"
                    .into(),
            );
            return Ok(false);
        }
        let file = &self.shared.file;
        let mut alloc = self.lock_alloc();
        if repair.errors() && low > 0 {
            if self.shared.header.bitmaps.is_some() {
                report.not_repaired.push(
                    "refcounts below the references are not repaired in an image with \
                     persistent bitmaps"
                        .into(),
                );
            } else {
                report.messages.push("Rebuilding refcount structure".into());
                self.rebuild_refcounts(&mut alloc)?;
                self.flush_locked(&mut alloc)?;
                report.corruptions_fixed += low as u64;
                report.leaks_fixed += leaks.len() as u64;
                return Ok(true);
            }
        } else if low > 0 {
            report.not_repaired.push(format!(
                "{low} refcounts below the references need `--repair all`"
            ));
        }
        if leaks.is_empty() {
            return Ok(false);
        }
        for m in &leaks {
            report.messages.push(format!(
                "Repairing cluster {} refcount={} reference={}",
                m.cluster, m.stored, m.references
            ));
            alloc.refcounts.set(file, m.cluster, m.references)?;
        }
        self.flush_locked(&mut alloc)?;
        report.leaks_fixed += leaks.len() as u64;
        Ok(true)
    }

    /// Clears the dirty bit (lazy refcounts after a crash) and the corrupt bit (set by QEMU
    /// when it found metadata it could not trust) of an image that was just found, or made,
    /// consistent, as QEMU does after a repair.
    fn mark_clean(&self, report: &mut CheckReport) -> Result<()> {
        let mut alloc = self.lock_alloc();
        let bits = alloc.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        if bits == 0 {
            return Ok(());
        }
        let incompatible = alloc.incompatible & !bits;
        let file = &self.shared.file;
        file.write_all_at(&incompatible.to_be_bytes(), OFF_INCOMPATIBLE)?;
        file.sync_data()?;
        alloc.incompatible = incompatible;
        let which = match (bits & INCOMPAT_DIRTY != 0, bits & INCOMPAT_CORRUPT != 0) {
            (true, true) => "the dirty and corrupt bits are",
            (true, false) => "the dirty bit is",
            _ => "the corrupt bit is",
        };
        report.messages.push(format!(
            "Repairing: the image is consistent, {which} cleared"
        ));
        Ok(())
    }

    /// The stored refcounts, read straight from the file.
    fn stored_refcounts(&self, file_len: u64) -> Result<Stored<'_>> {
        let mut alloc = self.lock_alloc();
        let table = alloc.refcounts.table(&self.shared.file)?.to_vec();
        Ok(Stored {
            file: &self.shared.file,
            table,
            table_location: alloc.refcounts.table_location(),
            order: alloc.refcounts.order(),
            block_bits: alloc.refcounts.block_bits(),
            cluster_bits: self.shared.geometry.cluster_bits,
            file_len,
            blocks: HashMap::new(),
        })
    }

    /// Counts the persistent bitmaps' directory, tables and data clusters.
    fn count_bitmaps(
        &self,
        counts: &mut Counts,
        bitmaps: &super::header::BitmapsExtension,
        file_len: u64,
    ) -> Result<()> {
        let file = &self.shared.file;
        let cluster_size = self.shared.geometry.cluster_size();
        if !counts.add(bitmaps.directory_offset, bitmaps.directory_size)? {
            return Ok(());
        }
        let Some(dir) = crate::format::check::read_inside(
            file,
            bitmaps.directory_offset,
            bitmaps.directory_size,
            file_len,
        )?
        else {
            return Ok(());
        };
        // A big-endian field of `len` bytes at `at + skip` in the directory.
        let field = |at: usize, skip: usize, len: usize| -> Option<u64> {
            let start = at.checked_add(skip)?;
            let bytes = dir.get(start..start.checked_add(len)?)?;
            Some(bytes.iter().fold(0u64, |v, &b| (v << 8) | u64::from(b)))
        };
        let mut at = 0usize;
        for _ in 0..bitmaps.nb_bitmaps {
            let (Some(table_offset), Some(table_size), Some(name), Some(extra)) = (
                field(at, 0, 8),
                field(at, 8, 4),
                field(at, 18, 2),
                field(at, 20, 4),
            ) else {
                counts.problem("ERROR the bitmap directory is truncated".into())?;
                break;
            };
            let len = (24 + name + extra).next_multiple_of(8);
            at = at.saturating_add(len as usize);
            let table_len = table_size * 8;
            if !counts.add(table_offset, table_len)? {
                continue;
            }
            let Some(table) =
                crate::format::check::read_inside(file, table_offset, table_len, file_len)?
            else {
                continue;
            };
            for word in table.chunks_exact(8) {
                let entry = u64::from_be_bytes(word.try_into().unwrap_or_default());
                let offset = entry & OFFSET_MASK;
                if offset != 0 {
                    counts.add(offset, cluster_size)?;
                }
            }
        }
        Ok(())
    }
}

/// Allocation statistics of the active disk, as qemu-img counts them.
#[derive(Default)]
struct Stats {
    allocated: u64,
    fragmented: u64,
    compressed: u64,
    /// Where the next cluster of the current L2 table would be if it were contiguous.
    next_contiguous: u64,
}

impl Stats {
    /// Counts one entry; returns its host cluster when it has one (for the COPIED check).
    fn note(&mut self, desc: ClusterDescriptor, cluster_size: u64) -> Option<u64> {
        let host = match desc {
            ClusterDescriptor::Compressed { .. } => {
                // Compressed clusters count as fragmented by nature, as in QEMU.
                self.allocated += 1;
                self.compressed += 1;
                self.fragmented += 1;
                return None;
            }
            ClusterDescriptor::Normal { host_cluster, .. }
            | ClusterDescriptor::Zero {
                preallocated: Some(host_cluster),
            }
            | ClusterDescriptor::Subclusters {
                host_cluster: Some(host_cluster),
                ..
            } => host_cluster,
            _ => return None,
        };
        self.allocated += 1;
        if self.next_contiguous != 0 && host != self.next_contiguous {
            self.fragmented += 1;
        }
        self.next_contiguous = host.saturating_add(cluster_size);
        Some(host)
    }
}

/// The refcounts stored in the file, read block by block as they are needed.
struct Stored<'a> {
    file: &'a HostFile,
    table: Vec<u64>,
    table_location: (u64, u64),
    order: u32,
    block_bits: u32,
    cluster_bits: u32,
    file_len: u64,
    /// Blocks read so far; `None` for a table entry that does not point at a usable block.
    blocks: HashMap<u64, Option<RefcountBlock>>,
}

impl Stored<'_> {
    /// The stored refcount of `cluster`: 0 where no block covers it, `None` where its block
    /// is unusable (unaligned, past the end of the file, unreadable).
    fn get(&mut self, cluster: u64) -> Option<u64> {
        let index = cluster >> self.block_bits;
        let in_block = cluster & ((1 << self.block_bits) - 1);
        let Some(&entry) = usize::try_from(index).ok().and_then(|i| self.table.get(i)) else {
            return Some(0);
        };
        let offset = entry & TABLE_OFFSET_MASK;
        if offset == 0 {
            return Some(0);
        }
        if !self.blocks.contains_key(&index) {
            let block = self.read_block(offset).ok().flatten();
            self.blocks.insert(index, block);
        }
        self.blocks.get(&index)?.as_ref()?.get(self.order, in_block)
    }

    fn read_block(&self, offset: u64) -> Result<Option<RefcountBlock>> {
        let size = 1u64 << self.cluster_bits;
        if offset % size != 0 {
            return Ok(None);
        }
        let bytes = crate::format::check::read_inside(self.file, offset, size, self.file_len)?;
        Ok(bytes.map(RefcountBlock::from_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_fragments_and_compressed_clusters_like_qemu() {
        let mut stats = Stats::default();
        let normal = |host_cluster| ClusterDescriptor::Normal {
            host_cluster,
            copied: true,
        };
        assert_eq!(stats.note(normal(0x10000), 0x10000), Some(0x10000));
        stats.note(normal(0x20000), 0x10000);
        stats.note(normal(0x50000), 0x10000);
        stats.note(
            ClusterDescriptor::Compressed {
                host_offset: 0x60200,
                len: 512,
            },
            0x10000,
        );
        assert_eq!(stats.note(ClusterDescriptor::Unallocated, 0x10000), None);
        assert_eq!(
            (stats.allocated, stats.fragmented, stats.compressed),
            (4, 2, 1)
        );
    }

    #[test]
    fn unusable_refcount_blocks_read_as_none() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("blocks");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let file = HostFile::open(&path, false).unwrap();
        let mut stored = Stored {
            file: &file,
            // 1 KiB clusters: block 0 at 1024 (fine), block 1 unaligned, block 2 past the end.
            table: vec![1024, 1536, 1 << 20],
            table_location: (0, 1),
            order: 4,
            block_bits: 9,
            cluster_bits: 10,
            file_len: 4096,
            blocks: HashMap::new(),
        };
        assert_eq!(stored.get(3), Some(0));
        assert_eq!(stored.get(512), None);
        assert_eq!(stored.get(1024), None);
        assert_eq!(stored.get(1 << 20), Some(0), "no table entry: refcount 0");
    }
}
