//! Helpers of the GPU integration tests: finding a usable GPU (or saying why the tests
//! skip), the "plain" low-precision emulation that sets the bf16/f16 tolerance, and the
//! comparison of a GPU forward against the reference.
#![allow(dead_code)]

use cudarc::driver::{CudaContext, CudaStream};
use flashmoe::config::{Dtype, GivenRouting, MoeConfig, Router};
use flashmoe::gpu::{kernels, layer::CUBIN, probe};
use flashmoe::reference::{self, activation, GateOutput, LayerOutput, RankInput, RouteOverrides};
use flashmoe::{LayerPlan, LayerWeights};
use std::sync::{Arc, Mutex, MutexGuard};

/// Serialises the GPU tests of one test binary: each layer launch fills the device, and
/// the timeout tests measure wall time.
static GPU: Mutex<()> = Mutex::new(());

/// A stream on GPU 0 (and the lock that keeps the other GPU tests of this binary off the
/// device meanwhile) when a GPU and the layer kernel are usable; otherwise prints why the
/// test is skipped and returns None (or panics when FLASHMOE_EXPECT_GPU is set).
pub fn gpu_stream(test: &str) -> Option<(MutexGuard<'static, ()>, Arc<CudaStream>)> {
    let why = (|| -> Result<Arc<CudaStream>, String> {
        let gpus = probe::probe().map_err(|e| e.to_string())?;
        let g = gpus.first().ok_or("no GPU listed")?;
        kernels::cubin(CUBIN).map_err(|e| e.to_string())?;
        kernels::check_device(g.compute_capability).map_err(|e| e.to_string())?;
        let ctx = CudaContext::new(g.ordinal).map_err(|e| e.to_string())?;
        ctx.new_stream().map_err(|e| e.to_string())
    })();
    match why {
        Ok(s) => Some((GPU.lock().unwrap_or_else(|e| e.into_inner()), s)),
        Err(reason) => {
            assert!(
                !flashmoe::gpu::expect_gpu(),
                "{test}: FLASHMOE_EXPECT_GPU is set but the GPU is unusable: {reason}"
            );
            println!("skipped {test}: {reason}");
            None
        }
    }
}

/// `||a - b|| / ||b||` (L2), with `b`'s norm floored to avoid dividing by zero.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    num.sqrt() / den.sqrt().max(1e-30)
}

/// Flattens every rank's output.
pub fn flat(out: &[Vec<f32>]) -> Vec<f32> {
    out.iter().flatten().copied().collect()
}

fn dot32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// A plain low-precision implementation of one expert MLP: f32 accumulation, the
/// activation and the expert output rounded to the dtype (what a straightforward bf16
/// kernel stores).
fn plain_mlp(cfg: &MoeConfig, w0: &[f32], w1: &[f32], width: usize, x: &[f32]) -> Vec<f32> {
    let h = cfg.hidden;
    let d = cfg.dtype;
    let act: Vec<f32> = (0..width)
        .map(|c| {
            let g = dot32(&w0[c * h..(c + 1) * h], x);
            let a = if cfg.mlp.is_gated() {
                let u = dot32(&w0[(width + c) * h..(width + c + 1) * h], x);
                activation(cfg.mlp, f64::from(g)) as f32 * u
            } else {
                activation(cfg.mlp, f64::from(g)) as f32
            };
            d.round(a)
        })
        .collect();
    (0..h)
        .map(|o| d.round(dot32(&w1[o * width..(o + 1) * width], &act)))
        .collect()
}

/// The layer computed by the plain low-precision implementation, following `gates`.
pub fn plain_forward(
    cfg: &MoeConfig,
    w: &LayerWeights,
    inputs: &[RankInput],
    gates: &[GateOutput],
    k: usize,
) -> Vec<Vec<f32>> {
    let h = cfg.hidden;
    inputs
        .iter()
        .zip(gates)
        .map(|(input, g)| {
            let mut out = vec![0f32; input.tokens * h];
            for t in 0..input.tokens {
                let x = &input.x[t * h..(t + 1) * h];
                let mut acc = vec![0f32; h];
                for j in 0..k {
                    let i = t * k + j;
                    if g.slots[i] < 0 {
                        continue;
                    }
                    let e = &w.experts[g.ids[i] as usize];
                    let y = plain_mlp(cfg, &e.w0, &e.w1, cfg.intermediate, x);
                    for (a, v) in acc.iter_mut().zip(&y) {
                        *a += g.weights[i] * v;
                    }
                }
                if let (Some(s), Some(sw)) = (cfg.shared, &w.shared) {
                    let y = plain_mlp(cfg, &sw.w0, &sw.w1, s.count * s.intermediate, x);
                    let gs = match &w.shared_gate {
                        Some(gw) if s.gated => 1.0 / (1.0 + (-dot32(x, gw)).exp()),
                        _ => 1.0,
                    };
                    for (a, v) in acc.iter_mut().zip(&y) {
                        *a += gs * v;
                    }
                }
                for (o, a) in out[t * h..(t + 1) * h].iter_mut().zip(&acc) {
                    *o = cfg.dtype.round(*a);
                }
            }
            out
        })
        .collect()
}

/// The relative tolerance of the GPU output against the reference: 1e-5 in f32; in
/// bf16/f16 twice the plain implementation's error plus a 1e-2 floor (DESIGN.md).
pub fn tolerance(dtype: Dtype, plain_err: f64) -> f64 {
    match dtype {
        Dtype::F32 => 1e-5,
        Dtype::Bf16 | Dtype::F16 => 2.0 * plain_err + 1e-2,
    }
}

/// The f64 selection score of every expert for one token (softmax probability, or
/// sigmoid + selection bias), used to tell a near-tie from a routing bug.
pub fn selection_scores(
    cfg: &MoeConfig,
    w: &LayerWeights,
    x: &[f32],
    logit_bias: Option<&[f32]>,
) -> Vec<f64> {
    let h = cfg.hidden;
    let logits: Vec<f64> = (0..cfg.experts)
        .map(|e| {
            let s: f64 = w.router[e * h..(e + 1) * h]
                .iter()
                .zip(x)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            s + logit_bias.map_or(0.0, |b| f64::from(b[e]))
        })
        .collect();
    match cfg.router {
        Router::SigmoidBias { .. } => logits
            .iter()
            .enumerate()
            .map(|(e, s)| 1.0 / (1.0 + (-s).exp()) + f64::from(w.router_bias[e]))
            .collect(),
        _ => {
            let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = logits.iter().map(|s| (s - m).exp()).sum();
            logits.iter().map(|s| (s - m).exp() / z).collect()
        }
    }
}

/// Routing that reproduces `gate` under [`Router::Given`], rows padded to `cfg.top_k`
/// with unused distinct ids (only the first `k` choices are read).
pub fn given_from_gate(
    cfg: &MoeConfig,
    gate: &GateOutput,
    tokens: usize,
    k: usize,
) -> GivenRouting {
    let mut ids = Vec::with_capacity(tokens * cfg.top_k);
    let mut weights = Vec::with_capacity(tokens * cfg.top_k);
    for t in 0..tokens {
        let row = &gate.ids[t * k..(t + 1) * k];
        ids.extend_from_slice(row);
        weights.extend_from_slice(&gate.weights[t * k..(t + 1) * k]);
        let mut pad = (0..cfg.experts as u32).filter(|e| !row.contains(e));
        for _ in k..cfg.top_k {
            ids.push(pad.next().unwrap());
            weights.push(0.0);
        }
    }
    GivenRouting { ids, weights }
}

/// Compares a GPU forward with the reference: the router's choices (identical, except
/// near-ties of the f64 scores), then slots, counts and drops exactly, the weights to
/// 1e-4, and the outputs within [`tolerance`]. When near-ties flipped a choice, the
/// dispatch, experts and combine are checked against the reference run on the GPU's
/// own routing. Returns (relative error, tolerance, flipped tokens).
pub fn check_against_reference(
    plan: &LayerPlan,
    w: &LayerWeights,
    inputs: &[RankInput],
    ov: &RouteOverrides,
    got: &LayerOutput,
    label: &str,
) -> (f64, f64, usize) {
    let cfg = &plan.config;
    let k = ov.effective_top_k(cfg).unwrap();
    let want = reference::forward(plan, w, inputs, ov).unwrap();
    let h = cfg.hidden;
    let mut flipped = 0;
    for (r, (g, e)) in got.gates.iter().zip(&want.gates).enumerate() {
        let tokens = inputs[r].tokens;
        assert_eq!(g.ids.len(), tokens * k, "{label}: rank {r} ids length");
        for t in 0..tokens {
            let (gi, ei) = (&g.ids[t * k..(t + 1) * k], &e.ids[t * k..(t + 1) * k]);
            if gi == ei {
                continue;
            }
            assert_ne!(cfg.router, Router::Given, "{label}: given routing changed");
            let x = &inputs[r].x[t * h..(t + 1) * h];
            let sel = selection_scores(cfg, w, x, ov.logit_bias.as_deref());
            for (a, b) in gi.iter().zip(ei).filter(|(a, b)| a != b) {
                let gap = (sel[*a as usize] - sel[*b as usize]).abs();
                assert!(
                    gap < 1e-5,
                    "{label}: rank {r} token {t}: GPU chose {gi:?}, reference {ei:?} (score gap {gap:e})"
                );
            }
            flipped += 1;
        }
    }
    let oracle = if flipped == 0 {
        want
    } else {
        let mut cfg2 = cfg.clone();
        cfg2.router = Router::Given;
        let plan2 = LayerPlan::new(&cfg2).unwrap();
        assert_eq!(plan2.capacity, plan.capacity);
        let given: Vec<GivenRouting> = got
            .gates
            .iter()
            .zip(inputs)
            .map(|(g, i)| given_from_gate(cfg, g, i.tokens, k))
            .collect();
        let inputs2: Vec<RankInput> = inputs
            .iter()
            .zip(&given)
            .map(|(i, g)| RankInput {
                x: i.x,
                tokens: i.tokens,
                routing: Some(g),
            })
            .collect();
        let ov2 = RouteOverrides {
            top_k: ov.top_k,
            logit_bias: None,
        };
        reference::forward(&plan2, w, &inputs2, &ov2).unwrap()
    };
    for (r, (g, e)) in got.gates.iter().zip(&oracle.gates).enumerate() {
        assert_eq!(g.slots, e.slots, "{label}: rank {r} slots");
        assert_eq!(
            g.expert_counts, e.expert_counts,
            "{label}: rank {r} expert counts"
        );
        assert_eq!(g.dropped, e.dropped, "{label}: rank {r} dropped");
        for (i, (a, b)) in g.weights.iter().zip(&e.weights).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                "{label}: rank {r} pair {i}: weight {a} vs reference {b}"
            );
        }
    }
    assert_eq!(got.dropped, oracle.dropped, "{label}: total dropped");
    assert_eq!(
        got.expert_counts, oracle.expert_counts,
        "{label}: total counts"
    );
    for (r, o) in got.out.iter().enumerate() {
        assert!(
            o.iter().all(|v| v.is_finite()),
            "{label}: rank {r} output not finite"
        );
    }
    let plain = plain_forward(cfg, w, inputs, &oracle.gates, k);
    let plain_err = rel_err(&flat(&plain), &flat(&oracle.out));
    let tol = tolerance(cfg.dtype, plain_err);
    let err = rel_err(&flat(&got.out), &flat(&oracle.out));
    assert!(
        err <= tol,
        "{label}: relative error {err:e} > tolerance {tol:e} (plain {} error {plain_err:e})",
        cfg.dtype.name()
    );
    // And the comparison every executor of the project passes (max-abs normalised).
    let shared = reference::normalised_error(&flat(&got.out), &flat(&oracle.out));
    assert!(
        shared <= reference::tolerance(cfg.dtype),
        "{label}: normalised error {shared:e} > {:e}",
        reference::tolerance(cfg.dtype)
    );
    (err, tol, flipped)
}
