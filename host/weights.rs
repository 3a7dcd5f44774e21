//! Weights of one MoE layer, on the host, as f32 values already rounded to the layer's
//! dtype (so the reference, the CPU executor and the GPU see the very same numbers).
//!
//! Layouts are the checkpoints' `[out, in]`, row-major:
//! - `w0`: `[gemm0 width][hidden]`; for gated MLPs the gate rows come first, then the up
//!   rows (transformers' fused `gate_up_proj` convention);
//! - `w1`: `[hidden][intermediate]` (the down projection).

use crate::config::{MoeConfig, Router};
use crate::error::{Error, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One expert MLP (also used for the fused shared experts).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertWeights {
    /// `[gemm0 width][hidden]`: gate rows then up rows when gated.
    pub w0: Vec<f32>,
    /// `[hidden][width]`.
    pub w1: Vec<f32>,
}

/// All weights of one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerWeights {
    /// Router `[experts][hidden]` (unused with [`Router::Given`], but always present).
    pub router: Vec<f32>,
    /// Per-expert selection bias `[experts]` for [`Router::SigmoidBias`]; empty otherwise.
    pub router_bias: Vec<f32>,
    /// Routed experts, indexed by global expert id.
    pub experts: Vec<ExpertWeights>,
    /// The shared experts fused into one MLP of width `count * intermediate`.
    pub shared: Option<ExpertWeights>,
    /// Sigmoid gate of the shared output `[hidden]` (Qwen2-MoE), when configured.
    pub shared_gate: Option<Vec<f32>>,
}

fn fill(rng: &mut StdRng, n: usize, scale: f32, round: impl Fn(f32) -> f32) -> Vec<f32> {
    (0..n)
        .map(|_| round(rng.random_range(-scale..scale)))
        .collect()
}

impl LayerWeights {
    /// Random weights with fan-in scaling, deterministic in `seed`.
    pub fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let round = |x: f32| cfg.dtype.round(x);
        let h = cfg.hidden;
        let s_in = 1.0 / (h as f32).sqrt();
        let mlp = |rng: &mut StdRng, width: usize| {
            let w0_rows = if cfg.mlp.is_gated() { 2 * width } else { width };
            ExpertWeights {
                w0: fill(rng, w0_rows * h, s_in, round),
                w1: fill(rng, h * width, 1.0 / (width as f32).sqrt(), round),
            }
        };
        let router = if cfg.router_f32 {
            fill(&mut rng, cfg.experts * h, s_in, |x| x)
        } else {
            fill(&mut rng, cfg.experts * h, s_in, round)
        };
        let router_bias = match cfg.router {
            Router::SigmoidBias { .. } => fill(&mut rng, cfg.experts, 0.5, |x| x),
            _ => Vec::new(),
        };
        let experts = (0..cfg.experts)
            .map(|_| mlp(&mut rng, cfg.intermediate))
            .collect();
        let shared = cfg.shared.map(|s| mlp(&mut rng, s.count * s.intermediate));
        let shared_gate = cfg
            .shared
            .filter(|s| s.gated)
            .map(|_| fill(&mut rng, h, s_in, round));
        LayerWeights {
            router,
            router_bias,
            experts,
            shared,
            shared_gate,
        }
    }

    /// Checks every tensor's length against the config; the error names the tensor.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        let h = cfg.hidden;
        let check = |field: &'static str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::input(
                    field,
                    format!("has {got} values, the config needs {want}"),
                ))
            }
        };
        check("weights.router", self.router.len(), cfg.experts * h)?;
        if matches!(cfg.router, Router::SigmoidBias { .. }) {
            check("weights.router_bias", self.router_bias.len(), cfg.experts)?;
        }
        check("weights.experts", self.experts.len(), cfg.experts)?;
        for e in &self.experts {
            check("weights.experts[].w0", e.w0.len(), cfg.gemm0_width() * h)?;
            check("weights.experts[].w1", e.w1.len(), h * cfg.intermediate)?;
        }
        match (&cfg.shared, &self.shared) {
            (None, None) => {}
            (Some(s), Some(w)) => {
                let width = s.count * s.intermediate;
                let rows = if cfg.mlp.is_gated() { 2 * width } else { width };
                check("weights.shared.w0", w.w0.len(), rows * h)?;
                check("weights.shared.w1", w.w1.len(), h * width)?;
            }
            (Some(_), None) => {
                return Err(Error::input(
                    "weights.shared",
                    "missing: the config has shared experts",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::input(
                    "weights.shared",
                    "present but the config has no shared experts",
                ))
            }
        }
        let gated = cfg.shared.is_some_and(|s| s.gated);
        match (&self.shared_gate, gated) {
            (Some(g), true) => check("weights.shared_gate", g.len(), h)?,
            (None, false) => {}
            (None, true) => {
                return Err(Error::input(
                    "weights.shared_gate",
                    "missing: shared experts are gated",
                ))
            }
            (Some(_), false) => {
                return Err(Error::input(
                    "weights.shared_gate",
                    "present but shared experts are not gated",
                ))
            }
        }
        let all = self
            .router
            .iter()
            .chain(&self.router_bias)
            .chain(self.experts.iter().flat_map(|e| e.w0.iter().chain(&e.w1)));
        if all.clone().any(|v| !v.is_finite()) {
            return Err(Error::input("weights", "contains a non-finite value"));
        }
        Ok(())
    }
}

/// Random token rows in [-1, 1), rounded to the dtype; `tokens * hidden` values.
pub fn random_tokens(cfg: &MoeConfig, tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    fill(&mut rng, tokens * cfg.hidden, 1.0, |x| cfg.dtype.round(x))
}
