//! The data of encrypted images: 512-byte sectors encrypted as QEMU does, in qcow2 with LUKS
//! (each sector's IV is its offset in the image file), in qcow and qcow2 with the legacy AES
//! method (the passphrase is the key, the IV is the guest offset) and in LUKS containers (the
//! IV is the offset from the payload's start). Metadata is never encrypted. Keys come
//! from the passphrases given to the daemon (`meta::keyring`).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{Error, Result};
use crate::host::HostFile;
use crate::meta::crypt::{qcow_aes, SectorCipher};
use crate::meta::keyring;

const SECTOR: u64 = 512;
/// Locks for the sectors that writes cover partly (`DataCipher::write`), by sector number.
const SECTOR_LOCKS: usize = 64;

/// The cipher of an encrypted image's data clusters.
pub struct DataCipher {
    /// `Err`: the image was opened without its key (`keyring::inspect_only`), and why.
    cipher: std::result::Result<Arc<SectorCipher>, String>,
    /// The IV is the sector's offset in the image file (qcow2 LUKS), not on the guest disk
    /// (the legacy AES method, a LUKS container's payload).
    physical: bool,
    /// What `describe` names the method.
    method: &'static str,
    /// A write that covers a sector partly reads, decrypts, merges, encrypts and writes it
    /// back; two such writes of one sector must not lose each other's bytes.
    sector_locks: [Mutex<()>; SECTOR_LOCKS],
}

impl DataCipher {
    /// The cipher of a qcow2 LUKS image, whose key the LUKS header gave.
    pub fn luks(cipher: Arc<SectorCipher>) -> Self {
        Self::new(cipher, true, "LUKS")
    }

    /// The cipher of a LUKS container's payload: sectors numbered from the payload's start.
    pub fn luks_payload(cipher: Arc<SectorCipher>) -> Self {
        Self::new(cipher, false, "LUKS")
    }

    /// The cipher of an image whose key was not given, opened for inspection only
    /// (`keyring::opens_locked`): every read and write of its data fails with `why`.
    pub fn locked(method: &'static str, why: String) -> Self {
        DataCipher {
            cipher: Err(why),
            physical: false,
            method,
            sector_locks: std::array::from_fn(|_| Mutex::new(())),
        }
    }

    /// `opened`, or a locked cipher where an inspecting process opens an image whose key
    /// was not given (`keyring::opens_locked`).
    pub fn or_locked(opened: Result<Self>, method: &'static str) -> Result<Self> {
        match opened {
            Err(e)
                if e.kind() == crate::error::ErrorKind::Unsupported && keyring::opens_locked() =>
            {
                Ok(Self::locked(method, e.message().to_string()))
            }
            other => other,
        }
    }

    fn new(cipher: Arc<SectorCipher>, physical: bool, method: &'static str) -> Self {
        DataCipher {
            cipher: Ok(cipher),
            physical,
            method,
            sector_locks: std::array::from_fn(|_| Mutex::new(())),
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
        Ok(Self::new(
            Arc::new(qcow_aes(&passphrase)?),
            false,
            "AES (legacy)",
        ))
    }

    /// e.g. "LUKS, aes-256-xts-plain64", for `imgfs info`.
    pub fn describe(&self) -> String {
        match &self.cipher {
            Ok(cipher) => format!("{}, {}", self.method, cipher.describe()),
            Err(why) => format!("{}, locked: {why}", self.method),
        }
    }

    fn cipher(&self) -> Result<&SectorCipher> {
        self.cipher
            .as_deref()
            .map_err(|why| Error::unsupported(why.clone()))
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
        let cipher = self.cipher()?;
        let span = Span::of(host_offset, guest_offset, part.len())?;
        let mut sectors = vec![0u8; span.len];
        file.read_exact_at(&mut sectors, span.start)?;
        cipher.decrypt(self.first_sector(&span), &mut sectors)?;
        part.copy_from_slice(&sectors[span.lead..span.lead + part.len()]);
        Ok(())
    }

    /// Writes `data`, the guest bytes at `guest_offset`, encrypted at `host_offset` of
    /// `file`. Sectors it covers partly are read and decrypted first, under their locks.
    pub fn write(
        &self,
        file: &HostFile,
        data: &[u8],
        host_offset: u64,
        guest_offset: u64,
    ) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let cipher = self.cipher()?;
        let span = Span::of(host_offset, guest_offset, data.len())?;
        let mut sectors = vec![0u8; span.len];
        let first = self.first_sector(&span);
        let head_partial = span.lead != 0;
        let tail_partial = (span.lead + data.len()) % SECTOR as usize != 0;
        let last = span.start + span.len as u64 - SECTOR;
        let _held = self.lock_sectors(span.start, last, head_partial || tail_partial);
        if head_partial {
            self.read_sector(file, &mut sectors[..SECTOR as usize], span.start, first)?;
        }
        if tail_partial && (last != span.start || !head_partial) {
            let tail_first = first + (last - span.start) / SECTOR;
            let at = span.len - SECTOR as usize;
            self.read_sector(file, &mut sectors[at..], last, tail_first)?;
        }
        sectors[span.lead..span.lead + data.len()].copy_from_slice(data);
        cipher.encrypt(first, &mut sectors)?;
        file.write_all_at(&sectors, span.start)
    }

    fn read_sector(&self, file: &HostFile, out: &mut [u8], at: u64, sector: u64) -> Result<()> {
        file.read_exact_at(out, at)?;
        self.cipher()?.decrypt(sector, out)
    }

    /// The IV sector number of the span's first sector.
    fn first_sector(&self, span: &Span) -> u64 {
        match self.physical {
            true => span.start / SECTOR,
            false => span.guest_start / SECTOR,
        }
    }

    /// Holds the locks of the sectors at host offsets `first` and `last` (a write's partly
    /// covered ones; whole sectors need none), in a fixed order.
    fn lock_sectors(&self, first: u64, last: u64, partial: bool) -> Vec<MutexGuard<'_, ()>> {
        if !partial {
            return Vec::new();
        }
        let index = |at: u64| (at / SECTOR) as usize % SECTOR_LOCKS;
        let (a, b) = (index(first).min(index(last)), index(first).max(index(last)));
        let lock = |i: usize| {
            self.sector_locks[i]
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        match a == b {
            true => vec![lock(a)],
            false => vec![lock(a), lock(b)],
        }
    }
}

/// The whole sectors around a request: host offset and length, where the request starts in
/// them, and the guest offset of their start.
struct Span {
    start: u64,
    len: usize,
    lead: usize,
    guest_start: u64,
}

impl Span {
    fn of(host_offset: u64, guest_offset: u64, len: usize) -> Result<Span> {
        let lead = host_offset % SECTOR;
        if guest_offset % SECTOR != lead {
            return Err(Error::out_of_range(format!(
                "internal: guest offset {guest_offset:#x} and host offset {host_offset:#x} \
                 lie differently in their sectors"
            )));
        }
        let whole = (lead + len as u64).div_ceil(SECTOR) * SECTOR;
        Ok(Span {
            start: host_offset - lead,
            len: whole as usize,
            lead: lead as usize,
            guest_start: guest_offset - lead,
        })
    }
}
