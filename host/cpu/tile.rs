//! The expert MLP on blocks of at most `TILE_M` rows, tile by tile, in f32 as the device
//! computes it: f32 accumulation, the activation stored in the dtype between the two
//! GEMMs, the result rounded to the dtype.

use crate::config::{Dtype, MlpKind};
use crate::plan::{TILE_M, TILE_N};
use crate::weights::ExpertWeights;

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
        Dtype::Bf16 => v.iter_mut().for_each(|x| *x = round_bf16(*x)),
        Dtype::F16 => v.iter_mut().for_each(|x| *x = dtype.round(*x)),
    }
}

/// `x` rounded to bf16 and back, as `half::bf16::from_f32(x).to_f32()` computes it.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
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
    f32::from_bits(hi << 16)
}

/// The activation in f32 (same definitions as [`crate::reference::activation`]).
pub fn act(kind: MlpKind, z: f32) -> f32 {
    match kind {
        MlpKind::SwiGlu => z / (1.0 + (-z).exp()),
        MlpKind::GeGlu | MlpKind::Gelu => {
            const C: f32 = 0.797_884_6; // sqrt(2 / pi)
            0.5 * z * (1.0 + (C * (z + 0.044715 * z * z * z)).tanh())
        }
        MlpKind::Relu => z.max(0.0),
    }
}

/// `[x0.w0, x0.w1, x1.w0, x1.w1]` over the common length, in f32 with eight partial sums
/// per product: a 2 x 2 register block that loads each operand once for two products.
///
/// Lane `i` of product `(r, c)` accumulates elements `i, i + 8, ...` in order (a multiply,
/// then an add: Rust never contracts them into an FMA), and the lanes fold exactly as in
/// [`dot`], so every product is bit-identical to `dot` of the same rows, whatever block
/// it is computed in. The body runs on whole `[f32; 8]` chunks so that it compiles to
/// plain vector loads, multiplies and adds (two SSE registers per accumulator on x86-64
/// baseline, one with AVX) without bounds checks or shuffles.
fn dot2x2(x0: &[f32], x1: &[f32], w0: &[f32], w1: &[f32]) -> [f32; 4] {
    let n = x0.len().min(x1.len()).min(w0.len()).min(w1.len());
    let body = n - n % 8;
    let mut a00 = [0f32; 8];
    let mut a01 = [0f32; 8];
    let mut a10 = [0f32; 8];
    let mut a11 = [0f32; 8];
    let chunks = blocks8(&x0[..body])
        .zip(blocks8(&x1[..body]))
        .zip(blocks8(&w0[..body]))
        .zip(blocks8(&w1[..body]));
    for (((p, q), r), s) in chunks {
        for i in 0..8 {
            a00[i] += p[i] * r[i];
        }
        for i in 0..8 {
            a01[i] += p[i] * s[i];
        }
        for i in 0..8 {
            a10[i] += q[i] * r[i];
        }
        for i in 0..8 {
            a11[i] += q[i] * s[i];
        }
    }
    let f = fold4(&[a00, a01, a10, a11]);
    let tail = |x: &[f32], w: &[f32]| -> f32 {
        x[body..n].iter().zip(&w[body..n]).map(|(p, q)| p * q).sum()
    };
    [
        f[0] + tail(x0, w0),
        f[1] + tail(x0, w1),
        f[2] + tail(x1, w0),
        f[3] + tail(x1, w1),
    ]
}

/// `v` as whole `[f32; 8]` chunks (the remainder left out).
fn blocks8(v: &[f32]) -> impl Iterator<Item = &[f32; 8]> {
    // Every chunk has 8 elements, so no chunk is filtered out; the fixed size lets
    // the compiler drop every bounds check of the lanes.
    v.chunks_exact(8)
        .filter_map(|c| <&[f32; 8]>::try_from(c).ok())
}

/// Four sets of eight partial sums, each folded as [`dot`] folds them:
/// `((v0 + v4) + (v1 + v5)) + ((v2 + v6) + (v3 + v7))`.
///
/// Kept out of line on purpose: inlined, this fold's lane pairing leads LLVM's SLP
/// vectoriser to regroup the accumulators of [`dot2x2`]'s loop across registers, which
/// costs about three shuffles per multiply there (checked in the release assembly).
#[inline(never)]
fn fold4(v: &[[f32; 8]; 4]) -> [f32; 4] {
    let f = |v: &[f32; 8]| ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
    [f(&v[0]), f(&v[1]), f(&v[2]), f(&v[3])]
}

/// Weight rows per cache block of [`gemm_nt`]: 8 rows of up to 512 f32 (16 KiB) stay in
/// L1 while every row pair of `x` passes over them, so `x` is streamed from L2 once per
/// 8 columns instead of once per 2.
const COL_BLOCK: usize = 8;

/// `out[r * ldo + c] = x_r . w_(col0 + c)` for `rows` rows of `x` (`[rows][k]`) and the
/// `ncols` weight rows from `col0` of `w` (`[*][k]`), in 2 x 2 blocks (each product
/// bit-identical to [`dot`], whatever the blocking).
#[allow(clippy::too_many_arguments)]
fn gemm_nt(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    col0: usize,
    ncols: usize,
    out: &mut [f32],
    ldo: usize,
) {
    if rows == 0 || ncols == 0 {
        return;
    }
    let xrow = |r: usize| &x[r * k..(r + 1) * k];
    let wrow = |c: usize| &w[(col0 + c) * k..(col0 + c + 1) * k];
    for cb in (0..ncols).step_by(COL_BLOCK) {
        let ce = (cb + COL_BLOCK).min(ncols);
        for r0 in (0..rows).step_by(2) {
            // Past the edges the last row / column is repeated and its result discarded.
            let r1 = (r0 + 1).min(rows - 1);
            let (x0, x1) = (xrow(r0), xrow(r1));
            for c0 in (cb..ce).step_by(2) {
                let c1 = (c0 + 1).min(ncols - 1);
                let d = dot2x2(x0, x1, wrow(c0), wrow(c1));
                out[r0 * ldo + c0] = d[0];
                out[r1 * ldo + c0] = d[2];
                out[r0 * ldo + c1] = d[1];
                out[r1 * ldo + c1] = d[3];
            }
        }
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
    /// The weights.
    pub w: &'a ExpertWeights,
}

impl TiledMlp<'_> {
    /// Runs `rows <= TILE_M` rows of `x` (`[rows][hidden]`) through the MLP into `y`
    /// (`[rows][hidden]`, rounded to the dtype). `a` is scratch of `TILE_M * width`.
    ///
    /// GEMM0 runs in `gemm0_tiles` column tiles of `TILE_N` (each covers the gate and up
    /// columns), GEMM1 in `gemm1_tiles`, as the kernel's tile tasks do.
    pub fn run_block(&self, x: &[f32], rows: usize, a: &mut [f32], y: &mut [f32]) {
        let (h, wd) = (self.hidden, self.width);
        let rows = rows.min(TILE_M);
        if rows == 0 {
            return;
        }
        let mut z = [0f32; TILE_M * TILE_N];
        let mut u = [0f32; TILE_M * TILE_N];
        for tile in 0..self.gemm0_tiles.min(wd / TILE_N) {
            let n0 = tile * TILE_N;
            gemm_nt(x, rows, h, &self.w.w0, n0, TILE_N, &mut z, TILE_N);
            if self.kind.is_gated() {
                gemm_nt(x, rows, h, &self.w.w0, wd + n0, TILE_N, &mut u, TILE_N);
            }
            for r in 0..rows {
                let out = &mut a[r * wd + n0..r * wd + n0 + TILE_N];
                for (c, o) in out.iter_mut().enumerate() {
                    let g = act(self.kind, z[r * TILE_N + c]);
                    *o = if self.kind.is_gated() {
                        g * u[r * TILE_N + c]
                    } else {
                        g
                    };
                }
                round_all(self.dtype, out);
            }
        }
        for tile in 0..self.gemm1_tiles.min(h / TILE_N) {
            let o0 = tile * TILE_N;
            gemm_nt(a, rows, wd, &self.w.w1, o0, TILE_N, &mut y[o0..], h);
        }
        round_all(self.dtype, &mut y[..rows * h]);
    }
}

#[cfg(test)]
mod tests {
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
    fn gemm_nt_handles_odd_edges() {
        for (rows, ncols, k) in [(1, 1, 1), (3, 5, 13), (2, 2, 8), (7, 3, 64), (64, 64, 67)] {
            let x: Vec<f32> = (0..rows * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
            let w: Vec<f32> = (0..(ncols + 2) * k)
                .map(|i| ((i * 5) % 9) as f32 - 4.0)
                .collect();
            let ldo = ncols + 3;
            let mut out = vec![f32::NAN; rows * ldo];
            gemm_nt(&x, rows, k, &w, 2, ncols, &mut out, ldo);
            for r in 0..rows {
                for c in 0..ldo {
                    let got = out[r * ldo + c];
                    if c < ncols {
                        let want: f32 = (0..k).map(|i| x[r * k + i] * w[(2 + c) * k + i]).sum();
                        // Small integers: every partial sum is exact in f32.
                        assert_eq!(got, want, "rows {rows} cols {ncols} k {k} at ({r}, {c})");
                    } else {
                        assert!(got.is_nan(), "({r}, {c}) is outside the output");
                    }
                }
            }
        }
    }

    #[test]
    fn gemm_nt_is_bit_identical_to_dot_whatever_the_block() {
        // Every product of a 2 x 2 block (and of a repeated edge row / column) must be
        // the very bits `dot` gives for the same two rows: results then do not depend on
        // how rows are split into blocks or over threads.
        let mut seed = 0x9e37_79b9_u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            (seed as f32 / u32::MAX as f32) * 2.0 - 1.0
        };
        for (rows, ncols, k) in [
            (1, 1, 5),
            (3, 5, 13),
            (4, 4, 64),
            (5, 3, 256),
            (2, 7, 131),
            (7, 19, 40),
        ] {
            let x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
            let w: Vec<f32> = (0..(ncols + 1) * k).map(|_| next()).collect();
            let mut out = vec![f32::NAN; rows * ncols];
            gemm_nt(&x, rows, k, &w, 1, ncols, &mut out, ncols);
            for r in 0..rows {
                for c in 0..ncols {
                    let want = dot(&x[r * k..(r + 1) * k], &w[(1 + c) * k..(2 + c) * k]);
                    assert_eq!(
                        out[r * ncols + c].to_bits(),
                        want.to_bits(),
                        "rows {rows} cols {ncols} k {k} at ({r}, {c})"
                    );
                }
            }
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
            let rows = 37;
            let x = crate::weights::random_tokens(&cfg, rows, 8);
            let mlp = TiledMlp {
                kind,
                dtype: Dtype::F32,
                hidden: 128,
                width: 64,
                gemm0_tiles: 1,
                gemm1_tiles: 2,
                w: &w.experts[0],
            };
            let mut a = vec![0f32; TILE_M * 64];
            let mut y = vec![f32::NAN; TILE_M * 128];
            mlp.run_block(&x, rows, &mut a, &mut y);
            let want = reference::expert_mlp(&cfg, &w.experts[0], 64, &x);
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (i, (got, want)) in y[..rows * 128].iter().zip(&want).enumerate() {
                assert!(
                    (f64::from(*got) - want).abs() <= 1e-5 * scale,
                    "{kind:?} {i}: {got} vs {want}"
                );
            }
            assert!(
                y[rows * 128..].iter().all(|v| v.is_nan()),
                "rows past the block are untouched"
            );
        }
    }
}
