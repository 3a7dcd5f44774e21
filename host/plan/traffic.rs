//! Bytes on the wire per launch, as the plan's protocol moves them, for a uniform routing.

use super::LayerPlan;

/// Bytes one rank moves to and from its peers in one launch (its own rows excluded: they
/// never leave the GPU).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Traffic {
    /// Token rows sent to the experts' owners.
    pub dispatch_sent: f64,
    /// Token rows received from the other ranks.
    pub dispatch_received: f64,
    /// Expert outputs sent back to the tokens' sources.
    pub combine_sent: f64,
    /// Expert outputs received from the experts' owners.
    pub combine_received: f64,
}

impl Traffic {
    /// Everything sent (dispatch and combine).
    pub fn sent(&self) -> f64 {
        self.dispatch_sent + self.combine_sent
    }
}

impl LayerPlan {
    /// Expected bytes rank `rank` moves in one launch when every rank brings `tokens`
    /// tokens and every choice picks an expert uniformly at random: one row of `hidden`
    /// values per (token, expert) pair owned by another rank, each way (the per-expert
    /// protocol of this plan; drops ignored).
    pub fn traffic_uniform(&self, rank: usize) -> Traffic {
        let cfg = &self.config;
        let row = (cfg.hidden * cfg.dtype.size()) as f64;
        let pairs = (cfg.tokens * cfg.top_k) as f64;
        let e = cfg.experts.max(1) as f64;
        let local = self.local_experts.get(rank).map_or(0, Vec::len) as f64;
        let others = cfg.world.saturating_sub(1) as f64;
        let out = pairs * (e - local) / e * row;
        let inn = others * pairs * local / e * row;
        Traffic {
            dispatch_sent: out,
            dispatch_received: inn,
            combine_sent: inn,
            combine_received: out,
        }
    }
}

#[cfg(test)]
mod tests {
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
        // 128 tokens x 2 choices, 6 of 8 experts remote, 512-byte bf16 rows.
        assert_eq!(t.dispatch_sent, 256.0 * 0.75 * 512.0);
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
}
