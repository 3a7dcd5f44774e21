// The tile rule of params.h (FM_TILES_*), as the host evaluates it (host/plan/tile_rule.rs
// `task_rows`, `tile_for`): which row blocks of a pair list form one task, and the tile that
// computes a task of `rows` pairs, per task, from the pair list's length alone.
#ifndef FLASHMOE_TILE_RULE_CUH
#define FLASHMOE_TILE_RULE_CUH

#include "flashmoe/params.h"

namespace fm {

enum TileKind : uint32_t {
    kTileClassic = 0,  // gemm.cuh run_tile: tokens as M (64 rows), 16 x 32 warp tiles
    kTileDecode = 1,   // gemm_decode.cuh: weights as M, `tokens` (8, 16, 32) tokens as N;
                       // f32: gemm_decode_f32.cuh, FFMA on the `tokens` rows only
    kTilePrefill = 2,  // gemm_prefill.cuh: tokens as M, 32 x 32 / 32 x 64 warp tiles, K split
    kTileWide = 3,     // gemm_prefill.cuh (kRows = 128): tokens as M (two row blocks), 32 x 32 /
                       // 32 x 64 warp tiles
};

struct TileChoice {
    uint32_t kind;    // TileKind
    uint32_t tokens;  // the N of the decode tile (0 for the other kinds)
};

constexpr uint32_t kRuleBlockRows = 64;  // == TILE_M (scheduler.cuh checks it)

// Whether the run pairs row blocks into wide tasks: auto (and auto-serial, the same tasks),
// bf16/f16 (f32 has no wide tile).
template <uint32_t kDtype>
__device__ __forceinline__ bool wide_tasks(const FmLayerParams& L) {
    return (L.tile_mode == FM_TILES_AUTO || L.tile_mode == FM_TILES_AUTO_SERIAL) && kDtype != FM_DTYPE_F32;
}

// Rows of the task of row block rb (rb * 64 < count) of a pair list of `count` pairs: the
// block's own rows, those of blocks rb and rb+1 when they form a wide task (rb even, block
// rb+1 longer than FM_DECODE_MAX_ROWS), or 0 when rb is the second block of a wide task.
template <uint32_t kDtype>
__device__ __forceinline__ uint32_t task_rows(const FmLayerParams& L, uint32_t count, uint32_t rb) {
    const uint32_t rest = count - rb * kRuleBlockRows;
    if (wide_tasks<kDtype>(L)) {
        if (rb % 2 == 1 && rest > FM_DECODE_MAX_ROWS) return 0;  // the tail of rb - 1's task
        if (rb % 2 == 0 && rest > kRuleBlockRows + FM_DECODE_MAX_ROWS) {
            return rest < 2 * kRuleBlockRows ? rest : 2 * kRuleBlockRows;
        }
    }
    return rest < kRuleBlockRows ? rest : kRuleBlockRows;
}

// The tile of a task of `rows` (1 .. 128) pairs: classic for FM_TILES_CLASSIC; else wide
// above 64 rows (only auto's wide tasks have them), decode for at most FM_DECODE_MAX_ROWS
// rows (N = the rows rounded up to 8, 16 or 32), and in between prefill (bf16/f16) or
// classic (f32: no prefill tile).
// kDtype: the entry point's dtype (check_params has made sure that L.dtype equals it).
template <uint32_t kDtype>
__device__ __forceinline__ TileChoice tile_for(const FmLayerParams& L, uint32_t rows) {
    if (L.tile_mode == FM_TILES_CLASSIC) return TileChoice{kTileClassic, 0};
    if (rows > kRuleBlockRows) return TileChoice{kTileWide, 0};
    if (rows > FM_DECODE_MAX_ROWS) return TileChoice{kDtype == FM_DTYPE_F32 ? kTileClassic : kTilePrefill, 0};
    return TileChoice{kTileDecode, rows <= 8 ? 8u : rows <= 16 ? 16u : 32u};
}

}  // namespace fm

#endif  // FLASHMOE_TILE_RULE_CUH
