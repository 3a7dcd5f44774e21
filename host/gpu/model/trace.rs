//! Traced forwards: the device snapshots of every layer's input, output and state, and
//! what [`GpuModel::forward_traced`](super::GpuModel::forward_traced) returns.

use super::RankBuffers;
use crate::error::{Error, Result};
use crate::gpu::layer::device_buffers::{cuda, DeviceBuffer};
use crate::reference::GateOutput;
use cudarc::driver::{result, CudaStream};

/// The hidden states after each layer and each layer's router decisions, from
/// [`GpuModel::forward_traced`](super::GpuModel::forward_traced).
#[derive(Debug, Clone)]
pub struct GpuTrace {
    /// `states[l][rank]`: the state after layer `l`, `[tokens_r * hidden]`.
    pub states: Vec<Vec<Vec<f32>>>,
    /// `normed[l][rank]`: layer `l`'s input, the normalised state (layer dtype values).
    pub normed: Vec<Vec<Vec<f32>>>,
    /// `moe_out[l][rank]`: layer `l`'s MoE output before the residual add (layer dtype).
    pub moe_out: Vec<Vec<Vec<f32>>>,
    /// `gates[l][rank]`: layer `l`'s routing (ids, weights, slots, counts) as the kernel
    /// decided it.
    pub gates: Vec<Vec<GateOutput>>,
}

/// Device copies of one layer's tensors of one rank, made during a traced forward.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) state: DeviceBuffer,
    pub(super) normed: DeviceBuffer,
    pub(super) out: DeviceBuffer,
}

/// Layer `l`'s snapshot buffers of a rank.
pub(super) fn snapshot(rb: &RankBuffers, l: usize) -> Result<&Snapshot> {
    rb.snapshots
        .get(l)
        .ok_or_else(|| Error::input("trace", format!("no snapshot buffers for layer {l}")))
}

/// Enqueues a device-to-device copy of `bytes` bytes from `src` into `dst`.
///
/// # Safety
/// `src` must address `bytes` live bytes until the copy has run.
pub(super) unsafe fn copy(
    dst: &DeviceBuffer,
    src: u64,
    bytes: usize,
    stream: &CudaStream,
) -> Result<()> {
    if bytes == 0 {
        return Ok(());
    }
    if bytes > dst.bytes() {
        return Err(Error::input(
            "trace",
            format!("{bytes} bytes exceed the {}-byte snapshot", dst.bytes()),
        ));
    }
    // SAFETY: `dst` holds at least `bytes` (checked); `src` is the caller's contract.
    unsafe { result::memcpy_dtod_async(dst.ptr(), src, bytes, stream.cu_stream()) }
        .map_err(cuda("trace copy"))
}
