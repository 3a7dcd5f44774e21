//! The executor's expert weights, packed once for the GEMM kernels in the layer's own
//! dtype (2 bytes per value for bf16 and f16): no f32 copy of them is kept.

use super::gemm::PackedMatrix;
use crate::config::MoeConfig;
use crate::weights::{ExpertWeights, LayerWeights};
use crate::Dtype;

/// One expert MLP (routed, or the fused shared experts), packed.
#[derive(Debug)]
pub struct PackedMlp {
    /// `[gemm0 width][hidden]`: gate rows then up rows when gated.
    pub w0: PackedMatrix,
    /// `[hidden][width]`.
    pub w1: PackedMatrix,
}

impl PackedMlp {
    /// `e` (width `width`, hidden size `hidden`) packed in `dtype`.
    pub fn new(e: &ExpertWeights, hidden: usize, width: usize, gated: bool, dtype: Dtype) -> Self {
        let rows0 = if gated { 2 * width } else { width };
        PackedMlp {
            w0: PackedMatrix::pack(&e.w0, rows0, hidden, dtype),
            w1: PackedMatrix::pack(&e.w1, hidden, width, dtype),
        }
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.w0.bytes() + self.w1.bytes()
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
        let (h, gated, dtype) = (cfg.hidden, cfg.mlp.is_gated(), cfg.dtype);
        let one = |e: &ExpertWeights| PackedMlp::new(e, h, cfg.intermediate, gated, dtype);
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = w.experts.len().div_ceil(threads).max(1);
        let experts = std::thread::scope(|s| {
            let parts: Vec<_> = w
                .experts
                .chunks(per)
                .map(|part| s.spawn(move || part.iter().map(one).collect::<Vec<_>>()))
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        });
        let shared = cfg
            .shared
            .zip(w.shared.as_ref())
            .map(|(s, e)| PackedMlp::new(e, h, s.count * s.intermediate, gated, dtype));
        PackedLayer { experts, shared }
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
