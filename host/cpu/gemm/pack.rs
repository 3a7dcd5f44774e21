//! The two operands of [`super::gemm`]: the weights packed into panels in their own dtype
//! ([`PackedMatrix`]), and the rows of `x` in the form the kernel reads ([`Lhs`]).

use super::super::bf16::bits_row;
use super::{Kernel, NR};
use crate::Dtype;
use bytemuck::{Pod, Zeroable};

/// One 64-byte cache line: the storage unit, so that every panel row starts on a line.
#[derive(Clone, Copy, Pod, Zeroable)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A weight matrix `[n][k]` packed for one [`Kernel`]: `ceil(n / NR)` panels of `NR`
/// columns (the last one padded with zeros), each `k` deep, values in the dtype's own
/// width (2 bytes for bf16 and f16, 4 for f32).
pub struct PackedMatrix {
    n: usize,
    k: usize,
    kernel: Kernel,
    dtype: Dtype,
    /// Elements of one panel (`NR * k`, `k` rounded up to even for the bf16-pair kernels).
    panel_len: usize,
    data: Storage,
}

/// The packed values' memory: for a matrix of [`HUGE`] bytes or more an anonymous mapping
/// (zeroed, page-aligned) that Linux is asked to back with transparent huge pages, else a
/// vector of lines.
///
/// Why: a unit streams its expert's weights once from memory, panel after panel, and in
/// 4 KiB pages every page of the stream is a TLB miss (a page walk in the way of the loads
/// and prefetches); 2 MiB pages remove nearly all of them. With transparent huge pages in
/// `madvise` mode, as is common, an ordinary allocation gets none. Measured on the 2-core
/// Sapphire Rapids of issue 13: 5 to 13% off the f32 layer, 7% off bf16.
enum Storage {
    Lines(Vec<Line>),
    Map(memmap2::MmapMut),
}

/// Matrices of at least this many bytes (one huge page) are mapped.
const HUGE: usize = 1 << 21;

impl Storage {
    /// `lines` zeroed lines.
    fn zeroed(lines: usize) -> Self {
        if lines * 64 >= HUGE {
            if let Ok(m) = memmap2::MmapMut::map_anon(lines * 64) {
                // Only a hint: without huge pages the mapping works all the same.
                #[cfg(target_os = "linux")]
                let _ = m.advise(memmap2::Advice::HugePage);
                return Storage::Map(m);
            }
        }
        Storage::Lines(vec![Line::zeroed(); lines])
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Lines(v) => bytemuck::cast_slice(v),
            Storage::Map(m) => m,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Storage::Lines(v) => bytemuck::cast_slice_mut(v),
            Storage::Map(m) => m,
        }
    }
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedMatrix")
            .field("n", &self.n)
            .field("k", &self.k)
            .field("kernel", &self.kernel)
            .field("dtype", &self.dtype)
            .finish_non_exhaustive()
    }
}

impl PackedMatrix {
    /// Packs the first `n` rows of `w` (`[n][k]`; rows missing from `w` are zeros), each value
    /// rounded to `dtype`, for the fastest kernel of this CPU.
    pub fn pack(w: &[f32], n: usize, k: usize, dtype: Dtype) -> Self {
        Self::pack_for(w, n, k, dtype, Kernel::detect(dtype))
    }

    /// As [`PackedMatrix::pack`] for `kernel`, or for the portable kernel when this CPU
    /// lacks `kernel`'s instructions or `kernel` does not take `dtype`.
    pub fn pack_for(w: &[f32], n: usize, k: usize, dtype: Dtype, kernel: Kernel) -> Self {
        let kernel = if kernel.fits(dtype) && kernel.supported() {
            kernel
        } else {
            Kernel::Portable
        };
        let depth = if kernel.pairs() {
            k.next_multiple_of(2)
        } else {
            k
        };
        let panel_len = (NR * depth).next_multiple_of(32);
        let panels = n.div_ceil(NR);
        let mut m = PackedMatrix {
            n,
            k,
            kernel,
            dtype,
            panel_len,
            data: Storage::zeroed((panels * panel_len * dtype.size()).div_ceil(64)),
        };
        match dtype {
            Dtype::F32 => m.fill(w, |v| v),
            Dtype::Bf16 => m.fill(w, |v| half::bf16::from_f32(v).to_bits()),
            Dtype::F16 => m.fill(w, |v| half::f16::from_f32(v).to_bits()),
        }
        m
    }

    /// Writes every column of `w` present in full into its panel, converted by `conv`.
    fn fill<T: Pod>(&mut self, w: &[f32], conv: impl Fn(f32) -> T) {
        let (n, k, kernel) = (self.n, self.k, self.kernel);
        // Position of (column c of the panel, depth i) inside the panel.
        let pairs = kernel.pairs();
        let pos = |c: usize, i: usize| {
            if pairs {
                (i / 2) * 2 * NR + 2 * c + i % 2
            } else {
                i * NR + c
            }
        };
        let dst = bytemuck::cast_slice_mut::<u8, T>(self.data.bytes_mut());
        for (p, panel) in dst.chunks_mut(self.panel_len).enumerate() {
            for c in 0..NR.min(n.saturating_sub(p * NR)) {
                let col = p * NR + c;
                let Some(row) = w.get(col * k..(col + 1) * k) else {
                    continue;
                };
                for (i, &v) in row.iter().enumerate() {
                    panel[pos(c, i)] = conv(v);
                }
            }
        }
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Depth (the length of each row of `x`).
    pub fn k(&self) -> usize {
        self.k
    }

    /// The kernel it is packed for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The dtype of its values.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        self.data.bytes().len()
    }

    /// Panel `p` as f32 values (f32 matrices only; empty otherwise).
    pub(super) fn panel_f32(&self, p: usize) -> &[f32] {
        match self.dtype {
            Dtype::F32 => {
                let all = bytemuck::cast_slice::<u8, f32>(self.data.bytes());
                &all[p * self.panel_len..(p + 1) * self.panel_len]
            }
            _ => &[],
        }
    }

    /// Panel `p` as 16-bit values (bf16 and f16 matrices only; empty otherwise).
    pub(super) fn panel_u16(&self, p: usize) -> &[u16] {
        match self.dtype {
            Dtype::F32 => &[],
            _ => {
                let all = bytemuck::cast_slice::<u8, u16>(self.data.bytes());
                &all[p * self.panel_len..(p + 1) * self.panel_len]
            }
        }
    }
}

/// The rows of `x` for one kernel: f32 as given, or bf16 pairs along `k` for
/// [`Kernel::Bf16Dot`] and [`Kernel::Bf16Amx`] (each value rounded to bf16, a no-op for a
/// bf16 layer's rows).
pub struct Lhs<'a> {
    rows: usize,
    k: usize,
    kernel: Kernel,
    data: LhsData<'a>,
}

/// The rows of `x` (`[rows][k]`) as row tiles, each `[k][m]` from `r0 * k`.
fn tiles(x: &[f32], k: usize) -> Vec<f32> {
    let rows = x.len().checked_div(k).unwrap_or(0);
    let mut out = vec![0f32; rows * k];
    for (r0, m) in super::row_tiles(rows) {
        let tile = &mut out[r0 * k..(r0 + m) * k];
        for r in 0..m {
            let row = &x[(r0 + r) * k..(r0 + r + 1) * k];
            for (i, &v) in row.iter().enumerate() {
                tile[i * m + r] = v;
            }
        }
    }
    out
}

/// The rows of `x` (`[rows][k]`) as bf16 pairs, `[rows][ceil(k / 2)]`: in memory, each
/// row's bf16 values in order (little-endian pairs), then a zero when `k` is odd.
fn pairs(x: &[f32], k: usize) -> Vec<u32> {
    let half = k.div_ceil(2);
    let mut out = vec![0u32; x.len().div_ceil(k.max(1)) * half];
    for (row, o) in x.chunks(k.max(1)).zip(out.chunks_mut(half.max(1))) {
        bits_row(row, bytemuck::cast_slice_mut::<u32, u16>(o));
    }
    out
}

enum LhsData<'a> {
    F32(&'a [f32]),
    /// Row tile by row tile ([`super::row_tiles`]), each `[k][m]` (its `m` rows side by
    /// side, depth by depth) from `r0 * k`: one pointer serves the whole tile.
    Tiles(Vec<f32>),
    /// `[rows][ceil(k / 2)]`: `x[2i]` in the low half, `x[2i + 1]` (or 0) in the high half.
    Pairs(Vec<u32>),
}

impl<'a> Lhs<'a> {
    /// The first `rows` rows of `x` (`[rows][k]`; fewer when `x` is shorter) for `kernel`.
    pub fn new(x: &'a [f32], rows: usize, k: usize, kernel: Kernel) -> Self {
        let rows = x.len().checked_div(k).map_or(rows, |n| rows.min(n));
        let x = &x[..rows * k];
        let data = match kernel {
            Kernel::Bf16Amx | Kernel::Bf16Dot => LhsData::Pairs(pairs(x, k)),
            Kernel::Portable => LhsData::F32(x),
            Kernel::F32Fma | Kernel::Bf16Fma | Kernel::F16Fma => LhsData::Tiles(tiles(x, k)),
        };
        Lhs {
            rows,
            k,
            kernel,
            data,
        }
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Depth.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The kernel it is prepared for.
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }

    /// The f32 rows (the portable kernel's; empty for the others).
    pub(super) fn f32_rows(&self) -> &[f32] {
        match &self.data {
            LhsData::F32(x) => x,
            LhsData::Pairs(_) | LhsData::Tiles(_) => &[],
        }
    }

    /// The f32 row tiles (the FMA kernels'; empty for the others): the tile of rows
    /// `r0 .. r0 + m` is `[k][m]` from `r0 * k`.
    pub(super) fn tiles(&self) -> &[f32] {
        match &self.data {
            LhsData::Tiles(t) => t,
            LhsData::F32(_) | LhsData::Pairs(_) => &[],
        }
    }

    /// The bf16 pairs, `[rows][ceil(k / 2)]` (empty for other kernels).
    pub(super) fn pairs(&self) -> &[u32] {
        match &self.data {
            LhsData::Pairs(p) => p,
            LhsData::F32(_) | LhsData::Tiles(_) => &[],
        }
    }
}
