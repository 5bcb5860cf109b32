//! Test-only fault injection under `HostFile`. A test watches one or more files by their paths
//! (`watch`, `watch_files`); every `HostFile` opened on such a path while the watch lives hands
//! each read, write and sync to the watch before carrying it out (`Watch::before`), and the
//! watch decides its fate.
//!
//! Two things a watch does, each switched on by the test:
//!
//! - Recording (`start` .. `stop`): the writes and syncs issued on the file, in order, with the
//!   file's content at `start`. From that a test rebuilds the file as a crash would have left
//!   it had only the first k writes reached the disk (`Recording::after_writes`), for every k.
//! - A fault (`arm`), counted over every watched file from the moment it is armed:
//!   - `Fault::Fail`: the k-th read, write or sync fails with a given errno (EIO, ENOSPC, ...)
//!     and is not carried out; every other operation is.
//!   - `Fault::NoSpace`: the file system fills up at the k-th write: that write fails with
//!     ENOSPC, and so does every later write that would grow its file.
//!   - `Fault::PowerLoss`: power is lost after the k-th write. The watched files as they are
//!     then (the first k writes applied, synced or not) are kept as "the disk" (`Watch::disk`):
//!     every later write is lost, including the unsynced ones the page cache would have lost.
//!     The process itself goes on against the page cache, as a real one does until the power
//!     is really gone, so a test can let its workload finish and then put the disk back.
//!     `reordered` also loses the writes issued since each file's last sync before the k-th
//!     write: the page cache writes pages back in any order, and only a sync orders them, so
//!     a driver that relies on the order of two writes without a sync between them is caught.
//!
//! An armed watch stands in for the disk: syncs of its files return without calling
//! `fdatasync` (what is durable is the watch's to model), which keeps walks of hundreds of
//! runs fast.
//!
//! Watches are keyed by path, so files a driver opens by itself (VMDK extents) are covered as
//! well as the ones a test opens. Every test works in its own temporary directory, so tests
//! running in parallel never see each other's watches. None of this exists in a release
//! build: there `HostFile` has no hook at all.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use crate::error::{Error, Result};

/// A host operation, as `HostFile` announces it before carrying it out.
#[derive(Debug, Clone, Copy)]
pub enum Request<'a> {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: &'a [u8] },
    Sync,
}

impl Request<'_> {
    fn kind(&self) -> OpKind {
        match self {
            Request::Read { .. } => OpKind::Read,
            Request::Write { .. } => OpKind::Write,
            Request::Sync => OpKind::Sync,
        }
    }
}

/// The kinds of operations a fault counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Read,
    Write,
    Sync,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::Sync => "fdatasync",
        }
    }
}

/// What an armed watch does to the operations on its files; `nth` and `after_writes` count
/// from 0 over all watched files since `Watch::arm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The `nth` operation of `kind` fails with `errno` and is not carried out.
    Fail {
        kind: OpKind,
        nth: usize,
        errno: i32,
    },
    /// The `nth` write fails with ENOSPC, and so does every later write that ends past the
    /// end of its file.
    NoSpace { nth: usize },
    /// Power is lost after `after_writes` writes: the files as they are when the next write
    /// comes are kept as the disk; with `reordered`, the files as they were at their last
    /// sync, with only the last of those writes applied.
    PowerLoss {
        after_writes: usize,
        reordered: bool,
    },
}

/// How many operations of each kind the watched files saw since `Watch::arm`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub reads: usize,
    pub writes: usize,
    pub syncs: usize,
}

impl Counts {
    pub fn of(&self, kind: OpKind) -> usize {
        match kind {
            OpKind::Read => self.reads,
            OpKind::Write => self.writes,
            OpKind::Sync => self.syncs,
        }
    }
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
            Op::Write { offset, data } => Some((*offset, data)),
            Op::Sync => None,
        });
        for (offset, data) in writes.take(k) {
            apply(&mut bytes, offset, data);
        }
        bytes
    }
}

/// The watched files as power loss left them: (canonical path, bytes) for each file written
/// since the watch was armed (the others are as they were).
pub type Disk = Vec<(PathBuf, Vec<u8>)>;

/// What a watch does now, behind its mutex.
#[derive(Default)]
struct State {
    recording: Option<Recording>,
    fault: Option<Fault>,
    counts: Counts,
    /// Armed (with a fault or to count): syncs are not carried out.
    armed: bool,
    /// Whether the armed fault took effect (failed an operation, or cut the power).
    fired: bool,
    disk: Option<Disk>,
    /// Which files were written since arming.
    written: Vec<bool>,
    /// For reordered power loss: each written file as of its last sync, and the writes (file
    /// index, offset, data) issued since.
    synced: Vec<Option<Vec<u8>>>,
    unsynced: Vec<(usize, u64, Vec<u8>)>,
}

/// The watch on a set of files.
pub struct Watch {
    /// The files' canonical paths.
    paths: Vec<PathBuf>,
    state: Mutex<State>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Watch({:?})", self.paths)
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
    watch_files(&[path])
}

/// Watches the existing files at `paths` as one: a fault counts the operations on all of
/// them together, in the order they are issued, and power loss keeps all of them.
pub fn watch_files(paths: &[&Path]) -> Arc<Watch> {
    let paths = paths
        .iter()
        .map(|p| std::fs::canonicalize(p).expect("a watched file exists"))
        .collect();
    let watch = Arc::new(Watch {
        paths,
        state: Mutex::new(State::default()),
    });
    let mut all = watches();
    all.retain(|w| w.strong_count() > 0);
    all.push(Arc::downgrade(&watch));
    watch
}

/// The watch on the file at `path` and the file's index in it, if a test set one.
pub(super) fn watch_of(path: &Path) -> Option<(Arc<Watch>, usize)> {
    let all = watches();
    if all.is_empty() {
        return None;
    }
    let path = std::fs::canonicalize(path).ok()?;
    all.iter().filter_map(Weak::upgrade).find_map(|w| {
        let index = w.paths.iter().position(|p| *p == path)?;
        Some((w, index))
    })
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording, from the file's content now (the page cache's view: earlier writes
    /// count as on disk). Recording is meant for a watch on one file.
    pub fn start(&self) {
        let base = std::fs::read(&self.paths[0]).expect("read the watched file");
        self.state().recording = Some(Recording {
            base,
            ops: Vec::new(),
        });
    }

    /// Stops recording and returns what was recorded.
    pub fn stop(&self) -> Recording {
        self.state()
            .recording
            .take()
            .expect("recording was started")
    }

    /// Arms `fault` (or, with `None`, only counts), counting operations from zero.
    pub fn arm(&self, fault: Option<Fault>) {
        let mut state = self.state();
        state.fault = fault;
        state.armed = true;
        state.counts = Counts::default();
        state.fired = false;
        state.disk = None;
        state.written = vec![false; self.paths.len()];
        state.synced = vec![None; self.paths.len()];
        state.unsynced.clear();
    }

    /// The operations counted since `arm`.
    pub fn counts(&self) -> Counts {
        self.state().counts
    }

    /// Whether the armed fault took effect.
    pub fn fired(&self) -> bool {
        self.state().fired
    }

    /// The watched files as power loss left them, once it happened.
    pub fn disk(&self) -> Option<Disk> {
        self.state().disk.clone()
    }

    /// Called by `HostFile` before each operation on watched file `index` (open as `file`):
    /// `Ok(true)` lets it happen, `Ok(false)` means it succeeds without being carried out (a
    /// sync of an armed watch), an error is what it fails with instead.
    pub(super) fn before(
        &self,
        request: Request<'_>,
        index: usize,
        file: &std::fs::File,
    ) -> Result<bool> {
        let mut state = self.state();
        if let Some(recording) = state.recording.as_mut() {
            match request {
                Request::Read { .. } => {}
                Request::Write { offset, data } => recording.ops.push(Op::Write {
                    offset,
                    data: data.to_vec(),
                }),
                Request::Sync => recording.ops.push(Op::Sync),
            }
        }
        let kind = request.kind();
        if kind == OpKind::Write && state.written.get(index) == Some(&false) {
            // First written now: as it is, it is what it was when armed.
            state.written[index] = true;
            if let Some(Fault::PowerLoss {
                reordered: true, ..
            }) = state.fault
            {
                state.synced[index] = self.paths.get(index).map(|p| read(p));
            }
        }
        let nth = state.counts.of(kind);
        match kind {
            OpKind::Read => state.counts.reads += 1,
            OpKind::Write => state.counts.writes += 1,
            OpKind::Sync => state.counts.syncs += 1,
        }
        let failure = match (state.fault, request) {
            (
                Some(Fault::Fail {
                    kind: k,
                    nth: n,
                    errno,
                }),
                _,
            ) if k == kind && n == nth => Some(errno),
            (Some(Fault::NoSpace { nth: n }), Request::Write { offset, data }) => {
                let end = offset.saturating_add(data.len() as u64);
                let grows = file.metadata().map_or(true, |m| end > m.len());
                (nth == n || (nth > n && grows)).then_some(libc::ENOSPC)
            }
            (
                Some(Fault::PowerLoss {
                    after_writes,
                    reordered: false,
                }),
                Request::Write { .. },
            ) if nth == after_writes => {
                let written = self.paths.iter().zip(&state.written).filter(|(_, &w)| w);
                state.disk = Some(written.map(|(p, _)| (p.clone(), read(p))).collect());
                state.fired = true;
                None
            }
            (
                Some(Fault::PowerLoss {
                    after_writes,
                    reordered: true,
                }),
                Request::Write { offset, data },
            ) if state.disk.is_none() => {
                if nth + 1 == after_writes {
                    let mut disk: Disk = Vec::new();
                    for (i, (path, synced)) in self.paths.iter().zip(&state.synced).enumerate() {
                        if let Some(bytes) = synced {
                            let mut bytes = bytes.clone();
                            if i == index {
                                apply(&mut bytes, offset, data);
                            }
                            disk.push((path.clone(), bytes));
                        }
                    }
                    state.disk = Some(disk);
                    state.fired = true;
                } else {
                    state.unsynced.push((index, offset, data.to_vec()));
                }
                None
            }
            (
                Some(Fault::PowerLoss {
                    reordered: true, ..
                }),
                Request::Sync,
            ) if state.disk.is_none() => {
                // The file's writes so far are durable once this sync returns.
                let (now, later): (Vec<_>, Vec<_>) = std::mem::take(&mut state.unsynced)
                    .into_iter()
                    .partition(|(i, _, _)| *i == index);
                state.unsynced = later;
                if let Some(Some(synced)) = state.synced.get_mut(index) {
                    for (_, offset, data) in now {
                        apply(synced, offset, &data);
                    }
                }
                None
            }
            _ => None,
        };
        let Some(errno) = failure else {
            return Ok(!(state.armed && kind == OpKind::Sync));
        };
        state.fired = true;
        let e = Error::io(
            format!("{} (injected fault)", kind.name()),
            std::io::Error::from_raw_os_error(errno),
        );
        Err(match request {
            Request::Read { offset, .. } | Request::Write { offset, .. } => e.at_offset(offset),
            Request::Sync => e,
        })
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).expect("read a watched file")
}

/// Writes `data` at `offset` into `bytes`, growing them where it ends past them.
fn apply(bytes: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let offset = offset as usize;
    let end = offset + data.len();
    if bytes.len() < end {
        bytes.resize(end, 0);
    }
    bytes[offset..end].copy_from_slice(data);
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

    /// Two watched files and their `HostFile`s.
    fn two_files(dir: &crate::testutil::TempDir) -> (Arc<Watch>, HostFile, HostFile) {
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"aaaa").unwrap();
        std::fs::write(&b, b"bbbb").unwrap();
        let watch = watch_files(&[&a, &b]);
        let fa = HostFile::open(&a, true).unwrap();
        let fb = HostFile::open(&b, true).unwrap();
        (watch, fa, fb)
    }

    #[test]
    fn the_nth_operation_of_a_kind_fails_with_its_errno_and_is_not_carried_out() {
        let dir = crate::testutil::TempDir::new();
        let (watch, a, b) = two_files(&dir);
        watch.arm(Some(Fault::Fail {
            kind: OpKind::Write,
            nth: 1,
            errno: libc::EIO,
        }));
        a.write_all_at(b"A", 0).unwrap();
        assert!(!watch.fired());
        let e = b.write_all_at(b"B", 0).unwrap_err();
        assert_eq!(e.errno(), libc::EIO);
        assert_eq!(e.path(), Some(b.path()));
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(watch.fired());
        a.write_all_at(b"C", 1).unwrap();
        assert_eq!(std::fs::read(b.path()).unwrap(), b"bbbb");
        assert_eq!(std::fs::read(a.path()).unwrap(), b"ACaa");

        watch.arm(Some(Fault::Fail {
            kind: OpKind::Sync,
            nth: 0,
            errno: libc::EIO,
        }));
        a.read_exact_at(&mut [0u8; 1], 0).unwrap();
        assert_eq!(a.sync_data().unwrap_err().errno(), libc::EIO);
        b.sync_data().unwrap();
        watch.arm(Some(Fault::Fail {
            kind: OpKind::Read,
            nth: 1,
            errno: libc::EIO,
        }));
        b.read_exact_at(&mut [0u8; 1], 0).unwrap();
        assert_eq!(
            a.read_exact_at(&mut [0u8; 1], 0).unwrap_err().errno(),
            libc::EIO
        );
        assert_eq!(
            watch.counts(),
            Counts {
                reads: 2,
                writes: 0,
                syncs: 0
            }
        );
    }

    #[test]
    fn a_full_disk_fails_the_nth_write_and_every_later_write_that_grows_a_file() {
        let dir = crate::testutil::TempDir::new();
        let (watch, a, b) = two_files(&dir);
        watch.arm(Some(Fault::NoSpace { nth: 1 }));
        a.write_all_at(b"0123456", 0).unwrap();
        assert_eq!(b.write_all_at(b"B", 0).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(b.write_all_at(b"BB", 3).unwrap_err().errno(), libc::ENOSPC);
        b.write_all_at(b"BB", 2).unwrap();
        a.write_all_at(b"x", 6).unwrap();
        assert_eq!(a.write_all_at(b"x", 7).unwrap_err().errno(), libc::ENOSPC);
        assert_eq!(std::fs::read(b.path()).unwrap(), b"bbBB");
        assert_eq!(watch.counts().writes, 6);
    }

    #[test]
    fn power_loss_keeps_the_files_as_the_first_writes_left_them() {
        let dir = crate::testutil::TempDir::new();
        let (watch, a, b) = two_files(&dir);
        watch.arm(Some(Fault::PowerLoss {
            after_writes: 2,
            reordered: false,
        }));
        a.write_all_at(b"1", 0).unwrap();
        b.write_all_at(b"2", 0).unwrap();
        a.sync_data().unwrap();
        assert!(watch.disk().is_none());
        a.write_all_at(b"3", 1).unwrap();
        b.write_all_at(b"4", 1).unwrap();
        assert!(watch.fired());
        let disk = watch.disk().unwrap();
        let contents: Vec<&[u8]> = disk.iter().map(|(_, bytes)| &bytes[..]).collect();
        assert_eq!(contents, [&b"1aaa"[..], &b"2bbb"[..]]);
        assert_eq!(disk[1].0, std::fs::canonicalize(b.path()).unwrap());
        // The process goes on against the page cache.
        let mut buf = [0u8; 2];
        a.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"13");
    }

    #[test]
    fn reordered_power_loss_keeps_the_last_synced_state_and_the_last_write_only() {
        let dir = crate::testutil::TempDir::new();
        let (watch, a, b) = two_files(&dir);
        watch.arm(Some(Fault::PowerLoss {
            after_writes: 4,
            reordered: true,
        }));
        a.write_all_at(b"1", 0).unwrap();
        a.sync_data().unwrap();
        a.write_all_at(b"2", 1).unwrap();
        b.write_all_at(b"3", 0).unwrap();
        assert!(watch.disk().is_none());
        a.write_all_at(b"4", 2).unwrap();
        assert!(watch.fired());
        b.write_all_at(b"5", 1).unwrap();
        let disk = watch.disk().unwrap();
        let contents: Vec<&[u8]> = disk.iter().map(|(_, bytes)| &bytes[..]).collect();
        assert_eq!(contents, [&b"1a4a"[..], &b"bbbb"[..]]);
    }
}
