//! Weights of one MoE layer, on the host, as f32 values already rounded to the layer's
//! dtype (so the reference, the CPU executor and the GPU see the very same numbers).
//!
//! Layouts are the checkpoints' `[out, in]`, row-major:
//! - `w0`: `[gemm0 width][hidden]`; for gated MLPs the gate rows come first, then the up
//!   rows (transformers' fused `gate_up_proj` convention);
//! - `w1`: `[hidden][intermediate]` (the down projection).

use crate::config::MoeConfig;
use crate::error::{Error, Result};

/// One expert MLP (also used for the fused shared experts).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExpertWeights {
    /// `[gemm0 width][hidden]`: gate rows then up rows when gated.
    pub w0: Vec<f32>,
    /// `[hidden][width]`.
    pub w1: Vec<f32>,
    /// Bias of the first product `[gemm0 width]` (gate values then up values when gated),
    /// added before the activation; empty for none (gpt-oss has one).
    pub b0: Vec<f32>,
    /// Bias of the second product `[hidden]`, added to the expert's output before its
    /// routing weight; empty for none.
    pub b1: Vec<f32>,
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

mod random;
pub use random::random_tokens;

impl LayerWeights {
    /// Bytes [`LayerWeights::random`] (or a checkpoint load) holds for `cfg` on the host:
    /// every tensor as f32, every expert. Saturates instead of overflowing.
    pub fn host_bytes(cfg: &MoeConfig) -> u64 {
        let (h, i, e) = (
            cfg.hidden as u64,
            cfg.intermediate as u64,
            cfg.experts as u64,
        );
        let rows0 = if cfg.mlp.is_gated() { 2 * i } else { i };
        let expert = rows0.saturating_add(i).saturating_mul(h);
        let shared = cfg.shared.map_or(0, |s| {
            let w = (s.count as u64).saturating_mul(s.intermediate as u64);
            let rows = if cfg.mlp.is_gated() {
                w.saturating_mul(2)
            } else {
                w
            };
            rows.saturating_add(w)
                .saturating_mul(h)
                .saturating_add(if s.gated { h } else { 0 })
        });
        e.saturating_mul(expert.saturating_add(h).saturating_add(1))
            .saturating_add(shared)
            .saturating_mul(4)
    }

    /// Checks every tensor's length against the config and that every value is finite;
    /// the error names the tensor.
    pub fn validate(&self, cfg: &MoeConfig) -> Result<()> {
        self.validate_gate(cfg)?;
        check("weights.experts", self.experts.len(), cfg.experts)?;
        for (j, e) in self.experts.iter().enumerate() {
            e.validate(cfg, j)?;
        }
        Ok(())
    }

    /// [`LayerWeights::validate`] for everything but the routed experts (the router, its
    /// bias, the shared experts and their gate): for weights whose experts come one at a
    /// time.
    pub fn validate_gate(&self, cfg: &MoeConfig) -> Result<()> {
        let h = cfg.hidden;
        check("weights.router", self.router.len(), cfg.experts * h)?;
        if cfg.router.has_bias() {
            check("weights.router_bias", self.router_bias.len(), cfg.experts)?;
        }
        match (&cfg.shared, &self.shared) {
            (None, None) => {}
            (Some(s), Some(w)) => {
                let width = s.count * s.intermediate;
                let rows = if cfg.mlp.is_gated() { 2 * width } else { width };
                check("weights.shared.w0", w.w0.len(), rows * h)?;
                check("weights.shared.w1", w.w1.len(), h * width)?;
                if !w.b0.is_empty() {
                    check("weights.shared.b0", w.b0.len(), rows)?;
                }
                if !w.b1.is_empty() {
                    check("weights.shared.b1", w.b1.len(), h)?;
                }
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
        finite("weights.router", "", &self.router)?;
        finite("weights.router_bias", "", &self.router_bias)?;
        if let Some(w) = &self.shared {
            finite("weights.shared.w0", "", &w.w0)?;
            finite("weights.shared.w1", "", &w.w1)?;
            finite("weights.shared.b0", "", &w.b0)?;
            finite("weights.shared.b1", "", &w.b1)?;
        }
        if let Some(g) = &self.shared_gate {
            finite("weights.shared_gate", "", g)?;
        }
        Ok(())
    }
}

impl ExpertWeights {
    /// Checks routed expert `j`'s tensors against the config: lengths, and finite values.
    pub fn validate(&self, cfg: &MoeConfig, j: usize) -> Result<()> {
        let h = cfg.hidden;
        check("weights.experts[].w0", self.w0.len(), cfg.gemm0_width() * h)?;
        check("weights.experts[].w1", self.w1.len(), h * cfg.intermediate)?;
        if !self.b0.is_empty() {
            check("weights.experts[].b0", self.b0.len(), cfg.gemm0_width())?;
        }
        if !self.b1.is_empty() {
            check("weights.experts[].b1", self.b1.len(), h)?;
        }
        let what = format!("expert {j}: ");
        finite("weights.experts[].w0", &what, &self.w0)?;
        finite("weights.experts[].w1", &what, &self.w1)?;
        finite("weights.experts[].b0", &what, &self.b0)?;
        finite("weights.experts[].b1", &what, &self.b1)
    }
}

/// An [`Error::InvalidInput`] naming `field` unless `got == want`.
fn check(field: &'static str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::input(
            field,
            format!("has {got} values, the config needs {want}"),
        ))
    }
}

/// An [`Error::InvalidInput`] naming `field` (and `what`, e.g. the expert) at the first
/// non-finite value of `values`.
fn finite(field: &'static str, what: &str, values: &[f32]) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::input(
            field,
            format!("{what}value {i} is {} (weights must be finite)", values[i]),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SharedExperts;

    #[test]
    fn host_bytes_match_what_random_allocates() {
        let mut cfg = MoeConfig::new(4, 64, 96, 4, 2);
        cfg.shared = Some(SharedExperts {
            count: 2,
            intermediate: 32,
            gated: true,
        });
        let w = LayerWeights::random(&cfg, 1);
        let floats = w.router.len()
            + w.router_bias.len()
            + w.experts
                .iter()
                .map(|e| e.w0.len() + e.w1.len())
                .sum::<usize>()
            + w.shared.as_ref().map_or(0, |s| s.w0.len() + s.w1.len())
            + w.shared_gate.as_ref().map_or(0, Vec::len);
        // The estimate may round up (a bias slot per expert), never down.
        let est = LayerWeights::host_bytes(&cfg);
        assert!(
            est >= 4 * floats as u64 && est <= 4 * (floats as u64 + 4),
            "{est} vs {floats}"
        );
        let mut huge = cfg.clone();
        huge.hidden = usize::MAX;
        assert_eq!(LayerWeights::host_bytes(&huge), u64::MAX);
    }

    #[test]
    fn non_finite_values_are_refused_in_every_tensor_naming_it() {
        let mut cfg = MoeConfig::new(4, 64, 64, 4, 2);
        cfg.shared = Some(SharedExperts {
            count: 1,
            intermediate: 64,
            gated: true,
        });
        let w = LayerWeights::random(&cfg, 1);
        w.validate(&cfg).unwrap();
        type Poke = fn(&mut LayerWeights, f32);
        let cases: [(&str, Poke); 6] = [
            ("weights.router", |w, v| w.router[3] = v),
            ("weights.experts[].w0", |w, v| w.experts[2].w0[5] = v),
            ("weights.experts[].w1", |w, v| w.experts[1].w1[0] = v),
            ("weights.shared.w0", |w, v| {
                if let Some(s) = &mut w.shared {
                    s.w0[7] = v
                }
            }),
            ("weights.shared.w1", |w, v| {
                if let Some(s) = &mut w.shared {
                    s.w1[9] = v
                }
            }),
            ("weights.shared_gate", |w, v| {
                if let Some(g) = &mut w.shared_gate {
                    g[1] = v
                }
            }),
        ];
        for (field, poke) in cases {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut b = w.clone();
                poke(&mut b, bad);
                match b.validate(&cfg) {
                    Err(Error::InvalidInput { field: f, reason }) => {
                        assert_eq!(f, field, "{reason}");
                        assert!(reason.contains("finite"), "{reason}");
                    }
                    other => panic!("{field} = {bad}: {other:?}"),
                }
            }
        }
    }
}
