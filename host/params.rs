//! `#[repr(C)]` mirror of `kernel/include/flashmoe/params.h`.
//!
//! `tests/params_layout.rs` compiles the header with the host C compiler and checks that
//! every field offset and struct size agrees with these definitions.

use crate::config::{Dtype, MlpKind, MoeConfig, Router};
use crate::plan::{LayerPlan, TILE_K, TILE_M, TILE_N};

/// `FM_PARAMS_VERSION`.
pub const PARAMS_VERSION: u32 = 4;
/// `FM_MAX_LAUNCH_RANKS`: ranks one launch can emulate.
pub const MAX_LAUNCH_RANKS: usize = 8;

/// `FM_BLOCK_THREADS`: threads per block of every entry point.
pub const BLOCK_THREADS: u32 = 256;
/// `FM_MIN_BLOCKS_PER_RANK`: a rank group needs a scheduler block and a processor block.
pub const MIN_BLOCKS_PER_RANK: u32 = 2;
/// `FM_SMEM_BYTES_BF16`: dynamic shared memory of `flashmoe_layer_bf16`, bytes.
pub const SMEM_BYTES_BF16: u32 = 110848;
/// `FM_SMEM_BYTES_F16`: dynamic shared memory of `flashmoe_layer_f16`, bytes.
pub const SMEM_BYTES_F16: u32 = 110848;
/// `FM_SMEM_BYTES_F32`: dynamic shared memory of `flashmoe_layer_f32`, bytes.
pub const SMEM_BYTES_F32: u32 = 52480;
/// `FM_GATE_CHUNK`: tokens per gate chunk (== [`crate::plan::GATE_CHUNK`]).
pub const GATE_CHUNK: u32 = 64;
/// Indices of the status words (`ws_status`, u64[8]; `FM_STATUS_CODE` ... in params.h).
pub mod status_word {
    /// `FM_STATUS_*` code of the first error of the rank (0: none).
    pub const CODE: usize = 0;
    /// `FM_STAGE_*` of that error.
    pub const STAGE: usize = 1;
    /// Where it happened (meaning by stage and code: kernel/README.md).
    pub const WHERE: usize = 2;
    /// The value expected.
    pub const EXPECTED: usize = 3;
    /// The value observed.
    pub const OBSERVED: usize = 4;
    /// Nanoseconds waited (timeouts).
    pub const WAITED: usize = 5;
    /// Rank-local abort flag: non-zero once any block of the rank hit an error.
    pub const ABORT: usize = 6;
}

/// Dynamic shared memory bytes of the entry point for `dtype`.
pub fn smem_bytes(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::Bf16 => SMEM_BYTES_BF16,
        Dtype::F16 => SMEM_BYTES_F16,
        Dtype::F32 => SMEM_BYTES_F32,
    }
}

/// Name of the kernel entry point for `dtype` (all three live in one cubin).
pub fn entry_point(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "flashmoe_layer_bf16",
        Dtype::F16 => "flashmoe_layer_f16",
        Dtype::F32 => "flashmoe_layer_f32",
    }
}

/// `FM_TILES_AUTO`: the tile rule picks the tasks and shapes by rows, wide tasks of two
/// blocks in bf16/f16 ([`crate::plan::TileMode::Auto`]).
pub const TILES_AUTO: u32 = 0;
/// `FM_TILES_CLASSIC`: every routed block uses the classic tile.
pub const TILES_CLASSIC: u32 = 1;
/// `FM_TILES_NARROW`: auto without wide tasks ([`crate::plan::TileMode::Narrow`]).
pub const TILES_NARROW: u32 = 2;
/// `FM_TILES_AUTO_SERIAL`: auto's tiles without the early first stage of the next task
/// ([`crate::plan::TileMode::AutoSerial`]).
pub const TILES_AUTO_SERIAL: u32 = 3;
/// `FM_DECODE_MAX_ROWS` (== [`crate::plan::DECODE_MAX_ROWS`]).
pub const DECODE_MAX_ROWS: u32 = 32;
/// `FM_SCOPE_SYSTEM`: fences and acquires toward peers at system scope (NVSHMEM worlds).
pub const SCOPE_SYSTEM: u32 = 0;
/// `FM_SCOPE_GPU`: every heap of the world is on this GPU (single and emulated worlds).
pub const SCOPE_GPU: u32 = 1;
/// `FM_PHASE_WORDS` (== [`crate::plan::PHASE_WORDS`]).
pub const PHASE_WORDS: u32 = 17;
/// `FM_PHASE_MAX_BLOCKS` (== [`crate::plan::PHASE_MAX_BLOCKS`]).
pub const PHASE_MAX_BLOCKS: u32 = 1024;

/// `FM_NO_FAULT`: no fault injected.
pub const NO_FAULT: u32 = u32::MAX;

/// `FM_STOP_NONE`: `stop_after` value that runs the whole layer.
pub const STOP_NONE: u32 = 0;

/// `FM_CONSEQUENCE_WAIT_FACTOR`: the deadline of a wait that can only be a consequence
/// (a queue ticket, a rank barrier, the shared-expert tiles) is this many times the
/// layer's timeout; waits on a peer's signal use the timeout itself, so a silent peer is
/// named before any consequence reports.
pub const CONSEQUENCE_WAIT_FACTOR: u32 = 2;

/// Status codes (`FM_STATUS_*`).
pub mod status {
    /// No error.
    pub const OK: u64 = 0;
    /// A wait ran past its deadline.
    pub const TIMEOUT: u64 = 1;
    /// The kernel found parameters it cannot run.
    pub const BAD_PARAMS: u64 = 2;
    /// Invalid routing (expert id out of range, non-finite weight).
    pub const BAD_ROUTING: u64 = 3;
    /// A signal carried a count that cannot be.
    pub const BAD_SIGNAL: u64 = 4;
    /// More tasks than the queue holds.
    pub const QUEUE_OVERFLOW: u64 = 5;
}

/// Stage codes (`FM_STAGE_*`).
pub mod stage {
    /// Parameter checks.
    pub const SETUP: u64 = 0;
    /// Router.
    pub const GATE: u64 = 1;
    /// Token dispatch.
    pub const DISPATCH: u64 = 2;
    /// Expert GEMMs.
    pub const EXPERT: u64 = 3;
    /// Combine.
    pub const COMBINE: u64 = 4;

    /// Name of a stage code.
    pub fn name(code: u64) -> &'static str {
        match code {
            SETUP => "setup",
            GATE => "gate",
            DISPATCH => "dispatch",
            EXPERT => "expert",
            COMBINE => "combine",
            _ => "unknown",
        }
    }
}

/// `FmLayerParams`: shape and layout, identical for every rank.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct LayerParams {
    pub version: u32,
    pub world: u32,
    pub tokens_max: u32,
    pub hidden: u32,
    pub intermediate: u32,
    pub experts: u32,
    pub top_k: u32,
    pub max_local: u32,
    pub capacity: u32,
    pub dtype: u32,
    pub mlp: u32,
    pub router: u32,
    pub renormalize: u32,
    pub shared_width: u32,
    pub shared_gated: u32,
    pub tile_m: u32,
    pub tile_n: u32,
    pub tile_k: u32,
    pub routed_scale: f32,
    pub fault_silent_rank: u32,
    pub pair_capacity: u32,
    pub route_slots: u32,
    pub row_blocks: u32,
    pub pair_blocks: u32,
    pub timeout_ns: u64,
    pub heap_stride_row: u64,
    pub heap_stride_peer: u64,
    pub heap_stride_cell: u64,
    pub heap_cells: u64,
    pub heap_dispatch_rows: u64,
    pub heap_combine_rows: u64,
    pub heap_meta: u64,
    pub heap_meta_stride_peer: u64,
    pub heap_meta_stride_cell: u64,
    pub heap_meta_counts: u64,
    pub heap_meta_pairs: u64,
    pub heap_meta_rows: u64,
    pub heap_dispatch_signals: u64,
    pub heap_combine_signals: u64,
    pub heap_bytes: u64,
    pub ws_epoch: u64,
    pub ws_status: u64,
    pub ws_dropped: u64,
    pub ws_expert_counts: u64,
    pub ws_route_ids: u64,
    pub ws_route_weights: u64,
    pub ws_route_slots: u64,
    pub ws_route_rank_slots: u64,
    pub ws_rank_counts: u64,
    pub ws_gate_hist: u64,
    pub ws_rank_hist: u64,
    pub ws_pair_base: u64,
    pub ws_act: u64,
    pub ws_act_stride_row: u64,
    pub ws_act_stride_source: u64,
    pub ws_y: u64,
    pub ws_y_stride_row: u64,
    pub ws_y_stride_source: u64,
    pub ws_gemm0_done: u64,
    pub ws_gemm1_done: u64,
    pub ws_reduce_done: u64,
    pub ws_queue_ctl: u64,
    pub ws_queue: u64,
    pub ws_queue_capacity: u64,
    pub ws_sync: u64,
    pub ws_shared_act: u64,
    pub ws_shared_act_stride_row: u64,
    pub ws_shared_out: u64,
    pub ws_shared_out_stride_row: u64,
    pub ws_shared_done: u64,
    pub ws_bytes: u64,
    pub expert_owner: u64,
    pub router_weight: u64,
    pub router_bias: u64,
    pub logit_bias: u64,
    /// Effective top-k of this call (`RouteOverrides::top_k`), 1..=`top_k`; 0 means `top_k`.
    pub route_k: u32,
    /// `FM_STOP_*`: stop cleanly after this stage (stage checks); 0 runs the whole layer.
    pub stop_after: u32,
    /// Group-limited selection: groups (0: none) and groups kept.
    pub n_group: u32,
    pub topk_group: u32,
    /// 1: `router_weight` is f32 whatever the dtype.
    pub router_f32: u32,
    /// The sparsemixer's epsilon (PhiMoE's `router_jitter_noise`), 0 for other routers.
    pub router_eps: f32,
    /// The clamped SwiGLU's alpha, limit and up offset (gpt-oss 1.702 / limit / 1,
    /// DeepSeek-V4 1 / limit / 0), 0 for other MLPs.
    pub mlp_alpha: f32,
    pub mlp_limit: f32,
    pub mlp_up_offset: f32,
    pub pad3: u32,
    /// Router logits: f32 `[tokens][ws_logits_stride_row / 4]` (columns padded to a
    /// multiple of `tile_n`).
    pub ws_logits: u64,
    pub ws_logits_stride_row: u64,
    /// `FM_TILES_*`: the tile rule of the routed GEMM tiles.
    pub tile_mode: u32,
    /// `FM_SCOPE_*`: scope of the fences and acquires toward peers.
    pub peer_scope: u32,
    /// u64 `[PHASE_MAX_BLOCKS][PHASE_WORDS]`: each block's phase times.
    pub ws_phase_times: u64,
}

/// `FmRankParams`: the pointers of one rank.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct RankParams {
    pub rank: u32,
    pub tokens: u32,
    pub local_experts: u32,
    pub pad0: u32,
    pub heap: u64,
    pub peers: u64,
    pub workspace: u64,
    /// This rank's scratch: the offsets `ws_act`, `ws_y`, `ws_shared_act`,
    /// `ws_shared_out` and `ws_logits` are from its first byte.
    pub scratch: u64,
    pub x: u64,
    pub out: u64,
    pub w0: u64,
    pub w1: u64,
    pub shared_w0: u64,
    pub shared_w1: u64,
    pub shared_gate: u64,
    pub given_ids: u64,
    pub given_weights: u64,
    /// f32 `[local experts][gemm0 width]` expert GEMM0 biases (gpt-oss), or 0.
    pub b0: u64,
    /// f32 `[local experts][hidden]` expert GEMM1 biases, or 0.
    pub b1: u64,
}

/// `FmKernelParams`: the kernel's one parameter.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[allow(missing_docs)]
pub struct KernelParams {
    pub layer: LayerParams,
    pub launch_ranks: u32,
    pub pad0: u32,
    pub rank: [RankParams; MAX_LAUNCH_RANKS],
}

/// Codes of the config enums as the kernel sees them.
pub fn dtype_code(d: Dtype) -> u32 {
    match d {
        Dtype::Bf16 => 0,
        Dtype::F16 => 1,
        Dtype::F32 => 2,
    }
}

/// `FM_MLP_*` code.
pub fn mlp_code(m: MlpKind) -> u32 {
    match m {
        MlpKind::SwiGlu => 0,
        MlpKind::GeGlu => 1,
        MlpKind::Gelu => 2,
        MlpKind::Relu => 3,
        MlpKind::ClampedSwiGlu { .. } => 4,
    }
}

/// `FM_ROUTER_*` code and the renormalise flag.
pub fn router_code(r: Router) -> (u32, u32) {
    match r {
        Router::Softmax { renormalize } => (0, renormalize as u32),
        Router::SigmoidBias { renormalize } => (1, renormalize as u32),
        Router::Given => (2, 0),
        Router::SigmoidInput => (3, 0),
        Router::SparseMixer { .. } => (4, 0),
        Router::TopkSoftmax => (5, 0),
        Router::SqrtSoftplusBias { renormalize } => (6, renormalize as u32),
        Router::HashSqrtSoftplus => (7, 1),
    }
}

impl LayerParams {
    /// The layout part of the parameters, from the plan. Device table pointers
    /// (`expert_owner`, `router_weight`, `router_bias`, `logit_bias`) are left 0 for the runtime to fill.
    pub fn from_plan(plan: &LayerPlan, timeout_ns: u64) -> Self {
        let cfg: &MoeConfig = &plan.config;
        let (router, renormalize) = router_code(cfg.router);
        let (h, w) = (&plan.heap, &plan.workspace);
        LayerParams {
            version: PARAMS_VERSION,
            world: cfg.world as u32,
            tokens_max: cfg.tokens as u32,
            hidden: cfg.hidden as u32,
            intermediate: cfg.intermediate as u32,
            experts: cfg.experts as u32,
            top_k: cfg.top_k as u32,
            max_local: plan.max_local as u32,
            capacity: plan.capacity as u32,
            dtype: dtype_code(cfg.dtype),
            mlp: mlp_code(cfg.mlp),
            router,
            renormalize,
            shared_width: cfg.shared.map_or(0, |s| (s.count * s.intermediate) as u32),
            shared_gated: cfg.shared.is_some_and(|s| s.gated) as u32,
            tile_m: TILE_M as u32,
            tile_n: TILE_N as u32,
            tile_k: TILE_K as u32,
            routed_scale: cfg.routed_scale,
            fault_silent_rank: NO_FAULT,
            pair_capacity: plan.pair_capacity as u32,
            route_slots: plan.route_slots as u32,
            row_blocks: plan.tiles.row_blocks as u32,
            pair_blocks: plan.tiles.pair_blocks as u32,
            timeout_ns,
            heap_stride_row: h.stride_row,
            heap_stride_peer: h.stride_peer,
            heap_stride_cell: h.stride_cell,
            heap_cells: h.cells,
            heap_dispatch_rows: h.dispatch_rows,
            heap_combine_rows: h.combine_rows,
            heap_meta: h.meta,
            heap_meta_stride_peer: h.meta_stride_peer,
            heap_meta_stride_cell: h.meta_stride_cell,
            heap_meta_counts: h.meta_counts,
            heap_meta_pairs: h.meta_pairs,
            heap_meta_rows: h.meta_rows,
            heap_dispatch_signals: h.dispatch_signals,
            heap_combine_signals: h.combine_signals,
            heap_bytes: h.bytes,
            ws_epoch: w.epoch,
            ws_status: w.status,
            ws_dropped: w.dropped,
            ws_expert_counts: w.expert_counts,
            ws_route_ids: w.route_ids,
            ws_route_weights: w.route_weights,
            ws_route_slots: w.route_slots,
            ws_route_rank_slots: w.route_rank_slots,
            ws_rank_counts: w.rank_counts,
            ws_gate_hist: w.gate_hist,
            ws_rank_hist: w.rank_hist,
            ws_pair_base: w.pair_base,
            ws_act: w.act,
            ws_act_stride_row: w.act_stride_row,
            ws_act_stride_source: w.act_stride_source,
            ws_y: w.y,
            ws_y_stride_row: w.y_stride_row,
            ws_y_stride_source: w.y_stride_source,
            ws_gemm0_done: w.gemm0_done,
            ws_gemm1_done: w.gemm1_done,
            ws_reduce_done: w.reduce_done,
            ws_queue_ctl: w.queue_ctl,
            ws_queue: w.queue,
            ws_queue_capacity: w.queue_capacity,
            ws_sync: w.sync,
            ws_shared_act: w.shared_act,
            ws_shared_act_stride_row: w.shared_act_stride_row,
            ws_shared_out: w.shared_out,
            ws_shared_out_stride_row: w.shared_out_stride_row,
            ws_shared_done: w.shared_done,
            ws_bytes: w.bytes,
            expert_owner: 0,
            router_weight: 0,
            router_bias: 0,
            logit_bias: 0,
            route_k: cfg.top_k as u32,
            stop_after: STOP_NONE,
            n_group: cfg.group_limit.map_or(0, |g| g.groups as u32),
            topk_group: cfg.group_limit.map_or(0, |g| g.keep as u32),
            router_f32: u32::from(cfg.router_f32),
            router_eps: cfg.router.jitter(),
            mlp_alpha: cfg.mlp.clamp_params().map_or(0.0, |p| p.alpha),
            mlp_limit: cfg.mlp.clamp_params().map_or(0.0, |p| p.limit),
            mlp_up_offset: cfg.mlp.clamp_params().map_or(0.0, |p| p.up_offset),
            pad3: 0,
            ws_logits: w.logits,
            ws_logits_stride_row: w.logits_stride_row,
            tile_mode: plan.tile_mode.code(),
            // System scope unless the runtime knows every heap is on this GPU.
            peer_scope: SCOPE_SYSTEM,
            ws_phase_times: w.phase_times,
        }
    }
}

/// The `expert_owner` table the kernel reads: `(rank << 16) | local` per expert.
pub fn expert_owner_table(plan: &LayerPlan) -> Vec<u32> {
    plan.owners
        .iter()
        .map(|o| (o.rank << 16) | o.local)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::GATE_CHUNK as PLAN_GATE_CHUNK;

    #[test]
    fn gate_chunk_matches_plan() {
        assert_eq!(GATE_CHUNK as usize, PLAN_GATE_CHUNK);
        assert_eq!(DECODE_MAX_ROWS as usize, crate::plan::DECODE_MAX_ROWS);
        assert_eq!(PHASE_WORDS as usize, crate::plan::PHASE_WORDS);
        assert_eq!(PHASE_MAX_BLOCKS as usize, crate::plan::PHASE_MAX_BLOCKS);
        assert_eq!(TILES_AUTO, crate::plan::TileMode::Auto.code());
        assert_eq!(TILES_CLASSIC, crate::plan::TileMode::Classic.code());
        assert_eq!(TILES_NARROW, crate::plan::TileMode::Narrow.code());
        assert_eq!(TILES_AUTO_SERIAL, crate::plan::TileMode::AutoSerial.code());
    }

    #[test]
    fn smem_bytes_cover_gemm_stages() {
        // bf16/f16: 3 stages of (A: the wide tile's WIDE_ROWS rows, B gate, B up: TILE_M
        // rows each) of TILE_K + 8 halves.
        let row = ((TILE_K + 8) * 2) as u32;
        let stage = (crate::plan::WIDE_ROWS + 2 * TILE_M) as u32 * row;
        assert_eq!(smem_bytes(Dtype::Bf16), 3 * stage + 256);
        assert_eq!(smem_bytes(Dtype::F16), 3 * stage + 256);
        // f32: 1 stage of (A, B gate, B up) tiles of TILE_K rows of TILE_M + 4 floats.
        let f32_tile = (TILE_K * (TILE_M + 4) * 4) as u32;
        assert_eq!(smem_bytes(Dtype::F32), 3 * f32_tile + 256);
        assert!(entry_point(Dtype::F32).ends_with("f32"));
    }
}
