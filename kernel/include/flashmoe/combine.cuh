// Combine: wait for the expert outputs of this rank's tokens, then
// out[t] = sum_j w_j * y_j (choice order) + g * S(x_t), stored in the dtype.
#ifndef FLASHMOE_COMBINE_CUH
#define FLASHMOE_COMBINE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gate.cuh"
#include "flashmoe/sync.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

// Every block waits for every expert's combine signal (owners answer every (source, expert)
// pair, also with 0 rows) and for this rank's shared-expert tiles. The waits depend only on
// other ranks' expert tasks and this rank's own tasks, which never wait on combine.
// One thread per block polls, one signal after the other: all of them must arrive anyway, so
// this costs no latency, and blocks that finished their tasks early do not flood the L2 with
// polls while the others still compute. Returns false on error (block-uniform).
__device__ FM_PHASE bool combine_wait(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    bool ok = true;
    if (threadIdx.x == 0) {
        const uint32_t* owners = c.owners();
        const uint32_t* counts = c.expert_counts();
        for (uint32_t e = 0; e < L.experts && ok; ++e) {
            const uint32_t o = __ldg(owners + e);
            const uint32_t q = o >> 16, l = o & 0xFFFFu;
            const uint32_t expected = min_u32(counts[e], L.capacity);
            const uint64_t* word = combine_signal(L, c.heap, q, l);
            uint64_t got = 0;
            ok = wait_until(
                c, [&](uint64_t& seen) {
                    seen = ld_acquire_sys(word);
                    got = seen;
                    return signal_is(seen, c.n);
                },
                FM_STAGE_COMBINE, (uint64_t(q) << 16) | l, c.n << 32, kWaitCause);
            if (ok && uint32_t(got) != expected) {
                fail(c, FM_STATUS_BAD_SIGNAL, FM_STAGE_COMBINE, (uint64_t(q) << 16) | l, expected,
                     uint32_t(got), 0);
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

// One warp per token over the group's blocks.
template <class D>
__device__ FM_PHASE void combine_tokens(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    const FmRankParams& R = *c.R;
    constexpr int V = kVec<D>;
    static_assert(V % 4 == 0, "the shared-expert term is read as float4");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t k = c.k;
    const uint64_t row_bytes = uint64_t(L.hidden) * sizeof(typename D::T);
    const uint32_t nvec = L.hidden / V;
    const bool shared = L.shared_width != 0;
    const uint32_t* owners = c.owners();
    const char* so_base = c.ws + L.ws_shared_out;
    for (uint32_t t = c.blk * kWarps + warp; t < R.tokens; t += c.nblk * kWarps) {
        uint64_t off = ~0ull;
        float w = 0.f;
        if (uint32_t(lane) < k) {
            const uint64_t p = uint64_t(t) * k + lane;
            const int32_t slot = c.route_slots()[p];
            // An input-scaled router (Llama-4) sums the outputs with weight 1.
            w = L.router == FM_ROUTER_SIGMOID_INPUT ? 1.f : c.route_weights()[p];
            if (slot >= 0) {
                const uint32_t o = __ldg(owners + c.route_ids()[p]);
                off = heap_row(L, o >> 16, kStageCombine, kCellRecv, o & 0xFFFFu, uint32_t(slot));
            }
        }
        uint64_t offs[kMaxTopK];
        float ws[kMaxTopK];
#pragma unroll
        for (uint32_t j = 0; j < kMaxTopK; ++j) {
            offs[j] = __shfl_sync(0xffffffffu, off, j);
            ws[j] = __shfl_sync(0xffffffffu, w, j);
        }
        float g = 1.f;
        const char* xt = reinterpret_cast<const char*>(R.x) + t * row_bytes;
        if (shared && L.shared_gated) {
            const char* sg = reinterpret_cast<const char*>(R.shared_gate);
            float d = 0.f;
            for (uint32_t v = lane; v < nvec; v += 32) {
                float a[V], b[V];
                load_vec<D>(xt + uint64_t(v) * 16, a);
                load_vec<D>(sg + uint64_t(v) * 16, b);
#pragma unroll
                for (int i = 0; i < V; ++i) d = fmaf(a[i], b[i], d);
            }
            d = warp_sum(d);
            g = 1.f / (1.f + expf(-d));
        }
        const float* so = reinterpret_cast<const float*>(so_base + t * L.ws_shared_out_stride_row);
        char* out = reinterpret_cast<char*>(R.out) + t * row_bytes;
        for (uint32_t v = lane; v < nvec; v += 32) {
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll
            for (uint32_t j = 0; j < kMaxTopK; ++j) {
                if (j < k && offs[j] != ~0ull) {
                    float y[V];
                    load_vec<D>(c.heap + offs[j] + uint64_t(v) * 16, y);
#pragma unroll
                    for (int i = 0; i < V; ++i) acc[i] = fmaf(ws[j], y[i], acc[i]);
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
