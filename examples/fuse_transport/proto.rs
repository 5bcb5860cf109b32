//! The raw FUSE protocol, as much of it as a read-only file system of one all-zero file needs,
//! written once and shared by both transports so that they differ only in how requests reach
//! the daemon and how replies leave it.
//!
//! The layouts are those of `include/uapi/linux/fuse.h` (protocol 7.x, little-endian on the
//! machines we run on, so fields are read and written with `from_le_bytes` / `to_le_bytes`).
//! A request is a `fuse_in_header` (40 bytes), then the opcode's fixed argument struct (`arg`
//! below), then variable data (`data`, e.g. a file name). On /dev/fuse they arrive back to back;
//! over io_uring the header lands in `in_out`, the fixed struct in `op_in` and the variable data
//! in the payload buffer. A reply is a `fuse_out_header` (16 bytes) followed by the opcode's
//! reply body.

/// `fuse_in_header`: length of the whole request, opcode, unique id, node id, caller ids.
pub const IN_HEADER_LEN: usize = 40;
/// `fuse_out_header`: length of the whole reply, negative errno, unique id.
pub const OUT_HEADER_LEN: usize = 16;

/// Opcodes used here (`enum fuse_opcode`).
pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
}

/// INIT flags (the 64-bit value: `flags | flags2 << 32`).
pub mod init_flag {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const OVER_IO_URING: u64 = 1 << 41;
}

/// Largest request body: the kernel's `max_pages` limit of 256 pages.
pub const MAX_WRITE: u32 = 1 << 20;
const ROOT: u64 = 1;
const FILE: u64 = 2;
const FILE_NAME: &[u8] = b"zero";
const TTL_SECS: u64 = 3600;

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// A little-endian writer into a reply buffer that never writes past its end.
struct Put<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl<'a> Put<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Put { buf, at: 0 }
    }
    fn bytes(&mut self, v: &[u8]) -> &mut Self {
        if let Some(dst) = self.buf.get_mut(self.at..self.at + v.len()) {
            dst.copy_from_slice(v);
        }
        self.at += v.len();
        self
    }
    fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn zeros(&mut self, n: usize) -> &mut Self {
        if let Some(dst) = self.buf.get_mut(self.at..self.at + n) {
            dst.fill(0);
        }
        self.at += n;
        self
    }
    /// Bytes written, or None when the buffer was too small.
    fn done(&self) -> Option<usize> {
        (self.at <= self.buf.len()).then_some(self.at)
    }
}

/// The parts of `fuse_in_header` a handler needs (its `len` is implied by the read).
#[derive(Clone, Copy, Debug)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER_LEN {
            return None;
        }
        Some(InHeader {
            opcode: u32_at(b, 4),
            unique: u64_at(b, 8),
            nodeid: u64_at(b, 16),
        })
    }
}

/// Writes a `fuse_out_header` for a reply body of `body` bytes (`error` is 0 or a negative errno).
pub fn out_header(unique: u64, error: i32, body: usize) -> [u8; OUT_HEADER_LEN] {
    let mut h = [0u8; OUT_HEADER_LEN];
    let len = (OUT_HEADER_LEN + body) as u32;
    h[0..4].copy_from_slice(&len.to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// What a handler answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reply {
    /// No reply at all (FORGET, INTERRUPT).
    None,
    /// An error reply with this (positive) errno.
    Error(i32),
    /// A reply body of this many bytes, written at the start of the output buffer.
    Bytes(usize),
    /// A reply body of this many zero bytes (file data); the transport supplies them.
    Zeros(usize),
}

/// What the kernel offered in FUSE_INIT.
#[derive(Clone, Copy, Debug)]
pub struct InitIn {
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    pub flags: u64,
}

impl InitIn {
    /// Parses `fuse_init_in` (major, minor, max_readahead, flags, flags2 when INIT_EXT).
    pub fn parse(arg: &[u8]) -> InitIn {
        let mut flags = u64::from(u32_at(arg, 12));
        if flags & init_flag::INIT_EXT != 0 {
            flags |= u64::from(u32_at(arg, 16)) << 32;
        }
        InitIn {
            major: u32_at(arg, 0),
            minor: u32_at(arg, 4),
            max_readahead: u32_at(arg, 8),
            flags,
        }
    }
}

/// Builds the `fuse_init_out` reply body (64 bytes) into `out`, asking for the flags in `want`
/// that the kernel offered; returns its length and the flags agreed.
pub fn init_reply(init: &InitIn, want: u64, out: &mut [u8]) -> (usize, u64) {
    let flags = (want | init_flag::INIT_EXT) & init.flags;
    let mut p = Put::new(out);
    p.u32(7) // major
        .u32(init.minor)
        .u32(init.max_readahead.min(MAX_WRITE))
        .u32(flags as u32)
        .u16(16) // max_background
        .u16(12) // congestion_threshold
        .u32(MAX_WRITE)
        .u32(1) // time_gran
        .u16((MAX_WRITE / 4096) as u16) // max_pages
        .u16(0) // map_alignment
        .u32((flags >> 32) as u32)
        .u32(0) // max_stack_depth
        .u16(0) // request_timeout
        .zeros(22); // unused[11]
    (p.done().unwrap_or(0), flags)
}

/// The file system: a root directory holding one read-only, all-zero file named `zero`.
pub struct ZeroFs {
    pub size: u64,
}

impl ZeroFs {
    /// `fuse_attr` (88 bytes).
    fn attr(&self, p: &mut Put<'_>, ino: u64) {
        let (size, mode, nlink) = if ino == ROOT {
            (0, libc::S_IFDIR | 0o755, 2)
        } else {
            (self.size, libc::S_IFREG | 0o444, 1)
        };
        p.u64(ino)
            .u64(size)
            .u64(size.div_ceil(512))
            .u64(0) // atime
            .u64(0) // mtime
            .u64(0) // ctime
            .u32(0)
            .u32(0)
            .u32(0)
            .u32(mode)
            .u32(nlink)
            .u32(0) // uid
            .u32(0) // gid
            .u32(0) // rdev
            .u32(4096) // blksize
            .u32(0); // flags
    }

    /// Answers one request. `arg` holds the opcode's fixed argument struct at its start, `data`
    /// the variable part (a name); on /dev/fuse both are the request body. `out` receives the
    /// reply body.
    pub fn handle(&self, h: &InHeader, arg: &[u8], data: &[u8], out: &mut [u8]) -> Reply {
        let mut p = Put::new(out);
        match h.opcode {
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => return Reply::None,
            op::LOOKUP => {
                let name = data.split(|&b| b == 0).next().unwrap_or(&[]);
                if h.nodeid != ROOT || name != FILE_NAME {
                    return Reply::Error(libc::ENOENT);
                }
                p.u64(FILE).u64(0).u64(TTL_SECS).u64(TTL_SECS).u32(0).u32(0);
                self.attr(&mut p, FILE);
            }
            op::GETATTR => {
                if h.nodeid != ROOT && h.nodeid != FILE {
                    return Reply::Error(libc::ENOENT);
                }
                p.u64(TTL_SECS).u32(0).u32(0);
                self.attr(&mut p, h.nodeid);
            }
            // fuse_open_out: fh, open_flags (none: page cache used, dropped on every open),
            // backing_id.
            op::OPEN | op::OPENDIR => {
                p.u64(0).u32(0).u32(0);
            }
            op::READ => {
                // fuse_read_in: fh, offset, size, ...
                let offset = u64_at(arg, 8);
                let size = u64::from(u32_at(arg, 16));
                let n = size.min(self.size.saturating_sub(offset));
                return Reply::Zeros(n as usize);
            }
            op::READDIR => {
                let offset = u64_at(arg, 8);
                let size = (u32_at(arg, 16) as usize).min(out.len());
                return Reply::Bytes(readdir(offset, &mut out[..size]));
            }
            op::STATFS => {
                // fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, ...
                p.u64(self.size / 4096).u64(0).u64(0).u64(2).u64(0);
                p.u32(4096).u32(255).u32(4096).u32(0).zeros(24);
            }
            op::RELEASE | op::RELEASEDIR | op::FLUSH | op::ACCESS | op::DESTROY => {}
            _ => return Reply::Error(libc::ENOSYS),
        }
        match p.done() {
            Some(n) => Reply::Bytes(n),
            None => Reply::Error(libc::ERANGE),
        }
    }
}

/// Fills `out` with `fuse_dirent`s (ino, next offset, name length, type, name padded to 8)
/// from entry `offset` on; returns the bytes used.
fn readdir(offset: u64, out: &mut [u8]) -> usize {
    let entries: [(u64, &[u8], u32); 3] = [
        (ROOT, b".", libc::DT_DIR.into()),
        (ROOT, b"..", libc::DT_DIR.into()),
        (FILE, FILE_NAME, libc::DT_REG.into()),
    ];
    let mut used = 0;
    for (i, (ino, name, kind)) in entries.iter().enumerate().skip(offset as usize) {
        let len = (24 + name.len()).next_multiple_of(8);
        let Some(slot) = out.get_mut(used..used + len) else {
            break;
        };
        let mut p = Put::new(slot);
        p.u64(*ino)
            .u64(i as u64 + 1)
            .u32(name.len() as u32)
            .u32(*kind)
            .bytes(name)
            .zeros(len - 24 - name.len());
        used += len;
    }
    used
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_stop_at_the_end_of_the_file() {
        let fs = ZeroFs { size: 10_000 };
        let h = InHeader {
            opcode: op::READ,
            unique: 1,
            nodeid: FILE,
        };
        let mut arg = [0u8; 40];
        arg[8..16].copy_from_slice(&8192u64.to_le_bytes());
        arg[16..20].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(fs.handle(&h, &arg, &arg, &mut []), Reply::Zeros(1808));
    }
}
