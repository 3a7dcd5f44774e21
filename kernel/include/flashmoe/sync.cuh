// Memory-ordering primitives and the rank-group barrier.
//
// Ordering rules used throughout the kernel:
// - Data that another RANK reads (dispatch rows, expert outputs) is published by the writing
//   threads' block reaching a __syncthreads, one thread issuing __threadfence_system() and
//   then a st.release.sys of the signal word (or an atomic that a later signaller acquires).
//   The reader polls with ld.acquire.sys and then __syncthreads before touching the data.
//   When every heap is on this GPU (peer_scope == FM_SCOPE_GPU: single and emulated worlds)
//   the same chains use gpu scope (fence_peers, ld_acquire_peers, st_release_peers).
// - Data read only on this GPU by this rank's blocks (activations, queue entries, counters)
//   uses the same pattern at gpu scope.
#ifndef FLASHMOE_SYNC_CUH
#define FLASHMOE_SYNC_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint64_t ld_acquire_gpu(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.gpu.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ uint32_t ld_acquire_gpu(const uint32_t* p) {
    uint32_t v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release_sys(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_release_gpu(uint64_t* p, uint64_t v) {
    asm volatile("st.release.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void st_relaxed_gpu(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.gpu.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ---- peer scope (FmLayerParams::peer_scope) ----
// Fences, acquires and releases that order data toward peers' heaps. In a single or emulated
// world every heap is on this GPU (the host sets FM_SCOPE_GPU): gpu scope orders them and
// avoids MEMBAR.SC.SYS. NVSHMEM peers may be other GPUs: system scope. The NVSHMEM build
// always uses system scope (its peers are never known to be local).
__device__ __forceinline__ bool peers_on_gpu(const Ctx& c) {
#ifdef FM_NVSHMEM
    (void)c;
    return false;
#else
    return c.L->peer_scope == FM_SCOPE_GPU;
#endif
}

__device__ __forceinline__ void fence_peers(const Ctx& c) {
    if (peers_on_gpu(c)) {
        __threadfence();
    } else {
        __threadfence_system();
    }
}

__device__ __forceinline__ uint64_t ld_acquire_peers(const Ctx& c, const uint64_t* p) {
    return peers_on_gpu(c) ? ld_acquire_gpu(p) : ld_acquire_sys(p);
}

__device__ __forceinline__ void st_release_peers(const Ctx& c, uint64_t* p, uint64_t v) {
    if (peers_on_gpu(c)) {
        st_release_gpu(p, v);
    } else {
        st_release_sys(p, v);
    }
}

// Atomic add with acquire-release semantics at gpu scope; returns the old value.
__device__ __forceinline__ uint32_t atom_add_acq_rel(uint32_t* p, uint32_t v) {
    uint32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;"
                 : "=r"(old)
                 : "l"(p), "r"(v)
                 : "memory");
    return old;
}

// Broadcasts thread 0's `v` to the whole block (contains two __syncthreads).
__device__ __forceinline__ bool block_bcast(const Ctx& c, bool v) {
    __syncthreads();
    if (threadIdx.x == 0) c.misc->flag = v ? 1 : 0;
    __syncthreads();
    const bool r = c.misc->flag != 0;
    __syncthreads();
    return r;
}

// Barrier of the blocks of one rank group (never across ranks: real GPUs could not).
//
// sync[0] counts arrivals, sync[1] is the generation. A block reads the generation BEFORE
// arriving (it cannot advance until this block arrives), arrives, and the last arriver
// resets the count and bumps the generation. Cannot deadlock: every block of the group is
// resident (cooperative launch) and reaches the same barrier sequence unless the group
// aborts, in which case the waiters see the abort flag and leave. Returns false on abort
// or deadline (block-uniform).
__device__ __forceinline__ bool rank_barrier(const Ctx& c, uint32_t index, uint32_t stage) {
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) {
        uint32_t* count = c.sync();
        uint32_t* gen = c.sync() + 1;
        const uint32_t g = ld_acquire_gpu(gen);
        // Publishes every write of this block (made visible to thread 0 by __syncthreads),
        // including stores into peers' heaps, at the peers' scope before the arrival.
        fence_peers(c);
        const uint32_t arrived = atom_add_acq_rel(count, 1);
        if (arrived == c.nblk - 1) {
            atomicExch(count, 0u);
            __threadfence();
            atom_add_acq_rel(gen, 1);
        } else {
            ok = wait_until(
                c, [&](uint64_t& seen) {
                    const uint32_t v = ld_acquire_gpu(gen);
                    seen = v;
                    return v != g;
                },
                stage, 0x2000000ull | index, uint64_t(g) + 1, kWaitConsequence);
        }
        // A block that passes the barrier after another block of the group failed leaves too.
        ok = ok && !aborted(c);
    }
    return block_bcast(c, ok);
}

}  // namespace fm

#endif  // FLASHMOE_SYNC_CUH
