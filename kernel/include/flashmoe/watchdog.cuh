// Deadlines, the status words and the rank-local abort flag.
//
// Every wait in the kernel polls through wait_until(): it gives up when the rank's abort
// flag is set (another block already reported an error) or when timeout_ns of %globaltimer
// have passed since the wait began; then it writes the status (first error wins, by
// atomicCAS on the code word), sets the abort flag and returns false. The caller returns
// to the kernel's exit path. No __trap: every reachable failure is reported and the launch
// completes.
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
template <class Probe>
__device__ __forceinline__ bool wait_until(const Ctx& c, Probe probe, uint32_t stage,
                                           uint64_t where, uint64_t expected) {
    const uint64_t start = now_ns();
    uint64_t seen = 0;
    for (uint32_t spin = 0;; ++spin) {
        if (probe(seen)) return true;
        if ((spin & 7u) == 7u) {
            if (aborted(c)) return false;
            const uint64_t waited = now_ns() - start;
            if (waited > c.L->timeout_ns) {
                fail(c, FM_STATUS_TIMEOUT, stage, where, expected, seen, waited);
                return false;
            }
        }
        __nanosleep(64);
    }
}

}  // namespace fm

#endif  // FLASHMOE_WATCHDOG_CUH
