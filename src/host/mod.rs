//! Positional I/O on host files: every read and write names its offset (no shared seek
//! position), errors carry the file's path, and QEMU-compatible image locks live here too.
//! In tests, `fault` sits under every read, write and sync of a watched file.

pub mod activity;
mod direct;
#[cfg(test)]
pub mod fault;
mod own_locks;
mod writeback;

use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

use activity::WriteActivity;
pub use direct::{bypassing_page_cache, AlignedBuffer};

/// The page size the host page cache works in; a write that covers only part of one makes the
/// host file system read the rest.
const HOST_PAGE: u64 = 4096;

/// Writes this large or larger have their partial pages asked for without the host's readahead
/// (see `warm_partial_pages`): two pages of sixteen or more.
const WARM_LIMIT: u64 = 64 * 1024;

thread_local! {
    /// Set while this thread's host reads may only be served from the page cache.
    static CACHE_ONLY: Cell<bool> = const { Cell::new(false) };
    /// Set while `data_runs` on this thread counts the whole range as data.
    static HOLES_AS_DATA: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with this thread's host reads limited to the host page cache: a read that would
/// wait for the disk fails at once (with an I/O error) instead. Nothing else changes: writes,
/// syncs and reads on other threads behave as always. The NBD server answers a read on the
/// thread that received it this way, and leaves it to a worker thread when the disk is needed.
pub fn from_cache_only<T>(f: impl FnOnce() -> T) -> T {
    let before = CACHE_ONLY.replace(true);
    let result = f();
    CACHE_ONLY.set(before);
    result
}

/// Whether this thread is inside `from_cache_only`.
pub fn cache_only() -> bool {
    CACHE_ONLY.get()
}

/// Runs `f` with `HostFile::data_runs` on this thread calling every range data, without asking
/// the host file system: block status then reports what the format allocated, and a range the
/// host punched inside an allocated cluster reads as data (its zeros). Two `lseek` calls per
/// status cost a 4 KiB NBD read about a sixth of its CPU time, for a reply that only skips
/// sending zeros (qemu-nbd does not ask the host either when it plans a read).
pub fn with_holes_as_data<T>(f: impl FnOnce() -> T) -> T {
    let before = HOLES_AS_DATA.replace(true);
    let result = f();
    HOLES_AS_DATA.set(before);
    result
}

/// `pread` that fails with `WouldBlock` where the bytes are not in the host page cache.
/// `refused` is set once the file's file system refuses such reads (EOPNOTSUPP): later ones
/// then fail at once instead of costing a system call that cannot succeed.
fn read_cached_at(
    file: &File,
    refused: &AtomicBool,
    buf: &mut [u8],
    offset: u64,
) -> std::io::Result<usize> {
    if refused.load(Ordering::Relaxed) {
        return Err(std::io::ErrorKind::WouldBlock.into());
    }
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: one iovec naming `buf`, which is valid and writable for its whole length while
    // the call runs; the descriptor is the open file's own.
    let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    match usize::try_from(n) {
        Ok(n) => Ok(n),
        Err(_) => {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                refused.store(true, Ordering::Relaxed);
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Err(e)
        }
    }
}

/// An open host file that knows its own path for error messages.
#[derive(Debug)]
pub struct HostFile {
    /// Shared with the write-back thread while it starts a write-back of the file.
    file: Arc<File>,
    path: PathBuf,
    writable: bool,
    /// The lock bytes `lock_bytes` took, released on drop.
    locked: std::sync::Mutex<Vec<u64>>,
    /// Counts this process's writes to the file (for files opened writable).
    activity: Option<std::sync::Arc<WriteActivity>>,
    /// Device and inode.
    key: activity::FileKey,
    /// The file system refused a read limited to the page cache (`from_cache_only`).
    nowait_refused: AtomicBool,
    /// The runs of sequential writes whose write-back this file starts as they grow.
    sequential_writes: writeback::SequentialRuns,
    /// Large reads and writes inside `bypassing_page_cache`.
    direct: direct::DirectIo,
    /// Write-backs started, for tests.
    #[cfg(test)]
    writebacks_started: std::sync::atomic::AtomicU64,
    /// The test's watch on this file and the file's index in it, if the test set one before
    /// the file was opened.
    #[cfg(test)]
    watch: Option<(std::sync::Arc<fault::Watch>, usize)>,
}

impl HostFile {
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io("open", e).with_path(path))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(path))?;
        let key = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        let activity = writable.then(|| activity::activity_of(key));
        let file = Arc::new(file);
        Ok(HostFile {
            direct: direct::DirectIo::new(Arc::clone(&file), key, writable),
            file,
            path: path.to_path_buf(),
            writable,
            locked: std::sync::Mutex::new(Vec::new()),
            activity,
            key,
            nowait_refused: AtomicBool::new(false),
            sequential_writes: writeback::SequentialRuns::default(),
            #[cfg(test)]
            writebacks_started: Default::default(),
            #[cfg(test)]
            watch: fault::watch_of(path),
        })
    }

    /// Hands `request` to the test's watch on this file, which may fail it, or (`false`) let
    /// it succeed without carrying it out.
    #[cfg(test)]
    fn before(&self, request: fault::Request<'_>) -> Result<bool> {
        match &self.watch {
            Some((watch, index)) => watch
                .before(request, *index, &self.file)
                .map_err(|e| e.with_path(&self.path)),
            None => Ok(true),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros, because images
    /// may legitimately end before their last allocated block's tail (sparse host files).
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        #[cfg(test)]
        self.before(fault::Request::Read {
            offset,
            len: buf.len(),
        })?;
        let cache_only = CACHE_ONLY.get();
        let direct = !cache_only && direct::wanted(buf.len());
        let mut done = 0;
        while done < buf.len() {
            let at = offset + done as u64;
            let rest = &mut buf[done..];
            let read = match cache_only {
                true => read_cached_at(&self.file, &self.nowait_refused, rest, at),
                false => match direct {
                    true => self.direct.read_at(rest, at),
                    false => None,
                }
                .unwrap_or_else(|| self.file.read_at(rest, at)),
            };
            match read {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read", e).at_offset(at).with_path(&self.path)),
            }
        }
        Ok(())
    }

    pub fn write_all_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        #[cfg(test)]
        self.before(fault::Request::Write { offset, data: buf })?;
        self.warm_partial_pages(offset, buf.len() as u64);
        let direct = direct::wanted(buf.len())
            .then(|| self.direct.write_range(offset, buf.len()))
            .flatten();
        let write = || match &direct {
            Some(pages) => self.write_around_cache(buf, offset, pages.clone()),
            None => self.file.write_all_at(buf, offset),
        };
        let written = match &self.activity {
            Some(activity) => activity.around(write, || {
                self.file
                    .metadata()
                    .ok()
                    .map(|m| activity::FileState::of(&m))
            }),
            None => write(),
        };
        written.map_err(|e| {
            Error::io("write", e)
                .at_offset(offset)
                .with_path(&self.path)
        })?;
        // Only the page cache needs its write-back started.
        let recorded = match direct {
            None => self.sequential_writes.record(offset, buf.len() as u64),
            Some(_) => None,
        };
        if let Some((start, len)) = recorded {
            #[cfg(test)]
            self.writebacks_started.fetch_add(1, Ordering::Relaxed);
            writeback::start_writeback(&self.file, start, len);
        }
        Ok(())
    }

    /// Writes `buf` at `offset` with `pages` (whole host pages, `DirectIo::write_range`)
    /// bypassing the page cache and the partly covered pages at either end through it; all of
    /// it through the cache where a direct write is refused.
    fn write_around_cache(
        &self,
        buf: &[u8],
        offset: u64,
        pages: std::ops::Range<usize>,
    ) -> std::io::Result<()> {
        let (Some(head), Some(middle), Some(tail)) = (
            buf.get(..pages.start),
            buf.get(pages.clone()),
            buf.get(pages.end..),
        ) else {
            return self.file.write_all_at(buf, offset);
        };
        self.file.write_all_at(head, offset)?;
        let middle_at = offset + pages.start as u64;
        match self.direct.write_all_at(middle, middle_at) {
            Some(written) => written?,
            None => self.file.write_all_at(middle, middle_at)?,
        }
        self.file.write_all_at(tail, offset + pages.end as u64)
    }

    /// Brings the host pages that a write covers only partly into the page cache first. The
    /// host file system would otherwise read them from disk inside the write, under its
    /// exclusive inode lock, so concurrent writers would queue behind one disk read at a time;
    /// read here, outside that lock, the reads of several writers overlap. Image layouts whose
    /// data area is not page aligned (qemu-img's VDI puts it at 0x1200) make every 4 KiB guest
    /// write such a write. Purely a hint: a failed read changes nothing.
    ///
    /// For large writes the page is first asked for with `POSIX_FADV_WILLNEED`, which reads
    /// just that page: a plain read of a page not in the cache starts the host's readahead
    /// over the pages the write is about to overwrite, and with a layout whose partial pages
    /// fall just so (a VHD's blocks, 2 MiB + 512 bytes apart) the readahead window kept
    /// growing until a 1 GiB sequential overwrite read the whole file first. The read after
    /// it then finds the page and only waits for it. Without this, sixty-four NBD workers
    /// overwriting a VDI in 256 KiB requests queued behind one another's disk reads, at 0.9
    /// of qemu-nbd's single writer.
    fn warm_partial_pages(&self, offset: u64, len: u64) {
        let mut byte = [0u8; 1];
        for page in partial_pages(offset, len).into_iter().flatten() {
            if len >= WARM_LIMIT {
                // SAFETY: posix_fadvise on a descriptor we own; it takes no pointers.
                unsafe {
                    libc::posix_fadvise(
                        self.file.as_raw_fd(),
                        page as libc::off_t,
                        HOST_PAGE as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
            let _ = self.file.read_at(&mut byte, page);
        }
    }

    /// Makes `[offset, offset + len)` of the file read as zeros and gives its whole host blocks
    /// back to the file system (`fallocate(PUNCH_HOLE | KEEP_SIZE)`): the file keeps its length,
    /// and partial blocks at either end are zeroed by the host. Where the host file system
    /// cannot punch holes (EOPNOTSUPP), the range is written with zeros instead, up to the end
    /// of the file, so the result reads the same and only the space stays taken.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= i64::MAX as u64)
            .ok_or_else(|| Error::out_of_range(format!("punch {offset} + {len} overflows")))?;
        // Tests see a punch as the write of zeros it stands for, so recordings and power
        // losses replay it like any other write.
        #[cfg(test)]
        if self.watch.is_some() {
            let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
            self.before(fault::Request::Write {
                offset,
                data: &zeros,
            })?;
        }
        let punch = || {
            // SAFETY: fallocate on a file descriptor we own; it takes no pointers.
            let rc = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    (end - offset) as libc::off_t,
                )
            };
            match rc {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        };
        let punched = match &self.activity {
            Some(activity) => activity.around(punch, || {
                self.file
                    .metadata()
                    .ok()
                    .map(|m| activity::FileState::of(&m))
            }),
            None => punch(),
        };
        match punched {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeros(offset, end),
            Err(e) => Err(Error::io("punch hole", e)
                .at_offset(offset)
                .with_path(&self.path)),
        }
    }

    /// Writes zeros over `[offset, end)`, clipped to the file's length (the fallback of
    /// `punch_hole`, which never grows the file).
    fn write_zeros(&self, offset: u64, end: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let end = end.min(self.len()?);
        let zeros = vec![0u8; CHUNK.min(end.saturating_sub(offset)) as usize];
        let mut at = offset;
        while at < end {
            let n = CHUNK.min(end - at) as usize;
            self.write_all_at(zeros.get(..n).unwrap_or_default(), at)?;
            at += n as u64;
        }
        Ok(())
    }

    // A host file's length has no useful "is empty" counterpart for images.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    /// Sets the file's length (a raw disk growing); what it adds reads as zeros.
    pub fn set_len(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| Error::io("truncate", e).with_path(&self.path))
    }

    /// Bytes the host file system holds for the file (`st_blocks`), or 0 when it cannot say.
    pub fn allocated_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file
            .metadata()
            .map_or(0, |m| m.blocks().saturating_mul(512))
    }

    /// The runs of `[offset, offset + len)` that hold data in the host file, in order, as
    /// `(offset, len)`; the rest are holes (punched or never written) that read as zeros.
    /// Where the host file system cannot tell (`lseek` fails other than with ENXIO), the whole
    /// rest of the range counts as data, which is never wrong, only less sparse; so does the
    /// whole range inside `with_holes_as_data`.
    pub fn data_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len).min(i64::MAX as u64);
        if HOLES_AS_DATA.get() {
            return if end > offset {
                vec![(offset, end - offset)]
            } else {
                Vec::new()
            };
        }
        let mut runs = Vec::new();
        let mut at = offset;
        let mut retries = 0;
        while at < end {
            let data = match self.seek(at, libc::SEEK_DATA) {
                Ok(Some(data)) if data < end => data,
                Ok(_) => break,
                Err(()) => {
                    runs.push((at, end - at));
                    break;
                }
            };
            let hole = match self.seek(data, libc::SEEK_HOLE) {
                Ok(Some(hole)) => hole.clamp(data, end),
                Ok(None) | Err(()) => end,
            };
            if hole == data {
                // Punched between the two calls (a discard of a neighbouring range on another
                // thread): ask again from there, and call the rest data if it keeps changing.
                retries += 1;
                if retries > 8 {
                    runs.push((data, end - data));
                    break;
                }
                at = data;
                continue;
            }
            runs.push((data, hole - data));
            at = hole;
        }
        runs
    }

    /// `lseek(offset, whence)`: `Ok(None)` for ENXIO (no data past `offset`), `Err` for any
    /// other failure.
    fn seek(&self, offset: u64, whence: libc::c_int) -> std::result::Result<Option<u64>, ()> {
        // SAFETY: lseek on a file descriptor we own; it takes no pointers. The descriptor's
        // shared position is never used for I/O here (every read and write is positional).
        let at = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        match u64::try_from(at) {
            Ok(at) => Ok(Some(at)),
            Err(_) if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) => {
                Ok(None)
            }
            Err(_) => Err(()),
        }
    }

    pub fn metadata(&self) -> Result<std::fs::Metadata> {
        self.file
            .metadata()
            .map_err(|e| Error::io("stat", e).with_path(&self.path))
    }

    pub fn sync_data(&self) -> Result<()> {
        #[cfg(test)]
        if !self.before(fault::Request::Sync)? {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync", e).with_path(&self.path))
    }

    /// Takes shared (read) OFD locks on single bytes, the way QEMU announces the permissions it
    /// holds and the ones it refuses to share. Released when the `HostFile` is dropped.
    pub fn lock_bytes(&self, bytes: &[u64]) -> Result<()> {
        let mut locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
        for &byte in bytes {
            let mut lock = ofd_lock(libc::F_RDLCK, byte);
            // SAFETY: fcntl on a file descriptor we own, with a valid flock struct.
            let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(Error::busy(format!(
                    "cannot take lock byte {byte}; another process holds the image: {e}"
                ))
                .with_path(&self.path));
            }
            locked.push(byte);
            own_locks::add(self.key, byte);
        }
        Ok(())
    }

    /// Whether another open file description holds a lock on `byte` that conflicts with an
    /// exclusive lock, i.e. whether some process has announced that permission on it.
    pub fn byte_locked_by_other(&self, byte: u64) -> Result<bool> {
        let mut lock = ofd_lock(libc::F_WRLCK, byte);
        // SAFETY: fcntl on a file descriptor we own, with a valid flock struct.
        let rc = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::io("probe lock", e).with_path(&self.path));
        }
        Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
    }

    /// Whether another process has announced the permission of lock `byte` on this file. Locks
    /// this process holds through other descriptions of the file do not count.
    pub fn byte_locked_by_another_process(&self, byte: u64) -> Result<bool> {
        if !self.byte_locked_by_other(byte)? {
            return Ok(false);
        }
        let mine = {
            let locked = self.locked.lock().unwrap_or_else(|p| p.into_inner());
            locked.iter().filter(|&&b| b == byte).count()
        };
        Ok(own_locks::holds(self.key, byte) <= mine)
    }
}

/// The descriptor, for handing the file to the kernel (FUSE passthrough); reads and writes
/// go through the methods above.
impl std::os::fd::AsFd for HostFile {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for HostFile {
    /// Releases the lock bytes before the descriptor closes. Closing alone releases them only
    /// with the last reference to the open file description, and a child process between fork
    /// and exec (started by any thread) holds a reference for a moment: an image closed and
    /// reopened right then would look held by another process.
    fn drop(&mut self) {
        let locked = self.locked.get_mut().unwrap_or_else(|p| p.into_inner());
        for &byte in locked.iter() {
            own_locks::remove(self.key, byte);
            let mut lock = ofd_lock(libc::F_UNLCK, byte);
            // SAFETY: fcntl on a file descriptor we own, with a valid flock struct. A failure
            // leaves the lock to the close that follows.
            unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut lock) };
        }
    }
}

/// The start of the first and of the last host page that `[offset, offset + len)` covers only
/// partly (the same page is named once).
fn partial_pages(offset: u64, len: u64) -> [Option<u64>; 2] {
    let Some(end) = offset.checked_add(len).filter(|_| len > 0) else {
        return [None, None];
    };
    let head = offset - offset % HOST_PAGE;
    let tail = (end - 1) - (end - 1) % HOST_PAGE;
    let head_partial = offset % HOST_PAGE != 0 || (head == tail && end % HOST_PAGE != 0);
    let tail_partial = tail != head && end % HOST_PAGE != 0;
    [head_partial.then_some(head), tail_partial.then_some(tail)]
}

fn ofd_lock(kind: libc::c_int, byte: u64) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero bytes are a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte as libc::off_t;
    lock.l_len = 1;
    lock
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_pages_names_only_partly_covered_pages() {
        assert_eq!(partial_pages(0, 4096), [None, None]);
        assert_eq!(partial_pages(0, 8192), [None, None]);
        assert_eq!(partial_pages(0x1200, 4096), [Some(4096), Some(8192)]);
        assert_eq!(partial_pages(4096, 100), [Some(4096), None]);
        assert_eq!(partial_pages(4000, 100), [Some(0), Some(4096)]);
        assert_eq!(partial_pages(8192, 1 << 20), [None, None]);
        assert_eq!(partial_pages(100, 0), [None, None]);
        assert_eq!(partial_pages(u64::MAX, 2), [None, None]);
    }

    #[test]
    fn reads_from_the_cache_only_return_the_bytes_or_fail_and_change_nothing() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = HostFile::open(&path, false).unwrap();
        let mut whole = vec![0u8; data.len()];
        f.read_exact_at(&mut whole, 0).unwrap();
        assert!(!cache_only());
        // Just read, so in the page cache: where the file system takes RWF_NOWAIT reads, they
        // return the bytes, and the tail past the end reads as zeros as always.
        let mut buf = vec![1u8; 8192];
        let cached = from_cache_only(|| {
            assert!(cache_only());
            f.read_exact_at(&mut buf, data.len() as u64 - 4096)
        });
        assert!(!cache_only());
        if cached.is_ok() {
            assert!(buf[..4096] == data[data.len() - 4096..]);
            assert!(buf[4096..].iter().all(|&b| b == 0));
        }
        // Dropped from the cache, a read needing the disk fails at once (or, where the file
        // system keeps the pages, succeeds); either way the next ordinary read is whole.
        f.sync_data().unwrap();
        // SAFETY: advice about a descriptor we own; no pointers.
        unsafe { libc::posix_fadvise(f.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let mut middle = vec![0u8; 1 << 20];
        if from_cache_only(|| f.read_exact_at(&mut middle, 1 << 20)).is_ok() {
            assert!(middle == data[1 << 20..2 << 20]);
        }
        middle.fill(0);
        f.read_exact_at(&mut middle, 1 << 20).unwrap();
        assert!(middle == data[1 << 20..2 << 20]);
    }

    #[test]
    fn punch_hole_zeroes_the_range_keeps_the_length_and_frees_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0xabu8; 1 << 20]).unwrap();
        let f = HostFile::open(&path, true).unwrap();
        f.sync_data().unwrap();
        let before = f.metadata().unwrap().blocks();
        f.punch_hole(100, 512 << 10).unwrap();
        f.punch_hole(2 << 20, 4096).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 1 << 20, "the length stays");
        assert!(bytes[..100].iter().all(|&b| b == 0xab));
        assert!(bytes[100..100 + (512 << 10)].iter().all(|&b| b == 0));
        assert!(bytes[100 + (512 << 10)..].iter().all(|&b| b == 0xab));
        assert!(f.metadata().unwrap().blocks() < before);
        assert!(f.punch_hole(u64::MAX - 1, 2).is_err());
        // Where the file system reports holes, the punched pages are one; asked to skip the
        // question, the whole range is data, and the setting ends with the call.
        let runs = f.data_runs(0, 1 << 20);
        if runs.len() > 1 {
            assert!(runs
                .iter()
                .all(|&(at, n)| at + n <= 4096 || at >= 512 << 10));
        }
        assert_eq!(
            with_holes_as_data(|| f.data_runs(0, 1 << 20)),
            [(0, 1 << 20)]
        );
        assert_eq!(with_holes_as_data(|| f.data_runs(5, 0)), []);
        assert_eq!(f.data_runs(0, 1 << 20), runs);
    }

    #[test]
    fn read_past_end_is_zero_filled() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, b"abc").unwrap();
        let f = HostFile::open(&path, false).unwrap();
        let mut buf = [0xffu8; 6];
        f.read_exact_at(&mut buf, 1).unwrap();
        assert_eq!(&buf, b"bc\0\0\0\0");
    }

    #[test]
    fn long_sequential_writes_start_their_write_back_and_small_ones_do_not() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, b"").unwrap();
        let f = HostFile::open(&path, true).unwrap();
        let mib = 1usize << 20;
        for i in 0..20u8 {
            f.write_all_at(&vec![i; mib], u64::from(i) * mib as u64)
                .unwrap();
        }
        assert_eq!(f.writebacks_started.load(Ordering::Relaxed), 2);
        for i in 0..256u64 {
            f.write_all_at(&[7; 4096], (i * 7919 % 1024) * 4096)
                .unwrap();
        }
        assert_eq!(f.writebacks_started.load(Ordering::Relaxed), 2);
        let mut buf = vec![0u8; mib];
        f.read_exact_at(&mut buf, 19 * mib as u64).unwrap();
        assert!(buf.iter().all(|&b| b == 19));
    }

    #[test]
    fn dropping_releases_the_lock_bytes_even_while_the_description_lives_on() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        let holder = HostFile::open(&path, true).unwrap();
        holder.lock_bytes(&[101]).unwrap();
        // A duplicate descriptor, as a child between fork and exec would hold.
        let duplicate = holder.file.try_clone().unwrap();
        let prober = HostFile::open(&path, false).unwrap();
        assert!(prober.byte_locked_by_other(101).unwrap());
        drop(holder);
        assert!(!prober.byte_locked_by_other(101).unwrap());
        drop(duplicate);
    }

    #[test]
    fn our_own_locks_are_not_another_process() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        let holder = HostFile::open(&path, true).unwrap();
        holder.lock_bytes(&[101]).unwrap();
        let second = HostFile::open(&path, true).unwrap();
        assert!(second.byte_locked_by_other(101).unwrap());
        assert!(!second.byte_locked_by_another_process(101).unwrap());
        second.lock_bytes(&[101]).unwrap();
        drop(holder);
        assert!(!second.byte_locked_by_another_process(101).unwrap());
    }

    #[test]
    fn lock_bytes_are_seen_by_another_description() {
        let dir = crate::testutil::TempDir::new();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 512]).unwrap();
        let holder = HostFile::open(&path, true).unwrap();
        let prober = HostFile::open(&path, false).unwrap();
        assert!(!prober.byte_locked_by_other(101).unwrap());
        holder.lock_bytes(&[100, 101]).unwrap();
        assert!(prober.byte_locked_by_other(101).unwrap());
        assert!(
            !holder.byte_locked_by_other(101).unwrap(),
            "own locks never conflict"
        );
        drop(holder);
        assert!(!prober.byte_locked_by_other(101).unwrap());
    }
}
