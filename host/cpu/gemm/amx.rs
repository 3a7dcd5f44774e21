//! AMX tiles for bf16 weights: `tdpbf16ps` on 16-row x 16-column f32 tiles, 32 depths
//! per instruction, with the same packed layout as [`super::Kernel::Bf16Dot`] (pairs along
//! `k`, which is AMX's own "VNNI" layout for the B operand).
//!
//! One call covers every row of a panel (up to 32 rows per pass: 4 accumulator tiles,
//! 2 of `x`, 2 of weights: the 8 tile registers) over the depths that are whole steps of
//! 32; the caller finishes any rest with `vdpbf16ps`. Each output element is the chain of
//! `tdpbf16ps` over its row of `x` and its column of `w` in depth order, whatever the
//! number of rows configured in its tile: bit-identical whatever the blocking.
//!
//! Linux asks for permission to use the AMX tile data once per process
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); elsewhere, or when refused, AMX is not used.

use super::{Lhs, PackedMatrix, NR};

/// Depths per `tdpbf16ps` (16 pairs).
pub const STEP: usize = 32;

/// Whether this CPU and OS let this process use AMX-BF16 (checked once).
pub fn available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(imp::request)
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// The tile configuration this thread has loaded during one GEMM call (loaded when first
/// needed, again only when the row split changes), released when dropped. It cannot
/// leave the thread that made it: tile state belongs to a thread.
#[derive(Default)]
pub(super) struct Tiles {
    /// Rows of the two row blocks of the configuration loaded, if any.
    loaded: Option<(usize, usize)>,
    _thread_bound: std::marker::PhantomData<*const ()>,
}

impl Drop for Tiles {
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if self.loaded.is_some() {
            imp::release();
        }
    }
}

/// Every row of `x` times panel `p` of `w` into `acc` (`[rows][NR]`, overwritten) over
/// the depths `0 .. d`, `d` the whole steps of [`STEP`] in `k`; returns `d` (0 when AMX
/// is not available: then `acc` is untouched).
pub(super) fn panel(
    x: &Lhs,
    w: &PackedMatrix,
    p: usize,
    acc: &mut [[f32; NR]],
    tiles: &mut Tiles,
) -> usize {
    let steps = x.k().min(w.k()) / STEP;
    if steps == 0 || !available() {
        return 0;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        let ldx = x.k().div_ceil(2);
        let b = &w.panel_u16(p)[..steps * STEP * NR];
        for (t, tile) in acc.chunks_mut(32).enumerate() {
            let xs = &x.pairs()[t * 32 * ldx..];
            imp::pass(xs, ldx, steps, b, tile, tiles);
        }
        steps * STEP
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        let _ = (p, acc, tiles);
        0
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use super::{Tiles, NR, STEP};
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    /// Steps ahead that the weight stream is prefetched (each step's 2 KiB comes from
    /// memory once per unit; the tile loads would otherwise wait on it).
    const AHEAD: usize = 2;

    /// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// AMX-BF16 and AMX-TILE in CPUID, AVX-512 BF16 (for the rest of `k`), and the
    /// kernel's permission for this process.
    pub(super) fn request() -> bool {
        // CPUID leaf 7, sub-leaf 0: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !super::super::avx512::has_bf16() {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) only changes which state
        // components this process may use; it reads and writes no memory of ours. The
        // syscall instruction clobbers rcx and r11, declared as such.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// Loads the configuration for row blocks of `m0` and `m1` rows, unless it is loaded.
    fn configure(tiles: &mut Tiles, m0: usize, m1: usize) {
        if tiles.loaded == Some((m0, m1)) {
            return;
        }
        let mut cfg = Config {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        // tmm0, tmm1: rows 0 .. 16 of the output (columns 0 .. 16, 16 .. 32); tmm2, tmm3:
        // rows 16 .. 32; tmm4, tmm5: the two row blocks of x; tmm6, tmm7: the two column
        // blocks of the weights (16 pairs deep).
        for (i, r) in [m0, m0, m1, m1, m0, m1, 16, 16].into_iter().enumerate() {
            cfg.rows[i] = r as u8;
            cfg.colsb[i] = if r == 0 { 0 } else { 64 };
        }
        // SAFETY: only reached once `request` granted AMX; ldtilecfg reads the 64 bytes
        // of `cfg`, a valid palette-1 configuration (rows <= 16, 64 bytes per row).
        unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
        tiles.loaded = Some((m0, m1));
    }

    /// Returns this thread's tile registers to their initial state.
    pub(super) fn release() {
        // SAFETY: tilerelease touches no memory; it only resets the tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// Rows `0 .. min(32, acc.len())` of `x` (bf16 pairs, `ldx` pairs per row) times the
    /// panel `b` (`[steps * 16][NR][2]` bf16) into `acc`, overwritten.
    pub(super) fn pass(
        x: &[u32],
        ldx: usize,
        steps: usize,
        b: &[u16],
        acc: &mut [[f32; NR]],
        tiles: &mut Tiles,
    ) {
        let rows = acc.len().min(32);
        if rows == 0 || steps == 0 {
            return;
        }
        let (m0, m1) = (rows.min(16), rows.saturating_sub(16));
        // Bounds of every tile read and write below, checked once: x rows 0 .. rows with
        // steps * 16 pairs each, b with steps * 16 pair rows of NR * 2 values.
        let x = &x[..(rows - 1) * ldx + steps * STEP / 2];
        let b = &b[..steps * STEP * NR];
        let acc = &mut acc[..rows];
        configure(tiles, m0, m1);
        let xstride = ldx * 4;
        let bstride = NR * 2 * 2;
        let out = acc.as_mut_ptr().cast::<u8>();
        // SAFETY: the CPU has AMX-TILE and AMX-BF16, the OS granted this process the
        // tile data (`request`) and the configuration for (m0, m1) is loaded. Every tileloadd reads `rows` rows of 64 bytes at its
        // stride inside the slices bounded above: x rows r < rows at pairs
        // s * 16 .. s * 16 + 16 <= steps * 16 <= ldx; b pair rows s * 16 .. s * 16 + 16,
        // bytes 0 .. 128 of each. Every tilestored writes m0 (m1) rows of 64 bytes at a
        // 128-byte stride (one [f32; NR] row of acc) inside acc's rows. Tiles 2, 3, 5 are
        // used only when m1 > 0.
        unsafe {
            asm!("tilezero tmm0", "tilezero tmm1", options(nostack, nomem));
            if m1 > 0 {
                asm!("tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            }
            for s in 0..steps {
                // The weights of step s + AHEAD (2 KiB, contiguous): a hint, which never
                // faults, so the address may pass the panel's end.
                let next = b
                    .as_ptr()
                    .wrapping_add((s + AHEAD) * STEP * NR)
                    .cast::<i8>();
                for line in 0..STEP * NR * 2 / 64 {
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(line * 64));
                }
                let a0 = x.as_ptr().add(s * STEP / 2);
                let b0 = b.as_ptr().add(s * STEP * NR);
                let b1 = b0.add(NR);
                asm!(
                    "tileloadd tmm4, [{a} + {sa}]",
                    "tileloadd tmm6, [{b0} + {sb}]",
                    "tileloadd tmm7, [{b1} + {sb}]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    a = in(reg) a0,
                    sa = in(reg) xstride,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sb = in(reg) bstride,
                    options(nostack, readonly),
                );
                if m1 > 0 {
                    asm!(
                        "tileloadd tmm5, [{a} + {sa}]",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        a = in(reg) a0.add(16 * ldx),
                        sa = in(reg) xstride,
                        options(nostack, readonly),
                    );
                }
            }
            asm!(
                "tilestored [{o} + {s}], tmm0",
                "tilestored [{o1} + {s}], tmm1",
                o = in(reg) out,
                o1 = in(reg) out.add(64),
                s = in(reg) NR * 4,
                options(nostack),
            );
            if m1 > 0 {
                asm!(
                    "tilestored [{o} + {s}], tmm2",
                    "tilestored [{o1} + {s}], tmm3",
                    o = in(reg) out.add(16 * NR * 4),
                    o1 = in(reg) out.add(16 * NR * 4 + 64),
                    s = in(reg) NR * 4,
                    options(nostack),
                );
            }
        }
    }
}
