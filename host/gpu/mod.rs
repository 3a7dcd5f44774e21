//! The GPU backend: embedded kernels, device probe, the layer runtime and the roofline
//! measurement.
//!
//! Everything here loads the CUDA driver at run time (cudarc's dynamic loading), so the
//! crate builds and its CPU tests run on machines without CUDA; GPU entry points return
//! [`crate::Error::NoGpu`] or [`crate::Error::NoKernels`] there.

pub mod kernels;
pub mod layer;
pub mod probe;
pub mod roofline;
