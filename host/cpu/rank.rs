//! What one rank does in one forward: gate, dispatch, expert tiles, combine.
//!
//! The rank thread runs the protocol (gate, dispatch, every signal wait); the compute
//! (expert row blocks, shared experts, combine) is cut into [`Unit`]s that the rank
//! thread and its helper threads take from the rank's [`Work`] queue.

use super::heap::SymHeap;
use super::signal::{word, Awaited, SignalSet, Stop};
use super::units::{Ctx, Unit};
use super::work::Work;
use crate::error::Error;
use crate::plan::{LayerPlan, CELL_RECV, CELL_SEND, STAGE_DISPATCH};
use crate::reference::{gate_checked, GateOutput, RankInput};
use crate::stages::Stage;
use crate::weights::LayerWeights;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What every rank thread shares in one forward.
pub struct Shared<'a> {
    /// The plan.
    pub plan: &'a LayerPlan,
    /// The router and shared gate (rounded to the dtype; expert matrices empty).
    pub w: &'a LayerWeights,
    /// The expert matrices, packed in the dtype.
    pub packed: &'a super::packed::PackedLayer,
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
    /// Stage checks: stop after this stage (`None`: the whole layer).
    pub stop: Option<Stage>,
    /// Stage checks: per rank, where the GEMM0 activations are kept (the workspace's
    /// activation region of the plan), or empty.
    pub act: &'a [SymHeap],
}

/// A rank's result: a value, or why it stopped.
pub type Res<T> = std::result::Result<T, Stop>;

impl Shared<'_> {
    /// True when this forward stops after `stage` (stage checks).
    pub(super) fn stops_after(&self, stage: Stage) -> bool {
        self.stop.is_some_and(|s| s <= stage)
    }

    /// Rank `rank`'s heap.
    pub(super) fn heap(&self, rank: usize) -> Res<&SymHeap> {
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

    /// Stores signal word `(epoch << 32) | rows` at `offset` of `heap` (unless `me` is
    /// the silent rank).
    pub(super) fn send_signal(
        &self,
        me: usize,
        heap: &SymHeap,
        offset: u64,
        rows: usize,
    ) -> Res<()> {
        if self.silent != Some(me) {
            heap.signal(offset, word(self.epoch, rows))?;
        }
        Ok(())
    }

    /// Writes `values` as row `slot` of (`peer`, `stage`, local expert `local`) in the
    /// receive cell of rank `dest`'s heap; through this rank's send cell when the plan
    /// stages (the RDMA path: write locally, then put).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn put_row(
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

/// Rank `me`'s whole forward, with `helpers` helper threads for its compute. Returns its
/// output rows and its gate decisions.
pub fn run(
    sh: &Shared,
    me: usize,
    input: &RankInput,
    helpers: usize,
) -> Res<(Vec<f32>, GateOutput)> {
    let plan = sh.plan;
    let cfg = &plan.config;
    let h = cfg.hidden;
    let tokens = input.tokens;
    // Tokens arrive on the device in the layer's dtype.
    let mut x = input.x.to_vec();
    super::tile::round_all(cfg.dtype, &mut x);
    let g = gate_checked(plan, sh.w, &x, tokens, input.routing, sh.k, sh.logit_bias);
    let k = sh.k;
    if sh.stops_after(Stage::Gate) {
        return Ok((Vec::new(), g));
    }

    // Dispatch: every kept row into its owner's receive cell, then one signal per
    // (me, owner's local expert), 0 rows included.
    let mut kept = vec![0usize; cfg.experts];
    for (i, (&e, &slot)) in g.ids.iter().zip(&g.slots).enumerate() {
        if slot < 0 {
            continue;
        }
        let t = i / k;
        let owner = plan.owners[e as usize];
        // Llama-4 scales the expert's input by the routing weight (stored in the dtype).
        let (row, _) = crate::reference::expert_input(cfg, &x[t * h..(t + 1) * h], g.weights[i]);
        sh.put_row(
            me,
            owner.rank as usize,
            me,
            STAGE_DISPATCH,
            owner.local as usize,
            slot as usize,
            &row,
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
    if sh.stops_after(Stage::Dispatch) {
        return Ok((Vec::new(), g));
    }

    let mut out = vec![0f32; tokens * h];
    let has_shared = cfg.shared.is_some() && sh.w.shared.is_some();
    let mut shared_y = vec![0f32; if has_shared { tokens * h } else { 0 }];
    let work = Work::<Unit>::default();
    let res = {
        let ctx = Ctx::new(sh, me, &x, &g, &mut shared_y, &mut out);
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|| helper(&ctx, &work));
            }
            let res = lead(&ctx, &work, me, &kept);
            work.close();
            res
        })
    };
    // A helper's failure is the cause of whatever the rank thread saw after it.
    if let Some(e) = work.take_error() {
        return Err(Stop::Failed(e));
    }
    res?;
    Ok((out, g))
}

/// A helper thread: runs units until the queue closes. A failure is recorded and aborts
/// the forward; a panic breaks the queue (so that no one waits for its unit) before it
/// reaches the scope's join.
fn helper(ctx: &Ctx, work: &Work<Unit>) {
    struct OnPanic<'w>(&'w Work<Unit>, &'w AtomicBool);
    impl Drop for OnPanic<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.1.store(true, Ordering::Relaxed);
                self.0.break_down();
            }
        }
    }
    let abort = ctx.abort();
    let _guard = OnPanic(work, abort);
    let mut sc = ctx.scratch();
    while let Some(unit) = work.take_wait() {
        if !abort.load(Ordering::Relaxed) {
            if let Err(Stop::Failed(e)) = ctx.run(unit, &mut sc) {
                work.fail(e);
                abort.store(true, Ordering::Relaxed);
            }
        }
        work.finish();
    }
}

/// Runs units from `work` until none is queued, then waits for the helpers' last ones.
fn drain(ctx: &Ctx, work: &Work<Unit>, sc: &mut super::units::Scratch) -> Res<()> {
    while let Some(unit) = work.try_take() {
        let res = ctx.run(unit, sc);
        work.finish();
        res?;
    }
    if work.wait_idle(ctx.abort()) {
        Ok(())
    } else {
        Err(Stop::Aborted)
    }
}

/// The rank thread's part: shared experts queued at once (they need no signal), then
/// expert units queued as dispatch signals arrive (and run between polls), then the
/// combine once every expert's combine signal is in.
fn lead(ctx: &Ctx, work: &Work<Unit>, me: usize, kept: &[usize]) -> Res<()> {
    let sh = ctx.shared();
    let plan = sh.plan;
    let world = plan.config.world;
    let heap = sh.heap(me)?;
    let mut sc = ctx.scratch();
    work.push(ctx.shared_units());

    let awaited = ctx
        .locals()
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
    loop {
        if let Some((index, rows)) = set.poll()? {
            let s = index % world;
            let e = ctx.locals().get(index / world).copied().unwrap_or(u32::MAX);
            let rows = rows as usize;
            if rows > plan.capacity {
                return Err(Stop::Failed(Error::Device {
                    rank: me,
                    stage: "dispatch",
                    what: format!(
                        "dispatch signal of rank {s} for expert {e} exceeds the capacity"
                    ),
                    expected: plan.capacity as u64,
                    observed: rows as u64,
                }));
            }
            work.push(ctx.arm(index, rows)?);
            continue;
        }
        if set.is_done() {
            break;
        }
        if let Some(unit) = work.try_take() {
            let res = ctx.run(unit, &mut sc);
            work.finish();
            res?;
            continue;
        }
        set.idle()?;
    }
    drain(ctx, work, &mut sc)?;
    if sh.stops_after(Stage::Gemm1) {
        return Ok(());
    }

    // Combine: wait for every expert's results, then sum in choice order.
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
    work.push(ctx.combine_units());
    drain(ctx, work, &mut sc)
}
