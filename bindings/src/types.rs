//! The `#[repr(C)]` structs and constants of the NVSHMEM host API, mirrored from
//! `bootstrap_device_host/nvshmem_uniqueid.h`, `device_host/nvshmem_types.h`,
//! `device_host/nvshmem_common.cuh` and `host/nvshmemx_api.h` of NVSHMEM 3.3.
//!
//! Every struct starts with a `version` field whose value is `(1 << 16) + size_of::<Self>()`;
//! the constructors here set it.

use std::ffi::{c_int, c_void};

/// Size of `nvshmemx_uniqueid_t` in bytes (asserted by the headers).
pub const UNIQUEID_BYTES: usize = 128;
const UNIQUEID_PADDING: usize = 124;
const INIT_ARGS_PADDING: usize = 96;

/// `NVSHMEMX_INIT_WITH_UNIQUEID`: the flag of `nvshmemx_hostlib_init_attr` that selects
/// initialisation from a unique id.
pub const INIT_WITH_UNIQUEID: u32 = 1 << 3;

/// `nvshmem_team_t`.
pub type Team = i32;
/// `NVSHMEM_TEAM_WORLD`: every PE.
pub const TEAM_WORLD: Team = 0;
/// `NVSHMEM_TEAM_SHARED`: the PEs whose memory this PE can access with loads and stores.
pub const TEAM_SHARED: Team = 1;
/// `NVSHMEMX_TEAM_NODE`: the PEs on this node.
pub const TEAM_NODE: Team = 2;

/// `NVSHMEM_STATUS_NOT_INITIALIZED`, a value of `nvshmemx_init_status()`.
pub const STATUS_NOT_INITIALIZED: c_int = 0;
/// `NVSHMEM_STATUS_IS_INITIALIZED`, a value of `nvshmemx_init_status()`.
pub const STATUS_IS_INITIALIZED: c_int = 2;

/// The `version` value of a struct of `size` bytes: `(1 << 16) + size`.
pub const fn struct_version(size: usize) -> c_int {
    (1 << 16) + size as c_int
}

/// `nvshmemx_uniqueid_t` (`nvshmemx_uniqueid_v1`): made by rank 0, handed to every rank.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId {
    /// Struct version, `(1 << 16) + 128`.
    pub version: c_int,
    /// Opaque contents.
    pub internal: [u8; UNIQUEID_PADDING],
}

impl Default for UniqueId {
    fn default() -> Self {
        Self {
            version: struct_version(std::mem::size_of::<Self>()),
            internal: [0; UNIQUEID_PADDING],
        }
    }
}

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UniqueId")
            .field("version", &format_args!("{:#x}", self.version))
            .finish_non_exhaustive()
    }
}

impl UniqueId {
    /// The 128 bytes of the id as they lie in memory, for sending to other ranks.
    pub fn to_bytes(&self) -> [u8; UNIQUEID_BYTES] {
        let mut out = [0u8; UNIQUEID_BYTES];
        out[..4].copy_from_slice(&self.version.to_ne_bytes());
        out[4..].copy_from_slice(&self.internal);
        out
    }

    /// Rebuilds an id from the bytes [`UniqueId::to_bytes`] produced (on a host of the same
    /// byte order).
    pub fn from_bytes(bytes: &[u8; UNIQUEID_BYTES]) -> Self {
        let mut version = [0u8; 4];
        version.copy_from_slice(&bytes[..4]);
        let mut internal = [0u8; UNIQUEID_PADDING];
        internal.copy_from_slice(&bytes[4..]);
        Self {
            version: c_int::from_ne_bytes(version),
            internal,
        }
    }

    /// Whether the `version` field holds the value of this struct layout.
    pub fn has_expected_version(&self) -> bool {
        self.version == struct_version(std::mem::size_of::<Self>())
    }
}

/// `nvshmemx_uniqueid_args_t` (`nvshmemx_uniqueid_args_v1`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UniqueIdArgs {
    /// Struct version, `(1 << 16) + 24`.
    pub version: c_int,
    /// The id (set by `nvshmemx_set_attr_uniqueid_args`).
    pub id: *mut UniqueId,
    /// This process's rank (-1 until set).
    pub myrank: c_int,
    /// Number of ranks (-1 until set).
    pub nranks: c_int,
}

impl Default for UniqueIdArgs {
    fn default() -> Self {
        Self {
            version: struct_version(std::mem::size_of::<Self>()),
            id: std::ptr::null_mut(),
            myrank: -1,
            nranks: -1,
        }
    }
}

/// `nvshmemx_init_args_t` (`nvshmemx_init_args_v1`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct InitArgs {
    /// Struct version, `(1 << 16) + 128`.
    pub version: c_int,
    /// Unique-id arguments.
    pub uid_args: UniqueIdArgs,
    /// Reserved.
    pub content: [u8; INIT_ARGS_PADDING],
}

impl Default for InitArgs {
    fn default() -> Self {
        Self {
            version: struct_version(std::mem::size_of::<Self>()),
            uid_args: UniqueIdArgs::default(),
            content: [0; INIT_ARGS_PADDING],
        }
    }
}

/// `nvshmemx_init_attr_t` (`nvshmemx_init_attr_v1`), the argument of
/// `nvshmemx_hostlib_init_attr`. `Default` equals the headers' `NVSHMEMX_INIT_ATTR_INITIALIZER`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct InitAttr {
    /// Struct version, `(1 << 16) + 144`.
    pub version: c_int,
    /// MPI communicator (unused here; null).
    pub mpi_comm: *mut c_void,
    /// Initialisation arguments.
    pub args: InitArgs,
}

impl Default for InitAttr {
    fn default() -> Self {
        Self {
            version: struct_version(std::mem::size_of::<Self>()),
            mpi_comm: std::ptr::null_mut(),
            args: InitArgs::default(),
        }
    }
}

// The headers' static_asserts, repeated at compile time.
const _: () = assert!(std::mem::size_of::<UniqueId>() == 128);
const _: () = assert!(std::mem::size_of::<UniqueIdArgs>() == 24);
const _: () = assert!(std::mem::size_of::<InitArgs>() == 128);
const _: () = assert!(std::mem::size_of::<InitAttr>() == 144);

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn sizes_and_offsets_match_the_headers() {
        assert_eq!(size_of::<UniqueId>(), UNIQUEID_BYTES);
        assert_eq!(size_of::<UniqueIdArgs>(), 24);
        assert_eq!(offset_of!(UniqueIdArgs, id), 8);
        assert_eq!(offset_of!(UniqueIdArgs, myrank), 16);
        assert_eq!(offset_of!(UniqueIdArgs, nranks), 20);
        assert_eq!(size_of::<InitArgs>(), 128);
        assert_eq!(offset_of!(InitArgs, uid_args), 8);
        assert_eq!(offset_of!(InitArgs, content), 32);
        assert_eq!(size_of::<InitAttr>(), 144);
        assert_eq!(offset_of!(InitAttr, mpi_comm), 8);
        assert_eq!(offset_of!(InitAttr, args), 16);
    }

    #[test]
    fn defaults_carry_the_version_rule() {
        let attr = InitAttr::default();
        assert_eq!(attr.version, (1 << 16) + 144);
        assert_eq!(attr.args.version, (1 << 16) + 128);
        assert_eq!(attr.args.uid_args.version, (1 << 16) + 24);
        assert_eq!(attr.args.uid_args.myrank, -1);
        assert_eq!(attr.args.uid_args.nranks, -1);
        assert!(attr.args.uid_args.id.is_null());
        assert!(UniqueId::default().has_expected_version());
        assert_eq!(UniqueId::default().version, 0x1_0080);
    }

    #[test]
    fn unique_id_round_trips_through_bytes() {
        let mut id = UniqueId::default();
        for (i, b) in id.internal.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let bytes = id.to_bytes();
        assert_eq!(&bytes[..4], &id.version.to_ne_bytes());
        let back = UniqueId::from_bytes(&bytes);
        assert!(back == id);
        let mut other = bytes;
        other[100] ^= 1;
        assert!(UniqueId::from_bytes(&other) != id);
    }
}
