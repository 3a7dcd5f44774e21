//! The device-side script of a GPU session (`scripts/gpu-run.sh`, carried as
//! `gpu-carry/run.sh`): its step budgets add up to at most 7 minutes, every step it runs
//! has one, and it is valid bash.

use std::collections::BTreeMap;
use std::process::Command;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-run.sh");

/// The `BUDGETS` table: step name -> seconds.
fn budgets(text: &str) -> BTreeMap<String, u64> {
    let start = text.find("BUDGETS=\"").expect("a BUDGETS table") + "BUDGETS=\"".len();
    let end = start + text[start..].find('"').expect("the table's end");
    text[start..end]
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next().expect("name").to_string();
            let secs = w.next().and_then(|s| s.parse().ok()).expect("seconds");
            assert!(w.next().is_none(), "one name and one budget per line: {l}");
            (name, secs)
        })
        .collect()
}

#[test]
fn step_budgets_fit_seven_minutes_and_cover_every_step() {
    let text = std::fs::read_to_string(SCRIPT).expect("read gpu-run.sh");
    let b = budgets(&text);
    let total: u64 = b.values().sum();
    assert!(
        total <= 420,
        "the steps are budgeted {total} s, over 7 minutes: {b:?}"
    );
    assert!(b.values().all(|&s| s > 0), "{b:?}");
    // The order: facts, stage checks, GPU tests, sanitizer, graph replay, benches.
    for must in [
        "facts",
        "stages-w1",
        "stages-e2",
        "stages-e4",
        "test-gpu_layer",
        "memcheck",
        "racecheck",
        "synccheck",
        "graph-replay",
        "bench-tiny",
        "bench-deepseek-v3",
    ] {
        assert!(b.contains_key(must), "no budget for step {must}");
    }
    // Both tile rules are benched on every preset (issue 12), classic stage-checked once.
    let benches = text.matches("--compare-tiles").count();
    assert_eq!(
        benches, 2,
        "the preset loop and deepseek-v3 compare the tile rules"
    );
    assert!(
        text.contains("--tiles classic"),
        "no stage check of the classic tiles"
    );
    let order: Vec<usize> = [
        "step facts",
        "step stages-w1",
        "step \"test-$t\"",
        "step \"$tool\"",
        "step graph-replay",
        "step \"bench-$p\"",
    ]
    .iter()
    .map(|s| {
        text.find(s)
            .unwrap_or_else(|| panic!("no `{s}` in the script"))
    })
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "steps out of order: {order:?}"
    );
}

#[test]
fn script_is_valid_bash() {
    let out = Command::new("bash")
        .arg("-n")
        .arg(SCRIPT)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
