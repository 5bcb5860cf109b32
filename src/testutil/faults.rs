//! Fault walks: a format's workload run once for every host operation it issues, with that
//! operation failing or the power lost right there (every crash point, in the style of ALICE
//! and dm-log-writes, not a random sample), and the image checked afterwards.
//!
//! A test describes its image (`Walk`): the files it consists of, how imgfs opens it, how QEMU
//! reads it (`Oracle`), and a workload of steps that allocates, flushes and allocates again.
//! `Walk::all` then runs the workload
//!
//! - for every k, with power lost after the k-th write (`Fault::PowerLoss`): the workload goes
//!   on against the page cache, and then the files are put back as they were at the cut; and
//!   again with only the last of the writes since the last sync reaching the disk, which
//!   catches two writes whose order matters without a sync between them;
//! - for every k, with the k-th write, sync or read failing with EIO, and with the disk full
//!   from the k-th write on (ENOSPC): the workload goes on past errors, as a writer that
//!   retries or carries on would, and the files are checked as they are after it.
//!
//! While the workload runs, the step during which the fault hit must fail with its errno
//! (never a silent success); a failed flush must leave the image read-only with the reason
//! given; from then on writes fail with EROFS and flushes fail, reads go on; no other step may
//! fail (on a full disk, only with ENOSPC). Reads must return what was written.
//!
//! Afterwards the image must pass what a crash check asks (`testutil::crash`): `qemu-img
//! check` finds no corruption (leaks are allowed), every 512-byte sector reads through QEMU
//! as one of the values it held since the last flush that succeeded before the fault (so
//! exactly what that flush acknowledged where nothing was written after it), and a fresh imgfs
//! open reads the same bytes as QEMU.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crash::{assert_qemu_allocates_elsewhere, crash_path, first_difference};
use super::{assert_qemu_check_no_errors, path_str, qemu, qemu_raw_of};
use crate::error::{ErrorKind, Result};
use crate::host::fault::{self, Counts, Fault, OpKind, Watch};
use crate::image::Image;

const SECTOR: usize = 512;

/// One step of a workload.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    /// Writes `len` bytes of `byte` at a guest offset.
    Write(u64, usize, u8),
    Flush,
    /// Reads `len` bytes at a guest offset; they must be what was written.
    Read(u64, usize),
    /// Discards `len` bytes at a guest offset: they read as zeros after it, like a write of
    /// zeros (a discard that writes metadata back may stop the image, like a flush).
    Discard(u64, u64),
}

/// How QEMU reads (and checks) an image after a fault.
pub enum Oracle<'a> {
    /// `qemu-img check` (leaks allowed), then `qemu-img convert`.
    Check,
    /// No `qemu-img check` (qcow v1 has none): `qemu-img convert`, then QEMU writes 4 KiB at
    /// `fresh` (unallocated in every state), which must change nothing else.
    ReadAndWrite { fresh: u64 },
    /// A log QEMU replays when it opens the image read-write (VHDX): QEMU replays it on a copy
    /// (`qemu-img check -r leaks`, which must find no errors) and reads that; imgfs replays it
    /// into the file, after which `qemu-img check` must pass too.
    Replay,
    /// A log QEMU replays but an image it then refuses (a differencing VHDX): QEMU replays it
    /// on a copy, which `replayed` must then find clean and imgfs must read like its own
    /// replay.
    ReplayOnly { replayed: &'a dyn Fn(&Path) -> bool },
}

/// A fault walk over one image.
pub struct Walk<'a> {
    /// qemu-img's name of the format.
    pub format: &'static str,
    /// The files of the image, the one QEMU and imgfs open first; each is put back as it is
    /// now before every run.
    pub files: Vec<PathBuf>,
    /// Files the image reads but never writes (a parent): watched for failing reads, never
    /// put back, and required unchanged at the end.
    pub parents: Vec<PathBuf>,
    /// Opens the image at a path with imgfs, for writing.
    pub open: &'a dyn Fn(&Path) -> Arc<dyn Image>,
    pub steps: &'a [Step],
    pub oracle: Oracle<'a>,
}

/// The walk's image as it was before any run: the files, and the guest disk they hold; and
/// the outcomes checked so far.
struct Base {
    files: Vec<(PathBuf, Vec<u8>)>,
    parents: Vec<(PathBuf, Vec<u8>)>,
    disk: Vec<u8>,
    /// Fingerprints of (files, model) already checked: many faults (a read failing anywhere
    /// in the same lookup, say) leave the same files expected to hold the same thing.
    checked: std::cell::RefCell<HashSet<Vec<u32>>>,
}

impl Walk<'_> {
    /// Every walk: power loss after each write; each write, sync and read failing with EIO;
    /// the disk full from each write on.
    pub fn all(&self) {
        self.power_loss();
        for kind in [OpKind::Write, OpKind::Sync, OpKind::Read] {
            self.failing(kind, libc::EIO);
        }
        self.no_space();
    }

    /// Power lost after each write, for every count of writes from none to all; and after
    /// each write with the writes since the last sync before it lost, as the page cache may
    /// write back in any order.
    pub fn power_loss(&self) {
        let (base, watch, counts) = self.prepare();
        for k in 0..=counts.writes {
            let fault = Fault::PowerLoss {
                after_writes: k,
                reordered: false,
            };
            self.run(&base, &watch, fault, k < counts.writes);
        }
        for k in 1..=counts.writes {
            let fault = Fault::PowerLoss {
                after_writes: k,
                reordered: true,
            };
            self.run(&base, &watch, fault, true);
        }
        base.finish();
    }

    /// The k-th operation of `kind` failing with `errno`, for every k.
    pub fn failing(&self, kind: OpKind, errno: i32) {
        let (base, watch, counts) = self.prepare();
        for nth in 0..counts.of(kind) {
            self.run(&base, &watch, Fault::Fail { kind, nth, errno }, true);
        }
        base.finish();
    }

    /// The disk full from the k-th write on, for every k.
    pub fn no_space(&self) {
        let (base, watch, counts) = self.prepare();
        for nth in 0..counts.writes {
            self.run(&base, &watch, Fault::NoSpace { nth }, true);
        }
        base.finish();
    }

    /// Takes the base, watches the files, and counts the operations of a run without faults
    /// (which must pass the checks too). Each walk puts the base back when it is done.
    fn prepare(&self) -> (Base, std::sync::Arc<Watch>, Counts) {
        let read = |paths: &[PathBuf]| -> Vec<(PathBuf, Vec<u8>)> {
            paths
                .iter()
                .map(|p| (p.clone(), std::fs::read(p).unwrap()))
                .collect()
        };
        let (files, parents) = (read(&self.files), read(&self.parents));
        let disk = read_image((self.open)(&self.files[0]).as_ref());
        let base = Base {
            files,
            parents,
            disk,
            checked: Default::default(),
        };
        base.restore();
        let paths: Vec<&Path> = self
            .files
            .iter()
            .chain(&self.parents)
            .map(PathBuf::as_path)
            .collect();
        let watch = fault::watch_files(&paths);
        let model = self.workload(&base, &watch, None, "no fault");
        let counts = watch.counts();
        watch.arm(None);
        self.check(&model, "no fault");
        (base, watch, counts)
    }

    /// One run with `fault` armed (`reached`: the workload gets as far as the fault).
    fn run(&self, base: &Base, watch: &Watch, fault: Fault, reached: bool) {
        let what = format!("{} with {fault:?}", self.format);
        let model = self.workload(base, watch, Some(fault), &what);
        assert_eq!(watch.fired(), reached, "{what}: the fault was not reached");
        let disk = watch.disk();
        watch.arm(None);
        if let Some(disk) = disk {
            // The disk lists the files written before the cut; the others are as armed.
            base.restore();
            for (path, bytes) in disk {
                std::fs::write(path, bytes).unwrap();
            }
        }
        if base
            .checked
            .borrow_mut()
            .insert(fingerprint(&self.files, &model))
        {
            self.check(&model, &what);
        }
    }

    /// Puts the base back, opens the image, arms `fault` and runs the steps, checking each
    /// step's outcome. Returns what the disk may hold afterwards (at the cut, for power loss).
    fn workload(&self, base: &Base, watch: &Watch, fault: Option<Fault>, what: &str) -> Model {
        base.restore();
        let img = (self.open)(&self.files[0]);
        watch.arm(fault);
        let mut model = Model::new(&base.disk);
        let mut at_cut = None;
        for (i, step) in self.steps.iter().enumerate() {
            let what = format!("{what}, step {i} ({step:?})");
            let fired = watch.fired();
            let stopped = img.read_only_reason().is_some();
            let mut read = Vec::new();
            let result = match *step {
                Step::Write(offset, len, byte) => img.write_at(&vec![byte; len], offset),
                Step::Flush => img.flush(),
                Step::Read(offset, len) => {
                    read = vec![0u8; len];
                    img.read_at(&mut read, offset)
                }
                Step::Discard(offset, len) => img.discard(offset, len),
            };
            let hit = watch.fired() && !fired;
            let cut = hit && matches!(fault, Some(Fault::PowerLoss { .. }));
            let expected = Expected {
                fault: fault.filter(|_| !cut),
                hit,
                stopped,
                disk_full: matches!(fault, Some(Fault::NoSpace { .. })) && watch.fired(),
            };
            expected.check(step, &result, img.as_ref(), &what);
            match (*step, &result) {
                (Step::Write(offset, len, byte), Ok(())) => {
                    model.write(offset, &vec![byte; len], true)
                }
                // Refused before touching anything.
                (Step::Write(..), Err(e)) if stopped && e.kind() == ErrorKind::ReadOnly => {}
                (Step::Write(offset, len, byte), Err(_)) => {
                    model.write(offset, &vec![byte; len], false)
                }
                (Step::Discard(offset, len), Ok(())) => {
                    model.write(offset, &vec![0; len as usize], true)
                }
                (Step::Discard(..), Err(e)) if stopped && e.kind() == ErrorKind::ReadOnly => {}
                (Step::Discard(offset, len), Err(_)) => {
                    model.write(offset, &vec![0; len as usize], false)
                }
                (Step::Flush, Ok(())) if !cut => model.acked(),
                (Step::Read(offset, _), Ok(())) => model.check_read(offset, &read, &what),
                _ => {}
            }
            if cut {
                at_cut = Some(model.clone());
            }
        }
        drop(img);
        at_cut.unwrap_or(model)
    }

    /// Checks the image as the last run left it against `model`.
    fn check(&self, model: &Model, what: &str) {
        let path = &self.files[0];
        let theirs = match &self.oracle {
            Oracle::Check => {
                assert_qemu_check_no_errors(self.format, path);
                self.read_theirs(path)
            }
            Oracle::ReadAndWrite { .. } => self.read_theirs(path),
            Oracle::Replay => {
                let copy = copy_beside(path);
                assert_qemu_replays(self.format, &copy, what);
                let theirs = self.read_theirs(&copy);
                std::fs::remove_file(&copy).unwrap();
                theirs
            }
            Oracle::ReplayOnly { replayed } => {
                let copy = copy_beside(path);
                // QEMU replays the log as it opens the image read-write, then refuses it.
                qemu(
                    "qemu-io",
                    &["-f", self.format, "-c", "quit", path_str(&copy)],
                );
                assert!(replayed(&copy), "{what}: QEMU left the log dirty");
                let theirs = read_image((self.open)(&copy).as_ref());
                std::fs::remove_file(&copy).unwrap();
                theirs
            }
        };
        model.check_disk(&theirs, what);
        let ours = read_image((self.open)(path).as_ref());
        if let Some(at) = first_difference(&ours, &theirs) {
            panic!("{what}: imgfs and QEMU read the disk differently at {at:#x}");
        }
        match self.oracle {
            Oracle::ReadAndWrite { fresh } => {
                assert_qemu_allocates_elsewhere(self.format, path, fresh, &theirs, what)
            }
            Oracle::Replay => assert_qemu_check_no_errors(self.format, path),
            _ => {}
        }
    }

    fn read_theirs(&self, path: &Path) -> Vec<u8> {
        qemu_raw_of(path, &format!("-f {}", self.format)).unwrap()
    }
}

impl Base {
    /// The end of a walk: the files put back, the parents found untouched.
    fn finish(&self) {
        self.restore();
        for (path, bytes) in &self.parents {
            assert!(
                std::fs::read(path).unwrap() == *bytes,
                "{path:?} was written"
            );
        }
    }

    /// Puts the files back as they were, rewriting only the pieces a run changed (runs
    /// change little of them, and each rewritten page is a page the host writes back).
    fn restore(&self) {
        use std::os::unix::fs::FileExt;
        const PIECE: usize = 64 << 10;
        for (path, bytes) in &self.files {
            let now = std::fs::read(path).unwrap();
            if now == *bytes {
                continue;
            }
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            for (i, (old, new)) in bytes.chunks(PIECE).zip(now.chunks(PIECE)).enumerate() {
                if old != new {
                    file.write_all_at(old, (i * PIECE) as u64).unwrap();
                }
            }
            if now.len() < bytes.len() {
                file.write_all_at(&bytes[now.len()..], now.len() as u64)
                    .unwrap();
            }
            file.set_len(bytes.len() as u64).unwrap();
        }
    }
}

/// What a step may do, given the fault armed.
struct Expected {
    /// The armed fault (not power loss once the power is cut: the page cache carries on).
    fault: Option<Fault>,
    /// The fault hit during this step.
    hit: bool,
    /// The image was read-only (stopped) before the step.
    stopped: bool,
    /// The disk is full.
    disk_full: bool,
}

impl Expected {
    fn check(&self, step: &Step, result: &Result<()>, img: &dyn Image, what: &str) {
        let injected = match self.fault {
            Some(Fault::Fail { errno, .. }) => Some(errno),
            Some(Fault::NoSpace { .. }) => Some(libc::ENOSPC),
            _ => None,
        };
        match (result, step) {
            (Ok(()), _) if self.hit && injected.is_some() => {
                panic!("{what}: the injected fault was not reported")
            }
            (Ok(()), Step::Write(..) | Step::Flush | Step::Discard(..)) if self.stopped => {
                panic!("{what}: succeeded on an image stopped by an earlier failure")
            }
            (Ok(()), _) => {}
            (Err(e), _) if self.hit => assert_eq!(Some(e.errno()), injected, "{what}: {e}"),
            (Err(e), Step::Write(..) | Step::Discard(..)) if self.stopped => {
                assert_eq!(e.kind(), ErrorKind::ReadOnly, "{what}: {e}")
            }
            (Err(e), Step::Flush) if self.stopped => {
                assert_eq!(Some(e.errno()), injected, "{what}: {e}")
            }
            (Err(e), Step::Write(..) | Step::Flush | Step::Discard(..)) if self.disk_full => {
                assert_eq!(e.errno(), libc::ENOSPC, "{what}: {e}")
            }
            (Err(e), _) => panic!("{what}: failed without a fault: {e}"),
        }
        let now = img.read_only_reason();
        if result.is_err() && matches!(step, Step::Flush) {
            let reason = now.clone().unwrap_or_default();
            assert!(
                reason.contains("metadata write or sync failed"),
                "{what}: a failed flush leaves the image writable ({reason:?})"
            );
            assert_eq!(img.info().read_only_reason, now, "{what}: info");
        }
        if now.is_some() && !self.stopped {
            assert!(
                result.is_err(),
                "{what}: read-only after a success: {now:?}"
            );
        }
    }
}

/// What each 512-byte sector of a disk may hold, following a workload.
#[derive(Clone)]
pub struct Model {
    base: std::sync::Arc<Vec<u8>>,
    /// The values each written sector may hold now, as reads see it (more than one where a
    /// write failed part way).
    now: BTreeMap<usize, Vec<Vec<u8>>>,
    /// The values each written sector may show on disk: everything it held since the last
    /// acknowledged flush.
    allowed: BTreeMap<usize, Vec<Vec<u8>>>,
}

impl Model {
    pub fn new(base: &[u8]) -> Self {
        Model {
            base: std::sync::Arc::new(base.to_vec()),
            now: BTreeMap::new(),
            allowed: BTreeMap::new(),
        }
    }

    fn base_sector(&self, index: usize) -> Vec<u8> {
        self.base[index * SECTOR..(index + 1) * SECTOR].to_vec()
    }

    /// Applies a write of `data` at `offset`: `done` if it succeeded, else it may or may not
    /// have happened (in any of its sectors).
    pub fn write(&mut self, offset: u64, data: &[u8], done: bool) {
        let start = offset as usize;
        let end = start + data.len();
        for index in start / SECTOR..end.div_ceil(SECTOR) {
            let before = match self.now.get(&index) {
                Some(values) => values.clone(),
                None => vec![self.base_sector(index)],
            };
            let (lo, hi) = (start.max(index * SECTOR), end.min((index + 1) * SECTOR));
            let part = &data[lo - start..hi - start];
            let written: Vec<Vec<u8>> = before
                .iter()
                .map(|value| {
                    let mut value = value.clone();
                    value[lo - index * SECTOR..hi - index * SECTOR].copy_from_slice(part);
                    value
                })
                .collect();
            let allowed = self.allowed.entry(index).or_insert_with(|| before.clone());
            add_all(allowed, &written);
            let now = match done {
                true => written,
                false => {
                    let mut either = before;
                    add_all(&mut either, &written);
                    either
                }
            };
            self.now.insert(index, now);
        }
    }

    /// A flush succeeded: what reads see now is what the disk holds.
    pub fn acked(&mut self) {
        self.allowed = self.now.clone();
    }

    /// `buf`, read at `offset`, must hold in each sector one of the values it may hold now.
    pub fn check_read(&self, offset: u64, buf: &[u8], what: &str) {
        let start = offset as usize;
        let end = start + buf.len();
        for index in start / SECTOR..end.div_ceil(SECTOR) {
            let (lo, hi) = (start.max(index * SECTOR), end.min((index + 1) * SECTOR));
            let got = &buf[lo - start..hi - start];
            let inside = lo - index * SECTOR..hi - index * SECTOR;
            let fits = match self.now.get(&index) {
                Some(values) => values.iter().any(|v| v[inside.clone()] == *got),
                None => self.base_sector(index)[inside] == *got,
            };
            assert!(fits, "{what}: the read returns sector {index} otherwise");
        }
    }

    /// `disk` must hold in each sector one of the values the sector may show.
    pub fn check_disk(&self, disk: &[u8], what: &str) {
        assert_eq!(disk.len(), self.base.len(), "{what}: disk size");
        for (index, got) in disk.chunks(SECTOR).enumerate() {
            let fits = match self.allowed.get(&index) {
                Some(values) => values.iter().any(|v| v == got),
                None => got == &self.base[index * SECTOR..(index + 1) * SECTOR],
            };
            if !fits {
                let heads: Vec<u8> = match self.allowed.get(&index) {
                    Some(values) => values.iter().map(|v| v[0]).collect(),
                    None => vec![self.base[index * SECTOR]],
                };
                panic!(
                    "{what}: sector {index} (at {:#x}) starts with {:#04x}, but may only be one \
                     of {} values starting with {heads:02x?}",
                    index * SECTOR,
                    got[0],
                    heads.len()
                );
            }
        }
    }
}

fn add_all(values: &mut Vec<Vec<u8>>, more: &[Vec<u8>]) {
    for value in more {
        if !values.contains(value) {
            values.push(value.clone());
        }
    }
}

/// CRC-32Cs of the files at `paths` and of what `model` allows: which runs end alike. (CRC, as
/// it runs at memory speed in a test build where a generic hasher does not.)
fn fingerprint(paths: &[PathBuf], model: &Model) -> Vec<u32> {
    let mut out: Vec<u32> = paths
        .iter()
        .map(|p| crc32c::crc32c(&std::fs::read(p).unwrap()))
        .collect();
    for (index, values) in &model.allowed {
        out.push(*index as u32);
        out.extend(values.iter().map(|v| crc32c::crc32c(v)));
    }
    out
}

/// A copy of the image file at `path` beside it (so relative names still resolve).
fn copy_beside(path: &Path) -> PathBuf {
    let copy = crash_path(path);
    std::fs::copy(path, &copy).unwrap();
    copy
}

/// Runs `steps` on `img`, each of which must succeed.
pub fn run_steps(img: &dyn Image, steps: &[Step]) {
    for step in steps {
        match *step {
            Step::Write(offset, len, byte) => img.write_at(&vec![byte; len], offset).unwrap(),
            Step::Flush => img.flush().unwrap(),
            Step::Read(offset, len) => img.read_at(&mut vec![0u8; len], offset).unwrap(),
            Step::Discard(offset, len) => img.discard(offset, len).unwrap(),
        }
    }
}

/// The whole disk of `img`.
pub fn read_image(img: &dyn Image) -> Vec<u8> {
    let mut buf = vec![0u8; img.size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// QEMU replays the log of the image at `copy` (`qemu-img check -r leaks` opens it read-write)
/// and then finds no errors in it.
pub fn assert_qemu_replays(format: &str, copy: &Path, what: &str) {
    let args = ["check", "-r", "leaks", "-f", format, path_str(copy)];
    let out = qemu("qemu-img", &args).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("ERROR"),
        "{what}: QEMU's replay and check: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_allows_what_was_written_since_the_last_acknowledged_flush() {
        let base = vec![0u8; 4 * SECTOR];
        let mut model = Model::new(&base);
        model.write(100, &[1; 600], true);
        model.acked();
        // Acknowledged: exactly that.
        let mut disk = base.clone();
        disk[100..700].fill(1);
        model.check_disk(&disk, "acked");
        model.write(0, &[2; 512], true);
        model.write(1024, &[3; 10], false);
        // Sector 0 may be old or new, sector 2 with or without the failed write.
        model.check_disk(&disk, "old");
        let mut new = disk.clone();
        new[..512].fill(2);
        new[1024..1034].fill(3);
        model.check_disk(&new, "new");
        model.check_read(0, &new[..1100], "read new");
        model.check_read(1024, &disk[1024..1100], "read without the failed write");
        let mut torn = disk.clone();
        torn[..256].fill(2);
        let bad = std::panic::catch_unwind(|| model.check_disk(&torn, "torn"));
        assert!(bad.is_err(), "half a sector is neither value");
        let lost = std::panic::catch_unwind(|| {
            let mut m = model.clone();
            m.acked();
            m.check_disk(&disk, "lost")
        });
        assert!(lost.is_err(), "acknowledged data must be there");
    }
}
