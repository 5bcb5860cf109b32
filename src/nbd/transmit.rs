//! The transmission phase of one connection: the connection's thread reads requests (and a
//! write's payload), worker threads serve them in parallel and each sends its whole reply
//! through the shared `Writer`, so replies go out in the order requests finish, not the order
//! they came in. Workers are started as requests find none idle, up to `Limits::workers`, so a
//! connection with one request at a time costs one thread and a deep queue of reads waiting on
//! the disk gets as many in flight as the client sends. Small reads whose bytes are all in the
//! host page cache, and small writes while no worker is busy, are served by the connection's
//! thread itself, without waking a worker (`ServedHere`).
//!
//! Memory is bounded: READ and WRITE payloads are capped at `MAX_PAYLOAD`, and the payload bytes
//! of requests in flight at `Limits::inflight_bytes` (the reader waits for workers to finish
//! before taking more). A bad magic, an oversized write or a read error mid-payload closes the
//! connection; every other mistake is answered with an NBD error and the connection goes on.
//! A write whose payload did not arrive in full is never applied.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::conn::{Channel, Writer};
use super::handshake::Negotiated;
use super::proto::*;
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
    used: Mutex<u64>,
    freed: Condvar,
    limit: u64,
}

impl Budget {
    fn acquire(&self, n: u64) {
        let mut used = lock(&self.used);
        // One request always goes, whatever its size (it is capped on its own).
        while *used > 0 && used.saturating_add(n) > self.limit {
            used = self
                .freed
                .wait(used)
                .unwrap_or_else(PoisonError::into_inner);
        }
        *used = used.saturating_add(n);
    }

    fn release(&self, n: u64) {
        let mut used = lock(&self.used);
        *used = used.saturating_sub(n);
        self.freed.notify_all();
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
            used: Mutex::new(0),
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
    let mut here = ServedHere::default();
    std::thread::scope(|scope| {
        let mut started = 0;
        let mut threads = Vec::new();
        let result = read_requests(ch, &shared.budget, &shared.pool, |job| {
            if let Some(sent) = here.serve(&job, &shared) {
                shared.done(job, sent);
                return true;
            }
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
        });
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
#[derive(Default)]
struct ServedHere {
    scratch: Vec<u8>,
    writes_to_workers: u32,
}

impl ServedHere {
    /// `None` when nothing was sent: a worker is to serve the request.
    fn serve(&mut self, job: &Job, shared: &Shared<'_>) -> Option<io::Result<()>> {
        let (writer, negotiated) = (&shared.writer, shared.negotiated);
        match job.req.kind {
            CMD_READ => read_from_cache(&job.req, &mut self.scratch, writer, negotiated),
            CMD_WRITE if job.req.flags == 0 && job.req.len <= SERVED_HERE => {
                if self.writes_to_workers > 0 {
                    self.writes_to_workers -= 1;
                    return None;
                }
                if shared.busy.load(Ordering::Acquire) > 0 {
                    return None;
                }
                let start = Instant::now();
                let sent = serve_one(job, &mut self.scratch, writer, negotiated);
                if start.elapsed() > SLOW_WRITE {
                    self.writes_to_workers = SLOW_WRITE_PAUSE;
                }
                Some(sent)
            }
            _ => None,
        }
    }
}

/// Reads requests and hands each to `dispatch` until the client leaves.
fn read_requests(
    ch: &mut Channel,
    budget: &Budget,
    pool: &Pool,
    mut dispatch: impl FnMut(Job) -> bool,
) -> Result<()> {
    loop {
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
                budget.acquire(u64::from(req.len));
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
                budget.acquire(charged);
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
        let sent = serve_one(&job, &mut scratch, &shared.writer, shared.negotiated);
        shared.busy.fetch_sub(1, Ordering::AcqRel);
        shared.done(job, sent);
        if scratch.len() > RETAIN {
            scratch = Vec::new();
        }
    }
}

/// Room kept in front of a read buffer for the reply header, so header and data go out in one
/// write without copying the data.
const HEAD: usize = 32;

/// Serves one request and sends its reply.
fn serve_one(
    job: &Job,
    scratch: &mut Vec<u8>,
    writer: &Writer,
    negotiated: &Negotiated,
) -> io::Result<()> {
    let req = &job.req;
    let export = &negotiated.export;
    if req.flags & !allowed_flags(req.kind) != 0 {
        let failure = Failure::new(EINVAL, format!("flags {:#x} not valid here", req.flags));
        return send_failure(writer, negotiated.structured, req.cookie, &failure);
    }
    let result = match req.kind {
        CMD_READ => return read(req, scratch, writer, negotiated),
        CMD_BLOCK_STATUS => match serve::block_status(export, req, negotiated.contexts) {
            Ok(chunks) => return send_chunks(writer, req.cookie, &chunks),
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
        Ok(()) => writer.send(&[&simple_reply(0, req.cookie)]),
        Err(failure) => {
            failure.log(&export.name, req);
            send_failure(writer, negotiated.structured, req.cookie, &failure)
        }
    }
}

fn send_failure(writer: &Writer, structured: bool, cookie: u64, f: &Failure) -> io::Result<()> {
    match structured {
        true => writer.send(&[&error_chunk(f.errno, cookie, &f.message)]),
        false => writer.send(&[&simple_reply(f.errno, cookie)]),
    }
}

/// Sends finished structured chunks (header and payload each) as one message.
fn send_chunks(writer: &Writer, cookie: u64, chunks: &[(u16, Vec<u8>)]) -> io::Result<()> {
    let mut heads = Vec::with_capacity(chunks.len());
    for (i, (kind, payload)) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        heads.push(chunk_header(flags, *kind, cookie, payload.len() as u32));
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(chunks.len() * 2);
    for (head, (_, payload)) in heads.iter().zip(chunks) {
        parts.push(head);
        parts.push(payload);
    }
    writer.send(&parts)
}

/// NBD_CMD_READ: data read into `scratch` behind room for the header; with structured replies,
/// holes are sent as NBD_REPLY_TYPE_OFFSET_HOLE chunks instead of zeros.
fn read(
    req: &Request,
    scratch: &mut Vec<u8>,
    writer: &Writer,
    negotiated: &Negotiated,
) -> io::Result<()> {
    let export = &negotiated.export;
    let structured = negotiated.structured;
    let filled = serve::check_read(export, req).and_then(|()| fill_read(req, scratch, negotiated));
    match filled {
        Ok(segments) => send_read(req, scratch, &segments, writer, structured),
        Err(failure) => {
            failure.log(&export.name, req);
            send_failure(writer, structured, req.cookie, &failure)
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
    writer: &Writer,
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
        writer,
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

/// Sends a filled read's reply: the data behind its header in one write where it is one piece.
fn send_read(
    req: &Request,
    scratch: &mut [u8],
    segments: &[Segment],
    writer: &Writer,
    structured: bool,
) -> io::Result<()> {
    let len = req.len as usize;
    if !structured {
        scratch[HEAD - 16..HEAD].copy_from_slice(&simple_reply(0, req.cookie));
        return writer.send(&[&scratch[HEAD - 16..HEAD + len]]);
    }
    if len == 0 {
        return writer.send(&[&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            req.cookie,
            0,
        )]);
    }
    if let [only] = segments {
        if !only.hole {
            let head = &mut scratch[HEAD - 28..HEAD];
            head[..20].copy_from_slice(&chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req.cookie,
                8 + req.len,
            ));
            head[20..].copy_from_slice(&req.offset.to_be_bytes());
            return writer.send(&[&scratch[HEAD - 28..HEAD + len]]);
        }
    }
    let data = &scratch[HEAD..HEAD + len];
    let mut heads = Vec::with_capacity(segments.len());
    for (i, s) in segments.iter().enumerate() {
        let flags = if i + 1 == segments.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        // Inside the request, so below 2^32 and the sum cannot overflow.
        let offset = req.offset + s.start as u64;
        let mut head = Vec::with_capacity(32);
        match s.hole {
            true => {
                head.extend_from_slice(&chunk_header(
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    12,
                ));
                head.extend_from_slice(&offset.to_be_bytes());
                head.extend_from_slice(&(s.len as u32).to_be_bytes());
            }
            false => {
                let kind = REPLY_TYPE_OFFSET_DATA;
                head.extend_from_slice(&chunk_header(flags, kind, req.cookie, 8 + s.len as u32));
                head.extend_from_slice(&offset.to_be_bytes());
            }
        }
        heads.push(head);
    }
    let mut parts: Vec<&[u8]> = Vec::with_capacity(segments.len() * 2);
    for (head, s) in heads.iter().zip(segments) {
        parts.push(head);
        if !s.hole {
            parts.push(data.get(s.start..s.start + s.len).unwrap_or_default());
        }
    }
    writer.send(&parts)
}
