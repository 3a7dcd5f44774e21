// Peer-to-peer transport: addresses in the symmetric heaps and signal stores.
//
// Every peer heap is reached through the rank's peers table (u64 [world]). In the Single and
// Emulated worlds every entry is a heap on this GPU; with NVSHMEM P2P it is nvshmem_ptr().
// The plain kernel (flashmoe.cu) requires every entry to be non-zero (checked at setup).
//
// Heap (host/plan/heap.rs): dispatch rows [cell][source][slot], combine rows
// [cell][owner][slot], metadata [cell][source] {counts, pairs, row_meta}, one dispatch signal
// per source and one combine signal per owner. Cell RECV is where peers write, indexed by
// the writer. The NVSHMEM build (flashmoe_nvshmem.cu defines FM_NVSHMEM) also accepts 0
// entries (peers only reachable by RDMA): what is bound for such a peer is written into
// this rank's SEND cell, indexed by the DESTINATION, and deliver_*() ships it with puts
// whose last one carries the epoch-tagged signal. All heap offsets are identical on every
// rank (symmetric heap), so an offset names the same place everywhere.
#ifndef FLASHMOE_TRANSPORT_CUH
#define FLASHMOE_TRANSPORT_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/sync.cuh"

#ifdef FM_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace fm {

constexpr uint32_t kCellRecv = 0;
constexpr uint32_t kCellSend = 1;

__device__ __forceinline__ char* peer_heap(const Ctx& c, uint32_t q) {
    return reinterpret_cast<char*>(__ldg(c.peers + q));
}

// Offset of row `slot` of `peer` in `cell` of the row region at `region`
// (HeapLayout::dispatch_row / combine_row).
__device__ __forceinline__ uint64_t heap_row(const FmLayerParams& L, uint64_t region,
                                             uint32_t cell, uint32_t peer, uint32_t slot) {
    return region + cell * L.heap_stride_cell + peer * L.heap_stride_peer +
           uint64_t(slot) * L.heap_stride_row;
}

// Offset of `peer`'s metadata block in `cell` (HeapLayout::meta_block).
__device__ __forceinline__ uint64_t meta_block(const FmLayerParams& L, uint32_t cell, uint32_t peer) {
    return L.heap_meta + cell * L.heap_meta_stride_cell + peer * L.heap_meta_stride_peer;
}

// A received metadata block (cell RECV of this rank's heap, written by `source`).
struct Meta {
    const uint32_t* counts;   // [max_local]
    const uint32_t* pairs;    // [pair_capacity]
    const uint64_t* row_meta; // [tokens_max][route_slots]
};

__device__ __forceinline__ Meta recv_meta(const Ctx& c, uint32_t source) {
    const FmLayerParams& L = *c.L;
    const char* b = c.heap + meta_block(L, kCellRecv, source);
    return Meta{reinterpret_cast<const uint32_t*>(b + L.heap_meta_counts),
                reinterpret_cast<const uint32_t*>(b + L.heap_meta_pairs),
                reinterpret_cast<const uint64_t*>(b + L.heap_meta_rows)};
}

__device__ __forceinline__ uint64_t dispatch_signal_off(const FmLayerParams& L, uint32_t source) {
    return L.heap_dispatch_signals + 8ull * source;
}

__device__ __forceinline__ uint64_t combine_signal_off(const FmLayerParams& L, uint32_t owner) {
    return L.heap_combine_signals + 8ull * owner;
}

__device__ __forceinline__ uint64_t signal_word(uint64_t epoch, uint32_t rows) {
    return (epoch << 32) | rows;
}

__device__ __forceinline__ bool signal_is(uint64_t word, uint64_t epoch) {
    return (word >> 32) == (epoch & 0xFFFFFFFFull);
}

// Publishes a signal: everything this thread has observed (its block's writes, made visible
// by a preceding __syncthreads, and what it acquired) is ordered before the word at system
// scope of the peers (system, or gpu when every heap is on this GPU), so a peer that
// acquires the word sees the data.
__device__ __forceinline__ void send_signal(const Ctx& c, uint64_t* word, uint64_t epoch,
                                            uint32_t rows) {
    fence_peers(c);
    st_release_peers(c, word, signal_word(epoch, rows));
}

// Where something bound for `region_recv` (an offset naming this rank's place in q's RECV
// cell) is written: straight into q's heap, or (RDMA peer, NVSHMEM build only) at
// `region_send` (q's place in this rank's SEND cell).
__device__ __forceinline__ char* target(const Ctx& c, uint32_t q, uint64_t region_recv,
                                        uint64_t region_send) {
    char* p = peer_heap(c, q);
#ifdef FM_NVSHMEM
    if (p == nullptr) return c.heap + region_send;
#endif
    (void)region_send;
    return p + region_recv;
}

// Dispatch row `slot` bound for owner rank r.
__device__ __forceinline__ char* dispatch_target(const Ctx& c, uint32_t r, uint32_t slot) {
    const FmLayerParams& L = *c.L;
    return target(c, r, heap_row(L, L.heap_dispatch_rows, kCellRecv, c.me, slot),
                  heap_row(L, L.heap_dispatch_rows, kCellSend, r, slot));
}

// The metadata block bound for owner rank r.
__device__ __forceinline__ char* meta_target(const Ctx& c, uint32_t r) {
    const FmLayerParams& L = *c.L;
    return target(c, r, meta_block(L, kCellRecv, c.me), meta_block(L, kCellSend, r));
}

// Combine row `slot` bound for source rank s.
__device__ __forceinline__ char* combine_target(const Ctx& c, uint32_t s, uint32_t slot) {
    const FmLayerParams& L = *c.L;
    return target(c, s, heap_row(L, L.heap_combine_rows, kCellRecv, c.me, slot),
                  heap_row(L, L.heap_combine_rows, kCellSend, s, slot));
}

#ifdef FM_NVSHMEM
// One put of `bytes` from this heap at `src` to q's heap at `dst`, non-blocking.
__device__ __forceinline__ void put(const Ctx& c, uint32_t q, uint64_t dst, uint64_t src,
                                    uint64_t bytes) {
    if (bytes != 0) nvshmem_putmem_nbi(c.heap + dst, c.heap + src, bytes, int(q));
}
#endif

// Publishes the dispatch to owner r: `rows` token rows, the metadata, and the signal
// `(epoch << 32) | rows` at dispatch_signal(me) on r. Direct peers already hold rows and
// metadata: only the release signal is stored. RDMA peers get the staged rows, then the
// metadata block up to the last used row_meta entry (counts and the whole pair list
// included) with the signal; nvshmem_fence orders the two puts to the same peer, so the
// signal is seen after both. The caller guarantees every write happened before (rank
// barrier: system-scope fence of every block).
__device__ __forceinline__ void deliver_dispatch(const Ctx& c, uint32_t r, uint32_t rows) {
    const FmLayerParams& L = *c.L;
    char* p = peer_heap(c, r);
    const uint64_t sig_off = dispatch_signal_off(L, c.me);
#ifdef FM_NVSHMEM
    if (p == nullptr) {
        __threadfence_system();  // staged data visible to the copy engine / NIC
        put(c, r, heap_row(L, L.heap_dispatch_rows, kCellRecv, c.me, 0),
            heap_row(L, L.heap_dispatch_rows, kCellSend, r, 0), uint64_t(rows) * L.heap_stride_row);
        nvshmem_fence();
        const uint64_t meta_bytes = L.heap_meta_rows + uint64_t(rows) * L.route_slots * 8;
        nvshmem_putmem_signal_nbi(c.heap + meta_block(L, kCellRecv, c.me),
                                  c.heap + meta_block(L, kCellSend, r), meta_bytes,
                                  reinterpret_cast<uint64_t*>(c.heap + sig_off),
                                  signal_word(c.n, rows), NVSHMEM_SIGNAL_SET, int(r));
        return;
    }
#endif
    send_signal(c, reinterpret_cast<uint64_t*>(p + sig_off), c.n, rows);
}

// Publishes the reduced rows for source s: `rows` combine rows and the signal at
// combine_signal(me) on s (one put-with-signal of the staged rows for an RDMA peer, a bare
// signal for 0 rows). The caller orders every reduce tile's stores before (fences + the
// acq_rel counter).
__device__ __forceinline__ void deliver_combine(const Ctx& c, uint32_t s, uint32_t rows) {
    const FmLayerParams& L = *c.L;
    char* p = peer_heap(c, s);
    const uint64_t sig_off = combine_signal_off(L, c.me);
#ifdef FM_NVSHMEM
    if (p == nullptr) {
        uint64_t* sig = reinterpret_cast<uint64_t*>(c.heap + sig_off);
        const uint64_t value = signal_word(c.n, rows);
        __threadfence_system();
        if (rows != 0) {
            nvshmem_putmem_signal_nbi(c.heap + heap_row(L, L.heap_combine_rows, kCellRecv, c.me, 0),
                                      c.heap + heap_row(L, L.heap_combine_rows, kCellSend, s, 0),
                                      uint64_t(rows) * L.heap_stride_row, sig, value,
                                      NVSHMEM_SIGNAL_SET, int(s));
        } else {
            nvshmemx_signal_op(sig, value, NVSHMEM_SIGNAL_SET, int(s));
        }
        return;
    }
#endif
    send_signal(c, reinterpret_cast<uint64_t*>(p + sig_off), c.n, rows);
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
