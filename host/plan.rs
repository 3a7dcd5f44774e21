//! `LayerPlan`: every offset, capacity and count of one layer, as a pure function of the
//! config. The kernel and the CPU executor compute no layout of their own.
//!
//! Symmetric heap of one rank (the same offsets on every rank), in bytes:
//!
//! ```text
//! data    [peer < world][stage: dispatch | combine][cell: recv | send][local expert < L][slot < C][hidden]
//! signals dispatch [source < world][local expert < L] u64   (on the expert owner's heap)
//!         combine  [owner  < world][local expert < L] u64   (on the token source's heap)
//! ```
//!
//! The send cell exists only when some peer is reached by RDMA (`staging`). A signal word
//! is `(epoch << 32) | rows`.

use crate::config::{Capacity, MoeConfig};
use crate::error::{Error, Result};

/// Rows per tile; capacities are rounded up to it. Also the M of the kernel's GEMM tiles.
pub const TILE_M: usize = 64;
/// Output columns per GEMM tile.
pub const TILE_N: usize = 64;
/// Depth of one K step of a GEMM tile.
pub const TILE_K: usize = 64;
/// Tokens per gate chunk: the unit of the deterministic slot prefix sums (one histogram
/// row of `gate_hist` per chunk). Equal to `FM_GATE_CHUNK` in params.h.
pub const GATE_CHUNK: usize = 64;
/// Tile tasks are encoded in 30 bits (2 more bits hold the task kind).
pub const MAX_TASKS: usize = 1 << 30;
/// Most (source rank, local expert) dispatch signals one rank can await: the kernel's
/// scheduler keeps one seen-bit per pair in a 64-bit mask per thread (64 x 256 threads).
pub const MAX_SIGNAL_PAIRS: usize = 64 * 256;
/// Alignment of every region, in bytes (16 is what vector access needs; 256 keeps TMA and
/// cache lines happy).
pub const REGION_ALIGN: u64 = 256;

/// Stage index in the heap.
pub const STAGE_DISPATCH: usize = 0;
/// Stage index in the heap.
pub const STAGE_COMBINE: usize = 1;
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

/// Byte layout of the symmetric heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapLayout {
    /// Bytes of one token row.
    pub stride_row: u64,
    /// Bytes of one (peer, stage, cell, expert) block: `capacity` rows.
    pub stride_expert: u64,
    /// Bytes of one cell: `max_local` experts.
    pub stride_cell: u64,
    /// Bytes of one stage: 1 or 2 cells.
    pub stride_stage: u64,
    /// Bytes of one peer: 2 stages.
    pub stride_peer: u64,
    /// Number of cells per stage (2 with RDMA staging, else 1).
    pub cells: u64,
    /// Offset of the dispatch signal words.
    pub dispatch_signals: u64,
    /// Offset of the combine signal words.
    pub combine_signals: u64,
    /// Total bytes of the heap.
    pub bytes: u64,
}

impl HeapLayout {
    /// Offset of row `slot` of (peer, stage, cell, local expert).
    pub fn row(&self, peer: usize, stage: usize, cell: usize, local: usize, slot: usize) -> u64 {
        peer as u64 * self.stride_peer
            + stage as u64 * self.stride_stage
            + cell as u64 * self.stride_cell
            + local as u64 * self.stride_expert
            + slot as u64 * self.stride_row
    }

    /// Offset of the dispatch signal from `source` for local expert `local`.
    pub fn dispatch_signal(&self, source: usize, local: usize, max_local: usize) -> u64 {
        self.dispatch_signals + 8 * (source * max_local + local) as u64
    }

    /// Offset of the combine signal from `owner` for its local expert `local`.
    pub fn combine_signal(&self, owner: usize, local: usize, max_local: usize) -> u64 {
        self.combine_signals + 8 * (owner * max_local + local) as u64
    }
}

/// Byte layout of one rank's private device workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// u64 epoch counter, advanced by the kernel at the end of each launch.
    pub epoch: u64,
    /// Status words: 8 x u64 (code, stage, where, expected, observed, and spares).
    pub status: u64,
    /// u64 count of dropped (token, expert) pairs of the last launch.
    pub dropped: u64,
    /// u32 [experts]: pairs routed to each expert by this rank (before capacity).
    pub expert_counts: u64,
    /// i32 [tokens][top_k]: chosen expert ids.
    pub route_ids: u64,
    /// f32 [tokens][top_k]: routing weights.
    pub route_weights: u64,
    /// i32 [tokens][top_k]: slot in the expert's capacity, or -1 when dropped.
    pub route_slots: u64,
    /// Activations after GEMM0: [source][local expert][slot][intermediate] in the dtype.
    pub act: u64,
    /// Bytes of one activation row.
    pub act_stride_row: u64,
    /// Bytes of one (source, local expert) activation block.
    pub act_stride_expert: u64,
    /// Bytes of one source's activation blocks.
    pub act_stride_source: u64,
    /// u32 [source][local expert][row block]: GEMM0 tiles finished.
    pub gemm0_done: u64,
    /// u32 [source][local expert]: GEMM1 tiles finished.
    pub gemm1_done: u64,
    /// Task queue control: u32 tail (entries reserved), u32 head (tickets taken), u64 total
    /// word `(epoch << 32) | tasks` published once every dispatch signal has arrived.
    pub queue_ctl: u64,
    /// u64 [queue_capacity]: task queue entries, each `(epoch << 32) | task`.
    pub queue: u64,
    /// Entries the task queue can hold (the most tasks one launch can create).
    pub queue_capacity: u64,
    /// u32 [4]: rank-group barrier count, barrier generation, exit count, shared GEMM1 tiles done.
    pub sync: u64,
    /// u32 [token chunks][experts]: per-chunk expert histogram, then its exclusive prefix.
    pub gate_hist: u64,
    /// Shared-expert activations: [token row][shared width] in the dtype (0 bytes without shared experts).
    pub shared_act: u64,
    /// Bytes of one shared activation row.
    pub shared_act_stride_row: u64,
    /// Shared-expert output: f32 [token row][hidden].
    pub shared_out: u64,
    /// Bytes of one shared output row.
    pub shared_out_stride_row: u64,
    /// u32 [token row block]: shared GEMM0 tiles finished.
    pub shared_done: u64,
    /// Total bytes.
    pub bytes: u64,
}

/// Counts of the tile decomposition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileCounts {
    /// Row blocks per (source, expert) at full capacity: `capacity / TILE_M`.
    pub row_blocks: usize,
    /// GEMM0 tiles per row block: `intermediate / TILE_N` (each covers gate and up).
    pub gemm0_per_block: usize,
    /// GEMM1 tiles per row block: `hidden / TILE_N`.
    pub gemm1_per_block: usize,
    /// Token row blocks of the shared experts: `ceil(tokens / TILE_M)` (0 without them).
    pub shared_row_blocks: usize,
    /// Shared GEMM0 tiles per token row block: `shared width / TILE_N` (0 without them).
    pub shared_gemm0_per_block: usize,
    /// Shared GEMM1 tiles per token row block: `hidden / TILE_N` (0 without them).
    pub shared_gemm1_per_block: usize,
    /// Most tile tasks one rank can serve in one launch (routed and shared).
    pub max_tasks_per_rank: usize,
}

/// Bytes a rank allocates for one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryFigure {
    /// Symmetric heap.
    pub heap: u64,
    /// Private workspace.
    pub workspace: u64,
    /// Weights of the experts it owns, plus router and shared experts.
    pub weights: u64,
    /// Input and output token buffers.
    pub tokens: u64,
}

impl MemoryFigure {
    /// Sum of all parts.
    pub fn total(&self) -> u64 {
        self.heap + self.workspace + self.weights + self.tokens
    }
}

impl std::fmt::Display for MemoryFigure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "{:.1} MiB per rank (heap {:.1}, workspace {:.1}, weights {:.1}, tokens {:.1})",
            mib(self.total()),
            mib(self.heap),
            mib(self.workspace),
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
    /// Rows per (source, expert): a multiple of `TILE_M`.
    pub capacity: usize,
    /// Owner of each expert.
    pub owners: Vec<Owner>,
    /// Global ids of each rank's experts, in local order.
    pub local_experts: Vec<Vec<u32>>,
    /// Largest number of experts any rank owns (the heap's expert dimension).
    pub max_local: usize,
    /// Whether send cells are allocated (some peer is reached by RDMA).
    pub staging: bool,
    /// Symmetric heap layout.
    pub heap: HeapLayout,
    /// Private workspace layout.
    pub workspace: WorkspaceLayout,
    /// Tile decomposition.
    pub tiles: TileCounts,
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

/// Capacity per (source, expert) before rounding to the tile height.
pub fn raw_capacity(cfg: &MoeConfig) -> usize {
    match cfg.capacity {
        Capacity::Dropless => cfg.tokens,
        Capacity::Factor(f) => {
            let c = (f as f64 * cfg.tokens as f64 * cfg.top_k as f64 / cfg.experts as f64).ceil();
            // A token sends each expert at most one row.
            (c as usize).min(cfg.tokens)
        }
    }
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
        let world = cfg.world;
        let owner_ranks = cfg.expert_owners();
        let mut local_experts = vec![Vec::new(); world];
        let mut owners = Vec::with_capacity(cfg.experts);
        for (e, &r) in owner_ranks.iter().enumerate() {
            let list = &mut local_experts[r as usize];
            owners.push(Owner {
                rank: r,
                local: list.len() as u32,
            });
            list.push(e as u32);
        }
        let max_local = local_experts.iter().map(Vec::len).max().unwrap_or(0).max(1);
        if world * max_local > MAX_SIGNAL_PAIRS {
            return Err(Error::PlanTooLarge {
                what: format!(
                    "world {world} x {max_local} experts on the busiest rank = {} dispatch \
                     signals per rank exceed {MAX_SIGNAL_PAIRS}; spread the experts more evenly",
                    world * max_local
                ),
            });
        }
        // At least one tile of room even for a rank with zero tokens, so every region has
        // a non-zero size and a well-defined offset.
        let capacity = raw_capacity(&cfg).div_ceil(TILE_M).max(1) * TILE_M;

        let es = cfg.dtype.size() as u64;
        let (h, i) = (cfg.hidden as u64, cfg.intermediate as u64);
        let (r, l, c) = (world as u64, max_local as u64, capacity as u64);

        let cells = if staging { 2 } else { 1 };
        let stride_row = h * es;
        let stride_expert = Sizer::mul("heap expert block", c, stride_row)?;
        let stride_cell = Sizer::mul("heap cell", l, stride_expert)?;
        let stride_stage = Sizer::mul("heap stage", cells, stride_cell)?;
        let stride_peer = Sizer::mul("heap peer", 2, stride_stage)?;
        let data = Sizer::mul("heap data", r, stride_peer)?;
        let dispatch_signals = align(data);
        let signal_bytes = align(8 * r * l);
        let combine_signals = Sizer::add("heap signals", dispatch_signals, signal_bytes)?;
        let heap_bytes = Sizer::add("heap", combine_signals, signal_bytes)?;
        let heap = HeapLayout {
            stride_row,
            stride_expert,
            stride_cell,
            stride_stage,
            stride_peer,
            cells,
            dispatch_signals,
            combine_signals,
            bytes: heap_bytes,
        };

        let row_blocks = capacity / TILE_M;
        let gemm0_per_block = cfg.intermediate / TILE_N;
        let gemm1_per_block = cfg.hidden / TILE_N;
        let blocks_total = world * max_local * row_blocks;
        let shared_width = cfg.shared.map_or(0, |s| s.count * s.intermediate);
        let token_row_blocks = cfg.tokens.div_ceil(TILE_M).max(1);
        let (shared_row_blocks, shared_gemm0_per_block, shared_gemm1_per_block) =
            if shared_width > 0 {
                (token_row_blocks, shared_width / TILE_N, cfg.hidden / TILE_N)
            } else {
                (0, 0, 0)
            };
        let overflow = || Error::PlanTooLarge {
            what: "task count overflows usize".into(),
        };
        let routed_tasks = blocks_total
            .checked_mul(gemm0_per_block + gemm1_per_block)
            .ok_or_else(overflow)?;
        let shared_tasks = shared_row_blocks
            .checked_mul(shared_gemm0_per_block + shared_gemm1_per_block)
            .ok_or_else(overflow)?;
        let max_tasks = routed_tasks
            .checked_add(shared_tasks)
            .ok_or_else(overflow)?;
        if max_tasks >= MAX_TASKS {
            return Err(Error::PlanTooLarge {
                what: format!(
                    "{max_tasks} tile tasks per rank exceed the 30-bit task index (< {MAX_TASKS})"
                ),
            });
        }
        let tiles = TileCounts {
            row_blocks,
            gemm0_per_block,
            gemm1_per_block,
            shared_row_blocks,
            shared_gemm0_per_block,
            shared_gemm1_per_block,
            max_tasks_per_rank: max_tasks,
        };

        let t = cfg.tokens as u64;
        let k = cfg.top_k as u64;
        let mut off = 0u64;
        let mut take = |what: &str, bytes: u64| -> Result<u64> {
            let at = off;
            off = align(Sizer::add(what, off, bytes)?);
            Ok(at)
        };
        let epoch = take("epoch", 8)?;
        let status = take("status", 64)?;
        let dropped = take("dropped", 8)?;
        let expert_counts = take("expert counts", 4 * cfg.experts as u64)?;
        let route_ids = take("route ids", 4 * t * k)?;
        let route_weights = take("route weights", 4 * t * k)?;
        let route_slots = take("route slots", 4 * t * k)?;
        let act_stride_row = i * es;
        let act_stride_expert = Sizer::mul("act block", c, act_stride_row)?;
        let act_stride_source = Sizer::mul("act source", l, act_stride_expert)?;
        let act = take("act", Sizer::mul("act", r, act_stride_source)?)?;
        let gemm0_done = take("gemm0 counters", 4 * blocks_total as u64)?;
        let gemm1_done = take("gemm1 counters", 4 * r * l)?;
        let queue_ctl = take("queue control", 16)?;
        let queue = take("queue", Sizer::mul("queue", 8, max_tasks as u64)?)?;
        let sync = take("sync words", 16)?;
        let gate_chunks = cfg.tokens.div_ceil(GATE_CHUNK).max(1) as u64;
        let gate_hist = take(
            "gate histogram",
            Sizer::mul("gate histogram", 4 * gate_chunks, cfg.experts as u64)?,
        )?;
        let shared_rows = (shared_row_blocks * TILE_M) as u64;
        let shared_act_stride_row = shared_width as u64 * es;
        let shared_act = take(
            "shared act",
            Sizer::mul("shared act", shared_rows, shared_act_stride_row)?,
        )?;
        let shared_out_stride_row = if shared_width > 0 { 4 * h } else { 0 };
        let shared_out = take(
            "shared out",
            Sizer::mul("shared out", shared_rows, shared_out_stride_row)?,
        )?;
        let shared_done = take("shared counters", 4 * shared_row_blocks as u64)?;
        let workspace = WorkspaceLayout {
            epoch,
            status,
            dropped,
            expert_counts,
            route_ids,
            route_weights,
            route_slots,
            act,
            act_stride_row,
            act_stride_expert,
            act_stride_source,
            gemm0_done,
            gemm1_done,
            queue_ctl,
            queue,
            queue_capacity: max_tasks as u64,
            sync,
            gate_hist,
            shared_act,
            shared_act_stride_row,
            shared_out,
            shared_out_stride_row,
            shared_done,
            bytes: off,
        };

        Ok(LayerPlan {
            config: cfg,
            capacity,
            owners,
            local_experts,
            max_local,
            staging,
            heap,
            workspace,
            tiles,
        })
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.config.world
    }

    /// Bytes of the workspace's activation region (`workspace.act` onwards): one
    /// `act_stride_source` block per source rank.
    pub fn act_region_bytes(&self) -> u64 {
        self.workspace.act_stride_source * self.world() as u64
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
            weights: local * per_expert + router + shared,
            tokens: 2 * cfg.tokens as u64 * h * es,
        }
    }
}

mod traffic;
pub use traffic::Traffic;

#[cfg(test)]
mod tests;
