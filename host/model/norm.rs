//! RMSNorm as every supported family computes it (`shared/notes/model-families.md` §4):
//! `w ⊙ to_dtype( x · rsqrt(mean(x²) + eps) )`, the mean and the scaling in f32, the
//! product with the weight in the model dtype.

use crate::config::Dtype;
use crate::error::{Error, Result};

/// The post-attention RMSNorm in front of an MoE block.
#[derive(Debug, Clone, PartialEq)]
pub struct RmsNorm {
    /// Per-channel weight `[hidden]`, already rounded to the dtype.
    pub weight: Vec<f32>,
    /// `rms_norm_eps`.
    pub eps: f32,
}

impl RmsNorm {
    /// A norm with weight 1 (what a freshly initialised model holds).
    pub fn ones(hidden: usize, eps: f32) -> Self {
        RmsNorm {
            weight: vec![1.0; hidden],
            eps,
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
        };
        let x: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
        for v in n.apply(&x, Dtype::Bf16) {
            assert_eq!(v, Dtype::Bf16.round(v));
        }
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
