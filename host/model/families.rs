//! Model families: how each one's `config.json` maps to a [`MoeConfig`], which decoder
//! layers are MoE, and how the MoE tensors of a layer are named.
//!
//! The facts come from `shared/notes/model-families.md` (transformers 4.57 and 5.x):
//!
//! | family | router | renormalise | scale | shared experts |
//! |---|---|---|---|---|
//! | Mixtral | softmax | always | 1 | none |
//! | Qwen2-MoE (Qwen1.5, Qwen2) | softmax | `norm_topk_prob` (default false) | 1 | one, gated by `sigmoid(x . shared_expert_gate)` |
//! | Qwen3-MoE | softmax | `norm_topk_prob` (default false) | 1 | none |
//! | OLMoE | softmax | `norm_topk_prob` (default false) | 1 | none |
//! | DeepSeek-V2 / V2-Lite | softmax | never (transformers ignores `norm_topk_prob`) | `routed_scaling_factor` | `n_shared_experts`, ungated |
//! | DeepSeek-V3 (also `kimi_k2`, `glm4_moe`) | sigmoid + `e_score_correction_bias` for selection, group-limited, f32 router | `norm_topk_prob` (default true) | `routed_scaling_factor` | `n_shared_experts`, ungated |
//! | Qwen3-Next | softmax | `norm_topk_prob` (default true) | 1 | one, gated; RMSNorm scaled by `(1 + w)` |
//! | Llama-4 (`llama4_text`) | top-k logits, `sigmoid(logit)` scales the expert's input | no | 1 | one, ungated |
//! | MiniMax-M2 | sigmoid + the block's `e_score_correction_bias` for selection | always | 1 | none |
//! | gpt-oss | top-k of the biased logits, softmax over the k | (softmax over the k) | 1 | none |
//! | DeepSeek-V4 | `sqrt(softplus)` + `gate.bias` for selection | always | `routed_scaling_factor` (1.5) | one, ungated, clamped like the experts |
//!
//! Decisions where the runtime does less than the model:
//! - **Dense layers are skipped.** DeepSeek's first `first_k_dense_replace` layers and
//!   Qwen's `mlp_only_layers` / `decoder_sparse_step` layers hold a dense MLP, not an MoE
//!   block; the model driver chains MoE blocks only, so they are listed in
//!   [`FamilyConfig::dense_layers`] and never loaded. Asking for one explicitly is an error.
//! - **Group-limited selection** (DeepSeek `n_group` / `topk_group`) is run as
//!   [`GroupLimit`](crate::config::GroupLimit): DeepSeek-V2's `group_limited_greedy` scores a
//!   group by its largest probability, V3's `noaux_tc` by the sum of its two largest biased
//!   scores; the other groups' experts rank last, as in transformers 5.
//! - DeepSeek-V2 and the DeepSeek-V3 family (also `kimi_k2`, `glm4_moe`) keep their router
//!   weight in f32 (`MoeConfig::router_f32`), as transformers does in every dtype: it is
//!   read from the checkpoint without rounding.
//! - **PhiMoE** routes with the inference-time sparsemixer and normalises with LayerNorm
//!   (weight and bias): the reference and the CPU executor run both, the kernel the router
//!   and the GPU model driver's norm kernel the LayerNorm.
//! - DeepSeek-V3 renormalises with `+ 1e-20`, as transformers does (MiniMax-M2, which
//!   transformers divides by the plain sum, gets the same epsilon: a difference only when
//!   every chosen sigmoid underflows).
//! - Qwen2-MoE computes the shared-expert gate's sigmoid in the model dtype; the runtime
//!   computes it in f32/f64.
//! - DeepSeek-V3's FP8 release is read: every FP8 weight is dequantised with its
//!   `weight_scale_inv` blocks ([`Checkpoint::read`](super::Checkpoint::read)). Its MTP
//!   layer (`model.layers.61`) lies past `num_hidden_layers` and is never loaded.
//! - Router logits are computed from the dtype-rounded normed rows with f64 (reference)
//!   or f32 (executors) accumulation and are not rounded; Mixtral, Qwen and OLMoE compute
//!   them in the model dtype (bf16), so a near-tie between two experts can resolve
//!   differently from transformers.
//! - **gpt-oss** experts are the clamped SwiGLU ([`MlpKind::ClampedSwiGlu`],
//!   `swiglu_alpha`, `swiglu_limit`) with a bias on both products; `gate_up_proj` is
//!   stored `[E, H, 2I]` with gate and up columns interleaved (even gate, odd up) and is
//!   de-interleaved on load. Its MXFP4 release (`*_blocks`, `*_scales`) is refused.
//! - **DeepSeek-V4** experts and its shared expert run the clamped SwiGLU
//!   `silu(min(gate, limit)) * clamp(up, -limit, limit)` ([`MlpKind::clamped_silu_glu`],
//!   `swiglu_limit`). Its checkpoints keep DeepSeek's names (`layers.{i}.ffn.gate.weight`,
//!   `ffn.gate.bias`, `ffn.experts.{j}.w1/w3/w2`, `ffn.shared_experts.w1/w3/w2`,
//!   `ffn_norm.weight`), under `model.layers` (transformers' `save_pretrained`) or `layers`
//!   (the release). Its **hash-routed layers** (`mlp_layer_types` `hash_moe`, by default the
//!   first three: experts chosen by token id through `ffn.gate.tid2eid`, weighted by the
//!   chosen sqrt-softplus scores) load with [`crate::config::Router::HashSqrtSoftplus`] and
//!   their table ([`crate::model::ModelLayer::hash_table`]); the model routes them from the
//!   token ids given to [`crate::model::MoeModel::forward_ids`]. Its residual
//!   stream is mixed by hyper-connections, which the model driver does not run: only single
//!   blocks match transformers. A `quantization_config` (the FP8 / FP4 release) is refused.
//! - `hidden_act` must be `silu` (SwiGLU) or a tanh GELU (`gelu_pytorch_tanh`,
//!   `gelu_new`: GeGLU); the exact erf GELU is refused.

use crate::config::{Capacity, Dtype, MlpKind, MoeConfig, Placement, Router, SharedExperts};
use crate::error::Result;
use keys::Keys;
use serde_json::Value;
use std::path::Path;

mod keys;

/// A supported (or recognised) model family, from `config.json`'s `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// `mixtral`.
    Mixtral,
    /// `qwen2_moe` (Qwen1.5-MoE, Qwen2-57B-A14B).
    Qwen2Moe,
    /// `qwen3_moe`.
    Qwen3Moe,
    /// `qwen3_next` (Qwen3-Next): Qwen2-MoE's block (gated shared expert), renormalised by
    /// default, RMSNorm scaled by `(1 + w)`.
    Qwen3Next,
    /// `qwen3_5_moe_text` (and the multimodal `qwen3_5_moe`, its text model only):
    /// Qwen3-Next's block, always renormalised.
    Qwen35Moe,
    /// `olmoe`.
    Olmoe,
    /// `deepseek_v2` (V2 and V2-Lite).
    DeepseekV2,
    /// `deepseek_v3`.
    DeepseekV3,
    /// `llama4_text`: top-1 of the logits, sigmoid weight on the expert's input
    /// ([`Router::SigmoidInput`]), an ungated shared expert, fused experts stored
    /// `[E, in, out]`, MoE on `moe_layers` only.
    Llama4,
    /// `minimax_m2`: Mixtral's tensor names, sigmoid scores with a selection bias on the
    /// block, weights always renormalised, never scaled.
    MinimaxM2,
    /// `phimoe`: Mixtral's tensor names, the sparsemixer router
    /// ([`Router::SparseMixer`], `router_jitter_noise`), LayerNorm (weight and bias).
    PhiMoe,
    /// `gpt_oss`: top-k of the biased logits weighted by their softmax
    /// ([`Router::TopkSoftmax`]), biased experts with the clamped SwiGLU
    /// ([`MlpKind::ClampedSwiGlu`]), fused `[E, in, out]` with interleaved gate/up columns.
    GptOss,
    /// `deepseek_v4`: `sqrt(softplus)` scores with a selection bias
    /// ([`Router::SqrtSoftplusBias`]), the clamped SwiGLU ([`MlpKind::clamped_silu_glu`]) in
    /// the experts and the shared expert, DeepSeek's own tensor names; hash-routed layers
    /// are not loaded.
    DeepseekV4,
}

/// Every family, in documentation order.
pub const FAMILIES: [Family; 13] = [
    Family::Mixtral,
    Family::Qwen2Moe,
    Family::Qwen3Moe,
    Family::Qwen3Next,
    Family::Qwen35Moe,
    Family::Olmoe,
    Family::DeepseekV2,
    Family::DeepseekV3,
    Family::MinimaxM2,
    Family::Llama4,
    Family::PhiMoe,
    Family::GptOss,
    Family::DeepseekV4,
];

impl Family {
    /// The family of a `model_type` string, if known. Kimi-K2 (`kimi_k2`) and GLM-4.5
    /// (`glm4_moe`) are read as `deepseek_v3`: the same MoE tensor names, config keys and
    /// router (sigmoid, f32 router weight and correction bias, group-limited top-k).
    pub fn from_model_type(model_type: &str) -> Option<Family> {
        match model_type {
            "kimi_k2" | "glm4_moe" => Some(Family::DeepseekV3),
            "qwen3_5_moe" => Some(Family::Qwen35Moe),
            _ => FAMILIES.into_iter().find(|f| f.model_type() == model_type),
        }
    }

    /// The `model_type` of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Qwen3Next => "qwen3_next",
            Family::Qwen35Moe => "qwen3_5_moe_text",
            Family::Olmoe => "olmoe",
            Family::DeepseekV2 => "deepseek_v2",
            Family::DeepseekV3 => "deepseek_v3",
            Family::MinimaxM2 => "minimax_m2",
            Family::Llama4 => "llama4_text",
            Family::PhiMoe => "phimoe",
            Family::GptOss => "gpt_oss",
            Family::DeepseekV4 => "deepseek_v4",
        }
    }

    /// How this family names the tensors of an MoE block.
    pub fn naming(self) -> Naming {
        let qwen_like = Naming {
            moe_prefixes: &["mlp"],
            router: "gate",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused_in_out: false,
            gpt_oss_experts: false,
            shared_module: None,
            shared_proj: ["gate_proj", "up_proj", "down_proj"],
            shared_gate: false,
            router_bias: None,
            norm_module: "post_attention_layernorm",
        };
        match self {
            // transformers 5 renames `.block_sparse_moe.` to `.mlp.` when it fuses.
            Family::Mixtral | Family::PhiMoe => Naming {
                moe_prefixes: &["block_sparse_moe", "mlp"],
                proj: ["w1", "w3", "w2"],
                ..qwen_like
            },
            Family::Qwen2Moe | Family::Qwen3Next | Family::Qwen35Moe => Naming {
                shared_module: Some("shared_expert"),
                shared_gate: true,
                ..qwen_like
            },
            Family::Qwen3Moe | Family::Olmoe => qwen_like,
            // transformers 5 renames `.block_sparse_moe.` to `.mlp.` (the bias with it).
            Family::Llama4 => Naming {
                moe_prefixes: &["feed_forward"],
                router: "router",
                fused_in_out: true,
                shared_module: Some("shared_expert"),
                ..qwen_like
            },
            Family::MinimaxM2 => Naming {
                moe_prefixes: &["block_sparse_moe", "mlp"],
                proj: ["w1", "w3", "w2"],
                router_bias: Some("e_score_correction_bias"),
                ..qwen_like
            },
            Family::GptOss => Naming {
                router: "router",
                fused_in_out: true,
                gpt_oss_experts: true,
                router_bias: Some("router.bias"),
                ..qwen_like
            },
            Family::DeepseekV2 => Naming {
                shared_module: Some("shared_experts"),
                ..qwen_like
            },
            Family::DeepseekV3 => Naming {
                shared_module: Some("shared_experts"),
                router_bias: Some("gate.e_score_correction_bias"),
                ..qwen_like
            },
            // DeepSeek's own names, which transformers' `save_pretrained` writes back.
            Family::DeepseekV4 => Naming {
                moe_prefixes: &["ffn"],
                proj: ["w1", "w3", "w2"],
                shared_module: Some("shared_experts"),
                shared_proj: ["w1", "w3", "w2"],
                router_bias: Some("gate.bias"),
                norm_module: "ffn_norm",
                ..qwen_like
            },
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.model_type())
    }
}

/// Tensor naming of one family's MoE block, relative to `model.layers.{i}.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Naming {
    /// Module prefixes of the MoE block, tried in order (`block_sparse_moe`, `mlp`).
    pub moe_prefixes: &'static [&'static str],
    /// Module name of the router under the block (`gate`, Llama-4's `router`).
    pub router: &'static str,
    /// Fused experts are stored `[E, in, out]` (Llama-4: `gate_up_proj` `[E, H, 2I]`,
    /// `down_proj` `[E, I, H]`), not transformers 5's `[E, out, in]`.
    pub fused_in_out: bool,
    /// gpt-oss experts: with [`Naming::fused_in_out`], `gate_up_proj` holds gate and up
    /// columns interleaved (even gate, odd up), and the biases `gate_up_proj_bias`
    /// `[E, 2I]` (interleaved likewise) and `down_proj_bias` `[E, H]` are present.
    pub gpt_oss_experts: bool,
    /// Names of the gate, up and down projections of one expert.
    pub proj: [&'static str; 3],
    /// Module name of the shared expert(s) under the MoE prefix, if the family has them.
    pub shared_module: Option<&'static str>,
    /// Names of the gate, up and down projections of the shared expert.
    pub shared_proj: [&'static str; 3],
    /// Whether the shared output is gated (`shared_expert_gate.weight` [1, H]).
    pub shared_gate: bool,
    /// The router's selection bias `[E]` (`e_score_correction_bias`), relative to the MoE
    /// block, if the family has one: on the gate (DeepSeek-V3) or on the block (MiniMax-M2).
    pub router_bias: Option<&'static str>,
    /// Module name of the norm before the MoE block (`post_attention_layernorm`,
    /// DeepSeek-V4's `ffn_norm`).
    pub norm_module: &'static str,
}

impl Naming {
    /// `{layers}.{layer}.post_attention_layernorm.weight` (`layers`: the family's
    /// [`FamilyConfig::layer_prefix`], `model.layers` for most).
    pub fn norm(layers: &str, layer: usize) -> String {
        format!("{layers}.{layer}.post_attention_layernorm.weight")
    }

    /// `{layers}.{layer}.{norm_module}.weight`: the weight of this family's norm before
    /// the MoE block.
    pub fn norm_weight(&self, layers: &str, layer: usize) -> String {
        format!("{layers}.{layer}.{}.weight", self.norm_module)
    }

    /// `{layers}.{layer}.{prefix}`.
    pub fn block(layers: &str, layer: usize, prefix: &str) -> String {
        format!("{layers}.{layer}.{prefix}")
    }
}

/// Where the decoder layers of most checkpoints live.
pub const LAYERS: &str = "model.layers";
/// Where DeepSeek-V4's own release keeps its decoder layers (no `model.` prefix).
pub const BARE_LAYERS: &str = "layers";
/// Where Qwen3.5-MoE's multimodal checkpoints keep the text decoder's layers.
pub const LANGUAGE_MODEL_LAYERS: &str = "model.language_model.layers";

/// The MoE-relevant content of a `config.json`, mapped to the runtime's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct FamilyConfig {
    /// The family.
    pub family: Family,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// Routed experts.
    pub experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    /// Width of one routed expert.
    pub intermediate: usize,
    /// The router.
    pub router: Router,
    /// Multiplier of the routed weights (DeepSeek `routed_scaling_factor`, else 1).
    pub routed_scale: f32,
    /// Shared experts.
    pub shared: Option<SharedExperts>,
    /// The expert MLP (from `hidden_act`).
    pub mlp: MlpKind,
    /// `rms_norm_eps` (family default when absent).
    pub eps: f32,
    /// `torch_dtype` / `dtype`, when given and one the runtime stores.
    pub dtype: Option<Dtype>,
    /// Decoder layers that hold a dense MLP instead of an MoE block (skipped).
    pub dense_layers: Vec<usize>,
    /// Group-limited selection (DeepSeek `n_group` / `topk_group`), if it limits anything.
    pub group_limit: Option<crate::config::GroupLimit>,
    /// The router weight is kept in f32 (DeepSeek-V2 and the DeepSeek-V3 family).
    pub router_f32: bool,
    /// The RMSNorm scales by `1 + w` (Qwen3-Next, Qwen3.5).
    pub norm_unit_offset: bool,
    /// The post-attention norm is a LayerNorm with a bias (PhiMoE), not an RMSNorm.
    pub layer_norm: bool,
    /// Tensor name prefix of the decoder layers ([`LAYERS`], or
    /// [`LANGUAGE_MODEL_LAYERS`] for a multimodal Qwen3.5-MoE checkpoint, or
    /// [`BARE_LAYERS`] for DeepSeek-V4's release, chosen when the checkpoint is opened).
    pub layer_prefix: &'static str,
    /// MoE layers routed by token id (DeepSeek-V4's `hash_moe` layers, `ffn.gate.tid2eid`):
    /// loaded with [`crate::config::Router::HashSqrtSoftplus`] and their table.
    pub hash_layers: Vec<usize>,
}

impl FamilyConfig {
    /// Reads a parsed `config.json`; `path` is used in errors.
    pub fn parse(path: &Path, json: &Value) -> Result<FamilyConfig> {
        let top = Keys { path, json };
        let model_type = top.string("model_type")?;
        // A multimodal Qwen3.5-MoE config keeps the text model's keys in `text_config`,
        // and the checkpoint its layers under `model.language_model`.
        let (keys, layer_prefix) = match (model_type.as_str(), json.get("text_config")) {
            ("qwen3_5_moe", Some(text)) if text.is_object() => {
                (Keys { path, json: text }, LANGUAGE_MODEL_LAYERS)
            }
            _ => (top, LAYERS),
        };
        let family = Family::from_model_type(&model_type).ok_or_else(|| {
            keys.unsupported(
                "model_type",
                &model_type,
                format!(
                    "not a supported MoE family; known: {}",
                    FAMILIES.map(Family::model_type).join(", ")
                ),
            )
        })?;
        let hidden = keys.usize("hidden_size")?;
        let layers = keys.usize("num_hidden_layers")?;
        if layers > super::MAX_LAYERS {
            return Err(keys.unsupported(
                "num_hidden_layers",
                layers,
                format!("at most {} decoder layers", super::MAX_LAYERS),
            ));
        }
        let top_k = keys.usize("num_experts_per_tok")?;
        let mlp = match keys.string("hidden_act")?.as_str() {
            // gpt-oss says `silu` but runs its own clamped SwiGLU.
            "silu" | "swish" if family == Family::GptOss => {
                let alpha = keys.opt_f64("swiglu_alpha")?.unwrap_or(1.702) as f32;
                let limit = keys.opt_f64("swiglu_limit")?.unwrap_or(7.0) as f32;
                if !(alpha.is_finite() && limit.is_finite() && limit > 0.0) {
                    return Err(keys.unsupported(
                        "swiglu_limit",
                        format!("alpha {alpha}, limit {limit}"),
                        "a finite swiglu_alpha and a finite positive swiglu_limit",
                    ));
                }
                MlpKind::clamped_swiglu(alpha, limit)
            }
            // DeepSeek-V4 clamps the gate above and the up projection both ways.
            "silu" | "swish" if family == Family::DeepseekV4 => {
                let limit = keys.opt_f64("swiglu_limit")?.unwrap_or(10.0) as f32;
                if !(limit.is_finite() && limit > 0.0) {
                    return Err(keys.unsupported(
                        "swiglu_limit",
                        limit,
                        "a finite positive swiglu_limit",
                    ));
                }
                MlpKind::clamped_silu_glu(limit)
            }
            "silu" | "swish" => MlpKind::SwiGlu,
            "gelu_pytorch_tanh" | "gelu_new" => MlpKind::GeGlu,
            other => {
                return Err(keys.unsupported(
                    "hidden_act",
                    other,
                    "supported: silu (SwiGLU), gelu_pytorch_tanh / gelu_new (GeGLU, tanh GELU)",
                ))
            }
        };
        let default_eps = match family {
            Family::Mixtral | Family::Olmoe | Family::Llama4 | Family::PhiMoe | Family::GptOss => {
                1e-5
            }
            _ => 1e-6,
        };
        let eps = keys.opt_f64("rms_norm_eps")?.unwrap_or(default_eps) as f32;
        let dtype = match keys.dtype()? {
            Some(d) => Some(d),
            None => top.dtype()?,
        };
        let norm_topk = keys.opt_bool("norm_topk_prob")?;
        let mut routed_scale = 1.0f32;
        let mut shared = None;
        let mut dense_layers = Vec::new();
        let mut group_limit = None;
        let mut router_f32 = false;
        let mut hash_layers = Vec::new();
        let (experts, intermediate, router) = match family {
            Family::Mixtral => (
                keys.usize("num_local_experts")?,
                keys.usize("intermediate_size")?,
                Router::Softmax { renormalize: true },
            ),
            Family::Llama4 => {
                let experts = keys.usize("num_local_experts")?;
                let intermediate = keys.usize("intermediate_size")?;
                let step = keys.opt_usize("interleave_moe_layer_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(keys.unsupported("interleave_moe_layer_step", "0", "must be >= 1"));
                }
                let moe = match keys.opt_usize_list_present("moe_layers")? {
                    Some(list) => list,
                    None => (step - 1..layers).step_by(step).collect(),
                };
                dense_layers = (0..layers).filter(|l| !moe.contains(l)).collect();
                shared = Some(SharedExperts {
                    count: 1,
                    intermediate,
                    gated: false,
                });
                (experts, intermediate, Router::SigmoidInput)
            }
            Family::MinimaxM2 => {
                if let Some(s) = keys.opt_string("scoring_func")? {
                    if s != "sigmoid" {
                        return Err(keys.unsupported(
                            "scoring_func",
                            &s,
                            "MiniMax-M2 routing is sigmoid (transformers hard-codes it)",
                        ));
                    }
                }
                (
                    keys.usize("num_local_experts")?,
                    keys.usize("intermediate_size")?,
                    Router::SigmoidBias { renormalize: true },
                )
            }
            Family::Olmoe => (
                keys.usize("num_experts")?,
                keys.usize("intermediate_size")?,
                Router::Softmax {
                    renormalize: norm_topk.unwrap_or(false),
                },
            ),
            Family::Qwen2Moe | Family::Qwen3Moe | Family::Qwen3Next | Family::Qwen35Moe => {
                // transformers 5 writes Qwen3-MoE configs with `num_local_experts`.
                let experts = match keys.opt_usize("num_experts")? {
                    Some(n) => n,
                    None => keys.usize("num_local_experts")?,
                };
                let step = keys.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                let only = keys.opt_usize_list("mlp_only_layers")?;
                if step == 0 {
                    return Err(keys.unsupported("decoder_sparse_step", "0", "must be >= 1"));
                }
                dense_layers = (0..layers)
                    .filter(|i| only.contains(i) || experts == 0 || (i + 1) % step != 0)
                    .collect();
                if family != Family::Qwen3Moe {
                    let width = keys.opt_usize("shared_expert_intermediate_size")?;
                    shared = width.filter(|&w| w > 0).map(|w| SharedExperts {
                        count: 1,
                        intermediate: w,
                        gated: true,
                    });
                }
                (
                    experts,
                    keys.usize("moe_intermediate_size")?,
                    Router::Softmax {
                        // Qwen3-Next renormalises unless told otherwise, Qwen3.5 always.
                        renormalize: family == Family::Qwen35Moe
                            || norm_topk.unwrap_or(family == Family::Qwen3Next),
                    },
                )
            }
            Family::DeepseekV2 | Family::DeepseekV3 => {
                let experts = keys.usize("n_routed_experts")?;
                let intermediate = keys.usize("moe_intermediate_size")?;
                routed_scale = keys.opt_f64("routed_scaling_factor")?.unwrap_or(1.0) as f32;
                let first_dense = keys.opt_usize("first_k_dense_replace")?.unwrap_or(0);
                let freq = keys.opt_usize("moe_layer_freq")?.unwrap_or(1);
                if freq != 1 {
                    return Err(keys.unsupported(
                        "moe_layer_freq",
                        freq,
                        "only 1 (transformers ignores the key, the original code does not: \
                         the MoE layer set would be ambiguous)",
                    ));
                }
                dense_layers = (0..layers.min(first_dense)).collect();
                let n_shared = keys.opt_usize("n_shared_experts")?.unwrap_or(0);
                shared = (n_shared > 0).then_some(SharedExperts {
                    count: n_shared,
                    intermediate,
                    gated: false,
                });
                group_limit = keys.group_limit(family)?;
                // transformers keeps the DeepSeek router weight (V2 and V3) in f32 in every
                // dtype (`_keep_in_fp32_modules_strict`) and computes the logits in f32.
                router_f32 = true;
                let router = if family == Family::DeepseekV2 {
                    Router::Softmax { renormalize: false }
                } else {
                    if let Some(s) = keys.opt_string("scoring_func")? {
                        if s != "sigmoid" {
                            return Err(keys.unsupported(
                                "scoring_func",
                                &s,
                                "DeepSeek-V3 routing is sigmoid (transformers hard-codes it)",
                            ));
                        }
                    }
                    Router::SigmoidBias {
                        renormalize: norm_topk.unwrap_or(true),
                    }
                };
                (experts, intermediate, router)
            }
            Family::GptOss => {
                if let Some(q) = json.get("quantization_config").filter(|q| !q.is_null()) {
                    // The released MXFP4 experts are dequantised on load (model::mxfp4).
                    let method = q.get("quant_method").and_then(Value::as_str);
                    if method != Some("mxfp4") {
                        return Err(keys.unsupported(
                            "quantization_config",
                            q,
                            "none, or `quant_method: mxfp4` (the released gpt-oss experts)",
                        ));
                    }
                }
                (
                    keys.usize("num_local_experts")?,
                    keys.usize("intermediate_size")?,
                    Router::TopkSoftmax,
                )
            }
            Family::DeepseekV4 => {
                if let Some(q) = json.get("quantization_config") {
                    if !q.is_null() {
                        return Err(keys.unsupported(
                            "quantization_config",
                            q,
                            "none: the FP8 / FP4 release is not read; dequantise to bf16 first",
                        ));
                    }
                }
                if let Some(s) = keys.opt_string("scoring_func")? {
                    if s != "sqrtsoftplus" {
                        return Err(keys.unsupported(
                            "scoring_func",
                            &s,
                            "sqrtsoftplus (the DeepSeek-V4 router the runtime implements)",
                        ));
                    }
                }
                let intermediate = keys.usize("moe_intermediate_size")?;
                routed_scale = keys.opt_f64("routed_scaling_factor")?.unwrap_or(1.5) as f32;
                // transformers builds exactly one shared MLP of `moe_intermediate_size`
                // whatever `n_shared_experts` says: any other count would be ambiguous.
                let n_shared = keys.opt_usize("n_shared_experts")?.unwrap_or(1);
                if n_shared != 1 {
                    return Err(keys.unsupported(
                        "n_shared_experts",
                        n_shared,
                        "1 (DeepSeek-V4 has one shared expert of moe_intermediate_size)",
                    ));
                }
                shared = Some(SharedExperts {
                    count: 1,
                    intermediate,
                    gated: false,
                });
                hash_layers = match keys.opt_string_list_present("mlp_layer_types")? {
                    Some(types) => {
                        if types.len() < layers {
                            return Err(keys.unsupported(
                                "mlp_layer_types",
                                types.len(),
                                format!("one entry per decoder layer ({layers})"),
                            ));
                        }
                        let mut hash = Vec::new();
                        for (l, t) in types.iter().take(layers).enumerate() {
                            match t.as_str() {
                                "hash_moe" => hash.push(l),
                                "moe" => {}
                                other => {
                                    return Err(keys.unsupported(
                                        "mlp_layer_types",
                                        other,
                                        "hash_moe or moe",
                                    ))
                                }
                            }
                        }
                        hash
                    }
                    None => {
                        let n = keys.opt_usize("num_hash_layers")?.unwrap_or(3);
                        (0..layers.min(n)).collect()
                    }
                };
                (
                    keys.usize("n_routed_experts")?,
                    intermediate,
                    // transformers always renormalises here (`norm_topk_prob` is unused).
                    Router::SqrtSoftplusBias { renormalize: true },
                )
            }
            Family::PhiMoe => {
                let eps = keys.opt_f64("router_jitter_noise")?.unwrap_or(0.01) as f32;
                if top_k != 2 {
                    return Err(keys.unsupported(
                        "num_experts_per_tok",
                        top_k,
                        "2: PhiMoE's sparsemixer picks two experts",
                    ));
                }
                (
                    keys.usize("num_local_experts")?,
                    keys.usize("intermediate_size")?,
                    Router::sparse_mixer(eps),
                )
            }
        };
        Ok(FamilyConfig {
            family,
            hidden,
            layers,
            experts,
            top_k,
            intermediate,
            router,
            routed_scale,
            shared,
            mlp,
            eps,
            dtype,
            dense_layers,
            group_limit,
            router_f32,
            norm_unit_offset: matches!(family, Family::Qwen3Next | Family::Qwen35Moe),
            layer_prefix,
            layer_norm: family == Family::PhiMoe,
            hash_layers,
        })
    }

    /// Whether decoder layer `layer` holds an MoE block the runtime loads (not dense;
    /// hash-routed blocks are MoE blocks too).
    pub fn is_moe(&self, layer: usize) -> bool {
        layer < self.layers && !self.dense_layers.contains(&layer)
    }

    /// The MoE decoder layers the runtime loads, in order.
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers).filter(|&l| self.is_moe(l)).collect()
    }

    /// The runtime config of one MoE layer (not yet validated).
    pub fn layer_config(
        &self,
        tokens: usize,
        dtype: Dtype,
        capacity: Capacity,
        world: usize,
        placement: Placement,
    ) -> MoeConfig {
        MoeConfig {
            tokens,
            hidden: self.hidden,
            intermediate: self.intermediate,
            experts: self.experts,
            top_k: self.top_k,
            capacity,
            dtype,
            mlp: self.mlp,
            router: self.router,
            routed_scale: self.routed_scale,
            shared: self.shared,
            world,
            placement,
            group_limit: self.group_limit,
            router_f32: self.router_f32,
        }
    }
}

#[cfg(test)]
mod tests;
