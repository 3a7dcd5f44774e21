//! `flashmoe-bench model` on the CPU executor: the tile rule reaches every layer.

use serde_json::Value;

fn model_json(tiles: &str) -> Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe-bench"))
        .args([
            "model",
            "--preset",
            "tiny",
            "--backend",
            "cpu",
            "--layers",
            "2",
        ])
        .args(["--tokens", "48", "--iters", "1", "--warmup", "0", "--json"])
        .args(["--tiles", tiles])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("run flashmoe-bench");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--tiles {tiles}: {err}");
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

/// Every tile rule runs the model, is checked against the reference, and is reported
/// (the tiny preset is bf16, so `auto` gives its small blocks decode tiles).
#[test]
fn model_runs_and_reports_every_tile_rule() {
    for tiles in ["auto", "narrow", "classic", "auto-serial"] {
        let j = model_json(tiles);
        assert_eq!(j["tiles"], tiles, "{j}");
        let err = j["max_rel_error"]
            .as_f64()
            .expect("checked against the reference");
        assert!(err.is_finite() && err < 2e-2, "--tiles {tiles}: {j}");
        assert_eq!(j["layers"].as_array().map(Vec::len), Some(2), "{j}");
    }
}
