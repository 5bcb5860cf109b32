//! The directories the catalog shows beside an image: `x.snapshots/` (its internal snapshots,
//! read-only) and `x.parts/` (the partitions of its disk, read-write, sharing the image's
//! instance), their entries, and handles on them.
//!
//! A disk's partition table is read with the image's summary and read again whenever this
//! process has written to the image since (fdisk through the raw file), through the open
//! instance or an inspecting open; a table that cannot be trusted is logged and not served,
//! while the disk itself is.

use std::ffi::OsStr;
use std::sync::Arc;

use super::served::ImageHandle;
use super::summary::{inspect, partitions_of};
use super::{
    with_suffix, Catalog, Entry, ImageFile, Target, NAME_MAX, PARTS_SUFFIX, RAW_SUFFIX,
    SNAPSHOTS_SUFFIX,
};
use crate::error::{Error, ErrorKind, Result};
use crate::host::activity::own_writes;
use crate::views::{Partition, PartitionTable, PartitionView};

/// The snapshots of `image` as entries of its snapshots directory.
pub fn snapshot_entries(image: &Arc<ImageFile>) -> Vec<Entry> {
    image
        .summary
        .snapshots
        .iter()
        .map(|snapshot| Entry {
            name: with_suffix(OsStr::new(&snapshot.name), RAW_SUFFIX),
            target: Target::Snapshot(Arc::clone(image), snapshot.name.clone()),
        })
        .collect()
}

/// The entry called `name` (`<snapshot>.raw`) of `image`'s snapshots directory.
pub fn snapshot_entry(image: &Arc<ImageFile>, name: &OsStr) -> Option<Entry> {
    let snapshot = name.to_str()?.strip_suffix(RAW_SUFFIX)?;
    let found = image.summary.snapshot(snapshot)?;
    Some(Entry {
        name: name.to_os_string(),
        target: Target::Snapshot(Arc::clone(image), found.name.clone()),
    })
}

/// The file name of partition `number` in a parts directory.
fn partition_name(number: u32) -> String {
    format!("p{number}{RAW_SUFFIX}")
}

impl Catalog {
    /// The directories shown beside image `name`: its snapshots and its partitions, where it has
    /// any (and the name fits).
    pub(super) fn beside(&self, name: &OsStr, image: &Arc<ImageFile>) -> Vec<Entry> {
        let mut dirs = Vec::new();
        if !image.summary.snapshots.is_empty() {
            dirs.push(Entry {
                name: with_suffix(name, SNAPSHOTS_SUFFIX),
                target: Target::SnapshotsDir(Arc::clone(image)),
            });
        }
        if self
            .partitions(image)
            .is_some_and(|t| !t.partitions.is_empty())
        {
            dirs.push(Entry {
                name: with_suffix(name, PARTS_SUFFIX),
                target: Target::PartsDir(Arc::clone(image)),
            });
        }
        dirs.retain(|d| d.name.len() <= NAME_MAX);
        dirs
    }

    /// The partitions of `image` as entries of its parts directory.
    pub(super) fn partition_entries(&self, image: &Arc<ImageFile>) -> Vec<Entry> {
        let Some(table) = self.partitions(image) else {
            return Vec::new();
        };
        table
            .partitions
            .iter()
            .map(|p| Entry {
                name: partition_name(p.number).into(),
                target: Target::Partition(Arc::clone(image), p.number),
            })
            .collect()
    }

    /// The partition table of `image`'s disk, read again if this process wrote to the image
    /// since it was last read.
    pub fn partitions(&self, image: &ImageFile) -> Option<Arc<PartitionTable>> {
        if let Some(dir) = &self.overlay_dir {
            // Written into its overlay, not the file: read through the overlay view each time.
            let (overlay, _) = super::overlay::overlay_paths(dir, &image.rel);
            let view = self.state().overlays.get(&image.id).cloned();
            if view.is_some() || overlay.exists() {
                let disk = match view {
                    Some(view) => view,
                    None => Arc::clone(self.open_overlaid_for_reading(image)?.served()),
                };
                return crate::views::read_table(disk.as_ref())
                    .ok()
                    .flatten()
                    .map(Arc::new);
            }
        }
        let writes = own_writes(image.id).started;
        let (read_at, known) = image.partitions();
        if read_at == writes {
            return known.ok().flatten();
        }
        let live = self.state().live.get(&image.id).cloned();
        let fresh = match live {
            Some(served) => partitions_of(served.as_ref(), &image.source),
            None => {
                let opened = inspect(
                    self.opener.as_ref(),
                    &self.root,
                    &image.source,
                    image.summary.format,
                );
                match opened {
                    Ok((disk, _)) => partitions_of(disk.as_ref(), &image.source),
                    Err(e) => {
                        log::warn!("cannot read the partition table again: {e}");
                        return known.ok().flatten();
                    }
                }
            }
        };
        image.set_partitions(writes, fresh.clone());
        fresh.ok().flatten()
    }

    /// Partition `number` of `image`'s disk, as the table says now.
    pub fn partition(&self, image: &ImageFile, number: u32) -> Option<Partition> {
        self.partitions(image)?
            .partitions
            .iter()
            .find(|p| p.number == number)
            .cloned()
    }

    /// A read-only handle on internal snapshot `name` of `image`.
    pub fn open_snapshot(&self, image: &Arc<ImageFile>, name: &str) -> Result<ImageHandle> {
        let base = self.open(image, false)?;
        let view = base
            .served()
            .snapshot_view(name)
            .map_err(|e| e.with_path(&image.source))?;
        Ok(base.served().handle(false, Some(view)))
    }

    /// A handle on partition `number` of `image`'s disk, sharing the image's instance.
    pub fn open_partition(
        &self,
        image: &Arc<ImageFile>,
        number: u32,
        write: bool,
    ) -> Result<ImageHandle> {
        let disk = self.open(image, write)?;
        let part = self.partition(image, number).ok_or_else(|| {
            Error::new(
                ErrorKind::Stale,
                format!("the disk has no partition {number} any more"),
            )
            .with_path(&image.source)
        })?;
        let served: Arc<dyn crate::image::Image> = disk.served().clone();
        let view = PartitionView::new(served, part.start, part.len);
        Ok(disk.served().handle(write, Some(Arc::new(view))))
    }
}
