//! Per-layer statistics of one model forward: latency and expert load.

use std::time::Duration;

/// What one layer did in one forward.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// Decoder layer index (in the checkpoint's numbering).
    pub layer: usize,
    /// Wall time of the layer: norm, the backend's forward and the residual add.
    pub latency: Duration,
    /// Wall time of the backend's forward alone.
    pub backend_latency: Duration,
    /// (token, expert) pairs routed to each expert, summed over ranks (kept + dropped).
    pub expert_counts: Vec<u64>,
    /// Pairs dropped for capacity, summed over ranks.
    pub dropped: u64,
    /// Dispatch bytes on the wire, when the backend returns its routing (CPU and
    /// reference backends).
    pub wire: Option<WireBytes>,
}

/// Bytes the dispatch of one layer sent between ranks (own rows excluded), all ranks
/// together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WireBytes {
    /// Sent under the rank-level protocol: one row (and metadata) per (token, remote rank).
    pub dispatch: f64,
    /// What one row per (token, remote expert) would have sent.
    pub per_expert: f64,
}

impl WireBytes {
    /// The dispatch bytes of a launch with `gates` (every rank's routing, top-k `k`).
    pub fn of(
        plan: &crate::plan::LayerPlan,
        gates: &[crate::reference::GateOutput],
        k: usize,
    ) -> Self {
        let mut w = WireBytes {
            dispatch: 0.0,
            per_expert: 0.0,
        };
        for (r, g) in gates.iter().enumerate() {
            let t = plan.traffic_of(r, &g.ids, &g.slots, k);
            w.dispatch += t.dispatch_sent;
            w.per_expert += t.per_expert_dispatch_sent;
        }
        w
    }
}

impl LayerStats {
    /// Fewest pairs any expert received.
    pub fn min_load(&self) -> u64 {
        self.expert_counts.iter().copied().min().unwrap_or(0)
    }

    /// Most pairs any expert received.
    pub fn max_load(&self) -> u64 {
        self.expert_counts.iter().copied().max().unwrap_or(0)
    }

    /// Mean pairs per expert.
    pub fn mean_load(&self) -> f64 {
        if self.expert_counts.is_empty() {
            return 0.0;
        }
        self.routed() as f64 / self.expert_counts.len() as f64
    }

    /// Total routed pairs (kept + dropped).
    pub fn routed(&self) -> u64 {
        self.expert_counts.iter().sum()
    }

    /// `max / mean`: 1 for a perfectly balanced layer.
    pub fn imbalance(&self) -> f64 {
        let mean = self.mean_load();
        if mean == 0.0 {
            0.0
        } else {
            self.max_load() as f64 / mean
        }
    }

    /// Experts that received no pair.
    pub fn idle_experts(&self) -> usize {
        self.expert_counts.iter().filter(|&&c| c == 0).count()
    }

    /// Histogram of loads: `buckets` equal-width bins over `[0, max_load]`; entry b counts
    /// the experts whose load falls in bin b.
    pub fn load_histogram(&self, buckets: usize) -> Vec<usize> {
        let buckets = buckets.max(1);
        let mut h = vec![0usize; buckets];
        let max = self.max_load();
        for &c in &self.expert_counts {
            let b = if max == 0 {
                0
            } else {
                ((c as u128 * buckets as u128) / (max as u128 + 1)) as usize
            };
            h[b.min(buckets - 1)] += 1;
        }
        h
    }

    /// One line for logs: `layer 3: 1.23 ms, load min/mean/max 0/12.5/40, dropped 7`.
    pub fn summary(&self) -> String {
        format!(
            "layer {}: {:.3} ms (backend {:.3} ms), load min/mean/max {}/{:.1}/{}, idle {}, dropped {}",
            self.layer,
            self.latency.as_secs_f64() * 1e3,
            self.backend_latency.as_secs_f64() * 1e3,
            self.min_load(),
            self.mean_load(),
            self.max_load(),
            self.idle_experts(),
            self.dropped
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(counts: &[u64]) -> LayerStats {
        LayerStats {
            layer: 0,
            latency: Duration::from_millis(2),
            backend_latency: Duration::from_millis(1),
            wire: None,
            expert_counts: counts.to_vec(),
            dropped: 0,
        }
    }

    #[test]
    fn load_figures() {
        let s = stats(&[0, 4, 8, 20]);
        assert_eq!((s.min_load(), s.max_load(), s.routed()), (0, 20, 32));
        assert_eq!(s.mean_load(), 8.0);
        assert_eq!(s.imbalance(), 2.5);
        assert_eq!(s.idle_experts(), 1);
        assert!(s.summary().contains("0/8.0/20"));
    }

    #[test]
    fn histogram_counts_every_expert_once() {
        let s = stats(&[0, 1, 5, 9, 10, 10]);
        let h = s.load_histogram(4);
        assert_eq!(h.iter().sum::<usize>(), 6);
        assert_eq!(h[0], 2);
        assert_eq!(h[3], 3);
        assert_eq!(stats(&[]).load_histogram(3), vec![0, 0, 0]);
        assert_eq!(stats(&[0, 0]).load_histogram(2), vec![2, 0]);
    }
}
