//! `imgfs check` for QCOW version 1, which `qemu-img check` cannot check (it exits 63): the
//! tables against the file, with the driver's header parser and layout rules.
//!
//! - an L1 entry whose L2 table is not cluster aligned, lies past the end of the file or over
//!   the header, backing name or L1 table: corruption;
//! - an L2 entry whose cluster is not cluster aligned (plain clusters; QEMU appends them at
//!   the cluster-aligned end of the file), or lies past the end or over that metadata:
//!   corruption;
//! - two L2 tables, or two clusters, sharing file space: corruption.
//!
//! qcow has no refcounts, so leaks (space a rewrite left unreferenced) are not counted, and
//! nothing is repaired.

use crate::error::Result;
use crate::format::check::{bare, overlaps, read_inside, CheckReport, Progress, Repair};
use crate::format::Format;
use crate::host::HostFile;

use super::header::{Entry, QcowHeader};

/// Checks the qcow image in `file`.
pub fn check(file: &HostFile, repair: Option<Repair>, progress: Progress) -> Result<CheckReport> {
    let mut report = CheckReport::new(Format::Qcow);
    let header = QcowHeader::read(file)?;
    let file_len = file.len()?;
    header.check_layout(file_len)?;
    let layout = header.layout(file_len);
    let geo = header.geometry();
    let cluster = geo.cluster_size();
    let l1 = read_inside(
        file,
        header.l1_table_offset,
        header.l1_entries.saturating_mul(8),
        file_len,
    )?
    .unwrap_or_default();
    let words = |bytes: &[u8]| -> Vec<u64> {
        bytes
            .chunks_exact(8)
            .map(|w| u64::from_be_bytes(w.try_into().unwrap_or_default()))
            .collect()
    };
    // (start, len, id), the id indexing `labels`: (L1 index, L2 index for a cluster).
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    let mut labels: Vec<(usize, Option<usize>)> = Vec::new();
    let mut allocated = 0u64;
    let l1 = words(&l1);
    for (l1_index, &l2_at) in l1.iter().enumerate() {
        progress(l1_index as u64, l1.len() as u64);
        if l2_at == 0 {
            continue;
        }
        let what = format!("L2 table {l1_index}");
        if l2_at % cluster != 0 {
            report.corruption(format!(
                "ERROR l2_offset={l2_at:x}: Table is not cluster aligned; L1 entry corrupted"
            ));
            continue;
        }
        if let Err(e) = layout.check_range(&what, l2_at, geo.l2_table_len()) {
            report.corruption(format!("ERROR {}", bare(&e)));
            continue;
        }
        spans.push((l2_at, geo.l2_table_len(), labels.len() as u64));
        labels.push((l1_index, None));
        let Some(table) = read_inside(file, l2_at, geo.l2_table_len(), file_len)? else {
            continue;
        };
        for (l2_index, raw) in words(&table).into_iter().enumerate() {
            let (at, len) = match geo.decode(raw) {
                Entry::Unallocated => continue,
                Entry::Normal { host_offset } => {
                    if host_offset % cluster != 0 {
                        report.corruption(format!(
                            "ERROR offset={host_offset:x}: Cluster is not properly aligned; L2 \
                             entry corrupted."
                        ));
                        continue;
                    }
                    (host_offset, cluster)
                }
                Entry::Compressed { host_offset, len } => (host_offset, len),
            };
            let what = format!("cluster of L2 table {l1_index} entry {l2_index}");
            if let Err(e) = layout.check_range(&what, at, len) {
                report.corruption(format!("ERROR {}", bare(&e)));
                continue;
            }
            allocated += 1;
            spans.push((at, len, labels.len() as u64));
            labels.push((l1_index, Some(l2_index)));
        }
    }
    let name = |id: u64| match labels.get(id as usize) {
        Some((l1, Some(l2))) => format!("cluster of L2 table {l1} entry {l2}"),
        Some((l1, None)) => format!("L2 table {l1}"),
        None => String::new(),
    };
    for (later, earlier) in overlaps(&mut spans) {
        report.corruption(format!(
            "ERROR the {} and the {} share file space",
            name(earlier),
            name(later)
        ));
    }
    report.allocated_clusters = Some(allocated);
    report.total_clusters = Some(header.virtual_size().div_ceil(cluster));
    if repair.is_some() && report.exit_code() != 0 {
        report
            .not_repaired
            .push("imgfs does not repair qcow (version 1) images".into());
    }
    progress(1, 1);
    Ok(report)
}
