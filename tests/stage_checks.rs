//! `flashmoe-bench stages` on the CPU executor: every stage passes, and a planted wrong
//! value is found at its stage and named (the same command runs on the GPU in
//! `gpu-carry/run.sh`).

use std::process::Command;

fn stages(args: &[&str]) -> (bool, String) {
    stages_of(&[&["--tokens", "128"], args].concat())
}

/// `stages` on the CPU backend with `args` only.
fn stages_of(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_flashmoe-bench"))
        .arg("stages")
        .args(["--backend", "cpu"])
        .args(args)
        .output()
        .expect("run flashmoe-bench");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn every_stage_passes_on_the_cpu_executor() {
    let (ok, text) = stages(&["--world", "2"]);
    assert!(ok, "{text}");
    for s in ["gate", "dispatch", "gemm0", "gemm1", "combine"] {
        assert!(text.contains(&format!("stage {s}: pass (")), "{s}: {text}");
    }
    assert!(text.contains("stages: pass (5 stages)"), "{text}");
}

/// The tile tasks `[decode, prefill, wide, classic]` a GEMM stage line reports.
fn tile_tasks(text: &str, stage: &str) -> [usize; 4] {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("stage {stage}: pass (")))
        .unwrap_or_else(|| panic!("no passing {stage} line: {text}"));
    let counts = line
        .rsplit(", ")
        .next()
        .and_then(|t| t.strip_suffix(" tile tasks)"))
        .unwrap_or_else(|| panic!("no tile census: {line}"));
    let n: Vec<usize> = counts
        .split(" + ")
        .map(|w| {
            w.split(' ')
                .next()
                .and_then(|d| d.parse().ok())
                .unwrap_or_else(|| panic!("{line}"))
        })
        .collect();
    assert_eq!(n.len(), 4, "{line}");
    [n[0], n[1], n[2], n[3]]
}

#[test]
fn the_gemm_stages_cover_every_tile_path_of_the_rule() {
    // 128 tokens per rank (world 2, 8 experts, top-2): short blocks (decode tile) and
    // blocks over 32 rows (prefill tile) under auto, narrow and auto-serial; every block
    // classic under classic.
    for tiles in ["auto", "narrow", "auto-serial"] {
        let (ok, text) = stages(&["--world", "2", "--tiles", tiles]);
        assert!(ok, "{text}");
        for s in ["gemm0", "gemm1"] {
            let [decode, prefill, wide, classic] = tile_tasks(&text, s);
            assert!(decode > 0 && prefill > 0 && classic == 0, "{s}: {text}");
            if tiles == "narrow" {
                assert_eq!(wide, 0, "{s}: {text}");
            }
        }
    }
    let (ok, text) = stages(&["--world", "2", "--tiles", "classic"]);
    assert!(ok, "{text}");
    let [decode, prefill, wide, classic] = tile_tasks(&text, "gemm1");
    assert!(
        decode == 0 && prefill == 0 && wide == 0 && classic > 0,
        "{text}"
    );
    // One rank of 160 tokens on 2 experts, top-2: both pair lists hold all 160 tokens
    // (64 + 64 + 32 rows): a wide task and a decode block each under auto.
    let (ok, text) = stages_of(&["--experts", "2", "--top-k", "2", "--tokens", "160"]);
    assert!(ok, "{text}");
    let [decode, prefill, wide, classic] = tile_tasks(&text, "gemm1");
    assert!(
        decode > 0 && prefill == 0 && wide > 0 && classic == 0,
        "wide: {text}"
    );
    // f32: the FFMA decode tile for short blocks, classic above (no f32 prefill or wide
    // tile).
    let (ok, text) = stages(&["--world", "2", "--dtype", "f32"]);
    assert!(ok, "{text}");
    let [decode, prefill, wide, classic] = tile_tasks(&text, "gemm0");
    assert!(
        decode > 0 && prefill == 0 && wide == 0 && classic > 0,
        "f32: {text}"
    );
}

#[test]
fn a_planted_value_fails_its_stage_with_its_position_and_nothing_after() {
    let (ok, text) = stages(&["--world", "2", "--plant", "gemm1"]);
    assert!(!ok, "a planted error passed: {text}");
    for s in ["gate", "dispatch", "gemm0"] {
        assert!(text.contains(&format!("stage {s}: pass (")), "{s}: {text}");
    }
    let line = text
        .lines()
        .find(|l| l.starts_with("stage gemm1: FAIL 1 of"))
        .unwrap_or_else(|| panic!("no gemm1 failure line: {text}"));
    // The harness names what was planted: the expert output of rank 1's first kept pair,
    // in its owner's workspace at the pair's index.
    let planted = text
        .lines()
        .find(|l| l.starts_with("planted: "))
        .unwrap_or_else(|| panic!("{text}"));
    let row = planted
        .split("row: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("{planted}"));
    assert!(
        line.contains(&format!("row {row} column 3")),
        "{line} / {planted}"
    );
    assert!(
        line.contains("(expert output of source rank 1, token 0)"),
        "{line}"
    );
    assert!(
        !text.contains("stage combine"),
        "stages after the failure ran: {text}"
    );
    assert!(text.contains("stages: FAIL at gemm1"), "{text}");
}

#[test]
fn an_unknown_stage_is_refused() {
    let (ok, text) = stages(&["--plant", "everything"]);
    assert!(!ok);
    assert!(text.contains("plant"), "{text}");
}
