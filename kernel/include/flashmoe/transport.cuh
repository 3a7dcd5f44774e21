// Peer-to-peer transport: addresses in the symmetric heaps and signal stores.
//
// Every peer heap is reached through the rank's peers table (u64 [world]). In the Single and
// Emulated worlds every entry is a heap on this GPU; with NVSHMEM P2P it is nvshmem_ptr().
// The plain kernel (flashmoe.cu) requires every entry to be non-zero (checked at setup).
//
// The NVSHMEM build (flashmoe_nvshmem.cu defines FM_NVSHMEM) also accepts 0 entries (peers
// only reachable by RDMA): rows for such a peer are written into this rank's SEND cell at the
// same (peer, stage, local, slot) position, and deliver() ships the contiguous rows with one
// nvshmem_putmem_signal_nbi whose signal is the same epoch-tagged word. All heap offsets are
// identical on every rank (symmetric heap), so an offset names the same place everywhere.
#ifndef FLASHMOE_TRANSPORT_CUH
#define FLASHMOE_TRANSPORT_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/sync.cuh"

#ifdef FM_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace fm {

constexpr uint32_t kStageDispatch = 0;
constexpr uint32_t kStageCombine = 1;
constexpr uint32_t kCellRecv = 0;
constexpr uint32_t kCellSend = 1;

__device__ __forceinline__ char* peer_heap(const Ctx& c, uint32_t q) {
    return reinterpret_cast<char*>(__ldg(c.peers + q));
}

// Byte offset of row `slot` of (peer, stage, cell, local expert): HeapLayout::row.
__device__ __forceinline__ uint64_t heap_row(const FmLayerParams& L, uint32_t peer, uint32_t stage,
                                             uint32_t cell, uint32_t local, uint32_t slot) {
    return peer * L.heap_stride_peer + stage * L.heap_stride_stage + cell * L.heap_stride_cell +
           local * L.heap_stride_expert + uint64_t(slot) * L.heap_stride_row;
}

// Dispatch signal from `source` for local expert `local`, on the owner's heap.
__device__ __forceinline__ uint64_t* dispatch_signal(const FmLayerParams& L, char* owner_heap,
                                                     uint32_t source, uint32_t local) {
    return reinterpret_cast<uint64_t*>(owner_heap + L.heap_dispatch_signals +
                                       8ull * (uint64_t(source) * L.max_local + local));
}

// Combine signal from `owner` for its local expert `local`, on the source's heap.
__device__ __forceinline__ uint64_t* combine_signal(const FmLayerParams& L, char* source_heap,
                                                    uint32_t owner, uint32_t local) {
    return reinterpret_cast<uint64_t*>(source_heap + L.heap_combine_signals +
                                       8ull * (uint64_t(owner) * L.max_local + local));
}

__device__ __forceinline__ uint64_t signal_word(uint64_t epoch, uint32_t rows) {
    return (epoch << 32) | rows;
}

__device__ __forceinline__ bool signal_is(uint64_t word, uint64_t epoch) {
    return (word >> 32) == (epoch & 0xFFFFFFFFull);
}

// Publishes a signal: everything this thread has observed (its block's writes, made visible
// by a preceding __syncthreads, and what it acquired) is ordered before the word at system
// scope, so a peer that acquires the word sees the data.
__device__ __forceinline__ void send_signal(uint64_t* word, uint64_t epoch, uint32_t rows) {
    __threadfence_system();
    st_release_sys(word, signal_word(epoch, rows));
}

// Offset of the dispatch signal from `source` for local expert `local` (on the owner's heap).
__device__ __forceinline__ uint64_t dispatch_signal_off(const FmLayerParams& L, uint32_t source,
                                                       uint32_t local) {
    return L.heap_dispatch_signals + 8ull * (uint64_t(source) * L.max_local + local);
}

// Offset of the combine signal from `owner` for its local expert `local` (on the source's heap).
__device__ __forceinline__ uint64_t combine_signal_off(const FmLayerParams& L, uint32_t owner,
                                                      uint32_t local) {
    return L.heap_combine_signals + 8ull * (uint64_t(owner) * L.max_local + local);
}

// Where rows bound for row(me, stage, RECV, local, slot) on peer q are written: straight into
// q's heap, or (RDMA peer, NVSHMEM build only) into row(q, stage, SEND, local, slot) here.
__device__ __forceinline__ char* row_target(const Ctx& c, uint32_t q, uint32_t stage,
                                            uint32_t local, uint32_t slot) {
    char* p = peer_heap(c, q);
#ifdef FM_NVSHMEM
    if (p == nullptr) return c.heap + heap_row(*c.L, q, stage, kCellSend, local, slot);
#endif
    return p + heap_row(*c.L, c.me, stage, kCellRecv, local, slot);
}

// Publishes the `rows` first rows of (me -> q, stage, local) and the signal at `sig_off` on
// q's heap: `(epoch << 32) | rows`. Direct peers already hold the rows (row_target): only
// the release signal is stored. RDMA peers get one put-with-signal of the staged rows (or a
// bare signal for 0 rows). The caller guarantees every row write happened before (block
// barrier plus fences or an acquire chain).
__device__ __forceinline__ void deliver(const Ctx& c, uint32_t q, uint32_t stage, uint32_t local,
                                        uint32_t rows, uint64_t sig_off) {
    char* p = peer_heap(c, q);
#ifdef FM_NVSHMEM
    if (p == nullptr) {
        const FmLayerParams& L = *c.L;
        uint64_t* sig = reinterpret_cast<uint64_t*>(c.heap + sig_off);
        const uint64_t value = signal_word(c.n, rows);
        __threadfence_system();  // staged rows visible to the copy engine / NIC
        if (rows != 0) {
            nvshmem_putmem_signal_nbi(c.heap + heap_row(L, c.me, stage, kCellRecv, local, 0),
                                      c.heap + heap_row(L, q, stage, kCellSend, local, 0),
                                      uint64_t(rows) * L.heap_stride_row, sig, value,
                                      NVSHMEM_SIGNAL_SET, int(q));
        } else {
            nvshmemx_signal_op(sig, value, NVSHMEM_SIGNAL_SET, int(q));
        }
        return;
    }
#endif
    (void)stage;
    (void)local;
    send_signal(reinterpret_cast<uint64_t*>(p + sig_off), c.n, rows);
}

// Completes this thread's outstanding puts (NVSHMEM build) before the launch ends: the send
// cells are rewritten by the next launch.
__device__ __forceinline__ void transport_quiet() {
#ifdef FM_NVSHMEM
    nvshmem_quiet();
#endif
}

// One warp copies `bytes` (a multiple of 16) from src to dst with 16-byte vectors.
// A row of `bytes` (a multiple of 16) times `scale`, rounded to the dtype, warp-wide
// (Llama-4's input-scaled routing: the expert is fed x * weight).
template <class D>
__device__ __forceinline__ void warp_copy_scaled(char* dst, const char* src, uint64_t bytes,
                                                 float scale, int lane) {
    for (uint64_t i = lane; i < bytes / 16; i += 32) {
        float v[kVec<D>];
        load_vec<D>(src + i * 16, v);
#pragma unroll
        for (int j = 0; j < kVec<D>; ++j) v[j] *= scale;
        store_vec<D>(dst + i * 16, v);
    }
}

__device__ __forceinline__ void warp_copy(char* dst, const char* src, uint64_t bytes, int lane) {
    const uint64_t nvec = bytes / 16;
    uint64_t i = lane;
    // Four independent 16-byte loads in flight per lane before the first store.
    for (; i + 96 < nvec; i += 128) {
        const uint4 a = __ldg(reinterpret_cast<const uint4*>(src) + i);
        const uint4 b = __ldg(reinterpret_cast<const uint4*>(src) + i + 32);
        const uint4 d = __ldg(reinterpret_cast<const uint4*>(src) + i + 64);
        const uint4 e = __ldg(reinterpret_cast<const uint4*>(src) + i + 96);
        reinterpret_cast<uint4*>(dst)[i] = a;
        reinterpret_cast<uint4*>(dst)[i + 32] = b;
        reinterpret_cast<uint4*>(dst)[i + 64] = d;
        reinterpret_cast<uint4*>(dst)[i + 96] = e;
    }
    for (; i < nvec; i += 32) {
        reinterpret_cast<uint4*>(dst)[i] = __ldg(reinterpret_cast<const uint4*>(src) + i);
    }
}

}  // namespace fm

#endif  // FLASHMOE_TRANSPORT_CUH
