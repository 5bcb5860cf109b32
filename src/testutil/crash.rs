//! Crash consistency of one flush, with QEMU as the oracle. A test records the host writes a
//! flush issues on an image file (`host::fault`), then rebuilds the file as a crash after each
//! of them would have left it, and requires of every such image what the design promises:
//! `qemu-img check` finds no corruption (leaks are allowed), QEMU and imgfs read every byte as
//! it was after the previous complete flush or as this flush made it, and a cluster QEMU
//! allocates on the crashed image lands on none of the data.

use std::path::{Path, PathBuf};

use super::{assert_qemu_check_no_errors, qemu_io_on, qemu_raw_of};
use crate::host::fault::Recording;

/// What a crashed image must satisfy.
pub struct CrashCheck<'a> {
    /// The qemu-img name of the format.
    pub format: &'static str,
    /// The guest disk after the last complete flush, and after the recorded flush.
    pub old: &'a [u8],
    pub new: &'a [u8],
    /// A guest offset unallocated in both, where QEMU allocates on each crashed image.
    pub fresh: u64,
    /// Opens the image at a path with imgfs and reads the whole disk.
    pub read_ours: &'a dyn Fn(&Path) -> Vec<u8>,
}

impl CrashCheck<'_> {
    /// For every k from 0 to all, the image at `path` (as it was when `recording` started)
    /// with only the first k recorded writes applied must pass `check`.
    pub fn every_prefix(&self, path: &Path, recording: &Recording) {
        let crashed = crash_path(path);
        let writes = recording.writes();
        for k in 0..=writes {
            std::fs::write(&crashed, recording.after_writes(k)).unwrap();
            let what = format!("crash after {k} of {writes} writes {:?}", recording.ops());
            self.check(&crashed, k, writes, &what);
        }
        std::fs::remove_file(&crashed).unwrap();
    }

    /// Checks the crashed image at `path`, cut after `k` of `writes` writes.
    pub fn check(&self, path: &Path, k: usize, writes: usize, what: &str) {
        assert_qemu_check_no_errors(self.format, path);
        let theirs = self.read_theirs(path);
        assert_old_or_new(&theirs, self.old, self.new, what);
        if k == writes {
            assert!(theirs == self.new, "{what}: not the new disk");
        }
        assert!(
            (self.read_ours)(path) == theirs,
            "{what}: imgfs reads otherwise"
        );
        self.assert_qemu_allocates_elsewhere(path, &theirs, what);
    }

    /// What QEMU reads from the image at `path`.
    pub fn read_theirs(&self, path: &Path) -> Vec<u8> {
        qemu_raw_of(path, &format!("-f {}", self.format)).unwrap()
    }

    /// QEMU writes 4 KiB at `fresh` into the image at `path`, which reads `before`: that must
    /// change those bytes and nothing else.
    pub fn assert_qemu_allocates_elsewhere(&self, path: &Path, before: &[u8], what: &str) {
        assert_qemu_allocates_elsewhere(self.format, path, self.fresh, before, what);
    }
}

/// QEMU writes 4 KiB at guest offset `fresh` into the `format` image at `path`, which reads
/// `before`: that must change those bytes and nothing else (a QEMU that trusts stale metadata
/// puts its new cluster over existing data).
pub fn assert_qemu_allocates_elsewhere(
    format: &str,
    path: &Path,
    fresh: u64,
    before: &[u8],
    what: &str,
) {
    let command = format!("write -P 0xe7 {fresh} 4k");
    qemu_io_on(format, path, &[&command]).unwrap();
    let mut expected = before.to_vec();
    let fresh = fresh as usize;
    expected[fresh..fresh + 4096].fill(0xe7);
    let after = qemu_raw_of(path, &format!("-f {format}")).unwrap();
    if let Some(at) = first_difference(&after, &expected) {
        panic!("{what}: after QEMU's write at {fresh:#x}, the disk differs at {at:#x}");
    }
}

/// Where the crashed copy of the image at `path` goes: next to it, so a relative backing file
/// name still resolves.
pub fn crash_path(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap().to_string_lossy();
    path.with_file_name(format!("crashed-{name}"))
}

/// Every byte of `got` must be the one of `old` or the one of `new`.
pub fn assert_old_or_new(got: &[u8], old: &[u8], new: &[u8], what: &str) {
    assert_eq!(got.len(), new.len(), "{what}: disk size");
    // Whole chunks compare with memcmp; only a chunk equal to neither is looked into (disks
    // of hundreds of MiB are compared in unoptimised test builds).
    let chunks = got
        .chunks(CHUNK)
        .zip(old.chunks(CHUNK).zip(new.chunks(CHUNK)));
    for (index, (g, (o, n))) in chunks.enumerate() {
        if g == o || g == n {
            continue;
        }
        if let Some(i) = (0..g.len()).find(|&i| g[i] != o[i] && g[i] != n[i]) {
            let at = index * CHUNK + i;
            panic!(
                "{what}: byte {at:#x} is {:#04x}, neither the old {:#04x} nor the new {:#04x}",
                g[i], o[i], n[i]
            );
        }
    }
}

const CHUNK: usize = 4096;

/// The first offset where `a` and `b` differ (or where the shorter one ends).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    let chunks = a.chunks(CHUNK).zip(b.chunks(CHUNK));
    let (index, (x, y)) = chunks.enumerate().find(|(_, (x, y))| x != y)?;
    Some(
        index * CHUNK
            + x.iter()
                .zip(y.iter())
                .position(|(p, q)| p != q)
                .unwrap_or(0),
    )
}
