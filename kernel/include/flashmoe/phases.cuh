// Phase times of one launch, per block (FmLayerParams::ws_phase_times, params.h): where the
// launch's time goes. Thread 0 of each block laps %globaltimer at phase boundaries into Misc
// (shared memory: no register stays live across the phases) and stores the 8 words at exit.
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
};
static_assert(FM_PHASE_WORDS == 8, "the record has the 8 words above");

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
