// Elementwise operations of the model driver between MoE layers (host/gpu/model.rs):
// the RMSNorm in front of a block and the residual add after it, with exactly the rounding
// points of the host driver (host/model/norm.rs, host/model/mod.rs).
//
//   norm:     out = round_T( w * round_T( x * r ) ),  r = 1 / sqrt( f32(sum(x^2) / hidden) + eps )
//             sum(x^2) of the f32 values accumulated in f64 (as the host does), the rest in
//             f32 with IEEE round-to-nearest (no FMA contraction): bit-exact with the host
//             except where the f64 sum's order changes the f32 mean (last-bit ties).
//   layer norm (PhiMoE, `bias` set): out = round_T( (x - mean) * r * w + b ),
//             r = 1 / sqrt( f32(var) + eps ), mean and var accumulated in f64 as the host
//             does (host/model/norm.rs), the rest in f32 without FMA contraction.
//   residual: state = round_T( state + y )
//
// The residual state ("S") is f32 (one buffer for layers of any dtype, holding values
// rounded to the last layer's dtype) or the layers' own dtype (engines). The plain C
// parameter structs are mirrored by host/gpu/model/ops.rs (layout pinned on both sides).
#ifndef FLASHMOE_MODEL_OPS_CUH
#define FLASHMOE_MODEL_OPS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#include "flashmoe/params.h"

// Threads of every model-op block (== MODEL_OP_THREADS in host/gpu/model/ops.rs).
#define FM_MODEL_OP_THREADS 256

// Per-launch parameters of the norm: one block per (row, rank), blockIdx.y = rank.
typedef struct FmNormParams {
    unsigned long long x[FM_MAX_LAUNCH_RANKS];    // state, S [rows][hidden]
    unsigned long long out[FM_MAX_LAUNCH_RANKS];  // normed, T [rows][hidden]
    unsigned int rows[FM_MAX_LAUNCH_RANKS];
    unsigned long long weight;                    // f32 [hidden]
    unsigned int hidden;
    float eps;
    unsigned long long bias;                      // f32 [hidden]: LayerNorm; 0: RMSNorm
} FmNormParams;

// Per-launch parameters of the residual add: blockIdx.y = rank, grid-stride over elements.
typedef struct FmResidualParams {
    unsigned long long state[FM_MAX_LAUNCH_RANKS];  // S [rows][hidden], updated in place
    unsigned long long y[FM_MAX_LAUNCH_RANKS];      // T [rows][hidden]
    unsigned int rows[FM_MAX_LAUNCH_RANKS];
    unsigned int hidden;
    unsigned int pad_;
} FmResidualParams;

static_assert(offsetof(FmNormParams, out) == 64, "FmNormParams layout (host/gpu/model/ops.rs)");
static_assert(offsetof(FmNormParams, rows) == 128, "FmNormParams layout");
static_assert(offsetof(FmNormParams, weight) == 160, "FmNormParams layout");
static_assert(offsetof(FmNormParams, hidden) == 168, "FmNormParams layout");
static_assert(offsetof(FmNormParams, eps) == 172, "FmNormParams layout");
static_assert(offsetof(FmNormParams, bias) == 176, "FmNormParams layout");
static_assert(sizeof(FmNormParams) == 184, "FmNormParams layout");
static_assert(offsetof(FmResidualParams, y) == 64, "FmResidualParams layout");
static_assert(offsetof(FmResidualParams, rows) == 128, "FmResidualParams layout");
static_assert(offsetof(FmResidualParams, hidden) == 160, "FmResidualParams layout");
static_assert(sizeof(FmResidualParams) == 168, "FmResidualParams layout");

namespace fm {
namespace model {

// ---- element access: load as f32, store with round-to-nearest-even ---------------------
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ld(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T st(float v);
template <> __device__ __forceinline__ float st<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 st<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half st<__half>(float v) { return __float2half_rn(v); }

// The value `v` takes once stored as T (host: Dtype::round).
template <typename T> __device__ __forceinline__ float round_to(float v) { return ld(st<T>(v)); }

// Four consecutive elements, moved as one 16-byte (f32) or 8-byte (16-bit) access.
template <typename T> struct alignas(4 * sizeof(T)) Vec4 { T v[4]; };

template <typename T> __device__ __forceinline__ bool aligned4(const void* p) {
    return (reinterpret_cast<uintptr_t>(p) % (4 * sizeof(T))) == 0;
}

// ---- block reduction of a double --------------------------------------------------------
__device__ __forceinline__ double block_sum(double v, double* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double total = 0.0;
    // Every thread adds the warp sums in the same order: all get the same value.
    for (int w = 0; w < FM_MODEL_OP_THREADS / 32; ++w) total += scratch[w];
    return total;
}

// ---- LayerNorm (PhiMoE): one block per row, two passes (mean, then variance) -------------
template <typename S, typename T>
__device__ __noinline__ void layer_norm(const FmNormParams& p, const S* x, T* out) {
    __shared__ double scratch[FM_MODEL_OP_THREADS / 32];
    const unsigned h = p.hidden;
    const float* w = reinterpret_cast<const float*>(p.weight);
    const float* b = reinterpret_cast<const float*>(p.bias);
    double s = 0.0;
    for (unsigned i = threadIdx.x; i < h; i += FM_MODEL_OP_THREADS) s += static_cast<double>(ld(x[i]));
    const double mean = __ddiv_rn(block_sum(s, scratch), static_cast<double>(h));
    __syncthreads();  // scratch is reused by the second reduction
    double v = 0.0;
    for (unsigned i = threadIdx.x; i < h; i += FM_MODEL_OP_THREADS) {
        const double d = static_cast<double>(ld(x[i])) - mean;
        v = __fma_rn(d, d, v);
    }
    const float var = static_cast<float>(__ddiv_rn(block_sum(v, scratch), static_cast<double>(h)));
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(var, p.eps)));
    const float m = static_cast<float>(mean);
    for (unsigned i = threadIdx.x; i < h; i += FM_MODEL_OP_THREADS) {
        const float y = __fmul_rn(__fmul_rn(__fsub_rn(ld(x[i]), m), r), w[i]);
        out[i] = st<T>(__fadd_rn(y, b[i]));
    }
}

// ---- RMSNorm: one block per row -------------------------------------------------------------
template <typename S, typename T>
__device__ __forceinline__ void rms_norm(const FmNormParams& p) {
    __shared__ double scratch[FM_MODEL_OP_THREADS / 32];
    const unsigned rank = blockIdx.y;
    const unsigned row = blockIdx.x;
    if (rank >= FM_MAX_LAUNCH_RANKS || row >= p.rows[rank]) return;
    const unsigned h = p.hidden;
    const S* x = reinterpret_cast<const S*>(p.x[rank]) + static_cast<size_t>(row) * h;
    T* out = reinterpret_cast<T*>(p.out[rank]) + static_cast<size_t>(row) * h;
    if (p.bias != 0) return layer_norm<S, T>(p, x, out);
    const float* w = reinterpret_cast<const float*>(p.weight);
    const bool vec = h % 4 == 0 && aligned4<S>(x) && aligned4<T>(out) && aligned4<float>(w);

    double ss = 0.0;
    if (vec) {
        for (unsigned i = threadIdx.x * 4; i < h; i += FM_MODEL_OP_THREADS * 4) {
            const Vec4<S> v = *reinterpret_cast<const Vec4<S>*>(x + i);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const double d = static_cast<double>(ld(v.v[j]));
                ss = __fma_rn(d, d, ss);  // f32 squares are exact in f64
            }
        }
    } else {
        for (unsigned i = threadIdx.x; i < h; i += FM_MODEL_OP_THREADS) {
            const double d = static_cast<double>(ld(x[i]));
            ss = __fma_rn(d, d, ss);
        }
    }
    const double total = block_sum(ss, scratch);
    const float ms = static_cast<float>(__ddiv_rn(total, static_cast<double>(h)));
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(ms, p.eps)));

    if (vec) {
        for (unsigned i = threadIdx.x * 4; i < h; i += FM_MODEL_OP_THREADS * 4) {
            const Vec4<S> v = *reinterpret_cast<const Vec4<S>*>(x + i);
            const float4 wv = *reinterpret_cast<const float4*>(w + i);
            const float ws[4] = {wv.x, wv.y, wv.z, wv.w};
            Vec4<T> o;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                o.v[j] = st<T>(__fmul_rn(ws[j], round_to<T>(__fmul_rn(ld(v.v[j]), r))));
            }
            *reinterpret_cast<Vec4<T>*>(out + i) = o;
        }
    } else {
        for (unsigned i = threadIdx.x; i < h; i += FM_MODEL_OP_THREADS) {
            out[i] = st<T>(__fmul_rn(w[i], round_to<T>(__fmul_rn(ld(x[i]), r))));
        }
    }
}

// ---- residual add: grid-stride over a rank's rows * hidden elements -------------------------
template <typename S, typename T>
__device__ __forceinline__ void residual_add(const FmResidualParams& p) {
    const unsigned rank = blockIdx.y;
    if (rank >= FM_MAX_LAUNCH_RANKS) return;
    const size_t n = static_cast<size_t>(p.rows[rank]) * p.hidden;
    S* s = reinterpret_cast<S*>(p.state[rank]);
    const T* y = reinterpret_cast<const T*>(p.y[rank]);
    const size_t stride = static_cast<size_t>(gridDim.x) * FM_MODEL_OP_THREADS;
    const size_t first = static_cast<size_t>(blockIdx.x) * FM_MODEL_OP_THREADS + threadIdx.x;
    if (n % 4 == 0 && aligned4<S>(s) && aligned4<T>(y)) {
        for (size_t q = first; q < n / 4; q += stride) {
            Vec4<S> a = *reinterpret_cast<const Vec4<S>*>(s + 4 * q);
            const Vec4<T> b = *reinterpret_cast<const Vec4<T>*>(y + 4 * q);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                a.v[j] = st<S>(round_to<T>(__fadd_rn(ld(a.v[j]), ld(b.v[j]))));
            }
            *reinterpret_cast<Vec4<S>*>(s + 4 * q) = a;
        }
    } else {
        for (size_t i = first; i < n; i += stride) {
            s[i] = st<S>(round_to<T>(__fadd_rn(ld(s[i]), ld(y[i]))));
        }
    }
}

}  // namespace model
}  // namespace fm

#endif  // FLASHMOE_MODEL_OPS_CUH
