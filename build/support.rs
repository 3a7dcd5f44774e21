//! Pure helpers of `build.rs` (no process, no environment, no file access), kept apart so
//! that `tests/build_support.rs` can test them: the build script itself is never tested.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The architecture built when `FLASHMOE_CUDA_ARCH` is not set (wgmma/setmaxnreg need `a`).
pub const DEFAULT_ARCH: &str = "90a";

/// True when a flag variable's value means "on": set, and not empty, `0`, `false` or `no`.
pub fn flag_value(value: Option<&str>) -> bool {
    value.is_some_and(|v| !matches!(v.trim(), "" | "0" | "false" | "no"))
}

/// `FLASHMOE_CUDA_ARCH` (`90a`, `sm_90a`, `compute_90a`, `80`; empty: the default) to the
/// bare form used in `-gencode` (`90a`).
pub fn normalize_arch(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(DEFAULT_ARCH.to_string());
    }
    let a = raw
        .strip_prefix("sm_")
        .or_else(|| raw.strip_prefix("compute_"))
        .unwrap_or(raw);
    let valid = a.chars().next().is_some_and(|c| c.is_ascii_digit())
        && a.chars().all(|c| c.is_ascii_alphanumeric());
    if valid {
        Ok(a.to_string())
    } else {
        Err(format!(
            "FLASHMOE_CUDA_ARCH = {raw:?}: expected one architecture such as 90a, sm_90a or 80"
        ))
    }
}

/// Kernel file stems become Rust string literals and file names: `[A-Za-z0-9_]+` only.
pub fn valid_kernel_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// `kernel/<name>_nvshmem.cu` is built relocatable and linked with NVSHMEM's device library.
pub fn is_nvshmem_kernel(name: &str) -> bool {
    name.ends_with("_nvshmem")
}

/// Where nvcc is looked for, in order. `var` reads an environment variable; `site_packages`
/// are the `.toolchain` venv's site-packages directories.
pub fn nvcc_candidates(
    var: impl Fn(&str) -> Option<String>,
    site_packages: &[PathBuf],
) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(v) = var("FLASHMOE_NVCC").filter(|v| !v.trim().is_empty()) {
        c.push(PathBuf::from(v.trim()));
    }
    for root in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(r) = var(root).filter(|r| !r.trim().is_empty()) {
            c.push(PathBuf::from(r.trim()).join("bin/nvcc"));
        }
    }
    if let Some(path) = var("PATH") {
        c.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    c.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
    c.extend(site_packages.iter().map(|s| s.join("nvidia/cu13/bin/nvcc")));
    c
}

/// NVSHMEM roots to try, in order: `$NVSHMEM_HOME`, the wheel next to a PyPI nvcc
/// (`site-packages/nvidia/cu13/bin/nvcc` -> `site-packages/nvidia/nvshmem`), `.toolchain`.
pub fn nvshmem_candidates(
    nvshmem_home: Option<&str>,
    nvcc: &Path,
    site_packages: &[PathBuf],
) -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(h) = nvshmem_home.filter(|h| !h.trim().is_empty()) {
        c.push(PathBuf::from(h.trim()));
    }
    if let Some(nvidia) = nvcc.parent().and_then(Path::parent).and_then(Path::parent) {
        c.push(nvidia.join("nvshmem"));
    }
    c.extend(site_packages.iter().map(|s| s.join("nvidia/nvshmem")));
    c
}

/// Flags shared by every nvcc compile: target, optimisation, language, includes, ptxas
/// report, then the user's extra flags.
pub fn common_flags(arch: &str, include: &Path, extra: &str) -> Vec<String> {
    let mut f = vec![
        format!("-gencode=arch=compute_{arch},code=sm_{arch}"),
        "-O3".to_string(),
        "-std=c++17".to_string(),
        format!("-I{}", include.display()),
        "-Xptxas".to_string(),
        "-v".to_string(),
    ];
    f.extend(extra.split_whitespace().map(str::to_string));
    f
}

/// nvcc arguments of a plain kernel: one step to a cubin.
pub fn cubin_args(common: &[String], source: &Path, cubin: &Path) -> Vec<String> {
    let mut a = common.to_vec();
    a.extend([
        "-cubin".to_string(),
        source.display().to_string(),
        "-o".to_string(),
        cubin.display().to_string(),
    ]);
    a
}

/// nvcc arguments of an NVSHMEM kernel: relocatable compile, then device link to a cubin
/// with `libnvshmem_device.a` from `nvshmem/lib`.
pub fn nvshmem_args(
    arch: &str,
    common: &[String],
    nvshmem: &Path,
    source: &Path,
    object: &Path,
    cubin: &Path,
) -> (Vec<String>, Vec<String>) {
    let mut compile = vec!["-rdc=true".to_string()];
    compile.extend(common.iter().cloned());
    compile.extend([
        format!("-I{}", nvshmem.join("include").display()),
        "-c".to_string(),
        source.display().to_string(),
        "-o".to_string(),
        object.display().to_string(),
    ]);
    let link = vec![
        format!("-gencode=arch=compute_{arch},code=sm_{arch}"),
        "-dlink".to_string(),
        "-cubin".to_string(),
        object.display().to_string(),
        format!("-L{}", nvshmem.join("lib").display()),
        "-lnvshmem_device".to_string(),
        "-o".to_string(),
        cubin.display().to_string(),
    ];
    (compile, link)
}

/// `<function>: <ptxas line>` for every function whose ptxas report shows a non-zero spill.
pub fn spill_lines(log: &str) -> Vec<String> {
    let mut function = "?";
    let mut out = Vec::new();
    for line in log.lines() {
        if let Some(f) = line.split("Function properties for ").nth(1) {
            function = f.trim();
        }
        let spills = line.split(',').any(|part| {
            part.contains("spill")
                && part
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
        });
        if spills {
            out.push(format!("{function}: {}", line.trim()));
        }
    }
    out
}

/// A compiled kernel as `kernels.rs` embeds it.
pub struct Embedded<'a> {
    /// File stem.
    pub name: &'a str,
    /// Absolute path of the cubin.
    pub cubin: &'a Path,
    /// Its size in bytes (the array length of the aligned static).
    pub bytes: u64,
}

/// Source of `$OUT_DIR/kernels.rs`, included by `host/gpu/kernels.rs` (which defines
/// `Aligned`): statics `CUBINS`, `SKIPPED`, `ARCH`, `BUILD_NOTE`.
pub fn kernels_rs(
    built: &[Embedded<'_>],
    skipped: &[(String, String)],
    arch: &str,
    note: &str,
) -> String {
    let mut s = String::from("// @generated by build.rs: the kernels embedded in this build.\n");
    for (i, b) in built.iter().enumerate() {
        let _ = writeln!(
            s,
            "static CUBIN_{i}: Aligned<[u8; {}]> = Aligned(*include_bytes!({:?}));",
            b.bytes,
            b.cubin.to_string_lossy()
        );
    }
    s.push_str("/// (name, cubin) of every kernel built, sorted by name.\n");
    s.push_str("static CUBINS: &[(&str, &[u8])] = &[\n");
    for (i, b) in built.iter().enumerate() {
        let _ = writeln!(s, "    ({:?}, &CUBIN_{i}.0),", b.name);
    }
    s.push_str("];\n/// (name, reason) of every kernel source that was not built.\n");
    s.push_str("static SKIPPED: &[(&str, &str)] = &[\n");
    for (name, why) in skipped {
        let _ = writeln!(s, "    ({name:?}, {why:?}),");
    }
    s.push_str("];\n");
    s.push_str("/// The `sm_*` architecture of the cubins (empty without kernels).\n");
    let _ = writeln!(s, "static ARCH: &str = {arch:?};");
    s.push_str("/// Why there are no kernels (empty when there are).\n");
    let _ = writeln!(s, "static BUILD_NOTE: &str = {note:?};");
    s
}
