//! FUSE passthrough, the adapter's part: the descriptors registered with the kernel
//! (`BackingId`) for the raw files it reads without the daemon. The kernel wants every
//! passthrough open of one inode to name the same backing file, so there is one per inode,
//! kept while files on it are open that way.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use fuser::{BackingId, Errno as FuseErrno, FileHandle, FopenFlags, ReplyOpen};

use super::core::FsCore;

/// How a raw file opened without passthrough is served: direct I/O gives 1 MiB requests and
/// no double caching of image data; parallel direct writes let several writers reach the
/// image at once.
const DAEMON_OPEN: FopenFlags =
    FopenFlags::FOPEN_DIRECT_IO.union(FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES);

struct Backing {
    id: BackingId,
    /// The image file version it was registered for (`FsCore::handle_version`).
    version: Option<u64>,
    /// The open files on the inode served by passthrough.
    handles: HashSet<u64>,
}

#[derive(Default)]
pub struct Backings {
    /// The kernel agreed to passthrough at FUSE_INIT and the daemon may register files.
    enabled: AtomicBool,
    by_ino: Mutex<HashMap<u64, Backing>>,
}

impl Backings {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    /// Answers the open of `ino` that the core gave handle `fh`: by passthrough where the
    /// core allows it (`FsCore::passthrough_file`) or the inode already has passthrough opens,
    /// else through the daemon. A write open of an inode with passthrough opens is refused
    /// (EBUSY): the kernel would let it write past the disk's end.
    pub fn reply_open(&self, core: &FsCore, ino: u64, fh: u64, write: bool, reply: ReplyOpen) {
        if !self.enabled.load(Ordering::Acquire) {
            return reply.opened(FileHandle(fh), DAEMON_OPEN);
        }
        let mut by_ino = self.by_ino.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(backing) = by_ino.get_mut(&ino) {
            if write {
                drop(by_ino);
                core.refuse_writer_beside_passthrough(fh);
                return reply.error(FuseErrno::EBUSY);
            }
            // The root of a mount on a file whose image was replaced: the kernel takes one
            // backing file per inode, so the new version is read through the daemon.
            if backing.version != core.handle_version(fh) {
                return reply.opened(FileHandle(fh), DAEMON_OPEN);
            }
            backing.handles.insert(fh);
            core.note_passthrough_open();
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &backing.id);
        }
        let Some(file) = (!write).then(|| core.passthrough_file(fh)).flatten() else {
            return reply.opened(FileHandle(fh), DAEMON_OPEN);
        };
        match reply.open_backing(&*file) {
            Ok(id) => {
                core.note_passthrough_open();
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                by_ino.insert(
                    ino,
                    Backing {
                        id,
                        version: core.handle_version(fh),
                        handles: HashSet::from([fh]),
                    },
                );
            }
            Err(e) => {
                // Registering needs CAP_SYS_ADMIN: without it no file will do.
                if e.raw_os_error() == Some(libc::EPERM) {
                    self.enabled.store(false, Ordering::Release);
                    log::info!(
                        "FUSE passthrough refused ({e}): every image is read through the daemon"
                    );
                } else {
                    log::debug!("no passthrough for {}: {e}", file.path().display());
                }
                reply.opened(FileHandle(fh), DAEMON_OPEN);
            }
        }
    }

    /// File `fh` on `ino` was released; the inode's backing file is let go with its last
    /// passthrough open.
    pub fn release(&self, ino: u64, fh: u64) {
        let mut by_ino = self.by_ino.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(backing) = by_ino.get_mut(&ino) {
            backing.handles.remove(&fh);
            if backing.handles.is_empty() {
                by_ino.remove(&ino);
            }
        }
    }
}
