// The per-rank task queue: the scheduler, the producers of GEMM1 tasks, and the processors.
//
// Queue entries are u64 `(epoch << 32) | task`; task = kind << 30 | index. Producers reserve
// entries with an atomic on the tail and publish them with fence + store; processors take
// tickets in order from the head and wait for their entry, or for the published total
// (`(epoch << 32) | tasks`, known once every dispatch signal has arrived) to show that their
// ticket is past the end.
//
// Why no wait can deadlock: every block is resident (cooperative launch). Tickets are taken
// in entry order, and a processor only waits while holding no task, so when every processor
// waits, every published entry has been taken and run to completion (running a task waits
// for nothing). The only producers left are then the scheduler, which waits only for
// dispatch signals of other ranks (sent before those ranks wait on anything of this rank),
// and nothing else: the set of waits is acyclic. Every wait also has a deadline.
#ifndef FLASHMOE_TASK_QUEUE_CUH
#define FLASHMOE_TASK_QUEUE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

enum TaskKind : uint32_t {
    kTaskG0 = 0,   // routed GEMM0 tile: unit (source, local, row block) x gemm0 column tile
    kTaskG1 = 1,   // routed GEMM1 tile: unit x hidden column tile
    kTaskSG0 = 2,  // shared-expert GEMM0 tile: token row block x shared column tile
    kTaskSG1 = 3,  // shared-expert GEMM1 tile: token row block x hidden column tile
};
constexpr uint32_t kTaskIndexMask = (1u << 30) - 1;

// Appends tasks kind:first .. kind:first+count-1 (single thread). The caller's fence-worthy
// writes (activations) and acquisitions (signals) happen before, so the fence here makes
// the entries release them.
// A launch stopped after GEMM0 (stage checks) creates no GEMM1 task: the scheduler does not
// count them either.
__device__ __forceinline__ bool push_tasks(const Ctx& c, uint32_t kind, uint32_t first,
                                           uint32_t count) {
    if (count == 0 || ((kind == kTaskG1 || kind == kTaskSG1) && c.stop_after_gemm0())) return true;
    const uint64_t base = atomicAdd(c.queue_ctl(), count);
    if (base + count > c.L->ws_queue_capacity) {
        fail(c, FM_STATUS_QUEUE_OVERFLOW, FM_STAGE_EXPERT, 0, c.L->ws_queue_capacity, base + count, 0);
        return false;
    }
    __threadfence();
    uint64_t* q = c.queue();
    for (uint32_t i = 0; i < count; ++i) {
        st_relaxed_gpu(q + base + i, (c.n << 32) | ((kind << 30) | (first + i)));
    }
    return true;
}

__device__ __forceinline__ uint32_t dispatch_rows(const Ctx& c, uint32_t s, uint32_t l) {
    // Already acquired by the scheduler before it pushed the task that brought us here.
    return uint32_t(*reinterpret_cast<volatile uint64_t*>(dispatch_signal(*c.L, c.heap, s, l)));
}

// Block 0 of the group, after its dispatch signals: pushes the shared-expert GEMM0 tasks,
// then polls this rank's (source, local expert) dispatch signals and pushes each arrived
// pair's GEMM0 tasks (0 rows: the combine signal is answered at once), then publishes the
// total. Returns false on error (block-uniform).
__device__ FM_PHASE bool schedule(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const uint32_t local = c.R->local_experts;
    const uint32_t pairs = L.world * local;
    const uint32_t g0 = L.intermediate / kTileN, g1 = L.hidden / kTileN;
    const uint32_t rbs = c.row_blocks();
    // A launch stopped after GEMM0 creates no GEMM1 task (see run_task).
    const uint32_t g1_tasks = c.stop_after_gemm0() ? 0 : g1;
    bool failed = false;
    unsigned long long total = 0;
    if (threadIdx.x == 0) {
        c.misc->sum = 0;
        if (L.shared_width != 0) {
            const uint32_t trb = c.token_row_blocks(), sg0 = L.shared_width / kTileN;
            failed |= !push_tasks(c, kTaskSG0, 0, trb * sg0);
            total += uint64_t(trb) * (sg0 + g1_tasks);
        }
    }
    uint64_t seen_mask = 0;
    const uint64_t start = now_ns();
    while (true) {
        uint32_t pending = 0;
        uint64_t last_word = 0;
        uint32_t last_pair = 0;
#pragma unroll 1
        for (uint32_t i = 0; i < 64; ++i) {
            const uint32_t j = threadIdx.x + i * kThreads;
            if (j >= pairs) break;
            if ((seen_mask >> i) & 1ull) continue;
            const uint32_t s = j / local, l = j % local;
            const uint64_t w = ld_acquire_sys(dispatch_signal(L, c.heap, s, l));
            if (!signal_is(w, c.n)) {
                ++pending;
                last_word = w;
                last_pair = (s << 16) | l;
                continue;
            }
            seen_mask |= 1ull << i;
            const uint32_t rows = uint32_t(w);
            if (rows > L.capacity) {
                fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_EXPERT, (s << 16) | l, L.capacity, rows, 0);
                failed = true;
                continue;
            }
            const uint32_t nrb = (rows + kTileM - 1) / kTileM;
            if (nrb == 0) {
                if (!c.silent()) deliver(c, s, kStageCombine, l, 0, combine_signal_off(L, c.me, l));
            } else {
                const uint32_t unit0 = (s * L.max_local + l) * rbs;
                failed |= !push_tasks(c, kTaskG0, unit0 * g0, nrb * g0);
                total += uint64_t(nrb) * (g0 + g1_tasks);
            }
        }
        if (pending != 0 && !failed) {
            // A wait on peers' signals: a possible cause, so 1 x timeout_ns (watchdog.cuh).
            const uint64_t waited = now_ns() - start;
            if (waited > L.timeout_ns) {
                fail(c, FM_STATUS_TIMEOUT, FM_STAGE_DISPATCH, last_pair, c.n << 32, last_word, waited);
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

// Runs one task (block-wide) and its completion step. Returns false on error.
template <class D>
__device__ bool run_task(const Ctx& c, uint32_t task) {
    using T = typename D::T;
    const FmLayerParams& L = *c.L;
    const FmRankParams& R = *c.R;
    constexpr uint64_t es = sizeof(T);
    const uint32_t kind = task >> 30, idx = task & kTaskIndexMask;
    const uint32_t H = L.hidden, I = L.intermediate, SW = L.shared_width;
    const uint32_t g0 = I / kTileN, g1 = H / kTileN, rbs = c.row_blocks();
    const bool gated = c.gated();
    bool ok = true;
    const Clamp clamp{L.mlp_alpha, L.mlp_limit, L.mlp_up_offset};
    TileArgs t;
    t.bias0 = nullptr;  // expert biases (gpt-oss) are set below where the rank has them
    t.bias1 = nullptr;
    if (kind == kTaskG0 || kind == kTaskG1) {
        const uint32_t per = kind == kTaskG0 ? g0 : g1;
        const uint32_t unit = idx / per, nt = idx % per;
        const uint32_t rb = unit % rbs, sl = unit / rbs;
        const uint32_t s = sl / L.max_local, l = sl % L.max_local;
        const uint32_t rows = dispatch_rows(c, s, l);
        const uint32_t valid = min_u32(kTileM, rows - rb * kTileM);
        char* act = c.ws + L.ws_act + s * L.ws_act_stride_source + l * L.ws_act_stride_expert +
                    uint64_t(rb) * kTileM * L.ws_act_stride_row;
        if (kind == kTaskG0) {
            t.a = c.heap + heap_row(L, s, kStageDispatch, kCellRecv, l, rb * kTileM);
            t.a_stride = L.heap_stride_row;
            t.a_rows = valid;
            const char* w0 = reinterpret_cast<const char*>(R.w0) + l * (uint64_t(c.gemm0_width()) * H * es);
            t.b0 = w0 + uint64_t(nt) * kTileN * H * es;
            t.b1 = w0 + (uint64_t(I) + nt * kTileN) * H * es;
            t.b_stride = H * es;
            t.k = H;
            t.out = act + uint64_t(nt) * kTileN * es;
            t.out_stride = L.ws_act_stride_row;
            t.out_rows = valid;
            if (R.b0 != 0) {
                const float* b0 = reinterpret_cast<const float*>(R.b0) + uint64_t(l) * c.gemm0_width();
                t.bias0 = b0 + nt * kTileN;
                t.bias1 = gated ? b0 + I + nt * kTileN : nullptr;
            }
            if (gated) {
                run_tile<D, kEpiActGated>(t, c.smem, L.mlp, clamp);
            } else {
                run_tile<D, kEpiActPlain>(t, c.smem, L.mlp, clamp);
            }
            if (threadIdx.x == 0) {
                __threadfence();
                uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm0_done) + unit;
                // acq_rel: the last finisher sees every other tile's activations before it
                // publishes the row block's GEMM1 tasks.
                if (atom_add_acq_rel(done, 1) + 1 == g0) ok = push_tasks(c, kTaskG1, unit * g1, g1);
            }
        } else {
            t.a = act;
            t.a_stride = L.ws_act_stride_row;
            t.a_rows = valid;
            t.b0 = reinterpret_cast<const char*>(R.w1) + l * (uint64_t(H) * I * es) +
                   uint64_t(nt) * kTileN * I * es;
            t.b1 = nullptr;
            t.b_stride = I * es;
            t.k = I;
            // Straight into the source's combine receive cell, in the source's slot order.
            t.out = row_target(c, s, kStageCombine, l, rb * kTileM) + uint64_t(nt) * kTileN * es;
            t.out_stride = L.heap_stride_row;
            t.out_rows = valid;
            if (R.b1 != 0) t.bias0 = reinterpret_cast<const float*>(R.b1) + uint64_t(l) * H + nt * kTileN;
            run_tile<D, kEpiStore>(t, c.smem, L.mlp, clamp);
            if (threadIdx.x == 0) {
                __threadfence_system();  // the tile's remote stores, before the count
                uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm1_done) +
                                 (s * L.max_local + l);
                const uint32_t nrb = (rows + kTileM - 1) / kTileM;
                if (atom_add_acq_rel(done, 1) + 1 == nrb * g1 && !c.silent()) {
                    deliver(c, s, kStageCombine, l, rows, combine_signal_off(L, c.me, l));
                }
            }
        }
    } else {
        const uint32_t sg0 = SW / kTileN;
        const uint32_t per = kind == kTaskSG0 ? sg0 : g1;
        const uint32_t rb = idx / per, nt = idx % per;
        const uint32_t valid = min_u32(kTileM, R.tokens - rb * kTileM);
        char* sact = c.ws + L.ws_shared_act + uint64_t(rb) * kTileM * L.ws_shared_act_stride_row;
        if (kind == kTaskSG0) {
            t.a = reinterpret_cast<const char*>(R.x) + uint64_t(rb) * kTileM * H * es;
            t.a_stride = H * es;
            t.a_rows = valid;
            const char* w0 = reinterpret_cast<const char*>(R.shared_w0);
            t.b0 = w0 + uint64_t(nt) * kTileN * H * es;
            t.b1 = w0 + (uint64_t(SW) + nt * kTileN) * H * es;
            t.b_stride = H * es;
            t.k = H;
            t.out = sact + uint64_t(nt) * kTileN * es;
            t.out_stride = L.ws_shared_act_stride_row;
            t.out_rows = valid;
            if (gated) {
                run_tile<D, kEpiActGated>(t, c.smem, L.mlp, clamp);
            } else {
                run_tile<D, kEpiActPlain>(t, c.smem, L.mlp, clamp);
            }
            if (threadIdx.x == 0) {
                __threadfence();
                uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_shared_done) + rb;
                if (atom_add_acq_rel(done, 1) + 1 == sg0) ok = push_tasks(c, kTaskSG1, rb * g1, g1);
            }
        } else {
            t.a = sact;
            t.a_stride = L.ws_shared_act_stride_row;
            t.a_rows = valid;
            t.b0 = reinterpret_cast<const char*>(R.shared_w1) + uint64_t(nt) * kTileN * SW * es;
            t.b1 = nullptr;
            t.b_stride = SW * es;
            t.k = SW;
            t.out = c.ws + L.ws_shared_out + uint64_t(rb) * kTileM * L.ws_shared_out_stride_row +
                    uint64_t(nt) * kTileN * 4;
            t.out_stride = L.ws_shared_out_stride_row;
            t.out_rows = valid;
            run_tile<D, kEpiStoreF32>(t, c.smem, L.mlp, clamp);
            if (threadIdx.x == 0) {
                __threadfence();
                atom_add_acq_rel(c.sync() + 3, 1);
            }
        }
    }
    return block_bcast(c, threadIdx.x == 0 ? ok : true);
}

enum TakeState : uint32_t { kTakeTask = 1, kTakeDone = 2, kTakeStop = 3 };

// Thread 0 takes the next ticket and waits for its entry or for the end of the queue;
// the outcome goes to Misc (task, state).
__device__ FM_PHASE void take_task(const Ctx& c) {
    // Review fix: wait_until() looks at the abort flag only while its probe fails, so a rank
    // that had already failed kept running every task whose entry was ready (GEMMs, remote
    // stores, combine signals of a dead epoch) before it noticed. One relaxed load per task.
    if (aborted(c)) {
        c.misc->task = 0;
        c.misc->state = kTakeStop;
        return;
    }
    const uint64_t cap = c.L->ws_queue_capacity;
    const uint32_t ticket = atomicAdd(c.queue_ctl() + 1, 1u);
    uint32_t task = 0, state = 0;
    const bool ok = wait_until(
        c, [&](uint64_t& seen) {
            if (ticket < cap) {
                const uint64_t e = ld_acquire_gpu(c.queue() + ticket);
                if (signal_is(e, c.n)) {
                    task = uint32_t(e);
                    state = kTakeTask;
                    return true;
                }
                seen = e;
            }
            const uint64_t tw = ld_acquire_gpu(c.queue_total());
            if (signal_is(tw, c.n) && ticket >= uint32_t(tw)) {
                state = kTakeDone;
                return true;
            }
            return false;
        },
        FM_STAGE_EXPERT, 0x1000000ull | ticket, c.n << 32, kWaitConsequence);
    c.misc->task = task;
    c.misc->state = ok ? state : kTakeStop;
}

// Takes tickets and runs tasks until the published total says the queue is exhausted.
// Returns false on error (block-uniform).
template <class D>
__device__ FM_PHASE bool process_tasks(const Ctx& c) {
    while (true) {
        if (threadIdx.x == 0) take_task(c);
        __syncthreads();
        const uint32_t task = c.misc->task, state = c.misc->state;
        __syncthreads();
        if (state == kTakeDone) return true;
        if (state != kTakeTask) return false;
        if (!run_task<D>(c, task)) return false;
    }
}

}  // namespace fm

#endif  // FLASHMOE_TASK_QUEUE_CUH
