// Shared definitions of the flashmoe kernel: tunables, dtype traits, the per-block context.
#ifndef FLASHMOE_COMMON_CUH
#define FLASHMOE_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "flashmoe/params.h"

// Phases of the kernel (gate chunk, scan, dispatch, scheduler, task loop, GEMM tile, combine)
// are separate functions in the whole-program P2P build: ptxas then allocates registers per
// phase (no phase's pressure spills into another's) and reports each one. The NVSHMEM build
// is compiled with -rdc, where a non-inlined call uses the ABI and its callee-saved
// registers show up as spills: there every phase is inlined into the entry point.
#ifdef FM_NVSHMEM
#define FM_PHASE __forceinline__
#else
#define FM_PHASE __noinline__
#endif

namespace fm {

// ---- tunables -------------------------------------------------------------------------
// Shape of the expert GEMM tiles and of the block. A template so that every constraint is
// stated where a shape is chosen; the kernel instantiates one shape, the plan's.
template <int M, int N, int K, int Stages, int Threads>
struct Shape {
    static constexpr int kM = M, kN = N, kK = K, kStages = Stages, kThreads = Threads;
    static_assert(M % 16 == 0 && N % 16 == 0 && K % 16 == 0,
                  "mma.m16n8k16 needs multiples of 16 in every tile dimension");
    static_assert(Threads == 256 && M == 64 && N == 64,
                  "the GEMM warp tiling is 4 (M) x 2 (N) warps of 16 x 32 outputs, the f32 "
                  "tiling 16 x 16 threads of 4 x 4; the gate gives each of 8 warps 8 tokens");
    static_assert(K == 64,
                  "the loaders move 64-element rows: 8 x 16-byte chunks (bf16/f16), 16 float4 (f32)");
    static_assert(Stages >= 2, "the mainloop overlaps the load of step k+S-1 with step k");
};
// Must equal the plan's TILE_M/N/K (host/plan.rs): capacities, activation blocks and the task
// decomposition are laid out in these units; the kernel also checks layer.tile_m/n/k at start
// and reports FM_STATUS_BAD_PARAMS when they differ. Three cp.async stages: occupancy is
// bounded by registers (128 per thread x 256 threads -> 2 blocks per SM), not by shared
// memory, so a third stage hides more load latency for free (with the wide tile's 128 A rows:
// 108 KB of stages per block, 219 KB per SM with the reservations, of Hopper's 228 KB).
using Tile = Shape<64, 64, 64, 3, FM_BLOCK_THREADS>;

constexpr int kThreads = Tile::kThreads;
constexpr int kWarps = kThreads / 32;
constexpr int kTileM = Tile::kM;
constexpr int kTileN = Tile::kN;
constexpr int kTileK = Tile::kK;
constexpr int kStages = Tile::kStages;
constexpr uint32_t kMaxTopK = 16;       // == MAX_TOP_K in host/config.rs (choices live in lanes)
constexpr uint32_t kMaxExperts = 1024;  // == MAX_EXPERTS (top-k keeps a 32-bit mask per lane)
constexpr int kMiscBytes = 256;         // block-private scalars at the start of dynamic smem
constexpr int kGateChunk = FM_GATE_CHUNK;
constexpr uint32_t kMaxWorld = 1024;    // == MAX_WORLD in host/config.rs
// == MAX_DIM in host/config.rs: the largest hidden / intermediate. The prefill tile's loader
// keeps B row offsets in 32 bits (64 rows x 65536 x 4 bytes = 16 MiB).
constexpr uint32_t kMaxDim = 65536;
// The scheduler polls one dispatch signal per source and keeps the ones it has seen in one
// 64-bit mask per thread: source s is bit s / kThreads of thread s % kThreads.
static_assert(kMaxWorld <= 64u * kThreads, "the scheduler's seen-mask must cover every source");
// Rank-level pair metadata (host/plan/heap.rs): a row_meta entry is
// (f32 weight bits << 32) | pair index, NO_PAIR ends a row's entries.
constexpr uint32_t kNoPair = 0xFFFFFFFFu;

static_assert(kGateChunk == kWarps * 8, "the gate gives each warp 8 tokens of a chunk");
static_assert(kMaxTopK <= 32, "a token's choices live one per lane");
static_assert(kMaxExperts <= 32 * 32, "top-k marks chosen experts in one 32-bit word per lane");
static_assert(2 * (kStages * (2 * kTileM + 2 * kTileN) * (kTileK + 8) * 2 + 256 + 1024) <= 228 * 1024,
              "two blocks per SM (each with 1 KiB reserved) must still fit the SM's shared memory");

// ---- dtype traits -------------------------------------------------------------------------
template <uint32_t Code>
struct Dt;

template <>
struct Dt<FM_DTYPE_BF16> {
    using T = __nv_bfloat16;
    static constexpr uint32_t kCode = FM_DTYPE_BF16;
    static constexpr bool kTensorCore = true;
    __device__ static float to_f(T v) { return __bfloat162float(v); }
    __device__ static T from_f(float f) { return __float2bfloat16_rn(f); }
};

template <>
struct Dt<FM_DTYPE_F16> {
    using T = __half;
    static constexpr uint32_t kCode = FM_DTYPE_F16;
    static constexpr bool kTensorCore = true;
    __device__ static float to_f(T v) { return __half2float(v); }
    __device__ static T from_f(float f) { return __float2half_rn(f); }
};

template <>
struct Dt<FM_DTYPE_F32> {
    using T = float;
    static constexpr uint32_t kCode = FM_DTYPE_F32;
    static constexpr bool kTensorCore = false;
    __device__ static float to_f(T v) { return v; }
    __device__ static T from_f(float f) { return f; }
};

// Elements of a 16-byte vector.
template <class D>
constexpr int kVec = 16 / int(sizeof(typename D::T));

// Loads 16 bytes of dtype elements and widens them to f32.
template <class D>
__device__ __forceinline__ void load_vec(const void* p, float (&v)[kVec<D>]) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const typename D::T* e = reinterpret_cast<const typename D::T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec<D>; ++i) v[i] = D::to_f(e[i]);
}

// Rounds f32 values to the dtype and stores them as one 16-byte vector.
template <class D>
__device__ __forceinline__ void store_vec(void* p, const float (&v)[kVec<D>]) {
    uint4 raw;
    typename D::T* e = reinterpret_cast<typename D::T*>(&raw);
#pragma unroll
    for (int i = 0; i < kVec<D>; ++i) e[i] = D::from_f(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// Bytes of dynamic shared memory after Misc (the "arena"), by dtype: the GEMM stages.
// bf16/f16: kStages x (A: 128 rows, the wide tile's; B gate, B up: 64 rows) x (64 + 8 pad)
// halves; the pad makes the 8 rows of an ldmatrix 8x8 land in distinct 16-byte bank groups.
// The 64-row tiles (classic, 64-row prefill) pack their stages at a 3 x 64-row stride (the
// first 3 x 192 rows); the decode tile has its own layout.
// f32: 1 stage x (A, B gate, B up) x 64 k x (64 + 4 pad) floats, k-major for float4 reads.
template <class D>
constexpr int kArenaBytes = D::kTensorCore ? kStages * (2 * kTileM + 2 * kTileN) * (kTileK + 8) * 2
                                           : 3 * kTileK * (kTileM + 4) * 4;

// Block-private scalars (first kMiscBytes of dynamic shared memory).
struct Misc {
    int flag;                 // block-wide broadcast of a decision of thread 0
    uint32_t task;            // task taken by thread 0
    uint32_t state;           // state of the task take
    uint32_t ticket;          // next queue ticket, taken ahead by a tile (kNoTicket: none)
    uint32_t peek;            // the task of `ticket` if its entry was out when the last prefill
                              // tile's mainloop ended (next_stage.cuh), else kNoPeek
    uint32_t staged_ticket;   // the ticket whose task's step 0 is in flight (kNoTicket: none)
    uint32_t staged;          // 1: the task being run has its step 0 in flight
    uint32_t peek_cap;        // queue entries peek_next may read (0: the mode stages nothing)
    uint32_t epoch;           // low word of this launch's epoch (entries' high word)
    const uint64_t* queue;    // the rank's queue entries, for peek_next
    unsigned long long sum;   // block reductions
    unsigned long long mark;  // phase times: %globaltimer at the last lap (thread 0)
    unsigned long long phase[FM_PHASE_WORDS];  // this block's phase times (phases.cuh)
    uint32_t* queue_ctl;      // the rank's queue control words (u32 tail, u32 head) for
                              // prefetch_ticket; set by init_ticket_prefetch (ticket.cuh)
};
static_assert(sizeof(Misc) <= kMiscBytes, "Misc must fit its reserved bytes");

// This block's Misc (the start of dynamic shared memory; layer() names the same array): for
// code that reaches it without a Ctx and without keeping a pointer live.
__device__ __forceinline__ Misc* block_misc() {
    extern __shared__ __align__(128) char smem_raw[];
    return reinterpret_cast<Misc*>(smem_raw);
}

// Everything a block knows about the rank it plays.
struct Ctx {
    const FmLayerParams* L;
    const FmRankParams* R;
    uint32_t me;        // world rank played by this block group
    uint32_t blk;       // block index inside the group
    uint32_t nblk;      // blocks per group
    uint32_t k;         // effective top-k
    uint64_t n;         // epoch of this launch
    char* ws;           // private workspace
    char* heap;         // own symmetric heap
    const uint64_t* peers;
    char* smem;         // dynamic shared memory after Misc
    Misc* misc;

    // The launch's transient rows (ws_act, ws_y, ws_shared_*, ws_logits are offsets from
    // here): read from the parameters on use rather than held in a register.
    __device__ char* scratch() const { return reinterpret_cast<char*>(R->scratch); }
    __device__ uint64_t* status() const { return reinterpret_cast<uint64_t*>(ws + L->ws_status); }
    __device__ uint32_t* sync() const { return reinterpret_cast<uint32_t*>(ws + L->ws_sync); }
    __device__ uint32_t* queue_ctl() const { return reinterpret_cast<uint32_t*>(ws + L->ws_queue_ctl); }
    __device__ uint64_t* queue_total() const {
        return reinterpret_cast<uint64_t*>(ws + L->ws_queue_ctl + 8);
    }
    __device__ uint64_t* queue() const { return reinterpret_cast<uint64_t*>(ws + L->ws_queue); }
    __device__ int32_t* route_ids() const { return reinterpret_cast<int32_t*>(ws + L->ws_route_ids); }
    __device__ float* route_weights() const {
        return reinterpret_cast<float*>(ws + L->ws_route_weights);
    }
    __device__ int32_t* route_slots() const {
        return reinterpret_cast<int32_t*>(ws + L->ws_route_slots);
    }
    __device__ int32_t* route_rank_slots() const {
        return reinterpret_cast<int32_t*>(ws + L->ws_route_rank_slots);
    }
    __device__ uint32_t* rank_counts() const {
        return reinterpret_cast<uint32_t*>(ws + L->ws_rank_counts);
    }
    __device__ uint32_t* gate_hist() const { return reinterpret_cast<uint32_t*>(ws + L->ws_gate_hist); }
    __device__ uint32_t* rank_hist() const { return reinterpret_cast<uint32_t*>(ws + L->ws_rank_hist); }
    __device__ uint32_t* pair_base() const { return reinterpret_cast<uint32_t*>(ws + L->ws_pair_base); }
    __device__ uint32_t* expert_counts() const {
        return reinterpret_cast<uint32_t*>(ws + L->ws_expert_counts);
    }
    __device__ const uint32_t* owners() const {
        return reinterpret_cast<const uint32_t*>(L->expert_owner);
    }
    __device__ uint32_t gate_chunks() const { return (R->tokens + kGateChunk - 1) / kGateChunk; }
    // Row blocks of one (source, local expert) pair list at most (the stride of gemm0_done).
    __device__ uint32_t row_blocks() const { return L->row_blocks; }
    __device__ uint32_t token_row_blocks() const { return (R->tokens + kTileM - 1) / kTileM; }
    // Token row blocks of one source's dispatch rows at most (the stride of reduce tasks).
    __device__ uint32_t max_token_row_blocks() const { return (L->tokens_max + kTileM - 1) / kTileM; }
    __device__ uint32_t gemm0_width() const {
        return gated() ? 2 * L->intermediate : L->intermediate;
    }
    __device__ bool gated() const {
        return L->mlp == FM_MLP_SWIGLU || L->mlp == FM_MLP_GEGLU || L->mlp == FM_MLP_CLAMPED_SWIGLU;
    }
    __device__ bool silent() const { return L->fault_silent_rank == me; }
    // Debug stop after GEMM0 (stage checks): no GEMM1 task is created.
    __device__ bool stop_after_gemm0() const { return L->stop_after == FM_STOP_GEMM0; }
    // Debug stop after GEMM0 or GEMM1: no reduce task, no combine signal.
    __device__ bool no_reduce() const {
        return L->stop_after == FM_STOP_GEMM0 || L->stop_after == FM_STOP_GEMM1;
    }
};

__device__ __forceinline__ uint32_t min_u32(uint32_t a, uint32_t b) { return a < b ? a : b; }

// threadIdx.x for the per-thread indices of the f32 tiles (kOpaque: the layer is f32). In
// the NVSHMEM build every phase is inlined into the entry point, so the task loop's body holds
// whole tiles, and the FFMA tile's indices derived from threadIdx alone (loader slots,
// epilogue coordinates and store offsets) are loop-invariant: the compiler hoists them out
// of the task loop, keeps them live across every tile and spills them (104 bytes stored, 344
// loaded). Read through volatile asm there, they are recomputed where they are used (a few
// integer instructions per tile). Elsewhere (the P2P build, the bf16/f16 layers, whose
// register allocation these reads only made worse) it is threadIdx.x.
template <bool kOpaque>
__device__ __forceinline__ uint32_t tile_tid() {
#ifdef FM_NVSHMEM
    if constexpr (kOpaque) {
        uint32_t t;
        asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
        return t;
    }
#endif
    return threadIdx.x;
}

}  // namespace fm

#endif  // FLASHMOE_COMMON_CUH
