// Dispatch: slots in token order, row copies into the owners' receive cells, and the one
// signal per (this rank, expert).
#ifndef FLASHMOE_DISPATCH_CUH
#define FLASHMOE_DISPATCH_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

// Slots of one chunk's pairs and the copies of its kept rows.
//
// gate_hist[chunk][e] holds, after gate_scan(), the number of pairs routed to e by the
// tokens of all earlier chunks: the first slot of this chunk. Warp 0 walks the chunk's
// tokens in order (a token's k experts are distinct, so its lanes never collide), which
// makes slot = running count in token order, exactly as the reference. Then every warp
// copies kept rows with 16-byte vectors into row(my rank, DISPATCH, RECV, local, slot) of
// the owner's heap. Nothing is signalled here: the caller fences and barriers first.
template <class D>
__device__ FM_PHASE void dispatch_chunk(const Ctx& c, uint32_t chunk) {
    const FmLayerParams& L = *c.L;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t E = L.experts, k = c.k, cap = L.capacity;
    uint32_t* running = reinterpret_cast<uint32_t*>(c.smem);
    int32_t* ids_s = reinterpret_cast<int32_t*>(c.smem + 4 * kMaxExperts);
    int32_t* slots_s = ids_s + kGateChunk * kMaxTopK;
    static_assert(4 * kMaxExperts + 2 * 4 * kGateChunk * kMaxTopK <= kArenaBytes<Dt<FM_DTYPE_F32>>,
                  "dispatch scratch must fit the smallest arena");

    const uint32_t t0 = chunk * kGateChunk;
    const uint32_t nt = min_u32(kGateChunk, c.R->tokens - t0);
    const uint32_t np = nt * k;
    const uint32_t* first = c.gate_hist() + uint64_t(chunk) * E;
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) running[e] = first[e];
    const int32_t* ids = c.route_ids() + uint64_t(t0) * k;
    for (uint32_t p = threadIdx.x; p < np; p += kThreads) ids_s[p] = ids[p];
    __syncthreads();
    if (warp == 0) {
        for (uint32_t t = 0; t < nt; ++t) {
            if (uint32_t(lane) < k) {
                const uint32_t e = uint32_t(ids_s[t * k + lane]);
                const uint32_t slot = running[e];
                running[e] = slot + 1;
                slots_s[t * k + lane] = slot < cap ? int32_t(slot) : -1;
            }
            __syncwarp();
        }
    }
    __syncthreads();
    int32_t* slots = c.route_slots() + uint64_t(t0) * k;
    for (uint32_t p = threadIdx.x; p < np; p += kThreads) slots[p] = slots_s[p];

    const uint64_t row_bytes = L.heap_stride_row;
    const char* x = reinterpret_cast<const char*>(c.R->x);
    const uint32_t* owners = c.owners();
    for (uint32_t p = warp; p < np; p += kWarps) {
        const int32_t slot = slots_s[p];
        if (slot < 0) continue;
        const uint32_t o = __ldg(owners + ids_s[p]);
        char* dst = row_target(c, o >> 16, kStageDispatch, o & 0xFFFFu, uint32_t(slot));
        const char* src = x + uint64_t(t0 + p / k) * row_bytes;
        if (L.router == FM_ROUTER_SIGMOID_INPUT) {
            warp_copy_scaled<D>(dst, src, row_bytes, c.route_weights()[uint64_t(t0) * k + p], lane);
        } else {
            warp_copy(dst, src, row_bytes, lane);
        }
    }
    __syncthreads();
}

// Block 0 of the group, after the barrier that follows every copy: one release signal per
// expert with the rows kept for it (also 0), and the dropped count of this launch.
__device__ FM_PHASE void send_dispatch_signals(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    if (threadIdx.x == 0) c.misc->sum = 0;
    __syncthreads();
    const uint32_t* counts = c.expert_counts();
    const uint32_t* owners = c.owners();
    unsigned long long dropped = 0;
    for (uint32_t e = threadIdx.x; e < L.experts; e += kThreads) {
        const uint32_t cnt = counts[e];
        const uint32_t rows = min_u32(cnt, L.capacity);
        dropped += cnt - rows;
        if (!c.silent()) {
            const uint32_t o = __ldg(owners + e);
            const uint32_t q = o >> 16, l = o & 0xFFFFu;
            deliver(c, q, kStageDispatch, l, rows, dispatch_signal_off(L, c.me, l));
        }
    }
    atomicAdd(&c.misc->sum, dropped);
    __syncthreads();
    if (threadIdx.x == 0) {
        *reinterpret_cast<unsigned long long*>(c.ws + L.ws_dropped) = c.misc->sum;
    }
    __syncthreads();
}

}  // namespace fm

#endif  // FLASHMOE_DISPATCH_CUH
