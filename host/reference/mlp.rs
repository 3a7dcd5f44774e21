//! The expert MLP in f64.

use crate::config::{MlpKind, MoeConfig};
use crate::weights::ExpertWeights;

/// The activation of an MLP kind: silu for SwiGLU, GELU (tanh approximation) for GeGLU
/// and GELU, `max(z, 0)` for ReLU; for the clamped SwiGLU, the gate's factor
/// `g * sigmoid(alpha g)` with `g = min(z, limit)`.
pub fn activation(kind: MlpKind, z: f64) -> f64 {
    match kind {
        MlpKind::SwiGlu => z / (1.0 + (-z).exp()),
        MlpKind::ClampedSwiGlu { .. } => {
            let (alpha, limit) = kind
                .clamp_params()
                .map_or((1.0, f32::INFINITY), |c| (c.alpha, c.limit));
            let g = z.min(f64::from(limit));
            g / (1.0 + (-f64::from(alpha) * g).exp())
        }
        MlpKind::GeGlu | MlpKind::Gelu => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * z * (1.0 + (c * (z + 0.044715 * z * z * z)).tanh())
        }
        MlpKind::Relu => z.max(0.0),
    }
}

/// One expert MLP of intermediate size `width` applied to the rows of `x`
/// (`[rows][hidden]`), returning `[rows][hidden]` in f64.
///
/// Gated: `a = act(x Wg^T) * (x Wu^T)` where `w0` holds the `width` gate rows then the
/// `width` up rows; plain: `a = act(x W0^T)`; then `y = a W1^T`. The biases `b0` and
/// `b1`, when present, are added to the products before the activation and to `y`; the
/// clamped SwiGLU multiplies by `clamp(up, -limit, limit) + up_offset` instead of `up`. Sums are in f64; `a` is
/// stored as f32 between the two products (the reference's storage type).
///
/// Never panics: weights are not checked here (see [`crate::LayerWeights::validate`]), a
/// weight row missing from a too-short tensor counts as zeros, and a trailing partial row
/// of `x` is ignored.
pub fn expert_mlp(cfg: &MoeConfig, w: &ExpertWeights, width: usize, x: &[f32]) -> Vec<f64> {
    let h = cfg.hidden;
    let rows = x.len().checked_div(h).unwrap_or(0);
    let mut y = vec![0f64; rows * h];
    let mut a = vec![0f32; width];
    for (xr, yr) in x.chunks_exact(h).zip(y.chunks_exact_mut(h)) {
        for (an, v) in a.iter_mut().zip(expert_activation(cfg, w, width, xr)) {
            *an = v as f32;
        }
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo = super::dot64(&a, row(&w.w1, o, width)) + bias(&w.b1, o);
        }
    }
    y
}

/// The activation between an expert's two products for one token row `xr` (`hidden`
/// values): `width` values in f64, `act(x Wg^T) * (x Wu^T)` (gated) or `act(x W0^T)`.
/// What the stage checks compare the GEMM0 outputs with.
pub fn expert_activation(cfg: &MoeConfig, w: &ExpertWeights, width: usize, xr: &[f32]) -> Vec<f64> {
    let h = cfg.hidden;
    (0..width)
        .map(|n| {
            let z0 = super::dot64(xr, row(&w.w0, n, h)) + bias(&w.b0, n);
            if cfg.mlp.is_gated() {
                let up = super::dot64(xr, row(&w.w0, width + n, h)) + bias(&w.b0, width + n);
                let up = match cfg.mlp.clamp_params() {
                    Some(c) => {
                        let l = f64::from(c.limit);
                        up.max(-l).min(l) + f64::from(c.up_offset)
                    }
                    None => up,
                };
                activation(cfg.mlp, z0) * up
            } else {
                activation(cfg.mlp, z0)
            }
        })
        .collect()
}

/// Value `i` of a bias, 0 when there is none (or it is too short).
fn bias(b: &[f32], i: usize) -> f64 {
    b.get(i).map_or(0.0, |&v| f64::from(v))
}

/// Row `i` of a row-major matrix with rows of `n` values, or an empty slice past its end.
fn row(m: &[f32], i: usize, n: usize) -> &[f32] {
    m.get(i * n..(i + 1) * n).unwrap_or(&[])
}
