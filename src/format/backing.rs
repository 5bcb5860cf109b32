//! Backing files: the layer below an image in a chain (qcow, qcow2, VMDK parents, VHDX parents).
//! Drivers receive an already opened `Backing` and read through it wherever their own map has
//! nothing; resolving and opening the file is `format::open`'s business, not the driver's.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::Result;
use crate::image::{push_extent, Extent, ExtentState, Image};

/// An opened backing image, served read-only to the image above it.
#[derive(Clone)]
pub struct Backing {
    pub image: Arc<dyn Image>,
    /// The backing file's path in the source tree (shown by `imgfs info`).
    pub path: PathBuf,
}

impl Backing {
    pub fn new(image: Arc<dyn Image>, path: &Path) -> Self {
        Backing {
            image,
            path: path.to_path_buf(),
        }
    }
}

/// Where a driver's open gets a differencing image's parent from: given already opened, or
/// found by a callback from what the child says about it (`R`: its locator or UUIDs).
pub enum ParentSource<'a, R> {
    Given(Option<Backing>),
    Find(&'a mut dyn FnMut(&R) -> Result<Backing>),
}

/// Fills `buf` with what lies below an image at virtual `offset`: the backing image's bytes,
/// zeros where there is no backing image or past its end (a backing file may be shorter than
/// the image above it).
pub fn read_below(backing: Option<&Backing>, buf: &mut [u8], offset: u64) -> Result<()> {
    let Some(backing) = backing else {
        buf.fill(0);
        return Ok(());
    };
    let size = backing.image.size();
    let inside = size.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    if !head.is_empty() {
        backing.image.read_at(head, offset)?;
    }
    tail.fill(0);
    Ok(())
}

/// The block status of `[offset, offset + len)` one layer down, with layer numbers counted from
/// the image above (its backing file is layer 1); `Unallocated` where nothing lies below.
pub fn status_below(backing: Option<&Backing>, offset: u64, len: u64) -> Result<Vec<Extent>> {
    let mut extents = Vec::new();
    let end = offset.saturating_add(len);
    let mut covered = offset;
    if let Some(backing) = backing {
        let inside_end = end.min(backing.image.size());
        if inside_end > offset {
            for extent in backing.image.block_status(offset, inside_end - offset)? {
                covered = extent.offset + extent.len;
                // Nothing allocated anywhere belongs to no layer.
                let layer = match extent.state {
                    ExtentState::Unallocated => 0,
                    _ => extent.layer.saturating_add(1),
                };
                push_extent(&mut extents, Extent { layer, ..extent });
            }
        }
    }
    if covered < end {
        push_extent(
            &mut extents,
            Extent {
                offset: covered,
                len: end - covered,
                state: ExtentState::Unallocated,
                layer: 0,
                host: None,
            },
        );
    }
    Ok(extents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MemImage;

    /// A 10-byte backing image holding 7s, all of it allocated.
    fn backing_of_sevens() -> Backing {
        let image = MemImage::new(10, None);
        image.write_at(&[7u8; 10], 0).unwrap();
        Backing::new(Arc::new(image), Path::new("base.img"))
    }

    #[test]
    fn read_below_zero_fills_past_the_backing_end_and_without_backing() {
        let backing = backing_of_sevens();
        let mut buf = [1u8; 8];
        read_below(Some(&backing), &mut buf, 6).unwrap();
        assert_eq!(buf, [7, 7, 7, 7, 0, 0, 0, 0]);
        let mut buf = [1u8; 4];
        read_below(Some(&backing), &mut buf, 100).unwrap();
        assert_eq!(buf, [0; 4]);
        let mut buf = [1u8; 4];
        read_below(None, &mut buf, 0).unwrap();
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn status_below_shifts_layers_and_marks_the_rest_unallocated() {
        let backing = backing_of_sevens();
        let extents = status_below(Some(&backing), 4, 10).unwrap();
        assert_eq!(extents.len(), 2);
        assert_eq!(
            (extents[0].offset, extents[0].len, extents[0].layer),
            (4, 6, 1)
        );
        assert_eq!(extents[0].state, ExtentState::Data);
        assert_eq!(
            (extents[1].offset, extents[1].len, extents[1].state),
            (10, 4, ExtentState::Unallocated)
        );
        let none = status_below(None, 0, 5).unwrap();
        assert_eq!(none.len(), 1);
        assert_eq!(none[0].state, ExtentState::Unallocated);
    }
}
