//! `--pid-file` of `mount` and `nbd` (qemu-nbd's `--pid-file`, qemu-storage-daemon's
//! `--pidfile`): the daemon's pid, written when it starts and removed when it has stopped
//! (after the final write-back), so that scripts and service managers can signal the right
//! daemon. The file is locked while the daemon runs, so a second daemon given the same file
//! is refused instead of taking it.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct PidFile {
    path: PathBuf,
    file: File,
}

/// A write lock on the whole of `file`, owned by its open file description.
fn lock(file: &File) -> std::io::Result<()> {
    // SAFETY: flock is plain data; all-zero is a valid value before the fields are set.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: fcntl on a descriptor we own, with a valid flock struct.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
    match rc {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

impl PidFile {
    /// Locks `path` (created if missing) and writes this process's pid into it. `path` must
    /// be absolute: the background daemon works from /.
    pub fn create(path: &Path) -> Result<PidFile, String> {
        let what = |e: std::io::Error| format!("pid file {}: {e}", path.display());
        // Not truncated before the lock is ours: another daemon's file keeps its pid.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            // A symbolic link planted in a shared directory must not make the daemon truncate
            // the file it points at.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(what)?;
        if !file.metadata().map_err(what)?.is_file() {
            return Err(format!("pid file {}: not a regular file", path.display()));
        }
        if let Err(e) = lock(&file) {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EACCES) => format!(
                    "pid file {} is held by a running daemon (pid {})",
                    path.display(),
                    text.trim()
                ),
                _ => what(e),
            });
        }
        file.set_len(0).map_err(what)?;
        file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0)
            .map_err(what)?;
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        // Only the file this daemon wrote: one put in its place since is someone else's.
        let ours = match (std::fs::metadata(&self.path), self.file.metadata()) {
            (Ok(at_path), Ok(held)) => at_path.dev() == held.dev() && at_path.ino() == held.ino(),
            _ => false,
        };
        if ours {
            if let Err(e) = std::fs::remove_file(&self.path) {
                log::warn!("cannot remove pid file {}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_is_written_held_against_a_second_daemon_and_removed() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("imgfs.pid");
        std::fs::write(&path, "stale\n").unwrap();
        let held = PidFile::create(&path).unwrap();
        let pid = format!("{}\n", std::process::id());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pid);
        // Another open file description cannot take it, and leaves it as it is.
        let err = PidFile::create(&path).err().unwrap_or_default();
        assert!(err.contains("held by a running daemon"), "{err}");
        assert!(err.contains(pid.trim()), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), pid);
        drop(held);
        assert!(!path.exists());

        // A symbolic link is not followed, nor is anything but a regular file written.
        let target = dir.path().join("target");
        std::fs::write(&target, "keep\n").unwrap();
        let link = dir.path().join("link.pid");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(PidFile::create(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep\n");
        assert!(PidFile::create(Path::new("/dev/null")).is_err());

        // A file put in its place is not removed.
        let held = PidFile::create(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "other\n").unwrap();
        drop(held);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "other\n");
    }
}
