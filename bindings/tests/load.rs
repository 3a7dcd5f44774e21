//! Loading the real host library (no GPU needed). Skips with a printed reason when the
//! `nvidia-nvshmem-cu13` wheel is not installed where it is looked for.

use std::path::{Path, PathBuf};

use nvshmem_sys::locate::{project_root, wheel_lib_dirs, Candidate, HOST_LIBRARY};
use nvshmem_sys::{Error, Nvshmem, UniqueId, DEVICE_LIBRARY};

/// The wheel's host library: `FLASHMOE_NVSHMEM_LIB`, the project's `.toolchain` venv, or
/// the development machines' `/tmp/pipwarm/venv`.
fn wheel_library() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLASHMOE_NVSHMEM_LIB") {
        return Some(PathBuf::from(p));
    }
    [
        project_root().join(".toolchain"),
        PathBuf::from("/tmp/pipwarm/venv"),
    ]
    .iter()
    .flat_map(|v| wheel_lib_dirs(v))
    .map(|d| d.join(HOST_LIBRARY))
    .next()
}

macro_rules! wheel_or_skip {
    () => {
        match wheel_library() {
            Some(p) => p,
            None => {
                eprintln!("SKIPPED: no nvidia-nvshmem-cu13 wheel found (set FLASHMOE_NVSHMEM_LIB)");
                return;
            }
        }
    };
}

#[test]
fn loads_the_wheel_and_reports_a_compatible_version() {
    let path = wheel_or_skip!();
    let lib = Nvshmem::load_file(&path).unwrap();
    let v = lib.version();
    eprintln!("{} reports NVSHMEM {v}", lib.path());
    assert_eq!(v.major, 3, "{v}");
    assert!(v.minor >= DEVICE_LIBRARY.minor, "{v} is older than 3.3");
    assert_eq!(lib.check_version().unwrap(), v);
    // OpenSHMEM specification 1.x.
    assert_eq!(lib.spec_version().0, 1);
    // Nothing initialised yet.
    assert_eq!(
        lib.init_status(),
        nvshmem_sys::types::STATUS_NOT_INITIALIZED
    );
}

#[test]
fn candidate_list_skips_failures_and_reports_each() {
    let path = wheel_or_skip!();
    let missing = Candidate::File {
        origin: "test",
        path: PathBuf::from("/nonexistent/libnvshmem_host.so.3"),
    };
    let good = Candidate::File {
        origin: "test",
        path: path.clone(),
    };
    let lib = Nvshmem::load_from_candidates(&[missing.clone(), good]).unwrap();
    assert_eq!(Path::new(lib.path()), path);

    let err = Nvshmem::load_from_candidates(&[missing]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Load(_)), "{msg}");
    assert!(msg.contains("/nonexistent/libnvshmem_host.so.3"), "{msg}");
    assert!(msg.contains("FLASHMOE_NVSHMEM_LIB"), "{msg}");
}

#[test]
fn a_library_without_the_symbols_is_refused_naming_one() {
    // libgcc_s is on every glibc system and has none of NVSHMEM's symbols.
    let err = Nvshmem::load_from_candidates(&[Candidate::File {
        origin: "test",
        path: PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
    }]);
    match err {
        Err(Error::Load(msg)) if msg.contains("is not a file") => {
            eprintln!("SKIPPED: {msg}");
        }
        Err(Error::Load(msg)) => assert!(
            msg.contains("lacks symbol `nvshmemx_get_uniqueid`"),
            "{msg}"
        ),
        other => panic!("expected a load error, got {other:?}"),
    }
}

#[test]
fn unique_id_is_made_without_a_gpu() {
    let path = wheel_or_skip!();
    let lib = Nvshmem::load_file(&path).unwrap();
    let a = lib.get_uniqueid().unwrap();
    assert!(a.has_expected_version(), "{a:?}");
    assert!(a.internal.iter().any(|&b| b != 0));
    let b = lib.get_uniqueid().unwrap();
    assert!(UniqueId::from_bytes(&a.to_bytes()) == a);
    // Two ids made in a row differ (each names its own listening endpoint or nonce).
    assert!(a != b, "two unique ids were identical");
}
