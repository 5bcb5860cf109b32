//! The hashes LUKS names (for PBKDF2, the anti-forensic splitter and ESSIV) and the LUKS1
//! anti-forensic merge that turns a key slot's decrypted stripes back into the master key, as
//! QEMU's crypto/afsplit.c (itself from cryptsetup's lib/luks1/af.c) does it.

use std::num::NonZeroU32;

use ring::{digest, pbkdf2};

use crate::error::{Error, Result};

/// A hash a LUKS1 header may name in `hash_spec` or after `essiv:`.
///
/// QEMU also accepts md5, sha224, ripemd160 and sm3 there; ring implements none of them, and
/// neither QEMU nor cryptsetup writes them by default, so they are reported as unsupported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hash {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    /// The hash a header names (QEMU's QAPI enum spelling, which is also cryptsetup's).
    pub(crate) fn from_name(name: &str) -> Option<Hash> {
        match name {
            "sha1" => Some(Hash::Sha1),
            "sha256" => Some(Hash::Sha256),
            "sha384" => Some(Hash::Sha384),
            "sha512" => Some(Hash::Sha512),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Hash::Sha1 => "sha1",
            Hash::Sha256 => "sha256",
            Hash::Sha384 => "sha384",
            Hash::Sha512 => "sha512",
        }
    }

    /// The digest length in bytes.
    pub(crate) fn len(self) -> usize {
        self.digest_algorithm().output_len()
    }

    fn digest_algorithm(self) -> &'static digest::Algorithm {
        match self {
            // LUKS1 with SHA-1 is legacy, which is exactly what this is for.
            Hash::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Hash::Sha256 => &digest::SHA256,
            Hash::Sha384 => &digest::SHA384,
            Hash::Sha512 => &digest::SHA512,
        }
    }

    fn pbkdf2_algorithm(self) -> pbkdf2::Algorithm {
        match self {
            Hash::Sha1 => pbkdf2::PBKDF2_HMAC_SHA1,
            Hash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            Hash::Sha384 => pbkdf2::PBKDF2_HMAC_SHA384,
            Hash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }

    /// The digest of the concatenation of `parts`.
    pub(crate) fn digest(self, parts: &[&[u8]]) -> digest::Digest {
        let mut ctx = digest::Context::new(self.digest_algorithm());
        for part in parts {
            ctx.update(part);
        }
        ctx.finish()
    }

    /// PBKDF2-HMAC with this hash, filling `out`. `what` names the iteration count's field for
    /// the error a zero count gives (PBKDF2 is undefined for it; QEMU refuses it too).
    ///
    /// The count comes from the header and may be anything up to 2^32 - 1: a hostile header can
    /// make this run for a long time (about an hour per key slot at 4 billion SHA-256
    /// iterations), just as it can for QEMU and cryptsetup. It is not capped, because real
    /// headers legitimately use millions of iterations and no cap would be both safe and
    /// compatible; the cost is bounded, and no memory grows with it.
    pub(crate) fn pbkdf2(
        self,
        secret: &[u8],
        salt: &[u8],
        iterations: u32,
        what: &str,
        out: &mut [u8],
    ) -> Result<()> {
        let iterations =
            NonZeroU32::new(iterations).ok_or_else(|| Error::corrupt(format!("{what} is zero")))?;
        pbkdf2::derive(self.pbkdf2_algorithm(), iterations, salt, secret, out);
        Ok(())
    }

    /// Replaces `block` by its diffusion: each digest-sized piece `i` becomes
    /// H(be32(i) || piece), the last piece truncated to its length (afsplit.c's
    /// `qcrypto_afsplit_hash`).
    fn diffuse(self, block: &mut [u8]) -> Result<()> {
        for (i, piece) in block.chunks_mut(self.len()).enumerate() {
            let index =
                u32::try_from(i).map_err(|_| Error::unsupported("anti-forensic block too long"))?;
            let hashed = self.digest(&[&index.to_be_bytes(), piece]);
            // Pieces are at most a digest long, so the zip covers the whole piece.
            for (byte, h) in piece.iter_mut().zip(hashed.as_ref()) {
                *byte = *h;
            }
        }
        Ok(())
    }
}

/// Recovers the `key_bytes`-long key from `material`, its `stripes` anti-forensic stripes:
/// d = 0; for each stripe but the last, d = diffuse(d xor stripe); key = d xor last stripe.
pub(crate) fn merge(
    hash: Hash,
    material: &[u8],
    key_bytes: usize,
    stripes: usize,
) -> Result<Vec<u8>> {
    let expected = key_bytes.checked_mul(stripes);
    if key_bytes == 0 || stripes == 0 || expected != Some(material.len()) {
        return Err(Error::corrupt(format!(
            "{} bytes of key material are not {stripes} stripes of {key_bytes} bytes",
            material.len()
        )));
    }
    let mut block = vec![0u8; key_bytes];
    let mut stripe_iter = material.chunks_exact(key_bytes);
    for _ in 1..stripes {
        if let Some(stripe) = stripe_iter.next() {
            xor_into(&mut block, stripe);
            hash.diffuse(&mut block)?;
        }
    }
    if let Some(last) = stripe_iter.next() {
        xor_into(&mut block, last);
    }
    Ok(block)
}

/// The inverse of `merge` for tests: splits `key` into `stripes` stripes, the first ones taken
/// from `random` (a deterministic stand-in for QEMU's random bytes).
#[cfg(test)]
pub(crate) fn split(
    hash: Hash,
    key: &[u8],
    stripes: usize,
    random: &mut dyn FnMut() -> u8,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() * stripes);
    let mut block = vec![0u8; key.len()];
    for _ in 1..stripes {
        let stripe: Vec<u8> = (0..key.len()).map(|_| random()).collect();
        xor_into(&mut block, &stripe);
        hash.diffuse(&mut block).unwrap();
        out.extend_from_slice(&stripe);
    }
    xor_into(&mut block, key);
    out.extend_from_slice(&block);
    out
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

/// Overwrites key material before its buffer is freed (best effort: it keeps keys from lingering
/// in freed heap memory, not from copies the compiler or allocator made).
pub(crate) fn wipe(buf: &mut [u8]) {
    buf.fill(0);
    std::hint::black_box(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::hex;

    #[test]
    fn pbkdf2_matches_rfc6070_and_rfc7914() {
        // RFC 6070 test vector 2 (HMAC-SHA1, 2 iterations).
        let mut out = [0u8; 20];
        Hash::Sha1
            .pbkdf2(b"password", b"salt", 2, "iterations", &mut out)
            .unwrap();
        assert_eq!(
            out.to_vec(),
            hex("ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957")
        );
        // RFC 7914 section 11 (HMAC-SHA256, 1 iteration, 64 bytes: more than one digest).
        let mut out = [0u8; 64];
        Hash::Sha256
            .pbkdf2(b"passwd", b"salt", 1, "iterations", &mut out)
            .unwrap();
        assert_eq!(
            out.to_vec(),
            hex(concat!(
                "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc",
                "49ca9cccf179b645991664b39d77ef317c71b845b1e30bd509112041d3a19783"
            ))
        );
        let e = Hash::Sha256
            .pbkdf2(b"p", b"s", 0, "key slot 2 iterations", &mut out)
            .unwrap_err();
        assert!(
            e.to_string().contains("key slot 2 iterations is zero"),
            "{e}"
        );
    }

    #[test]
    fn merge_inverts_split_for_every_hash_and_odd_lengths() {
        let mut state = 7u8;
        let mut random = || {
            state = state.wrapping_mul(73).wrapping_add(41);
            state
        };
        for hash in [Hash::Sha1, Hash::Sha256, Hash::Sha384, Hash::Sha512] {
            // 20, 24 and 64 bytes: shorter than, not a multiple of, and a multiple of a digest.
            for key_len in [16, 20, 24, 32, 48, 64] {
                let key: Vec<u8> = (0..key_len as u8).collect();
                let material = split(hash, &key, 37, &mut random);
                assert_eq!(merge(hash, &material, key_len, 37).unwrap(), key);
            }
        }
        // One stripe is the key itself.
        assert_eq!(
            merge(Hash::Sha256, b"0123456789abcdef", 16, 1).unwrap(),
            b"0123456789abcdef"
        );
    }

    #[test]
    fn merge_refuses_mismatched_lengths() {
        assert!(merge(Hash::Sha1, &[0; 64], 16, 3).is_err());
        assert!(merge(Hash::Sha1, &[], 0, 3).is_err());
        assert!(merge(Hash::Sha1, &[], 16, 0).is_err());
        assert!(merge(Hash::Sha1, &[0; 16], usize::MAX, 2).is_err());
    }

    #[test]
    fn diffusion_hashes_each_piece_with_its_big_endian_index() {
        // 40 bytes with SHA-1: a full 20-byte piece 0 and piece 1, index in front of each.
        let mut block = [0xabu8; 40];
        Hash::Sha1.diffuse(&mut block).unwrap();
        let piece0 = Hash::Sha1.digest(&[&[0, 0, 0, 0], &[0xab; 20]]);
        let piece1 = Hash::Sha1.digest(&[&[0, 0, 0, 1], &[0xab; 20]]);
        assert_eq!(&block[..20], piece0.as_ref());
        assert_eq!(&block[20..], piece1.as_ref());
        // 24 bytes: the last piece is 4 bytes, hashed and copied as 4 bytes.
        let mut block = [0xabu8; 24];
        Hash::Sha1.diffuse(&mut block).unwrap();
        let last = Hash::Sha1.digest(&[&[0, 0, 0, 1], &[0xab; 4]]);
        assert_eq!(&block[20..], &last.as_ref()[..4]);
    }
}
