//! Resizing a raw file (`truncate`): the image grows where its format can (`Image::resize`);
//! shrinking, and formats that cannot grow, are refused with EOPNOTSUPP and a log line.
//!
//! `fallocate` on a raw file: punching holes and zeroing ranges become the image's discard
//! (which leaves zeros and gives space back where the format can), preallocation inside the
//! disk is a no-op (reads and writes never fail for lack of an allocated block other than by
//! a full host disk), and everything else is refused with EOPNOTSUPP. A loop device on a raw
//! file passes the guest's discards (`blkdiscard`, `fstrim`) here as PUNCH_HOLE.

use crate::catalog::Target;
use crate::error::ErrorKind;

use super::{log_error, Errno, FsCore, FsResult};

/// The `fallocate` modes imgfs knows (linux/falloc.h).
const KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// What a `fallocate` mode asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// Make the range read as zeros (PUNCH_HOLE | KEEP_SIZE, ZERO_RANGE).
    Zero { keep_size: bool },
    /// Reserve space (0, KEEP_SIZE).
    Preallocate { keep_size: bool },
}

fn request_of(mode: i32) -> Option<Request> {
    match mode {
        m if m == PUNCH_HOLE | KEEP_SIZE => Some(Request::Zero { keep_size: true }),
        m if m == ZERO_RANGE => Some(Request::Zero { keep_size: false }),
        m if m == ZERO_RANGE | KEEP_SIZE => Some(Request::Zero { keep_size: true }),
        0 => Some(Request::Preallocate { keep_size: false }),
        m if m == KEEP_SIZE => Some(Request::Preallocate { keep_size: true }),
        _ => None,
    }
}

impl FsCore {
    /// Grows the image of `target` from `current` to `size` bytes (truncate, ftruncate).
    pub(super) fn resize(&self, target: &Target, current: u64, size: u64) -> FsResult<()> {
        let Target::Image(file) = target else {
            log::info!("refusing to resize from {current} to {size} bytes: not a whole image");
            return Err(Errno(libc::EOPNOTSUPP));
        };
        if size < current {
            log::info!(
                "{}: refusing to shrink from {current} to {size} bytes: data past the new end \
                 would be lost",
                file.source.display()
            );
            return Err(Errno(libc::EOPNOTSUPP));
        }
        let handle = self
            .catalog
            .open(file, true)
            .map_err(|e| log_error("resize", &file.source, e))?;
        let result = handle.image().resize(size);
        drop(handle);
        self.catalog.note_closed(file);
        match result {
            Ok(()) => {
                log::info!(
                    "{}: grown from {current} to {size} bytes",
                    file.source.display()
                );
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Unsupported => {
                log::info!(
                    "{}: refusing to resize from {current} to {size} bytes: {e}",
                    file.source.display()
                );
                Err(Errno(libc::EOPNOTSUPP))
            }
            Err(e) => Err(log_error("resize", &file.source, e)),
        }
    }

    /// `fallocate(fh, mode, offset, len)`.
    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> FsResult<()> {
        let handle = self.handle(fh)?;
        if !handle.image.is_writable() {
            return Err(Errno(libc::EBADF));
        }
        let Some(request) = request_of(mode) else {
            log::debug!("fallocate mode {mode:#x} is not supported");
            return Err(Errno(libc::EOPNOTSUPP));
        };
        let end = offset.checked_add(len).ok_or(Errno(libc::EFBIG))?;
        if len == 0 {
            return Err(Errno(libc::EINVAL));
        }
        let image = handle.image.image();
        let size = image.size();
        let keep_size = match request {
            Request::Zero { keep_size } | Request::Preallocate { keep_size } => keep_size,
        };
        if end > size && !keep_size {
            // The file would grow: only a resize can do that.
            log::info!(
                "{}: fallocate to {end} bytes would grow the {size}-byte disk; refused",
                handle.source.display()
            );
            return Err(Errno(libc::EOPNOTSUPP));
        }
        if let Request::Zero { .. } = request {
            let end = end.min(size);
            if offset < end {
                image
                    .discard(offset, end - offset)
                    .map_err(|e| match e.kind() {
                        // A format without discard (a LUKS container): mkfs and fstrim ask for
                        // it on every run and take the refusal in their stride.
                        ErrorKind::Unsupported => {
                            log::debug!("discard: {}: {e}", handle.source.display());
                            Errno(libc::EOPNOTSUPP)
                        }
                        _ => log_error("discard", &handle.source, e),
                    })?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_map_to_requests() {
        assert_eq!(
            request_of(PUNCH_HOLE | KEEP_SIZE),
            Some(Request::Zero { keep_size: true })
        );
        assert_eq!(
            request_of(ZERO_RANGE),
            Some(Request::Zero { keep_size: false })
        );
        assert_eq!(
            request_of(0),
            Some(Request::Preallocate { keep_size: false })
        );
        assert_eq!(request_of(PUNCH_HOLE), None, "PUNCH_HOLE needs KEEP_SIZE");
        assert_eq!(request_of(libc::FALLOC_FL_COLLAPSE_RANGE), None);
        assert_eq!(request_of(libc::FALLOC_FL_INSERT_RANGE), None);
    }
}
