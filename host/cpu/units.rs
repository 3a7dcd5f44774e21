//! The units of a rank's work that its threads share: expert tasks (one row block, or two
//! as one wide task, as the plan's tile rule cuts each pair list), shared-expert token
//! chunks and combine token chunks.
//!
//! Every output value is computed by exactly one unit, with a fixed order of operations
//! that does not depend on the unit's neighbours (each product of the GEMM is one chain
//! of operations over its row and column alone; combine sums a token's choices in choice
//! order), so results do not depend on how many threads run the units, nor on which
//! thread runs which, nor on how the pair lists are cut into tasks (so every tile mode
//! gives the same bits). The reduce of a source's rows runs in the unit that finishes that
//! source's last expert task (or at once when it sent no pairs).

use super::rank::{Res, Shared};
use super::tile::{dot, round_all, TiledMlp};
use crate::error::Error;
use crate::plan::{
    meta_parts, RankRoute, TileShape, CELL_RECV, CELL_SEND, NO_PAIR, TILE_N, WIDE_ROWS,
};
use crate::stages::Stage;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Most pairs of one expert unit: one task of a local expert's pair list, a `TILE_M`
/// block or a wide task's two blocks ([`crate::plan::task_rows`]).
pub const EXPERT_UNIT_ROWS: usize = WIDE_ROWS;

/// Tokens of one shared-expert or combine unit.
pub const TOKEN_CHUNK: usize = 32;

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Pairs `p0 .. p0 + n` that `source` sent, all of local expert `local`: one task of the
    /// plan's tile rule ([`crate::plan::LayerPlan::tasks`]), computed with the tile shape
    /// the rule gives `n` rows (as the kernel's task would be).
    Expert {
        /// The source rank.
        source: usize,
        /// The local expert.
        local: usize,
        /// First pair.
        p0: usize,
        /// Pairs.
        n: usize,
        /// The tile shape of the task ([`crate::plan::LayerPlan::tile_for`]`(n)`).
        shape: TileShape,
    },
    /// The shared experts on token chunk `c` (tokens `c * TOKEN_CHUNK ..`).
    Shared(usize),
    /// The combine of token chunk `c`.
    Combine(usize),
}

/// The rows one source sent, and how many of its expert units are left.
#[derive(Debug, Default)]
pub struct Source {
    rows: AtomicUsize,
    remaining: AtomicUsize,
}

/// Per-thread scratch buffers.
pub struct Scratch {
    xb: Vec<f32>,
    a: Vec<f32>,
    yb: Vec<f32>,
    y: Vec<f32>,
}

/// What a rank's threads share to run its units in one forward.
pub struct Ctx<'a> {
    sh: &'a Shared<'a>,
    me: usize,
    /// This rank's tokens, rounded to the dtype.
    x: &'a [f32],
    /// This rank's routing on the wire (as a source).
    route: &'a RankRoute,
    locals: &'a [u32],
    sources: Vec<Source>,
    /// Shared-expert output `S(x)` per token chunk (empty without shared experts).
    shared_y: Vec<Mutex<&'a mut [f32]>>,
    /// The rank's output per token chunk.
    out: Vec<Mutex<&'a mut [f32]>>,
}

fn chunks(v: &mut [f32], len: usize) -> Vec<Mutex<&mut [f32]>> {
    v.chunks_mut(len.max(1)).map(Mutex::new).collect()
}

impl<'a> Ctx<'a> {
    /// The units of rank `me` on tokens `x` whose routing is laid out as `route`,
    /// writing `out` (and `shared_y`, `tokens * hidden` values when the layer has shared
    /// experts).
    pub fn new(
        sh: &'a Shared<'a>,
        me: usize,
        x: &'a [f32],
        route: &'a RankRoute,
        shared_y: &'a mut [f32],
        out: &'a mut [f32],
    ) -> Self {
        let plan = sh.plan;
        let h = plan.config.hidden;
        let locals = plan.local_experts.get(me).map_or(&[][..], Vec::as_slice);
        let sources = (0..plan.config.world).map(|_| Source::default()).collect();
        Ctx {
            sh,
            me,
            x,
            route,
            locals,
            sources,
            shared_y: chunks(shared_y, TOKEN_CHUNK * h),
            out: chunks(out, TOKEN_CHUNK * h),
        }
    }

    /// Fresh scratch for one thread.
    pub fn scratch(&self) -> Scratch {
        let cfg = &self.sh.plan.config;
        let h = cfg.hidden;
        let shared_width = cfg.shared.map_or(0, |s| s.count * s.intermediate);
        Scratch {
            xb: vec![0f32; EXPERT_UNIT_ROWS * h],
            a: vec![0f32; EXPERT_UNIT_ROWS * cfg.intermediate.max(shared_width)],
            yb: vec![0f32; EXPERT_UNIT_ROWS * h],
            y: vec![0f32; h],
        }
    }

    /// What every rank shares in this forward.
    pub fn shared(&self) -> &'a Shared<'a> {
        self.sh
    }

    /// This rank's routing on the wire.
    pub fn route(&self) -> &'a RankRoute {
        self.route
    }

    /// The forward's abort flag.
    pub fn abort(&self) -> &'a std::sync::atomic::AtomicBool {
        self.sh.abort
    }

    /// The shared-expert units (none without shared experts).
    pub fn shared_units(&self) -> impl Iterator<Item = Unit> {
        (0..self.shared_y.len()).map(Unit::Shared)
    }

    /// The combine units.
    pub fn combine_units(&self) -> impl Iterator<Item = Unit> {
        (0..self.out.len()).map(Unit::Combine)
    }

    fn bad(
        &self,
        stage: &'static str,
        what: String,
        expected: u64,
        observed: u64,
    ) -> super::signal::Stop {
        Error::Device {
            rank: self.me,
            stage,
            what,
            expected,
            observed,
        }
        .into()
    }

    /// Records that `source` sent `rows` token rows and returns the expert units of its
    /// pairs (read from its counts), one per task of the plan's tile rule. A source with no
    /// pairs is reduced at once.
    pub fn arm(&self, source: usize, rows: usize) -> Res<Vec<Unit>> {
        let plan = self.sh.plan;
        if rows > plan.config.tokens {
            let what = format!("dispatch signal of rank {source} exceeds the token rows");
            return Err(self.bad("dispatch", what, plan.config.tokens as u64, rows as u64));
        }
        let heap = self.sh.heap(self.me)?;
        let mut counts = vec![0u32; self.locals.len()];
        heap.read_u32s(plan.heap.count(CELL_RECV, source, 0), &mut counts)?;
        let mut units = Vec::new();
        let mut base = 0usize;
        for (l, &c) in counts.iter().enumerate() {
            let c = c as usize;
            if c > plan.capacity {
                let what =
                    format!("rank {source} sends local expert {l} more pairs than the capacity");
                return Err(self.bad("dispatch", what, plan.capacity as u64, c as u64));
            }
            units.extend(plan.tasks(c).map(|(r0, n)| Unit::Expert {
                source,
                local: l,
                p0: base + r0,
                n,
                shape: plan.tile_for(n),
            }));
            base += c;
        }
        if base > plan.pair_capacity {
            let what = format!("rank {source} sends more pairs than the pair capacity");
            return Err(self.bad("dispatch", what, plan.pair_capacity as u64, base as u64));
        }
        let src = self.source(source)?;
        src.rows.store(rows, Ordering::Relaxed);
        src.remaining.store(units.len(), Ordering::Relaxed);
        if units.is_empty() && !self.sh.stops_after(Stage::Gemm1) {
            self.reduce(source, &mut self.scratch())?;
        }
        Ok(units)
    }

    fn source(&self, s: usize) -> Res<&Source> {
        self.sources.get(s).ok_or_else(|| {
            let what = "dispatch signal of a rank past the world".to_string();
            self.bad("dispatch", what, self.sources.len() as u64, s as u64)
        })
    }

    /// Runs `unit` with `sc` as scratch.
    pub fn run(&self, unit: Unit, sc: &mut Scratch) -> Res<()> {
        match unit {
            Unit::Expert {
                source,
                local,
                p0,
                n,
                shape,
            } => self.expert(source, local, p0, n.min(shape.rows()), sc),
            Unit::Shared(c) => self.shared_experts(c, sc),
            Unit::Combine(c) => self.combine(c, sc),
        }
    }

    /// The rank slots of pairs `p0 .. p0 + n` of `source`, each checked against its rows.
    fn pair_slots(&self, source: usize, p0: usize, n: usize) -> Res<Vec<u32>> {
        let plan = self.sh.plan;
        // The pair list is read in whole words: from the even pair at or before p0.
        let start = p0 & !1;
        let mut v = vec![0u32; n + (p0 - start)];
        self.sh
            .heap(self.me)?
            .read_u32s(plan.heap.pair(CELL_RECV, source, start), &mut v)?;
        let rows = self.source(source)?.rows.load(Ordering::Relaxed);
        let slots = v.split_off(p0 - start);
        if let Some(&q) = slots.iter().find(|&&q| q as usize >= rows) {
            let what = format!("a pair of rank {source} names a row it did not send");
            return Err(self.bad("expert", what, rows as u64, u64::from(q)));
        }
        Ok(slots)
    }

    fn expert(&self, s: usize, l: usize, p0: usize, n: usize, sc: &mut Scratch) -> Res<()> {
        let plan = self.sh.plan;
        let cfg = &plan.config;
        let h = cfg.hidden;
        let e = self.locals.get(l).map_or(usize::MAX, |&e| e as usize);
        let w = self.sh.packed.experts.get(e).ok_or_else(|| {
            let what = format!("local expert {l} has no weights");
            self.bad(
                "expert",
                what,
                self.sh.packed.experts.len() as u64,
                e as u64,
            )
        })?;
        let mlp = TiledMlp {
            kind: cfg.mlp,
            dtype: cfg.dtype,
            hidden: h,
            width: cfg.intermediate,
            gemm0_tiles: plan.tiles.gemm0_per_block,
            gemm1_tiles: plan.tiles.gemm1_per_block,
            w,
        };
        let heap = self.sh.heap(self.me)?;
        for (r, &q) in self.pair_slots(s, p0, n)?.iter().enumerate() {
            let off = plan.heap.dispatch_row(CELL_RECV, s, q as usize);
            heap.read(off, &mut sc.xb[r * h..(r + 1) * h])?;
        }
        mlp.run_block(&sc.xb, n, &mut sc.a, &mut sc.yb);
        self.capture_act(s, p0, n, &sc.a)?;
        if self.sh.stops_after(Stage::Gemm0) {
            return Ok(());
        }
        let ws = &plan.workspace;
        let y = self.y_heap()?;
        for (r, row) in sc.yb.chunks_exact(h).take(n).enumerate() {
            y.write(
                s as u64 * ws.y_stride_source + (p0 + r) as u64 * ws.y_stride_row,
                row,
            )?;
        }
        // The last unit of the source reduces: every unit's rows were written before its
        // decrement (release), and the last decrement sees them all (acquire).
        let src = self.source(s)?;
        if src.remaining.fetch_sub(1, Ordering::AcqRel) == 1 && !self.sh.stops_after(Stage::Gemm1) {
            self.reduce(s, sc)?;
        }
        Ok(())
    }

    fn y_heap(&self) -> Res<&super::heap::SymHeap> {
        self.sh.y.get(self.me).ok_or_else(|| {
            let what = "no expert-output buffer for this rank".to_string();
            self.bad("expert", what, self.sh.y.len() as u64, self.me as u64)
        })
    }

    /// Reduce (step 5 of the protocol): each row `source` sent, its pairs' outputs summed
    /// in its metadata's order with their weights, into `source`'s combine cell; then the
    /// combine signal.
    fn reduce(&self, source: usize, sc: &mut Scratch) -> Res<()> {
        let plan = self.sh.plan;
        let (hl, ws) = (&plan.heap, &plan.workspace);
        let rows = self.source(source)?.rows.load(Ordering::Relaxed);
        let (heap, y) = (self.sh.heap(self.me)?, self.y_heap()?);
        let unit_weight = plan.config.router.scales_input();
        let mut meta = vec![0u64; plan.route_slots];
        let mut acc = vec![0f32; plan.config.hidden];
        for q in 0..rows {
            heap.read_words(hl.row_meta(CELL_RECV, source, q, 0), &mut meta)?;
            acc.fill(0.0);
            for &m in &meta {
                let (p, wt) = meta_parts(m);
                if p == NO_PAIR {
                    break;
                }
                if p as usize >= plan.pair_capacity {
                    let what = format!("row {q} of rank {source} names a pair past the capacity");
                    return Err(self.bad("reduce", what, plan.pair_capacity as u64, u64::from(p)));
                }
                let off = source as u64 * ws.y_stride_source + u64::from(p) * ws.y_stride_row;
                y.read(off, &mut sc.y)?;
                let wt = if unit_weight { 1.0 } else { wt };
                acc.iter_mut().zip(&sc.y).for_each(|(a, v)| *a += wt * v);
            }
            let at = (
                hl.combine_row(CELL_RECV, self.me, q),
                hl.combine_row(CELL_SEND, source, q),
            );
            self.sh.put_row(self.me, source, at, &acc)?;
        }
        let off = hl.combine_signal(self.me);
        self.sh
            .send_signal(self.me, self.sh.heap(source)?, off, rows)
    }

    /// Stage checks: keeps the activations of pairs `p0 .. p0 + n` of source `s` where the
    /// kernel's workspace holds them.
    fn capture_act(&self, s: usize, p0: usize, n: usize, a: &[f32]) -> Res<()> {
        let Some(act) = self.sh.act.get(self.me) else {
            return Ok(());
        };
        let plan = self.sh.plan;
        let (ws, wd) = (&plan.workspace, plan.config.intermediate);
        for (r, row) in a.chunks_exact(wd).take(n).enumerate() {
            let off = s as u64 * ws.act_stride_source + (p0 + r) as u64 * ws.act_stride_row;
            act.write(off, row)?;
        }
        Ok(())
    }

    fn shared_experts(&self, c: usize, sc: &mut Scratch) -> Res<()> {
        let cfg = &self.sh.plan.config;
        let (Some(s), Some(sw)) = (cfg.shared, &self.sh.packed.shared) else {
            return Ok(());
        };
        let h = cfg.hidden;
        let width = s.count * s.intermediate;
        let mlp = TiledMlp {
            kind: cfg.mlp,
            dtype: cfg.dtype,
            hidden: h,
            width,
            gemm0_tiles: width / TILE_N,
            gemm1_tiles: self.sh.plan.tiles.gemm1_per_block,
            w: sw,
        };
        let Some(cell) = self.shared_y.get(c) else {
            return Ok(());
        };
        let mut y = cell.lock().unwrap_or_else(PoisonError::into_inner);
        let t0 = c * TOKEN_CHUNK;
        let n = y.len() / h;
        mlp.run_block(&self.x[t0 * h..(t0 + n) * h], n, &mut sc.a, &mut y);
        Ok(())
    }

    fn combine(&self, c: usize, sc: &mut Scratch) -> Res<()> {
        let plan = self.sh.plan;
        let cfg = &plan.config;
        let h = cfg.hidden;
        let heap = self.sh.heap(self.me)?;
        let Some(cell) = self.out.get(c) else {
            return Ok(());
        };
        let mut out = cell.lock().unwrap_or_else(PoisonError::into_inner);
        let shared = self
            .shared_y
            .get(c)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner));
        let t0 = c * TOKEN_CHUNK;
        for (dt, row) in out.chunks_exact_mut(h).enumerate() {
            let t = t0 + dt;
            // The owners' partials in rank order (each already weighted and reduced).
            for (r, q) in self.route.destinations(t).iter().copied() {
                heap.read(plan.heap.combine_row(CELL_RECV, r, q as usize), &mut sc.y)?;
                row.iter_mut().zip(&sc.y).for_each(|(acc, v)| *acc += v);
            }
            if let (Some(s), Some(sy)) = (cfg.shared, &shared) {
                let xt = &self.x[t * h..(t + 1) * h];
                let gt = match &self.sh.w.shared_gate {
                    Some(gw) if s.gated => 1.0 / (1.0 + (-dot(xt, gw)).exp()),
                    _ => 1.0,
                };
                row.iter_mut()
                    .zip(&sy[dt * h..(dt + 1) * h])
                    .for_each(|(acc, v)| *acc += gt * v);
            }
            round_all(cfg.dtype, row);
        }
        Ok(())
    }
}
