// The f32 decode tile: one 64-column output tile of a routed f32 row block of at most
// FM_DECODE_MAX_ROWS rows, with FFMA (exact f32 products, as the classic f32 tile).
//
// The classic f32 tile (gemm.cuh, ffma_mainloop) computes all 64 rows of a block: 16 x 16
// threads of 4 x 4 outputs, 64 FMAs per thread and k step for each B matrix, 3/4 or more of
// them on the zero rows of a short block, which makes a decode block FFMA-bound (about 4x the
// time of its weight loads at one block's share of HBM bandwidth). This tile loads the same
// stage (f32_fetch / f32_put: A, B gate, B up, k-major, rows past a_rows zero without a load)
// and computes only the block's `n` (8, 16 or 32) token rows: thread (ty, tx) of the same
// 16 x 16 grid owns tokens 2 ty, 2 ty + 1 and columns 4 tx .. 4 tx + 3 (8 FMAs per k step and
// B matrix), and warps whose tokens are all >= n skip the FMAs (warp w owns tokens 4w .. 4w+3:
// warp-uniform for n a multiple of 8). Every output is one fmaf chain over k in order, as in
// ffma_mainloop, so the values equal the classic f32 tile's bit for bit.
//
// Epilogue: each thread's two rows of 4 columns go straight to t.out as 16-byte vectors (biases,
// activation as run_tile), no staging: each row of the tile is 16 threads x 16 contiguous bytes.
#ifndef FLASHMOE_GEMM_DECODE_F32_CUH
#define FLASHMOE_GEMM_DECODE_F32_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"

namespace fm {

static_assert(FM_DECODE_MAX_ROWS % 8 == 0 && FM_DECODE_MAX_ROWS <= 2 * (kThreads / 16),
              "two tokens per thread row of the 16 x 16 grid; a warp's 4 tokens skip together");
static_assert(kThreads == 256 && kTileN == 16 * 4, "16 x 16 threads, 4 columns each");

// Computes one f32 decode tile into t.out (rows < out_rows), as run_tile<Dt<F32>, kEpi> would.
// Block-wide; starts and ends with the arena free.
template <int kEpi>
__device__ FM_PHASE void run_decode_tile_f32(const TileArgs& targs, uint32_t n, char* arena,
                                             uint32_t mlp, const Clamp& k) {
    // A private copy: the loader's fields stay in registers instead of being reloaded from the
    // caller's frame at every k step.
    const TileArgs t = targs;
    using D = Dt<FM_DTYPE_F32>;
    static_assert(kEpi != kEpiStoreF32, "the decode tile is the routed GEMM0 / GEMM1 tile");
    constexpr bool kGated = kEpi == kEpiActGated;
    float* As = reinterpret_cast<float*>(arena);
    __builtin_assume(__isShared(As));  // shared-memory loads and stores, not generic ones
    float* Bg = As + kTileK * kLdF;
    float* Bu = Bg + kTileK * kLdF;
    const int tx = tile_tid<true>() % 16, ty = tile_tid<true>() / 16;
    const bool active = uint32_t(ty) * 2 < n;
    const uint32_t nk = t.k / kTileK;
    const uint32_t r = tile_tid<true>() % kTileM;
    const uint32_t arow = r < t.a_rows ? (t.gather ? t.gather[r] : r) : ~0u;  // heap: no __ldg
    float acc[2][2][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][i][j] = 0.f;
    for (uint32_t kc = 0; kc < nk; ++kc) {
        F32Prefetch<kGated> p;
        f32_fetch<kGated, D>(t, arow, kc, p);
        if (kc == 0) prefetch_ticket();  // the task loop's next ticket, while the loads fly
        __syncthreads();                 // the previous step's reads are done
        f32_put_stage<kGated, true>(p, As, Bg, Bu);
        __syncthreads();
        if (!active) continue;
#pragma unroll 4
        for (int kk = 0; kk < kTileK; ++kk) ffma_step<2, kGated>(As, Bg, Bu, kk, ty, tx, acc);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const uint32_t row = uint32_t(ty) * 2 + i;
        if (row >= t.out_rows) continue;  // rows >= n are never stored (out_rows <= n)
        float f[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            f[j] = epilogue_value<kEpi>(t, tx * 4 + j, acc[0][i][j], acc[1][i][j], mlp, k);
        }
        store_vec<D>(t.out + row * t.out_stride + tx * 16, f);
    }
    __syncthreads();  // every warp is done with the arena
}

}  // namespace fm

#endif  // FLASHMOE_GEMM_DECODE_F32_CUH
