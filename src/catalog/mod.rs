//! The catalog: maps the source tree onto the raw-file namespace. Directories are mirrored,
//! every image (recognised by its magic through an `Opener`) appears as `<name>.raw`, other
//! files do not appear. Images are opened once and cached by file identity, so a file replaced
//! under the same name is reopened, and a bad image is logged once, not on every listing.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};
use crate::format::links::{Chain, Links};
use crate::format::{self, Format, OpenOptions};
use crate::image::Image;

/// The suffix that turns an image's file name into its raw file's name.
pub const RAW_SUFFIX: &str = ".raw";

/// The suffix that turns an image's file name into the name of the directory that shows its
/// internal snapshots (`disk.qcow2.snapshots/<snapshot>.raw`, read-only).
pub const SNAPSHOTS_SUFFIX: &str = ".snapshots";

/// Opens files of the source tree as images.
pub trait Opener: Send + Sync {
    /// The format of the file at `path`, `None` for a file that is not an image.
    fn probe(&self, path: &Path) -> Result<Option<Format>> {
        format::probe_file(path)
    }

    /// `Ok(None)` for a file that is not an image (silently hidden); `Err` for an image that
    /// cannot be served (hidden and logged once).
    fn open(&self, path: &Path, links: &mut dyn Links) -> Result<Option<Arc<dyn Image>>>;

    /// Opens `path` read-only as a backing file of the images in `chain`.
    fn open_backing(
        &self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
        links: &mut dyn Links,
    ) -> Result<Arc<dyn Image>> {
        format::open_backing_file(path, format, chain, links, false)
    }
}

/// The real opener: recognises formats by magic and opens them with `format::open`.
pub struct FormatOpener {
    pub options: OpenOptions,
}

impl Opener for FormatOpener {
    fn open(&self, path: &Path, links: &mut dyn Links) -> Result<Option<Arc<dyn Image>>> {
        match format::probe_file(path)? {
            None => Ok(None),
            // Parts of a disk described elsewhere (VMDK extents) appear through that disk only.
            Some(Format::Vmdk) if format::is_part_of_another_image(path)? => Ok(None),
            Some(probed) => format::open_probed(path, probed, &self.options, links).map(Some),
        }
    }

    fn open_backing(
        &self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
        links: &mut dyn Links,
    ) -> Result<Arc<dyn Image>> {
        format::open_backing_file(path, format, chain, links, self.options.inspect)
    }
}

/// What a name in the raw namespace stands for.
#[derive(Clone)]
pub enum EntryKind {
    Dir,
    Image(Arc<dyn Image>),
}

/// One visible entry of a directory of the raw namespace.
#[derive(Clone)]
pub struct Entry {
    /// The name under the mount point (`disk.vdi.raw`, or a directory's own name).
    pub name: OsString,
    /// The file or directory in the source tree it comes from.
    pub source: PathBuf,
    pub kind: EntryKind,
}

/// Identifies one version of a source file: a changed identity means "look again".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    size: u64,
}

impl FileIdentity {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            size: meta.len(),
        }
    }

    /// Our own writes change mtime and size of an image; only a new inode is a new image.
    fn same_file(&self, other: &FileIdentity) -> bool {
        self.dev == other.dev && self.ino == other.ino
    }
}

struct OpenImage {
    identity: FileIdentity,
    image: Arc<dyn Image>,
}

/// A file that is not served: not an image, or an image that failed to open.
struct Hidden {
    identity: FileIdentity,
    /// The error, for images that failed; `None` for files that are not images.
    error: Option<(ErrorKind, String)>,
}

/// An opened internal snapshot and the instance of the image it was taken from.
struct OpenSnapshot {
    of: Arc<dyn Image>,
    image: Arc<dyn Image>,
}

#[derive(Default)]
struct State {
    open: HashMap<PathBuf, OpenImage>,
    hidden: HashMap<PathBuf, Hidden>,
    /// By the snapshot's path below the (virtual) snapshots directory.
    snapshots: HashMap<PathBuf, OpenSnapshot>,
}

/// The source tree and the images opened from it.
pub struct Catalog {
    root: PathBuf,
    opener: Box<dyn Opener>,
    state: Mutex<State>,
}

impl Catalog {
    /// A catalog of the images below `root`, opened with `opener`.
    pub fn new(root: &Path, opener: Box<dyn Opener>) -> Result<Self> {
        let meta = std::fs::metadata(root).map_err(|e| Error::io("stat", e).with_path(root))?;
        if !meta.is_dir() {
            return Err(Error::out_of_range("the source is not a directory").with_path(root));
        }
        // Canonical, so that the paths of images found by walking the tree (which follows no
        // symbolic links) compare equal to the resolved names of backing files.
        let root = root
            .canonicalize()
            .map_err(|e| Error::io("resolve", e).with_path(root))?;
        Ok(Catalog {
            root,
            opener,
            state: Mutex::new(State::default()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere while holding the lock leaves only caches behind: keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The source path of a relative path of the source tree, refusing anything that could
    /// leave the tree (`..`, absolute paths).
    pub fn source_path(&self, rel: &Path) -> Result<PathBuf> {
        if rel.components().all(|c| matches!(c, Component::Normal(_))) {
            Ok(self.root.join(rel))
        } else {
            Err(Error::out_of_range(format!(
                "path {} leaves the source tree",
                rel.display()
            )))
        }
    }

    /// The visible entries of directory `rel_dir` (relative to the root), sorted by name.
    pub fn list(&self, rel_dir: &Path) -> Result<Vec<Entry>> {
        let dir = self.source_path(rel_dir)?;
        if let Some(image) = self.snapshots_dir_image(&dir)? {
            return self.snapshot_entries(&dir, &image);
        }
        let reader =
            std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", e).with_path(&dir))?;
        let mut entries = Vec::new();
        let mut snapshot_dirs = Vec::new();
        let mut seen = Vec::new();
        for item in reader {
            let item = item.map_err(|e| Error::io("read directory", e).with_path(&dir))?;
            let name = item.file_name();
            seen.push(dir.join(&name));
            if let Some(entry) = self.entry_for(&dir, &name)? {
                snapshot_dirs.extend(snapshots_dir_entry(&dir, &name, &entry));
                entries.push(entry);
            }
        }
        // A real directory of the same name wins over a snapshots directory.
        for snapshots in snapshot_dirs {
            if !entries.iter().any(|e| e.name == snapshots.name) {
                entries.push(snapshots);
            }
        }
        self.forget_missing(&dir, &seen);
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// The entry called `name` (a raw-namespace name) in directory `rel_dir`, if there is one.
    pub fn lookup(&self, rel_dir: &Path, name: &OsStr) -> Result<Option<Entry>> {
        let dir = self.source_path(rel_dir)?;
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Ok(None);
        }
        if let Some(image) = self.snapshots_dir_image(&dir)? {
            let entries = self.snapshot_entries(&dir, &image)?;
            return Ok(entries.into_iter().find(|e| e.name == name));
        }
        match self.entry_for(&dir, name)? {
            Some(entry) if matches!(entry.kind, EntryKind::Dir) => return Ok(Some(entry)),
            Some(_) => {}
            None => {
                if let Some(stem) = name.as_bytes().strip_suffix(SNAPSHOTS_SUFFIX.as_bytes()) {
                    let stem = OsStr::from_bytes(stem);
                    if let Some(image) = self.entry_for(&dir, stem)? {
                        return Ok(snapshots_dir_entry(&dir, stem, &image));
                    }
                }
            }
        }
        let Some(stem) = name.as_bytes().strip_suffix(RAW_SUFFIX.as_bytes()) else {
            return Ok(None);
        };
        match self.entry_for(&dir, OsStr::from_bytes(stem))? {
            Some(
                entry @ Entry {
                    kind: EntryKind::Image(_),
                    ..
                },
            ) => Ok(Some(entry)),
            _ => Ok(None),
        }
    }

    /// The metadata that a path of the raw namespace shows: its own, or for a snapshots
    /// directory and the snapshots in it, the image file's.
    pub fn metadata(&self, rel: &Path) -> Result<std::fs::Metadata> {
        let source = self.source_path(rel)?;
        let mut candidate = source.as_path();
        loop {
            match std::fs::symlink_metadata(candidate) {
                Ok(meta) => return Ok(meta),
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io("stat", e).with_path(candidate))
                }
                Err(e) => {
                    let stem = candidate
                        .file_name()
                        .and_then(|n| n.as_bytes().strip_suffix(SNAPSHOTS_SUFFIX.as_bytes()));
                    if let (Some(stem), Some(dir)) = (stem, candidate.parent()) {
                        let image = dir.join(OsStr::from_bytes(stem));
                        return std::fs::symlink_metadata(&image)
                            .map_err(|e| Error::io("stat", e).with_path(&image));
                    }
                    // Maybe a snapshot inside a snapshots directory: try its parent once.
                    match candidate.parent() {
                        Some(parent) if candidate == source.as_path() => candidate = parent,
                        _ => return Err(Error::io("stat", e).with_path(&source)),
                    }
                }
            }
        }
    }

    /// The image whose snapshots directory `dir` is, if `dir` is one (and not a real directory).
    fn snapshots_dir_image(&self, dir: &Path) -> Result<Option<Arc<dyn Image>>> {
        if std::fs::symlink_metadata(dir).is_ok() {
            return Ok(None);
        }
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return Ok(None);
        };
        let Some(stem) = name.as_bytes().strip_suffix(SNAPSHOTS_SUFFIX.as_bytes()) else {
            return Ok(None);
        };
        match self.entry_for(parent, OsStr::from_bytes(stem))? {
            Some(Entry {
                kind: EntryKind::Image(image),
                ..
            }) if !image.snapshot_names().is_empty() => Ok(Some(image)),
            _ => Ok(None),
        }
    }

    /// The snapshots of `image` as entries of its snapshots directory `dir`, each opened once
    /// per instance of the image.
    fn snapshot_entries(&self, dir: &Path, image: &Arc<dyn Image>) -> Result<Vec<Entry>> {
        let mut entries = Vec::new();
        for name in image.snapshot_names() {
            let source = dir.join(&name);
            let mut state = self.state();
            let cached = state
                .snapshots
                .get(&source)
                .filter(|s| Arc::ptr_eq(&s.of, image))
                .map(|s| s.image.clone());
            let snapshot = match cached {
                Some(snapshot) => snapshot,
                None => {
                    let snapshot = image.snapshot(&name).map_err(|e| e.with_path(&source))?;
                    state.snapshots.insert(
                        source.clone(),
                        OpenSnapshot {
                            of: image.clone(),
                            image: snapshot.clone(),
                        },
                    );
                    snapshot
                }
            };
            entries.push(Entry {
                name: format!("{name}{RAW_SUFFIX}").into(),
                source,
                kind: EntryKind::Image(snapshot),
            });
        }
        Ok(entries)
    }

    /// Every image opened so far (for flushing them all).
    pub fn open_images(&self) -> Vec<(PathBuf, Arc<dyn Image>)> {
        let state = self.state();
        state
            .open
            .iter()
            .map(|(p, o)| (p.clone(), o.image.clone()))
            .collect()
    }

    /// Opens every image below the root, so that bad images are reported at start-up.
    pub fn scan(&self) -> usize {
        let mut count = 0;
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel) = dirs.pop() {
            match self.list(&rel) {
                Ok(entries) => {
                    for entry in entries {
                        match entry.kind {
                            EntryKind::Dir => dirs.push(rel.join(&entry.name)),
                            EntryKind::Image(_) => count += 1,
                        }
                    }
                }
                Err(e) => log::warn!("{e}"),
            }
        }
        count
    }

    fn entry_for(&self, dir: &Path, name: &OsStr) -> Result<Option<Entry>> {
        let source = dir.join(name);
        // Symbolic links are not followed: they could lead out of the source tree.
        let meta = match std::fs::symlink_metadata(&source) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("stat", e).with_path(&source)),
        };
        if meta.is_dir() {
            return Ok(Some(Entry {
                name: name.to_os_string(),
                source,
                kind: EntryKind::Dir,
            }));
        }
        if !meta.is_file() {
            return Ok(None);
        }
        let identity = FileIdentity::of(&meta);
        Ok(self.image_for(&source, identity).map(|image| {
            let mut raw_name = name.to_os_string();
            raw_name.push(RAW_SUFFIX);
            Entry {
                name: raw_name,
                source,
                kind: EntryKind::Image(image),
            }
        }))
    }

    fn image_for(&self, source: &Path, identity: FileIdentity) -> Option<Arc<dyn Image>> {
        let mut state = self.state();
        if let Some(open) = state.open.get(source) {
            if open.identity.same_file(&identity) {
                return Some(open.image.clone());
            }
            state.open.remove(source);
        }
        let previous = state.hidden.get(source);
        if let Some(hidden) = previous {
            // A busy image is retried on every look: the other process may have let go.
            let retry = matches!(hidden.error, Some((ErrorKind::Busy, _)));
            if hidden.identity == identity && !retry {
                return None;
            }
        }
        let previous_error = previous.and_then(|h| h.error.as_ref().map(|(_, m)| m.clone()));
        // Opening reads headers and whole block maps; holding the lock keeps two lookups from
        // opening (and locking) the same image twice.
        let mut links = CatalogLinks {
            root: &self.root,
            opener: self.opener.as_ref(),
            state: &mut state,
        };
        match self.opener.open(source, &mut links) {
            Ok(Some(image)) => {
                state.hidden.remove(source);
                state.open.insert(
                    source.to_path_buf(),
                    OpenImage {
                        identity,
                        image: image.clone(),
                    },
                );
                log::info!("serving {}", source.display());
                Some(image)
            }
            Ok(None) => {
                state.hidden.insert(
                    source.to_path_buf(),
                    Hidden {
                        identity,
                        error: None,
                    },
                );
                None
            }
            Err(e) => {
                let e = e.with_path(source);
                let message = e.to_string();
                if previous_error.as_deref() != Some(message.as_str()) {
                    log::error!("not serving {message}");
                }
                state.hidden.insert(
                    source.to_path_buf(),
                    Hidden {
                        identity,
                        error: Some((e.kind(), message)),
                    },
                );
                None
            }
        }
    }

    /// Drops cached images of `dir` whose files are gone; open handles keep theirs alive.
    fn forget_missing(&self, dir: &Path, seen: &[PathBuf]) {
        let mut state = self.state();
        let gone = |p: &PathBuf| p.parent() == Some(dir) && !seen.contains(p);
        let stale: Vec<PathBuf> = state.open.keys().filter(|p| gone(p)).cloned().collect();
        for path in stale {
            if let Some(open) = state.open.remove(&path) {
                if let Err(e) = open.image.flush() {
                    log::error!("{}: flush of removed image failed: {e}", path.display());
                }
                log::info!("{} was removed from the source tree", path.display());
            }
        }
        state.hidden.retain(|p, _| !gone(p));
    }
}

/// The snapshots directory entry that goes with `entry` (file `name` of `dir`), for an image
/// that has internal snapshots.
fn snapshots_dir_entry(dir: &Path, name: &OsStr, entry: &Entry) -> Option<Entry> {
    let EntryKind::Image(image) = &entry.kind else {
        return None;
    };
    if image.snapshot_names().is_empty() {
        return None;
    }
    let mut dir_name = name.to_os_string();
    dir_name.push(SNAPSHOTS_SUFFIX);
    Some(Entry {
        source: dir.join(&dir_name),
        name: dir_name,
        kind: EntryKind::Dir,
    })
}

/// Backing files opened for images of the tree: one read-only instance per file, shared by
/// every image above it and served as its own (read-only) raw file.
struct CatalogLinks<'a> {
    root: &'a Path,
    opener: &'a dyn Opener,
    state: &'a mut State,
}

impl Links for CatalogLinks<'_> {
    fn root(&self) -> &Path {
        self.root
    }

    fn open_backing(
        &mut self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
    ) -> Result<Arc<dyn Image>> {
        let probed = self.opener.probe(path)?;
        // A file read as another format than it has is a private instance, never served.
        let shared = probed.is_some() && (format.is_none() || format == probed);
        // Probed once here; a file that is no image is read raw, as QEMU does.
        let format = Some(format.or(probed).unwrap_or(Format::Raw));
        if shared {
            if let Some(open) = self.state.open.get(path) {
                if open.image.read_only_reason().is_some() {
                    return Ok(open.image.clone());
                }
                // Served writable so far: it becomes read-only, but only while nobody has it
                // open through the mount (the catalog holds the only reference then).
                if Arc::strong_count(&open.image) > 1 {
                    return Err(Error::busy(format!(
                        "its backing file {} is open for writing through the mount",
                        path.display()
                    )));
                }
                open.image.flush()?;
                self.state.open.remove(path);
                log::info!(
                    "{} is a backing file: served read-only from now on",
                    path.display()
                );
            }
        }
        let opener = self.opener;
        let image = opener.open_backing(path, format, chain, self)?;
        if shared {
            let meta = std::fs::symlink_metadata(path)
                .map_err(|e| Error::io("stat", e).with_path(path))?;
            self.state.hidden.remove(path);
            self.state.open.insert(
                path.to_path_buf(),
                OpenImage {
                    identity: FileIdentity::of(&meta),
                    image: image.clone(),
                },
            );
        }
        Ok(image)
    }
}

#[cfg(test)]
mod tests;
