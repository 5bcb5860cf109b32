//! `imgfs check`: a consistency check of one image file's metadata, per format, with the
//! verdicts, counts and messages of `qemu-img check`, and the repairs that are safe.
//!
//! Each format has its own `check.rs` that reads the file's metadata directly (through the
//! driver's header parsers), because a driver refuses at open much of what a check must count
//! and go on from (a table past the end of the file, two blocks sharing a host block). This
//! module opens the file the right way and dispatches: for a check alone, read-only without
//! locks, refusing an image that another process writes (qemu-img refuses it too, and its
//! metadata on disk is then not the whole story); for a repair, read-write with QEMU's lock
//! bytes claimed, so neither QEMU nor an imgfs mount can use the image meanwhile.

use std::path::Path;

use crate::error::{Error, Result};
use crate::host::HostFile;

use super::links::{Chain, Links, PlainLinks};
use super::{open_claimed, probe_file, Format, LOCK_WRITE};

/// What `--repair` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repair {
    /// Only leaks: space that nothing uses is given back.
    Leaks,
    /// Leaks and the corruptions whose repair is safe.
    All,
}

impl Repair {
    pub fn errors(self) -> bool {
        self == Repair::All
    }
}

/// Called with (done, total) in any unit as a long check proceeds.
pub type Progress<'a> = &'a dyn Fn(u64, u64);

/// The outcome of a check, in `qemu-img check`'s terms.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckReport {
    pub format: &'static str,
    /// Errors that kept parts of the image from being checked (I/O errors).
    pub check_errors: u64,
    /// Inconsistencies that may lose data or make writes corrupt it.
    pub corruptions: u64,
    /// Space that is allocated but unused.
    pub leaks: u64,
    pub corruptions_fixed: u64,
    pub leaks_fixed: u64,
    /// Where the image's last used cluster ends (qcow2).
    pub image_end_offset: Option<u64>,
    pub total_clusters: Option<u64>,
    pub allocated_clusters: Option<u64>,
    pub fragmented_clusters: Option<u64>,
    pub compressed_clusters: Option<u64>,
    /// One line per finding and per repair ("ERROR ...", "Leaked cluster ...", "Repairing
    /// ..."), in the order found, in qemu-img's words where it has words for them.
    pub messages: Vec<String>,
    /// Findings a requested repair left alone, and why.
    pub not_repaired: Vec<String>,
}

impl CheckReport {
    pub fn new(format: Format) -> Self {
        CheckReport {
            format: format.name(),
            ..Default::default()
        }
    }

    pub fn corruption(&mut self, message: impl Into<String>) {
        self.corruptions += 1;
        self.messages.push(message.into());
    }

    pub fn leak(&mut self, message: impl Into<String>) {
        self.leaks += 1;
        self.messages.push(message.into());
    }

    pub fn check_error(&mut self, message: impl Into<String>) {
        self.check_errors += 1;
        self.messages.push(message.into());
    }

    /// `qemu-img check`'s exit code: 1 when the check itself failed somewhere, 2 for
    /// corruptions, 3 for leaks only, 0 for a clean image.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The report of a check made after a repair: its own findings, with the repairs and the
    /// messages of the first pass (`self`) in front.
    pub fn then_rechecked(self, mut after: CheckReport) -> CheckReport {
        let mut messages = self.messages;
        messages.append(&mut after.messages);
        after.messages = messages;
        after.corruptions_fixed += self.corruptions_fixed;
        after.leaks_fixed += self.leaks_fixed;
        let mut not_repaired = self.not_repaired;
        not_repaired.append(&mut after.not_repaired);
        after.not_repaired = not_repaired;
        after
    }
}

/// Checks (and with `repair`, repairs) the image at `path`; `root` is the tree an external
/// data file must lie in. An error means the image could not be checked at all.
pub fn check(
    path: &Path,
    root: &Path,
    repair: Option<Repair>,
    progress: Progress,
) -> Result<CheckReport> {
    let format = probe_file(path)
        .and_then(|f| f.ok_or_else(|| Error::unsupported("not a disk image imgfs recognises")))
        .map_err(|e| e.with_path(path))?;
    let file = open_for_check(path, repair.is_some()).map_err(|e| e.with_path(path))?;
    let report = match format {
        Format::Qcow2 => {
            let links = PlainLinks::new(root, true)?;
            let top = path
                .canonicalize()
                .map_err(|e| Error::io("resolve", e).with_path(path))?;
            let header = super::qcow2::Qcow2Header::read(&file)?;
            let data_file = header
                .data_file()
                .map(|name| {
                    super::open_data_file(
                        name,
                        &Chain::top(&top),
                        &links,
                        file.is_writable(),
                        repair.is_none(),
                    )
                })
                .transpose()?;
            super::qcow2::check(file, header, data_file, repair, progress)
        }
        Format::Vdi => super::vdi::check(&file, repair, progress),
        Format::Vhd => super::vhd::check(&file, repair, progress),
        Format::Vhdx => super::vhdx::check(file, repair, progress),
        Format::Vmdk => {
            let links = PlainLinks::new(root, true)?;
            let top_path = path
                .canonicalize()
                .map_err(|e| Error::io("resolve", e).with_path(path))?;
            let top = super::vmdk::VmdkTop::read(&file)?;
            let mut extents = Vec::new();
            for name in top.extent_files() {
                let extent = super::links::resolve(links.root(), &top_path, name, "extent")?;
                let opened = HostFile::open(&extent, false).map_err(|e| e.with_path(&extent))?;
                extents.push((extent, opened));
            }
            super::vmdk::check(&file, &top, &extents, repair, progress)
        }
        Format::Qcow => super::qcow::check(&file, repair, progress),
        Format::Raw => Err(Error::unsupported("raw files have no metadata to check")),
        Format::Luks => Err(Error::unsupported(
            "LUKS containers have no metadata to check beyond their header",
        )),
    };
    report.map_err(|e| e.with_path(path))
}

/// Opens the file to check: read-only and unlocked, refusing one that another process writes;
/// or, to repair, writable with QEMU's lock bytes claimed.
fn open_for_check(path: &Path, repair: bool) -> Result<HostFile> {
    if repair {
        let file = open_claimed(path, true, false)?;
        if !file.is_writable() {
            return Err(Error::read_only(
                "the image file cannot be opened for writing, so it cannot be repaired",
            ));
        }
        return Ok(file);
    }
    let file = HostFile::open(path, false)?;
    if file.byte_locked_by_another_process(LOCK_WRITE)? {
        return Err(Error::busy(
            "another process (QEMU, or an imgfs mount) has the image open for writing; its \
             metadata on disk may be incomplete until it is closed",
        ));
    }
    Ok(file)
}

/// Reads `len` bytes at `offset`, or `None` when they lie (partly) past `file_len`: the
/// checks report such a table as a finding instead of failing.
pub fn read_inside(
    file: &HostFile,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<Option<Vec<u8>>> {
    let Some(end) = offset.checked_add(len) else {
        return Ok(None);
    };
    if end > file_len {
        return Ok(None);
    }
    crate::meta::budget::check_table_memory("a table to check", len)?;
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|_| Error::out_of_range("table size"))?];
    file.read_exact_at(&mut bytes, offset)?;
    Ok(Some(bytes))
}

/// An error's message without its kind ("corrupt image: "), for a finding's line.
pub fn bare(e: &Error) -> String {
    let text = e.to_string();
    text.strip_prefix("corrupt image: ")
        .unwrap_or(&text)
        .to_string()
}

/// Finds overlapping ranges among `ranges` (start, len, id): each overlap as (id of the later
/// range in file order, id of the earlier range it runs into).
pub fn overlaps(ranges: &mut [(u64, u64, u64)]) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut found = Vec::new();
    // The range reaching furthest so far: (end, id).
    let mut reach: Option<(u64, u64)> = None;
    for &(start, len, id) in ranges.iter() {
        if let Some((end, owner)) = reach {
            if start < end {
                found.push((id, owner));
            }
        }
        let end = start.saturating_add(len);
        match reach {
            Some((e, _)) if e >= end => {}
            _ => reach = Some((end, id)),
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_qemu_img() {
        let mut r = CheckReport::new(Format::Vdi);
        assert_eq!(r.exit_code(), 0);
        r.leak("Leaked cluster 1 refcount=1 reference=0");
        assert_eq!(r.exit_code(), 3);
        r.corruption("ERROR x");
        assert_eq!(r.exit_code(), 2);
        r.check_error("ERROR: I/O");
        assert_eq!(r.exit_code(), 1);
        assert_eq!(r.messages.len(), 3);
    }

    #[test]
    fn recheck_keeps_the_repairs_and_first_messages() {
        let mut first = CheckReport::new(Format::Qcow2);
        first.leak("Leaked cluster 9 refcount=1 reference=0");
        first.leaks_fixed = 1;
        let after = CheckReport::new(Format::Qcow2);
        let merged = first.then_rechecked(after);
        assert_eq!((merged.leaks, merged.leaks_fixed), (0, 1));
        assert_eq!(merged.messages.len(), 1);
        assert_eq!(merged.exit_code(), 0);
    }

    #[test]
    fn overlaps_name_both_ranges() {
        assert!(overlaps(&mut [(0, 10, 1), (10, 5, 2)]).is_empty());
        let found = overlaps(&mut [(20, 10, 3), (0, 100, 1), (50, 10, 2), (200, 1, 4)]);
        assert_eq!(found, vec![(3, 1), (2, 1)]);
    }
}
