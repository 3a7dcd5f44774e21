// flashmoe kernel parameters: the ONE contract between the Rust host and the kernel.
//
// Plain C, fixed-width fields, no padding holes (every struct is a multiple of 8 bytes and
// every u64 sits at an 8-byte offset). The Rust mirror is host/params.rs; the test
// tests/params_layout.rs compiles this header with the host C compiler and checks every
// field's offset and every struct's size against the Rust side.
//
// Every offset below is computed by the host (host/plan.rs). The kernel computes no layout:
// it adds these offsets and strides to the base pointers it is given.
#ifndef FLASHMOE_PARAMS_H
#define FLASHMOE_PARAMS_H

#include <stdint.h>

#define FM_PARAMS_VERSION 4u
// Ranks one launch can emulate (block groups acting as ranks on one GPU).
#define FM_MAX_LAUNCH_RANKS 8
// fault_silent_rank value meaning no fault is injected.
#define FM_NO_FAULT 0xFFFFFFFFu

// Threads per block of every entry point (8 warps).
#define FM_BLOCK_THREADS 256
// Blocks each rank group needs at least: one scheduler block (which also computes once its
// polling is over) plus at least one processor block.
#define FM_MIN_BLOCKS_PER_RANK 2
// Dynamic shared memory per block, bytes, by entry point. The host must pass exactly these
// to the launch (after cudaFuncSetAttribute(MaxDynamicSharedMemorySize) above 48 KiB).
// bf16/f16: 3 cp.async stages x (A: 128 rows for the wide tile, B gate, B up: 64 rows) x
// 144 B (64 + 8 pad halves) + 256 misc. Two blocks per SM still fit (2 x (110848 + 1024 reserved)
// <= 228 KiB).
#define FM_SMEM_BYTES_BF16 110848
#define FM_SMEM_BYTES_F16 110848
// f32: 1 stage x (A, B gate, B up) x 64 k x 272 B (64 + 4 pad floats) + 256 misc.
#define FM_SMEM_BYTES_F32 52480
// Most expert groups of group-limited selection (one group per lane of a warp).
#define FM_MAX_GROUPS 32
// Tokens per gate chunk (unit of the slot prefix sums; rows of ws_gate_hist).
#define FM_GATE_CHUNK 64
// Index of the status words (ws_status, u64[8]).
#define FM_STATUS_CODE 0
#define FM_STATUS_STAGE 1
#define FM_STATUS_WHERE 2
#define FM_STATUS_EXPECTED 3
#define FM_STATUS_OBSERVED 4
#define FM_STATUS_WAITED 5
// Rank-local abort flag: non-zero once any block of the rank group hit an error; every
// wait of the group polls it. The host zeroes all 8 words at creation and after reporting.
#define FM_STATUS_ABORT 6

// dtype codes
#define FM_DTYPE_BF16 0u
#define FM_DTYPE_F16 1u
#define FM_DTYPE_F32 2u
// MLP codes
#define FM_MLP_SWIGLU 0u
#define FM_MLP_GEGLU 1u
#define FM_MLP_GELU 2u
#define FM_MLP_RELU 3u
// Clamped SwiGLU: g = min(gate, limit), u = clamp(up, -limit, limit),
// act = (u + up_offset) * g * sigmoid(alpha g): gpt-oss (alpha 1.702, offset 1) and
// DeepSeek-V4 (alpha 1, offset 0: silu(g) * u).
#define FM_MLP_CLAMPED_SWIGLU 4u
// router codes
#define FM_ROUTER_SOFTMAX 0u
#define FM_ROUTER_SIGMOID_BIAS 1u
#define FM_ROUTER_GIVEN 2u
// Llama-4: top-k on the logits; sigmoid(logit) scales the expert's INPUT (at dispatch) and
// the output is summed with weight 1.
#define FM_ROUTER_SIGMOID_INPUT 3u
// PhiMoE's sparsemixer (top-2): choice j is the largest logit m left, weighted by the
// softmax over the experts left whose logit is within relative distance 2 eps of m.
#define FM_ROUTER_SPARSEMIXER 4u
// gpt-oss: top-k of (logit + router_bias), weighted by the softmax over those k.
#define FM_ROUTER_TOPK_SOFTMAX 5u
// DeepSeek-V4: sqrt(softplus(logit)) scores, + router_bias for the choice only.
#define FM_ROUTER_SQRTSOFTPLUS_BIAS 6u
// DeepSeek-V4's hash layers: the ids come from given_ids (the host looked them up by token
// id); the weights are their sqrt(softplus(logit)) scores / (sum + 1e-20) * routed_scale.
#define FM_ROUTER_HASH_SQRTSOFTPLUS 7u

// Status codes written by the kernel into the workspace status words.
#define FM_STATUS_OK 0u
#define FM_STATUS_TIMEOUT 1u
#define FM_STATUS_BAD_PARAMS 2u
#define FM_STATUS_BAD_ROUTING 3u
#define FM_STATUS_BAD_SIGNAL 4u
#define FM_STATUS_QUEUE_OVERFLOW 5u

// Stage codes (status word 1).
#define FM_STAGE_SETUP 0u
#define FM_STAGE_GATE 1u
#define FM_STAGE_DISPATCH 2u
#define FM_STAGE_EXPERT 3u
#define FM_STAGE_COMBINE 4u

// stop_after values: the launch leaves cleanly (status OK, epoch advanced) right after the
// named stage, so the host can read back what that stage wrote (stage checks).
#define FM_STOP_NONE 0u      // run the whole layer
#define FM_STOP_GATE 1u      // ids, weights, expert counts written
#define FM_STOP_DISPATCH 2u  // + slots, rank slots, dropped count, rows, metadata, dispatch signals
#define FM_STOP_GEMM0 3u     // + GEMM0 activations of every received pair (no GEMM1 task)
#define FM_STOP_GEMM1 4u     // + expert outputs of every pair in ws_y (no reduce task, no combine signal)
#define FM_STOP_COMBINE 5u   // the whole layer (same as FM_STOP_NONE)

// Deadline of a wait that can only be a consequence of another wait (queue tickets, rank
// barriers, the shared-expert tiles) as a multiple of timeout_ns. The waits on a peer's
// signal use 1 x timeout_ns, so when a peer is silent the wait that names it reports first
// and the consequent waits leave on the abort flag instead of masking the cause.
#define FM_CONSEQUENCE_WAIT_FACTOR 2u

// Tile rule (tile_mode): the rows of a routed GEMM task and the shape of its tile. A routed
// row block is TILE_M pairs of one source and local expert (the last one of a pair list
// short); a task computes one block, or two consecutive ones as one wide tile.
// FM_TILES_AUTO, bf16/f16: row blocks 2j and 2j+1 of a pair list form one 128-row task when
// block 2j+1 has more than FM_DECODE_MAX_ROWS rows (the wide tile, gemm_prefill.cuh at kRows = 128: tokens as
// M, 128x64, each weight tile read once for 128 rows); block 2j+1 then has no task of its own.
// Any other block is one task: at most FM_DECODE_MAX_ROWS rows by the decode tile (bf16/f16:
// weights as the mma M operand: the tile's 64 output columns; tokens as N = the rows rounded
// up to 8, 16 or 32; f32: FFMA on those N rows only, gemm_decode_f32.cuh), more by the
// prefill tile (bf16/f16: tokens as M, 64x64, larger warp tiles with K split between warps,
// gemm_prefill.cuh) or the classic 64x64 tile (f32).
// FM_TILES_NARROW: as auto without wide tasks (every task one block). FM_TILES_CLASSIC: every
// task one block, classic tile. FM_TILES_AUTO_SERIAL: auto's tasks and tiles, but no tile
// starts the next task's first stage during its epilogue (next_stage.cuh; auto and narrow
// do): the A/B switch of that overlap. Evaluated per task by fm::task_rows and fm::tile_for
// (tile_rule.cuh) and by the host (host/plan/tile_rule.rs), identically.
#define FM_TILES_AUTO 0u
#define FM_TILES_CLASSIC 1u
#define FM_TILES_NARROW 2u
#define FM_TILES_AUTO_SERIAL 3u
#define FM_DECODE_MAX_ROWS 32
// peer_scope: the memory scope of the fences and acquires toward peers' heaps.
// FM_SCOPE_SYSTEM: peers may be other GPUs (NVSHMEM worlds). FM_SCOPE_GPU: every heap of the
// world is on this GPU (one rank, or emulated ranks), so gpu scope orders everything.
#define FM_SCOPE_SYSTEM 0u
#define FM_SCOPE_GPU 1u
// Phase times (ws_phase_times): u64 [FM_PHASE_MAX_BLOCKS][FM_PHASE_WORDS] per rank, written by
// each block's thread 0 at its exit: %globaltimer at entry, ns in gate, dispatch (and the
// scheduler's polling), expert tiles, idle ticket waits, combine, tasks run, %globaltimer at
// exit, then the expert tiles' ns by task kind (routed GEMM0, routed GEMM1, shared expert,
// reduce) and the tasks run of each kind, then the routed tasks that started with their first
// stage already in flight (next_stage.cuh). Blocks past FM_PHASE_MAX_BLOCKS record nothing.
#define FM_PHASE_WORDS 17
#define FM_PHASE_MAX_BLOCKS 1024

// Shape and layout of the layer: identical for every rank.
typedef struct FmLayerParams {
    uint32_t version;            // FM_PARAMS_VERSION
    uint32_t world;              // ranks in the whole world
    uint32_t tokens_max;         // rows of the per-rank token buffers
    uint32_t hidden;
    uint32_t intermediate;
    uint32_t experts;
    uint32_t top_k;              // the config's top-k (row stride of given_ids / given_weights)
    uint32_t max_local;          // experts dimension of the metadata (max experts per rank)
    uint32_t capacity;           // pairs one source may send one expert (tokens_max when dropless)
    uint32_t dtype;              // FM_DTYPE_*
    uint32_t mlp;                // FM_MLP_*
    uint32_t router;             // FM_ROUTER_*
    uint32_t renormalize;        // 1: divide the k weights by their sum
    uint32_t shared_width;       // count * intermediate of the fused shared experts, 0 if none
    uint32_t shared_gated;       // 1: scale shared output by sigmoid(x . shared_gate)
    uint32_t tile_m;
    uint32_t tile_n;
    uint32_t tile_k;
    float routed_scale;
    uint32_t fault_silent_rank;  // test hook: this rank sends no signals (0xFFFFFFFF: none)
    uint32_t pair_capacity;      // pairs one source may send one rank (rows of ws_act / ws_y per source)
    uint32_t route_slots;        // entries per token row in the heap's row_meta: min(top_k, max_local)
    uint32_t row_blocks;         // most row blocks of one (source, local expert) pair list: ceil(capacity / tile_m)
    uint32_t pair_blocks;        // most row blocks of one source's pairs, all local experts together
    uint64_t timeout_ns;         // deadline of every device wait, in %globaltimer nanoseconds

    // Symmetric heap layout, bytes (see host/plan/heap.rs). Rank-level dispatch: a token
    // row goes once to each rank that owns one of its experts.
    //   rows dispatch [cell][source][slot < tokens_max][hidden], combine [cell][owner][slot][hidden]
    //   meta [cell][source] { counts u32[max_local], pairs u32[pair_capacity],
    //                         row_meta u64[tokens_max][route_slots] = (f32 weight bits << 32) | pair }
    //   signals dispatch u64[source] (on the owner), combine u64[owner] (on the source)
    // Cell 1 exists only when heap_cells == 2 (RDMA staging, indexed by destination).
    uint64_t heap_stride_row;        // bytes of one token row
    uint64_t heap_stride_peer;       // tokens_max rows
    uint64_t heap_stride_cell;       // world peers of rows
    uint64_t heap_cells;
    uint64_t heap_dispatch_rows;
    uint64_t heap_combine_rows;
    uint64_t heap_meta;
    uint64_t heap_meta_stride_peer;  // one source's metadata block
    uint64_t heap_meta_stride_cell;
    uint64_t heap_meta_counts;       // offsets inside a metadata block
    uint64_t heap_meta_pairs;
    uint64_t heap_meta_rows;
    uint64_t heap_dispatch_signals;
    uint64_t heap_combine_signals;
    uint64_t heap_bytes;

    // Private workspace layout, bytes.
    uint64_t ws_epoch;
    uint64_t ws_status;
    uint64_t ws_dropped;
    uint64_t ws_expert_counts;
    uint64_t ws_route_ids;
    uint64_t ws_route_weights;
    uint64_t ws_route_slots;     // i32 [tokens][top_k]: position among the expert's pairs, -1 dropped
    uint64_t ws_route_rank_slots; // i32 [tokens][top_k]: the token's row slot on the choice's owner rank
    uint64_t ws_rank_counts;     // u32 [world]: token rows sent to each rank
    uint64_t ws_gate_hist;       // u32 [token chunks][experts]
    uint64_t ws_rank_hist;       // u32 [token chunks][world]: tokens with a choice on each rank
    uint64_t ws_pair_base;       // u32 [source][max_local]: first pair of each local expert
    uint64_t ws_act;             // dtype [source][pair][intermediate] (scratch)
    uint64_t ws_act_stride_row;
    uint64_t ws_act_stride_source;
    uint64_t ws_y;               // dtype [source][pair][hidden]: expert outputs before the weights (scratch)
    uint64_t ws_y_stride_row;
    uint64_t ws_y_stride_source;
    uint64_t ws_gemm0_done;      // u32 [source][local expert][row block]
    uint64_t ws_gemm1_done;      // u32 [source]: GEMM1 tiles done
    uint64_t ws_reduce_done;     // u32 [source]: reduce tiles done
    uint64_t ws_queue_ctl;
    uint64_t ws_queue;
    uint64_t ws_queue_capacity;
    uint64_t ws_sync;            // u32[4]: barrier count, barrier generation, exit count, shared GEMM1 done
    uint64_t ws_shared_act;      // dtype [token row][shared_width] (scratch)
    uint64_t ws_shared_act_stride_row;
    uint64_t ws_shared_out;      // f32 [token row][hidden] (scratch)
    uint64_t ws_shared_out_stride_row;
    uint64_t ws_shared_done;     // u32 [token row block]
    uint64_t ws_bytes;

    // Device tables shared by all ranks of the launch.
    uint64_t expert_owner;       // u32 [experts]: (rank << 16) | local index
    uint64_t router_weight;      // dtype (f32 with router_f32) [experts rounded up to a multiple of
                                 // tile_n][hidden], the rows past experts zero (read by whole tiles)
    uint64_t router_bias;        // f32 [experts] selection bias (SIGMOID_BIAS), or 0
    uint64_t logit_bias;         // f32 [experts] added to the router logits (research override), or 0

    // Per-call routing.
    uint32_t route_k;            // effective top-k of this call, 1..=top_k (0 means top_k).
                                 // ws_route_* rows have route_k entries; given_* rows keep top_k
                                 // and their first route_k choices are used.
    uint32_t stop_after;         // FM_STOP_*: debug, stop cleanly after this stage (0: never)

    // Group-limited selection (DeepSeek n_group / topk_group): n_group groups of consecutive
    // experts (1..=FM_MAX_GROUPS, dividing experts; 0 or 1: no limit), the topk_group best
    // kept; softmax scores a group by its largest probability, sigmoid-bias by the sum of
    // its two largest biased scores. Other experts rank last.
    uint32_t n_group;
    uint32_t topk_group;
    uint32_t router_f32;         // 1: router_weight is f32 [experts][hidden], not the dtype
    float router_eps;            // FM_ROUTER_SPARSEMIXER's epsilon, 0 otherwise
    float mlp_alpha;             // FM_MLP_CLAMPED_SWIGLU's alpha (0 otherwise)
    float mlp_limit;             // FM_MLP_CLAMPED_SWIGLU's limit (0 otherwise)
    float mlp_up_offset;         // FM_MLP_CLAMPED_SWIGLU's offset on up: 1 gpt-oss, 0 DeepSeek-V4
    uint32_t pad3;
    uint64_t ws_logits;          // (scratch) f32 [tokens][ws_logits_stride_row / 4]: router logits (expert
                                 // columns padded to a multiple of tile_n), unused by the given router
    uint64_t ws_logits_stride_row;
    uint32_t tile_mode;          // FM_TILES_*: the tile rule of the routed GEMM tiles
    uint32_t peer_scope;         // FM_SCOPE_*: scope of fences and acquires toward peers
    uint64_t ws_phase_times;     // u64 [FM_PHASE_MAX_BLOCKS][FM_PHASE_WORDS]: phase times per block
} FmLayerParams;

// Pointers of one rank (one block group of the launch).
typedef struct FmRankParams {
    uint32_t rank;               // this rank's id in the world
    uint32_t tokens;             // tokens this launch brings (<= tokens_max)
    uint32_t local_experts;      // experts this rank owns (<= max_local)
    uint32_t pad0;
    uint64_t heap;               // this rank's symmetric heap
    uint64_t peers;              // u64 [world]: every peer's heap as this rank can store to it, 0 if unreachable
    uint64_t workspace;          // this rank's private workspace
    uint64_t scratch;            // this rank's scratch (ws_act, ws_y, ws_shared_*, ws_logits are from here)
    uint64_t x;                  // dtype [tokens][hidden]
    uint64_t out;                // dtype [tokens][hidden]
    uint64_t w0;                 // dtype [local_experts][gemm0 width][hidden]; gated: gate rows then up rows
    uint64_t w1;                 // dtype [local_experts][hidden][intermediate]
    uint64_t shared_w0;          // dtype [gemm0 width of shared][hidden], or 0
    uint64_t shared_w1;          // dtype [hidden][shared_width], or 0
    uint64_t shared_gate;        // dtype [hidden], or 0
    uint64_t given_ids;          // i32 [tokens][top_k] when router == GIVEN
    uint64_t given_weights;      // f32 [tokens][top_k] when router == GIVEN
    uint64_t b0;                 // f32 [local_experts][gemm0 width] expert GEMM0 biases, or 0
    uint64_t b1;                 // f32 [local_experts][hidden] expert GEMM1 biases, or 0
} FmRankParams;

// The kernel's one parameter.
typedef struct FmKernelParams {
    FmLayerParams layer;
    uint32_t launch_ranks;       // block groups in this launch (1 for Single and NVSHMEM)
    uint32_t pad0;
    FmRankParams rank[FM_MAX_LAUNCH_RANKS];
} FmKernelParams;

#ifdef __cplusplus
static_assert(sizeof(FmLayerParams) % 8 == 0, "FmLayerParams must have no tail padding");
static_assert(sizeof(FmRankParams) % 8 == 0, "FmRankParams must have no tail padding");
// Kernel parameters are limited to 4 KiB on sm_70+ (32 KiB from CUDA 12.1 on Volta+,
// but staying small keeps the launch cheap).
static_assert(sizeof(FmKernelParams) <= 4096, "kernel parameters must fit in 4 KiB");
#endif

#endif  // FLASHMOE_PARAMS_H
