//! `LayerPlan`: every offset, capacity and count of one layer, as a pure function of the
//! config. The kernel and the CPU executor compute no layout of their own.
//!
//! # Protocol (rank-level dispatch), rank `s` with `T` tokens, effective top-k `k`
//!
//! 1. **Gate.** `ids[t][j]`, `weights[t][j]`. `slot[t][j]` = number of earlier tokens that
//!    chose the same expert (token order); the choice is kept when `slot < capacity`, else
//!    its slot is -1 and it is counted as dropped (never, when dropless). A token *goes to*
//!    rank `r` when any of its choices (kept or not) is owned by `r`;
//!    `rank_slot[t][j]` = number of earlier tokens that go to the owner rank of choice `j`,
//!    and `rank_counts[r]` the tokens that go to `r`.
//! 2. **Pairs.** A kept choice `(t, j)` of expert `e` owned by `(r, l)` is pair
//!    `base(l) + slot[t][j]` of source `s` on `r`, where `base(l)` sums
//!    `count(l') = min(expert_counts[e(r, l')], capacity)` over `l' < l`: a source's pairs
//!    are ordered by (local expert, token).
//! 3. **Dispatch** into `r`'s heap, cell `CELL_RECV`, peer index `s` (through `s`'s own
//!    `CELL_SEND` at index `r` first when the plan stages): the token row at
//!    `dispatch_row(rank_slot)` (scaled by its weight and rounded when the router scales the
//!    input; that router needs top-1); `row_meta(rank_slot, i)` = [`meta_entry`]`(pair,
//!    weight)` of the token's `i`-th kept choice on `r` in choice order, then
//!    `meta_entry(NO_PAIR, 0.0)`; `pair(p)` = the pair's `rank_slot`; `count(l)` for each of
//!    `r`'s local experts. Then one signal `(epoch, rank_counts[r])` at
//!    `dispatch_signal(s)`, to every rank, 0 rows included.
//! 4. **Experts** on `r`, once `s`'s signal is seen: for local expert `l`, rows
//!    `base(l) .. base(l) + count(l)` of `s`'s pairs in blocks of `TILE_M`, one task per
//!    block or per two blocks (a wide task, [`task_rows`]); GEMM0 reads token
//!    row `dispatch_row(pair(p))` and writes the activation at `act[s][p]`; GEMM1 writes the
//!    expert output (rounded to the dtype, before any weight) at `y[s][p]`.
//! 5. **Reduce** on `r`, once every GEMM1 tile of source `s` is done: for each of the
//!    `rank_counts` rows `q` that `s` sent, `sum_i w_i * y[s][p_i]` over its `row_meta`
//!    entries in order (f32, from 0; weight 1 when the router scales the input), rounded
//!    to the dtype, into `combine_row(q)` of `s`'s heap at peer index `r`; then one signal
//!    `(epoch, rows)` at `combine_signal(r)` on `s`, 0 rows included.
//! 6. **Combine** on `s`: each token sums, in f32 from 0, the partials of the distinct ranks
//!    its choices go to, in rank order, then adds the shared experts, and rounds to the
//!    dtype.
//!
//! Memory is O(world x tokens x hidden): dropless needs no capacity. See [`HeapLayout`]
//! for the heap and [`WorkspaceLayout`] for the private workspace.

use crate::config::{Capacity, MoeConfig, Router};
use crate::error::{Error, Result};

mod heap;
mod route;
mod task_count;
mod tile_rule;
mod workspace;
pub use heap::{meta_entry, meta_parts, HeapLayout, NO_PAIR};
pub use route::RankRoute;
pub use task_count::TaskCounts;
pub use tile_rule::{
    task_rows, tasks, tile_for, wide_tasks, TileCensus, TileMode, TileShape, DECODE_MAX_ROWS,
    WIDE_ROWS,
};
pub use workspace::WorkspaceLayout;

/// Rows per tile. Also the M of the kernel's GEMM tiles.
pub const TILE_M: usize = 64;
/// Output columns per GEMM tile (and per reduce tile).
pub const TILE_N: usize = 64;
/// Depth of one K step of a GEMM tile.
pub const TILE_K: usize = 64;
/// Tokens per gate chunk: the unit of the deterministic slot prefix sums (one histogram
/// row of `gate_hist` and `rank_hist` per chunk). Equal to `FM_GATE_CHUNK` in params.h.
pub const GATE_CHUNK: usize = 64;
/// Tile tasks are encoded in 30 bits (2 more bits hold the task kind).
pub const MAX_TASKS: usize = 1 << 30;
/// Alignment of every region, in bytes (16 is what vector access needs; 256 keeps TMA and
/// cache lines happy).
pub const REGION_ALIGN: u64 = 256;

/// u64 words of one block's phase times in the workspace (`FM_PHASE_WORDS`): launch start,
/// gate, dispatch, expert tiles, idle waits, combine (ns), tasks run, launch end, then the
/// expert tiles' ns by task kind (routed GEMM0, routed GEMM1, shared, reduce), the tasks
/// of each kind, and the routed tasks that started with their first stage in flight.
pub const PHASE_WORDS: usize = 17;
/// Blocks per rank whose phase times are kept (`FM_PHASE_MAX_BLOCKS`); blocks past it
/// record nothing.
pub const PHASE_MAX_BLOCKS: usize = 1024;

/// Cell index in the heap: where peers write.
pub const CELL_RECV: usize = 0;
/// Cell index in the heap: local staging for RDMA puts.
pub const CELL_SEND: usize = 1;

/// Who owns an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// Owning rank.
    pub rank: u32,
    /// Index among that rank's experts.
    pub local: u32,
}

/// Counts of the tile decomposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileCounts {
    /// Row blocks of one (source, local expert) pair list at most: `ceil(capacity / TILE_M)`.
    pub row_blocks: usize,
    /// GEMM0 tiles per row block: `intermediate / TILE_N` (each covers gate and up).
    pub gemm0_per_block: usize,
    /// GEMM1 tiles per row block: `hidden / TILE_N`.
    pub gemm1_per_block: usize,
    /// Row blocks of one source's pairs at most (over all local experts).
    pub pair_blocks: usize,
    /// Token row blocks of one source's dispatch rows: `ceil(tokens / TILE_M)`.
    pub reduce_row_blocks: usize,
    /// Reduce tiles per token row block: `hidden / TILE_N`.
    pub reduce_per_block: usize,
    /// Token row blocks of the shared experts: `ceil(tokens / TILE_M)` (0 without them).
    pub shared_row_blocks: usize,
    /// Shared GEMM0 tiles per token row block: `shared width / TILE_N` (0 without them).
    pub shared_gemm0_per_block: usize,
    /// Shared GEMM1 tiles per token row block: `hidden / TILE_N` (0 without them).
    pub shared_gemm1_per_block: usize,
    /// Most tile tasks one rank can serve in one launch (routed, reduce and shared).
    pub max_tasks_per_rank: usize,
}

/// Bytes a rank allocates for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigure {
    /// Symmetric heap.
    pub heap: u64,
    /// Private workspace (control words, queue, routing).
    pub workspace: u64,
    /// Private scratch (activations, expert outputs, logits): one per rank for all the
    /// layers of a GPU model, which run one at a time.
    pub scratch: u64,
    /// Weights of the experts it owns, plus router and shared experts.
    pub weights: u64,
    /// Input and output token buffers.
    pub tokens: u64,
}

impl MemoryFigure {
    /// Sum of all parts.
    pub fn total(&self) -> u64 {
        self.heap + self.workspace + self.scratch + self.weights + self.tokens
    }
}

impl std::fmt::Display for MemoryFigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "{:.1} MiB per rank (heap {:.1}, workspace {:.1}, scratch {:.1}, weights {:.1}, tokens {:.1})",
            mib(self.total()),
            mib(self.heap),
            mib(self.workspace),
            mib(self.scratch),
            mib(self.weights),
            mib(self.tokens)
        )
    }
}

/// Everything the executors need to run one layer, derived from a validated config.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerPlan {
    /// The config this plan was made from.
    pub config: MoeConfig,
    /// Pairs one source may send one expert (`tokens` when dropless); the choices past it
    /// are dropped and counted.
    pub capacity: usize,
    /// Pairs one source may send one rank: `min(tokens x route_slots, max_local x capacity)`.
    pub pair_capacity: usize,
    /// Entries per token row in the heap's `row_meta`: `min(top_k, max_local)`.
    pub route_slots: usize,
    /// Owner of each expert.
    pub owners: Vec<Owner>,
    /// Global ids of each rank's experts, in local order.
    pub local_experts: Vec<Vec<u32>>,
    /// Largest number of experts any rank owns.
    pub max_local: usize,
    /// Whether send cells are allocated (some peer is reached by RDMA).
    pub staging: bool,
    /// Symmetric heap layout.
    pub heap: HeapLayout,
    /// Private workspace layout.
    pub workspace: WorkspaceLayout,
    /// Tile decomposition.
    pub tiles: TileCounts,
    /// Which tasks and tile shapes the executors use ([`LayerPlan::task_rows`],
    /// [`LayerPlan::tile_for`]); the layout does not depend on it.
    pub tile_mode: TileMode,
}

fn align(x: u64) -> u64 {
    x.div_ceil(REGION_ALIGN) * REGION_ALIGN
}

/// Checked arithmetic that turns overflow into `PlanTooLarge`.
struct Sizer;

impl Sizer {
    fn mul(what: &str, a: u64, b: u64) -> Result<u64> {
        a.checked_mul(b).ok_or_else(|| Error::PlanTooLarge {
            what: format!("{what}: {a} * {b} overflows u64"),
        })
    }
    fn add(what: &str, a: u64, b: u64) -> Result<u64> {
        a.checked_add(b).ok_or_else(|| Error::PlanTooLarge {
            what: format!("{what}: {a} + {b} overflows u64"),
        })
    }
}

/// Pairs one source may send one expert: the token count when dropless (a token sends
/// each expert at most one row), else `ceil(factor x tokens x top_k / experts)` capped there.
pub fn raw_capacity(cfg: &MoeConfig) -> usize {
    match cfg.capacity {
        Capacity::Dropless => cfg.tokens,
        Capacity::Factor(f) => {
            let c = (f as f64 * cfg.tokens as f64 * cfg.top_k as f64 / cfg.experts as f64).ceil();
            (c as usize).min(cfg.tokens)
        }
    }
}

/// Owner of each expert and each rank's experts in local order.
fn placement(cfg: &MoeConfig) -> (Vec<Owner>, Vec<Vec<u32>>) {
    let mut local_experts = vec![Vec::new(); cfg.world];
    let mut owners = Vec::with_capacity(cfg.experts);
    for (e, r) in cfg.expert_owners().into_iter().enumerate() {
        let list = &mut local_experts[r as usize];
        owners.push(Owner {
            rank: r,
            local: list.len() as u32,
        });
        list.push(e as u32);
    }
    (owners, local_experts)
}

/// Shapes every region size depends on.
struct Dims {
    world: u64,
    tokens: u64,
    hidden: u64,
    es: u64,
    max_local: u64,
    route_slots: u64,
    pair_capacity: u64,
}

fn heap_layout(d: &Dims, staging: bool) -> Result<HeapLayout> {
    let cells = if staging { 2 } else { 1 };
    let stride_row = d.hidden * d.es;
    let stride_peer = Sizer::mul("heap rows of a peer", d.tokens, stride_row)?;
    let stride_cell = Sizer::mul("heap cell", d.world, stride_peer)?;
    let region = align(Sizer::mul("heap row region", cells, stride_cell)?);
    let dispatch_rows = 0;
    let combine_rows = region;
    let meta = Sizer::add("heap rows", combine_rows, region)?;
    let meta_counts = 0;
    let meta_pairs = align(4 * d.max_local);
    let pairs = align(Sizer::mul("heap pair list", 4, d.pair_capacity)?);
    let meta_rows = Sizer::add("heap pair list", meta_pairs, pairs)?;
    let row_meta = Sizer::mul("heap row meta", 8 * d.route_slots, d.tokens)?;
    let meta_stride_peer = align(Sizer::add("heap meta block", meta_rows, row_meta)?);
    let meta_stride_cell = Sizer::mul("heap meta cell", d.world, meta_stride_peer)?;
    let meta_bytes = Sizer::mul("heap meta", cells, meta_stride_cell)?;
    let dispatch_signals = align(Sizer::add("heap meta", meta, meta_bytes)?);
    let signal_bytes = align(8 * d.world);
    let combine_signals = dispatch_signals + signal_bytes;
    Ok(HeapLayout {
        stride_row,
        stride_peer,
        stride_cell,
        cells,
        dispatch_rows,
        combine_rows,
        meta,
        meta_stride_peer,
        meta_stride_cell,
        meta_counts,
        meta_pairs,
        meta_rows,
        route_slots: d.route_slots,
        dispatch_signals,
        combine_signals,
        bytes: combine_signals + signal_bytes,
    })
}

fn tile_counts(cfg: &MoeConfig, d: &Dims, capacity: usize) -> Result<TileCounts> {
    let row_blocks = capacity.div_ceil(TILE_M).max(1);
    let max_local = d.max_local as usize;
    // A source's pairs fill at most pair_capacity / TILE_M whole blocks plus one partial
    // block per local expert.
    let pair_blocks = (row_blocks * max_local)
        .min(d.pair_capacity as usize / TILE_M + max_local)
        .max(1);
    let gemm0_per_block = cfg.intermediate / TILE_N;
    let gemm1_per_block = cfg.hidden / TILE_N;
    let token_blocks = cfg.tokens.div_ceil(TILE_M).max(1);
    let shared_width = cfg.shared.map_or(0, |s| s.count * s.intermediate);
    let (shared_row_blocks, shared_gemm0_per_block, shared_gemm1_per_block) = if shared_width > 0 {
        (token_blocks, shared_width / TILE_N, gemm1_per_block)
    } else {
        (0, 0, 0)
    };
    let overflow = || Error::PlanTooLarge {
        what: "task count overflows usize".into(),
    };
    let per_source = pair_blocks
        .checked_mul(gemm0_per_block + gemm1_per_block)
        .and_then(|t| t.checked_add(token_blocks * gemm1_per_block))
        .ok_or_else(overflow)?;
    let max_tasks = per_source
        .checked_mul(cfg.world)
        .and_then(|t| {
            shared_row_blocks
                .checked_mul(shared_gemm0_per_block + shared_gemm1_per_block)
                .and_then(|s| t.checked_add(s))
        })
        .ok_or_else(overflow)?;
    if max_tasks >= MAX_TASKS {
        return Err(Error::PlanTooLarge {
            what: format!(
                "{max_tasks} tile tasks per rank exceed the 30-bit task index (< {MAX_TASKS})"
            ),
        });
    }
    Ok(TileCounts {
        row_blocks,
        gemm0_per_block,
        gemm1_per_block,
        pair_blocks,
        reduce_row_blocks: token_blocks,
        reduce_per_block: gemm1_per_block,
        shared_row_blocks,
        shared_gemm0_per_block,
        shared_gemm1_per_block,
        max_tasks_per_rank: max_tasks,
    })
}

/// Bump allocator of one region's aligned sub-regions.
struct Bump(u64);

impl Bump {
    fn take(&mut self, what: &str, bytes: u64) -> Result<u64> {
        let at = self.0;
        self.0 = align(Sizer::add(what, self.0, bytes)?);
        Ok(at)
    }
}

fn workspace_layout(cfg: &MoeConfig, d: &Dims, tiles: &TileCounts) -> Result<WorkspaceLayout> {
    let (t, k, e, w) = (d.tokens, cfg.top_k as u64, cfg.experts as u64, d.world);
    // The control words and per-token routing (per layer: read back after the launch)...
    let mut control = Bump(0);
    let mut take = |what: &str, bytes: u64| control.take(what, bytes);
    // ...and the scratch: what one launch writes then reads (activations, expert outputs,
    // shared-expert rows, router logits), which a model's layers may share.
    let mut scratch = Bump(0);
    let epoch = take("epoch", 8)?;
    let status = take("status", 64)?;
    let dropped = take("dropped", 8)?;
    let expert_counts = take("expert counts", 4 * e)?;
    let route_ids = take("route ids", 4 * t * k)?;
    let route_weights = take("route weights", 4 * t * k)?;
    let route_slots = take("route slots", 4 * t * k)?;
    let route_rank_slots = take("route rank slots", 4 * t * k)?;
    let rank_counts = take("rank counts", 4 * w)?;
    let gate_chunks = d.tokens.div_ceil(GATE_CHUNK as u64).max(1);
    let gate_hist = take(
        "gate histogram",
        Sizer::mul("gate histogram", 4 * gate_chunks, e)?,
    )?;
    let rank_hist = take("rank histogram", 4 * gate_chunks * w)?;
    let pair_base = take("pair bases", 4 * w * d.max_local)?;
    let act_stride_row = cfg.intermediate as u64 * d.es;
    let act_stride_source = Sizer::mul("act source", d.pair_capacity, act_stride_row)?;
    let act = scratch.take("act", Sizer::mul("act", w, act_stride_source)?)?;
    let y_stride_row = d.hidden * d.es;
    let y_stride_source = Sizer::mul("expert outputs", d.pair_capacity, y_stride_row)?;
    let y = scratch.take(
        "expert outputs",
        Sizer::mul("expert outputs", w, y_stride_source)?,
    )?;
    let blocks = w * d.max_local * tiles.row_blocks as u64;
    let gemm0_done = take("gemm0 counters", 4 * blocks)?;
    let gemm1_done = take("gemm1 counters", 4 * w)?;
    let reduce_done = take("reduce counters", 4 * w)?;
    let queue_ctl = take("queue control", 16)?;
    let queue_capacity = tiles.max_tasks_per_rank as u64;
    let queue = take("queue", Sizer::mul("queue", 8, queue_capacity)?)?;
    let sync = take("sync words", 16)?;
    let shared_width = cfg.shared.map_or(0, |s| s.count * s.intermediate) as u64;
    let shared_rows = (tiles.shared_row_blocks * TILE_M) as u64;
    let shared_act_stride_row = shared_width * d.es;
    let shared_act = scratch.take(
        "shared act",
        Sizer::mul("shared act", shared_rows, shared_act_stride_row)?,
    )?;
    let shared_out_stride_row = if shared_width > 0 { 4 * d.hidden } else { 0 };
    let shared_out = scratch.take(
        "shared out",
        Sizer::mul("shared out", shared_rows, shared_out_stride_row)?,
    )?;
    let shared_done = take("shared counters", 4 * tiles.shared_row_blocks as u64)?;
    let logits_stride_row = 4 * e.div_ceil(TILE_N as u64) * TILE_N as u64;
    let logit_rows = if cfg.router == Router::Given { 0 } else { t };
    let logits = scratch.take(
        "router logits",
        Sizer::mul("router logits", logit_rows, logits_stride_row)?,
    )?;
    let phase_times = take("phase times", (8 * PHASE_WORDS * PHASE_MAX_BLOCKS) as u64)?;
    Ok(WorkspaceLayout {
        epoch,
        status,
        dropped,
        expert_counts,
        route_ids,
        route_weights,
        route_slots,
        route_rank_slots,
        rank_counts,
        gate_hist,
        rank_hist,
        pair_base,
        act,
        act_stride_row,
        act_stride_source,
        y,
        y_stride_row,
        y_stride_source,
        gemm0_done,
        gemm1_done,
        reduce_done,
        queue_ctl,
        queue,
        queue_capacity,
        sync,
        shared_act,
        shared_act_stride_row,
        shared_out,
        shared_out_stride_row,
        shared_done,
        logits,
        logits_stride_row,
        phase_times,
        bytes: control.0,
        scratch_bytes: scratch.0,
    })
}

impl LayerPlan {
    /// Plans a layer without RDMA staging (single GPU, emulated world, NVLink peers, CPU).
    pub fn new(config: &MoeConfig) -> Result<Self> {
        Self::with_staging(config, false)
    }

    /// Plans a layer; `staging` allocates the send cells needed by RDMA peers.
    pub fn with_staging(config: &MoeConfig, staging: bool) -> Result<Self> {
        config.validate()?;
        let cfg = config.clone();
        let (owners, local_experts) = placement(&cfg);
        let max_local = local_experts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let capacity = raw_capacity(&cfg);
        let route_slots = cfg.top_k.min(max_local);
        let pair_capacity = (cfg.tokens * route_slots).min(max_local * capacity);
        let d = Dims {
            world: cfg.world as u64,
            tokens: cfg.tokens as u64,
            hidden: cfg.hidden as u64,
            es: cfg.dtype.size() as u64,
            max_local: max_local as u64,
            route_slots: route_slots as u64,
            pair_capacity: pair_capacity as u64,
        };
        let heap = heap_layout(&d, staging)?;
        let tiles = tile_counts(&cfg, &d, capacity)?;
        let workspace = workspace_layout(&cfg, &d, &tiles)?;
        Ok(LayerPlan {
            config: cfg,
            capacity,
            pair_capacity,
            route_slots,
            owners,
            local_experts,
            max_local,
            staging,
            heap,
            workspace,
            tiles,
            tile_mode: TileMode::Auto,
        })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.config.world
    }

    /// Bytes of the scratch's activation region (`workspace.act` onwards): one
    /// `act_stride_source` block per source rank.
    pub fn act_region_bytes(&self) -> u64 {
        self.workspace.act_stride_source * self.world() as u64
    }

    /// Bytes of the scratch's expert-output region (`workspace.y` onwards): one
    /// `y_stride_source` block per source rank.
    pub fn y_region_bytes(&self) -> u64 {
        self.workspace.y_stride_source * self.world() as u64
    }

    /// Bytes rank `rank` allocates, shown to the user before anything is allocated.
    pub fn memory(&self, rank: usize) -> MemoryFigure {
        let cfg = &self.config;
        let es = cfg.dtype.size() as u64;
        let (h, i, e) = (
            cfg.hidden as u64,
            cfg.intermediate as u64,
            cfg.experts as u64,
        );
        let local = self.local_experts.get(rank).map_or(0, Vec::len) as u64;
        let per_expert = (cfg.gemm0_width() as u64 * h + h * i) * es;
        let router = e * h * es + 4 * e;
        let shared = cfg.shared.map_or(0, |s| {
            let w = (s.count * s.intermediate) as u64;
            let width0 = if cfg.mlp.is_gated() { 2 * w } else { w };
            (width0 * h + h * w) * es + if s.gated { h * es } else { 0 }
        });
        MemoryFigure {
            heap: self.heap.bytes,
            workspace: self.workspace.bytes,
            scratch: self.workspace.scratch_bytes,
            weights: local * per_expert + router + shared,
            tokens: 2 * cfg.tokens as u64 * h * es,
        }
    }
}

mod traffic;
pub use traffic::Traffic;

#[cfg(test)]
mod tests;
