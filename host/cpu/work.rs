//! A rank's queue of work units, shared by its rank thread and its helper threads.
//!
//! The rank thread pushes units (as dispatch signals arrive, for instance); helpers block
//! in [`Work::take_wait`] until one is queued or the queue is closed; the rank thread
//! runs units itself between its polls ([`Work::try_take`]) and waits for all of them with
//! [`Work::wait_idle`]. Which thread runs a unit never changes what it computes, so the
//! queue's order of service is free to vary from run to run.

use crate::error::Error;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How often a blocked [`Work::wait_idle`] looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(1);

struct State<U> {
    queue: VecDeque<U>,
    /// Units taken and not yet finished.
    running: usize,
    /// No more units will come: helpers return.
    closed: bool,
    /// A helper panicked mid-unit: its unit will never finish.
    broken: bool,
}

/// A queue of units of type `U`, with the count of those being run.
pub struct Work<U> {
    state: Mutex<State<U>>,
    /// Signalled when a unit is queued or the queue closes.
    ready: Condvar,
    /// Signalled when the last running unit finishes with nothing queued.
    idle: Condvar,
    /// The first error a helper met.
    error: Mutex<Option<Error>>,
}

impl<U> Default for Work<U> {
    fn default() -> Self {
        Work {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                running: 0,
                closed: false,
                broken: false,
            }),
            ready: Condvar::new(),
            idle: Condvar::new(),
            error: Mutex::new(None),
        }
    }
}

impl<U> Work<U> {
    fn lock(&self) -> MutexGuard<'_, State<U>> {
        // A panic while holding the lock leaves the state consistent (every critical
        // section is a few field updates), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `units` (in order) and wakes the helpers.
    pub fn push(&self, units: impl IntoIterator<Item = U>) {
        let mut st = self.lock();
        let before = st.queue.len();
        st.queue.extend(units);
        if st.queue.len() > before {
            self.ready.notify_all();
        }
    }

    /// The next queued unit, if any, now; the caller must [`Work::finish`] it.
    pub fn try_take(&self) -> Option<U> {
        let mut st = self.lock();
        let u = st.queue.pop_front()?;
        st.running += 1;
        Some(u)
    }

    /// The next queued unit, waiting for one; `None` once the queue is closed (or broken).
    /// The caller must [`Work::finish`] the unit.
    pub fn take_wait(&self) -> Option<U> {
        let mut st = self.lock();
        loop {
            if st.closed || st.broken {
                return None;
            }
            if let Some(u) = st.queue.pop_front() {
                st.running += 1;
                return Some(u);
            }
            st = self.ready.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Marks one taken unit as finished.
    pub fn finish(&self) {
        let mut st = self.lock();
        st.running = st.running.saturating_sub(1);
        if st.running == 0 && st.queue.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Waits until nothing is queued or running: `true`, or `false` when `abort` is set
    /// or a helper panicked first. Call it only once the caller has run out of units to
    /// take (the units still running are the helpers').
    pub fn wait_idle(&self, abort: &AtomicBool) -> bool {
        let mut st = self.lock();
        loop {
            if st.broken || abort.load(Ordering::Relaxed) {
                return false;
            }
            if st.running == 0 && st.queue.is_empty() {
                return true;
            }
            st = self
                .idle
                .wait_timeout(st, ABORT_POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// No more units: waiting helpers return.
    pub fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_all();
    }

    /// A helper panicked mid-unit: wakes everyone; [`Work::wait_idle`] fails from now on.
    pub fn break_down(&self) {
        self.lock().broken = true;
        self.ready.notify_all();
        self.idle.notify_all();
    }

    /// Records a helper's error (the first one is kept).
    pub fn fail(&self, e: Error) {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(e);
    }

    /// The first error a helper recorded, if any.
    pub fn take_error(&self) -> Option<Error> {
        self.error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers_drain_the_queue_and_idle_is_reached() {
        let work = Work::<usize>::default();
        let abort = AtomicBool::new(false);
        let done = Mutex::new(vec![0usize; 100]);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    while let Some(u) = work.take_wait() {
                        done.lock().expect("lock")[u] += 1;
                        work.finish();
                    }
                });
            }
            work.push(0..50);
            work.push(50..100);
            while let Some(u) = work.try_take() {
                done.lock().expect("lock")[u] += 1;
                work.finish();
            }
            assert!(work.wait_idle(&abort));
            work.close();
        });
        assert!(done.into_inner().expect("lock").iter().all(|&n| n == 1));
    }

    #[test]
    fn wait_idle_gives_up_on_abort_and_on_a_broken_queue() {
        let work = Work::<u8>::default();
        work.push([1]);
        let taken = work.try_take();
        assert_eq!(taken, Some(1));
        // The unit is running and never finishes: only abort ends the wait.
        assert!(!work.wait_idle(&AtomicBool::new(true)));
        work.break_down();
        assert!(!work.wait_idle(&AtomicBool::new(false)));
        assert_eq!(work.take_wait(), None);
    }

    #[test]
    fn the_first_error_is_kept() {
        let work = Work::<u8>::default();
        work.fail(Error::NoGpu("first".into()));
        work.fail(Error::input("x", "second"));
        assert!(matches!(work.take_error(), Some(Error::NoGpu(_))));
        assert!(work.take_error().is_none());
    }
}
