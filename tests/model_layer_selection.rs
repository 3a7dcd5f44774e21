//! Loading a selection of layers reads only those layers' tensors: a checkpoint whose layer
//! 5 is missing a tensor, or holds a mis-shaped or non-finite one, still loads layers
//! `0..2` (as `flashmoe-bench model --checkpoint DIR --layers 0..2` asks), and asking for
//! layer 5 is a typed error naming the tensor.
//!
//! The 6-layer checkpoint is made from the Mixtral fixture (`tests/fixtures/moe`, written
//! by transformers): its two layers' tensors copied to layers 0..6.

use flashmoe::model::{self, load, Checkpoint, LoadOptions};
use flashmoe::Error;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as St, SafeTensors};
use serde_json::Value;
use std::path::Path;

const LAYERS: usize = 6;
const BROKEN: &str = "model.layers.5.block_sparse_moe.experts.2.w3.weight";

/// How layer 5's `BROKEN` tensor is damaged.
enum Damage {
    Missing,
    Reshaped,
    NonFinite,
}

/// Writes a 6-layer Mixtral checkpoint into `dir`, with `BROKEN` damaged.
fn write(dir: &Path, damage: Damage) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe/mixtral-f32");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["num_hidden_layers"] = LAYERS.into();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, St, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        let copies: Vec<String> = match name.strip_prefix("model.layers.") {
            Some(rest) => {
                let (layer, tail) = rest.split_once('.').unwrap();
                let layer: usize = layer.parse().unwrap();
                // Layers 0 and 1 of the fixture become the even and odd layers.
                (0..LAYERS)
                    .filter(|l| l % 2 == layer)
                    .map(|l| format!("model.layers.{l}.{tail}"))
                    .collect()
            }
            None => vec![name.clone()],
        };
        for copy in copies {
            out.push((
                copy,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let t = out.iter().position(|t| t.0 == BROKEN).unwrap();
    match damage {
        Damage::Missing => {
            out.remove(t);
        }
        Damage::Reshaped => out[t].2 = vec![out[t].2[1], out[t].2[0] / 2, 2],
        Damage::NonFinite => out[t].3[8..12].copy_from_slice(&f32::NAN.to_le_bytes()),
    }
    let views: Vec<(String, TensorView)> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

fn options(layers: Vec<usize>) -> LoadOptions {
    let mut opts = LoadOptions::new(8);
    opts.progress = false;
    opts.layers = Some(layers);
    opts
}

#[test]
fn damaged_layer_five_does_not_stop_layers_zero_to_two() {
    for damage in [Damage::Missing, Damage::Reshaped, Damage::NonFinite] {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), damage);
        let ckpt = Checkpoint::open(dir.path()).unwrap();
        let family = load::family(&ckpt).unwrap();
        let selected = load::select_layers(&family, 0..2).unwrap();
        assert_eq!(selected, vec![0, 1]);
        let loaded = load::load_from(&ckpt, &options(selected)).unwrap();
        assert_eq!(
            loaded.layers.iter().map(|l| l.index).collect::<Vec<_>>(),
            vec![0, 1]
        );
        // The other undamaged layers load too; layer 5 is refused, naming the tensor (or,
        // for a non-finite value, the layer and the field).
        assert_eq!(
            model::load(dir.path(), &options(vec![2, 3, 4]))
                .unwrap()
                .layers
                .len(),
            3
        );
        let err = model::load(dir.path(), &options(vec![5])).unwrap_err();
        match &err {
            Error::Checkpoint { reason, .. } => assert!(reason.contains(BROKEN), "{reason}"),
            Error::ModelLayer { layer, source } => {
                assert_eq!(*layer, 5);
                assert!(
                    matches!(**source, Error::InvalidInput { ref reason, .. } if reason.contains("finite")),
                    "{source:?}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[test]
fn ranges_past_the_model_or_without_moe_layers_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), Damage::Missing);
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let family = load::family(&ckpt).unwrap();
    assert_eq!(load::select_layers(&family, 4..6).unwrap(), vec![4, 5]);
    for range in [0..7, 6..7] {
        match load::select_layers(&family, range.clone()) {
            Err(Error::InvalidConfig { field, .. }) => assert_eq!(field, "layers"),
            other => panic!("{range:?}: {other:?}"),
        }
    }
    // A DeepSeek fixture's layer 0 is dense: 0..1 selects nothing, 0..2 selects layer 1.
    let ds = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/moe/deepseek_v3-f32");
    let family = load::family(&Checkpoint::open(&ds).unwrap()).unwrap();
    assert_eq!(load::select_layers(&family, 0..2).unwrap(), vec![1]);
    assert!(matches!(
        load::select_layers(&family, 0..1),
        Err(Error::InvalidConfig { .. })
    ));
}

/// `flashmoe-bench model --checkpoint DIR --layers 0..2` runs on the damaged checkpoint;
/// `--layers 5..6` fails with the tensor's name.
#[test]
fn bench_model_reads_only_the_selected_layers() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), Damage::Missing);
    let path = dir.path().to_str().unwrap();
    let run = |layers: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flashmoe-bench"))
            .args(["model", "--checkpoint", path, "--layers", layers])
            .args([
                "--backend",
                "cpu",
                "--tokens",
                "8",
                "--iters",
                "1",
                "--warmup",
                "0",
            ])
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap()
    };
    let ok = run("0..2");
    let err = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{err}");
    let bad = run("5..6");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains(BROKEN), "{err}");
}
