//! The CUDA kernels embedded in the library.
//!
//! `build.rs` compiles every `kernel/<name>.cu` into a cubin and embeds it under `<name>`
//! (e.g. `"abi_probe"`). A library built where no nvcc was found embeds none: then
//! [`built_with_kernels`] is false and [`cubin`] returns [`Error::NoKernels`] saying how to
//! get them (run `scripts/install-cuda-toolchain.sh` and rebuild).

use crate::error::{Error, Result};

/// Cubin bytes with an alignment that ELF loaders are happy with (`include_bytes!` alone
/// guarantees none).
#[repr(C, align(128))]
#[cfg_attr(not(flashmoe_kernels), allow(dead_code))]
struct Aligned<T: ?Sized>(T);

// Defines CUBINS, SKIPPED, ARCH and BUILD_NOTE.
include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// How to get kernels into a build that has none.
const HOW_TO_FIX: &str = "run scripts/install-cuda-toolchain.sh (or set FLASHMOE_NVCC / \
                          CUDA_HOME to a CUDA 13.0 nvcc) and rebuild";

/// True when `build.rs` compiled at least one kernel into this library.
pub fn built_with_kernels() -> bool {
    cfg!(flashmoe_kernels)
}

/// Names of the embedded kernels (file stems of `kernel/*.cu`), sorted.
pub fn names() -> Vec<&'static str> {
    CUBINS.iter().map(|(name, _)| *name).collect()
}

/// Kernel sources that were not built, with the reason (e.g. an `*_nvshmem.cu` file when
/// the NVSHMEM device library was not found).
pub fn skipped() -> &'static [(&'static str, &'static str)] {
    SKIPPED
}

/// The architecture the cubins were built for, e.g. `"sm_90a"`; `None` without kernels.
pub fn arch() -> Option<&'static str> {
    (!ARCH.is_empty() && built_with_kernels()).then_some(ARCH)
}

/// The cubin of `kernel/<name>.cu`.
///
/// Errors: [`Error::NoKernels`] when the library was built without kernels or this one was
/// skipped; [`Error::InvalidInput`] when no kernel source has that name.
pub fn cubin(name: &str) -> Result<&'static [u8]> {
    if let Some((_, bytes)) = CUBINS.iter().find(|(n, _)| *n == name) {
        return Ok(bytes);
    }
    if let Some((_, why)) = SKIPPED.iter().find(|(n, _)| *n == name) {
        return Err(Error::NoKernels(format!("kernel `{name}`: {why}")));
    }
    if !built_with_kernels() {
        let why = if BUILD_NOTE.is_empty() {
            "no kernels were compiled"
        } else {
            BUILD_NOTE
        };
        return Err(Error::NoKernels(format!(
            "kernel `{name}` unavailable ({why}); {HOW_TO_FIX}"
        )));
    }
    Err(Error::input(
        "kernel name",
        format!("no kernel `{name}`; built: {:?}", names()),
    ))
}

/// Checks that a device of compute capability `cc` can run the embedded cubins.
///
/// Cubins for an arch-specific target (`sm_90a`) run only on exactly that capability; others
/// (`sm_80`) on that capability or a later minor of the same major.
/// Errors: [`Error::NoKernels`] without kernels, [`Error::NoGpu`] on a mismatch.
pub fn check_device(cc: (u32, u32)) -> Result<()> {
    let arch = arch().ok_or_else(|| {
        Error::NoKernels(format!("no kernels to run on the device; {HOW_TO_FIX}"))
    })?;
    let need = parse_arch(arch)
        .ok_or_else(|| Error::NoKernels(format!("unrecognised kernel architecture `{arch}`")))?;
    if device_runs(need, cc) {
        Ok(())
    } else {
        Err(Error::NoGpu(format!(
            "device of compute capability {}.{} cannot run cubins built for {arch}; rebuild \
             with FLASHMOE_CUDA_ARCH set for this device",
            cc.0, cc.1
        )))
    }
}

/// A parsed `sm_<major><minor>[a|f]` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    major: u32,
    minor: u32,
    /// `a` suffix: arch-specific features, runs on this exact capability only.
    specific: bool,
}

/// Parses `sm_90a`, `sm_80`, `sm_100f`, `sm_120`.
fn parse_arch(arch: &str) -> Option<Target> {
    let rest = arch.strip_prefix("sm_")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let suffix = &rest[digits.len()..];
    if digits.len() < 2 || !matches!(suffix, "" | "a" | "f") {
        return None;
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Some(Target {
        major: major.parse().ok()?,
        minor: minor.parse().ok()?,
        specific: suffix == "a",
    })
}

/// Whether a cubin for `t` loads on a device of capability `cc`.
fn device_runs(t: Target, cc: (u32, u32)) -> bool {
    if t.specific {
        cc == (t.major, t.minor)
    } else {
        cc.0 == t.major && cc.1 >= t.minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_flag_agree() {
        assert_eq!(built_with_kernels(), !names().is_empty());
        assert_eq!(built_with_kernels(), arch().is_some());
        let mut sorted = names();
        sorted.sort_unstable();
        assert_eq!(sorted, names());
    }

    #[test]
    fn embedded_cubins_are_aligned_elf_images() {
        for name in names() {
            let bytes = cubin(name).unwrap();
            assert!(bytes.len() > 64, "{name}: {} bytes", bytes.len());
            assert_eq!(&bytes[..4], b"\x7fELF", "{name} is not an ELF image");
            assert_eq!(bytes.as_ptr() as usize % 128, 0, "{name} is not aligned");
        }
    }

    #[test]
    fn abi_probe_is_built_whenever_kernels_are() {
        if !built_with_kernels() {
            return;
        }
        let bytes = cubin("abi_probe").unwrap();
        let symbol = b"flashmoe_abi_probe";
        assert!(
            bytes.windows(symbol.len()).any(|w| w == symbol),
            "abi_probe cubin lacks its entry point"
        );
    }

    #[test]
    fn missing_kernels_are_typed_errors_naming_the_fix() {
        match cubin("abi_probe") {
            Ok(_) => assert!(built_with_kernels()),
            Err(Error::NoKernels(msg)) => {
                assert!(!built_with_kernels());
                assert!(msg.contains("install-cuda-toolchain.sh"), "{msg}");
            }
            Err(e) => panic!("unexpected error {e}"),
        }
        let unknown = cubin("no_such_kernel").unwrap_err();
        if built_with_kernels() {
            assert!(matches!(unknown, Error::InvalidInput { .. }), "{unknown}");
        } else {
            assert!(matches!(unknown, Error::NoKernels(_)), "{unknown}");
        }
    }

    #[test]
    fn skipped_kernels_are_not_embedded() {
        for (name, why) in skipped() {
            assert!(!names().contains(name));
            assert!(!why.is_empty());
            assert!(matches!(cubin(name), Err(Error::NoKernels(_))));
        }
    }

    #[test]
    fn arch_targets_parse() {
        let t = |major, minor, specific| Target {
            major,
            minor,
            specific,
        };
        assert_eq!(parse_arch("sm_90a"), Some(t(9, 0, true)));
        assert_eq!(parse_arch("sm_80"), Some(t(8, 0, false)));
        assert_eq!(parse_arch("sm_100f"), Some(t(10, 0, false)));
        assert_eq!(parse_arch("sm_120"), Some(t(12, 0, false)));
        assert_eq!(parse_arch("sm_9"), None);
        assert_eq!(parse_arch("compute_90"), None);
        assert_eq!(parse_arch("sm_90x"), None);
    }

    #[test]
    fn arch_specific_cubins_need_the_exact_device() {
        let sm90a = parse_arch("sm_90a").unwrap();
        assert!(device_runs(sm90a, (9, 0)));
        assert!(!device_runs(sm90a, (10, 0)));
        assert!(!device_runs(sm90a, (8, 9)));
        let sm80 = parse_arch("sm_80").unwrap();
        assert!(device_runs(sm80, (8, 0)));
        assert!(device_runs(sm80, (8, 6)));
        assert!(!device_runs(sm80, (9, 0)));
        assert!(!device_runs(sm80, (7, 5)));
    }

    #[test]
    fn check_device_follows_the_build() {
        match arch() {
            None => assert!(matches!(check_device((9, 0)), Err(Error::NoKernels(_)))),
            Some(a) => {
                let t = parse_arch(a).unwrap();
                assert!(check_device((t.major, t.minor)).is_ok());
                assert!(matches!(
                    check_device((t.major + 1, t.minor)),
                    Err(Error::NoGpu(_))
                ));
            }
        }
    }
}
