// The tile rule of params.h (FM_TILES_AUTO), as the host evaluates it
// (host/plan/tile_rule.rs `tile_for`): the tile that computes a routed row block of `rows`
// pairs, per task, from the block's row count alone.
#ifndef FLASHMOE_TILE_RULE_CUH
#define FLASHMOE_TILE_RULE_CUH

#include "flashmoe/params.h"

namespace fm {

enum TileKind : uint32_t {
    kTileClassic = 0,  // gemm.cuh run_tile: tokens as M (64 rows), 16 x 32 warp tiles
    kTileDecode = 1,   // gemm_decode.cuh: weights as M, `tokens` (8, 16, 32) tokens as N;
                       // f32: gemm_decode_f32.cuh, FFMA on the `tokens` rows only
    kTilePrefill = 2,  // gemm_prefill.cuh: tokens as M, 32 x 32 / 32 x 64 warp tiles, K split
};

struct TileChoice {
    uint32_t kind;    // TileKind
    uint32_t tokens;  // the N of the decode tile (0 for the other kinds)
};

// The rule: classic for FM_TILES_CLASSIC; else decode for a block of at most
// FM_DECODE_MAX_ROWS rows (N = the rows rounded up to 8, 16 or 32), and above it prefill
// (bf16/f16) or classic (f32: no prefill tile).
// kDtype: the entry point's dtype (check_params has made sure that L.dtype equals it).
template <uint32_t kDtype>
__device__ __forceinline__ TileChoice tile_for(const FmLayerParams& L, uint32_t rows) {
    if (L.tile_mode != FM_TILES_AUTO) return TileChoice{kTileClassic, 0};
    if (rows > FM_DECODE_MAX_ROWS) return TileChoice{kDtype == FM_DTYPE_F32 ? kTileClassic : kTilePrefill, 0};
    return TileChoice{kTileDecode, rows <= 8 ? 8u : rows <= 16 ? 16u : 32u};
}

}  // namespace fm

#endif  // FLASHMOE_TILE_RULE_CUH
