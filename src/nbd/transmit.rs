//! The transmission phase of one connection: the connection's thread reads requests (and a
//! write's payload), worker threads serve them in parallel and each sends its whole reply
//! through the shared `Writer`, so replies go out in the order requests finish, not the order
//! they came in. Workers are started as requests find none idle, up to `Limits::workers`, so a
//! connection with one request at a time costs one thread and a deep queue of reads waiting on
//! the disk gets as many in flight as the client sends. Small reads whose bytes are all in the
//! host page cache, and small writes while no worker is busy, are served by the connection's
//! thread itself, without waking a worker (`ServedHere`); their replies wait in a batch until
//! the thread has no complete request left to read, then go out in one write.
//!
//! Memory is bounded: READ and WRITE payloads are capped at `MAX_PAYLOAD`, and the payload bytes
//! of requests in flight at `Limits::inflight_bytes` (the reader waits for workers to finish
//! before taking more). A bad magic, an oversized write or a read error mid-payload closes the
//! connection; every other mistake is answered with an NBD error and the connection goes on.
//! A write whose payload did not arrive in full is never applied.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::conn::{Channel, Writer};
use super::handshake::Negotiated;
use super::proto::*;
use super::replies::{send_chunks, send_failure, send_read, Batch, Replies, HEAD};
use super::serve::{self, Failure, Segment};
use crate::error::{Error, Result};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most worker threads serving the connection's requests.
    pub workers: usize,
    /// Payload bytes (read or written) of the requests in flight at once.
    pub inflight_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            workers: 16,
            inflight_bytes: 64 << 20,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Payload bytes in flight, waited on when the next request would exceed the limit.
struct Budget {
    state: Mutex<BudgetState>,
    freed: Condvar,
    limit: u64,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    /// Threads waiting in `acquire`: a release wakes the condition only when there are any,
    /// since each wake is a system call and on most releases nobody waits.
    waiting: usize,
}

impl Budget {
    /// Takes `n` bytes of the budget, waiting for releases while it is spent; `before_wait` is
    /// called (without the budget's lock) once before the first wait.
    fn acquire(&self, n: u64, before_wait: &mut dyn FnMut()) {
        let mut state = lock(&self.state);
        // One request always goes, whatever its size (it is capped on its own).
        let spent =
            |state: &BudgetState| state.used > 0 && state.used.saturating_add(n) > self.limit;
        if spent(&state) {
            drop(state);
            before_wait();
            state = lock(&self.state);
        }
        while spent(&state) {
            state.waiting += 1;
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
            state.waiting -= 1;
        }
        state.used = state.used.saturating_add(n);
    }

    fn release(&self, n: u64) {
        let mut state = lock(&self.state);
        state.used = state.used.saturating_sub(n);
        if state.waiting > 0 {
            self.freed.notify_all();
        }
    }
}

struct Job {
    req: Request,
    payload: Vec<u8>,
    charged: u64,
}

/// Buffers kept for reuse: a request's payload is not allocated afresh each time.
struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

/// Buffers larger than this are not kept after use.
const RETAIN: usize = 2 << 20;

impl Pool {
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = lock(&self.free).pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        let mut free = lock(&self.free);
        if buf.capacity() <= RETAIN && free.len() < self.keep {
            free.push(buf);
        }
    }
}

/// What the connection's thread and its workers share.
struct Shared<'a> {
    queue: Mutex<Receiver<Job>>,
    budget: Budget,
    pool: Pool,
    /// Workers waiting for a request.
    idle: AtomicUsize,
    /// Requests handed to workers and not answered yet.
    busy: AtomicUsize,
    writer: Writer,
    negotiated: &'a Negotiated,
}

impl Shared<'_> {
    /// Takes back what a served request held, and ends the connection if its reply could not
    /// be sent (the client is gone or stuck; the connection's thread wakes up to the closed
    /// socket).
    fn done(&self, job: Job, sent: io::Result<()>) {
        self.budget.release(job.charged);
        if job.payload.capacity() > 0 {
            self.pool.give(job.payload);
        }
        if let Err(e) = sent {
            log::debug!("sending a reply failed: {e}");
            self.writer.close();
        }
    }
}

/// Serves requests until the client disconnects or breaks the protocol. Returns an error only
/// for a protocol violation (logged by the caller); a clean or abrupt disconnect is `Ok`.
pub fn transmit(ch: &mut Channel, negotiated: &Negotiated, limits: Limits) -> Result<()> {
    let workers = limits.workers.max(1);
    let (jobs, queue) = sync_channel::<Job>(workers * 2);
    let shared = Shared {
        queue: Mutex::new(queue),
        budget: Budget {
            state: Mutex::default(),
            freed: Condvar::new(),
            limit: limits.inflight_bytes.max(u64::from(MAX_PAYLOAD)),
        },
        pool: Pool {
            free: Mutex::new(Vec::new()),
            keep: workers * 2,
        },
        idle: AtomicUsize::new(0),
        busy: AtomicUsize::new(0),
        writer: ch.writer().clone(),
        negotiated,
    };
    let here = RefCell::new(ServedHere::default());
    std::thread::scope(|scope| {
        let mut started = 0;
        let mut threads = Vec::new();
        let dispatch = |job| {
            let mut here = here.borrow_mut();
            if let Some(sent) = here.serve(&job, &shared) {
                shared.done(job, sent);
                return true;
            }
            // Sending to a worker may wait for room in the queue.
            here.flush(&shared);
            drop(here);
            // Another worker when every one is busy: the request would wait otherwise.
            if started < workers && shared.idle.load(Ordering::Acquire) == 0 {
                let shared = &shared;
                let spawned = std::thread::Builder::new()
                    .name(format!("nbd-worker-{started}"))
                    .spawn_scoped(scope, move || work(shared));
                match spawned {
                    Ok(thread) => {
                        threads.push(thread);
                        started += 1;
                    }
                    // The workers there are serve it; with none, the send below fails.
                    Err(e) => log::warn!("cannot start an NBD worker thread: {e}"),
                }
            }
            shared.busy.fetch_add(1, Ordering::AcqRel);
            let handed = started > 0 && jobs.send(job).is_ok();
            if !handed {
                shared.busy.fetch_sub(1, Ordering::AcqRel);
            }
            handed
        };
        let before_wait = || here.borrow_mut().flush(&shared);
        let result = read_requests(ch, &shared.budget, &shared.pool, dispatch, before_wait);
        here.borrow_mut().flush(&shared);
        drop(jobs);
        // The scope would wait only for the workers' closures; joining waits until their
        // threads are gone too, thread-local destructors included, so a connection leaves
        // nothing running behind it (LeakSanitizer counted a worker still exiting as a leak).
        for thread in threads {
            let _ = thread.join();
        }
        result
    })
}

/// Reads and writes up to this size may be served by the connection's thread itself: a larger
/// copy would hold up the requests behind it longer than a worker takes to wake.
const SERVED_HERE: u32 = 128 * 1024;

/// An inline write slower than this (waiting for the disk, or for a lock a worker holds)
/// sends the next `SLOW_WRITE_PAUSE` writes to workers, which overlap such waits.
const SLOW_WRITE: Duration = Duration::from_millis(1);
const SLOW_WRITE_PAUSE: u32 = 64;

/// Which requests the connection's thread serves itself instead of waking a worker, which
/// costs a context switch each way, more than a small copy (on two cores, imgfs's 4k random
/// I/O over one connection fell behind qemu-nbd's that way):
/// - a small read whose bytes are all in the host page cache (`read_from_cache`); one that
///   needs the disk goes to a worker, so reads from the disk still overlap;
/// - a small write without FUA while no request is with a worker, so it is ordered after
///   everything received before it, as a single worker would order it. A write goes to the
///   host page cache and returns; should one take long anyway, the following writes go to
///   workers for a while.
///
/// Their replies are kept back in a `Batch` until the thread is about to wait (`flush`).
#[derive(Default)]
struct ServedHere {
    scratch: Vec<u8>,
    writes_to_workers: u32,
    /// Replies kept back.
    kept: Vec<u8>,
}

impl ServedHere {
    /// `None` when nothing was done: a worker is to serve the request.
    fn serve(&mut self, job: &Job, shared: &Shared<'_>) -> Option<io::Result<()>> {
        let negotiated = shared.negotiated;
        let out = &mut Batch::new(&shared.writer, &mut self.kept);
        match job.req.kind {
            CMD_READ => read_from_cache(&job.req, &mut self.scratch, out, negotiated),
            CMD_WRITE if job.req.flags == 0 && job.req.len <= SERVED_HERE => {
                if self.writes_to_workers > 0 {
                    self.writes_to_workers -= 1;
                    return None;
                }
                if shared.busy.load(Ordering::Acquire) > 0 {
                    return None;
                }
                let start = Instant::now();
                let sent = serve_one(job, &mut self.scratch, out, negotiated);
                if start.elapsed() > SLOW_WRITE {
                    self.writes_to_workers = SLOW_WRITE_PAUSE;
                }
                Some(sent)
            }
            _ => None,
        }
    }

    /// Sends the replies kept back; when that fails, the connection ends as in `Shared::done`.
    fn flush(&mut self, shared: &Shared<'_>) {
        if let Err(e) = Batch::new(&shared.writer, &mut self.kept).flush() {
            log::debug!("sending replies failed: {e}");
            shared.writer.close();
        }
    }
}

/// Reads requests and hands each to `dispatch` until the client leaves. `before_wait` is called
/// whenever the thread may have to wait: for the client's next bytes or for room in `budget`.
fn read_requests(
    ch: &mut Channel,
    budget: &Budget,
    pool: &Pool,
    mut dispatch: impl FnMut(Job) -> bool,
    mut before_wait: impl FnMut(),
) -> Result<()> {
    loop {
        if ch.buffered() < REQUEST_LEN {
            before_wait();
        }
        let mut header = [0u8; REQUEST_LEN];
        match ch.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(Error::io("reading a request", e)),
        }
        let req = parse_request(&header)?;
        let mut payload = Vec::new();
        let charged = match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    return Err(Error::out_of_range(format!(
                        "a write of {} bytes (at most {MAX_PAYLOAD})",
                        req.len
                    )));
                }
                budget.acquire(u64::from(req.len), &mut before_wait);
                if ch.buffered() < req.len as usize {
                    before_wait();
                }
                payload = pool.take(req.len as usize);
                if let Err(e) = ch.read_exact(&mut payload) {
                    budget.release(u64::from(req.len));
                    return match gone(&e) {
                        // Cut off mid-payload: nothing of it is written.
                        true => Ok(()),
                        false => Err(Error::io("reading a write's payload", e)),
                    };
                }
                u64::from(req.len)
            }
            CMD_READ => {
                let charged = u64::from(req.len.min(MAX_PAYLOAD));
                budget.acquire(charged, &mut before_wait);
                charged
            }
            _ => 0,
        };
        if !dispatch(Job {
            req,
            payload,
            charged,
        }) {
            budget.release(charged);
            return Err(Error::io(
                "handing a request to a worker",
                io::Error::other("no worker thread is running"),
            ));
        }
    }
}

/// Whether a read error means the client went away (not a protocol error).
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

fn work(shared: &Shared<'_>) {
    let mut scratch = Vec::new();
    loop {
        shared.idle.fetch_add(1, Ordering::AcqRel);
        let job = lock(&shared.queue).recv();
        shared.idle.fetch_sub(1, Ordering::AcqRel);
        let Ok(job) = job else { return };
        let sent = serve_one(&job, &mut scratch, &mut &shared.writer, shared.negotiated);
        shared.busy.fetch_sub(1, Ordering::AcqRel);
        shared.done(job, sent);
        if scratch.len() > RETAIN {
            scratch = Vec::new();
        }
    }
}

/// Serves one request and sends its reply.
fn serve_one(
    job: &Job,
    scratch: &mut Vec<u8>,
    out: &mut dyn Replies,
    negotiated: &Negotiated,
) -> io::Result<()> {
    let req = &job.req;
    let export = &negotiated.export;
    if req.flags & !allowed_flags(req.kind) != 0 {
        let failure = Failure::new(EINVAL, format!("flags {:#x} not valid here", req.flags));
        return send_failure(out, negotiated.structured, req.cookie, &failure);
    }
    let result = match req.kind {
        CMD_READ => return read(req, scratch, out, negotiated),
        CMD_BLOCK_STATUS => match serve::block_status(export, req, negotiated.contexts) {
            Ok(chunks) => return send_chunks(out, req.cookie, &chunks),
            Err(failure) => Err(failure),
        },
        CMD_WRITE => serve::write(export, req, &job.payload),
        CMD_FLUSH => serve::flush(export),
        CMD_TRIM => serve::trim(export, req),
        CMD_WRITE_ZEROES => serve::write_zeroes(export, req),
        CMD_CACHE => serve::cache(export, req),
        _ => Err(Failure::new(
            EINVAL,
            format!("unknown command {}", req.kind),
        )),
    };
    match result {
        Ok(()) => out.send(&[&simple_reply(0, req.cookie)]),
        Err(failure) => {
            failure.log(&export.name, req);
            send_failure(out, negotiated.structured, req.cookie, &failure)
        }
    }
}

/// NBD_CMD_READ: data read into `scratch` behind room for the header; with structured replies,
/// holes are sent as NBD_REPLY_TYPE_OFFSET_HOLE chunks instead of zeros.
fn read(
    req: &Request,
    scratch: &mut Vec<u8>,
    out: &mut dyn Replies,
    negotiated: &Negotiated,
) -> io::Result<()> {
    let export = &negotiated.export;
    let structured = negotiated.structured;
    let filled = serve::check_read(export, req).and_then(|()| fill_read(req, scratch, negotiated));
    match filled {
        Ok(segments) => send_read(req, scratch, &segments, out, structured),
        Err(failure) => {
            failure.log(&export.name, req);
            send_failure(out, structured, req.cookie, &failure)
        }
    }
}

/// Answers a small read on the thread that received it when the host page cache holds all it
/// needs: a worker woken for it would cost a context switch each way, more than the copy.
/// `None` when nothing was sent (the read needs the disk, or failed in any way): a worker then
/// serves it as usual, and reports the failure if there is one.
fn read_from_cache(
    req: &Request,
    scratch: &mut Vec<u8>,
    out: &mut dyn Replies,
    negotiated: &Negotiated,
) -> Option<io::Result<()>> {
    if req.flags != 0 || req.len > SERVED_HERE {
        return None;
    }
    serve::check_read(&negotiated.export, req).ok()?;
    let segments = crate::host::from_cache_only(|| fill_read(req, scratch, negotiated)).ok()?;
    Some(send_read(
        req,
        scratch,
        &segments,
        out,
        negotiated.structured,
    ))
}

/// Reads the data of a checked read into `scratch[HEAD..]`: which parts are data and which are
/// holes (only with structured replies), and the data parts' bytes.
fn fill_read(
    req: &Request,
    scratch: &mut Vec<u8>,
    negotiated: &Negotiated,
) -> Result<Vec<Segment>, Failure> {
    let image = negotiated.export.image();
    let len = req.len as usize;
    if scratch.len() < HEAD + len {
        scratch.resize(HEAD + len, 0);
    }
    let segments = match negotiated.structured {
        true => serve::plan_read(image, req.offset, len),
        false => vec![Segment {
            start: 0,
            len,
            hole: false,
        }],
    };
    serve::fill(image, req.offset, &segments, &mut scratch[HEAD..])?;
    Ok(segments)
}
