use super::*;
use safetensors::tensor::TensorView;
use std::io::Write;

/// Writes one safetensors file with the given f32 tensors stored as `dtype`.
fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)], dtype: StDtype) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| match dtype {
            StDtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            StDtype::BF16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            StDtype::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            StDtype::F64 => v.iter().flat_map(|x| f64::from(*x).to_le_bytes()).collect(),
            StDtype::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
            _ => unreachable!("test writer"),
        })
        .collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| (n.to_string(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn config(dir: &Path) {
    std::fs::write(dir.join(CONFIG_FILE), r#"{"model_type": "mixtral"}"#).unwrap();
}

#[test]
fn reads_every_float_dtype_and_checks_shapes() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let vals: Vec<f32> = vec![1.0, -2.5, 0.15625, 3.0e-3, 7.0, -0.0];
    for (i, dt) in [StDtype::F32, StDtype::BF16, StDtype::F16, StDtype::F64]
        .into_iter()
        .enumerate()
    {
        write(
            &dir.path().join(format!("m{i}.safetensors")),
            &[(&format!("t{i}"), vec![2, 3], vals.clone())],
            dt,
        );
    }
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.shard_count(), 4);
    assert_eq!(c.tensor_names(), vec!["t0", "t1", "t2", "t3"]);
    assert_eq!(c.shape("t1"), Some(&[2usize, 3][..]));
    for (i, round) in [None, Some(Dtype::Bf16), Some(Dtype::F16), None]
        .into_iter()
        .enumerate()
    {
        let got = c.read(&format!("t{i}"), &[2, 3], None).unwrap();
        let want: Vec<f32> = vals
            .iter()
            .map(|&v| round.map_or(v, |d: Dtype| d.round(v)))
            .collect();
        assert_eq!(got, want, "t{i}");
    }
    // Rounding on read.
    let got = c.read("t0", &[2, 3], Some(Dtype::Bf16)).unwrap();
    assert_eq!(got[4], 7.0);
    assert_eq!(got[3], Dtype::Bf16.round(3.0e-3));

    match c.read("t0", &[3, 2], None) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(
                reason.contains("`t0`") && reason.contains("[2, 3]") && reason.contains("[3, 2]")
            )
        }
        other => panic!("unexpected {other:?}"),
    }
    match c.read("nope", &[4], None) {
        Err(Error::Checkpoint { reason, .. }) => {
            assert!(
                reason.contains("`nope`") && reason.contains("missing") && reason.contains("[4]")
            )
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn integer_tensors_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    write(
        &dir.path().join("a.safetensors"),
        &[("ints", vec![4], vec![1.0, 2.0, 3.0, 4.0])],
        StDtype::I32,
    );
    let c = Checkpoint::open(dir.path()).unwrap();
    match c.read("ints", &[4], None) {
        Err(Error::UnsupportedModel { key, value, .. }) => {
            assert_eq!(key, "ints");
            assert_eq!(value, "I32");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn index_maps_names_to_shards() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    write(
        &dir.path().join("s1.safetensors"),
        &[("a", vec![2], vec![1.0, 2.0])],
        StDtype::F32,
    );
    write(
        &dir.path().join("s2.safetensors"),
        &[("b", vec![1], vec![3.0])],
        StDtype::F32,
    );
    // A stray file the index does not name is ignored.
    write(
        &dir.path().join("stray.safetensors"),
        &[("c", vec![1], vec![9.0])],
        StDtype::F32,
    );
    let index = r#"{"metadata": {"total_size": 12},
        "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#;
    std::fs::write(dir.path().join(INDEX_FILE), index).unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(c.shard_count(), 2);
    assert!(c.contains("a") && c.contains("b") && !c.contains("c"));
    assert_eq!(c.read("b", &[1], None).unwrap(), vec![3.0]);

    // An index naming a tensor its shard lacks is refused with both names.
    let bad = r#"{"weight_map": {"a": "s2.safetensors"}}"#;
    std::fs::write(dir.path().join(INDEX_FILE), bad).unwrap();
    match Checkpoint::open(dir.path()) {
        Err(Error::Checkpoint { path, reason }) => {
            assert!(path.ends_with("s2.safetensors") && reason.contains("`a`"))
        }
        other => panic!("unexpected {other:?}"),
    }
    // An index pointing outside the directory is refused.
    let escape = r#"{"weight_map": {"a": "../s1.safetensors"}}"#;
    std::fs::write(dir.path().join(INDEX_FILE), escape).unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn broken_directories_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No config.json.
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Io { .. })
    ));
    config(dir.path());
    // No shards.
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Checkpoint { .. })
    ));
    // A truncated shard.
    let p = dir.path().join("x.safetensors");
    write(&p, &[("a", vec![4], vec![1.0; 4])], StDtype::F32);
    let full = std::fs::read(&p).unwrap();
    std::fs::File::create(&p)
        .unwrap()
        .write_all(&full[..full.len() - 3])
        .unwrap();
    match Checkpoint::open(dir.path()) {
        Err(Error::Checkpoint { path, .. }) => assert_eq!(path, p),
        other => panic!("unexpected {other:?}"),
    }
    // The same tensor in two shards (no index).
    write(&p, &[("a", vec![1], vec![1.0])], StDtype::F32);
    write(
        &dir.path().join("y.safetensors"),
        &[("a", vec![1], vec![2.0])],
        StDtype::F32,
    );
    match Checkpoint::open(dir.path()) {
        Err(Error::Checkpoint { reason, .. }) => assert!(reason.contains("`a`")),
        other => panic!("unexpected {other:?}"),
    }
    // Invalid config JSON.
    std::fs::write(dir.path().join(CONFIG_FILE), "{").unwrap();
    assert!(matches!(
        Checkpoint::open(dir.path()),
        Err(Error::Checkpoint { .. })
    ));
}

#[test]
fn decode_matches_half() {
    let b = half::bf16::from_f32(1.5).to_le_bytes();
    assert_eq!(decode(&b, StDtype::BF16), Some(vec![1.5]));
    let f = half::f16::from_f32(-0.25).to_le_bytes();
    assert_eq!(decode(&f, StDtype::F16), Some(vec![-0.25]));
    assert_eq!(decode(&[0u8; 2], StDtype::U16), None);
}

/// Independent FP8 E4M3FN table entries (OCP spec): value of a few bit patterns.
#[test]
fn fp8_e4m3fn_known_values() {
    let cases: [(u8, f32); 8] = [
        (0x00, 0.0),
        (0x38, 1.0),
        (0x40, 2.0),
        (0xc0, -2.0),
        (0x7e, 448.0),
        (0x01, 1.0 / 512.0),
        (0x08, 1.0 / 64.0),
        (0x3c, 1.5),
    ];
    for (b, v) in cases {
        assert_eq!(f8_e4m3fn_to_f32(b), v, "{b:#x}");
    }
    assert!(f8_e4m3fn_to_f32(0x7f).is_nan() && f8_e4m3fn_to_f32(0xff).is_nan());
    // E5M2: 0x3c = 1.0, 0x7b = 57344 (max), 0x7c = inf.
    let e5 = decode(&[0x3c, 0x7b, 0xc0], StDtype::F8_E5M2).unwrap();
    assert_eq!(e5, vec![1.0, 57344.0, -2.0]);
}

#[test]
fn fp8_weights_are_dequantised_by_block() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(CONFIG_FILE),
        r#"{"model_type": "deepseek_v3", "quantization_config": {"weight_block_size": [2, 2]}}"#,
    )
    .unwrap();
    // A [3, 5] weight of 1.0 (0x38) and 2.0 (0x40), blocks of 2 x 2 -> scales [2, 3].
    let w: Vec<u8> = (0..15)
        .map(|i| if i % 2 == 0 { 0x38 } else { 0x40 })
        .collect();
    let scales: Vec<f32> = vec![1.0, 10.0, 100.0, 0.5, 0.25, 4.0];
    let sbytes: Vec<u8> = scales.iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = vec![
        (
            "w.weight".to_string(),
            TensorView::new(StDtype::F8_E4M3, vec![3, 5], &w).unwrap(),
        ),
        (
            "w.weight_scale_inv".to_string(),
            TensorView::new(StDtype::F32, vec![2, 3], &sbytes).unwrap(),
        ),
        (
            "lonely.weight".to_string(),
            TensorView::new(StDtype::F8_E4M3, vec![3, 5], &w).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &dir.path().join("m.safetensors")).unwrap();
    let c = Checkpoint::open(dir.path()).unwrap();
    let got = c.read("w.weight", &[3, 5], None).unwrap();
    for r in 0..3 {
        for col in 0..5 {
            let i = r * 5 + col;
            let base = if i % 2 == 0 { 1.0 } else { 2.0 };
            assert_eq!(got[i], base * scales[(r / 2) * 3 + col / 2], "({r}, {col})");
        }
    }
    match c.read("lonely.weight", &[3, 5], None) {
        Err(Error::UnsupportedModel { key, reason, .. }) => {
            assert_eq!(key, "lonely.weight");
            assert!(reason.contains("lonely.weight_scale_inv"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // A bad block size is named.
    std::fs::write(
        dir.path().join(CONFIG_FILE),
        r#"{"quantization_config": {"weight_block_size": [0, 2]}}"#,
    )
    .unwrap();
    match Checkpoint::open(dir.path()) {
        Err(Error::Checkpoint { reason, .. }) => assert!(reason.contains("weight_block_size")),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn an_index_entry_naming_a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    config(dir.path());
    let fifo = dir.path().join("pipe.safetensors");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    std::fs::write(
        dir.path().join(INDEX_FILE),
        r#"{"weight_map": {"t": "pipe.safetensors"}}"#,
    )
    .unwrap();
    let start = std::time::Instant::now();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    assert!(start.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_config_linked_to_a_device_or_oversized_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.path().join(CONFIG_FILE)).unwrap();
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let f = std::fs::File::create(dir.path().join(CONFIG_FILE)).unwrap();
    f.set_len(MAX_JSON_BYTES + 1).unwrap(); // sparse: nothing is written
    let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("more than"), "{err}");
}
