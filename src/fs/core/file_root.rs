//! A mount whose root is one image's raw file instead of a directory: one image mounted on a
//! regular file, as qemu-storage-daemon's FUSE export is. The root inode cannot be replaced
//! the way a looked-up name is, so it follows the image file's current version on every look
//! (open handles keep the version they were opened on), and keeps showing the last version it
//! found while the file is missing, so that the mount stays reachable and can be unmounted.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::catalog::Target;

use super::{log_error, Errno, FsCore, FsResult};

pub(super) struct FileRoot {
    /// The raw file's name in the catalog's root directory (`disk.vmdk.raw`).
    name: OsString,
    last: Mutex<Option<Target>>,
}

impl FileRoot {
    pub(super) fn new(name: &OsStr) -> Self {
        FileRoot {
            name: name.to_os_string(),
            last: Mutex::new(None),
        }
    }
}

impl FsCore {
    /// Makes the mount's root the raw file `name` of the source's root directory.
    pub fn with_file_root(mut self, name: &OsStr) -> Self {
        self.file_root = Some(FileRoot::new(name));
        self
    }

    /// The target the root shows when it is a file: the image's current version.
    pub(super) fn file_root_target(&self, root: &FileRoot) -> FsResult<Target> {
        let found = self.with_descriptors(|| {
            self.catalog
                .lookup(&Target::Dir(PathBuf::new()), &root.name)
        });
        let mut last = root.last.lock().unwrap_or_else(|p| p.into_inner());
        match found {
            Ok(Some(entry)) => {
                *last = Some(entry.target.clone());
                Ok(entry.target)
            }
            Ok(None) => last.clone().ok_or(Errno(libc::ENOENT)),
            Err(e) => match last.clone() {
                Some(target) => Ok(target),
                None => Err(log_error("lookup", Path::new(&root.name), e)),
            },
        }
    }
}
