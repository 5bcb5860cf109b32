//! The open-time reading of a VHD: the footer in force (the last one, or the copy at offset 0
//! when the last is damaged), and for dynamic and differencing disks the dynamic header, the
//! parent locators and the BAT, each checked against the file and the others.

use std::ops::Range;
use std::sync::{Mutex, RwLock};

use super::bat::{Bat, Geometry};
use super::bitmap::Bitmaps;
use super::footer::{DiskType, Footer, FOOTER_LEN, SECTOR};
use super::header::{self, DynHeader, HEADER_LEN, MAX_LOCATOR_LEN};
use super::{AllocState, ParentRef, Sparse};
use crate::error::{Error, Result};
use crate::host::HostFile;

/// The footer in force and what became of the other copy.
pub(super) struct Footers {
    pub footer: Footer,
    /// Whether the last 512 bytes of the file are that footer.
    pub end_valid: bool,
    /// Whether the copy at offset 0 must be rewritten (a dynamic disk's, damaged or different).
    pub copy_damaged: bool,
    pub note: Option<String>,
}

/// Reads the footer at the end of the file and, for a dynamic or differencing disk (or when the
/// last one is damaged), the copy at offset 0. The last one is in force when it is valid.
pub(super) fn read_footers(file: &HostFile, file_len: u64) -> Result<Footers> {
    if file_len < FOOTER_LEN as u64 {
        return Err(Error::corrupt(format!(
            "the file is {file_len} bytes, shorter than the 512-byte VHD footer"
        )));
    }
    let end_at = file_len - FOOTER_LEN as u64;
    let mut end_raw = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut end_raw, end_at)?;
    let mut head_raw = [0u8; FOOTER_LEN];
    file.read_exact_at(&mut head_raw, 0)?;
    let head = Footer::parse(&head_raw);
    match Footer::parse(&end_raw) {
        Ok(footer) if footer.disk_type_code == DiskType::Fixed.code() => Ok(Footers {
            footer,
            end_valid: true,
            copy_damaged: false,
            note: None,
        }),
        Ok(footer) => {
            let (copy_damaged, note) = match head {
                Ok(copy) if copy == footer => (false, None),
                Ok(_) => (
                    true,
                    Some("the footer copy at offset 0 differs from the last footer, which is used"),
                ),
                Err(_) => (
                    true,
                    Some("the footer copy at offset 0 is damaged; the last footer is used"),
                ),
            };
            Ok(Footers {
                footer,
                end_valid: true,
                copy_damaged,
                note: note.map(str::to_string),
            })
        }
        Err(end_error) => match head {
            Ok(copy) if copy.disk_type_code != DiskType::Fixed.code() => Ok(Footers {
                footer: copy,
                end_valid: false,
                copy_damaged: false,
                note: Some(format!(
                    "the footer at the end of the file is damaged ({}); the copy at offset 0 \
                     is used",
                    end_error.to_string().trim_start_matches("corrupt image: ")
                )),
            }),
            Ok(_) => Err(end_error
                .context("the footer at the end of the file")
                .at_offset(end_at)),
            Err(head_error) => Err(Error::corrupt(format!(
                "no valid VHD footer: at the end of the file: {end_error}; at offset 0: \
                 {head_error}"
            ))),
        },
    }
}

/// A dynamic or differencing disk's structures, read and checked.
pub(super) struct OpenedSparse {
    pub sparse: Sparse,
    pub overlap: Option<String>,
    pub parent_ref: ParentRef,
}

/// Reads the dynamic header, the parent locators and the BAT, and checks them against the
/// file and each other.
pub(super) fn open_sparse(
    file: &HostFile,
    file_len: u64,
    footer: &Footer,
    found: &Footers,
    size: u64,
    disk_type: DiskType,
) -> Result<OpenedSparse> {
    let header_at = footer.data_offset;
    let header_range = span(
        header_at,
        HEADER_LEN as u64,
        file_len,
        "the dynamic disk header",
    )?;
    if header_at < FOOTER_LEN as u64 {
        return Err(Error::corrupt(format!(
            "the dynamic disk header at {header_at:#x} overlaps the footer copy at offset 0"
        )));
    }
    let mut raw = [0u8; HEADER_LEN];
    file.read_exact_at(&mut raw, header_at)?;
    let header = DynHeader::parse(&raw).map_err(|e| e.at_offset(header_at))?;
    let geometry = Geometry::new(&header, size).map_err(|e| e.at_offset(header_at))?;
    let table_len = u64::from(geometry.entries) * 4;
    let table = span(header.table_offset, table_len, file_len, "the BAT")?;
    let mut metadata = vec![
        ("the footer copy", 0..FOOTER_LEN as u64),
        ("the dynamic disk header", header_range),
        ("the BAT", table.clone()),
    ];
    for (i, (name, a)) in metadata.iter().enumerate() {
        if let Some((other, _)) = metadata[..i]
            .iter()
            .find(|(_, b)| a.start < b.end && b.start < a.end)
        {
            return Err(Error::corrupt(format!("{name} overlaps {other}")));
        }
    }
    let mut locators = Vec::new();
    if disk_type == DiskType::Differencing {
        for locator in &header.locators {
            let code = locator.code_text();
            let data = locator.data_range().and_then(|range| {
                if locator.length > MAX_LOCATOR_LEN {
                    return Err(Error::corrupt(format!(
                        "its {} bytes are more than a Windows path takes",
                        locator.length
                    )));
                }
                span(range.start, locator.length.into(), file_len, "its data")
            });
            let path = match data {
                Ok(range) => {
                    let mut bytes = vec![0u8; locator.length as usize];
                    file.read_exact_at(&mut bytes, range.start)?;
                    metadata.push(("a parent locator", range));
                    header::locator_path(locator.code, &bytes)
                        .ok_or_else(|| "a platform imgfs does not follow".to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            locators.push((code, path));
        }
    }
    let parent_ref = ParentRef {
        uuid: header.parent_uuid,
        timestamp: header.parent_timestamp,
        unicode_name: header.parent_name.clone(),
        locators,
    };
    // Bounded: the table lies inside the file, and has at most bat::MAX_ENTRIES entries.
    let mut raw_table = vec![0u8; table_len as usize];
    file.read_exact_at(&mut raw_table, header.table_offset)?;
    let (bat, scan) = Bat::load(
        geometry,
        header.table_offset,
        &raw_table,
        &metadata,
        file_len,
    )?;
    drop(raw_table);
    let data_end = if found.end_valid {
        file_len - FOOTER_LEN as u64
    } else {
        file_len
    };
    let used_end = metadata
        .iter()
        .map(|(_, r)| r.end)
        .chain([scan.blocks_end])
        .max()
        .unwrap_or(0)
        .next_multiple_of(SECTOR);
    let mut next_free = used_end.max(data_end).next_multiple_of(SECTOR);
    // The room an earlier allocation made for a next block that never came: the footer it
    // left where that block's bitmap would go, and the footer one block further on.
    let span = geometry.bitmap_size + geometry.block_size;
    if found.end_valid && data_end == used_end + span {
        let mut stale = [0u8; FOOTER_LEN];
        file.read_exact_at(&mut stale, used_end)?;
        if stale == *footer.bytes() {
            next_free = used_end;
        }
    }
    let sparse = Sparse {
        bitmaps: Bitmaps::new(geometry.entries, geometry.bitmap_size, geometry.sectors()),
        alloc: Mutex::new(AllocState {
            next_free,
            durable_end: file_len,
            repair_end: !found.end_valid,
            repair_copy: found.copy_damaged,
        }),
        bat: RwLock::new(bat),
        geometry,
        header,
    };
    Ok(OpenedSparse {
        sparse,
        overlap: scan.overlap,
        parent_ref,
    })
}

/// `[start, start + len)`, which must lie inside a file of `file_len` bytes.
fn span(start: u64, len: u64, file_len: u64, what: &str) -> Result<Range<u64>> {
    start
        .checked_add(len)
        .filter(|&end| end <= file_len)
        .map(|end| start..end)
        .ok_or_else(|| {
            Error::corrupt(format!(
                "{what} ({len} bytes at {start:#x}) lies beyond the end of the file \
                 ({file_len} bytes)"
            ))
        })
}
