//! The oracle: one MoE layer forward on the CPU, straight from the definitions.
//!
//! Storage is f32 (the weights and tokens given, already rounded to the layer's dtype),
//! every sum is accumulated in f64, and the layout of the plan is ignored except for the
//! capacity and the placement-independent semantics. Every executor (the CPU executor, the
//! GPU kernel) is checked against [`forward`]. The semantics are those of `CONTRACT.md`:
//!
//! - logits `s = x . W_router^T` plus the optional per-call additive logit bias;
//! - softmax router: top-k of `softmax(s)`, optionally renormalised over the k chosen;
//! - sigmoid-bias router: top-k of `sigmoid(s) + router_bias`, weights `sigmoid(s)` of the
//!   chosen, optionally renormalised;
//! - the computed weights are multiplied by `routed_scale` (caller-given weights of
//!   [`Router::Given`] are used verbatim);
//! - top-k order is descending score, ties to the lower expert id;
//! - slots are running counts per expert in token order then choice order; a slot at or
//!   past the plan's capacity is dropped (`-1`) and counted;
//! - `out[t] = sum_j w_j y_j (+ g S(x_t))`, rounded to the dtype at the end.

mod compare;
mod gate;
mod logits;
mod mlp;

pub use compare::{normalised_error, tolerance};
pub(crate) use gate::{assign_slots, gate_checked};
pub use gate::{gate, selection_scores};
pub use mlp::{activation, expert_activation, expert_mlp};

use crate::config::{GivenRouting, MoeConfig, Router};
use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use crate::weights::LayerWeights;

/// Per-call changes to the routing, applied on top of the config.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteOverrides {
    /// Use fewer experts per token than `config.top_k` (1..=`config.top_k`). With
    /// [`Router::Given`] the first `top_k` choices of every token are used.
    pub top_k: Option<usize>,
    /// Added to the router logits before selection, `[experts]`, finite. Refused with
    /// [`Router::Given`], where it could have no effect.
    pub logit_bias: Option<Vec<f32>>,
}

impl RouteOverrides {
    /// Checks the overrides against the config and returns the effective top-k.
    pub fn effective_top_k(&self, cfg: &MoeConfig) -> Result<usize> {
        if let Some(bias) = &self.logit_bias {
            if cfg.router == Router::Given {
                return Err(Error::input(
                    "overrides.logit_bias",
                    "has no effect with Router::Given",
                ));
            }
            if bias.len() != cfg.experts {
                return Err(Error::input(
                    "overrides.logit_bias",
                    format!("length {} != experts = {}", bias.len(), cfg.experts),
                ));
            }
            if let Some(e) = bias.iter().position(|b| !b.is_finite()) {
                return Err(Error::input(
                    "overrides.logit_bias",
                    format!("expert {e}: {} is not finite", bias[e]),
                ));
            }
        }
        match self.top_k {
            None => Ok(cfg.top_k),
            Some(k) if k >= 1 && k <= cfg.top_k => Ok(k),
            Some(k) => Err(Error::input(
                "overrides.top_k",
                format!("{k} is not in 1..=config.top_k = {}", cfg.top_k),
            )),
        }
    }
}

/// The router's decisions for the tokens of one rank.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateOutput {
    /// Expert of token t's choice j at `t * k + j` (k = effective top-k).
    pub ids: Vec<u32>,
    /// Weight of each choice (after renormalisation and `routed_scale`).
    pub weights: Vec<f32>,
    /// Slot of each choice in its expert's capacity, or -1 when dropped.
    pub slots: Vec<i32>,
    /// Pairs routed to each expert, kept and dropped, `[experts]`.
    pub expert_counts: Vec<u32>,
    /// Pairs dropped because their slot was at or past the capacity.
    pub dropped: u64,
}

/// The tokens one rank brings to a forward.
#[derive(Debug, Clone, Copy)]
pub struct RankInput<'a> {
    /// `[tokens][hidden]`, finite.
    pub x: &'a [f32],
    /// Number of tokens (at most `config.tokens`).
    pub tokens: usize,
    /// Routing for [`Router::Given`]; must be `None` for the other routers.
    pub routing: Option<&'a GivenRouting>,
}

impl<'a> RankInput<'a> {
    /// One input per rank, without caller routing: rank r brings `tokens[r]` tokens of
    /// `xs[r]`.
    pub fn per_rank(xs: &'a [Vec<f32>], tokens: &[usize]) -> Vec<RankInput<'a>> {
        xs.iter()
            .zip(tokens)
            .map(|(x, &tokens)| RankInput {
                x,
                tokens,
                routing: None,
            })
            .collect()
    }
}

/// The result of one layer forward over all ranks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerOutput {
    /// Per rank, `[tokens][hidden]`, rounded to the dtype.
    pub out: Vec<Vec<f32>>,
    /// Per rank, the router's decisions.
    pub gates: Vec<GateOutput>,
    /// Pairs dropped, summed over ranks.
    pub dropped: u64,
    /// Pairs routed to each expert, summed over ranks.
    pub expert_counts: Vec<u64>,
}

impl LayerOutput {
    /// Builds the totals from the per-rank outputs and gates.
    pub fn from_ranks(experts: usize, out: Vec<Vec<f32>>, gates: Vec<GateOutput>) -> Self {
        let mut expert_counts = vec![0u64; experts];
        for g in &gates {
            for (total, &c) in expert_counts.iter_mut().zip(&g.expert_counts) {
                *total += u64::from(c);
            }
        }
        let dropped = gates.iter().map(|g| g.dropped).sum();
        LayerOutput {
            out,
            gates,
            dropped,
            expert_counts,
        }
    }
}

/// Checks one rank's input against the config (shape, token count, finiteness, routing
/// present exactly when the router is [`Router::Given`]).
pub fn check_input(
    cfg: &MoeConfig,
    x: &[f32],
    tokens: usize,
    routing: Option<&GivenRouting>,
) -> Result<()> {
    if tokens > cfg.tokens {
        return Err(Error::input(
            "tokens",
            format!("{tokens} > config.tokens = {}", cfg.tokens),
        ));
    }
    let want = tokens * cfg.hidden;
    if x.len() != want {
        return Err(Error::input(
            "x",
            format!("length {} != tokens * hidden = {want}", x.len()),
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(
            "x",
            format!(
                "token {} element {}: {} is not finite",
                i / cfg.hidden,
                i % cfg.hidden,
                x[i]
            ),
        ));
    }
    match (cfg.router.takes_ids(), routing) {
        (true, Some(r)) => r.validate(tokens, cfg),
        (true, None) => Err(Error::input(
            "routing",
            format!(
                "missing: the router ({:?}) takes the caller's expert ids",
                cfg.router
            ),
        )),
        (false, Some(_)) => Err(Error::input(
            "routing",
            "given, but the router chooses the experts itself",
        )),
        (false, None) => Ok(()),
    }
}

/// Checks the inputs of a whole-world forward: one per rank, each valid, and the weights.
pub fn check_inputs(plan: &LayerPlan, w: &LayerWeights, inputs: &[RankInput]) -> Result<()> {
    let cfg = &plan.config;
    if inputs.len() != cfg.world {
        return Err(Error::input(
            "inputs",
            format!("{} rank inputs != world = {}", inputs.len(), cfg.world),
        ));
    }
    w.validate(cfg)?;
    for input in inputs {
        check_input(cfg, input.x, input.tokens, input.routing)?;
    }
    Ok(())
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// `sum_i a[i] * b[i]` in f64.
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// `out[e] = dot64(x, rows[e * x.len() ..][.. x.len()])` for every `e`, bit for bit: each
/// is the same sequential f64 sum (from -0.0, as `sum` starts), but eight rows go
/// together so that their chains of additions overlap instead of waiting on each other.
fn dots64(x: &[f32], rows: &[f32], out: &mut [f64]) {
    let h = x.len();
    for (o, w) in out.chunks_mut(8).zip(rows.chunks(8 * h.max(1))) {
        let mut acc = [-0.0f64; 8];
        let n = o.len().min(w.len() / h.max(1));
        for (i, &xv) in x.iter().enumerate() {
            let xv = f64::from(xv);
            for (j, a) in acc.iter_mut().enumerate().take(n) {
                *a += xv * f64::from(w[j * h + i]);
            }
        }
        o[..n].copy_from_slice(&acc[..n]);
    }
}

/// Output row of token `t` in f64, before rounding: its kept experts in choice order, then
/// the shared experts (the fixed combine order).
/// The row an expert is fed for a choice of weight `weight` and the weight its output is
/// summed with: `(x, weight)`, or for a router that scales the input
/// ([`Router::scales_input`], Llama-4) `(round(x * weight), 1)`: the product is stored in
/// the dtype, as the device's dispatch stores it.
pub fn expert_input(cfg: &MoeConfig, xt: &[f32], weight: f32) -> (Vec<f32>, f64) {
    if cfg.router.scales_input() {
        (
            xt.iter().map(|&v| cfg.dtype.round(v * weight)).collect(),
            1.0,
        )
    } else {
        (xt.to_vec(), f64::from(weight))
    }
}

pub(crate) fn token_row(
    cfg: &MoeConfig,
    w: &LayerWeights,
    g: &GateOutput,
    x: &[f32],
    t: usize,
    k: usize,
) -> Vec<f64> {
    let h = cfg.hidden;
    let xt = &x[t * h..(t + 1) * h];
    let ys: Vec<ChoiceOutput> = (0..k)
        .map(|j| {
            let i = t * k + j;
            (g.slots[i] >= 0).then(|| {
                let (xin, wj) = expert_input(cfg, xt, g.weights[i]);
                let y = expert_mlp(cfg, &w.experts[g.ids[i] as usize], cfg.intermediate, &xin);
                (wj, y)
            })
        })
        .collect();
    combine_token(cfg, w, xt, &ys)
}

/// A kept choice's weight and expert output (`None`: dropped).
type ChoiceOutput = Option<(f64, Vec<f64>)>;

/// A token's output row from its choices' outputs (in choice order) and the shared experts
/// of `w` on its row `xt`.
fn combine_token(cfg: &MoeConfig, w: &LayerWeights, xt: &[f32], ys: &[ChoiceOutput]) -> Vec<f64> {
    let mut acc = vec![0f64; cfg.hidden];
    for (wj, y) in ys.iter().flatten() {
        for (a, yv) in acc.iter_mut().zip(y) {
            *a += wj * yv;
        }
    }
    if let (Some(s), Some(sw)) = (cfg.shared, &w.shared) {
        let y = expert_mlp(cfg, sw, s.count * s.intermediate, xt);
        let gs = match &w.shared_gate {
            Some(gw) if s.gated => sigmoid(dot64(xt, gw)),
            _ => 1.0,
        };
        for (a, yv) in acc.iter_mut().zip(&y) {
            *a += gs * yv;
        }
    }
    acc
}

/// The whole layer on every rank: gate, experts, shared experts, combine.
pub fn forward(
    plan: &LayerPlan,
    w: &LayerWeights,
    inputs: &[RankInput],
    ov: &RouteOverrides,
) -> Result<LayerOutput> {
    let cfg = &plan.config;
    let k = ov.effective_top_k(cfg)?;
    check_inputs(plan, w, inputs)?;
    let h = cfg.hidden;
    let mut outs = Vec::with_capacity(inputs.len());
    let mut gates = Vec::with_capacity(inputs.len());
    for input in inputs {
        let g = gate_checked(
            plan,
            w,
            input.x,
            input.tokens,
            input.routing,
            k,
            ov.logit_bias.as_deref(),
        );
        let mut out = vec![0f32; input.tokens * h];
        for (t, row_out) in out.chunks_exact_mut(h).enumerate() {
            let acc = token_row(cfg, w, &g, input.x, t, k);
            for (o, a) in row_out.iter_mut().zip(&acc) {
                *o = cfg.dtype.round(*a as f32);
            }
        }
        outs.push(out);
        gates.push(g);
    }
    Ok(LayerOutput::from_ranks(cfg.experts, outs, gates))
}

/// The reference output of selected token rows only: `rows[r]` lists rank r's tokens and
/// the result holds, per rank, one f64 row (`hidden` values, not rounded) per listed token.
///
/// The gate still runs over every token (slots and drops depend on all of them), but the
/// expert MLPs only for the listed rows, so large layers can be checked on a sample.
pub fn forward_rows(
    plan: &LayerPlan,
    w: &LayerWeights,
    inputs: &[RankInput],
    ov: &RouteOverrides,
    rows: &[Vec<usize>],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let cfg = &plan.config;
    let k = ov.effective_top_k(cfg)?;
    check_inputs(plan, w, inputs)?;
    if rows.len() != inputs.len() {
        return Err(Error::input(
            "rows",
            format!("{} row lists for {} ranks", rows.len(), inputs.len()),
        ));
    }
    let mut result = Vec::with_capacity(inputs.len());
    for (r, (input, list)) in inputs.iter().zip(rows).enumerate() {
        check_rows(r, input, list)?;
        let g = gate_checked(
            plan,
            w,
            input.x,
            input.tokens,
            input.routing,
            k,
            ov.logit_bias.as_deref(),
        );
        // Rows on the machine's threads: a token row of a large layer is seconds of f64
        // work (mixtral-8x7b: 16 rows took 13.7 s on one thread).
        result.push(crate::par::map_in_order(list, |&t| {
            token_row(cfg, w, &g, input.x, t, k)
        }));
    }
    Ok(result)
}

/// Rank `r`'s listed rows must be among its tokens.
fn check_rows(r: usize, input: &RankInput, list: &[usize]) -> Result<()> {
    match list.iter().find(|&&t| t >= input.tokens) {
        Some(&t) => Err(Error::input(
            "rows",
            format!("rank {r} lists token {t} but has {} tokens", input.tokens),
        )),
        None => Ok(()),
    }
}

mod streamed;
pub use streamed::{forward_rows_streamed, ExpertSource};

#[cfg(test)]
mod tests;
