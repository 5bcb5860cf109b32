//! Read-ahead for sequential readers of a raw file. Raw files are served with direct I/O, so the
//! kernel reads ahead for nobody: `dd bs=1M` or `cp` sends one request at a time, and each one
//! waited while imgfs copied its bytes out of the host page cache, then again while the reply
//! was copied to the reader. Once a read starts where the one before it ended, the next ranges
//! of the same size (`DEPTH` of them) are read on read-ahead threads while the reader takes the
//! current one, and the read that asks for exactly such a range gets its buffer without a copy
//! (or, if no thread has started on it yet, reads it for itself rather than wait).
//!
//! Read-ahead data is used only if nothing changed the image since the read-ahead began: every
//! write, discard, resize or retirement of a served instance moves its generation on
//! (`Served::generation`), and data read under an older generation is dropped and read again.
//! A read that overlaps a write in flight may see either, as any read racing a write may.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::host::{bypassing_page_cache, AlignedBuffer};
use crate::image::Image;

/// Reads smaller than this are not read ahead: their stream costs more to follow than their
/// copy, and random 4 KiB readers would pay for it.
const MIN_READ_AHEAD: usize = 64 * 1024;

/// Sequential reads in a row before the next one is read ahead (the first read of a handle
/// counts when it starts at 0).
const STREAK: u32 = 2;

/// Ranges read ahead of a sequential reader, each on its own thread: the host has several
/// reads in flight while the reader takes the current one. With one, a direct reader's disk
/// waited between reads; through the host page cache, filling it costs the host CPU time (page
/// allocation) that one thread could not overlap with the copies. Four kept up with the image
/// file's own reads in both cases (`scripts/bench.sh`, README); two gained less in most runs.
pub(super) const DEPTH: usize = 4;

/// Threads that run fetches, for all handles of a mount: enough for `DEPTH` of one reader in
/// flight at once.
const FETCH_THREADS: usize = DEPTH;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One range being read ahead.
struct Fetch {
    offset: u64,
    len: usize,
    /// The image's generation when the fetch was planned.
    generation: u64,
    /// Read bypassing the host page cache, like the read it follows.
    direct: bool,
    image: Arc<dyn Image>,
    state: Mutex<FetchState>,
    done: Condvar,
}

enum FetchState {
    /// Not read yet; holds the buffer to read into.
    Waiting(AlignedBuffer),
    Running,
    Ready(AlignedBuffer),
    /// The read failed or never ran: the reader reads for itself (and reports any error).
    Failed,
}

/// Wakes a fetch's reader however `run` ends, so it never waits for a read that is over.
struct Finish<'a>(&'a Fetch);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        if let FetchState::Waiting(_) | FetchState::Running = *state {
            *state = FetchState::Failed;
        }
        self.0.done.notify_all();
    }
}

impl Fetch {
    fn run(&self) {
        let _finish = Finish(self);
        let mut buf = match std::mem::replace(&mut *lock(&self.state), FetchState::Running) {
            FetchState::Waiting(buf) => buf,
            _ => return,
        };
        let read = bypassing_page_cache(self.direct, || {
            self.image.read_at(buf.prepare(self.len), self.offset)
        });
        if read.is_ok() {
            *lock(&self.state) = FetchState::Ready(buf);
        }
    }

    fn fail(&self) {
        *lock(&self.state) = FetchState::Failed;
        self.done.notify_all();
    }

    /// Its data, once it ran; a fetch that has not started yet is called off instead, and its
    /// buffer returned: its threads are busy with other fetches (maybe of other images, maybe
    /// a host read that hangs), and the reader can read as fast as they would.
    fn claim(&self) -> Claimed {
        let mut state = lock(&self.state);
        match std::mem::replace(&mut *state, FetchState::Failed) {
            FetchState::Waiting(buf) => return Claimed::Unstarted(buf),
            other => *state = other,
        }
        while let FetchState::Running = *state {
            state = self
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match std::mem::replace(&mut *state, FetchState::Failed) {
            FetchState::Ready(data) => Claimed::Data(data),
            _ => Claimed::Nothing,
        }
    }
}

/// What a reader finds of a fetch it asks for.
enum Claimed {
    Data(AlignedBuffer),
    Unstarted(AlignedBuffer),
    Nothing,
}

/// Whether a read was answered from read-ahead.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Its data was read ahead, and is in the reader's buffer.
    Hit,
    /// It was planned, is not stale, but was not started yet: the reader reads for itself.
    Unstarted,
    /// Nothing read ahead for it, or stale, or the fetch failed.
    Miss,
}

/// What one open handle reads next, and the ranges read ahead for it.
#[derive(Default)]
pub struct Stream {
    state: Mutex<StreamState>,
}

#[derive(Default)]
struct StreamState {
    /// Where a read following the last one starts.
    next: u64,
    /// Reads in a row that each started where the one before ended.
    streak: u32,
    /// The ranges read ahead, in order, each starting where the one before ends.
    pending: VecDeque<Arc<Fetch>>,
    /// Buffers for the next fetches: the ones hits replaced.
    spare: Vec<AlignedBuffer>,
}

impl Stream {
    /// Puts the data read ahead for exactly `[offset, offset + len)` into `buf` (swapping
    /// buffers, not copying), if it is there and the image is still at the `generation` it was
    /// read at (asked only then: most reads find nothing read ahead). Waits for a fetch still
    /// running: it is as far along as a read started now would be.
    pub fn take(
        &self,
        offset: u64,
        len: usize,
        generation: impl FnOnce() -> u64,
        buf: &mut AlignedBuffer,
    ) -> Taken {
        let fetch = {
            let mut state = lock(&self.state);
            match state.pending.front() {
                Some(f) if f.offset == offset && f.len == len => state.pending.pop_front(),
                // Any other read makes them useless: they were planned for the reads after
                // the last.
                _ => {
                    state.pending.clear();
                    None
                }
            }
        };
        let Some(fetch) = fetch else {
            return Taken::Miss;
        };
        let claimed = fetch.claim();
        let fresh = fetch.generation == generation();
        let (taken, data) = match claimed {
            Claimed::Data(mut data) if fresh => {
                std::mem::swap(buf, &mut data);
                (Taken::Hit, data)
            }
            Claimed::Unstarted(data) if fresh => (Taken::Unstarted, data),
            Claimed::Data(data) | Claimed::Unstarted(data) => (Taken::Miss, data),
            Claimed::Nothing => return Taken::Miss,
        };
        let mut state = lock(&self.state);
        if state.spare.len() < DEPTH {
            state.spare.push(data);
        }
        taken
    }

    /// Notes a read of `[offset, offset + len)` of a disk of `size` bytes; when it followed the
    /// one before, plans reading the next `DEPTH` ranges of the same size that are not planned
    /// yet (at the image's `generation`, asked only then; `direct` like the read), and returns
    /// the fetches for a `Fetcher` to run.
    fn follow(
        &self,
        offset: u64,
        len: usize,
        size: u64,
        direct: bool,
        generation: impl FnOnce() -> u64,
        image: impl FnOnce() -> Arc<dyn Image>,
    ) -> Vec<Arc<Fetch>> {
        let mut state = lock(&self.state);
        let end = offset.saturating_add(len as u64);
        let sequential = offset == state.next && len >= MIN_READ_AHEAD;
        state.next = end;
        if !sequential {
            state.streak = 0;
            state.pending.clear();
            state.spare.clear();
            return Vec::new();
        }
        state.streak = state.streak.saturating_add(1);
        // Two in a row, so a reader that jumps around does not pay for fetches it never uses.
        let mut at = state
            .pending
            .back()
            .map_or(end, |f| f.offset + f.len as u64);
        if state.streak < STREAK || state.pending.len() >= DEPTH || at >= size {
            return Vec::new();
        }
        let (generation, image) = (generation(), image());
        let mut planned = Vec::new();
        while state.pending.len() < DEPTH && at < size {
            let fetch_len = (len as u64).min(size - at) as usize;
            let buf = state.spare.pop().unwrap_or_default();
            let fetch = Arc::new(Fetch {
                offset: at,
                len: fetch_len,
                generation,
                direct,
                image: Arc::clone(&image),
                state: Mutex::new(FetchState::Waiting(buf)),
                done: Condvar::new(),
            });
            state.pending.push_back(Arc::clone(&fetch));
            planned.push(fetch);
            at += fetch_len as u64;
        }
        planned
    }
}

/// Runs the fetches of every handle of a mount on `FETCH_THREADS` threads, started on first
/// use; they end when the mount's state is dropped.
#[derive(Default)]
pub struct Fetcher {
    jobs: Mutex<Option<Sender<Arc<Fetch>>>>,
    hits: AtomicU64,
    unstarted: AtomicU64,
}

impl Fetcher {
    /// After a read of `[offset, offset + len)` through `stream` (`direct`: bypassing the host
    /// page cache): starts reading ahead if the stream is sequential.
    #[allow(clippy::too_many_arguments)]
    pub fn follow(
        &self,
        stream: &Stream,
        offset: u64,
        len: usize,
        size: u64,
        direct: bool,
        generation: impl FnOnce() -> u64,
        image: impl FnOnce() -> Arc<dyn Image>,
    ) {
        let planned = stream.follow(offset, len, size, direct, generation, image);
        if planned.is_empty() {
            return;
        }
        let mut jobs = lock(&self.jobs);
        if jobs.is_none() {
            *jobs = start_fetch_threads();
        }
        for fetch in planned {
            let sent = jobs.as_ref().map(|jobs| jobs.send(Arc::clone(&fetch)));
            if !matches!(sent, Some(Ok(()))) {
                fetch.fail();
            }
        }
    }

    /// Counts what `Stream::take` found.
    pub fn count(&self, taken: &Taken) {
        let counter = match taken {
            Taken::Hit => &self.hits,
            Taken::Unstarted => &self.unstarted,
            Taken::Miss => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads answered from read-ahead so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Reads whose fetch had not started when they came, so they read for themselves.
    pub fn unstarted(&self) -> u64 {
        self.unstarted.load(Ordering::Relaxed)
    }
}

/// Starts the threads that run fetches; `None` if not even one could start (then nothing is
/// read ahead).
fn start_fetch_threads() -> Option<Sender<Arc<Fetch>>> {
    let (send, receive) = channel::<Arc<Fetch>>();
    let receive = Arc::new(Mutex::new(receive));
    let mut started = 0;
    for _ in 0..FETCH_THREADS {
        let receive = Arc::clone(&receive);
        let spawned = std::thread::Builder::new()
            .name("imgfs-readahead".into())
            .spawn(move || loop {
                let Ok(fetch) = lock(&receive).recv() else {
                    break;
                };
                // Only the queue holds it: its stream dropped it (the reader went elsewhere).
                if Arc::strong_count(&fetch) > 1 {
                    fetch.run();
                }
            });
        match spawned {
            Ok(_) => started += 1,
            Err(e) => log::debug!("no read-ahead thread: {e}"),
        }
    }
    (started > 0).then_some(send)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::MemImage;

    const CHUNK: usize = 64 << 10;

    /// A stream that has followed two sequential reads of `CHUNK` over a 1 MiB image filled
    /// with a pattern, and the fetches it planned (not run: no fetch threads here).
    fn sequential_stream() -> (Stream, Arc<dyn Image>, Vec<Arc<Fetch>>) {
        let image: Arc<dyn Image> = Arc::new(MemImage::new(1 << 20, None));
        let pattern: Vec<u8> = (0..1 << 20).map(|i| (i % 253) as u8).collect();
        image.write_at(&pattern, 0).unwrap();
        let stream = Stream::default();
        let size = image.size();
        let mut planned = Vec::new();
        for offset in [0, CHUNK as u64] {
            planned = stream.follow(offset, CHUNK, size, false, || 7, || Arc::clone(&image));
        }
        (stream, image, planned)
    }

    #[test]
    fn a_read_takes_the_range_read_ahead_for_it() {
        let (stream, image, planned) = sequential_stream();
        assert_eq!(planned.len(), DEPTH);
        assert_eq!(planned[0].offset, 2 * CHUNK as u64);
        planned[0].run();
        let mut buf = AlignedBuffer::default();
        assert_eq!(
            stream.take(2 * CHUNK as u64, CHUNK, || 7, &mut buf),
            Taken::Hit
        );
        let mut expected = vec![0; CHUNK];
        image.read_at(&mut expected, 2 * CHUNK as u64).unwrap();
        assert!(buf.filled(CHUNK) == &expected[..]);
    }

    #[test]
    fn data_read_under_an_older_generation_is_not_used() {
        let (stream, _image, planned) = sequential_stream();
        planned[0].run();
        let mut buf = AlignedBuffer::default();
        assert_eq!(
            stream.take(2 * CHUNK as u64, CHUNK, || 8, &mut buf),
            Taken::Miss
        );
    }

    #[test]
    fn a_read_does_not_wait_for_a_fetch_that_has_not_started() {
        let (stream, _image, planned) = sequential_stream();
        // The fetch threads could be busy elsewhere for as long as they like: the reader must
        // not wait for them. Bounded, so that a regression fails instead of hanging.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = AlignedBuffer::default();
            let taken = stream.take(2 * CHUNK as u64, CHUNK, || 7, &mut buf);
            let _ = done.send((taken, lock(&stream.state).spare.len()));
        });
        let (taken, spare) = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the read waited for a fetch nobody ran");
        assert_eq!(taken, Taken::Unstarted);
        // Its buffer is kept for the next fetch, and the fetch, called off, does nothing.
        assert_eq!(spare, 1);
        planned[0].run();
        assert!(matches!(*lock(&planned[0].state), FetchState::Failed));
    }
}
