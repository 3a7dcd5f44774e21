// The decode tile: one 64-column output tile of a routed row block of at most
// FM_DECODE_MAX_ROWS rows, with the operands swapped (bf16/f16 only).
//
// The classic tile (gemm.cuh) puts the block's tokens in the mma M operand, 64 rows of which
// at most 32 exist here. This tile puts the WEIGHTS in M (the tile's 64 output columns; the
// gate and up rows when gated) and the tokens in N (n = 8, 16 or 32 from the tile rule,
// params.h FM_TILES_AUTO), so the tensor cores and the shared-memory reads work only on the
// block's rows and each weight byte, read once from HBM, serves all of them.
//
// Same arguments (TileArgs), same epilogues (biases, activation, clamped SwiGLU, rounding)
// and same outputs as run_tile: the stage checks see the same act / y rows.
//
// Warps: 4 (M: 16 weight rows each) x 2 (K: the two halves of each 64-deep step, summed in
// a fixed order in the epilogue). mma.sync m16n8k16, kStages-deep cp.async pipeline.
#ifndef FLASHMOE_GEMM_DECODE_CUH
#define FLASHMOE_GEMM_DECODE_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"

namespace fm {

constexpr int kDecodeMaxN = FM_DECODE_MAX_ROWS;
constexpr int kDecodeNBlocks = kDecodeMaxN / 8;  // n8 blocks of the accumulator
constexpr int kDecodeCStride = kTileN + 4;       // f32 staging row of one token (pad: banks)
// Stage: W gate [64][kLd], W up [64][kLd], X [32][kLd] halves.
constexpr int kDecodeStageHalves = (2 * kTileN + kDecodeMaxN) * kLd;
static_assert(kDecodeMaxN % 16 == 0 && kDecodeMaxN <= kTileM,
              "tokens are read in pairs of n8 blocks (ldmatrix x4) and fit a classic block");
static_assert(kWarps == 8 && kTileN == 4 * 16 && kTileK == 2 * 2 * 16,
              "4 warps of 16 weight rows cover the 64 columns; 2 K halves of 2 k16 steps");
static_assert(kStages * kDecodeStageHalves * 2 <= kArenaBytes<Dt<FM_DTYPE_BF16>>,
              "the decode stages must fit the bf16/f16 arena");
static_assert(2 * 2 * kDecodeMaxN * kDecodeCStride * 4 <= kArenaBytes<Dt<FM_DTYPE_BF16>>,
              "the two K halves' gate and up partials must fit the arena");
static_assert(kDecodeMaxN * 8 <= kThreads, "one thread per 16-byte chunk of the token rows");

// Loads K step kc into stage buf: 64 weight rows (x2 gated) as run_tile's B, and the n token
// rows (zero past a_rows; `xrow` is this thread's row, resolved once per tile). up = false
// (with kGated): no up rows, for decode_stage0 of a plain tile (which never reads them).
template <class D, bool kGated>
__device__ __forceinline__ void decode_load_stage(const TileArgs& t, const char* xrow, uint32_t n,
                                                  char* arena, int buf, uint32_t kc, bool up = true) {
    using T = typename D::T;
    T* Wg = reinterpret_cast<T*>(arena) + buf * kDecodeStageHalves;
    T* Wu = Wg + kTileN * kLd;
    T* X = Wu + kTileN * kLd;
    const uint64_t koff = uint64_t(kc) * kTileK * sizeof(T);
#pragma unroll
    for (int j = 0; j < kMmaRowsPerThread; ++j) {
        const uint32_t i = threadIdx.x + j * kThreads;
        const uint32_t r = i / 8, ch = i % 8;
        cp_async16(Wg + r * kLd + ch * 8, t.b0 + r * t.b_stride + koff + ch * 16, true);
        if constexpr (kGated) {
            if (up) cp_async16(Wu + r * kLd + ch * 8, t.b1 + r * t.b_stride + koff + ch * 16, true);
        }
    }
    if (uint32_t(threadIdx.x) < n * 8) {
        const uint32_t r = threadIdx.x / 8, ch = threadIdx.x % 8;
        const bool valid = xrow != nullptr;
        cp_async16(X + r * kLd + ch * 8, valid ? xrow + koff + ch * 16 : t.b0, valid);
    }
}

// The warp's two k16 steps of one stage: weights (A) x tokens (B) into acc[mat][n8 block].
template <class D, bool kGated>
__device__ __forceinline__ void decode_mma_stage(const char* arena, int buf, uint32_t n,
                                                 float (&acc)[2][kDecodeNBlocks][4]) {
    using T = typename D::T;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % 4, wk = warp / 4;
    const T* Wg = reinterpret_cast<const T*>(arena) + buf * kDecodeStageHalves;
    const T* Wu = Wg + kTileN * kLd;
    const T* X = Wu + kTileN * kLd;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int kk = wk * 2 + h;
        uint32_t ag[4], au[4];
        const int arow = (wm * 16 + (lane % 16)) * kLd + kk * 16 + (lane / 16) * 8;
        ldmatrix_x4(ag, Wg + arow);
        if constexpr (kGated) ldmatrix_x4(au, Wu + arow);
#pragma unroll
        for (int jp = 0; jp < kDecodeNBlocks / 2; ++jp) {
            if (uint32_t(jp) * 16 >= n) break;  // warp-uniform: n is the tile's
            // Token rows jp*16 .. +16 (the second n8 block is unused when n == 8: its rows
            // are read but feed only accumulators that are never stored).
            const int brow = jp * 16 + (lane % 8) + (lane / 16) * 8;
            const int bcol = kk * 16 + ((lane / 8) % 2) * 8;
            uint32_t b[4];
            ldmatrix_x4(b, X + brow * kLd + bcol);
            mma16816<D::kCode>(acc[0][jp * 2], ag, b[0], b[1]);
            if constexpr (kGated) mma16816<D::kCode>(acc[1][jp * 2], au, b[0], b[1]);
            if (uint32_t(jp) * 16 + 8 < n) {
                mma16816<D::kCode>(acc[0][jp * 2 + 1], ag, b[2], b[3]);
                if constexpr (kGated) mma16816<D::kCode>(acc[1][jp * 2 + 1], au, b[2], b[3]);
            }
        }
    }
}

// This thread's token row of a decode tile of n tokens (nullptr past them or past a_rows).
__device__ __forceinline__ const char* decode_xrow(const TileArgs& t, uint32_t n) {
    const uint32_t xr = threadIdx.x / 8;
    return xr < n ? a_row(t, xr) : nullptr;
}

// staged: step 0 is already in flight (decode_stage0).
template <class D, bool kGated>
__device__ __forceinline__ void decode_mainloop(const TileArgs& t, uint32_t n, bool staged, char* arena,
                                                float (&acc)[2][kDecodeNBlocks][4]) {
    const uint32_t nk = t.k / kTileK;
    const char* xrow = decode_xrow(t, n);
    // The task loop's next ticket is taken while the first stages load.
    cp_async_pipeline<true>(
        nk, staged, [&](int buf, uint32_t kc) { decode_load_stage<D, kGated>(t, xrow, n, arena, buf, kc); },
        [&](int buf) { decode_mma_stage<D, kGated>(arena, buf, n, acc); });
}

// Issues step 0 of decode tile t (n tokens, gated or not) into stage buffer 0 as one commit
// group, as the tile's own prologue would, for a tile run with staged = true (next_stage.cuh).
// Block-wide; stage buffer 0 must be free. The stage layout does not depend on gated.
template <class D>
__device__ __forceinline__ void decode_stage0(const TileArgs& t, uint32_t n, char* arena, bool gated) {
    decode_load_stage<D, true>(t, decode_xrow(t, n), n, arena, 0, 0, gated);
    cp_async_commit();
}

// Computes one decode tile into t.out (rows < out_rows), as run_tile<D, kEpi> would.
// Block-wide; starts and ends with the arena free. staged: step 0 is in flight
// (decode_stage0, issued after the tile before); once the K loop is done, thread 0 looks
// whether the block's next task is already out (peek_next, ticket.cuh).
template <class D, int kEpi>
__device__ FM_PHASE void run_decode_tile(const TileArgs& t, uint32_t n, char* arena, uint32_t mlp,
                                         const Clamp& k, bool staged) {
    static_assert(D::kTensorCore && kEpi != kEpiStoreF32,
                  "the decode tile is the routed bf16/f16 GEMM0 / GEMM1 tile");
    constexpr bool kGated = kEpi == kEpiActGated;
    float acc[2][kDecodeNBlocks][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int j = 0; j < kDecodeNBlocks; ++j)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[m][j][q] = 0.f;
    {
        // A private copy, as run_prefill_tile's: the loader's fields stay in registers
        // instead of being reloaded from the caller's frame after every cp.async (their
        // "memory" clobbers): the SASS of the K loop had 5 to 9 local loads per stage.
        const TileArgs tl = t;
        decode_mainloop<D, kGated>(tl, n, staged, arena, acc);
    }
    __syncthreads();  // every warp is done with the stages: reuse them for the partials
    peek_next();
    // Partials C[K half][gate / up][token][column].
    float* C = reinterpret_cast<float*>(arena);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % 4, wk = warp / 4;
#pragma unroll
    for (int m = 0; m < (kGated ? 2 : 1); ++m)
#pragma unroll
        for (int j = 0; j < kDecodeNBlocks; ++j) {
            if (uint32_t(j) * 8 >= n) break;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = wm * 16 + lane / 4 + (q >= 2 ? 8 : 0);
                const int tok = j * 8 + (lane % 4) * 2 + (q & 1);
                C[((wk * 2 + m) * kDecodeMaxN + tok) * kDecodeCStride + col] = acc[m][j][q];
            }
        }
    __syncthreads();
    constexpr int V = kVec<D>;
    constexpr int kPerRow = kTileN / V;
    const float* C0 = C;                                        // K half 0
    const float* C1 = C + 2 * kDecodeMaxN * kDecodeCStride;     // K half 1
    for (uint32_t i = threadIdx.x; i < t.out_rows * kPerRow; i += kThreads) {
        const int r = i / kPerRow, v = i % kPerRow;
        float f[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const int col = v * V + e;
            const int g = r * kDecodeCStride + col, u = (kDecodeMaxN + r) * kDecodeCStride + col;
            // Fixed order: K half 0, then half 1.
            const float up = kGated ? C0[u] + C1[u] : 0.f;
            f[e] = epilogue_value<kEpi>(t, col, C0[g] + C1[g], up, mlp, k);
        }
        store_vec<D>(t.out + r * t.out_stride + v * 16, f);
    }
    __syncthreads();
}

}  // namespace fm

#endif  // FLASHMOE_GEMM_DECODE_CUH
