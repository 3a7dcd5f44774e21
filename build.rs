//! Build script: compiles every `kernel/*.cu` into a cubin and embeds it in the library.
//!
//! * nvcc is looked up in this order: `$FLASHMOE_NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`,
//!   `$PATH`, `/usr/local/cuda/bin`, `<repo>/.toolchain` (the venv made by
//!   `scripts/install-cuda-toolchain.sh`). `FLASHMOE_NVCC=none` builds without kernels on purpose.
//! * Each `kernel/<name>.cu` becomes `$OUT_DIR/<name>.cubin` for `sm_90a` (override with
//!   `FLASHMOE_CUDA_ARCH`, e.g. `90a`, `sm_100a`); extra nvcc flags from `FLASHMOE_NVCC_FLAGS`.
//!   A file named `*_nvshmem.cu` is compiled relocatable and device-linked with NVSHMEM's
//!   device library (`$NVSHMEM_HOME`, else the NVSHMEM wheel next to nvcc or in `.toolchain`);
//!   it is skipped with a warning when that library is not found.
//! * `$OUT_DIR/kernels.rs` lists the cubins (`include_bytes!`); `host/gpu/kernels.rs` includes it.
//!   When at least one kernel was built, `cfg(flashmoe_kernels)` is set.
//! * The ptxas report (`-Xptxas -v`: registers, shared memory, spills) goes to
//!   `$OUT_DIR/ptxas-report.txt` and `<target dir>/flashmoe-ptxas-report.txt`;
//!   `FLASHMOE_PRINT_PTXAS=1` also prints it as build warnings. Spills always warn.
//! * A kernel that fails to compile fails the build. Without nvcc the build succeeds with a
//!   warning (the GPU backend is then disabled), unless `FLASHMOE_REQUIRE_KERNELS=1`, which
//!   turns a missing nvcc or a skipped kernel into an error (CI sets it).
//! * Reruns when `kernel/`, the nvcc found, or one of [`ENV_VARS`] changes. A missing
//!   `.toolchain` is not watched (cargo would rerun on every build); the install script
//!   touches `build.rs` instead after installing.
//! * The pure parts (search order, command lines, spill detection, generated source) live
//!   in `build/support.rs` and are tested by `tests/build_support.rs`.

#[path = "build/support.rs"]
mod support;

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every environment variable this script reads.
const ENV_VARS: &[&str] = &[
    "FLASHMOE_NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "FLASHMOE_CUDA_ARCH",
    "FLASHMOE_NVCC_FLAGS",
    "NVSHMEM_HOME",
    "FLASHMOE_PRINT_PTXAS",
    "FLASHMOE_REQUIRE_KERNELS",
];

/// How to get a compiler, repeated in every message that concerns a missing one.
const HOW_TO_ENABLE: &str = "run scripts/install-cuda-toolchain.sh (pinned CUDA 13.0 nvcc from \
     PyPI into .toolchain/) or set FLASHMOE_NVCC / CUDA_HOME, then rebuild";

fn main() {
    if let Err(e) = run() {
        eprintln!("\nflashmoe build.rs: error: {e}\n");
        std::process::exit(1);
    }
}

/// One `kernel/*.cu` source file.
struct Kernel {
    /// File stem: the name `gpu::kernels::cubin` takes.
    name: String,
    /// The `.cu` file.
    source: PathBuf,
}

/// A kernel that was compiled.
struct Built {
    name: String,
    cubin: PathBuf,
    bytes: u64,
}

fn run() -> Result<(), String> {
    let manifest = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let kernel_dir = manifest.join("kernel");

    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=build/support.rs");
    println!("cargo::rerun-if-changed=kernel");
    for v in ENV_VARS {
        println!("cargo::rerun-if-env-changed={v}");
    }
    println!("cargo::rustc-check-cfg=cfg(flashmoe_kernels)");

    let require = flag("FLASHMOE_REQUIRE_KERNELS");
    let kernels = list_kernels(&kernel_dir)?;
    let arch = support::normalize_arch(&env::var("FLASHMOE_CUDA_ARCH").unwrap_or_default())?;

    let nvcc = match find_nvcc(&manifest)? {
        Some(n) => n,
        None => {
            let why = if env::var("FLASHMOE_NVCC").is_ok_and(|v| v.trim() == "none") {
                format!("FLASHMOE_NVCC=none, GPU backend disabled; to enable: {HOW_TO_ENABLE}")
            } else {
                format!("nvcc not found, GPU backend disabled; to enable: {HOW_TO_ENABLE}")
            };
            if require {
                return Err(format!("FLASHMOE_REQUIRE_KERNELS=1 but {why}"));
            }
            println!("cargo::warning=flashmoe: {why}");
            write_kernels_rs(&out_dir, &[], &[], "", &why)?;
            write_report(&out_dir, &format!("# flashmoe ptxas report\n# {why}\n"))?;
            return Ok(());
        }
    };
    println!("cargo::rerun-if-changed={}", nvcc.display());
    let version = nvcc_version(&nvcc)?;
    let nvshmem = find_nvshmem(&manifest, &nvcc);
    if let Some(n) = &nvshmem {
        println!("cargo::rerun-if-changed={}", n.join("lib").display());
    }

    let mut report = format!(
        "# flashmoe ptxas report\n# nvcc: {} ({version})\n# arch: sm_{arch}\n",
        nvcc.display()
    );
    let mut built = Vec::new();
    let mut skipped = Vec::new();
    let mut to_build = Vec::new();
    for k in &kernels {
        if support::is_nvshmem_kernel(&k.name) && nvshmem.is_none() {
            let why = format!(
                "kernel/{}.cu skipped: NVSHMEM device library (lib/libnvshmem_device.a) not found; \
                 set NVSHMEM_HOME or run scripts/install-cuda-toolchain.sh",
                k.name
            );
            if require {
                return Err(format!("FLASHMOE_REQUIRE_KERNELS=1 but {why}"));
            }
            println!("cargo::warning=flashmoe: {why}");
            let _ = writeln!(report, "\n== {} ==\n{why}", k.name);
            skipped.push((k.name.clone(), why));
        } else {
            to_build.push(k);
        }
    }
    let logs = compile_all(
        &nvcc,
        &arch,
        &to_build,
        &kernel_dir,
        &out_dir,
        nvshmem.as_deref(),
    );
    for (k, log) in to_build.iter().zip(logs) {
        let log = log?;
        for line in support::spill_lines(&log) {
            println!("cargo::warning=flashmoe: {}: {line}", k.name);
        }
        let _ = write!(report, "\n== {} ==\n{log}", k.name);
        let cubin = out_dir.join(format!("{}.cubin", k.name));
        let bytes = fs::metadata(&cubin)
            .map_err(|e| format!("{}: {e}", cubin.display()))?
            .len();
        built.push(Built {
            name: k.name.clone(),
            cubin,
            bytes,
        });
    }

    let note = if built.is_empty() {
        "no kernel/*.cu file was compiled".to_string()
    } else {
        String::new()
    };
    write_kernels_rs(&out_dir, &built, &skipped, &format!("sm_{arch}"), &note)?;
    write_report(&out_dir, &report)?;
    if flag("FLASHMOE_PRINT_PTXAS") {
        for line in report.lines() {
            println!("cargo::warning={line}");
        }
    }
    if !built.is_empty() {
        println!("cargo::rustc-cfg=flashmoe_kernels");
    }
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    env::var(name).map_err(|e| format!("environment variable {name}: {e}"))
}

/// True when the variable is set to something other than empty, `0`, `false` or `no`.
fn flag(name: &str) -> bool {
    support::flag_value(env::var(name).ok().as_deref())
}

/// `kernel/*.cu`, sorted by name.
fn list_kernels(dir: &Path) -> Result<Vec<Kernel>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "cu") && path.is_file() {
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| format!("{}: file name is not UTF-8", path.display()))?
                .to_string();
            if !support::valid_kernel_name(&name) {
                return Err(format!(
                    "{}: kernel file names may only use [A-Za-z0-9_]",
                    path.display()
                ));
            }
            out.push(Kernel { name, source: path });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// nvcc in the documented search order; `Ok(None)` when there is none.
fn find_nvcc(manifest: &Path) -> Result<Option<PathBuf>, String> {
    if let Ok(v) = env::var("FLASHMOE_NVCC") {
        let v = v.trim();
        if v == "none" {
            return Ok(None);
        }
        if !v.is_empty() {
            let p = PathBuf::from(v);
            return if is_executable(&p) {
                Ok(Some(p))
            } else {
                Err(format!("FLASHMOE_NVCC = {v}: not an executable file"))
            };
        }
    }
    let sites: Vec<PathBuf> = toolchain_site_packages(manifest).collect();
    let candidates = support::nvcc_candidates(|v| env::var(v).ok(), &sites);
    // FLASHMOE_NVCC was handled above; the rest in the documented order.
    Ok(candidates.into_iter().find(|p| is_executable(p)))
}

/// `<repo>/.toolchain/lib*/python*/site-packages` directories.
fn toolchain_site_packages(manifest: &Path) -> impl Iterator<Item = PathBuf> {
    let mut dirs = Vec::new();
    for lib in ["lib", "lib64"] {
        if let Ok(entries) = fs::read_dir(manifest.join(".toolchain").join(lib)) {
            let mut found: Vec<PathBuf> = entries
                .filter_map(|e| e.ok().map(|e| e.path().join("site-packages")))
                .filter(|p| p.is_dir())
                .collect();
            found.sort();
            dirs.extend(found);
        }
    }
    dirs.into_iter()
}

fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let out = Command::new(nvcc)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} --version could not run: {e}", nvcc.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            nvcc.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.contains("release"))
        .unwrap_or("unknown version")
        .trim()
        .to_string())
}

/// An NVSHMEM root with `include/nvshmem.h` and `lib/libnvshmem_device.a`.
fn find_nvshmem(manifest: &Path, nvcc: &Path) -> Option<PathBuf> {
    let sites: Vec<PathBuf> = toolchain_site_packages(manifest).collect();
    support::nvshmem_candidates(env::var("NVSHMEM_HOME").ok().as_deref(), nvcc, &sites)
        .into_iter()
        .find(|r| {
            r.join("include/nvshmem.h").is_file() && r.join("lib/libnvshmem_device.a").is_file()
        })
}

/// Runs one nvcc command; returns its combined output, or an error with all of it.
fn nvcc_step(nvcc: &Path, args: &[String], what: &str) -> Result<String, String> {
    let out = Command::new(nvcc)
        .args(args)
        .output()
        .map_err(|e| format!("{what}: could not run {}: {e}", nvcc.display()))?;
    let mut log = String::from_utf8_lossy(&out.stdout).into_owned();
    log.push_str(&String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        return Err(format!(
            "{what} failed ({}). A kernel that does not compile fails the build instead of \
             silently disabling the GPU backend.\ncommand: {} {}\n{log}",
            out.status,
            nvcc.display(),
            args.join(" ")
        ));
    }
    Ok(log)
}

/// Compiles the kernels, up to `$NUM_JOBS` (cargo's job count) at a time; results in order.
fn compile_all(
    nvcc: &Path,
    arch: &str,
    kernels: &[&Kernel],
    kernel_dir: &Path,
    out_dir: &Path,
    nvshmem: Option<&Path>,
) -> Vec<Result<String, String>> {
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let mut results = Vec::with_capacity(kernels.len());
    for chunk in kernels.chunks(jobs) {
        std::thread::scope(|scope| {
            let handles: Vec<_> = chunk
                .iter()
                .map(|k| scope.spawn(move || compile(nvcc, arch, k, kernel_dir, out_dir, nvshmem)))
                .collect();
            for (h, k) in handles.into_iter().zip(chunk) {
                results.push(
                    h.join().unwrap_or_else(|_| {
                        Err(format!("compiling kernel/{}.cu panicked", k.name))
                    }),
                );
            }
        });
    }
    results
}

/// Compiles one kernel into `$OUT_DIR/<name>.cubin`; returns nvcc's output (the ptxas report).
fn compile(
    nvcc: &Path,
    arch: &str,
    k: &Kernel,
    kernel_dir: &Path,
    out_dir: &Path,
    nvshmem: Option<&Path>,
) -> Result<String, String> {
    let cubin = out_dir.join(format!("{}.cubin", k.name));
    let extra = env::var("FLASHMOE_NVCC_FLAGS").unwrap_or_default();
    let common = support::common_flags(arch, &kernel_dir.join("include"), &extra);
    let what = format!("nvcc on kernel/{}.cu", k.name);
    match nvshmem {
        Some(root) if support::is_nvshmem_kernel(&k.name) => {
            let obj = out_dir.join(format!("{}.o", k.name));
            let (compile, link) =
                support::nvshmem_args(arch, &common, root, &k.source, &obj, &cubin);
            let mut log = nvcc_step(nvcc, &compile, &what)?;
            let what = format!("device link of kernel/{}.cu", k.name);
            log.push_str(&nvcc_step(nvcc, &link, &what)?);
            Ok(log)
        }
        _ => nvcc_step(
            nvcc,
            &support::cubin_args(&common, &k.source, &cubin),
            &what,
        ),
    }
}

/// Writes `$OUT_DIR/kernels.rs`: the embedded cubins, the skipped kernels and a note.
fn write_kernels_rs(
    out_dir: &Path,
    built: &[Built],
    skipped: &[(String, String)],
    arch: &str,
    note: &str,
) -> Result<(), String> {
    let embedded: Vec<support::Embedded<'_>> = built
        .iter()
        .map(|b| support::Embedded {
            name: &b.name,
            cubin: &b.cubin,
            bytes: b.bytes,
        })
        .collect();
    let path = out_dir.join("kernels.rs");
    fs::write(&path, support::kernels_rs(&embedded, skipped, arch, note))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes the report into `$OUT_DIR` and, when the target directory can be found, into
/// `<target>/flashmoe-ptxas-report.txt`.
fn write_report(out_dir: &Path, report: &str) -> Result<(), String> {
    let local = out_dir.join("ptxas-report.txt");
    fs::write(&local, report).map_err(|e| format!("{}: {e}", local.display()))?;
    // OUT_DIR = <target>[/<triple>]/<profile>/build/<pkg>-<hash>/out; cargo puts
    // CACHEDIR.TAG at the root of the target directory.
    if let Some(t) = out_dir
        .ancestors()
        .find(|d| d.join("CACHEDIR.TAG").is_file())
    {
        let dst = t.join("flashmoe-ptxas-report.txt");
        fs::write(&dst, report).map_err(|e| format!("{}: {e}", dst.display()))?;
    }
    Ok(())
}
