//! Test-only fault injection under `HostFile`. A test watches a file by its path (`watch`);
//! every `HostFile` opened on that path while the watch lives hands each read, write and sync
//! to the watch before carrying it out (`Watch::before`), and the watch decides its fate.
//!
//! The one mode so far is recording: between `start` and `stop` the watch keeps the writes
//! and syncs issued on the file, in order, together with the file's content at `start`. From
//! that a test rebuilds the file as a crash would have left it had only the first k writes
//! reached the disk (`Recording::after_writes`), for every k. Making the k-th operation fail
//! (EIO, ENOSPC) or losing power (dropping every write after the k-th, unsynced ones too) are
//! further modes of the same hook: `before` returns the error an operation fails with.
//!
//! Watches are keyed by path, so files a driver opens by itself (VMDK extents) are covered as
//! well as the ones a test opens. Every test works in its own temporary directory, so tests
//! running in parallel never see each other's watches. None of this exists in a release
//! build: there `HostFile` has no hook at all.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::error::Result;

/// A host operation, as `HostFile` announces it before carrying it out.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: &'a [u8] },
    Sync,
}

/// A recorded operation.
#[derive(Clone, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, data: Vec<u8> },
    Sync,
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Write { offset, data } => write!(f, "write {} bytes at {offset:#x}", data.len()),
            Op::Sync => write!(f, "sync"),
        }
    }
}

/// The writes and syncs issued on a file between `Watch::start` and `Watch::stop`.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The file's bytes at `start`.
    base: Vec<u8>,
    ops: Vec<Op>,
}

impl Recording {
    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    /// How many writes were issued.
    pub fn writes(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| matches!(op, Op::Write { .. }))
            .count()
    }

    /// The file as it would be if only the first `k` writes had reached the disk: the bytes
    /// at `start` with those writes applied in order (growing the file where they end past it).
    pub fn after_writes(&self, k: usize) -> Vec<u8> {
        let mut bytes = self.base.clone();
        let writes = self.ops.iter().filter_map(|op| match op {
            Op::Write { offset, data } => Some((*offset as usize, data)),
            Op::Sync => None,
        });
        for (offset, data) in writes.take(k) {
            let end = offset + data.len();
            if bytes.len() < end {
                bytes.resize(end, 0);
            }
            bytes[offset..end].copy_from_slice(data);
        }
        bytes
    }
}

/// The watch on one file.
pub struct Watch {
    /// The file's canonical path.
    path: PathBuf,
    recording: Mutex<Option<Recording>>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Watch({})", self.path.display())
    }
}

/// The live watches; a watch nobody holds any more is gone.
static WATCHES: Mutex<Vec<Weak<Watch>>> = Mutex::new(Vec::new());

fn watches() -> MutexGuard<'static, Vec<Weak<Watch>>> {
    WATCHES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Watches the existing file at `path`: `HostFile`s opened on it from now on report to the
/// returned watch.
pub fn watch(path: &Path) -> Arc<Watch> {
    let path = std::fs::canonicalize(path).expect("a watched file exists");
    let watch = Arc::new(Watch {
        path,
        recording: Mutex::new(None),
    });
    let mut all = watches();
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&watch));
    watch
}

/// The watch on the file at `path`, if a test set one.
pub(super) fn watch_of(path: &Path) -> Option<Arc<Watch>> {
    let all = watches();
    if all.is_empty() {
        return None;
    }
    let path = std::fs::canonicalize(path).ok()?;
    all.iter()
        .filter_map(Weak::upgrade)
        .find(|w| w.path == path)
}

impl Watch {
    fn recording(&self) -> MutexGuard<'_, Option<Recording>> {
        self.recording
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording, from the file's content now (the page cache's view: earlier writes
    /// count as on disk).
    pub fn start(&self) {
        let base = std::fs::read(&self.path).expect("read the watched file");
        *self.recording() = Some(Recording {
            base,
            ops: Vec::new(),
        });
    }

    /// Stops recording and returns what was recorded.
    pub fn stop(&self) -> Recording {
        self.recording().take().expect("recording was started")
    }

    /// Called by `HostFile` before each operation on the watched file; `Ok` lets it happen.
    /// Writes and syncs are recorded as issued (in tests the host file system does not fail
    /// them).
    pub(super) fn before(&self, request: Request<'_>) -> Result<()> {
        if let Some(recording) = self.recording().as_mut() {
            match request {
                Request::Read { .. } => {}
                Request::Write { offset, data } => recording.ops.push(Op::Write {
                    offset,
                    data: data.to_vec(),
                }),
                Request::Sync => recording.ops.push(Op::Sync),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::HostFile;
    use super::*;

    #[test]
    fn records_writes_and_syncs_of_watched_files_only() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        let other = dir.path().join("g");
        std::fs::write(&path, b"abcdef").unwrap();
        std::fs::write(&other, b"xyz").unwrap();
        let watch = watch(&path);
        // Opened through another spelling of the same path.
        let f = HostFile::open(&dir.path().join(".").join("f"), true).unwrap();
        let g = HostFile::open(&other, true).unwrap();
        f.write_all_at(b"0", 0).unwrap();
        watch.start();
        f.write_all_at(b"XY", 1).unwrap();
        g.write_all_at(b"!", 0).unwrap();
        f.sync_data().unwrap();
        f.read_exact_at(&mut [0u8; 2], 0).unwrap();
        f.write_all_at(b"tail", 8).unwrap();
        let recording = watch.stop();
        f.write_all_at(b"1", 0).unwrap();
        assert_eq!(
            recording.ops(),
            [
                Op::Write {
                    offset: 1,
                    data: b"XY".to_vec()
                },
                Op::Sync,
                Op::Write {
                    offset: 8,
                    data: b"tail".to_vec()
                },
            ]
        );
        assert_eq!(recording.writes(), 2);
        assert_eq!(recording.after_writes(0), b"0bcdef");
        assert_eq!(recording.after_writes(1), b"0XYdef");
        assert_eq!(recording.after_writes(2), b"0XYdef\0\0tail");
        assert_eq!(recording.after_writes(9), recording.after_writes(2));
    }
}
