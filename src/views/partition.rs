//! One partition of a disk as an image of its own: a window of `len` bytes at `start`, reads,
//! writes and block status shifted into it and kept inside it. It shares the disk's instance
//! (its caches, its locks, its write-back), so a partition file and the whole-disk file see the
//! same bytes at once.

use std::sync::Arc;

use crate::error::Result;
use crate::image::{check_range, check_span, Extent, Image, ImageInfo};

pub struct PartitionView {
    disk: Arc<dyn Image>,
    start: u64,
    len: u64,
}

impl PartitionView {
    /// The window `[start, start + len)` of `disk`, which the caller checked lies inside it.
    pub fn new(disk: Arc<dyn Image>, start: u64, len: u64) -> Self {
        PartitionView { disk, start, len }
    }
}

impl Image for PartitionView {
    fn size(&self) -> u64 {
        self.len
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len())?;
        self.disk.read_at(buf, self.start + offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(self.len, offset, buf.len())?;
        self.disk.write_at(buf, self.start + offset)
    }

    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }

    fn is_dirty(&self) -> bool {
        self.disk.is_dirty()
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let len = len.min(self.len.saturating_sub(offset));
        let extents = self.disk.block_status(self.start + offset, len)?;
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset - self.start,
                ..e
            })
            .collect())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_span(self.len, offset, len)?;
        self.disk.discard(self.start + offset, len)
    }

    /// The disk's, at most the partition's size (exact per-partition counts would walk the
    /// block map).
    fn allocated_bytes(&self) -> u64 {
        self.disk.allocated_bytes().min(self.len)
    }

    fn read_only_reason(&self) -> Option<String> {
        self.disk.read_only_reason()
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            virtual_size: self.len,
            ..self.disk.info()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ExtentState;
    use crate::testutil::MemImage;

    #[test]
    fn a_partition_is_a_shifted_window_of_its_disk() {
        let disk: Arc<dyn Image> = Arc::new(MemImage::new(64 * 1024, None));
        let part = PartitionView::new(disk.clone(), 8192, 16384);
        part.write_at(b"inside", 100).unwrap();
        let mut buf = [0u8; 6];
        disk.read_at(&mut buf, 8292).unwrap();
        assert_eq!(&buf, b"inside");
        assert!(part.write_at(b"x", 16384).is_err(), "past its end");
        assert!(part.read_at(&mut buf, u64::MAX - 2).is_err());
        let extents = part.block_status(0, 16384).unwrap();
        assert_eq!(extents[0].offset, 0);
        assert_eq!(extents[0].state, ExtentState::Data);
        let last = extents.last().unwrap();
        assert_eq!(last.offset + last.len, 16384);
        assert_eq!(part.size(), 16384);
    }
}
