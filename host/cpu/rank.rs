//! What one rank does in one forward: gate, dispatch, expert tiles, combine.
//!
//! The rank thread runs the protocol (gate, dispatch, every signal wait); the compute
//! (expert row blocks, shared experts, combine) is cut into [`Unit`]s that the rank
//! thread and its helper threads take from the rank's [`Work`] queue.

use super::heap::{u32_words, SymHeap};
use super::signal::{word, Awaited, SignalSet, Stop};
use super::units::{Ctx, Unit};
use super::work::Work;
use crate::error::Error;
use crate::plan::{meta_entry, LayerPlan, RankRoute, CELL_RECV, CELL_SEND, NO_PAIR};
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
    /// Stage checks: per rank, where the GEMM0 activations are kept (the scratch's
    /// activation region of the plan), or empty.
    pub act: &'a [SymHeap],
    /// Per rank, the expert outputs of every pair (the scratch's `y` region).
    pub y: &'a [SymHeap],
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

    /// Writes `values` (in the dtype) at `recv` of rank `dest`'s heap; through `send` of
    /// this rank's heap first when the plan stages and `dest` is a peer (the RDMA path:
    /// write locally, then put).
    pub(super) fn put_row(
        &self,
        me: usize,
        dest: usize,
        at: (u64, u64),
        values: &[f32],
    ) -> Res<()> {
        self.put(
            me,
            dest,
            at,
            |h, off| h.write(off, values),
            |d, src, to, from| d.copy_from(to, src, from, values.len()),
        )
    }

    /// As [`Shared::put_row`] for raw metadata words.
    pub(super) fn put_words(
        &self,
        me: usize,
        dest: usize,
        at: (u64, u64),
        words: &[u64],
    ) -> Res<()> {
        self.put(
            me,
            dest,
            at,
            |h, off| h.write_words(off, words),
            |d, src, to, from| d.copy_words_from(to, src, from, words.len()),
        )
    }

    /// `write` into `dest`'s heap at `recv`, or into this rank's at `send` then `copy` to
    /// `dest`'s at `recv` when the plan stages and `dest` is a peer.
    fn put(
        &self,
        me: usize,
        dest: usize,
        (recv, send): (u64, u64),
        write: impl Fn(&SymHeap, u64) -> crate::error::Result<()>,
        copy: impl Fn(&SymHeap, &SymHeap, u64, u64) -> crate::error::Result<()>,
    ) -> Res<()> {
        if self.plan.staging && dest != me {
            let mine = self.heap(me)?;
            write(mine, send)?;
            copy(self.heap(dest)?, mine, recv, send)?;
        } else {
            write(self.heap(dest)?, recv)?;
        }
        Ok(())
    }
}

/// Dispatch (steps 3 of the protocol in [`crate::plan`]): every token row once to each
/// rank its choices go to, with its metadata, the pair lists and counts, then one signal
/// per rank, 0 rows included.
fn dispatch(sh: &Shared, me: usize, x: &[f32], g: &GateOutput, route: &RankRoute) -> Res<()> {
    let plan = sh.plan;
    let cfg = &plan.config;
    let (h, k, hl) = (cfg.hidden, sh.k, &plan.heap);
    let tokens = g.ids.len().checked_div(k).unwrap_or(0);
    let mut pair_lists: Vec<Vec<u32>> = route
        .counts
        .iter()
        .map(|c| vec![0u32; c.iter().sum::<u32>() as usize])
        .collect();
    let mut meta = vec![0u64; plan.route_slots];
    for t in 0..tokens {
        for (r, q) in route.destinations(t).iter().copied() {
            let mut n = 0;
            meta.fill(meta_entry(NO_PAIR, 0.0));
            for j in 0..k {
                let i = t * k + j;
                let p = route.pairs[i];
                if plan.owner_rank(g.ids[i]) != r || p == NO_PAIR {
                    continue;
                }
                if let (Some(m), Some(slot)) = (meta.get_mut(n), pair_lists[r].get_mut(p as usize))
                {
                    *m = meta_entry(p, g.weights[i]);
                    *slot = q;
                }
                n += 1;
            }
            let q = q as usize;
            // Llama-4 scales the expert's input by the routing weight (top-1 only).
            let (row, _) =
                crate::reference::expert_input(cfg, &x[t * h..(t + 1) * h], g.weights[t * k]);
            sh.put_row(
                me,
                r,
                (
                    hl.dispatch_row(CELL_RECV, me, q),
                    hl.dispatch_row(CELL_SEND, r, q),
                ),
                &row,
            )?;
            let at = |j| {
                (
                    hl.row_meta(CELL_RECV, me, q, j),
                    hl.row_meta(CELL_SEND, r, q, j),
                )
            };
            sh.put_words(me, r, at(0), &meta)?;
        }
    }
    for (r, (counts, pairs)) in route.counts.iter().zip(&pair_lists).enumerate() {
        let at = |f: fn(&crate::plan::HeapLayout, usize, usize, usize) -> u64| {
            (f(hl, CELL_RECV, me, 0), f(hl, CELL_SEND, r, 0))
        };
        sh.put_words(
            me,
            r,
            at(crate::plan::HeapLayout::count),
            &u32_words(counts),
        )?;
        sh.put_words(me, r, at(crate::plan::HeapLayout::pair), &u32_words(pairs))?;
    }
    for (r, &rows) in route.rank_counts.iter().enumerate() {
        sh.send_signal(me, sh.heap(r)?, hl.dispatch_signal(me), rows as usize)?;
    }
    Ok(())
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

    let route = plan.route(&g.ids, &g.slots, k);
    dispatch(sh, me, &x, &g, &route)?;
    if sh.stops_after(Stage::Dispatch) {
        return Ok((Vec::new(), g));
    }

    let mut out = vec![0f32; tokens * h];
    let has_shared = cfg.shared.is_some() && sh.w.shared.is_some();
    let mut shared_y = vec![0f32; if has_shared { tokens * h } else { 0 }];
    let work = Work::<Unit>::default();
    let res = {
        let ctx = Ctx::new(sh, me, &x, &route, &mut shared_y, &mut out);
        std::thread::scope(|scope| {
            for _ in 0..helpers {
                scope.spawn(|| helper(&ctx, &work));
            }
            let res = lead(&ctx, &work, me);
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
/// expert units queued as dispatch signals arrive (and run between polls; the last unit of
/// a source reduces its rows and signals it), then the combine once every rank's combine
/// signal is in.
fn lead(ctx: &Ctx, work: &Work<Unit>, me: usize) -> Res<()> {
    let sh = ctx.shared();
    let plan = sh.plan;
    let world = plan.config.world;
    let heap = sh.heap(me)?;
    let mut sc = ctx.scratch();
    work.push(ctx.shared_units());

    let awaited = (0..world)
        .map(|s| Awaited {
            offset: plan.heap.dispatch_signal(s),
            what: format!("dispatch signal of rank {s}"),
        })
        .collect();
    let mut set = SignalSet::new(
        heap, me, "dispatch", sh.epoch, sh.timeout, sh.abort, awaited,
    );
    loop {
        if let Some((s, rows)) = set.poll()? {
            work.push(ctx.arm(s, rows as usize)?);
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

    // Combine: wait for every rank's partials, then sum them in rank order.
    let awaited = (0..world)
        .map(|r| Awaited {
            offset: plan.heap.combine_signal(r),
            what: format!("combine signal of rank {r}"),
        })
        .collect();
    let mut set = SignalSet::new(heap, me, "combine", sh.epoch, sh.timeout, sh.abort, awaited);
    while let Some((r, rows)) = set.next()? {
        let want = ctx.route().rank_counts.get(r).copied().unwrap_or(0);
        if rows != want {
            return Err(Stop::Failed(Error::Device {
                rank: me,
                stage: "combine",
                what: format!("combine signal of rank {r} carries a wrong row count"),
                expected: u64::from(want),
                observed: u64::from(rows),
            }));
        }
    }
    work.push(ctx.combine_units());
    drain(ctx, work, &mut sc)
}
