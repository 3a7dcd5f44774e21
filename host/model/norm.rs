//! RMSNorm as every supported family computes it (`shared/notes/model-families.md` §4):
//! `w ⊙ to_dtype( x · rsqrt(mean(x²) + eps) )`, the mean and the scaling in f32, the
//! product with the weight in the model dtype; and PhiMoE's LayerNorm (a bias present):
//! `to_dtype( (x - mean) · rsqrt(var + eps) ⊙ w + b )`, rounded once.

use crate::config::Dtype;
use crate::error::{Error, Result};

/// The post-attention RMSNorm in front of an MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct RmsNorm {
    /// Per-channel weight `[hidden]`, already rounded to the dtype.
    pub weight: Vec<f32>,
    /// `rms_norm_eps`.
    pub eps: f32,
    /// LayerNorm's bias `[hidden]` (PhiMoE): present, the norm is a LayerNorm (mean
    /// subtracted, biased); `None` for RMSNorm.
    pub bias: Option<Vec<f32>>,
}

impl RmsNorm {
    /// A norm with weight 1 (what a freshly initialised model holds).
    pub fn ones(hidden: usize, eps: f32) -> Self {
        RmsNorm {
            weight: vec![1.0; hidden],
            eps,
            bias: None,
        }
    }

    /// Checks the weight length and that weight and eps are finite (eps > 0).
    pub fn validate(&self, hidden: usize) -> Result<()> {
        if self.weight.len() != hidden {
            return Err(Error::input(
                "norm.weight",
                format!("has {} values, hidden = {hidden}", self.weight.len()),
            ));
        }
        if let Some(i) = self.weight.iter().position(|w| !w.is_finite()) {
            return Err(Error::input(
                "norm.weight",
                format!("value {i} is not finite"),
            ));
        }
        if let Some(b) = &self.bias {
            if b.len() != hidden {
                return Err(Error::input(
                    "norm.bias",
                    format!("has {} values, hidden = {hidden}", b.len()),
                ));
            }
            if let Some(i) = b.iter().position(|v| !v.is_finite()) {
                return Err(Error::input(
                    "norm.bias",
                    format!("value {i} is not finite"),
                ));
            }
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::input(
                "norm.eps",
                format!("{} must be finite and > 0", self.eps),
            ));
        }
        Ok(())
    }

    /// Normalises `x` (`rows * hidden` values, `hidden = weight.len()`), rounding as the
    /// model dtype does: the normalised row is cast to `dtype`, then multiplied by the
    /// weight and cast again. The mean of squares is accumulated in f64 and used in f32.
    pub fn apply(&self, x: &[f32], dtype: Dtype) -> Vec<f32> {
        let hidden = self.weight.len();
        let mut out = Vec::with_capacity(x.len());
        if hidden == 0 {
            return out;
        }
        if let Some(bias) = &self.bias {
            for row in x.chunks(hidden) {
                self.layer_norm_row(row, bias, dtype, &mut out);
            }
            return out;
        }
        for row in x.chunks(hidden) {
            let ms = row
                .iter()
                .map(|&v| f64::from(v) * f64::from(v))
                .sum::<f64>()
                / hidden as f64;
            let r = 1.0 / (ms as f32 + self.eps).sqrt();
            out.extend(
                row.iter()
                    .zip(&self.weight)
                    .map(|(&v, &w)| dtype.round(w * dtype.round(v * r))),
            );
        }
        out
    }
}

impl RmsNorm {
    /// One LayerNorm row: mean and variance accumulated in f64, used in f32.
    fn layer_norm_row(&self, row: &[f32], bias: &[f32], dtype: Dtype, out: &mut Vec<f32>) {
        let n = row.len().max(1) as f64;
        let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|&v| (f64::from(v) - mean) * (f64::from(v) - mean))
            .sum::<f64>()
            / n;
        let r = 1.0 / (var as f32 + self.eps).sqrt();
        let mean = mean as f32;
        out.extend(
            row.iter()
                .zip(&self.weight)
                .zip(bias)
                .map(|((&v, &w), &b)| dtype.round((v - mean) * r * w + b)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_weight_gives_unit_rms() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 - 60.0) * 0.37).collect();
        let n = RmsNorm::ones(64, 1e-6);
        let y = n.apply(&x, Dtype::F32);
        for row in y.chunks(64) {
            let rms = (row.iter().map(|v| v * v).sum::<f32>() / 64.0).sqrt();
            assert!((rms - 1.0).abs() < 1e-4, "rms {rms}");
        }
    }

    #[test]
    fn weight_scales_channels_and_eps_damps_small_rows() {
        let mut n = RmsNorm::ones(64, 1e-6);
        n.weight[3] = 2.0;
        let x = vec![0.5f32; 64];
        let y = n.apply(&x, Dtype::F32);
        assert!((y[0] - 1.0).abs() < 1e-5 && (y[3] - 2.0).abs() < 1e-5);
        // A row far below sqrt(eps) is damped, not blown up.
        let n = RmsNorm::ones(64, 1.0);
        let y = n.apply(&[1e-3f32; 64], Dtype::F32);
        assert!(y[0] < 2e-3);
    }

    #[test]
    fn bf16_output_is_representable() {
        let n = RmsNorm {
            weight: (0..64)
                .map(|i| Dtype::Bf16.round(1.0 + i as f32 / 100.0))
                .collect(),
            eps: 1e-5,
            bias: None,
        };
        let x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        for v in n.apply(&x, Dtype::Bf16) {
            assert_eq!(v, Dtype::Bf16.round(v));
        }
    }

    #[test]
    fn layer_norm_centres_scales_and_biases() {
        let mut n = RmsNorm::ones(4, 1e-6);
        n.bias = Some(vec![0.5; 4]);
        let y = n.apply(&[1.0, 2.0, 3.0, 4.0], Dtype::F32);
        // mean 2.5, var 1.25: (x - 2.5) / sqrt(1.25) + 0.5.
        for (v, x) in y.iter().zip([1.0f32, 2.0, 3.0, 4.0]) {
            let want = (x - 2.5) / 1.25f32.sqrt() + 0.5;
            assert!((v - want).abs() < 1e-5, "{v} vs {want}");
        }
        n.bias = Some(vec![0.5; 3]);
        assert!(matches!(
            n.validate(4),
            Err(Error::InvalidInput {
                field: "norm.bias",
                ..
            })
        ));
    }

    #[test]
    fn validate_names_the_field() {
        let n = RmsNorm::ones(32, 1e-5);
        assert!(matches!(
            n.validate(64),
            Err(Error::InvalidInput {
                field: "norm.weight",
                ..
            })
        ));
        let n = RmsNorm::ones(64, 0.0);
        assert!(matches!(
            n.validate(64),
            Err(Error::InvalidInput {
                field: "norm.eps",
                ..
            })
        ));
        RmsNorm::ones(64, 1e-5).validate(64).unwrap();
    }
}
