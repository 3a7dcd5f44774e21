// One 64x64 output tile of an expert GEMM, with fp32 accumulation and a fused epilogue.
//
// A: [64 rows][K] (rows >= a_rows read as zero; with a gather list, row r is A row
// gather[r]), B: [64 output columns][K] (the weights' [out, in] layout, i.e. the "col"
// operand of mma; all 64 rows exist), K a multiple of 64. Gated tiles multiply
// A by two B matrices (gate and up rows of the same 64 columns) and apply act(g) * u.
//
// bf16/f16: mma.sync.m16n8k16 (f32 accumulate) from ldmatrix'ed shared memory, a kStages
// deep cp.async pipeline (one __syncthreads per K step). 8 warps as 4 (M) x 2 (N), each 16 x 32 outputs per B matrix.
// f32: FFMA (exact f32 products, no TF32) from k-major shared memory, one stage. 16 x 16 threads, each 4 x 4 outputs per B matrix.
// Both paths leave the same accumulator shape float[2][4][4]; the epilogue stages the
// final f32 tile in shared memory and stores rows < out_rows with 16-byte vectors.
#ifndef FLASHMOE_GEMM_CUH
#define FLASHMOE_GEMM_CUH

#include "flashmoe/common.cuh"
#include "flashmoe/ticket.cuh"

namespace fm {

enum Epi : int {
    kEpiActGated = 0,  // dtype out = round(act(A.Bg) * (A.Bu))
    kEpiActPlain = 1,  // dtype out = round(act(A.B))
    kEpiStore = 2,     // dtype out = round(A.B)
    kEpiStoreF32 = 3,  // f32 out = A.B
};

struct TileArgs {
    const char* a;       // first row of A
    uint64_t a_stride;   // bytes between A rows
    uint32_t a_rows;     // valid rows of A (<= 64; <= 128 for the wide prefill tile)
    const uint32_t* gather;  // nullptr: rows are consecutive; else row r is a + gather[r] * a_stride
    const char* b0;      // first row of B (gate rows when gated)
    const char* b1;      // first up row when gated, else unused
    uint64_t b_stride;   // bytes between B rows
    uint32_t k;          // depth, multiple of 64
    char* out;           // element (0, 0) of the output tile
    uint64_t out_stride; // bytes between output rows
    uint32_t out_rows;   // rows to store (<= a_rows bound of the tile)
    const float* bias0;  // f32 bias of the tile's 64 (gate) columns, added before the
                         // activation / the store; nullptr: none (gpt-oss experts)
    const float* bias1;  // f32 bias of the 64 up columns when gated, or nullptr
};

constexpr int kCStride = kTileN + 4;  // f32 staging row (pad: fewer bank conflicts)
static_assert(kTileM * kCStride * 4 <= kArenaBytes<Dt<FM_DTYPE_BF16>> &&
                  kTileM * kCStride * 4 <= kArenaBytes<Dt<FM_DTYPE_F32>>,
              "the f32 epilogue tile must fit the arena of every dtype");

__device__ __forceinline__ float activation(uint32_t mlp, float z) {
    switch (mlp) {
        case FM_MLP_SWIGLU:
            return z / (1.f + expf(-z));
        case FM_MLP_RELU:
            return fmaxf(z, 0.f);
        default: {  // GeGLU and GELU: tanh approximation
            const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
            return 0.5f * z * (1.f + tanhf(u));
        }
    }
}

// Parameters of the clamped SwiGLU (FM_MLP_CLAMPED_SWIGLU; unused by the other MLPs).
struct Clamp {
    float alpha, limit, up_offset;
};

// The gated activation act(g) * u; the clamped SwiGLU clamps both, offsets u (gpt-oss: +1)
// and weighs g by sigmoid(alpha g).
__device__ __forceinline__ float gated_activation(uint32_t mlp, float g, float u, const Clamp& k) {
    if (mlp == FM_MLP_CLAMPED_SWIGLU) {
        g = fminf(g, k.limit);
        u = fminf(fmaxf(u, -k.limit), k.limit);
        return (u + k.up_offset) * g / (1.f + expf(-k.alpha * g));
    }
    return activation(mlp, g) * u;
}

// ---- tensor-core path (bf16 / f16) ----------------------------------------------------------
constexpr int kLd = kTileK + 8;  // halves per shared row: 144 bytes, ldmatrix conflict-free

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing read
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
    const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

template <uint32_t Code>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
    if constexpr (Code == FM_DTYPE_BF16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Address of A row r (nullptr when r >= a_rows): resolved once per tile, before the K loop,
// so a gathered tile reads its row list once.
__device__ __forceinline__ const char* a_row(const TileArgs& t, uint32_t r) {
    if (r >= t.a_rows) return nullptr;
    // The pair list lives in the heap, written by peers during this launch: a plain load,
    // not __ldg (the read-only cache path assumes data constant for the kernel's lifetime).
    return t.a + uint64_t(t.gather ? t.gather[r] : r) * t.a_stride;
}

// The bf16/f16 loader moves 64 rows x 8 chunks of 16 bytes per matrix: thread i handles the
// chunk i % 8 of rows i / 8 and i / 8 + 32.
constexpr int kMmaRowsPerThread = kTileM * 8 / kThreads;
static_assert(kMmaRowsPerThread == 2 && kThreads % 8 == 0,
              "each thread loads chunk tid % 8 of rows tid / 8 + 32 j, j < 2");

template <class D, bool kGated>
__device__ __forceinline__ void mma_load_stage(const TileArgs& t, const char* const (&arow)[2],
                                               char* arena, int buf, uint32_t kc) {
    using T = typename D::T;
    T* As = reinterpret_cast<T*>(arena) + buf * 3 * kTileM * kLd;
    T* Bg = As + kTileM * kLd;
    T* Bu = Bg + kTileN * kLd;
    const uint64_t koff = uint64_t(kc) * kTileK * sizeof(T);
#pragma unroll
    for (int j = 0; j < kMmaRowsPerThread; ++j) {
        const uint32_t i = threadIdx.x + j * kThreads;
        const uint32_t r = i / 8, ch = i % 8;
        const bool valid = arow[j] != nullptr;
        const char* src = valid ? arow[j] + koff + ch * 16 : t.b0;
        cp_async16(As + r * kLd + ch * 8, src, valid);
        cp_async16(Bg + r * kLd + ch * 8, t.b0 + r * t.b_stride + koff + ch * 16, true);
        if constexpr (kGated) {
            cp_async16(Bu + r * kLd + ch * 8, t.b1 + r * t.b_stride + koff + ch * 16, true);
        }
    }
}

// The kStages-deep cp.async pipeline of every tensor-core tile (classic, decode, prefill):
// load(buf, kc) issues K step kc's copies into stage buffer buf, compute(buf) runs the mma of
// the step held in buf. One commit group per step (possibly empty), one __syncthreads per
// step. kPrefetchTicket: take the block's next queue ticket once the prologue is in flight
// (ticket.cuh; the decode and prefill tiles). staged: step 0 is already in buffer 0's
// flight, committed as the oldest group by the tile before (next_stage.cuh), so the
// prologue issues steps 1 .. kStages-2 only and the group count below is unchanged. Ends
// with every copy landed; the caller syncs before reusing the arena.
template <bool kPrefetchTicket, class Load, class Compute>
__device__ __forceinline__ void cp_async_pipeline(uint32_t nk, bool staged, Load&& load, Compute&& compute) {
    // Prologue: steps 0 .. kStages-2 in flight.
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s == 0 && staged) continue;
        if (uint32_t(s) < nk) load(s, uint32_t(s));
        cp_async_commit();
    }
    if constexpr (kPrefetchTicket) prefetch_ticket();
    for (uint32_t kc = 0; kc < nk; ++kc) {
        // kStages-1+kc groups are committed; group kc must be complete: kStages-2 may pend.
        cp_async_wait<kStages - 2>();
        // Everyone's copies of step kc have landed, and everyone has finished step kc-1,
        // whose buffer ((kc-1) % kStages) the load below overwrites.
        __syncthreads();
        const uint32_t next = kc + kStages - 1;
        if (next < nk) load(int(next % kStages), next);
        cp_async_commit();
        compute(int(kc % kStages));
    }
    cp_async_wait<0>();  // only empty groups can remain
}

template <class D, bool kGated>
__device__ __forceinline__ void mma_mainloop(const TileArgs& t, char* arena, float (&acc)[2][4][4]) {
    using T = typename D::T;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wm = warp % 4, wn = warp / 4;
    const uint32_t nk = t.k / kTileK;
    const char* arow[2];
#pragma unroll
    for (int j = 0; j < kMmaRowsPerThread; ++j) arow[j] = a_row(t, (threadIdx.x + j * kThreads) / 8);
    const auto load = [&](int buf, uint32_t kc) { mma_load_stage<D, kGated>(t, arow, arena, buf, kc); };
    cp_async_pipeline<false>(nk, false, load, [&](int buf) {
        const T* As = reinterpret_cast<const T*>(arena) + buf * 3 * kTileM * kLd;
        const T* Bg = As + kTileM * kLd;
        const T* Bu = Bg + kTileN * kLd;
#pragma unroll
        for (int kk = 0; kk < kTileK / 16; ++kk) {
            uint32_t a[4];
            ldmatrix_x4(a, As + (wm * 16 + (lane % 16)) * kLd + kk * 16 + (lane / 16) * 8);
#pragma unroll
            for (int np = 0; np < 2; ++np) {
                const int brow = wn * 32 + np * 16 + (lane % 8) + (lane / 16) * 8;
                const int bcol = kk * 16 + ((lane / 8) % 2) * 8;
                uint32_t b[4];
                ldmatrix_x4(b, Bg + brow * kLd + bcol);
                mma16816<D::kCode>(acc[0][np * 2], a, b[0], b[1]);
                mma16816<D::kCode>(acc[0][np * 2 + 1], a, b[2], b[3]);
                if constexpr (kGated) {
                    ldmatrix_x4(b, Bu + brow * kLd + bcol);
                    mma16816<D::kCode>(acc[1][np * 2], a, b[0], b[1]);
                    mma16816<D::kCode>(acc[1][np * 2 + 1], a, b[2], b[3]);
                }
            }
        }
    });
}

// Output coordinates of accumulator element [g][q] of this thread (both paths).
// kF32Layer: tile_tid (common.cuh).
template <bool kTensorCore, bool kF32Layer>
__device__ __forceinline__ void acc_coord(int g, int q, int& row, int& col) {
    const int tid = tile_tid<kF32Layer>();
    if constexpr (kTensorCore) {
        const int warp = tid / 32, lane = tid % 32;
        row = (warp % 4) * 16 + lane / 4 + (q >= 2 ? 8 : 0);
        col = (warp / 4) * 32 + g * 8 + (lane % 4) * 2 + (q & 1);
    } else {
        row = (tid / 16) * 4 + g;
        col = (tid % 16) * 4 + q;
    }
}

// ---- FFMA path (f32) -------------------------------------------------------------------------
constexpr int kLdF = kTileM + 4;  // floats per k-major shared row

// A rows of the FFMA path are f32, or (router tiles with f32 router weights) the layer
// dtype widened on load: DA is the A element type.
template <class DA>
__device__ __forceinline__ float4 load_a4(const char* p) {
    if constexpr (sizeof(typename DA::T) == 4) {
        return *reinterpret_cast<const float4*>(p);
    } else {
        const uint2 raw = *reinterpret_cast<const uint2*>(p);
        const typename DA::T* e = reinterpret_cast<const typename DA::T*>(&raw);
        return make_float4(DA::to_f(e[0]), DA::to_f(e[1]), DA::to_f(e[2]), DA::to_f(e[3]));
    }
}

template <bool kGated>
struct F32Prefetch {
    float4 a[4];
    float4 bg[4];
    float4 bu[kGated ? 4 : 1];
};

// Element (r, k4..k4+3) of a 64 x 64 f32 tile for this thread's i-th float4 (r fastest so
// that the transposing shared stores of a warp hit consecutive banks). The row is the same
// for every i (tid % 64): one A row pointer per thread.
static_assert(kThreads % kTileM == 0, "an f32 loader thread keeps one A row for all its float4s");
template <bool kF32Layer>
__device__ __forceinline__ void f32_slot(int i, int& r, int& k4) {
    const int idx = tile_tid<kF32Layer>() + i * kThreads;
    r = idx % 64;
    k4 = (idx / 64) * 4;
}

// `arow` is this thread's A row index (resolved through the gather list once per tile), or
// ~0 past a_rows: one 32-bit register, as the gated f32 tile sits at the 128-register budget.
template <bool kGated, class DA>
__device__ __forceinline__ void f32_fetch(const TileArgs& t, uint32_t arow, uint32_t kc,
                                          F32Prefetch<kGated>& p) {
    constexpr bool kF32Layer = DA::kCode == FM_DTYPE_F32;
    constexpr uint64_t kAes = sizeof(typename DA::T);
    const uint64_t koff = uint64_t(kc) * kTileK * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int r, k4;
        f32_slot<kF32Layer>(i, r, k4);
        if constexpr (kAes == 4) {
            p.a[i] = arow != ~0u ? *reinterpret_cast<const float4*>(t.a + arow * t.a_stride + koff + k4 * 4)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        } else {
            p.a[i] = arow != ~0u ? load_a4<DA>(t.a + arow * t.a_stride + (uint64_t(kc) * kTileK + k4) * kAes)
                                 : make_float4(0.f, 0.f, 0.f, 0.f);
        }
        p.bg[i] = __ldg(reinterpret_cast<const float4*>(t.b0 + r * t.b_stride + koff + k4 * 4));
        if constexpr (kGated) {
            p.bu[i] = __ldg(reinterpret_cast<const float4*>(t.b1 + r * t.b_stride + koff + k4 * 4));
        }
    }
}

__device__ __forceinline__ void f32_put(float* s, int r, int k4, float4 v) {
    s[(k4 + 0) * kLdF + r] = v.x;
    s[(k4 + 1) * kLdF + r] = v.y;
    s[(k4 + 2) * kLdF + r] = v.z;
    s[(k4 + 3) * kLdF + r] = v.w;
}

// Stores one fetched K step (f32_fetch) into the stage: A, B gate and (gated) B up, k-major.
template <bool kGated, bool kF32Layer>
__device__ __forceinline__ void f32_put_stage(const F32Prefetch<kGated>& p, float* As, float* Bg,
                                              float* Bu) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        int r, k4;
        f32_slot<kF32Layer>(i, r, k4);
        f32_put(As, r, k4, p.a[i]);
        f32_put(Bg, r, k4, p.bg[i]);
        if constexpr (kGated) f32_put(Bu, r, k4, p.bu[i]);
    }
}

// One output of a routed tile's epilogue (every tile shape: classic, decode, prefill) from
// its column `col` and sums `g` (GEMM0 gate, or the plain product) and `u` (GEMM0 up, read
// only when gated): the biases, then the gated or plain activation; kEpiStoreF32 keeps the
// (biased) sum.
template <int kEpi>
__device__ __forceinline__ float epilogue_value(const TileArgs& t, int col, float g, float u,
                                                uint32_t mlp, const Clamp& k) {
    if (t.bias0) g += t.bias0[col];
    if constexpr (kEpi == kEpiActGated) {
        if (t.bias1) u += t.bias1[col];
        g = gated_activation(mlp, g, u, k);
    }
    if constexpr (kEpi == kEpiActPlain) g = activation(mlp, g);
    return g;
}

// One FFMA step of the f32 tiles at depth kk: this thread's R rows (As, k-major, from row
// ty * R) times its 4 columns (from tx * 4) of the gate (and up) matrix, one fmaf chain per
// output in k order. R = 4: the classic tile; R = 2: the f32 decode tile.
template <int R, bool kGated>
__device__ __forceinline__ void ffma_step(const float* As, const float* Bg, const float* Bu, int kk,
                                          int ty, int tx, float (&acc)[2][R][4]) {
    static_assert(R == 2 || R == 4, "rows per thread: a float2 or a float4 of As");
    float av[R];
    if constexpr (R == 4) {
        const float4 a = *reinterpret_cast<const float4*>(As + kk * kLdF + ty * 4);
        av[0] = a.x, av[1] = a.y, av[2] = a.z, av[3] = a.w;
    } else {
        const float2 a = *reinterpret_cast<const float2*>(As + kk * kLdF + ty * 2);
        av[0] = a.x, av[1] = a.y;
    }
#pragma unroll
    for (int m = 0; m < (kGated ? 2 : 1); ++m) {  // gate (B), then up (Bu) when gated
        const float4 b = *reinterpret_cast<const float4*>((m == 0 ? Bg : Bu) + kk * kLdF + tx * 4);
        const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[m][i][j] = fmaf(av[i], bv[j], acc[m][i][j]);
    }
}

template <bool kGated, class DA>
__device__ __forceinline__ void ffma_mainloop(const TileArgs& t, char* arena, float (&acc)[2][4][4]) {
    constexpr bool kF32Layer = DA::kCode == FM_DTYPE_F32;
    float* As = reinterpret_cast<float*>(arena);
    float* Bg = As + kTileK * kLdF;
    float* Bu = Bg + kTileK * kLdF;
    const int tx = tile_tid<kF32Layer>() % 16, ty = tile_tid<kF32Layer>() / 16;
    const uint32_t nk = t.k / kTileK;
    const uint32_t r = tile_tid<kF32Layer>() % kTileM;
    const uint32_t arow = r < t.a_rows ? (t.gather ? t.gather[r] : r) : ~0u;  // heap: no __ldg
    for (uint32_t kc = 0; kc < nk; ++kc) {
        // All loads of the step are issued before the first shared store (12 x 16 bytes in
        // flight per thread). No prefetch across the FMAs: it would push the gated tile
        // past the 128-register budget of 2 blocks per SM and spill.
        F32Prefetch<kGated> p;
        f32_fetch<kGated, DA>(t, arow, kc, p);
        __syncthreads();  // the previous step's reads are done
        f32_put_stage<kGated, kF32Layer>(p, As, Bg, Bu);
        __syncthreads();
#pragma unroll 4
        for (int kk = 0; kk < kTileK; ++kk) ffma_step<4, kGated>(As, Bg, Bu, kk, ty, tx, acc);
    }
}

// ---- the tile ----------------------------------------------------------------------------------
// Computes one output tile into t.out. Block-wide; starts and ends with the arena free.
// DA: the A element type of the FFMA path (D's own unless a router tile widens the dtype).
template <class D, int kEpi, class DA = D>
__device__ FM_PHASE void run_tile(const TileArgs& t, char* arena, uint32_t mlp, const Clamp& k) {
    constexpr bool kF32Layer = DA::kCode == FM_DTYPE_F32;  // tile_tid (common.cuh)
    static_assert(!D::kTensorCore || sizeof(typename DA::T) == sizeof(typename D::T),
                  "the tensor-core path reads A and B in the same dtype");
    constexpr bool kGated = kEpi == kEpiActGated;
    float acc[2][4][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int g = 0; g < 4; ++g)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[m][g][q] = 0.f;
    if constexpr (D::kTensorCore) {
        // A private copy, as the prefill and decode tiles': the loader's fields stay in
        // registers instead of being reloaded from the caller's frame after every cp.async
        // (their "memory" clobbers): the K loop's SASS had 6 to 10 local loads per stage.
        const TileArgs tl = t;
        mma_mainloop<D, kGated>(tl, arena, acc);
    } else {
        ffma_mainloop<kGated, DA>(t, arena, acc);
    }
    __syncthreads();  // every warp is done with the stages: reuse them for the f32 tile
    float* C = reinterpret_cast<float*>(arena);
#pragma unroll
    for (int g = 0; g < 4; ++g) {
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            int row, col;
            acc_coord<D::kTensorCore, kF32Layer>(g, q, row, col);
            C[row * kCStride + col] = epilogue_value<kEpi>(t, col, acc[0][g][q], acc[1][g][q], mlp, k);
        }
    }
    __syncthreads();
    // Unsigned indices and a known thread count: with int indices and an unknown trip
    // count, ptxas kept tid + 256 and its sign word live across the whole task loop of the
    // NVSHMEM entry point, where they spilled. (layer() refuses any block size but kThreads
    // before a tile runs, so the assumption holds.)
    __builtin_assume(threadIdx.x < kThreads);
    if constexpr (kEpi == kEpiStoreF32) {
        for (uint32_t i = tile_tid<kF32Layer>(); i < kTileM * (kTileN / 4); i += kThreads) {
            const uint32_t r = i / (kTileN / 4), v = i % (kTileN / 4);
            if (r < t.out_rows) {
                *reinterpret_cast<float4*>(t.out + r * t.out_stride + v * 16) =
                    *reinterpret_cast<const float4*>(C + r * kCStride + v * 4);
            }
        }
    } else {
        constexpr int V = kVec<D>;
        constexpr int kPerRow = kTileN / V;
        for (uint32_t i = tile_tid<kF32Layer>(); i < kTileM * kPerRow; i += kThreads) {
            const uint32_t r = i / kPerRow, v = i % kPerRow;
            if (r < t.out_rows) {
                float f[V];
#pragma unroll
                for (int e = 0; e < V; ++e) f[e] = C[r * kCStride + v * V + e];
                store_vec<D>(t.out + r * t.out_stride + v * 16, f);
            }
        }
    }
    __syncthreads();
}

}  // namespace fm

#endif  // FLASHMOE_GEMM_CUH
