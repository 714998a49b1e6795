//! Adapter directories in PEFT layout: write → read round trips, files written independently
//! of the crate's writer (via the `safetensors` crate directly), and config semantics.

use std::collections::HashMap;
use std::path::Path;

use lora_compose::peft::{demo_adapters, Adapter, StoreDtype, TargetModules};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

fn round(x: f32, dtype: StoreDtype) -> f32 {
    match dtype {
        StoreDtype::F32 => x,
        StoreDtype::F16 => half::f16::from_f32(x).to_f32(),
        StoreDtype::Bf16 => half::bf16::from_f32(x).to_f32(),
    }
}

#[test]
fn round_trip_all_dtypes_keeps_values_config_and_scales() {
    let tmp = tempfile::tempdir().unwrap();
    // demo adapters cover mixed ranks, different alphas, rsLoRA (adapter_2) and
    // rank_pattern/alpha_pattern (adapter_1).
    let adapters = demo_adapters(4, 11).unwrap();
    assert!(adapters[2].config.use_rslora && !adapters[1].config.rank_pattern.is_empty());
    for dtype in [StoreDtype::F32, StoreDtype::F16, StoreDtype::Bf16] {
        for original in &adapters {
            let dir = tmp.path().join(format!("{dtype:?}-{}", original.name));
            original.save(&dir, dtype).unwrap();
            let loaded = Adapter::load(&dir).unwrap();
            assert_eq!(
                loaded.config.to_json(),
                original.config.to_json(),
                "{dtype:?} {}",
                original.name
            );
            assert_eq!(loaded.layers.len(), original.layers.len());
            for (path, want) in &original.layers {
                let got = &loaded.layers[path];
                assert_eq!((got.r, got.d_in, got.d_out), (want.r, want.d_in, want.d_out), "{path}");
                assert_eq!((got.alpha, got.scale), (want.alpha, want.scale), "{path}");
                let rounded_a: Vec<f32> = want.a.iter().map(|&x| round(x, dtype)).collect();
                let rounded_b: Vec<f32> = want.b.iter().map(|&x| round(x, dtype)).collect();
                assert_eq!(got.a, rounded_a, "{dtype:?} {path} A");
                assert_eq!(got.b, rounded_b, "{dtype:?} {path} B");
            }
        }
    }
}

#[test]
fn scales_follow_rslora_and_patterns() {
    let tmp = tempfile::tempdir().unwrap();
    for adapter in demo_adapters(3, 5).unwrap() {
        adapter.save(tmp.path().join(&adapter.name), StoreDtype::F32).unwrap();
    }
    // adapter_1: r 8, alpha 16, rank_pattern {"query": 3}, alpha_pattern {"layer.1.attention.self.query": 5}
    let a1 = Adapter::load(tmp.path().join("adapter_1")).unwrap();
    let q0 = &a1.layers["encoder.layer.0.attention.self.query"];
    let q1 = &a1.layers["encoder.layer.1.attention.self.query"];
    let v0 = &a1.layers["encoder.layer.0.attention.self.value"];
    assert_eq!((q0.r, q0.alpha, q0.scale), (3, 16.0, 16.0 / 3.0));
    assert_eq!((q1.r, q1.alpha, q1.scale), (3, 5.0, 5.0 / 3.0));
    assert_eq!((v0.r, v0.alpha, v0.scale), (8, 16.0, 2.0));
    // adapter_2: r 2, alpha 4, rsLoRA → 4/√2
    let a2 = Adapter::load(tmp.path().join("adapter_2")).unwrap();
    let v0 = &a2.layers["encoder.layer.0.attention.self.value"];
    assert_eq!(v0.scale, (4.0 / 2f64.sqrt()) as f32);
}

/// Writes a safetensors file with the `safetensors` crate, not the crate under test.
fn write_tensors(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn bytes_as(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        Dtype::BF16 => values
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        _ => unreachable!(),
    }
}

#[test]
fn reads_peft_files_in_every_float_dtype_and_both_key_spellings() {
    let tmp = tempfile::tempdir().unwrap();
    // Values exactly representable in f16 and bf16, so every dtype reads back the same numbers.
    let a = [0.5f32, -1.25, 3.0, 0.0, 2.0, -0.75]; // (2, 3)
    let b = [1.0f32, -2.0, 0.25, 4.0]; // (2, 2)
    for (dtype, key_style) in [(Dtype::F32, ""), (Dtype::F16, ".default"), (Dtype::BF16, "")] {
        let dir = tmp.path().join(format!("{dtype:?}"));
        std::fs::create_dir(&dir).unwrap();
        let config = json!({"r": 2, "lora_alpha": 6, "target_modules": "foo|bar", "peft_type": "LORA"});
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        let ka = format!("base_model.model.blocks.0.foo.lora_A{key_style}.weight");
        let kb = format!("base_model.model.blocks.0.foo.lora_B{key_style}.weight");
        write_tensors(
            &dir.join("adapter_model.safetensors"),
            &[
                (&ka, dtype, vec![2, 3], bytes_as(&a, dtype)),
                (&kb, dtype, vec![2, 2], bytes_as(&b, dtype)),
            ],
        );
        let loaded = Adapter::load(&dir).unwrap();
        assert_eq!(loaded.config.target_modules, TargetModules::Regex("foo|bar".into()));
        let layer = &loaded.layers["blocks.0.foo"];
        assert_eq!((layer.r, layer.d_in, layer.d_out, layer.scale), (2, 3, 2, 3.0));
        assert_eq!(layer.a, a, "{dtype:?}");
        assert_eq!(layer.b, b, "{dtype:?}");
    }
}

#[test]
fn unknown_config_fields_survive_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let mut adapter = demo_adapters(1, 0).unwrap().remove(0);
    adapter
        .config
        .raw
        .insert("zz_custom".into(), json!({"nested": [1, 2.5, "x"]}));
    adapter.config.raw.insert("aa_custom".into(), json!(null));
    adapter.save(tmp.path().join("a"), StoreDtype::F32).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("a/adapter_config.json")).unwrap();
    let loaded = Adapter::load(tmp.path().join("a")).unwrap();
    let keys: Vec<&String> = loaded.config.raw.keys().collect();
    let written = adapter.config.to_json();
    let want: Vec<&String> = written.as_object().unwrap().keys().collect();
    assert_eq!(keys, want);
    assert_eq!(loaded.config.raw["zz_custom"], json!({"nested": [1, 2.5, "x"]}));
    // The file keeps insertion order, so `zz_custom` comes before `aa_custom`.
    assert!(text.find("zz_custom").unwrap() < text.find("aa_custom").unwrap());
}

#[test]
fn rank_pattern_regex_first_match_decides_the_expected_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("p");
    std::fs::create_dir(&dir).unwrap();
    // Keys are regexes matched against a dot-suffix of the path; the first match in file
    // order wins, as in PEFT's get_pattern_key.
    let config: Value = serde_json::from_str(
        r#"{"r": 4, "lora_alpha": 8, "target_modules": ["q"],
            "rank_pattern": {"layers\\.1\\.q": 2, "q": 3},
            "alpha_pattern": {"1.q": 6}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut tensors = Vec::new();
    let mut names = HashMap::new();
    for (layer, r) in [("layers.0.q", 3usize), ("layers.1.q", 2), ("layers.1.qq", 4)] {
        names.insert(layer, r);
        tensors.push((format!("base_model.model.{layer}.lora_A.weight"), vec![r, 5]));
        tensors.push((format!("base_model.model.{layer}.lora_B.weight"), vec![6, r]));
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s)| {
            let len = s[0] * s[1];
            (n, s, bytes_as(&vec![0.5; len], Dtype::F32))
        })
        .collect();
    let refs: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = data
        .iter()
        .map(|(n, s, b)| (n.as_str(), Dtype::F32, s.clone(), b.clone()))
        .collect();
    write_tensors(&dir.join("adapter_model.safetensors"), &refs);
    let loaded = Adapter::load(&dir).unwrap();
    for (layer, r) in names {
        assert_eq!(loaded.layers[layer].r, r, "{layer}");
    }
    assert_eq!(loaded.layers["layers.1.q"].scale, 3.0); // alpha 6 from "1.q", r 2
    assert_eq!(loaded.layers["layers.0.q"].scale, 8.0 / 3.0);
    assert_eq!(loaded.layers["layers.1.qq"].scale, 2.0); // "q" is not a dot-suffix of "qq"
}

#[test]
fn unsupported_dtype_and_bad_config_values_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("f64");
    std::fs::create_dir(&dir).unwrap();
    let config = json!({"r": 1, "lora_alpha": 1, "target_modules": ["q"]});
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let a: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_tensors(
        &dir.join("adapter_model.safetensors"),
        &[
            ("base_model.model.q.lora_A.weight", Dtype::F64, vec![1, 2], a),
            (
                "base_model.model.q.lora_B.weight",
                Dtype::F32,
                vec![1, 1],
                bytes_as(&[1.0], Dtype::F32),
            ),
        ],
    );
    let err = Adapter::load(&dir).unwrap_err().to_string();
    assert!(
        err.contains("base_model.model.q.lora_A.weight") && err.contains("F64"),
        "{err}"
    );

    for (field, value, needle) in [
        ("r", json!(0), "`r` must be a positive integer"),
        ("lora_alpha", json!("8"), "`lora_alpha` must be a finite number"),
        ("target_modules", json!(3), "target_modules"),
        ("rank_pattern", json!({"q(": 2}), "rank_pattern key `q(`"),
        ("use_dora", json!(true), "DoRA"),
    ] {
        let mut config = config.clone();
        config[field] = value;
        std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
        let err = Adapter::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains("adapter_config.json") && err.contains(needle),
            "{field}: {err}"
        );
    }
}
