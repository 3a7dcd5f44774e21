//! The model-op kernels of `kernel/model_ops.cu`: the RMSNorm in front of each MoE block
//! and the residual add after it. Parameter structs mirror
//! `kernel/include/flashmoe/model_ops.cuh` (the offsets are pinned on both sides), entry
//! points are named by (state dtype, layer dtype), launch shapes are pure functions.

use crate::config::Dtype;
use crate::error::{Error, Result};
use crate::gpu::kernels;
use crate::gpu::layer::device_buffers::cuda;
use crate::params::MAX_LAUNCH_RANKS;
use cudarc::driver::{result, CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;
use std::sync::Arc;

/// Name of the model-op cubin (`kernel/model_ops.cu`) for [`kernels::cubin`].
pub const CUBIN: &str = "model_ops";

/// `FM_MODEL_OP_THREADS`: threads of every model-op block.
pub const MODEL_OP_THREADS: u32 = 256;

/// Most blocks per rank of one residual launch (grid-stride beyond).
pub const MAX_RESIDUAL_BLOCKS: u32 = 2048;

/// `FmNormParams`: one RMSNorm launch over every rank (block `(row, rank)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NormParams {
    /// Per rank: the residual state, state dtype `[rows][hidden]`.
    pub x: [u64; MAX_LAUNCH_RANKS],
    /// Per rank: the normalised rows, layer dtype `[rows][hidden]`.
    pub out: [u64; MAX_LAUNCH_RANKS],
    /// Per rank: rows (tokens).
    pub rows: [u32; MAX_LAUNCH_RANKS],
    /// The norm weight, f32 `[hidden]`.
    pub weight: u64,
    /// Row length.
    pub hidden: u32,
    /// `rms_norm_eps`.
    pub eps: f32,
    /// The LayerNorm bias, f32 `[hidden]` (PhiMoE); 0 for RMSNorm.
    pub bias: u64,
}

/// `FmResidualParams`: one residual add over every rank (`state = round(state + y)`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ResidualParams {
    /// Per rank: the residual state, state dtype `[rows][hidden]`, updated in place.
    pub state: [u64; MAX_LAUNCH_RANKS],
    /// Per rank: the layer output, layer dtype `[rows][hidden]`.
    pub y: [u64; MAX_LAUNCH_RANKS],
    /// Per rank: rows (tokens).
    pub rows: [u32; MAX_LAUNCH_RANKS],
    /// Row length.
    pub hidden: u32,
    /// Padding (the C struct's `pad_`).
    pub pad: u32,
}

/// Which model op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `fm_rms_norm_*`.
    RmsNorm,
    /// `fm_residual_add_*`.
    ResidualAdd,
}

/// The (state dtype, layer dtype) pairs the cubin holds: an f32 state with any layer
/// dtype, or a state in the layer's own dtype.
pub const PAIRS: [(Dtype, Dtype); 5] = [
    (Dtype::F32, Dtype::F32),
    (Dtype::F32, Dtype::Bf16),
    (Dtype::F32, Dtype::F16),
    (Dtype::Bf16, Dtype::Bf16),
    (Dtype::F16, Dtype::F16),
];

/// The entry point of `op` for a residual state of dtype `state` and a layer of dtype
/// `dtype`. Errors: [`Error::InvalidInput`] (`state dtype`) for a 16-bit state with a
/// layer of another dtype.
pub fn entry_point(op: Op, state: Dtype, dtype: Dtype) -> Result<&'static str> {
    use Dtype::{Bf16, F16, F32};
    let name = match (op, state, dtype) {
        (Op::RmsNorm, F32, F32) => "fm_rms_norm_f32_f32",
        (Op::RmsNorm, F32, Bf16) => "fm_rms_norm_f32_bf16",
        (Op::RmsNorm, F32, F16) => "fm_rms_norm_f32_f16",
        (Op::RmsNorm, Bf16, Bf16) => "fm_rms_norm_bf16_bf16",
        (Op::RmsNorm, F16, F16) => "fm_rms_norm_f16_f16",
        (Op::ResidualAdd, F32, F32) => "fm_residual_add_f32_f32",
        (Op::ResidualAdd, F32, Bf16) => "fm_residual_add_f32_bf16",
        (Op::ResidualAdd, F32, F16) => "fm_residual_add_f32_f16",
        (Op::ResidualAdd, Bf16, Bf16) => "fm_residual_add_bf16_bf16",
        (Op::ResidualAdd, F16, F16) => "fm_residual_add_f16_f16",
        _ => {
            return Err(Error::input(
                "state dtype",
                format!(
                    "a {} residual state cannot feed a {} layer: use an f32 state or the \
                     layer's dtype",
                    state.name(),
                    dtype.name()
                ),
            ))
        }
    };
    Ok(name)
}

/// Grid of a norm launch: one block per row of the rank with the most rows (at least
/// one), one grid row per rank.
pub fn norm_grid(rows: &[usize]) -> Result<(u32, u32, u32)> {
    check_ranks(rows)?;
    let most = rows.iter().copied().max().unwrap_or(0).max(1);
    let x = u32::try_from(most).map_err(|_| Error::input("tokens", format!("{most} rows")))?;
    Ok((x, rows.len() as u32, 1))
}

/// Grid of a residual launch: enough blocks for four elements per thread over the rank
/// with the most elements, at most [`MAX_RESIDUAL_BLOCKS`] (grid-stride beyond), one grid
/// row per rank.
pub fn residual_grid(rows: &[usize], hidden: usize) -> Result<(u32, u32, u32)> {
    check_ranks(rows)?;
    let most = rows.iter().copied().max().unwrap_or(0) * hidden;
    let per_block = 4 * MODEL_OP_THREADS as usize;
    let blocks = most
        .div_ceil(per_block)
        .clamp(1, MAX_RESIDUAL_BLOCKS as usize);
    Ok((blocks as u32, rows.len() as u32, 1))
}

fn check_ranks(rows: &[usize]) -> Result<()> {
    if rows.is_empty() || rows.len() > MAX_LAUNCH_RANKS {
        return Err(Error::input(
            "ranks",
            format!(
                "{} ranks; a model op covers 1..={MAX_LAUNCH_RANKS}",
                rows.len()
            ),
        ));
    }
    Ok(())
}

/// Rows as the kernel's `u32` per-rank array.
pub fn rows_array(rows: &[usize]) -> Result<[u32; MAX_LAUNCH_RANKS]> {
    check_ranks(rows)?;
    let mut out = [0u32; MAX_LAUNCH_RANKS];
    for (o, &r) in out.iter_mut().zip(rows) {
        *o = u32::try_from(r).map_err(|_| Error::input("tokens", format!("{r} rows")))?;
    }
    Ok(out)
}

/// The loaded model-op kernels of one context.
#[derive(Debug)]
pub struct ModelOps {
    /// `(op, state, dtype, function)` for every pair of [`PAIRS`] and both ops.
    funcs: Vec<(Op, Dtype, Dtype, CudaFunction)>,
}

impl ModelOps {
    /// Loads the cubin into `ctx`. Errors: [`Error::NoKernels`] without kernels,
    /// [`Error::Cuda`].
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let image = kernels::cubin(CUBIN)?;
        ctx.bind_to_thread().map_err(cuda("bind context"))?;
        let module = ctx
            .load_module(Ptx::from_binary(image.to_vec()))
            .map_err(cuda("load model-op module"))?;
        let mut funcs = Vec::with_capacity(2 * PAIRS.len());
        for op in [Op::RmsNorm, Op::ResidualAdd] {
            for (s, d) in PAIRS {
                let f = module
                    .load_function(entry_point(op, s, d)?)
                    .map_err(cuda("find model-op entry point"))?;
                funcs.push((op, s, d, f));
            }
        }
        Ok(ModelOps { funcs })
    }

    fn func(&self, op: Op, state: Dtype, dtype: Dtype) -> Result<&CudaFunction> {
        let name = entry_point(op, state, dtype)?;
        self.funcs
            .iter()
            .find(|(o, s, d, _)| (*o, *s, *d) == (op, state, dtype))
            .map(|(_, _, _, f)| f)
            .ok_or_else(|| Error::NoKernels(format!("model-op entry point `{name}` not loaded")))
    }

    /// Enqueues one RMSNorm over every rank on `stream`.
    ///
    /// # Safety
    /// For every rank `r < rows.len()`, `p.x[r]` and `p.out[r]` must address
    /// `rows[r] * hidden` live elements of the state and layer dtypes, and `p.weight`
    /// `hidden` f32 values, all in `stream`'s context, until the launch has finished.
    pub unsafe fn rms_norm(
        &self,
        stream: &CudaStream,
        state: Dtype,
        dtype: Dtype,
        p: &NormParams,
        rows: &[usize],
    ) -> Result<()> {
        let f = self.func(Op::RmsNorm, state, dtype)?;
        let grid = norm_grid(rows)?;
        // SAFETY: the caller guarantees the pointers (this function's contract).
        unsafe { launch(f, grid, p, stream, "rms_norm launch") }
    }

    /// Enqueues one residual add over every rank on `stream`.
    ///
    /// # Safety
    /// For every rank `r < rows.len()`, `p.state[r]` and `p.y[r]` must address
    /// `rows[r] * hidden` live elements of the state and layer dtypes in `stream`'s
    /// context, until the launch has finished.
    pub unsafe fn residual_add(
        &self,
        stream: &CudaStream,
        state: Dtype,
        dtype: Dtype,
        p: &ResidualParams,
        rows: &[usize],
    ) -> Result<()> {
        let f = self.func(Op::ResidualAdd, state, dtype)?;
        let grid = residual_grid(rows, p.hidden as usize)?;
        // SAFETY: the caller guarantees the pointers (this function's contract).
        unsafe { launch(f, grid, p, stream, "residual_add launch") }
    }
}

/// Enqueues `f` with the one by-value parameter `params`.
///
/// # Safety
/// `P` must be the `#[repr(C)]` mirror of the kernel's parameter struct, and every
/// pointer in it valid for the launch.
unsafe fn launch<P: Copy>(
    f: &CudaFunction,
    grid: (u32, u32, u32),
    params: &P,
    stream: &CudaStream,
    what: &'static str,
) -> Result<()> {
    stream.context().bind_to_thread().map_err(cuda(what))?;
    let mut p = *params;
    let mut args = [&mut p as *mut P as *mut std::ffi::c_void];
    // SAFETY: the kernel takes one struct by value that `P` mirrors (layout pinned by the
    // static_asserts of model_ops.cuh and the tests below); the driver copies it before
    // returning; the pointers inside are the caller's contract.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            grid,
            (MODEL_OP_THREADS, 1, 1),
            0,
            stream.cu_stream(),
            &mut args,
        )
    }
    .map_err(cuda(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn param_layouts_match_model_ops_cuh() {
        // The same numbers as the static_asserts of kernel/include/flashmoe/model_ops.cuh.
        assert_eq!(offset_of!(NormParams, out), 64);
        assert_eq!(offset_of!(NormParams, rows), 128);
        assert_eq!(offset_of!(NormParams, weight), 160);
        assert_eq!(offset_of!(NormParams, hidden), 168);
        assert_eq!(offset_of!(NormParams, eps), 172);
        assert_eq!(offset_of!(NormParams, bias), 176);
        assert_eq!(size_of::<NormParams>(), 184);
        assert_eq!(offset_of!(ResidualParams, y), 64);
        assert_eq!(offset_of!(ResidualParams, rows), 128);
        assert_eq!(offset_of!(ResidualParams, hidden), 160);
        assert_eq!(size_of::<ResidualParams>(), 168);
    }

    #[test]
    fn constants_match_the_header() {
        let h = include_str!("../../../kernel/include/flashmoe/model_ops.cuh");
        assert!(h.contains(&format!("#define FM_MODEL_OP_THREADS {MODEL_OP_THREADS}")));
        let cu = include_str!("../../../kernel/model_ops.cu");
        for op in [Op::RmsNorm, Op::ResidualAdd] {
            for (s, d) in PAIRS {
                let name = entry_point(op, s, d).unwrap();
                let prefix = match op {
                    Op::RmsNorm => "fm_rms_norm_",
                    Op::ResidualAdd => "fm_residual_add_",
                };
                let suffix = name.strip_prefix(prefix).unwrap();
                assert!(cu.contains(&format!("FM_MODEL_OPS({suffix},")), "{name}");
            }
        }
    }

    #[test]
    fn entry_points_cover_f32_state_and_same_dtype_only() {
        for d in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            assert!(entry_point(Op::RmsNorm, Dtype::F32, d).is_ok());
            assert!(entry_point(Op::ResidualAdd, d, d).is_ok());
        }
        for (s, d) in [(Dtype::Bf16, Dtype::F16), (Dtype::F16, Dtype::F32)] {
            assert!(matches!(
                entry_point(Op::RmsNorm, s, d),
                Err(Error::InvalidInput {
                    field: "state dtype",
                    ..
                })
            ));
        }
        let names: std::collections::HashSet<_> = [Op::RmsNorm, Op::ResidualAdd]
            .into_iter()
            .flat_map(|op| PAIRS.map(|(s, d)| entry_point(op, s, d).unwrap()))
            .collect();
        assert_eq!(names.len(), 2 * PAIRS.len());
    }

    #[test]
    fn embedded_cubin_has_every_entry_point() {
        if !kernels::built_with_kernels() {
            return;
        }
        let bytes = kernels::cubin(CUBIN).unwrap();
        for op in [Op::RmsNorm, Op::ResidualAdd] {
            for (s, d) in PAIRS {
                let name = entry_point(op, s, d).unwrap();
                assert!(
                    bytes.windows(name.len()).any(|w| w == name.as_bytes()),
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn grids_cover_every_row_and_rank() {
        assert_eq!(norm_grid(&[3, 7, 0]).unwrap(), (7, 3, 1));
        assert_eq!(norm_grid(&[0]).unwrap(), (1, 1, 1));
        assert!(norm_grid(&[]).is_err());
        assert!(norm_grid(&[1; 9]).is_err());
        // 4 elements per thread: 100 rows x 1024 = 102400 elements -> 100 blocks.
        assert_eq!(residual_grid(&[100, 5], 1024).unwrap(), (100, 2, 1));
        assert_eq!(residual_grid(&[0, 0], 1024).unwrap(), (1, 2, 1));
        assert_eq!(
            residual_grid(&[1 << 20], 4096).unwrap().0,
            MAX_RESIDUAL_BLOCKS
        );
        let r = rows_array(&[1, 2, 3]).unwrap();
        assert_eq!(&r[..4], &[1, 2, 3, 0]);
    }
}
