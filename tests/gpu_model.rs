//! The GPU model driver ([`GpuModel`]: norm -> layer -> residual for every layer on one
//! stream) against the CPU model driver and the reference, on a real GPU.
//!
//! Every test prints "skipped <test>: <reason>" and passes where there is no usable GPU or
//! the library was built without kernels (set FLASHMOE_EXPECT_GPU=1 to make that a
//! failure instead).
//!
//! Per layer l of a traced GPU forward (input = the GPU's own state before l, so errors do
//! not compound):
//! - the normalised input equals the host driver's `RmsNorm::apply` bit for bit;
//! - the MoE output passes the layer tests' comparison with the reference
//!   (`check_against_reference`: routing, slots, counts, drops, output tolerance);
//! - the state after the layer equals `round(state + out)` bit for bit.
//!
//! And the whole chain against `MoeModel` with `Backend::Cpu`: every layer's state for
//! f32 models, the first layer's for 16-bit ones (later inputs differ by roundings that
//! may legitimately flip near-tie routing; the per-layer checks above cover those layers).

mod fixture_support;
mod gpu_support;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use flashmoe::config::{Capacity, Dtype, MlpKind, MoeConfig, Placement, Router, SharedExperts};
use flashmoe::gpu::layer::{from_dtype_bytes, to_dtype_bytes};
use flashmoe::gpu::layer::{GpuOptions, GpuWorld, MoeLayer};
use flashmoe::gpu::model::{GpuModel, GpuModelOptions, GpuTrace, ModelRankIo};
use flashmoe::model::{
    Backend, LayerBackend, LayerStats, ModelLayer, ModelOutput, MoeModel, RmsNorm,
};
use flashmoe::reference::{self, LayerOutput, RankInput, RouteOverrides};
use flashmoe::weights::random_tokens;
use flashmoe::CpuExecutor;
use flashmoe::{Error, LayerPlan, LayerWeights};
use gpu_support::{check_against_reference, gpu_stream};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::Duration;

/// One layer of a test model, varied per layer.
struct LayerSpec {
    experts: usize,
    top_k: usize,
    intermediate: usize,
    dtype: Dtype,
    mlp: MlpKind,
    router: Router,
    capacity: Capacity,
    shared: bool,
    logit_bias: bool,
}

fn spec(experts: usize, top_k: usize, dtype: Dtype) -> LayerSpec {
    LayerSpec {
        experts,
        top_k,
        intermediate: 128,
        dtype,
        mlp: MlpKind::SwiGlu,
        router: Router::Softmax { renormalize: true },
        capacity: Capacity::Dropless,
        shared: false,
        logit_bias: false,
    }
}

/// A model of `specs.len()` layers over `world` ranks, hidden 128, `tokens` per rank.
fn model(specs: &[LayerSpec], world: usize, tokens: usize, seed: u64) -> Vec<ModelLayer> {
    let mut rng = StdRng::seed_from_u64(seed);
    specs
        .iter()
        .enumerate()
        .map(|(l, s)| {
            let mut cfg = MoeConfig::new(tokens, 128, s.intermediate, s.experts, s.top_k);
            cfg.dtype = s.dtype;
            cfg.mlp = s.mlp;
            cfg.router = s.router;
            cfg.capacity = s.capacity;
            cfg.world = world;
            cfg.placement = Placement::Blocked;
            if s.shared {
                cfg.shared = Some(SharedExperts {
                    count: 1,
                    intermediate: 64,
                    gated: l % 2 == 0,
                });
            }
            let weights = LayerWeights::random(&cfg, rng.random());
            let norm = RmsNorm {
                weight: (0..cfg.hidden)
                    .map(|_| s.dtype.round(1.0 + rng.random_range(-0.2f32..0.2)))
                    .collect(),
                eps: 1e-5,
                bias: None,
            };
            let logit_bias = s.logit_bias.then(|| {
                (0..s.experts)
                    .map(|_| rng.random_range(-1.0f32..1.0))
                    .collect()
            });
            let layer = ModelLayer {
                index: 10 + l,
                config: cfg,
                weights: Arc::new(weights),
                norm,
                logit_bias,
                hash_table: None,
            };
            layer.validate().unwrap();
            layer
        })
        .collect()
}

/// Inputs: `tokens` rows per rank, the last rank of a multi-rank world bringing fewer.
fn inputs(layers: &[ModelLayer], tokens: usize, seed: u64) -> Vec<Vec<f32>> {
    let cfg = &layers[0].config;
    (0..cfg.world)
        .map(|r| {
            let t = if cfg.world > 1 && r == cfg.world - 1 {
                tokens / 2 + 1
            } else {
                tokens
            };
            random_tokens(cfg, t, seed + r as u64)
        })
        .collect()
}

fn new_model(stream: &Arc<CudaStream>, layers: &[ModelLayer]) -> GpuModel {
    GpuModel::new(stream.clone(), layers.to_vec(), GpuModelOptions::default()).unwrap()
}

/// First index where two slices differ bit for bit.
fn first_difference(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}

/// Runs the GPU model traced and applies [`verify_trace`].
fn check_trace(layers: &[ModelLayer], x: &[Vec<f32>], top_k: Option<usize>, label: &str) {
    let Some((_guard, stream)) = gpu_stream(label) else {
        return;
    };
    let mut m = new_model(&stream, layers);
    if top_k.is_some() {
        m.set_top_k(top_k).unwrap();
    }
    let (out, trace) = m.forward_traced(x).unwrap();
    verify_trace(layers, x, top_k, &out, &trace, label);
}

/// The per-layer checks of the module docs; returns the worst MoE relative error.
fn verify_trace(
    layers: &[ModelLayer],
    x: &[Vec<f32>],
    top_k: Option<usize>,
    out: &ModelOutput,
    trace: &GpuTrace,
    label: &str,
) -> f64 {
    assert_eq!(out.layers.len(), layers.len(), "{label}");
    assert_eq!(trace.states.len(), layers.len(), "{label}");
    let mut worst = 0f64;
    for (l, layer) in layers.iter().enumerate() {
        let cfg = &layer.config;
        let lab = format!("{label} layer {}", layer.index);
        let before: Vec<Vec<f32>> = if l == 0 {
            x.iter()
                .map(|r| r.iter().map(|&v| cfg.dtype.round(v)).collect())
                .collect()
        } else {
            trace.states[l - 1].clone()
        };
        // 1. The norm, bit for bit.
        for (r, (b, got)) in before.iter().zip(&trace.normed[l]).enumerate() {
            let want = layer.norm.apply(b, cfg.dtype);
            assert_eq!(
                first_difference(got, &want),
                None,
                "{lab} rank {r}: normalised input (index, gpu, host)"
            );
        }
        // 2. The MoE layer against the reference, on the GPU's own input.
        let ins: Vec<RankInput> = trace.normed[l]
            .iter()
            .map(|n| RankInput {
                x: n,
                tokens: n.len() / cfg.hidden,
                routing: None,
            })
            .collect();
        let ov = RouteOverrides {
            top_k,
            logit_bias: layer.logit_bias.clone(),
        };
        let got = LayerOutput::from_ranks(
            cfg.experts,
            trace.moe_out[l].clone(),
            trace.gates[l].clone(),
        );
        let plan = LayerPlan::new(cfg).unwrap();
        let (err, _, _) = check_against_reference(&plan, &layer.weights, &ins, &ov, &got, &lab);
        worst = worst.max(err);
        // The layer statistics are the gates' counts.
        assert_eq!(out.layers[l].layer, layer.index, "{lab}");
        assert_eq!(out.layers[l].expert_counts, got.expert_counts, "{lab}");
        assert_eq!(out.layers[l].dropped, got.dropped, "{lab}");
        assert!(
            out.layers[l].backend_latency <= out.layers[l].latency
                && !out.layers[l].latency.is_zero(),
            "{lab}: device times {:?}",
            out.layers[l]
        );
        // 3. The residual add, bit for bit.
        for (r, ((b, o), got)) in before
            .iter()
            .zip(&trace.moe_out[l])
            .zip(&trace.states[l])
            .enumerate()
        {
            let want: Vec<f32> = b
                .iter()
                .zip(o)
                .map(|(&s, &y)| cfg.dtype.round(s + y))
                .collect();
            assert_eq!(
                first_difference(got, &want),
                None,
                "{lab} rank {r}: state after the residual add (index, gpu, host)"
            );
        }
    }
    assert_eq!(out.hidden, *trace.states.last().unwrap(), "{label}: output");
    worst
}

/// The chain against the CPU model driver (see the module docs).
fn check_against_cpu_model(layers: &[ModelLayer], x: &[Vec<f32>], label: &str) {
    let Some((_guard, stream)) = gpu_stream(label) else {
        return;
    };
    let mut gpu = new_model(&stream, layers);
    let (g_out, g_trace) = gpu.forward_traced(x).unwrap();
    let mut cpu = MoeModel::new(layers.to_vec(), Backend::Cpu).unwrap();
    let (c_out, c_trace) = cpu.forward_traced(x).unwrap();
    compare_chains(layers, &g_out, &g_trace.states, &c_out, &c_trace, label);
}

/// `got` (states[l][rank]) against the CPU model's chain `want`.
fn compare_chains(
    layers: &[ModelLayer],
    g_out: &ModelOutput,
    g_states: &[Vec<Vec<f32>>],
    c_out: &ModelOutput,
    c_trace: &[Vec<Vec<f32>>],
    label: &str,
) {
    assert_eq!(g_states.len(), c_trace.len(), "{label}: layers");
    let all_f32 = layers.iter().all(|l| l.config.dtype == Dtype::F32);
    let compared = if all_f32 { layers.len() } else { 1 };
    for l in 0..compared {
        let dtype = layers[l].config.dtype;
        let lab = format!("{label} layer {}", layers[l].index);
        assert_eq!(g_states[l].len(), c_trace[l].len(), "{lab}: ranks");
        for (r, (g, c)) in g_states[l].iter().zip(&c_trace[l]).enumerate() {
            let err = reference::normalised_error(g, c);
            // f32: each layer adds at most the executors' tolerance against the reference.
            let tol = reference::tolerance(dtype) * (l + 1) as f64;
            assert!(
                err <= tol,
                "{lab} rank {r}: GPU vs CPU model {err:e} > {tol:e}"
            );
        }
        // The same routing, up to near-ties that the two executors' f32 logits may order
        // differently (the reference check of `verify_trace` bounds those exactly).
        let (g, c) = (&g_out.layers[l], &c_out.layers[l]);
        assert_eq!(g.routed(), c.routed(), "{lab}: routed pairs");
        let moved: u64 = g
            .expert_counts
            .iter()
            .zip(&c.expert_counts)
            .map(|(a, b)| a.abs_diff(*b))
            .sum();
        assert!(
            moved <= 2 + c.routed() / 100,
            "{lab}: expert counts {:?} vs CPU {:?}",
            g.expert_counts,
            c.expert_counts
        );
    }
    if all_f32 {
        for (r, (g, c)) in g_out.hidden.iter().zip(&c_out.hidden).enumerate() {
            let err = reference::normalised_error(g, c);
            let tol = reference::tolerance(Dtype::F32) * layers.len() as f64;
            assert!(
                err <= tol,
                "{label} rank {r}: final state {err:e} > {tol:e}"
            );
        }
    }
}

fn varied_f32() -> Vec<LayerSpec> {
    vec![
        spec(16, 2, Dtype::F32),
        LayerSpec {
            mlp: MlpKind::Gelu,
            router: Router::SigmoidBias { renormalize: true },
            intermediate: 192,
            logit_bias: true,
            ..spec(32, 4, Dtype::F32)
        },
        LayerSpec {
            capacity: Capacity::Factor(1.0),
            shared: true,
            ..spec(8, 1, Dtype::F32)
        },
    ]
}

#[test]
fn single_rank_f32_model_matches_cpu_model_and_reference_layer_by_layer() {
    let layers = model(&varied_f32(), 1, 96, 1);
    let x = inputs(&layers, 96, 100);
    check_trace(&layers, &x, None, "single f32");
    check_against_cpu_model(&layers, &x, "single f32 vs cpu");
}

#[test]
fn layer_norm_models_match_the_cpu_model() {
    // PhiMoE's LayerNorm (weight and bias) in front of every block, f32 and bf16 layers.
    for (dtype, label) in [
        (Dtype::F32, "layernorm f32"),
        (Dtype::Bf16, "layernorm bf16"),
    ] {
        let specs: Vec<LayerSpec> = varied_f32()
            .into_iter()
            .map(|s| LayerSpec { dtype, ..s })
            .collect();
        let mut layers = model(&specs, 2, 64, 77);
        let mut rng = StdRng::seed_from_u64(78);
        for l in &mut layers {
            l.norm.bias = Some(
                (0..l.config.hidden)
                    .map(|_| dtype.round(rng.random_range(-0.3f32..0.3)))
                    .collect(),
            );
        }
        let x = inputs(&layers, 64, 300);
        check_against_cpu_model(&layers, &x, label);
    }
}

#[test]
fn emulated_world_f32_model_matches_cpu_model_and_reference_layer_by_layer() {
    for world in [2, 4] {
        let layers = model(&varied_f32(), world, 64, 2 + world as u64);
        let x = inputs(&layers, 64, 200);
        let label = format!("emulated {world} f32");
        check_trace(&layers, &x, None, &label);
        check_against_cpu_model(&layers, &x, &format!("{label} vs cpu"));
    }
}

#[test]
fn sixteen_bit_and_mixed_dtype_models_match_layer_by_layer() {
    let bf16 = vec![
        LayerSpec {
            logit_bias: true,
            ..spec(16, 2, Dtype::Bf16)
        },
        LayerSpec {
            mlp: MlpKind::GeGlu,
            capacity: Capacity::Factor(0.75),
            ..spec(64, 8, Dtype::Bf16)
        },
        LayerSpec {
            mlp: MlpKind::Relu,
            router: Router::Softmax { renormalize: false },
            ..spec(8, 2, Dtype::Bf16)
        },
        spec(32, 4, Dtype::Bf16),
    ];
    let mixed = vec![
        spec(16, 2, Dtype::F16),
        LayerSpec {
            shared: true,
            ..spec(16, 2, Dtype::F32)
        },
        LayerSpec {
            router: Router::SigmoidBias { renormalize: true },
            ..spec(32, 4, Dtype::Bf16)
        },
        spec(8, 2, Dtype::F32),
    ];
    let two = vec![spec(16, 2, Dtype::Bf16), spec(32, 2, Dtype::Bf16)];
    for (name, specs, world) in [("bf16", bf16, 1), ("bf16 x2", two, 2), ("mixed", mixed, 3)] {
        let layers = model(&specs, world, 80, 7);
        let x = inputs(&layers, 80, 300);
        check_trace(&layers, &x, None, name);
        check_against_cpu_model(&layers, &x, &format!("{name} vs cpu"));
    }
}

#[test]
fn top_k_override_reaches_every_layer() {
    let layers = model(
        &[spec(16, 4, Dtype::F32), spec(32, 2, Dtype::Bf16)],
        2,
        48,
        9,
    );
    let x = inputs(&layers, 48, 400);
    check_trace(&layers, &x, Some(1), "top-k 1");
    let Some((_guard, stream)) = gpu_stream("top_k_override_reaches_every_layer") else {
        return;
    };
    let mut m = new_model(&stream, &layers);
    for bad in [0, 3] {
        assert!(
            matches!(m.set_top_k(Some(bad)), Err(Error::ModelLayer { .. })),
            "top-k {bad}"
        );
    }
    m.set_top_k(Some(2)).unwrap();
    let out = m.forward_host(&x).unwrap();
    let routed: u64 = out.layers[0].expert_counts.iter().sum();
    let tokens: usize = x.iter().map(|r| r.len() / 128).sum();
    assert_eq!(routed, 2 * tokens as u64, "top-k 2 on a top-4 layer");
}

fn upload(stream: &Arc<CudaStream>, v: &[u8]) -> CudaSlice<u8> {
    stream.clone_htod(v).unwrap()
}

/// The engine entry (caller's device state, in place) gives exactly `forward_host`'s
/// result, with an f32 state and with a state in the layers' own dtype.
#[test]
fn device_entry_equals_host_entry_for_f32_and_same_dtype_state() {
    let Some((_guard, stream)) = gpu_stream("device_entry_equals_host_entry") else {
        return;
    };
    for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
        let layers = model(
            &[spec(16, 2, dtype), spec(32, 4, dtype), spec(8, 1, dtype)],
            2,
            40,
            11,
        );
        let x = inputs(&layers, 40, 500);
        let mut m = new_model(&stream, &layers);
        let want = m.forward_host(&x).unwrap();
        for state in [Dtype::F32, dtype] {
            let bufs: Vec<CudaSlice<u8>> = x
                .iter()
                .map(|r| {
                    let rounded: Vec<f32> = r.iter().map(|&v| dtype.round(v)).collect();
                    upload(&stream, &to_dtype_bytes(state, &rounded))
                })
                .collect();
            let io: Vec<ModelRankIo> = bufs
                .iter()
                .zip(&x)
                .map(|(b, r)| ModelRankIo {
                    state: b.device_ptr(&stream).0,
                    tokens: r.len() / 128,
                })
                .collect();
            // SAFETY: each buffer holds tokens * hidden elements of `state`, lives until
            // status() returned below, and nothing else touches it meanwhile.
            unsafe { m.forward(&io, state, &stream).unwrap() };
            let stats = m.status().unwrap();
            for (l, (s, w)) in stats.iter().zip(&want.layers).enumerate() {
                assert_eq!(s.expert_counts, w.expert_counts, "{dtype:?} layer {l}");
                assert_eq!(s.dropped, w.dropped, "{dtype:?} layer {l}");
            }
            for (r, (b, w)) in bufs.iter().zip(&want.hidden).enumerate() {
                let got = from_dtype_bytes(state, &stream.clone_dtoh(b).unwrap());
                assert_eq!(
                    first_difference(&got, w),
                    None,
                    "{dtype:?} state {state:?} rank {r}"
                );
            }
        }
        // A 16-bit state cannot feed layers of another dtype.
        let other = if dtype == Dtype::Bf16 {
            Dtype::F16
        } else {
            Dtype::Bf16
        };
        let io = [ModelRankIo {
            state: 0,
            tokens: 0,
        }; 2];
        // SAFETY: refused before any launch (checked arguments).
        let e = unsafe { m.forward(&io, other, &stream) }.unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidInput {
                    field: "state dtype",
                    ..
                }
            ),
            "{e}"
        );
    }
}

#[test]
fn repeated_forwards_are_identical_and_bad_inputs_are_typed_errors() {
    let Some((_guard, stream)) = gpu_stream("repeated_forwards_are_identical") else {
        return;
    };
    let layers = model(
        &[spec(16, 2, Dtype::Bf16), spec(16, 2, Dtype::Bf16)],
        1,
        32,
        13,
    );
    let x = inputs(&layers, 32, 600);
    let mut m = new_model(&stream, &layers);
    let a = m.forward_host(&x).unwrap();
    let b = m.forward_host(&x).unwrap();
    assert_eq!(a.hidden, b.hidden);
    m.set_poison(false);
    assert_eq!(
        m.forward_host(&x).unwrap().hidden,
        a.hidden,
        "without the NaN fill"
    );
    let device = m.device_time().unwrap();
    let layer_sum: std::time::Duration = a.layers.iter().map(|l| l.latency).sum();
    assert!(
        !device.is_zero() && device < a.latency,
        "{device:?} vs wall {:?}",
        a.latency
    );
    assert!(layer_sum > std::time::Duration::ZERO);
    for (l, (sa, sb)) in a.layers.iter().zip(&b.layers).enumerate() {
        assert_eq!(sa.expert_counts, sb.expert_counts, "layer {l}");
    }
    // Fewer tokens than the config; then a different input gives a different output.
    let half = vec![x[0][..16 * 128].to_vec()];
    let c = m.forward_host(&half).unwrap();
    assert_eq!(c.hidden[0].len(), 16 * 128);
    let routed: u64 = c.layers[0].expert_counts.iter().sum();
    assert_eq!(routed, 16 * 2);
    let other = vec![random_tokens(&layers[0].config, 32, 601)];
    assert_ne!(m.forward_host(&other).unwrap().hidden, a.hidden);
    for bad in [
        vec![],
        vec![vec![0.0; 127]],
        vec![vec![0.0; 33 * 128]],
        vec![vec![f32::NAN; 128]],
    ] {
        assert!(
            matches!(
                m.forward_host(&bad),
                Err(Error::InvalidInput { field: "x", .. })
            ),
            "{} blocks",
            bad.len()
        );
    }
}

/// The same trace as the host driver computes it, with the CPU executor as the layer.
fn cpu_trace(
    layers: &[ModelLayer],
    x: &[Vec<f32>],
    top_k: Option<usize>,
) -> (ModelOutput, GpuTrace) {
    let d0 = layers[0].config.dtype;
    let mut state: Vec<Vec<f32>> = x
        .iter()
        .map(|r| r.iter().map(|&v| d0.round(v)).collect())
        .collect();
    let mut trace = GpuTrace {
        states: vec![],
        normed: vec![],
        moe_out: vec![],
        gates: vec![],
    };
    let mut stats = Vec::new();
    for layer in layers {
        let cfg = &layer.config;
        let normed: Vec<Vec<f32>> = state
            .iter()
            .map(|r| layer.norm.apply(r, cfg.dtype))
            .collect();
        let ins: Vec<RankInput> = normed
            .iter()
            .map(|n| RankInput {
                x: n,
                tokens: n.len() / cfg.hidden,
                routing: None,
            })
            .collect();
        let ov = RouteOverrides {
            top_k,
            logit_bias: layer.logit_bias.clone(),
        };
        let plan = LayerPlan::new(cfg).unwrap();
        let mut ex = CpuExecutor::new(plan, Arc::clone(&layer.weights)).unwrap();
        let out = ex.forward(&ins, &ov).unwrap();
        for (s, o) in state.iter_mut().zip(&out.out) {
            for (v, &y) in s.iter_mut().zip(o) {
                *v = cfg.dtype.round(*v + y);
            }
        }
        stats.push(LayerStats {
            layer: layer.index,
            latency: Duration::from_millis(2),
            backend_latency: Duration::from_millis(1),
            expert_counts: out.expert_counts.clone(),
            dropped: out.dropped,
            wire: None,
        });
        trace.states.push(state.clone());
        trace.normed.push(normed);
        trace.moe_out.push(out.out);
        trace.gates.push(out.gates);
    }
    let out = ModelOutput {
        hidden: state,
        layers: stats,
        latency: Duration::from_millis(3),
    };
    (out, trace)
}

/// Runs everywhere (no GPU needed): the per-layer checks accept the host driver's own
/// trace (so a GPU failure is the GPU's), and reject a trace with one wrong value.
#[test]
fn the_checks_accept_the_host_driver_and_reject_a_corrupted_trace() {
    let layers = model(&varied_f32(), 2, 32, 21);
    let x = inputs(&layers, 32, 700);
    let (out, trace) = cpu_trace(&layers, &x, None);
    verify_trace(&layers, &x, None, &out, &trace, "cpu trace");
    // The harness's own trace is the CPU model driver's chain.
    let (c_out, c_trace) = MoeModel::new(layers.clone(), Backend::Cpu)
        .unwrap()
        .forward_traced(&x)
        .unwrap();
    compare_chains(
        &layers,
        &out,
        &trace.states,
        &c_out,
        &c_trace,
        "cpu trace vs model",
    );
    assert_eq!(
        trace.states, c_trace,
        "the harness's chain is the driver's, bit for bit"
    );
    let bf16 = model(
        &[spec(16, 2, Dtype::Bf16), spec(8, 2, Dtype::Bf16)],
        1,
        32,
        22,
    );
    let xb = inputs(&bf16, 32, 701);
    let (outb, traceb) = cpu_trace(&bf16, &xb, Some(1));
    verify_trace(&bf16, &xb, Some(1), &outb, &traceb, "cpu trace bf16 top-1");
    for what in ["normed", "state"] {
        let mut bad = trace.clone();
        let v = match what {
            "normed" => &mut bad.normed[1][0][5],
            _ => &mut bad.states[0][1][3],
        };
        *v = f32::from_bits(v.to_bits() ^ 1);
        let r = std::panic::catch_unwind(|| verify_trace(&layers, &x, None, &out, &bad, what));
        assert!(
            r.is_err(),
            "a one-ulp change of the {what} trace was accepted"
        );
    }
}

/// transformers' fixtures (`tests/fixtures/moe/`, see `model_fixtures.rs`) through the
/// kernel: every block alone through a GPU layer, and the chain through the GPU model
/// (norm, layer and residual on the device; hash layers by their token ids), against
/// every oracle of the fixture with the host backends' tolerances.
#[test]
fn every_fixture_matches_transformers_on_the_gpu() {
    let Some((_guard, stream)) = gpu_stream("fixtures") else {
        return;
    };
    let build = |plan: LayerPlan, w: Arc<LayerWeights>| {
        let layer = MoeLayer::new(
            stream.clone(),
            plan,
            &w,
            GpuWorld::Single,
            GpuOptions::default(),
        )?;
        Ok(Box::new(layer) as Box<dyn LayerBackend>)
    };
    let mut failures = Vec::new();
    for name in fixture_support::FIXTURES {
        let dir = fixture_support::fixtures_dir().join(name);
        let expected = fixture_support::read_expected(&dir);
        let run = || -> Result<Vec<String>, String> {
            let loaded = fixture_support::load_fixture(&dir, &expected)?;
            let mut gpu = GpuModel::new(
                stream.clone(),
                loaded.layers.clone(),
                GpuModelOptions::default(),
            )
            .map_err(|e| e.to_string())?;
            let x = std::slice::from_ref(&expected["chain.input"].data);
            let ids: Option<Vec<Vec<u32>>> = expected
                .get("chain.input_ids")
                .map(|t| vec![fixture_support::ids_of(t)]);
            let (out, trace) = gpu
                .forward_traced_ids(x, ids.as_deref())
                .map_err(|e| e.to_string())?;
            let chain = (out.hidden[0].clone(), trace.states);
            let mut lines = Vec::new();
            for &oracle in fixture_support::oracles(name) {
                let mut results = fixture_support::run_blocks(&loaded, &expected, &build, oracle)?;
                let o = fixture_support::check_chain(&loaded, &expected, &chain, oracle)?;
                results.push(("chain".to_string(), o));
                for (what, r) in results {
                    lines.push(format!(
                        "{name:24} {:5} gpu {what:8} error {:.2e}  row error {:.2e}  excluded {}",
                        oracle.label(),
                        r.error,
                        r.row,
                        r.excluded
                    ));
                }
            }
            Ok(lines)
        };
        match run() {
            Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
