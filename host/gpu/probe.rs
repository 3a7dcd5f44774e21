//! PLACEHOLDER (gpu helper): the build helper's `host/gpu/probe.rs` replaces this file at
//! merge; same signature. Finds the GPUs without ever panicking where no driver exists.

use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaContext};

/// One visible GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name.
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: usize,
    /// Device memory in bytes.
    pub memory_bytes: u64,
    /// (major, minor) compute capability.
    pub compute_capability: (i32, i32),
    /// CUDA driver version (e.g. 13000).
    pub driver_version: i32,
}

/// Lists the GPUs, or `Err(Error::NoGpu)` without driver or device.
pub fn probe() -> Result<Vec<GpuInfo>> {
    // SAFETY: only tries to dlopen libcuda; no CUDA call is made before it is known to load.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoGpu("libcuda (the CUDA driver) was not found".into()));
    }
    let gpu = |e: cudarc::driver::DriverError| Error::NoGpu(format!("CUDA driver: {e}"));
    let count = CudaContext::device_count().map_err(gpu)?;
    if count <= 0 {
        return Err(Error::NoGpu("the driver sees no CUDA device".into()));
    }
    let mut driver_version = 0i32;
    // SAFETY: plain out-parameter query on a loaded driver.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }
        .result()
        .map_err(gpu)?;
    (0..count as usize)
        .map(|ordinal| {
            let ctx = CudaContext::new(ordinal).map_err(gpu)?;
            let sms = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(gpu)?;
            Ok(GpuInfo {
                ordinal,
                name: ctx.name().map_err(gpu)?,
                sms: sms.max(0) as usize,
                memory_bytes: ctx.total_mem().map_err(gpu)? as u64,
                compute_capability: ctx.compute_capability().map_err(gpu)?,
                driver_version,
            })
        })
        .collect()
}
