// Combine (host/plan.rs, protocol step 6): wait for every owner's reduced rows of this
// rank's tokens, then out[t] = sum over the distinct owner ranks of t's choices, in
// ascending rank order, of the partial at combine_row(rank, rank slot), f32 from 0, then
// + g * S(x_t) (fmaf), rounded to the dtype.
#ifndef FLASHMOE_COMBINE_CUH
#define FLASHMOE_COMBINE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gate.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

// Every block waits for every owner's combine signal (owners answer every source, also
// with 0 rows) and for this rank's shared-expert tiles. The waits depend only on other
// ranks' tasks and this rank's own tasks, which never wait on combine.
// One thread per block polls, one signal after the other: all of them must arrive anyway, so
// this costs no latency, and blocks that finished their tasks early do not flood the L2 with
// polls while the others still compute. Returns false on error (block-uniform).
__device__ FM_PHASE bool combine_wait(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    bool ok = true;
    if (threadIdx.x == 0) {
        for (uint32_t r = 0; r < L.world && ok; ++r) {
            const uint32_t expected = c.rank_counts()[r];
            const uint64_t* word = reinterpret_cast<const uint64_t*>(c.heap + combine_signal_off(L, r));
            uint64_t got = 0;
            ok = wait_until(
                c, [&](uint64_t& seen) {
                    seen = ld_acquire_peers(c, word);
                    got = seen;
                    return signal_is(seen, c.n);
                },
                FM_STAGE_COMBINE, uint64_t(r) << 16, c.n << 32, kWaitCause);
            if (ok && uint32_t(got) != expected) {
                fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_COMBINE, uint64_t(r) << 16, expected, uint32_t(got), 0);
                ok = false;
            }
        }
        if (ok && L.shared_width != 0) {
            const uint32_t want = c.token_row_blocks() * (L.hidden / kTileN);
            const uint32_t* done = c.sync() + 3;
            ok = wait_until(
                c, [&](uint64_t& seen) {
                    const uint32_t v = ld_acquire_gpu(done);
                    seen = v;
                    return v == want;
                },
                FM_STAGE_COMBINE, 0xFFFFFFFFull, want, kWaitConsequence);
        }
    }
    // The barrier also orders thread 0's acquires before every thread's reads of the rows.
    return !__syncthreads_or(!ok);
}

// Offsets of token t's partials in ascending owner-rank order, ~0 past the last: lane j < k
// holds choice j; the first lane of each rank group is that rank's one partial, its place
// in the order is the number of other leading lanes with a lower rank. Warp-wide.
__device__ __forceinline__ void partials(const Ctx& c, uint32_t t, uint64_t (&offs)[kMaxTopK]) {
    const FmLayerParams& L = *c.L;
    const int lane = threadIdx.x % 32;
    const uint32_t k = c.k;
    uint32_t r = 0xFFFFFFFFu;
    uint64_t off = ~0ull;
    if (uint32_t(lane) < k) {
        const uint64_t p = uint64_t(t) * k + lane;
        r = __ldg(c.owners() + c.route_ids()[p]) >> 16;
        off = heap_row(L, L.heap_combine_rows, kCellRecv, r, uint32_t(c.route_rank_slots()[p]));
    }
    const uint32_t same = __match_any_sync(0xffffffffu, r);
    const bool lead = uint32_t(lane) < k && __ffs(same) - 1 == lane;
    const uint32_t leads = __ballot_sync(0xffffffffu, lead);
    uint32_t order = 0;
    for (uint32_t j = 0; j < k; ++j) {
        const uint32_t rj = __shfl_sync(0xffffffffu, r, j);
        order += ((leads >> j) & 1u) && rj < r;
    }
#pragma unroll
    for (uint32_t m = 0; m < kMaxTopK; ++m) {
        const uint32_t from = __ballot_sync(0xffffffffu, lead && order == m);
        const uint64_t o = __shfl_sync(0xffffffffu, off, from ? __ffs(from) - 1 : 0);
        offs[m] = from ? o : ~0ull;
    }
}

// sigmoid(x_t . shared_gate), or 1 without a gated shared expert. Warp-wide.
template <class D>
__device__ __forceinline__ float shared_gate(const Ctx& c, const char* xt) {
    const FmLayerParams& L = *c.L;
    constexpr int V = kVec<D>;
    if (L.shared_width == 0 || !L.shared_gated) return 1.f;
    const int lane = threadIdx.x % 32;
    const char* sg = reinterpret_cast<const char*>(c.R->shared_gate);
    float d = 0.f;
    for (uint32_t v = lane; v < L.hidden / V; v += 32) {
        float a[V], b[V];
        load_vec<D>(xt + uint64_t(v) * 16, a);
        load_vec<D>(sg + uint64_t(v) * 16, b);
#pragma unroll
        for (int i = 0; i < V; ++i) d = fmaf(a[i], b[i], d);
    }
    d = warp_sum(d);
    return 1.f / (1.f + expf(-d));
}

// One warp per token over the group's blocks.
template <class D>
__device__ FM_PHASE void combine_tokens(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const FmRankParams& R = *c.R;
    constexpr int V = kVec<D>;
    static_assert(V % 4 == 0, "the shared-expert term is read as float4");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint64_t row_bytes = uint64_t(L.hidden) * sizeof(typename D::T);
    const uint32_t nvec = L.hidden / V;
    const bool shared = L.shared_width != 0;
    const char* so_base = c.scratch() + L.ws_shared_out;
    for (uint32_t t = c.blk * kWarps + warp; t < R.tokens; t += c.nblk * kWarps) {
        uint64_t offs[kMaxTopK];
        partials(c, t, offs);
        const float g = shared_gate<D>(c, reinterpret_cast<const char*>(R.x) + t * row_bytes);
        const float* so = reinterpret_cast<const float*>(so_base + t * L.ws_shared_out_stride_row);
        char* out = reinterpret_cast<char*>(R.out) + t * row_bytes;
        for (uint32_t v = lane; v < nvec; v += 32) {
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll
            for (uint32_t m = 0; m < kMaxTopK; ++m) {
                if (offs[m] != ~0ull) {
                    float y[V];
                    load_vec<D>(c.heap + offs[m] + uint64_t(v) * 16, y);
#pragma unroll
                    for (int i = 0; i < V; ++i) acc[i] += y[i];
                }
            }
            if (shared) {
                // 16-byte aligned: rows are 4 * hidden bytes, hidden a multiple of 64.
                const float4* s4 = reinterpret_cast<const float4*>(so + uint64_t(v) * V);
#pragma unroll
                for (int q = 0; q < V / 4; ++q) {
                    const float4 f = s4[q];
                    acc[4 * q + 0] = fmaf(g, f.x, acc[4 * q + 0]);
                    acc[4 * q + 1] = fmaf(g, f.y, acc[4 * q + 1]);
                    acc[4 * q + 2] = fmaf(g, f.z, acc[4 * q + 2]);
                    acc[4 * q + 3] = fmaf(g, f.w, acc[4 * q + 3]);
                }
            }
            store_vec<D>(out + uint64_t(v) * 16, acc);
        }
    }
}

}  // namespace fm

#endif  // FLASHMOE_COMBINE_CUH
