//! `--snapshot` for `mount` and `nbd`: writes go into qcow2 overlays in a private scratch
//! directory that is removed when the daemon stops, so the originals are never written and
//! the changes are thrown away (qemu-nbd's `--snapshot`, xmount's write cache). It is the
//! `--overlay DIR` machinery with a directory nobody else knows of.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::catalog::{Catalog, FormatOpener};

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

/// Where writes go: into the originals, into overlays in a directory the user keeps
/// (`--overlay`), or into overlays that are thrown away (`--snapshot`).
pub enum Changes<'a> {
    InPlace,
    Overlays(&'a Path),
    Scratch,
}

impl<'a> Changes<'a> {
    /// From the `--overlay` and `--snapshot` flags, which contradict each other and
    /// `--read-only`.
    pub fn from_flags(
        overlay: Option<&'a Path>,
        snapshot: bool,
        read_only: bool,
    ) -> Result<Self, String> {
        match (overlay, snapshot) {
            (Some(_), true) => Err("--overlay and --snapshot contradict each other: one keeps \
                                    the changes, the other throws them away"
                .into()),
            (Some(_), false) if read_only => Err(
                "--overlay and --read-only contradict each other: overlays take the writes".into(),
            ),
            (None, true) if read_only => Err("--snapshot and --read-only contradict each \
                                              other: the snapshot takes the writes"
                .into()),
            (Some(dir), false) => Ok(Changes::Overlays(dir)),
            (None, true) => Ok(Changes::Scratch),
            (None, false) => Ok(Changes::InPlace),
        }
    }
}

/// The catalog of `src` writing as `changes` says, and the scratch directory it writes into
/// (kept alive by the caller until the daemon stops).
pub fn open_catalog(
    src: &Path,
    read_only: bool,
    changes: &Changes,
) -> Result<(Catalog, Option<ScratchDir>), String> {
    let catalog =
        Catalog::new(src, Box::new(FormatOpener), read_only).map_err(|e| e.to_string())?;
    match changes {
        Changes::InPlace => Ok((catalog, None)),
        Changes::Overlays(dir) => catalog
            .with_overlays(dir)
            .map(|c| (c, None))
            .map_err(|e| e.to_string()),
        Changes::Scratch => {
            let scratch = ScratchDir::create()?;
            let catalog = catalog
                .with_overlays(scratch.path())
                .map_err(|e| format!("--snapshot: {e}"))?;
            log::info!(
                "--snapshot: writes go to {}, removed when the daemon stops",
                scratch.path().display()
            );
            Ok((catalog, Some(scratch)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_that_contradict_are_refused_by_name() {
        let dir = Path::new("/x");
        let err = |o, s, r| Changes::from_flags(o, s, r).err().unwrap_or_default();
        assert!(err(Some(dir), true, false).contains("--overlay and --snapshot"));
        assert!(err(None, true, true).contains("--snapshot and --read-only"));
        assert!(err(Some(dir), false, true).contains("--overlay and --read-only"));
        assert!(matches!(
            Changes::from_flags(None, true, false),
            Ok(Changes::Scratch)
        ));
        assert!(matches!(
            Changes::from_flags(None, false, true),
            Ok(Changes::InPlace)
        ));
    }

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
