//! Pause points: named places in driver code where a test can park one thread, do something
//! else meanwhile, and let it go on, so a race between two threads is replayed in one chosen
//! interleaving instead of hoped for under stress.
//!
//! Driver code marks a racy place with `#[cfg(test)] crate::testutil::pause::point(NAME)`; in a
//! release build the line does not exist. A point only parks a thread that armed it itself
//! (`Pause::arm`, thread-local), and only once, so tests running in parallel and the other
//! threads of the same test pass through it untouched.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long `wait_parked` waits before failing the test: a watchdog for a thread that never
/// reaches the point, not a synchronisation delay.
const WATCHDOG: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    parked: bool,
    released: bool,
}

#[derive(Default)]
struct Gate {
    state: Mutex<State>,
    changed: Condvar,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Says the thread arrived, then blocks until the test releases it.
    fn park(&self) {
        let mut state = self.lock();
        state.parked = true;
        self.changed.notify_all();
        while !state.released {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

thread_local! {
    /// The point this thread armed, and the gate it parks at there.
    static ARMED: RefCell<Option<(&'static str, Arc<Gate>)>> = const { RefCell::new(None) };
}

/// Parks the calling thread at the point `name` if it armed that point and has not parked
/// there yet; otherwise returns at once.
pub fn point(name: &'static str) {
    let gate = ARMED.with(|armed| {
        let mut armed = armed.borrow_mut();
        match armed.as_ref() {
            Some((armed_name, _)) if *armed_name == name => armed.take().map(|(_, gate)| gate),
            _ => None,
        }
    });
    if let Some(gate) = gate {
        gate.park();
    }
}

/// One parking of one thread at one point, seen from the test. Dropping it releases the
/// thread, so a failing test never leaves it parked.
#[derive(Default)]
pub struct Pause {
    gate: Arc<Gate>,
}

impl Pause {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the calling thread park the next time it reaches `name`. Call it on the thread
    /// that is to be parked, before it does the work.
    pub fn arm(&self, name: &'static str) {
        let gate = Arc::clone(&self.gate);
        ARMED.with(|armed| *armed.borrow_mut() = Some((name, gate)));
    }

    /// Blocks until the armed thread is parked at its point.
    pub fn wait_parked(&self) {
        let mut state = self.gate.lock();
        while !state.parked {
            let (next, timeout) = self
                .gate
                .changed
                .wait_timeout(state, WATCHDOG)
                .unwrap_or_else(PoisonError::into_inner);
            assert!(
                !timeout.timed_out() || next.parked,
                "the armed thread never reached its pause point"
            );
            state = next;
        }
    }

    /// Lets the parked thread go on (or not park at all, if it has not arrived yet).
    pub fn release(&self) {
        self.gate.lock().released = true;
        self.gate.changed.notify_all();
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn only_the_armed_thread_parks_and_only_once() {
        const POINT: &str = "pause test point";
        let steps = Arc::new(AtomicU32::new(0));
        let pause = Pause::new();
        std::thread::scope(|scope| {
            let parked = scope.spawn(|| {
                pause.arm(POINT);
                point("another point");
                point(POINT);
                let seen = steps.load(Ordering::SeqCst);
                point(POINT);
                seen
            });
            pause.wait_parked();
            // Not armed here: passes straight through.
            point(POINT);
            steps.store(1, Ordering::SeqCst);
            pause.release();
            assert_eq!(parked.join().unwrap(), 1, "parked until released");
        });
    }
}
