//! Opening, sharing and closing the instances behind handles. One instance per file, shared by
//! every handle and every image above it; writable unless the mount, the file's role (a backing
//! file), the host or the image itself says otherwise. An instance that becomes a backing file
//! while open is written back and frozen, not reopened, so readers keep it; one nobody uses is
//! closed after a while, so idle images hold no descriptor and no lock.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::roles::ImagesAbove;
use super::served::{BackingUse, ImageHandle, Served};
use super::{lock, Catalog, ImageFile};
use crate::error::{Error, ErrorKind, Result};
use crate::format::links::{Chain, Links};
use crate::format::{Format, OpenOptions};
use crate::host::activity::{activity_of, FileState};
use crate::image::Image;

/// What the raw file of an image shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageAttrs {
    pub size: u64,
    pub allocated: u64,
    /// Whether opening it for writing would be allowed now.
    pub writable: bool,
}

/// What opening a handle takes.
enum Plan {
    Reuse(ImageHandle),
    /// Open a new instance, read-only for `role` if there is one; `replaced` is the instance it
    /// takes the place of, whose remaining readers read through the new one (dropped outside
    /// the state lock: closing it is file I/O).
    Open {
        role: Option<String>,
        replaced: Option<Arc<Served>>,
    },
    Busy(Error),
}

fn stale(image: &ImageFile) -> Error {
    Error::new(
        ErrorKind::Stale,
        "the image file changed or went away; look it up again",
    )
    .with_path(&image.source)
}

/// Why an image is read-only while `above` (relative to the root) stands on it.
fn backing_reason(above: impl std::fmt::Display) -> String {
    format!("it is the backing file of {above}")
}

impl Catalog {
    /// Size, allocation and writability of `image`, from its open instance where there is one.
    pub fn attributes(&self, image: &ImageFile) -> ImageAttrs {
        let (live, view, above) = self.standing(image);
        let (size, allocated) = match view.as_ref().or(live.as_ref()) {
            Some(served) => {
                let allocated = served.allocated_bytes();
                if self.overlay_dir.is_none() {
                    image.set_allocated(allocated);
                    image.set_size(served.size());
                }
                (served.size(), allocated)
            }
            None => (image.size(), image.allocated()),
        };
        ImageAttrs {
            size,
            allocated,
            writable: self.reason_from(image, live, above).is_none(),
        }
    }

    /// Why opening `image` for writing would be refused now, or `None` when it would not.
    pub fn read_only_reason(&self, image: &ImageFile) -> Option<String> {
        let (live, _, above) = self.standing(image);
        self.reason_from(image, live, above)
    }

    /// `image`'s open instance, its overlay view, and the images above it, under one lock.
    fn standing(
        &self,
        image: &ImageFile,
    ) -> (
        Option<Arc<Served>>,
        Option<Arc<Served>>,
        Option<ImagesAbove>,
    ) {
        let state = self.state();
        (
            state.live.get(&image.id).cloned(),
            state.overlays.get(&image.id).cloned(),
            state.roles.images_above(image.id),
        )
    }

    /// Why `image` is read-only, given its open instance and the images above it.
    fn reason_from(
        &self,
        image: &ImageFile,
        live: Option<Arc<Served>>,
        above: Option<ImagesAbove>,
    ) -> Option<String> {
        if image.has_ended() {
            return Some("the image file changed or went away".to_string());
        }
        if self.overlay_dir.is_some() {
            // Everything is written into overlays: the original's role and state do not matter.
            return None;
        }
        if let Some(role) = self.role_reason(above) {
            return Some(role);
        }
        if let Some(reason) = &image.summary.inherent_read_only {
            return Some(reason.clone());
        }
        if !image.host_writable() {
            return Some("the image file is not writable".to_string());
        }
        // An instance open read-only gives way to a writable one unless an image above it
        // (gone from the tree, or there would be a role) is still open, or the instance
        // itself stopped writing (a failed write-back) and a file on it is still open.
        let in_use = |s: &Served| s.users() > 0 || (s.stopped_writing() && s.handles() > 0);
        match live {
            Some(served) if !served.accepts_writes() && in_use(&served) => Some(
                served
                    .read_only_reason()
                    .unwrap_or_else(|| "its open instance is read-only".to_string()),
            ),
            _ => None,
        }
    }

    /// Why an image with `above` over it (if any) is served read-only whatever its state.
    fn role_reason(&self, above: Option<ImagesAbove>) -> Option<String> {
        match self.read_only {
            true => Some("served read-only by request".to_string()),
            false => above.map(backing_reason),
        }
    }

    /// A handle on `image`, opening (or sharing) its instance; `write` asks for writing.
    pub fn open(&self, image: &Arc<ImageFile>, write: bool) -> Result<ImageHandle> {
        if !self.is_current(image) {
            return Err(stale(image));
        }
        if self.overlay_dir.is_some() {
            return self.open_overlaid(image, write);
        }
        if write {
            if let Some(reason) = &image.summary.inherent_read_only {
                return Err(Error::read_only(reason.clone()).with_path(&image.source));
            }
            if !image.host_writable() {
                return Err(
                    Error::read_only("the image file is not writable").with_path(&image.source)
                );
            }
        }
        let _opening = lock(&self.opening);
        let (role, replaced) = match self.plan_open(image, write)? {
            Plan::Reuse(handle) => return Ok(handle),
            Plan::Open { role, replaced } => (role, replaced),
            // Perhaps only images nobody has open any more (removed ones) still use it.
            Plan::Busy(e) => match self.close_unused(Duration::ZERO) {
                0 => return Err(e),
                _ => match self.plan_open(image, write)? {
                    Plan::Reuse(handle) => return Ok(handle),
                    Plan::Open { role, replaced } => (role, replaced),
                    Plan::Busy(e) => return Err(e),
                },
            },
        };
        let options = OpenOptions {
            read_only: role.is_some(),
            inspect: false,
            reason: role,
        };
        let instance = self.open_instance(&image.source, image.summary.format, &options)?;
        let served = Arc::new(Served::new(instance, image.id, &image.source));
        if let Some(replaced) = replaced {
            replaced.succeed_by(&served);
        }
        let mut state = self.state();
        state.live.insert(image.id, Arc::clone(&served));
        if write {
            // An image above it may have appeared while it was being opened.
            if let Some(above) = state.roles.images_above(image.id) {
                return Err(Error::read_only(backing_reason(above)).with_path(&image.source));
            }
            if let Some(reason) = served.read_only_reason() {
                return Err(Error::read_only(reason).with_path(&image.source));
            }
        }
        Ok(served.handle(write, None))
    }

    /// Whether a handle on `image` can share its open instance, needs a new one (with the
    /// reason it is read-only, if it is), or must wait. The caller holds the opening lock.
    fn plan_open(&self, image: &ImageFile, write: bool) -> Result<Plan> {
        let mut state = self.state();
        let role = self.role_reason(state.roles.images_above(image.id));
        if let (true, Some(reason)) = (write, &role) {
            return Err(Error::read_only(reason.clone()).with_path(&image.source));
        }
        if let Some(live) = state.live.get(&image.id).cloned() {
            if !write || live.accepts_writes() {
                return Ok(Plan::Reuse(live.handle(write, None)));
            }
            if live.is_frozen() && live.users() == 0 {
                live.thaw();
                if live.accepts_writes() {
                    return Ok(Plan::Reuse(live.handle(true, None)));
                }
            }
            if live.stopped_writing() && live.handles() > 0 {
                let why = live.read_only_reason().unwrap_or_default();
                return Err(Error::read_only(format!(
                    "{why}; writable again once every file on it is closed"
                ))
                .with_path(&image.source));
            }
            if live.users() > 0 {
                let why = live.read_only_reason().unwrap_or_default();
                return Ok(Plan::Busy(
                    Error::busy(format!(
                        "an image that was above it is still open through the mount ({why}); \
                         writable once it is closed"
                    ))
                    .with_path(&image.source),
                ));
            }
            // Opened read-only (as a backing file, or while the file was not writable): a
            // writable instance takes its place, and its readers read through that.
            let replaced = state.live.remove(&image.id);
            return Ok(Plan::Open { role, replaced });
        }
        Ok(Plan::Open {
            role,
            replaced: None,
        })
    }

    /// Sets the times of `image`'s file, as this process's own change of it.
    pub fn set_times(
        &self,
        image: &ImageFile,
        atime: Option<SystemTime>,
        mtime: Option<SystemTime>,
    ) -> Result<()> {
        if !self.is_current(image) {
            return Err(stale(image));
        }
        let file = std::fs::File::open(&image.source)
            .map_err(|e| Error::io("open", e).with_path(&image.source))?;
        let mut times = std::fs::FileTimes::new();
        if let Some(t) = atime {
            times = times.set_accessed(t);
        }
        if let Some(t) = mtime {
            times = times.set_modified(t);
        }
        activity_of(image.id)
            .around(
                || file.set_times(times),
                || file.metadata().ok().map(|m| FileState::of(&m)),
            )
            .map_err(|e| Error::io("set times", e).with_path(&image.source))?;
        self.is_current(image);
        Ok(())
    }

    /// After a handle on `image` closed: remember the file's state, now that our writes are
    /// done, so that a change by someone else is told apart from ours later.
    pub fn note_closed(&self, image: &ImageFile) {
        self.is_current(image);
    }

    /// Every open instance (for writing them all back).
    pub fn live_instances(&self) -> Vec<Arc<Served>> {
        let state = self.state();
        state
            .overlays
            .values()
            .chain(state.live.values())
            .cloned()
            .collect()
    }

    /// Closes the instances nobody has used for `idle_for` (written back first); returns how
    /// many were closed. A backing file is closed once the images above it are.
    pub fn close_idle(&self, idle_for: Duration) -> usize {
        let _opening = lock(&self.opening);
        self.close_unused(idle_for)
    }

    /// Writes back what `served` holds before it is closed; `false` keeps it open, so that
    /// it is written back on a later try. An instance whose write-back stopped earlier (its
    /// flush fails, and nothing is left dirty) is closed, and its loss remembered.
    fn written_back_for_closing(&self, served: &Served) -> bool {
        if served.is_retired() || (!served.is_dirty() && served.read_only_reason().is_none()) {
            return true;
        }
        match served.flush() {
            Ok(()) => true,
            Err(e) if served.is_dirty() => {
                log::error!("write-back before closing failed: {e}");
                false
            }
            Err(e) => {
                self.note_lost_write_back(served.source(), &e);
                true
            }
        }
    }

    /// Remembers that the write-back of the image at `source` failed with `e` (once a path).
    pub fn note_lost_write_back(&self, source: &Path, e: &Error) {
        let mut state = self.state();
        let path = source.display().to_string();
        let known = state.lost_write_backs.iter().any(|entry| {
            entry
                .strip_prefix(&path)
                .is_some_and(|r| r.starts_with(": "))
        });
        if !known {
            let text = e.to_string();
            let entry = if text.starts_with(&path) {
                text
            } else {
                format!("{path}: {text}")
            };
            state.lost_write_backs.push(entry);
        }
    }

    /// The images whose write-back failed since the catalog was made, as "path: error".
    pub fn lost_write_backs(&self) -> Vec<String> {
        self.state().lost_write_backs.clone()
    }

    /// `close_idle` for a caller that holds the opening lock.
    fn close_unused(&self, idle_for: Duration) -> usize {
        let mut closed = 0;
        loop {
            let candidates: Vec<(bool, Arc<Served>)> = {
                let state = self.state();
                // Overlay views first: each holds its original open.
                let views = state.overlays.values().map(|s| (true, s));
                let plain = state.live.values().map(|s| (false, s));
                views
                    .chain(plain)
                    .filter(|(_, s)| s.is_unused() && s.idle_for() >= idle_for)
                    .map(|(view, s)| (view, Arc::clone(s)))
                    .collect()
            };
            if candidates.is_empty() {
                return closed;
            }
            let mut progress = false;
            for (view, served) in candidates {
                if !self.written_back_for_closing(&served) {
                    continue;
                }
                let mut state = self.state();
                let map = if view {
                    &mut state.overlays
                } else {
                    &mut state.live
                };
                let still_ours = map
                    .get(&served.id())
                    .is_some_and(|s| Arc::ptr_eq(s, &served));
                if still_ours && served.is_unused() {
                    map.remove(&served.id());
                    closed += 1;
                    progress = true;
                }
            }
            // Closing an image above a backing file frees the backing file only now.
            if !progress || !idle_for.is_zero() {
                return closed;
            }
        }
    }

    /// Opens the instance of the image at `path`; when descriptors run out, closes the idle
    /// instances and tries once more. The caller holds the opening lock.
    pub(super) fn open_instance(
        &self,
        path: &Path,
        format: Format,
        options: &OpenOptions,
    ) -> Result<Arc<dyn Image>> {
        let attempt = || {
            let mut links = ServingLinks { catalog: self };
            self.opener.open(path, format, options, &mut links)
        };
        match attempt() {
            Err(e) if matches!(e.errno(), libc::EMFILE | libc::ENFILE) => {
                if self.close_unused(Duration::ZERO) > 0 {
                    attempt()
                } else {
                    Err(e)
                }
            }
            other => other,
        }
    }
}

/// Backing files of instances being opened: each served file is shared (one instance for its
/// raw file and every image above it), written back and frozen if it was open for writing.
struct ServingLinks<'a> {
    catalog: &'a Catalog,
}

impl Links for ServingLinks<'_> {
    fn root(&self) -> &Path {
        &self.catalog.root
    }

    fn open_backing(
        &mut self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
    ) -> Result<Arc<dyn Image>> {
        chain.below(path)?;
        let catalog = self.catalog;
        let probed = catalog.opener.probe(path)?;
        // A file read as another format than it has is a private instance, never shared.
        let shared = probed.is_some() && (format.is_none() || format == probed);
        // Probed once here; a file that is no image is read raw, as QEMU does.
        let format = Some(format.or(probed).unwrap_or(Format::Raw));
        if !shared {
            return catalog
                .opener
                .open_backing(path, format, chain, self, false);
        }
        let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", e).with_path(path))?;
        let id = (meta.dev(), meta.ino());
        let above = chain.parent_path();
        let above = above.strip_prefix(&catalog.root).unwrap_or(above);
        let live = catalog.state().live.get(&id).cloned();
        if let Some(live) = live {
            if live.accepts_writes() {
                if live.writers() > 0 {
                    return Err(Error::busy(format!(
                        "its backing file {} is open for writing through the mount",
                        path.display()
                    )));
                }
                live.flush().map_err(|e| e.with_path(path))?;
                live.freeze(backing_reason(above.display()));
                log::info!(
                    "{} is a backing file: served read-only from now on",
                    path.display()
                );
            }
            return Ok(Arc::new(BackingUse::new(live)));
        }
        let image = catalog
            .opener
            .open_backing(path, format, chain, self, false)?;
        let served = Arc::new(Served::new(image, id, path));
        catalog.state().live.insert(id, Arc::clone(&served));
        Ok(Arc::new(BackingUse::new(served)))
    }
}
