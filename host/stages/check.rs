//! The comparison of a capture with what the CPU side says each stage must have written.

use super::expect::{
    kept_pairs, rows_per_expert, signal, values, word, Pair, TIE_MARGIN, WEIGHT_TOLERANCE,
};
use super::report::{Mismatch, StageReport};
use super::{Capture, Case, RankCapture, Stage};
use crate::error::{Error, Result};
use crate::plan::{CELL_RECV, STAGE_COMBINE, STAGE_DISPATCH};
use crate::reference::{self, GateOutput};

/// Checks what the launch of `cap` wrote at its stage (the stages before it are checked
/// by their own launches): see the [module docs](super).
pub fn check(case: &Case, cap: &Capture) -> Result<StageReport> {
    let cfg = &case.plan.config;
    if cap.ranks.len() != cfg.world || case.inputs.len() != cfg.world {
        return Err(Error::input(
            "capture",
            format!(
                "{} captured ranks and {} inputs for a world of {}",
                cap.ranks.len(),
                case.inputs.len(),
                cfg.world
            ),
        ));
    }
    let k = case.ov.effective_top_k(cfg)?;
    let x: Vec<Vec<f32>> = case
        .inputs
        .iter()
        .map(|i| i.x.iter().map(|&v| cfg.dtype.round(v)).collect())
        .collect();
    let cx = Cx { case, cap, k, x };
    Ok(match cap.stage {
        Stage::Gate => cx.gate(),
        Stage::Dispatch => cx.dispatch(),
        Stage::Gemm0 => cx.gemm0(),
        Stage::Gemm1 => cx.gemm1(),
        Stage::Combine => cx.combine(),
    })
}

struct Cx<'a> {
    case: &'a Case<'a>,
    cap: &'a Capture,
    k: usize,
    /// Every rank's tokens, rounded to the dtype.
    x: Vec<Vec<f32>>,
}

impl Cx<'_> {
    fn rank(&self, r: usize) -> &RankCapture {
        &self.cap.ranks[r]
    }

    fn token(&self, r: usize, t: usize) -> &[f32] {
        let h = self.case.plan.config.hidden;
        self.x[r].get(t * h..(t + 1) * h).unwrap_or(&[])
    }

    /// The row the expert of pair `p` of source `s` is fed (scaled by the weight for a
    /// router that scales the input, Llama-4).
    fn expert_row(&self, s: usize, p: &Pair) -> Vec<f32> {
        reference::expert_input(&self.case.plan.config, self.token(s, p.token), p.weight).0
    }

    /// Kept pairs of source `s` under its own (captured) routing.
    fn pairs(&self, s: usize) -> Vec<Pair> {
        kept_pairs(&self.rank(s).gate, self.k, self.case.plan.config.experts)
    }

    fn gate(&self) -> StageReport {
        let plan = self.case.plan;
        let cfg = &plan.config;
        let mut rep = StageReport::new(Stage::Gate, WEIGHT_TOLERANCE);
        for (r, input) in self.case.inputs.iter().enumerate() {
            let want = reference::gate_checked(
                plan,
                self.case.weights,
                &self.x[r],
                input.tokens,
                input.routing,
                self.k,
                self.case.ov.logit_bias.as_deref(),
            );
            let got = &self.rank(r).gate;
            for i in 0..want.ids.len() {
                self.choice(&mut rep, r, i, &want, got);
            }
            // The counts must be those of the backend's own ids.
            let mut counts = vec![0u32; cfg.experts];
            for &e in got.ids.iter().take(want.ids.len()) {
                if let Some(c) = counts.get_mut(e as usize) {
                    *c += 1;
                }
            }
            for (e, &c) in counts.iter().enumerate() {
                let g = got.expert_counts.get(e).copied();
                rep.exact(g == Some(c), || Mismatch {
                    rank: r,
                    expert: Some(e),
                    row: 0,
                    column: 0,
                    what: "expert count (pairs routed to it)".into(),
                    expected: f64::from(c),
                    got: g.map_or(f64::NAN, f64::from),
                });
            }
        }
        rep
    }

    /// Checks choice `i` (token `i / k`) of rank `r`: id (near-ties counted) and weight.
    fn choice(
        &self,
        rep: &mut StageReport,
        r: usize,
        i: usize,
        want: &GateOutput,
        got: &GateOutput,
    ) {
        let (t, j) = (i / self.k, i % self.k);
        let mm = |what: &str, expected: f64, g: f64| Mismatch {
            rank: r,
            expert: Some(want.ids[i] as usize),
            row: t,
            column: j,
            what: what.into(),
            expected,
            got: g,
        };
        let Some(&gid) = got.ids.get(i) else {
            return rep.wrong(|| mm("id (missing)", f64::from(want.ids[i]), f64::NAN));
        };
        if gid != want.ids[i] {
            let cfg = &self.case.plan.config;
            let scores = reference::selection_scores(
                cfg,
                self.case.weights,
                self.token(r, t),
                self.case.ov.logit_bias.as_deref(),
            );
            let (a, b) = (scores.get(gid as usize), scores.get(want.ids[i] as usize));
            match (a, b) {
                (Some(a), Some(b)) if (a - b).abs() <= TIE_MARGIN => {
                    rep.near_ties += 1;
                    rep.ok();
                }
                _ => rep.wrong(|| mm("id", f64::from(want.ids[i]), f64::from(gid))),
            }
            return;
        }
        let (w, g) = (
            f64::from(want.weights[i]),
            got.weights.get(i).map_or(f64::NAN, |&v| f64::from(v)),
        );
        let err = (w - g).abs() / w.abs().max(1e-3);
        let ok = err <= WEIGHT_TOLERANCE;
        if ok {
            rep.max_error = rep.max_error.max(err);
        }
        rep.exact(ok, || mm("weight", w, g));
    }

    fn dispatch(&self) -> StageReport {
        let plan = self.case.plan;
        let cfg = &plan.config;
        let mut rep = StageReport::new(Stage::Dispatch, 0.0);
        for s in 0..cfg.world {
            let got = &self.rank(s).gate;
            let n = self.case.inputs[s].tokens * self.k;
            let ids = got.ids.get(..n).unwrap_or(&got.ids);
            let (slots, _, dropped) = reference::assign_slots(cfg.experts, plan.capacity, ids);
            for (i, &want) in slots.iter().enumerate() {
                let g = got.slots.get(i).copied();
                rep.exact(g == Some(want), || Mismatch {
                    rank: s,
                    expert: ids.get(i).map(|&e| e as usize),
                    row: i / self.k,
                    column: i % self.k,
                    what: "slot".into(),
                    expected: f64::from(want),
                    got: g.map_or(f64::NAN, f64::from),
                });
            }
            rep.exact(got.dropped == dropped, || Mismatch {
                rank: s,
                expert: None,
                row: 0,
                column: 0,
                what: "dropped pairs".into(),
                expected: dropped as f64,
                got: got.dropped as f64,
            });
            let with_slots = GateOutput {
                slots,
                ..got.clone()
            };
            let pairs = kept_pairs(&with_slots, self.k, cfg.experts);
            self.receive_rows(&mut rep, s, &pairs);
            self.signals(&mut rep, s, &pairs, STAGE_DISPATCH);
        }
        rep
    }

    /// Every kept row of source `s`, bit for bit, in its owner's receive cell.
    fn receive_rows(&self, rep: &mut StageReport, s: usize, pairs: &[Pair]) {
        let plan = self.case.plan;
        let h = plan.config.hidden;
        for p in pairs {
            let o = plan.owners[p.expert];
            let q = o.rank as usize;
            let off = plan
                .heap
                .row(s, STAGE_DISPATCH, CELL_RECV, o.local as usize, p.slot);
            let got = values(plan.config.dtype, &self.rank(q).heap, off, h);
            let want = self.expert_row(s, p);
            for (c, &w) in want.iter().enumerate() {
                let g = got.as_ref().map_or(f32::NAN, |v| v[c]);
                rep.exact(g.to_bits() == w.to_bits(), || Mismatch {
                    rank: q,
                    expert: Some(p.expert),
                    row: p.slot,
                    column: c,
                    what: format!("receive row of source rank {s}, token {}", p.token),
                    expected: f64::from(w),
                    got: f64::from(g),
                });
            }
        }
    }

    /// The signal word of every (source `s`, expert) pair of `stage`: a dispatch signal on
    /// the owner's heap, or a combine signal on the source's heap, with the kept rows.
    fn signals(&self, rep: &mut StageReport, s: usize, pairs: &[Pair], stage: usize) {
        let plan = self.case.plan;
        let rows = rows_per_expert(pairs, plan.config.experts);
        for (e, o) in plan.owners.iter().enumerate() {
            let (q, l) = (o.rank as usize, o.local as usize);
            let (holder, off, what) = if stage == STAGE_DISPATCH {
                (
                    q,
                    plan.heap.dispatch_signal(s, l, plan.max_local),
                    "dispatch signal",
                )
            } else {
                (
                    s,
                    plan.heap.combine_signal(q, l, plan.max_local),
                    "combine signal",
                )
            };
            let want = signal(self.cap.epoch, rows[e]);
            let got = word(&self.rank(holder).heap, off);
            rep.exact(got == Some(want), || Mismatch {
                rank: holder,
                expert: Some(e),
                row: 0,
                column: 0,
                what: format!(
                    "{what} of source rank {s} (word {want:#x} expected, {} found)",
                    got.map_or("none".into(), |g| format!("{g:#x}"))
                ),
                expected: rows[e] as f64,
                got: got.map_or(f64::NAN, |g| f64::from(g as u32)),
            });
        }
    }

    fn gemm0(&self) -> StageReport {
        let plan = self.case.plan;
        let cfg = &plan.config;
        let ws = &plan.workspace;
        let mut rep = StageReport::new(Stage::Gemm0, reference::tolerance(cfg.dtype));
        for s in 0..cfg.world {
            for p in self.pairs(s) {
                let o = plan.owners[p.expert];
                let q = o.rank as usize;
                let Some(w) = self.case.weights.experts.get(p.expert) else {
                    continue;
                };
                let want =
                    reference::expert_activation(cfg, w, cfg.intermediate, &self.expert_row(s, &p));
                let off = s as u64 * ws.act_stride_source
                    + u64::from(o.local) * ws.act_stride_expert
                    + p.slot as u64 * ws.act_stride_row;
                let got =
                    values(cfg.dtype, &self.rank(q).act, off, cfg.intermediate).unwrap_or_default();
                rep.row(&got, &want, |c, w, g| Mismatch {
                    rank: q,
                    expert: Some(p.expert),
                    row: p.slot,
                    column: c,
                    what: format!("GEMM0 activation of source rank {s}, token {}", p.token),
                    expected: w,
                    got: g,
                });
            }
        }
        rep
    }

    fn gemm1(&self) -> StageReport {
        let plan = self.case.plan;
        let cfg = &plan.config;
        let mut rep = StageReport::new(Stage::Gemm1, reference::tolerance(cfg.dtype));
        for s in 0..cfg.world {
            let pairs = self.pairs(s);
            for p in &pairs {
                let o = plan.owners[p.expert];
                let Some(w) = self.case.weights.experts.get(p.expert) else {
                    continue;
                };
                let want = reference::expert_mlp(cfg, w, cfg.intermediate, &self.expert_row(s, p));
                let off = plan.heap.row(
                    o.rank as usize,
                    STAGE_COMBINE,
                    CELL_RECV,
                    o.local as usize,
                    p.slot,
                );
                let got =
                    values(cfg.dtype, &self.rank(s).heap, off, cfg.hidden).unwrap_or_default();
                rep.row(&got, &want, |c, w, g| Mismatch {
                    rank: s,
                    expert: Some(p.expert),
                    row: p.slot,
                    column: c,
                    what: format!(
                        "expert output (combine cell from rank {}) of token {}",
                        o.rank, p.token
                    ),
                    expected: w,
                    got: g,
                });
            }
            self.signals(&mut rep, s, &pairs, STAGE_COMBINE);
        }
        rep
    }

    fn combine(&self) -> StageReport {
        let cfg = &self.case.plan.config;
        let h = cfg.hidden;
        let mut rep = StageReport::new(Stage::Combine, reference::tolerance(cfg.dtype));
        for (r, input) in self.case.inputs.iter().enumerate() {
            let g = &self.rank(r).gate;
            let out = &self.rank(r).out;
            for t in 0..input.tokens {
                let want = reference::token_row(cfg, self.case.weights, g, &self.x[r], t, self.k);
                let got = out.get(t * h..(t + 1) * h).unwrap_or(&[]);
                rep.row(got, &want, |c, w, gv| Mismatch {
                    rank: r,
                    expert: None,
                    row: t,
                    column: c,
                    what: "output".into(),
                    expected: w,
                    got: gv,
                });
            }
        }
        rep
    }
}
