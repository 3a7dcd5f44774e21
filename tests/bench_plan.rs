//! `flashmoe-bench plan`: the memory and traffic of any layer, printed without allocating.

use std::process::Command;

#[test]
fn plan_of_a_huge_layer_prints_without_allocating() {
    // DeepSeek-V3 dropless on 8 ranks, 4096 tokens per rank: the rank-level heap is
    // 2 x 8 x 4096 rows of 14 KiB plus metadata, under 1.5 GB per rank; the workspace and
    // weights are far above what this process could allocate: the command only prints.
    let out = Command::new(env!("CARGO_BIN_EXE_flashmoe-bench"))
        .args([
            "plan",
            "--preset",
            "deepseek-v3",
            "--world",
            "8",
            "--tokens",
            "4096",
        ])
        .args(["--capacity", "dropless"])
        .output()
        .expect("run flashmoe-bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("capacity 4096 pairs"), "{text}");
    let rank0 = text
        .lines()
        .find(|l| l.starts_with("0 "))
        .unwrap_or_else(|| panic!("{text}"));
    let heap: f64 = rank0
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{rank0}"));
    assert!(heap * (1u64 << 30) as f64 <= 1.5e9 && heap > 0.8, "{rank0}");
    // Top-8 over 8 ranks: about 1.5 times fewer dispatch bytes than one row per pair.
    assert!(
        rank0.contains("1.50x fewer") || rank0.contains("1.49x fewer"),
        "{rank0}"
    );
    assert_eq!(
        text.lines().filter(|l| l.ends_with("fewer bytes")).count(),
        8,
        "{text}"
    );
}

#[test]
fn plan_refuses_an_invalid_config_with_the_field() {
    let out = Command::new(env!("CARGO_BIN_EXE_flashmoe-bench"))
        .args(["plan", "--preset", "tiny", "--groups", "3/1"])
        .output()
        .expect("run flashmoe-bench");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("group_limit.groups"), "{err}");
}
