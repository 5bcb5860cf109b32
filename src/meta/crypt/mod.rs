//! Encryption of image data as QEMU does it: the legacy qcow/qcow2 "AES" method
//! (crypto/block-qcow.c) and LUKS1 (crypto/block-luks.c, standalone or inside qcow2), both
//! ending in a `SectorCipher` that decrypts and encrypts 512-byte sectors.
//!
//! Sector numbers are the caller's business and differ by container (QEMU block/qcow2.c
//! `crypt_physical_offset`): the legacy AES method numbers sectors by guest offset / 512, qcow2
//! LUKS by host offset in the image file / 512, and a standalone LUKS file by offset from the
//! payload start / 512.

mod af;
mod cipher;
mod luks;
#[cfg(test)]
mod tests;

pub use cipher::SectorCipher;
pub use luks::{limit_iterations, LuksHeader};

use crate::error::{Error, Result};
use cipher::{IvGen, Mode, Spec};

/// The passphrase QEMU actually uses: it takes secrets as C strings (`strlen`), so anything
/// from the first NUL byte on is ignored. QEMU also refuses secrets that are not UTF-8; that
/// refusal is not reproduced, since it only ever turns away a passphrase and never changes a key.
fn passphrase_bytes(passphrase: &[u8]) -> &[u8] {
    match passphrase.iter().position(|&b| b == 0) {
        Some(nul) => &passphrase[..nul],
        None => passphrase,
    }
}

/// The legacy qcow/qcow2 "AES" method (crypt_method 1): AES-128-CBC, IV plain64 of the sector
/// number (guest offset / 512), and as key the passphrase's first 16 bytes, zero-padded.
///
/// As in QEMU's crypto/block-qcow.c: a longer passphrase is silently truncated to 16 bytes, an
/// empty one gives the all-zero key (QEMU accepts it), and the passphrase ends at a NUL byte.
/// No passphrase is ever wrong: the method has no check value, so a wrong one decrypts to
/// garbage. The result is a `Result` only for symmetry with `LuksHeader::unlock`.
pub fn qcow_aes(passphrase: &[u8]) -> Result<SectorCipher> {
    let mut key = [0u8; 16];
    let passphrase = passphrase_bytes(passphrase);
    for (k, p) in key.iter_mut().zip(passphrase) {
        *k = *p;
    }
    let spec = Spec::new(16, Mode::Cbc, IvGen::Plain64).map_err(Error::unsupported)?;
    let cipher = SectorCipher::new(spec, &key);
    af::wipe(&mut key);
    cipher
}
