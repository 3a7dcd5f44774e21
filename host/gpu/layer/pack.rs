//! Host-side conversion between f32 values and the device storage dtype, and packing of
//! each rank's expert weights into the `[local expert][...]` layout the kernel reads.
//! Pure functions, tested on the CPU.

use crate::config::Dtype;
use crate::plan::LayerPlan;
use crate::weights::LayerWeights;

/// Appends `values` converted to `dtype` (round to nearest even) as little-endian bytes.
pub fn extend_dtype_bytes(out: &mut Vec<u8>, dtype: Dtype, values: &[f32]) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        Dtype::Bf16 => {
            for &v in values {
                out.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        Dtype::F16 => {
            for &v in values {
                out.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            }
        }
        Dtype::F32 => {
            for &v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// `values` converted to `dtype` bytes.
pub fn to_dtype_bytes(dtype: Dtype, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    extend_dtype_bytes(&mut out, dtype, values);
    out
}

/// Device bytes of `dtype` back to f32 (exact: every dtype value is an f32 value). A
/// trailing partial element is ignored.
pub fn from_dtype_bytes(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    }
}

/// The bit pattern of a quiet NaN in `dtype`, as a 16- or 32-bit fill value.
pub fn nan_pattern(dtype: Dtype) -> NanFill {
    match dtype {
        Dtype::Bf16 => NanFill::U16(half::bf16::NAN.to_bits()),
        Dtype::F16 => NanFill::U16(half::f16::NAN.to_bits()),
        Dtype::F32 => NanFill::U32(f32::NAN.to_bits()),
    }
}

/// A memset value for poisoning buffers with NaN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NanFill {
    /// Fill 16-bit elements with this pattern.
    U16(u16),
    /// Fill 32-bit elements with this pattern.
    U32(u32),
}

/// One rank's expert weights in device layout: `w0` is `[local][gemm0 width][hidden]`
/// (gate rows then up rows when gated), `w1` is `[local][hidden][intermediate]`, both in
/// the layer dtype, local experts in the plan's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedExperts {
    /// GEMM0 weights, bytes.
    pub w0: Vec<u8>,
    /// GEMM1 weights, bytes.
    pub w1: Vec<u8>,
    /// GEMM0 biases, f32 `[local experts][gemm0 width]` bytes; empty when no local expert
    /// has biases (a missing one is zeros).
    pub b0: Vec<u8>,
    /// GEMM1 biases, f32 `[local experts][hidden]` bytes; empty likewise.
    pub b1: Vec<u8>,
}

/// Packs the experts `plan.local_experts[rank]` of `weights` (validated against the plan's
/// config). A rank that owns no expert gets empty vectors.
pub fn pack_rank_experts(plan: &LayerPlan, weights: &LayerWeights, rank: usize) -> PackedExperts {
    let dtype = plan.config.dtype;
    let mut packed = PackedExperts {
        w0: Vec::new(),
        w1: Vec::new(),
        b0: Vec::new(),
        b1: Vec::new(),
    };
    let locals = plan.local_experts.get(rank).map_or(&[][..], Vec::as_slice);
    let experts: Vec<_> = locals
        .iter()
        .filter_map(|&e| weights.experts.get(e as usize))
        .collect();
    for ex in &experts {
        extend_dtype_bytes(&mut packed.w0, dtype, &ex.w0);
        extend_dtype_bytes(&mut packed.w1, dtype, &ex.w1);
    }
    // Biases stay f32 on the device (the kernel adds them to the f32 accumulators), each
    // rounded to the dtype first as the CPU executor stores them.
    let (w0, h) = (plan.config.gemm0_width(), plan.config.hidden);
    let bias = |b: &[f32], n: usize, out: &mut Vec<u8>| {
        let vals = (0..n).map(|i| b.get(i).map_or(0.0, |&v| dtype.round(v)));
        out.extend(vals.flat_map(f32::to_le_bytes));
    };
    if experts
        .iter()
        .any(|ex| !ex.b0.is_empty() || !ex.b1.is_empty())
    {
        for ex in &experts {
            bias(&ex.b0, w0, &mut packed.b0);
            bias(&ex.b1, h, &mut packed.b1);
        }
    }
    packed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MoeConfig, Placement};

    #[test]
    fn dtype_round_trip_is_exact_for_representable_values() {
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let vals: Vec<f32> = (-50..50).map(|i| dtype.round(i as f32 * 0.173)).collect();
            let bytes = to_dtype_bytes(dtype, &vals);
            assert_eq!(bytes.len(), vals.len() * dtype.size());
            assert_eq!(from_dtype_bytes(dtype, &bytes), vals, "{dtype:?}");
        }
    }

    #[test]
    fn conversion_rounds_like_the_dtype() {
        let v = [1.0f32 + 1.0 / 512.0, 1.234_567, -2.7e-3];
        for dtype in [Dtype::Bf16, Dtype::F16] {
            let back = from_dtype_bytes(dtype, &to_dtype_bytes(dtype, &v));
            let want: Vec<f32> = v.iter().map(|&x| dtype.round(x)).collect();
            assert_eq!(back, want);
        }
    }

    #[test]
    fn nan_patterns_decode_to_nan() {
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let bytes = match nan_pattern(dtype) {
                NanFill::U16(p) => p.to_le_bytes().to_vec(),
                NanFill::U32(p) => p.to_le_bytes().to_vec(),
            };
            assert_eq!(bytes.len(), dtype.size());
            assert!(from_dtype_bytes(dtype, &bytes)[0].is_nan(), "{dtype:?}");
        }
    }

    #[test]
    fn packing_follows_the_placement_in_local_order() {
        let mut cfg = MoeConfig::new(16, 64, 64, 6, 2);
        cfg.dtype = Dtype::F32;
        cfg.world = 2;
        cfg.placement = Placement::Map(vec![1, 0, 1, 1, 0, 1]);
        let plan = LayerPlan::new(&cfg).unwrap();
        let w = LayerWeights::random(&cfg, 7);
        for rank in 0..2 {
            let p = pack_rank_experts(&plan, &w, rank);
            let locals = &plan.local_experts[rank];
            let w0 = from_dtype_bytes(Dtype::F32, &p.w0);
            let w1 = from_dtype_bytes(Dtype::F32, &p.w1);
            let (n0, n1) = (
                cfg.gemm0_width() * cfg.hidden,
                cfg.hidden * cfg.intermediate,
            );
            assert_eq!(w0.len(), locals.len() * n0);
            assert_eq!(w1.len(), locals.len() * n1);
            for (l, &e) in locals.iter().enumerate() {
                assert_eq!(&w0[l * n0..(l + 1) * n0], &w.experts[e as usize].w0[..]);
                assert_eq!(&w1[l * n1..(l + 1) * n1], &w.experts[e as usize].w1[..]);
            }
        }
        assert!(pack_rank_experts(&plan, &w, 5).w0.is_empty());
    }
}
