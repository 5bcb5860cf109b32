//! FUSE over io_uring (Linux 6.14+, `fs/fuse/dev_uring.c`): after a FUSE_INIT reply carrying
//! `FUSE_OVER_IO_URING`, the daemon registers ring entries on the /dev/fuse descriptor with
//! `IORING_OP_URING_CMD` SQEs (128-byte SQEs, `IORING_SETUP_SQE128`), one queue per possible
//! CPU, each queue with its own thread and ring here (pinned to its CPU, as libfuse does).
//!
//! An entry is two buffers, passed as an iovec pair in the REGISTER SQE's `addr`/`len`:
//! - a `fuse_uring_req_header` (288 bytes): `in_out` (128; the `fuse_in_header` of a request,
//!   the `fuse_out_header` of its reply), `op_in` (128; the opcode's fixed argument struct) and
//!   `ring_ent_in_out` (32: flags, commit_id, payload_sz, padding, reserved);
//! - a payload buffer of at least the connection's max payload (here 1 MiB), holding the
//!   request's variable data and then the reply body.
//!
//! The 80-byte command area of the SQE holds `fuse_uring_cmd_req` (flags u64, commit_id u64,
//! qid u16). A CQE with result 0 says a request sits in the entry's buffers; the answer goes
//! back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH` (commit_id = the request's, from
//! `ring_ent_in_out`), which also hands the entry back for the next request. The kernel uses
//! the ring only once every queue has an entry registered; until then requests wait, and if a
//! registration fails it falls back to /dev/fuse for the whole connection. FORGET and
//! INTERRUPT still arrive on /dev/fuse, which the main thread keeps reading.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc::Sender;
use std::sync::Arc;

use imgfs::fs::ring::cmd::{
    commit_sqe, pin_to_cpu, register_sqe, SharedBuf, ENT_IN_OUT, HEADER_LEN, OP_IN,
};
use io_uring::{cqueue, squeue, IoUring};

use crate::proto::{out_header, InHeader, Reply, ZeroFs, MAX_WRITE, OUT_HEADER_LEN};

const PAYLOAD_LEN: usize = MAX_WRITE as usize;

/// One ring entry: its two buffers, the iovec pair the REGISTER SQE points at, and how many
/// leading bytes of the payload may be non-zero.
struct Entry {
    qid: u16,
    header: SharedBuf,
    payload: SharedBuf,
    iov: Box<[libc::iovec; 2]>,
    dirty: usize,
}

/// What a queue thread reports once its first CQE says whether the registration held.
pub type Registered = Result<u16, String>;

/// Serves queues `qids` with `depth` entries each on one ring until the connection goes away;
/// returns how many requests it answered. Sends the outcome of the registration on
/// `registered` as soon as it is known (the first CQE, or an error). `pin` names the CPU the
/// thread is kept on, if any.
pub fn serve_queue(
    fs: Arc<ZeroFs>,
    fuse: File,
    qids: Vec<u16>,
    depth: usize,
    pin: Option<usize>,
    defer_taskrun: bool,
    registered: Sender<Registered>,
) -> io::Result<u64> {
    let qid = qids.first().copied().unwrap_or(0);
    let mut entries = Vec::with_capacity(depth * qids.len());
    for &q in &qids {
        for _ in 0..depth {
            let header = SharedBuf::new(HEADER_LEN)?;
            let payload = SharedBuf::new(PAYLOAD_LEN)?;
            let iov = Box::new([header.iovec(), payload.iovec()]);
            entries.push(Entry {
                qid: q,
                header,
                payload,
                iov,
                dirty: 0,
            });
        }
    }
    // Declared after the entries, so dropped before them: the kernel lets go of the buffers
    // when the ring closes.
    let mut builder = IoUring::<squeue::Entry128, cqueue::Entry>::builder();
    if defer_taskrun {
        // Only this thread submits; task work (copying a request into the entry) then runs
        // when it waits for completions, not as an interruption.
        builder.setup_single_issuer().setup_defer_taskrun();
    }
    let mut ring = builder.build((entries.len() * 2).next_power_of_two() as u32)?;
    ring.submitter().register_files(&[fuse.as_raw_fd()])?;
    if let Some(cpu) = pin {
        pin_to_cpu(cpu)?;
    }

    for (idx, ent) in entries.iter().enumerate() {
        let sqe = register_sqe(&ent.iov, ent.qid, idx);
        // SAFETY: the SQE names the entry's iovec pair and buffers, which live in `entries`
        // until after the ring is dropped.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))?;
    }
    // A failing REGISTER completes at once with an error; a good one stays pending until the
    // first request. Give the kernel one non-blocking look.
    ring.submit()?;
    let mut count = 0;
    let first = ring.completion().next();
    if let Some(cqe) = first {
        if cqe.result() < 0 {
            let e = io::Error::from_raw_os_error(-cqe.result());
            let _ = registered.send(Err(format!("queue {qid}: REGISTER failed: {e}")));
            return Err(e);
        }
        // A request already; put it back for the loop below.
        let _ = registered.send(Ok(qid));
        handle_cqe(&fs, &mut ring, &mut entries, cqe)?;
        count += 1;
    } else {
        let _ = registered.send(Ok(qid));
    }

    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        let cqes: Vec<cqueue::Entry> = ring.completion().collect();
        for cqe in cqes {
            match -cqe.result() {
                0 => {
                    handle_cqe(&fs, &mut ring, &mut entries, cqe)?;
                    count += 1;
                }
                // The connection is going away (unmount, abort).
                libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED => return Ok(count),
                errno => return Err(io::Error::from_raw_os_error(errno)),
            }
        }
    }
}

/// Answers the request a CQE announced and queues its COMMIT_AND_FETCH.
fn handle_cqe(
    fs: &ZeroFs,
    ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
    entries: &mut [Entry],
    cqe: cqueue::Entry,
) -> io::Result<()> {
    let idx = cqe.user_data() as usize;
    let ent = entries
        .get_mut(idx)
        .ok_or_else(|| io::Error::other("CQE for an unknown entry"))?;
    // SAFETY: the CQE says the kernel is done with this entry until its next SQE, pushed
    // below after the last use of these slices.
    let header = unsafe { ent.header.bytes() };
    let h = InHeader::parse(header).ok_or_else(|| io::Error::other("short request header"))?;
    let commit_id = u64::from_le_bytes(field(header, ENT_IN_OUT + 8));
    let in_payload = (u32::from_le_bytes(field(header, ENT_IN_OUT + 16)) as usize).min(PAYLOAD_LEN);
    let mut op_in = [0u8; 128];
    op_in.copy_from_slice(&header[OP_IN..OP_IN + 128]);

    // SAFETY: as for the header.
    let payload = unsafe { ent.payload.bytes() };
    ent.dirty = ent.dirty.max(in_payload);
    // The request's variable part (a name: short, and absent from READ) is copied out, since
    // the reply is written over it.
    let data = payload[..in_payload].to_vec();
    let (error, body) = match fs.handle(&h, &op_in, &data, payload) {
        // Nothing to answer, but the entry has to go back to the kernel: commit an error.
        Reply::None => (-libc::EINVAL, 0),
        Reply::Error(errno) => (-errno, 0),
        Reply::Bytes(n) => {
            ent.dirty = ent.dirty.max(n);
            (0, n)
        }
        Reply::Zeros(n) => {
            // Clear only what earlier requests or replies left behind.
            let stale = ent.dirty.min(PAYLOAD_LEN);
            payload[..stale].fill(0);
            ent.dirty = 0;
            (0, n)
        }
    };
    header[..OUT_HEADER_LEN].copy_from_slice(&out_header(h.unique, error, body));
    header[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(body as u32).to_le_bytes());

    let sqe = commit_sqe(commit_id, ent.qid, idx);
    // SAFETY: the SQE names entry `idx`, whose buffers live until after the ring is dropped;
    // the slices taken above are not used past this point.
    unsafe { ring.submission().push(&sqe) }.map_err(|_| io::Error::other("submission queue full"))
}

fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}
