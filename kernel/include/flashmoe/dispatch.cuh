// Dispatch (host/plan.rs, protocol steps 1-3): expert slots and rank slots in token order,
// one row per (token, owner rank) and the pair metadata into the owners' heaps, then one
// signal per owner rank.
#ifndef FLASHMOE_DISPATCH_CUH
#define FLASHMOE_DISPATCH_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/transport.cuh"

namespace fm {

// Block-private scratch of the dispatch phase (the arena; no GEMM runs meanwhile).
struct DispatchScratch {
    uint32_t running[kMaxExperts];  // next expert slot of the chunk
    uint32_t base[kMaxExperts];     // first pair of each expert among this rank's pairs on its owner
    uint32_t rrun[kMaxWorld];       // next rank slot of the chunk
    uint32_t off[kMaxWorld];        // first position of each rank's experts in `val`
    uint32_t val[kMaxExperts];      // kept pairs by (owner rank, local expert), then their prefix
    int32_t ids[kGateChunk * kMaxTopK];
    int32_t slots[kGateChunk * kMaxTopK];   // expert slot, -1 dropped
    int32_t rslots[kGateChunk * kMaxTopK];  // rank slot
    uint32_t info[kGateChunk * kMaxTopK];   // kLead | entry index << 8 | kept choices on the rank
};
static_assert(sizeof(DispatchScratch) <= size_t(kArenaBytes<Dt<FM_DTYPE_F32>>),
              "dispatch scratch must fit the smallest arena");
constexpr uint32_t kLead = 1u << 31;  // first choice of its token on its owner rank

__device__ __forceinline__ DispatchScratch* dispatch_scratch(const Ctx& c) {
    return reinterpret_cast<DispatchScratch*>(c.smem);
}

// Exclusive prefix of a[0..n) in shared memory, in place, by warp 0 (32 values a step).
__device__ __forceinline__ void warp0_scan(uint32_t* a, uint32_t n) {
    const int lane = threadIdx.x % 32;
    if (threadIdx.x / 32 != 0) return;
    uint32_t run = 0;
    for (uint32_t b = 0; b < n; b += 32) {
        const uint32_t i = b + lane;
        const uint32_t v = i < n ? a[i] : 0u;
        uint32_t incl = v;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const uint32_t y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        if (i < n) a[i] = run + incl - v;
        run += __shfl_sync(0xffffffffu, incl, 31);
    }
}

// base[e] = sum of min(expert_counts[e'], capacity) over the experts e' of e's owner with a
// lower local index (pairs are ordered by local expert). The owner table places every
// rank's experts at local indices 0 .. n-1, so position off[r] + l enumerates the experts by
// (rank, local) without holes; one prefix over those positions gives every base. Block-wide.
__device__ FM_PHASE void pair_bases(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    DispatchScratch* d = dispatch_scratch(c);
    const uint32_t E = L.experts, W = L.world;
    const uint32_t* owners = c.owners();
    for (uint32_t r = threadIdx.x; r < W; r += kThreads) d->off[r] = 0;
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) d->val[e] = 0;
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) {
        const uint32_t r = __ldg(owners + e) >> 16;
        if (r < W) atomicAdd(&d->off[r], 1u);
    }
    __syncthreads();
    warp0_scan(d->off, W);
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) {
        const uint32_t o = __ldg(owners + e), r = o >> 16, pos = (r < W ? d->off[r] : E) + (o & 0xFFFFu);
        if (pos < E) d->val[pos] = min_u32(c.expert_counts()[e], L.capacity);
    }
    __syncthreads();
    warp0_scan(d->val, E);
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) {
        const uint32_t o = __ldg(owners + e), r = o >> 16;
        const uint32_t first = r < W ? d->off[r] : 0, pos = first + (o & 0xFFFFu);
        d->base[e] = pos < E ? d->val[pos] - d->val[first] : 0;
    }
    __syncthreads();
}

// Warp 0 walks the chunk's tokens in order (a token's experts are distinct, and so are the
// ranks of the lanes leading a rank group, so no two lanes collide on a counter): expert
// slot = running count per expert, rank slot = running count per owner rank, both in token
// order from the chunk's exclusive prefixes, exactly as the CPU executor.
__device__ __forceinline__ void assign_slots(const Ctx& c, uint32_t nt) {
    DispatchScratch* d = dispatch_scratch(c);
    const int lane = threadIdx.x % 32;
    const uint32_t k = c.k, cap = c.L->capacity;
    const uint32_t lt = (1u << lane) - 1;
    for (uint32_t t = 0; t < nt; ++t) {
        const bool valid = uint32_t(lane) < k;
        const uint32_t e = valid ? uint32_t(d->ids[t * k + lane]) : 0;
        const uint32_t r = valid ? (__ldg(c.owners() + e) >> 16) : 0xFFFFFFFFu;
        uint32_t slot = 0;
        if (valid) {
            slot = d->running[e];
            d->running[e] = slot + 1;
        }
        const bool kept = valid && slot < cap;
        const uint32_t same = __match_any_sync(0xffffffffu, r);
        const int lead_lane = __ffs(same) - 1;
        const bool lead = valid && lead_lane == lane;
        uint32_t rs = 0;
        if (lead) {
            rs = d->rrun[r];
            d->rrun[r] = rs + 1;
        }
        rs = __shfl_sync(0xffffffffu, rs, lead_lane);
        const uint32_t kept_mask = __ballot_sync(0xffffffffu, kept) & same;
        if (valid) {
            d->slots[t * k + lane] = kept ? int32_t(slot) : -1;
            d->rslots[t * k + lane] = int32_t(rs);
            d->info[t * k + lane] = (lead ? kLead : 0u) | (__popc(kept_mask & lt) << 8) |
                                    __popc(kept_mask);
        }
        __syncwarp();
    }
}

// Pair list and row_meta entries of one choice p of the chunk (token t0 + p / k): a kept
// choice is pair base + slot on its owner; the lead choice of a rank also ends the token's
// row_meta there with NO_PAIR entries.
__device__ __forceinline__ void write_meta(const Ctx& c, uint32_t t0, uint32_t p) {
    const FmLayerParams& L = *c.L;
    DispatchScratch* d = dispatch_scratch(c);
    const uint32_t e = uint32_t(d->ids[p]), r = __ldg(c.owners() + e) >> 16;
    const uint32_t info = d->info[p], rs = uint32_t(d->rslots[p]);
    char* m = meta_target(c, r);
    uint64_t* rm = reinterpret_cast<uint64_t*>(m + L.heap_meta_rows) + uint64_t(rs) * L.route_slots;
    const int32_t slot = d->slots[p];
    const uint32_t idx = (info >> 8) & 0xFFu;
    if (slot >= 0 && idx < L.route_slots) {
        const uint32_t pair = d->base[e] + uint32_t(slot);
        reinterpret_cast<uint32_t*>(m + L.heap_meta_pairs)[pair] = rs;
        const float w = c.route_weights()[uint64_t(t0) * c.k + p];
        rm[idx] = (uint64_t(__float_as_uint(w)) << 32) | pair;
    }
    if (info & kLead) {
        for (uint32_t i = info & 0xFFu; i < L.route_slots; ++i) rm[i] = kNoPair;
    }
}

// One chunk: slots, rank slots, metadata and rows. Nothing is signalled here: the caller
// fences and barriers first. Expects pair_bases() to have filled the scratch's bases.
template <class D>
__device__ FM_PHASE void dispatch_chunk(const Ctx& c, uint32_t chunk) {
    const FmLayerParams& L = *c.L;
    DispatchScratch* d = dispatch_scratch(c);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t E = L.experts, W = L.world, k = c.k;
    const uint32_t t0 = chunk * kGateChunk;
    const uint32_t nt = min_u32(kGateChunk, c.R->tokens - t0);
    const uint32_t np = nt * k;
    for (uint32_t e = threadIdx.x; e < E; e += kThreads) d->running[e] = c.gate_hist()[uint64_t(chunk) * E + e];
    for (uint32_t r = threadIdx.x; r < W; r += kThreads) d->rrun[r] = c.rank_hist()[uint64_t(chunk) * W + r];
    const int32_t* ids = c.route_ids() + uint64_t(t0) * k;
    for (uint32_t p = threadIdx.x; p < np; p += kThreads) d->ids[p] = ids[p];
    __syncthreads();
    if (warp == 0) assign_slots(c, nt);
    __syncthreads();
    int32_t* slots = c.route_slots() + uint64_t(t0) * k;
    int32_t* rslots = c.route_rank_slots() + uint64_t(t0) * k;
    for (uint32_t p = threadIdx.x; p < np; p += kThreads) {
        slots[p] = d->slots[p];
        rslots[p] = d->rslots[p];
        write_meta(c, t0, p);
    }
    const uint64_t row_bytes = L.heap_stride_row;
    const char* x = reinterpret_cast<const char*>(c.R->x);
    for (uint32_t p = warp; p < np; p += kWarps) {
        if (!(d->info[p] & kLead)) continue;
        const uint32_t r = __ldg(c.owners() + d->ids[p]) >> 16;
        char* dst = dispatch_target(c, r, uint32_t(d->rslots[p]));
        const char* src = x + uint64_t(t0 + p / k) * row_bytes;
        if (L.router == FM_ROUTER_SIGMOID_INPUT) {
            // top-1 (config): the row is scaled by its one weight.
            warp_copy_scaled<D>(dst, src, row_bytes, c.route_weights()[uint64_t(t0) * k + p], lane);
        } else {
            warp_copy(dst, src, row_bytes, lane);
        }
    }
    __syncthreads();
}

// The pair count of every expert for its owner's metadata (counts[l] of this rank's block),
// spread over the group's blocks. Before the barrier that precedes the signals.
__device__ FM_PHASE void dispatch_counts(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    for (uint32_t e = c.blk * kThreads + threadIdx.x; e < L.experts; e += c.nblk * kThreads) {
        const uint32_t o = __ldg(c.owners() + e), r = o >> 16, l = o & 0xFFFFu;
        if (r >= L.world || l >= L.max_local) continue;
        char* m = meta_target(c, r);
        reinterpret_cast<uint32_t*>(m + L.heap_meta_counts)[l] = min_u32(c.expert_counts()[e], L.capacity);
    }
}

// The dispatch phase of one block: counts, then its chunks.
template <class D>
__device__ __forceinline__ void dispatch_rank(const Ctx& c) {
    dispatch_counts(c);
    const uint32_t chunks = c.gate_chunks();
    if (c.blk >= chunks) return;
    pair_bases(c);
    for (uint32_t ch = c.blk; ch < chunks; ch += c.nblk) dispatch_chunk<D>(c, ch);
}

// Block 0 of the group, after the barrier that follows every write: one release signal per
// owner rank with the rows sent to it (also 0), and the dropped count of this launch.
__device__ FM_PHASE void send_dispatch_signals(const Ctx& c) {
    const FmLayerParams& L = *c.L;
    if (threadIdx.x == 0) c.misc->sum = 0;
    __syncthreads();
    const uint32_t* counts = c.expert_counts();
    unsigned long long dropped = 0;
    for (uint32_t e = threadIdx.x; e < L.experts; e += kThreads) {
        const uint32_t cnt = counts[e];
        dropped += cnt - min_u32(cnt, L.capacity);
    }
    if (!c.silent()) {
        for (uint32_t r = threadIdx.x; r < L.world; r += kThreads) {
            deliver_dispatch(c, r, c.rank_counts()[r]);
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
