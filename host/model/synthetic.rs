//! Random models with a realistic router: expert popularity follows a Zipf law.
//!
//! Uniformly random router weights spread tokens almost evenly over the experts, which
//! real routers do not: a few experts are popular, many are rarely chosen. A synthetic
//! layer therefore carries a per-expert additive logit bias `b_e = -s · ln(rank_e)`, with
//! `rank_e` (1-based) a random permutation of the experts per layer and `s` the Zipf
//! exponent. With a softmax router this multiplies each expert's probability by
//! `rank_e^-s` before normalisation, i.e. a Zipf prior of exponent `s` on top of the
//! token-dependent logits; with the sigmoid router it shifts the logit before the sigmoid.
//! `s = 0` gives the unbiased router. The bias is passed to the router on every forward
//! (`RouteOverrides::logit_bias`), so the weights themselves stay plain random weights.
//!
//! Presets use the same names and layer shapes as the bench (`tiny`, `flashmoe-paper`,
//! `mixtral-8x7b`, `qwen3-30b-a3b`, `olmoe-1b-7b`, `deepseek-v3`), with the layer count
//! and tokens given by the caller.

use super::norm::RmsNorm;
use super::ModelLayer;
use crate::config::{Dtype, MoeConfig, Placement};
use crate::error::{Error, Result};
use crate::weights::{random_tokens, LayerWeights};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::Arc;

/// Preset names, as the bench spells them.
pub const PRESETS: [&str; 6] = crate::presets::NAMES;

/// Default cap on the host memory a synthetic model's weights may take (8 GiB).
pub const DEFAULT_MAX_HOST_BYTES: u64 = 8 << 30;

/// The layer shape of a preset (single rank; tokens, world and placement set by the
/// caller), from the shared preset table [`crate::presets`].
pub fn preset_config(name: &str) -> Result<MoeConfig> {
    Ok(crate::presets::preset(name)?.config)
}

/// Everything that defines a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticSpec {
    /// The config every layer uses.
    pub config: MoeConfig,
    /// Number of MoE layers.
    pub layers: usize,
    /// Zipf exponent of expert popularity (0 = unbiased router; 1 to 1.2 is typical of
    /// trained routers on a narrow input distribution).
    pub zipf: f64,
    /// Seed of weights, norms and popularity orders.
    pub seed: u64,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Refuse to build when the weights would take more host memory than this.
    pub max_host_bytes: u64,
}

impl SyntheticSpec {
    /// A spec for `layers` layers of `config`, Zipf exponent 1.0, seed 0, eps 1e-6.
    pub fn new(config: MoeConfig, layers: usize) -> Self {
        SyntheticSpec {
            config,
            layers,
            zipf: 1.0,
            seed: 0,
            eps: 1e-6,
            max_host_bytes: DEFAULT_MAX_HOST_BYTES,
        }
    }

    /// A spec from a preset name, with `layers` layers of `tokens` tokens per rank.
    pub fn preset(name: &str, layers: usize, tokens: usize) -> Result<Self> {
        let config = MoeConfig {
            tokens,
            ..preset_config(name)?
        };
        Ok(SyntheticSpec::new(config, layers))
    }

    /// Sets world size and placement (builder style).
    pub fn with_world(mut self, world: usize, placement: Placement) -> Self {
        self.config.world = world;
        self.config.placement = placement;
        self
    }

    /// Sets the dtype (builder style).
    pub fn with_dtype(mut self, dtype: Dtype) -> Self {
        self.config.dtype = dtype;
        self
    }

    /// Host bytes of all layers' weights as f32 (the form the host keeps them in).
    pub fn host_bytes(&self) -> u64 {
        // Each layer: its weights, plus the norm weight.
        let norm = 4 * self.config.hidden as u64;
        crate::weights::LayerWeights::host_bytes(&self.config)
            .saturating_add(norm)
            .saturating_mul(self.layers as u64)
    }

    /// Builds the layers (indices 0..layers).
    pub fn build(&self) -> Result<Vec<ModelLayer>> {
        if self.layers == 0 || self.layers > super::MAX_LAYERS {
            return Err(Error::config(
                "layers",
                self.layers,
                format!("between 1 and {}", super::MAX_LAYERS),
            ));
        }
        if !self.zipf.is_finite() || self.zipf < 0.0 {
            return Err(Error::config("zipf", self.zipf, "finite and >= 0"));
        }
        if !self.eps.is_finite() || self.eps <= 0.0 {
            return Err(Error::config("eps", self.eps, "finite and > 0"));
        }
        self.config.validate()?;
        let bytes = self.host_bytes();
        if bytes > self.max_host_bytes {
            return Err(Error::PlanTooLarge {
                what: format!(
                    "synthetic model weights: {bytes} bytes of host memory for {} layers, \
                     max_host_bytes = {} (use fewer layers or a smaller preset)",
                    self.layers, self.max_host_bytes
                ),
            });
        }
        let mut rng = StdRng::seed_from_u64(self.seed);
        let mut layers = Vec::with_capacity(self.layers);
        for l in 0..self.layers {
            let weights = LayerWeights::random(&self.config, rng.random());
            let dtype = self.config.dtype;
            let norm = RmsNorm {
                weight: (0..self.config.hidden)
                    .map(|_| dtype.round(1.0 + rng.random_range(-0.1f32..0.1)))
                    .collect(),
                eps: self.eps,
                bias: None,
            };
            let logit_bias = (self.zipf > 0.0)
                .then(|| zipf_logit_bias(self.config.experts, self.zipf, &mut rng));
            let layer = ModelLayer {
                index: l,
                config: self.config.clone(),
                weights: Arc::new(weights),
                norm,
                logit_bias,
                hash_table: None,
            };
            layer.validate()?;
            layers.push(layer);
        }
        Ok(layers)
    }

    /// Random input rows for every rank (`tokens` each), rounded to the dtype.
    pub fn inputs(&self, tokens: usize, seed: u64) -> Vec<Vec<f32>> {
        (0..self.config.world)
            .map(|r| random_tokens(&self.config, tokens, seed.wrapping_add(r as u64)))
            .collect()
    }
}

/// `b_e = -s · ln(rank_e)` for a random popularity order (rank 1 = most popular).
pub fn zipf_logit_bias(experts: usize, exponent: f64, rng: &mut impl Rng) -> Vec<f32> {
    let mut ranks: Vec<usize> = (1..=experts).collect();
    ranks.shuffle(rng);
    ranks
        .into_iter()
        .map(|r| (-exponent * (r as f64).ln()) as f32)
        .collect()
}

#[cfg(test)]
mod tests;
