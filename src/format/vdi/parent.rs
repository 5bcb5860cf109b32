//! Finding the parent of a differencing VDI (a VirtualBox snapshot). The child records no file
//! name, only the parent's image UUID (`uuid_link`): VirtualBox looks it up in its media
//! registry. imgfs has no registry, so it looks the UUID up among the VDIs of the source tree:
//! every regular file whose head is a VDI header with that `uuid_image`. Exactly one must match;
//! none or several (a copied disk keeps its UUID) refuse the child with the names found. The
//! parent's modification UUID differing from the child's `uuid_parent` means the parent was
//! written after the snapshot was taken; that is logged, not refused (VirtualBox refuses, but a
//! read of the merged disk is what the user asked for, and the log says what to distrust).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use uuid::Uuid;

use super::header::{Header, HEADER_LEN};
use crate::error::{Error, Result};
use crate::format::backing::Backing;
use crate::format::links::{Chain, Links};
use crate::format::Format;
use crate::host::HostFile;

/// How deep below the root the search looks; deeper trees are not VirtualBox layouts.
const MAX_DEPTH: usize = 32;

/// How many files' header UUIDs `HEADERS` remembers before it starts over.
const MAX_REMEMBERED: usize = 1 << 16;

/// A file's identity and the times and size that change when it is rewritten.
type FileStamp = (u64, u64, u64, i64, i64, i64, i64);

/// The image and modification UUIDs of the VDIs (`None`: not a VDI) the searches have read,
/// by file stamp, so that the search a snapshot's every open repeats stats the tree but only
/// reads the files that changed.
static HEADERS: Mutex<Option<HeaderUuids>> = Mutex::new(None);

type HeaderUuids = HashMap<FileStamp, Option<(Uuid, Uuid)>>;

fn stamp(meta: &std::fs::Metadata) -> FileStamp {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// The image and modification UUIDs of the file at `path` if it is a VDI, from `HEADERS`
/// while the file is unchanged.
fn uuids_of(path: &Path, meta: &std::fs::Metadata) -> Option<(Uuid, Uuid)> {
    let key = stamp(meta);
    if let Some(known) = HEADERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .and_then(|headers| headers.get(&key))
    {
        return *known;
    }
    let uuids = vdi_header(path).map(|h| (h.uuid_image, h.uuid_last_snap));
    let mut headers = HEADERS.lock().unwrap_or_else(PoisonError::into_inner);
    let headers = headers.get_or_insert_with(HashMap::new);
    if headers.len() >= MAX_REMEMBERED {
        headers.clear();
    }
    headers.insert(key, uuids);
    uuids
}

/// Who a differencing VDI's parent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentLink {
    /// The parent's `uuid_image`.
    pub uuid: Uuid,
    /// The parent's `uuid_last_snap` when the child was made.
    pub modification: Uuid,
}

/// A VDI found by the search, with the header fields the caller checks.
struct Found {
    path: PathBuf,
    modification: Uuid,
}

/// Finds and opens the parent of the differencing image at `chain.parent_path()` among the
/// VDIs below `links.root()`, read-only through `links` so the catalog shares it.
pub fn open_parent(link: &ParentLink, chain: &Chain, links: &mut dyn Links) -> Result<Backing> {
    let child = chain.parent_path().to_path_buf();
    let root = links.root().to_path_buf();
    let mut found = Vec::new();
    search(&root, 0, &child, link.uuid, &mut found);
    let parent = match found.len() {
        1 => found.remove(0),
        0 => {
            return Err(Error::corrupt(format!(
                "the parent of this differencing VDI (uuid_image {}) is not among the VDIs below \
                 {}",
                link.uuid,
                root.display()
            )))
        }
        _ => {
            let names: Vec<String> = found.iter().map(|f| f.path.display().to_string()).collect();
            return Err(Error::corrupt(format!(
                "the parent of this differencing VDI (uuid_image {}) is ambiguous: {}",
                link.uuid,
                names.join(", ")
            )));
        }
    };
    if parent.modification != link.modification {
        log::warn!(
            "{}: its parent {} was modified after the snapshot was taken (modification UUID {}, \
             the child recorded {}): the merged disk may not be what the guest saw",
            child.display(),
            parent.path.display(),
            parent.modification,
            link.modification
        );
    }
    let image = links.open_backing(&parent.path, Some(Format::Vdi), chain)?;
    Ok(Backing::new(image, &parent.path))
}

/// Collects the VDIs below `dir` (not following symbolic links, which could lead out of the
/// tree) whose `uuid_image` is `uuid`, except `child` itself. Unreadable entries are skipped:
/// they cannot be the parent imgfs could open anyway.
fn search(dir: &Path, depth: usize, child: &Path, uuid: Uuid, found: &mut Vec<Found>) {
    if depth > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        let path = entry.path();
        if meta.is_dir() {
            search(&path, depth + 1, child, uuid, found);
        } else if meta.is_file() && meta.len() >= HEADER_LEN as u64 && path != child {
            if let Some((image, modification)) = uuids_of(&path, &meta) {
                if image == uuid {
                    found.push(Found { path, modification });
                }
            }
        }
    }
}

/// The VDI header of the file at `path`, if it has a valid one.
fn vdi_header(path: &Path) -> Option<Header> {
    let file = HostFile::open(path, false).ok()?;
    let mut head = [0u8; HEADER_LEN];
    file.read_exact_at(&mut head, 0).ok()?;
    if !super::probe(&head) {
        return None;
    }
    Header::parse(&head).ok()
}
