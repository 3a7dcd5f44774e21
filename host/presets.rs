//! Layer shapes of real MoE models (from their `config.json`, see
//! `shared/notes/model-families.md`), used by the bench and the synthetic model builder.

use crate::config::{MlpKind, MoeConfig, Router, SharedExperts};
use crate::error::{Error, Result};

/// A named layer shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    /// Name on the command line.
    pub name: &'static str,
    /// What it is.
    pub description: &'static str,
    /// The layer config for one rank world (tokens, world and placement are set by the caller).
    pub config: MoeConfig,
}

/// Every preset name, in the order `--help` lists them.
pub const NAMES: [&str; 6] = [
    "tiny",
    "flashmoe-paper",
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "olmoe-1b-7b",
    "deepseek-v3",
];

/// Looks a preset up by name; unknown names list the known ones.
pub fn preset(name: &str) -> Result<Preset> {
    let (description, config) = match name {
        "tiny" => ("quick check: 256 tokens, 256/512, 8 experts, top-2, SwiGLU", MoeConfig::new(256, 256, 512, 8, 2)),
        "flashmoe-paper" => (
            "FlashMoE paper's weak-scaling layer: 8K tokens, 2048/2048, 64 experts, top-2, GELU",
            MoeConfig {
                mlp: MlpKind::Gelu,
                ..MoeConfig::new(8192, 2048, 2048, 64, 2)
            },
        ),
        "mixtral-8x7b" => (
            "Mixtral-8x7B: 4096/14336, 8 experts, top-2 renormalised, SwiGLU",
            MoeConfig::new(4096, 4096, 14336, 8, 2),
        ),
        "qwen3-30b-a3b" => (
            "Qwen3-30B-A3B: 2048/768, 128 experts, top-8 renormalised, SwiGLU",
            MoeConfig::new(4096, 2048, 768, 128, 8),
        ),
        "olmoe-1b-7b" => (
            "OLMoE-1B-7B: 2048/1024, 64 experts, top-8 not renormalised, SwiGLU",
            MoeConfig {
                router: Router::Softmax { renormalize: false },
                ..MoeConfig::new(4096, 2048, 1024, 64, 8)
            },
        ),
        "deepseek-v3" => (
            "DeepSeek-V3: 7168/2048, 256 experts, top-8 sigmoid+bias renormalised x2.5, 1 shared expert",
            MoeConfig {
                router: Router::SigmoidBias { renormalize: true },
                routed_scale: 2.5,
                shared: Some(SharedExperts {
                    count: 1,
                    intermediate: 2048,
                    gated: false,
                }),
                ..MoeConfig::new(4096, 7168, 2048, 256, 8)
            },
        ),
        _ => {
            return Err(Error::config(
                "preset",
                name,
                format!("one of: {}", NAMES.join(", ")),
            ))
        }
    };
    let name = NAMES.iter().copied().find(|n| *n == name).unwrap_or("tiny");
    Ok(Preset {
        name,
        description,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid_and_plans() {
        for name in NAMES {
            let p = preset(name).unwrap();
            assert_eq!(p.name, name);
            p.config.validate().unwrap();
            crate::plan::LayerPlan::new(&p.config).unwrap();
        }
    }

    #[test]
    fn unknown_preset_names_the_field_and_lists_known_ones() {
        match preset("gpt-5") {
            Err(Error::InvalidConfig { field, limit, .. }) => {
                assert_eq!(field, "preset");
                assert!(limit.contains("mixtral-8x7b"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn presets_match_the_model_cards() {
        let ds = preset("deepseek-v3").unwrap().config;
        assert_eq!(
            (ds.hidden, ds.intermediate, ds.experts, ds.top_k),
            (7168, 2048, 256, 8)
        );
        assert_eq!(ds.routed_scale, 2.5);
        let mx = preset("mixtral-8x7b").unwrap().config;
        assert_eq!(
            (mx.hidden, mx.intermediate, mx.experts, mx.top_k),
            (4096, 14336, 8, 2)
        );
    }
}
