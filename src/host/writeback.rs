//! Starts the host's write-back of long runs of sequential writes while they are still being
//! written, so that the fsync at the end finds most of the data on its way to disk already.
//!
//! The host writes dirty pages back on its own only once they pass `dirty_background_ratio`
//! (10% of memory: gigabytes) or grow 30 s old, so a 1 GiB copy through imgfs otherwise fills
//! the page cache first and then waits for all of it in the final fsync: the time of the copy
//! plus the time of the disk. Writing a raw file directly pays the same, but its copy takes a
//! quarter of the time, where each request through FUSE waits for two copies and a round trip.
//! Started as the run grows, the disk's work overlaps the copy. Purely a hint: the page cache
//! may write any dirty page back at any time anyway, so nothing about durability or the order
//! of writes changes, and a hint that is not given changes nothing either.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Writes shorter than this are not part of a stream: metadata, random guest writes.
const STREAM_WRITE_MIN: u64 = 64 * 1024;
/// How far past a run's end a write may start and still continue the run: a table or a block
/// header written between data, or a request that overtook the one before it.
const RUN_GAP: u64 = 1 << 20;
/// How far a run grows before the write-back of what it wrote is started.
const KICK_BYTES: u64 = 8 << 20;
/// Runs followed at once in one file (several writers, several NBD connections).
const RUNS: usize = 4;
/// Write-backs waiting for the thread that starts them; more are dropped (a hint).
const QUEUE: usize = 32;

/// One run of sequential writes: everything before `kicked` was handed on, `kicked..end` is
/// written and not yet.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Run {
    kicked: u64,
    end: u64,
    /// When the run last grew, in writes recorded on the file (the oldest run makes room).
    used: u64,
}

/// The runs of sequential writes followed in one host file.
#[derive(Debug, Default)]
pub struct SequentialRuns {
    state: Mutex<RunsState>,
}

#[derive(Debug, Default)]
struct RunsState {
    runs: [Option<Run>; RUNS],
    writes: u64,
}

impl SequentialRuns {
    /// Records a write of `len` bytes at `offset` and says which range's write-back to start
    /// now, if the write made a run grow past `KICK_BYTES` since its last one.
    pub fn record(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len < STREAM_WRITE_MIN {
            return None;
        }
        let end = offset.checked_add(len)?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.writes += 1;
        let now = state.writes;
        let continued = state.runs.iter_mut().flatten().find(|run| {
            offset.saturating_add(RUN_GAP) >= run.kicked
                && run.end.checked_add(RUN_GAP).is_some_and(|g| offset <= g)
        });
        let run = match continued {
            Some(run) => run,
            None => {
                let slot = oldest_or_free(&mut state.runs);
                *slot = Some(Run {
                    kicked: offset,
                    end,
                    used: now,
                });
                return None;
            }
        };
        run.end = run.end.max(end);
        run.used = now;
        if run.end - run.kicked < KICK_BYTES {
            return None;
        }
        let kick = (run.kicked, run.end - run.kicked);
        run.kicked = run.end;
        Some(kick)
    }
}

fn oldest_or_free(runs: &mut [Option<Run>; RUNS]) -> &mut Option<Run> {
    let index = runs
        .iter()
        .enumerate()
        .min_by_key(|(_, run)| run.map_or(0, |r| r.used))
        .map_or(0, |(i, _)| i);
    &mut runs[index]
}

/// A range of a file whose write-back is to be started.
struct Kick {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

/// Starts the write-back of `[offset, offset + len)` of `file` on the process's write-back
/// thread (started on first use), so the writer does not wait for the host to submit it.
pub fn start_writeback(file: &Arc<File>, offset: u64, len: u64) {
    static THREAD: OnceLock<Option<SyncSender<Kick>>> = OnceLock::new();
    let sender = THREAD.get_or_init(|| {
        let (sender, receiver) = sync_channel::<Kick>(QUEUE);
        std::thread::Builder::new()
            .name("imgfs-writeback".into())
            .spawn(move || {
                for kick in receiver {
                    write_back(&kick);
                }
            })
            .ok()
            .map(|_| sender)
    });
    if let Some(sender) = sender {
        let kick = Kick {
            file: file.clone(),
            offset,
            len,
        };
        let _ = sender.try_send(kick);
    }
}

fn write_back(kick: &Kick) {
    let (Ok(offset), Ok(len)) = (
        libc::off64_t::try_from(kick.offset),
        libc::off64_t::try_from(kick.len),
    ) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor the `Arc<File>` keeps open; it takes no
    // pointers. Only SYNC_FILE_RANGE_WRITE: it starts the write-back and waits for nothing.
    unsafe {
        libc::sync_file_range(
            kick.file.as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_sequential_run_is_handed_on_every_kick_bytes() {
        let runs = SequentialRuns::default();
        let mut kicks = Vec::new();
        for i in 0..20 {
            kicks.extend(runs.record(100 * MIB + i * MIB, MIB));
        }
        // The first write starts the run; the eighth makes it 8 MiB long.
        assert_eq!(kicks, vec![(100 * MIB, 8 * MIB), (108 * MIB, 8 * MIB)]);
    }

    #[test]
    fn small_and_scattered_writes_start_nothing() {
        let runs = SequentialRuns::default();
        for i in 0..1000u64 {
            assert_eq!(runs.record(i * 4096, 4096), None);
        }
        for i in 0..100u64 {
            // 1 MiB writes 16 MiB apart: every one starts a run of its own.
            assert_eq!(runs.record(i * 16 * MIB, MIB), None);
        }
    }

    #[test]
    fn a_gap_or_a_late_request_continues_the_run() {
        let runs = SequentialRuns::default();
        assert_eq!(runs.record(0, 2 * MIB), None);
        // Metadata of 64 KiB skipped between two data writes.
        assert_eq!(runs.record(2 * MIB + 64 * 1024, 2 * MIB), None);
        // A request that arrives after the one that follows it.
        assert_eq!(runs.record(5 * MIB, 2 * MIB), None);
        assert_eq!(runs.record(4 * MIB + 64 * 1024, MIB - 64 * 1024), None);
        assert_eq!(runs.record(7 * MIB, MIB), Some((0, 8 * MIB)));
    }

    #[test]
    fn parallel_writers_keep_runs_of_their_own() {
        let runs = SequentialRuns::default();
        let mut kicks = Vec::new();
        for i in 0..8 {
            for writer in 0..RUNS as u64 {
                kicks.extend(runs.record(writer * 1024 * MIB + i * MIB, MIB));
            }
        }
        kicks.sort();
        let expected: Vec<_> = (0..RUNS as u64)
            .map(|writer| (writer * 1024 * MIB, 8 * MIB))
            .collect();
        assert_eq!(kicks, expected);
    }

    #[test]
    fn a_new_writer_takes_the_place_of_the_run_idle_longest() {
        let runs = SequentialRuns::default();
        for writer in 0..RUNS as u64 {
            assert_eq!(runs.record(writer * 1024 * MIB, MIB), None);
        }
        assert_eq!(runs.record(9000 * MIB, MIB), None);
        // Writer 1 goes on: 8 MiB in all.
        let kicks: Vec<_> = (1..8)
            .filter_map(|i| runs.record(1024 * MIB + i * MIB, MIB))
            .collect();
        assert_eq!(kicks, vec![(1024 * MIB, 8 * MIB)]);
        // Writer 0's run was replaced: its next 7 MiB are a run of 7 MiB.
        assert!((1..8).all(|i| runs.record(i * MIB, MIB).is_none()));
    }

    #[test]
    fn a_request_late_by_less_than_the_gap_stays_in_its_run() {
        let runs = SequentialRuns::default();
        let kicks: Vec<_> = (0..8).filter_map(|i| runs.record(i * MIB, MIB)).collect();
        assert_eq!(kicks, vec![(0, 8 * MIB)]);
        for writer in 1..RUNS as u64 {
            runs.record(writer * 1024 * MIB, MIB);
        }
        // Late by one request: absorbed, not a run of its own that would replace another.
        assert_eq!(runs.record(7 * MIB, MIB), None);
        assert_eq!(runs.record(2048 * MIB + MIB, MIB), None);
        let kicks: Vec<_> = (8..16).filter_map(|i| runs.record(i * MIB, MIB)).collect();
        assert_eq!(kicks, vec![(8 * MIB, 8 * MIB)]);
    }
}
