//! Finds the CUDA devices of this machine without ever panicking.
//!
//! cudarc loads `libcuda` at run time and panics when it is missing, so [`probe`] checks
//! for the library first and also contains any panic from a driver that lacks a symbol.
//! It uses only device queries (no context is created).

use std::ffi::c_int;

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};

/// One CUDA device as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// Device ordinal (`CUdevice` index, after `CUDA_VISIBLE_DEVICES`).
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Streaming multiprocessors.
    pub sms: u32,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
    /// Compute capability (major, minor), e.g. (9, 0) for H100.
    pub compute_capability: (u32, u32),
    /// CUDA version the driver supports (major, minor), e.g. (13, 0) for driver 580.
    pub driver_version: (u32, u32),
}

/// All CUDA devices, or [`Error::NoGpu`] with the reason (no driver library, `cuInit`
/// failed, no device). Never panics.
pub fn probe() -> Result<Vec<GpuInfo>> {
    // SAFETY: only tries to dlopen libcuda under its usual names; calls nothing in it.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::NoGpu(
            "CUDA driver library (libcuda.so) not found: no NVIDIA driver on this machine".into(),
        ));
    }
    match std::panic::catch_unwind(query_devices) {
        Ok(r) => r,
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::NoGpu(format!("CUDA driver unusable: {what}")))
        }
    }
}

/// The first device, when there is one.
pub fn first() -> Result<GpuInfo> {
    probe()?
        .into_iter()
        .next()
        .ok_or_else(|| Error::NoGpu("no CUDA device".into()))
}

fn no_gpu(what: &str) -> impl FnOnce(result::DriverError) -> Error + '_ {
    move |e| Error::NoGpu(format!("{what}: {e}"))
}

fn query_devices() -> Result<Vec<GpuInfo>> {
    result::init().map_err(no_gpu("cuInit"))?;
    let mut version: c_int = 0;
    // SAFETY: the driver is loaded and initialised; `version` is a valid out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(no_gpu("cuDriverGetVersion"))?;
    let driver_version = (version as u32 / 1000, (version as u32 % 1000) / 10);
    let count = result::device::get_count().map_err(no_gpu("cuDeviceGetCount"))?;
    if count <= 0 {
        return Err(Error::NoGpu(
            "the CUDA driver sees no device (check CUDA_VISIBLE_DEVICES)".into(),
        ));
    }
    (0..count)
        .map(|ordinal| {
            let dev = result::device::get(ordinal).map_err(no_gpu("cuDeviceGet"))?;
            let name = result::device::get_name(dev).map_err(no_gpu("cuDeviceGetName"))?;
            // SAFETY: `dev` is a device handle the driver just returned.
            let memory =
                unsafe { result::device::total_mem(dev) }.map_err(no_gpu("cuDeviceTotalMem"))?;
            let attr = |a: sys::CUdevice_attribute| -> Result<u32> {
                // SAFETY: `dev` is valid and `a` a device attribute.
                let v = unsafe { result::device::get_attribute(dev, a) }
                    .map_err(no_gpu("cuDeviceGetAttribute"))?;
                Ok(v.max(0) as u32)
            };
            use sys::CUdevice_attribute::*;
            Ok(GpuInfo {
                ordinal: ordinal as usize,
                name,
                sms: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
                memory_bytes: memory as u64,
                compute_capability: (
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                    attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
                ),
                driver_version,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passes on machines with and without a GPU; `FLASHMOE_EXPECT_GPU=1` demands one.
    #[test]
    fn probe_never_panics_and_reports_sane_devices() {
        match probe() {
            Ok(gpus) => {
                assert!(!gpus.is_empty());
                for (i, g) in gpus.iter().enumerate() {
                    assert_eq!(g.ordinal, i);
                    assert!(!g.name.trim().is_empty(), "{g:?}");
                    assert!(g.sms > 0, "{g:?}");
                    assert!(g.memory_bytes >= 1 << 30, "{g:?}");
                    assert!(g.compute_capability.0 >= 3, "{g:?}");
                    assert!(g.driver_version.0 >= 10, "{g:?}");
                }
                assert_eq!(first().unwrap(), gpus[0]);
            }
            Err(Error::NoGpu(reason)) => {
                assert!(!reason.is_empty());
                assert!(
                    !crate::gpu::expect_gpu(),
                    "FLASHMOE_EXPECT_GPU is set but probe() found none: {reason}"
                );
                assert!(matches!(first(), Err(Error::NoGpu(_))));
            }
            Err(e) => panic!("probe() must return Ok or Error::NoGpu, got {e}"),
        }
    }
}
