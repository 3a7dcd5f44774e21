//! Work of one layer launch for the performance accounting of DESIGN.md: FLOPs, bytes and
//! the roofline floor.

use crate::config::{MoeConfig, Router};
use serde::Serialize;

/// FLOPs and bytes of one launch over the whole world.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LayerWork {
    /// Floating-point operations (multiply-add = 2).
    pub flops: f64,
    /// Bytes that must cross the memory interface at least once: expert weights touched,
    /// router and shared weights, tokens in, tokens out.
    pub bytes: f64,
    /// (token, expert) pairs that were computed (kept, not dropped).
    pub routed_rows: u64,
}

impl LayerWork {
    /// Work of a launch: `tokens` is the total over ranks, `kept_per_expert[e]` the rows
    /// expert e computed (over all sources).
    pub fn new(cfg: &MoeConfig, tokens: u64, kept_per_expert: &[u64]) -> Self {
        let es = cfg.dtype.size() as f64;
        let (h, i, e) = (
            cfg.hidden as f64,
            cfg.intermediate as f64,
            cfg.experts as f64,
        );
        let gemms = if cfg.mlp.is_gated() { 3.0 } else { 2.0 };
        let routed_rows: u64 = kept_per_expert.iter().sum();
        let t = tokens as f64;
        let mut flops = 2.0 * routed_rows as f64 * h * i * gemms;
        let touched = kept_per_expert.iter().filter(|&&n| n > 0).count() as f64;
        let mut bytes = touched * (cfg.gemm0_width() as f64 * h + h * i) * es + 2.0 * t * h * es;
        if !matches!(cfg.router, Router::Given) {
            flops += 2.0 * t * e * h;
            bytes += e * h * es;
        }
        if let Some(s) = cfg.shared {
            let w = (s.count * s.intermediate) as f64;
            flops += 2.0 * t * h * w * gemms;
            bytes += (if cfg.mlp.is_gated() { 2.0 } else { 1.0 } * w * h + h * w) * es;
            if s.gated {
                flops += 2.0 * t * h;
                bytes += h * es;
            }
        }
        LayerWork {
            flops,
            bytes,
            routed_rows,
        }
    }

    /// The roofline floor in seconds: `max(flops / peak_flops, bytes / peak_bytes)`.
    pub fn floor_seconds(&self, peak_flops: f64, peak_bytes_per_s: f64) -> f64 {
        (self.flops / peak_flops).max(self.bytes / peak_bytes_per_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MlpKind, SharedExperts};

    #[test]
    fn flops_count_each_gemm_once_per_kept_row() {
        let mut cfg = MoeConfig::new(4, 64, 128, 4, 2);
        cfg.router = Router::Given;
        let w = LayerWork::new(&cfg, 4, &[3, 0, 5, 0]);
        // 8 rows, three GEMMs of 64 x 128 each, 2 FLOPs per multiply-add.
        assert_eq!(w.flops, 8.0 * 3.0 * 2.0 * 64.0 * 128.0);
        assert_eq!(w.routed_rows, 8);
        // Two experts touched, each with 3 * 64 * 128 bf16 weights; 4 tokens in and out.
        assert_eq!(
            w.bytes,
            2.0 * 3.0 * 64.0 * 128.0 * 2.0 + 2.0 * 4.0 * 64.0 * 2.0
        );
    }

    #[test]
    fn gate_and_shared_experts_add_their_work() {
        let mut cfg = MoeConfig::new(10, 64, 64, 8, 1);
        cfg.mlp = MlpKind::Relu;
        let base = LayerWork::new(&cfg, 10, &[0; 8]);
        assert_eq!(base.flops, 2.0 * 10.0 * 8.0 * 64.0);
        cfg.shared = Some(SharedExperts {
            count: 2,
            intermediate: 64,
            gated: false,
        });
        let with = LayerWork::new(&cfg, 10, &[0; 8]);
        assert_eq!(with.flops - base.flops, 2.0 * 10.0 * 64.0 * 128.0 * 2.0);
    }

    #[test]
    fn floor_is_the_slower_of_compute_and_memory() {
        let w = LayerWork {
            flops: 1e12,
            bytes: 1e9,
            routed_rows: 0,
        };
        assert_eq!(w.floor_seconds(1e15, 1e12), 1e-3);
        assert_eq!(w.floor_seconds(1e12, 1e12), 1.0);
    }
}
