//! The NVSHMEM host API, declared by hand and loaded at run time.
//!
//! Only what flashmoe needs: initialisation from a unique id (the exported path
//! `nvshmemx_set_attr_uniqueid_args` + `nvshmemx_hostlib_init_attr`, since `nvshmem_init`
//! and `nvshmemx_init_attr` are `static inline` in the headers and call a symbol the host
//! library does not export), module registration, the symmetric heap, `nvshmem_ptr`, PE and
//! team queries, barriers and the version queries. Every symbol was checked with `nm -D`
//! against `libnvshmem_host.so.3` of the `nvidia-nvshmem-cu13==3.3.24` wheel, every
//! signature against its headers.
//!
//! Loading works without a GPU; see [`Nvshmem::load`] for where the library is looked for.
#![deny(missing_docs)]

pub mod error;
pub mod library;
pub mod locate;
pub mod types;
pub mod version;

pub use error::{Error, Result};
pub use library::{CuModule, CuStream, Nvshmem};
pub use types::{InitArgs, InitAttr, UniqueId, UniqueIdArgs, UNIQUEID_BYTES};
pub use version::{check_compatible, Version, DEVICE_LIBRARY};
