//! Raw files: the file is the disk. As backing files (`qemu-img create -b base.raw -F raw`),
//! and served on their own only when named as the source of a mount or NBD server (they carry
//! no magic to recognise them by in a tree): a `dd` image's partitions as files, read-write,
//! without root. Writes go to the file in place; a discard punches the host range; growing
//! extends the file. Holes of the file read as zeros and say so in block status.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::host_holes::push_stored;
use crate::host::HostFile;
use crate::image::{check_range, check_resize, check_span, Extent, Image, ImageInfo};

/// A raw file; writable unless opened with a reason not to be.
pub struct RawImage {
    file: Arc<HostFile>,
    /// The disk's size: the file's length, followed on a resize.
    size: std::sync::atomic::AtomicU64,
    read_only_reason: Option<String>,
}

impl RawImage {
    pub fn open(file: HostFile, read_only_reason: Option<String>) -> Result<Self> {
        let size = file.len()?;
        Ok(RawImage {
            file: Arc::new(file),
            size: size.into(),
            read_only_reason,
        })
    }

    fn refuse_writes(&self) -> Result<()> {
        match &self.read_only_reason {
            Some(reason) => Err(Error::read_only(reason.clone())),
            None => Ok(()),
        }
    }
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size(), offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.refuse_writes()?;
        check_range(self.size(), offset, buf.len())?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> Result<()> {
        match self.read_only_reason {
            Some(_) => Ok(()),
            None => self.file.sync_data(),
        }
    }

    fn is_dirty(&self) -> bool {
        false
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size());
        let mut extents = Vec::new();
        if end > offset {
            push_stored(&mut extents, &self.file, offset, offset, end - offset)?;
        }
        Ok(extents)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.refuse_writes()?;
        check_span(self.size(), offset, len)?;
        self.file.punch_hole(offset, len)?;
        // As for every format: what was punched is durable before the next write lands.
        self.file.sync_data()
    }

    fn resize(&self, new_size: u64) -> Result<()> {
        if !check_resize(&self.read_only_reason, self.size(), new_size, 512, "raw")? {
            return Ok(());
        }
        self.file.set_len(new_size)?;
        self.file.sync_data()?;
        self.size
            .store(new_size, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    fn allocated_bytes(&self) -> u64 {
        self.file.allocated_bytes()
    }

    fn read_only_reason(&self) -> Option<String> {
        self.read_only_reason.clone()
    }

    fn raw_file(&self) -> Option<Arc<HostFile>> {
        Some(Arc::clone(&self.file))
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw",
            subformat: String::new(),
            virtual_size: self.size(),
            cluster_size: None,
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason.clone(),
            details: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::ExtentState;
    use crate::testutil::TempDir;

    fn raw(dir: &TempDir, len: u64, reason: Option<&str>) -> RawImage {
        let path = dir.path().join("disk.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(len).unwrap();
        let host = HostFile::open(&path, reason.is_none()).unwrap();
        RawImage::open(host, reason.map(str::to_string)).unwrap()
    }

    #[test]
    fn writes_discards_and_growth_go_to_the_file() {
        let dir = TempDir::new();
        let image = raw(&dir, 1 << 20, None);
        image.write_at(&[7; 5000], 3000).unwrap();
        let mut back = vec![0u8; 5000];
        image.read_at(&mut back, 3000).unwrap();
        assert_eq!(back, [7; 5000]);
        image.flush().unwrap();
        let status = image.block_status(0, 1 << 20).unwrap();
        assert!(status
            .iter()
            .any(|e| e.state == ExtentState::Data && e.offset <= 4096));
        assert_eq!(status.last().map(|e| e.offset + e.len), Some(1 << 20));

        image.discard(0, 64 << 10).unwrap();
        image.read_at(&mut back, 3000).unwrap();
        assert_eq!(back, [0; 5000]);
        let status = image.block_status(0, 1 << 20).unwrap();
        assert!(status.iter().all(|e| e.state != ExtentState::Data));

        image.resize(2 << 20).unwrap();
        assert_eq!(image.size(), 2 << 20);
        assert_eq!(
            std::fs::metadata(dir.path().join("disk.img"))
                .unwrap()
                .len(),
            2 << 20
        );
        let err = image.write_at(&[1], 2 << 20).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::OutOfRange);
        assert!(image.resize(1 << 20).is_err(), "no shrinking");
    }

    #[test]
    fn a_raw_file_opened_with_a_reason_is_only_read() {
        let dir = TempDir::new();
        let image = raw(&dir, 1 << 20, Some("it is the backing file of top.qcow2"));
        for err in [
            image.write_at(&[1], 0).unwrap_err(),
            image.discard(0, 4096).unwrap_err(),
            image.resize(2 << 20).unwrap_err(),
        ] {
            assert_eq!(err.kind(), crate::error::ErrorKind::ReadOnly, "{err}");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("disk.img"))
                .unwrap()
                .len(),
            1 << 20
        );
    }
}
