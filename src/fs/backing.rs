//! FUSE passthrough, the adapters' part: the descriptors registered with the kernel (backing
//! ids) for the raw files it reads without the daemon. The kernel wants every passthrough open
//! of one inode to name the same backing file, so there is one per inode, kept while files on
//! it are open that way. Each transport keeps its own kind of id (`Id`): fuser's `BackingId`
//! for /dev/fuse, a raw id for the io_uring transport.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::core::FsCore;
use crate::host::HostFile;

/// How the open of a raw file is answered.
pub enum OpenAnswer<'a, Id> {
    /// Through the daemon: direct I/O and parallel direct writes.
    Daemon,
    /// Refused with EBUSY: a write open of an inode with passthrough opens (the kernel would
    /// let it write past the disk's end).
    Busy,
    /// By passthrough, on this backing file.
    Passthrough(&'a Id),
}

struct Backing<Id> {
    id: Id,
    /// The image file version it was registered for (`FsCore::handle_version`).
    version: Option<u64>,
    /// The open files on the inode served by passthrough.
    handles: HashSet<u64>,
}

pub struct Backings<Id> {
    /// The kernel agreed to passthrough at FUSE_INIT and the daemon may register files.
    enabled: AtomicBool,
    by_ino: Mutex<HashMap<u64, Backing<Id>>>,
}

impl<Id> Default for Backings<Id> {
    fn default() -> Self {
        Backings {
            enabled: AtomicBool::new(false),
            by_ino: Mutex::new(HashMap::new()),
        }
    }
}

impl<Id> Backings<Id> {
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Answers the open of `ino` that the core gave handle `fh`: by passthrough where the
    /// core allows it (`FsCore::passthrough_file`) or the inode already has passthrough opens,
    /// else through the daemon. `register` makes a backing id of a file (the reply `ctx` may
    /// be what does it); `answer` sends the reply.
    pub fn answer_open<C, R>(
        &self,
        core: &FsCore,
        (ino, fh, write): (u64, u64, bool),
        ctx: C,
        register: impl FnOnce(&C, &HostFile) -> std::io::Result<Id>,
        answer: impl FnOnce(C, OpenAnswer<'_, Id>) -> R,
    ) -> R {
        if !self.is_enabled() {
            return answer(ctx, OpenAnswer::Daemon);
        }
        let mut by_ino = self.by_ino.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(backing) = by_ino.get_mut(&ino) {
            if write {
                drop(by_ino);
                core.refuse_writer_beside_passthrough(fh);
                return answer(ctx, OpenAnswer::Busy);
            }
            // The root of a mount on a file whose image was replaced: the kernel takes one
            // backing file per inode, so the new version is read through the daemon.
            if backing.version != core.handle_version(fh) {
                return answer(ctx, OpenAnswer::Daemon);
            }
            backing.handles.insert(fh);
            core.note_passthrough_open();
            return answer(ctx, OpenAnswer::Passthrough(&backing.id));
        }
        let Some(file) = (!write).then(|| core.passthrough_file(fh)).flatten() else {
            return answer(ctx, OpenAnswer::Daemon);
        };
        match register(&ctx, &file) {
            Ok(id) => {
                core.note_passthrough_open();
                let backing = by_ino.entry(ino).or_insert(Backing {
                    id,
                    version: core.handle_version(fh),
                    handles: HashSet::new(),
                });
                backing.handles.insert(fh);
                answer(ctx, OpenAnswer::Passthrough(&backing.id))
            }
            Err(e) => {
                self.note_refusal(&file, &e);
                answer(ctx, OpenAnswer::Daemon)
            }
        }
    }

    fn note_refusal(&self, file: &Arc<HostFile>, e: &std::io::Error) {
        // Registering needs CAP_SYS_ADMIN: without it no file will do.
        if e.raw_os_error() == Some(libc::EPERM) {
            self.enabled.store(false, Ordering::Release);
            log::info!("FUSE passthrough refused ({e}): every image is read through the daemon");
        } else {
            log::debug!("no passthrough for {}: {e}", file.path().display());
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
