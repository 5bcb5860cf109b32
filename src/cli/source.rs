//! What a daemon (`mount`, `nbd`) serves and where its writes go: the source, a directory of
//! images or one image file, and the originals, overlays in a directory (`--overlay`) or
//! throw-away overlays (`--snapshot`), turned into a catalog.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::pidfile::PidFile;
use super::scratch::ScratchDir;
use crate::catalog::{Catalog, FormatOpener};

/// The source of a daemon, resolved (symbolic links included) before it forks.
#[derive(Debug)]
pub struct Source {
    /// The directory the catalog works in.
    pub root: PathBuf,
    /// The one image file of `root` to serve, when the source is a file.
    pub only: Option<OsString>,
}

impl Source {
    /// A directory serves every image below it; a file, that one image (as qemu-nbd, xmount
    /// and the libyal mounters take one), whose backing files may lie beside it.
    pub fn resolve(path: &Path) -> Result<Source, String> {
        let full = path
            .canonicalize()
            .map_err(|e| format!("source {}: {e}", path.display()))?;
        if full.is_dir() {
            return Ok(Source {
                root: full,
                only: None,
            });
        }
        match (full.is_file(), full.parent(), full.file_name()) {
            (true, Some(dir), Some(name)) => Ok(Source {
                root: dir.to_path_buf(),
                only: Some(name.to_os_string()),
            }),
            _ => Err(format!(
                "source {} is neither a directory nor a file",
                path.display()
            )),
        }
    }

    /// What the source is, for messages: the directory or the file.
    pub fn path(&self) -> PathBuf {
        match &self.only {
            Some(name) => self.root.join(name),
            None => self.root.clone(),
        }
    }

    /// Whether `path` lies where the catalog looks: below the directory, or nowhere for a
    /// single file (nothing else of its directory is looked at).
    pub fn covers(&self, path: &Path) -> bool {
        self.only.is_none() && path.starts_with(&self.root)
    }

    /// After the first scan: a single file that is not served (a damaged image, one QEMU
    /// holds for writing) is an error, not an empty mount. `served` is the scan's count.
    pub fn check_served(&self, served: usize) -> Result<(), String> {
        match (&self.only, served) {
            (Some(_), 0) => Err(format!(
                "{} cannot be served; the log line before says why",
                self.path().display()
            )),
            _ => Ok(()),
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

/// The catalog of `source` writing as `changes` says, and the scratch directory it writes into
/// (kept alive by the caller until the daemon stops).
fn open_catalog(
    source: &Source,
    serving: &Serving,
    changes: &Changes,
) -> Result<(Catalog, Option<ScratchDir>), String> {
    let catalog = Catalog::new(&source.root, Box::new(FormatOpener), serving.read_only)
        .map_err(|e| e.to_string())?;
    let catalog = match &source.only {
        Some(name) => catalog.with_only(name),
        None => catalog,
    };
    // Looking at the mount point would be a request to this daemon, made while serving one
    // (over io_uring, on the very queue it is serving).
    let catalog = match serving.mount_point {
        Some(file) if file.parent() == Some(source.root.as_path()) => match file.file_name() {
            Some(name) => catalog.without(name),
            None => catalog,
        },
        _ => catalog,
    };
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

/// What a daemon holds until it stops and drops last: its pid file and its scratch directory.
pub struct Held {
    _scratch: Option<ScratchDir>,
    _pid_file: Option<PidFile>,
}

/// How a daemon (`mount`, `nbd`) serves its source.
pub struct Serving<'a> {
    pub read_only: bool,
    pub overlay: Option<&'a Path>,
    pub snapshot: bool,
    pub pid_file: Option<&'a Path>,
    /// Where the daemon mounts, if it does: never looked at by the catalog (a file mount
    /// point or a directory beside a one-image source can lie in the directory it lists).
    pub mount_point: Option<&'a Path>,
}

/// The start-up `mount` and `nbd` share after the fork: the pid file (first, so that a daemon
/// refused it touches nothing), the catalog of `source` writing where `serving` says, and its
/// first look at the tree, which a one-file source must pass.
pub fn start_catalog(source: &Source, serving: &Serving) -> Result<(Catalog, Held), String> {
    let pid_file = serving.pid_file.map(PidFile::create).transpose()?;
    let changes = Changes::from_flags(serving.overlay, serving.snapshot, serving.read_only)?;
    let (catalog, scratch) = open_catalog(source, serving, &changes)?;
    let served = catalog.refresh();
    log::info!("{served} image(s) below {}", source.path().display());
    source.check_served(served)?;
    Ok((
        catalog,
        Held {
            _scratch: scratch,
            _pid_file: pid_file,
        },
    ))
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
    fn a_source_is_a_directory_or_one_file_in_one() {
        let dir = crate::testutil::TempDir::new();
        std::fs::write(dir.path().join("disk.vdi"), b"x").unwrap();
        let root = dir.path().canonicalize().unwrap();
        let whole = Source::resolve(dir.path()).unwrap();
        assert_eq!(
            (whole.root.as_path(), whole.only.as_deref()),
            (root.as_path(), None)
        );
        assert!(whole.covers(&root.join("mnt")));
        let one = Source::resolve(&dir.path().join("disk.vdi")).unwrap();
        assert_eq!(one.root, root);
        assert_eq!(one.only.as_deref(), Some("disk.vdi".as_ref()));
        assert_eq!(one.path(), root.join("disk.vdi"));
        assert!(!one.covers(&root.join("mnt")));
        assert!(one.check_served(0).unwrap_err().contains("disk.vdi"));
        assert!(whole.check_served(0).is_ok() && one.check_served(1).is_ok());
        assert!(Source::resolve(&dir.path().join("missing")).is_err());
        assert!(Source::resolve(Path::new("/dev/null"))
            .unwrap_err()
            .contains("neither"));
    }
}
