//! Reads that bypass the host page cache, for large reads of a reader that opened its raw file
//! with `O_DIRECT`. Such a reader asked for no caching and streams (`dd iflag=direct`,
//! `qemu-img convert -T none`); served through the page cache, every byte it reads first costs
//! the host a page allocation and a copy, and evicts pages worth keeping. The image file's own
//! `O_DIRECT` read costs neither, so imgfs reads the host file the same way: a second
//! descriptor on the same open file, opened with `O_DIRECT`, used for the parts of a read whose
//! offset, length and buffer meet the file system's alignment. Everything else (small reads,
//! which keep profiting from the cache; unaligned heads and tails; metadata read into unaligned
//! buffers) reads through the page cache as always. The kernel writes dirty cached pages of a
//! range back before a direct read of it, so a direct read sees every earlier write.

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

/// Reads shorter than this keep going through the page cache even for a direct reader: random
/// 4 KiB readers gain more from the host's cache than a page allocation costs them.
pub const DIRECT_READ_MIN: usize = 128 * 1024;

/// The alignment `AlignedBuffer` gives its bytes: a host page, at least what any file system
/// asks of a direct read's buffer.
const BUFFER_ALIGN: usize = 4096;

thread_local! {
    /// Set while this thread's large host reads may bypass the page cache.
    static BYPASS: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's host reads of `DIRECT_READ_MIN` or more bypassing the host page
/// cache where the file system allows it (nothing else changes: writes, small reads, reads on
/// other threads).
pub fn bypassing_page_cache<T>(f: impl FnOnce() -> T) -> T {
    let before = BYPASS.replace(true);
    let result = f();
    BYPASS.set(before);
    result
}

/// Whether a read of `len` bytes on this thread may bypass the page cache.
pub(super) fn wanted(len: usize) -> bool {
    len >= DIRECT_READ_MIN && BYPASS.get()
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
        let need = len.saturating_add(BUFFER_ALIGN);
        if self.bytes.len() < need {
            self.bytes.resize(need, 0);
            // Moving the allocation moves the boundary; no offset below BUFFER_ALIGN found
            // (never for bytes) leaves the buffer unaligned, which only costs direct reads.
            self.start = self
                .bytes
                .as_ptr()
                .align_offset(BUFFER_ALIGN)
                .min(BUFFER_ALIGN);
        }
        let start = self.start;
        self.bytes.get_mut(start..start + len).unwrap_or_default()
    }

    /// The first `len` bytes as last filled (empty if the buffer never grew that far).
    pub fn filled(&self, len: usize) -> &[u8] {
        self.bytes
            .get(self.start..self.start.saturating_add(len))
            .unwrap_or_default()
    }
}

/// A host file's `O_DIRECT` descriptor and what its file system asks of direct reads.
#[derive(Debug)]
struct DirectFile {
    file: File,
    offset_align: u64,
    mem_align: usize,
}

/// The direct-read side of one host file, opened on first use.
#[derive(Debug, Default)]
pub(super) struct DirectReads {
    file: OnceLock<Option<DirectFile>>,
    /// A direct read failed with EINVAL (the alignment reported was not the one enforced):
    /// later reads go through the cache.
    refused: AtomicBool,
    /// Direct reads done, for tests.
    #[cfg(test)]
    pub(super) done: std::sync::atomic::AtomicU64,
}

impl DirectReads {
    /// Reads a prefix of `buf` from `offset` bypassing the page cache, if the file system
    /// allows direct I/O and the alignment is met: `None` when the caller must read through
    /// the cache instead (then nothing was read).
    pub(super) fn read_at(
        &self,
        cached: &File,
        key: (u64, u64),
        buf: &mut [u8],
        offset: u64,
    ) -> Option<std::io::Result<usize>> {
        if self.refused.load(Ordering::Relaxed) {
            return None;
        }
        let direct = self
            .file
            .get_or_init(|| open_direct(cached, key))
            .as_ref()?;
        let len = (buf.len() as u64 / direct.offset_align * direct.offset_align) as usize;
        let aligned = len > 0
            && offset % direct.offset_align == 0
            && (buf.as_ptr() as usize) % direct.mem_align == 0;
        if !aligned {
            return None;
        }
        match direct.file.read_at(buf.get_mut(..len)?, offset) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                log::debug!("direct reads refused ({e}); reading through the page cache");
                self.refused.store(true, Ordering::Relaxed);
                None
            }
            read => {
                #[cfg(test)]
                self.done.fetch_add(1, Ordering::Relaxed);
                Some(read)
            }
        }
    }
}

/// Opens the file `cached` is open on again, with `O_DIRECT`, through its descriptor (not its
/// path, which may name another file by now), if its file system supports direct reads.
fn open_direct(cached: &File, key: (u64, u64)) -> Option<DirectFile> {
    let (offset_align, mem_align) = dio_alignment(cached)?;
    let file = OpenOptions::new()
        .read(true)
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
