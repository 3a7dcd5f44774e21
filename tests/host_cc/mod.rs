//! Compiles a program against `kernel/include` with the host's C or C++ compiler and runs
//! it (tests that check kernel headers without a GPU: `params_layout.rs`,
//! `tile_rule_kernel.rs`).
#![allow(dead_code)] // each test binary uses one of the languages

use std::path::Path;
use std::process::Command;

/// The language of a program: its compiler (environment variable, default) and flags.
#[derive(Debug, Clone, Copy)]
pub enum Lang {
    /// `CC` (default `cc`), C11.
    C,
    /// `CXX` (default `c++`), C++17.
    Cxx,
}

/// Builds `source` with `-Wall -Werror -I kernel/include`, runs it, and returns its stdout;
/// panics naming the compiler and the program when either step fails.
pub fn build_and_run(lang: Lang, source: &str) -> String {
    let (var, default, std, file) = match lang {
        Lang::C => ("CC", "cc", "-std=c11", "prog.c"),
        Lang::Cxx => ("CXX", "c++", "-std=c++17", "prog.cpp"),
    };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join(file);
    let exe = dir.path().join("prog");
    std::fs::write(&src, source).unwrap();
    let cc = std::env::var(var).unwrap_or_else(|_| default.to_string());
    let include = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel/include");
    let out = Command::new(&cc)
        .args([std, "-Wall", "-Werror", "-O0"])
        .arg(format!("-I{}", include.display()))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("this test needs a compiler (`{cc}`, or set {var}): {e}"));
    assert!(
        out.status.success(),
        "{cc} failed on the generated program:\n{}\n{source}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    assert!(run.status.success(), "the generated program failed");
    String::from_utf8(run.stdout).unwrap()
}
