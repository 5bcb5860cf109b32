//! Overlays (`imgfs mount --overlay DIR`): every original of the source tree is opened
//! read-only and never written, not even its lock bytes for writing, a log replay or a header
//! field; what is written through its raw file goes into `DIR/<relative path>.qcow2`, a qcow2
//! whose backing file is the original (with its format recorded), created on the first write
//! and reused by later mounts. QEMU reads it as it is (`qemu-img info --backing-chain`).
//!
//! Beside it, `<overlay>.origin` records which original it was made from (path, size, mtime and
//! a CRC32C of its first 64 KiB): an overlay whose original changed since is refused, since its
//! clusters would be laid over other data.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::served::{BackingUse, ImageHandle, Served};
use super::{lock, Catalog, ImageFile};
use crate::error::{Error, Result};
use crate::format::backing::Backing;
use crate::format::qcow2::create::{create, NewImage};
use crate::format::OpenOptions;
use crate::image::{Extent, Image, ImageInfo};

/// The suffix of an overlay's file name, after the original's.
pub const OVERLAY_SUFFIX: &str = ".qcow2";
/// The suffix of the file beside an overlay that records its original.
pub const ORIGIN_SUFFIX: &str = ".origin";
/// How much of an original's head its checksum covers.
const HEAD_BYTES: usize = 64 * 1024;

/// Where the overlay of the image at `rel` (relative to the source tree) lives in `dir`, and
/// the file that records its original.
pub fn overlay_paths(dir: &Path, rel: &Path) -> (PathBuf, PathBuf) {
    let mut overlay = dir.join(rel).into_os_string();
    overlay.push(OVERLAY_SUFFIX);
    let mut origin = overlay.clone();
    origin.push(ORIGIN_SUFFIX);
    (overlay.into(), origin.into())
}

/// The ranges an overlay holds (its own data and zeros, not its backing file's), found with
/// the overlay opened alone and for inspection only.
pub fn changed_ranges(overlay: &Path) -> Result<Vec<Extent>> {
    let image = crate::format::open_alone(overlay)?;
    let size = image.size();
    let mut changed = Vec::new();
    let mut at = 0;
    // In windows, so a huge disk does not build one giant list at once.
    while at < size {
        let len = (1u64 << 34).min(size - at);
        for extent in image.block_status(at, len)? {
            if extent.layer == 0 && extent.state != crate::image::ExtentState::Unallocated {
                crate::image::push_extent(&mut changed, extent);
            }
        }
        at += len;
    }
    Ok(changed)
}

/// Which original an overlay was made from, and how it looked then.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Origin {
    /// The original, and the source tree its chain must stay inside.
    pub original: PathBuf,
    pub root: PathBuf,
    pub format: String,
    pub size: u64,
    pub mtime_ns: u64,
    pub head_crc32c: u32,
    /// When the overlay was made (seconds since the epoch).
    pub created: u64,
}

impl Origin {
    /// The original at `original` as it is now.
    pub fn of(original: &Path, root: &Path, format: &str) -> Result<Origin> {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let io = |what: &str, e| Error::io(what.to_string(), e).with_path(original);
        let file = std::fs::File::open(original).map_err(|e| io("open", e))?;
        let meta = file.metadata().map_err(|e| io("stat", e))?;
        let mut head = vec![0u8; HEAD_BYTES];
        let n = file.read_at(&mut head, 0).map_err(|e| io("read", e))?;
        let secs = u64::try_from(meta.mtime()).unwrap_or(0);
        let nsecs = u64::try_from(meta.mtime_nsec()).unwrap_or(0);
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Origin {
            original: original.to_path_buf(),
            root: root.to_path_buf(),
            format: format.to_string(),
            size: meta.len(),
            mtime_ns: secs.saturating_mul(1_000_000_000).saturating_add(nsecs),
            head_crc32c: crc32c::crc32c(&head[..n]),
            created,
        })
    }

    pub fn read(path: &Path) -> Result<Origin> {
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("read", e).with_path(path))?;
        serde_json::from_str(&text).map_err(|e| {
            Error::corrupt(format!("not an overlay origin record: {e}")).with_path(path)
        })
    }

    fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::corrupt(format!("cannot record the origin: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io("write", e).with_path(path))
    }

    /// Why an overlay made from `self` must not be laid over the original as it is `now`.
    pub fn mismatch(&self, now: &Origin) -> Option<String> {
        let what = if self.size != now.size {
            "its size"
        } else if self.mtime_ns != now.mtime_ns {
            "its modification time"
        } else if self.head_crc32c != now.head_crc32c {
            "its first 64 KiB"
        } else {
            return None;
        };
        Some(format!(
            "the original {} changed since the overlay was made from it ({what} differs)",
            now.original.display()
        ))
    }
}

/// `to` relative to directory `from` (both absolute), or `to` itself when they share nothing
/// but the root.
fn relative_to(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to_parts: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(&to_parts)
        .take_while(|(a, b)| a == b)
        .count();
    if common <= 1 {
        return to.to_path_buf();
    }
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for part in &to_parts[common..] {
        out.push(part);
    }
    out
}

impl Catalog {
    /// Overlay mode's `open`: a handle on the image's overlay view, made (with the original
    /// opened read-only) on first use.
    pub(super) fn open_overlaid(&self, image: &ImageFile, write: bool) -> Result<ImageHandle> {
        let Some(dir) = &self.overlay_dir else {
            return Err(Error::out_of_range("internal: not in overlay mode"));
        };
        let _opening = lock(&self.opening);
        if let Some(view) = self.state().overlays.get(&image.id).cloned() {
            return Ok(view.handle(write, None));
        }
        let (path, origin_path) = overlay_paths(dir, &image.rel);
        let format = image.summary.format.name();
        let now = Origin::of(&image.source, &self.root, format)?;
        let origin = match path.exists() {
            true => {
                let recorded = Origin::read(&origin_path)?;
                if let Some(why) = recorded.mismatch(&now) {
                    return Err(Error::corrupt(format!("overlay refused: {why}")).with_path(&path));
                }
                recorded
            }
            false => now,
        };
        let original = self.original_instance(image)?;
        let bottom: Arc<dyn Image> = Arc::new(BackingUse::new(original));
        let view = OverlayView::new(bottom, origin, path)?;
        let served = Arc::new(Served::new(Arc::new(view), image.id, &image.source));
        self.state().overlays.insert(image.id, Arc::clone(&served));
        Ok(served.handle(write, None))
    }

    /// A reading handle on the overlay view of `image`, if it can be had.
    pub(super) fn open_overlaid_for_reading(&self, image: &ImageFile) -> Option<ImageHandle> {
        self.open_overlaid(image, false).ok()
    }

    /// The original's own instance, read-only, shared with the images above it. The caller
    /// holds the opening lock.
    fn original_instance(&self, image: &ImageFile) -> Result<Arc<Served>> {
        if let Some(served) = self.state().live.get(&image.id).cloned() {
            return Ok(served);
        }
        let options = OpenOptions {
            read_only: true,
            inspect: false,
            reason: Some("an original: changes go to its overlay".into()),
        };
        let instance = self.open_instance(&image.source, image.summary.format, &options)?;
        let served = Arc::new(Served::new(instance, image.id, &image.source));
        self.state().live.insert(image.id, Arc::clone(&served));
        Ok(served)
    }

    /// Why the overlay kept for the image at `rel` (the file `source`) must not be used, if
    /// there is one and it must not.
    pub(super) fn overlay_refusal(
        &self,
        rel: &Path,
        source: &Path,
        format: &str,
    ) -> Option<String> {
        let dir = self.overlay_dir.as_ref()?;
        let (path, origin_path) = overlay_paths(dir, rel);
        if !path.exists() {
            return None;
        }
        let recorded = match Origin::read(&origin_path) {
            Ok(recorded) => recorded,
            Err(e) => {
                return Some(format!(
                    "its overlay {} has no usable record: {e}",
                    path.display()
                ))
            }
        };
        match Origin::of(source, &self.root, format) {
            Ok(now) => recorded
                .mismatch(&now)
                .map(|why| format!("its overlay {} is refused: {why}", path.display())),
            Err(e) => Some(e.to_string()),
        }
    }
}

/// An original's raw file in overlay mode: reads from the overlay once there is one, else from
/// the original; the first write creates the overlay.
pub struct OverlayView {
    /// The original, read-only (shared with the images above it).
    original: Arc<dyn Image>,
    origin: Origin,
    path: PathBuf,
    origin_path: PathBuf,
    overlay: OnceLock<Arc<dyn Image>>,
    creating: Mutex<()>,
}

impl OverlayView {
    /// The view of `original` (described by `origin`) with its overlay at `path`; an existing
    /// overlay is opened (the caller checked it belongs to this original).
    pub fn new(original: Arc<dyn Image>, origin: Origin, path: PathBuf) -> Result<Self> {
        let mut origin_path = path.clone().into_os_string();
        origin_path.push(ORIGIN_SUFFIX);
        let view = OverlayView {
            original,
            origin,
            path,
            origin_path: origin_path.into(),
            overlay: OnceLock::new(),
            creating: Mutex::new(()),
        };
        if view.path.exists() {
            let opened = view.open_overlay()?;
            let _ = view.overlay.set(opened);
        }
        Ok(view)
    }

    fn open_overlay(&self) -> Result<Arc<dyn Image>> {
        let backing = Backing::new(Arc::clone(&self.original), &self.origin.original);
        crate::format::open_overlay(&self.path, backing)
    }

    /// The overlay, created on first use.
    fn overlay(&self) -> Result<&Arc<dyn Image>> {
        if let Some(overlay) = self.overlay.get() {
            return Ok(overlay);
        }
        let _creating = self.creating.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(overlay) = self.overlay.get() {
            return Ok(overlay);
        }
        let parent = self.path.parent().unwrap_or(Path::new("/"));
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create", e).with_path(parent))?;
        let cluster_bits = match self.original.info().cluster_size {
            Some(c) if c.is_power_of_two() && (1 << 16..=1 << 21).contains(&c) => {
                c.trailing_zeros()
            }
            _ => 16,
        };
        let name = relative_to(parent, &self.origin.original);
        let name = name.to_string_lossy();
        let spec = NewImage {
            size: self.original.size(),
            cluster_bits,
            backing: Some((&name, &self.origin.format)),
        };
        // The record first: an overlay without one is never trusted, one without an overlay
        // is harmless.
        self.origin.write(&self.origin_path)?;
        create(&self.path, &spec)?;
        log::info!(
            "{}: changes go to the new overlay {}",
            self.origin.original.display(),
            self.path.display()
        );
        let info = self.original.info();
        if info.details.iter().any(|(key, _)| *key == "encryption") {
            log::warn!(
                "{} is encrypted, but its overlay {} is not: what is written through the \
                 mount lies there in plain text",
                self.origin.original.display(),
                self.path.display()
            );
        }
        let opened = self.open_overlay()?;
        Ok(self.overlay.get_or_init(|| opened))
    }

    fn current(&self) -> &dyn Image {
        match self.overlay.get() {
            Some(overlay) => overlay.as_ref(),
            None => self.original.as_ref(),
        }
    }
}

impl Image for OverlayView {
    fn size(&self) -> u64 {
        self.original.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.current().read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.overlay()?.write_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        match self.overlay.get() {
            Some(overlay) => overlay.flush(),
            None => Ok(()),
        }
    }

    fn is_dirty(&self) -> bool {
        self.overlay.get().is_some_and(|o| o.is_dirty())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.current().block_status(offset, len)
    }

    /// An overlay has the original's size: resizing would need both to agree.
    fn resize(&self, _new_size: u64) -> Result<()> {
        Err(crate::error::Error::unsupported(
            "an image served through an overlay cannot be resized",
        ))
    }

    /// Discards in the overlay (zero clusters over the original), which the original never
    /// sees.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.overlay()?.discard(offset, len)
    }

    fn snapshot_names(&self) -> Vec<String> {
        self.original.snapshot_names()
    }

    fn snapshot(&self, name: &str) -> Result<Arc<dyn Image>> {
        self.original.snapshot(name)
    }

    fn allocated_bytes(&self) -> u64 {
        self.current().allocated_bytes()
    }

    fn read_only_reason(&self) -> Option<String> {
        None
    }

    fn info(&self) -> ImageInfo {
        let mut info = self.original.info();
        info.read_only_reason = None;
        info.details
            .push(("overlay", self.path.display().to_string()));
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_are_relative_where_the_trees_meet() {
        assert_eq!(
            relative_to(
                Path::new("/srv/changes/pc1"),
                Path::new("/srv/evidence/pc1/d.vmdk")
            ),
            Path::new("../../evidence/pc1/d.vmdk")
        );
        assert_eq!(
            relative_to(Path::new("/a/b"), Path::new("/c/d")),
            Path::new("/c/d")
        );
        let (overlay, origin) = overlay_paths(Path::new("/ch"), Path::new("pc1/d.vmdk"));
        assert_eq!(overlay, Path::new("/ch/pc1/d.vmdk.qcow2"));
        assert_eq!(origin, Path::new("/ch/pc1/d.vmdk.qcow2.origin"));
    }

    #[test]
    fn an_original_that_changed_is_told_apart() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("o.img");
        std::fs::write(&path, vec![1u8; 100_000]).unwrap();
        let then = Origin::of(&path, dir.path(), "raw").unwrap();
        assert_eq!(
            then.mismatch(&Origin::of(&path, dir.path(), "raw").unwrap()),
            None
        );
        std::fs::write(&path, vec![2u8; 100_000]).unwrap();
        let now = Origin::of(&path, dir.path(), "raw").unwrap();
        assert!(then.mismatch(&now).unwrap().contains("changed"));
        let record = dir.path().join("r.origin");
        then.write(&record).unwrap();
        assert_eq!(Origin::read(&record).unwrap(), then);
    }
}
