//! The pieces of FUSE over io_uring below any request handling: the SQEs that register a ring
//! entry and commit an answer, the buffers the kernel fills, and where queue threads run. Used
//! by the transport and by the prototype that measured it (`examples/fuse_transport`).

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::io;
use std::ptr::NonNull;

use io_uring::{opcode, squeue, types};

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;
/// `sizeof(struct fuse_uring_req_header)` and its parts' offsets: `in_out` (the request's
/// `fuse_in_header`, then the answer's `fuse_out_header`), `op_in` (the opcode's argument
/// struct) and `ring_ent_in_out` (flags, commit id, payload size).
pub const HEADER_LEN: usize = 288;
pub const OP_IN: usize = 128;
pub const ENT_IN_OUT: usize = 256;

/// A zeroed, page-aligned buffer that the kernel reads and writes while an SQE naming it is in
/// flight; the queue's thread touches it only between that SQE's CQE and the next submission.
pub struct SharedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by one queue thread at a time.
unsafe impl Send for SharedBuf {}

impl SharedBuf {
    pub fn new(len: usize) -> io::Result<SharedBuf> {
        let layout = Layout::from_size_align(len, 4096).map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(SharedBuf { ptr, layout })
    }

    pub fn iovec(&self) -> libc::iovec {
        libc::iovec {
            iov_base: self.ptr.as_ptr().cast(),
            iov_len: self.layout.size(),
        }
    }

    /// The buffer's bytes.
    ///
    /// # Safety
    /// The kernel writes the buffer while an SQE naming it is in flight: take the slice only
    /// after that SQE's CQE, and drop it before submitting the next one.
    pub unsafe fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is live and `layout.size()` bytes long; the caller keeps the
        // kernel off it meanwhile.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for SharedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The 80-byte command area of a FUSE ring SQE (`struct fuse_uring_cmd_req`).
fn cmd_req(commit_id: u64, qid: u16) -> [u8; 80] {
    let mut cmd = [0u8; 80];
    cmd[8..16].copy_from_slice(&commit_id.to_le_bytes());
    cmd[16..18].copy_from_slice(&qid.to_le_bytes());
    cmd
}

/// The SQE registering entry `idx` (its `user_data`) of queue `qid`: header and payload
/// buffer as the iovec pair `iov`, which must stay in place while the ring lives.
pub fn register_sqe(iov: &[libc::iovec; 2], qid: u16, idx: usize) -> squeue::Entry128 {
    let sqe = opcode::UringCmd80::new(types::Fixed(0), FUSE_IO_URING_CMD_REGISTER)
        .cmd(cmd_req(0, qid))
        .addr(Some(iov.as_ptr() as u64))
        .build()
        .user_data(idx as u64);
    // The io-uring crate has no setter for `len` on a URING_CMD, which FUSE reads as the
    // iovec count; it is the u32 at byte 24 of `struct io_uring_sqe`.
    // SAFETY: `Entry128` is `#[repr(C)]`, a 64-byte `io_uring_sqe` followed by 64 bytes of
    // command data, 128 bytes with no padding and no invalid bit patterns.
    let mut raw: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    raw[24..28].copy_from_slice(&2u32.to_le_bytes());
    // SAFETY: as above; only the `len` field changed.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(raw) }
}

/// The SQE answering request `commit_id` in entry `idx` of queue `qid` (the answer is in the
/// entry's buffers) and handing the entry back for the next request.
pub fn commit_sqe(commit_id: u64, qid: u16, idx: usize) -> squeue::Entry128 {
    opcode::UringCmd80::new(types::Fixed(0), FUSE_IO_URING_CMD_COMMIT_AND_FETCH)
        .cmd(cmd_req(commit_id, qid))
        .build()
        .user_data(idx as u64)
}

/// Keeps the calling thread on one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET write inside it; sched_setaffinity
    // reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Queues the kernel expects: one per possible CPU (`num_possible_cpus()`).
pub fn possible_cpus() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cpu/possible: {text:?}"),
        )
    };
    let mut count = 0usize;
    for part in text.trim().split(',') {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let lo: usize = lo.parse().map_err(|_| bad())?;
        let hi: usize = hi.parse().map_err(|_| bad())?;
        count = hi
            .checked_sub(lo)
            .and_then(|n| count.checked_add(n + 1))
            .ok_or_else(bad)?;
    }
    Ok(count)
}
