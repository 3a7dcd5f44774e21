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
    /// The weights.
    pub w: &'a ExpertWeights,
}

impl TiledMlp<'_> {
    /// Runs `rows <= TILE_M` rows of `x` (`[rows][hidden]`) through the MLP into `y`
    /// (`[rows][hidden]`, rounded to the dtype). `a` is scratch of `TILE_M * width`.
    ///
    /// GEMM0 runs in `width / TILE_N` column tiles (each covers the gate and up columns),
    /// GEMM1 in `hidden / TILE_N` column tiles, as the kernel's tile tasks do.
    pub fn run_block(&self, x: &[f32], rows: usize, a: &mut [f32], y: &mut [f32]) {
        let (h, wd) = (self.hidden, self.width);
        let rows = rows.min(TILE_M);
        let gated = self.kind.is_gated();
        for tile in 0..wd / TILE_N {
            for n in tile * TILE_N..(tile + 1) * TILE_N {
                let wg = &self.w.w0[n * h..(n + 1) * h];
                let wu = if gated {
                    &self.w.w0[(wd + n) * h..(wd + n + 1) * h]
                } else {
                    wg
                };
                for r in 0..rows {
                    let xr = &x[r * h..(r + 1) * h];
                    let z = dot(xr, wg);
                    let v = if gated {
                        act(self.kind, z) * dot(xr, wu)
                    } else {
                        act(self.kind, z)
                    };
                    a[r * wd + n] = self.dtype.round(v);
                }
            }
        }
        for tile in 0..h / TILE_N {
            for o in tile * TILE_N..(tile + 1) * TILE_N {
                let w1 = &self.w.w1[o * wd..(o + 1) * wd];
                for r in 0..rows {
                    y[r * h + o] = self.dtype.round(dot(&a[r * wd..(r + 1) * wd], w1));
                }
            }
        }
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
