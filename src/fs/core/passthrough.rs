//! FUSE passthrough, the core's part: which open files the kernel may read from the image
//! file itself, with no request to the daemon per read, and how many were opened that way.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::host::HostFile;

use super::FsCore;

impl FsCore {
    /// The host file that open file `fh` may be read from directly: `fh` is read-only and
    /// shows a whole image that nobody can open for writing now (so every write still comes
    /// to the daemon, which cuts writes at the disk's end and renews a VMDK's CID), and the
    /// image's bytes are that file's (`Image::raw_file`).
    pub fn passthrough_file(&self, fh: u64) -> Option<Arc<HostFile>> {
        let handle = self.handle(fh).ok()?;
        let file = handle.file.as_ref()?;
        if handle.image.is_writable() || self.catalog.read_only_reason(file).is_none() {
            return None;
        }
        handle.image.image().raw_file()
    }

    /// Takes back write open `fh`, which the adapter refuses because files on the same image
    /// are open for reading by passthrough.
    pub fn refuse_writer_beside_passthrough(&self, fh: u64) {
        if let Ok(handle) = self.handle(fh) {
            log::info!(
                "refusing to open {} for writing while it is open for reading by passthrough; \
                 close those files first",
                handle.source.display()
            );
        }
        let _ = self.release(fh);
    }

    /// The version of the image file open file `fh` shows (none for a snapshot): one inode
    /// shows one version, except the root of a mount on a file, which follows its file.
    pub fn handle_version(&self, fh: u64) -> Option<u64> {
        let handle = self.handle(fh).ok()?;
        handle.file.as_ref().map(|file| file.version)
    }

    /// Counts an open the kernel serves by passthrough.
    pub fn note_passthrough_open(&self) {
        self.passthrough_opens.fetch_add(1, Ordering::Relaxed);
    }

    /// Opens served by passthrough since the mount.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }
}
