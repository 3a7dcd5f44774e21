//! The CPU executor's GEMM: `out[r][c] = x_r . w_c` with the weights `w` (`[n][k]`, the
//! checkpoints' `[out, in]`) packed once per executor, in their own dtype, into panels of
//! [`NR`] columns, and `x` (`[rows][k]`, at most a few dozen rows: one expert unit) in f32.
//!
//! Why hand-written `std::arch` kernels and not a crate: the crates that fit (`gemm`,
//! `faer`, `matrixmultiply`) multiply f32 (and f16 for `gemm`), but as far as their
//! documentation goes none takes bf16 weights without a widened f32 copy, none uses AMX or
//! `vdpbf16ps`, and each packs its operands again on every call, while here the same
//! weights are multiplied by a few dozen rows at a time, thousands of times per forward:
//! packing them once, in their own dtype, is what pays. (They were not timed here.) On the
//! 2-core Sapphire Rapids of the issue, single-threaded, [`Kernel::Bf16Amx`] reaches about
//! 550 to 700 GFLOP/s at 32 to 64 x 2048 x 2048 and [`Kernel::F32Fma`] about 90 to 95
//! (`gemm_speed` in the tests, run by hand, with other jobs on the cores).
//!
//! The kernel is chosen at run time from the CPU and the dtype ([`Kernel::detect`]):
//! AMX (`tdpbf16ps`) for bf16 where the CPU has AMX-BF16 and Linux grants it, else
//! AVX-512 with `vdpbf16ps` where the CPU has `avx512_bf16`, AVX-512F FMA for f32,
//! for f16 (widened by `vcvtph2ps`) and for bf16 without `avx512_bf16`, and a portable
//! kernel (multiply then add, vectorised by the compiler) elsewhere.
//!
//! Determinism: every output value is computed by one chain of operations over `k` in
//! order (one accumulator per output, no split of `k` across threads), so it
//! depends only on its row of `x`, its column of `w` and the kernel: not on how many rows
//! or columns are computed together, nor on the thread. Kernels differ in rounding (FMA,
//! `tdpbf16ps` over 32 depths or `vdpbf16ps` over 2, both flushing subnormals, or
//! multiply-then-add), so results
//! may differ between machines whose CPUs pick different kernels; on one machine they are
//! bit-identical run to run and whatever the thread count.

mod amx;
mod avx512;
mod pack;
mod portable;

pub use pack::{Lhs, PackedMatrix};

/// Columns of one packed panel (two AVX-512 registers of f32).
pub const NR: usize = 32;
/// Rows of `x` per register tile.
pub const MR: usize = 8;
/// Depth of one cache block: a panel's block (`KC x NR`, 16 KiB in f32, 8 KiB in bf16)
/// stays in L1 while every row tile of `x` passes over it. Even, for `vdpbf16ps` pairs.
pub const KC: usize = 128;

/// How a packed matrix is stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// f32 weights `[k][NR]` per panel; AVX-512F FMA.
    F32Fma,
    /// bf16 weights in pairs along `k` (`[k / 2][NR][2]` per panel) and `x` rounded to
    /// bf16; AMX `tdpbf16ps` (f32 accumulation, subnormals flushed) on whole steps of 32
    /// depths, `vdpbf16ps` on the rest.
    Bf16Amx,
    /// bf16 weights in pairs along `k` (`[k / 2][NR][2]` per panel) and `x` rounded to
    /// bf16; AVX-512 BF16 `vdpbf16ps` (f32 accumulation, subnormals flushed).
    Bf16Dot,
    /// bf16 weights `[k][NR]` per panel, widened in registers; AVX-512F FMA.
    Bf16Fma,
    /// f16 weights `[k][NR]` per panel, widened by `vcvtph2ps`; AVX-512F FMA.
    F16Fma,
    /// Weights `[k][NR]` per panel in their dtype, widened; multiply then add, in
    /// portable code.
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs for weights of `dtype`, within the ceiling set by
    /// the environment variable `FLASHMOE_CPU_GEMM`: `portable` (the portable kernel only),
    /// `avx512` (no AMX), anything else or unset: the fastest.
    pub fn detect(dtype: crate::Dtype) -> Kernel {
        let ceiling = std::env::var("FLASHMOE_CPU_GEMM").unwrap_or_default();
        let order: &[Kernel] = match ceiling.as_str() {
            "portable" => &[],
            "avx512" => &Self::ALL[1..],
            _ => &Self::ALL,
        };
        order
            .iter()
            .copied()
            .find(|k| k.fits(dtype) && k.supported())
            .unwrap_or(Kernel::Portable)
    }

    /// Every kernel but the portable one, fastest first.
    const ALL: [Kernel; 5] = [
        Kernel::Bf16Amx,
        Kernel::Bf16Dot,
        Kernel::F32Fma,
        Kernel::Bf16Fma,
        Kernel::F16Fma,
    ];

    /// Whether it takes bf16 pairs along `k` (weights and `x`).
    pub fn pairs(self) -> bool {
        matches!(self, Kernel::Bf16Amx | Kernel::Bf16Dot)
    }

    /// Whether this kernel multiplies weights of `dtype`.
    pub fn fits(self, dtype: crate::Dtype) -> bool {
        use crate::Dtype::{Bf16, F16, F32};
        matches!(
            (self, dtype),
            (Kernel::F32Fma, F32)
                | (Kernel::Bf16Amx | Kernel::Bf16Dot | Kernel::Bf16Fma, Bf16)
                | (Kernel::F16Fma, F16)
                | (Kernel::Portable, _)
        )
    }

    /// Whether this CPU has the instructions the kernel needs.
    pub fn supported(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Bf16Amx => amx::available(),
            Kernel::Bf16Dot => avx512::has_bf16(),
            Kernel::F32Fma | Kernel::Bf16Fma | Kernel::F16Fma => avx512::has_f(),
        }
    }
}

/// `out[r * ldo + c] = x_r . w_(col0 + c)` for every row of `x` and `c < ncols`; nothing
/// else of `out` is written.
///
/// # Panics
/// When `x` and `w` differ in depth, the columns pass `w`'s, or `out` is too short: a
/// caller's bug, as an out-of-range slice index would be.
pub fn gemm(x: &Lhs, w: &PackedMatrix, col0: usize, ncols: usize, out: &mut [f32], ldo: usize) {
    let rows = x.rows();
    if rows == 0 || ncols == 0 {
        return;
    }
    assert!(
        x.k() == w.k() && x.kernel() == w.kernel() && col0 + ncols <= w.n(),
        "gemm: x is {rows} x {} ({:?}), w is {} x {} ({:?}), columns {col0}..{}",
        x.k(),
        x.kernel(),
        w.n(),
        w.k(),
        w.kernel(),
        col0 + ncols
    );
    let out = &mut out[..(rows - 1) * ldo + ncols];
    let mut acc = vec![[0f32; NR]; rows];
    let mut tiles = amx::Tiles::default();
    for p in col0 / NR..(col0 + ncols).div_ceil(NR) {
        panel(x, w, p, &mut acc, &mut tiles);
        let (lo, hi) = (col0.max(p * NR), (col0 + ncols).min((p + 1) * NR));
        for (r, a) in acc.iter().enumerate() {
            out[r * ldo + lo - col0..r * ldo + hi - col0]
                .copy_from_slice(&a[lo - p * NR..hi - p * NR]);
        }
    }
}

/// The row tiles `(first row, rows)` of a block of `rows` rows: as few as [`MR`] allows,
/// of even sizes (33 rows are 7, 7, 7, 6, 6, not 8, 8, 8, 8, 1: a tile of one row leaves
/// the FMA units waiting on its two chains of additions).
fn row_tiles(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = rows.div_ceil(MR);
    let (base, extra) = (rows / n.max(1), rows % n.max(1));
    (0..n).map(move |t| (t * base + t.min(extra), base + usize::from(t < extra)))
}

/// One call of a register-tile kernel: rows `r0 ..` of `x` (as many as the accumulator
/// tile has, at most [`MR`]) times depths `k0 .. k0 + kc` of panel `p`, added to the tile
/// (or into a zeroed tile when `first`).
#[derive(Debug, Clone, Copy)]
struct Step {
    r0: usize,
    p: usize,
    k0: usize,
    kc: usize,
    first: bool,
    /// This call's index among the row tiles of the block, and their count: the tiles
    /// share the prefetch of the next block.
    pass: usize,
    passes: usize,
}

/// Every row of `x` times panel `p` of `w` into `acc` (`[rows][NR]`): with AMX over the
/// whole steps of its depth where the kernel is [`Kernel::Bf16Amx`], then block by block
/// of [`KC`] along the rest of `k`, row tile by row tile ([`row_tiles`]).
fn panel(x: &Lhs, w: &PackedMatrix, p: usize, acc: &mut [[f32; NR]], tiles: &mut amx::Tiles) {
    let k = w.k();
    let from = match w.kernel() {
        Kernel::Bf16Amx => amx::panel(x, w, p, acc, tiles),
        _ => 0,
    };
    if k == 0 {
        acc.iter_mut().for_each(|a| *a = [0.0; NR]);
    }
    let passes = acc.len().div_ceil(MR);
    for k0 in (from..k).step_by(KC) {
        for (pass, (r0, m)) in row_tiles(acc.len()).enumerate() {
            let tile = &mut acc[r0..r0 + m];
            let s = Step {
                r0,
                p,
                k0,
                kc: KC.min(k - k0),
                first: k0 == 0,
                pass,
                passes,
            };
            match w.kernel() {
                Kernel::Portable => portable::tile(x, w, s, tile),
                _ => avx512::tile(x, w, s, tile),
            }
        }
    }
}

#[cfg(test)]
mod tests;
