//! The executor's expert weights, packed once for the GEMM kernels in the layer's own
//! dtype (2 bytes per value for bf16 and f16): no f32 copy of them is kept.

use super::gemm::PackedMatrix;
use crate::config::MoeConfig;
use crate::par::{spread, spread_mut, spread_over, threads};
use crate::weights::{ExpertWeights, LayerWeights};
use crate::Dtype;

/// One expert MLP (routed, or the fused shared experts), packed.
#[derive(Debug)]
pub struct PackedMlp {
    /// `[gemm0 width][hidden]`: gate rows then up rows when gated.
    pub w0: PackedMatrix,
    /// `[hidden][width]`.
    pub w1: PackedMatrix,
    /// Bias of the first product (`[gemm0 width]`, rounded to the dtype); empty for none.
    pub b0: Vec<f32>,
    /// Bias of the second product (`[hidden]`, rounded to the dtype); empty for none.
    pub b1: Vec<f32>,
}

impl PackedMlp {
    /// `e` (width `width`, hidden size `hidden`) packed in `dtype`.
    pub fn new(e: &ExpertWeights, hidden: usize, width: usize, gated: bool, dtype: Dtype) -> Self {
        let rows0 = if gated { 2 * width } else { width };
        PackedMlp {
            w0: PackedMatrix::pack(&e.w0, rows0, hidden, dtype),
            w1: PackedMatrix::pack(&e.w1, hidden, width, dtype),
            b0: e.b0.iter().map(|&v| dtype.round(v)).collect(),
            b1: e.b1.iter().map(|&v| dtype.round(v)).collect(),
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.w0.bytes() + self.w1.bytes() + 4 * (self.b0.len() + self.b1.len())
    }
}

/// Every expert MLP of a layer, packed.
#[derive(Debug)]
pub struct PackedLayer {
    /// Routed experts, by global id.
    pub experts: Vec<PackedMlp>,
    /// The shared experts fused into one MLP, when configured.
    pub shared: Option<PackedMlp>,
}

impl PackedLayer {
    /// Packs `w`'s experts for `cfg` (validated weights), experts spread over the
    /// machine's threads.
    pub fn new(w: &LayerWeights, cfg: &MoeConfig) -> Self {
        let experts = spread(&w.experts, |part| {
            part.iter().map(|e| one(e, cfg)).collect()
        });
        let shared = w.shared.as_ref().and_then(|e| shared(e, cfg));
        PackedLayer { experts, shared }
    }

    /// As [`PackedLayer::new`], taking the expert matrices out of `w` (left empty) and
    /// freeing each one once packed: the f32 and the packed copies of the whole layer
    /// never coexist.
    pub fn take(w: &mut LayerWeights, cfg: &MoeConfig) -> Self {
        let experts = spread_mut(&mut w.experts, |part| {
            part.iter_mut()
                .map(|e| {
                    let p = one(e, cfg);
                    *e = empty();
                    p
                })
                .collect()
        });
        let shared = w.shared.as_mut().and_then(|e| {
            let p = shared(e, cfg);
            *e = empty();
            p
        });
        PackedLayer { experts, shared }
    }

    /// Packs the routed experts `expert(0) ..` produces (each checked against `cfg`, and
    /// dropped once packed: at most one f32 expert per thread exists at a time) and the
    /// shared experts of `gate`.
    pub fn generate(
        gate: &LayerWeights,
        expert: &crate::reference::ExpertSource,
        cfg: &MoeConfig,
    ) -> crate::error::Result<Self> {
        let ids: Vec<usize> = (0..cfg.experts).collect();
        let experts = spread_over(&ids, packing_threads(cfg), |part| {
            part.iter()
                .map(|&e| {
                    let w = expert(e)?;
                    w.validate(cfg, e)?;
                    Ok(one(&w, cfg))
                })
                .collect()
        })
        .into_iter()
        .collect::<crate::error::Result<Vec<_>>>()?;
        let shared = gate.shared.as_ref().and_then(|e| shared(e, cfg));
        Ok(PackedLayer { experts, shared })
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.experts
            .iter()
            .chain(&self.shared)
            .map(PackedMlp::bytes)
            .sum()
    }
}

/// An expert with no matrices.
fn empty() -> ExpertWeights {
    ExpertWeights::default()
}

/// Routed expert `e` packed for `cfg`.
fn one(e: &ExpertWeights, cfg: &MoeConfig) -> PackedMlp {
    PackedMlp::new(
        e,
        cfg.hidden,
        cfg.intermediate,
        cfg.mlp.is_gated(),
        cfg.dtype,
    )
}

/// The fused shared experts `e` packed for `cfg`, when it has shared experts.
fn shared(e: &ExpertWeights, cfg: &MoeConfig) -> Option<PackedMlp> {
    let s = cfg.shared?;
    let width = s.count * s.intermediate;
    Some(PackedMlp::new(
        e,
        cfg.hidden,
        width,
        cfg.mlp.is_gated(),
        cfg.dtype,
    ))
}

/// Threads [`PackedLayer::generate`] packs with. Each holds one f32 expert while it packs
/// it: no more threads than keep those copies within a quarter of the packed layer (one,
/// for a few huge experts), nor than the machine's.
pub fn packing_threads(cfg: &MoeConfig) -> usize {
    let f32_expert = 4 * (cfg.gemm0_width() + cfg.intermediate) * cfg.hidden;
    let packed_layer = cfg.experts * f32_expert / 4 * cfg.dtype.size();
    let fit = (packed_layer / 4).checked_div(f32_expert).unwrap_or(1);
    threads().min(fit).max(1)
}
