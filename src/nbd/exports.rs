//! What NBD clients can attach, and how a name becomes an image.
//!
//! Export names are the raw namespace of the catalog without `.raw`: `vm/disk.vdi` for the raw
//! file `vm/disk.vdi.raw`, `vm/disk.vdi.parts/p1` for a partition, `x.qcow2.snapshots/s1` for an
//! internal snapshot (read-only). A name is resolved by walking the catalog from its root, one
//! component at a time through `Catalog::lookup`, so only entries the catalog shows can be
//! reached: a client string is never joined onto a host path, and `..`, empty components and
//! absolute names are refused before anything is looked up. `--allow` globs filter the same
//! names; an export they hide is reported as unknown, like one that does not exist.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog::{Catalog, ImageHandle, Target, RAW_SUFFIX};
use crate::error::{Error, ErrorKind, Result};
use crate::image::Image;

use super::glob::Glob;
use super::proto::MAX_STRING;

/// An export as `NBD_OPT_LIST` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// What keeps an export's image open.
pub trait Holder: Send + Sync {
    fn image(&self) -> &dyn Image;
}

impl Holder for ImageHandle {
    fn image(&self) -> &dyn Image {
        ImageHandle::image(self)
    }
}

impl Holder for Arc<dyn Image> {
    fn image(&self) -> &dyn Image {
        self.as_ref()
    }
}

/// An opened export: the image and how it is offered.
pub struct Export {
    pub name: String,
    pub description: String,
    /// Whether clients may write (else NBD_FLAG_READ_ONLY is set and writes fail with EPERM).
    pub writable: bool,
    /// The preferred block size: the image's cluster size, within 512 bytes and 256 KiB.
    pub preferred_block: u32,
    holder: Box<dyn Holder>,
    /// The catalog entry, told when a writer closes (so our own writes are not taken for
    /// someone else's change of the file).
    closed: Option<(Arc<Catalog>, Arc<crate::catalog::ImageFile>)>,
}

impl Export {
    pub fn new(name: String, description: String, writable: bool, holder: Box<dyn Holder>) -> Self {
        let cluster = holder.image().info().cluster_size.unwrap_or(4096);
        Export {
            name,
            description,
            writable,
            preferred_block: preferred_block(cluster),
            holder,
            closed: None,
        }
    }

    pub fn image(&self) -> &dyn Image {
        self.holder.image()
    }

    pub fn size(&self) -> u64 {
        self.image().size()
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        // Clients should flush; whatever they left is written back now, as on a FUSE close.
        if self.writable && self.image().is_dirty() {
            if let Err(e) = self.image().flush() {
                log::error!("flush after export {} closed: {e}", self.name);
            }
        }
        if let Some((catalog, file)) = self.closed.take() {
            // The handle must be gone before the catalog looks at the file again.
            self.holder = Box::new(Closed);
            catalog.note_closed(&file);
        }
    }
}

/// Stands in for a holder that has been dropped.
struct Closed;

impl Holder for Closed {
    fn image(&self) -> &dyn Image {
        &ClosedImage
    }
}

struct ClosedImage;

impl Image for ClosedImage {
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _buf: &mut [u8], _offset: u64) -> Result<()> {
        Err(Error::new(ErrorKind::Stale, "the export is closed"))
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::new(ErrorKind::Stale, "the export is closed"))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn is_dirty(&self) -> bool {
        false
    }
    fn block_status(&self, _offset: u64, _len: u64) -> Result<Vec<crate::image::Extent>> {
        Ok(Vec::new())
    }
    fn allocated_bytes(&self) -> u64 {
        0
    }
    fn read_only_reason(&self) -> Option<String> {
        Some("closed".into())
    }
    fn info(&self) -> crate::image::ImageInfo {
        crate::image::ImageInfo {
            format: "none",
            subformat: String::new(),
            virtual_size: 0,
            cluster_size: None,
            allocated_bytes: 0,
            read_only_reason: None,
            details: Vec::new(),
        }
    }
}

/// The largest preferred block size offered. Clients take it as their request size (nbdcopy
/// does, 256 KiB where the server prefers less), and much larger requests are slower to
/// serve than several of that size: a payload no longer stays in the CPU cache between the
/// copy from the socket and the copy into the host page cache. nbdcopy wrote a 1 GiB VHDX
/// (8 MiB blocks) at 0.55-0.8 of qemu-nbd's rate in 8 MiB or 1 MiB requests, and at
/// 1.2-1.4x in 256 KiB ones.
const PREFERRED_MAX: u64 = 256 << 10;

/// A cluster size as NBD's preferred block size: a power of two from 512 bytes to 256 KiB.
pub fn preferred_block(cluster: u64) -> u32 {
    let clamped = cluster.clamp(512, PREFERRED_MAX);
    let pow2 = if clamped.is_power_of_two() {
        clamped
    } else {
        clamped.next_power_of_two() >> 1
    };
    u32::try_from(pow2).unwrap_or(4096)
}

/// The exports a server offers.
pub trait Exports: Send + Sync {
    /// Every export a client may see, sorted by name.
    fn list(&self) -> Vec<ExportEntry>;
    /// Opens export `name` (writable where allowed); `Ok(None)` if there is no such export.
    fn open(&self, name: &str) -> Result<Option<Export>>;
    /// Whether export `name` exists, without opening it.
    fn exists(&self, name: &str) -> bool;
}

/// The catalog's images as exports.
pub struct CatalogExports {
    catalog: Arc<Catalog>,
    allow: Vec<Glob>,
    read_only: bool,
}

/// How deep below the root the listing goes, and how many exports it lists at most.
const MAX_DEPTH: usize = 64;
const MAX_LISTED: usize = 100_000;

impl CatalogExports {
    /// Exports of every image `catalog` serves whose name matches one of `allow` (all when
    /// empty); `read_only` offers them all read-only.
    pub fn new(catalog: Arc<Catalog>, allow: &[String], read_only: bool) -> Result<Self> {
        let allow = allow
            .iter()
            .map(|g| Glob::new(g))
            .collect::<Result<Vec<_>>>()?;
        Ok(CatalogExports {
            catalog,
            allow,
            read_only,
        })
    }

    fn allowed(&self, name: &str) -> bool {
        self.allow.is_empty() || self.allow.iter().any(|g| g.matches(name))
    }

    /// The target export `name` stands for, walking the catalog from its root.
    fn resolve(&self, name: &str) -> Result<Option<Target>> {
        if name.is_empty() {
            return Ok(self.default_export()?.map(|(_, target)| target));
        }
        if name.len() > MAX_STRING || !self.allowed(name) {
            return Ok(None);
        }
        let parts: Vec<&str> = name.split('/').collect();
        if parts
            .iter()
            .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\0'))
        {
            return Ok(None);
        }
        let Some((last, dirs)) = parts.split_last() else {
            return Ok(None);
        };
        let mut dir = Target::Dir(PathBuf::new());
        for part in dirs {
            match self
                .catalog
                .lookup(&dir, OsString::from(part).as_os_str())?
            {
                Some(entry) if is_dir(&entry.target) => dir = entry.target,
                _ => return Ok(None),
            }
        }
        let file = OsString::from(format!("{last}{RAW_SUFFIX}"));
        Ok(self
            .catalog
            .lookup(&dir, &file)?
            .map(|e| e.target)
            .filter(|t| !is_dir(t)))
    }

    /// The default export (the empty name): the one image of the tree, if there is exactly
    /// one, whatever partitions and snapshots it shows besides.
    fn default_export(&self) -> Result<Option<(String, Target)>> {
        let mut images = Vec::new();
        for entry in self.list() {
            if let Some(target @ Target::Image(_)) = self.resolve(&entry.name)? {
                images.push((entry.name, target));
            }
        }
        Ok(match images.len() {
            1 => images.pop(),
            _ => None,
        })
    }

    fn describe(&self, target: &Target) -> String {
        match target {
            Target::Image(file) => {
                let attrs = self.catalog.attributes(file);
                let access = match attrs.writable && !self.read_only {
                    true => "read-write",
                    false => "read-only",
                };
                format!(
                    "{} image, {} bytes, {access}",
                    file.summary.format.name(),
                    attrs.size
                )
            }
            Target::Partition(file, number) => format!(
                "partition {number} of a {} image",
                file.summary.format.name()
            ),
            Target::Snapshot(file, name) => format!(
                "internal snapshot {name} of a {} image, read-only",
                file.summary.format.name()
            ),
            Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_) => String::new(),
        }
    }

    /// Opens `target` for writing where that is allowed, else for reading.
    fn open_target(&self, target: &Target) -> Result<(ImageHandle, bool)> {
        let want_write = !self.read_only
            && match target {
                Target::Image(file) | Target::Partition(file, _) => {
                    self.catalog.attributes(file).writable
                }
                _ => false,
            };
        let open = |write: bool| match target {
            Target::Image(file) => self.catalog.open(file, write),
            Target::Partition(file, number) => self.catalog.open_partition(file, *number, write),
            Target::Snapshot(file, name) => self.catalog.open_snapshot(file, name),
            Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_) => {
                Err(Error::out_of_range("not an image"))
            }
        };
        if want_write {
            match open(true) {
                Ok(handle) => return Ok((handle, true)),
                // Writable a moment ago, not now (it became a backing file, ...): read-only.
                Err(e) if matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::Busy) => {
                    log::info!("offering read-only: {e}")
                }
                Err(e) => return Err(e),
            }
        }
        Ok((open(false)?, false))
    }
}

fn is_dir(target: &Target) -> bool {
    matches!(
        target,
        Target::Dir(_) | Target::SnapshotsDir(_) | Target::PartsDir(_)
    )
}

impl Exports for CatalogExports {
    fn list(&self) -> Vec<ExportEntry> {
        let mut out = Vec::new();
        let mut stack = vec![(String::new(), Target::Dir(PathBuf::new()), 0usize)];
        while let Some((prefix, dir, depth)) = stack.pop() {
            let entries = match self.catalog.list(&dir) {
                Ok(entries) => entries,
                Err(e) => {
                    log::warn!("listing exports: {e}");
                    continue;
                }
            };
            for entry in entries {
                // Names that are not UTF-8 cannot be NBD export names.
                let Some(name) = entry.name.to_str() else {
                    continue;
                };
                if is_dir(&entry.target) {
                    if depth < MAX_DEPTH {
                        stack.push((format!("{prefix}{name}/"), entry.target, depth + 1));
                    }
                    continue;
                }
                let Some(stem) = name.strip_suffix(RAW_SUFFIX) else {
                    continue;
                };
                let export = format!("{prefix}{stem}");
                if export.len() <= MAX_STRING && self.allowed(&export) && out.len() < MAX_LISTED {
                    let description = self.describe(&entry.target);
                    out.push(ExportEntry {
                        name: export,
                        description,
                    });
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn open(&self, name: &str) -> Result<Option<Export>> {
        let found = match name.is_empty() {
            true => self.default_export()?,
            false => self.resolve(name)?.map(|target| (name.to_string(), target)),
        };
        let Some((canonical, target)) = found else {
            return Ok(None);
        };
        let description = self.describe(&target);
        let (handle, writable) = self.open_target(&target)?;
        let file = match &target {
            Target::Image(file) | Target::Partition(file, _) if writable => Some(Arc::clone(file)),
            _ => None,
        };
        let mut export = Export::new(canonical, description, writable, Box::new(handle));
        export.closed = file.map(|f| (Arc::clone(&self.catalog), f));
        Ok(Some(export))
    }

    fn exists(&self, name: &str) -> bool {
        matches!(self.resolve(name), Ok(Some(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_blocks_are_powers_of_two_within_nbd_limits() {
        assert_eq!(preferred_block(65536), 65536);
        assert_eq!(preferred_block(1), 512);
        assert_eq!(preferred_block(256 << 10), 256 << 10);
        assert_eq!(preferred_block(1 << 20), 256 << 10);
        assert_eq!(preferred_block(256 << 20), 256 << 10);
        assert_eq!(preferred_block(3000), 2048);
    }
}
