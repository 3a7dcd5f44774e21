//! `flashmoe-bench plan`: the memory and traffic of any layer, printed without allocating.

use std::process::Command;

#[test]
fn plan_of_a_huge_layer_prints_without_allocating() {
    // DeepSeek-V3 dropless on 8 ranks: about 28 GiB of heap per rank today, far above what
    // this process could allocate; the command must only compute and print it.
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
    assert!(text.contains("capacity 4096 rows"), "{text}");
    let rank0 = text
        .lines()
        .find(|l| l.starts_with("0 "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(rank0.contains("28.000 GiB"), "{rank0}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" GiB")).count(),
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
