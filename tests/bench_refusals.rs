//! The reproducers of the hardening issue against `flashmoe-bench` itself: each must end
//! in a typed error (or an honest "not checked") within seconds, before allocating what
//! it cannot have, without a panic or an abort. Every command runs on the CPU.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_flashmoe-bench");

fn bench(args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut cmd = Command::new(BENCH);
    cmd.args(args);
    for v in [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
    ] {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    let start = Instant::now();
    let out = cmd.output().expect("run flashmoe-bench");
    (out, start.elapsed())
}

/// Runs `args`, expects a clean failure (exit code 1, no panic) within 20 s whose stderr
/// contains every needle; returns stderr.
fn refused(args: &[&str], env: &[(&str, &str)], needles: &[&str]) -> String {
    let (out, took) = bench(args, env);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert!(!err.contains("panicked"), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` missing from {err}");
    }
    assert!(took < Duration::from_secs(20), "{args:?} took {took:?}");
    err
}

#[test]
fn layers_too_large_for_the_host_are_refused_before_allocating() {
    let mem = ["not enough host memory", "needs", "allows"];
    for args in [
        &[
            "layer",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--hidden",
            "65536",
            "--max-host-memory",
            "2G",
        ][..],
        &[
            "layer",
            "--preset",
            "mixtral-8x7b",
            "--backend",
            "cpu",
            "--max-host-memory",
            "2G",
        ],
        &[
            "layer",
            "--preset",
            "deepseek-v3",
            "--backend",
            "cpu",
            "--max-host-memory",
            "16G",
        ],
        &[
            "layer",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--world",
            "1024",
            "--max-host-memory",
            "1G",
        ],
        &[
            "model",
            "--preset",
            "qwen3-30b-a3b",
            "--backend",
            "cpu",
            "--layers",
            "48",
            "--max-host-memory",
            "1G",
        ],
    ] {
        let err = refused(args, &[], &mem);
        assert!(
            err.contains("memory estimate"),
            "the estimate is printed first: {err}"
        );
    }
}

#[test]
fn nproc_is_checked_before_any_child_is_spawned() {
    // No GPU here (or too few, or too little memory): refused in the launcher.
    let err = refused(&["layer", "--nproc", "128", "--preset", "tiny"], &[], &[]);
    assert!(!err.contains("[rank"), "a child ran: {err}");
    refused(&["layer", "--nproc", "4096"], &[], &["nproc"]);
}

#[test]
fn huge_counts_are_typed_errors() {
    let max = u64::MAX.to_string();
    refused(
        &[
            "layer",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--iters",
            &max,
        ],
        &[],
        &["`iters`"],
    );
    for layers in [
        "0..18446744073709551615",
        "0..1099511627776",
        "576460752303423488",
    ] {
        refused(
            &[
                "model",
                "--preset",
                "tiny",
                "--backend",
                "cpu",
                "--layers",
                layers,
            ],
            &[],
            &["`layers`"],
        );
    }
}

#[test]
fn model_under_a_launcher_is_refused() {
    refused(
        &["model", "--preset", "tiny", "--backend", "cpu"],
        &[("RANK", "1"), ("WORLD_SIZE", "2")],
        &["RANK", "one process"],
    );
}

#[test]
fn an_unchecked_run_says_so_and_never_ok() {
    let (out, took) = bench(
        &[
            "layer",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--check-tokens",
            "0",
            "--iters",
            "1",
            "--warmup",
            "0",
        ],
        &[],
    );
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = so
        .lines()
        .find(|l| l.trim_start().starts_with("check"))
        .unwrap_or("");
    assert!(
        check.contains("not checked") && !check.contains(": ok") && !check.contains("(ok)"),
        "{so}"
    );
    assert!(took < Duration::from_secs(60), "{took:?}");
    let (out, _) = bench(
        &[
            "layer",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--check-tokens",
            "0",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--json",
        ],
        &[],
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(j["max_rel_error"].is_null(), "{j}");
}
