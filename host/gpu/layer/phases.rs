//! Where a launch's time goes, from the per-block phase times the kernel writes into its
//! workspace (`ws_phase_times`, params.h `FM_PHASE_*`; kernel/include/flashmoe/phases.cuh).

use crate::plan::PHASE_WORDS;

/// Block-time of one launch summed over every block that recorded, by phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct PhaseSplit {
    /// Blocks that recorded.
    pub blocks: usize,
    /// From the first block's entry to the last block's exit, ns.
    pub launch_ns: u64,
    /// The first block's entry (device `%globaltimer`, ns).
    pub start_ns: u64,
    /// The last block's exit (device `%globaltimer`, ns).
    pub end_ns: u64,
    /// Router tiles, gate chunks, scans and their barriers.
    pub gate_ns: u64,
    /// Dispatch, its barrier, the signals and the scheduler's polling.
    pub dispatch_ns: u64,
    /// Running tasks (GEMM and reduce tiles with their completion steps).
    pub tiles_ns: u64,
    /// Waiting for ticket entries and the end of the queue.
    pub idle_ns: u64,
    /// Combine waits and sums.
    pub combine_ns: u64,
    /// Tasks run.
    pub tasks: u64,
    /// Of `tiles_ns`, by task kind: routed GEMM0, routed GEMM1, shared expert, reduce.
    pub kind_ns: [u64; 4],
    /// Of `tasks`, by task kind (as `kind_ns`).
    pub kind_tasks: [u64; 4],
    /// Routed tasks that started with their first stage already in flight, issued by the
    /// block's previous tile (the kernel's early first stage, `next_stage.cuh`; auto and
    /// narrow in the single-node build, never in auto-serial or classic).
    pub staged_tasks: u64,
}

/// The task kinds of [`PhaseSplit::kind_ns`], as the report names them.
pub const TASK_KINDS: [&str; 4] = ["gemm0", "gemm1", "shared", "reduce"];

impl PhaseSplit {
    /// Decodes `blocks` records of [`PHASE_WORDS`] words (blocks with a zero entry time
    /// recorded nothing and are skipped) and adds them to `self`.
    pub fn add_records(&mut self, words: &[u64], blocks: usize) {
        for r in words.chunks_exact(PHASE_WORDS).take(blocks) {
            if r[0] == 0 {
                continue;
            }
            self.start_ns = if self.blocks == 0 {
                r[0]
            } else {
                self.start_ns.min(r[0])
            };
            self.end_ns = self.end_ns.max(r[7]);
            self.blocks += 1;
            self.gate_ns += r[1];
            self.dispatch_ns += r[2];
            self.tiles_ns += r[3];
            self.idle_ns += r[4];
            self.combine_ns += r[5];
            self.tasks += r[6];
            for k in 0..4 {
                self.kind_ns[k] += r[8 + k];
                self.kind_tasks[k] += r[12 + k];
            }
            self.staged_tasks += r[16];
        }
        self.launch_ns = self.end_ns.saturating_sub(self.start_ns);
    }

    /// Block-time summed over the phases.
    pub fn total_ns(&self) -> u64 {
        self.gate_ns + self.dispatch_ns + self.tiles_ns + self.idle_ns + self.combine_ns
    }

    /// One line: each phase's share of the block-time, then the expert tiles by task kind
    /// (share of the tiles' time, tasks, mean block-time per task).
    pub fn describe(&self) -> String {
        let t = self.total_ns().max(1) as f64;
        let pct = |v: u64| 100.0 * v as f64 / t;
        let tiles = self.tiles_ns.max(1) as f64;
        let kinds: Vec<String> = TASK_KINDS
            .iter()
            .zip(self.kind_ns.iter().zip(&self.kind_tasks))
            .filter(|(_, (_, &n))| n > 0)
            .map(|(name, (&ns, &n))| {
                format!(
                    "{name} {:.1}% ({n} x {:.2} us)",
                    100.0 * ns as f64 / tiles,
                    ns as f64 / n as f64 / 1e3
                )
            })
            .collect();
        format!(
            "gate {:.1}%  dispatch {:.1}%  expert tiles {:.1}%  idle waits {:.1}%  combine {:.1}%  ({} tasks on {} blocks, launch {:.1} us); tiles: {}; {} routed tasks started with their first stage in flight",
            pct(self.gate_ns),
            pct(self.dispatch_ns),
            pct(self.tiles_ns),
            pct(self.idle_ns),
            pct(self.combine_ns),
            self.tasks,
            self.blocks,
            self.launch_ns as f64 / 1e3,
            if kinds.is_empty() { "none".to_string() } else { kinds.join("  ") },
            self.staged_tasks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_sum_by_phase_and_skip_silent_blocks() {
        let mut w = vec![0u64; 3 * PHASE_WORDS];
        w[..PHASE_WORDS].copy_from_slice(&[
            1000, 10, 20, 300, 40, 30, 5, 1400, 200, 60, 0, 40, 2, 2, 0, 1, 3,
        ]);
        // Block 1 recorded nothing.
        w[2 * PHASE_WORDS..].copy_from_slice(&[
            1100, 12, 8, 200, 60, 20, 3, 1500, 100, 100, 0, 0, 1, 2, 0, 0, 1,
        ]);
        let mut s = PhaseSplit::default();
        s.add_records(&w, 3);
        assert_eq!(s.blocks, 2);
        assert_eq!(
            (
                s.gate_ns,
                s.dispatch_ns,
                s.tiles_ns,
                s.idle_ns,
                s.combine_ns
            ),
            (22, 28, 500, 100, 50)
        );
        assert_eq!(s.tasks, 8);
        assert_eq!(s.launch_ns, 500);
        assert_eq!(s.total_ns(), 700);
        assert_eq!(s.kind_ns, [300, 160, 0, 40]);
        assert_eq!(s.kind_tasks, [3, 4, 0, 1]);
        assert_eq!(s.staged_tasks, 4);
        let d = s.describe();
        assert!(d.starts_with("gate 3.1%"), "{d}");
        assert!(
            d.ends_with("; 4 routed tasks started with their first stage in flight"),
            "{d}"
        );
        // 300 of 500 ns of tiles in 3 GEMM0 tasks: 60%, 0.10 us each; no shared task.
        assert!(d.contains("gemm0 60.0% (3 x 0.10 us)"), "{d}");
        assert!(
            d.contains("reduce 8.0% (1 x 0.04 us)") && !d.contains("shared"),
            "{d}"
        );
        // Only `blocks` records are read.
        let mut one = PhaseSplit::default();
        one.add_records(&w, 1);
        assert_eq!((one.blocks, one.tasks, one.launch_ns), (1, 5, 400));
    }
}
