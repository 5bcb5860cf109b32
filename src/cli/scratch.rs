//! The scratch directory of `--snapshot` (`mount` and `nbd`): writes go into qcow2 overlays
//! in a private directory that is removed when the daemon stops, so the originals are never
//! written and the changes are thrown away (qemu-nbd's `--snapshot`, xmount's write cache). It
//! is the `--overlay DIR` machinery with a directory nobody else knows of (`source.rs`).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the scratch directory goes when `TMPDIR` is not set: on disk rather than in memory
/// (/tmp may be a tmpfs), as qemu-nbd's temporary overlays do.
const DEFAULT_BASE: &str = "/var/tmp";

/// A directory of this process's own, removed with everything in it on drop.
pub struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    /// Creates `imgfs-snapshot.<unique>` (mode 0700) below `$TMPDIR`, else /var/tmp.
    pub fn create() -> Result<ScratchDir, String> {
        let base = std::env::var_os("TMPDIR")
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_BASE), PathBuf::from);
        // The background daemon works from /, where a relative path would mean another place.
        if base.is_relative() {
            return Err(format!(
                "--snapshot: TMPDIR {} is not an absolute path",
                base.display()
            ));
        }
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        for attempt in 0..100u32 {
            let name = format!(
                "imgfs-snapshot.{}.{:08x}",
                std::process::id(),
                nanos.wrapping_add(attempt.wrapping_mul(0x9e37_79b9))
            );
            let path = base.join(name);
            match builder.create(&path) {
                Ok(()) => return Ok(ScratchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(format!(
                        "--snapshot: cannot create a scratch directory in {} (set TMPDIR \
                         to choose another place): {e}",
                        base.display()
                    ))
                }
            }
        }
        Err(format!(
            "--snapshot: no free scratch directory name in {}",
            base.display()
        ))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => log::info!("--snapshot: removed {}", self.path.display()),
            Err(e) => log::warn!(
                "--snapshot: cannot remove {}: {e}; the changes made are in it",
                self.path.display()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_directories_are_private_distinct_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let a = ScratchDir::create().unwrap();
        let b = ScratchDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::create_dir(a.path().join("sub")).unwrap();
        std::fs::write(a.path().join("sub/x.qcow2"), b"changes").unwrap();
        let (pa, pb) = (a.path().to_path_buf(), b.path().to_path_buf());
        drop(a);
        drop(b);
        assert!(!pa.exists() && !pb.exists());
    }
}
