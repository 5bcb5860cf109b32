//! LUKS1 containers (QEMU's `luks` format, `cryptsetup luksFormat --type luks1`): the disk is
//! the payload after the LUKS header and its key slots, encrypted per 512-byte sector with IVs
//! numbered from the payload's start, as dm-crypt and QEMU number them. The key comes from the
//! passphrases given to the daemon (`meta::keyring`). Nothing but the payload is ever written:
//! there is no metadata to keep. Discard is refused as QEMU refuses it (a hole would decrypt to
//! noise, and zeros would give no space back); LUKS2 headers are refused by name.

use crate::error::{Error, Result};
use crate::format::encrypted::DataCipher;
use crate::host::HostFile;
use crate::image::{check_range, Extent, ExtentState, Image, ImageInfo};
use crate::meta::crypt::LuksHeader;
use crate::meta::keyring;

const SECTOR: u64 = 512;

/// An open LUKS1 container.
pub struct LuksImage {
    file: HostFile,
    cipher: DataCipher,
    /// Where the payload starts in the file, in bytes.
    payload: u64,
    /// The payload's whole sectors.
    size: u64,
    header: String,
    read_only_reason: Option<String>,
}

impl LuksImage {
    pub fn open(file: HostFile, read_only_reason: Option<String>) -> Result<Self> {
        let path = file.path().to_path_buf();
        Self::open_inner(file, read_only_reason).map_err(|e| e.with_path(&path))
    }

    fn open_inner(file: HostFile, read_only_reason: Option<String>) -> Result<Self> {
        let len = file.len()?;
        if len < LuksHeader::LEN as u64 {
            return Err(Error::corrupt(format!(
                "the file is {len} bytes long, shorter than a LUKS header"
            )));
        }
        let mut head = vec![0u8; LuksHeader::LEN];
        file.read_exact_at(&mut head, 0)?;
        let luks = LuksHeader::parse(&head)?;
        luks.check_supported()?;
        let payload = luks.payload_offset() * SECTOR;
        if luks.span()? > payload || payload > len {
            return Err(Error::corrupt(format!(
                "the LUKS payload offset {payload:#x} lies inside the key slots or past the \
                 end of the {len}-byte file"
            )));
        }
        let key = keyring::luks_key(&head, &luks, &mut |at, buf| file.read_exact_at(buf, at));
        Ok(LuksImage {
            size: (len - payload) / SECTOR * SECTOR,
            cipher: DataCipher::or_locked(key.map(DataCipher::luks_payload), "LUKS")?,
            payload,
            header: luks.describe(),
            file,
            read_only_reason,
        })
    }
}

impl Image for LuksImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(self.size, offset, buf.len())?;
        self.cipher
            .read(&self.file, buf, self.payload + offset, offset)
            .map_err(|e| e.with_path(self.file.path()))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        if let Some(reason) = &self.read_only_reason {
            return Err(Error::read_only(reason.clone()));
        }
        check_range(self.size, offset, buf.len())?;
        self.cipher
            .write(&self.file, buf, self.payload + offset, offset)
            .map_err(|e| e.with_path(self.file.path()))
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

    /// Every sector holds data: what reads as zeros cannot be told without decrypting it.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let end = offset.saturating_add(len).min(self.size);
        Ok((end > offset)
            .then(|| Extent {
                offset,
                len: end - offset,
                state: ExtentState::Data,
                layer: 0,
                host: None,
            })
            .into_iter()
            .collect())
    }

    fn allocated_bytes(&self) -> u64 {
        self.file.allocated_bytes()
    }

    fn read_only_reason(&self) -> Option<String> {
        self.read_only_reason.clone()
    }

    fn info(&self) -> ImageInfo {
        ImageInfo {
            format: "luks",
            subformat: String::new(),
            virtual_size: self.size,
            cluster_size: None,
            allocated_bytes: self.allocated_bytes(),
            read_only_reason: self.read_only_reason.clone(),
            details: vec![
                ("encryption", self.cipher.describe()),
                ("header", self.header.clone()),
                ("payload offset", self.payload.to_string()),
            ],
        }
    }
}

#[cfg(test)]
mod tests;
