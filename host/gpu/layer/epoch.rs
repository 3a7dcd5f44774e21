//! Guard against the kernel's 32-bit epoch tags repeating.
//!
//! Signals and task-queue entries carry the low 32 bits of the launch's epoch. Counting from
//! a reset (every word zero, epoch 0), launch n uses tag `n mod 2^32`: launch `2^32` would
//! carry tag 0, the value of a word never written, and later launches the tags of launches
//! long gone. So at most `2^32 - 1` launches may follow a reset; the layer resets itself
//! before the next one (after about 12 hours of back-to-back 10 us launches).

use std::cell::Cell;

/// Launches allowed between two resets.
pub const LAUNCHES_PER_RESET: u64 = (1 << 32) - 1;

/// Launches since the last reset of a layer's heaps and workspaces.
#[derive(Debug, Default)]
pub struct EpochGuard {
    launches: Cell<u64>,
}

impl EpochGuard {
    /// Whether the next launch must be preceded by a reset.
    pub fn needs_reset(&self) -> bool {
        self.launches.get() >= LAUNCHES_PER_RESET
    }

    /// Counts one enqueued launch (a kernel launch or a graph replay).
    pub fn launched(&self) {
        self.launches.set(self.launches.get() + 1);
    }

    /// The heaps and workspaces were zeroed: epochs start again at 0.
    pub fn was_reset(&self) {
        self.launches.set(0);
    }

    /// Launches since the last reset.
    pub fn launches(&self) -> u64 {
        self.launches.get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_due_exactly_before_the_launch_whose_tag_would_be_zero() {
        let g = EpochGuard::default();
        g.launches.set(LAUNCHES_PER_RESET - 1);
        assert!(!g.needs_reset(), "launch 2^32 - 1 still has a fresh tag");
        g.launched();
        assert_eq!(g.launches(), (1 << 32) - 1);
        assert!(g.needs_reset(), "launch 2^32 would carry tag 0");
        g.was_reset();
        assert!(!g.needs_reset());
        assert_eq!(g.launches(), 0);
    }
}
