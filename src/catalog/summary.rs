//! How the catalog opens files: the `Opener` trait (the real one recognises formats by magic;
//! tests use fakes), and summaries: what one version of an image is, read with an inspecting
//! open that takes no locks, writes nothing and keeps no descriptor afterwards.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use super::record::{header_hash, FileId, Partitions, Summary};
use crate::error::{Error, Result};
use crate::format::links::{Chain, Links};
use crate::format::{self, Format, OpenOptions};
use crate::image::Image;

/// Opens files of the source tree as images.
pub trait Opener: Send + Sync {
    /// The format of the file at `path` by its magic, `None` for a file that is not an image.
    fn probe(&self, path: &Path) -> Result<Option<Format>>;

    /// Whether the file, which has `format`'s magic, is only a part of an image described by
    /// another file (a VMDK extent): then it does not appear on its own.
    fn is_part_of_another_image(&self, _path: &Path, _format: Format) -> Result<bool> {
        Ok(false)
    }

    /// Whether another process holds the image open for writing.
    fn held_for_writing(&self, _path: &Path) -> Result<bool> {
        Ok(false)
    }

    /// Opens the image at `path` as `format`; backing files are opened through `links`.
    fn open(
        &self,
        path: &Path,
        format: Format,
        options: &OpenOptions,
        links: &mut dyn Links,
    ) -> Result<Arc<dyn Image>>;

    /// Opens `path` read-only as a backing file of the images in `chain`.
    fn open_backing(
        &self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
        links: &mut dyn Links,
        inspect: bool,
    ) -> Result<Arc<dyn Image>>;
}

/// The real opener: recognises formats by magic and opens them with the format drivers.
pub struct FormatOpener;

impl Opener for FormatOpener {
    fn probe(&self, path: &Path) -> Result<Option<Format>> {
        format::probe_file(path)
    }

    fn is_part_of_another_image(&self, path: &Path, format: Format) -> Result<bool> {
        match format {
            Format::Vmdk => format::is_part_of_another_image(path),
            _ => Ok(false),
        }
    }

    fn held_for_writing(&self, path: &Path) -> Result<bool> {
        format::held_for_writing(path)
    }

    fn open(
        &self,
        path: &Path,
        format: Format,
        options: &OpenOptions,
        links: &mut dyn Links,
    ) -> Result<Arc<dyn Image>> {
        format::open_probed(path, format, options, links)
    }

    fn open_backing(
        &self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
        links: &mut dyn Links,
        inspect: bool,
    ) -> Result<Arc<dyn Image>> {
        format::open_backing_file(path, format, chain, links, inspect)
    }
}

/// What a look at a file found.
pub enum Outcome {
    Image(Summary),
    /// Not an image, or a part of one: not shown, not reported.
    NotImage,
    /// An image that cannot be served.
    Refused(Error),
}

/// Backing files opened for inspection, each recorded as a file below the image.
struct RecordingLinks<'a> {
    root: &'a Path,
    opener: &'a dyn Opener,
    below: Vec<FileId>,
}

impl Links for RecordingLinks<'_> {
    fn root(&self) -> &Path {
        self.root
    }

    fn open_backing(
        &mut self,
        path: &Path,
        format: Option<Format>,
        chain: &Chain,
    ) -> Result<Arc<dyn Image>> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", e).with_path(path))?;
        self.below.push((meta.dev(), meta.ino()));
        let opener = self.opener;
        opener.open_backing(path, format, chain, self, true)
    }
}

/// Opens the image at `path` (as `format`) and its chain for inspection only: no locks, no
/// writes. Returns it with the files below it in its chain.
pub fn inspect(
    opener: &dyn Opener,
    root: &Path,
    path: &Path,
    format: Format,
) -> Result<(Arc<dyn Image>, Vec<FileId>)> {
    let mut links = RecordingLinks {
        root,
        opener,
        below: Vec::new(),
    };
    let options = OpenOptions {
        read_only: true,
        inspect: true,
        reason: None,
    };
    let image = opener.open(path, format, &options, &mut links)?;
    Ok((image, links.below))
}

/// The partition table of the disk `image` (the file at `path`), or why it is not served
/// (logged: the disk itself is served all the same).
pub fn partitions_of(image: &dyn Image, path: &Path) -> Partitions {
    match crate::views::read_table(image) {
        Ok(table) => Ok(table.map(Arc::new)),
        Err(e) => {
            let e = e.with_path(path);
            log::warn!("not serving the partitions of {e}");
            Err(e.to_string())
        }
    }
}

/// Looks at the file at `path`: whether it is an image, and if so what it is and which files
/// it stands on. Opens it (and its chain) for inspection only and closes it again. With
/// `raw_fallback` (the file was named as the source), a file of no format is a raw disk.
pub fn summarize(opener: &dyn Opener, root: &Path, path: &Path, raw_fallback: bool) -> Outcome {
    let format = match opener.probe(path) {
        Ok(Some(format)) => format,
        Ok(None) if raw_fallback => Format::Raw,
        Ok(None) => return Outcome::NotImage,
        Err(e) => return Outcome::Refused(e),
    };
    match opener.is_part_of_another_image(path, format) {
        Ok(true) => return Outcome::NotImage,
        Ok(false) => {}
        Err(e) => return Outcome::Refused(e),
    }
    let (image, below) = match inspect(opener, root, path, format) {
        Ok(opened) => opened,
        Err(e) => return Outcome::Refused(e),
    };
    let mut snapshots = image.snapshot_entries();
    snapshots.sort_unstable_by(|a, b| a.name.cmp(&b.name));
    Outcome::Image(Summary {
        partitions: partitions_of(image.as_ref(), path),
        format,
        size: image.size(),
        allocated: image.allocated_bytes(),
        inherent_read_only: format::inherent_read_only_reason(image.read_only_reason()),
        snapshots,
        below,
        header_hash: header_hash(path),
    })
}
