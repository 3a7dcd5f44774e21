//! NVSHMEM library versions and the compatibility rule of `nvshmemx_cumodule_init`.

use crate::error::{Error, Result};

/// A vendor version `major.minor.patch` as `nvshmemx_vendor_get_version_info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// Major version.
    pub major: i32,
    /// Minor version.
    pub minor: i32,
    /// Patch level.
    pub patch: i32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The NVSHMEM device library the project's kernels are linked against (the
/// `nvidia-nvshmem-cu13==3.3.24` wheel, the oldest one built for CUDA 13).
pub const DEVICE_LIBRARY: Version = Version {
    major: 3,
    minor: 3,
    patch: 24,
};

/// Checks the rule `nvshmemx_cumodule_init` applies: the host library must have the same
/// major version as the device library and a minor version at least as high. Patch levels
/// do not matter.
pub fn check_compatible(host: Version, device: Version) -> Result<()> {
    if host.major == device.major && host.minor >= device.minor {
        Ok(())
    } else {
        Err(Error::Version { host, device })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(major: i32, minor: i32, patch: i32) -> Version {
        Version {
            major,
            minor,
            patch,
        }
    }

    #[test]
    fn same_or_newer_minor_of_same_major_is_accepted() {
        for host in [v(3, 3, 24), v(3, 3, 0), v(3, 4, 5), v(3, 8, 0)] {
            assert!(check_compatible(host, DEVICE_LIBRARY).is_ok(), "{host}");
        }
    }

    #[test]
    fn older_minor_or_other_major_is_refused_naming_both() {
        for host in [v(3, 2, 99), v(2, 9, 0), v(4, 0, 0), v(4, 3, 24)] {
            let err = check_compatible(host, DEVICE_LIBRARY).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(&host.to_string()), "{msg}");
            assert!(msg.contains("3.3.24"), "{msg}");
            assert!(matches!(err, Error::Version { host: h, .. } if h == host));
        }
    }

    #[test]
    fn versions_order_by_major_then_minor_then_patch() {
        assert!(v(3, 3, 24) < v(3, 4, 0));
        assert!(v(3, 9, 0) < v(4, 0, 0));
        assert!(v(3, 3, 1) < v(3, 3, 24));
    }
}
