//! Checkpoint loading for every supported family, end to end on the CPU executor.
//!
//! Each test writes a small synthetic checkpoint in the family's exact tensor naming and
//! layout (from `shared/notes/model-families.md`, spelled out here independently of the
//! loader), loads it with `flashmoe::model::load`, and checks:
//! - the loaded config and weights equal what was written (built here by hand);
//! - the model run on the CPU executor matches, layer by layer, a residual stream computed
//!   here with the reference (`reference::forward`) and an RMSNorm written here.

use flashmoe::model::{self, Backend, LoadOptions, MoeModel};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::{
    Capacity, Dtype, Error, ExpertWeights, LayerPlan, LayerWeights, MlpKind, MoeConfig, Router,
    SharedExperts,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use safetensors::tensor::TensorView;
use safetensors::Dtype as St;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const H: usize = 64;
const TOKENS: usize = 24;

/// One tensor to write.
struct T {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
    dtype: St,
}

fn round_storage(v: f32, dtype: St) -> f32 {
    match dtype {
        St::BF16 => half::bf16::from_f32(v).to_f32(),
        St::F16 => half::f16::from_f32(v).to_f32(),
        _ => v,
    }
}

fn bytes(t: &T) -> Vec<u8> {
    match t.dtype {
        St::F32 => t.data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        St::BF16 => t
            .data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        St::F16 => t
            .data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        other => panic!("test writer: {other:?}"),
    }
}

/// Writes `config.json` and the tensors into `shards` files (with an index when > 1).
fn write_checkpoint(dir: &Path, config: &Value, tensors: &[T], shards: usize) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let mut weight_map = BTreeMap::new();
    for s in 0..shards {
        let file = if shards == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", s + 1, shards)
        };
        let mine: Vec<&T> = tensors.iter().skip(s).step_by(shards).collect();
        let data: Vec<Vec<u8>> = mine.iter().map(|t| bytes(t)).collect();
        let views: Vec<(String, TensorView)> = mine
            .iter()
            .zip(&data)
            .map(|(t, b)| {
                let v = TensorView::new(t.dtype, t.shape.clone(), b).unwrap();
                (t.name.clone(), v)
            })
            .collect();
        for t in &mine {
            weight_map.insert(t.name.clone(), file.clone());
        }
        safetensors::serialize_to_file(views, None, &dir.join(&file)).unwrap();
    }
    if shards > 1 {
        let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
}

/// How one family stores its MoE block.
struct Layout {
    /// `block_sparse_moe` or `mlp`.
    block: &'static str,
    /// gate, up, down names.
    proj: [&'static str; 3],
    /// T5 fused `experts.gate_up_proj` / `experts.down_proj`.
    fused: bool,
    /// Shared expert module (`shared_expert` / `shared_experts`).
    shared_module: Option<&'static str>,
    /// Where the selection bias lives, relative to the block (sigmoid-bias routers).
    bias_at: &'static str,
    /// Router module (`gate`; Llama-4: `router`).
    router: &'static str,
    /// Fused experts stored `[E, in, out]` (Llama-4) instead of `[E, out, in]`.
    fused_in_out: bool,
}

/// A family test case: the checkpoint and what the runtime must make of it.
struct Case {
    config: Value,
    layout: Layout,
    layers: usize,
    dense: Vec<usize>,
    storage: St,
    /// The runtime config expected for every MoE layer (tokens, world, capacity as loaded).
    expect: MoeConfig,
    eps: f32,
}

/// What was written for one MoE layer, in the runtime's terms.
struct Written {
    index: usize,
    weights: LayerWeights,
    norm: Vec<f32>,
}

fn rand_vec(rng: &mut StdRng, n: usize, scale: f32, storage: St) -> Vec<f32> {
    (0..n)
        .map(|_| round_storage(rng.random_range(-scale..scale), storage))
        .collect()
}

/// Generates the tensors of a case; returns them and the expected per-layer weights
/// (stored values, not yet rounded to the layer dtype).
fn generate(case: &Case, seed: u64) -> (Vec<T>, Vec<Written>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = &case.expect;
    let (e, i, st) = (c.experts, c.intermediate, case.storage);
    let mut tensors = Vec::new();
    let push = |tensors: &mut Vec<T>, name: String, shape: Vec<usize>, data: Vec<f32>, dtype| {
        tensors.push(T {
            name,
            shape,
            data,
            dtype,
        })
    };
    // Parts of the model the loader must ignore.
    push(
        &mut tensors,
        "model.embed_tokens.weight".into(),
        vec![16, H],
        rand_vec(&mut rng, 16 * H, 1.0, st),
        st,
    );
    push(
        &mut tensors,
        "model.norm.weight".into(),
        vec![H],
        vec![1.0; H],
        st,
    );
    let mut written = Vec::new();
    for l in 0..case.layers {
        let p = format!("model.layers.{l}");
        push(
            &mut tensors,
            format!("{p}.self_attn.q_proj.weight"),
            vec![H, H],
            rand_vec(&mut rng, H * H, 0.1, st),
            st,
        );
        push(
            &mut tensors,
            format!("{p}.input_layernorm.weight"),
            vec![H],
            vec![1.0; H],
            st,
        );
        let norm: Vec<f32> = (0..H)
            .map(|_| round_storage(1.0 + rng.random_range(-0.2f32..0.2), st))
            .collect();
        push(
            &mut tensors,
            format!("{p}.post_attention_layernorm.weight"),
            vec![H],
            norm.clone(),
            st,
        );
        if case.dense.contains(&l) {
            // DeepSeek dense MLP (`intermediate_size` wide): present, never loaded.
            let d = 128;
            push(
                &mut tensors,
                format!("{p}.mlp.gate_proj.weight"),
                vec![d, H],
                rand_vec(&mut rng, d * H, 0.1, st),
                st,
            );
            push(
                &mut tensors,
                format!("{p}.mlp.up_proj.weight"),
                vec![d, H],
                rand_vec(&mut rng, d * H, 0.1, st),
                st,
            );
            push(
                &mut tensors,
                format!("{p}.mlp.down_proj.weight"),
                vec![H, d],
                rand_vec(&mut rng, d * H, 0.1, st),
                st,
            );
            continue;
        }
        let b = format!("{p}.{}", case.layout.block);
        let s_in = 1.0 / (H as f32).sqrt();
        let router = rand_vec(&mut rng, e * H, 4.0 * s_in, st);
        push(
            &mut tensors,
            format!("{b}.{}.weight", case.layout.router),
            vec![e, H],
            router.clone(),
            st,
        );
        let router_bias = if c.router == (Router::SigmoidBias { renormalize: true }) {
            // fp32 in every DeepSeek-V3 checkpoint.
            let bias = rand_vec(&mut rng, e, 0.3, St::F32);
            push(
                &mut tensors,
                format!("{b}.{}", case.layout.bias_at),
                vec![e],
                bias.clone(),
                St::F32,
            );
            bias
        } else {
            Vec::new()
        };
        let experts: Vec<ExpertWeights> = (0..e)
            .map(|_| ExpertWeights {
                w0: rand_vec(&mut rng, 2 * i * H, s_in, st),
                w1: rand_vec(&mut rng, H * i, 1.0 / (i as f32).sqrt(), st),
                ..ExpertWeights::default()
            })
            .collect();
        if case.layout.fused_in_out {
            // Llama-4: [E, H, 2I] and [E, I, H], the transposes of the runtime's rows.
            let t = |m: &[f32], rows: usize, cols: usize| -> Vec<f32> {
                (0..cols)
                    .flat_map(|c| (0..rows).map(move |r| m[r * cols + c]))
                    .collect()
            };
            let gate_up: Vec<f32> = experts.iter().flat_map(|x| t(&x.w0, 2 * i, H)).collect();
            let down: Vec<f32> = experts.iter().flat_map(|x| t(&x.w1, H, i)).collect();
            push(
                &mut tensors,
                format!("{b}.experts.gate_up_proj"),
                vec![e, H, 2 * i],
                gate_up,
                st,
            );
            push(
                &mut tensors,
                format!("{b}.experts.down_proj"),
                vec![e, i, H],
                down,
                st,
            );
        } else if case.layout.fused {
            let gate_up: Vec<f32> = experts.iter().flat_map(|x| x.w0.iter().copied()).collect();
            let down: Vec<f32> = experts.iter().flat_map(|x| x.w1.iter().copied()).collect();
            push(
                &mut tensors,
                format!("{b}.experts.gate_up_proj"),
                vec![e, 2 * i, H],
                gate_up,
                st,
            );
            push(
                &mut tensors,
                format!("{b}.experts.down_proj"),
                vec![e, H, i],
                down,
                st,
            );
        } else {
            let [g, u, d] = case.layout.proj;
            for (j, x) in experts.iter().enumerate() {
                let (gate, up) = x.w0.split_at(i * H);
                push(
                    &mut tensors,
                    format!("{b}.experts.{j}.{g}.weight"),
                    vec![i, H],
                    gate.to_vec(),
                    st,
                );
                push(
                    &mut tensors,
                    format!("{b}.experts.{j}.{u}.weight"),
                    vec![i, H],
                    up.to_vec(),
                    st,
                );
                push(
                    &mut tensors,
                    format!("{b}.experts.{j}.{d}.weight"),
                    vec![H, i],
                    x.w1.clone(),
                    st,
                );
            }
        }
        let mut shared = None;
        let mut shared_gate = None;
        if let (Some(s), Some(module)) = (c.shared, case.layout.shared_module) {
            let w = s.count * s.intermediate;
            let gate = rand_vec(&mut rng, w * H, s_in, st);
            let up = rand_vec(&mut rng, w * H, s_in, st);
            let down = rand_vec(&mut rng, H * w, 1.0 / (w as f32).sqrt(), st);
            push(
                &mut tensors,
                format!("{b}.{module}.gate_proj.weight"),
                vec![w, H],
                gate.clone(),
                st,
            );
            push(
                &mut tensors,
                format!("{b}.{module}.up_proj.weight"),
                vec![w, H],
                up.clone(),
                st,
            );
            push(
                &mut tensors,
                format!("{b}.{module}.down_proj.weight"),
                vec![H, w],
                down.clone(),
                st,
            );
            shared = Some(ExpertWeights {
                w0: [gate, up].concat(),
                w1: down,
                ..ExpertWeights::default()
            });
            if s.gated {
                let g = rand_vec(&mut rng, H, 2.0 * s_in, st);
                push(
                    &mut tensors,
                    format!("{b}.shared_expert_gate.weight"),
                    vec![1, H],
                    g.clone(),
                    st,
                );
                shared_gate = Some(g);
            }
        }
        written.push(Written {
            index: l,
            weights: LayerWeights {
                router,
                router_bias,
                experts,
                shared,
                shared_gate,
            },
            norm,
        });
    }
    (tensors, written)
}

fn round_weights(w: &LayerWeights, d: Dtype) -> LayerWeights {
    let r = |v: &Vec<f32>| v.iter().map(|&x| d.round(x)).collect::<Vec<f32>>();
    let mlp = |x: &ExpertWeights| ExpertWeights {
        w0: r(&x.w0),
        w1: r(&x.w1),
        b0: r(&x.b0),
        b1: r(&x.b1),
    };
    LayerWeights {
        router: r(&w.router),
        router_bias: w.router_bias.clone(),
        experts: w.experts.iter().map(mlp).collect(),
        shared: w.shared.as_ref().map(mlp),
        shared_gate: w.shared_gate.as_ref().map(r),
    }
}

/// RMSNorm written here from the formula of model-families.md §4.
fn rms_norm(x: &[f32], w: &[f32], eps: f32, d: Dtype) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(w.len()) {
        let ms: f64 = row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / w.len() as f64;
        let r = 1.0 / ((ms as f32) + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| d.round(g * d.round(v * r))),
        );
    }
    out
}

/// Largest |a - b| over the largest |b|.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (p, q)| m.max((p - q).abs())) / scale
}

fn inputs(world: usize, seed: u64, d: Dtype) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..world)
        .map(|r| {
            let t = TOKENS - 3 * r; // ranks bring different token counts
            (0..t * H)
                .map(|_| d.round(rng.random_range(-2.0f32..2.0)))
                .collect()
        })
        .collect()
}

/// Writes, loads and checks one case; returns the loaded model for extra checks.
fn run_case(case: &Case, shards: usize, world: usize, seed: u64) -> model::LoadedModel {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, written) = generate(case, seed);
    write_checkpoint(dir.path(), &case.config, &tensors, shards);
    let mut opts = LoadOptions::new(TOKENS);
    opts.capacity = Capacity::Dropless;
    opts.world = world;
    opts.progress = false;
    let loaded = model::load(dir.path(), &opts).unwrap();

    // Config and weights as written.
    let d = case.expect.dtype;
    let mut expect = case.expect.clone();
    expect.world = world;
    assert_eq!(loaded.skipped_dense, case.dense);
    assert_eq!(loaded.layers.len(), written.len());
    for (l, w) in loaded.layers.iter().zip(&written) {
        assert_eq!(l.index, w.index);
        assert_eq!(l.config, expect);
        assert_eq!(
            *l.weights,
            round_weights(&w.weights, d),
            "layer {}",
            w.index
        );
        let norm: Vec<f32> = w.norm.iter().map(|&v| d.round(v)).collect();
        assert_eq!(l.norm.weight, norm);
        assert_eq!(l.norm.eps, case.eps);
        assert_eq!(l.logit_bias, None);
    }

    // The model on the CPU executor, layer by layer against the reference.
    let mut m = MoeModel::new(loaded.layers.clone(), Backend::Cpu).unwrap();
    let x = inputs(world, seed + 1, d);
    let (out, trace) = m.forward_traced(&x).unwrap();
    let tol = match d {
        Dtype::F32 => 1e-5,
        _ => 2e-2,
    };
    let mut state = x.clone();
    for (li, (layer, after)) in loaded.layers.iter().zip(&trace).enumerate() {
        let w = &written[li];
        let norm: Vec<f32> = w.norm.iter().map(|&v| d.round(v)).collect();
        let weights = round_weights(&w.weights, d);
        let plan = LayerPlan::new(&expect).unwrap();
        let normed: Vec<Vec<f32>> = state
            .iter()
            .map(|s| rms_norm(s, &norm, case.eps, d))
            .collect();
        let ri: Vec<RankInput> = normed
            .iter()
            .map(|x| RankInput {
                x,
                tokens: x.len() / H,
                routing: None,
            })
            .collect();
        let r = reference::forward(&plan, &weights, &ri, &RouteOverrides::default()).unwrap();
        let expected: Vec<Vec<f32>> = state
            .iter()
            .zip(&r.out)
            .map(|(s, o)| s.iter().zip(o).map(|(a, b)| d.round(a + b)).collect())
            .collect();
        for (rank, (got, want)) in after.iter().zip(&expected).enumerate() {
            let err = rel_err(got, want);
            assert!(
                err <= tol,
                "layer {} rank {rank}: relative error {err} > {tol}",
                layer.index
            );
        }
        let st = &out.layers[li];
        assert_eq!(st.layer, layer.index);
        assert_eq!(st.expert_counts, r.expert_counts, "layer {}", layer.index);
        assert_eq!(st.dropped, 0);
        // Continue from the model's own state, so each layer is checked on its own.
        state = after.clone();
    }
    assert_eq!(out.hidden, *trace.last().unwrap());
    loaded
}

fn expect(experts: usize, intermediate: usize, top_k: usize, dtype: Dtype) -> MoeConfig {
    MoeConfig {
        capacity: Capacity::Dropless,
        dtype,
        mlp: MlpKind::SwiGlu,
        ..MoeConfig::new(TOKENS, H, intermediate, experts, top_k)
    }
}

fn mixtral_case(fused: bool) -> Case {
    Case {
        config: json!({"model_type": "mixtral", "hidden_size": H, "intermediate_size": 128,
            "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
            "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "float32",
            "num_attention_heads": 4, "vocab_size": 16}),
        layout: Layout {
            // transformers 5 renames block_sparse_moe -> mlp when it fuses the experts.
            block: if fused { "mlp" } else { "block_sparse_moe" },
            proj: ["w1", "w3", "w2"],
            fused,
            shared_module: None,
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 2,
        dense: vec![],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::Softmax { renormalize: true },
            ..expect(8, 128, 2, Dtype::F32)
        },
        eps: 1e-5,
    }
}

#[test]
fn mixtral_per_expert() {
    run_case(&mixtral_case(false), 1, 1, 1);
}

#[test]
fn mixtral_fused_transformers5_layout() {
    run_case(&mixtral_case(true), 1, 1, 2);
}

fn qwen2_case() -> Case {
    Case {
        config: json!({"model_type": "qwen2_moe", "hidden_size": H, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_experts": 6, "num_experts_per_tok": 3,
            "shared_expert_intermediate_size": 128, "norm_topk_prob": false,
            "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "decoder_sparse_step": 1, "mlp_only_layers": [], "torch_dtype": "float32"}),
        layout: Layout {
            block: "mlp",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: false,
            shared_module: Some("shared_expert"),
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 3,
        dense: vec![],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::Softmax { renormalize: false },
            shared: Some(SharedExperts {
                count: 1,
                intermediate: 128,
                gated: true,
            }),
            ..expect(6, 64, 3, Dtype::F32)
        },
        eps: 1e-6,
    }
}

#[test]
fn qwen2_moe_sharded_with_gated_shared_expert() {
    let case = qwen2_case();
    let loaded = run_case(&case, 3, 1, 3);
    assert_eq!(loaded.family.family, model::Family::Qwen2Moe);
}

#[test]
fn qwen3_moe_fused_renormalised_on_two_ranks() {
    let case = Case {
        config: json!({"model_type": "qwen3_moe", "hidden_size": H, "intermediate_size": 256,
            "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 4,
            "norm_topk_prob": true, "num_hidden_layers": 2, "rms_norm_eps": 1e-6,
            "hidden_act": "silu", "dtype": "float32"}),
        layout: Layout {
            block: "mlp",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: true,
            shared_module: None,
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 2,
        dense: vec![],
        storage: St::F32,
        expect: MoeConfig {
            router: Router::Softmax { renormalize: true },
            ..expect(8, 64, 4, Dtype::F32)
        },
        eps: 1e-6,
    };
    run_case(&case, 1, 2, 4);
}

#[test]
fn olmoe_f16_storage_bf16_layers() {
    let case = Case {
        // rms_norm_eps absent: OLMoE's default 1e-5.
        config: json!({"model_type": "olmoe", "hidden_size": H, "intermediate_size": 64,
            "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": false,
            "num_hidden_layers": 2, "hidden_act": "silu", "torch_dtype": "bfloat16"}),
        layout: Layout {
            block: "mlp",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: false,
            shared_module: None,
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 2,
        dense: vec![],
        storage: St::F16,
        expect: MoeConfig {
            router: Router::Softmax { renormalize: false },
            ..expect(8, 64, 2, Dtype::Bf16)
        },
        eps: 1e-5,
    };
    run_case(&case, 1, 1, 5);
}

#[test]
fn deepseek_v2_dense_layer_skipped_shared_experts_scaled() {
    let case = Case {
        // group_limited_greedy with every group kept is plain top-k: accepted.
        config: json!({"model_type": "deepseek_v2", "hidden_size": H, "intermediate_size": 128,
            "moe_intermediate_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 3,
            "n_shared_experts": 2, "norm_topk_prob": false,
            "topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 2,
            "routed_scaling_factor": 16.0, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "torch_dtype": "float32"}),
        layout: Layout {
            block: "mlp",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: false,
            shared_module: Some("shared_experts"),
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 3,
        dense: vec![0],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::Softmax { renormalize: false },
            routed_scale: 16.0,
            shared: Some(SharedExperts {
                count: 2,
                intermediate: 64,
                gated: false,
            }),
            // transformers keeps the DeepSeek-V2 router in f32 too.
            router_f32: true,
            ..expect(8, 64, 3, Dtype::F32)
        },
        eps: 1e-6,
    };
    let loaded = run_case(&case, 1, 1, 6);
    assert_eq!(
        loaded.layers.iter().map(|l| l.index).collect::<Vec<_>>(),
        vec![1, 2]
    );
}

fn deepseek_v3_case() -> Case {
    Case {
        config: json!({"model_type": "deepseek_v3", "hidden_size": H, "intermediate_size": 128,
            "moe_intermediate_size": 64, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_shared_experts": 1, "norm_topk_prob": true, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
            "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "num_hidden_layers": 3, "rms_norm_eps": 1e-6, "hidden_act": "silu",
            "torch_dtype": "float32"}),
        layout: Layout {
            block: "mlp",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: false,
            shared_module: Some("shared_experts"),
            bias_at: "gate.e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 3,
        dense: vec![0],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::SigmoidBias { renormalize: true },
            routed_scale: 2.5,
            shared: Some(SharedExperts {
                count: 1,
                intermediate: 64,
                gated: false,
            }),
            // transformers keeps the DeepSeek-V3 router in f32.
            router_f32: true,
            ..expect(8, 64, 2, Dtype::F32)
        },
        eps: 1e-6,
    }
}

#[test]
fn llama4_text_input_scaled_top1_fused_in_out_with_a_dense_layer() {
    // interleave step 2: layers 1 and 3 are MoE, 0 and 2 dense (skipped).
    let case = Case {
        config: json!({"model_type": "llama4_text", "hidden_size": H, "intermediate_size": 64,
            "intermediate_size_mlp": 128, "num_local_experts": 4, "num_experts_per_tok": 1,
            "num_hidden_layers": 4, "interleave_moe_layer_step": 2, "rms_norm_eps": 1e-5,
            "hidden_act": "silu", "torch_dtype": "float32"}),
        layout: Layout {
            block: "feed_forward",
            proj: ["gate_proj", "up_proj", "down_proj"],
            fused: true,
            shared_module: Some("shared_expert"),
            bias_at: "gate.e_score_correction_bias",
            router: "router",
            fused_in_out: true,
        },
        layers: 4,
        dense: vec![0, 2],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::SigmoidInput,
            shared: Some(SharedExperts {
                count: 1,
                intermediate: 64,
                gated: false,
            }),
            ..expect(4, 64, 1, Dtype::F32)
        },
        eps: 1e-5,
    };
    run_case(&case, 1, 1, 13);
}

#[test]
fn minimax_m2_sigmoid_with_the_bias_on_the_block() {
    let case = Case {
        config: json!({"model_type": "minimax_m2", "hidden_size": H, "intermediate_size": 64,
            "num_local_experts": 8, "num_experts_per_tok": 2, "num_hidden_layers": 2,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "scoring_func": "sigmoid",
            "torch_dtype": "float32"}),
        layout: Layout {
            block: "block_sparse_moe",
            proj: ["w1", "w3", "w2"],
            fused: false,
            shared_module: None,
            bias_at: "e_score_correction_bias",
            router: "gate",
            fused_in_out: false,
        },
        layers: 2,
        dense: vec![],
        storage: St::BF16,
        expect: MoeConfig {
            router: Router::SigmoidBias { renormalize: true },
            ..expect(8, 64, 2, Dtype::F32)
        },
        eps: 1e-6,
    };
    run_case(&case, 1, 2, 11);
}

#[test]
fn deepseek_v3_sigmoid_bias_sharded_on_two_ranks() {
    run_case(&deepseek_v3_case(), 2, 2, 7);
}

#[test]
fn phimoe_without_its_layernorm_bias_names_the_tensor() {
    // A Mixtral-layout checkpoint called phimoe lacks the LayerNorm bias PhiMoE needs.
    let dir = tempfile::tempdir().unwrap();
    let mut case = mixtral_case(false);
    case.config["model_type"] = json!("phimoe");
    let (tensors, _) = generate(&case, 8);
    write_checkpoint(dir.path(), &case.config, &tensors, 1);
    match model::load(dir.path(), &LoadOptions::new(TOKENS)) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(reason.contains("post_attention_layernorm.bias"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

/// Writes the Mixtral case with one tensor changed by `edit`, and returns the load error.
fn load_edited(edit: impl FnOnce(&mut Vec<T>)) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let case = mixtral_case(false);
    let (mut tensors, _) = generate(&case, 9);
    edit(&mut tensors);
    write_checkpoint(dir.path(), &case.config, &tensors, 2);
    let mut opts = LoadOptions::new(TOKENS);
    opts.progress = false;
    model::load(dir.path(), &opts).unwrap_err()
}

#[test]
fn missing_expert_tensor_is_named_with_its_shape() {
    let name = "model.layers.1.block_sparse_moe.experts.5.w3.weight";
    let err = load_edited(|t| t.retain(|t| t.name != name));
    match err {
        Error::Checkpoint { reason, .. } => {
            assert!(
                reason.contains(name) && reason.contains("missing"),
                "{reason}"
            );
            assert!(reason.contains("[128, 64]"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn missing_router_is_named() {
    let err =
        load_edited(|t| t.retain(|t| !t.name.ends_with("layers.0.block_sparse_moe.gate.weight")));
    match err {
        Error::Checkpoint { reason, .. } => {
            assert!(
                reason.contains("model.layers.0.block_sparse_moe.gate.weight"),
                "{reason}"
            );
            assert!(reason.contains("[8, 64]"), "{reason}");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn mis_shaped_tensor_is_named_with_both_shapes() {
    let name = "model.layers.0.block_sparse_moe.experts.2.w2.weight";
    let err = load_edited(|ts| {
        let t = ts.iter_mut().find(|t| t.name == name).unwrap();
        t.shape = vec![128, 64]; // transposed: [I, H] instead of [H, I]
    });
    match err {
        Error::Checkpoint { path, reason } => {
            assert!(reason.contains(name), "{reason}");
            assert!(
                reason.contains("[128, 64]") && reason.contains("[64, 128]"),
                "{reason}"
            );
            assert!(path.to_string_lossy().ends_with(".safetensors"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // A wrong fused shape too.
    let dir = tempfile::tempdir().unwrap();
    let case = mixtral_case(true);
    let (mut tensors, _) = generate(&case, 10);
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "model.layers.1.mlp.experts.down_proj")
        .unwrap();
    t.shape = vec![8, 128, 64];
    write_checkpoint(dir.path(), &case.config, &tensors, 1);
    let mut opts = LoadOptions::new(TOKENS);
    opts.progress = false;
    match model::load(dir.path(), &opts) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(
                reason.contains("model.layers.1.mlp.experts.down_proj"),
                "{reason}"
            );
            assert!(reason.contains("[8, 128, 64]") && reason.contains("[8, 64, 128]"));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn layer_selection_reads_only_the_chosen_layers() {
    let dir = tempfile::tempdir().unwrap();
    let case = deepseek_v3_case();
    let (mut tensors, written) = generate(&case, 11);
    // Layer 1's experts are broken: selecting only layer 2 must not read them.
    tensors.retain(|t| !t.name.starts_with("model.layers.1.mlp.experts.3."));
    write_checkpoint(dir.path(), &case.config, &tensors, 1);
    let mut opts = LoadOptions::new(TOKENS);
    opts.progress = false;
    opts.layers = Some(vec![2]);
    let loaded = model::load(dir.path(), &opts).unwrap();
    assert_eq!(loaded.layers.len(), 1);
    assert_eq!(loaded.layers[0].index, 2);
    assert_eq!(
        *loaded.layers[0].weights,
        round_weights(&written[1].weights, Dtype::F32)
    );
    // Dense and out-of-range layers are refused by number.
    for bad in [0usize, 3] {
        opts.layers = Some(vec![bad]);
        match model::load(dir.path(), &opts) {
            Err(Error::InvalidConfig { field, value, .. }) => {
                assert_eq!((field, value), ("layers", bad.to_string()))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // Without a selection, the broken layer is found.
    opts.layers = None;
    assert!(matches!(
        model::load(dir.path(), &opts),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn dtype_override_rounds_the_weights() {
    let dir = tempfile::tempdir().unwrap();
    let case = mixtral_case(false);
    let (tensors, written) = generate(&case, 12);
    write_checkpoint(dir.path(), &case.config, &tensors, 1);
    let mut opts = LoadOptions::new(TOKENS);
    opts.progress = false;
    opts.dtype = Some(Dtype::F16);
    let loaded = model::load(dir.path(), &opts).unwrap();
    assert_eq!(loaded.layers[0].config.dtype, Dtype::F16);
    assert_eq!(
        *loaded.layers[0].weights,
        round_weights(&written[0].weights, Dtype::F16)
    );
    // and they still run
    let mut m = MoeModel::new(loaded.layers, Backend::Cpu).unwrap();
    m.forward(&inputs(1, 3, Dtype::F16)).unwrap();
}

#[test]
fn host_memory_cap_refuses_big_selections() {
    let dir = tempfile::tempdir().unwrap();
    let case = mixtral_case(false);
    let (tensors, _) = generate(&case, 13);
    write_checkpoint(dir.path(), &case.config, &tensors, 1);
    let mut opts = LoadOptions::new(TOKENS);
    opts.progress = false;
    // One layer: 8 experts x 3 x 128 x 64 f32 = 786432 bytes plus router and norm.
    opts.max_host_bytes = 8 * 3 * 128 * 64 * 4;
    assert!(matches!(
        model::load(dir.path(), &opts),
        Err(Error::PlanTooLarge { .. })
    ));
    opts.layers = Some(vec![1]);
    opts.max_host_bytes = 2 * 8 * 3 * 128 * 64 * 4;
    assert_eq!(model::load(dir.path(), &opts).unwrap().layers.len(), 1);
}

/// Non-finite values in a shared expert or its gate are refused at load time, naming the
/// layer and the tensor (not found later as a bad input of the next layer).
#[test]
fn non_finite_shared_experts_and_gates_name_layer_and_tensor() {
    let cases: [(&str, f32, &str); 3] = [
        (
            "model.layers.1.mlp.shared_expert.down_proj.weight",
            f32::NAN,
            "weights.shared.w1",
        ),
        (
            "model.layers.2.mlp.shared_expert.gate_proj.weight",
            f32::NEG_INFINITY,
            "weights.shared.w0",
        ),
        (
            "model.layers.1.mlp.shared_expert_gate.weight",
            f32::INFINITY,
            "weights.shared_gate",
        ),
    ];
    for (name, bad, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let case = qwen2_case();
        let (mut tensors, _) = generate(&case, 5);
        let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
        t.data[3] = bad;
        write_checkpoint(dir.path(), &case.config, &tensors, 1);
        let mut opts = LoadOptions::new(TOKENS);
        opts.progress = false;
        match model::load(dir.path(), &opts).unwrap_err() {
            Error::ModelLayer { layer, source } => {
                assert_eq!(
                    layer,
                    name.split('.').nth(2).unwrap().parse::<usize>().unwrap()
                );
                match *source {
                    Error::InvalidInput { field: f, reason } => {
                        assert_eq!(f, field, "{reason}");
                        assert!(reason.contains("finite"), "{reason}");
                    }
                    other => panic!("{name}: {other:?}"),
                }
            }
            other => panic!("{name}: {other:?}"),
        }
    }
}
