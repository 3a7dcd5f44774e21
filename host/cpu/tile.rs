//! The expert MLP on tasks of at most `WIDE_ROWS` rows, tile by tile, as the device
//! computes it: weights in the dtype, f32 accumulation (the GEMM of [`super::gemm`]), the
//! activation stored in the dtype between the two GEMMs, the result rounded to the dtype.

use super::act::act_row;
use super::gemm::{gemm, Lhs};
use super::packed::PackedMlp;
use crate::config::{Dtype, MlpKind};
use crate::plan::{TILE_N, WIDE_ROWS};

/// `sum_i a[i] * b[i]` in f32 with eight partial sums (vectorisable, and more accurate
/// than one running sum).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Rounds every value of `v` to `dtype`, bit-identical to [`Dtype::round`] value by
/// value. Bf16 runs branch-free (half's round-to-nearest-even, NaNs kept quiet with
/// their high payload bits) so that the loop vectorises; f32 is already exact.
pub fn round_all(dtype: Dtype, v: &mut [f32]) {
    match dtype {
        Dtype::F32 => {}
        Dtype::Bf16 => round_all_bf16(v),
        Dtype::F16 => v.iter_mut().for_each(|x| *x = dtype.round(*x)),
    }
}

/// Every value of `v` rounded to bf16; compiled for AVX-512 too and chosen at run time
/// (integer operations: the same bits either way).
fn round_all_bf16(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { round_all_bf16_avx512(v) };
        return;
    }
    v.iter_mut().for_each(|x| *x = round_bf16(*x));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round_all_bf16_avx512(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = round_bf16(*x));
}

/// `x` rounded to bf16 and back, as `half::bf16::from_f32(x).to_f32()` computes it.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(bf16_bits(x)) << 16)
}

/// The bits of `x` rounded to bf16, as `half::bf16::from_f32(x).to_bits()` computes
/// them, branch-free.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let nan = b & 0x7fff_ffff > 0x7f80_0000;
    // Round half to even: up when the dropped half is above 0x8000, or exactly 0x8000
    // with an odd kept part (bit 16).
    let up = u32::from(b & 0x8000 != 0 && b & 0x1_7fff != 0);
    let hi = if nan {
        (b >> 16) | 0x40
    } else {
        (b >> 16) + up
    };
    hi as u16
}

/// Adds `b` to every row of `m` (rows of `b.len()` values; a trailing partial row too).
#[inline]
fn add_bias(m: &mut [f32], b: &[f32]) {
    for row in m.chunks_mut(b.len().max(1)) {
        row.iter_mut().zip(b).for_each(|(v, &c)| *v += c);
    }
}

/// One expert MLP (routed or shared) ready to run on row blocks.
pub struct TiledMlp<'a> {
    /// Activation kind.
    pub kind: MlpKind,
    /// Storage type.
    pub dtype: Dtype,
    /// Hidden size.
    pub hidden: usize,
    /// Intermediate width.
    pub width: usize,
    /// GEMM0 column tiles per row block (`width / TILE_N`; the plan's `gemm0_per_block`
    /// for routed experts).
    pub gemm0_tiles: usize,
    /// GEMM1 column tiles per row block (the plan's `gemm1_per_block`: `hidden / TILE_N`).
    pub gemm1_tiles: usize,
    /// The weights, packed in the dtype.
    pub w: &'a PackedMlp,
}

impl TiledMlp<'_> {
    /// Runs `rows <= WIDE_ROWS` rows of `x` (`[rows][hidden]`; one task: a row block or a
    /// wide task's two) through the MLP into `y` (`[rows][hidden]`, rounded to the dtype).
    /// `a` is scratch of `rows * width` at least.
    ///
    /// GEMM0 runs in `gemm0_tiles` column tiles of `TILE_N` (each covers the gate and up
    /// columns), GEMM1 in `gemm1_tiles`, as the kernel's tile tasks do.
    pub fn run_block(&self, x: &[f32], rows: usize, a: &mut [f32], y: &mut [f32]) {
        let (h, wd) = (self.hidden, self.width);
        let rows = rows.min(WIDE_ROWS);
        if rows == 0 {
            return;
        }
        let mut z = [0f32; WIDE_ROWS * TILE_N];
        let mut u = [0f32; WIDE_ROWS * TILE_N];
        let xl = Lhs::new(x, rows, h, self.w.w0.kernel());
        for tile in 0..self.gemm0_tiles.min(wd / TILE_N) {
            let n0 = tile * TILE_N;
            gemm(&xl, &self.w.w0, n0, TILE_N, &mut z, TILE_N);
            if self.kind.is_gated() {
                gemm(&xl, &self.w.w0, wd + n0, TILE_N, &mut u, TILE_N);
            }
            if !self.w.b0.is_empty() {
                add_bias(&mut z[..rows * TILE_N], &self.w.b0[n0..][..TILE_N]);
                if self.kind.is_gated() {
                    add_bias(&mut u[..rows * TILE_N], &self.w.b0[wd + n0..][..TILE_N]);
                }
            }
            for r in 0..rows {
                let out = &mut a[r * wd + n0..r * wd + n0 + TILE_N];
                let (zr, ur) = (&z[r * TILE_N..][..TILE_N], &u[r * TILE_N..][..TILE_N]);
                act_row(self.kind, zr, ur, out);
                round_all(self.dtype, out);
            }
        }
        let al = Lhs::new(a, rows, wd, self.w.w1.kernel());
        for tile in 0..self.gemm1_tiles.min(h / TILE_N) {
            let o0 = tile * TILE_N;
            gemm(&al, &self.w.w1, o0, TILE_N, &mut y[o0..], h);
        }
        if !self.w.b1.is_empty() {
            add_bias(&mut y[..rows * h], &self.w.b1[..h]);
        }
        round_all(self.dtype, &mut y[..rows * h]);
    }
}

#[cfg(test)]
mod tests {
    use super::super::act::act;
    use super::*;
    use crate::config::MoeConfig;
    use crate::reference;

    #[test]
    fn dot_matches_f64_on_uneven_lengths() {
        for n in [0usize, 1, 7, 8, 9, 64, 131] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!((f64::from(dot(&a, &b)) - want).abs() < 1e-5, "n = {n}");
        }
    }

    #[test]
    fn round_all_is_bit_identical_to_dtype_round() {
        // Every sign / exponent / high-mantissa pattern with the low halves that decide
        // the rounding (ties, just above / below, all ones), NaNs and infinities included.
        let lows = [
            0u32,
            1,
            0x7fff,
            0x8000,
            0x8001,
            0xc000,
            0xffff,
            0x1_0000 - 2,
        ];
        let bits: Vec<u32> = (0..=0xffffu32)
            .flat_map(|hi| lows.iter().map(move |lo| (hi << 16) | lo))
            .collect();
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let mut v: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            round_all(dtype, &mut v);
            for (&b, got) in bits.iter().zip(&v) {
                let want = dtype.round(f32::from_bits(b));
                assert_eq!(got.to_bits(), want.to_bits(), "{dtype:?} {b:#010x}");
            }
        }
    }

    #[test]
    fn activations_match_the_reference() {
        for kind in [
            MlpKind::SwiGlu,
            MlpKind::GeGlu,
            MlpKind::Gelu,
            MlpKind::Relu,
        ] {
            for i in -40..40 {
                let z = i as f32 * 0.25;
                let want = reference::activation(kind, f64::from(z));
                assert!(
                    (f64::from(act(kind, z)) - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{kind:?} {z}"
                );
            }
        }
    }

    #[test]
    fn a_block_equals_the_reference_mlp_in_f32() {
        for kind in [
            MlpKind::SwiGlu,
            MlpKind::GeGlu,
            MlpKind::Gelu,
            MlpKind::Relu,
        ] {
            let mut cfg = MoeConfig::new(64, 128, 64, 1, 1);
            cfg.dtype = Dtype::F32;
            cfg.mlp = kind;
            let w = crate::LayerWeights::random(&cfg, 4);
            let packed = PackedMlp::new(&w.experts[0], 128, 64, kind.is_gated(), Dtype::F32);
            // A prefill-sized block and a wide task's rows.
            for rows in [37, 100] {
                let x = crate::weights::random_tokens(&cfg, rows, 8);
                let mlp = TiledMlp {
                    kind,
                    dtype: Dtype::F32,
                    hidden: 128,
                    width: 64,
                    gemm0_tiles: 1,
                    gemm1_tiles: 2,
                    w: &packed,
                };
                let mut a = vec![0f32; WIDE_ROWS * 64];
                let mut y = vec![f32::NAN; WIDE_ROWS * 128];
                mlp.run_block(&x, rows, &mut a, &mut y);
                let want = reference::expert_mlp(&cfg, &w.experts[0], 64, &x);
                let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
                for (i, (got, want)) in y[..rows * 128].iter().zip(&want).enumerate() {
                    assert!(
                        (f64::from(*got) - want).abs() <= 1e-5 * scale,
                        "{kind:?} {rows} rows, {i}: {got} vs {want}"
                    );
                }
                assert!(
                    y[rows * 128..].iter().all(|v| v.is_nan()),
                    "rows past the block are untouched"
                );
            }
        }
    }

    #[test]
    fn a_wide_task_equals_its_two_blocks_bit_for_bit() {
        // The wide task's rows at once give the bits of its two row blocks run apart
        // (every output one chain over its row and column), in every dtype.
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            let mut cfg = MoeConfig::new(64, 128, 128, 1, 1);
            cfg.dtype = dtype;
            let w = crate::LayerWeights::random(&cfg, 5);
            let packed = PackedMlp::new(&w.experts[0], 128, 128, cfg.mlp.is_gated(), dtype);
            let mlp = TiledMlp {
                kind: cfg.mlp,
                dtype,
                hidden: 128,
                width: 128,
                gemm0_tiles: 2,
                gemm1_tiles: 2,
                w: &packed,
            };
            for rows in [97, 100, WIDE_ROWS] {
                let x = crate::weights::random_tokens(&cfg, rows, 9);
                let mut a = vec![0f32; WIDE_ROWS * 128];
                let mut wide = vec![0f32; WIDE_ROWS * 128];
                mlp.run_block(&x, rows, &mut a, &mut wide);
                let mut apart = vec![0f32; WIDE_ROWS * 128];
                let split = crate::plan::TILE_M * 128;
                mlp.run_block(&x[..split], 64, &mut a, &mut apart[..split]);
                mlp.run_block(&x[split..], rows - 64, &mut a, &mut apart[split..]);
                let bits = |v: &[f32]| {
                    v[..rows * 128]
                        .iter()
                        .map(|f| f.to_bits())
                        .collect::<Vec<_>>()
                };
                assert!(bits(&wide) == bits(&apart), "{dtype:?} {rows} rows");
            }
        }
    }
}
