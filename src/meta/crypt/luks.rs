//! LUKS1 headers as QEMU writes them (standalone `luks` images, and the encryption header of
//! qcow2 images with encrypt.format=luks): parsing with hostile-input checks, and unlocking a
//! key slot with a passphrase into the `SectorCipher` of the payload, as QEMU's
//! crypto/block-luks.c does.
//!
//! Offsets in error messages are relative to the LUKS header's start (the caller knows where
//! that is in the image file and adds `at_offset` itself).

use super::af::{self, Hash};
use super::cipher::{IvGen, Mode, SectorCipher, Spec};
use super::passphrase_bytes;
use crate::error::{Error, Result};
use crate::meta::bytes::{u16_be, u32_be};
use std::sync::atomic::{AtomicU32, Ordering};

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const SLOTS: usize = 8;
const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 20;
/// LUKS counts key material and payload offsets in 512-byte sectors, whatever the disk's.
const SECTOR: u64 = 512;

/// Field offsets of the big-endian on-disk header.
const VERSION: usize = 6;
const CIPHER_NAME: usize = 8;
const CIPHER_MODE: usize = 40;
const HASH_SPEC: usize = 72;
const NAME_LEN: usize = 32;
const PAYLOAD_OFFSET: usize = 104;
const KEY_BYTES: usize = 108;
const MK_DIGEST: usize = 112;
const MK_SALT: usize = 132;
const MK_ITERATIONS: usize = 164;
const UUID: usize = 168;
const UUID_LEN: usize = 40;
const FIRST_SLOT: usize = 208;
const SLOT_LEN: usize = 48;

/// The longest master key accepted: AES-256-XTS's 64 bytes, the longest any supported spec
/// takes (and what cryptsetup allows for LUKS1 ciphers at all).
const MAX_KEY_BYTES: u32 = 64;
/// The most anti-forensic stripes accepted. QEMU requires exactly 4000, the value cryptsetup
/// always writes; the bound allows other writers' choices while keeping a slot's key material
/// (key bytes x stripes) at most 4 MiB, so 8 slots read at most 32 MiB in turn and hold one
/// slot's worth at a time.
const MAX_STRIPES: u32 = 65536;
/// The most PBKDF2 iterations accepted, for a key slot or the master key digest. Writers
/// choose the count that takes about two seconds on the machine that wrote the header: a few
/// million for SHA-256 on today's CPUs. An unbounded count (up to 2^32) would let a hostile
/// header hold the daemon's thread for an hour per slot; 2^24 bounds it to seconds.
const MAX_ITERATIONS: u32 = 1 << 24;
/// The limit in force: `MAX_ITERATIONS`, lowered by the fuzzing harness (`limit_iterations`)
/// so that every input stays fast.
static ITERATION_LIMIT: AtomicU32 = AtomicU32::new(MAX_ITERATIONS);

/// Lowers the PBKDF2 iterations accepted to `limit` (the fuzzing harness: a mutated count
/// must not make one input take seconds).
pub fn limit_iterations(limit: u32) {
    ITERATION_LIMIT.store(limit.min(MAX_ITERATIONS), Ordering::Relaxed);
}

/// One of the 8 key slots: a copy of the master key, split into stripes and encrypted with a
/// key derived from a passphrase.
#[derive(Debug, Clone)]
struct KeySlot {
    active: bool,
    iterations: u32,
    salt: [u8; SALT_LEN],
    /// In 512-byte sectors from the header's start.
    key_offset: u32,
    stripes: u32,
}

/// A parsed LUKS1 header (QEMU writes LUKS version 1; version 2 is refused as unsupported).
#[derive(Debug, Clone)]
pub struct LuksHeader {
    cipher_name: String,
    cipher_mode: String,
    hash_spec: String,
    payload_offset: u32,
    key_bytes: u32,
    mk_digest: [u8; DIGEST_LEN],
    mk_salt: [u8; SALT_LEN],
    mk_iterations: u32,
    uuid: String,
    slots: Vec<KeySlot>,
}

/// The NUL-terminated string field at `offset` (QEMU refuses one without its NUL).
fn c_string(bytes: &[u8], offset: usize, len: usize, name: &str) -> Result<String> {
    let field = bytes
        .get(offset..offset.saturating_add(len))
        .ok_or_else(|| Error::corrupt(format!("LUKS header field {name} is truncated")))?;
    let end = field.iter().position(|&b| b == 0).ok_or_else(|| {
        Error::corrupt(format!(
            "LUKS header field {name} at byte {offset} is not NUL-terminated"
        ))
    })?;
    Ok(String::from_utf8_lossy(&field[..end]).into_owned())
}

/// The UUID, informational only: up to its NUL, or all 40 bytes if it has none (unlike the
/// cipher strings, nothing is looked up with it, so a missing NUL is not worth refusing).
fn uuid(bytes: &[u8]) -> Result<String> {
    let field: [u8; UUID_LEN] = array(bytes, UUID, "uuid")?;
    let end = field.iter().position(|&b| b == 0).unwrap_or(UUID_LEN);
    Ok(String::from_utf8_lossy(&field[..end]).into_owned())
}

fn array<const N: usize>(bytes: &[u8], offset: usize, name: &str) -> Result<[u8; N]> {
    bytes
        .get(offset..offset.saturating_add(N))
        .and_then(|s| <[u8; N]>::try_from(s).ok())
        .ok_or_else(|| Error::corrupt(format!("LUKS header field {name} is truncated")))
}

impl LuksHeader {
    /// The header's fixed size in bytes, so callers know how much to read first.
    pub const LEN: usize = 592;

    /// Parses and checks the header at the start of `bytes` (at least `LEN` bytes; more are
    /// ignored). Checks the structure only: a cipher spec imgfs cannot use is reported by
    /// `check_supported` and `unlock`, so `imgfs info` can still describe the image.
    pub fn parse(bytes: &[u8]) -> Result<LuksHeader> {
        if bytes.get(..MAGIC.len()) != Some(&MAGIC[..]) {
            return Err(Error::corrupt("no LUKS magic at the header's start"));
        }
        // The version before the length: a LUKS2 header deserves its own message even when
        // the caller read only LEN bytes of it, or fewer.
        let version = u16_be(bytes, VERSION, "LUKS version")?;
        if version == 2 {
            return Err(Error::unsupported(
                "LUKS2 header: only LUKS1, the version QEMU writes, is implemented \
                 (cryptsetup convert --type luks1 can convert it)",
            ));
        }
        if version != 1 {
            return Err(Error::unsupported(format!("LUKS version {version}")));
        }
        if bytes.len() < Self::LEN {
            return Err(Error::corrupt(format!(
                "LUKS header is {} bytes, shorter than its {} bytes",
                bytes.len(),
                Self::LEN
            )));
        }
        let key_bytes = u32_be(bytes, KEY_BYTES, "key_bytes")?;
        if key_bytes == 0 {
            return Err(Error::corrupt("LUKS header key_bytes is 0"));
        }
        if key_bytes > MAX_KEY_BYTES {
            return Err(Error::unsupported(format!(
                "LUKS master key of {key_bytes} bytes (at most {MAX_KEY_BYTES} are supported)"
            )));
        }
        let mk_iterations = u32_be(bytes, MK_ITERATIONS, "mk_digest_iter")?;
        if mk_iterations == 0 {
            return Err(Error::corrupt("LUKS header mk_digest_iter is 0"));
        }
        let limit = ITERATION_LIMIT.load(Ordering::Relaxed);
        if mk_iterations > limit {
            return Err(Error::unsupported(format!(
                "LUKS header mk_digest_iter is {mk_iterations}, more than the {limit} imgfs \
                 derives"
            )));
        }
        let mut slots = Vec::with_capacity(SLOTS);
        for i in 0..SLOTS {
            let at = FIRST_SLOT + i * SLOT_LEN;
            slots.push(Self::parse_slot(bytes, at, i, key_bytes)?);
        }
        Ok(LuksHeader {
            cipher_name: c_string(bytes, CIPHER_NAME, NAME_LEN, "cipher_name")?,
            cipher_mode: c_string(bytes, CIPHER_MODE, NAME_LEN, "cipher_mode")?,
            hash_spec: c_string(bytes, HASH_SPEC, NAME_LEN, "hash_spec")?,
            payload_offset: u32_be(bytes, PAYLOAD_OFFSET, "payload_offset")?,
            key_bytes,
            mk_digest: array(bytes, MK_DIGEST, "mk_digest")?,
            mk_salt: array(bytes, MK_SALT, "mk_digest_salt")?,
            mk_iterations,
            uuid: uuid(bytes)?,
            slots,
        })
    }

    fn parse_slot(bytes: &[u8], at: usize, i: usize, key_bytes: u32) -> Result<KeySlot> {
        let field = |name: &str| format!("key slot {i} {name} (header byte {at})");
        let active = match u32_be(bytes, at, "key slot active")? {
            SLOT_ENABLED => true,
            SLOT_DISABLED => false,
            other => {
                return Err(Error::corrupt(format!(
                    "{} is {other:#x}, neither enabled nor disabled",
                    field("state")
                )))
            }
        };
        let slot = KeySlot {
            active,
            iterations: u32_be(bytes, at + 4, "key slot iterations")?,
            salt: array(bytes, at + 8, "key slot salt")?,
            key_offset: u32_be(bytes, at + 40, "key slot key_material_offset")?,
            stripes: u32_be(bytes, at + 44, "key slot stripes")?,
        };
        // A disabled slot's other fields are never used, so they are not checked.
        if !active {
            return Ok(slot);
        }
        if slot.iterations == 0 {
            return Err(Error::corrupt(format!("{} is 0", field("iterations"))));
        }
        let limit = ITERATION_LIMIT.load(Ordering::Relaxed);
        if slot.iterations > limit {
            return Err(Error::unsupported(format!(
                "{} is {}, more than the {limit} imgfs derives",
                field("iterations"),
                slot.iterations
            )));
        }
        if slot.stripes == 0 || slot.stripes > MAX_STRIPES {
            return Err(Error::corrupt(format!(
                "{} is {}, not 1 to {MAX_STRIPES} (LUKS writers use 4000)",
                field("stripes"),
                slot.stripes
            )));
        }
        // A u32 of sectors times 512 fits in a u64 with room to spare.
        if u64::from(slot.key_offset) * SECTOR < Self::LEN as u64 {
            return Err(Error::corrupt(format!(
                "{} is sector {}, inside the header",
                field("key material"),
                slot.key_offset
            )));
        }
        // key_bytes <= 64 and stripes <= 65536: the product fits every integer type used.
        if key_bytes.checked_mul(slot.stripes).is_none() {
            return Err(Error::corrupt(format!(
                "{} is too long",
                field("key material")
            )));
        }
        Ok(slot)
    }

    /// The key material of active slot `slot`: its byte offset from the header's start and
    /// its length (key bytes x stripes, not rounded to sectors, as QEMU reads it).
    fn material(&self, slot: &KeySlot) -> Result<(u64, usize)> {
        let offset = u64::from(slot.key_offset)
            .checked_mul(SECTOR)
            .ok_or_else(|| Error::corrupt("LUKS key material offset overflows"))?;
        let len = usize::try_from(self.key_bytes)
            .ok()
            .and_then(|k| k.checked_mul(usize::try_from(slot.stripes).ok()?))
            .ok_or_else(|| Error::corrupt("LUKS key material length overflows"))?;
        Ok((offset, len))
    }

    fn active_slots(&self) -> impl Iterator<Item = (usize, &KeySlot)> {
        self.slots.iter().enumerate().filter(|(_, s)| s.active)
    }

    /// How many bytes from the header's start the header and all active key slots' key
    /// material span (so a caller can check it fits in the area the container reserves).
    pub fn span(&self) -> Result<u64> {
        let mut end = Self::LEN as u64;
        for (i, slot) in self.active_slots() {
            let (offset, len) = self.material(slot)?;
            let slot_end = u64::try_from(len)
                .ok()
                .and_then(|len| offset.checked_add(len))
                .ok_or_else(|| Error::corrupt(format!("key slot {i} key material overflows")))?;
            end = end.max(slot_end);
        }
        Ok(end)
    }

    /// The payload offset in 512-byte sectors as written in the header (standalone LUKS
    /// files put the data there; qcow2 ignores it).
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset)
    }

    /// The UUID as written in the header (may be empty).
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// e.g. "LUKS1 aes-xts-plain64, 512-bit key, hash sha256, active key slots: 0".
    pub fn describe(&self) -> String {
        let slots: Vec<String> = self.active_slots().map(|(i, _)| i.to_string()).collect();
        let slots = if slots.is_empty() {
            "no active key slot".to_string()
        } else {
            format!("active key slots: {}", slots.join(", "))
        };
        format!(
            "LUKS1 {}-{}, {}-bit key, hash {}, {slots}",
            self.cipher_name,
            self.cipher_mode,
            u64::from(self.key_bytes) * 8,
            self.hash_spec
        )
    }

    /// Unsupported when the cipher spec or hash is one imgfs cannot decrypt, so a caller can
    /// refuse before asking for a passphrase.
    pub fn check_supported(&self) -> Result<()> {
        self.spec().map(|_| ())
    }

    /// The payload's cipher spec and the hash of PBKDF2 and the splitter, resolved from the
    /// header's strings the way QEMU's `qcrypto_block_luks_parse_header` does.
    fn spec(&self) -> Result<(Spec, Hash)> {
        let unsupported = |why: String| {
            Error::unsupported(format!(
                "LUKS cipher {}-{} with hash {}: {why}",
                self.cipher_name, self.cipher_mode, self.hash_spec
            ))
        };
        if self.cipher_name != "aes" {
            return Err(unsupported(format!(
                "cipher {} (only aes is implemented)",
                self.cipher_name
            )));
        }
        // "<mode>-<ivgen>[:<ivhash>]", e.g. "xts-plain64", "cbc-essiv:sha256". cryptsetup
        // writes plain "ecb" with no IV generator, which QEMU refuses but is accepted here.
        let (mode_name, ivgen) = match self.cipher_mode.split_once('-') {
            Some((mode, ivgen)) => (mode, Some(ivgen)),
            None => (self.cipher_mode.as_str(), None),
        };
        let mode = match mode_name {
            "xts" => Mode::Xts,
            "cbc" => Mode::Cbc,
            "ecb" => Mode::Ecb,
            other => return Err(unsupported(format!("cipher mode {other}"))),
        };
        let iv = match (mode, ivgen) {
            // ECB takes no IV: whatever generator is named is unused (QEMU's niv is 0).
            (Mode::Ecb, _) => IvGen::Plain64,
            (_, None) => return Err(unsupported("no IV generator".to_string())),
            (_, Some(ivgen)) => {
                let (name, ivhash) = match ivgen.split_once(':') {
                    Some((name, hash)) => (name, Some(hash)),
                    None => (ivgen, None),
                };
                match (name, ivhash) {
                    // dm-crypt and QEMU ignore a hash named after plain or plain64.
                    ("plain", _) => IvGen::Plain,
                    ("plain64", _) => IvGen::Plain64,
                    ("essiv", None) => return Err(unsupported("essiv without a hash".to_string())),
                    ("essiv", Some(hash)) => IvGen::Essiv(
                        Hash::from_name(hash)
                            .ok_or_else(|| unsupported(format!("IV generator hash {hash}")))?,
                    ),
                    (other, _) => return Err(unsupported(format!("IV generator {other}"))),
                }
            }
        };
        let hash = Hash::from_name(&self.hash_spec)
            .ok_or_else(|| unsupported(format!("hash {}", self.hash_spec)))?;
        let key_bytes =
            usize::try_from(self.key_bytes).map_err(|_| unsupported("key length".to_string()))?;
        let spec = Spec::new(key_bytes, mode, iv).map_err(unsupported)?;
        Ok((spec, hash))
    }

    /// Tries `passphrase` on every active key slot; `read_at(offset, buf)` fills `buf` with
    /// the bytes at `offset` from the LUKS header's start. Ok(None) when no slot opens with
    /// it (wrong passphrase); Err for a damaged header, a failed read, or an unsupported
    /// cipher, mode, IV generator or hash.
    ///
    /// As in QEMU, the passphrase ends at its first NUL byte (QEMU passes it as a C string).
    /// Each slot costs its PBKDF2 iterations, which the header chooses (see `Hash::pbkdf2`).
    pub fn unlock(
        &self,
        passphrase: &[u8],
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<SectorCipher>> {
        let (spec, hash) = self.spec()?;
        let passphrase = passphrase_bytes(passphrase);
        for (i, slot) in self.active_slots() {
            if let Some(mut master_key) = self.try_slot(i, slot, spec, hash, passphrase, read_at)? {
                let cipher = SectorCipher::new(spec, &master_key);
                af::wipe(&mut master_key);
                return cipher.map(Some);
            }
        }
        Ok(None)
    }

    /// The master key if `passphrase` opens slot `i`.
    fn try_slot(
        &self,
        i: usize,
        slot: &KeySlot,
        spec: Spec,
        hash: Hash,
        passphrase: &[u8],
        read_at: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Option<Vec<u8>>> {
        let (offset, len) = self.material(slot)?;
        if len % 16 != 0 {
            // Only CBC with a 24-byte key and an odd stripe count gets here (XTS keys are
            // whole blocks). QEMU refuses even less: it asserts whole sectors, and aborts on
            // aes-192-cbc's 24 x 4000 bytes, which are whole blocks and work here.
            return Err(Error::unsupported(format!(
                "key slot {i} key material of {len} bytes is not whole AES blocks"
            )));
        }
        // Decrypted as QEMU does: sector by sector from sector 0, a partial last sector
        // included. Padding it to a whole sector changes nothing in its first bytes, since
        // every mode here decrypts a block from that block and the ones before it only.
        let padded = len
            .checked_next_multiple_of(SectorCipher::SECTOR)
            .ok_or_else(|| Error::corrupt(format!("key slot {i} key material overflows")))?;
        let mut material = vec![0u8; padded];
        read_at(offset, &mut material[..len])
            .map_err(|e| e.context(format!("key slot {i} key material at byte {offset}")))?;

        let mut slot_key = vec![0u8; spec.key_bytes];
        let iterations = format!("key slot {i} iterations");
        hash.pbkdf2(
            passphrase,
            &slot.salt,
            slot.iterations,
            &iterations,
            &mut slot_key,
        )?;
        let slot_cipher = SectorCipher::new(spec, &slot_key);
        af::wipe(&mut slot_key);
        slot_cipher?.decrypt(0, &mut material)?;

        let stripes = usize::try_from(slot.stripes)
            .map_err(|_| Error::corrupt(format!("key slot {i} stripes overflow")))?;
        let merged = af::merge(hash, &material[..len], spec.key_bytes, stripes);
        af::wipe(&mut material);
        let mut candidate = merged?;

        let mut digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(
            &candidate,
            &self.mk_salt,
            self.mk_iterations,
            "mk_digest_iter",
            &mut digest,
        )?;
        // Constant time, so a timing side channel says nothing about the digest.
        let difference = digest
            .iter()
            .zip(&self.mk_digest)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference == 0 {
            Ok(Some(candidate))
        } else {
            af::wipe(&mut candidate);
            Ok(None)
        }
    }
}
