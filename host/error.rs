//! The crate's one error type.

use std::path::PathBuf;

/// Every error the flashmoe library returns.
///
/// Variants name the field, the stage or the rank involved so that a caller can act on
/// them without parsing text.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is outside what the runtime supports.
    #[error("invalid config: `{field}` = {value}: {limit}")]
    InvalidConfig {
        /// The configuration field, as spelled in `MoeConfig`.
        field: &'static str,
        /// The value that was given.
        value: String,
        /// The limit it broke.
        limit: String,
    },

    /// A run-time input (tensor shape, caller routing, buffer) is invalid.
    #[error("invalid input: `{field}`: {reason}")]
    InvalidInput {
        /// The input that is wrong.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// The plan's memory does not fit the address arithmetic or the stated limit.
    #[error("plan too large: {what}")]
    PlanTooLarge {
        /// Which quantity overflowed.
        what: String,
    },

    /// A run would need more host memory than is available (or than the stated cap);
    /// refused before anything large is allocated.
    #[error("not enough host memory: {what} needs {need} bytes ({:.2} GiB), {limit} allows {available} bytes ({:.2} GiB){}", gib(*.need), gib(*.available), hint_section(.hint))]
    HostMemory {
        /// What needs the memory (with its parts).
        what: String,
        /// Bytes needed.
        need: u64,
        /// Bytes available or allowed.
        available: u64,
        /// Where the limit comes from (`MemAvailable in /proc/meminfo`, `--max-host-memory`).
        limit: String,
        /// How to get past it ("" when there is nothing to say).
        hint: String,
    },

    /// A wait of the CPU executor or the device ran past its deadline.
    #[error("timeout on rank {rank} in stage {stage}: awaited {awaited} (expected {expected}, observed {observed}) after {waited_ms} ms")]
    Timeout {
        /// The rank that was waiting.
        rank: usize,
        /// The protocol stage (gate, dispatch, expert, combine).
        stage: &'static str,
        /// What it was waiting for.
        awaited: String,
        /// The value it expected.
        expected: u64,
        /// The value it last saw.
        observed: u64,
        /// How long it waited.
        waited_ms: u64,
    },

    /// The device kernel reported an invalid state through its status word.
    #[error("device error on rank {rank} in stage {stage}: {what} (expected {expected}, observed {observed})")]
    Device {
        /// The rank whose block group reported it.
        rank: usize,
        /// The protocol stage.
        stage: &'static str,
        /// What was found.
        what: String,
        /// The value expected.
        expected: u64,
        /// The value observed.
        observed: u64,
    },

    /// No usable GPU (no driver, no device, or the wrong architecture).
    #[error("no GPU: {0}")]
    NoGpu(String),

    /// The library was compiled without CUDA kernels.
    #[error("flashmoe was built without CUDA kernels: {0}")]
    NoKernels(String),

    /// An error from the CUDA driver.
    #[error("CUDA driver: {0}")]
    Cuda(String),

    /// An error from NVSHMEM's host library.
    #[error("NVSHMEM: {0}")]
    Nvshmem(#[from] nvshmem_sys::Error),

    /// A bad or missing environment variable of the launcher convention.
    #[error("environment variable `{var}`: {reason}")]
    Env {
        /// The variable.
        var: &'static str,
        /// What is wrong.
        reason: String,
    },

    /// The multi-process bootstrap failed (peer missing, connection refused, bad message).
    #[error("bootstrap: {0}")]
    Bootstrap(String),

    /// A rank process started by the local launcher failed, printed no result line, or was
    /// still running at the launcher's deadline.
    #[error("rank {rank} failed: {reason}{}", stderr_section(.stderr_tail))]
    RankFailed {
        /// The rank.
        rank: usize,
        /// Exit status, signal or deadline.
        reason: String,
        /// The last lines the rank wrote to stderr.
        stderr_tail: String,
    },

    /// A checkpoint could not be read or does not match the expected layout.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A checkpoint is readable but uses a feature this runtime does not implement
    /// (a router, a norm, a weight format); `key` is the config.json key or tensor name.
    #[error("checkpoint {path}: `{key}` = {value}: {reason}")]
    UnsupportedModel {
        /// The file or directory.
        path: PathBuf,
        /// The config.json key or the tensor that asks for the feature.
        key: String,
        /// Its value.
        value: String,
        /// What is not supported, and what is.
        reason: String,
    },

    /// An error of one layer of a model forward (GPU model driver): `layer` is the
    /// decoder layer index ([`crate::model::ModelLayer::index`]), `source` the layer's own
    /// typed error (timeout, device fault, CUDA).
    #[error("model layer {layer}: {source}")]
    ModelLayer {
        /// Decoder layer index in the model.
        layer: usize,
        /// What went wrong in that layer.
        source: Box<Error>,
    },

    /// An I/O error with the path it concerned.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn hint_section(hint: &str) -> String {
    if hint.is_empty() {
        String::new()
    } else {
        format!(": {hint}")
    }
}

fn stderr_section(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!("\n--- last lines of its stderr ---\n{tail}")
    }
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an [`Error::InvalidConfig`].
    pub fn config(field: &'static str, value: impl ToString, limit: impl ToString) -> Self {
        Error::InvalidConfig {
            field,
            value: value.to_string(),
            limit: limit.to_string(),
        }
    }

    /// Builds an [`Error::InvalidInput`].
    pub fn input(field: &'static str, reason: impl ToString) -> Self {
        Error::InvalidInput {
            field,
            reason: reason.to_string(),
        }
    }
}
