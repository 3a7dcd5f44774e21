//! [`forward_rows`](super::forward_rows) with the routed experts produced one at a time:
//! the reference check of a layer too large to hold as f32 alongside its packed copy.

use super::ChoiceOutput;
use super::{check_input, check_rows, combine_token, expert_input, expert_mlp, gate_checked};
use super::{RankInput, RouteOverrides};
use crate::error::{Error, Result};
use crate::plan::LayerPlan;
use crate::weights::{ExpertWeights, LayerWeights};

/// Produces routed expert `e`'s weights (for instance, generated from a seed or read from
/// a checkpoint), one expert at a time.
pub type ExpertSource<'a> = dyn Fn(usize) -> Result<ExpertWeights> + Sync + 'a;

/// The reference output of the listed rows (as [`super::forward_rows`], bit for bit),
/// with the router, bias and shared experts from `gate` (its routed experts are not read)
/// and each routed expert from `expert`, asked once per expert some listed row uses and
/// dropped right after.
pub fn forward_rows_streamed(
    plan: &LayerPlan,
    gate: &LayerWeights,
    expert: &ExpertSource,
    inputs: &[RankInput],
    ov: &RouteOverrides,
    rows: &[Vec<usize>],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let cfg = &plan.config;
    let (k, h) = (ov.effective_top_k(cfg)?, cfg.hidden);
    if inputs.len() != cfg.world || rows.len() != inputs.len() {
        return Err(Error::input(
            "inputs",
            format!(
                "{} rank inputs and {} row lists for a world of {}",
                inputs.len(),
                rows.len(),
                cfg.world
            ),
        ));
    }
    gate.validate_gate(cfg)?;
    // Every listed row's choices, and who uses each expert: (rank, row, choice).
    let mut ys: Vec<Vec<Vec<ChoiceOutput>>> = Vec::with_capacity(inputs.len());
    let mut users: Vec<Vec<(usize, usize, usize)>> = vec![Vec::new(); cfg.experts];
    let mut gates = Vec::with_capacity(inputs.len());
    for (r, (input, list)) in inputs.iter().zip(rows).enumerate() {
        check_input(cfg, input.x, input.tokens, input.routing)?;
        check_rows(r, input, list)?;
        let g = gate_checked(
            plan,
            gate,
            input.x,
            input.tokens,
            input.routing,
            k,
            ov.logit_bias.as_deref(),
        );
        for (n, &t) in list.iter().enumerate() {
            for j in (0..k).filter(|&j| g.slots[t * k + j] >= 0) {
                users[g.ids[t * k + j] as usize].push((r, n, j));
            }
        }
        ys.push(vec![vec![None; k]; list.len()]);
        gates.push(g);
    }
    for (e, list) in users.iter().enumerate().filter(|(_, l)| !l.is_empty()) {
        let w = expert(e)?;
        w.validate(cfg, e)?;
        for &(r, n, j) in list {
            let (t, g) = (rows[r][n], &gates[r]);
            let xt = &inputs[r].x[t * h..(t + 1) * h];
            let (xin, wj) = expert_input(cfg, xt, g.weights[t * k + j]);
            ys[r][n][j] = Some((wj, expert_mlp(cfg, &w, cfg.intermediate, &xin)));
        }
    }
    Ok(rows
        .iter()
        .enumerate()
        .map(|(r, list)| {
            list.iter()
                .zip(&ys[r])
                .map(|(&t, y)| combine_token(cfg, gate, &inputs[r].x[t * h..(t + 1) * h], y))
                .collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MoeConfig, SharedExperts};
    use crate::reference::forward_rows;
    use crate::weights::random_tokens;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn streamed_rows_equal_the_whole_layer_reference_and_ask_each_expert_once() {
        let mut cfg = MoeConfig::new(40, 64, 64, 6, 2);
        cfg.world = 2;
        cfg.shared = Some(SharedExperts {
            count: 1,
            intermediate: 64,
            gated: true,
        });
        let plan = LayerPlan::new(&cfg).expect("plan");
        let w = LayerWeights::random(&cfg, 5);
        let xs = [random_tokens(&cfg, 40, 1), random_tokens(&cfg, 31, 2)];
        let inputs = RankInput::per_rank(&xs, &[40, 31]);
        let rows = vec![vec![0, 7, 39], vec![3, 30]];
        let ov = RouteOverrides::default();
        let want = forward_rows(&plan, &w, &inputs, &ov, &rows).expect("reference");
        let asked = AtomicUsize::new(0);
        let source = |e: usize| {
            asked.fetch_add(1, Ordering::Relaxed);
            Ok(LayerWeights::random_expert(&cfg, 5, e))
        };
        let gate = LayerWeights::random_gate(&cfg, 5);
        let got =
            forward_rows_streamed(&plan, &gate, &source, &inputs, &ov, &rows).expect("streamed");
        assert_eq!(got, want);
        assert!(asked.load(Ordering::Relaxed) <= cfg.experts);
        // A source that fails names its error.
        let bad = |_e: usize| Err(Error::input("expert", "unavailable"));
        assert!(forward_rows_streamed(&plan, &gate, &bad, &inputs, &ov, &rows).is_err());
    }
}
