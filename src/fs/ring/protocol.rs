//! The FUSE requests that arrive over io_uring, decoded from their raw layout
//! (`include/uapi/linux/fuse.h`), served by `FsCore` and answered in place: what fuser does for
//! the /dev/fuse transport, for the operations imgfs serves.
//!
//! Over io_uring a request is split in three: its `fuse_in_header` (in the entry's header
//! buffer), the opcode's fixed argument struct (`op_in`, 128 bytes beside it) and its variable
//! data (names, written bytes) in the payload buffer, which the reply body then overwrites. So
//! every handler takes what it needs out of the payload before it writes its answer.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::RawBacking;
use crate::fs::backing::{Backings, OpenAnswer};
use crate::fs::core::{Attr, Errno, FsCore, NodeKind};
use crate::fs::fuse::TTL;
use crate::host::AlignedBuffer;

/// Opcodes (`enum fuse_opcode`) served here; FORGET, BATCH_FORGET and INTERRUPT never come
/// over the ring, INIT came on /dev/fuse before it.
mod op {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const DESTROY: u32 = 38;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `fuse_setattr_in.valid` bits.
mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
}

/// `fuse_open_out.open_flags`.
const FOPEN_DIRECT_IO: u32 = 1 << 0;
const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
const FOPEN_PASSTHROUGH: u32 = 1 << 7;
/// `fuse_getattr_in.getattr_flags`: `fh` is set.
const FUSE_GETATTR_FH: u32 = 1;

thread_local! {
    /// What `FsCore::read_into` fills (read-ahead hands its buffers over in it); copied into
    /// the ring entry, whose buffer the kernel knows by address.
    static READ_BUFFER: std::cell::RefCell<AlignedBuffer> =
        std::cell::RefCell::new(AlignedBuffer::default());
}

/// The little-endian field at `at`, 0 where `b` is too short (never for the kernel's fixed
/// layouts read here).
pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

/// A NUL-terminated name at the start of `b`.
fn name_at(b: &[u8]) -> &OsStr {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    OsStr::from_bytes(&b[..end])
}

/// A little-endian writer into a reply body that never writes past its end.
struct Put<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Put<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Put { buf, at: 0 }
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        if let Some(dst) = self
            .at
            .checked_add(v.len())
            .and_then(|end| self.buf.get_mut(self.at..end))
        {
            dst.copy_from_slice(v);
        }
        self.at = self.at.saturating_add(v.len());
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        if let Some(dst) = self
            .at
            .checked_add(n)
            .and_then(|end| self.buf.get_mut(self.at..end))
        {
            dst.fill(0);
        }
        self.at = self.at.saturating_add(n);
        self
    }
    fn time(&mut self, t: SystemTime) -> (u64, u32) {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        (d.as_secs(), d.subsec_nanos())
    }
    /// `fuse_attr`.
    fn attr(&mut self, a: &Attr) -> &mut Self {
        let kind = match a.kind {
            NodeKind::Dir => libc::S_IFDIR,
            NodeKind::File => libc::S_IFREG,
        };
        let (at, atn) = self.time(a.atime);
        let (mt, mtn) = self.time(a.mtime);
        let (ct, ctn) = self.time(a.ctime);
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(at).u64(mt).u64(ct).u32(atn).u32(mtn).u32(ctn);
        self.u32(kind | u32::from(a.perm))
            .u32(a.nlink)
            .u32(a.uid)
            .u32(a.gid);
        // rdev, blksize, flags
        self.u32(0).u32(4096).u32(0)
    }
    /// `fuse_entry_out`: node id, generation, entry and attribute lifetimes, `fuse_attr`.
    fn entry(&mut self, a: &Attr) -> &mut Self {
        self.u64(a.ino).u64(0).u64(TTL.as_secs()).u64(TTL.as_secs());
        self.u32(TTL.subsec_nanos()).u32(TTL.subsec_nanos()).attr(a)
    }
    /// `fuse_attr_out`.
    fn attr_out(&mut self, a: &Attr) -> &mut Self {
        self.u64(TTL.as_secs())
            .u32(TTL.subsec_nanos())
            .u32(0)
            .attr(a)
    }
    fn len(&self) -> Result<usize, Errno> {
        if self.at <= self.buf.len() {
            Ok(self.at)
        } else {
            Err(Errno(libc::ERANGE))
        }
    }
}

/// One request as the ring delivered it.
pub struct Request<'a> {
    pub opcode: u32,
    pub nodeid: u64,
    /// The opcode's fixed argument struct (`op_in`).
    pub arg: &'a [u8],
    /// Bytes of the payload buffer that hold the request's variable data.
    pub data_len: usize,
}

/// Serves `req`; its variable data is at the start of `payload`, where the reply body is
/// written. Returns the body's length, or the errno to answer with.
pub fn serve(
    core: &FsCore,
    backings: &Backings<RawBacking>,
    register: &dyn Fn(&crate::host::HostFile) -> std::io::Result<RawBacking>,
    req: &Request<'_>,
    payload: &mut [u8],
) -> Result<usize, Errno> {
    let arg = req.arg;
    let data_len = req.data_len.min(payload.len());
    let ino = req.nodeid;
    match req.opcode {
        op::LOOKUP => {
            let attr = core.lookup(ino, name_at(&payload[..data_len]))?;
            Put::new(payload).entry(&attr).len()
        }
        op::GETATTR => {
            let fh = (u32_at(arg, 0) & FUSE_GETATTR_FH != 0).then(|| u64_at(arg, 8));
            let attr = core.getattr(ino, fh)?;
            Put::new(payload).attr_out(&attr).len()
        }
        op::SETATTR => {
            let valid = u32_at(arg, 0);
            if valid & (fattr::MODE | fattr::UID | fattr::GID) != 0 {
                return Err(Errno(libc::EPERM));
            }
            let time = |set: u32, now: u32, secs: usize, nsecs: usize| {
                if valid & now != 0 {
                    Some(SystemTime::now())
                } else if valid & set != 0 {
                    let d = Duration::new(u64_at(arg, secs), u32_at(arg, nsecs).min(999_999_999));
                    UNIX_EPOCH.checked_add(d)
                } else {
                    None
                }
            };
            let size = (valid & fattr::SIZE != 0).then(|| u64_at(arg, 16));
            let atime = time(fattr::ATIME, fattr::ATIME_NOW, 32, 56);
            let mtime = time(fattr::MTIME, fattr::MTIME_NOW, 40, 60);
            let attr = core.setattr(ino, size, atime, mtime)?;
            Put::new(payload).attr_out(&attr).len()
        }
        op::OPEN => {
            let flags = u32_at(arg, 0) as i32;
            let write = flags & libc::O_ACCMODE != libc::O_RDONLY;
            let fh = core.open(ino, write)?;
            backings.answer_open(
                core,
                (ino, fh, write),
                (),
                |(), file| register(file),
                |(), answer| {
                    let (flags, backing) = match answer {
                        OpenAnswer::Daemon => (FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES, 0),
                        OpenAnswer::Busy => return Err(Errno(libc::EBUSY)),
                        OpenAnswer::Passthrough(id) => (FOPEN_PASSTHROUGH, id.id),
                    };
                    Put::new(payload).u64(fh).u32(flags).u32(backing).len()
                },
            )
        }
        op::READ => {
            let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16));
            // The file's flags as they are now: `fcntl(F_SETFL)` may have changed O_DIRECT.
            let direct = u32_at(arg, 32) as i32 & libc::O_DIRECT != 0;
            READ_BUFFER.with_borrow_mut(|buf| {
                let len = core.read_into(fh, offset, size, direct, buf)?;
                let out = payload.get_mut(..len).ok_or(Errno(libc::EIO))?;
                out.copy_from_slice(buf.filled(len));
                Ok(len)
            })
        }
        op::WRITE => {
            let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16) as usize);
            let direct = u32_at(arg, 32) as i32 & libc::O_DIRECT != 0;
            let data = payload
                .get(..size.min(data_len))
                .ok_or(Errno(libc::EINVAL))?;
            let written = core.write_with(fh, offset, data, direct)?;
            Put::new(payload).u32(written).u32(0).len()
        }
        op::STATFS => {
            let s = core.statfs()?;
            let mut p = Put::new(payload);
            p.u64(s.blocks)
                .u64(s.bfree)
                .u64(s.bavail)
                .u64(s.files)
                .u64(s.ffree);
            p.u32(s.bsize)
                .u32(s.namelen)
                .u32(s.frsize)
                .zeros(4 + 24)
                .len()
        }
        op::RELEASE => {
            let fh = u64_at(arg, 0);
            backings.release(ino, fh);
            core.release(fh).map(|()| 0)
        }
        op::FLUSH | op::FSYNC => core.flush(u64_at(arg, 0)).map(|()| 0),
        op::SETXATTR => {
            let name = name_at(&payload[..data_len]).to_owned();
            core.setxattr(ino, &name).map(|()| 0)
        }
        op::GETXATTR => {
            let size = u32_at(arg, 0) as usize;
            let value = core.getxattr(ino, name_at(&payload[..data_len]))?;
            xattr_reply(&value, size, payload)
        }
        op::LISTXATTR => xattr_reply(&core.listxattr(ino), u32_at(arg, 0) as usize, payload),
        op::OPENDIR => {
            let fh = core.opendir(ino)?;
            Put::new(payload).u64(fh).u32(0).u32(0).len()
        }
        op::READDIR => {
            let (fh, offset, size) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16) as usize);
            let entries = core.readdir(fh)?;
            let out = payload
                .get_mut(..size.min(payload.len()))
                .ok_or(Errno(libc::EIO))?;
            Ok(dirents(&entries, offset, out))
        }
        op::RELEASEDIR => {
            core.releasedir(u64_at(arg, 0));
            Ok(0)
        }
        op::FSYNCDIR | op::ACCESS => Ok(0),
        op::DESTROY => {
            core.flush_all();
            Ok(0)
        }
        op::FALLOCATE => {
            let (fh, offset, len) = (u64_at(arg, 0), u64_at(arg, 8), u64_at(arg, 16));
            core.fallocate(fh, offset, len, u32_at(arg, 24) as i32)
                .map(|()| 0)
        }
        op::LSEEK => {
            let (fh, offset, whence) = (u64_at(arg, 0), u64_at(arg, 8), u32_at(arg, 16) as i32);
            // A negative offset (as the kernel's signed loff_t) is no place to seek from.
            if i64::try_from(offset).is_err() {
                return Err(Errno(libc::EINVAL));
            }
            let at = core.lseek(fh, offset, whence)?;
            Put::new(payload).u64(at).len()
        }
        _ => Err(Errno(libc::ENOSYS)),
    }
}

/// A GETXATTR or LISTXATTR answer: the value's size when asked for 0 bytes (a
/// `fuse_getxattr_out`), the value when it fits, else ERANGE.
fn xattr_reply(value: &[u8], size: usize, payload: &mut [u8]) -> Result<usize, Errno> {
    if size == 0 {
        let len = u32::try_from(value.len()).map_err(|_| Errno(libc::E2BIG))?;
        return Put::new(payload).u32(len).u32(0).len();
    }
    if value.len() > size {
        return Err(Errno(libc::ERANGE));
    }
    Put::new(payload).bytes(value).len()
}

/// Fills `out` with the `fuse_dirent`s of `entries` from index `offset` on, as many as fit
/// whole; each names the offset of the next.
fn dirents(entries: &[crate::fs::core::DirEntry], offset: u64, out: &mut [u8]) -> usize {
    let skip = usize::try_from(offset).unwrap_or(usize::MAX);
    let mut at = 0usize;
    for (i, (ino, kind, name)) in entries.iter().enumerate().skip(skip) {
        let name = name.as_bytes();
        let len = (24 + name.len()).next_multiple_of(8);
        let Some(slot) = at.checked_add(len).and_then(|end| out.get_mut(at..end)) else {
            break;
        };
        let kind = match kind {
            NodeKind::Dir => u32::from(libc::DT_DIR),
            NodeKind::File => u32::from(libc::DT_REG),
        };
        let mut p = Put::new(slot);
        p.u64(*ino)
            .u64(i as u64 + 1)
            .u32(name.len() as u32)
            .u32(kind);
        p.bytes(name).zeros(len - 24 - name.len());
        at += len;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sizeof(struct fuse_attr)`.
    const ATTR_LEN: usize = 88;

    #[test]
    fn dirents_stop_before_the_first_that_does_not_fit() {
        let entries = vec![
            (1, NodeKind::Dir, ".".into()),
            (7, NodeKind::File, "disk.vdi.raw".into()),
            (8, NodeKind::File, "x".into()),
        ];
        let mut out = [0xffu8; 24 + 8 + 24 + 16];
        let len = dirents(&entries, 0, &mut out);
        assert_eq!(len, 32 + 40);
        assert_eq!(u64_at(&out, 32), 7);
        assert_eq!(u64_at(&out, 40), 2, "next offset");
        assert_eq!(u32_at(&out, 48), 12);
        assert_eq!(u32_at(&out, 52), u32::from(libc::DT_REG));
        assert_eq!(&out[56..68], b"disk.vdi.raw");
        assert_eq!(&out[68..72], &[0; 4], "padding zeroed");
        // From offset 2 on: only "x".
        assert_eq!(dirents(&entries, 2, &mut out), 32);
        assert_eq!(&out[24..25], b"x");
    }

    #[test]
    fn attr_has_the_kernel_layout() {
        let t = UNIX_EPOCH + Duration::new(5, 6);
        let a = Attr {
            ino: 9,
            kind: NodeKind::File,
            size: 1 << 30,
            blocks: 8,
            perm: 0o640,
            uid: 1000,
            gid: 100,
            nlink: 1,
            atime: t,
            mtime: t,
            ctime: t,
        };
        let mut out = [0u8; 128];
        assert_eq!(Put::new(&mut out).entry(&a).len(), Ok(40 + ATTR_LEN));
        assert_eq!(u64_at(&out, 0), 9, "nodeid");
        let attr = &out[40..];
        assert_eq!(u64_at(attr, 8), 1 << 30);
        assert_eq!(u64_at(attr, 24), 5, "atime");
        assert_eq!(u32_at(attr, 48), 6, "atimensec");
        assert_eq!(u32_at(attr, 60), libc::S_IFREG | 0o640, "mode");
        assert_eq!(u32_at(attr, 68), 1000, "uid");
        assert_eq!(u32_at(attr, 80), 4096, "blksize");
        let mut short = [0u8; 100];
        assert_eq!(
            Put::new(&mut short).entry(&a).len(),
            Err(Errno(libc::ERANGE))
        );
    }

    #[test]
    fn xattr_sizes_and_ranges() {
        let mut out = [0u8; 16];
        assert_eq!(xattr_reply(b"abc", 0, &mut out), Ok(8));
        assert_eq!(u32_at(&out, 0), 3);
        assert_eq!(xattr_reply(b"abc", 2, &mut out), Err(Errno(libc::ERANGE)));
        assert_eq!(xattr_reply(b"abc", 3, &mut out), Ok(3));
        assert_eq!(&out[..3], b"abc");
    }
}
