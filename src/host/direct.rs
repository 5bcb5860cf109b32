//! Host I/O that bypasses the page cache, for large requests of a reader or writer that opened
//! its raw file with `O_DIRECT`. Such a client asked for no caching and streams (`dd
//! iflag=direct`, `qemu-img convert -T none -t none`); served through the page cache, every
//! byte it moves first costs the host a page allocation and a copy, and evicts pages worth
//! keeping. The image file's own `O_DIRECT` I/O costs neither, so imgfs moves the data the
//! same way: a second descriptor on the same open file, opened with `O_DIRECT`, used for the
//! parts of a request that meet the file system's alignment. Everything else (small requests,
//! which keep profiting from the cache; unaligned heads and tails; metadata) goes through the
//! page cache as always.
//!
//! The kernel keeps the two views coherent: it writes dirty cached pages of a range back before
//! a direct read or write of it, and drops the cached pages a direct write covers. What it
//! cannot fix is a cached page that a direct write covers only partly while a buffered write
//! dirties the rest (the page, stale in the written part, would later be written back over it),
//! so direct writes cover whole host pages only; the partly covered pages at either end of a
//! write go through the cache, like the other writes to those pages.

use std::cell::{Cell, RefCell};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// Requests shorter than this keep going through the page cache even for a direct client:
/// random 4 KiB readers gain more from the host's cache than a page allocation costs them.
pub const DIRECT_MIN: usize = 128 * 1024;

/// The alignment `AlignedBuffer` gives its bytes, and the one direct writes keep to at least:
/// a host page.
const PAGE: usize = 4096;

thread_local! {
    /// Set while this thread's large host requests may bypass the page cache.
    static BYPASS: Cell<bool> = const { Cell::new(false) };
    /// Where this thread puts the data of a direct write whose buffer is not aligned.
    static WRITE_BUFFER: RefCell<AlignedBuffer> = RefCell::new(AlignedBuffer::default());
}

/// Runs `f`, if `bypass` with this thread's host reads and writes of `DIRECT_MIN` or more
/// bypassing the host page cache where the file system allows it (nothing else changes: small
/// requests, syncs, requests on other threads).
pub fn bypassing_page_cache<T>(bypass: bool, f: impl FnOnce() -> T) -> T {
    if !bypass {
        return f();
    }
    let before = BYPASS.replace(true);
    let result = f();
    BYPASS.set(before);
    result
}

/// Whether a request of `len` bytes on this thread may bypass the page cache.
pub(super) fn wanted(len: usize) -> bool {
    len >= DIRECT_MIN && BYPASS.get()
}

/// A reusable buffer whose bytes start at a host page boundary, so that a direct read can fill
/// it. Growing it never clears it: callers fill what they use.
#[derive(Default, Debug)]
pub struct AlignedBuffer {
    bytes: Vec<u8>,
    start: usize,
}

impl AlignedBuffer {
    /// The first `len` bytes, after growing the buffer as needed (their contents are whatever
    /// was there).
    pub fn prepare(&mut self, len: usize) -> &mut [u8] {
        let need = len.saturating_add(PAGE);
        if self.bytes.len() < need {
            self.bytes.resize(need, 0);
            // Moving the allocation moves the boundary; no offset below PAGE found
            // (never for bytes) leaves the buffer unaligned, which only costs direct reads.
            self.start = self.bytes.as_ptr().align_offset(PAGE).min(PAGE);
        }
        let start = self.start;
        self.bytes
            .get_mut(start..start.saturating_add(len))
            .unwrap_or_default()
    }

    /// The first `len` bytes as last filled (empty if the buffer never grew that far).
    pub fn filled(&self, len: usize) -> &[u8] {
        self.bytes
            .get(self.start..self.start.saturating_add(len))
            .unwrap_or_default()
    }
}

/// A host file's `O_DIRECT` descriptor and what its file system asks of direct I/O.
#[derive(Debug)]
struct DirectFile {
    file: File,
    offset_align: u64,
    mem_align: usize,
}

/// The direct side of one host file, opened on first use (for writing if the file is).
#[derive(Debug)]
pub(super) struct DirectIo {
    /// The host file's own descriptor, which the direct one is opened through.
    cached: Arc<File>,
    /// Its device and inode.
    key: (u64, u64),
    writable: bool,
    file: OnceLock<Option<DirectFile>>,
    /// A direct request failed with EINVAL (the alignment reported was not the one enforced):
    /// later requests go through the cache.
    refused: AtomicBool,
    /// Direct reads and writes done, for tests.
    #[cfg(test)]
    pub(super) reads: std::sync::atomic::AtomicU64,
    #[cfg(test)]
    pub(super) writes: std::sync::atomic::AtomicU64,
}

impl DirectIo {
    pub(super) fn new(cached: Arc<File>, key: (u64, u64), writable: bool) -> Self {
        DirectIo {
            cached,
            key,
            writable,
            file: OnceLock::new(),
            refused: AtomicBool::new(false),
            #[cfg(test)]
            reads: Default::default(),
            #[cfg(test)]
            writes: Default::default(),
        }
    }

    fn file(&self) -> Option<&DirectFile> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        self.file
            .get_or_init(|| open_direct(&self.cached, self.key, self.writable))
            .as_ref()
    }

    /// What a direct request's `result` means for the caller: `None` for an EINVAL (the
    /// caller then goes through the cache, and so do later requests), else the result, counted
    /// in `done` (for tests).
    fn outcome<T>(
        &self,
        result: std::io::Result<T>,
        #[cfg(test)] done: &std::sync::atomic::AtomicU64,
    ) -> Option<std::io::Result<T>> {
        match result {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("direct I/O refused ({e}); going through the page cache");
                self.refused.store(true, Ordering::Relaxed);
                None
            }
            result => {
                #[cfg(test)]
                done.fetch_add(1, Ordering::Relaxed);
                Some(result)
            }
        }
    }

    /// Reads a prefix of `buf` from `offset` bypassing the page cache, if the file system
    /// allows direct I/O and the alignment is met: `None` when the caller must read through
    /// the cache instead (then nothing was read).
    pub(super) fn read_at(&self, buf: &mut [u8], offset: u64) -> Option<std::io::Result<usize>> {
        let direct = self.file()?;
        let len = (buf.len() as u64 / direct.offset_align * direct.offset_align) as usize;
        let aligned = len > 0
            && offset % direct.offset_align == 0
            && (buf.as_ptr() as usize) % direct.mem_align == 0;
        if !aligned {
            return None;
        }
        let read = direct.file.read_at(buf.get_mut(..len)?, offset);
        self.outcome(
            read,
            #[cfg(test)]
            &self.reads,
        )
    }

    /// The whole host pages inside `[offset, offset + len)`, as the range of `0..len` that
    /// covers them, if the file system allows direct writes there and they are worth one.
    pub(super) fn write_range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        if !self.writable {
            return None;
        }
        let direct = self.file()?;
        let align = direct.offset_align.max(PAGE as u64);
        let end = offset.checked_add(len as u64)?;
        let first = offset.checked_next_multiple_of(align)?;
        let last = end / align * align;
        (last > first && last - first >= DIRECT_MIN as u64)
            .then(|| (first - offset) as usize..(last - offset) as usize)
    }

    /// Writes `data`, a `write_range` of the request, at `offset` bypassing the page cache;
    /// `None` when it could not (the caller then writes it through the cache; part of it may
    /// have been written either way).
    pub(super) fn write_all_at(&self, data: &[u8], offset: u64) -> Option<std::io::Result<()>> {
        let direct = self.file()?;
        let written = if (data.as_ptr() as usize) % direct.mem_align == 0 {
            direct.file.write_all_at(data, offset)
        } else {
            WRITE_BUFFER.with_borrow_mut(|aligned| {
                let copy = aligned.prepare(data.len());
                copy.copy_from_slice(data);
                direct.file.write_all_at(copy, offset)
            })
        };
        self.outcome(
            written,
            #[cfg(test)]
            &self.writes,
        )
    }
}

/// Opens the file `cached` is open on again, with `O_DIRECT`, through its descriptor (not its
/// path, which may name another file by now), if its file system supports direct I/O.
fn open_direct(cached: &File, key: (u64, u64), writable: bool) -> Option<DirectFile> {
    let (offset_align, mem_align) = dio_alignment(cached)?;
    let file = OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", cached.as_raw_fd()))
        .ok()?;
    let meta = file.metadata().ok()?;
    ((meta.dev(), meta.ino()) == key).then_some(DirectFile {
        file,
        offset_align,
        mem_align,
    })
}

/// The file system's alignment for direct I/O on `file` (offset and length, memory), if it
/// supports direct I/O and says so (`statx` with `STATX_DIOALIGN`, Linux 6.1).
pub(super) fn dio_alignment(file: &File) -> Option<(u64, usize)> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx on a descriptor we own with an empty path and AT_EMPTY_PATH; the kernel
    // writes at most one `struct statx` into `stx`, which is valid for that (zeroed above).
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised above and filled by a successful statx; every field of
    // `struct statx` is a plain integer, valid for any bits.
    let stx = unsafe { stx.assume_init() };
    let offset_align = u64::from(stx.stx_dio_offset_align);
    let mem_align = stx.stx_dio_mem_align as usize;
    let supported = stx.stx_mask & libc::STATX_DIOALIGN != 0
        && offset_align.is_power_of_two()
        && mem_align.is_power_of_two();
    supported.then_some((offset_align, mem_align))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::HostFile;
    use super::*;

    #[test]
    fn reads_bypassing_the_page_cache_see_every_write_and_every_byte() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        // Ends mid-sector, so the last direct read comes up short.
        let size = (1 << 20) + 4096 * 3 + 100;
        let mut expected: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &expected).unwrap();
        let f = HostFile::open(&path, true).unwrap();
        // Still dirty in the page cache when read.
        f.write_all_at(b"fresh", 300_000).unwrap();
        expected[300_000..300_005].copy_from_slice(b"fresh");
        let mut buf = AlignedBuffer::default();
        // Aligned, unaligned offset, unaligned buffer, past the end, too small to bypass.
        for (offset, len, shift) in [
            (0, 1 << 20, 0),
            (512, 600_000, 0),
            (4096, 500_000, 1),
            (1 << 20, 200_000, 0),
            (0, 4096, 0),
        ] {
            let part = &mut buf.prepare(len + shift)[shift..];
            part.fill(0xee);
            bypassing_page_cache(true, || f.read_exact_at(part, offset as u64)).unwrap();
            let mut want = vec![0u8; len];
            let known = expected.len().saturating_sub(offset).min(len);
            want[..known].copy_from_slice(&expected[offset..offset + known]);
            assert!(
                part == &want[..],
                "read of {len} at {offset} (shift {shift})"
            );
        }
        let done = f.direct.reads.load(Ordering::Relaxed);
        match dio_alignment(&f.file) {
            // The aligned read, the one past the end and, where 512 is aligned enough, the
            // aligned part of the one at 512; not the one into an unaligned buffer, nor the
            // 4 KiB one.
            Some((offset_align, _)) => assert_eq!(done, 2 + u64::from(512 % offset_align == 0)),
            None => assert_eq!(done, 0),
        }
        // Outside the scope, nothing bypasses the cache.
        f.read_exact_at(buf.prepare(1 << 20), 0).unwrap();
        assert_eq!(f.direct.reads.load(Ordering::Relaxed), done);
    }

    #[test]
    fn writes_bypassing_the_page_cache_leave_every_byte_as_written() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        let mut expected: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &expected).unwrap();
        let f = HostFile::open(&path, true).unwrap();
        let write = |expected: &mut Vec<u8>, data: &[u8], offset: usize, direct: bool| {
            bypassing_page_cache(direct, || f.write_all_at(data, offset as u64)).unwrap();
            let end = offset + data.len();
            expected.resize(expected.len().max(end), 0);
            expected[offset..end].copy_from_slice(data);
        };
        // Dirty in the cache: the page the direct write below covers partly, and one it covers.
        write(&mut expected, b"neighbour", (1 << 20) - 600, false);
        write(&mut expected, b"covered", (1 << 20) + 8192, false);
        // Unaligned at both ends, from an unaligned buffer; then past the end of the file from
        // an aligned one.
        let data: Vec<u8> = (0..(2 << 20) + 4097).map(|i| (i % 241) as u8).collect();
        write(&mut expected, &data[1..(1 << 20)], (1 << 20) - 500, true);
        let mut aligned = AlignedBuffer::default();
        aligned.prepare(2 << 20).copy_from_slice(&data[..2 << 20]);
        write(
            &mut expected,
            aligned.filled(2 << 20),
            (2 << 20) + 4096,
            true,
        );
        // Too small to bypass the cache.
        write(&mut expected, &data[..64 << 10], 512 << 10, true);
        let mut back = vec![0u8; expected.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back == expected, "read through the page cache");
        assert!(std::fs::read(&path).unwrap() == expected, "read again");
        let done = f.direct.writes.load(Ordering::Relaxed);
        match dio_alignment(&f.file) {
            Some(_) => assert_eq!(done, 2),
            None => assert_eq!(done, 0),
        }
        // A read-only file never writes, directly or not.
        let ro = HostFile::open(&path, false).unwrap();
        assert!(bypassing_page_cache(true, || ro.write_all_at(&data, 0)).is_err());
        assert_eq!(ro.direct.writes.load(Ordering::Relaxed), 0);
    }
}
