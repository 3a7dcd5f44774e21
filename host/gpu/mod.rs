//! The GPU backend: the kernels embedded by `build.rs`, device discovery, and (from the
//! runtime modules) the layer that launches them.
//!
//! Everything here builds on machines without CUDA: the driver is loaded at run time
//! (cudarc with dynamic loading), and a library built without nvcc reports
//! [`Error::NoKernels`](crate::Error::NoKernels) instead of failing to compile.

pub mod kernels;
pub mod layer;
pub mod model;
pub mod probe;
pub mod roofline;

/// True when the environment variable `FLASHMOE_EXPECT_GPU` is set (to anything but empty
/// or `0`): GPU tests then fail instead of skipping when no usable GPU or kernel is found,
/// so a run on a GPU machine cannot pass by skipping everything.
pub fn expect_gpu() -> bool {
    std::env::var("FLASHMOE_EXPECT_GPU").is_ok_and(|v| !matches!(v.trim(), "" | "0"))
}
