//! The catalog: maps the source tree onto the raw-file namespace and decides which instance of
//! which image a name means, and whether it may be written.
//!
//! - Directories are mirrored; every image (recognised by its magic through an `Opener`)
//!   appears as `<name>.raw`, its internal snapshots under `<name>.snapshots/`; other files do
//!   not appear. A name that would exceed NAME_MAX with the suffix is left out and logged.
//! - A source given as one file (`with_only`) shows that image alone, read as raw if it has no
//!   format's magic; the files beside it are looked at for their roles only, nothing below.
//!   A file of the root the mount covers (`without`: a mount point beside the image) is never
//!   looked at, since reading it would be a request to this daemon.
//! - Each image file is known as a version (`ImageFile`): its identity (device, inode, size,
//!   mtime, ctime, header bytes) and a summary read once with an inspecting open. Every look
//!   (listing, lookup, open, the periodic refresh) compares the file with its version; changes
//!   this process's own writes explain keep it, any other content change starts a new version.
//!   Handles opened on the old version keep their instance; an instance whose file was
//!   overwritten in place is retired, so nothing stale is ever written back into the new file.
//! - Backing-file roles come from the tree (`Roles`): a file in any image's chain is read-only
//!   from its first listing and writable again once no image above it is left in the tree.
//!   A new image above a file that is open for writing through the mount waits (hidden, retried)
//!   until those handles close.
//! - Instances are opened only for handles (and for the images above them), shared per file
//!   (hard links and bind mounts included), and closed once unused for a while
//!   (`close_idle`), so an image nobody has open holds no descriptor and no lock.
//! - No file I/O happens under the state lock: stats, probes and opens run outside it and their
//!   results are installed under it. Instance opens are serialised by a second lock that
//!   lookups and listings never take.
//!
//! Transient failures (EMFILE, a busy image) are retried on every look and by the refresh;
//! other failures are logged once per file version and retried when the file changes.

mod open;
pub mod overlay;
mod record;
mod roles;
mod served;
mod summary;
mod views;

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{Error, ErrorKind, Result};
use crate::host::activity::own_writes;

pub use open::ImageAttrs;
use record::{Change, FileIdentity};
pub use record::{FileId, FileStat, ImageFile, SnapshotSummary};
use roles::Roles;
pub use served::{ImageHandle, Served};
use summary::{summarize, Outcome};
pub use summary::{FormatOpener, Opener};
use views::{snapshot_entries, snapshot_entry};

/// The suffix that turns an image's file name into its raw file's name.
pub const RAW_SUFFIX: &str = ".raw";

/// The suffix that turns an image's file name into the name of the directory that shows its
/// internal snapshots (`disk.qcow2.snapshots/<snapshot>.raw`, read-only).
pub const SNAPSHOTS_SUFFIX: &str = ".snapshots";

/// The suffix that turns an image's file name into the name of the directory that shows the
/// partitions of its disk (`disk.vdi.parts/p1.raw`).
pub const PARTS_SUFFIX: &str = ".parts";

/// The longest file name the kernel accepts (NAME_MAX).
const NAME_MAX: usize = 255;

/// What a name of the raw namespace stands for.
#[derive(Clone)]
pub enum Target {
    /// A directory of the source tree (relative path).
    Dir(PathBuf),
    /// An image file's raw file.
    Image(Arc<ImageFile>),
    /// The directory of an image's internal snapshots.
    SnapshotsDir(Arc<ImageFile>),
    /// One internal snapshot (by file name, without `.raw`).
    Snapshot(Arc<ImageFile>, String),
    /// The directory of a disk's partitions.
    PartsDir(Arc<ImageFile>),
    /// One partition of a disk, by number.
    Partition(Arc<ImageFile>, u32),
}

/// One visible entry of a directory of the raw namespace.
#[derive(Clone)]
pub struct Entry {
    /// The name under the mount point (`disk.vdi.raw`, or a directory's own name).
    pub name: OsString,
    pub target: Target,
}

/// Why a file is not served.
#[derive(Debug, Clone)]
struct Problem {
    message: String,
    /// Transient (descriptors exhausted, busy): looked at again on every look.
    retry: bool,
}

/// What the catalog knows about one file of a directory.
enum Record {
    Image(Arc<ImageFile>),
    /// Not served: not an image (no problem), or an image with a problem.
    Hidden {
        identity: FileIdentity,
        problem: Option<Problem>,
    },
}

#[derive(Default)]
struct State {
    /// The files seen in each directory (relative path), by name.
    dirs: HashMap<PathBuf, HashMap<OsString, Record>>,
    roles: Roles,
    /// The open instances, one per file.
    live: HashMap<FileId, Arc<Served>>,
    /// In overlay mode, the raw files' instances: overlay views over the originals in `live`.
    overlays: HashMap<FileId, Arc<Served>>,
    next_version: u64,
    /// Images whose write-back failed since the catalog was made, as "path: error": what was
    /// written to them since their last successful flush may be lost (`imgfs umount` says so).
    lost_write_backs: Vec<String>,
}

impl State {
    /// Drops the record of `name` in `rel`, returning the problem it had (for logging once).
    fn forget(&mut self, rel: &Path, name: &OsStr) -> Option<Problem> {
        let records = self.dirs.get_mut(rel)?;
        match records.remove(name)? {
            Record::Image(image) => {
                self.roles.remove(&image);
                image.end();
                None
            }
            Record::Hidden { problem, .. } => problem,
        }
    }
}

/// The source tree and the images served from it.
pub struct Catalog {
    root: PathBuf,
    /// The source directory's attributes at start: the mount's root shows them if the
    /// directory goes away, so that the mount stays reachable (and `imgfs umount` works).
    root_stat: FileStat,
    opener: Box<dyn Opener>,
    read_only: bool,
    /// Where changes go instead of into the originals (`--overlay DIR`), if anywhere.
    overlay_dir: Option<PathBuf>,
    /// The one image file of `root` served when the source is a file (`with_only`): nothing
    /// else of the directory is listed or looked up, and nothing below it is looked at.
    only: Option<OsString>,
    /// A file of `root` never looked at (`without`).
    unseen: Option<OsString>,
    state: Mutex<State>,
    /// Serialises the opening and closing of instances (file I/O), never held by lookups.
    opening: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves only caches behind: keep serving.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Errors worth retrying on the next look, because they say nothing about the image.
fn is_transient(e: &Error) -> bool {
    e.kind() == ErrorKind::Busy
        || matches!(
            e.errno(),
            libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN | libc::EINTR
        )
}

/// The names an image file `name` may show in the raw namespace.
fn image_entries_of(name: &OsStr) -> [OsString; 3] {
    [RAW_SUFFIX, SNAPSHOTS_SUFFIX, PARTS_SUFFIX].map(|suffix| with_suffix(name, suffix))
}

fn with_suffix(name: &OsStr, suffix: &str) -> OsString {
    let mut out = name.to_os_string();
    out.push(suffix);
    out
}

impl Catalog {
    /// A catalog of the images below `root`, opened with `opener`; `read_only` serves every
    /// image read-only.
    pub fn new(root: &Path, opener: Box<dyn Opener>, read_only: bool) -> Result<Self> {
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
            root_stat: FileStat::of(&meta),
            opener,
            read_only,
            overlay_dir: None,
            only: None,
            unseen: None,
            state: Mutex::new(State::default()),
            opening: Mutex::new(()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Serves every image through an overlay in `dir` (see `overlay`): originals are never
    /// written. `dir` must lie outside the source tree, and the catalog must not be read-only.
    pub fn with_overlays(mut self, dir: &Path) -> Result<Self> {
        if self.read_only {
            return Err(Error::out_of_range(
                "overlays and read-only serving contradict each other",
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("create", e).with_path(dir))?;
        let dir = dir
            .canonicalize()
            .map_err(|e| Error::io("resolve", e).with_path(dir))?;
        // Only what the catalog scans must stay clear of overlays: a catalog of one image
        // looks at nothing below its directory (the files in it are not below).
        if dir.starts_with(&self.root) && (self.only.is_none() || dir == self.root) {
            return Err(Error::out_of_range(format!(
                "the overlay directory {} lies inside the source tree",
                dir.display()
            )));
        }
        self.overlay_dir = Some(dir);
        Ok(self)
    }

    /// Serves only the image file `name` of the root directory (a source given as one image
    /// file), with its snapshots and partitions: the rest of the directory is not listed and
    /// its sub-directories are not looked at. The files beside it are looked at as ever, so
    /// that one using it as a backing file still makes it read-only; backing files and
    /// extents it names are opened all the same.
    pub fn with_only(mut self, name: &OsStr) -> Self {
        self.only = Some(name.to_os_string());
        self
    }

    /// Never looks at file `name` of the root directory: a file the daemon mounts on (one
    /// image served on a file beside it), whose reads would come back to the daemon itself.
    pub fn without(mut self, name: &OsStr) -> Self {
        self.unseen = Some(name.to_os_string());
        self
    }

    /// Whether file `name` of directory `rel` is the one never looked at.
    fn unseen(&self, rel: &Path, name: &OsStr) -> bool {
        rel.as_os_str().is_empty() && self.unseen.as_deref() == Some(name)
    }

    /// Whether image file `name` of directory `rel` may be shown: every one, unless only one
    /// image of the root is served.
    fn shown(&self, rel: &Path, name: &OsStr) -> bool {
        match &self.only {
            Some(only) => rel.as_os_str().is_empty() && name == only,
            None => true,
        }
    }

    pub fn overlay_dir(&self) -> Option<&Path> {
        self.overlay_dir.as_deref()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
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

    /// The attributes of directory `rel` of the source tree.
    pub fn dir_stat(&self, rel: &Path) -> Result<FileStat> {
        let path = self.source_path(rel)?;
        match std::fs::symlink_metadata(&path) {
            Ok(meta) => Ok(FileStat::of(&meta)),
            Err(_) if rel.as_os_str().is_empty() => Ok(self.root_stat.clone()),
            Err(e) => Err(Error::io("stat", e).with_path(&path)),
        }
    }

    /// The visible entries of a directory of the raw namespace, sorted by name.
    pub fn list(&self, dir: &Target) -> Result<Vec<Entry>> {
        match dir {
            Target::Dir(rel) => self.list_dir(rel),
            Target::SnapshotsDir(image) => Ok(snapshot_entries(image)),
            Target::PartsDir(image) => Ok(self.partition_entries(image)),
            Target::Image(_) | Target::Snapshot(..) | Target::Partition(..) => {
                Err(Error::out_of_range("not a directory"))
            }
        }
    }

    /// The entry called `name` (a raw-namespace name) in directory `dir`, if there is one.
    pub fn lookup(&self, dir: &Target, name: &OsStr) -> Result<Option<Entry>> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Ok(None);
        }
        let entries = match dir {
            Target::Dir(rel) => return self.lookup_in_dir(rel, name),
            Target::SnapshotsDir(image) => return Ok(snapshot_entry(image, name)),
            Target::PartsDir(image) => self.partition_entries(image),
            Target::Image(_) | Target::Snapshot(..) | Target::Partition(..) => return Ok(None),
        };
        Ok(entries.into_iter().find(|e| e.name == name))
    }

    fn lookup_in_dir(&self, rel: &Path, name: &OsStr) -> Result<Option<Entry>> {
        let dir = self.source_path(rel)?;
        // A real directory wins over an image's raw file or snapshots directory.
        let is_dir = self.only.is_none()
            && !self.unseen(rel, name)
            && std::fs::symlink_metadata(dir.join(name)).is_ok_and(|m| m.is_dir());
        if is_dir {
            return Ok(Some(Entry {
                name: name.to_os_string(),
                target: Target::Dir(rel.join(name)),
            }));
        }
        let bytes = name.as_bytes();
        if let Some(stem) = bytes.strip_suffix(RAW_SUFFIX.as_bytes()) {
            return Ok(self
                .image_named(rel, &dir, OsStr::from_bytes(stem))?
                .map(|image| Entry {
                    name: name.to_os_string(),
                    target: Target::Image(image),
                }));
        }
        for suffix in [SNAPSHOTS_SUFFIX, PARTS_SUFFIX] {
            if let Some(stem) = bytes.strip_suffix(suffix.as_bytes()) {
                if let Some(image) = self.image_named(rel, &dir, OsStr::from_bytes(stem))? {
                    let beside = self.beside(OsStr::from_bytes(stem), &image);
                    return Ok(beside.into_iter().find(|e| e.name == name));
                }
            }
        }
        Ok(None)
    }

    /// The image file `name` of directory `rel` (source path `dir`), if it is one; a file that
    /// is gone is forgotten.
    fn image_named(&self, rel: &Path, dir: &Path, name: &OsStr) -> Result<Option<Arc<ImageFile>>> {
        if name.is_empty() || !self.shown(rel, name) || self.unseen(rel, name) {
            return Ok(None);
        }
        let path = dir.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let files = vec![(name.to_os_string(), meta)];
                let found = self.resolve_files(rel, dir, files, false);
                Ok(found.into_iter().next().map(|(_, image)| image))
            }
            Ok(_) => Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.state().forget(rel, name);
                Ok(None)
            }
            Err(e) => Err(Error::io("stat", e).with_path(&path)),
        }
    }

    fn list_dir(&self, rel: &Path) -> Result<Vec<Entry>> {
        let dir = self.source_path(rel)?;
        let reader =
            std::fs::read_dir(&dir).map_err(|e| Error::io("read directory", e).with_path(&dir))?;
        let mut entries = Vec::new();
        let mut files = Vec::new();
        for item in reader {
            let item = item.map_err(|e| Error::io("read directory", e).with_path(&dir))?;
            if self.unseen(rel, &item.file_name()) {
                continue;
            }
            // Not followed: symbolic links could lead out of the source tree.
            let Ok(meta) = item.metadata() else { continue };
            if meta.is_dir() && self.only.is_none() {
                entries.push(Entry {
                    target: Target::Dir(rel.join(item.file_name())),
                    name: item.file_name(),
                });
            } else if meta.is_file() {
                files.push((item.file_name(), meta));
            }
        }
        let taken: HashSet<OsString> = entries.iter().map(|e| e.name.clone()).collect();
        for (name, image) in self.resolve_files(rel, &dir, files, true) {
            let raw = with_suffix(&name, RAW_SUFFIX);
            if taken.contains(&raw) {
                continue;
            }
            for dir in self.beside(&name, &image) {
                if !taken.contains(&dir.name) {
                    entries.push(dir);
                }
            }
            entries.push(Entry {
                name: raw,
                target: Target::Image(image),
            });
        }
        // A catalog of one image still looks at the files beside it, so that one using it as
        // a backing file makes it read-only, but shows none of them.
        if let Some(only) = &self.only {
            let image = image_entries_of(only);
            entries.retain(|e| rel.as_os_str().is_empty() && image.contains(&e.name));
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    /// The images among `files` (name and metadata, all of directory `rel`), from their records
    /// where those are still current, else looked at anew. With `whole`, `files` is the whole
    /// directory and records of files not in it are dropped.
    fn resolve_files(
        &self,
        rel: &Path,
        dir: &Path,
        files: Vec<(OsString, std::fs::Metadata)>,
        whole: bool,
    ) -> Vec<(OsString, Arc<ImageFile>)> {
        let mut known = Vec::new();
        let mut fresh = Vec::new();
        {
            let mut state = self.state();
            if whole {
                let present: HashSet<&OsString> = files.iter().map(|(name, _)| name).collect();
                let gone: Vec<OsString> = state
                    .dirs
                    .get(rel)
                    .map(|records| {
                        records
                            .keys()
                            .filter(|name| !present.contains(name))
                            .cloned()
                            .collect()
                    })
                    .unwrap_or_default();
                for name in gone {
                    state.forget(rel, &name);
                }
            }
            let records = state.dirs.entry(rel.to_path_buf()).or_default();
            for (name, meta) in files {
                let identity = FileIdentity::of(&meta);
                match records.get(&name) {
                    Some(Record::Image(image)) if image.id == identity.id => {
                        known.push((name, Arc::clone(image)))
                    }
                    Some(Record::Hidden {
                        identity: seen,
                        problem,
                    }) if *seen == identity && !problem.as_ref().is_some_and(|p| p.retry) => {}
                    _ => fresh.push(name),
                }
            }
        }
        let mut images = Vec::new();
        for (name, image) in known {
            match self.is_current(&image) {
                true => images.push((name, image)),
                false => fresh.push(name),
            }
        }
        for name in fresh {
            if let Some(image) = self.look_at(rel, dir, &name) {
                images.push((name, image));
            }
        }
        images
    }

    /// Whether `image` is still the version at its path. A file overwritten in place retires
    /// its open instance: what that holds in memory must never reach the new content.
    fn is_current(&self, image: &ImageFile) -> bool {
        match image.check() {
            Change::Current => true,
            Change::Replaced => false,
            Change::Rewritten => {
                let mut state = self.state();
                if let Some(stale) = state.live.remove(&image.id) {
                    log::warn!(
                        "{} was overwritten while served; its open instance is retired",
                        image.source.display()
                    );
                    stale.retire(format!(
                        "{} was overwritten while open through the mount; reopen it",
                        image.source.display()
                    ));
                }
                false
            }
        }
    }

    /// Looks at file `name` of `rel` anew (no lock held while doing so) and records what it is.
    fn look_at(&self, rel: &Path, dir: &Path, name: &OsStr) -> Option<Arc<ImageFile>> {
        let path = dir.join(name);
        let id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()))?;
        // Counted before the stat that the new version starts from: writes of ours that land
        // after it are then recognised as ours.
        let writes = own_writes(id).started;
        let meta = std::fs::symlink_metadata(&path)
            .ok()
            .filter(|m| m.is_file())?;
        let identity = FileIdentity::of(&meta);
        // A file named as the source is served even without a format's magic: as a raw disk.
        let named = self.only.as_deref() == Some(name) && rel.as_os_str().is_empty();
        let mut outcome = summarize(self.opener.as_ref(), &self.root, &path, named);
        if named && matches!(outcome, Outcome::NotImage) {
            outcome = Outcome::Refused(Error::unsupported(
                "it is only a part of an image (a VMDK extent): name the image's descriptor",
            ));
        }
        if let Outcome::Image(_) = outcome {
            if with_suffix(name, RAW_SUFFIX).len() > NAME_MAX {
                outcome = Outcome::Refused(Error::unsupported(format!(
                    "the name is too long to add {RAW_SUFFIX} to it (at most {} bytes)",
                    NAME_MAX - RAW_SUFFIX.len()
                )));
            } else if let Some(why) = {
                let format = match &outcome {
                    Outcome::Image(summary) => summary.format.name(),
                    _ => "",
                };
                self.overlay_refusal(&rel.join(name), &path, format)
            } {
                outcome = Outcome::Refused(Error::corrupt(why));
            } else {
                match self.opener.held_for_writing(&path) {
                    Ok(false) => {}
                    Ok(true) => {
                        outcome = Outcome::Refused(Error::busy(
                            "another process (QEMU?) has the image open for writing",
                        ))
                    }
                    Err(e) => outcome = Outcome::Refused(e),
                }
            }
        }
        let mut state = self.state();
        let previous = state.forget(rel, name);
        let record = match outcome {
            Outcome::NotImage => Record::Hidden {
                identity,
                problem: None,
            },
            Outcome::Refused(e) => {
                let e = e.with_path(&path);
                let problem = Problem {
                    message: e.to_string(),
                    retry: is_transient(&e),
                };
                if previous.as_ref().map(|p| &p.message) != Some(&problem.message) {
                    match (self.shown(rel, name), problem.retry) {
                        (false, _) => log::debug!("not looking at {}", problem.message),
                        (true, true) => log::warn!("not serving {} (retried)", problem.message),
                        (true, false) => log::error!("not serving {}", problem.message),
                    }
                }
                Record::Hidden {
                    identity,
                    problem: Some(problem),
                }
            }
            Outcome::Image(summary) => {
                // An image above a file that is open for writing through the mount waits until
                // those handles close: serving it would freeze the file under its writers.
                let written_below = summary.below.iter().find_map(|id| {
                    state
                        .live
                        .get(id)
                        .filter(|s| s.writers() > 0)
                        .map(|s| s.source().to_path_buf())
                });
                if let Some(base) = written_below {
                    let problem = Problem {
                        message: format!(
                            "not serving {}: its backing file {} is open for writing through \
                             the mount; retried once it is closed",
                            path.display(),
                            base.display()
                        ),
                        retry: true,
                    };
                    if previous.as_ref().map(|p| &p.message) != Some(&problem.message) {
                        log::info!("{}", problem.message);
                    }
                    Record::Hidden {
                        identity,
                        problem: Some(problem),
                    }
                } else {
                    state.next_version += 1;
                    let image = Arc::new(ImageFile::new(
                        rel.join(name),
                        path.clone(),
                        state.next_version,
                        summary,
                        &meta,
                        writes,
                    ));
                    state.roles.add(&image);
                    match self.shown(rel, name) {
                        true => log::info!("serving {}", path.display()),
                        // Beside the one image served: looked at for its roles only.
                        false => log::debug!("found {} beside the image served", path.display()),
                    }
                    Record::Image(image)
                }
            }
        };
        let image = match &record {
            Record::Image(image) => Some(Arc::clone(image)),
            Record::Hidden { .. } => None,
        };
        state
            .dirs
            .entry(rel.to_path_buf())
            .or_default()
            .insert(name.to_os_string(), record);
        image
    }

    /// Looks at the whole tree again: new, changed and removed files, and files hidden for a
    /// transient reason. Returns how many images are served. Run at start-up (so bad images
    /// are reported before the mount goes live) and on a timer.
    pub fn refresh(&self) -> usize {
        let mut count = 0;
        let mut seen_dirs = HashSet::new();
        let mut visited = HashSet::new();
        let mut dirs = vec![PathBuf::new()];
        while let Some(rel) = dirs.pop() {
            // A bind mount inside the tree can make it a loop: each directory is walked once.
            let Ok(meta) = self
                .source_path(&rel)
                .and_then(|p| std::fs::metadata(p).map_err(|e| Error::io("stat", e)))
            else {
                continue;
            };
            if !visited.insert((meta.dev(), meta.ino())) {
                continue;
            }
            match self.list_dir(&rel) {
                Ok(entries) => {
                    for entry in entries {
                        match entry.target {
                            Target::Dir(sub) => dirs.push(sub),
                            Target::Image(_) => count += 1,
                            Target::SnapshotsDir(_)
                            | Target::Snapshot(..)
                            | Target::PartsDir(_)
                            | Target::Partition(..) => {}
                        }
                    }
                }
                Err(e) => log::warn!("{e}"),
            }
            seen_dirs.insert(rel);
        }
        let mut state = self.state();
        let gone: Vec<(PathBuf, Vec<OsString>)> = state
            .dirs
            .iter()
            .filter(|(rel, _)| !seen_dirs.contains(*rel))
            .map(|(rel, records)| (rel.clone(), records.keys().cloned().collect()))
            .collect();
        for (rel, names) in gone {
            for name in names {
                state.forget(&rel, &name);
            }
            state.dirs.remove(&rel);
        }
        count
    }
}

#[cfg(test)]
mod tests;
