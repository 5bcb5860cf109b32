//! The one error type of imgfs: a kind the FUSE layer maps to an errno, plus context naming the
//! file, offset and field, so a log line says exactly what is wrong with which image.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// What went wrong, coarse enough to choose an errno and to decide whether to keep serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The host file system failed (read, write, sync, stat).
    Io,
    /// The image contradicts its own format (bad magic, offsets outside the file, ...).
    Corrupt,
    /// A valid image using a feature imgfs does not implement.
    Unsupported,
    /// A write to an image or mount that is served read-only.
    ReadOnly,
    /// A request outside the virtual disk, or an argument out of its range.
    OutOfRange,
    /// Another process (e.g. QEMU) holds the image in a conflicting way.
    Busy,
    /// The image file changed or went away under an open instance of it.
    Stale,
}

impl ErrorKind {
    /// The errno a FUSE reply carries for this kind.
    pub fn errno(self) -> i32 {
        match self {
            ErrorKind::Io | ErrorKind::Corrupt => libc::EIO,
            ErrorKind::Unsupported => libc::EOPNOTSUPP,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::OutOfRange => libc::EINVAL,
            ErrorKind::Busy => libc::EBUSY,
            ErrorKind::Stale => libc::ESTALE,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "corrupt image",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::ReadOnly => "read-only",
            ErrorKind::OutOfRange => "out of range",
            ErrorKind::Busy => "busy",
            ErrorKind::Stale => "stale",
        }
    }
}

/// An error with its kind and the context it happened in.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    path: Option<PathBuf>,
    offset: Option<u64>,
    source: Option<io::Error>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            path: None,
            offset: None,
            source: None,
        }
    }

    pub fn corrupt(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Corrupt, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ReadOnly, message)
    }

    pub fn out_of_range(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfRange, message)
    }

    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Busy, message)
    }

    /// An I/O failure while doing `what`.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error {
            source: Some(source),
            ..Self::new(ErrorKind::Io, what)
        }
    }

    /// Names the file the error is about, unless a more precise one is already named.
    /// Says what the error is about: `what: message`.
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }

    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    /// Names the byte offset (in the image file) the error is about.
    pub fn at_offset(mut self, offset: u64) -> Self {
        if self.offset.is_none() {
            self.offset = Some(offset);
        }
        self
    }

    /// What went wrong, without the kind, file and offset `Display` adds.
    pub fn message(&self) -> &str {
        &self.message
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The errno to reply with: the host's own errno for I/O errors where there is one.
    pub fn errno(&self) -> i32 {
        match (&self.kind, &self.source) {
            (ErrorKind::Io, Some(e)) => e.raw_os_error().unwrap_or(libc::EIO),
            (kind, _) => kind.errno(),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{}: ", path.display())?;
        }
        write!(f, "{}: {}", self.kind.describe(), self.message)?;
        if let Some(offset) = self.offset {
            write!(f, " (at offset {offset:#x})")?;
        }
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_ref().map(|e| e as _)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_kind_field_and_offset() {
        let e = Error::corrupt("offset_bmap 0x13 is not sector aligned")
            .at_offset(0x154)
            .with_path(Path::new("images/disk.vdi"));
        assert_eq!(
            e.to_string(),
            "images/disk.vdi: corrupt image: offset_bmap 0x13 is not sector aligned (at offset 0x154)"
        );
        assert_eq!(e.errno(), libc::EIO);
    }

    #[test]
    fn first_path_wins_and_io_keeps_host_errno() {
        let e = Error::io("read", io::Error::from_raw_os_error(libc::ENOSPC))
            .with_path(Path::new("a"))
            .with_path(Path::new("b"));
        assert_eq!(e.path(), Some(Path::new("a")));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert_eq!(Error::read_only("x").errno(), libc::EROFS);
    }
}
