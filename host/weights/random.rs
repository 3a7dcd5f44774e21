//! Random layer weights and tokens, deterministic in a seed. Each part of a layer (the
//! gate part: router, bias, shared experts; and each routed expert) has its own random
//! stream, so one expert can be generated alone, with the values [`LayerWeights::random`]
//! gives it: large layers can then be checked and packed one expert at a time.

use super::{ExpertWeights, LayerWeights};
use crate::config::MoeConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn fill(rng: &mut StdRng, n: usize, scale: f32, round: impl Fn(f32) -> f32) -> Vec<f32> {
    (0..n)
        .map(|_| round(rng.random_range(-scale..scale)))
        .collect()
}

/// The random stream of part `part` (0: the gate part, 1 + e: routed expert e).
fn stream(seed: u64, part: u64) -> StdRng {
    // Distinct parts get unrelated seeds (splitmix64 of the pair).
    let mut z = seed ^ part.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    StdRng::seed_from_u64(z ^ (z >> 31))
}

/// A random MLP of `width` (rounded to the dtype), with biases when asked.
fn mlp(cfg: &MoeConfig, rng: &mut StdRng, width: usize, with_bias: bool) -> ExpertWeights {
    let round = |x: f32| cfg.dtype.round(x);
    let h = cfg.hidden;
    let w0_rows = if cfg.mlp.is_gated() { 2 * width } else { width };
    let w0 = fill(rng, w0_rows * h, 1.0 / (h as f32).sqrt(), round);
    let w1 = fill(rng, h * width, 1.0 / (width as f32).sqrt(), round);
    let (b0, b1) = if with_bias {
        (fill(rng, w0_rows, 0.2, round), fill(rng, h, 0.2, round))
    } else {
        (Vec::new(), Vec::new())
    };
    ExpertWeights { w0, w1, b0, b1 }
}

impl LayerWeights {
    /// Random weights with fan-in scaling, deterministic in `seed`: the gate part of
    /// [`LayerWeights::random_gate`] and every expert of [`LayerWeights::random_expert`].
    /// The experts are generated on all of the machine's threads (each has its own
    /// stream, so the values do not depend on the thread count): a serial loop took most
    /// of a GPU bench step's budget on the large presets.
    pub fn random(cfg: &MoeConfig, seed: u64) -> Self {
        let mut w = Self::random_gate(cfg, seed);
        w.experts = random_experts(cfg, seed);
        w
    }

    /// The router, its bias, the shared experts and their gate of
    /// [`LayerWeights::random`]; the routed experts are left empty (one empty
    /// [`ExpertWeights`] per expert).
    pub fn random_gate(cfg: &MoeConfig, seed: u64) -> Self {
        let mut rng = stream(seed, 0);
        let h = cfg.hidden;
        let s_in = 1.0 / (h as f32).sqrt();
        let round = |x: f32| cfg.dtype.round(x);
        let router = if cfg.router_f32 {
            fill(&mut rng, cfg.experts * h, s_in, |x| x)
        } else {
            fill(&mut rng, cfg.experts * h, s_in, round)
        };
        let router_bias = if cfg.router.has_bias() {
            fill(&mut rng, cfg.experts, 0.5, |x| x)
        } else {
            Vec::new()
        };
        let shared = cfg
            .shared
            .map(|s| mlp(cfg, &mut rng, s.count * s.intermediate, false));
        let shared_gate = cfg
            .shared
            .filter(|s| s.gated)
            .map(|_| fill(&mut rng, h, s_in, round));
        LayerWeights {
            router,
            router_bias,
            experts: vec![ExpertWeights::default(); cfg.experts],
            shared,
            shared_gate,
        }
    }

    /// Routed expert `e` of [`LayerWeights::random`]. gpt-oss's clamped SwiGLU comes with
    /// expert biases: the random routed experts get them too, so that every path that adds
    /// them is exercised.
    pub fn random_expert(cfg: &MoeConfig, seed: u64, e: usize) -> ExpertWeights {
        let mut rng = stream(seed, 1 + e as u64);
        mlp(
            cfg,
            &mut rng,
            cfg.intermediate,
            cfg.mlp.clamp_params().is_some(),
        )
    }
}

/// Every routed expert of [`LayerWeights::random`], in order, on the machine's threads.
fn random_experts(cfg: &MoeConfig, seed: u64) -> Vec<ExpertWeights> {
    let ids: Vec<usize> = (0..cfg.experts).collect();
    crate::par::map_in_order(&ids, |&e| LayerWeights::random_expert(cfg, seed, e))
}

/// Random token rows in [-1, 1), rounded to the dtype; `tokens * hidden` values.
pub fn random_tokens(cfg: &MoeConfig, tokens: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    fill(&mut rng, tokens * cfg.hidden, 1.0, |x| cfg.dtype.round(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_expert_alone_has_the_values_of_the_whole_layer() {
        let cfg = MoeConfig::new(4, 64, 64, 5, 2);
        let w = LayerWeights::random(&cfg, 9);
        assert_eq!(LayerWeights::random_expert(&cfg, 9, 3), w.experts[3]);
        assert_ne!(w.experts[2], w.experts[3]);
        let g = LayerWeights::random_gate(&cfg, 9);
        assert_eq!((g.router, g.shared), (w.router.clone(), w.shared.clone()));
        assert_ne!(LayerWeights::random(&cfg, 10).router, w.router);
    }

    #[test]
    fn threaded_generation_equals_one_expert_at_a_time_in_order() {
        // More experts than any machine's threads, and a count that does not divide evenly.
        for experts in [1, 3, 67] {
            let cfg = MoeConfig::new(2, 64, 64, experts, 1);
            let w = LayerWeights::random(&cfg, 5);
            assert_eq!(w.experts.len(), experts);
            for (e, got) in w.experts.iter().enumerate() {
                assert_eq!(
                    *got,
                    LayerWeights::random_expert(&cfg, 5, e),
                    "expert {e} of {experts}"
                );
            }
        }
    }
}
