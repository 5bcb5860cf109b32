//! This process's own writes to host files, counted per file (device and inode), so that the
//! catalog can tell a change it made itself (a write through the mount moves the image file's
//! mtime, ctime and size) from a change someone else made (an image copied over a served one).
//!
//! Every mutating `HostFile` call counts one write started before it reaches the file and one
//! finished after it returns, and notes the ctime, mtime and size the write left on the file.
//! A stat of the file taken while both counters stayed equal and unchanged reflects every write
//! this process made up to then and none in flight; a ctime later than the last one we left is
//! someone else's change, and one that left our mtime and size changed only the file's
//! metadata (a `chattr`, a new hard link, an ACL). (Reading the ctime back also makes the
//! kernel stamp the next change of the file with a fine-grained time, so a change right after
//! ours is still later than ours.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// What a write left on the file: its times in nanoseconds since the epoch, and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileState {
    pub ctime: u64,
    pub mtime: u64,
    pub size: u64,
}

impl FileState {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        FileState {
            ctime: ctime_ns(meta),
            mtime: mtime_ns(meta),
            size: meta.len(),
        }
    }
}

/// The counters of one host file.
#[derive(Debug, Default)]
pub struct WriteActivity {
    started: AtomicU64,
    finished: AtomicU64,
    /// What the write with the latest ctime left on the file.
    last: Mutex<FileState>,
}

/// A reading of a file's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteCount {
    pub started: u64,
    pub finished: u64,
    /// What the finished write of ours with the latest ctime left (all 0 if none).
    pub last: FileState,
}

impl WriteCount {
    /// No write of this process is in flight.
    pub fn is_quiet(&self) -> bool {
        self.started == self.finished
    }
}

impl WriteActivity {
    /// Counts one write around `write`; `state_after` reads what it left on the file once it
    /// is done (`None` if the file cannot be asked).
    pub fn around<T>(
        &self,
        write: impl FnOnce() -> T,
        state_after: impl FnOnce() -> Option<FileState>,
    ) -> T {
        self.started.fetch_add(1, Ordering::SeqCst);
        let result = write();
        if let Some(state) = state_after() {
            let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
            if state.ctime >= last.ctime {
                *last = state;
            }
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        result
    }

    fn count(&self) -> WriteCount {
        // Finished first: a reading never shows more writes finished than started, and it
        // shows the state of every write it counts as finished.
        let finished = self.finished.load(Ordering::SeqCst);
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let started = self.started.load(Ordering::SeqCst);
        WriteCount {
            started,
            finished,
            last,
        }
    }
}

/// Device and inode: which file, whatever its name.
pub type FileKey = (u64, u64);

/// A file's ctime in nanoseconds since the epoch.
pub fn ctime_ns(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let secs = u64::try_from(meta.ctime()).unwrap_or(0);
    let nsecs = u64::try_from(meta.ctime_nsec()).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

/// A file's mtime in nanoseconds since the epoch.
pub fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let secs = u64::try_from(meta.mtime()).unwrap_or(0);
    let nsecs = u64::try_from(meta.mtime_nsec()).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

// Entries are never removed: counters must keep growing across reopenings of a file, or a
// file closed and reopened would look unwritten. One entry per file ever written is small.
fn registry() -> &'static Mutex<HashMap<FileKey, Arc<WriteActivity>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<FileKey, Arc<WriteActivity>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The counters of file `key`, created on first use.
pub fn activity_of(key: FileKey) -> Arc<WriteActivity> {
    let mut map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(map.entry(key).or_default())
}

/// How many writes this process has started and finished on file `key` (zero if none ever).
pub fn own_writes(key: FileKey) -> WriteCount {
    let map = registry().lock().unwrap_or_else(PoisonError::into_inner);
    map.get(&key).map(|a| a.count()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_survive_reopening_and_show_writes_in_flight() {
        let key = (u64::MAX, 42);
        let state = |ctime, size| {
            Some(FileState {
                ctime,
                mtime: ctime,
                size,
            })
        };
        assert_eq!(own_writes(key), WriteCount::default());
        let activity = activity_of(key);
        let inside = activity.around(|| own_writes(key), || state(77, 4096));
        assert_eq!(
            (inside.started, inside.finished, inside.last.ctime),
            (1, 0, 0)
        );
        assert!(!inside.is_quiet());
        drop(activity);
        let after = own_writes(key);
        assert_eq!((after.started, after.finished), (1, 1));
        assert_eq!(after.last, state(77, 4096).unwrap());
        assert!(after.is_quiet());
        activity_of(key).around(|| (), || state(5, 512));
        let reopened = own_writes(key);
        assert_eq!(reopened.finished, 2, "a reopened file keeps counting");
        assert_eq!(
            reopened.last,
            state(77, 4096).unwrap(),
            "the state of the latest ctime is kept"
        );
        activity_of(key).around(|| (), || None);
        assert_eq!(own_writes(key).finished, 3, "counted without a state");
    }
}
