//! FUSE over io_uring (Linux 6.14+, `fs/fuse/dev_uring.c`), the transport `--transport
//! uring|auto` gives: once FUSE_INIT agreed on `FUSE_OVER_IO_URING`, the daemon registers ring
//! entries on its /dev/fuse descriptor with `IORING_OP_URING_CMD` SQEs (128 bytes each), one
//! queue per possible CPU, each served by two threads with a ring each, pinned to that CPU as
//! libfuse pins its one. The kernel hands a request to the queue of the CPU its sender runs on; a
//! CQE says an entry holds one, and the answer goes back with `COMMIT_AND_FETCH`, which also
//! gives the entry back for the next request. FORGET and INTERRUPT still come on /dev/fuse,
//! which fuser's threads keep reading; until every queue has an entry, and for good if a
//! registration fails, the kernel sends everything there.
//!
//! An entry is two buffers, passed as an iovec pair in the REGISTER SQE: the request header
//! (`fuse_uring_req_header`: `in_out`, the `fuse_in_header` of a request and the
//! `fuse_out_header` of its answer; `op_in`, the opcode's argument struct; `ring_ent_in_out`:
//! flags, commit id, payload size) and a payload buffer of the largest request (1 MiB).

pub mod cmd;
mod protocol;

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use io_uring::{cqueue, squeue, IoUring};

use self::cmd::{
    commit_sqe, pin_to_cpu, possible_cpus, register_sqe, SharedBuf, ENT_IN_OUT, HEADER_LEN, OP_IN,
};

use self::protocol::{u32_at, u64_at};
use super::backing::Backings;
use super::core::FsCore;
use super::fuse::MAX_REQUEST;
use crate::host::HostFile;

const OUT_HEADER_LEN: usize = 16;
const PAYLOAD_LEN: usize = MAX_REQUEST as usize;
/// Threads per queue, each with its own ring holding `THREAD_DEPTH` of the queue's entries
/// and pinned to the queue's CPU. libfuse has one: then a request that waits for the disk
/// holds up every other request of that CPU, where /dev/fuse's four threads would serve three
/// more. The kernel hands a request to the entry answered last, so one thread keeps serving
/// while nothing blocks.
const QUEUE_THREADS: usize = 2;
/// Entries per thread: 8 per queue, libfuse's default. More requests of one CPU wait in the
/// kernel.
const THREAD_DEPTH: usize = 4;

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// A passthrough backing file registered by the ring transport (fuser's `BackingId` can only
/// be made from its own replies); closed with the last open on it.
pub struct RawBacking {
    id: u32,
    dev: Arc<File>,
}

impl Drop for RawBacking {
    fn drop(&mut self) {
        // SAFETY: the ioctl reads one u32 from the pointer, which is valid for the call.
        let rc = unsafe {
            libc::ioctl(
                self.dev.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as _,
                &self.id as *const u32,
            )
        };
        if rc < 0 {
            log::debug!(
                "closing passthrough backing {}: {}",
                self.id,
                io::Error::last_os_error()
            );
        }
    }
}

/// One ring entry: its buffers and the iovec pair its REGISTER SQE points at.
struct Entry {
    header: SharedBuf,
    payload: SharedBuf,
    iov: Box<[libc::iovec; 2]>,
}

/// The queue threads of a running ring transport.
pub struct RingTransport {
    threads: Vec<JoinHandle<u64>>,
}

impl RingTransport {
    /// Registers a queue per possible CPU on the /dev/fuse descriptor `dev` (after FUSE_INIT
    /// agreed on io_uring) and serves them; fails if any registration fails, in which case the
    /// kernel keeps sending every request to /dev/fuse. `passthrough`: FUSE_INIT agreed on it.
    pub fn start(core: Arc<FsCore>, dev: impl AsFd, passthrough: bool) -> io::Result<Self> {
        let dev = Arc::new(File::from(dev.as_fd().try_clone_to_owned()?));
        let backings = Arc::new(Backings::<RawBacking>::default());
        if passthrough {
            backings.enable();
        }
        let queues = possible_cpus()?;
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        for (qid, n) in (0..queues).flat_map(|q| (0..QUEUE_THREADS).map(move |n| (q, n))) {
            let qid = u16::try_from(qid).map_err(io::Error::other)?;
            let queue = Queue {
                core: core.clone(),
                backings: backings.clone(),
                dev: dev.clone(),
                qid,
            };
            let tx = tx.clone();
            let thread = thread::Builder::new()
                .name(format!("fuse-ring-{qid}.{n}"))
                .spawn(move || queue.run(tx))?;
            threads.push(thread);
        }
        drop(tx);
        for _ in 0..queues * QUEUE_THREADS {
            match rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(format!("a queue did not start: {e}"))),
            }
        }
        log::info!(
            "FUSE over io_uring: {queues} queue(s) of {} entries on {QUEUE_THREADS} threads",
            QUEUE_THREADS * THREAD_DEPTH
        );
        Ok(RingTransport { threads })
    }

    /// Waits for the queue threads, which end when the connection does, and says how many
    /// requests came over the rings.
    pub fn join(self) {
        let served: u64 = self.threads.into_iter().filter_map(|t| t.join().ok()).sum();
        log::info!("FUSE over io_uring served {served} requests");
    }
}

struct Queue {
    core: Arc<FsCore>,
    backings: Arc<Backings<RawBacking>>,
    dev: Arc<File>,
    qid: u16,
}

type Ring = IoUring<squeue::Entry128, cqueue::Entry>;

impl Queue {
    /// Registers and serves the queue; returns how many requests it answered.
    fn run(self, registered: Sender<io::Result<()>>) -> u64 {
        let qid = self.qid;
        let mut entries = Vec::new();
        let mut served = 0;
        let mut ring = match self.register(&mut entries, &mut served) {
            Ok(ring) => ring,
            Err(e) => {
                let _ = registered.send(Err(e));
                return served;
            }
        };
        let _ = registered.send(Ok(()));
        match self.serve(&mut ring, &mut entries, &mut served) {
            Ok(()) => log::debug!("FUSE ring queue {qid} ended with the connection"),
            Err(e) => log::error!("FUSE ring queue {qid} stopped: {e}"),
        }
        // The ring goes before the entries: the kernel lets go of the buffers when it closes.
        drop(ring);
        served
    }

    /// Sets up the ring and registers its entries; a failing REGISTER completes at once with
    /// an error, a good one stays pending until the first request.
    fn register(&self, entries: &mut Vec<Entry>, served: &mut u64) -> io::Result<Ring> {
        for _ in 0..THREAD_DEPTH {
            let header = SharedBuf::new(HEADER_LEN)?;
            let payload = SharedBuf::new(PAYLOAD_LEN)?;
            let iov = Box::new([header.iovec(), payload.iovec()]);
            entries.push(Entry {
                header,
                payload,
                iov,
            });
        }
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build((THREAD_DEPTH * 2) as u32)?;
        ring.submitter().register_files(&[self.dev.as_raw_fd()])?;
        // On its CPU, a request, the thread and the answer's wake-up stay together; a CPU
        // outside the daemon's allowed set is served from wherever the scheduler puts it.
        if let Err(e) = pin_to_cpu(usize::from(self.qid)) {
            log::debug!("FUSE ring queue {} not pinned: {e}", self.qid);
        }
        let mut ring = ring;
        for (idx, ent) in entries.iter().enumerate() {
            let sqe = register_sqe(&ent.iov, self.qid, idx);
            // SAFETY: the SQE names the entry's iovec pair and buffers, which live in
            // `entries` until after the ring is dropped (`run`).
            unsafe { ring.submission().push(&sqe) }
                .map_err(|_| io::Error::other("submission queue full"))?;
        }
        ring.submit()?;
        let first = ring.completion().next();
        if let Some(cqe) = first {
            if cqe.result() < 0 {
                let e = io::Error::from_raw_os_error(-cqe.result());
                return Err(io::Error::new(
                    e.kind(),
                    format!("registering queue {}: {e}", self.qid),
                ));
            }
            // A request already: answer it before the loop.
            self.answer(&mut ring, entries, &cqe)?;
            *served += 1;
        }
        Ok(ring)
    }

    fn serve(&self, ring: &mut Ring, entries: &mut [Entry], served: &mut u64) -> io::Result<()> {
        let mut cqes = Vec::with_capacity(THREAD_DEPTH);
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            cqes.clear();
            cqes.extend(ring.completion());
            for cqe in &cqes {
                match -cqe.result() {
                    0 => {
                        self.answer(ring, entries, cqe)?;
                        *served += 1;
                    }
                    // The connection is going away (unmount, abort).
                    libc::ENOTCONN | libc::ECANCELED | libc::ECONNABORTED | libc::ENODEV => {
                        return Ok(())
                    }
                    errno => return Err(io::Error::from_raw_os_error(errno)),
                }
            }
        }
    }

    /// Serves the request a CQE announced and queues its COMMIT_AND_FETCH.
    fn answer(
        &self,
        ring: &mut Ring,
        entries: &mut [Entry],
        cqe: &cqueue::Entry,
    ) -> io::Result<()> {
        let idx = cqe.user_data() as usize;
        let ent = entries
            .get_mut(idx)
            .ok_or_else(|| io::Error::other("CQE for an unknown ring entry"))?;
        // SAFETY: the CQE says the kernel is done with this entry until its next SQE, which is
        // pushed below, after the last use of these slices.
        let header = unsafe { ent.header.bytes() };
        let opcode = u32_at(header, 4);
        let unique = u64_at(header, 8);
        let nodeid = u64_at(header, 16);
        let commit_id = u64_at(header, ENT_IN_OUT + 8);
        let data_len = u32_at(header, ENT_IN_OUT + 16) as usize;
        let mut arg = [0u8; 128];
        arg.copy_from_slice(&header[OP_IN..OP_IN + 128]);
        let request = protocol::Request {
            opcode,
            nodeid,
            arg: &arg,
            data_len,
        };
        let register = |file: &HostFile| {
            fuser::BackingId::create_raw(&*self.dev, file).map(|id| RawBacking {
                id,
                dev: self.dev.clone(),
            })
        };
        // SAFETY: as for the header.
        let payload = unsafe { ent.payload.bytes() };
        let (error, body) =
            match protocol::serve(&self.core, &self.backings, &register, &request, payload) {
                Ok(len) => (0, len),
                Err(e) => (-e.0, 0),
            };
        // SAFETY: as above.
        let header = unsafe { ent.header.bytes() };
        let total = (OUT_HEADER_LEN + body) as u32;
        header[..4].copy_from_slice(&total.to_le_bytes());
        header[4..8].copy_from_slice(&error.to_le_bytes());
        header[8..16].copy_from_slice(&unique.to_le_bytes());
        header[ENT_IN_OUT + 16..ENT_IN_OUT + 20].copy_from_slice(&(body as u32).to_le_bytes());
        let sqe = commit_sqe(commit_id, self.qid, idx);
        // SAFETY: the SQE names entry `idx`, whose buffers live until after the ring is
        // dropped; the slices taken above are not used past this point.
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| io::Error::other("submission queue full"))
    }
}
