//! Read-ahead for sequential readers of a raw file. Raw files are served with direct I/O, so the
//! kernel reads ahead for nobody: `dd bs=1M` or `cp` sends one request at a time, and each one
//! waited while imgfs copied its bytes out of the host page cache, then again while the reply
//! was copied to the reader. Once a read starts where the one before it ended, the next range
//! of the same size is read on a read-ahead thread while the reader takes the current one, and
//! the read that asks for exactly that range gets its buffer without a copy.
//!
//! Read-ahead data is used only if nothing changed the image since the read-ahead began: every
//! write, discard, resize or retirement of a served instance moves its generation on
//! (`Served::generation`), and data read under an older generation is dropped and read again.
//! A read that overlaps a write in flight may see either, as any read racing a write may.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::image::Image;

/// Reads smaller than this are not read ahead: their stream costs more to follow than their
/// copy, and random 4 KiB readers would pay for it.
const MIN_READ_AHEAD: usize = 64 * 1024;

/// Sequential reads in a row before the next one is read ahead (the first read of a handle
/// counts when it starts at 0).
const STREAK: u32 = 2;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One range being read ahead.
struct Fetch {
    offset: u64,
    len: usize,
    /// The image's generation when the fetch was planned.
    generation: u64,
    image: Arc<dyn Image>,
    state: Mutex<FetchState>,
    done: Condvar,
}

enum FetchState {
    /// Not read yet; holds the buffer to read into.
    Waiting(Vec<u8>),
    Running,
    Ready(Vec<u8>),
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
        if buf.len() < self.len {
            buf.resize(self.len, 0);
        }
        buf.truncate(self.len);
        if self.image.read_at(&mut buf, self.offset).is_ok() {
            *lock(&self.state) = FetchState::Ready(buf);
        }
    }

    fn fail(&self) {
        *lock(&self.state) = FetchState::Failed;
        self.done.notify_all();
    }

    /// Waits until the fetch ran; its data, if it has any.
    fn wait(&self) -> Option<Vec<u8>> {
        let mut state = lock(&self.state);
        while let FetchState::Waiting(_) | FetchState::Running = *state {
            state = self
                .done
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match std::mem::replace(&mut *state, FetchState::Failed) {
            FetchState::Ready(data) => Some(data),
            _ => None,
        }
    }
}

/// What one open handle reads next, and the range read ahead for it.
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
    pending: Option<Arc<Fetch>>,
    /// A buffer for the next fetch: the one the last hit replaced.
    spare: Vec<u8>,
}

impl Stream {
    /// Puts the data read ahead for exactly `[offset, offset + len)` into `buf` (swapping
    /// buffers, not copying), if it is there and the image is still at the `generation` it was
    /// read at (asked only then: most reads find nothing read ahead). Waits for
    /// a fetch still running: it is as far along as a read started now would be.
    pub fn take(
        &self,
        offset: u64,
        len: usize,
        generation: impl FnOnce() -> u64,
        buf: &mut Vec<u8>,
    ) -> bool {
        let fetch = {
            let mut state = lock(&self.state);
            // Any other read makes it useless: it was planned for the read after the last.
            match state.pending.take() {
                Some(f) if f.offset == offset && f.len == len => Some(f),
                _ => None,
            }
        };
        let Some(fetch) = fetch else { return false };
        let Some(mut data) = fetch.wait() else {
            return false;
        };
        let fresh = fetch.generation == generation();
        if fresh {
            std::mem::swap(buf, &mut data);
        }
        lock(&self.state).spare = data;
        fresh
    }

    /// Notes a read of `[offset, offset + len)` of a disk of `size` bytes; when it followed the
    /// one before, plans reading the next range of the same size (at the image's `generation`,
    /// asked only then), and returns the fetch for a `Fetcher` to run.
    fn follow(
        &self,
        offset: u64,
        len: usize,
        size: u64,
        generation: impl FnOnce() -> u64,
        image: impl FnOnce() -> Arc<dyn Image>,
    ) -> Option<Arc<Fetch>> {
        let mut state = lock(&self.state);
        let end = offset.saturating_add(len as u64);
        let sequential = offset == state.next && len >= MIN_READ_AHEAD;
        state.next = end;
        if !sequential {
            state.streak = 0;
            state.pending = None;
            state.spare = Vec::new();
            return None;
        }
        state.streak = state.streak.saturating_add(1);
        // Two in a row, so a reader that jumps around does not pay for fetches it never uses.
        if state.streak < STREAK || state.pending.is_some() || end >= size {
            return None;
        }
        let fetch_len = (len as u64).min(size - end) as usize;
        let fetch = Arc::new(Fetch {
            offset: end,
            len: fetch_len,
            generation: generation(),
            image: image(),
            state: Mutex::new(FetchState::Waiting(std::mem::take(&mut state.spare))),
            done: Condvar::new(),
        });
        state.pending = Some(Arc::clone(&fetch));
        Some(fetch)
    }
}

/// Runs the fetches of every handle of a mount on one thread, started on first use; it ends
/// when the mount's state is dropped.
#[derive(Default)]
pub struct Fetcher {
    jobs: Mutex<Option<Sender<Arc<Fetch>>>>,
    hits: AtomicU64,
}

impl Fetcher {
    /// After a read of `[offset, offset + len)` through `stream`: starts reading ahead if the
    /// stream is sequential.
    pub fn follow(
        &self,
        stream: &Stream,
        offset: u64,
        len: usize,
        size: u64,
        generation: impl FnOnce() -> u64,
        image: impl FnOnce() -> Arc<dyn Image>,
    ) {
        let Some(fetch) = stream.follow(offset, len, size, generation, image) else {
            return;
        };
        let mut jobs = lock(&self.jobs);
        if jobs.is_none() {
            let (send, receive) = channel::<Arc<Fetch>>();
            let spawned = std::thread::Builder::new()
                .name("imgfs-readahead".into())
                .spawn(move || {
                    for fetch in receive {
                        fetch.run();
                    }
                });
            match spawned {
                Ok(_) => *jobs = Some(send),
                Err(e) => log::debug!("no read-ahead thread: {e}"),
            }
        }
        let sent = jobs.as_ref().map(|jobs| jobs.send(Arc::clone(&fetch)));
        if !matches!(sent, Some(Ok(()))) {
            fetch.fail();
        }
    }

    pub fn count_hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads answered from read-ahead so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}
