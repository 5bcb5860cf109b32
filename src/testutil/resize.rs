//! Fault walks over a resize (`Image::resize`): the resize run once for every host write and
//! sync it issues, with that operation failing (EIO, or the disk full from that write on), and
//! once for every write with the power lost right after it (and again with the writes since
//! the last sync before it lost too, as the page cache may write back in any order).
//!
//! A failed resize must report the injected errno. Afterwards QEMU and a fresh imgfs open must
//! each see a valid image (`qemu-img check` finds no corruption; leaks are allowed) of the old
//! or the new size, holding the old disk and zeros past it; and a resize retried on it, a write
//! at the new end and a flush must leave an image `qemu-img check` passes with the new size.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crash::{crash_path, first_difference};
use super::faults::{assert_qemu_replays, read_image};
use super::{assert_qemu_check_no_errors, path_str, qemu, qemu_raw_of};
use crate::host::fault::{self, Fault, OpKind, Watch};
use crate::image::Image;

/// How QEMU is asked about the image after a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oracle {
    /// `qemu-img check`, `info` and `convert` on the image as it is.
    Check,
    /// The same on a copy QEMU replayed its log into (VHDX: `qemu-img check -r leaks` opens it
    /// read-write); `qemu-img check` on the image itself once imgfs replayed it.
    Replay,
}

/// A fault walk over one resize.
pub struct ResizeWalk<'a> {
    /// qemu-img's name of the format.
    pub format: &'static str,
    /// The image file, put back as it is now before every run.
    pub path: PathBuf,
    /// Files the image reads but never writes (a parent).
    pub parents: Vec<PathBuf>,
    /// Opens the image at a path with imgfs, for writing.
    pub open: &'a dyn Fn(&Path) -> Arc<dyn Image>,
    pub new_size: u64,
    pub oracle: Oracle,
}

impl ResizeWalk<'_> {
    /// Every fault: each write and sync failing with EIO, the disk full from each write on,
    /// and power lost after each write (in order, and reordered).
    pub fn all(&self) {
        let base = std::fs::read(&self.path).unwrap();
        let parents: Vec<Vec<u8>> = self
            .parents
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let disk = read_image((self.open)(&self.path).as_ref());
        let paths: Vec<&Path> = std::iter::once(self.path.as_path())
            .chain(self.parents.iter().map(PathBuf::as_path))
            .collect();
        let watch = fault::watch_files(&paths);
        let counts = self.run(&base, &watch, None);
        assert!(
            counts.writes > 0,
            "{}: the resize wrote nothing",
            self.format
        );
        let mut faults = Vec::new();
        for (kind, count) in [(OpKind::Write, counts.writes), (OpKind::Sync, counts.syncs)] {
            faults.extend((0..count).map(|nth| Fault::Fail {
                kind,
                nth,
                errno: libc::EIO,
            }));
        }
        faults.extend((0..counts.writes).map(|nth| Fault::NoSpace { nth }));
        for reordered in [false, true] {
            faults.extend((1..=counts.writes).map(|after_writes| Fault::PowerLoss {
                after_writes,
                reordered,
            }));
        }
        let mut checked = HashSet::new();
        for fault in faults {
            self.run(&base, &watch, Some(fault));
            let what = format!("{} resize to {} with {fault:?}", self.format, self.new_size);
            if checked.insert(crc32c::crc32c(&std::fs::read(&self.path).unwrap())) {
                self.check(&disk, &what);
            }
        }
        restore(&self.path, &base);
        for (path, bytes) in self.parents.iter().zip(parents) {
            assert!(
                std::fs::read(path).unwrap() == bytes,
                "{path:?} was written"
            );
        }
    }

    /// Puts the image back, opens it, arms `fault` and resizes; leaves the file as the fault
    /// left it (the disk at the cut, for power loss). Returns the operations counted.
    fn run(&self, base: &[u8], watch: &Watch, fault: Option<Fault>) -> fault::Counts {
        restore(&self.path, base);
        let img = (self.open)(&self.path);
        let old = img.size();
        watch.arm(fault);
        let result = img.resize(self.new_size);
        let counts = watch.counts();
        let what = format!("{} resize with {fault:?}", self.format);
        match fault {
            None => {
                result.unwrap();
                assert_eq!(img.size(), self.new_size, "{what}");
            }
            // The process goes on against the page cache; the disk is put back below.
            Some(Fault::PowerLoss { .. }) => assert!(result.is_ok(), "{what}: {result:?}"),
            Some(Fault::Fail { errno, .. }) => {
                assert!(watch.fired(), "{what}: the fault was not reached");
                let e = result.expect_err(&what);
                assert_eq!(e.errno(), errno, "{what}: {e}");
                assert!(
                    img.size() == old,
                    "{what}: the size changed after a failure"
                );
            }
            Some(Fault::NoSpace { .. }) => {
                assert!(watch.fired(), "{what}: the fault was not reached");
                let e = result.expect_err(&what);
                assert_eq!(e.errno(), libc::ENOSPC, "{what}: {e}");
                assert!(
                    img.size() == old,
                    "{what}: the size changed after a failure"
                );
            }
        }
        drop(img);
        let disk = watch.disk();
        watch.arm(None);
        if let Some(disk) = disk {
            restore(&self.path, base);
            for (path, bytes) in disk {
                std::fs::write(path, bytes).unwrap();
            }
        }
        counts
    }

    /// Checks the image as a run left it: QEMU and imgfs see the old disk at the old or the
    /// new size; a retried resize succeeds.
    fn check(&self, old: &[u8], what: &str) {
        let theirs = match self.oracle {
            Oracle::Check => {
                assert_qemu_check_no_errors(self.format, &self.path);
                self.qemu_view(&self.path, what)
            }
            Oracle::Replay => {
                let copy = crash_path(&self.path);
                std::fs::copy(&self.path, &copy).unwrap();
                assert_qemu_replays(self.format, &copy, what);
                let theirs = self.qemu_view(&copy, what);
                std::fs::remove_file(&copy).unwrap();
                theirs
            }
        };
        self.assert_old_disk(&theirs, old, &format!("{what}: QEMU"));
        let ours = read_image((self.open)(&self.path).as_ref());
        self.assert_old_disk(&ours, old, &format!("{what}: imgfs"));
        if self.oracle == Oracle::Replay {
            // imgfs replayed the log into the file as it opened it.
            assert_qemu_check_no_errors(self.format, &self.path);
        }
        // A retried resize completes it.
        let img = (self.open)(&self.path);
        img.resize(self.new_size)
            .unwrap_or_else(|e| panic!("{what}: retry: {e}"));
        img.write_at(&[0x5a; 4096], self.new_size - 4096).unwrap();
        img.flush().unwrap();
        drop(img);
        assert_qemu_check_no_errors(self.format, &self.path);
        let mut expected = old.to_vec();
        expected.resize(self.new_size as usize, 0);
        expected[self.new_size as usize - 4096..].fill(0x5a);
        let theirs = self.qemu_view(&self.path, what);
        if let Some(at) = first_difference(&theirs, &expected) {
            panic!("{what}: after a retried resize QEMU reads otherwise at {at:#x}");
        }
    }

    /// The disk QEMU reads from the image at `path`, which must be as long as `qemu-img info`
    /// says.
    fn qemu_view(&self, path: &Path, what: &str) -> Vec<u8> {
        let size = qemu_virtual_size(self.format, path);
        let bytes = qemu_raw_of(path, &format!("-f {}", self.format)).unwrap();
        assert_eq!(
            bytes.len() as u64,
            size,
            "{what}: qemu-img info and convert"
        );
        bytes
    }

    /// `disk` is `old` at the old or the new size, with zeros past the old end.
    fn assert_old_disk(&self, disk: &[u8], old: &[u8], what: &str) {
        let len = disk.len() as u64;
        assert!(
            len == old.len() as u64 || len == self.new_size,
            "{what}: {len} bytes, neither the old nor the new size"
        );
        if let Some(at) = first_difference(&disk[..old.len()], old) {
            panic!("{what}: the old disk differs at {at:#x}");
        }
        if let Some(at) = disk[old.len()..].iter().position(|&b| b != 0) {
            panic!(
                "{what}: byte {:#x} past the old end is not zero",
                old.len() + at
            );
        }
    }
}

/// The virtual size `qemu-img info` gives for the `format` image at `path`.
pub fn qemu_virtual_size(format: &str, path: &Path) -> u64 {
    let args = ["info", "-U", "-f", format, "--output=json", path_str(path)];
    let out = qemu("qemu-img", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "qemu-img info: {text}");
    // The image's own size comes after its children's (the file node's).
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("\"virtual-size\": "))
        .next_back()
        .and_then(|v| v.trim_end_matches(',').parse().ok())
        .expect("qemu-img info gives a virtual size")
}

/// Writes `bytes` to `path` unless it holds them already.
fn restore(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).unwrap() != bytes {
        std::fs::write(path, bytes).unwrap();
    }
}
