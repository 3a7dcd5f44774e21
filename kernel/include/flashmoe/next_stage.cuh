// Early first stage: once a routed tile ends, the block issues step 0 of its next task
// before the tile's completion step (gemm0_finished, the GEMM1 count), so the next tile's
// pipeline fill overlaps that step, the next take and the next task's set-up instead of
// following them (issue 12: "the pipeline of the next tile starts before the epilogue of
// the current one where the design allows"). The tile's own epilogue is not overlapped:
// issuing from inside it kept the task loop's context live across the tile and spilled.
//
// When. The block took its next ticket ahead (prefetch_ticket, ticket.cuh), the ticket's
// entry was already published when a decode, prefill or wide tile's K loop ended (peek_next,
// ticket.cuh), the mode allows it (FM_TILES_AUTO, FM_TILES_NARROW; not
// FM_TILES_AUTO_SERIAL, the A/B switch, nor classic), and that task is a routed GEMM0 or
// GEMM1 task whose tile is decode, prefill or wide (every routed bf16/f16 tile outside
// classic mode). Anything else: no early stage, and the next tile fills its pipeline as
// before. At decode the tasks are short weight streams (a qwen3-30b-a3b GEMM0 tile reads
// 512 KB), so one exposed load latency per task is a visible share of each.
//
// Why it is safe.
//  - Its inputs are ready: an entry is published only once its inputs are complete
//    (scheduler.cuh), and thread 0's acquire of the entry, then the block barriers before
//    the loads, order them before every thread's copies, as in take_task.
//  - It is the task the block runs next: take_task runs the ticket taken ahead first, and
//    marks the task staged only if that ticket is the staged one (Misc::staged_ticket).
//  - The same copies: the task's arguments come from routed_args.cuh, as when it runs, and
//    its tile shape from the same tile_for of the same rows; the tile skips only its own
//    step 0 (cp_async_pipeline's staged), whose group is the oldest pending.
//  - The arena is free: every tile ends with a barrier after its last use of it, and
//    step 0 fills stage buffer 0 only; the next tile issues its other stages itself.
//  - Nothing issues or waits on cp.async between the two tiles (the completion steps,
//    take_task and the phase laps use none); a block that leaves the task loop waits for
//    the group (layer.cuh, after process_tasks).
//  - A GEMM0 task whose pair list names a row outside what its source sent is not staged
//    (its loads could leave the dispatch rows): it then runs as usual, and check_pairs
//    reports it.
#ifndef FLASHMOE_NEXT_STAGE_CUH
#define FLASHMOE_NEXT_STAGE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm_decode.cuh"
#include "flashmoe/gemm_prefill.cuh"
#include "flashmoe/routed_args.cuh"
#include "flashmoe/scheduler.cuh"
#include "flashmoe/ticket.cuh"
#include "flashmoe/tile_rule.cuh"

namespace fm {

// Step 0 of routed tile t (rows from its task) if its tile is decode, prefill or wide.
// Returns whether it issued it. Block-uniform.
template <class D>
__device__ __forceinline__ bool stage_tile(const Ctx& c, const TileArgs& t, bool gated) {
    const TileChoice tc = tile_for<D::kCode>(*c.L, t.a_rows);
    if (tc.kind == kTileDecode) {
        decode_stage0<D>(t, tc.tokens, c.smem, gated);
        return true;
    }
    if (tc.kind == kTilePrefill) {
        prefill_stage0<D, kTileM>(t, c.smem, gated);
        return true;
    }
    if (tc.kind == kTileWide) {
        prefill_stage0<D, 2 * kTileM>(t, c.smem, gated);
        return true;
    }
    return false;
}

// Every thread, after a routed tile (its last barrier passed): issues step 0 of the peeked
// task when it is stageable (top of this file), and records its ticket for take_task.
// Misc::peek is written by thread 0 before the tile's last barriers and by take_task
// before the task loop's barrier, so every thread reads the same value here.
template <class D>
__device__ __forceinline__ void stage_next(const Ctx& c) {
    if constexpr (!D::kTensorCore || !kEarlyStageBuild) return;  // f32: no prefill tile
    Misc* const m = block_misc();
    const uint32_t task = m->peek;
    const uint32_t kind = task >> 30, idx = task & kTaskIndexMask;
    if (task == kNoPeek || (kind != kTaskG0 && kind != kTaskG1)) return;
    const FmLayerParams& L = *c.L;
    const bool g0 = kind == kTaskG0;
    const uint32_t tiles = g0 ? L.intermediate / kTileN : L.hidden / kTileN;
    const Unit u = unit_of<D>(c, idx / tiles);
    if (g0) {
        uint32_t q = 0;
        if (__syncthreads_or(pair_out_of_range(c, u, unit_pairs(c, u), q))) return;
    }
    const TileArgs t = g0 ? gemm0_args<D>(c, u, idx % tiles) : gemm1_args<D>(c, u, idx % tiles);
    if (stage_tile<D>(c, t, g0 && c.gated()) && threadIdx.x == 0) m->staged_ticket = m->ticket;
}

}  // namespace fm

#endif  // FLASHMOE_NEXT_STAGE_CUH
