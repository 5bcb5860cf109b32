//! The data of encrypted qcow and qcow2 images: 512-byte sectors encrypted as QEMU does, with
//! LUKS (each sector's IV is its offset in the image file) or the legacy AES method (the
//! passphrase is the key, the IV is the guest offset). Metadata is never encrypted. Keys come
//! from the passphrases given to the daemon (`meta::keyring`).

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::crypt::{qcow_aes, SectorCipher};
use crate::meta::keyring;

const SECTOR: u64 = 512;

/// Why an encrypted image is served read-only.
pub const ENCRYPTED_REASON: &str = "encrypted images are served read-only";

/// The cipher of an encrypted image's data clusters.
pub struct DataCipher {
    cipher: Arc<SectorCipher>,
    /// The IV is the sector's offset in the image file (LUKS), not on the guest disk (AES).
    physical: bool,
}

impl DataCipher {
    /// The cipher of a LUKS image, whose key the LUKS header gave.
    pub fn luks(cipher: Arc<SectorCipher>) -> Self {
        DataCipher {
            cipher,
            physical: true,
        }
    }

    /// The cipher of the legacy AES method, keyed by the first passphrase given: the method
    /// has nothing to check a passphrase against, and QEMU takes the one secret it is given.
    pub fn legacy_aes() -> Result<Self> {
        let Some(passphrase) = keyring::passphrases().into_iter().next() else {
            return Err(Error::unsupported(
                "the image is encrypted (AES): give its passphrase with --key-file",
            ));
        };
        Ok(DataCipher {
            cipher: Arc::new(qcow_aes(&passphrase)?),
            physical: false,
        })
    }

    /// e.g. "LUKS, aes-256-xts-plain64", for `imgfs info`.
    pub fn describe(&self) -> String {
        match self.physical {
            true => format!("LUKS, {}", self.cipher.describe()),
            false => format!("AES (legacy), {}", self.cipher.describe()),
        }
    }

    /// Reads `part`, the guest bytes at `guest_offset`, from `host_offset` of `file`, where
    /// they lie encrypted: the whole sectors around them are read and decrypted.
    pub fn read(
        &self,
        file: &HostFile,
        part: &mut [u8],
        host_offset: u64,
        guest_offset: u64,
    ) -> Result<()> {
        let lead = host_offset % SECTOR;
        if guest_offset % SECTOR != lead {
            return Err(Error::out_of_range(format!(
                "internal: guest offset {guest_offset:#x} and host offset {host_offset:#x} \
                 lie differently in their sectors"
            )));
        }
        let start = host_offset - lead;
        let len = (lead + part.len() as u64).div_ceil(SECTOR) * SECTOR;
        let mut sectors = vec![0u8; len as usize];
        file.read_exact_at(&mut sectors, start)?;
        let first = match self.physical {
            true => start / SECTOR,
            false => (guest_offset - lead) / SECTOR,
        };
        self.cipher.decrypt(first, &mut sectors)?;
        let lead = lead as usize;
        part.copy_from_slice(&sectors[lead..lead + part.len()]);
        Ok(())
    }
}
