//! `imgfs check` for VHD, which `qemu-img check` cannot check (it exits 63 for "vpc"): the
//! footer and its copy, the dynamic header, and the BAT.
//!
//! - a footer whose checksum or cookie is wrong, or a copy at offset 0 that differs from the
//!   footer in force: corruption (the driver uses the good one; a second crash could lose both);
//! - a fixed disk shorter than its virtual size: corruption;
//! - a dynamic header that does not parse (cookie, checksum, fields), or a BAT outside the
//!   file: corruption, and the blocks are not checked;
//! - a BAT entry whose block (bitmap and data) runs past the end of the file or into the
//!   footer, the header, the BAT or a parent locator, or two entries whose blocks share file
//!   space: corruption.
//!
//! Repair (`--repair all`): a damaged or different footer copy at offset 0 is rewritten from
//! the footer at the end, which is what the driver's first flush does too. A damaged footer
//! at the end is not rewritten: the bytes there may be a block a crash left half-written.

use std::ops::Range;

use crate::error::Result;
use crate::format::check::{overlaps, read_inside, CheckReport, Progress, Repair};
use crate::format::Format;
use crate::host::HostFile;

use super::bat::Geometry;
use super::footer::{DiskType, FOOTER_LEN, SECTOR};
use super::header::{DynHeader, HEADER_LEN, UNUSED};
use super::open::read_footers;

/// Checks (and with `repair`, repairs) the VHD image in `file`.
pub fn check(file: &HostFile, repair: Option<Repair>, progress: Progress) -> Result<CheckReport> {
    let mut report = scan(file, progress)?;
    let Some(repair) = repair else {
        return Ok(report);
    };
    let file_len = file.len()?;
    let found = read_footers(file, file_len)?;
    if !found.end_valid {
        report.not_repaired.push(
            "the damaged footer at the end of the file is not rewritten (the bytes there may \
             belong to a block)"
                .into(),
        );
    }
    if !found.copy_damaged {
        return Ok(report);
    }
    if !repair.errors() {
        report
            .not_repaired
            .push("the footer copy at offset 0 is repaired by `--repair all`".into());
        return Ok(report);
    }
    report
        .messages
        .push("Repairing the footer copy at offset 0 from the footer at the end".into());
    file.write_all_at(found.footer.bytes(), 0)?;
    file.sync_data()?;
    report.corruptions_fixed += 1;
    let after = scan(file, progress)?;
    Ok(report.then_rechecked(after))
}

fn scan(file: &HostFile, progress: Progress) -> Result<CheckReport> {
    let mut report = CheckReport::new(Format::Vhd);
    let file_len = file.len()?;
    // No usable footer at all: nothing says what the file is, the check cannot go on.
    let found = read_footers(file, file_len)?;
    if let Some(note) = &found.note {
        report.corruption(format!("ERROR {note}"));
    }
    let footer = &found.footer;
    let disk_type = footer.disk_type()?;
    let (size, _) = footer.virtual_size()?;
    if disk_type == DiskType::Fixed {
        let data = file_len.saturating_sub(FOOTER_LEN as u64);
        if data < size {
            report.corruption(format!(
                "ERROR the fixed disk holds {data} bytes of data, less than its virtual size \
                 {size}"
            ));
        }
        return Ok(report);
    }
    let header_at = footer.data_offset;
    let Some(raw) = read_inside(file, header_at, HEADER_LEN as u64, file_len)? else {
        report.corruption(format!(
            "ERROR the dynamic disk header at {header_at:#x} lies past the end of the file"
        ));
        return Ok(report);
    };
    let header = match DynHeader::parse(&raw) {
        Ok(header) => header,
        Err(e) => {
            report.corruption(format!(
                "ERROR the dynamic disk header at {header_at:#x}: {e}"
            ));
            return Ok(report);
        }
    };
    let geometry = match Geometry::new(&header, size) {
        Ok(geometry) => geometry,
        Err(e) => {
            report.corruption(format!("ERROR the dynamic disk header: {e}"));
            return Ok(report);
        }
    };
    let table_len = u64::from(geometry.entries) * 4;
    let Some(table) = read_inside(file, header.table_offset, table_len, file_len)? else {
        report.corruption(format!(
            "ERROR the BAT ({table_len} bytes at {:#x}) lies past the end of the file",
            header.table_offset
        ));
        return Ok(report);
    };
    // Blocks end before the footer in force at the end (a damaged one may be a block's tail).
    let data_end = if found.end_valid {
        file_len - FOOTER_LEN as u64
    } else {
        file_len
    };
    let mut metadata: Vec<(&str, Range<u64>)> = vec![
        ("the footer copy", 0..FOOTER_LEN as u64),
        (
            "the dynamic disk header",
            header_at..header_at + HEADER_LEN as u64,
        ),
        (
            "the BAT",
            header.table_offset..header.table_offset + table_len,
        ),
    ];
    if disk_type == DiskType::Differencing {
        for locator in &header.locators {
            if let Ok(range) = locator.data_range() {
                metadata.push(("a parent locator", range));
            }
        }
    }
    let span_len = geometry.bitmap_size + geometry.block_size;
    let mut blocks = Vec::new();
    let entries = table
        .chunks_exact(4)
        .map(|e| u32::from_be_bytes(e.try_into().unwrap_or_default()));
    for (index, entry) in entries.enumerate() {
        if index % (1 << 16) == 0 {
            progress(index as u64, u64::from(geometry.entries));
        }
        if entry == UNUSED {
            continue;
        }
        let start = u64::from(entry) * SECTOR;
        let end = start.saturating_add(span_len);
        if end > data_end {
            report.corruption(format!(
                "ERROR BAT entry {index}: block at {start:#x}..{end:#x} runs past the end of \
                 the data ({data_end:#x})"
            ));
            continue;
        }
        if let Some((name, _)) = metadata
            .iter()
            .find(|(_, m)| m.start < end && start < m.end)
        {
            report.corruption(format!(
                "ERROR BAT entry {index}: block at {start:#x} overlaps {name}"
            ));
            continue;
        }
        blocks.push((start, span_len, index as u64));
    }
    for (later, earlier) in overlaps(&mut blocks) {
        report.corruption(format!(
            "ERROR BAT entries {earlier} and {later} share file space"
        ));
    }
    progress(1, 1);
    Ok(report)
}
