//! Errors of the NVSHMEM bindings.

use crate::version::Version;

/// Errors of the NVSHMEM bindings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host library could not be loaded.
    #[error("cannot load the NVSHMEM host library: {0}")]
    Load(String),

    /// The library loaded but lacks a function these bindings need.
    #[error("NVSHMEM host library {path} lacks symbol `{symbol}`: {reason}")]
    Symbol {
        /// The library file.
        path: String,
        /// The missing function.
        symbol: &'static str,
        /// What the dynamic loader said.
        reason: String,
    },

    /// The host library's version cannot run device code linked against `device`.
    #[error(
        "NVSHMEM host library {host} cannot run device code built against {device}: \
         it needs the same major version and a minor version >= {}.{} \
         (set FLASHMOE_NVSHMEM_LIB or NVSHMEM_HOME to a suitable libnvshmem_host.so.3)",
        device.major, device.minor
    )]
    Version {
        /// Version reported by the host library.
        host: Version,
        /// Version of the device library the kernels link against.
        device: Version,
    },

    /// An NVSHMEM call returned a non-zero status.
    #[error("{function} returned {code}")]
    Call {
        /// The NVSHMEM function.
        function: &'static str,
        /// Its return value.
        code: i32,
    },

    /// An argument is outside what NVSHMEM accepts.
    #[error("invalid argument `{what}`: {reason}")]
    Argument {
        /// The argument.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Result type of the bindings.
pub type Result<T> = std::result::Result<T, Error>;
