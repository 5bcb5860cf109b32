//! The open-time reading of a VHDX file's structures after the headers: replaying a dirty
//! log (into the file, or into an in-memory overlay for read-only images), the region tables
//! and the metadata region.

use std::ops::Range;

use uuid::Uuid;

use super::header::{self, Regions, REGION_TABLE_LEN, REGION_TABLE_SLOTS};
use super::log;
use super::metadata::{self, Metadata};
use super::overlay::Overlay;
use super::{Headers, Store};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// Replays a dirty log on open: into the file when `writable`, else into an overlay that is
/// returned with the file length the replay implies. Also says what was done, for `info`.
pub(super) fn replay_log(
    file: &HostFile,
    headers: &mut Headers,
    log: &Range<u64>,
    writable: bool,
) -> Result<(Option<Overlay>, Option<String>, u64)> {
    let log_guid = headers.current.log_guid;
    if log_guid.is_nil() {
        return Ok((None, None, 0));
    }
    let reader = log::LogReader::new(file, log.clone(), log_guid)?;
    let sequence = reader.active_sequence()?.ok_or_else(|| {
        Error::corrupt(format!(
            "the header names log {{{log_guid}}} but the log holds no valid sequence of entries"
        ))
    })?;
    sequence.check_targets(log, file.len()?)?;
    let what = format!(
        "{} entries with {} changes",
        sequence.entries.len(),
        sequence.change_count()
    );
    if writable {
        // The file write GUID changes before the first modification, replay included.
        headers.update(file, |_| {}, false)?;
        sequence.replay_into(file)?;
        headers.update(file, |h| h.log_guid = Uuid::nil(), true)?;
        Ok((None, Some(format!("yes, {what}, into the file")), 0))
    } else {
        let mut overlay = Overlay::new();
        sequence.replay_into_overlay(&mut overlay);
        let len = overlay.end().max(sequence.last_file_offset);
        let what = format!("yes, {what}, in memory only (the file is left unchanged)");
        Ok((Some(overlay), Some(what), len))
    }
}

/// Reads both region table copies and validates the first one whose checksum is right.
pub(super) fn read_regions(store: &Store, log: &Range<u64>, file_len: u64) -> Result<Regions> {
    let mut errors = Vec::new();
    for at in REGION_TABLE_SLOTS {
        let mut raw = vec![0u8; REGION_TABLE_LEN];
        store.read(&mut raw, at)?;
        match header::parse_region_table(&raw) {
            Ok(entries) => {
                return header::check_regions(&entries, log, file_len).map_err(|e| e.at_offset(at))
            }
            Err(e) => errors.push(format!("at {at:#x}: {e}")),
        }
    }
    Err(Error::corrupt(format!(
        "neither VHDX region table is valid ({})",
        errors.join("; ")
    )))
}

pub(super) fn read_metadata(store: &Store, region: &Range<u64>) -> Result<Metadata> {
    let mut table = vec![0u8; metadata::TABLE_LEN];
    store.read(&mut table, region.start)?;
    let entries = metadata::parse_table(&table, region.end - region.start)
        .map_err(|e| e.at_offset(region.start))?;
    metadata::parse_items(&entries, |entry| {
        let mut item = vec![0u8; entry.length as usize];
        store.read(&mut item, region.start + u64::from(entry.offset))?;
        Ok(item)
    })
    .map_err(|e| e.at_offset(region.start))
}
