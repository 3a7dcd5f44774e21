// The body of the persistent layer kernel, shared by the P2P build (flashmoe.cu) and the
// NVSHMEM build (flashmoe_nvshmem.cu, which defines FM_NVSHMEM first).
//
// Grid: launch_ranks groups of blocks_per_rank blocks; group g plays rank p.rank[g].rank.
// Groups never synchronise with each other except through signal words in the heaps, as
// separate GPUs would. Inside a group, rank barriers (sync.cuh) separate the gate phases.
#ifndef FLASHMOE_LAYER_CUH
#define FLASHMOE_LAYER_CUH

#include "flashmoe/combine.cuh"
#include "flashmoe/common.cuh"
#include "flashmoe/dispatch.cuh"
#include "flashmoe/gate.cuh"
#include "flashmoe/gemm.cuh"
#include "flashmoe/params.h"
#include "flashmoe/phases.cuh"
#include "flashmoe/reduce.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/task_queue.cuh"
#include "flashmoe/transport.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

static_assert(kArenaBytes<Dt<FM_DTYPE_BF16>> + kMiscBytes == FM_SMEM_BYTES_BF16,
              "FM_SMEM_BYTES_BF16 must equal the bf16 GEMM stages + Misc");
static_assert(kArenaBytes<Dt<FM_DTYPE_F16>> + kMiscBytes == FM_SMEM_BYTES_F16,
              "FM_SMEM_BYTES_F16 must equal the f16 GEMM stages + Misc");
static_assert(kArenaBytes<Dt<FM_DTYPE_F32>> + kMiscBytes == FM_SMEM_BYTES_F32,
              "FM_SMEM_BYTES_F32 must equal the f32 GEMM stage + Misc");

__device__ __forceinline__ uint32_t dynamic_smem_bytes() {
    uint32_t v;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(v));
    return v;
}

// The largest task index of any kind (tasks keep 30 bits of index, scheduler.cuh).
__device__ __forceinline__ uint64_t largest_task_index(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const uint64_t g0 = L.intermediate / kTileN, g1 = L.hidden / kTileN;
    const uint64_t units = uint64_t(L.world) * L.max_local * L.row_blocks;
    const uint64_t routed = units * (g0 > g1 ? g0 : g1);
    const uint64_t reduce = uint64_t(L.world) * c.max_token_row_blocks() * g1;
    const uint64_t shared = uint64_t(c.max_token_row_blocks()) * (L.shared_width / kTileN + g1);
    const uint64_t most = routed > reduce ? routed : reduce;
    const uint64_t all = most > shared ? most : shared;
    return all == 0 ? 0 : all - 1;
}

// Parameter checks every block makes identically (so all take the same path). Returns 0 or
// the FM_STATUS_WHERE code of the first violation, with expected/observed.
template <class D>
__device__ uint32_t check_params(const Ctx& c, uint64_t& expected, uint64_t& observed) {
    const FmLayerParams& L = *c.L;
    const FmRankParams& R = *c.R;
    const auto bad = [&](uint32_t code, uint64_t e, uint64_t o) {
        expected = e;
        observed = o;
        return code;
    };
    if (L.version != FM_PARAMS_VERSION) return bad(1, FM_PARAMS_VERSION, L.version);
    if (L.tile_m != kTileM || L.tile_n != kTileN || L.tile_k != kTileK)
        return bad(2, kTileM, (uint64_t(L.tile_m) << 32) | (L.tile_n << 16) | L.tile_k);
    if (L.hidden == 0 || L.hidden % kTileN || L.intermediate == 0 || L.intermediate % kTileN ||
        L.shared_width % kTileN)
        return bad(2, kTileN, L.hidden % kTileN ? L.hidden : L.intermediate);
    if (L.hidden > kMaxDim || L.intermediate > kMaxDim)
        return bad(2, kMaxDim, L.hidden > kMaxDim ? L.hidden : L.intermediate);
    // gemm0_done has row_blocks counters per (source, local expert): they must cover capacity.
    if (L.capacity == 0 || uint64_t(L.row_blocks) * kTileM < L.capacity)
        return bad(2, kTileM, (uint64_t(L.row_blocks) << 32) | L.capacity);
    if (L.dtype != D::kCode) return bad(3, D::kCode, L.dtype);
    if (c.nblk < FM_MIN_BLOCKS_PER_RANK) return bad(4, FM_MIN_BLOCKS_PER_RANK, c.nblk);
    if (L.top_k == 0 || L.top_k > kMaxTopK || c.k == 0 || c.k > L.top_k)
        return bad(5, L.top_k, c.k);
    if (L.experts == 0 || L.experts > kMaxExperts || c.k > L.experts)
        return bad(6, kMaxExperts, L.experts);
    if (dynamic_smem_bytes() < uint32_t(kArenaBytes<D> + kMiscBytes))
        return bad(10, kArenaBytes<D> + kMiscBytes, dynamic_smem_bytes());
    if (L.world == 0 || c.me >= L.world) return bad(11, L.world, c.me);
    if (R.local_experts > L.max_local) return bad(11, L.max_local, R.local_experts);
    if (R.tokens > L.tokens_max) return bad(11, L.tokens_max, R.tokens);
    if (L.world > kMaxWorld) return bad(12, kMaxWorld, L.world);
    // Exactly min(top_k, max_local): fewer would make write_meta drop a token's choices.
    if (L.route_slots != min_u32(L.top_k, L.max_local)) return bad(17, min_u32(L.top_k, L.max_local), L.route_slots);
    if (const uint64_t most = largest_task_index(c); most > kTaskIndexMask)
        return bad(18, kTaskIndexMask, most);
    if (L.router > FM_ROUTER_HASH_SQRTSOFTPLUS || L.mlp > FM_MLP_CLAMPED_SWIGLU)
        return bad(13, FM_ROUTER_HASH_SQRTSOFTPLUS, L.router);
    if (L.router == FM_ROUTER_SPARSEMIXER && c.k > 2) return bad(5, 2, c.k);
    if (L.stop_after > FM_STOP_COMBINE) return bad(15, FM_STOP_COMBINE, L.stop_after);
    if (L.tile_mode > FM_TILES_AUTO_SERIAL) return bad(19, FM_TILES_AUTO_SERIAL, L.tile_mode);
    if (L.n_group > 1 &&
        (L.n_group > FM_MAX_GROUPS || L.experts % L.n_group || L.topk_group == 0 ||
         L.topk_group > L.n_group || c.k > L.topk_group * (L.experts / L.n_group) ||
         (L.router != FM_ROUTER_SOFTMAX && L.router != FM_ROUTER_SIGMOID_BIAS &&
          L.router != FM_ROUTER_SQRTSOFTPLUS_BIAS)))
        return bad(16, FM_MAX_GROUPS, (uint64_t(L.n_group) << 32) | L.topk_group);
    // Pointers the configuration needs (observed: which one is missing).
    if (L.expert_owner == 0) return bad(14, 1, 0);
    if (L.router != FM_ROUTER_GIVEN && L.router_weight == 0) return bad(14, 1, 1);
    if ((L.router == FM_ROUTER_SIGMOID_BIAS || L.router == FM_ROUTER_TOPK_SOFTMAX ||
         L.router == FM_ROUTER_SQRTSOFTPLUS_BIAS) && L.router_bias == 0)
        return bad(14, 1, 2);
    if (L.router == FM_ROUTER_GIVEN && (R.given_ids == 0 || R.given_weights == 0)) return bad(14, 1, 3);
    if (R.tokens != 0 && (R.x == 0 || R.out == 0)) return bad(14, 1, 4);
    if (R.local_experts != 0 && (R.w0 == 0 || R.w1 == 0)) return bad(14, 1, 5);
    if (L.shared_width != 0 && (R.shared_w0 == 0 || R.shared_w1 == 0)) return bad(14, 1, 6);
    if (L.shared_width != 0 && L.shared_gated && R.shared_gate == 0) return bad(14, 1, 7);
    if (R.heap == 0 || R.peers == 0 || R.workspace == 0) return bad(14, 1, 8);
    if (R.scratch == 0) return bad(14, 1, 9);
    return 0;
}

// Zeroes this launch's counters before the first barrier (nobody reads them before it).
// gemm1_done and reduce_done are armed per source by the scheduler (on_dispatch).
__device__ void zero_counters(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const uint32_t units = L.world * L.max_local * c.row_blocks();
    const uint32_t srb = L.shared_width ? (L.tokens_max + kTileM - 1) / kTileM : 0;
    uint32_t* g0 = reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm0_done);
    uint32_t* sd = reinterpret_cast<uint32_t*>(c.ws + L.ws_shared_done);
    const uint32_t stride = c.nblk * kThreads;
    for (uint32_t i = c.blk * kThreads + threadIdx.x; i < units; i += stride) g0[i] = 0;
    for (uint32_t i = c.blk * kThreads + threadIdx.x; i < srb; i += stride) sd[i] = 0;
    if (c.blk == 0 && threadIdx.x == 0) {
        c.queue_ctl()[0] = 0;  // tail
        c.queue_ctl()[1] = 0;  // head
        c.sync()[3] = 0;       // shared GEMM1 tiles done
    }
}

// The last block of the group to leave resets the barrier and exit counts and advances the
// epoch (also after an error: stale signals of this launch must never match the next).
__device__ FM_PHASE void rank_exit(const Ctx& c) {
    transport_quiet();
    __syncthreads();
    phase_store(c);  // before the exit count: the host reads the record after the launch
    if (threadIdx.x == 0) {
        fence_peers(c);
        uint32_t* s = c.sync();
        if (atom_add_acq_rel(s + 2, 1) + 1 == c.nblk) {
            atomicExch(s + 0, 0u);
            atomicExch(s + 2, 0u);
            __threadfence();
            *reinterpret_cast<volatile uint64_t*>(c.ws + c.L->ws_epoch) = c.n;
            __threadfence_system();
        }
    }
}

// Debug stops (stop_after, for stage checks): true when the launch ends after `stage`. A
// launch parameter, so every block of every group takes the same branches; the caller
// still runs rank_exit(), so the launch ends with status OK and the epoch advanced.
// FM_STOP_GEMM0 ends inside the expert stage: no GEMM1 task is created (push_tasks), then
// the launch also leaves at the GEMM1 stop. FM_STOP_GEMM1 creates no reduce task and sends
// no combine signal (source_gemm1_done).
__device__ __forceinline__ bool stops_after(const Ctx& c, uint32_t stage) {
    const uint32_t stop = c.L->stop_after;
    return stop != FM_STOP_NONE && stop <= stage;
}

template <class D>
__device__ __forceinline__ void layer(const FmKernelParams& p) {
    extern __shared__ __align__(128) char smem_raw[];
    const uint32_t ranks = p.launch_ranks;
    const bool grid_ok = ranks >= 1 && ranks <= FM_MAX_LAUNCH_RANKS && gridDim.x % ranks == 0 &&
                         blockDim.x == kThreads && gridDim.y == 1 && gridDim.z == 1;
    if (!grid_ok) {
        // Groups cannot be formed: report into rank 0's workspace and leave without the exit
        // protocol (the epoch is not advanced: the host must not retry this launch shape).
        // (No workspace in rank[0] either: nowhere to report; the host checks for this.)
        if (blockIdx.x == 0 && threadIdx.x == 0 && p.rank[0].workspace != 0) {
            Ctx c{};
            c.L = &p.layer;
            c.R = &p.rank[0];
            c.ws = reinterpret_cast<char*>(p.rank[0].workspace);
            const uint64_t where = (ranks < 1 || ranks > FM_MAX_LAUNCH_RANKS) ? 7 : (blockDim.x != kThreads ? 8 : 4);
            fail(c, FM_STATUS_BAD_PARAMS, FM_STAGE_SETUP, where, ranks, gridDim.x | (uint64_t(blockDim.x) << 32), 0);
        }
        return;
    }
    Ctx c;
    c.nblk = gridDim.x / ranks;
    const uint32_t g = blockIdx.x / c.nblk;
    c.blk = blockIdx.x % c.nblk;
    c.L = &p.layer;
    c.R = &p.rank[g];
    c.me = c.R->rank;
    c.k = p.layer.route_k != 0 ? p.layer.route_k : p.layer.top_k;
    c.ws = reinterpret_cast<char*>(c.R->workspace);
    c.heap = reinterpret_cast<char*>(c.R->heap);
    c.peers = reinterpret_cast<const uint64_t*>(c.R->peers);
    c.misc = reinterpret_cast<Misc*>(smem_raw);
    c.smem = smem_raw + kMiscBytes;
    if (c.ws == nullptr) {
        // Review fix: check_params' "workspace is 0" case (where 14, observed 8) used to be
        // reached only after the epoch load below and fail() had dereferenced this null
        // workspace (an illegal-address fault instead of a status). A group without a
        // workspace has no status words and no epoch: report into rank[0]'s workspace, as
        // the grid-shape errors do, and leave without the exit protocol. Rank 0's group then
        // sees the abort flag and leaves too; the other groups time out on this rank.
        if (c.blk == 0 && threadIdx.x == 0 && p.rank[0].workspace != 0) {
            c.R = &p.rank[0];  // c is not used after this (keeps the stack frame as it was)
            c.ws = reinterpret_cast<char*>(p.rank[0].workspace);
            fail(c, FM_STATUS_BAD_PARAMS, FM_STAGE_SETUP, 14, 1, 8, 0);
        }
        return;
    }
    c.n = *reinterpret_cast<volatile uint64_t*>(c.ws + p.layer.ws_epoch) + 1;

    uint64_t expected = 0, observed = 0;
    const uint32_t bad = check_params<D>(c, expected, observed);
    bool ok = bad == 0;
    if (!ok && c.blk == 0 && threadIdx.x == 0) {
        fail(c, FM_STATUS_BAD_PARAMS, FM_STAGE_SETUP, bad, expected, observed, 0);
    }
    if (ok && c.blk == 0) {
        bool peers_ok = true;
        for (uint32_t q = threadIdx.x; q < c.L->world; q += kThreads) {
#ifdef FM_NVSHMEM
            // RDMA peers (0 entries) need the send cells; this rank's own entry never is 0.
            const bool peer_bad = c.peers[q] == 0 && (q == c.me || c.L->heap_cells < 2);
#else
            const bool peer_bad = c.peers[q] == 0;
#endif
            if (peer_bad) {
                fail(c, FM_STATUS_BAD_PARAMS, FM_STAGE_SETUP, 9, 1, q, 0);
                peers_ok = false;
            }
        }
        ok = !__syncthreads_or(!peers_ok);
    }
    phase_start(c);
    init_ticket_prefetch(c);
    if (ok) zero_counters(c);
    ok = ok && rank_barrier(c, 0, FM_STAGE_SETUP);

    // ---- gate ----
    if (c.L->router != FM_ROUTER_GIVEN) {
        // Every block's logit tiles before any top-k reads them (the barrier's fences).
        if (ok) router_tiles<D>(c);
        ok = ok && rank_barrier(c, 5, FM_STAGE_GATE);
    }
    const uint32_t chunks = c.gate_chunks();
    if (ok) {
        for (uint32_t ch = c.blk; ch < chunks; ch += c.nblk) gate_chunk<D>(c, ch);
    }
    ok = ok && rank_barrier(c, 1, FM_STAGE_GATE);
    if (ok) gate_scan(c);
    ok = ok && rank_barrier(c, 2, FM_STAGE_GATE);
    phase_lap(c, kPhaseGate);
    if (stops_after(c, FM_STOP_GATE)) return rank_exit(c);

    // ---- dispatch ----
    if (ok) dispatch_rank<D>(c);
    // The barrier's system-scope fence orders every block's rows and metadata before block
    // 0's signals below.
    ok = ok && rank_barrier(c, 3, FM_STAGE_DISPATCH);
    if (ok && c.blk == 0) {
        send_dispatch_signals(c);
        if (!stops_after(c, FM_STOP_DISPATCH)) ok = schedule<D>(c);
    }
    phase_lap(c, kPhaseDispatch);
    if (stops_after(c, FM_STOP_DISPATCH)) return rank_exit(c);

    // ---- experts ----
    ok = ok && process_tasks<D>(c);
    // A block that left the task loop on an error may still have a next task's step 0 in
    // flight (next_stage.cuh): every thread's copies land, and the barrier makes that hold
    // block-wide before anything may use the arena again or the block exits.
    if constexpr (kEarlyStageBuild) {
        cp_async_wait<0>();
        __syncthreads();
    }
    if (stops_after(c, FM_STOP_GEMM1)) return rank_exit(c);

    // ---- combine ----
    ok = ok && combine_wait(c);
    if (ok) combine_tokens<D>(c);
    phase_lap(c, kPhaseCombine);

    rank_exit(c);
}

}  // namespace fm

#endif  // FLASHMOE_LAYER_CUH
