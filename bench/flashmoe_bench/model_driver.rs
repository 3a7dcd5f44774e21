//! The model a `flashmoe-bench model` run drives: the host driver over CPU executors, or
//! the GPU model (the whole stack on one stream, one wait per forward).

use flashmoe::gpu::model::GpuModel;
use flashmoe::model::{ModelOutput, MoeModel};
use flashmoe::Result;

/// Either driver, behind the few calls the bench makes, each with the token ids its hash
/// layers route by (when it has some).
pub enum Driver {
    /// `MoeModel` with a CPU executor per layer (a host round trip per layer).
    Cpu(MoeModel, Option<Vec<Vec<u32>>>),
    /// `GpuModel`: norm, layer and residual of every layer enqueued on one stream.
    Gpu(GpuModel, Option<Vec<Vec<u32>>>),
}

/// One timed forward.
pub struct Timed {
    /// The forward's output; per-layer `latency` is host wall time (CPU) or device time
    /// from events (GPU).
    pub out: ModelOutput,
    /// Device time of the whole stack (GPU only).
    pub device_ms: Option<f64>,
}

impl Driver {
    /// Backend name for the report.
    pub fn name(&self) -> &'static str {
        match self {
            Driver::Cpu(m, _) => m.backend_names().first().copied().unwrap_or("?"),
            Driver::Gpu(..) => "gpu (one stream, no host sync between layers)",
        }
    }

    /// Hidden size.
    pub fn hidden(&self) -> usize {
        match self {
            Driver::Cpu(m, _) => m.hidden(),
            Driver::Gpu(m, _) => m.hidden(),
        }
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        match self {
            Driver::Cpu(m, _) => m.world(),
            Driver::Gpu(m, _) => m.world(),
        }
    }

    /// A forward that also returns the state after every layer (`trace[l][rank]`).
    pub fn forward_traced(&mut self, x: &[Vec<f32>]) -> Result<(ModelOutput, Vec<Vec<Vec<f32>>>)> {
        match self {
            Driver::Cpu(m, ids) => m.forward_traced_ids(x, ids.as_deref()),
            Driver::Gpu(m, ids) => m
                .forward_traced_ids(x, ids.as_deref())
                .map(|(out, t)| (out, t.states)),
        }
    }

    /// After the checked first run: the GPU model stops NaN-filling layer outputs, so
    /// that timed runs measure norm, layer and residual only (the bench then checks that
    /// the last timed run reproduced the checked output).
    pub fn start_timing(&mut self) {
        if let Driver::Gpu(m, _) = self {
            m.set_poison(false);
        }
    }

    /// Whether timed runs must reproduce the checked output bit for bit (the GPU model).
    pub fn deterministic(&self) -> bool {
        matches!(self, Driver::Gpu(..))
    }

    /// A forward, with the device time of the stack where there is one.
    pub fn forward(&mut self, x: &[Vec<f32>]) -> Result<Timed> {
        match self {
            Driver::Cpu(m, ids) => Ok(Timed {
                out: match ids {
                    Some(ids) => m.forward_ids(x, ids)?,
                    None => m.forward(x)?,
                },
                device_ms: None,
            }),
            Driver::Gpu(m, ids) => {
                let out = match ids {
                    Some(ids) => m.forward_host_ids(x, ids)?,
                    None => m.forward_host(x)?,
                };
                let device_ms = Some(m.device_time()?.as_secs_f64() * 1e3);
                Ok(Timed { out, device_ms })
            }
        }
    }
}
