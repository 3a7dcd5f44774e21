// Deadlines, the status words and the rank-local abort flag.
//
// Every wait in the kernel polls through wait_until(): it gives up when the rank's abort
// flag is set (another block already reported an error) or when its budget of %globaltimer
// nanoseconds has passed since the wait began; then it writes the status (first error wins,
// by atomicCAS on the code word), sets the abort flag and returns false. The caller returns
// to the kernel's exit path. No __trap: every reachable failure is reported and the launch
// completes.
//
// Budgets: a wait on a PEER's signal (dispatch, combine) is a possible cause and gets
// timeout_ns. A wait that can only be a consequence of another wait of the same rank (queue
// tickets wait for the scheduler, barriers for other blocks, the combine for the local
// shared-expert tiles) gets FM_CONSEQUENCE_WAIT_FACTOR x timeout_ns, so it is still waiting
// when the cause reports, sees the abort flag and leaves without overwriting the status
// (the first error of a rank wins). Host side: host/gpu/layer/status.rs.
#ifndef FLASHMOE_WATCHDOG_CUH
#define FLASHMOE_WATCHDOG_CUH

#include "flashmoe/common.cuh"

namespace fm {

__device__ __forceinline__ uint64_t now_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ bool aborted(const Ctx& c) {
    uint64_t v;
    asm volatile("ld.relaxed.gpu.global.u64 %0, [%1];"
                 : "=l"(v)
                 : "l"(c.status() + FM_STATUS_ABORT)
                 : "memory");
    return v != 0;
}

// Records an error (only the first one of the rank is kept) and raises the abort flag.
__device__ __noinline__ void fail(const Ctx& c, uint32_t code, uint32_t stage, uint64_t where,
                                  uint64_t expected, uint64_t observed, uint64_t waited) {
    unsigned long long* st = reinterpret_cast<unsigned long long*>(c.status());
    if (atomicCAS(st + FM_STATUS_CODE, 0ull, (unsigned long long)code) == 0ull) {
        volatile unsigned long long* v = st;
        v[FM_STATUS_STAGE] = stage;
        v[FM_STATUS_WHERE] = where;
        v[FM_STATUS_EXPECTED] = expected;
        v[FM_STATUS_OBSERVED] = observed;
        v[FM_STATUS_WAITED] = waited;
    }
    __threadfence_system();
    atomicExch(st + FM_STATUS_ABORT, 1ull);
}

// Polls `probe(seen)` until it returns true (-> true), the rank aborts (-> false) or the
// deadline passes (-> false after reporting FM_STATUS_TIMEOUT with the last `seen`).
// Called by single threads; the caller makes the outcome block-uniform.
enum WaitKind : uint32_t { kWaitCause = 1, kWaitConsequence = FM_CONSEQUENCE_WAIT_FACTOR };
static_assert(FM_CONSEQUENCE_WAIT_FACTOR >= 2,
              "a consequence must outlast its cause's deadline by a whole timeout, so that the "
              "cause's report and abort flag are seen first despite polling granularity");

template <class Probe>
__device__ __forceinline__ bool wait_until(const Ctx& c, Probe probe, uint32_t stage,
                                           uint64_t where, uint64_t expected, WaitKind kind) {
    const uint64_t budget = c.L->timeout_ns * uint64_t(kind);
    const uint64_t start = now_ns();
    uint64_t seen = 0;
    for (uint32_t spin = 0;; ++spin) {
        if (probe(seen)) return true;
        if ((spin & 7u) == 7u) {
            if (aborted(c)) return false;
            const uint64_t waited = now_ns() - start;
            if (waited > budget) {
                fail(c, FM_STATUS_TIMEOUT, stage, where, expected, seen, waited);
                return false;
            }
        }
        __nanosleep(64);
    }
}

}  // namespace fm

#endif  // FLASHMOE_WATCHDOG_CUH
