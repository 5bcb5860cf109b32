//! Extended attributes: how `imgfs umount` and `imgfs info` talk to a running daemon (its pid,
//! a flush of everything, lost write-backs, open files, the overlay directory; an image's
//! source file and why it is read-only), and a GPT partition's name.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use crate::catalog::Target;

use super::{Errno, FsCore, FsResult, ROOT_INO};

/// Extended attribute of the root directory that reports the daemon's pid (for `imgfs umount`).
pub const XATTR_PID: &str = "user.imgfs.pid";
/// Setting this extended attribute on the root directory writes every image back and closes
/// the ones nobody has open.
pub const XATTR_FLUSH: &str = "user.imgfs.flush";
/// Extended attribute of the root directory that lists the images whose write-back failed
/// since the mount, one "path: error" a line (empty when none): what was written to them since
/// their last successful flush may be lost.
pub const XATTR_LOST_WRITE_BACKS: &str = "user.imgfs.lost-write-backs";
/// Extended attribute of a GPT partition's file holding the partition's name.
pub const XATTR_PARTITION_NAME: &str = "user.imgfs.name";
/// Extended attribute of the root directory that reports how many files are open through the
/// mount (the kernel releases closed files asynchronously: this says when it has).
pub const XATTR_OPEN_FILES: &str = "user.imgfs.open-files";
/// Extended attribute of the root directory that reports how many files were opened since the
/// mount with the kernel reading the image file itself (FUSE passthrough).
pub const XATTR_PASSTHROUGH_OPENS: &str = "user.imgfs.passthrough-opens";
/// Extended attribute of an image's raw file, and of a directory, holding the path of the
/// file or directory of the source tree it shows.
pub const XATTR_SOURCE: &str = "user.imgfs.source";
/// Extended attribute of the root directory holding the overlay directory of a mount with
/// `--overlay` (absent otherwise).
pub const XATTR_OVERLAY: &str = "user.imgfs.overlay";
/// Extended attribute of an image's raw file saying why it cannot be opened for writing now
/// (absent while it can): a role, the host, the image itself, or a failed write-back.
pub const XATTR_READ_ONLY_REASON: &str = "user.imgfs.read-only-reason";

impl FsCore {
    /// The extended attributes of `ino`: the source of a directory or an image (and why the
    /// image is read-only), a GPT partition's name.
    fn xattrs(&self, ino: u64) -> Vec<(&'static str, Vec<u8>)> {
        match self.target(ino) {
            Ok(Target::Dir(rel)) => {
                let root = self.catalog.root();
                let source = match rel.as_os_str().is_empty() {
                    true => root.to_path_buf(),
                    false => root.join(rel),
                };
                let mut attrs = vec![(XATTR_SOURCE, source.as_os_str().as_bytes().to_vec())];
                if let (true, Some(dir)) = (ino == ROOT_INO, self.catalog.overlay_dir()) {
                    attrs.push((XATTR_OVERLAY, dir.as_os_str().as_bytes().to_vec()));
                }
                attrs
            }
            Ok(Target::Image(image)) => {
                let mut attrs = vec![(XATTR_SOURCE, image.source.as_os_str().as_bytes().to_vec())];
                if let Some(reason) = self.catalog.read_only_reason(&image) {
                    attrs.push((XATTR_READ_ONLY_REASON, reason.into_bytes()));
                }
                // The root of a mount on a file (`with_file_root`).
                if let (true, Some(dir)) = (ino == ROOT_INO, self.catalog.overlay_dir()) {
                    attrs.push((XATTR_OVERLAY, dir.as_os_str().as_bytes().to_vec()));
                }
                attrs
            }
            Ok(Target::Partition(image, number)) => self
                .catalog
                .partition(&image, number)
                .and_then(|p| p.name)
                .map(|name| vec![(XATTR_PARTITION_NAME, name.into_bytes())])
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }

    /// The names of `ino`'s extended attributes, each NUL-terminated (listxattr's format).
    pub fn listxattr(&self, ino: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, _) in self.xattrs(ino) {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        out
    }

    pub fn getxattr(&self, ino: u64, name: &OsStr) -> FsResult<Vec<u8>> {
        if let Some((_, value)) = self.xattrs(ino).into_iter().find(|(n, _)| *n == name) {
            return Ok(value);
        }
        if ino == ROOT_INO && name == XATTR_PID {
            return Ok(std::process::id().to_string().into_bytes());
        }
        if ino == ROOT_INO && name == XATTR_LOST_WRITE_BACKS {
            return Ok(lost_write_backs_value(&self.lost_write_backs()));
        }
        if ino == ROOT_INO && name == XATTR_PASSTHROUGH_OPENS {
            return Ok(self.passthrough_opens().to_string().into_bytes());
        }
        if ino == ROOT_INO && name == XATTR_OPEN_FILES {
            let handles = self.handles.read().unwrap_or_else(|p| p.into_inner());
            return Ok(handles.len().to_string().into_bytes());
        }
        Err(Errno(libc::ENODATA))
    }

    pub fn setxattr(&self, ino: u64, name: &OsStr) -> FsResult<()> {
        if ino == ROOT_INO && name == XATTR_FLUSH {
            let failed = self.flush_all();
            self.catalog.close_idle(Duration::ZERO);
            if failed > 0 || !self.lost_write_backs().is_empty() {
                return Err(Errno(libc::EIO));
            }
            return Ok(());
        }
        Err(Errno(libc::ENOTSUP))
    }
}

/// The list of lost write-backs as an xattr value, cut to what Linux lets one hold.
fn lost_write_backs_value(lost: &[String]) -> Vec<u8> {
    const MAX: usize = 60 << 10;
    let mut value = String::new();
    for (shown, entry) in lost.iter().enumerate() {
        if value.len() + entry.len() + 1 > MAX {
            value.push_str(&format!("... and {} more", lost.len() - shown));
            break;
        }
        value.push_str(entry);
        value.push('\n');
    }
    value.into_bytes()
}
