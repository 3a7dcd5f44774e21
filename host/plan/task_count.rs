//! The kernel's tasks of one launch by kind, from every source's routing: what the phase
//! record's per-kind task counts (`FM_PHASE_WORDS` words 12..15) must show after a full
//! launch. The protocol in task_queue.cuh / scheduler.cuh creates them: per (source, owner)
//! the GEMM0 and GEMM1 column tiles of each routed task ([`LayerPlan::tasks`]) and the reduce
//! tiles of the rows the source sent; per rank the shared expert's tiles.

use super::{LayerPlan, RankRoute, TILE_M, TILE_N};

/// Tasks of one launch by kind, in the kernel's `TaskKind` order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskCounts {
    /// Routed GEMM0 column tiles.
    pub gemm0: u64,
    /// Routed GEMM1 column tiles.
    pub gemm1: u64,
    /// Shared-expert GEMM0 and GEMM1 tiles.
    pub shared: u64,
    /// Reduce tiles.
    pub reduce: u64,
}

impl TaskCounts {
    /// `[gemm0, gemm1, shared, reduce]`, as the phase record orders them.
    pub fn by_kind(&self) -> [u64; 4] {
        [self.gemm0, self.gemm1, self.shared, self.reduce]
    }
}

impl LayerPlan {
    /// The tasks a full launch runs when source `s` routes as `routes[s]` (its
    /// [`LayerPlan::route`]) and rank `r` has `tokens[r]` tokens, summed over every rank.
    pub fn expected_tasks(&self, routes: &[RankRoute], tokens: &[usize]) -> TaskCounts {
        let cfg = &self.config;
        let (g0, g1) = (
            (cfg.intermediate / TILE_N) as u64,
            (cfg.hidden / TILE_N) as u64,
        );
        let shared_width = cfg.shared.map_or(0, |s| s.count * s.intermediate);
        let mut n = TaskCounts::default();
        for route in routes {
            for (rows, counts) in route.rank_counts.iter().zip(&route.counts) {
                n.reduce += (*rows as usize).div_ceil(TILE_M) as u64 * g1;
                let tasks: u64 = counts
                    .iter()
                    .map(|&c| self.tasks(c as usize).count() as u64)
                    .sum();
                n.gemm0 += tasks * g0;
                n.gemm1 += tasks * g1;
            }
        }
        if shared_width > 0 {
            let per_block = (shared_width / TILE_N) as u64 + g1;
            n.shared = tokens
                .iter()
                .map(|t| t.div_ceil(TILE_M) as u64 * per_block)
                .sum();
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Dtype, MoeConfig};
    use crate::plan::{LayerPlan, TileMode};

    #[test]
    fn tasks_follow_the_rule_and_the_rows_sent() {
        // One rank, 2 experts, top-1: expert 0 gets 100 pairs, expert 1 gets 30.
        let mut cfg = MoeConfig::new(130, 128, 256, 2, 1);
        cfg.dtype = Dtype::Bf16;
        let plan = LayerPlan::new(&cfg).unwrap();
        let ids: Vec<u32> = (0..130).map(|t| u32::from(t >= 100)).collect();
        let slots: Vec<i32> = (0..130)
            .map(|t| if t < 100 { t } else { t - 100 })
            .collect();
        let route = plan.route(&ids, &slots, 1);
        // g0 = 256 / 64 = 4, g1 = 128 / 64 = 2; 130 rows sent: 3 reduce row blocks.
        let auto = plan.expected_tasks(std::slice::from_ref(&route), &[130]);
        // auto: expert 0 is one wide task (100 rows), expert 1 one decode task.
        assert_eq!(auto.by_kind(), [2 * 4, 2 * 2, 0, 3 * 2]);
        let narrow = plan
            .clone()
            .with_tile_mode(TileMode::Narrow)
            .expected_tasks(std::slice::from_ref(&route), &[130]);
        // narrow: expert 0 is two 64-row tasks.
        assert_eq!(narrow.by_kind(), [3 * 4, 3 * 2, 0, 3 * 2]);
    }
}
