//! NVSHMEM host API loaded at run time (filled in by the bindings work).

/// Errors of the NVSHMEM bindings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host library could not be loaded.
    #[error("cannot load the NVSHMEM host library: {0}")]
    Load(String),
}
