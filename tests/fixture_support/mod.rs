//! Shared by the fixture tests (`model_fixtures.rs` on the host backends, `gpu_model.rs`
//! on the GPU): reading `tests/fixtures/moe/`, transformers' two oracles, the near-tie
//! rule and the error measures. See `model_fixtures.rs` for what is compared and why.
#![allow(dead_code)]

use flashmoe::model::{
    self, Backend, LayerBackend, LoadOptions, LoadedModel, ModelLayer, MoeModel,
};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::{Capacity, Dtype, GivenRouting, LayerPlan, LayerWeights, Router};
use safetensors::{Dtype as St, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn fixtures_dir() -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe");
    if built.is_dir() {
        return built;
    }
    // A test executable carried to another machine (the GPU script) runs from the
    // repository root there.
    PathBuf::from("tests/fixtures/moe")
}

/// The fixtures, by directory name.
pub const FIXTURES: [&str; 35] = [
    "mixtral-f32",
    "mixtral-bf16",
    "qwen2_moe-f32",
    "qwen2_moe-bf16",
    "qwen3_moe-f32",
    "qwen3_moe-bf16",
    "qwen3_moe_fused-bf16",
    "olmoe-f32",
    "olmoe-bf16",
    "deepseek_v2_lite-f32",
    "deepseek_v2_lite-bf16",
    "deepseek_v2_group-f32",
    "deepseek_v2_group-bf16",
    "deepseek_v3-f32",
    "deepseek_v3-bf16",
    "glm4_moe-f32",
    "glm4_moe-bf16",
    "kimi_k2-f32",
    "kimi_k2-bf16",
    "qwen3_next-f32",
    "qwen3_next-bf16",
    "qwen3_5_moe-f32",
    "qwen3_5_moe-bf16",
    "phimoe-f32",
    "phimoe-bf16",
    "minimax_m2-f32",
    "minimax_m2-bf16",
    "llama4-f32",
    "llama4-bf16",
    "gpt_oss-f32",
    "gpt_oss-bf16",
    "deepseek_v4-f32",
    "deepseek_v4-bf16",
    "deepseek_v4_hash-f32",
    "deepseek_v4_hash-bf16",
];

/// Most tokens a comparison may exclude as near-ties (of 48 per fixture).
pub const MAX_EXCLUDED: usize = 4;

/// What a comparison is against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Oracle {
    /// transformers' run in the checkpoint's dtype (`block.{l}.output`, `chain.output`).
    Run,
    /// transformers' code in float64 on the same bf16 checkpoint and inputs
    /// (`exact.block.{l}.output`, `exact.chain.output`): the family's maths without a bf16
    /// run's roundings, the oracle of the 1e-2 bound.
    Exact,
}

impl Oracle {
    /// The name of an output or top-k tensor (`block.{l}.output`, ...) for this oracle.
    fn key(self, name: &str) -> String {
        match self {
            Oracle::Run => name.to_string(),
            Oracle::Exact => format!("exact.{name}"),
        }
    }

    /// The oracle's name in reports.
    pub fn label(self) -> &'static str {
        match self {
            Oracle::Run => "run",
            Oracle::Exact => "exact",
        }
    }
}

/// Accepted errors `(tensor, row)`: the largest error relative to the largest magnitude of
/// the whole output ([`tensor_error`]) and of its own row ([`row_error`]).
///
/// f32: 1e-5 for both (observed: at most 6.8e-7 and 1.6e-6).
///
/// bf16 against the exact oracle: 1e-2 of the tensor's largest magnitude (the issue's
/// bound) and 2e-2 of the row's (where expert contributions cancel, flashmoe's own bf16
/// roundings of the activations and of the output weigh more). Both the reference and the
/// CPU executor round the output once to bf16, the CPU executor also the activations.
///
/// bf16 against transformers' bf16 run: transformers rounds to bf16 after the gate and up projections, the SwiGLU product,
/// the down projection, the weighting and the sum (and the shared expert and its gate),
/// each a relative error up to 2^-8, while the reference is exact then rounded once: its
/// own outputs are up to 1.01e-2 (tensor) and 2.3e-2 (row, where expert contributions
/// cancel) from the reference. So: 4 roundings (1.6e-2) of the tensor's largest magnitude,
/// 8 (3.1e-2) of the row's. A wrong expert, weight or norm is off by 1e-1 or more.
pub fn tolerance(dtype: Dtype, oracle: Oracle) -> (f64, f64) {
    match (dtype, oracle) {
        (Dtype::F32, _) => (1e-5, 1e-5),
        (_, Oracle::Exact) => (1e-2, 2e-2),
        (_, Oracle::Run) => (4.0 * BF16_U, 8.0 * BF16_U),
    }
}

/// bf16's unit roundoff (8 significant bits).
pub const BF16_U: f64 = 1.0 / 256.0;

/// Relative slack of a score computed in f32 where the reference uses f64.
pub const F32_SLACK: f64 = 5e-5;

/// What a token's experts are ranked by, and how far each value may be off in
/// transformers' computation (the near-tie slack).
///
/// Where transformers computes the router logits in bf16 (Mixtral, Qwen, OLMoE in a bf16
/// model: `F.linear` in the model dtype), each logit is rounded, so it may be off by
/// `|l| * 2^-8`; softmax ranks by logit, so two experts are a near-tie when their logits
/// are closer than the sum of their slacks. Routers computed in f32 (f32 models, and the
/// DeepSeek family whose router weight transformers keeps in f32) are ranked by the
/// reference's selection scores (group-masked) with a relative slack of 5e-5 each.
///
/// MiniMax-M2 also computes its logits in bf16 but ranks by `sigmoid(l) + b`: a logit off
/// by `|l| * 2^-8` moves the score by at most a quarter of that (the sigmoid's slope).
///
/// gpt-oss ranks by the biased logit `l + b`, computed in bf16 (`F.linear` with the bias):
/// off by `|l + b| * 2^-8`.
///
/// DeepSeek-V4 ranks by `sqrt(softplus(l)) + b` with `l` and the square root in bf16.
///
/// Against the [`Oracle::Exact`] run of a bf16 model, the logits transformers ranked by
/// are exact, but a chain's router input differs: flashmoe's residual stream and normed
/// rows are bf16 (as in a bf16 run), the exact run's are not. Each input value is then off
/// by up to `2^-8` of itself (its rounding and the earlier layers'), so each logit by up
/// to `2^-8 sum_j |w_j x_j|`, which enters every score through its slope in the logit.
pub fn ranking(layer: &ModelLayer, xt: &[f32], oracle: Oracle) -> (Vec<f64>, Vec<f64>) {
    let cfg = &layer.config;
    let bf16 = cfg.dtype != Dtype::F32;
    let bf16_logits = bf16 && !cfg.router_f32 && cfg.group_limit.is_none();
    let dot = |w: &[f32], abs: bool| -> f64 {
        w.iter()
            .zip(xt)
            .map(|(a, b)| f64::from(*a) * f64::from(*b))
            .map(|v| if abs { v.abs() } else { v })
            .sum()
    };
    let rows = layer.weights.router.chunks_exact(cfg.hidden);
    let logits: Vec<f64> = rows.clone().map(|w| dot(w, false)).collect();
    // The input's share of each logit's slack (0 where the inputs are the same).
    let input: Vec<f64> = rows
        .map(|w| {
            if bf16 && oracle == Oracle::Exact {
                dot(w, true) * BF16_U
            } else {
                0.0
            }
        })
        .collect();
    let sigmoid = |l: f64| 1.0 / (1.0 + (-l).exp());
    match cfg.router {
        Router::Softmax { .. } | Router::SigmoidInput | Router::SparseMixer { .. }
            if bf16_logits =>
        {
            let slack = logits
                .iter()
                .zip(&input)
                .map(|(l, d)| l.abs() * BF16_U + d)
                .collect();
            (logits, slack)
        }
        Router::TopkSoftmax if bf16_logits => {
            let biased: Vec<f64> = logits
                .iter()
                .zip(&layer.weights.router_bias)
                .map(|(l, b)| l + f64::from(*b))
                .collect();
            let slack = biased
                .iter()
                .zip(&input)
                .map(|(l, d)| l.abs() * BF16_U + d)
                .collect();
            (biased, slack)
        }
        Router::SigmoidBias { .. } if bf16_logits => {
            let scores = reference::selection_scores(cfg, &layer.weights, xt, None);
            let slack = logits
                .iter()
                .zip(&input)
                .map(|(l, d)| 0.25 * (l.abs() * BF16_U + d))
                .collect();
            (scores, slack)
        }
        Router::SqrtSoftplusBias { .. } if bf16_logits => {
            // s = sqrt(softplus(l)), computed in bf16: the logit's rounding moves s by the
            // slope sigmoid(l) / (2 s) times |l| 2^-8, and s is rounded once more.
            let scores = reference::selection_scores(cfg, &layer.weights, xt, None);
            let slack = logits
                .iter()
                .zip(&input)
                .map(|(&l, d)| {
                    slope_sqrt_softplus(l) * (l.abs() * BF16_U + d) + sqrt_softplus(l) * BF16_U
                })
                .collect();
            (scores, slack)
        }
        _ => {
            // Routers computed in f32: scores off by their f32 rounding, plus the input's
            // share through the score's slope in its own logit (softmax probabilities `p`:
            // at most `2p` per unit of logit, counting the other logits' shifts).
            let scores = reference::selection_scores(cfg, &layer.weights, xt, None);
            let slack = scores
                .iter()
                .zip(&logits)
                .zip(&input)
                .map(|((s, &l), d)| {
                    let slope = match cfg.router {
                        Router::Softmax { .. } => 2.0 * s.abs(),
                        Router::SigmoidBias { .. } => sigmoid(l) * (1.0 - sigmoid(l)),
                        Router::SqrtSoftplusBias { .. } => slope_sqrt_softplus(l),
                        _ => 1.0,
                    };
                    s.abs() * F32_SLACK + slope * d
                })
                .collect();
            (scores, slack)
        }
    }
}

/// `sqrt(softplus(l))`.
pub fn sqrt_softplus(l: f64) -> f64 {
    (if l > 30.0 { l } else { l.exp().ln_1p() }).sqrt()
}

/// The slope of [`sqrt_softplus`] in `l`: `sigmoid(l) / (2 sqrt(softplus(l)))`.
pub fn slope_sqrt_softplus(l: f64) -> f64 {
    let s = sqrt_softplus(l);
    if s > 0.0 {
        1.0 / (1.0 + (-l).exp()) / (2.0 * s)
    } else {
        0.0
    }
}

/// One tensor of `expected.safetensors`: shape and values (ids as f32, exactly).
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

pub fn read_expected(dir: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = match view.dtype() {
                St::I32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                    .collect(),
                d => model::checkpoint::decode(view.data(), d).unwrap(),
            };
            let shape = view.shape().to_vec();
            (name, Tensor { shape, data })
        })
        .collect()
}

/// How one token's expert set compares with transformers'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Selection {
    Same,
    /// Differs only by experts whose ranking value is within the slack of the reference's
    /// k-th: the largest gap over the allowed slack (at most 1).
    NearTie(f64),
    /// Differs by an expert that is clearly worse (its gap over the allowed slack).
    Flip(f64),
}

/// Compares transformers' chosen set `want` with the reference's `got`, by `scores` with
/// per-expert `slack` ([`ranking`]).
pub fn selection(
    want: &BTreeSet<usize>,
    got: &BTreeSet<usize>,
    scores: &[f64],
    slack: &[f64],
) -> Selection {
    if want == got {
        return Selection::Same;
    }
    let Some(kth) = got
        .iter()
        .copied()
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
    else {
        return Selection::Flip(f64::INFINITY);
    };
    let worst = want
        .difference(got)
        .map(|&e| (scores[kth] - scores[e]) / (slack[kth] + slack[e]).max(f64::MIN_POSITIVE))
        .fold(0f64, f64::max);
    if worst <= 1.0 {
        Selection::NearTie(worst)
    } else {
        Selection::Flip(worst)
    }
}

/// The tokens to exclude from one layer's comparison: `x` are the rows the layer's router
/// saw (normed), `topk` transformers' ids. Errors on a flip that is not a near-tie.
pub fn near_ties(
    layer: &ModelLayer,
    x: &[f32],
    topk: &Tensor,
    routing: Option<&GivenRouting>,
    oracle: Oracle,
) -> Result<Vec<bool>, String> {
    let cfg = &layer.config;
    let (h, k) = (cfg.hidden, cfg.top_k);
    let tokens = x.len() / h;
    let plan = LayerPlan::new(cfg).map_err(|e| e.to_string())?;
    let ov = RouteOverrides::default();
    let g = reference::gate(&plan, &layer.weights, x, tokens, routing, &ov)
        .map_err(|e| e.to_string())?;
    let mut out = vec![false; tokens];
    for t in 0..tokens {
        let want: BTreeSet<usize> = topk.data[t * k..(t + 1) * k]
            .iter()
            .map(|&v| v as usize)
            .collect();
        let got: BTreeSet<usize> = g.ids[t * k..(t + 1) * k]
            .iter()
            .map(|&v| v as usize)
            .collect();
        let (scores, slack) = ranking(layer, &x[t * h..(t + 1) * h], oracle);
        match selection(&want, &got, &scores, &slack) {
            Selection::Same => {}
            Selection::NearTie(_) => out[t] = true,
            Selection::Flip(gap) => {
                return Err(format!(
                    "layer {} token {t}: transformers chose {want:?}, the reference {got:?} \
                     (gap {gap:.3e} times the near-tie slack)",
                    layer.index
                ))
            }
        }
    }
    Ok(out)
}

/// The largest row error relative to the row's largest magnitude, over kept rows.
pub fn row_error(got: &[f32], want: &[f32], h: usize, excluded: &[bool]) -> f64 {
    got.chunks(h)
        .zip(want.chunks(h))
        .zip(excluded)
        .filter(|(_, &x)| !x)
        .map(|((g, w), _)| {
            let scale = w.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
            let worst = g.iter().zip(w).fold(0f64, |m, (a, b)| {
                let d = (f64::from(*a) - f64::from(*b)).abs();
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    m.max(d)
                }
            });
            if scale > 0.0 {
                worst / scale
            } else {
                worst
            }
        })
        .fold(0f64, f64::max)
}

/// The largest `|got - want|` over kept rows divided by the largest `|want|` of all rows.
pub fn tensor_error(got: &[f32], want: &[f32], h: usize, excluded: &[bool]) -> f64 {
    let scale = want.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let worst = got
        .chunks(h)
        .zip(want.chunks(h))
        .zip(excluded)
        .filter(|(_, &x)| !x)
        .flat_map(|((g, w), _)| g.iter().zip(w))
        .fold(0f64, |m, (a, b)| {
            let d = (f64::from(*a) - f64::from(*b)).abs();
            if d.is_nan() {
                f64::INFINITY
            } else {
                m.max(d)
            }
        });
    worst / scale.max(f64::MIN_POSITIVE)
}

/// One comparison's result.
#[derive(Debug)]
pub struct Outcome {
    /// [`tensor_error`].
    pub error: f64,
    /// [`row_error`].
    pub row: f64,
    pub excluded: usize,
}

pub fn check(
    what: &str,
    got: &[f32],
    want: &Tensor,
    h: usize,
    excluded: &[bool],
    tol: (f64, f64),
) -> Result<Outcome, String> {
    if got.len() != want.data.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.data.len()
        ));
    }
    let error = tensor_error(got, &want.data, h, excluded);
    let row = row_error(got, &want.data, h, excluded);
    let n = excluded.iter().filter(|&&x| x).count();
    if n > MAX_EXCLUDED {
        return Err(format!(
            "{what}: {n} near-tie tokens excluded, at most {MAX_EXCLUDED}"
        ));
    }
    let (tol, row_tol) = tol;
    if !(error <= tol && row <= row_tol) {
        return Err(format!(
            "{what}: error {error:.3e} (tolerance {tol:.1e}), row error {row:.3e} (tolerance {row_tol:.1e})"
        ));
    }
    Ok(Outcome {
        error,
        row,
        excluded: n,
    })
}

/// Token ids stored as a tensor (exact in f32).
pub fn ids_of(t: &Tensor) -> Vec<u32> {
    t.data.iter().map(|&v| v as u32).collect()
}

/// A hash layer's routing of the fixture's token ids (`None` for other layers); a hash
/// layer without ids is an error.
pub fn hash_routing(
    layer: &ModelLayer,
    ids: Option<&Tensor>,
) -> Result<Option<GivenRouting>, String> {
    match (&layer.hash_table, ids) {
        (None, _) => Ok(None),
        (Some(table), Some(ids)) => {
            GivenRouting::from_table(table, layer.config.top_k, &ids_of(ids))
                .map(Some)
                .map_err(|e| e.to_string())
        }
        (Some(_), None) => Err(format!(
            "layer {} is hash-routed but has no ids",
            layer.index
        )),
    }
}

pub fn load(dir: &Path, tokens: usize) -> LoadedModel {
    let mut opts = LoadOptions::new(tokens);
    opts.progress = false;
    opts.capacity = Capacity::Dropless;
    model::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Builds one layer's backend from its plan and weights (the reference, the CPU executor,
/// a GPU layer).
pub type Factory<'a> =
    dyn Fn(LayerPlan, Arc<LayerWeights>) -> flashmoe::Result<Box<dyn LayerBackend>> + 'a;

/// The factory of a built-in host backend.
pub fn host(
    backend: Backend,
) -> impl Fn(LayerPlan, Arc<LayerWeights>) -> flashmoe::Result<Box<dyn LayerBackend>> {
    move |plan, weights| backend.build(plan, weights)
}

/// A chain run: the final state and the state after every layer (`trace[l][rank]`).
pub type ChainRun = (Vec<f32>, Vec<Vec<Vec<f32>>>);

/// Loads a fixture (tokens from its chain input) and checks its MoE layers are
/// transformers'.
pub fn load_fixture(dir: &Path, expected: &HashMap<String, Tensor>) -> Result<LoadedModel, String> {
    let loaded = load(dir, expected["chain.input"].shape[0]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixture.json")).unwrap()).unwrap();
    let moe: Vec<usize> = meta["moe_layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let indices: Vec<usize> = loaded.layers.iter().map(|l| l.index).collect();
    if indices != moe {
        return Err(format!("MoE layers {indices:?}, transformers has {moe:?}"));
    }
    Ok(loaded)
}

/// The tensor `name` of `oracle` in `expected`.
fn want<'a>(
    expected: &'a HashMap<String, Tensor>,
    oracle: Oracle,
    name: &str,
) -> Result<&'a Tensor, String> {
    let key = oracle.key(name);
    expected
        .get(&key)
        .ok_or_else(|| format!("expected.safetensors has no `{key}`"))
}

/// Every block alone on its own rows, with a backend from `build`.
pub fn run_blocks(
    loaded: &LoadedModel,
    expected: &HashMap<String, Tensor>,
    build: &Factory,
    oracle: Oracle,
) -> Result<Vec<(String, Outcome)>, String> {
    let h = loaded.layers[0].config.hidden;
    let tol = tolerance(loaded.layers[0].config.dtype, oracle);
    let mut results = Vec::new();
    for layer in &loaded.layers {
        let l = layer.index;
        let input = &expected[&format!("block.{l}.input")];
        let x = &input.data;
        let routing = hash_routing(layer, expected.get(&format!("block.{l}.input_ids")))?;
        let topk = want(expected, oracle, &format!("block.{l}.topk"))?;
        let excluded = near_ties(layer, x, topk, routing.as_ref(), oracle)?;
        let plan = LayerPlan::new(&layer.config).map_err(|e| e.to_string())?;
        let mut b = build(plan, layer.weights.clone()).map_err(|e| e.to_string())?;
        let rows = [RankInput {
            x,
            tokens: input.shape[0],
            routing: routing.as_ref(),
        }];
        let out = b
            .forward_host(&rows, &RouteOverrides::default())
            .map_err(|e| e.to_string())?;
        let what = format!("block {l}");
        let want = want(expected, oracle, &format!("block.{l}.output"))?;
        let o = check(&what, &out.out[0], want, h, &excluded, tol)?;
        results.push((what, o));
    }
    Ok(results)
}

/// Checks a chain run (`run`: final state and the state after every layer) against the
/// fixture's chain; near-ties come from the run's own states.
pub fn check_chain(
    loaded: &LoadedModel,
    expected: &HashMap<String, Tensor>,
    run: &ChainRun,
    oracle: Oracle,
) -> Result<Outcome, String> {
    let chain_in = &expected["chain.input"];
    let (h, tokens) = (chain_in.shape[1], chain_in.shape[0]);
    let (hidden, trace) = run;
    let mut excluded = vec![false; tokens];
    let mut state = chain_in.data.clone();
    for (layer, after) in loaded.layers.iter().zip(trace) {
        let normed = layer.norm.apply(&state, layer.config.dtype);
        let routing = hash_routing(layer, expected.get("chain.input_ids"))?;
        let topk = want(expected, oracle, &format!("chain.{}.topk", layer.index))?;
        let ties = near_ties(layer, &normed, topk, routing.as_ref(), oracle)?;
        excluded.iter_mut().zip(ties).for_each(|(e, t)| *e |= t);
        state = after[0].clone();
    }
    let tol = tolerance(loaded.layers[0].config.dtype, oracle);
    let want = want(expected, oracle, "chain.output")?;
    check("chain", hidden, want, h, &excluded, tol)
}

/// The chain through the host model driver with a backend per layer from `build`.
pub fn host_chain(
    loaded: &LoadedModel,
    expected: &HashMap<String, Tensor>,
    build: &Factory,
) -> Result<ChainRun, String> {
    let mut m = MoeModel::with_factory(loaded.layers.clone(), |_, plan, w| build(plan, w))
        .map_err(|e| e.to_string())?;
    let chain_ids = expected.get("chain.input_ids").map(ids_of);
    let (out, trace) = m
        .forward_traced_ids(
            std::slice::from_ref(&expected["chain.input"].data),
            chain_ids.as_ref().map(std::slice::from_ref),
        )
        .map_err(|e| e.to_string())?;
    let hidden = out.hidden.into_iter().next().unwrap_or_default();
    Ok((hidden, trace))
}

/// Every comparison of one fixture with backends from `build`: each block, then the chain
/// through the host model driver.
pub fn run_fixture(
    dir: &Path,
    expected: &HashMap<String, Tensor>,
    build: &Factory,
    oracle: Oracle,
) -> Result<Vec<(String, Outcome)>, String> {
    let loaded = load_fixture(dir, expected)?;
    let mut results = run_blocks(&loaded, expected, build, oracle)?;
    let run = host_chain(&loaded, expected, build)?;
    results.push((
        "chain".to_string(),
        check_chain(&loaded, expected, &run, oracle)?,
    ));
    Ok(results)
}

/// The oracles of a fixture: a bf16 fixture's exact and bf16 runs, an f32 fixture's run.
pub fn oracles(name: &str) -> &'static [Oracle] {
    if name.ends_with("-f32") {
        &[Oracle::Run]
    } else {
        &[Oracle::Exact, Oracle::Run]
    }
}
