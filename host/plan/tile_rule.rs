//! The tile rule: which routed row blocks form one GEMM task, and which tile shape computes
//! a task, as pure functions of the pair list's length, the dtype and the run's
//! [`TileMode`].
//!
//! A routed row block is always `TILE_M` pairs of one (source, local expert) pair list (the
//! last block of the list short) and its GEMM tiles always cover `TILE_N` output columns. A
//! task computes one block, or, under [`TileMode::Auto`] in bf16/f16, two consecutive
//! blocks `2j` and `2j + 1` as one wide task of up to [`WIDE_ROWS`] rows when block `2j + 1`
//! has more than [`DECODE_MAX_ROWS`] rows ([`task_rows`]; block `2j + 1` then has no task of
//! its own). So the task decomposition depends on the rule for wide tasks only; the
//! workspace (per pair and per block) and the block counters do not. The shapes:
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
//! - [`TileShape::Prefill`]: a bf16/f16 block of more than [`DECODE_MAX_ROWS`] rows (that
//!   is not part of a wide task), tokens as M and weights as N as in the classic tile, but
//!   with larger warp tiles: the 8 warps split each 64-deep K step (32x32 warp tiles x 2 K
//!   splits when gated, 32x64 x 4 otherwise) and the partial tiles are summed in a fixed
//!   order in the epilogue. Per k16 step that is 3 `ldmatrix` per 8 `mma` (classic: 3 per
//!   4, gated 5 per 8), at the same 64x64 block tile.
//! - [`TileShape::Wide`]: a wide task (bf16/f16, [`TileMode::Auto`]) of more than `TILE_M`
//!   rows: tokens as M over [`WIDE_ROWS`] rows, weights as N (`gemm_prefill.cuh` at
//!   `kRows` = 128), so each weight tile is read once for both blocks.
//!
//! [`TileMode::Narrow`] is auto without wide tasks (every task one block), and
//! [`TileMode::Classic`] every task one block with the classic tile. [`TileMode::AutoSerial`]
//! has auto's tasks and shapes; only the kernel's pipeline differs (no tile issues the next
//! task's first stage early, `next_stage.cuh`), so everything here treats it as auto.
//!
//! The kernel evaluates the same rule per task (`fm::task_rows` and `fm::tile_for` in
//! tile_rule.cuh, documented in params.h next to `FM_TILES_AUTO`); the CPU executor runs one
//! expert unit per task with the shape the rule gives it (values are bit-identical whatever
//! the tasks and shapes: every output is one chain over its row and column alone).

use super::{LayerPlan, TILE_M};
use crate::config::Dtype;

/// Most rows of a block that the decode (swapped-operand) tile takes.
pub const DECODE_MAX_ROWS: usize = 32;

/// Most rows of one task: a wide task's two row blocks.
pub const WIDE_ROWS: usize = 2 * TILE_M;

/// Which tile shapes a run may use (`FmLayerParams::tile_mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum TileMode {
    /// The rule picks the tasks and shapes by rows (`FM_TILES_AUTO`): wide tasks of two
    /// blocks in bf16/f16, else decode, prefill (bf16/f16) or classic (f32) per block.
    #[default]
    Auto,
    /// Every block uses the classic 64x64 tile (`FM_TILES_CLASSIC`): the path before the
    /// rule (no decode, prefill nor wide tile), kept selectable until a GPU has compared
    /// them.
    Classic,
    /// As [`TileMode::Auto`] without wide tasks: every task is one block
    /// (`FM_TILES_NARROW`, the rule before wide tasks).
    Narrow,
    /// Auto's tasks and tile shapes, but no tile starts the next task's first stage before
    /// its own completion step (`FM_TILES_AUTO_SERIAL`; auto and narrow do, in the P2P
    /// build): the A/B switch of that overlap, kept until a GPU has compared them. The
    /// outputs are auto's, bit for bit.
    AutoSerial,
}

impl TileMode {
    /// Every mode, in the order of their codes (auto 0, classic 1, narrow 2, auto-serial 3).
    pub const ALL: [TileMode; 4] = [
        TileMode::Auto,
        TileMode::Classic,
        TileMode::Narrow,
        TileMode::AutoSerial,
    ];

    /// The `FM_TILES_*` code of the mode.
    pub fn code(self) -> u32 {
        match self {
            TileMode::Auto => 0,
            TileMode::Classic => 1,
            TileMode::Narrow => 2,
            TileMode::AutoSerial => 3,
        }
    }

    /// The mode's name on the command line (`auto`, `classic`, `narrow`, `auto-serial`).
    pub fn name(self) -> &'static str {
        match self {
            TileMode::Auto => "auto",
            TileMode::Classic => "classic",
            TileMode::Narrow => "narrow",
            TileMode::AutoSerial => "auto-serial",
        }
    }
}

impl std::str::FromStr for TileMode {
    type Err = String;
    /// The mode whose [`TileMode::name`] is `s`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        TileMode::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = TileMode::ALL.iter().map(|m| m.name()).collect();
                format!("`{s}`: expected one of {}", names.join(", "))
            })
    }
}

/// The shape of the tile that computes one routed task.
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
    /// Tokens as M ([`WIDE_ROWS`] rows: two row blocks), weights as N
    /// (`gemm_prefill.cuh` at `kRows` = 128).
    Wide,
}

impl TileShape {
    /// Rows of the task the tile computes at most.
    pub fn rows(self) -> usize {
        match self {
            TileShape::Classic | TileShape::Prefill => TILE_M,
            TileShape::Decode { tokens } => tokens,
            TileShape::Wide => WIDE_ROWS,
        }
    }
}

/// Whether a run of `mode` and `dtype` pairs row blocks into wide tasks: auto (and
/// auto-serial, the same tasks) in bf16/f16 (f32 has no wide tile).
pub fn wide_tasks(mode: TileMode, dtype: Dtype) -> bool {
    matches!(mode, TileMode::Auto | TileMode::AutoSerial) && dtype != Dtype::F32
}

/// The rows of the task of row block `rb` of a pair list of `count` pairs (`rb * TILE_M <
/// count`; 0 past the list): the block's own rows, those of blocks `rb` and `rb + 1` when
/// they form a wide task (`rb` even, block `rb + 1` longer than [`DECODE_MAX_ROWS`]), or 0
/// when `rb` is the second block of a wide task (it has no task of its own).
pub fn task_rows(mode: TileMode, dtype: Dtype, count: usize, rb: usize) -> usize {
    let rest = count.saturating_sub(rb.saturating_mul(TILE_M));
    if wide_tasks(mode, dtype) {
        let even = rb.is_multiple_of(2);
        if !even && rest > DECODE_MAX_ROWS {
            return 0; // the tail of block rb - 1's task
        }
        if even && rest > TILE_M + DECODE_MAX_ROWS {
            return rest.min(WIDE_ROWS);
        }
    }
    rest.min(TILE_M)
}

/// The tasks of a pair list of `count` pairs, in order, as `(first pair, rows)`: every row
/// block's [`task_rows`], the tails of wide tasks skipped. Their rows sum to `count`.
pub fn tasks(mode: TileMode, dtype: Dtype, count: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..count.div_ceil(TILE_M)).filter_map(move |rb| {
        let rows = task_rows(mode, dtype, count, rb);
        (rows > 0).then_some((rb * TILE_M, rows))
    })
}

/// The rule: the shape of the tile for a task of `rows` pairs (`1..=WIDE_ROWS`; more than
/// `TILE_M` rows only for the wide tasks of [`task_rows`]).
pub fn tile_for(mode: TileMode, dtype: Dtype, rows: usize) -> TileShape {
    if mode == TileMode::Classic {
        return TileShape::Classic;
    }
    if rows > TILE_M {
        return TileShape::Wide;
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

/// Routed tasks per tile shape (what the stage checks report, so that a run shows which
/// tile paths it exercised).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TileCensus {
    /// Tasks computed by the decode tile.
    pub decode: usize,
    /// Tasks computed by the prefill tile.
    pub prefill: usize,
    /// Tasks computed by the wide tile (two row blocks each).
    pub wide: usize,
    /// Tasks computed by the classic tile.
    pub classic: usize,
}

impl TileCensus {
    /// Counts one task of shape `shape`.
    pub fn add(&mut self, shape: TileShape) {
        match shape {
            TileShape::Decode { .. } => self.decode += 1,
            TileShape::Prefill => self.prefill += 1,
            TileShape::Wide => self.wide += 1,
            TileShape::Classic => self.classic += 1,
        }
    }

    /// Tasks of every shape.
    pub fn total(&self) -> usize {
        self.decode + self.prefill + self.wide + self.classic
    }
}

impl std::fmt::Display for TileCensus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} decode + {} prefill + {} wide + {} classic tile tasks",
            self.decode, self.prefill, self.wide, self.classic
        )
    }
}

impl LayerPlan {
    /// The shape of the tile for a routed task of `rows` pairs under this plan's
    /// [`TileMode`] (see [`tile_for`]).
    pub fn tile_for(&self, rows: usize) -> TileShape {
        tile_for(self.tile_mode, self.config.dtype, rows)
    }

    /// The rows of the task of row block `rb` of a pair list of `count` pairs under this
    /// plan's [`TileMode`] and dtype (see [`task_rows`]; 0 for the tail of a wide task).
    pub fn task_rows(&self, count: usize, rb: usize) -> usize {
        task_rows(self.tile_mode, self.config.dtype, count, rb)
    }

    /// The tasks of a pair list of `count` pairs under this plan's rule, as `(first pair,
    /// rows)` (see [`tasks`]).
    pub fn tasks(&self, count: usize) -> impl Iterator<Item = (usize, usize)> {
        tasks(self.tile_mode, self.config.dtype, count)
    }

    /// The shapes of the tasks of pair lists of `pairs` kept pairs each (one list per
    /// (source, local expert)), as the executors cut them: `TILE_M` pairs per block, the
    /// last block short, blocks paired into wide tasks by [`task_rows`].
    pub fn tile_census(&self, pairs: impl IntoIterator<Item = usize>) -> TileCensus {
        let mut census = TileCensus::default();
        for n in pairs {
            for (_, rows) in self.tasks(n) {
                census.add(self.tile_for(rows));
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
