//! The key of an encrypted qcow2 image: for LUKS, from the LUKS header in the image file that
//! the crypto header extension names; for the legacy AES method, the passphrase itself.

use crate::error::{Error, Result};
use crate::format::encrypted::DataCipher;
use crate::host::HostFile;
use crate::meta::crypt::LuksHeader;
use crate::meta::keyring;

use super::header::{Encryption, Qcow2Header};

/// The cipher of the image in `file` with `header`, `None` for an image that is not encrypted.
pub(super) fn data_cipher(file: &HostFile, header: &Qcow2Header) -> Result<Option<DataCipher>> {
    match header.encryption {
        Encryption::None => Ok(None),
        _ if header.has_data_file() => Err(Error::unsupported(
            "an encrypted image with an external data file",
        )),
        Encryption::Aes => {
            DataCipher::or_locked(DataCipher::legacy_aes(), "AES (legacy)").map(Some)
        }
        Encryption::Luks => DataCipher::or_locked(open_luks(file, header), "LUKS").map(Some),
    }
}

fn open_luks(file: &HostFile, header: &Qcow2Header) -> Result<DataCipher> {
    let Some((offset, length)) = header.crypto_header else {
        return Err(Error::corrupt(
            "the image is encrypted with LUKS but has no crypto header extension",
        ));
    };
    let file_len = file.len()?;
    let end = offset.checked_add(length).filter(|&end| end <= file_len);
    if offset % header.cluster_size() != 0 || end.is_none() || length < LuksHeader::LEN as u64 {
        return Err(Error::corrupt(format!(
            "the LUKS header area ({length} bytes at {offset:#x}) is misplaced or too small"
        )));
    }
    let mut bytes = vec![0u8; LuksHeader::LEN];
    file.read_exact_at(&mut bytes, offset)?;
    let luks = LuksHeader::parse(&bytes).map_err(|e| e.at_offset(offset))?;
    if luks.span()? > length {
        return Err(Error::corrupt(format!(
            "the LUKS key slots reach past the {length}-byte header area at {offset:#x}"
        )));
    }
    // `span` was checked against the area, so `at` stays inside it.
    let key = keyring::luks_key(&bytes, &luks, &mut |at, buf| {
        file.read_exact_at(buf, offset.saturating_add(at))
    })?;
    Ok(DataCipher::luks(key))
}

impl super::Qcow2Image {
    /// Reads guest bytes at `guest` from host offset `host` of the data clusters' file,
    /// decrypting them in an encrypted image.
    pub(super) fn read_data(&self, buf: &mut [u8], host: u64, guest: u64) -> Result<()> {
        match &self.shared.cipher {
            Some(cipher) => cipher.read(self.data_file(), buf, host, guest),
            None => self.data_file().read_exact_at(buf, host),
        }
    }

    /// Writes guest bytes at `guest` to host offset `host` of the data clusters' file,
    /// encrypting them in an encrypted image.
    pub(super) fn write_data(&self, data: &[u8], host: u64, guest: u64) -> Result<()> {
        match &self.shared.cipher {
            Some(cipher) => cipher.write(self.data_file(), data, host, guest),
            None => self.data_file().write_all_at(data, host),
        }
    }
}
