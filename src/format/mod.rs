//! The format drivers and the one entry point that recognises an image by its magic (never by
//! its file name) and opens it with the right driver, access mode and QEMU-compatible locks.

pub mod backing;
pub mod qcow2;
pub mod vdi;

use std::path::Path;
use std::sync::Arc;

use crate::error::{Error, ErrorKind, Result};
use crate::host::HostFile;
use crate::image::Image;

/// Formats imgfs can recognise; only some of them have a driver yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Vdi,
    Qcow,
    Qcow2,
    Vhdx,
    Vmdk,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Vdi => "vdi",
            Format::Qcow => "qcow",
            Format::Qcow2 => "qcow2",
            Format::Vhdx => "vhdx",
            Format::Vmdk => "vmdk",
        }
    }
}

/// How many leading bytes `probe` needs to see.
pub const PROBE_LEN: usize = 512;

/// Recognises a format from the first bytes of a file.
pub fn probe(head: &[u8]) -> Option<Format> {
    if vdi::probe(head) {
        return Some(Format::Vdi);
    }
    match head.get(..4) {
        Some(b"QFI\xfb") => {
            let version = head
                .get(4..8)
                .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
            match version {
                Some(1) => Some(Format::Qcow),
                _ => Some(Format::Qcow2),
            }
        }
        Some(b"KDMV") | Some(b"COWD") => Some(Format::Vmdk),
        _ if head.starts_with(b"vhdxfile") => Some(Format::Vhdx),
        _ if head.starts_with(b"# Disk DescriptorFile") => Some(Format::Vmdk),
        _ => None,
    }
}

/// Reads the head of `path` and recognises its format; `None` for files that are not images.
pub fn probe_file(path: &Path) -> Result<Option<Format>> {
    let file = HostFile::open(path, false)?;
    let mut head = vec![0u8; PROBE_LEN];
    file.read_exact_at(&mut head, 0)?;
    Ok(probe(&head))
}

/// The read-only reason of an image opened by `imgfs info`, which never writes.
pub const INSPECT_REASON: &str = "opened for inspection only";

/// How the caller wants an image served.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Serve read-only whatever the image allows (e.g. `imgfs mount --read-only`).
    pub read_only: bool,
    /// Inspect only: take no locks and never write (`imgfs info`).
    pub inspect: bool,
}

// QEMU's permission lock bytes (FACTS.md): 100 + i announces permission i, 200 + i refuses to
// share it; READ = 0, WRITE = 1, RESIZE = 3.
const LOCK_READ: u64 = 100;
const LOCK_WRITE: u64 = 101;
const LOCK_UNSHARED_WRITE: u64 = 201;
const LOCK_UNSHARED_RESIZE: u64 = 203;

/// Opens the image at `path`, choosing the driver by magic. Writable unless the options, the host
/// file's permissions or the image itself say otherwise.
pub fn open(path: &Path, options: &OpenOptions) -> Result<Arc<dyn Image>> {
    open_inner(path, options).map_err(|e| e.with_path(path))
}

fn open_inner(path: &Path, options: &OpenOptions) -> Result<Arc<dyn Image>> {
    let format =
        probe_file(path)?.ok_or_else(|| Error::unsupported("not a disk image imgfs recognises"))?;
    let want_write = !options.read_only && !options.inspect;
    let (file, host_reason) = if want_write {
        match HostFile::open(path, true) {
            Ok(f) => (f, None),
            Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EROFS => (
                HostFile::open(path, false)?,
                Some("the image file is not writable".to_string()),
            ),
            Err(e) => return Err(e),
        }
    } else {
        let reason = if options.inspect {
            INSPECT_REASON
        } else {
            "served read-only by request"
        };
        (HostFile::open(path, false)?, Some(reason.to_string()))
    };
    if !options.inspect {
        claim_like_qemu(&file)?;
    }
    let image: Arc<dyn Image> = match format {
        Format::Vdi => Arc::new(vdi::VdiImage::open(file, host_reason)?),
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{} images are recognised but not served yet", other.name()),
            ))
        }
    };
    Ok(image)
}

/// Refuses an image that a QEMU process writes (or will not let others write) and announces our
/// own use through the same lock bytes, so QEMU refuses to write an image imgfs serves.
fn claim_like_qemu(file: &HostFile) -> Result<()> {
    if file.byte_locked_by_other(LOCK_WRITE)? {
        return Err(Error::busy(
            "another process (QEMU?) has the image open for writing",
        ));
    }
    if file.is_writable() {
        if file.byte_locked_by_other(LOCK_UNSHARED_WRITE)? {
            return Err(Error::busy(
                "another process (QEMU?) uses the image and does not allow writers",
            ));
        }
        file.lock_bytes(&[
            LOCK_READ,
            LOCK_WRITE,
            LOCK_UNSHARED_WRITE,
            LOCK_UNSHARED_RESIZE,
        ])
    } else {
        file.lock_bytes(&[LOCK_READ, LOCK_UNSHARED_WRITE])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_recognises_magics_not_names() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03rest"), Some(Format::Qcow2));
        assert_eq!(probe(b"QFI\xfb\0\0\0\x01rest"), Some(Format::Qcow));
        assert_eq!(probe(b"KDMV...."), Some(Format::Vmdk));
        assert_eq!(probe(b"vhdxfile...."), Some(Format::Vhdx));
        assert_eq!(probe(b"# Disk DescriptorFile\n"), Some(Format::Vmdk));
        assert_eq!(probe(b"hello world"), None);
        assert_eq!(probe(b""), None);
    }
}
