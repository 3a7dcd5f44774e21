//! The router: logits, top-k selection, weights, and slot assignment.

use super::{check_input, dot64, sigmoid, GateOutput, RouteOverrides};
use crate::config::{GivenRouting, MoeConfig, Router};
use crate::error::Result;
use crate::plan::LayerPlan;
use crate::weights::LayerWeights;

/// Indices of the `k` largest scores, in descending order, ties to the lower index.
fn top_k(scores: &[f64], k: usize) -> Vec<usize> {
    let mut taken = vec![false; scores.len()];
    let mut chosen = Vec::with_capacity(k);
    for _ in 0..k {
        let mut best: Option<usize> = None;
        for (e, &s) in scores.iter().enumerate() {
            if taken[e] {
                continue;
            }
            // Strictly greater: the scan is in ascending id, so a tie keeps the lower id.
            if best.is_none_or(|b| s > scores[b]) {
                best = Some(e);
            }
        }
        if let Some(b) = best {
            taken[b] = true;
            chosen.push(b);
        }
    }
    chosen
}

/// Routes the tokens of one rank: `k` expert ids and weights per token, in choice order.
///
/// Inputs are assumed checked (see [`gate`]); `k` is the effective top-k.
pub(crate) fn route(
    cfg: &MoeConfig,
    w: &LayerWeights,
    x: &[f32],
    tokens: usize,
    routing: Option<&GivenRouting>,
    k: usize,
    logit_bias: Option<&[f32]>,
) -> (Vec<u32>, Vec<f32>) {
    let h = cfg.hidden;
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    if let (Router::Given, Some(r)) = (cfg.router, routing) {
        for t in 0..tokens {
            let base = t * cfg.top_k;
            ids.extend_from_slice(&r.ids[base..base + k]);
            weights.extend_from_slice(&r.weights[base..base + k]);
        }
        return (ids, weights);
    }
    let scale = f64::from(cfg.routed_scale);
    // Every token's logits at once (bit-identical to `dot64` per expert).
    let experts = cfg.experts.max(1);
    let all = super::logits::logits64(x, tokens, &w.router, h);
    if let (Router::HashSqrtSoftplus, Some(r)) = (cfg.router, routing) {
        // DeepSeek-V4's hash layers: the given ids, weighted by their scores.
        for (t, lg) in all.chunks(experts).take(tokens).enumerate() {
            let (_, score) = scores_from_logits(cfg, w, lg, logit_bias);
            let chosen = &r.ids[t * cfg.top_k..t * cfg.top_k + k];
            let picked = chosen.iter().map(|&e| score[e as usize]).collect();
            ids.extend_from_slice(chosen);
            weights.extend(
                renormalized(picked, true, 1e-20)
                    .iter()
                    .map(|&v| (v * scale) as f32),
            );
        }
        return (ids, weights);
    }
    if let Router::SparseMixer { .. } = cfg.router {
        for lg in all.chunks(experts).take(tokens) {
            let (sel, _) = scores_from_logits(cfg, w, lg, logit_bias);
            for (e, wt) in sparse_mixer(&sel, f64::from(cfg.router.jitter()), k) {
                ids.push(e as u32);
                weights.push((wt * scale) as f32);
            }
        }
        return (ids, weights);
    }
    for lg in all.chunks(experts).take(tokens) {
        let (sel, gate) = scores_from_logits(cfg, w, lg, logit_bias);
        let chosen = top_k(&sel, k);
        let mut wts: Vec<f64> = match cfg.router {
            Router::Softmax { renormalize } => {
                renormalized(chosen.iter().map(|&e| gate[e]).collect(), renormalize, 0.0)
            }
            // DeepSeek-V3 and V4 divide by the sum + 1e-20.
            Router::SigmoidBias { renormalize } | Router::SqrtSoftplusBias { renormalize } => {
                renormalized(
                    chosen.iter().map(|&e| gate[e]).collect(),
                    renormalize,
                    1e-20,
                )
            }
            // gpt-oss: the softmax over the k chosen (biased) logits.
            Router::TopkSoftmax => {
                let top = chosen.first().map_or(0.0, |&e| sel[e]);
                let ex: Vec<f64> = chosen.iter().map(|&e| (sel[e] - top).exp()).collect();
                let z: f64 = ex.iter().sum();
                ex.iter().map(|v| v / z).collect()
            }
            Router::SigmoidInput => chosen.iter().map(|&e| gate[e]).collect(),
            // Routed above (`sparse_mixer`).
            Router::SparseMixer { .. } => Vec::new(),
            // Without routing the inputs were refused by `check_input`; route nothing.
            Router::Given | Router::HashSqrtSoftplus => Vec::new(),
        };
        wts.iter_mut().for_each(|v| *v *= scale);
        ids.extend(chosen.iter().map(|&e| e as u32));
        weights.extend(wts.iter().map(|&v| v as f32));
    }
    (ids, weights)
}

/// `(selection scores, gate values)` of every expert for one token row `xt`: softmax
/// probabilities (both), or `sigmoid(s) + bias` and `sigmoid(s)` (sigmoid-bias router); empty
/// for [`Router::Given`].
fn scores(
    cfg: &MoeConfig,
    w: &LayerWeights,
    xt: &[f32],
    logit_bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let h = cfg.hidden;
    let logits: Vec<f64> = (0..cfg.experts)
        .map(|e| dot64(xt, w.router.get(e * h..(e + 1) * h).unwrap_or(&[])))
        .collect();
    scores_from_logits(cfg, w, &logits, logit_bias)
}

/// [`scores`] from a token's logits (before the per-call `logit_bias`).
fn scores_from_logits(
    cfg: &MoeConfig,
    w: &LayerWeights,
    raw: &[f64],
    logit_bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let logits = raw.iter().enumerate().map(|(e, &l)| {
        l + logit_bias
            .and_then(|b| b.get(e))
            .map_or(0.0, |&b| f64::from(b))
    });
    let (sel, gate) = match cfg.router {
        Router::Softmax { .. } => {
            let logits: Vec<f64> = logits.collect();
            let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
            let z: f64 = ex.iter().sum();
            let p: Vec<f64> = ex.iter().map(|&v| v / z).collect();
            (p.clone(), p)
        }
        Router::SigmoidBias { .. } => {
            let sig: Vec<f64> = logits.map(sigmoid).collect();
            let sel = sig
                .iter()
                .enumerate()
                .map(|(e, &s)| s + w.router_bias.get(e).map_or(0.0, |&b| f64::from(b)))
                .collect();
            (sel, sig)
        }
        // DeepSeek-V4's hash layers: the same scores, no selection (the ids are given).
        Router::HashSqrtSoftplus => {
            let score: Vec<f64> = logits.map(sqrt_softplus).collect();
            (score.clone(), score)
        }
        // DeepSeek-V4: sqrt(softplus(logit)), biased for the choice only.
        Router::SqrtSoftplusBias { .. } => {
            let score: Vec<f64> = logits.map(sqrt_softplus).collect();
            let sel = score
                .iter()
                .enumerate()
                .map(|(e, &s)| s + w.router_bias.get(e).map_or(0.0, |&b| f64::from(b)))
                .collect();
            (sel, score)
        }
        // gpt-oss: the logits plus the router's own bias.
        Router::TopkSoftmax => {
            let biased: Vec<f64> = logits
                .enumerate()
                .map(|(e, l)| l + w.router_bias.get(e).map_or(0.0, |&b| f64::from(b)))
                .collect();
            (biased.clone(), biased)
        }
        // PhiMoE ranks by the logits (see `sparse_mixer`).
        Router::SparseMixer { .. } => {
            let logits: Vec<f64> = logits.collect();
            (logits.clone(), logits)
        }
        // Llama-4: the top-k of the logits themselves, weighted by their sigmoid.
        Router::SigmoidInput => {
            let logits: Vec<f64> = logits.collect();
            let sig = logits.iter().map(|&l| sigmoid(l)).collect();
            (logits, sig)
        }
        Router::Given => return (Vec::new(), Vec::new()),
    };
    (group_limited(cfg, sel), gate)
}

/// DeepSeek-V4's score `sqrt(softplus(l))`, softplus without overflow:
/// `max(l, 0) + ln(1 + e^-|l|)`.
fn sqrt_softplus(l: f64) -> f64 {
    (l.max(0.0) + (-l.abs()).exp().ln_1p()).sqrt()
}

/// The selection scores with the experts of every group but the kept ones set to 0
/// ([`crate::config::GroupLimit`]); unchanged without a group limit.
fn group_limited(cfg: &MoeConfig, mut sel: Vec<f64>) -> Vec<f64> {
    let Some(g) = cfg.group_limit else {
        return sel;
    };
    let size = (cfg.experts / g.groups.max(1)).max(1);
    let sigmoid = matches!(
        cfg.router,
        Router::SigmoidBias { .. } | Router::SqrtSoftplusBias { .. }
    );
    let scores: Vec<f64> = sel
        .chunks(size)
        .map(|grp| {
            if sigmoid {
                // The sum of the group's two largest scores (one when the group has one).
                top_k(grp, 2).iter().map(|&i| grp[i]).sum()
            } else {
                grp.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            }
        })
        .collect();
    let kept = top_k(&scores, g.keep);
    // transformers 5 masks the sigmoid router's other groups with -inf (DeepSeek-V3,
    // GLM-4.5) and the softmax router's with probability 0 (DeepSeek-V2).
    let masked = if sigmoid { f64::NEG_INFINITY } else { 0.0 };
    for (i, v) in sel.iter_mut().enumerate() {
        if !kept.contains(&(i / size)) {
            *v = masked;
        }
    }
    sel
}

/// The scores the router ranks the experts by for token row `xt` (`hidden` values, in the
/// dtype): softmax probabilities, or `sigmoid(logit) + bias` for the sigmoid-bias router;
/// empty for [`Router::Given`]. The stage checks use them to tell a near-tie from a wrong
/// choice.
pub fn selection_scores(
    cfg: &MoeConfig,
    w: &LayerWeights,
    xt: &[f32],
    logit_bias: Option<&[f32]>,
) -> Vec<f64> {
    scores(cfg, w, xt, logit_bias).0
}

/// PhiMoE's sparsemixer at inference on one token's logits `s`: up to `k` (expert, weight)
/// choices; choice j is the largest logit `m` among the experts not yet chosen (ties to
/// the lower id), weighted by the softmax over those of them whose logit is within relative
/// distance `2 eps` of `m`: `(m - s_e) / max(|s_e|, m) <= 2 eps`.
fn sparse_mixer(s: &[f64], eps: f64, k: usize) -> Vec<(usize, f64)> {
    let mut taken = vec![false; s.len()];
    let mut out = Vec::with_capacity(k);
    for _ in 0..k {
        let Some(best) =
            (0..s.len())
                .filter(|&e| !taken[e])
                .reduce(|b, e| if s[e] > s[b] { e } else { b })
        else {
            break;
        };
        let m = s[best];
        let z: f64 = (0..s.len())
            .filter(|&e| !taken[e] && (m - s[e]) / s[e].abs().max(m) <= 2.0 * eps)
            .map(|e| (s[e] - m).exp())
            .sum();
        out.push((best, 1.0 / z));
        taken[best] = true;
    }
    out
}

/// Gives every (token, choice) pair its slot: the running count of its expert, in token
/// order then choice order. Slots at or past `capacity` are dropped (`-1`).
///
/// Returns `(slots, expert_counts, dropped)`; `expert_counts` counts kept and dropped pairs.
pub(crate) fn assign_slots(
    experts: usize,
    capacity: usize,
    ids: &[u32],
) -> (Vec<i32>, Vec<u32>, u64) {
    let mut counts = vec![0u32; experts];
    let mut dropped = 0u64;
    let slots = ids
        .iter()
        .map(|&e| {
            let c = &mut counts[e as usize];
            let slot = *c as usize;
            *c += 1;
            if slot < capacity {
                slot as i32
            } else {
                dropped += 1;
                -1
            }
        })
        .collect();
    (slots, counts, dropped)
}

/// The router alone for one rank's tokens: ids, weights, slots, counts and drops.
pub fn gate(
    plan: &LayerPlan,
    w: &LayerWeights,
    x: &[f32],
    tokens: usize,
    routing: Option<&GivenRouting>,
    ov: &RouteOverrides,
) -> Result<GateOutput> {
    let cfg = &plan.config;
    let k = ov.effective_top_k(cfg)?;
    check_input(cfg, x, tokens, routing)?;
    w.validate(cfg)?;
    Ok(gate_checked(
        plan,
        w,
        x,
        tokens,
        routing,
        k,
        ov.logit_bias.as_deref(),
    ))
}

/// [`gate`] on inputs already checked, with the effective top-k.
pub(crate) fn gate_checked(
    plan: &LayerPlan,
    w: &LayerWeights,
    x: &[f32],
    tokens: usize,
    routing: Option<&GivenRouting>,
    k: usize,
    logit_bias: Option<&[f32]>,
) -> GateOutput {
    let cfg = &plan.config;
    let (ids, weights) = route(cfg, w, x, tokens, routing, k, logit_bias);
    let (slots, expert_counts, dropped) = assign_slots(cfg.experts, plan.capacity, &ids);
    GateOutput {
        ids,
        weights,
        slots,
        expert_counts,
        dropped,
    }
}

/// The k chosen weights divided by their sum when `renormalize` (both routers), else as is.
fn renormalized(mut wts: Vec<f64>, renormalize: bool, eps: f64) -> Vec<f64> {
    if renormalize {
        let s: f64 = wts.iter().sum::<f64>() + eps;
        wts.iter_mut().for_each(|v| *v /= s);
    }
    wts
}
