// The prefill tiles: one 64x64 output tile of a routed row block of more than
// FM_DECODE_MAX_ROWS rows (bf16/f16), or one 128x64 tile of a wide task (two row blocks of a
// pair list, tile_rule.cuh), with larger warp tiles than the classic tile.
//
// Why this shape. The classic tile (gemm.cuh) gives each of its 8 warps 16 x 32 outputs per
// B matrix: per k16 step 1 A + 2 B ldmatrix.x4 feed 4 mma (3:4, 384 shared-memory bytes per
// mma; gated 1 + 2 + 2 for 8 mma, 5:8, 320 B), which caps it near 26-31% of tensor-core peak
// (kernel-review.md). 64 f32 accumulators per thread are what the 128-register budget
// (__launch_bounds__(256, 2): two blocks per SM) leaves next to the fragments and addresses,
// so a warp tile is at most 32 x 64 outputs (32 x 32 per matrix when gated); 8 such warps
// cover more than a 64x64 block tile. Two block tiles, by kRows:
//  - kRows = 64 (one row block): the warps also split each 64-deep stage along K, and the
//    kSplitK partial tiles are summed in a fixed order (split 0, 1, ...) in the epilogue.
//    Gated: 32 x 32 warp tiles, 2 x 2 warps x 2 K splits; plain: 32 x 64, 2 x 1 x 4.
//  - kRows = 128 (a wide task): each weight tile loaded from L2 feeds 128 rows instead of
//    64, one third (gated) or one quarter (plain) less global-to-shared traffic per output.
//    Gated: 32 x 32 warp tiles, 4 x 2 warps, no K split; plain: 32 x 64, 4 x 1 x 2 K splits.
// Either way, per k16 step 2 A + 2 gate + 2 up (or 2 A + 4 B) ldmatrix.x4 feed 16 mma: 3:8,
// 192 B per mma (1.7 to 2x less shared-memory traffic than classic), 64 accumulators.
// Loads are the classic tile's chunks (A rows past a_rows zero-filled); a stage holds kRows
// A rows, then 64 gate and 64 up rows (kArenaBytes: kStages stages of 128 + 64 + 64 rows).
// Epilogue: every warp writes its partial tile to the arena; all 256 threads then sum the
// splits per output in order, add the biases, apply the activation (as run_tile) and store
// 16-byte vectors of the rows < out_rows (as run_decode_tile). Same arguments (TileArgs,
// a_rows and out_rows up to kRows), same outputs as run_tile over the same rows: the stage
// checks read the same act / y rows.
#ifndef FLASHMOE_GEMM_PREFILL_CUH
#define FLASHMOE_GEMM_PREFILL_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/gemm.cuh"

namespace fm {

// A prefill warp tiling of a kRows x 64 block tile: kWarpM x kWarpN outputs per B matrix and
// warp, kSplitK warps per output along K.
template <int Rows, int WarpM, int WarpN, int SplitK>
struct PrefillShape {
    static constexpr int kRows = Rows, kWarpM = WarpM, kWarpN = WarpN, kSplitK = SplitK;
    static constexpr int kMi = WarpM / 16;                 // m16 blocks of a warp
    static constexpr int kNp = WarpN / 16;                 // n16 blocks (one B ldmatrix.x4 each)
    static constexpr int kWarpsM = Rows / WarpM, kWarpsN = kTileN / WarpN;
    static constexpr int kSteps = kTileK / 16 / SplitK;    // k16 steps of a warp per stage
    static constexpr int kStageRows = Rows + 2 * kTileN;   // A, B gate, B up rows of a stage
    static constexpr int kARows = Rows * 8 / kThreads;     // A rows a thread loads per stage
    static_assert(Rows == kTileM || Rows == 2 * kTileM, "one row block, or two (a wide task)");
    static_assert(WarpM % 16 == 0 && WarpN % 16 == 0,
                  "A in m16 blocks, B in n16 blocks (one ldmatrix.x4 = two n8 blocks)");
    static_assert(Rows % WarpM == 0 && kTileN % WarpN == 0, "warp tiles cover the block tile");
    static_assert(kWarpsM * kWarpsN * SplitK == kWarps, "every warp has one (m, n, K split) place");
    static_assert((kTileK / 16) % SplitK == 0, "each K split takes whole k16 steps of a stage");
    static_assert(kStages * kStageRows * kLd * 2 <= kArenaBytes<Dt<FM_DTYPE_BF16>>,
                  "kStages stages of kRows A rows and two 64-row B matrices fit the arena");
};

// The tiling of each epilogue kind and block tile (see the header comment for the ratios):
// the largest warp tile of 64 accumulators (32 x 32 per matrix gated, 32 x 64 plain), and
// the warps a block tile of kRows x 64 leaves over split K: gated 2 (64 rows) or 1 (128),
// plain 4 or 2.
template <bool kGated, int kRows>
struct PrefillFor {
    static constexpr int kWarpN = kGated ? 32 : 64;
    using S = PrefillShape<kRows, 32, kWarpN, kWarps * 32 * kWarpN / (kRows * kTileN)>;
};

template <bool kGated>
constexpr int kPrefillMats = kGated ? 2 : 1;

// Accumulators of one thread: [B matrix][m16 block][n8 block][fragment].
template <bool kGated, class S>
using PrefillAcc = float[kPrefillMats<kGated>][S::kMi][2 * S::kNp][4];

// The warp's k16 steps of stage buf: A (tokens) x B (weights) into acc.
template <class D, bool kGated, class S>
__device__ __forceinline__ void prefill_mma_stage(const char* arena, int buf, PrefillAcc<kGated, S>& acc) {
    using T = typename D::T;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % S::kWarpsM, wn = (warp / S::kWarpsM) % S::kWarpsN;
    const int wk = warp / (S::kWarpsM * S::kWarpsN);
    const T* As = reinterpret_cast<const T*>(arena) + buf * S::kStageRows * kLd;
    const T* Bg = As + S::kRows * kLd;
    const T* Bu = Bg + kTileN * kLd;
#pragma unroll
    for (int s = 0; s < S::kSteps; ++s) {
        const int kk = wk * S::kSteps + s;
        uint32_t a[S::kMi][4];
#pragma unroll
        for (int mi = 0; mi < S::kMi; ++mi) {
            ldmatrix_x4(a[mi], As + (wm * S::kWarpM + mi * 16 + (lane % 16)) * kLd + kk * 16 + (lane / 16) * 8);
        }
#pragma unroll
        for (int np = 0; np < S::kNp; ++np) {
            // Fragments as run_tile's: b[0..1] feed n8 block 2 np, b[2..3] block 2 np + 1.
            const int brow = wn * S::kWarpN + np * 16 + (lane % 8) + (lane / 16) * 8;
            const int bcol = kk * 16 + ((lane / 8) % 2) * 8;
#pragma unroll
            for (int m = 0; m < kPrefillMats<kGated>; ++m) {
                uint32_t b[4];
                ldmatrix_x4(b, (m == 0 ? Bg : Bu) + brow * kLd + bcol);
#pragma unroll
                for (int mi = 0; mi < S::kMi; ++mi) {
                    mma16816<D::kCode>(acc[m][mi][np * 2], a[mi], b[0], b[1]);
                    mma16816<D::kCode>(acc[m][mi][np * 2 + 1], a[mi], b[2], b[3]);
                }
            }
        }
    }
}

// The loader's per-thread state: the classic loader's chunks (chunk tid % 8 of A rows
// tid / 8 + 32 j, j < kARows, and of B rows tid / 8 and tid / 8 + 32 of both B matrices),
// with the B rows as one 32-bit offset shared by both B matrices instead of four 64-bit
// pointers: fewer live registers next to the 64 accumulators. A tile's 64 B rows span
// 64 x b_stride bytes, at most 64 x kMaxDim x 4 = 16 MiB (check_params refuses hidden /
// intermediate above kMaxDim). (A rows as 32-bit row numbers under one base pointer cost
// more registers at 64 rows than the two pointers, and spilled: kernel/check.sh.)
template <class S>
struct PrefillLoader {
    const char* arow[S::kARows];  // A rows tid / 8 + 32 j, nullptr past a_rows
    const char* b0;
    const char* b1;
    uint32_t boff;              // (tid / 8) * b_stride + (tid % 8) * 16
    uint32_t b32;               // 32 * b_stride
};

// up = false (with kGated): the gate rows only, for prefill_stage0 of a plain tile (the B up
// rows of a stage are then left as they are; a plain tile never reads them).
template <class D, bool kGated, class S>
__device__ __forceinline__ void prefill_load_stage(const PrefillLoader<S>& l, char* arena, int buf, uint32_t kc,
                                                   bool up = true) {
    using T = typename D::T;
    T* As = reinterpret_cast<T*>(arena) + buf * S::kStageRows * kLd;
    T* Bg = As + S::kRows * kLd;
    T* Bu = Bg + kTileN * kLd;
    const uint32_t koff = kc * uint32_t(kTileK * sizeof(T));
    const uint32_t r0 = threadIdx.x / 8, ch = threadIdx.x % 8;
#pragma unroll
    for (int j = 0; j < S::kARows; ++j) {
        const uint32_t r = r0 + j * (kThreads / 8);
        const bool valid = l.arow[j] != nullptr;
        const char* src = valid ? l.arow[j] + koff + ch * 16 : l.b0;
        cp_async16(As + r * kLd + ch * 8, src, valid);
    }
#pragma unroll
    for (int j = 0; j < kMmaRowsPerThread; ++j) {
        const uint32_t r = r0 + j * (kThreads / 8);
        const uint32_t bo = l.boff + j * l.b32 + koff;
        cp_async16(Bg + r * kLd + ch * 8, l.b0 + bo, true);
        if constexpr (kGated) {
            if (up) cp_async16(Bu + r * kLd + ch * 8, l.b1 + bo, true);
        }
    }
}

// The loader of tile t's stages (see PrefillLoader).
template <class S>
__device__ __forceinline__ PrefillLoader<S> prefill_loader(const TileArgs& t) {
    static_assert(kMmaRowsPerThread == 2 && kThreads / 8 == 32,
                  "the loader keeps B rows tid / 8 and tid / 8 + 32 per matrix");
    PrefillLoader<S> l;
#pragma unroll
    for (int j = 0; j < S::kARows; ++j) l.arow[j] = a_row(t, threadIdx.x / 8 + j * (kThreads / 8));
    l.b0 = t.b0;
    l.b1 = t.b1;
    l.boff = uint32_t(threadIdx.x / 8) * uint32_t(t.b_stride) + (threadIdx.x % 8) * 16;
    l.b32 = 32 * uint32_t(t.b_stride);
    return l;
}

// The shared pipeline (cp_async_pipeline, gemm.cuh) with the prefill warp tiling; staged:
// step 0 is already in flight (prefill_stage0).
template <class D, bool kGated, class S>
__device__ __forceinline__ void prefill_mainloop(const TileArgs& t, bool staged, char* arena,
                                                 PrefillAcc<kGated, S>& acc) {
    const uint32_t nk = t.k / kTileK;
    const PrefillLoader<S> l = prefill_loader<S>(t);
    // The task loop's next ticket is taken while the first stages load.
    cp_async_pipeline<true>(
        nk, staged, [&](int buf, uint32_t kc) { prefill_load_stage<D, kGated, S>(l, arena, buf, kc); },
        [&](int buf) { prefill_mma_stage<D, kGated, S>(arena, buf, acc); });
}

// Issues step 0 of tile t (kRows rows, gated or not) into stage buffer 0 as one commit
// group: what the tile's own pipeline prologue would issue first, for a tile that runs it
// with staged = true. Block-wide; stage buffer 0 must be free. One body for both epilogue
// kinds (gated at run time): the stage layout and the loader do not depend on it.
template <class D, int kRows>
__device__ __forceinline__ void prefill_stage0(const TileArgs& t, char* arena, bool gated) {
    using G = typename PrefillFor<true, kRows>::S;
    using P = typename PrefillFor<false, kRows>::S;
    static_assert(G::kStageRows == P::kStageRows && G::kARows == P::kARows,
                  "gated and plain tiles of kRows rows load the same stage layout");
    prefill_load_stage<D, true, G>(prefill_loader<G>(t), arena, 0, 0, gated);
    cp_async_commit();
}

// Computes one prefill tile of kRows (64, or 128 for a wide task) rows into t.out (rows <
// out_rows), as run_tile<D, kEpi> would row block by row block. Block-wide; starts and ends
// with the arena free.
// staged: step 0 is in flight (prefill_stage0, issued after the tile before). Once the
// mainloop is done, thread 0 looks whether the block's next task is already out
// (peek_next, ticket.cuh) while the partials are written.
template <class D, int kEpi, int kRows>
__device__ FM_PHASE void run_prefill_tile(const TileArgs& t, char* arena, uint32_t mlp, const Clamp& k,
                                          bool staged) {
    static_assert(D::kTensorCore && kEpi != kEpiStoreF32,
                  "the prefill tile is the routed bf16/f16 GEMM0 / GEMM1 tile");
    constexpr bool kGated = kEpi == kEpiActGated;
    using S = typename PrefillFor<kGated, kRows>::S;
    constexpr int kMats = kPrefillMats<kGated>;
    static_assert(kMats * S::kMi * 2 * S::kNp * 4 <= 64,
                  "at most 64 f32 accumulators: the 128-register budget (2 blocks of 256 per "
                  "SM) also holds the A/B fragments, addresses and the pipeline's state");
    static_assert(S::kSplitK * kMats * kRows * kCStride * 4 <= kArenaBytes<D>,
                  "the partial tiles of every K split must fit the bf16/f16 arena");
    PrefillAcc<kGated, S> acc;
#pragma unroll
    for (int m = 0; m < kMats; ++m)
#pragma unroll
        for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
            for (int j = 0; j < 2 * S::kNp; ++j)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[m][mi][j][q] = 0.f;
    {
        // A private copy: the loader's fields stay in registers instead of being reloaded
        // from the caller's frame after every cp.async (their "memory" clobbers).
        const TileArgs tl = t;
        prefill_mainloop<D, kGated, S>(tl, staged, arena, acc);
    }
    __syncthreads();  // every warp is done with the stages: reuse them for the partials
    peek_next();
    // Partials P[K split][B matrix][row][column].
    float* P = reinterpret_cast<float*>(arena);
    __builtin_assume(__isShared(P));  // shared-memory stores and loads, not generic ones
    {
        const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
        const int wm = warp % S::kWarpsM, wn = (warp / S::kWarpsM) % S::kWarpsN;
        const int wk = warp / (S::kWarpsM * S::kWarpsN);
#pragma unroll
        for (int m = 0; m < kMats; ++m)
#pragma unroll
            for (int mi = 0; mi < S::kMi; ++mi)
#pragma unroll
                for (int j = 0; j < 2 * S::kNp; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {  // fragment rows lane / 4 and + 8
                        const int row = wm * S::kWarpM + mi * 16 + lane / 4 + h * 8;
                        const int col = wn * S::kWarpN + j * 8 + (lane % 4) * 2;
                        float* p = P + ((wk * kMats + m) * kRows + row) * kCStride + col;
                        *reinterpret_cast<float2*>(p) = make_float2(acc[m][mi][j][2 * h], acc[m][mi][j][2 * h + 1]);
                    }
    }
    __syncthreads();
    constexpr int V = kVec<D>;
    constexpr int kPerRow = kTileN / V;
    constexpr int kSplitStride = kMats * kRows * kCStride;  // floats between K splits
    const Clamp clamp = k;  // in registers, not reloaded from the caller's frame per output
    for (uint32_t i = threadIdx.x; i < t.out_rows * kPerRow; i += kThreads) {
        const int r = i / kPerRow, v = i % kPerRow;
        float f[V];
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const int g = r * kCStride + v * V + e;
            float z = P[g];
#pragma unroll
            for (int s = 1; s < S::kSplitK; ++s) z += P[s * kSplitStride + g];  // fixed order
            float up = 0.f;
            if constexpr (kGated) {
                const int u = kRows * kCStride + g;
                up = P[u];
#pragma unroll
                for (int s = 1; s < S::kSplitK; ++s) up += P[s * kSplitStride + u];
            }
            f[e] = epilogue_value<kEpi>(t, v * V + e, z, up, mlp, clamp);
        }
        store_vec<D>(t.out + r * t.out_stride + v * 16, f);
    }
    __syncthreads();
}

}  // namespace fm

#endif  // FLASHMOE_GEMM_PREFILL_CUH
