//! The activations in f32, branch-free so that a row of them vectorises (libm's `expf`
//! and `tanhf` are scalar calls and cost as much as a GEMM here).
//!
//! Same definitions as [`crate::reference::activation`]: SiLU `z * sigmoid(z)`, GELU in
//! its tanh form, written as `z * sigmoid(2 c (z + 0.044715 z^3))` (the same function:
//! `(1 + tanh y) / 2 = sigmoid(2 y)`), ReLU.

use crate::config::MlpKind;

/// `e^x` within about 2 ulp for x in [-87, 88] (clamped there): Cephes' `expf` (a
/// degree-6 polynomial on the reduced argument, times 2^n built from its bits).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and removing 1.5 * 2^23 rounds to the nearest integer (|x * log2 e| < 2^22).
    const ROUND: f32 = 12_582_912.0;
    // max / min, not clamp, which vectorises worse here; a NaN becomes -87 in the
    // exponent, and the activations still return NaN for it through their factor z.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    // t's low mantissa bits hold the integer n (plus the bits of 1.5 * 2^23).
    let ni = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * (r * r) + r + 1.0;
    // n is an integer in [-126, 127]: 2^n is the float of biased exponent n + 127.
    y * f32::from_bits((ni.wrapping_add(127) as u32) << 23)
}

/// `z * sigmoid(s * z')`, the shape of both SiLU and tanh-GELU.
#[inline(always)]
fn times_sigmoid(z: f32, y: f32) -> f32 {
    z / (1.0 + exp(-y))
}

#[inline(always)]
fn silu(z: f32) -> f32 {
    times_sigmoid(z, z)
}

#[inline(always)]
fn gelu(z: f32) -> f32 {
    const C2: f32 = 2.0 * 0.797_884_6; // 2 sqrt(2 / pi)
    times_sigmoid(z, C2 * (z + 0.044715 * z * z * z))
}

/// The activation of `z`.
#[cfg(test)]
pub fn act(kind: MlpKind, z: f32) -> f32 {
    match kind {
        MlpKind::SwiGlu => silu(z),
        MlpKind::GeGlu | MlpKind::Gelu => gelu(z),
        MlpKind::Relu => z.max(0.0),
        MlpKind::ClampedSwiGlu { .. } => {
            let (alpha, limit) = kind
                .clamp_params()
                .map_or((1.0, f32::INFINITY), |c| (c.alpha, c.limit));
            let g = z.min(limit);
            times_sigmoid(g, alpha * g)
        }
    }
}

/// `out[c] = act(z[c]) * u[c]` for gated kinds (`clamp(u[c], -limit, limit) + up_offset` in
/// place of `u[c]` for the clamped SwiGLU), `act(z[c])` otherwise (`u` unused).
/// Compiled for AVX-512 too, chosen at run time: the same IEEE operations in the same
/// order (Rust neither contracts nor reorders them), so the same bits either way.
pub fn act_row(kind: MlpKind, z: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { act_row_avx512(kind, z, u, out) };
        return;
    }
    act_row_any(kind, z, u, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn act_row_avx512(kind: MlpKind, z: &[f32], u: &[f32], out: &mut [f32]) {
    act_row_any(kind, z, u, out);
}

#[inline(always)]
fn act_row_any(kind: MlpKind, z: &[f32], u: &[f32], out: &mut [f32]) {
    let n = out.len().min(z.len());
    let (z, out) = (&z[..n], &mut out[..n]);
    match kind {
        MlpKind::SwiGlu => {
            for ((o, &z), &u) in out.iter_mut().zip(z).zip(&u[..n]) {
                *o = silu(z) * u;
            }
        }
        MlpKind::GeGlu => {
            for ((o, &z), &u) in out.iter_mut().zip(z).zip(&u[..n]) {
                *o = gelu(z) * u;
            }
        }
        MlpKind::Gelu => out.iter_mut().zip(z).for_each(|(o, &z)| *o = gelu(z)),
        MlpKind::Relu => out.iter_mut().zip(z).for_each(|(o, &z)| *o = z.max(0.0)),
        MlpKind::ClampedSwiGlu { .. } => {
            let c = kind.clamp_params().unwrap_or(crate::config::ClampParams {
                alpha: 1.0,
                limit: f32::INFINITY,
                up_offset: 0.0,
            });
            let (alpha, limit, offset) = (c.alpha, c.limit, c.up_offset);
            for ((o, &z), &u) in out.iter_mut().zip(z).zip(&u[..n]) {
                let g = z.min(limit);
                *o = times_sigmoid(g, alpha * g) * (u.max(-limit).min(limit) + offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        for i in -8700..8800 {
            let x = i as f32 * 0.01;
            let want = f64::from(x).exp();
            let got = f64::from(exp(x));
            assert!((got - want).abs() <= 3e-7 * want, "{x}: {got} vs {want}");
        }
        assert_eq!(exp(-1000.0), exp(-87.0));
        assert!(exp(1000.0).is_finite());
        for kind in [MlpKind::SwiGlu, MlpKind::Gelu] {
            assert!(act(kind, f32::NAN).is_nan(), "{kind:?}");
        }
    }

    #[test]
    fn clamped_swiglu_matches_the_reference() {
        let kind = MlpKind::clamped_swiglu(1.702, 7.0);
        let z: Vec<f32> = (0..67).map(|i| (i as f32 - 33.0) * 0.37).collect();
        let u: Vec<f32> = z.iter().rev().map(|&v| v * 0.9).collect();
        let mut out = vec![0f32; 67];
        act_row(kind, &z, &u, &mut out);
        for c in 0..67 {
            let up = f64::from(u[c]).clamp(-7.0, 7.0) + 1.0;
            let want = crate::reference::activation(kind, f64::from(z[c])) * up;
            assert!(
                (f64::from(out[c]) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{c}"
            );
            assert_eq!(act(kind, z[c]).to_bits(), {
                let g = z[c].min(7.0);
                times_sigmoid(g, 1.702 * g).to_bits()
            });
        }
    }

    #[test]
    fn clamped_silu_glu_is_silu_of_the_clamped_gate_times_the_clamped_up() {
        let kind = MlpKind::clamped_silu_glu(10.0);
        let z: Vec<f32> = (0..67).map(|i| (i as f32 - 33.0) * 0.61).collect();
        let u: Vec<f32> = z.iter().rev().map(|&v| v * 0.9).collect();
        let mut out = vec![0f32; 67];
        act_row(kind, &z, &u, &mut out);
        for c in 0..67 {
            let g = f64::from(z[c]).min(10.0);
            let want = g / (1.0 + (-g).exp()) * f64::from(u[c]).clamp(-10.0, 10.0);
            let from_ref = crate::reference::activation(kind, f64::from(z[c]))
                * f64::from(u[c]).clamp(-10.0, 10.0);
            assert!((from_ref - want).abs() <= 1e-12 * (1.0 + want.abs()), "{c}");
            assert!(
                (f64::from(out[c]) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{c}"
            );
            // `+ 0` leaves the bits of SwiGLU's product: the same as `silu(g) * u`.
            let gz = z[c].min(10.0);
            assert_eq!(
                out[c].to_bits(),
                (silu(gz) * u[c].clamp(-10.0, 10.0)).to_bits()
            );
        }
        assert_eq!(kind.name(), "clamped-silu-glu");
    }

    #[test]
    fn rows_equal_the_scalar_activation() {
        let z: Vec<f32> = (0..67).map(|i| (i as f32 - 33.0) * 0.37).collect();
        let u: Vec<f32> = (0..67).map(|i| (i as f32 * 0.11).sin()).collect();
        for kind in [
            MlpKind::SwiGlu,
            MlpKind::GeGlu,
            MlpKind::Gelu,
            MlpKind::Relu,
        ] {
            let mut out = vec![0f32; 67];
            act_row(kind, &z, &u, &mut out);
            for c in 0..67 {
                let g = act(kind, z[c]);
                let want = if kind.is_gated() { g * u[c] } else { g };
                assert_eq!(out[c].to_bits(), want.to_bits(), "{kind:?} {c}");
            }
        }
    }
}
