//! The router: logits, top-k selection, weights, and slot assignment.

use super::{check_input, sigmoid, GateOutput, RouteOverrides};
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
    let all = super::logits::logits64(x, tokens, &w.router, h);
    for logits in all.chunks(cfg.experts.max(1)).take(tokens) {
        let mut logits = logits.to_vec();
        for (e, l) in logits.iter_mut().enumerate() {
            *l += logit_bias.map_or(0.0, |b| f64::from(b[e]));
        }
        let (chosen, mut wts): (Vec<usize>, Vec<f64>) = match cfg.router {
            Router::Softmax { renormalize } => {
                let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = logits.iter().map(|&l| (l - m).exp()).collect();
                let z: f64 = ex.iter().sum();
                let p: Vec<f64> = ex.iter().map(|&v| v / z).collect();
                let chosen = top_k(&p, k);
                let wts = chosen.iter().map(|&e| p[e]).collect();
                (chosen, renormalized(wts, renormalize))
            }
            Router::SigmoidBias { renormalize } => {
                let sig: Vec<f64> = logits.iter().map(|&l| sigmoid(l)).collect();
                let sel: Vec<f64> = sig
                    .iter()
                    .enumerate()
                    .map(|(e, &s)| s + w.router_bias.get(e).map_or(0.0, |&b| f64::from(b)))
                    .collect();
                let chosen = top_k(&sel, k);
                let wts = chosen.iter().map(|&e| sig[e]).collect();
                (chosen, renormalized(wts, renormalize))
            }
            // Without routing the inputs were refused by `check_input`; route nothing.
            Router::Given => (Vec::new(), Vec::new()),
        };
        wts.iter_mut().for_each(|v| *v *= scale);
        ids.extend(chosen.iter().map(|&e| e as u32));
        weights.extend(wts.iter().map(|&v| v as f32));
    }
    (ids, weights)
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
fn renormalized(mut wts: Vec<f64>, renormalize: bool) -> Vec<f64> {
    if renormalize {
        let s: f64 = wts.iter().sum();
        wts.iter_mut().for_each(|v| *v /= s);
    }
    wts
}
