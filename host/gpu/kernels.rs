//! PLACEHOLDER (gpu helper): the build helper's `host/gpu/kernels.rs` replaces this file at
//! merge. It exists only so that the layer runtime compiles on this branch; it has the same
//! signatures and always reports that no kernels were built.

use crate::error::{Error, Result};

/// Whether the crate was compiled with CUDA kernels (never, in this placeholder).
pub fn built_with_kernels() -> bool {
    false
}

/// Names of the embedded cubins (none in this placeholder).
pub fn names() -> &'static [&'static str] {
    &[]
}

/// The cubin compiled from `kernel/<name>.cu`.
pub fn cubin(name: &str) -> Result<&'static [u8]> {
    Err(Error::NoKernels(format!(
        "cubin `{name}` is not embedded: install the CUDA toolchain (scripts/install-cuda-toolchain.sh) and rebuild"
    )))
}

/// Checks that a device of compute capability `cc` can run the embedded cubins (never, in
/// this placeholder).
pub fn check_device(cc: (u32, u32)) -> Result<()> {
    Err(Error::NoKernels(format!(
        "no kernels to run on a device of compute capability {}.{}",
        cc.0, cc.1
    )))
}
