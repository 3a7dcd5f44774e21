// Reduce (host/plan.rs, protocol step 5): on the owner, once every GEMM1 tile of source s is
// done, each row q that s sent becomes sum_i w_i * y[s][p_i] over its row_meta entries, in
// entry order, f32 from 0 (weight 1 when the router scales the input), rounded to the dtype,
// stored into s's combine row q at peer index = this rank.
#ifndef FLASHMOE_REDUCE_CUH
#define FLASHMOE_REDUCE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/transport.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

// Rows source s sent this rank: its dispatch signal, already acquired by the scheduler
// before it pushed the task (or the counter chain) that brought us here.
__device__ __forceinline__ uint32_t dispatch_rows(const Ctx& c, uint32_t s) {
    return uint32_t(*reinterpret_cast<volatile uint64_t*>(c.heap + dispatch_signal_off(*c.L, s)));
}

// Pairs source s sent this rank: the end of its last local expert's pairs (the scheduler
// validated the counts and wrote the bases before any task of s).
__device__ __forceinline__ uint32_t source_pairs(const Ctx& c, uint32_t s) {
    const uint32_t local = c.R->local_experts;
    if (local == 0) return 0;
    return c.pair_base()[s * c.L->max_local + local - 1] + recv_meta(c, s).counts[local - 1];
}

// One reduce tile: token rows trb * 64 .. of source s (those < rows), columns nt * 64 ..
// Thread i handles the 16-byte vector i % (64 / V) of row i / (64 / V). Returns false when a
// row_meta entry names a pair s did not send (status written; block-uniform).
template <class D>
__device__ FM_PHASE bool reduce_tile(const Ctx& c, uint32_t s, uint32_t trb, uint32_t nt, uint32_t rows) {
    const FmLayerParams& L = *c.L;
    constexpr int V = kVec<D>;
    constexpr int kPerRow = kTileN / V;
    constexpr uint64_t es = sizeof(typename D::T);
    const uint32_t pairs = source_pairs(c, s);
    const Meta m = recv_meta(c, s);
    const bool unit_weight = L.router == FM_ROUTER_SIGMOID_INPUT;
    const char* y = c.scratch() + L.ws_y + s * L.ws_y_stride_source + uint64_t(nt) * kTileN * es;
    bool bad = false;
    for (int i = threadIdx.x; i < kTileM * kPerRow; i += kThreads) {
        const uint32_t q = trb * kTileM + uint32_t(i / kPerRow);
        const uint32_t v = uint32_t(i % kPerRow);
        if (q >= rows) continue;
        float acc[V];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] = 0.f;
        const uint64_t* rm = m.row_meta + uint64_t(q) * L.route_slots;
        for (uint32_t j = 0; j < L.route_slots; ++j) {
            const uint64_t entry = rm[j];
            const uint32_t p = uint32_t(entry);
            if (p == kNoPair) break;
            if (p >= pairs) {
                fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_EXPERT, (uint64_t(s) << 16) | 0xFFFEu, pairs, p, 0);
                bad = true;
                break;
            }
            const float w = unit_weight ? 1.f : __uint_as_float(uint32_t(entry >> 32));
            float yv[V];
            load_vec<D>(y + uint64_t(p) * L.ws_y_stride_row + v * 16, yv);
#pragma unroll
            for (int e = 0; e < V; ++e) acc[e] = fmaf(w, yv[e], acc[e]);
        }
        store_vec<D>(combine_target(c, s, q) + uint64_t(nt) * kTileN * es + v * 16, acc);
    }
    return !__syncthreads_or(bad);
}

}  // namespace fm

#endif  // FLASHMOE_REDUCE_CUH
