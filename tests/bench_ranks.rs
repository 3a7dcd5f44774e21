//! `flashmoe-bench layer` as ranks of a multi-process world, on any machine: the launcher
//! side (`--nproc`) and the rank side (launcher environment) must fail with clear, typed
//! errors where they cannot run, leave no process behind, and leave the single-process
//! path unchanged.

use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

const BENCH: &str = env!("CARGO_BIN_EXE_flashmoe-bench");

/// The variables of the launcher convention, removed from every command so that the
/// environment of the test runner cannot switch rank mode on by accident.
const RANK_VARS: [&str; 9] = [
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "FLASHMOE_BOOTSTRAP_TIMEOUT_S",
    "FLASHMOE_MASTER_PORT",
    "TORCHELASTIC_USE_AGENT_STORE",
];

/// A tag that marks the processes of one test in their environment.
fn unique_tag(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{test}-{}-{nanos}", std::process::id())
}

fn bench(args: &[&str], env: &[(&str, &str)], tag: &str) -> Output {
    let mut cmd = Command::new(BENCH);
    cmd.args(args).env("FLASHMOE_TEST_TAG", tag);
    for v in RANK_VARS {
        cmd.env_remove(v);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run flashmoe-bench")
}

/// Processes (other than this one) whose environment carries `tag`: Linux only (reads
/// /proc); elsewhere none can be found and the check is vacuous.
fn processes_tagged(tag: &str) -> Vec<u32> {
    let needle = format!("FLASHMOE_TEST_TAG={tag}");
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

/// No process of `tag` is left; zombies being reaped get a short grace period.
fn assert_nothing_left(tag: &str) {
    let start = Instant::now();
    loop {
        let left = processes_tagged(tag);
        if left.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "processes still running after the launcher exited: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn tag_scan_finds_a_running_child() {
    // The leak check below is only meaningful if the scan sees live processes.
    if std::fs::read_dir("/proc").is_err() {
        println!("skipped tag_scan_finds_a_running_child: no /proc on this system");
        return;
    }
    let tag = unique_tag("scan");
    let mut child = Command::new("sleep")
        .arg("30")
        .env("FLASHMOE_TEST_TAG", &tag)
        .spawn()
        .expect("spawn sleep");
    // Between fork and exec /proc/<pid>/environ still shows the parent's environment:
    // wait (bounded) until the child has exec'd with the tag.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut found = processes_tagged(&tag);
    while found.is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        found = processes_tagged(&tag);
    }
    child.kill().ok();
    child.wait().ok();
    assert_eq!(found, vec![child.id()]);
    assert_nothing_left(&tag);
}

#[test]
fn nproc_with_the_cpu_backend_is_refused_before_spawning_and_leaves_nothing_running() {
    let tag = unique_tag("nproc-cpu");
    let start = Instant::now();
    let out = bench(
        &[
            "layer",
            "--nproc",
            "2",
            "--backend",
            "cpu",
            "--preset",
            "tiny",
            "--iters",
            "1",
        ],
        &[],
        &tag,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "must fail; stderr: {err}");
    // The launcher refuses before it spawns anything: no rank ever ran.
    assert!(!err.contains("[rank"), "{err}");
    assert!(err.contains("backend"), "{err}");
    assert!(err.contains("--world 2"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "took {:?}",
        start.elapsed()
    );
    assert!(!text(&out.stdout).contains("FLASHMOE_RESULT"));
    assert_nothing_left(&tag);
}

#[test]
fn nproc_must_be_positive_and_a_number() {
    let tag = unique_tag("nproc-parse");
    let zero = bench(&["layer", "--nproc", "0", "--backend", "cpu"], &[], &tag);
    assert!(!zero.status.success());
    let err = text(&zero.stderr);
    assert!(err.contains("nproc"), "{err}");
    let word = bench(&["layer", "--nproc", "two"], &[], &tag);
    assert!(!word.status.success());
    let err = text(&word.stderr);
    assert!(err.contains("--nproc"), "{err}");
    assert_nothing_left(&tag);
}

#[test]
fn a_rank_with_the_cpu_backend_fails_without_joining_a_world() {
    let tag = unique_tag("rank-cpu");
    // Port 9 (discard) on localhost: nothing may be contacted, the refusal comes first.
    let env = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "9"),
    ];
    let start = Instant::now();
    let out = bench(
        &["layer", "--backend", "cpu", "--preset", "tiny"],
        &env,
        &tag,
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("rank 1 of 2"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn a_half_set_launcher_environment_is_refused_naming_the_variable() {
    let tag = unique_tag("rank-env");
    let torchrun: &[(&str, &str)] = &[
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
    ];
    let cases: [(&[(&str, &str)], &str); 4] = [
        (torchrun, "FLASHMOE_MASTER_PORT"),
        (&[("RANK", "0")], "WORLD_SIZE"),
        (
            &[("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")],
            "MASTER_PORT",
        ),
        (
            &[
                ("RANK", "3"),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", "0"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", "29500"),
            ],
            "RANK",
        ),
    ];
    for (env, var) in cases {
        let out = bench(
            &["layer", "--backend", "cpu", "--preset", "tiny"],
            env,
            &tag,
        );
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{env:?}: {err}");
        assert!(
            err.contains(&format!("environment variable `{var}`")),
            "{env:?}: {err}"
        );
    }
}

#[test]
fn without_launcher_variables_the_single_process_path_runs() {
    let tag = unique_tag("single");
    let out = bench(
        &[
            "layer",
            "--backend",
            "cpu",
            "--preset",
            "tiny",
            "--world",
            "2",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--check-tokens",
            "8",
            "--json",
        ],
        &[],
        &tag,
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON report");
    assert!(v["backend"].as_str().unwrap_or("").contains("cpu"), "{v}");
    assert!(v["world"].as_str().unwrap_or("").contains('2'), "{v}");
    let err = v["max_rel_error"].as_f64().expect("error");
    let tol = v["tolerance"].as_f64().expect("tolerance");
    assert!(err <= tol, "{err} > {tol}");
}
