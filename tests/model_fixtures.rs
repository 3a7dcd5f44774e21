//! flashmoe against transformers' own outputs, on the fixtures of `tests/fixtures/moe/`
//! (written by `scripts/make_moe_fixtures.py`; versions in `versions.json`).
//!
//! Every fixture is a tiny random checkpoint saved by transformers (`save_pretrained`), in
//! f32 or bf16, plus transformers' outputs in `expected.safetensors`: each MoE block alone
//! on given rows (`block.{l}.*`) and the chain `x = x + moe(norm(x))` over the MoE layers
//! (`chain.*`), with the router's chosen experts per token (`*.topk`). Each is loaded with
//! `flashmoe::model::load` (what `flashmoe-bench model --checkpoint` runs) and run on the
//! f64 reference and on the CPU executor.
//!
//! Two oracles per bf16 fixture ([`Oracle`]): transformers' bf16 run itself, and the same
//! code run in float64 on the same bf16 checkpoint and inputs (`exact.*`; f32 fixtures
//! have only their f32 run).
//!
//! Acceptance: `max |got - want| <= tol * max |want|`, over the tensor and per token row
//! (rows span four decades of scale), with `tol` 1e-5 for f32 and, for bf16, 1e-2 against
//! the exact oracle and transformers' own rounding error against its bf16 run
//! ([`tolerance`]).
//! A token whose expert set differs from transformers' is excluded (and counted) only when
//! the difference is a near-tie: every expert transformers chose instead ranks within the
//! rounding slack of transformers' router ([`ranking`]) of the reference's k-th expert. Any
//! other difference fails, and so do more than [`MAX_EXCLUDED`] excluded tokens.

use flashmoe::model::{self, Backend, LoadOptions, LoadedModel, ModelLayer, MoeModel};
use flashmoe::reference::{self, RankInput, RouteOverrides};
use flashmoe::{Capacity, Dtype, GivenRouting, LayerPlan, Router};
use safetensors::{Dtype as St, SafeTensors};
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe")
}

/// The fixtures, by directory name.
const FIXTURES: [&str; 35] = [
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
const MAX_EXCLUDED: usize = 4;

/// What a comparison is against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Oracle {
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

    fn label(self) -> &'static str {
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
fn tolerance(dtype: Dtype, oracle: Oracle) -> (f64, f64) {
    match (dtype, oracle) {
        (Dtype::F32, _) => (1e-5, 1e-5),
        (_, Oracle::Exact) => (1e-2, 2e-2),
        (_, Oracle::Run) => (4.0 * BF16_U, 8.0 * BF16_U),
    }
}

/// bf16's unit roundoff (8 significant bits).
const BF16_U: f64 = 1.0 / 256.0;

/// Relative slack of a score computed in f32 where the reference uses f64.
const F32_SLACK: f64 = 5e-5;

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
fn ranking(layer: &ModelLayer, xt: &[f32], oracle: Oracle) -> (Vec<f64>, Vec<f64>) {
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
fn sqrt_softplus(l: f64) -> f64 {
    (if l > 30.0 { l } else { l.exp().ln_1p() }).sqrt()
}

/// The slope of [`sqrt_softplus`] in `l`: `sigmoid(l) / (2 sqrt(softplus(l)))`.
fn slope_sqrt_softplus(l: f64) -> f64 {
    let s = sqrt_softplus(l);
    if s > 0.0 {
        1.0 / (1.0 + (-l).exp()) / (2.0 * s)
    } else {
        0.0
    }
}

/// One tensor of `expected.safetensors`: shape and values (ids as f32, exactly).
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

fn read_expected(dir: &Path) -> HashMap<String, Tensor> {
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
enum Selection {
    Same,
    /// Differs only by experts whose ranking value is within the slack of the reference's
    /// k-th: the largest gap over the allowed slack (at most 1).
    NearTie(f64),
    /// Differs by an expert that is clearly worse (its gap over the allowed slack).
    Flip(f64),
}

/// Compares transformers' chosen set `want` with the reference's `got`, by `scores` with
/// per-expert `slack` ([`ranking`]).
fn selection(
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
fn near_ties(
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
fn row_error(got: &[f32], want: &[f32], h: usize, excluded: &[bool]) -> f64 {
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
fn tensor_error(got: &[f32], want: &[f32], h: usize, excluded: &[bool]) -> f64 {
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
struct Outcome {
    /// [`tensor_error`].
    error: f64,
    /// [`row_error`].
    row: f64,
    excluded: usize,
}

fn check(
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
fn ids_of(t: &Tensor) -> Vec<u32> {
    t.data.iter().map(|&v| v as u32).collect()
}

/// A hash layer's routing of the fixture's token ids (`None` for other layers); a hash
/// layer without ids is an error.
fn hash_routing(layer: &ModelLayer, ids: Option<&Tensor>) -> Result<Option<GivenRouting>, String> {
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

fn load(dir: &Path, tokens: usize) -> LoadedModel {
    let mut opts = LoadOptions::new(tokens);
    opts.progress = false;
    opts.capacity = Capacity::Dropless;
    model::load(dir, &opts).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Runs every comparison of one fixture on one backend; returns one line per comparison.
fn run_fixture(
    dir: &Path,
    expected: &HashMap<String, Tensor>,
    backend: Backend,
    oracle: Oracle,
) -> Result<Vec<(String, Outcome)>, String> {
    let want = |name: &str| {
        let key = oracle.key(name);
        expected
            .get(&key)
            .ok_or_else(|| format!("expected.safetensors has no `{key}`"))
    };
    let chain_in = &expected["chain.input"];
    let tokens = chain_in.shape[0];
    let loaded = load(dir, tokens);
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
    let mut results = Vec::new();
    let h = loaded.layers[0].config.hidden;
    let tol = tolerance(loaded.layers[0].config.dtype, oracle);
    for layer in &loaded.layers {
        let l = layer.index;
        let x = &expected[&format!("block.{l}.input")].data;
        let routing = hash_routing(layer, expected.get(&format!("block.{l}.input_ids")))?;
        let excluded = near_ties(
            layer,
            x,
            want(&format!("block.{l}.topk"))?,
            routing.as_ref(),
            oracle,
        )?;
        let plan = LayerPlan::new(&layer.config).map_err(|e| e.to_string())?;
        let mut b = backend
            .build(plan, layer.weights.clone())
            .map_err(|e| e.to_string())?;
        let input = [RankInput {
            x,
            tokens,
            routing: routing.as_ref(),
        }];
        let out = b
            .forward_host(&input, &RouteOverrides::default())
            .map_err(|e| e.to_string())?;
        let what = format!("block {l}");
        let o = check(
            &what,
            &out.out[0],
            want(&format!("block.{l}.output"))?,
            h,
            &excluded,
            tol,
        )?;
        results.push((what, o));
    }
    let mut m = MoeModel::new(loaded.layers.clone(), backend).map_err(|e| e.to_string())?;
    let chain_ids = expected.get("chain.input_ids").map(ids_of);
    let (out, trace) = m
        .forward_traced_ids(
            std::slice::from_ref(&chain_in.data),
            chain_ids.as_ref().map(std::slice::from_ref),
        )
        .map_err(|e| e.to_string())?;
    let mut excluded = vec![false; tokens];
    let mut state = chain_in.data.clone();
    for (layer, after) in loaded.layers.iter().zip(&trace) {
        let normed = layer.norm.apply(&state, layer.config.dtype);
        let routing = hash_routing(layer, expected.get("chain.input_ids"))?;
        let ties = near_ties(
            layer,
            &normed,
            want(&format!("chain.{}.topk", layer.index))?,
            routing.as_ref(),
            oracle,
        )?;
        excluded.iter_mut().zip(ties).for_each(|(e, t)| *e |= t);
        state = after[0].clone();
    }
    let o = check(
        "chain",
        &out.hidden[0],
        want("chain.output")?,
        h,
        &excluded,
        tol,
    )?;
    results.push(("chain".to_string(), o));
    Ok(results)
}

#[test]
fn every_fixture_matches_transformers() {
    let mut failures = Vec::new();
    for name in FIXTURES {
        let dir = fixtures_dir().join(name);
        let expected = read_expected(&dir);
        // Every bf16 fixture is checked against both oracles, f32 ones against their run.
        let oracles: &[Oracle] = if name.ends_with("-f32") {
            &[Oracle::Run]
        } else {
            &[Oracle::Exact, Oracle::Run]
        };
        for &oracle in oracles {
            for (backend, label) in [(Backend::Reference, "reference"), (Backend::Cpu, "cpu")] {
                let o = oracle.label();
                match run_fixture(&dir, &expected, backend, oracle) {
                    Ok(results) => {
                        for (what, r) in results {
                            println!(
                                "{name:24} {o:5} {label:9} {what:8} error {:.2e}  row error {:.2e}  excluded {}",
                                r.error, r.row, r.excluded
                            );
                        }
                    }
                    Err(e) => failures.push(format!("{name} ({o}, {label}): {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_fixture_is_listed() {
    let mut found: Vec<String> = std::fs::read_dir(fixtures_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("fixture.json").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut listed: Vec<String> = FIXTURES.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(found, listed);
}

/// Against the exact oracle, the 1e-2 bound is enforced and the oracle must be present.
#[test]
fn exact_oracle_is_enforced() {
    let dir = fixtures_dir().join("mixtral-bf16");
    let good = read_expected(&dir);
    assert!(run_fixture(&dir, &good, Backend::Cpu, Oracle::Exact).is_ok());

    // One value off by 1.2e-2 of the block's largest magnitude.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("exact.block.0.output").unwrap();
    let scale = out.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    out.data[3 * out.shape[1] + 5] += 1.2e-2 * scale;
    let err = run_fixture(&dir, &bad, Backend::Cpu, Oracle::Exact).unwrap_err();
    assert!(err.contains("block 0: error"), "{err}");

    let mut missing = read_expected(&dir);
    missing.remove("exact.chain.output");
    let err = run_fixture(&dir, &missing, Backend::Cpu, Oracle::Exact).unwrap_err();
    assert!(err.contains("no `exact.chain.output`"), "{err}");
}

/// The comparison rejects a wrong output and a clear routing flip.
#[test]
fn perturbed_expectations_are_rejected() {
    let dir = fixtures_dir().join("mixtral-f32");
    let good = read_expected(&dir);
    assert!(run_fixture(&dir, &good, Backend::Reference, Oracle::Run).is_ok());

    // One value of one token off by 1e-4 of its row's largest magnitude.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("block.1.output").unwrap();
    let h = out.shape[1];
    let row = &mut out.data[5 * h..6 * h];
    let scale = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    row[7] += 1e-4 * scale;
    let err = run_fixture(&dir, &bad, Backend::Reference, Oracle::Run).unwrap_err();
    assert!(err.contains("block 1: error"), "{err}");

    // The same on the chain output.
    let mut bad = read_expected(&dir);
    let out = bad.get_mut("chain.output").unwrap();
    let v = out.data[3 * h + 2];
    out.data[3 * h + 2] = v + 1e-3 * v.abs().max(1.0);
    let err = run_fixture(&dir, &bad, Backend::Reference, Oracle::Run).unwrap_err();
    assert!(err.contains("chain: error"), "{err}");

    // A token routed to the expert the reference ranks last is a flip, not a near-tie.
    let loaded = load(&dir, 48);
    let layer = &loaded.layers[0];
    let x = &good["block.0.input"].data;
    let k = layer.config.top_k;
    let t = 0;
    let scores =
        reference::selection_scores(&layer.config, &layer.weights, &x[t * h..(t + 1) * h], None);
    let worst = (0..scores.len())
        .min_by(|&a, &b| scores[a].total_cmp(&scores[b]))
        .unwrap();
    let mut bad = read_expected(&dir);
    let topk = bad.get_mut("block.0.topk").unwrap();
    topk.data[t * k] = worst as f32;
    if topk.data[t * k + 1] == worst as f32 {
        topk.data[t * k + 1] = topk.data[t * k];
    }
    let err = run_fixture(&dir, &bad, Backend::Reference, Oracle::Run).unwrap_err();
    assert!(err.contains("layer 0 token 0: transformers chose"), "{err}");
}

#[test]
fn selection_verdicts() {
    let scores = [0.40, 0.30, 0.297, 0.03];
    let slack = [0.002; 4];
    let set = |v: &[usize]| v.iter().copied().collect::<BTreeSet<usize>>();
    assert_eq!(
        selection(&set(&[0, 1]), &set(&[0, 1]), &scores, &slack),
        Selection::Same
    );
    match selection(&set(&[0, 2]), &set(&[0, 1]), &scores, &slack) {
        Selection::NearTie(g) => assert!((g - 0.75).abs() < 1e-9, "{g}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        selection(&set(&[0, 3]), &set(&[0, 1]), &scores, &slack),
        Selection::Flip(_)
    ));
    let tight = [1e-4; 4];
    assert!(matches!(
        selection(&set(&[0, 2]), &set(&[0, 1]), &scores, &tight),
        Selection::Flip(_)
    ));
}

/// Qwen3-MoE configs spell the expert count `num_experts` (transformers 4) or
/// `num_local_experts` (transformers 5, as in the fixture): both load the same layers.
#[test]
fn qwen3_expert_count_spellings_load_alike() {
    let src = fixtures_dir().join("qwen3_moe-f32");
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    assert!(text.contains("\"num_local_experts\""));
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        text.replace("\"num_local_experts\"", "\"num_experts\""),
    )
    .unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(a.family, b.family);
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.config, y.config);
    }
}

/// Qwen3.5-MoE as released is multimodal: `model_type: qwen3_5_moe` with the text model's
/// keys in `text_config` and its layers under `model.language_model.layers`. Rewritten so
/// from the text fixture, it must load the same layers.
#[test]
fn qwen3_5_multimodal_layout_loads_like_the_text_model() {
    let src = fixtures_dir().join("qwen3_5_moe-f32");
    let tmp = tempfile::tempdir().unwrap();
    let text: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let nested = serde_json::json!({"model_type": "qwen3_5_moe", "text_config": text});
    std::fs::write(tmp.path().join("config.json"), nested.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name.replacen("model.layers.", "model.language_model.layers.", 1),
                view,
            )
        })
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n.starts_with("model.language_model.layers.0.mlp")));
    safetensors::serialize_to_file(renamed, None, &tmp.path().join("model.safetensors")).unwrap();
    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(b.family.layer_prefix, "model.language_model.layers");
    assert_eq!(a.layers.len(), b.layers.len());
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.config, y.config);
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.norm, y.norm);
    }
}

/// DeepSeek-V4's own release keeps its layers under a bare `layers.` (no `model.`); its
/// hash-routed layers (`mlp_layer_types` `hash_moe`) load with their token-id table, and a
/// hash layer without one is refused, naming the tensor.
#[test]
fn deepseek_v4_bare_layers_and_hash_layers_load() {
    let src = fixtures_dir().join("deepseek_v4_hash-f32");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.replacen("model.layers.", "layers.", 1), view))
        .collect();
    assert!(renamed
        .iter()
        .any(|(n, _)| n == "layers.0.ffn.gate.tid2eid"));
    safetensors::serialize_to_file(renamed, None, &tmp.path().join("model.safetensors")).unwrap();

    let a = load(&src, 8);
    let b = load(tmp.path(), 8);
    assert_eq!(b.family.layer_prefix, "layers");
    assert_eq!(b.family.hash_layers, vec![0]);
    assert_eq!(b.layers.len(), 2);
    assert_eq!(b.layers[0].config.router, Router::HashSqrtSoftplus);
    assert_ne!(b.layers[1].config.router, Router::HashSqrtSoftplus);
    assert!(b.layers[0].weights.router_bias.is_empty());
    let table = b.layers[0].hash_table.as_ref().expect("hash table");
    assert_eq!(table.len(), 16 * 2);
    for (x, y) in a.layers.iter().zip(&b.layers) {
        assert_eq!(x.weights, y.weights);
        assert_eq!(x.norm, y.norm);
        assert_eq!(x.hash_table, y.hash_table);
    }
    // Routing without token ids is refused, naming the call to make.
    let mut m = MoeModel::new(b.layers.clone(), Backend::Reference).unwrap();
    let e = m.forward(&[vec![0.5; 8 * 64]]).err().unwrap().to_string();
    assert!(e.contains("forward_ids") && e.contains("layer 0"), "{e}");
    let ok = m.forward_ids(&[vec![0.5; 8 * 64]], &[vec![3; 8]]).unwrap();
    assert_eq!(ok.hidden[0].len(), 8 * 64);
    let e = m
        .forward_ids(&[vec![0.5; 8 * 64]], &[vec![16; 8]])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("token_ids") && e.contains("16"), "{e}");

    // A `hash_moe` layer whose checkpoint has no table.
    let plain = fixtures_dir().join("deepseek_v4-f32");
    let tmp2 = tempfile::tempdir().unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(plain.join("config.json")).unwrap()).unwrap();
    cfg["mlp_layer_types"] = serde_json::json!(["hash_moe", "moe"]);
    std::fs::write(tmp2.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        plain.join("model.safetensors"),
        tmp2.path().join("model.safetensors"),
    )
    .unwrap();
    let mut opts = LoadOptions::new(8);
    opts.progress = false;
    let e = model::load(tmp2.path(), &opts).err().unwrap().to_string();
    assert!(e.contains("tid2eid") && e.contains("missing"), "{e}");
}
