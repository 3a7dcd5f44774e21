//! Bytes on the wire per launch under the rank-level protocol: expected for a uniform
//! routing, or measured from a routing.

use super::{LayerPlan, NO_PAIR};

/// Bytes one rank moves to and from its peers in one launch (its own rows excluded: they
/// never leave the GPU).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Traffic {
    /// Token rows and their metadata sent to the experts' owners.
    pub dispatch_sent: f64,
    /// Token rows and metadata received from the other ranks.
    pub dispatch_received: f64,
    /// Partials sent back to the tokens' sources.
    pub combine_sent: f64,
    /// Partials received from the experts' owners.
    pub combine_received: f64,
    /// What the dispatch would send with one row per (token, remote expert) instead of one
    /// per (token, remote rank): the per-expert protocol, for comparison.
    pub per_expert_dispatch_sent: f64,
}

impl Traffic {
    /// Everything sent (dispatch and combine).
    pub fn sent(&self) -> f64 {
        self.dispatch_sent + self.combine_sent
    }

    /// How many times fewer bytes the dispatch sends than the per-expert protocol would
    /// (1 when nothing is sent).
    pub fn dispatch_saving(&self) -> f64 {
        if self.dispatch_sent > 0.0 {
            self.per_expert_dispatch_sent / self.dispatch_sent
        } else {
            1.0
        }
    }
}

/// `C(n - m, k) / C(n, k)`: the chance that `k` distinct experts drawn uniformly from `n`
/// all miss a set of `m`.
fn miss_all(n: usize, m: usize, k: usize) -> f64 {
    if m + k > n {
        return 0.0;
    }
    (0..k)
        .map(|i| (n - m - i) as f64 / (n - i) as f64)
        .product()
}

impl LayerPlan {
    /// Bytes of one token row on the wire with its metadata entries.
    fn row_with_meta(&self) -> f64 {
        (self.config.hidden * self.config.dtype.size() + 8 * self.route_slots) as f64
    }

    /// Expected bytes rank `rank` moves in one launch when every rank brings `tokens`
    /// tokens and every token picks its `top_k` experts uniformly at random (without
    /// repetition); drops ignored.
    pub fn traffic_uniform(&self, rank: usize) -> Traffic {
        let cfg = &self.config;
        let (t, k, e) = (cfg.tokens as f64, cfg.top_k, cfg.experts.max(1));
        let row = (cfg.hidden * cfg.dtype.size()) as f64;
        let local = |r: usize| self.local_experts.get(r).map_or(0, Vec::len);
        // Rows a source sends rank r, and the pair-list and count bytes with them.
        let to = |r: usize| {
            let rows = t * (1.0 - miss_all(e, local(r), k));
            let pairs = t * k as f64 * local(r) as f64 / e as f64;
            (
                rows,
                rows * self.row_with_meta() + 4.0 * (pairs + local(r) as f64),
            )
        };
        let mut tr = Traffic::default();
        let others = cfg.world.saturating_sub(1) as f64;
        for r in (0..cfg.world).filter(|&r| r != rank) {
            let (rows, bytes) = to(r);
            tr.dispatch_sent += bytes;
            tr.combine_received += rows * row;
            tr.per_expert_dispatch_sent += t * k as f64 * local(r) as f64 / e as f64 * row;
        }
        let (rows, bytes) = to(rank);
        tr.dispatch_received = others * bytes;
        tr.combine_sent = others * rows * row;
        tr
    }

    /// Bytes rank `rank` sends in one launch with this routing of its tokens (`ids` and
    /// `slots` of its `tokens * k` choices): the dispatch and, for comparison, what the
    /// per-expert protocol would send. Combine fields are left 0 (they depend on the
    /// other ranks' routing).
    pub fn traffic_of(&self, rank: usize, ids: &[u32], slots: &[i32], k: usize) -> Traffic {
        let route = self.route(ids, slots, k);
        let row = (self.config.hidden * self.config.dtype.size()) as f64;
        let mut tr = Traffic::default();
        for (r, &rows) in route.rank_counts.iter().enumerate() {
            if r == rank {
                continue;
            }
            let pairs: u32 = route.counts[r].iter().sum();
            tr.dispatch_sent += f64::from(rows) * self.row_with_meta()
                + 4.0 * (f64::from(pairs) + route.counts[r].len() as f64);
        }
        for (i, &p) in route.pairs.iter().enumerate() {
            if p != NO_PAIR && self.owner_rank(ids[i]) != rank {
                tr.per_expert_dispatch_sent += row;
            }
        }
        tr
    }
}

#[cfg(test)]
mod tests {
    use super::miss_all;
    use crate::config::{MoeConfig, Placement};
    use crate::plan::LayerPlan;

    #[test]
    fn uniform_traffic_balances_and_vanishes_on_one_rank() {
        let one = LayerPlan::new(&MoeConfig::new(128, 256, 256, 8, 2)).unwrap();
        assert_eq!(one.traffic_uniform(0).sent(), 0.0);
        let cfg = MoeConfig {
            world: 4,
            ..MoeConfig::new(128, 256, 256, 8, 2)
        };
        let p = LayerPlan::new(&cfg).unwrap();
        let t = p.traffic_uniform(1);
        // A token (2 of 8 experts) misses rank r's 2 experts with chance 6/8 x 5/7.
        let rows = 128.0 * (1.0 - 30.0 / 56.0);
        let want = 3.0 * (rows * (512.0 + 16.0) + 4.0 * (128.0 * 2.0 * 2.0 / 8.0 + 2.0));
        assert!(
            (t.dispatch_sent - want).abs() < 1e-6,
            "{} {want}",
            t.dispatch_sent
        );
        // What all ranks send equals what all receive.
        let sent: f64 = (0..4).map(|r| p.traffic_uniform(r).dispatch_sent).sum();
        let recv: f64 = (0..4).map(|r| p.traffic_uniform(r).dispatch_received).sum();
        assert!((sent - recv).abs() < 1e-6);
        // A rank that owns nothing receives nothing.
        let uneven = MoeConfig {
            placement: Placement::Map(vec![0, 0, 0, 0, 1, 1, 1, 1]),
            ..cfg
        };
        let p = LayerPlan::new(&uneven).unwrap();
        assert_eq!(p.traffic_uniform(3).dispatch_received, 0.0);
        assert!(p.traffic_uniform(3).dispatch_sent > 0.0);
    }

    #[test]
    fn top_8_over_8_ranks_sends_fewer_rows_than_pairs() {
        // DeepSeek-V3 shape: 256 experts, top-8, 8 ranks: a token reaches 1 - C(224,8)/C(256,8)
        // of each remote rank, about 0.66, against 1.0 expected pairs per remote rank.
        let mut c = MoeConfig::new(4096, 7168, 2048, 256, 8);
        c.world = 8;
        let p = LayerPlan::new(&c).unwrap();
        let t = p.traffic_uniform(0);
        assert!(
            t.dispatch_saving() > 1.4 && t.dispatch_saving() < 1.6,
            "{}",
            t.dispatch_saving()
        );
        assert!((miss_all(256, 32, 8) - 0.3377).abs() < 1e-3);
    }

    #[test]
    fn measured_traffic_counts_one_row_per_token_and_remote_rank() {
        // 2 ranks, 4 experts (2 each), top-2: token 0 picks 2 and 3 (both on rank 1),
        // token 1 picks 0 and 2.
        let mut c = MoeConfig::new(2, 64, 64, 4, 2);
        c.world = 2;
        let p = LayerPlan::new(&c).unwrap();
        let t = p.traffic_of(0, &[2, 3, 0, 2], &[0, 0, 0, 1], 2);
        let row = 128.0;
        assert_eq!(t.per_expert_dispatch_sent, 3.0 * row);
        assert_eq!(t.dispatch_sent, 2.0 * (row + 16.0) + 4.0 * (3.0 + 2.0));
    }
}
