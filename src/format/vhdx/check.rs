//! `imgfs check` for VHDX: the headers, the log and the BAT, read with the driver's own
//! parsers (header.rs, open.rs) but recording what is wrong instead of refusing the image.
//!
//! - a header slot whose checksum or fields are bad: corruption (the other slot is used; a
//!   second torn write would lose both);
//! - a log that holds changes never written in place (the image was not closed cleanly):
//!   `qemu-img check` refuses such an image read-only and asks for `-r all`, which replays the
//!   log; imgfs checks the BAT as the replay leaves it (in memory), counts the unreplayed log
//!   as an error that kept the file from being checked as it is (exit 1, as qemu-img), and
//!   with `--repair` replays it into the file with the driver's replay, which counts as a
//!   fixed corruption, as in QEMU;
//! - a present payload block (or sector bitmap block) at file offset 0, starting past the end
//!   of the file, or over the header section, log, BAT or metadata region: corruption, with
//!   qemu-img's message for the first of these ("points after end of file");
//! - reserved BAT states, partially present blocks in an image without a parent, and two
//!   blocks sharing file space: corruption (qemu-img does not look for these).
//!
//! Region tables and metadata that do not parse stop the check (exit 1), as they stop QEMU's
//! open.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::format::check::{overlaps, CheckReport, Progress, Repair};
use crate::format::Format;
use crate::host::HostFile;

use super::bat::{
    check_block, host_of, state, Bat, Geometry, FULLY_PRESENT, NOT_PRESENT, PARTIALLY_PRESENT,
    SB_PRESENT, UNDEFINED, UNMAPPED, ZERO,
};
use super::header::{
    current_header, Header, FILE_SIGNATURE, HEADER_LEN, HEADER_SECTION_LEN, HEADER_SLOTS, MIB,
};
use super::{open, Headers, Store};

/// Checks the VHDX image in `file`; with `repair`, a dirty log is replayed into the file.
pub fn check(file: HostFile, repair: Option<Repair>, progress: Progress) -> Result<CheckReport> {
    let mut report = CheckReport::new(Format::Vhdx);
    let file_len = file.len()?;
    if file_len < HEADER_SECTION_LEN {
        return Err(Error::corrupt(format!(
            "file is {file_len} bytes, shorter than the 1 MiB VHDX header section"
        )));
    }
    let mut signature = [0u8; 8];
    file.read_exact_at(&mut signature, 0)?;
    if &signature != FILE_SIGNATURE {
        return Err(Error::corrupt("no \"vhdxfile\" signature at offset 0"));
    }
    let mut slots = [vec![0u8; HEADER_LEN], vec![0u8; HEADER_LEN]];
    for (n, (raw, at)) in slots.iter_mut().zip(HEADER_SLOTS).enumerate() {
        file.read_exact_at(raw, at)?;
        if let Err(e) = Header::parse(raw) {
            report.corruption(format!("ERROR VHDX header {} at {at:#x}: {e}", n + 1));
        }
    }
    let (current, slot) = current_header([&slots[0], &slots[1]])?;
    if report.corruptions > 0 && repair.is_some() {
        report
            .not_repaired
            .push("a damaged VHDX header is not rewritten".into());
    }
    let log = current.log_range(file_len)?;
    let dirty = !current.log_guid.is_nil();
    let mut headers = Headers {
        current,
        slot,
        session_started: false,
        data_write_guid_renewed: false,
    };
    let replay = repair.is_some();
    let (overlay, _, replayed_len) = open::replay_log(&file, &mut headers, &log, replay)?;
    if dirty && replay {
        report
            .messages
            .push("Repairing: the log was replayed into the file".into());
        report.corruptions_fixed += 1;
    } else if dirty {
        report.check_error(
            "ERROR the log holds changes that were never written in place (the image was not \
             closed cleanly); this check saw them replayed in memory. `imgfs check --repair \
             all` (or `qemu-img check -r all`) replays them into the file",
        );
    }
    let store = Store { file, overlay };
    let file_len = store.file.len()?.max(replayed_len);
    let regions = open::read_regions(&store, &log, file_len)?;
    let meta = open::read_metadata(&store, &regions.metadata)?;
    let geometry = Geometry::new(&meta);
    let load_len = Bat::load_len(&geometry, &regions.bat)?;
    crate::meta::budget::check_table_memory("VHDX BAT", load_len)?;
    let mut raw = vec![0u8; load_len as usize];
    store.read(&mut raw, regions.bat.start)?;
    let entries: Vec<u64> = raw
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let structures = [
        ("the header section", 0..HEADER_SECTION_LEN),
        ("the log", log.clone()),
        ("the BAT region", regions.bat.clone()),
        ("the metadata region", regions.metadata.clone()),
    ];
    check_bat(
        &mut report,
        &geometry,
        &entries,
        &structures,
        file_len,
        progress,
    );
    Ok(report)
}

/// Records what is wrong with the BAT `entries` of an image of `geometry`.
fn check_bat(
    report: &mut CheckReport,
    geo: &Geometry,
    entries: &[u64],
    structures: &[(&str, Range<u64>)],
    file_len: u64,
    progress: Progress,
) {
    let entry = |index: u64| {
        usize::try_from(index)
            .ok()
            .and_then(|i| entries.get(i))
            .copied()
            .unwrap_or(0)
    };
    let mut blocks: Vec<(u64, u64, u64)> = Vec::new();
    let mut present = |report: &mut CheckReport, what: String, index: u64, e: u64, len: u64| {
        let host = host_of(e);
        if host != 0 && host >= file_len {
            report.corruption(format!(
                "ERROR VHDX BAT entry {index} start offset {host} points after end of file \
                 ({file_len}). Image has probably been truncated."
            ));
            return;
        }
        match check_block(e, len, structures, file_len) {
            Ok(range) => blocks.push((range.start, len, index)),
            Err(why) => report.corruption(format!("ERROR {what} {why}")),
        }
    };
    for block in 0..geo.payload_blocks {
        if block % (1 << 16) == 0 {
            progress(block, geo.payload_blocks);
        }
        let index = geo.payload_index(block);
        let e = entry(index);
        match state(e) {
            NOT_PRESENT | UNDEFINED | ZERO | UNMAPPED => {}
            FULLY_PRESENT => present(
                report,
                format!("payload block {block}"),
                index,
                e,
                geo.block_size,
            ),
            PARTIALLY_PRESENT if geo.differencing => {
                let bitmap = entry(geo.bitmap_index(block));
                if state(bitmap) != SB_PRESENT {
                    report.corruption(format!(
                        "ERROR payload block {block} is partially present but its chunk has no \
                         sector bitmap"
                    ));
                }
                present(
                    report,
                    format!("payload block {block}"),
                    index,
                    e,
                    geo.block_size,
                );
            }
            PARTIALLY_PRESENT => report.corruption(format!(
                "ERROR payload block {block} is partially present in an image without parent"
            )),
            other => report.corruption(format!(
                "ERROR payload block {block} has the reserved BAT state {other}"
            )),
        }
    }
    if geo.differencing {
        for chunk in 0..geo.payload_blocks.div_ceil(geo.chunk_ratio) {
            let index = chunk * (geo.chunk_ratio + 1) + geo.chunk_ratio;
            let e = entry(index);
            match state(e) {
                NOT_PRESENT => {}
                SB_PRESENT => present(
                    report,
                    format!("the sector bitmap block of chunk {chunk}"),
                    index,
                    e,
                    MIB,
                ),
                other => report.corruption(format!(
                    "ERROR the sector bitmap entry of chunk {chunk} has the reserved state \
                     {other}"
                )),
            }
        }
    }
    for (later, earlier) in overlaps(&mut blocks) {
        report.corruption(format!(
            "ERROR VHDX BAT entries {earlier} and {later} share file space"
        ));
    }
    progress(1, 1);
}
