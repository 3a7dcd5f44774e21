// Gate: router logits (GEMM tiles over all blocks), scores, top-k (one warp per token),
// weights, and the per-chunk expert and rank histograms.
//
// Tokens are split in chunks of FM_GATE_CHUNK (64); a block routes one chunk at a time, each
// warp 8 of its tokens. Slots are NOT taken here: gate_scan() turns the chunk histograms
// into exclusive prefix sums in chunk order, and dispatch_chunk() assigns expert slots and
// rank slots in token order from them. Counting is order-independent, so slots are
// deterministic (no atomics decide an order).
#ifndef FLASHMOE_GATE_CUH
#define FLASHMOE_GATE_CUH

#include <math.h>

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"
#include "flashmoe/watchdog.cuh"

namespace fm {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// (key, id) ordering of top-k: larger key first, ties to the lower id.
__device__ __forceinline__ bool better(float key, uint32_t id, float best, uint32_t best_id) {
    return key > best || (key == best && id < best_id);
}

// Warp-wide maximum of (key, id) pairs under `better`: every lane ends with the winner.
__device__ __forceinline__ void warp_best(float& best, uint32_t& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const uint32_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ob, oi, best, bi)) {
            best = ob;
            bi = oi;
        }
    }
}

// Router logits of the rank's tokens as GEMM tiles spread over every block of the group:
// tile i (token row block i / E_tiles, expert column tile i % E_tiles) goes to block
// i % nblk. logits[t][e] = x_t . router_e in f32 (tensor cores for a bf16/f16 router; FFMA
// in k order 0 .. hidden-1 for an f32 router, the layer's dtype widened on load); the host
// pads the router weights with zero rows to a multiple of 64 experts (params.h), so the
// padded logit columns hold 0. logit_bias is added by
// the top-k (gate_chunk). Block-wide.
template <class D>
__device__ FM_PHASE void router_tiles(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    constexpr uint64_t es = sizeof(typename D::T);
    const uint32_t E = L.experts, tokens = c.R->tokens;
    const uint32_t etiles = (E + kTileN - 1) / kTileN, tiles = c.token_row_blocks() * etiles;
    const bool w_f32 = L.router_f32 != 0;
    const uint64_t row_bytes = uint64_t(L.hidden) * es;
    const uint64_t w_row_bytes = uint64_t(L.hidden) * (w_f32 ? 4 : es);
    for (uint32_t i = c.blk; i < tiles; i += c.nblk) {
        const uint32_t rb = i / etiles, n = i % etiles;
        TileArgs t;
        t.a = reinterpret_cast<const char*>(c.R->x) + uint64_t(rb) * kTileM * row_bytes;
        t.a_stride = row_bytes;
        t.a_rows = min_u32(kTileM, tokens - rb * kTileM);
        t.gather = nullptr;
        t.b0 = reinterpret_cast<const char*>(L.router_weight) + uint64_t(n) * kTileN * w_row_bytes;
        t.b1 = nullptr;
        t.b_stride = w_row_bytes;
        t.k = L.hidden;
        t.out = c.scratch() + L.ws_logits + uint64_t(rb) * kTileM * L.ws_logits_stride_row +
                uint64_t(n) * kTileN * 4;
        t.out_stride = L.ws_logits_stride_row;
        t.out_rows = t.a_rows;
        t.bias0 = nullptr;
        t.bias1 = nullptr;
        if constexpr (D::kCode != FM_DTYPE_F32) {
            if (w_f32) {
                run_tile<Dt<FM_DTYPE_F32>, kEpiStoreF32, D>(t, c.smem, 0, Clamp{});
                continue;
            }
        }
        run_tile<D, kEpiStoreF32>(t, c.smem, 0, Clamp{});
    }
}

// Group-limited selection (n_group > 1): a mask of the groups kept, bit g for group g.
// Lane g scores group g (softmax: its largest logit, which orders groups as its largest
// probability does; sigmoid-bias: the sum of its two largest biased scores), then the
// topk_group best groups are taken one by one (ties to the lower group). All groups are
// kept without a limit. Warp-wide; s holds the logits (softmax) or sigmoid scores.
__device__ __forceinline__ uint32_t kept_groups(const Ctx& c, const float* s, bool sig,
                                                const float* rbias) {
    const FmLayerParams& L = *c.L;
    const uint32_t G = L.n_group;
    if (G <= 1) return 0xFFFFFFFFu;
    const int lane = threadIdx.x % 32;
    const uint32_t gsize = L.experts / G;
    float score = -INFINITY;
    if (uint32_t(lane) < G) {
        float a = -INFINITY, b = -INFINITY;  // the two largest keys of the group
        for (uint32_t e = lane * gsize; e < (lane + 1) * gsize; ++e) {
            float key = s[e] + ((sig && rbias) ? rbias[e] : 0.f);
            if (key != key) key = -INFINITY;
            if (key > a) {
                b = a;
                a = key;
            } else if (key > b) {
                b = key;
            }
        }
        score = sig ? (gsize > 1 ? a + b : a) : a;
    }
    uint32_t kept = 0;
    for (uint32_t j = 0; j < L.topk_group; ++j) {
        float best = (uint32_t(lane) < G && !((kept >> lane) & 1u)) ? score : -INFINITY;
        uint32_t bi = (uint32_t(lane) < G && !((kept >> lane) & 1u)) ? uint32_t(lane) : 32u;
        warp_best(best, bi);
        if (bi < 32) kept |= 1u << bi;
    }
    return kept;
}

// PhiMoE's sparsemixer on one token's logits s[E] (warp-wide, k = 2): choice j is the
// largest logit m left (ties to the lower id), weighted by 1 / sum of exp(s_e - m) over
// the experts left with (m - s_e) / max(|s_e|, m) <= 2 eps. Returns this lane's choice.
__device__ __forceinline__ void sparse_mixer(const Ctx& c, const float* s, int32_t& my_id,
                                             float& my_w) {
    const FmLayerParams& L = *c.L;
    const int lane = threadIdx.x % 32;
    const uint32_t E = L.experts;
    const float eps2 = 2.f * L.router_eps;
    uint32_t first = E;
    my_id = -1;
    my_w = 0.f;
    for (uint32_t j = 0; j < c.k; ++j) {
        float best = -INFINITY;
        uint32_t bi = E;
        for (uint32_t e = lane; e < E; e += 32) {
            if (e == first) continue;
            float key = s[e];
            if (key != key) key = -INFINITY;
            if (better(key, e, best, bi)) {
                best = key;
                bi = e;
            }
        }
        warp_best(best, bi);
        float z = 0.f;
        for (uint32_t e = lane; e < E; e += 32) {
            if (e == first) continue;
            if ((best - s[e]) / fmaxf(fabsf(s[e]), best) <= eps2) z += expf(s[e] - best);
        }
        z = warp_sum(z);
        if (uint32_t(lane) == j) {
            my_id = int32_t(bi);
            my_w = L.routed_scale / z;
        }
        first = bi;
    }
}

// Scores, top-k and weights of one token from its logits s[E] (warp-wide; s is modified).
// Returns this lane's choice (lane < k): id and weight.
__device__ __forceinline__ void select_topk(const Ctx& c, float* s, int32_t& my_id, float& my_w) {
    const FmLayerParams& L = *c.L;
    const int lane = threadIdx.x % 32;
    const uint32_t E = L.experts;
    // Biased-score routers: scores f(logit), + router_bias for the choice only, weights
    // the chosen scores (sigmoid: DeepSeek-V3; sqrt(softplus): DeepSeek-V4).
    const bool sqsp = L.router == FM_ROUTER_SQRTSOFTPLUS_BIAS;
    const bool sig = L.router == FM_ROUTER_SIGMOID_BIAS || sqsp;
    // Llama-4: the keys are the logits themselves; the weight is their sigmoid.
    const bool sig_in = L.router == FM_ROUTER_SIGMOID_INPUT;
    // gpt-oss: keys are the logits + router_bias; weights the softmax over the k chosen.
    const bool tks = L.router == FM_ROUTER_TOPK_SOFTMAX;
    const float* rbias = reinterpret_cast<const float*>(L.router_bias);
    float m = -INFINITY, z = 0.f;
    if (sqsp) {
        // softplus without overflow: max(l, 0) + log1p(exp(-|l|)).
        for (uint32_t e = lane; e < E; e += 32)
            s[e] = sqrtf(fmaxf(s[e], 0.f) + log1pf(expf(-fabsf(s[e]))));
    } else if (sig) {
        for (uint32_t e = lane; e < E; e += 32) s[e] = 1.f / (1.f + expf(-s[e]));
    } else if (tks) {
        for (uint32_t e = lane; e < E; e += 32) s[e] += rbias ? rbias[e] : 0.f;
    } else if (!sig_in) {
        for (uint32_t e = lane; e < E; e += 32) m = fmaxf(m, s[e]);
        m = warp_max(m);
        for (uint32_t e = lane; e < E; e += 32) z += expf(s[e] - m);
        z = warp_sum(z);
    }
    __syncwarp();
    const uint32_t kept = kept_groups(c, s, sig, rbias);
    const uint32_t gsize = L.n_group > 1 ? E / L.n_group : E;
    uint32_t chosen = 0;  // bit q: expert lane + 32 q already chosen
    my_id = -1;
    float my_v = 0.f;
    for (uint32_t j = 0; j < c.k; ++j) {
        float best = -INFINITY;
        uint32_t bi = E;
        uint32_t q = 0;
        for (uint32_t e = lane; e < E; e += 32, ++q) {
            if ((chosen >> q) & 1u) continue;
            float key = s[e] + ((sig && rbias) ? rbias[e] : 0.f);
            if (key != key) key = -INFINITY;  // a NaN score ranks last
            // Experts of groups not kept rank last (transformers 5: -inf for the sigmoid
            // router, probability 0 for softmax, which is -inf as a logit).
            if (!((kept >> (e / gsize)) & 1u)) key = -INFINITY;
            if (better(key, e, best, bi)) {
                best = key;
                bi = e;
            }
        }
        warp_best(best, bi);
        // bi < E always: k <= E, and unchosen experts with key -inf still win ties over E.
        if (uint32_t(lane) == bi % 32) chosen |= 1u << (bi / 32);
        if (uint32_t(lane) == j) {
            my_id = int32_t(bi);
            my_v = (sig || tks) ? s[bi] : (sig_in ? 1.f / (1.f + expf(-s[bi])) : expf(s[bi] - m) / z);
        }
    }
    if (tks) {
        // Softmax over the k chosen logits; lane 0 holds the largest.
        const float top = __shfl_sync(0xffffffffu, my_v, 0);
        my_v = uint32_t(lane) < c.k ? expf(my_v - top) : 0.f;
        const float zk = warp_sum(my_v);
        my_w = my_v / zk * L.routed_scale;
        return;
    }
    const float tot = warp_sum(uint32_t(lane) < c.k ? my_v : 0.f);
    const bool renorm = L.renormalize != 0;
    // DeepSeek-V3 divides by the sum + 1e-20 (sigmoid scores can all underflow).
    my_w = (renorm ? my_v / (sig ? tot + 1e-20f : tot) : my_v) * L.routed_scale;
}

// DeepSeek-V4's hash layers: this lane's given id of token `t` (lanes < k) weighted by its
// sqrt(softplus) score over the k given (warp-wide). Returns false on an id out of range or
// repeated within the token (status written).
__device__ __forceinline__ bool hash_route(const Ctx& c, const float* lg, uint32_t t, int32_t& id,
                                           float& w) {
    const FmLayerParams& L = *c.L;
    const int lane = threadIdx.x % 32;
    const int32_t* gid = reinterpret_cast<const int32_t*>(c.R->given_ids);
    const uint64_t at = uint64_t(t) * L.top_k + lane;
    id = uint32_t(lane) < c.k ? gid[at] : -1;
    bool dup = false;
    for (uint32_t j = 0; j < c.k; ++j) {
        const int32_t other = __shfl_sync(0xffffffffu, id, j);
        dup |= j < uint32_t(lane) && other == id;
    }
    const bool bad = uint32_t(lane) < c.k && (uint32_t(id) >= L.experts || dup);
    if (bad) fail(c, FM_STATUS_BAD_ROUTING, FM_STAGE_GATE, at, L.experts, uint32_t(id), 0);
    float v = 0.f;
    if (uint32_t(lane) < c.k && !bad) {
        const float l = lg[id];
        v = sqrtf(fmaxf(l, 0.f) + log1pf(expf(-fabsf(l))));
    }
    const float tot = warp_sum(v);
    w = v / (tot + 1e-20f) * L.routed_scale;
    if (bad) id = -1;
    return !__any_sync(0xffffffffu, bad);
}

// Counts one token in the rank histogram `rhist` (shared memory): once per distinct owner
// rank of its choices (lanes < k hold the ids, -1 elsewhere or when invalid). Warp-wide.
__device__ __forceinline__ void count_token_ranks(const Ctx& c, int32_t id, uint32_t* rhist) {
    const int lane = threadIdx.x % 32;
    const bool valid = uint32_t(id) < c.L->experts;
    const uint32_t r = valid ? (__ldg(c.owners() + id) >> 16) : 0xFFFFFFFFu;
    // The first lane of each group of equal ranks counts the token for that rank.
    const uint32_t same = __match_any_sync(0xffffffffu, r);
    if (valid && r < c.L->world && __ffs(same) - 1 == lane) atomicAdd(&rhist[r], 1u);
}

// Routes the tokens of one chunk: route_ids / route_weights and the chunk's rows of
// gate_hist and rank_hist. Returns false if the caller's routing is invalid (status already written).
template <class D>
__device__ FM_PHASE bool gate_chunk(const Ctx& c, uint32_t chunk) {
    const FmLayerParams& L = *c.L;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t E = L.experts, k = c.k;
    uint32_t* hist = reinterpret_cast<uint32_t*>(c.smem);
    uint32_t* rhist = hist + kMaxExperts;
    constexpr int kHistBytes = 4 * int(kMaxExperts + kMaxWorld);
    constexpr int kWarpFloats = (kArenaBytes<D> - kHistBytes) / 4 / kWarps;
    static_assert(kWarpFloats >= int(kMaxExperts), "a warp must hold one token's logits");
    float* lg = reinterpret_cast<float*>(c.smem + kHistBytes) + warp * kWarpFloats;

    for (uint32_t e = threadIdx.x; e < E; e += kThreads) hist[e] = 0;
    for (uint32_t r = threadIdx.x; r < L.world; r += kThreads) rhist[r] = 0;
    __syncthreads();
    const uint32_t tokens = c.R->tokens;
    const uint32_t t_begin = chunk * kGateChunk + warp * 8;
    const uint32_t t_end = min_u32(t_begin + 8, tokens);
    int32_t* ids = c.route_ids();
    float* wts = c.route_weights();
    bool ok = true;
    if (L.router == FM_ROUTER_GIVEN) {
        const int32_t* gid = reinterpret_cast<const int32_t*>(c.R->given_ids);
        const float* gw = reinterpret_cast<const float*>(c.R->given_weights);
        for (uint32_t t = t_begin; t < t_end; ++t) {
            int32_t id = -1;
            float w = 0.f;
            const uint64_t at = uint64_t(t) * L.top_k + lane;
            if (uint32_t(lane) < k) {
                id = gid[at];
                w = gw[at];
            }
            bool dup = false;
            for (uint32_t j = 0; j < k; ++j) {
                const int32_t other = __shfl_sync(0xffffffffu, id, j);
                dup |= j < uint32_t(lane) && other == id;
            }
            if (uint32_t(lane) < k) {
                if (uint32_t(id) >= E || dup) {
                    fail(c, FM_STATUS_BAD_ROUTING, FM_STAGE_GATE, at, E, uint32_t(id), 0);
                    ok = false;
                } else if (!isfinite(w)) {
                    fail(c, FM_STATUS_BAD_ROUTING, FM_STAGE_GATE, at, E, __float_as_uint(w), 0);
                    ok = false;
                } else {
                    ids[uint64_t(t) * k + lane] = id;
                    wts[uint64_t(t) * k + lane] = w;
                    atomicAdd(&hist[id], 1u);
                }
            }
            const bool good = uint32_t(lane) < k && uint32_t(id) < E && !dup && isfinite(w);
            count_token_ranks(c, good ? id : -1, rhist);
        }
    } else {
        // One token at a time per warp: its logits row (router_tiles) + logit_bias into the
        // warp's scratch, then the router's selection.
        const float* logits = reinterpret_cast<const float*>(c.scratch() + L.ws_logits);
        const uint64_t lstride = L.ws_logits_stride_row / 4;
        const float* lb = reinterpret_cast<const float*>(L.logit_bias);
        for (uint32_t t = t_begin; t < t_end; ++t) {
            for (uint32_t e = lane; e < E; e += 32) lg[e] = logits[t * lstride + e] + (lb ? lb[e] : 0.f);
            __syncwarp();
            int32_t id;
            float w;
            if (L.router == FM_ROUTER_HASH_SQRTSOFTPLUS) {
                if (!hash_route(c, lg, t, id, w)) {
                    ok = false;
                    continue;
                }
            } else if (L.router == FM_ROUTER_SPARSEMIXER) {
                sparse_mixer(c, lg, id, w);
            } else {
                select_topk(c, lg, id, w);
            }
            if (uint32_t(lane) < k) {
                ids[uint64_t(t) * k + lane] = id;
                wts[uint64_t(t) * k + lane] = w;
                atomicAdd(&hist[id], 1u);
            }
            count_token_ranks(c, uint32_t(lane) < k ? id : -1, rhist);
            __syncwarp();
        }
    }
    __syncthreads();
    uint32_t* row = c.gate_hist() + uint64_t(chunk) * E;
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) row[e] = hist[e];
    uint32_t* rrow = c.rank_hist() + uint64_t(chunk) * L.world;
    for (uint32_t r = threadIdx.x; r < L.world; r += kThreads) rrow[r] = rhist[r];
    __syncthreads();
    return ok;
}

// Exclusive prefix over chunks of column `col` of a [chunks][cols] histogram (in place);
// returns the column's total. Warp-wide.
__device__ __forceinline__ uint32_t scan_column(uint32_t* hist, uint32_t cols, uint32_t col,
                                                uint32_t chunks) {
    const int lane = threadIdx.x % 32;
    uint32_t run = 0;
    for (uint32_t base = 0; base < chunks; base += 32) {
        const uint32_t ci = base + lane;
        const uint32_t v = ci < chunks ? hist[uint64_t(ci) * cols + col] : 0u;
        uint32_t incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (ci < chunks) hist[uint64_t(ci) * cols + col] = run + incl - v;
        run += __shfl_sync(0xffffffffu, incl, 31);
    }
    return run;
}

// Exclusive prefix over chunks of every expert's and every rank's histogram (in place), the
// totals into expert_counts and rank_counts. One warp per column across the rank's blocks:
// columns 0 .. experts-1 are experts, then the world ranks.
__device__ FM_PHASE void gate_scan(const Ctx& c) {
    const uint32_t E = c.L->experts, W = c.L->world, chunks = c.gate_chunks();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (uint32_t col = c.blk * kWarps + warp; col < E + W; col += c.nblk * kWarps) {
        if (col < E) {
            const uint32_t n = scan_column(c.gate_hist(), E, col, chunks);
            if (lane == 0) c.expert_counts()[col] = n;
        } else {
            const uint32_t n = scan_column(c.rank_hist(), W, col - E, chunks);
            if (lane == 0) c.rank_counts()[col - E] = n;
        }
    }
}

}  // namespace fm

#endif  // FLASHMOE_GATE_CUH
