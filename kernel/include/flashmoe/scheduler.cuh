// The scheduler side of the per-rank task queue (task_queue.cuh has the protocol): the task
// encoding, pushes, the per-source counters armed when a dispatch signal arrives, and the
// scheduler that polls the dispatch signals and publishes the task total.
#ifndef FLASHMOE_SCHEDULER_CUH
#define FLASHMOE_SCHEDULER_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/tile_rule.cuh"
#include "flashmoe/transport.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

static_assert(kRuleBlockRows == uint32_t(kTileM), "tile_rule.cuh's row block is TILE_M");

enum TaskKind : uint32_t {
    kTaskG0 = 0,      // routed GEMM0 tile: unit (source, local, row block) x gemm0 column tile
    kTaskG1 = 1,      // routed GEMM1 tile: unit x hidden column tile
    kTaskShared = 2,  // shared expert: GEMM0 tiles (token row block x shared column tile),
                      // then from index token_row_blocks * shared_width / 64 on, GEMM1 tiles
                      // (token row block x hidden column tile)
    kTaskReduce = 3,  // reduce tile: (source, token row block) x hidden column tile
};
constexpr uint32_t kTaskIndexMask = (1u << 30) - 1;

// Reserves `count` queue entries (single thread): their first index in `base`, or false
// after reporting FM_STATUS_QUEUE_OVERFLOW.
__device__ __forceinline__ bool reserve_entries(const Ctx& c, uint32_t count, uint64_t& base) {
    base = atomicAdd(c.queue_ctl(), count);
    if (base + count > c.L->ws_queue_capacity) {
        fail(c, FM_STATUS_QUEUE_OVERFLOW, FM_STAGE_EXPERT, 0, c.L->ws_queue_capacity, base + count, 0);
        return false;
    }
    return true;
}

__device__ __forceinline__ uint64_t task_entry(const Ctx& c, uint32_t kind, uint32_t index) {
    return (c.n << 32) | ((kind << 30) | index);
}

// Appends tasks kind:first .. kind:first+count-1 (single thread). The caller's fence-worthy
// writes (activations, counters) and acquisitions (signals) happen before, so the fence
// here makes the entries release them. A launch stopped after GEMM0 (stage checks) creates
// no routed GEMM1 task: the scheduler does not count them either.
__device__ __forceinline__ bool push_tasks(const Ctx& c, uint32_t kind, uint32_t first,
                                           uint32_t count) {
    if (count == 0 || (kind == kTaskG1 && c.stop_after_gemm0())) return true;
    uint64_t base;
    if (!reserve_entries(c, count, base)) return false;
    __threadfence();
    uint64_t* q = c.queue();
    for (uint32_t i = 0; i < count; ++i) st_relaxed_gpu(q + base + i, task_entry(c, kind, first + i));
    return true;
}

__device__ __forceinline__ uint32_t blocks_of(uint32_t rows) { return (rows + kTileM - 1) / kTileM; }

// Every GEMM1 tile of source s is done (or it has no pair): push its reduce tiles, or answer
// at once with a 0-row combine signal when it sent no row. Nothing after GEMM1 in a launch
// stopped at GEMM0/GEMM1. Single thread.
__device__ __forceinline__ bool source_gemm1_done(const Ctx& c, uint32_t s) {
    if (c.no_reduce()) return true;
    const uint32_t rows = dispatch_rows(c, s);
    const uint32_t n = blocks_of(rows) * (c.L->hidden / kTileN);
    if (n == 0) {
        if (!c.silent()) deliver_combine(c, s, 0);
        return true;
    }
    return push_tasks(c, kTaskReduce, s * c.max_token_row_blocks() * (c.L->hidden / kTileN), n);
}

// Validates source s's signal and metadata (rows <= tokens_max, counts <= capacity, their
// sum <= pair_capacity). Single thread; false after reporting FM_STATUS_BAD_SIGNAL.
__device__ __forceinline__ bool check_source(const Ctx& c, uint32_t s, uint32_t rows) {
    const FmLayerParams& L = *c.L;
    if (rows > L.tokens_max) {
        fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_EXPERT, (uint64_t(s) << 16) | 0xFFFFu, L.tokens_max, rows, 0);
        return false;
    }
    const uint32_t* counts = recv_meta(c, s).counts;
    uint64_t sum = 0;
    for (uint32_t l = 0; l < c.R->local_experts; ++l) {
        const uint32_t n = counts[l];
        sum += n;
        if (n > L.capacity || sum > L.pair_capacity) {
            const bool cap = n > L.capacity;
            fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_EXPERT, (uint64_t(s) << 16) | l,
                 cap ? L.capacity : L.pair_capacity, cap ? n : sum, 0);
            return false;
        }
    }
    return true;
}

// Tasks of a pair list of `count` pairs: its row blocks that start a task (tile_rule.cuh:
// the second block of a wide task has none).
template <class D>
__device__ __forceinline__ uint32_t tasks_of(const Ctx& c, uint32_t count) {
    uint32_t n = 0;
    for (uint32_t rb = 0; rb < blocks_of(count); ++rb) n += task_rows<D::kCode>(*c.L, count, rb) != 0;
    return n;
}

// Pushes the GEMM0 tasks of pair list `unit0` (its row block 0) of `count` pairs: the g0
// column tiles of each row block that starts a task, with one reservation (single thread;
// ordering as push_tasks). Adds the list's tasks to `tasks`.
template <class D>
__device__ __forceinline__ bool push_gemm0_tasks(const Ctx& c, uint32_t unit0, uint32_t count,
                                                 uint32_t& tasks) {
    const uint32_t list_tasks = tasks_of<D>(c, count);
    tasks += list_tasks;
    const uint32_t g0 = c.L->intermediate / kTileN, n = list_tasks * g0;
    if (n == 0) return true;
    uint64_t base;
    if (!reserve_entries(c, n, base)) return false;
    __threadfence();
    uint64_t* q = c.queue() + base;
    for (uint32_t rb = 0; rb < blocks_of(count); ++rb) {
        if (task_rows<D::kCode>(*c.L, count, rb) == 0) continue;
        for (uint32_t nt = 0; nt < g0; ++nt) st_relaxed_gpu(q++, task_entry(c, kTaskG0, (unit0 + rb) * g0 + nt));
    }
    return true;
}

// Source s's dispatch signal (rows) has arrived: validate, write its pair bases, arm its
// GEMM1 and reduce counters (each counts up from 0 - expected to 0, so the tile that brings
// it to 0 is the last: no expected count is recomputed per tile; a GEMM1 task adds the row
// blocks it covers, 2 for a wide one), push its GEMM0 tiles. Returns the tasks s brings in
// all; sets `failed` on error. Single thread.
template <class D>
__device__ __forceinline__ uint64_t on_dispatch(const Ctx& c, uint32_t s, uint32_t rows, bool& failed) {
    const FmLayerParams& L = *c.L;
    if (!check_source(c, s, rows)) {
        failed = true;
        return 0;
    }
    const uint32_t g0 = L.intermediate / kTileN, g1 = L.hidden / kTileN;
    const uint32_t* counts = recv_meta(c, s).counts;
    uint32_t blocks = 0, tasks = 0, base = 0;
    for (uint32_t l = 0; l < c.R->local_experts; ++l) {
        c.pair_base()[s * L.max_local + l] = base;
        base += counts[l];
        blocks += blocks_of(counts[l]);
    }
    const uint32_t g1_tasks = c.stop_after_gemm0() ? 0 : g1;
    const uint32_t reduce = c.no_reduce() ? 0 : blocks_of(rows) * g1;
    reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm1_done)[s] = 0u - blocks * g1;
    reinterpret_cast<uint32_t*>(c.ws + L.ws_reduce_done)[s] = 0u - reduce;
    for (uint32_t l = 0; l < c.R->local_experts && !failed; ++l) {
        failed = !push_gemm0_tasks<D>(c, (s * L.max_local + l) * c.row_blocks(), counts[l], tasks);
    }
    if (!failed && blocks == 0 && !c.stop_after_gemm0()) failed = !source_gemm1_done(c, s);
    return uint64_t(tasks) * (g0 + g1_tasks) + reduce;
}

// Block 0 of the group, after its dispatch signals: pushes the shared-expert GEMM0 tasks,
// then polls this rank's dispatch signals, one per source, and hands each arrived one to
// on_dispatch(), then publishes the total. Returns false on error (block-uniform).
template <class D>
__device__ FM_PHASE bool schedule(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const uint32_t g1 = L.hidden / kTileN;
    bool failed = false;
    unsigned long long total = 0;
    if (threadIdx.x == 0) {
        c.misc->sum = 0;
        if (L.shared_width != 0) {
            // A launch stopped after GEMM0 creates no shared GEMM1 task either (run_shared).
            const uint32_t trb = c.token_row_blocks(), sg0 = L.shared_width / kTileN;
            failed |= !push_tasks(c, kTaskShared, 0, trb * sg0);
            total += uint64_t(trb) * (sg0 + (c.stop_after_gemm0() ? 0 : g1));
        }
    }
    uint64_t seen_mask = 0;
    const uint64_t start = now_ns();
    while (true) {
        uint32_t pending = 0;
        uint64_t last_word = 0;
        uint32_t last_source = 0;
#pragma unroll 1
        for (uint32_t i = 0; i < 64; ++i) {
            const uint32_t s = threadIdx.x + i * kThreads;
            if (s >= L.world) break;
            if ((seen_mask >> i) & 1ull) continue;
            const uint64_t w =
                ld_acquire_peers(c, reinterpret_cast<const uint64_t*>(c.heap + dispatch_signal_off(L, s)));
            if (!signal_is(w, c.n)) {
                ++pending;
                last_word = w;
                last_source = s;
                continue;
            }
            seen_mask |= 1ull << i;
            total += on_dispatch<D>(c, s, uint32_t(w), failed);
        }
        if (pending != 0 && !failed) {
            // A wait on peers' signals: a possible cause, so 1 x timeout_ns (watchdog.cuh).
            const uint64_t waited = now_ns() - start;
            if (waited > L.timeout_ns) {
                fail(c, FM_STATUS_TIMEOUT, FM_STAGE_DISPATCH, uint64_t(last_source) << 16, c.n << 32,
                     last_word, waited);
                failed = true;
            }
        }
        const bool stop = __syncthreads_or(failed || (threadIdx.x == 0 && aborted(c)));
        if (stop) return false;
        if (!__syncthreads_or(pending != 0)) break;
        __nanosleep(128);
    }
    atomicAdd(&c.misc->sum, total);
    __syncthreads();
    if (threadIdx.x == 0) {
        st_release_gpu(c.queue_total(), (c.n << 32) | uint32_t(c.misc->sum));
    }
    __syncthreads();
    return true;
}

}  // namespace fm

#endif  // FLASHMOE_SCHEDULER_CUH
