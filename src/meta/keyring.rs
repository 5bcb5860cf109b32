//! The passphrases the daemon was given for encrypted images (`--key-file`), tried in turn on
//! every encrypted image it opens, and the keys they unlocked. imgfs opens an image only while
//! it is in use and reopens it later, and deriving a LUKS key takes QEMU's default iteration
//! time (about two seconds) per key slot tried, so an unlocked key is kept for the process's
//! life, found again by the LUKS header it was unlocked from.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use crate::error::{Error, Result};
use crate::meta::crypt::{LuksHeader, SectorCipher};

/// The passphrases given, in the order given.
static PASSPHRASES: RwLock<Vec<Arc<[u8]>>> = RwLock::new(Vec::new());

/// This process only inspects images (`imgfs info`, `map`, `check`): see `inspect_only`.
static INSPECT_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Unlocked keys by the SHA-256 of the LUKS header that led to them.
static UNLOCKED: Mutex<Option<HashMap<[u8; 32], Arc<SectorCipher>>>> = Mutex::new(None);

/// Adds a passphrase to try on encrypted images: as it is (QEMU's `secret,file=` and
/// cryptsetup's `--key-file` read a file verbatim), then, if it ends in a newline (`echo pw >
/// file`), without it.
pub fn add_passphrase(passphrase: &[u8]) {
    let mut all = PASSPHRASES.write().unwrap_or_else(PoisonError::into_inner);
    let mut add = |p: &[u8]| {
        if !all.iter().any(|known| **known == *p) {
            all.push(Arc::from(p));
        }
    };
    add(passphrase);
    if let Some(stripped) = passphrase.strip_suffix(b"\n") {
        add(stripped.strip_suffix(b"\r").unwrap_or(stripped));
    }
}

/// Declares that this process only inspects images (`imgfs info`, `map`, `check`, as
/// `qemu-img info` does without a key): an encrypted image whose passphrase was not given
/// opens all the same, its metadata readable and reads of its data failing with the reason.
pub fn inspect_only() {
    INSPECT_ONLY.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether an image may open without its key (`inspect_only`).
pub fn opens_locked() -> bool {
    INSPECT_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Reads a passphrase file (`--key-file`) and adds what it holds.
pub fn add_passphrase_file(path: &std::path::Path) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", e).with_path(path))?;
    if bytes.is_empty() {
        return Err(Error::out_of_range("the key file is empty").with_path(path));
    }
    add_passphrase(&bytes);
    Ok(())
}

/// The passphrases given, in order.
pub fn passphrases() -> Vec<Arc<[u8]>> {
    #[cfg(test)]
    if let Some(own) = testing::OWN.with(|own| own.borrow().clone()) {
        return own;
    }
    PASSPHRASES
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The key of the LUKS header `luks` (whose bytes are `header`): the one unlocked before,
/// else the first one the passphrases given unlock; `read_at` reads the key slots' material
/// at offsets from the header's start.
pub fn luks_key(
    header: &[u8],
    luks: &LuksHeader,
    read_at: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
) -> Result<Arc<SectorCipher>> {
    let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, header)
        .as_ref()
        .try_into()
        .map_err(|_| Error::out_of_range("internal: SHA-256 is not 32 bytes"))?;
    if let Some(key) = lock_unlocked().as_ref().and_then(|keys| keys.get(&digest)) {
        return Ok(Arc::clone(key));
    }
    let given = passphrases();
    if given.is_empty() {
        return Err(Error::unsupported(
            "the image is encrypted (LUKS): give its passphrase with --key-file",
        ));
    }
    for passphrase in &given {
        if let Some(cipher) = luks.unlock(passphrase, read_at)? {
            let cipher = Arc::new(cipher);
            lock_unlocked()
                .get_or_insert_with(HashMap::new)
                .insert(digest, Arc::clone(&cipher));
            return Ok(cipher);
        }
    }
    Err(Error::unsupported(format!(
        "the image is encrypted (LUKS) and none of the {} passphrase(s) given with \
         --key-file opens it",
        given.len()
    )))
}

fn lock_unlocked() -> std::sync::MutexGuard<'static, Option<HashMap<[u8; 32], Arc<SectorCipher>>>> {
    UNLOCKED.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Tests run in parallel in one process: each gives its thread passphrases of its own.
#[cfg(test)]
pub mod testing {
    use std::cell::RefCell;
    use std::sync::Arc;

    thread_local! {
        pub(super) static OWN: RefCell<Option<Vec<Arc<[u8]>>>> = const { RefCell::new(None) };
    }

    /// From now on this thread's opens try `passphrases` alone.
    pub fn use_passphrases(passphrases: &[&[u8]]) {
        OWN.with(|own| {
            *own.borrow_mut() = Some(passphrases.iter().map(|p| Arc::from(*p)).collect())
        });
    }
}
