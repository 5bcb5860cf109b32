//! Raw files as backing files (`qemu-img create -b base.raw -F raw`): the file is the disk.
//! Raw files are never served on their own (they carry no magic to recognise them by), and as
//! backing files they are only read.

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::image::{check_range, Extent, ExtentState, Image, ImageInfo};

/// A raw file opened read-only as the bottom of a backing chain.
pub struct RawImage {
    file: HostFile,
    size: u64,
    read_only_reason: String,
}

impl RawImage {
    pub fn open(file: HostFile, read_only_reason: String) -> Result<Self> {
        let size = file.len()?;
        Ok(RawImage {
            file,
            size,
            read_only_reason,
        })
    }
}

impl Image for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len())?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only(self.read_only_reason.clone()))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn is_dirty(&self) -> bool {
        false
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        if end <= offset {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            offset,
            len: end - offset,
            state: ExtentState::Data,
            layer: 0,
            host: Some(offset),
        }])
    }

    fn allocated_bytes(&self) -> u64 {
        self.file
            .metadata()
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m).saturating_mul(512))
            .unwrap_or(self.size)
    }

    fn read_only_reason(&self) -> Option<String> {
        Some(self.read_only_reason.clone())
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "raw",
            subformat: String::new(),
            virtual_size: self.size,
            cluster_size: None,
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: Some(self.read_only_reason.clone()),
            details: Vec::new(),
        }
    }
}
