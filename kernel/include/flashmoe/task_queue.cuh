// The per-rank task queue: the producers of GEMM1 and reduce tasks and the processors; the
// task encoding, the pushes and the scheduler are in scheduler.cuh.
//
// Queue entries are u64 `(epoch << 32) | task`; task = kind << 30 | index. Producers reserve
// entries with an atomic on the tail and publish them with fence + store; processors take
// tickets in order from the head and wait for their entry, or for the published total
// (`(epoch << 32) | tasks`, known once every dispatch signal has arrived) to show that their
// ticket is past the end. The total counts the tasks created later (GEMM1 tiles, reduce
// tiles, shared GEMM1 tiles): their numbers follow from the counts and rows of the signals.
//
// Why no wait can deadlock: every block is resident (cooperative launch). Tickets are taken
// in entry order, and a processor only waits while holding no task, so when every processor
// waits, every published entry has been taken and run to completion (running a task waits
// for nothing). The only producers left are then the scheduler, which waits only for
// dispatch signals of other ranks (sent before those ranks wait on anything of this rank),
// and nothing else: the set of waits is acyclic. Every wait also has a deadline. A block may
// take its next ticket ahead while a decode or prefill tile loads (prefetch_ticket,
// ticket.cuh); it still waits for that ticket's entry only after the tile's task is done.
#ifndef FLASHMOE_TASK_QUEUE_CUH
#define FLASHMOE_TASK_QUEUE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"
#include "flashmoe/gemm_decode.cuh"
#include "flashmoe/gemm_decode_f32.cuh"
#include "flashmoe/gemm_prefill.cuh"
#include "flashmoe/next_stage.cuh"
#include "flashmoe/phases.cuh"
#include "flashmoe/reduce.cuh"
#include "flashmoe/routed_args.cuh"
#include "flashmoe/scheduler.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/ticket.cuh"
#include "flashmoe/tile_rule.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

static_assert(kTaskG0 == 0 && kTaskG1 == 1 && kTaskShared == 2 && kTaskReduce == 3 &&
                  kPhaseKindTasks == kPhaseKindNs + 4,
              "phase_task_done keeps one time and one count word per task kind");

// Every pair-list entry of the task must name a row source s sent (else its A rows would
// be read from outside them): FM_STATUS_BAD_SIGNAL. Block-uniform (rows <= 128 < kThreads).
__device__ __forceinline__ bool check_pairs(const Ctx& c, const Unit& u, const uint32_t* pairs) {
    uint32_t q = 0;
    const bool bad = pair_out_of_range(c, u, pairs, q);
    if (bad) fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_EXPERT, (uint64_t(u.s) << 16) | u.l, dispatch_rows(c, u.s), q, 0);
    return !__syncthreads_or(bad);
}

// Completion of the GEMM0 tile the block holds (its index read back from Misc::task, where
// take_task left it: nothing of the tile stays live across the tile call, where the f32
// gated tile is at the register budget and the wide tile made one kept index spill).
__device__ __forceinline__ bool gemm0_finished(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const uint32_t idx = block_misc()->task & kTaskIndexMask;
    const uint32_t g0 = L.intermediate / kTileN, g1 = L.hidden / kTileN, unit = idx / g0;
    bool ok = true;
    if (threadIdx.x == 0) {
        __threadfence();
        uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm0_done) + unit;
        // acq_rel: the last finisher sees every other tile's activations before it
        // publishes the row block's GEMM1 tasks.
        if (atom_add_acq_rel(done, 1) + 1 == g0) ok = push_tasks(c, kTaskG1, unit * g1, g1);
    }
    return block_bcast(c, threadIdx.x == 0 ? ok : true);
}

// A routed GEMM tile with the shape the tile rule gives its task (params.h FM_TILES_*,
// tile_rule.cuh): under auto and narrow, the decode tile for a short block (mma or FFMA),
// the prefill tile for a longer bf16/f16 one (128 rows for auto's wide tasks), the classic
// tile for a longer f32 one; every block classic under FM_TILES_CLASSIC.
// The decode and prefill tiles take the block's next ticket while their first stages load
// (prefetch_ticket, ticket.cuh; take_task uses it).
template <class D, int kEpi>
__device__ __forceinline__ void routed_tile(const Ctx& c, const TileArgs& t, const Clamp& clamp) {
    if constexpr (D::kTensorCore) {
        const TileChoice tc = tile_for<D::kCode>(*c.L, t.a_rows);
        // Step 0 in flight (take_task, next_stage.cuh): the tile before issued it for this
        // task's shape, which the same rows give here (stage_tile stages only the decode,
        // prefill and wide shapes, so a classic tile never finds it set).
        const bool staged = kEarlyStageBuild && block_misc()->staged != 0;
        if (tc.kind == kTileDecode) {
            run_decode_tile<D, kEpi>(t, tc.tokens, c.smem, c.L->mlp, clamp, staged);
            return;
        }
        if (tc.kind == kTilePrefill) {
            run_prefill_tile<D, kEpi, kTileM>(t, c.smem, c.L->mlp, clamp, staged);
            return;
        }
        if (tc.kind == kTileWide) {
            run_prefill_tile<D, kEpi, 2 * kTileM>(t, c.smem, c.L->mlp, clamp, staged);
            return;
        }
    } else {
        // f32 has no wide task (task_rows never gives it more than kTileM rows), so tile_for
        // never answers kTileWide here and the classic tile below gets at most kTileM rows.
        const TileChoice tc = tile_for<D::kCode>(*c.L, t.a_rows);
        if (tc.kind == kTileDecode) {
            run_decode_tile_f32<kEpi>(t, tc.tokens, c.smem, c.L->mlp, clamp);
            return;
        }
    }
    run_tile<D, kEpi>(t, c.smem, c.L->mlp, clamp);
}

// GEMM0 tile: A rows gathered through s's pair list from its dispatch rows, written to
// act[s][pair]. Then the next task's early step 0 (next_stage.cuh: it overlaps the
// completion step's fence and atomics); the row block's last tile publishes its GEMM1 tiles.
template <class D>
__device__ FM_PHASE bool run_gemm0(const Ctx& c, uint32_t idx) {
    const FmLayerParams& L = *c.L;
    const uint32_t g0 = L.intermediate / kTileN;
    const Unit u = unit_of<D>(c, idx / g0);
    if (!check_pairs(c, u, unit_pairs(c, u))) return false;
    const TileArgs t = gemm0_args<D>(c, u, idx % g0);
    const Clamp clamp{L.mlp_alpha, L.mlp_limit, L.mlp_up_offset};
    if (c.gated()) {
        routed_tile<D, kEpiActGated>(c, t, clamp);
    } else {
        routed_tile<D, kEpiActPlain>(c, t, clamp);
    }
    stage_next<D>(c);
    return gemm0_finished(c);
}

// GEMM1 tile: act[s][pair] x w1 (+ b1) rounded into y[s][pair]. Then the next task's early
// step 0, as for GEMM0; the last GEMM1 tile of the source hands it to the reduce.
template <class D>
__device__ FM_PHASE bool run_gemm1(const Ctx& c, uint32_t idx) {
    const FmLayerParams& L = *c.L;
    const uint32_t g1 = L.hidden / kTileN;
    const Unit u = unit_of<D>(c, idx / g1);
    const TileArgs t = gemm1_args<D>(c, u, idx % g1);
    routed_tile<D, kEpiStore>(c, t, Clamp{L.mlp_alpha, L.mlp_limit, L.mlp_up_offset});
    stage_next<D>(c);
    bool ok = true;
    if (threadIdx.x == 0) {
        __threadfence();
        uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_gemm1_done) + u.s;
        // acq_rel: the last finisher sees every y row of the source before its reduce tiles
        // are published (the counter was armed at 0 - row blocks x g1 by on_dispatch; a
        // task adds the row blocks it covers).
        const uint32_t covered = blocks_of(u.rows);
        if (atom_add_acq_rel(done, covered) + covered == 0) ok = source_gemm1_done(c, u.s);
    }
    return block_bcast(c, threadIdx.x == 0 ? ok : true);
}

// Reduce tile (reduce.cuh); the source's last one sends its combine signal.
template <class D>
__device__ FM_PHASE bool run_reduce(const Ctx& c, uint32_t idx) {
    const FmLayerParams& L = *c.L;
    const uint32_t g1 = L.hidden / kTileN, per_source = c.max_token_row_blocks() * g1;
    const uint32_t s = idx / per_source, trb = (idx % per_source) / g1, nt = idx % g1;
    const uint32_t rows = dispatch_rows(c, s);
    if (!reduce_tile<D>(c, s, trb, nt, rows)) return false;
    if (threadIdx.x == 0) {
        fence_peers(c);  // the tile's (remote) stores, before the count
        uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_reduce_done) + s;
        if (atom_add_acq_rel(done, 1) + 1 == 0 && !c.silent()) deliver_combine(c, s, rows);
    }
    return true;
}

// Completion of the shared-expert GEMM0 tile the block holds (its index read back from
// Misc::task, as gemm0_finished: kept live across the tile, the row block and the first
// GEMM1 index spilled in the NVSHMEM f32 entry). The row block's last tile publishes its
// shared GEMM1 tiles. Thread 0 only; returns true elsewhere.
__device__ __forceinline__ bool shared_gemm0_finished(const Ctx& c) {
    if (threadIdx.x != 0) return true;
    const FmLayerParams& L = *c.L;
    const uint32_t idx = block_misc()->task & kTaskIndexMask;
    const uint32_t g1 = L.hidden / kTileN, sg0 = L.shared_width / kTileN, rb = idx / sg0;
    __threadfence();
    uint32_t* done = reinterpret_cast<uint32_t*>(c.ws + L.ws_shared_done) + rb;
    if (atom_add_acq_rel(done, 1) + 1 == sg0 && !c.stop_after_gemm0())
        return push_tasks(c, kTaskShared, c.token_row_blocks() * sg0 + rb * g1, g1);
    return true;
}

// Shared-expert tile: GEMM0 (x -> shared act) below index token_row_blocks * sg0, GEMM1
// (shared act -> f32 shared out) from there.
template <class D>
__device__ FM_PHASE bool run_shared(const Ctx& c, uint32_t idx) {
    const FmLayerParams& L = *c.L;
    const FmRankParams& R = *c.R;
    constexpr uint64_t es = sizeof(typename D::T);
    const uint32_t H = L.hidden, SW = L.shared_width, g1 = H / kTileN, sg0 = SW / kTileN;
    const uint32_t first_g1 = c.token_row_blocks() * sg0;
    const bool gemm0 = idx < first_g1;
    const uint32_t j = gemm0 ? idx : idx - first_g1, per = gemm0 ? sg0 : g1;
    const uint32_t rb = j / per, nt = j % per;
    const uint32_t valid = min_u32(kTileM, R.tokens - rb * kTileM);
    char* sact = c.scratch() + L.ws_shared_act + uint64_t(rb) * kTileM * L.ws_shared_act_stride_row;
    const Clamp clamp{L.mlp_alpha, L.mlp_limit, L.mlp_up_offset};
    TileArgs t;
    t.a_rows = valid;
    t.gather = nullptr;
    t.out_rows = valid;
    t.bias0 = nullptr;
    t.bias1 = nullptr;
    bool ok = true;
    if (gemm0) {
        t.a = reinterpret_cast<const char*>(R.x) + uint64_t(rb) * kTileM * H * es;
        t.a_stride = H * es;
        const char* w0 = reinterpret_cast<const char*>(R.shared_w0);
        t.b0 = w0 + uint64_t(nt) * kTileN * H * es;
        t.b1 = w0 + (uint64_t(SW) + nt * kTileN) * H * es;
        t.b_stride = H * es;
        t.k = H;
        t.out = sact + uint64_t(nt) * kTileN * es;
        t.out_stride = L.ws_shared_act_stride_row;
        if (c.gated()) {
            run_tile<D, kEpiActGated>(t, c.smem, L.mlp, clamp);
        } else {
            run_tile<D, kEpiActPlain>(t, c.smem, L.mlp, clamp);
        }
        ok = shared_gemm0_finished(c);
    } else {
        t.a = sact;
        t.a_stride = L.ws_shared_act_stride_row;
        t.b0 = reinterpret_cast<const char*>(R.shared_w1) + uint64_t(nt) * kTileN * SW * es;
        t.b1 = nullptr;
        t.b_stride = SW * es;
        t.k = SW;
        t.out = c.scratch() + L.ws_shared_out + uint64_t(rb) * kTileM * L.ws_shared_out_stride_row +
                uint64_t(nt) * kTileN * 4;
        t.out_stride = L.ws_shared_out_stride_row;
        run_tile<D, kEpiStoreF32>(t, c.smem, L.mlp, clamp);
        if (threadIdx.x == 0) {
            __threadfence();
            atom_add_acq_rel(c.sync() + 3, 1);
        }
    }
    return block_bcast(c, threadIdx.x == 0 ? ok : true);
}

// Runs one task (block-wide) and its completion step. Returns false on error (block-uniform).
template <class D>
__device__ bool run_task(const Ctx& c, uint32_t task) {
    const uint32_t kind = task >> 30, idx = task & kTaskIndexMask;
    switch (kind) {
        case kTaskG0:
            return run_gemm0<D>(c, idx);
        case kTaskG1:
            return run_gemm1<D>(c, idx);
        case kTaskShared:
            return run_shared<D>(c, idx);
        default:
            return run_reduce<D>(c, idx);
    }
}

enum TakeState : uint32_t { kTakeTask = 1, kTakeDone = 2, kTakeStop = 3 };

// Thread 0 takes the next ticket (the one its last tile took ahead, if any) and waits for its
// entry or for the end of the queue; the outcome goes to Misc (task, state). A ticket taken
// ahead changes nothing in the protocol: tickets are still taken in order, and the wait for
// an entry still happens only while the block holds no task (the tile that took it has
// finished), so the deadlock argument at the top of this file holds as is.
__device__ FM_PHASE void take_task(const Ctx& c) {
    Misc* const m = block_misc();  // c.misc, at a constant address: no pointer kept live
    // Review fix: wait_until() looks at the abort flag only while its probe fails, so a rank
    // that had already failed kept running every task whose entry was ready (GEMMs, remote
    // stores, combine signals of a dead epoch) before it noticed. One relaxed load per task.
    if (aborted(c)) {
        m->task = 0;
        m->state = kTakeStop;
        return;
    }
    const uint64_t cap = c.L->ws_queue_capacity;
    const uint32_t ahead = m->ticket;
    m->ticket = kNoTicket;
    const uint32_t ticket = ahead != kNoTicket ? ahead : atomicAdd(c.queue_ctl() + 1, 1u);
    // The ticket taken ahead is the one whose step 0 the last tile may have issued.
    if constexpr (kEarlyStageBuild) {
        m->staged = ahead != kNoTicket && m->staged_ticket == ahead ? 1u : 0u;
        m->phase[kPhaseStaged] += m->staged;
        m->staged_ticket = kNoTicket;
        m->peek = kNoPeek;  // set again only by a decode, prefill or wide tile of this task
    }
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
    m->task = task;
    m->state = ok ? state : kTakeStop;
}

// Takes tickets and runs tasks until the published total says the queue is exhausted.
// Returns false on error (block-uniform).
template <class D>
__device__ FM_PHASE bool process_tasks(const Ctx& c) {
    Misc* const m = block_misc();  // c.misc, at a constant address: no pointer kept live
    while (true) {
        if (threadIdx.x == 0) {
            take_task(c);
            phase_lap(c, kPhaseIdle);
        }
        __syncthreads();
        const uint32_t task = m->task, state = m->state;
        __syncthreads();
        if (state == kTakeDone) return true;
        if (state != kTakeTask) return false;
        if (!run_task<D>(c, task)) return false;
        phase_task_done(c);
    }
}

}  // namespace fm

#endif  // FLASHMOE_TASK_QUEUE_CUH
