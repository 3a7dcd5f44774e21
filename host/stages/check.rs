//! The comparison of a capture with what the CPU side says each stage must have written.

use super::expect::{kept_pairs, signal, u32_at, values, word, Pair, TIE_MARGIN, WEIGHT_TOLERANCE};
use super::report::{Mismatch, StageReport};
use super::{Capture, Case, RankCapture, Stage};
use crate::error::{Error, Result};
use crate::plan::{meta_entry, RankRoute, TileCensus, CELL_RECV, NO_PAIR};
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

    /// Kept pairs of source `s` under its own (captured) routing, with its wire layout.
    fn pairs(&self, s: usize) -> (Vec<Pair>, RankRoute) {
        let g = &self.rank(s).gate;
        let route = self.case.plan.route(&g.ids, &g.slots, self.k);
        (kept_pairs(g, self.k, self.case.plan.config.experts), route)
    }

    /// Byte offset of `[source][pair]` in a per-pair workspace region of `stride_row`
    /// bytes per row and `stride_source` per source.
    fn pair_offset(s: usize, pair: u32, stride_source: u64, stride_row: u64) -> u64 {
        s as u64 * stride_source + u64::from(pair) * stride_row
    }

    /// The routed tasks per tile shape under every source's captured routing: each
    /// (source, expert) list of kept pairs in tasks, through the plan's tile rule.
    fn tiles(&self) -> TileCensus {
        let plan = self.case.plan;
        let lists = self.cap.ranks.iter().flat_map(|r| {
            r.gate
                .expert_counts
                .iter()
                .map(|&c| (c as usize).min(plan.capacity))
        });
        plan.tile_census(lists)
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
            if ids.iter().any(|&e| e as usize >= cfg.experts) {
                continue; // reported by the gate stage; nothing below is well defined
            }
            let route = plan.route(ids, &slots, self.k);
            self.token_rows(&mut rep, s, ids, &route);
            self.pair_lists(&mut rep, s, ids, &slots, &route);
            for (r, &rows) in route.rank_counts.iter().enumerate() {
                let off = plan.heap.dispatch_signal(s);
                self.signal(
                    &mut rep,
                    r,
                    off,
                    rows,
                    format!("dispatch signal of rank {s}"),
                );
            }
        }
        rep
    }

    /// Every token row of source `s`, bit for bit, once on each rank its choices go to,
    /// with its metadata entries (pair index and weight of its kept choices there).
    fn token_rows(&self, rep: &mut StageReport, s: usize, ids: &[u32], route: &RankRoute) {
        let plan = self.case.plan;
        let (h, hl, k) = (plan.config.hidden, &plan.heap, self.k);
        let weights = &self.rank(s).gate.weights;
        for t in 0..ids.len() / k.max(1) {
            for (r, q) in route.destinations(t).iter().copied() {
                let q = q as usize;
                let heap = &self.rank(r).heap;
                let got = values(plan.config.dtype, heap, hl.dispatch_row(CELL_RECV, s, q), h);
                let weight = weights.get(t * k).copied().unwrap_or(f32::NAN);
                let want = reference::expert_input(&plan.config, self.token(s, t), weight).0;
                for (c, &w) in want.iter().enumerate() {
                    let g = got.as_ref().map_or(f32::NAN, |v| v[c]);
                    rep.exact(g.to_bits() == w.to_bits(), || Mismatch {
                        rank: r,
                        expert: None,
                        row: q,
                        column: c,
                        what: format!("token row of source rank {s}, token {t}"),
                        expected: f64::from(w),
                        got: f64::from(g),
                    });
                }
                let mut entries = (0..k)
                    .map(|j| t * k + j)
                    .filter(|&i| plan.owner_rank(ids[i]) == r && route.pairs[i] != NO_PAIR)
                    .map(|i| {
                        meta_entry(route.pairs[i], weights.get(i).copied().unwrap_or(f32::NAN))
                    })
                    .collect::<Vec<_>>();
                entries.resize(plan.route_slots, meta_entry(NO_PAIR, 0.0));
                for (j, &want) in entries.iter().enumerate() {
                    let g = word(heap, hl.row_meta(CELL_RECV, s, q, j));
                    rep.exact(g == Some(want), || Mismatch {
                        rank: r,
                        expert: None,
                        row: q,
                        column: j,
                        what: format!(
                            "metadata entry of source rank {s}, token {t} ({want:#x} expected, {})",
                            g.map_or("none".into(), |g| format!("{g:#x}"))
                        ),
                        expected: f64::from(want as u32),
                        got: g.map_or(f64::NAN, |g| f64::from(g as u32)),
                    });
                }
            }
        }
    }

    /// The pair counts of source `s` per local expert of every rank, and the row slot of
    /// every kept pair in its pair list.
    fn pair_lists(
        &self,
        rep: &mut StageReport,
        s: usize,
        ids: &[u32],
        slots: &[i32],
        route: &RankRoute,
    ) {
        let plan = self.case.plan;
        let hl = &plan.heap;
        for (r, counts) in route.counts.iter().enumerate() {
            for (l, &want) in counts.iter().enumerate() {
                let g = u32_at(&self.rank(r).heap, hl.count(CELL_RECV, s, l));
                rep.exact(g == Some(want), || Mismatch {
                    rank: r,
                    expert: plan.local_experts[r].get(l).map(|&e| e as usize),
                    row: l,
                    column: 0,
                    what: format!("pair count of source rank {s}"),
                    expected: f64::from(want),
                    got: g.map_or(f64::NAN, f64::from),
                });
            }
        }
        for (i, (&e, &slot)) in ids.iter().zip(slots).enumerate() {
            if slot < 0 {
                continue;
            }
            let r = plan.owner_rank(e);
            let want = route.rank_slots[i];
            let g = u32_at(
                &self.rank(r).heap,
                hl.pair(CELL_RECV, s, route.pairs[i] as usize),
            );
            rep.exact(g == Some(want), || Mismatch {
                rank: r,
                expert: Some(e as usize),
                row: route.pairs[i] as usize,
                column: 0,
                what: format!(
                    "pair list of source rank {s} (row slot of token {})",
                    i / self.k
                ),
                expected: f64::from(want),
                got: g.map_or(f64::NAN, f64::from),
            });
        }
    }

    /// The signal word at `off` of rank `holder`'s heap: this launch's epoch and `rows`.
    fn signal(&self, rep: &mut StageReport, holder: usize, off: u64, rows: u32, what: String) {
        let want = signal(self.cap.epoch, rows as usize);
        let got = word(&self.rank(holder).heap, off);
        rep.exact(got == Some(want), || Mismatch {
            rank: holder,
            expert: None,
            row: 0,
            column: 0,
            what: format!(
                "{what} (word {want:#x} expected, {} found)",
                got.map_or("none".into(), |g| format!("{g:#x}"))
            ),
            expected: f64::from(rows),
            got: got.map_or(f64::NAN, |g| f64::from(g as u32)),
        });
    }

    fn gemm0(&self) -> StageReport {
        let plan = self.case.plan;
        let cfg = &plan.config;
        let ws = &plan.workspace;
        let mut rep = StageReport::new(Stage::Gemm0, reference::tolerance(cfg.dtype));
        rep.tiles = Some(self.tiles());
        for s in 0..cfg.world {
            let (pairs, route) = self.pairs(s);
            for p in pairs {
                let q = plan.owner_rank(p.expert as u32);
                let Some(w) = self.case.weights.experts.get(p.expert) else {
                    continue;
                };
                let want =
                    reference::expert_activation(cfg, w, cfg.intermediate, &self.expert_row(s, &p));
                let pair = route.pairs[p.token * self.k + p.choice];
                let off = Self::pair_offset(s, pair, ws.act_stride_source, ws.act_stride_row);
                let got =
                    values(cfg.dtype, &self.rank(q).act, off, cfg.intermediate).unwrap_or_default();
                rep.row(&got, &want, |c, w, g| Mismatch {
                    rank: q,
                    expert: Some(p.expert),
                    row: pair as usize,
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
        let ws = &plan.workspace;
        let mut rep = StageReport::new(Stage::Gemm1, reference::tolerance(cfg.dtype));
        rep.tiles = Some(self.tiles());
        for s in 0..cfg.world {
            let (pairs, route) = self.pairs(s);
            for p in &pairs {
                let q = plan.owner_rank(p.expert as u32);
                let Some(w) = self.case.weights.experts.get(p.expert) else {
                    continue;
                };
                let want = reference::expert_mlp(cfg, w, cfg.intermediate, &self.expert_row(s, p));
                let pair = route.pairs[p.token * self.k + p.choice];
                let off = Self::pair_offset(s, pair, ws.y_stride_source, ws.y_stride_row);
                let got = values(cfg.dtype, &self.rank(q).y, off, cfg.hidden).unwrap_or_default();
                rep.row(&got, &want, |c, w, g| Mismatch {
                    rank: q,
                    expert: Some(p.expert),
                    row: pair as usize,
                    column: c,
                    what: format!("expert output of source rank {s}, token {}", p.token),
                    expected: w,
                    got: g,
                });
            }
        }
        rep
    }

    /// Every (token, owner rank) partial in the source's combine cell against the
    /// reference sum of exactly that token's kept choices on that rank, and the combine
    /// signals with the row counts.
    fn partials(&self, rep: &mut StageReport) {
        let plan = self.case.plan;
        let cfg = &plan.config;
        for s in 0..cfg.world {
            let (pairs, route) = self.pairs(s);
            for t in 0..self.case.inputs[s].tokens {
                for (r, q) in route.destinations(t).iter().copied() {
                    let mut want = vec![0f64; cfg.hidden];
                    for p in pairs
                        .iter()
                        .filter(|p| p.token == t && plan.owner_rank(p.expert as u32) == r)
                    {
                        let Some(w) = self.case.weights.experts.get(p.expert) else {
                            continue;
                        };
                        let (xin, wt) = reference::expert_input(cfg, self.token(s, t), p.weight);
                        let y = reference::expert_mlp(cfg, w, cfg.intermediate, &xin);
                        want.iter_mut().zip(&y).for_each(|(a, v)| *a += wt * v);
                    }
                    let off = plan.heap.combine_row(CELL_RECV, r, q as usize);
                    let got =
                        values(cfg.dtype, &self.rank(s).heap, off, cfg.hidden).unwrap_or_default();
                    rep.row(&got, &want, |c, w, g| Mismatch {
                        rank: s,
                        expert: None,
                        row: t,
                        column: c,
                        what: format!("partial of rank {r} (row slot {q}) for token {t}"),
                        expected: w,
                        got: g,
                    });
                }
            }
            for (r, &rows) in route.rank_counts.iter().enumerate() {
                let off = plan.heap.combine_signal(r);
                self.signal(rep, s, off, rows, format!("combine signal of rank {r}"));
            }
        }
    }

    fn combine(&self) -> StageReport {
        let cfg = &self.case.plan.config;
        let h = cfg.hidden;
        let mut rep = StageReport::new(Stage::Combine, reference::tolerance(cfg.dtype));
        self.partials(&mut rep);
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
