//! The filesystem's logic without FUSE: inode numbers for paths of the raw namespace, open
//! handles holding their image, and each operation (lookup, read, write, lseek, ...) as a method
//! that returns an errno on failure. Errors from images are logged here, once, with the path.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use std::os::unix::fs::MetadataExt;

use crate::catalog::{Catalog, EntryKind};
use crate::error::{Error, ErrorKind};
use crate::image::Image;

/// An errno to reply with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

pub type FsResult<T> = Result<T, Errno>;

pub const ROOT_INO: u64 = 1;

/// Extended attribute of the root directory that reports the daemon's pid (for `imgfs umount`).
pub const XATTR_PID: &str = "user.imgfs.pid";
/// Setting this extended attribute on the root directory flushes every image.
pub const XATTR_FLUSH: &str = "user.imgfs.flush";

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

#[derive(Clone)]
struct Node {
    /// Path in the source tree, relative to its root (the image file for image nodes).
    rel_source: PathBuf,
    kind: NodeKind,
}

struct Handle {
    image: Arc<dyn Image>,
    /// Shared so the per-request clone for error messages does not allocate.
    source: Arc<Path>,
    writable: bool,
}

#[derive(Default)]
struct Inodes {
    by_path: HashMap<PathBuf, u64>,
    nodes: HashMap<u64, Node>,
    next: u64,
}

/// The mounted filesystem's state and operations.
pub struct FsCore {
    catalog: Catalog,
    read_only: bool,
    inodes: RwLock<Inodes>,
    handles: RwLock<HashMap<u64, Handle>>,
    next_handle: AtomicU64,
}

fn log_error(what: &str, source: &Path, e: Error) -> Errno {
    let e = e.with_path(source);
    match e.kind() {
        ErrorKind::ReadOnly | ErrorKind::OutOfRange => log::debug!("{what}: {e}"),
        _ => log::error!("{what}: {e}"),
    }
    Errno(e.errno())
}

fn io_errno(e: &std::io::Error) -> Errno {
    Errno(e.raw_os_error().unwrap_or(libc::EIO))
}

fn time_of(secs: i64, nsecs: i64) -> SystemTime {
    let nanos = u32::try_from(nsecs).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + std::time::Duration::new(s, nanos),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

impl FsCore {
    pub fn new(catalog: Catalog, read_only: bool) -> Self {
        let mut inodes = Inodes {
            next: ROOT_INO + 1,
            ..Default::default()
        };
        inodes.by_path.insert(PathBuf::new(), ROOT_INO);
        inodes.nodes.insert(
            ROOT_INO,
            Node {
                rel_source: PathBuf::new(),
                kind: NodeKind::Dir,
            },
        );
        FsCore {
            catalog,
            read_only,
            inodes: RwLock::new(inodes),
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
        }
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn node(&self, ino: u64) -> FsResult<Node> {
        let inodes = self.inodes.read().unwrap_or_else(|p| p.into_inner());
        inodes.nodes.get(&ino).cloned().ok_or(Errno(libc::ENOENT))
    }

    fn ino_for(&self, rel_source: &Path, kind: NodeKind) -> u64 {
        let mut inodes = self.inodes.write().unwrap_or_else(|p| p.into_inner());
        if let Some(&ino) = inodes.by_path.get(rel_source) {
            if let Some(node) = inodes.nodes.get_mut(&ino) {
                node.kind = kind;
            }
            return ino;
        }
        let ino = inodes.next;
        inodes.next += 1;
        inodes.by_path.insert(rel_source.to_path_buf(), ino);
        inodes.nodes.insert(
            ino,
            Node {
                rel_source: rel_source.to_path_buf(),
                kind,
            },
        );
        ino
    }

    fn handle<T>(&self, fh: u64, f: impl FnOnce(&Handle) -> T) -> FsResult<T> {
        let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
        handles.get(&fh).map(f).ok_or(Errno(libc::EBADF))
    }

    /// The image behind a file node, found (and opened if needed) through the catalog.
    fn image_of(&self, node: &Node) -> FsResult<(PathBuf, Arc<dyn Image>)> {
        let parent = node.rel_source.parent().unwrap_or(Path::new(""));
        let name = node.rel_source.file_name().ok_or(Errno(libc::ENOENT))?;
        let mut raw = name.to_os_string();
        raw.push(crate::catalog::RAW_SUFFIX);
        let entry = self
            .catalog
            .lookup(parent, &raw)
            .map_err(|e| log_error("lookup", parent, e))?;
        match entry {
            Some(crate::catalog::Entry {
                source,
                kind: EntryKind::Image(image),
                ..
            }) => Ok((source, image)),
            _ => Err(Errno(libc::ENOENT)),
        }
    }

    fn attr_for(&self, ino: u64, node: &Node, image: Option<&Arc<dyn Image>>) -> FsResult<Attr> {
        let meta = self
            .catalog
            .metadata(&node.rel_source)
            .map_err(|e| Errno(e.errno()))?;
        let mut perm = (meta.mode() & 0o7777) as u16;
        if node.kind == NodeKind::Dir && !meta.is_dir() {
            // A snapshots directory shows its image file's metadata: searchable where
            // readable, never writable.
            perm = (perm | (perm & 0o444) >> 2) & !0o222;
        }
        let (size, blocks) = match image {
            Some(image) => {
                if self.read_only || image.read_only_reason().is_some() {
                    perm &= !0o222;
                }
                (image.size(), image.allocated_bytes().div_ceil(512))
            }
            None => (0, 0),
        };
        Ok(Attr {
            ino,
            kind: node.kind,
            size,
            blocks,
            perm,
            uid: meta.uid(),
            gid: meta.gid(),
            nlink: if node.kind == NodeKind::Dir { 2 } else { 1 },
            atime: time_of(meta.atime(), meta.atime_nsec()),
            mtime: time_of(meta.mtime(), meta.mtime_nsec()),
            ctime: time_of(meta.ctime(), meta.ctime_nsec()),
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> FsResult<Attr> {
        let dir = self.node(parent)?;
        if dir.kind != NodeKind::Dir {
            return Err(Errno(libc::ENOTDIR));
        }
        let entry = self
            .catalog
            .lookup(&dir.rel_source, name)
            .map_err(|e| log_error("lookup", &dir.rel_source, e))?
            .ok_or(Errno(libc::ENOENT))?;
        let rel = entry
            .source
            .strip_prefix(self.catalog.root())
            .map_err(|_| Errno(libc::ENOENT))?;
        match &entry.kind {
            EntryKind::Dir => {
                let ino = self.ino_for(rel, NodeKind::Dir);
                self.attr_for(
                    ino,
                    &Node {
                        rel_source: rel.to_path_buf(),
                        kind: NodeKind::Dir,
                    },
                    None,
                )
            }
            EntryKind::Image(image) => {
                let ino = self.ino_for(rel, NodeKind::File);
                let node = Node {
                    rel_source: rel.to_path_buf(),
                    kind: NodeKind::File,
                };
                self.attr_for(ino, &node, Some(image))
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let node = self.node(ino)?;
        match node.kind {
            NodeKind::Dir => self.attr_for(ino, &node, None),
            NodeKind::File => {
                let (_, image) = self.image_of(&node)?;
                self.attr_for(ino, &node, Some(&image))
            }
        }
    }

    /// The entries of directory `ino` as (inode, kind, name), `.` and `..` first.
    pub fn readdir(&self, ino: u64) -> FsResult<Vec<(u64, NodeKind, std::ffi::OsString)>> {
        let dir = self.node(ino)?;
        if dir.kind != NodeKind::Dir {
            return Err(Errno(libc::ENOTDIR));
        }
        let entries = self
            .catalog
            .list(&dir.rel_source)
            .map_err(|e| log_error("readdir", &dir.rel_source, e))?;
        let parent_rel = dir.rel_source.parent().unwrap_or(Path::new(""));
        let parent_ino = self.ino_for(parent_rel, NodeKind::Dir);
        let mut out = vec![
            (ino, NodeKind::Dir, ".".into()),
            (parent_ino, NodeKind::Dir, "..".into()),
        ];
        for entry in entries {
            let Ok(rel) = entry.source.strip_prefix(self.catalog.root()) else {
                continue;
            };
            let kind = match entry.kind {
                EntryKind::Dir => NodeKind::Dir,
                EntryKind::Image(_) => NodeKind::File,
            };
            out.push((self.ino_for(rel, kind), kind, entry.name));
        }
        Ok(out)
    }

    /// Opens file `ino`; `write` asks for write access. Returns the handle number.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let node = self.node(ino)?;
        if node.kind == NodeKind::Dir {
            return Err(Errno(libc::EISDIR));
        }
        let (source, image) = self.image_of(&node)?;
        if write {
            if self.read_only {
                return Err(Errno(libc::EROFS));
            }
            if let Some(reason) = image.read_only_reason() {
                log::info!("{}: refusing write access: {reason}", source.display());
                return Err(Errno(libc::EROFS));
            }
        }
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
        handles.insert(
            fh,
            Handle {
                image,
                source: source.into(),
                writable: write,
            },
        );
        Ok(fh)
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (image, source) = self.handle(fh, |h| (h.image.clone(), h.source.clone()))?;
        let len = image.size().saturating_sub(offset).min(u64::from(size));
        let mut buf = vec![0u8; len as usize];
        if len > 0 {
            image
                .read_at(&mut buf, offset)
                .map_err(|e| log_error("read", &source, e))?;
        }
        Ok(buf)
    }

    /// Writes `data` at `offset`; a write reaching past the end of the disk is cut short there,
    /// and one starting at or past the end fails with ENOSPC, as on a block device.
    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (image, source, writable) =
            self.handle(fh, |h| (h.image.clone(), h.source.clone(), h.writable))?;
        if !writable {
            return Err(Errno(libc::EBADF));
        }
        if data.is_empty() {
            return Ok(0);
        }
        let room = image.size().saturating_sub(offset);
        if room == 0 {
            return Err(Errno(libc::ENOSPC));
        }
        let len = (data.len() as u64).min(room) as usize;
        image
            .write_at(&data[..len], offset)
            .map_err(|e| log_error("write", &source, e))?;
        u32::try_from(len).map_err(|_| Errno(libc::EINVAL))
    }

    /// Writes back the image's metadata and syncs it (close, fsync).
    pub fn flush(&self, fh: u64) -> FsResult<()> {
        let (image, source, writable) =
            self.handle(fh, |h| (h.image.clone(), h.source.clone(), h.writable))?;
        if writable {
            image.flush().map_err(|e| log_error("flush", &source, e))?;
        }
        Ok(())
    }

    pub fn release(&self, fh: u64) -> FsResult<()> {
        let handle = {
            let mut handles = self.handles.write().unwrap_or_else(|p| p.into_inner());
            handles.remove(&fh).ok_or(Errno(libc::EBADF))?
        };
        if handle.writable && handle.image.is_dirty() {
            handle
                .image
                .flush()
                .map_err(|e| log_error("flush", &handle.source, e))?;
        }
        Ok(())
    }

    /// Changes times (applied to the image file) and refuses size changes: images do not
    /// resize yet.
    pub fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> FsResult<Attr> {
        let node = self.node(ino)?;
        if let Some(size) = size {
            let current = self.getattr(ino)?.size;
            if size != current {
                log::info!(
                    "{}: refusing to resize from {current} to {size} bytes: resizing images is not supported",
                    node.rel_source.display()
                );
                return Err(Errno(libc::EOPNOTSUPP));
            }
        }
        if atime.is_some() || mtime.is_some() {
            if self.read_only {
                return Err(Errno(libc::EROFS));
            }
            let source = self
                .catalog
                .source_path(&node.rel_source)
                .map_err(|_| Errno(libc::ENOENT))?;
            let file = std::fs::File::open(&source).map_err(|e| io_errno(&e))?;
            let mut times = std::fs::FileTimes::new();
            if let Some(t) = atime {
                times = times.set_accessed(t);
            }
            if let Some(t) = mtime {
                times = times.set_modified(t);
            }
            file.set_times(times).map_err(|e| io_errno(&e))?;
        }
        self.getattr(ino)
    }

    /// SEEK_DATA / SEEK_HOLE from the image's block status.
    pub fn lseek(&self, fh: u64, offset: u64, whence: i32) -> FsResult<u64> {
        let (image, source) = self.handle(fh, |h| (h.image.clone(), h.source.clone()))?;
        let size = image.size();
        let want_data = match whence {
            libc::SEEK_DATA => true,
            libc::SEEK_HOLE => false,
            _ => return Err(Errno(libc::EINVAL)),
        };
        if offset >= size {
            return Err(Errno(libc::ENXIO));
        }
        crate::image::seek(image.as_ref(), offset, want_data)
            .map_err(|e| log_error("lseek", &source, e))?
            .ok_or(Errno(libc::ENXIO))
    }

    /// Statistics of the host file system below the source tree.
    pub fn statfs(&self) -> FsResult<StatFs> {
        host_statfs(self.catalog.root())
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        if ino == ROOT_INO && name == XATTR_PID {
            return Ok(std::process::id().to_string().into_bytes());
        }
        Err(Errno(libc::ENODATA))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        if ino == ROOT_INO && name == XATTR_FLUSH {
            return match self.flush_all() {
                0 => Ok(()),
                _ => Err(Errno(libc::EIO)),
            };
        }
        Err(Errno(libc::ENOTSUP))
    }

    /// Flushes every open image; returns how many failed (each failure is logged).
    pub fn flush_all(&self) -> usize {
        self.flush_images(false)
    }

    /// Flushes the images with pending metadata (the periodic write-back).
    pub fn flush_dirty(&self) -> usize {
        self.flush_images(true)
    }

    fn flush_images(&self, only_dirty: bool) -> usize {
        let mut failed = 0;
        for (path, image) in self.catalog.open_images() {
            if image.read_only_reason().is_some() || (only_dirty && !image.is_dirty()) {
                continue;
            }
            if let Err(e) = image.flush() {
                log::error!("flush: {}", e.with_path(&path));
                failed += 1;
            }
        }
        failed
    }
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

#[cfg(test)]
mod tests;
