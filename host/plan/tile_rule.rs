//! The tile rule: which GEMM tile shape computes one routed row block, as a pure function
//! of the block's row count, the dtype and the run's [`TileMode`].
//!
//! The task decomposition does not depend on the rule: a routed row block is always
//! `TILE_M` pairs of one (source, local expert) and its GEMM tiles always cover `TILE_N`
//! output columns. The rule only picks how a tile computes its block:
//!
//! - [`TileShape::Classic`]: tokens as the M operand (64 rows, the rows past the block's
//!   zero-filled), weights as N (64 output columns).
//! - [`TileShape::Decode`]: swapped operands for a block of at most [`DECODE_MAX_ROWS`]
//!   rows: the weights are the M operand (the tile's 64 output columns, gate and up rows
//!   when gated) and the tokens the N operand, `tokens` = 8, 16 or 32 (the block's rows
//!   rounded up to a multiple of 8 that is a power of two), so no tensor-core work is
//!   spent on absent rows and each weight byte is read once for all of the block's rows
//!   (mma.sync m16n8k16). In f32 the decode tile keeps the classic operands (FFMA has no
//!   fragment shapes to fill) but computes only the `tokens` rows: the classic f32 tile
//!   spends 3/4 or more of its FMAs on the zero rows of such a block, which makes a decode
//!   block FFMA-bound; its outputs are the classic tile's bit for bit (one `fmaf` chain in
//!   k order each).
//! - [`TileShape::Prefill`]: a bf16/f16 block of more than [`DECODE_MAX_ROWS`] rows, tokens
//!   as M and weights as N as in the classic tile, but with larger warp tiles: the 8 warps
//!   split each 64-deep K step (32x32 warp tiles x 2 K splits when gated, 32x64 x 4
//!   otherwise) and the partial tiles are summed in a fixed order in the epilogue. Per k16
//!   step that is 3 `ldmatrix` per 8 `mma` (classic: 3 per 4, gated 5 per 8), at the same
//!   64x64 block tile, so the task decomposition, the workspace and the executor's units do
//!   not change (a 128-row block tile would change all three).
//!
//! The kernel evaluates the same rule per task (`fm::tile_for` in tile_rule.cuh, documented in
//! params.h next to `FM_TILES_AUTO`) from the block's row count; the CPU executor runs each
//! expert unit with the shape the rule gives it (values are bit-identical whatever the
//! shape: every output is one chain over its row and column alone).

use super::{LayerPlan, TILE_M};
use crate::config::Dtype;

/// Most rows of a block that the decode (swapped-operand) tile takes.
pub const DECODE_MAX_ROWS: usize = 32;

/// Which tile shapes a run may use (`FmLayerParams::tile_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TileMode {
    /// The rule picks the shape by rows (`FM_TILES_AUTO`).
    #[default]
    Auto,
    /// Every block uses the classic 64x64 tile (`FM_TILES_CLASSIC`): the path before the
    /// rule (no decode, no prefill tile), kept selectable until a GPU has compared them.
    Classic,
}

impl TileMode {
    /// The `FM_TILES_*` code of the mode.
    pub fn code(self) -> u32 {
        match self {
            TileMode::Auto => 0,
            TileMode::Classic => 1,
        }
    }

    /// The mode's name on the command line (`auto`, `classic`).
    pub fn name(self) -> &'static str {
        match self {
            TileMode::Auto => "auto",
            TileMode::Classic => "classic",
        }
    }
}

impl std::str::FromStr for TileMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(TileMode::Auto),
            "classic" => Ok(TileMode::Classic),
            _ => Err(format!("`{s}`: expected auto or classic")),
        }
    }
}

/// The shape of the tile that computes one routed row block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileShape {
    /// Tokens as M (`TILE_M` rows), weights as N (`TILE_N` output columns).
    Classic,
    /// Weights as M (`TILE_N` output columns), `tokens` (8, 16 or 32) tokens as N; in f32,
    /// FFMA on the `tokens` rows only (`gemm_decode_f32.cuh`).
    Decode {
        /// The N of the tile: the block's rows rounded up to 8, 16 or 32.
        tokens: usize,
    },
    /// Tokens as M (`TILE_M` rows), weights as N, larger warp tiles with K split between
    /// warps (`gemm_prefill.cuh`).
    Prefill,
}

impl TileShape {
    /// Rows of the block the tile computes at most.
    pub fn rows(self) -> usize {
        match self {
            TileShape::Classic | TileShape::Prefill => TILE_M,
            TileShape::Decode { tokens } => tokens,
        }
    }
}

/// The rule: the shape of the tile for a row block of `rows` pairs (`1..=TILE_M`).
pub fn tile_for(mode: TileMode, dtype: Dtype, rows: usize) -> TileShape {
    if mode == TileMode::Classic {
        return TileShape::Classic;
    }
    if rows > DECODE_MAX_ROWS {
        // f32 has no prefill tile (its GEMM is FFMA).
        return if dtype == Dtype::F32 {
            TileShape::Classic
        } else {
            TileShape::Prefill
        };
    }
    TileShape::Decode {
        tokens: rows.max(8).next_power_of_two(),
    }
}

/// Routed row blocks per tile shape (what the stage checks report, so that a run shows which
/// tile paths it exercised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileCensus {
    /// Blocks computed by the decode tile.
    pub decode: usize,
    /// Blocks computed by the prefill tile.
    pub prefill: usize,
    /// Blocks computed by the classic tile.
    pub classic: usize,
}

impl TileCensus {
    /// Counts one block of shape `shape`.
    pub fn add(&mut self, shape: TileShape) {
        match shape {
            TileShape::Decode { .. } => self.decode += 1,
            TileShape::Prefill => self.prefill += 1,
            TileShape::Classic => self.classic += 1,
        }
    }

    /// Blocks of every shape.
    pub fn total(&self) -> usize {
        self.decode + self.prefill + self.classic
    }
}

impl std::fmt::Display for TileCensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} decode + {} prefill + {} classic tile blocks",
            self.decode, self.prefill, self.classic
        )
    }
}

impl LayerPlan {
    /// The shape of the tile for a routed row block of `rows` pairs under this plan's
    /// [`TileMode`] (see [`tile_for`]).
    pub fn tile_for(&self, rows: usize) -> TileShape {
        tile_for(self.tile_mode, self.config.dtype, rows)
    }

    /// The shapes of the row blocks of pair lists of `pairs` kept pairs each (one list per
    /// (source, local expert)), as the executors cut them: `TILE_M` pairs per block, the
    /// last block short.
    pub fn tile_census(&self, pairs: impl IntoIterator<Item = usize>) -> TileCensus {
        let mut census = TileCensus::default();
        for n in pairs {
            for r0 in (0..n).step_by(TILE_M) {
                census.add(self.tile_for((n - r0).min(TILE_M)));
            }
        }
        census
    }

    /// This plan with tile mode `mode` (the layout does not depend on it).
    pub fn with_tile_mode(mut self, mode: TileMode) -> Self {
        self.tile_mode = mode;
        self
    }
}
