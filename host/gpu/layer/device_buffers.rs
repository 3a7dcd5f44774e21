//! Raw device allocations owned by the layer.
//!
//! The layer hands raw `CUdeviceptr`s to the kernel (inside `FmKernelParams`) and records
//! launches into CUDA graphs, so it keeps its memory as plain driver allocations rather
//! than cudarc slices (whose event tracking records events that cannot be captured).
//! Every copy is stream-ordered on the stream given and completed before the host data it
//! reads or writes can go away.

use crate::error::{Error, Result};
use crate::gpu::layer::pack::NanFill;
use cudarc::driver::{result, sys, CudaContext, CudaStream, DriverError};
use std::sync::Arc;

/// Turns a driver error into [`Error::Cuda`] naming the operation.
pub fn cuda(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// One device allocation, freed on drop (unless borrowed).
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    ctx: Arc<CudaContext>,
    /// False for memory owned elsewhere (the NVSHMEM symmetric heap): not freed on drop.
    owned: bool,
}

impl DeviceBuffer {
    /// Allocates `bytes` (at least 256, so every region has a distinct, aligned address)
    /// and zeroes them on `stream`.
    pub fn zeroed(stream: &Arc<CudaStream>, bytes: usize, what: &'static str) -> Result<Self> {
        let ctx = stream.context().clone();
        ctx.bind_to_thread().map_err(cuda(what))?;
        let bytes = bytes.max(256);
        // SAFETY: a plain allocation of a non-zero size in the bound context; the pointer is
        // owned by the returned value and freed once in Drop.
        let ptr = unsafe { result::malloc_sync(bytes) }.map_err(cuda(what))?;
        let buf = DeviceBuffer {
            ptr,
            bytes,
            ctx,
            owned: true,
        };
        // SAFETY: `ptr` is a live allocation of exactly `bytes` bytes.
        unsafe { result::memset_d8_async(buf.ptr, 0, bytes, stream.cu_stream()) }
            .map_err(cuda(what))?;
        Ok(buf)
    }

    /// Allocates and fills with `data` (synchronously with respect to the host).
    pub fn from_bytes(stream: &Arc<CudaStream>, data: &[u8], what: &'static str) -> Result<Self> {
        let buf = Self::zeroed(stream, data.len(), what)?;
        buf.upload(stream, 0, data, what)?;
        Ok(buf)
    }

    /// A view of `bytes` bytes at `ptr` that someone else allocated and frees: copies
    /// and zeroing work as on an owned buffer, dropping it frees nothing.
    ///
    /// # Safety
    /// `ptr` must address `bytes` live bytes of device memory usable in `ctx`, for as long
    /// as the returned value (and any launch that uses it) lives.
    pub unsafe fn borrowed(ctx: Arc<CudaContext>, ptr: u64, bytes: usize) -> Self {
        DeviceBuffer {
            ptr,
            bytes,
            ctx,
            owned: false,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Size in bytes (at least 256).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn check(&self, offset: usize, len: usize, what: &'static str) -> Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.bytes) {
            return Err(Error::input(
                what,
                format!(
                    "{len} bytes at offset {offset} exceed the {}-byte buffer",
                    self.bytes
                ),
            ));
        }
        Ok(())
    }

    /// Copies `data` to `offset`, ordered on `stream`, and waits for the copy.
    pub fn upload(
        &self,
        stream: &CudaStream,
        offset: usize,
        data: &[u8],
        what: &'static str,
    ) -> Result<()> {
        self.check(offset, data.len(), what)?;
        if data.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(cuda(what))?;
        // SAFETY: the range was checked against the allocation; `data` outlives the copy
        // because the stream is synchronised before returning.
        unsafe {
            result::memcpy_htod_async(self.ptr + offset as u64, data, stream.cu_stream())
                .map_err(cuda(what))?;
        }
        stream.synchronize().map_err(cuda(what))
    }

    /// Copies `out.len()` bytes from `offset` into `out`, ordered on `stream`, and waits.
    pub fn download(
        &self,
        stream: &CudaStream,
        offset: usize,
        out: &mut [u8],
        what: &'static str,
    ) -> Result<()> {
        self.check(offset, out.len(), what)?;
        if out.is_empty() {
            return Ok(());
        }
        self.ctx.bind_to_thread().map_err(cuda(what))?;
        // SAFETY: the range was checked; `out` outlives the copy (synchronised below).
        unsafe {
            result::memcpy_dtoh_async(out, self.ptr + offset as u64, stream.cu_stream())
                .map_err(cuda(what))?;
        }
        stream.synchronize().map_err(cuda(what))
    }

    /// Zeroes the whole buffer, ordered on `stream` (asynchronous).
    pub fn zero(&self, stream: &CudaStream, what: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(cuda(what))?;
        // SAFETY: the whole live allocation.
        unsafe { result::memset_d8_async(self.ptr, 0, self.bytes, stream.cu_stream()) }
            .map_err(cuda(what))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // Errors cannot be returned from Drop; a failed free leaks device memory only.
        if self.owned && self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from malloc_sync and is freed exactly once, here. The
            // synchronous free waits for work still using it.
            let _ = unsafe { result::free_sync(self.ptr) };
        }
    }
}

/// Fills `elements` elements at device address `ptr` with a NaN pattern, on `stream`
/// (asynchronous).
///
/// # Safety
/// `ptr` must address `elements` live elements of the pattern's width.
pub unsafe fn poison(
    stream: &CudaStream,
    ptr: u64,
    elements: usize,
    fill: NanFill,
    what: &'static str,
) -> Result<()> {
    if elements == 0 {
        return Ok(());
    }
    stream.context().bind_to_thread().map_err(cuda(what))?;
    // SAFETY: the caller guarantees the range (this function's contract).
    let r = unsafe {
        match fill {
            NanFill::U16(p) => sys::cuMemsetD16Async(ptr, p, elements, stream.cu_stream()),
            NanFill::U32(p) => sys::cuMemsetD32Async(ptr, p, elements, stream.cu_stream()),
        }
    };
    r.result().map_err(cuda(what))
}
