//! What a writable driver does when writing back its metadata fails: it stops writing to the
//! image for good, and says why. Every driver keeps one `WriteBack` and runs its flush, and
//! every metadata write of its write path that something already points at, through it.
//!
//! # Why stop
//!
//! After a failed metadata write the file may hold part of it, and the driver's tables in
//! memory are ahead of the disk. After a failed `fdatasync` it is worse: Linux may have
//! dropped the dirty pages it could not write and reports the error once, so a second
//! `fdatasync` succeeds without the data having reached the disk, and a retried flush would
//! publish tables pointing at it. Writing anything more would build on a state that is only
//! half known. Every step of each driver's write-back order leaves the file consistent, so
//! what is on disk after the failure is an image QEMU and imgfs open, as after a crash there.
//!
//! # What imgfs does
//!
//! - The first failure stops the image: its reason ("a metadata write or sync failed ...") is
//!   logged once at error level and reported by `read_only_reason` and `info`; the failing
//!   request gets the host's error (EIO, ENOSPC, ... unchanged).
//! - From then on writes are refused with a ReadOnly error (EROFS), reads go on from what the
//!   driver holds, and `is_dirty` is false (there is nothing it will write any more).
//! - Every later flush fails with the errno of the first failure: what was written since the
//!   last successful flush may be lost, and no flush of this instance can make it durable.
//!   QEMU does the same after a failed `fdatasync`. The FUSE layer turns this into Linux's
//!   rule for writeback errors: each open file description sees the error once (`fs::core`).
//! - Opened anew (the catalog closes idle instances), the image is read from the file and
//!   writable again.
//!
//! A failed write of guest data before any metadata points at it, a failed read, and ENOSPC
//! while writing a new block fail only that request: nothing on disk or in memory refers to
//! what was not written.

use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Error, ErrorKind, Result};

/// Why and how write-back failed.
#[derive(Debug)]
struct Failure {
    reason: String,
    errno: i32,
}

/// The write-back state of one image: healthy, or stopped by a failure.
#[derive(Debug, Default)]
pub struct WriteBack {
    failure: OnceLock<Failure>,
}

impl WriteBack {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `step`, a piece of metadata write-back of the image at `path`: refused once the
    /// image is stopped; its failure stops the image and is returned unchanged.
    pub fn run<T>(&self, path: &Path, step: impl FnOnce() -> Result<T>) -> Result<T> {
        self.refuse_flush().map_err(|e| e.with_path(path))?;
        step().map_err(|e| self.stop(path, e))
    }

    /// Stops the image at `path` because of `e` (the first failure wins and is logged once);
    /// returns `e`.
    pub fn stop(&self, path: &Path, e: Error) -> Error {
        let errno = match e.kind() {
            ErrorKind::Io => e.errno(),
            _ => libc::EIO,
        };
        let mut first = false;
        let failure = self.failure.get_or_init(|| {
            first = true;
            Failure {
                reason: format!(
                    "a metadata write or sync failed ({e}); served read-only to protect the \
                     image until it is opened again"
                ),
                errno,
            }
        });
        if first {
            log::error!("{}: {}", path.display(), failure.reason);
        }
        e
    }

    /// Whether a failure stopped the image.
    pub fn is_stopped(&self) -> bool {
        self.failure.get().is_some()
    }

    /// Why the image is read-only, once it is stopped.
    pub fn reason(&self) -> Option<String> {
        self.failure.get().map(|f| f.reason.clone())
    }

    /// `reason` after the image's own read-only reason, if it has one.
    pub fn reason_after(&self, own: &Option<String>) -> Option<String> {
        own.clone().or_else(|| self.reason())
    }

    /// Refuses a write (EROFS) once the image is stopped.
    pub fn refuse_writes(&self) -> Result<()> {
        match self.failure.get() {
            Some(f) => Err(Error::read_only(f.reason.clone())),
            None => Ok(()),
        }
    }

    /// Fails a flush with the first failure's errno once the image is stopped.
    pub fn refuse_flush(&self) -> Result<()> {
        match self.failure.get() {
            Some(f) => Err(Error::io(
                format!(
                    "an earlier write-back failed, so what was written since the last \
                     successful flush may be lost ({})",
                    f.reason
                ),
                std::io::Error::from_raw_os_error(f.errno),
            )),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_step_stops_the_image_for_writes_and_every_later_flush() {
        let path = Path::new("disk.img");
        let wb = WriteBack::new();
        assert_eq!(wb.run(path, || Ok(7)).unwrap(), 7);
        assert!(!wb.is_stopped() && wb.reason().is_none());
        wb.refuse_writes().unwrap();

        let enospc = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = wb
            .run(path, || -> Result<()> { Err(Error::io("write", enospc)) })
            .unwrap_err();
        assert_eq!(e.errno(), libc::ENOSPC, "the failure itself, unchanged");
        assert!(wb.is_stopped());
        let reason = wb.reason().unwrap();
        assert!(reason.contains("metadata write or sync failed"), "{reason}");
        assert!(reason.contains("No space left"), "{reason}");
        assert_eq!(wb.reason_after(&None), Some(reason.clone()));
        assert_eq!(wb.reason_after(&Some("own".into())), Some("own".into()));

        let refused = wb.refuse_writes().unwrap_err();
        assert_eq!(refused.errno(), libc::EROFS);
        for _ in 0..2 {
            let again = wb.run(path, || Ok(())).unwrap_err();
            assert_eq!(again.errno(), libc::ENOSPC, "{again}");
        }
        // A second failure keeps the first reason.
        wb.stop(path, Error::corrupt("other"));
        assert_eq!(wb.reason().unwrap(), reason);
    }

    /// Keeps the log lines that name `MARKED`, from every test thread.
    struct Capture(std::sync::Mutex<Vec<String>>);

    const MARKED: &str = "write-back-log-test.img";

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let line = format!("{} {}", record.level(), record.args());
            if line.contains(MARKED) {
                self.0.lock().unwrap().push(line);
            }
        }
        fn flush(&self) {}
    }

    static CAPTURE: Capture = Capture(std::sync::Mutex::new(Vec::new()));

    #[test]
    fn the_reason_is_logged_once_at_error_level() {
        // No other test installs a logger; error level keeps the others' lines cheap.
        log::set_logger(&CAPTURE).expect("the only logger of the test binary");
        log::set_max_level(log::LevelFilter::Error);
        let wb = WriteBack::new();
        let path = Path::new(MARKED);
        for _ in 0..3 {
            let eio = std::io::Error::from_raw_os_error(libc::EIO);
            let _ = wb.run(path, || -> Result<()> { Err(Error::io("fdatasync", eio)) });
        }
        let lines = CAPTURE.0.lock().unwrap().clone();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(lines[0].starts_with("ERROR write-back-log-test.img: a metadata write or sync failed (I/O error: fdatasync: Input/output error"), "{lines:?}");
    }

    #[test]
    fn a_failure_without_a_host_errno_stops_with_eio() {
        let wb = WriteBack::new();
        wb.stop(Path::new("x"), Error::corrupt("internal"));
        assert_eq!(wb.refuse_flush().unwrap_err().errno(), libc::EIO);
    }
}
