//! Epoch-tagged signal words and waits with a deadline.
//!
//! A signal word is `(epoch << 32) | rows`. Nothing is reset between forwards: a wait
//! for epoch `n` ignores any word that carries another epoch.

use super::heap::SymHeap;
use crate::error::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The signal word of `rows` rows in `epoch` (the epoch's low 32 bits).
pub fn word(epoch: u64, rows: usize) -> u64 {
    ((epoch & 0xffff_ffff) << 32) | (rows as u64 & 0xffff_ffff)
}

/// The epoch that follows `epoch`, skipping 0 modulo 2^32 (the tag of a zeroed heap).
pub fn next_epoch(epoch: u64) -> u64 {
    let n = epoch.wrapping_add(1);
    if n & 0xffff_ffff == 0 {
        n.wrapping_add(1)
    } else {
        n
    }
}

/// Why a rank stopped before finishing.
#[derive(Debug)]
pub enum Stop {
    /// It failed with this error.
    Failed(Error),
    /// Another rank failed first; this one gave up its waits.
    Aborted,
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

/// One awaited signal word.
#[derive(Debug, Clone)]
pub struct Awaited {
    /// Byte offset of the word in the waiting rank's heap.
    pub offset: u64,
    /// What it is, for the timeout message.
    pub what: String,
}

/// Waits for a set of signals of one epoch on one rank's heap, in any order of arrival.
pub struct SignalSet<'a> {
    heap: &'a SymHeap,
    rank: usize,
    stage: &'static str,
    epoch: u64,
    timeout: Duration,
    abort: &'a AtomicBool,
    pending: Vec<(usize, Awaited)>,
    total: usize,
    since: Instant,
    spins: u32,
}

impl<'a> SignalSet<'a> {
    /// Signals `awaited` (indexed by their position) of `epoch` on `heap`, for `rank` in
    /// `stage`; each wait fails after `timeout` without progress, or when `abort` is set.
    pub fn new(
        heap: &'a SymHeap,
        rank: usize,
        stage: &'static str,
        epoch: u64,
        timeout: Duration,
        abort: &'a AtomicBool,
        awaited: Vec<Awaited>,
    ) -> Self {
        SignalSet {
            heap,
            rank,
            stage,
            epoch: epoch & 0xffff_ffff,
            timeout,
            abort,
            total: awaited.len(),
            pending: awaited.into_iter().enumerate().collect(),
            since: Instant::now(),
            spins: 0,
        }
    }

    /// Whether every awaited signal has arrived.
    pub fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// Looks once at every pending signal: `Some((index, rows))` for the first that has
    /// arrived (which restarts the deadline), `None` when none has (or all have: see
    /// [`SignalSet::is_done`]). Never waits.
    pub fn poll(&mut self) -> std::result::Result<Option<(usize, u32)>, Stop> {
        for p in 0..self.pending.len() {
            let w = self.heap.load_signal(self.pending[p].1.offset)?;
            if w >> 32 == self.epoch {
                let (index, _) = self.pending.remove(p);
                self.since = Instant::now();
                self.spins = 0;
                return Ok(Some((index, (w & 0xffff_ffff) as u32)));
            }
        }
        Ok(None)
    }

    /// Called when [`SignalSet::poll`] found nothing and there is nothing else to do:
    /// fails with [`Stop::Aborted`] when another rank failed, or with [`Error::Timeout`]
    /// naming the first still-pending signal when none arrived for the timeout since the
    /// last arrival (or since the set was made, or since [`SignalSet::next`] began);
    /// otherwise backs off briefly (spin, then yield, then sleep).
    pub fn idle(&mut self) -> std::result::Result<(), Stop> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if self.abort.load(Ordering::Relaxed) {
            return Err(Stop::Aborted);
        }
        let waited = self.since.elapsed();
        if waited > self.timeout {
            return Err(Stop::Failed(self.timeout_error(waited)?));
        }
        backoff(&mut self.spins);
        Ok(())
    }

    /// The next signal to arrive: `(index, rows)`, or `None` when all have arrived.
    /// Fails with [`Error::Timeout`] naming the first still-pending signal when none
    /// arrives within the timeout.
    pub fn next(&mut self) -> std::result::Result<Option<(usize, u32)>, Stop> {
        if self.pending.is_empty() {
            return Ok(None);
        }
        self.since = Instant::now();
        self.spins = 0;
        loop {
            if let Some(arrived) = self.poll()? {
                return Ok(Some(arrived));
            }
            self.idle()?;
        }
    }

    fn timeout_error(&self, waited: Duration) -> Result<Error> {
        let first = &self.pending[0].1;
        let observed = self.heap.load_signal(first.offset)?;
        Ok(Error::Timeout {
            rank: self.rank,
            stage: self.stage,
            awaited: format!(
                "{} ({} of {} signals still missing)",
                first.what,
                self.pending.len(),
                self.total
            ),
            expected: self.epoch,
            observed: observed >> 32,
            waited_ms: waited.as_millis() as u64,
        })
    }
}

/// Spins briefly, then yields, then sleeps: ranks may outnumber cores.
fn backoff(spins: &mut u32) {
    *spins = spins.saturating_add(1);
    if *spins < 64 {
        std::hint::spin_loop();
    } else if *spins < 256 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dtype;

    fn awaited(offsets: &[u64]) -> Vec<Awaited> {
        offsets
            .iter()
            .map(|&offset| Awaited {
                offset,
                what: format!("word at {offset}"),
            })
            .collect()
    }

    #[test]
    fn stale_epochs_are_ignored_and_arrivals_come_in_any_order() {
        let heap = SymHeap::new(0, 64, Dtype::F32).expect("heap");
        let abort = AtomicBool::new(false);
        heap.signal(0, word(6, 5)).expect("signal");
        heap.signal(8, word(7, 3)).expect("signal");
        heap.signal(16, word(7, 0)).expect("signal");
        let mut set = SignalSet::new(
            &heap,
            0,
            "test",
            7,
            Duration::from_millis(50),
            &abort,
            awaited(&[0, 8, 16]),
        );
        assert_eq!(set.next().expect("arrived"), Some((1, 3)));
        assert_eq!(set.next().expect("arrived"), Some((2, 0)));
        // Word 0 still carries epoch 6: a timeout naming it.
        match set.next() {
            Err(Stop::Failed(Error::Timeout {
                rank: 0,
                stage: "test",
                awaited,
                expected: 7,
                observed: 6,
                ..
            })) => {
                assert!(awaited.contains("word at 0"), "{awaited}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        heap.signal(0, word(7, 9)).expect("signal");
        assert_eq!(set.next().expect("arrived"), Some((0, 9)));
        assert_eq!(set.next().expect("done"), None);
    }

    #[test]
    fn poll_never_waits_and_idle_times_out_from_the_last_arrival() {
        let heap = SymHeap::new(0, 64, Dtype::F32).expect("heap");
        let abort = AtomicBool::new(false);
        let mut set = SignalSet::new(
            &heap,
            0,
            "test",
            4,
            Duration::from_millis(30),
            &abort,
            awaited(&[0, 8]),
        );
        assert_eq!(set.poll().expect("poll"), None);
        assert!(!set.is_done());
        heap.signal(8, word(4, 2)).expect("signal");
        assert_eq!(set.poll().expect("poll"), Some((1, 2)));
        assert_eq!(set.poll().expect("poll"), None);
        set.idle().expect("within the deadline");
        std::thread::sleep(Duration::from_millis(40));
        match set.idle() {
            Err(Stop::Failed(Error::Timeout { awaited, .. })) => {
                assert!(awaited.contains("word at 0"), "{awaited}");
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        heap.signal(0, word(4, 0)).expect("signal");
        assert_eq!(set.poll().expect("poll"), Some((0, 0)));
        assert!(set.is_done());
        set.idle().expect("nothing pending: nothing to time out");
    }

    #[test]
    fn abort_stops_a_wait() {
        let heap = SymHeap::new(0, 64, Dtype::F32).expect("heap");
        let abort = AtomicBool::new(true);
        let mut set = SignalSet::new(
            &heap,
            0,
            "test",
            1,
            Duration::from_secs(60),
            &abort,
            awaited(&[0]),
        );
        assert!(matches!(set.next(), Err(Stop::Aborted)));
    }

    #[test]
    fn epochs_skip_the_zero_tag() {
        assert_eq!(next_epoch(1), 2);
        assert_eq!(next_epoch(0xffff_ffff), 0x1_0000_0001);
        assert_eq!(word(3, 17), (3 << 32) | 17);
        assert_eq!(word(0x1_0000_0002, 1) >> 32, 2);
    }
}
