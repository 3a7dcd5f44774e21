//! Byte layout of one rank's private device workspace and scratch.

/// Byte layout of one rank's private device memory, in two regions:
/// - the workspace (`bytes`): control words, counters, the task queue and the per-token
///   routing, which belong to the layer (the host reads them after the launch);
/// - the scratch (`scratch_bytes`): what one launch writes and then reads (GEMM0
///   activations, expert outputs, shared-expert rows, router logits). Its offsets (`act`,
///   `y`, `shared_act`, `shared_out`, `logits`) are from the scratch's first byte. Layers
///   that never run at the same time may share one scratch (the GPU model does).
///
/// Per-pair regions are indexed `[source][pair]`, a source's pairs ordered by (local
/// expert, token) as its metadata block in the heap lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkspaceLayout {
    /// u64 epoch counter, advanced by the kernel at the end of each launch.
    pub epoch: u64,
    /// Status words: 8 x u64 (code, stage, where, expected, observed, and spares).
    pub status: u64,
    /// u64 count of dropped (token, expert) pairs of the last launch (0 when dropless).
    pub dropped: u64,
    /// u32 [experts]: pairs routed to each expert by this rank (before capacity).
    pub expert_counts: u64,
    /// i32 [tokens][top_k]: chosen expert ids.
    pub route_ids: u64,
    /// f32 [tokens][top_k]: routing weights.
    pub route_weights: u64,
    /// i32 [tokens][top_k]: position among the expert's pairs in token order, or -1 when
    /// dropped by the capacity.
    pub route_slots: u64,
    /// i32 [tokens][top_k]: the token's row slot on the rank that owns the choice's expert
    /// (the same for every choice on that rank).
    pub route_rank_slots: u64,
    /// u32 [world]: token rows this rank sends to each rank.
    pub rank_counts: u64,
    /// u32 [token chunks][experts]: per-chunk expert histogram, then its exclusive prefix.
    pub gate_hist: u64,
    /// u32 [token chunks][world]: per-chunk count of tokens with a choice on each rank,
    /// then its exclusive prefix.
    pub rank_hist: u64,
    /// u32 [source][max_local]: first pair of each local expert in the source's pairs.
    pub pair_base: u64,
    /// Activations after GEMM0 (scratch): [source][pair][intermediate] in the dtype.
    pub act: u64,
    /// Bytes of one activation row.
    pub act_stride_row: u64,
    /// Bytes of one source's activation rows.
    pub act_stride_source: u64,
    /// Expert outputs after GEMM1 (scratch): [source][pair][hidden] in the dtype, before
    /// the weights.
    pub y: u64,
    /// Bytes of one output row.
    pub y_stride_row: u64,
    /// Bytes of one source's output rows.
    pub y_stride_source: u64,
    /// u32 [source][local expert][row block]: GEMM0 tiles finished.
    pub gemm0_done: u64,
    /// u32 [source]: GEMM1 tiles finished.
    pub gemm1_done: u64,
    /// u32 [source]: reduce tiles finished.
    pub reduce_done: u64,
    /// Task queue control: u32 tail (entries reserved), u32 head (tickets taken), u64 total
    /// word `(epoch << 32) | tasks` published once every dispatch signal has arrived.
    pub queue_ctl: u64,
    /// u64 [queue_capacity]: task queue entries, each `(epoch << 32) | task`.
    pub queue: u64,
    /// Entries the task queue can hold (the most tasks one launch can create).
    pub queue_capacity: u64,
    /// u32 [4]: rank-group barrier count, barrier generation, exit count, shared GEMM1 tiles done.
    pub sync: u64,
    /// Shared-expert activations (scratch): [token row][shared width] in the dtype (0 bytes without shared experts).
    pub shared_act: u64,
    /// Bytes of one shared activation row.
    pub shared_act_stride_row: u64,
    /// Shared-expert output (scratch): f32 [token row][hidden].
    pub shared_out: u64,
    /// Bytes of one shared output row.
    pub shared_out_stride_row: u64,
    /// u32 [token row block]: shared GEMM0 tiles finished.
    pub shared_done: u64,
    /// Router logits (scratch), f32 [tokens][logits_stride_row / 4] (expert columns padded to a
    /// multiple of `TILE_N`; 0 bytes with the given router): the gate's tensor-core tiles
    /// write them, its top-k reads them.
    pub logits: u64,
    /// Bytes of one row of router logits.
    pub logits_stride_row: u64,
    /// u64 `[PHASE_MAX_BLOCKS][PHASE_WORDS]`: each block's phase times of the last launch
    /// (device `%globaltimer` ns; see [`super::PHASE_WORDS`]).
    pub phase_times: u64,
    /// Bytes of the workspace.
    pub bytes: u64,
    /// Bytes of the scratch.
    pub scratch_bytes: u64,
}
