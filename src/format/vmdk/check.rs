//! `imgfs check` for VMDK: every hosted sparse extent's grain directory against its redundant
//! copy, its grain tables and grains against the file, and flat extents against their length.
//!
//! - a grain directory entry whose table lies past the end of the file or over the header or
//!   a directory: corruption;
//! - a directory and its redundant copy that disagree (one names a table the other does not,
//!   or the two tables hold different entries): corruption. VMware and QEMU write both; a
//!   difference means a torn update, and a tool reading the other copy sees another disk;
//! - a grain table entry whose grain lies past the end of the file or over the header or a
//!   directory: corruption (qemu-img reports the first such grain as "points after EOF");
//! - two grain tables, or two grains, sharing file space: corruption;
//! - a flat extent file shorter than the descriptor says: corruption.
//!
//! qemu-img check looks only for grains past the end of the file (and then fails the check,
//! exit 1, where imgfs reports a corruption, exit 2); it does not compare the directories.
//! Nothing is repaired: which copy of a directory is right cannot be told from the file alone.

use std::path::PathBuf;

use crate::error::Result;
use crate::format::check::{bare, overlaps, read_inside, CheckReport, Progress, Repair};
use crate::format::Format;
use crate::host::HostFile;

use super::descriptor::{ExtentType, SECTOR_SIZE};
use super::header::SparseHeader;
use super::tables::{decode_entries, Grain, Layout};
use super::VmdkTop;

/// Checks the VMDK disk whose top file is `file` (descriptor `top`); `extents` are the files
/// its descriptor names, in order, resolved and opened by the caller.
pub fn check(
    file: &HostFile,
    top: &VmdkTop,
    extents: &[(PathBuf, HostFile)],
    repair: Option<Repair>,
    progress: Progress,
) -> Result<CheckReport> {
    let mut report = CheckReport::new(Format::Vmdk);
    if top.sparse.is_some() {
        check_sparse(&mut report, file, "", progress)?;
    } else {
        let lines = top.descriptor.extents.iter().filter(|e| e.file.is_some());
        for (line, (path, extent)) in lines.zip(extents) {
            let name = format!("extent {}: ", path.display());
            let mut magic = [0u8; 4];
            let len = extent.len()?;
            if len >= 4 {
                extent.read_exact_at(&mut magic, 0)?;
            }
            match line.kind {
                ExtentType::Sparse if &magic == b"KDMV" => {
                    check_sparse(&mut report, extent, &name, progress)?
                }
                ExtentType::Flat | ExtentType::Vmfs => {
                    let end = line
                        .offset
                        .saturating_add(line.sectors)
                        .saturating_mul(SECTOR_SIZE);
                    if len < end {
                        report.corruption(format!(
                            "ERROR {name}the flat extent file is {len} bytes, the descriptor \
                             needs {end}"
                        ));
                    }
                }
                // COWD and seSparse extents are served read-only and not checked here.
                _ => {}
            }
        }
    }
    if repair.is_some() && report.exit_code() != 0 {
        report
            .not_repaired
            .push("imgfs does not repair VMDK images".into());
    }
    Ok(report)
}

/// Checks one hosted sparse extent; `name` prefixes its messages.
fn check_sparse(
    report: &mut CheckReport,
    file: &HostFile,
    name: &str,
    progress: Progress,
) -> Result<()> {
    let header = match SparseHeader::read(file) {
        Ok(header) => header,
        Err(e) => {
            report.corruption(format!("ERROR {name}{e}"));
            return Ok(());
        }
    };
    let file_len = file.len()?;
    let layout = Layout::new(&header);
    let entries = header.gd_entries();
    let gd_len = entries.saturating_mul(layout.entry_bytes);
    let read_dir = |sector: u64| -> Result<Option<Vec<u64>>> {
        let raw = read_inside(file, sector.saturating_mul(SECTOR_SIZE), gd_len, file_len)?;
        Ok(raw.map(|raw| decode_entries(&raw, layout.entry_bytes)))
    };
    // SparseHeader::read checked that the directories lie inside the file.
    let Some(primary) = read_dir(header.gd_offset)? else {
        report.corruption(format!(
            "ERROR {name}the grain directory lies past the end of the file"
        ));
        return Ok(());
    };
    let redundant = match header.has_redundant_gd() {
        true => read_dir(header.rgd_offset)?,
        false => None,
    };
    let mut spans: Vec<(u64, u64, u64)> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    let mut note = |spans: &mut Vec<(u64, u64, u64)>, at: u64, len: u64, label: String| {
        spans.push((at, len, labels.len() as u64));
        labels.push(label);
    };
    for (index, &raw) in primary.iter().enumerate() {
        if index % 1024 == 0 {
            progress(index as u64, entries);
        }
        let table = load_table(report, file, &layout, name, "", index, raw, file_len)?;
        let copy = match &redundant {
            Some(rgd) => {
                let raw = rgd.get(index).copied().unwrap_or(0);
                Some(load_table(
                    report,
                    file,
                    &layout,
                    name,
                    "redundant ",
                    index,
                    raw,
                    file_len,
                )?)
            }
            None => None,
        };
        if let Some(copy) = &copy {
            let differs = match (&table, copy) {
                (Some((_, a)), Some((_, b))) => a != b,
                (None, None) => false,
                _ => primary_names(raw) != primary_names(redundant_raw(&redundant, index)),
            };
            if differs {
                report.corruption(format!(
                    "ERROR {name}grain directory entry {index} and its redundant copy disagree"
                ));
            }
            if let Some((at, _)) = copy {
                note(
                    &mut spans,
                    *at,
                    layout.gt_bytes,
                    format!("redundant grain table {index}"),
                );
            }
        }
        let Some((at, grains)) = table else {
            continue;
        };
        note(
            &mut spans,
            at,
            layout.gt_bytes,
            format!("grain table {index}"),
        );
        for (slot, &entry) in grains.iter().enumerate() {
            let what = format!("grain of grain table {index} entry {slot}");
            if let Err(e) = layout.check_entry(entry, file_len, &what) {
                report.corruption(format!("ERROR {name}{}", bare(&e)));
                continue;
            }
            if let Grain::Data(at) = layout.decode(entry) {
                note(&mut spans, at, layout.grain_bytes, what);
            }
        }
    }
    for (later, earlier) in overlaps(&mut spans) {
        let label = |id: u64| labels.get(id as usize).cloned().unwrap_or_default();
        report.corruption(format!(
            "ERROR {name}the {} and the {} share file space",
            label(earlier),
            label(later)
        ));
    }
    progress(entries, entries);
    Ok(())
}

/// Reads the grain table directory entry `raw` names: (its offset, its entries), `None` when
/// there is none or it is unusable (recorded).
#[allow(clippy::too_many_arguments)]
fn load_table(
    report: &mut CheckReport,
    file: &HostFile,
    layout: &Layout,
    name: &str,
    copy: &str,
    index: usize,
    raw: u64,
    file_len: u64,
) -> Result<Option<(u64, Vec<u64>)>> {
    let at = match layout.table_offset(raw) {
        Ok(Some(at)) => at,
        Ok(None) => return Ok(None),
        Err(e) => {
            report.corruption(format!(
                "ERROR {name}{copy}grain directory entry {index}: {}",
                bare(&e)
            ));
            return Ok(None);
        }
    };
    let what = format!("{copy}grain table {index}");
    if let Err(e) = layout.check(&what, at, layout.gt_bytes, file_len) {
        report.corruption(format!("ERROR {name}{}", bare(&e)));
        return Ok(None);
    }
    let Some(bytes) = read_inside(file, at, layout.gt_bytes, file_len)? else {
        return Ok(None);
    };
    Ok(Some((at, decode_entries(&bytes, layout.entry_bytes))))
}

fn primary_names(raw: u64) -> bool {
    raw != 0
}

fn redundant_raw(redundant: &Option<Vec<u64>>, index: usize) -> u64 {
    redundant
        .as_ref()
        .and_then(|r| r.get(index))
        .copied()
        .unwrap_or(0)
}
