//! What the catalog knows about one image file of the source tree: its identity (which file, in
//! which state), a summary read once per version (format, size, snapshots, the files below it
//! in its chain), and how to tell whether the file at its path is still that version.
//!
//! A version ends when the file at the path is another file (a new inode), or the same file with
//! content someone else changed: its size or mtime moved, or its ctime moved and its header
//! bytes differ. Changes that this process's own writes explain (counted by
//! `host::activity`) keep the version. Handles opened on a version keep it after it ends.

use std::hash::{Hash, Hasher};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use crate::format::Format;
use crate::host::activity::{ctime_ns, mtime_ns, own_writes, FileKey};
use crate::views::PartitionTable;

/// Which file: device and inode, whatever its name.
pub type FileId = FileKey;

/// One state of one file: a changed identity means "look again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub id: FileId,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            id: (meta.dev(), meta.ino()),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The attributes a raw file or directory shows, taken from a file of the source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStat {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

fn time_of(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + std::time::Duration::new(s, nanos),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

impl FileStat {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileStat {
            perm: (meta.mode() & 0o7777) as u16,
            uid: meta.uid(),
            gid: meta.gid(),
            atime: time_of(meta.atime(), meta.atime_nsec()),
            mtime: time_of(meta.mtime(), meta.mtime_nsec()),
            ctime: time_of(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How many leading bytes of an image identify its content when only its ctime changed.
const HEADER_BYTES: usize = 4096;

/// A hash of the first bytes of the file at `path` (0 if it cannot be read).
pub fn header_hash(path: &Path) -> u64 {
    let mut head = vec![0u8; HEADER_BYTES];
    let n = std::fs::File::open(path)
        .and_then(|f| f.read_at(&mut head, 0))
        .unwrap_or(0);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    head[..n].hash(&mut hasher);
    hasher.finish()
}

/// Whether the daemon may open `path` for writing (permissions, read-only file systems).
pub fn host_writable(path: &Path) -> bool {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path; access has no other preconditions.
    unsafe { libc::access(c_path.as_ptr(), libc::W_OK) == 0 }
}

/// What one version of an image is, read once with an inspecting open (no locks, no writes).
#[derive(Debug, Clone)]
pub struct Summary {
    pub format: Format,
    pub size: u64,
    pub allocated: u64,
    /// Why the image itself must be served read-only (a corrupt bit, a read-only sub-format).
    pub inherent_read_only: Option<String>,
    /// Internal snapshots, sorted by file name (without `.raw`).
    pub snapshots: Vec<SnapshotSummary>,
    /// Every file below the image in its chain (backing files, parents), top down.
    pub below: Vec<FileId>,
    pub header_hash: u64,
    /// The disk's partition table, or why it is not served.
    pub partitions: Partitions,
}

impl Summary {
    /// The internal snapshot served as `name` (without `.raw`). A hostile table may hold
    /// 65,536 of them, so this is a binary search, not a scan.
    pub fn snapshot(&self, name: &str) -> Option<&SnapshotSummary> {
        let at = self
            .snapshots
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()?;
        self.snapshots.get(at)
    }
}

/// A disk's partition table (`None`: it has none), or why it cannot be trusted.
pub type Partitions = std::result::Result<Option<Arc<PartitionTable>>, String>;

/// One internal snapshot of an image.
pub type SnapshotSummary = crate::image::SnapshotEntry;

/// The last state of a version seen at its path.
#[derive(Debug)]
struct Seen {
    identity: FileIdentity,
    /// This process's writes to the file started when `identity` was taken.
    writes: u64,
    stat: FileStat,
    host_writable: bool,
}

/// How the file at a version's path compares with the version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Unchanged, or changed only by this process's writes, or only in its metadata
    /// (permissions, owner, links): still this version.
    Current,
    /// Another file or nothing at the path (or the version had ended already).
    Replaced,
    /// The same file with content someone else wrote: whatever an instance of the version
    /// holds in memory no longer describes it.
    Rewritten,
}

/// One version of one image file of the source tree.
#[derive(Debug)]
pub struct ImageFile {
    /// Path relative to the root of the source tree.
    pub rel: PathBuf,
    pub source: PathBuf,
    pub id: FileId,
    /// Unique in the catalog: a new version of a file gets a new number.
    pub version: u64,
    pub summary: Summary,
    seen: Mutex<Seen>,
    ended: AtomicBool,
    /// Bytes allocated in the image as last seen (the summary's, then its instances').
    allocated: AtomicU64,
    /// The virtual size as last seen (the summary's, then its instances': a resize through
    /// the mount changes it without the file being scanned again).
    size: AtomicU64,
    /// The partition table as last read, and this process's writes to the file then: a write
    /// since may have changed it (fdisk through the mount).
    partitions: Mutex<(u64, Partitions)>,
}

impl ImageFile {
    pub fn new(
        rel: PathBuf,
        source: PathBuf,
        version: u64,
        summary: Summary,
        meta: &std::fs::Metadata,
        writes_before: u64,
    ) -> Self {
        let identity = FileIdentity::of(meta);
        let summary_allocated = summary.allocated;
        let summary_size = summary.size;
        let summary_partitions = summary.partitions.clone();
        ImageFile {
            rel,
            id: identity.id,
            version,
            summary,
            seen: Mutex::new(Seen {
                identity,
                writes: writes_before,
                stat: FileStat::of(meta),
                host_writable: host_writable(&source),
            }),
            source,
            ended: AtomicBool::new(false),
            allocated: AtomicU64::new(summary_allocated),
            size: AtomicU64::new(summary_size),
            partitions: Mutex::new((writes_before, summary_partitions)),
        }
    }

    pub fn allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    pub fn set_allocated(&self, bytes: u64) {
        self.allocated.store(bytes, Ordering::Relaxed);
    }

    /// The virtual size as last seen.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    pub fn set_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Relaxed);
    }

    /// The partition table as read when this process had started `writes` writes to the file.
    pub fn partitions(&self) -> (u64, Partitions) {
        self.partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_partitions(&self, writes: u64, partitions: Partitions) {
        *self
            .partitions
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = (writes, partitions);
    }

    fn seen(&self) -> MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The attributes last seen for the file of this version.
    pub fn stat(&self) -> FileStat {
        self.seen().stat.clone()
    }

    /// Whether the daemon could open the file for writing when it last looked.
    pub fn host_writable(&self) -> bool {
        self.seen().host_writable
    }

    /// Whether the version has ended (found replaced, changed or gone).
    pub fn has_ended(&self) -> bool {
        self.ended.load(Ordering::Relaxed)
    }

    pub fn end(&self) {
        self.ended.store(true, Ordering::Relaxed);
    }

    /// Compares the file now at the path with this version (a stat, and when only the ctime
    /// moved, a read of the header), remembering what it saw; an ended version stays ended.
    pub fn check(&self) -> Change {
        if self.has_ended() {
            return Change::Replaced;
        }
        let change = self.compare();
        if change != Change::Current {
            self.end();
        }
        change
    }

    fn compare(&self) -> Change {
        let before = own_writes(self.id);
        let meta = match std::fs::symlink_metadata(&self.source) {
            Ok(meta) if meta.is_file() => meta,
            _ => return Change::Replaced,
        };
        let after = own_writes(self.id);
        let now = FileIdentity::of(&meta);
        if now.id != self.id {
            return Change::Replaced;
        }
        let quiet = before == after && after.is_quiet();
        let (ctime_only, ours) = {
            let mut seen = self.seen();
            if now == seen.identity {
                seen.stat = FileStat::of(&meta);
                return Change::Current;
            }
            let ours = after.started != seen.writes || before.started != seen.writes;
            // With none of ours in flight, a ctime past our last write's is someone else's.
            let foreign_after_ours = quiet && ctime_ns(&meta) > after.last.ctime;
            if ours && !foreign_after_ours {
                // Our own writes moved it. Remember the new state only when no write of ours
                // was in flight around the stat: then it shows all of them.
                if quiet {
                    seen.identity = now;
                    seen.writes = after.started;
                    seen.stat = FileStat::of(&meta);
                }
                return Change::Current;
            }
            // Someone else changed the file: its metadata only if it left the size and mtime
            // as our last write (or, with no write of ours since, as last seen) left them.
            let ctime_only = if ours {
                now.size == after.last.size && mtime_ns(&meta) == after.last.mtime
            } else {
                now.size == seen.identity.size && now.mtime == seen.identity.mtime
            };
            (ctime_only, ours)
        };
        // Our writes may have changed the header since it was hashed; a content rewrite that
        // keeps both the size and the nanosecond mtime our last write left is not credible.
        if !ctime_only || (!ours && header_hash(&self.source) != self.summary.header_hash) {
            return Change::Rewritten;
        }
        // Permissions, owner, links or attributes changed; the content did not. (With writes
        // of ours among the change, none was in flight: `quiet` held.)
        let mut seen = self.seen();
        seen.identity = now;
        seen.writes = after.started;
        seen.stat = FileStat::of(&meta);
        seen.host_writable = host_writable(&self.source);
        Change::Current
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostFile;
    use crate::testutil::TempDir;

    fn version_of(path: &Path) -> ImageFile {
        let meta = std::fs::symlink_metadata(path).unwrap();
        let summary = Summary {
            format: Format::Raw,
            size: 0,
            allocated: 0,
            inherent_read_only: None,
            snapshots: Vec::new(),
            below: Vec::new(),
            header_hash: header_hash(path),
            partitions: Ok(None),
        };
        let writes = own_writes((meta.dev(), meta.ino())).started;
        ImageFile::new(
            PathBuf::from("f"),
            path.to_path_buf(),
            1,
            summary,
            &meta,
            writes,
        )
    }

    fn bump_mtime(path: &Path) {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_times(std::fs::FileTimes::new().set_modified(t))
            .unwrap();
    }

    #[test]
    fn own_writes_keep_the_version_and_foreign_ones_end_it() {
        let dir = TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let version = version_of(&path);
        assert_eq!(version.check(), Change::Current);

        let ours = HostFile::open(&path, true).unwrap();
        ours.write_all_at(&[2u8; 100], 10_000).unwrap();
        assert_eq!(version.check(), Change::Current, "our write grew the file");
        drop(ours);
        assert_eq!(version.check(), Change::Current);

        // Our writes, then someone else's before anyone looked: still told apart.
        let after_ours = version_of(&path);
        let ours = HostFile::open(&path, true).unwrap();
        ours.write_all_at(&[4u8; 100], 0).unwrap();
        std::fs::write(&path, vec![5u8; 20_000]).unwrap();
        assert_eq!(after_ours.check(), Change::Rewritten);
        drop(ours);

        // Someone else writes the same file in place.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[3u8; 10], 0)
            .unwrap();
        bump_mtime(&path);
        assert_eq!(version.check(), Change::Rewritten);
        assert_eq!(
            version.check(),
            Change::Replaced,
            "an ended version stays ended"
        );
    }

    #[test]
    fn a_metadata_change_after_our_writes_keeps_the_version() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let version = version_of(&path);
        let ours = HostFile::open(&path, true).unwrap();
        ours.write_all_at(&[2u8; 100], 10_000).unwrap();
        // A backup tool's hard link, a chmod: only the ctime moves past our write's.
        std::fs::hard_link(&path, dir.path().join("link")).unwrap();
        assert_eq!(version.check(), Change::Current, "a new link");
        ours.write_all_at(&[3u8; 100], 0).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(version.check(), Change::Current, "a chmod after our write");
        assert_eq!(version.stat().perm, 0o600);
        // Someone else's write after ours moves the mtime: a new version.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[4u8; 10], 0)
            .unwrap();
        assert_eq!(version.check(), Change::Rewritten);
    }

    #[test]
    fn metadata_changes_keep_the_version_and_replacements_end_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let version = version_of(&path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert_eq!(version.check(), Change::Current, "chmod keeps the content");
        assert_eq!(version.stat().perm, 0o444);

        // Same size and mtime, other header bytes: `cp -p` of another image.
        let other = dir.path().join("g");
        std::fs::write(&other, vec![9u8; 8192]).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[9u8; 8192], 0)
            .unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_times(std::fs::FileTimes::new().set_modified(mtime))
            .unwrap();
        assert_eq!(version.check(), Change::Rewritten);

        let replaced = version_of(&path);
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(
            replaced.check(),
            Change::Replaced,
            "a new inode at the path"
        );
        let gone = version_of(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(gone.check(), Change::Replaced);
    }
}
