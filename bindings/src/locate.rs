//! Where to look for `libnvshmem_host.so.3`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// File name (and soname) of the NVSHMEM host library.
pub const HOST_LIBRARY: &str = "libnvshmem_host.so.3";
/// Environment variable naming the host library file to load, overriding every other place.
pub const ENV_LIB: &str = "FLASHMOE_NVSHMEM_LIB";
/// Environment variable of an NVSHMEM installation whose `lib/` holds the host library.
pub const ENV_HOME: &str = "NVSHMEM_HOME";

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Candidate {
    /// A file path (from `FLASHMOE_NVSHMEM_LIB`, `NVSHMEM_HOME` or the project's venv).
    File {
        /// Where the path came from, for error messages.
        origin: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The bare soname, resolved by the system's dynamic loader (`LD_LIBRARY_PATH`, ldconfig).
    Loader,
}

impl std::fmt::Display for Candidate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Candidate::File { origin, path } => write!(f, "{} ({origin})", path.display()),
            Candidate::Loader => write!(f, "{HOST_LIBRARY} (default loader path)"),
        }
    }
}

/// The project's root: the parent of this crate's directory (`<repo>/bindings`).
pub fn project_root() -> PathBuf {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    crate_dir.parent().unwrap_or(crate_dir).to_path_buf()
}

/// The NVSHMEM wheel's `lib/` directories inside a Python virtual environment rooted at
/// `venv` (`<venv>/lib/python3*/site-packages/nvidia/nvshmem/lib`), sorted by name.
pub fn wheel_lib_dirs(venv: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/nvidia/nvshmem/lib"))
        .filter(|p| p.join(HOST_LIBRARY).is_file())
        .collect();
    dirs.sort();
    dirs
}

/// The places to try, in order, given an environment lookup:
/// 1. `FLASHMOE_NVSHMEM_LIB` (a file) — when set, the only candidate;
/// 2. `$NVSHMEM_HOME/lib/libnvshmem_host.so.3`;
/// 3. the project's `.toolchain` venv (`<repo>/.toolchain/lib/python3*/site-packages/nvidia/nvshmem/lib`);
/// 4. the bare soname through the default loader path.
pub fn candidates(env: &dyn Fn(&str) -> Option<OsString>, root: &Path) -> Vec<Candidate> {
    if let Some(file) = env(ENV_LIB).filter(|v| !v.is_empty()) {
        return vec![Candidate::File {
            origin: ENV_LIB,
            path: PathBuf::from(file),
        }];
    }
    let mut out = Vec::new();
    if let Some(home) = env(ENV_HOME).filter(|v| !v.is_empty()) {
        out.push(Candidate::File {
            origin: ENV_HOME,
            path: PathBuf::from(home).join("lib").join(HOST_LIBRARY),
        });
    }
    for dir in wheel_lib_dirs(&root.join(".toolchain")) {
        out.push(Candidate::File {
            origin: ".toolchain venv",
            path: dir.join(HOST_LIBRARY),
        });
    }
    out.push(Candidate::Loader);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(map: HashMap<&'static str, &'static str>) -> impl Fn(&str) -> Option<OsString> {
        move |k| map.get(k).map(OsString::from)
    }

    #[test]
    fn explicit_file_is_the_only_candidate() {
        let env = lookup(HashMap::from([(ENV_LIB, "/x/lib.so"), (ENV_HOME, "/home")]));
        let c = candidates(&env, Path::new("/nonexistent"));
        assert_eq!(
            c,
            vec![Candidate::File {
                origin: ENV_LIB,
                path: PathBuf::from("/x/lib.so")
            }]
        );
    }

    #[test]
    fn home_then_venv_then_loader() {
        let root = std::env::temp_dir().join(format!("nvshmem-sys-locate-{}", std::process::id()));
        let lib = root.join(".toolchain/lib/python3.11/site-packages/nvidia/nvshmem/lib");
        std::fs::create_dir_all(&lib).unwrap();
        std::fs::write(lib.join(HOST_LIBRARY), b"").unwrap();
        let env = lookup(HashMap::from([(ENV_HOME, "/opt/nvshmem")]));
        let c = candidates(&env, &root);
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(
            c[0],
            Candidate::File {
                origin: ENV_HOME,
                path: PathBuf::from("/opt/nvshmem/lib").join(HOST_LIBRARY)
            }
        );
        assert_eq!(
            c[1],
            Candidate::File {
                origin: ".toolchain venv",
                path: lib.join(HOST_LIBRARY)
            }
        );
        assert_eq!(c[2], Candidate::Loader);
    }

    #[test]
    fn empty_environment_falls_back_to_the_loader() {
        let env = lookup(HashMap::from([(ENV_LIB, ""), (ENV_HOME, "")]));
        let c = candidates(&env, Path::new("/nonexistent"));
        assert_eq!(c, vec![Candidate::Loader]);
    }
}
