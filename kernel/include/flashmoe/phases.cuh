// Phase times of one launch, per block (FmLayerParams::ws_phase_times, params.h): where the
// launch's time goes. Thread 0 of each block laps %globaltimer at phase boundaries into Misc
// (shared memory: no register stays live across the phases) and stores the 17 words at exit.
#ifndef FLASHMOE_PHASES_CUH
#define FLASHMOE_PHASES_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

// Words of a block's record (FM_PHASE_WORDS, mirrored by host/plan.rs PHASE_WORDS).
enum PhaseWord : int {
    kPhaseStart = 0,     // %globaltimer at entry
    kPhaseGate = 1,      // ns: router tiles, gate chunks, scans and their barriers
    kPhaseDispatch = 2,  // ns: dispatch, its barrier, signals, the scheduler's polling
    kPhaseTiles = 3,     // ns: running tasks (GEMM tiles, reduce tiles, their completions)
    kPhaseIdle = 4,      // ns: waiting for ticket entries (and the end of the queue)
    kPhaseCombine = 5,   // ns: combine waits and sums
    kPhaseTasks = 6,     // tasks run
    kPhaseEnd = 7,       // %globaltimer at exit
    kPhaseKindNs = 8,    // 8 + kind (TaskKind: GEMM0, GEMM1, shared, reduce): ns of kPhaseTiles
    kPhaseKindTasks = 12,  // 12 + kind: tasks of kPhaseTasks
    kPhaseStaged = 16,   // routed tasks taken with their step 0 in flight (next_stage.cuh)
};
static_assert(FM_PHASE_WORDS == 17, "the record has the 17 words above");

__device__ FM_PHASE void phase_start(const Ctx& c) {
    if (threadIdx.x != 0) return;
    const uint64_t t = now_ns();
    c.misc->mark = t;
#pragma unroll
    for (int i = 0; i < FM_PHASE_WORDS; ++i) c.misc->phase[i] = 0;
    c.misc->phase[kPhaseStart] = t;
}

// Adds the time since the last lap to `word` (thread 0 only; others return).
__device__ FM_PHASE void phase_lap(const Ctx& c, int word) {
    if (threadIdx.x != 0) return;
    const uint64_t t = now_ns();
    c.misc->phase[word] += t - c.misc->mark;
    c.misc->mark = t;
}

// The task in Misc::task (take_task's) has run: its time since the last lap goes to the
// expert tiles and to its kind (TaskKind, the task's top 2 bits), and it is counted (thread
// 0 only; others return). The kind is read back from Misc rather than kept live across the
// task: in the f32 build that register spilled.
__device__ FM_PHASE void phase_task_done(const Ctx& c) {
    if (threadIdx.x != 0) return;
    const uint32_t kind = c.misc->task >> 30;
    const uint64_t t = now_ns(), d = t - c.misc->mark;
    c.misc->phase[kPhaseTiles] += d;
    c.misc->phase[kPhaseKindNs + (kind & 3)] += d;
    ++c.misc->phase[kPhaseTasks];
    ++c.misc->phase[kPhaseKindTasks + (kind & 3)];
    c.misc->mark = t;
}

// Stores the block's record (blocks past FM_PHASE_MAX_BLOCKS keep none).
__device__ FM_PHASE void phase_store(const Ctx& c) {
    if (threadIdx.x != 0 || c.blk >= FM_PHASE_MAX_BLOCKS) return;
    c.misc->phase[kPhaseEnd] = now_ns();
    uint64_t* out = reinterpret_cast<uint64_t*>(c.ws + c.L->ws_phase_times) + uint64_t(c.blk) * FM_PHASE_WORDS;
#pragma unroll
    for (int i = 0; i < FM_PHASE_WORDS; ++i) out[i] = c.misc->phase[i];
}

}  // namespace fm

#endif  // FLASHMOE_PHASES_CUH
