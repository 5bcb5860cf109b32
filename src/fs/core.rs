//! The filesystem's logic without FUSE: inode numbers for the entries of the raw namespace,
//! open file and directory handles, and each operation (lookup, read, write, lseek, ...) as a
//! method that returns an errno on failure. Errors from images are logged here, once, with the
//! path. An I/O error keeps the host's errno, so a full host disk reaches the writer as ENOSPC.
//!
//! A failed write-back leaves an image read-only and failing every later flush
//! (`meta::write_back`). Each handle (an open file description) is told once, as Linux tells
//! each description of a file once about a writeback error: the next flush or fsync through a
//! handle that was open for writing then fails with the error, and later ones succeed, since
//! the image takes no writes any more that a flush could lose.
//!
//! An image's inode is bound to one version of its file, so a file replaced under its name gets
//! a new inode, while descriptors opened on the old one (and `fstat` on them) keep seeing the
//! old one. Inodes are dropped when the kernel forgets them. Directory listings are taken once
//! per `opendir`, so reading a large directory in many chunks lists it once.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use crate::catalog::{Catalog, FileStat, ImageFile, ImageHandle, Target};
use crate::error::{Error, ErrorKind};
use crate::host::{bypassing_page_cache, AlignedBuffer};
use crate::image::Image;

/// An errno to reply with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type FsResult<T> = Result<T, Errno>;

pub const ROOT_INO: u64 = 1;

pub use xattr::{
    XATTR_FLUSH, XATTR_LOST_WRITE_BACKS, XATTR_OPEN_FILES, XATTR_OVERLAY, XATTR_PARTITION_NAME,
    XATTR_PASSTHROUGH_OPENS, XATTR_PID, XATTR_READ_ONLY_REASON, XATTR_SOURCE,
};

/// How long an instance nobody has open stays open (its descriptors and locks held) in case it
/// is opened again; the periodic housekeeping closes it after that.
pub const IDLE_LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
}

/// File attributes in plain terms; the adapter turns them into fuser's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    pub blocks: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// Statistics of the host file system holding the images.
#[derive(Debug, Clone, Copy, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// The owner, group and mode bits the mount shows instead of the image files' own
/// (`-o uid=,gid=,umask=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ownership {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: u16,
}

/// What makes two targets the same inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum NodeKey {
    Dir(PathBuf),
    Image(u64),
    SnapshotsDir(u64),
    Snapshot(u64, String),
    PartsDir(u64),
    Partition(u64, u32),
}

fn key_of(target: &Target) -> NodeKey {
    match target {
        Target::Dir(rel) => NodeKey::Dir(rel.clone()),
        Target::Image(image) => NodeKey::Image(image.version),
        Target::SnapshotsDir(image) => NodeKey::SnapshotsDir(image.version),
        Target::Snapshot(image, name) => NodeKey::Snapshot(image.version, name.clone()),
        Target::PartsDir(image) => NodeKey::PartsDir(image.version),
        Target::Partition(image, number) => NodeKey::Partition(image.version, *number),
    }
}

fn kind_of(target: &Target) -> NodeKind {
    match target {
        Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_) => NodeKind::Dir,
        Target::Image(_) | Target::Snapshot(..) | Target::Partition(..) => NodeKind::File,
    }
}

struct Node {
    target: Target,
    /// References the kernel holds (lookups not yet forgotten).
    lookups: u64,
}

#[derive(Default)]
struct Inodes {
    by_key: HashMap<NodeKey, u64>,
    nodes: HashMap<u64, Node>,
    next: u64,
}

struct Handle {
    image: ImageHandle,
    /// The version it was opened on (not for snapshots).
    file: Option<Arc<ImageFile>>,
    /// Shared so the per-request clone for error messages does not allocate.
    source: Arc<Path>,
    /// A flush through this handle has reported the image's failed write-back.
    write_back_reported: std::sync::atomic::AtomicBool,
    /// Where this handle's reader is going, and what was read ahead for it.
    stream: readahead::Stream,
}

/// One directory entry as readdir reports it.
pub type DirEntry = (u64, NodeKind, OsString);

/// The mounted filesystem's state and operations.
pub struct FsCore {
    /// Shared with the NBD front end when both serve one daemon.
    catalog: Arc<Catalog>,
    ownership: Ownership,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Arc<Handle>>>,
    listings: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    next_handle: AtomicU64,
    fetcher: readahead::Fetcher,
    /// Opens the kernel serves by passthrough (`passthrough`).
    passthrough_opens: AtomicU64,
    /// The raw file the root shows when the mount point is a file (`file_root`).
    file_root: Option<file_root::FileRoot>,
}

/// Whether `e` says the daemon ran out of descriptors (its limit, not an image's fault).
fn out_of_descriptors(e: &Error) -> bool {
    matches!(e.errno(), libc::EMFILE | libc::ENFILE)
}

fn log_error(what: &str, source: &Path, e: Error) -> Errno {
    let e = e.with_path(source);
    match e.kind() {
        ErrorKind::ReadOnly | ErrorKind::OutOfRange | ErrorKind::Stale => {
            log::debug!("{what}: {e}")
        }
        _ if out_of_descriptors(&e) => log::warn!("{what}: {e}; too many files open at once"),
        _ => log::error!("{what}: {e}"),
    }
    Errno(e.errno())
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

impl FsCore {
    pub fn new(catalog: Catalog) -> Self {
        let mut inodes = Inodes {
            next: ROOT_INO + 1,
            ..Default::default()
        };
        let root = Target::Dir(PathBuf::new());
        inodes.by_key.insert(key_of(&root), ROOT_INO);
        inodes.nodes.insert(
            ROOT_INO,
            Node {
                target: root,
                lookups: 1,
            },
        );
        FsCore {
            catalog: Arc::new(catalog),
            ownership: Ownership::default(),
            inodes: RwLock::new(inodes),
            handles: RwLock::new(HashMap::new()),
            listings: Mutex::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            fetcher: readahead::Fetcher::default(),
            passthrough_opens: AtomicU64::new(0),
            file_root: None,
        }
    }

    /// Shows `ownership` instead of the image files' owner, group and mode bits.
    pub fn with_ownership(mut self, ownership: Ownership) -> Self {
        self.ownership = ownership;
        self
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The catalog, for another front end (NBD) serving the same images with the same
    /// instances.
    pub fn shared_catalog(&self) -> Arc<Catalog> {
        Arc::clone(&self.catalog)
    }

    fn target(&self, ino: u64) -> FsResult<Target> {
        if let (ROOT_INO, Some(root)) = (ino, &self.file_root) {
            return self.file_root_target(root);
        }
        let inodes = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        inodes
            .nodes
            .get(&ino)
            .map(|n| n.target.clone())
            .ok_or(Errno(libc::ENOENT))
    }

    /// The inode of `target`, created if needed, with one more kernel reference.
    fn remember(&self, target: Target) -> u64 {
        let key = key_of(&target);
        let mut inodes = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = inodes.by_key.get(&key) {
            if let Some(node) = inodes.nodes.get_mut(&ino) {
                node.lookups += 1;
                return ino;
            }
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes.by_key.insert(key, ino);
        inodes.nodes.insert(ino, Node { target, lookups: 1 });
        ino
    }

    /// The kernel dropped `count` references to `ino`.
    pub fn forget(&self, ino: u64, count: u64) {
        if ino == ROOT_INO {
            return;
        }
        let mut inodes = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        let Some(node) = inodes.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(count);
        if node.lookups == 0 {
            if let Some(node) = inodes.nodes.remove(&ino) {
                let key = key_of(&node.target);
                if inodes.by_key.get(&key) == Some(&ino) {
                    inodes.by_key.remove(&key);
                }
            }
        }
    }

    /// How many inodes are known (for tests of `forget`).
    pub fn inode_count(&self) -> usize {
        let inodes = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        inodes.nodes.len()
    }

    fn handle(&self, fh: u64) -> FsResult<Arc<Handle>> {
        let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
        handles.get(&fh).cloned().ok_or(Errno(libc::EBADF))
    }

    fn stat_of(&self, target: &Target) -> FsResult<FileStat> {
        match target {
            Target::Dir(rel) => self.catalog.dir_stat(rel).map_err(|e| Errno(e.errno())),
            Target::Image(image)
            | Target::SnapshotsDir(image)
            | Target::Snapshot(image, _)
            | Target::PartsDir(image)
            | Target::Partition(image, _) => Ok(image.stat()),
        }
    }

    /// The attributes of `target` (inode `ino`); those of an open file come from its handle.
    fn attr_of(&self, ino: u64, target: &Target, handle: Option<&Handle>) -> FsResult<Attr> {
        let stat = self.stat_of(target)?;
        let mut perm = stat.perm;
        let (size, allocated) = match target {
            Target::Dir(_) => (0, 0),
            Target::SnapshotsDir(_) | Target::PartsDir(_) => {
                // Shows its image file's metadata: searchable where readable; nothing can be
                // created in it.
                perm = (perm | (perm & 0o444) >> 2) & !0o222;
                (0, 0)
            }
            Target::Partition(image, number) => {
                let attrs = self.catalog.attributes(image);
                if !attrs.writable {
                    perm &= !0o222;
                }
                let part = self.catalog.partition(image, *number);
                let len = part.map_or(0, |p| p.len);
                (len, attrs.allocated.min(len))
            }
            Target::Image(image) => {
                let attrs = self.catalog.attributes(image);
                if !attrs.writable {
                    perm &= !0o222;
                }
                (attrs.size, attrs.allocated)
            }
            Target::Snapshot(image, name) => {
                perm &= !0o222;
                image
                    .summary
                    .snapshot(name)
                    .map(|s| (s.size, s.allocated))
                    .unwrap_or((0, 0))
            }
        };
        let (size, allocated) = match handle {
            Some(h) => (h.image.image().size(), h.image.image().allocated_bytes()),
            None => (size, allocated),
        };
        let kind = kind_of(target);
        Ok(Attr {
            ino,
            kind,
            size,
            blocks: allocated.div_ceil(512),
            perm: perm & !self.ownership.umask,
            uid: self.ownership.uid.unwrap_or(stat.uid),
            gid: self.ownership.gid.unwrap_or(stat.gid),
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            atime: stat.atime,
            mtime: stat.mtime,
            ctime: stat.ctime,
        })
    }

    /// Runs `f`; if descriptors ran out, closes the images nobody has open and runs it again.
    fn with_descriptors<T>(
        &self,
        f: impl Fn() -> crate::error::Result<T>,
    ) -> crate::error::Result<T> {
        match f() {
            Err(e) if out_of_descriptors(&e) && self.catalog.close_idle(Duration::ZERO) > 0 => f(),
            other => other,
        }
    }

    fn dir_target(&self, ino: u64) -> FsResult<Target> {
        let target = self.target(ino)?;
        match kind_of(&target) {
            NodeKind::Dir => Ok(target),
            NodeKind::File => Err(Errno(libc::ENOTDIR)),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let dir = self.dir_target(parent)?;
        let entry = self
            .with_descriptors(|| self.catalog.lookup(&dir, name))
            .map_err(|e| log_error("lookup", Path::new(name), e))?
            .ok_or(Errno(libc::ENOENT))?;
        let attr = self.attr_of(0, &entry.target, None)?;
        let ino = self.remember(entry.target);
        Ok(Attr { ino, ..attr })
    }

    /// The attributes of `ino`; with `fh`, those of the open file behind that handle.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> FsResult<Attr> {
        let target = self.target(ino)?;
        let handle = fh.and_then(|fh| self.handle(fh).ok());
        self.attr_of(ino, &target, handle.as_deref())
    }

    /// Lists directory `ino` once for a directory handle; returns the handle number.
    pub fn opendir(&self, ino: u64) -> FsResult<u64> {
        let dir = self.dir_target(ino)?;
        let entries = self
            .with_descriptors(|| self.catalog.list(&dir))
            .map_err(|e| log_error("readdir", Path::new(""), e))?;
        let parent_ino = match &dir {
            Target::Dir(rel) => rel
                .parent()
                .and_then(|p| self.known_ino(&NodeKey::Dir(p.to_path_buf()))),
            _ => None,
        }
        .unwrap_or(ROOT_INO);
        let mut out = vec![
            (ino, NodeKind::Dir, ".".into()),
            (parent_ino, NodeKind::Dir, "..".into()),
        ];
        for entry in entries {
            let kind = kind_of(&entry.target);
            // The inode if the kernel knows this entry already; otherwise a number of its own
            // (only shown as d_ino), since readdir gives the kernel no reference to forget.
            let ino = self
                .known_ino(&key_of(&entry.target))
                .unwrap_or_else(|| self.reserve_ino());
            out.push((ino, kind, entry.name));
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut listings = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        listings.insert(fh, Arc::new(out));
        Ok(fh)
    }

    fn known_ino(&self, key: &NodeKey) -> Option<u64> {
        let inodes = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        inodes.by_key.get(key).copied()
    }

    fn reserve_ino(&self) -> u64 {
        let mut inodes = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        inodes.next += 1;
        inodes.next - 1
    }

    /// The listing taken by `opendir`.
    pub fn readdir(&self, fh: u64) -> FsResult<Arc<Vec<DirEntry>>> {
        let listings = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        listings.get(&fh).cloned().ok_or(Errno(libc::EBADF))
    }

    pub fn releasedir(&self, fh: u64) {
        let mut listings = self.listings.lock().unwrap_or_else(|p| p.into_inner());
        listings.remove(&fh);
    }

    /// Opens file `ino`; `write` asks for write access. Returns the handle number.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let target = self.target(ino)?;
        let (image, file) = match &target {
            Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_) => {
                return Err(Errno(libc::EISDIR))
            }
            Target::Partition(file, number) => {
                let image = self.catalog.open_partition(file, *number, write);
                (image, Some(Arc::clone(file)))
            }
            Target::Image(file) => {
                let image = self.catalog.open(file, write);
                (image, Some(Arc::clone(file)))
            }
            Target::Snapshot(file, name) => {
                if write {
                    return Err(Errno(libc::EROFS));
                }
                (self.catalog.open_snapshot(file, name), None)
            }
        };
        let image = image.map_err(|e| {
            let errno = e.errno();
            match e.kind() {
                ErrorKind::ReadOnly | ErrorKind::Stale | ErrorKind::Busy => {
                    log::info!("refusing to open: {e}")
                }
                // The daemon's limit, not the image's fault: this open fails, nothing else.
                _ if out_of_descriptors(&e) => {
                    log::warn!("open: {e}; too many images open at once")
                }
                _ => log::error!("open: {e}"),
            }
            Errno(errno)
        })?;
        let source: Arc<Path> = image.served().source().into();
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        handles.insert(
            fh,
            Arc::new(Handle {
                image,
                file,
                source,
                write_back_reported: Default::default(),
                stream: Default::default(),
            }),
        );
        Ok(fh)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = AlignedBuffer::default();
        let len = self.read_into(fh, offset, size, false, &mut buf)?;
        Ok(buf.filled(len).to_vec())
    }

    /// `read` into `buf`, which is grown as needed and never cleared: the reply is its first
    /// bytes (`AlignedBuffer::filled`), as many as returned. A caller keeps one buffer for all
    /// its reads, so a read costs no allocation and no zeroing (every driver sets every byte it
    /// is asked for: the fuzz targets read into poisoned buffers to hold them to it).
    /// A sequential reader's next request is read ahead (`readahead`). `direct`: the reader
    /// opened the file with `O_DIRECT`, so large reads bypass the host page cache as its own
    /// direct reads of a file would (`host::bypassing_page_cache`).
    pub fn read_into(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        direct: bool,
        buf: &mut AlignedBuffer,
    ) -> FsResult<usize> {
        let handle = self.handle(fh)?;
        let image = handle.image.image();
        let generation = || handle.image.served().generation();
        let disk_size = image.size();
        let len = disk_size.saturating_sub(offset).min(u64::from(size)) as usize;
        let taken = handle.stream.take(offset, len, generation, buf);
        self.fetcher.count(&taken);
        if taken != readahead::Taken::Hit {
            let part = buf.prepare(len);
            if !part.is_empty() {
                bypassing_page_cache(direct, || image.read_at(part, offset))
                    .map_err(|e| log_error("read", &handle.source, e))?;
            }
        }
        self.fetcher.follow(
            &handle.stream,
            offset,
            len,
            disk_size,
            direct,
            generation,
            || handle.image.shared_image(),
        );
        Ok(len)
    }

    /// Reads answered from read-ahead so far.
    pub fn read_ahead_hits(&self) -> u64 {
        self.fetcher.hits()
    }

    /// Reads that found their read-ahead planned but not started, and read for themselves.
    pub fn read_ahead_unstarted(&self) -> u64 {
        self.fetcher.unstarted()
    }

    /// Writes `data` at `offset`; a write reaching past the end of the disk is cut short there,
    /// and one starting at or past the end fails with ENOSPC, as on a block device.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        self.write_with(fh, offset, data, false)
    }

    /// `write`; `direct`: the writer opened the file with `O_DIRECT`, so large writes bypass the
    /// host page cache as its own direct writes to a file would (`host::bypassing_page_cache`).
    pub fn write_with(&self, fh: u64, offset: u64, data: &[u8], direct: bool) -> FsResult<u32> {
        let handle = self.handle(fh)?;
        if !handle.image.is_writable() {
            return Err(Errno(libc::EBADF));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let image = handle.image.image();
        let room = image.size().saturating_sub(offset);
        if room == 0 {
            return Err(Errno(libc::ENOSPC));
        }
        let len = (data.len() as u64).min(room) as usize;
        let data = &data[..len];
        bypassing_page_cache(direct, || image.write_at(data, offset))
            .map_err(|e| log_error("write", &handle.source, e))?;
        u32::try_from(len).map_err(|_| Errno(libc::EINVAL))
    }

    /// Writes back the image's metadata and syncs it (close, fsync). A failed write-back is
    /// reported once per handle (see the module doc).
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let handle = self.handle(fh)?;
        if !handle.image.is_writable() {
            return Ok(());
        }
        let image = handle.image.image();
        match image.flush() {
            Ok(()) => Ok(()),
            // The image stopped after a failed write-back and fails every flush since.
            Err(e) if e.kind() == ErrorKind::Io && image.read_only_reason().is_some() => {
                if handle.write_back_reported.swap(true, Ordering::AcqRel) {
                    return Ok(());
                }
                Err(log_error("flush", &handle.source, e))
            }
            Err(e) => Err(log_error("flush", &handle.source, e)),
        }
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = {
            let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
            handles.remove(&fh).ok_or(Errno(libc::EBADF))?
        };
        let mut result = Ok(());
        let writable = handle.image.is_writable();
        if writable && handle.image.image().is_dirty() {
            result = handle
                .image
                .image()
                .flush()
                .map_err(|e| log_error("flush", &handle.source, e));
        }
        let file = handle.file.clone();
        drop(handle);
        if let (true, Some(file)) = (writable, file) {
            self.catalog.note_closed(&file);
        }
        result
    }

    /// Changes times (applied to the image file) and the size (the image grows, see
    /// `resize`).
    pub fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Attr> {
        let target = self.target(ino)?;
        if let Some(size) = size {
            let current = self.getattr(ino, None)?.size;
            if size != current {
                self.resize(&target, current, size)?;
            }
        }
        if atime.is_some() || mtime.is_some() {
            if self.catalog.is_read_only() {
                return Err(Errno(libc::EROFS));
            }
            match &target {
                Target::Image(image) | Target::Partition(image, _) => self
                    .catalog
                    .set_times(image, atime, mtime)
                    .map_err(|e| log_error("set times", &image.source, e))?,
                Target::Dir(rel) => {
                    let path = self
                        .catalog
                        .source_path(rel)
                        .map_err(|_| Errno(libc::ENOENT))?;
                    set_dir_times(&path, atime, mtime)?
                }
                Target::SnapshotsDir(_) | Target::Snapshot(..) | Target::PartsDir(_) => {
                    return Err(Errno(libc::EROFS))
                }
            }
        }
        self.getattr(ino, None)
    }

    /// SEEK_DATA / SEEK_HOLE from the image's block status.
    pub fn lseek(&self, fh: u64, offset: u64, whence: i32) -> FsResult<u64> {
        let handle = self.handle(fh)?;
        let image = handle.image.image();
        let size = image.size();
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno(libc::EINVAL)),
        };
        if offset >= size {
            return Err(Errno(libc::ENXIO));
        }
        crate::image::seek(image, offset, want_data)
            .map_err(|e| log_error("lseek", &handle.source, e))?
            .ok_or(Errno(libc::ENXIO))
    }

    /// Statistics of the host file system below the source tree.
    pub fn statfs(&self) -> FsResult<StatFs> {
        host_statfs(self.catalog.root())
    }

    /// Flushes every open image; returns how many failed (each failure is logged).
    pub fn flush_all(&self) -> usize {
        self.flush_images(false)
    }

    /// The images whose write-back failed since the mount, as "path: error".
    pub fn lost_write_backs(&self) -> Vec<String> {
        self.catalog.lost_write_backs()
    }

    /// The periodic housekeeping: writes back images with pending metadata, looks at the tree
    /// again (changed, removed and retried files), and closes images nobody has used lately.
    pub fn housekeeping(&self) {
        self.flush_images(true);
        self.catalog.refresh();
        self.catalog.close_idle(IDLE_LINGER);
    }

    fn flush_images(&self, only_dirty: bool) -> usize {
        let mut failed = 0;
        for served in self.catalog.live_instances() {
            if served.is_retired() || (only_dirty && !served.is_dirty()) {
                continue;
            }
            // Read-only instances have nothing to write, but the flush of one whose
            // write-back stopped fails: that is news `imgfs umount` must give.
            if let Err(e) = served.flush() {
                let e = e.with_path(served.source());
                log::error!("flush: {e}");
                if !served.is_dirty() {
                    self.catalog.note_lost_write_back(served.source(), &e);
                }
                failed += 1;
            }
        }
        failed
    }
}

fn set_dir_times(
    path: &Path,
    atime: Option<SystemTime>,
    mtime: Option<SystemTime>,
) -> FsResult<()> {
    let dir = std::fs::File::open(path).map_err(|e| io_errno(&e))?;
    let mut times = std::fs::FileTimes::new();
    if let Some(t) = atime {
        times = times.set_accessed(t);
    }
    if let Some(t) = mtime {
        times = times.set_modified(t);
    }
    dir.set_times(times).map_err(|e| io_errno(&e))
}

fn host_statfs(path: &Path) -> FsResult<StatFs> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno(libc::EINVAL))?;
    // SAFETY: statvfs is plain old data; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and st a valid out-pointer.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io_errno(&std::io::Error::last_os_error()));
    }
    Ok(StatFs {
        blocks: st.f_blocks,
        bfree: st.f_bfree,
        bavail: st.f_bavail,
        files: st.f_files,
        ffree: st.f_ffree,
        bsize: st.f_bsize as u32,
        namelen: st.f_namemax as u32,
        frsize: st.f_frsize as u32,
    })
}

mod file_root;
mod passthrough;
mod readahead;
mod space;
#[cfg(test)]
mod tests;
mod xattr;
