//! The data clusters of a qcow image encrypted with the legacy AES method (crypt_method 1):
//! read and written through the image's cipher (`format::encrypted`), as QEMU's qcow driver
//! does, with each sector's IV its guest offset.

use crate::error::Result;
use crate::format::encrypted::DataCipher;

use super::header::QcowHeader;
use super::QcowImage;

/// The cipher of the image with `header`, `None` for one that is not encrypted.
pub(super) fn data_cipher(header: &QcowHeader) -> Result<Option<DataCipher>> {
    header
        .encrypted
        .then(|| DataCipher::or_locked(DataCipher::legacy_aes(), "AES (legacy)"))
        .transpose()
}

impl QcowImage {
    /// Reads guest bytes at `guest` from host offset `host`, decrypting them if need be.
    pub(super) fn read_data(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        match &self.cipher {
            Some(cipher) => cipher.read(&self.file, buf, host, guest),
            None => self.file.read_exact_at(buf, host),
        }
    }

    /// Writes guest bytes at `guest` to host offset `host`, encrypting them if need be.
    pub(super) fn write_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        match &self.cipher {
            Some(cipher) => cipher.write(&self.file, data, host, guest),
            None => self.file.write_all_at(data, host),
        }
    }

    /// Whether discarded data may be punched out of the file: not when encrypted, where a
    /// hole would decrypt to noise.
    pub(super) fn may_punch(&self) -> bool {
        self.cipher.is_none()
    }
}
