//! The QEMU lock bytes this process holds, per file (device and inode). Open file description
//! locks conflict between two descriptions of one file even in one process, so a second
//! instance of a file this process already serves would look held by "another process". The
//! registry tells our own holds apart: while this process holds a lock byte on a file, no other
//! process can hold a conflicting permission on it (QEMU checks before it takes one, as we do).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};

use super::activity::FileKey;

fn registry() -> &'static Mutex<HashMap<FileKey, Vec<u64>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<FileKey, Vec<u64>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// Records that this process took lock `byte` on file `key` (once per holding description).
pub fn add(key: FileKey, byte: u64) {
    let mut map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    map.entry(key).or_default().push(byte);
}

/// Forgets one hold of `byte` on `key`.
pub fn remove(key: FileKey, byte: u64) {
    let mut map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(bytes) = map.get_mut(&key) {
        if let Some(at) = bytes.iter().position(|&b| b == byte) {
            bytes.swap_remove(at);
        }
        if bytes.is_empty() {
            map.remove(&key);
        }
    }
}

/// How many descriptions of this process hold `byte` on `key`.
pub fn holds(key: FileKey, byte: u64) -> usize {
    let map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    map.get(&key)
        .map_or(0, |bytes| bytes.iter().filter(|&&b| b == byte).count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_counted_per_description() {
        let key = (u64::MAX, 7);
        add(key, 101);
        add(key, 101);
        add(key, 100);
        assert_eq!(holds(key, 101), 2);
        remove(key, 101);
        assert_eq!(holds(key, 101), 1);
        remove(key, 101);
        remove(key, 100);
        assert_eq!(holds(key, 101), 0);
        assert_eq!(holds(key, 100), 0);
    }
}
