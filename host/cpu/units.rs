//! The units of a rank's work that its threads share: expert row blocks, shared-expert
//! token chunks and combine token chunks.
//!
//! Every output value is computed by exactly one unit, with a fixed order of operations
//! that does not depend on the unit's neighbours (each product of the GEMM is one chain
//! of operations over its row and column alone; combine sums a token's choices in choice
//! order), so results do not depend on how many threads run the units, nor on which
//! thread runs which.

use super::heap::SymHeap;
use super::rank::{Res, Shared};
use super::tile::{dot, round_all, TiledMlp};
use crate::error::Error;
use crate::plan::{CELL_RECV, STAGE_COMBINE, STAGE_DISPATCH, TILE_M, TILE_N};
use crate::reference::GateOutput;
use crate::stages::Stage;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// Rows of one expert unit (a half `TILE_M` block: enough units to share a rank's
/// experts among several threads, rows enough to reuse each weight tile).
pub const EXPERT_UNIT_ROWS: usize = TILE_M;

/// Tokens of one shared-expert or combine unit.
pub const TOKEN_CHUNK: usize = 32;

/// One unit of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Rows `r0 .. r0 + n` that source `item % world` sent to local expert `item / world`.
    Expert {
        /// Index of the (local expert, source) pair: `local * world + source`.
        item: usize,
        /// First row.
        r0: usize,
        /// Rows.
        n: usize,
    },
    /// The shared experts on token chunk `c` (tokens `c * TOKEN_CHUNK ..`).
    Shared(usize),
    /// The combine of token chunk `c`.
    Combine(usize),
}

/// The rows one source sent to one local expert, and how many of its units are left.
#[derive(Debug, Default)]
pub struct Item {
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
    g: &'a GateOutput,
    locals: &'a [u32],
    items: Vec<Item>,
    /// Shared-expert output `S(x)` per token chunk (empty without shared experts).
    shared_y: Vec<Mutex<&'a mut [f32]>>,
    /// The rank's output per token chunk.
    out: Vec<Mutex<&'a mut [f32]>>,
}

fn chunks(v: &mut [f32], len: usize) -> Vec<Mutex<&mut [f32]>> {
    v.chunks_mut(len.max(1)).map(Mutex::new).collect()
}

impl<'a> Ctx<'a> {
    /// The units of rank `me` on tokens `x` with gate decisions `g`, writing `out` (and
    /// `shared_y`, `tokens * hidden` values when the layer has shared experts).
    pub fn new(
        sh: &'a Shared<'a>,
        me: usize,
        x: &'a [f32],
        g: &'a GateOutput,
        shared_y: &'a mut [f32],
        out: &'a mut [f32],
    ) -> Self {
        let plan = sh.plan;
        let h = plan.config.hidden;
        let locals = plan.local_experts.get(me).map_or(&[][..], Vec::as_slice);
        let items = (0..locals.len() * plan.config.world)
            .map(|_| Item::default())
            .collect();
        Ctx {
            sh,
            me,
            x,
            g,
            locals,
            items,
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
            xb: vec![0f32; TILE_M * h],
            a: vec![0f32; TILE_M * cfg.intermediate.max(shared_width)],
            yb: vec![0f32; TILE_M * h],
            y: vec![0f32; h],
        }
    }

    /// What every rank shares in this forward.
    pub fn shared(&self) -> &'a Shared<'a> {
        self.sh
    }

    /// The forward's abort flag.
    pub fn abort(&self) -> &'a std::sync::atomic::AtomicBool {
        self.sh.abort
    }

    /// The local experts this rank serves (global ids).
    pub fn locals(&self) -> &[u32] {
        self.locals
    }

    /// The shared-expert units (none without shared experts).
    pub fn shared_units(&self) -> impl Iterator<Item = Unit> {
        (0..self.shared_y.len()).map(Unit::Shared)
    }

    /// The combine units.
    pub fn combine_units(&self) -> impl Iterator<Item = Unit> {
        (0..self.out.len()).map(Unit::Combine)
    }

    /// Records that `rows` rows arrived for `item` and returns its units. An item of no
    /// rows has none: its combine signal goes out at once.
    pub fn arm(&self, item: usize, rows: usize) -> Res<Vec<Unit>> {
        let units: Vec<Unit> = (0..rows)
            .step_by(EXPERT_UNIT_ROWS)
            .map(|r0| Unit::Expert {
                item,
                r0,
                n: (rows - r0).min(EXPERT_UNIT_ROWS),
            })
            .collect();
        let it = self.item(item)?;
        it.rows.store(rows, Ordering::Relaxed);
        it.remaining.store(units.len(), Ordering::Relaxed);
        if units.is_empty() {
            self.signal_combine(item, 0)?;
        }
        Ok(units)
    }

    fn item(&self, item: usize) -> Res<&Item> {
        self.items.get(item).ok_or_else(|| {
            Error::Device {
                rank: self.me,
                stage: "dispatch",
                what: "dispatch signal index past this rank's (expert, source) pairs".into(),
                expected: self.items.len() as u64,
                observed: item as u64,
            }
            .into()
        })
    }

    /// The combine signal of `item` (`rows` rows) into its source's heap.
    fn signal_combine(&self, item: usize, rows: usize) -> Res<()> {
        let plan = self.sh.plan;
        let (l, s) = (item / plan.config.world, item % plan.config.world);
        let off = plan.heap.combine_signal(self.me, l, plan.max_local);
        self.sh.send_signal(self.me, self.sh.heap(s)?, off, rows)
    }

    /// Runs `unit` with `sc` as scratch.
    pub fn run(&self, unit: Unit, sc: &mut Scratch) -> Res<()> {
        match unit {
            Unit::Expert { item, r0, n } => self.expert(item, r0, n, sc),
            Unit::Shared(c) => self.shared_experts(c, sc),
            Unit::Combine(c) => self.combine(c, sc),
        }
    }

    fn expert(&self, item: usize, r0: usize, n: usize, sc: &mut Scratch) -> Res<()> {
        let plan = self.sh.plan;
        let cfg = &plan.config;
        let h = cfg.hidden;
        let (l, s) = (item / cfg.world, item % cfg.world);
        let it = self.item(item)?;
        let e = self.locals.get(l).map_or(usize::MAX, |&e| e as usize);
        let w = self.sh.packed.experts.get(e).ok_or_else(|| Error::Device {
            rank: self.me,
            stage: "expert",
            what: format!("local expert {l} has no weights"),
            expected: self.sh.packed.experts.len() as u64,
            observed: e as u64,
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
        for r in 0..n {
            let off = plan.heap.row(s, STAGE_DISPATCH, CELL_RECV, l, r0 + r);
            heap.read(off, &mut sc.xb[r * h..(r + 1) * h])?;
        }
        mlp.run_block(&sc.xb, n, &mut sc.a, &mut sc.yb);
        self.capture_act(s, l, r0, n, &sc.a)?;
        if self.sh.stops_after(Stage::Gemm0) {
            return Ok(());
        }
        for r in 0..n {
            let row = &sc.yb[r * h..(r + 1) * h];
            self.sh
                .put_row(self.me, s, self.me, STAGE_COMBINE, l, r0 + r, row)?;
        }
        // The last unit of the item signals: every unit's rows were written before its
        // decrement (release), and the last decrement sees them all (acquire) before the
        // signal's own release store.
        if it.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.signal_combine(item, it.rows.load(Ordering::Relaxed))?;
        }
        Ok(())
    }

    /// Stage checks: keeps the activations of rows `r0 .. r0 + n` of (source `s`, local
    /// expert `l`) where the kernel's workspace holds them.
    fn capture_act(&self, s: usize, l: usize, r0: usize, n: usize, a: &[f32]) -> Res<()> {
        let Some(act) = self.sh.act.get(self.me) else {
            return Ok(());
        };
        let plan = self.sh.plan;
        let (ws, wd) = (&plan.workspace, plan.config.intermediate);
        for (r, row) in a.chunks_exact(wd).take(n).enumerate() {
            let off = s as u64 * ws.act_stride_source
                + l as u64 * ws.act_stride_expert
                + (r0 + r) as u64 * ws.act_stride_row;
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
        let g = self.g;
        let k = self.sh.k;
        let heap: &SymHeap = self.sh.heap(self.me)?;
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
                heap.read(off, &mut sc.y)?;
                // An input-scaled router (Llama-4) sums the outputs with weight 1.
                let wt = if cfg.router.scales_input() {
                    1.0
                } else {
                    g.weights[i]
                };
                row.iter_mut()
                    .zip(&sc.y)
                    .for_each(|(acc, v)| *acc += wt * v);
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
