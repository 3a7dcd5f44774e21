// The arguments of a routed GEMM task's tile, from its task index alone: the task that runs
// it (task_queue.cuh run_gemm0 / run_gemm1) and the tile before it that starts its first
// stage early (next_stage.cuh) build them with the same code, so both load the same rows.
#ifndef FLASHMOE_ROUTED_ARGS_CUH
#define FLASHMOE_ROUTED_ARGS_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"
#include "flashmoe/reduce.cuh"
#include "flashmoe/tile_rule.cuh"

namespace fm {

// A routed task's place: (source, local expert, row block) of `unit`, and its pairs: the
// block's, or those of the block and the next for a wide task (tile_rule.cuh task_rows).
struct Unit {
    uint32_t s, l, p0, rows;  // source, local expert, first pair, valid rows (<= 128)
};

template <class D>
__device__ __forceinline__ Unit unit_of(const Ctx& c, uint32_t unit) {
    const FmLayerParams& L = *c.L;
    const uint32_t rb = unit % c.row_blocks(), sl = unit / c.row_blocks();
    Unit u;
    u.s = sl / L.max_local;
    u.l = sl % L.max_local;
    u.p0 = c.pair_base()[u.s * L.max_local + u.l] + rb * kTileM;
    // Only row blocks that start a task are pushed (push_gemm0_tasks), so rows != 0.
    u.rows = task_rows<D::kCode>(L, recv_meta(c, u.s).counts[u.l], rb);
    return u;
}

// This thread's pair-list entry of the task, if it has one, names no row source s sent
// (its A row would be read from outside them). check_pairs reports it; the early first
// stage of a task with such an entry is not started.
__device__ __forceinline__ bool pair_out_of_range(const Ctx& c, const Unit& u, const uint32_t* pairs,
                                                  uint32_t& q) {
    if (uint32_t(threadIdx.x) >= u.rows) return false;
    q = pairs[threadIdx.x];
    return q >= dispatch_rows(c, u.s);
}

// The pair list of a GEMM0 task's unit (its A rows, gathered).
__device__ __forceinline__ const uint32_t* unit_pairs(const Ctx& c, const Unit& u) {
    return recv_meta(c, u.s).pairs + u.p0;
}

// GEMM0 tile `nt` of unit u: A rows gathered through the pair list from s's dispatch rows,
// written to act[s][pair].
template <class D>
__device__ __forceinline__ TileArgs gemm0_args(const Ctx& c, const Unit& u, uint32_t nt) {
    const FmLayerParams& L = *c.L;
    constexpr uint64_t es = sizeof(typename D::T);
    const uint32_t H = L.hidden, I = L.intermediate;
    TileArgs t;
    t.a = c.heap + heap_row(L, L.heap_dispatch_rows, kCellRecv, u.s, 0);
    t.a_stride = L.heap_stride_row;
    t.a_rows = u.rows;
    t.gather = unit_pairs(c, u);
    const char* w0 = reinterpret_cast<const char*>(c.R->w0) + u.l * (uint64_t(c.gemm0_width()) * H * es);
    t.b0 = w0 + uint64_t(nt) * kTileN * H * es;
    t.b1 = w0 + (uint64_t(I) + nt * kTileN) * H * es;
    t.b_stride = H * es;
    t.k = H;
    t.out = c.scratch() + L.ws_act + u.s * L.ws_act_stride_source + uint64_t(u.p0) * L.ws_act_stride_row +
            uint64_t(nt) * kTileN * es;
    t.out_stride = L.ws_act_stride_row;
    t.out_rows = u.rows;
    t.bias0 = nullptr;
    t.bias1 = nullptr;
    if (c.R->b0 != 0) {
        const float* b0 = reinterpret_cast<const float*>(c.R->b0) + uint64_t(u.l) * c.gemm0_width();
        t.bias0 = b0 + nt * kTileN;
        t.bias1 = c.gated() ? b0 + I + nt * kTileN : nullptr;
    }
    return t;
}

// GEMM1 tile `nt` of unit u: act[s][pair] x w1 (+ b1) rounded into y[s][pair].
template <class D>
__device__ __forceinline__ TileArgs gemm1_args(const Ctx& c, const Unit& u, uint32_t nt) {
    const FmLayerParams& L = *c.L;
    constexpr uint64_t es = sizeof(typename D::T);
    const uint32_t H = L.hidden, I = L.intermediate;
    TileArgs t;
    t.a = c.scratch() + L.ws_act + u.s * L.ws_act_stride_source + uint64_t(u.p0) * L.ws_act_stride_row;
    t.a_stride = L.ws_act_stride_row;
    t.a_rows = u.rows;
    t.gather = nullptr;
    t.b0 = reinterpret_cast<const char*>(c.R->w1) + u.l * (uint64_t(H) * I * es) +
           uint64_t(nt) * kTileN * I * es;
    t.b1 = nullptr;
    t.b_stride = I * es;
    t.k = I;
    t.out = c.scratch() + L.ws_y + u.s * L.ws_y_stride_source + uint64_t(u.p0) * L.ws_y_stride_row +
            uint64_t(nt) * kTileN * es;
    t.out_stride = L.ws_y_stride_row;
    t.out_rows = u.rows;
    t.bias0 = c.R->b1 != 0 ? reinterpret_cast<const float*>(c.R->b1) + uint64_t(u.l) * H + nt * kTileN
                           : nullptr;
    t.bias1 = nullptr;
    return t;
}

}  // namespace fm

#endif  // FLASHMOE_ROUTED_ARGS_CUH
