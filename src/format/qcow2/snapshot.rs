//! The qcow2 snapshot table: a contiguous run of variable-length entries at
//! `snapshots_offset`, one per internal snapshot.
//!
//! ```text
//!  0  l1_table_offset u64      8  l1_size u32
//! 12  id_str_size u16         14  name_size u16
//! 16  date_sec u32            20  date_nsec u32
//! 24  vm_clock_nsec u64       32  vm_state_size u32
//! 36  extra_data_size u32     40  extra data: vm_state_size_large u64, disk_size u64, ...
//!     then the id string, the name, padding to a multiple of 8
//! ```
//!
//! Each snapshot is served read-only as a view of its own L1 table over the image's file.
//!
//! The table is read in growing chunks while it is parsed, never by a size taken from the
//! file: it is capped at QEMU's limit (1 KiB per snapshot on average, 64 MiB in all) and at
//! the end of the file.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::bytes::{u16_be, u32_be, u64_be};

use super::{header, read_l1, Qcow2Image, CORRUPT_REASON, SNAPSHOT_REASON};

const ENTRY_HEADER_LEN: usize = 40;
/// QEMU refuses entries with more extra data than this.
const MAX_EXTRA_DATA: u32 = 1024;
/// QEMU's cap on the whole table.
const MAX_TABLE_BYTES: u64 = 1024 * 65536;
const FIRST_READ: usize = 64 << 10;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// The virtual disk size when the snapshot was taken.
    pub disk_size: u64,
    pub(crate) l1_table_offset: u64,
    pub(crate) l1_size: u32,
    /// Where the entry starts in the image file, for error messages.
    pub(crate) entry_offset: u64,
}

/// The snapshot table bytes read so far, starting at the table offset.
struct TableReader<'a> {
    file: &'a HostFile,
    offset: u64,
    limit: u64,
    buf: Vec<u8>,
}

impl TableReader<'_> {
    /// `len` bytes at `at` (relative to the table start), reading more of the table if needed.
    fn bytes(&mut self, at: usize, len: usize, what: &str) -> Result<&[u8]> {
        let end = at
            .checked_add(len)
            .filter(|&end| end as u64 <= self.limit)
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "snapshot table {what} at {:#x} runs past the end of the table \
                     (limit {} bytes)",
                    self.offset + at as u64,
                    self.limit
                ))
            })?;
        if end > self.buf.len() {
            let new_len = (end.max(self.buf.len() * 2).max(FIRST_READ) as u64).min(self.limit);
            let old_len = self.buf.len();
            self.buf.resize(new_len as usize, 0);
            let fresh = self.buf.get_mut(old_len..).unwrap_or_default();
            self.file
                .read_exact_at(fresh, self.offset + old_len as u64)?;
        }
        self.buf
            .get(at..end)
            .ok_or_else(|| Error::corrupt("internal: snapshot table read outside its buffer"))
    }
}

/// The file name (without `.raw`) under which each snapshot is served: its name where that
/// is a usable file name and no other snapshot has it, `snapshot-<id>` otherwise, and
/// `snapshot-#<index in the table>` where ids repeat (a hostile table; `#` in ids is replaced,
/// so the three forms never meet). Linear in the table: it may hold 65,536 snapshots.
pub fn file_names(snapshots: &[SnapshotInfo]) -> Vec<String> {
    let usable =
        |name: &str| !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0']);
    let id_name = |s: &SnapshotInfo| s.id.replace(['/', '\0', '#'], "_");
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    for s in snapshots {
        *names.entry(s.name.as_str()).or_default() += 1;
        *ids.entry(id_name(s)).or_default() += 1;
    }
    snapshots
        .iter()
        .enumerate()
        .map(|(index, s)| {
            let id = id_name(s);
            if usable(&s.name)
                && names.get(s.name.as_str()) == Some(&1)
                && !s.name.starts_with("snapshot-")
            {
                s.name.clone()
            } else if ids.get(&id) == Some(&1) {
                format!("snapshot-{id}")
            } else {
                format!("snapshot-#{index}")
            }
        })
        .collect()
}

/// Reads `count` entries of the table at `offset` in `file` (`file_len` bytes long), and
/// returns them with the table's length in bytes. `image_size` stands in for the disk size of
/// entries too old to record one.
pub fn read_table(
    file: &HostFile,
    offset: u64,
    count: u32,
    file_len: u64,
    image_size: u64,
) -> Result<(Vec<SnapshotInfo>, u64)> {
    if count == 0 {
        return Ok((Vec::new(), 0));
    }
    let mut reader = TableReader {
        file,
        offset,
        limit: file_len.saturating_sub(offset).min(MAX_TABLE_BYTES),
        buf: Vec::new(),
    };
    let mut snapshots = Vec::with_capacity(count.min(1024) as usize);
    let mut at = 0usize;
    for index in 0..count {
        let (snapshot, next) = parse_entry(&mut reader, index, at, image_size)
            .map_err(|e| e.at_offset(offset + at as u64))?;
        snapshots.push(snapshot);
        at = next;
    }
    Ok((snapshots, at as u64))
}

fn parse_entry(
    reader: &mut TableReader<'_>,
    index: u32,
    at: usize,
    image_size: u64,
) -> Result<(SnapshotInfo, usize)> {
    let what = |part: &str| format!("entry {index} {part}");
    let head = reader
        .bytes(at, ENTRY_HEADER_LEN, &what("header"))?
        .to_vec();
    let l1_table_offset = u64_be(&head, 0, "l1_table_offset")?;
    let l1_size = u32_be(&head, 8, "l1_size")?;
    let id_len = usize::from(u16_be(&head, 12, "id_str_size")?);
    let name_len = usize::from(u16_be(&head, 14, "name_size")?);
    let date_sec = u32_be(&head, 16, "date_sec")?;
    let date_nsec = u32_be(&head, 20, "date_nsec")?;
    let vm_clock_nsec = u64_be(&head, 24, "vm_clock_nsec")?;
    let mut vm_state_size = u64::from(u32_be(&head, 32, "vm_state_size")?);
    let extra_len = u32_be(&head, 36, "extra_data_size")?;
    if extra_len > MAX_EXTRA_DATA {
        return Err(Error::corrupt(format!(
            "snapshot table entry {index} has {extra_len} bytes of extra data, more than {MAX_EXTRA_DATA}"
        )));
    }
    let extra_at = at + ENTRY_HEADER_LEN;
    let extra = reader
        .bytes(extra_at, extra_len as usize, &what("extra data"))?
        .to_vec();
    if let Ok(large) = u64_be(&extra, 0, "vm_state_size_large") {
        vm_state_size = large;
    }
    let disk_size = u64_be(&extra, 8, "disk_size").unwrap_or(image_size);
    let id_at = extra_at + extra_len as usize;
    let id = String::from_utf8_lossy(reader.bytes(id_at, id_len, &what("id"))?).into_owned();
    let name_at = id_at + id_len;
    let name =
        String::from_utf8_lossy(reader.bytes(name_at, name_len, &what("name"))?).into_owned();
    let next = (name_at + name_len).div_ceil(8) * 8;
    Ok((
        SnapshotInfo {
            id,
            name,
            vm_state_size,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            disk_size,
            l1_table_offset,
            l1_size,
            entry_offset: reader.offset + at as u64,
        },
        next,
    ))
}

impl Qcow2Image {
    /// A read-only view of internal snapshot `index`: its own L1 table over the same file,
    /// L2 cache and backing image.
    pub fn snapshot_image(&self, index: usize) -> Result<Qcow2Image> {
        self.snapshot_image_inner(index)
            .map_err(|e| e.with_path(self.shared.file.path()))
    }

    fn snapshot_image_inner(&self, index: usize) -> Result<Qcow2Image> {
        let snapshot = self.check_snapshot(index)?;
        let shared = &self.shared;
        let l1 = read_l1(&shared.file, snapshot.l1_table_offset, snapshot.l1_size)?;
        let mut reasons = vec![SNAPSHOT_REASON.to_string()];
        if shared.header.is_corrupt() {
            reasons.push(CORRUPT_REASON.to_string());
        }
        Ok(Qcow2Image {
            shared: Arc::clone(shared),
            l1: RwLock::new(l1),
            l1_table_offset: AtomicU64::new(snapshot.l1_table_offset),
            size: AtomicU64::new(snapshot.disk_size),
            snapshot: Some(index),
            read_only_reason: Some(reasons.join("; ")),
        })
    }

    /// Snapshot `index`'s entry, if its L1 table and disk size can be used.
    pub(super) fn check_snapshot(&self, index: usize) -> Result<&SnapshotInfo> {
        let shared = &self.shared;
        let snapshot = shared.snapshots.get(index).ok_or_else(|| {
            Error::out_of_range(format!(
                "snapshot {index} does not exist (the image has {})",
                shared.snapshots.len()
            ))
        })?;
        let what = format!("snapshot {:?} ({index})", snapshot.name);
        let l1_bytes = u64::from(snapshot.l1_size) * 8;
        if l1_bytes > header::MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "{what}: l1_size {} is larger than the 32 MiB table QEMU allows",
                snapshot.l1_size
            ))
            .at_offset(snapshot.entry_offset + 8));
        }
        if snapshot.l1_size > 0 {
            header::check_table(
                &format!("{what} l1_table_offset"),
                snapshot.entry_offset,
                snapshot.l1_table_offset,
                l1_bytes,
                shared.header.cluster_size(),
                shared.file.len()?,
            )?;
        }
        if snapshot.disk_size > i64::MAX as u64 {
            return Err(Error::corrupt(format!(
                "{what}: disk size {} is too large",
                snapshot.disk_size
            )));
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(id: &str, name: &str) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            name: name.into(),
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            disk_size: 0,
            l1_table_offset: 0,
            l1_size: 0,
            entry_offset: 0,
        }
    }

    #[test]
    fn file_names_are_the_names_unless_unusable_or_shared() {
        let names = file_names(&[
            snapshot("1", "before-upgrade"),
            snapshot("2", "a/b"),
            snapshot("3", "twice"),
            snapshot("4", "twice"),
            snapshot("5", ""),
            snapshot("6", ".."),
            snapshot("7", "snapshot-1"),
            snapshot("8", "x"),
            snapshot("8", "y"),
            snapshot("a#b", ""),
            snapshot("9", "z"),
            snapshot("9", "z"),
        ]);
        assert_eq!(
            names,
            [
                "before-upgrade",
                "snapshot-2",
                "snapshot-3",
                "snapshot-4",
                "snapshot-5",
                "snapshot-6",
                "snapshot-7",
                "x",
                "y",
                "snapshot-a_b",
                "snapshot-#10",
                "snapshot-#11"
            ]
        );
    }
}
