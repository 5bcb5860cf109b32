//! The classic transport: each request thread blocks in `read(2)` on its own /dev/fuse
//! descriptor (a clone of the mount's, `FUSE_DEV_IOC_CLONE`, as fuser's `clone_fd` does) and
//! answers with one `writev(2)` of the reply header and body. File data comes from one static
//! zero buffer, so no request copies or clears memory in user space.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use crate::proto::{out_header, InHeader, Reply, ZeroFs, IN_HEADER_LEN, MAX_WRITE};

/// `_IOR(229, 0, uint32_t)`: attach a new /dev/fuse descriptor to an existing connection.
const FUSE_DEV_IOC_CLONE: libc::c_ulong = 0x8004_e500;

/// Zeros for READ replies; the kernel copies from here.
static ZEROS: [u8; MAX_WRITE as usize] = [0; MAX_WRITE as usize];

/// A request buffer: the kernel refuses reads into less than max_write plus a page.
pub fn request_buffer() -> Vec<u8> {
    vec![0u8; MAX_WRITE as usize + 4096]
}

/// Opens a new /dev/fuse descriptor attached to the connection of `fd`.
pub fn clone_fd(fd: &File) -> io::Result<File> {
    let clone = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")?;
    let mut source = fd.as_raw_fd() as u32;
    // SAFETY: FUSE_DEV_IOC_CLONE reads one u32 (the source descriptor) from the pointer, which
    // points at a live local; both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(clone.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut source) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(clone)
}

/// Sends one reply (header plus body) with a single writev.
pub fn send_reply(fd: &File, unique: u64, error: i32, body: &[u8]) -> io::Result<()> {
    let header = out_header(unique, error, body.len());
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: body.as_ptr() as *mut libc::c_void,
            iov_len: body.len(),
        },
    ];
    // SAFETY: both iovecs point at live buffers of the stated lengths, which the kernel only
    // reads; the descriptor is open.
    let rc = unsafe { libc::writev(fd.as_raw_fd(), iov.as_ptr(), 2) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        // ENOENT: the request was interrupted and is gone; not an error of ours.
        if e.raw_os_error() != Some(libc::ENOENT) {
            return Err(e);
        }
    }
    Ok(())
}

/// Reads one request into `buf`; Ok(None) once the file system is unmounted.
pub fn read_request(fd: &File, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes; the descriptor is open.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::ENOENT) => continue,
            Some(libc::ENODEV) => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Serves requests on `fd` until the file system is unmounted; returns how many it read.
pub fn serve(fs: Arc<ZeroFs>, fd: File) -> io::Result<u64> {
    let mut buf = request_buffer();
    let mut out = vec![0u8; 4096];
    let mut count = 0;
    while let Some(n) = read_request(&fd, &mut buf)? {
        count += 1;
        let Some(h) = InHeader::parse(&buf[..n]) else {
            continue;
        };
        let body = &buf[IN_HEADER_LEN..n];
        match fs.handle(&h, body, body, &mut out) {
            Reply::None => {}
            Reply::Error(errno) => send_reply(&fd, h.unique, -errno, &[])?,
            Reply::Bytes(len) => send_reply(&fd, h.unique, 0, &out[..len])?,
            Reply::Zeros(len) => send_reply(&fd, h.unique, 0, &ZEROS[..len])?,
        }
    }
    Ok(count)
}
