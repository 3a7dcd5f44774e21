//! The launch ABI of the layer kernel as the host needs it (kernel/README.md): which cubin,
//! which entry point per dtype, threads per block, dynamic shared memory, and the fewest
//! blocks a rank group needs.

use crate::config::Dtype;

/// Name of the cubin (`kernel/flashmoe.cu`) in [`crate::gpu::kernels::cubin`].
pub const CUBIN: &str = "flashmoe";

/// The `extern "C" __global__ void (FmKernelParams)` entry point for `dtype`.
pub fn entry_point(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Bf16 => "flashmoe_layer_bf16",
        Dtype::F16 => "flashmoe_layer_f16",
        Dtype::F32 => "flashmoe_layer_f32",
    }
}

/// `FM_BLOCK_THREADS`: threads per block.
pub const BLOCK_THREADS: u32 = 256;

/// Dynamic shared memory per block for `dtype`, bytes (`FM_SMEM_BYTES_*`).
pub fn smem_bytes(dtype: Dtype) -> u32 {
    match dtype {
        Dtype::Bf16 | Dtype::F16 => 64 * 1024,
        Dtype::F32 => 96 * 1024,
    }
}

/// `FM_MIN_BLOCKS_PER_RANK`: fewest blocks one rank group needs to play every role.
pub const MIN_BLOCKS_PER_RANK: usize = 2;
