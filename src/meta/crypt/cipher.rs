//! AES in the sector modes of QEMU's block encryption (XTS, CBC, ECB) with its IV generators
//! (plain, plain64, essiv), applied per 512-byte sector: the `SectorCipher` that encrypted
//! qcow, qcow2 and LUKS data is decrypted and encrypted with.
//!
//! XTS and CBC are implemented here rather than taken from a crate: each is a few lines over the
//! `aes` block cipher, and whole 512-byte sectors never need XTS ciphertext stealing or CBC
//! padding.

use std::fmt;

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};

use super::af::Hash;
use crate::error::{Error, Result};

/// The AES block length in bytes, also the IV length of every mode here.
const BLOCK: usize = 16;
const BLOCKS_PER_SECTOR: usize = SectorCipher::SECTOR / BLOCK;

/// How the blocks of one sector are chained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Every block on its own (no IV): what cryptsetup writes as "ecb".
    Ecb,
    Cbc,
    /// IEEE P1619 XTS: the key is two AES keys, the data key then the tweak key.
    Xts,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Ecb => "ecb",
            Mode::Cbc => "cbc",
            Mode::Xts => "xts",
        }
    }
}

/// How a sector's IV is made from its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IvGen {
    /// The sector number truncated to 32 bits, little-endian, zero-padded to 16 bytes.
    Plain,
    /// The sector number as 64-bit little-endian, zero-padded to 16 bytes.
    Plain64,
    /// plain64 encrypted with AES keyed by the hash of the whole data key (QEMU's
    /// crypto/ivgen-essiv.c, with the AES key size equal to the digest size as dm-crypt does).
    Essiv(Hash),
}

/// A resolved cipher specification: AES, the total key length, the mode and the IV generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spec {
    /// Bytes of key the spec takes: both halves for XTS (aes-256-xts takes 64).
    pub(crate) key_bytes: usize,
    pub(crate) mode: Mode,
    pub(crate) iv: IvGen,
}

impl Spec {
    /// Checks that AES supports the key length in `mode`, and ESSIV's hash gives an AES key;
    /// the error is why not, for the caller to wrap in its own unsupported error.
    pub(crate) fn new(
        key_bytes: usize,
        mode: Mode,
        iv: IvGen,
    ) -> std::result::Result<Spec, String> {
        let spec = Spec {
            key_bytes,
            mode,
            iv,
        };
        let per_cipher = match mode {
            Mode::Xts if key_bytes % 2 == 0 => key_bytes / 2,
            Mode::Xts => 0,
            Mode::Ecb | Mode::Cbc => key_bytes,
        };
        if !matches!(per_cipher, 16 | 24 | 32) {
            return Err(format!("aes-{} with {key_bytes} key bytes", mode.name()));
        }
        if let IvGen::Essiv(hash) = iv {
            // QEMU keys the ESSIV cipher with the whole digest, choosing the AES variant of
            // that size; a digest of another size (sha1: 20, sha384: 48, sha512: 64) has none.
            if !matches!(hash.len(), 16 | 24 | 32) {
                return Err(format!(
                    "IV generator essiv:{}: no AES variant takes a {}-byte key",
                    hash.name(),
                    hash.len()
                ));
            }
        }
        Ok(spec)
    }

    /// The bits of one AES key (half the key for XTS).
    fn aes_bits(&self) -> usize {
        let per_cipher = match self.mode {
            Mode::Xts => self.key_bytes / 2,
            Mode::Ecb | Mode::Cbc => self.key_bytes,
        };
        per_cipher * 8
    }

    /// e.g. "aes-256-xts-plain64", "aes-128-cbc-essiv:sha256", "aes-256-ecb".
    pub(crate) fn name(&self) -> String {
        if self.mode == Mode::Ecb {
            return format!("aes-{}-ecb", self.aes_bits());
        }
        let iv = match self.iv {
            IvGen::Plain => "plain".to_string(),
            IvGen::Plain64 => "plain64".to_string(),
            IvGen::Essiv(hash) => format!("essiv:{}", hash.name()),
        };
        format!("aes-{}-{}-{iv}", self.aes_bits(), self.mode.name())
    }
}

/// One AES key schedule of any of the three key sizes, boxed: with AES-NI detection a schedule
/// is almost 1 KiB, and a `SectorCipher` holds up to three.
enum Aes {
    A128(Box<Aes128>),
    A192(Box<Aes192>),
    A256(Box<Aes256>),
}

impl Aes {
    fn new(key: &[u8]) -> Result<Aes> {
        let bad = || Error::unsupported(format!("AES with a {}-byte key", key.len()));
        match key.len() {
            16 => Aes128::new_from_slice(key)
                .map(|c| Aes::A128(Box::new(c)))
                .map_err(|_| bad()),
            24 => Aes192::new_from_slice(key)
                .map(|c| Aes::A192(Box::new(c)))
                .map_err(|_| bad()),
            32 => Aes256::new_from_slice(key)
                .map(|c| Aes::A256(Box::new(c)))
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }

    /// Encrypts `blocks` in place, independently (the crate pipelines them with AES-NI).
    fn encrypt(&self, blocks: &mut [Block]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }

    fn decrypt(&self, blocks: &mut [Block]) {
        match self {
            Aes::A128(c) => c.decrypt_blocks(blocks),
            Aes::A192(c) => c.decrypt_blocks(blocks),
            Aes::A256(c) => c.decrypt_blocks(blocks),
        }
    }

    fn encrypt_one(&self, block: [u8; BLOCK]) -> [u8; BLOCK] {
        let mut b = Block::from(block);
        self.encrypt(std::slice::from_mut(&mut b));
        b.into()
    }
}

/// The keyed chaining of a `SectorCipher`.
enum Engine {
    Ecb(Aes),
    Cbc(Aes),
    Xts { data: Aes, tweak: Aes },
}

/// The keyed IV generator of a `SectorCipher`.
enum Ivs {
    Plain,
    Plain64,
    Essiv(Aes),
}

/// Encrypts/decrypts 512-byte sectors of an image's data; Send + Sync, cheap to share in an Arc.
///
/// Sector `n`'s IV is derived from `n` alone, so any run of sectors can be processed on its own
/// as long as the caller numbers them as the writer did: for LUKS, relative to the payload start
/// (standalone files) or the host offset in the file / 512 (qcow2 LUKS); for the legacy qcow
/// and qcow2 AES method, the guest offset / 512.
pub struct SectorCipher {
    spec: Spec,
    engine: Engine,
    ivs: Ivs,
}

impl fmt::Debug for SectorCipher {
    /// Names the cipher only: the keys must not reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("cipher", &self.describe())
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// The unit of encryption: every sector has its own IV.
    pub const SECTOR: usize = 512;

    /// Keys `spec` with `key` (`spec.key_bytes` long).
    pub(crate) fn new(spec: Spec, key: &[u8]) -> Result<SectorCipher> {
        if key.len() != spec.key_bytes {
            return Err(Error::out_of_range(format!(
                "internal: a {}-byte key for {}",
                key.len(),
                spec.name()
            )));
        }
        let engine = match spec.mode {
            Mode::Ecb => Engine::Ecb(Aes::new(key)?),
            Mode::Cbc => Engine::Cbc(Aes::new(key)?),
            Mode::Xts => {
                let (data, tweak) = key.split_at(key.len() / 2);
                Engine::Xts {
                    data: Aes::new(data)?,
                    tweak: Aes::new(tweak)?,
                }
            }
        };
        let ivs = match spec.iv {
            IvGen::Plain => Ivs::Plain,
            IvGen::Plain64 => Ivs::Plain64,
            IvGen::Essiv(hash) => {
                // ESSIV hashes the whole key, both XTS halves included, as QEMU does.
                let salt = hash.digest(&[key]);
                Ivs::Essiv(Aes::new(salt.as_ref())?)
            }
        };
        Ok(SectorCipher { spec, engine, ivs })
    }

    /// Decrypts `buf` in place: whole sectors (`buf.len()` a multiple of 512), the first one
    /// numbered `first_sector` (QEMU: its offset / 512).
    pub fn decrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.process(first_sector, buf, false)
    }

    /// Encrypts `buf` in place; see `decrypt`.
    pub fn encrypt(&self, first_sector: u64, buf: &mut [u8]) -> Result<()> {
        self.process(first_sector, buf, true)
    }

    /// e.g. "aes-256-xts-plain64" for messages and `imgfs info`.
    pub fn describe(&self) -> String {
        self.spec.name()
    }

    fn process(&self, first_sector: u64, buf: &mut [u8], encrypt: bool) -> Result<()> {
        if buf.len() % Self::SECTOR != 0 {
            return Err(Error::out_of_range(format!(
                "internal: {} bytes to {} are not whole {}-byte sectors",
                buf.len(),
                if encrypt { "encrypt" } else { "decrypt" },
                Self::SECTOR
            )));
        }
        // One sector at a time through a block array on the stack: no allocation, and no
        // reinterpretation of the caller's bytes as blocks.
        let mut blocks = [Block::default(); BLOCKS_PER_SECTOR];
        let mut sector = first_sector;
        for (i, chunk) in buf.chunks_exact_mut(Self::SECTOR).enumerate() {
            if i > 0 {
                sector = sector.checked_add(1).ok_or_else(|| {
                    Error::out_of_range("sector number past 2^64 - 1".to_string())
                })?;
            }
            for (block, bytes) in blocks.iter_mut().zip(chunk.chunks_exact(BLOCK)) {
                block.copy_from_slice(bytes);
            }
            self.process_blocks(self.iv(sector), &mut blocks, encrypt);
            for (block, bytes) in blocks.iter().zip(chunk.chunks_exact_mut(BLOCK)) {
                bytes.copy_from_slice(block);
            }
        }
        Ok(())
    }

    /// Runs the mode over `blocks` (one sector, or a shorter test vector) with IV `iv`.
    fn process_blocks(&self, iv: [u8; BLOCK], blocks: &mut [Block], encrypt: bool) {
        match (&self.engine, encrypt) {
            (Engine::Ecb(c), true) => c.encrypt(blocks),
            (Engine::Ecb(c), false) => c.decrypt(blocks),
            (Engine::Cbc(c), true) => cbc_encrypt(c, iv, blocks),
            (Engine::Cbc(c), false) => cbc_decrypt(c, iv, blocks),
            (Engine::Xts { data, tweak }, _) => {
                // T0 = AES_k2(IV); block j is masked with T0 * alpha^j before and after AES_k1.
                let t0 = tweak.encrypt_one(iv);
                xor_tweaks(blocks, t0);
                if encrypt {
                    data.encrypt(blocks);
                } else {
                    data.decrypt(blocks);
                }
                xor_tweaks(blocks, t0);
            }
        }
    }

    /// The IV of sector `sector` (ECB ignores it).
    fn iv(&self, sector: u64) -> [u8; BLOCK] {
        let mut iv = [0u8; BLOCK];
        match &self.ivs {
            // plain: deliberately only the low 32 bits, so it repeats every 2 TiB.
            Ivs::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            Ivs::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            Ivs::Essiv(essiv) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                iv = essiv.encrypt_one(iv);
            }
        }
        iv
    }
}

fn xor_block(block: &mut Block, with: &[u8]) {
    for (b, w) in block.iter_mut().zip(with) {
        *b ^= w;
    }
}

/// XORs block j with T0 * alpha^j in GF(2^128), the tweak read as a little-endian 128-bit
/// number (QEMU crypto/xts.c `xts_mult_x`: shift left, fold the carry back in as 0x87).
fn xor_tweaks(blocks: &mut [Block], t0: [u8; BLOCK]) {
    let mut t = u128::from_le_bytes(t0);
    for block in blocks {
        xor_block(block, &t.to_le_bytes());
        let carry = t >> 127;
        t = (t << 1) ^ (carry * 0x87);
    }
}

fn cbc_encrypt(c: &Aes, iv: [u8; BLOCK], blocks: &mut [Block]) {
    let mut prev = Block::from(iv);
    for block in blocks {
        xor_block(block, &prev);
        c.encrypt(std::slice::from_mut(block));
        prev = *block;
    }
}

/// CBC decryption has no chain through the cipher, so each group of blocks is decrypted in one
/// call (pipelined) and then XORed with the ciphertext before it.
fn cbc_decrypt(c: &Aes, iv: [u8; BLOCK], blocks: &mut [Block]) {
    let mut prev = Block::from(iv);
    for group in blocks.chunks_mut(BLOCKS_PER_SECTOR) {
        let mut ciphertext = [Block::default(); BLOCKS_PER_SECTOR];
        for (saved, block) in ciphertext.iter_mut().zip(group.iter()) {
            *saved = *block;
        }
        c.decrypt(group);
        for (block, saved) in group.iter_mut().zip(ciphertext) {
            xor_block(block, &prev);
            prev = saved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::hex;

    fn run(cipher: &SectorCipher, iv: [u8; 16], data: &[u8], encrypt: bool) -> Vec<u8> {
        let mut blocks: Vec<Block> = data.chunks(16).map(Block::clone_from_slice).collect();
        cipher.process_blocks(iv, &mut blocks, encrypt);
        blocks.iter().flat_map(|b| b.iter().copied()).collect()
    }

    fn spec(key_bytes: usize, mode: Mode, iv: IvGen) -> Spec {
        Spec::new(key_bytes, mode, iv).unwrap()
    }

    #[test]
    fn aes_matches_fips197_appendix_c() {
        let plain = hex("00112233445566778899aabbccddeeff");
        for (key_len, expected) in [
            (16, "69c4e0d86a7b0430d8cdb78070b4c55a"),
            (24, "dda97ca4864cdfe06eaf70a0ec0d7191"),
            (32, "8ea2b7ca516745bfeafc49904b496089"),
        ] {
            let key: Vec<u8> = (0..key_len as u8).collect();
            let ecb = SectorCipher::new(spec(key_len, Mode::Ecb, IvGen::Plain64), &key).unwrap();
            assert_eq!(run(&ecb, [0; 16], &plain, true), hex(expected));
            assert_eq!(run(&ecb, [0; 16], &hex(expected), false), plain);
        }
    }

    #[test]
    fn cbc_matches_sp800_38a_f21() {
        let key = hex("2b7e151628aed2a6abf7158809cf4f3c");
        let iv: [u8; 16] = hex("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
        let plain = hex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51");
        let cipher = hex("7649abac8119b246cee98e9b12e9197d5086cb9b507219ee95db113a917678b2");
        let cbc = SectorCipher::new(spec(16, Mode::Cbc, IvGen::Plain64), &key).unwrap();
        assert_eq!(run(&cbc, iv, &plain, true), cipher);
        assert_eq!(run(&cbc, iv, &cipher, false), plain);
    }

    #[test]
    fn xts_matches_ieee1619_vectors_1_and_2() {
        // Vector 1: zero keys, data unit 0, 32 zero bytes.
        let xts = SectorCipher::new(spec(32, Mode::Xts, IvGen::Plain64), &[0; 32]).unwrap();
        let expected = hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e");
        assert_eq!(run(&xts, [0; 16], &[0; 32], true), expected);
        assert_eq!(run(&xts, [0; 16], &expected, false), vec![0; 32]);
        // Vector 2: key1 = 11.., key2 = 22.., data unit 0x3333333333, 32 bytes of 0x44.
        let mut key = vec![0x11; 16];
        key.extend([0x22; 16]);
        let xts = SectorCipher::new(spec(32, Mode::Xts, IvGen::Plain64), &key).unwrap();
        let expected = hex("c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0");
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&0x33_3333_3333u64.to_le_bytes());
        assert_eq!(run(&xts, iv, &[0x44; 32], true), expected);
        // The same through the sector interface: a 512-byte sector numbered 0x3333333333
        // starts with the same 32 bytes (later blocks only extend the tweak sequence).
        let mut sector = vec![0x44; 512];
        xts.encrypt(0x33_3333_3333, &mut sector).unwrap();
        assert_eq!(&sector[..32], &expected[..]);
    }

    #[test]
    fn ivs_are_plain_plain64_and_essiv_of_the_sector_number() {
        let key = [7u8; 32];
        let plain = SectorCipher::new(spec(32, Mode::Cbc, IvGen::Plain), &key).unwrap();
        let plain64 = SectorCipher::new(spec(32, Mode::Cbc, IvGen::Plain64), &key).unwrap();
        let sector = 0x1_0000_0005u64;
        assert_eq!(
            plain.iv(sector)[..],
            [5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            plain64.iv(sector)[..],
            [5, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        // Below 2^32 they agree, so the difference only shows on disks over 2 TiB.
        assert_eq!(plain.iv(77), plain64.iv(77));

        // ESSIV with sha256 on an AES-128 key: AES-256 keyed with sha256(key), as dm-crypt.
        let essiv =
            SectorCipher::new(spec(16, Mode::Cbc, IvGen::Essiv(Hash::Sha256)), &key[..16]).unwrap();
        let salt = Hash::Sha256.digest(&[&key[..16]]);
        let aes = Aes::new(salt.as_ref()).unwrap();
        assert_eq!(essiv.iv(sector), aes.encrypt_one(plain64.iv(sector)));
        assert_eq!(essiv.describe(), "aes-128-cbc-essiv:sha256");
    }

    #[test]
    fn sectors_round_trip_and_are_independent() {
        let key: Vec<u8> = (0..64u8).collect();
        let specs = [
            spec(64, Mode::Xts, IvGen::Plain64),
            spec(48, Mode::Xts, IvGen::Plain),
            spec(32, Mode::Xts, IvGen::Essiv(Hash::Sha256)),
            spec(16, Mode::Cbc, IvGen::Essiv(Hash::Sha256)),
            spec(24, Mode::Cbc, IvGen::Plain64),
            spec(32, Mode::Ecb, IvGen::Plain64),
        ];
        let plain: Vec<u8> = (0..4 * 512).map(|i| (i * 7 % 251) as u8).collect();
        for spec in specs {
            let cipher = SectorCipher::new(spec, &key[..spec.key_bytes]).unwrap();
            let mut buf = plain.clone();
            cipher.encrypt(1000, &mut buf).unwrap();
            assert_ne!(buf, plain, "{}", cipher.describe());
            // Sector 1002 alone encrypts to the same bytes as within the run.
            let mut one = plain[1024..1536].to_vec();
            cipher.encrypt(1002, &mut one).unwrap();
            assert_eq!(one, buf[1024..1536], "{}", cipher.describe());
            cipher.decrypt(1000, &mut buf).unwrap();
            assert_eq!(buf, plain, "{}", cipher.describe());
        }
        let xts = SectorCipher::new(specs[0], &key).unwrap();
        assert_eq!(xts.describe(), "aes-256-xts-plain64");
        assert_eq!(
            format!("{xts:?}"),
            "SectorCipher { cipher: \"aes-256-xts-plain64\", .. }"
        );
        assert_eq!(specs[1].name(), "aes-192-xts-plain");
        assert_eq!(specs[5].name(), "aes-256-ecb");
    }

    #[test]
    fn bad_lengths_and_specs_are_errors() {
        let cipher = SectorCipher::new(spec(32, Mode::Xts, IvGen::Plain64), &[1; 32]).unwrap();
        assert!(cipher.decrypt(0, &mut [0; 100]).is_err());
        assert!(cipher.encrypt(0, &mut [0; 513]).is_err());
        cipher.decrypt(0, &mut []).unwrap();
        cipher.decrypt(u64::MAX, &mut [0; 512]).unwrap();
        assert!(cipher.decrypt(u64::MAX, &mut [0; 1024]).is_err());
        assert!(SectorCipher::new(spec(32, Mode::Xts, IvGen::Plain64), &[1; 16]).is_err());
        for (key_bytes, mode) in [
            (0, Mode::Cbc),
            (20, Mode::Cbc),
            (64, Mode::Cbc),
            (16, Mode::Xts),
            (33, Mode::Xts),
        ] {
            assert!(
                Spec::new(key_bytes, mode, IvGen::Plain64).is_err(),
                "{key_bytes} {mode:?}"
            );
        }
        for hash in [Hash::Sha1, Hash::Sha384, Hash::Sha512] {
            let e = Spec::new(16, Mode::Cbc, IvGen::Essiv(hash)).unwrap_err();
            assert!(e.contains(&format!("essiv:{}", hash.name())), "{e}");
        }
    }

    #[test]
    fn sector_cipher_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<SectorCipher>();
    }
}
