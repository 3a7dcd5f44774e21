//! What one rank thread does in one forward: gate, dispatch, expert tiles, combine.

use super::heap::SymHeap;
use super::signal::{word, Awaited, SignalSet, Stop};
use super::tile::{dot, TiledMlp};
use crate::error::Error;
use crate::plan::{LayerPlan, CELL_RECV, CELL_SEND, STAGE_COMBINE, STAGE_DISPATCH, TILE_M, TILE_N};
use crate::reference::{gate_checked, GateOutput, RankInput};
use crate::weights::LayerWeights;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// What every rank thread shares in one forward.
pub struct Shared<'a> {
    /// The plan.
    pub plan: &'a LayerPlan,
    /// The weights (rounded to the dtype).
    pub w: &'a LayerWeights,
    /// Every rank's symmetric heap.
    pub heaps: &'a [SymHeap],
    /// The epoch of this forward.
    pub epoch: u64,
    /// Effective top-k.
    pub k: usize,
    /// Per-call logit bias.
    pub logit_bias: Option<&'a [f32]>,
    /// Test hook: this rank sends no signals.
    pub silent: Option<usize>,
    /// Longest wait without progress.
    pub timeout: Duration,
    /// Set by the first rank that fails.
    pub abort: &'a AtomicBool,
}

type Res<T> = std::result::Result<T, Stop>;

impl Shared<'_> {
    fn heap(&self, rank: usize) -> Res<&SymHeap> {
        self.heaps.get(rank).ok_or_else(|| {
            Stop::Failed(Error::Device {
                rank,
                stage: "heap",
                what: "no heap for this rank".into(),
                expected: self.heaps.len() as u64,
                observed: rank as u64,
            })
        })
    }

    fn send_signal(&self, me: usize, heap: &SymHeap, offset: u64, rows: usize) -> Res<()> {
        if self.silent != Some(me) {
            heap.signal(offset, word(self.epoch, rows))?;
        }
        Ok(())
    }

    /// Writes `values` as row `slot` of (`peer`, `stage`, local expert `local`) in the
    /// receive cell of rank `dest`'s heap; through this rank's send cell when the plan
    /// stages (the RDMA path: write locally, then put).
    #[allow(clippy::too_many_arguments)]
    fn put_row(
        &self,
        me: usize,
        dest: usize,
        peer: usize,
        stage: usize,
        local: usize,
        slot: usize,
        values: &[f32],
    ) -> Res<()> {
        let hl = &self.plan.heap;
        let recv = hl.row(peer, stage, CELL_RECV, local, slot);
        if self.plan.staging && dest != me {
            // The staging copy lives in my heap, indexed by the destination rank.
            let send = hl.row(dest, stage, CELL_SEND, local, slot);
            let mine = self.heap(me)?;
            mine.write(send, values)?;
            self.heap(dest)?.copy_from(recv, mine, send, values.len())?;
        } else {
            self.heap(dest)?.write(recv, values)?;
        }
        Ok(())
    }
}

/// Rank `me`'s whole forward. Returns its output rows and its gate decisions.
pub fn run(sh: &Shared, me: usize, input: &RankInput) -> Res<(Vec<f32>, GateOutput)> {
    let plan = sh.plan;
    let cfg = &plan.config;
    let h = cfg.hidden;
    let tokens = input.tokens;
    // Tokens arrive on the device in the layer's dtype.
    let x: Vec<f32> = input.x.iter().map(|&v| cfg.dtype.round(v)).collect();
    let g = gate_checked(plan, sh.w, &x, tokens, input.routing, sh.k, sh.logit_bias);
    let k = sh.k;

    // Dispatch: every kept row into its owner's receive cell, then one signal per
    // (me, owner's local expert), 0 rows included.
    let mut kept = vec![0usize; cfg.experts];
    for (i, (&e, &slot)) in g.ids.iter().zip(&g.slots).enumerate() {
        if slot < 0 {
            continue;
        }
        let t = i / k;
        let owner = plan.owners[e as usize];
        sh.put_row(
            me,
            owner.rank as usize,
            me,
            STAGE_DISPATCH,
            owner.local as usize,
            slot as usize,
            &x[t * h..(t + 1) * h],
        )?;
        kept[e as usize] += 1;
    }
    for (e, owner) in plan.owners.iter().enumerate() {
        let o = owner.rank as usize;
        let off = plan
            .heap
            .dispatch_signal(me, owner.local as usize, plan.max_local);
        sh.send_signal(me, sh.heap(o)?, off, kept[e])?;
    }

    serve_experts(sh, me)?;
    let shared = shared_experts(sh, &x, tokens)?;

    // Combine: wait for every expert's results, then sum in choice order.
    let heap = sh.heap(me)?;
    let awaited = plan
        .owners
        .iter()
        .enumerate()
        .map(|(e, o)| Awaited {
            offset: plan
                .heap
                .combine_signal(o.rank as usize, o.local as usize, plan.max_local),
            what: format!("combine signal of rank {} for expert {e}", o.rank),
        })
        .collect();
    let mut set = SignalSet::new(heap, me, "combine", sh.epoch, sh.timeout, sh.abort, awaited);
    while let Some((e, rows)) = set.next()? {
        if rows as usize != kept[e] {
            return Err(Stop::Failed(Error::Device {
                rank: me,
                stage: "combine",
                what: format!(
                    "combine signal of rank {} for expert {e} carries a wrong row count",
                    plan.owners[e].rank
                ),
                expected: kept[e] as u64,
                observed: u64::from(rows),
            }));
        }
    }
    let mut out = vec![0f32; tokens * h];
    let mut y = vec![0f32; h];
    for (t, row) in out.chunks_exact_mut(h).enumerate() {
        for j in 0..k {
            let i = t * k + j;
            if g.slots[i] < 0 {
                continue;
            }
            let o = plan.owners[g.ids[i] as usize];
            let off = plan.heap.row(
                o.rank as usize,
                STAGE_COMBINE,
                CELL_RECV,
                o.local as usize,
                g.slots[i] as usize,
            );
            heap.read(off, &mut y)?;
            let wt = g.weights[i];
            row.iter_mut().zip(&y).for_each(|(acc, v)| *acc += wt * v);
        }
        if let Some((s, gates)) = &shared {
            let gt = gates[t];
            row.iter_mut()
                .zip(&s[t * h..(t + 1) * h])
                .for_each(|(acc, v)| *acc += gt * v);
        }
        row.iter_mut().for_each(|v| *v = cfg.dtype.round(*v));
    }
    Ok((out, g))
}

/// Serves this rank's experts: as each dispatch signal arrives, runs the expert on its
/// rows block by block and returns the results into the source's combine cell.
fn serve_experts(sh: &Shared, me: usize) -> Res<()> {
    let plan = sh.plan;
    let cfg = &plan.config;
    let h = cfg.hidden;
    let world = cfg.world;
    let locals = plan.local_experts.get(me).map_or(&[][..], Vec::as_slice);
    let heap = sh.heap(me)?;
    let awaited = locals
        .iter()
        .enumerate()
        .flat_map(|(l, &e)| {
            (0..world).map(move |s| Awaited {
                offset: plan.heap.dispatch_signal(s, l, plan.max_local),
                what: format!("dispatch signal of rank {s} for expert {e} (local {l})"),
            })
        })
        .collect();
    let mut set = SignalSet::new(
        heap, me, "dispatch", sh.epoch, sh.timeout, sh.abort, awaited,
    );
    let width = cfg.intermediate;
    let mut xb = vec![0f32; TILE_M * h];
    let mut a = vec![0f32; TILE_M * width];
    let mut yb = vec![0f32; TILE_M * h];
    while let Some((index, rows)) = set.next()? {
        let (l, s) = (index / world, index % world);
        let e = locals[l] as usize;
        let rows = rows as usize;
        if rows > plan.capacity {
            return Err(Stop::Failed(Error::Device {
                rank: me,
                stage: "dispatch",
                what: format!("dispatch signal of rank {s} for expert {e} exceeds the capacity"),
                expected: plan.capacity as u64,
                observed: rows as u64,
            }));
        }
        let mlp = TiledMlp {
            kind: cfg.mlp,
            dtype: cfg.dtype,
            hidden: h,
            width,
            gemm0_tiles: plan.tiles.gemm0_per_block,
            gemm1_tiles: plan.tiles.gemm1_per_block,
            w: &sh.w.experts[e],
        };
        for block in 0..rows.div_ceil(TILE_M) {
            let r0 = block * TILE_M;
            let n = (rows - r0).min(TILE_M);
            for r in 0..n {
                let off = plan.heap.row(s, STAGE_DISPATCH, CELL_RECV, l, r0 + r);
                heap.read(off, &mut xb[r * h..(r + 1) * h])?;
            }
            mlp.run_block(&xb, n, &mut a, &mut yb);
            for r in 0..n {
                sh.put_row(me, s, me, STAGE_COMBINE, l, r0 + r, &yb[r * h..(r + 1) * h])?;
            }
        }
        let off = plan.heap.combine_signal(me, l, plan.max_local);
        sh.send_signal(me, sh.heap(s)?, off, rows)?;
    }
    Ok(())
}

/// The shared experts on this rank's own tokens: `(S(x) rounded to the dtype, gate)`.
#[allow(clippy::type_complexity)]
fn shared_experts(sh: &Shared, x: &[f32], tokens: usize) -> Res<Option<(Vec<f32>, Vec<f32>)>> {
    let cfg = &sh.plan.config;
    let (Some(s), Some(sw)) = (cfg.shared, &sh.w.shared) else {
        return Ok(None);
    };
    let h = cfg.hidden;
    let width = s.count * s.intermediate;
    let mlp = TiledMlp {
        kind: cfg.mlp,
        dtype: cfg.dtype,
        hidden: h,
        width,
        gemm0_tiles: width / TILE_N,
        gemm1_tiles: sh.plan.tiles.gemm1_per_block,
        w: sw,
    };
    let mut y = vec![0f32; tokens * h];
    let mut a = vec![0f32; TILE_M * width];
    for (xb, yb) in x.chunks(TILE_M * h).zip(y.chunks_mut(TILE_M * h)) {
        mlp.run_block(xb, xb.len() / h, &mut a, yb);
    }
    let gates = x
        .chunks_exact(h)
        .map(|xt| match &sh.w.shared_gate {
            Some(gw) if s.gated => 1.0 / (1.0 + (-dot(xt, gw)).exp()),
            _ => 1.0,
        })
        .collect();
    Ok(Some((y, gates)))
}
