//! `lora-compose adapt` on a tiny random BERT in the MiniLM layout (config.json,
//! model.safetensors, a WordPiece tokenizer.json, all written here), three PEFT adapters
//! written here with the `safetensors` crate and plain JSON, and small labelled files.
//!
//! Happy path: the table is printed, the files are written, and the composed adapter of the
//! learned composition loads back and equals Σ_i c_i s_i B_i A_i of the written coefficients
//! (checked against f64 loops over the factors this file wrote). Bad input: non-zero exit, a
//! message naming the file and line (or adapter, module and shapes), and no `--out`, nor any
//! temporary directory beside it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_compose::model::{Config, Model};
use lora_compose::peft::Adapter;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_lora-compose");
const D: usize = 8;
const MAX_POSITIONS: usize = 12;
const VOCAB: [&str; 12] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "##s", ".", "a",
];
/// The adapted layers (query and value of both layers), d = 8.
const LAYERS: [&str; 4] = [
    "encoder.layer.0.attention.self.query",
    "encoder.layer.0.attention.self.value",
    "encoder.layer.1.attention.self.query",
    "encoder.layer.1.attention.self.value",
];
const RANK: usize = 2;
const ALPHAS: [f64; 3] = [4.0, 2.0, 8.0];

fn tokenizer_json() -> String {
    let vocab: Vec<String> = VOCAB.iter().enumerate().map(|(i, t)| format!("\"{t}\": {i}")).collect();
    format!(
        r###"{{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
 "normalizer": {{"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true}},
 "pre_tokenizer": {{"type": "BertPreTokenizer"}},
 "post_processor": {{"type": "TemplateProcessing",
   "single": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}],
   "pair": [{{"SpecialToken": {{"id": "[CLS]", "type_id": 0}}}}, {{"Sequence": {{"id": "A", "type_id": 0}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 0}}}}, {{"Sequence": {{"id": "B", "type_id": 1}}}}, {{"SpecialToken": {{"id": "[SEP]", "type_id": 1}}}}],
   "special_tokens": {{"[CLS]": {{"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}}, "[SEP]": {{"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}}}}},
 "decoder": null,
 "model": {{"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {{{}}}}}}}"###,
        vocab.join(", ")
    )
}

/// A random BERT of MiniLM's layout (post-LN, mean pooling), hidden 8, 2 layers, 12 positions.
fn write_model(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    let config = Config {
        hidden: D,
        layers: 2,
        heads: 2,
        intermediate: 16,
        max_positions: MAX_POSITIONS,
        vocab_size: VOCAB.len(),
        ..Config::minilm(0)
    };
    let model = Model::<f32>::init(config, 1).unwrap();
    let ts: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params()
        .into_iter()
        .map(|p| (p.name, p.shape, p.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    write_f32_tensors(&dir.join("model.safetensors"), &ts);
    let config = json!({"hidden_size": D, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": MAX_POSITIONS, "vocab_size": VOCAB.len(),
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_act": "gelu", "model_type": "bert"});
    fs::write(dir.join("config.json"), config.to_string()).unwrap();
    fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
}

fn write_f32_tensors(file: &Path, tensors: &[(String, Vec<usize>, Vec<u8>)]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, s, b)| (n, TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    fs::write(file, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// path → (A r×d_in, B d_out×r) in f64 (exactly the stored f32 values), and the scale α/r.
type Factors = BTreeMap<String, (Vec<f64>, Vec<f64>)>;

/// Writes a PEFT adapter over `layers` ((path, d_in, d_out)) with plain JSON and safetensors.
fn write_adapter(dir: &Path, alpha: f64, layers: &[(&str, usize, usize)], seed: u64) -> Factors {
    fs::create_dir_all(dir).unwrap();
    let config = json!({"peft_type": "LORA", "r": RANK, "lora_alpha": alpha,
        "target_modules": ["query", "value"], "bias": "none"});
    fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut factors = Factors::new();
    let mut tensors = Vec::new();
    for &(path, d_in, d_out) in layers {
        let mut draw = |n: usize| {
            (0..n)
                .map(|_| f64::from(rng.random_range(-0.5f32..0.5)))
                .collect::<Vec<_>>()
        };
        let (a, b) = (draw(RANK * d_in), draw(d_out * RANK));
        let bytes = |v: &[f64]| v.iter().flat_map(|&x| (x as f32).to_le_bytes()).collect::<Vec<u8>>();
        tensors.push((
            format!("base_model.model.{path}.lora_A.weight"),
            vec![RANK, d_in],
            bytes(&a),
        ));
        tensors.push((
            format!("base_model.model.{path}.lora_B.weight"),
            vec![d_out, RANK],
            bytes(&b),
        ));
        factors.insert(path.to_string(), (a, b));
    }
    write_f32_tensors(&dir.join("adapter_model.safetensors"), &tensors);
    factors
}

fn good_layers() -> Vec<(&'static str, usize, usize)> {
    LAYERS.iter().map(|&p| (p, D, D)).collect()
}

/// Three classes told apart by one word each; `n` texts a class.
fn examples(n: usize) -> Vec<(String, String)> {
    let fill = ["the", "a", "the mat", "a cat", "on the", "."];
    let mut out = Vec::new();
    for i in 0..n {
        let f = fill[i % fill.len()];
        out.push((format!("the cats {f}"), "pos".to_string()));
        out.push((format!("{f} sat on"), "neg".to_string()));
        out.push((format!("a mats . {f}"), "neu".to_string()));
    }
    out
}

fn jsonl(ex: &[(String, String)]) -> String {
    ex.iter()
        .map(|(t, l)| json!({"text": t, "label": l}).to_string() + "\n")
        .collect()
}

/// A scratch directory with the model, the library of three adapters and the training file.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    factors: Vec<Factors>,
}

impl Setup {
    fn new() -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        write_model(&root.join("model"));
        let factors = (0..3)
            .map(|i| {
                write_adapter(
                    &root.join(format!("lib/adapter_{i}")),
                    ALPHAS[i],
                    &good_layers(),
                    10 + i as u64,
                )
            })
            .collect();
        fs::write(root.join("train.jsonl"), jsonl(&examples(6))).unwrap();
        Setup {
            _tmp: tmp,
            root,
            factors,
        }
    }

    fn p(&self, s: &str) -> PathBuf {
        self.root.join(s)
    }

    /// `adapt` with the model, the three adapters by flag, and `extra`.
    fn run(&self, extra: &[&str]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.arg("adapt").arg("--model").arg(self.p("model"));
        for i in 0..3 {
            cmd.arg("--adapter").arg(self.p(&format!("lib/adapter_{i}")));
        }
        cmd.args(["--steps", "6"]).args(extra).current_dir(&self.root);
        cmd.output().unwrap()
    }

    /// The run fails with a message holding every one of `needles`, and leaves no `out` and
    /// no temporary directory in the scratch directory.
    fn fails(&self, extra: &[&str], needles: &[&str]) -> String {
        let out = self.run(&[extra, &["--out", "out"]].concat());
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(1), "expected exit 1; stderr:\n{err}");
        for n in needles {
            assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
        }
        assert!(!self.p("out").exists(), "--out was left behind:\n{err}");
        let stray: Vec<String> = fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("lora-compose-tmp"))
            .collect();
        assert!(stray.is_empty(), "temporary directories left: {stray:?}");
        err
    }
}

fn read_json(p: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn happy_path_writes_table_coefficients_and_the_composed_adapter() {
    let s = Setup::new();
    let mut cmd = Command::new(BIN);
    // The library as one directory of adapters, all seven methods.
    cmd.arg("adapt")
        .arg("--model")
        .arg(s.p("model"))
        .arg("--adapter")
        .arg(s.p("lib"))
        .args([
            "--train",
            "train.jsonl",
            "--holdout",
            "0.34",
            "--steps",
            "8",
            "--out",
            "res/out",
        ])
        .args(["--methods", "head,full,lora,uniform,learned,soups,lorahub"])
        .current_dir(&s.root);
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "stderr:\n{stderr}");
    for m in [
        "head only",
        "full fine-tuning",
        "LoRA from scratch",
        "uniform composition",
        "learned composition",
        "LoRA Soups (CAT)",
        "LoraHub (ES)",
    ] {
        assert!(stdout.contains(&format!("| {m} |")), "table lacks {m}:\n{stdout}");
    }
    assert!(
        stderr.contains("3 classes (neg, neu, pos), 12 training and 6 test texts, 3 adapters on 4 layers"),
        "{stderr}"
    );
    let dir = s.p("res/out");
    let results = read_json(&dir.join("results.json"));
    assert_eq!(results["classes"], json!(["neg", "neu", "pos"]));
    assert_eq!(results["results"].as_array().unwrap().len(), 7);
    for r in results["results"].as_array().unwrap() {
        assert_eq!(
            (r["train_images"].as_u64(), r["test_images"].as_u64()),
            (Some(12), Some(6)),
            "{r}"
        );
        assert!(r["accuracy"].as_f64().is_some(), "{r}");
    }
    assert_eq!(fs::read_to_string(dir.join("report.md")).unwrap().trim(), stdout.trim());
    let coeffs = read_json(&dir.join("coefficients.json"));
    assert_eq!(coeffs["lorahub"]["global"].as_array().unwrap().len(), 3);
    for method in ["learned", "soups"] {
        let c = &coeffs[method];
        assert_eq!(c.as_object().unwrap().len(), 4, "{method}: {c}");
        if method == "learned" {
            for row in c.as_object().unwrap().values() {
                let sum: f64 = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
                assert!((sum - 1.0).abs() < 1e-6, "softmax rows sum to 1: {row}");
            }
        }
        // The composed adapter is Σ_i c_i s_i B_i A_i with the written coefficients.
        let a = Adapter::load(dir.join(method)).unwrap();
        assert_eq!(a.config.r, 3 * RANK);
        assert_eq!(a.layers.len(), 4);
        let mut moved = false;
        for path in LAYERS {
            let row: Vec<f64> = c[path]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            moved |= row.iter().any(|&x| (x - 1.0 / 3.0).abs() > 1e-4);
            let mut want = vec![0f64; D * D];
            for (i, f) in s.factors.iter().enumerate() {
                let (fa, fb) = &f[path];
                let scale = ALPHAS[i] / RANK as f64;
                for o in 0..D {
                    for j in 0..D {
                        want[o * D + j] +=
                            row[i] * scale * (0..RANK).map(|k| fb[o * RANK + k] * fa[k * D + j]).sum::<f64>();
                    }
                }
            }
            let got = a.layers[path].delta_weight();
            for (idx, (&g, &w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                    "{method} {path}[{idx}]: composed {g}, Σ c s B A {w}"
                );
            }
        }
        assert!(moved, "{method}: training moved some coefficient away from 1/3");
    }
    // Uniform: Σ_i (1/3) s_i B_i A_i. LoraHub: (Σ_i c_i B_i)(Σ_i c_i s_i A_i), c its global row.
    let hub: Vec<f64> = coeffs["lorahub"]["global"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    for method in ["uniform", "lorahub"] {
        let a = Adapter::load(dir.join(method)).unwrap();
        assert_eq!(a.config.r, if method == "uniform" { 3 * RANK } else { RANK });
        for path in LAYERS {
            let want: Vec<f64> = if method == "uniform" {
                let mut w = vec![0f64; D * D];
                for (i, f) in s.factors.iter().enumerate() {
                    let (fa, fb) = &f[path];
                    let scale = ALPHAS[i] / RANK as f64;
                    for o in 0..D {
                        for j in 0..D {
                            w[o * D + j] +=
                                scale / 3.0 * (0..RANK).map(|k| fb[o * RANK + k] * fa[k * D + j]).sum::<f64>();
                        }
                    }
                }
                w
            } else {
                let (mut sa, mut sb) = (vec![0f64; RANK * D], vec![0f64; D * RANK]);
                for (i, f) in s.factors.iter().enumerate() {
                    let (fa, fb) = &f[path];
                    let scale = ALPHAS[i] / RANK as f64;
                    sa.iter_mut().zip(fa).for_each(|(x, y)| *x += hub[i] * scale * y);
                    sb.iter_mut().zip(fb).for_each(|(x, y)| *x += hub[i] * y);
                }
                (0..D * D)
                    .map(|e| (0..RANK).map(|k| sb[(e / D) * RANK + k] * sa[k * D + e % D]).sum())
                    .collect()
            };
            for (idx, (&g, &w)) in a.layers[path].delta_weight().iter().zip(&want).enumerate() {
                assert!(
                    (g as f64 - w).abs() <= 1e-5 + 1e-5 * w.abs(),
                    "{method} {path}[{idx}]: written {g}, want {w}"
                );
            }
        }
    }
    // The heads of the methods whose encoder is the base or a written adapter.
    let bytes = fs::read(dir.join("heads.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["classes"], r#"["neg","neu","pos"]"#);
    assert_eq!(meta["pooling"], "mean");
    let on: Value = serde_json::from_str(&meta["adapters"]).unwrap();
    assert_eq!(
        on,
        json!({"head": "", "uniform": "uniform", "learned": "learned", "soups": "soups", "lorahub": "lorahub"})
    );
    let heads = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = heads.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want: Vec<String> = ["head", "learned", "lorahub", "soups", "uniform"]
        .iter()
        .flat_map(|m| [format!("{m}.bias"), format!("{m}.weight")])
        .collect();
    want.sort();
    assert_eq!(names, want);
    for m in ["head", "learned", "lorahub", "soups", "uniform"] {
        let w = heads.tensor(&format!("{m}.weight")).unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[3, D][..]));
        assert_eq!(heads.tensor(&format!("{m}.bias")).unwrap().shape(), &[3]);
    }
    // Nothing else beside --out.
    let names: Vec<String> = fs::read_dir(s.p("res"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["out".to_string()]);
}

#[test]
fn csv_with_a_test_file() {
    let s = Setup::new();
    let csv = |ex: &[(String, String)]| {
        let mut t = String::from("label,text\n");
        for (x, l) in ex {
            t.push_str(&format!("{l},\"{x}\"\n"));
        }
        t
    };
    let ex = examples(4);
    fs::write(s.p("train.csv"), csv(&ex[..9])).unwrap();
    fs::write(s.p("test.csv"), csv(&ex[9..])).unwrap();
    let out = s.run(&[
        "--train",
        "train.csv",
        "--test",
        "test.csv",
        "--methods",
        "head,learned",
        "--out",
        "o",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = read_json(&s.p("o/results.json"));
    assert_eq!(
        (r["train_texts"].as_u64(), r["test_texts"].as_u64()),
        (Some(9), Some(3))
    );
    assert!(s.p("o/learned/adapter_model.safetensors").exists());
    assert!(!s.p("o/soups").exists());
}

#[test]
fn adapters_for_another_model_are_named_with_module_and_shapes() {
    let s = Setup::new();
    let mut layers = good_layers();
    layers[2] = ("encoder.layer.5.attention.self.query", D, D);
    write_adapter(&s.p("lib/adapter_1"), 2.0, &layers, 3);
    s.fails(
        &["--train", "train.jsonl", "--holdout", "0.3"],
        &[
            "adapter_1",
            "module `encoder.layer.5.attention.self.query`",
            "is not a linear layer of the model",
        ],
    );
    let mut layers = good_layers();
    layers[1].1 = 16;
    write_adapter(&s.p("lib/adapter_1"), 2.0, &layers, 3);
    s.fails(
        &["--train", "train.jsonl", "--holdout", "0.3"],
        &[
            "adapter_1",
            "module `encoder.layer.0.attention.self.value`",
            "d_out×d_in = 8×16",
            "has 8×8",
        ],
    );
}

#[test]
fn a_line_without_label_or_text() {
    let s = Setup::new();
    let mut t = jsonl(&examples(2));
    t.push_str("{\"text\": \"the cat\"}\n");
    fs::write(s.p("nolabel.jsonl"), t).unwrap();
    s.fails(
        &["--train", "nolabel.jsonl", "--holdout", "0.3"],
        &["nolabel.jsonl", "line 7", "no \"label\""],
    );
    fs::write(
        s.p("notext.jsonl"),
        "{\"text\": \"the cat\", \"label\": \"a\"}\n{\"label\": \"b\"}\n",
    )
    .unwrap();
    s.fails(
        &["--train", "notext.jsonl", "--holdout", "0.3"],
        &["notext.jsonl", "line 2", "no \"text\""],
    );
}

#[test]
fn an_empty_class_in_the_training_split() {
    let s = Setup::new();
    let mut t = jsonl(&examples(4));
    t.push_str("{\"text\": \"a cat\", \"label\": \"lonely\"}\n");
    fs::write(s.p("t.jsonl"), t).unwrap();
    s.fails(
        &["--train", "t.jsonl", "--holdout", "0.5"],
        &["t.jsonl", "class `lonely` has 1 example", "none for training"],
    );
}

#[test]
fn a_text_longer_than_the_positions_needs_truncate() {
    let s = Setup::new();
    let mut t = jsonl(&examples(3));
    t.push_str(&json!({"text": "the cat sat on the mat . the cat sat on the mat", "label": "pos"}).to_string());
    t.push('\n');
    fs::write(s.p("long.jsonl"), t).unwrap();
    s.fails(
        &["--train", "long.jsonl", "--holdout", "0.3"],
        &[
            "long.jsonl",
            "line 10",
            "15 tokens, more than the model's 12 positions",
            "--truncate",
        ],
    );
    let out = s.run(&[
        "--train",
        "long.jsonl",
        "--holdout",
        "0.3",
        "--truncate",
        "--methods",
        "head",
        "--out",
        "o",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 text(s) cut to the model's 12 positions"), "{err}");
}

#[test]
fn a_file_that_is_not_utf8_names_its_line() {
    let s = Setup::new();
    let mut t = jsonl(&examples(1)).into_bytes();
    t.extend_from_slice(b"{\"text\": \"the \xff mat\", \"label\": \"neg\"}\n");
    fs::write(s.p("bad.jsonl"), t).unwrap();
    s.fails(
        &["--train", "bad.jsonl", "--holdout", "0.3"],
        &["bad.jsonl", "line 4", "not UTF-8"],
    );
}

#[test]
fn an_unknown_label_in_the_test_file() {
    let s = Setup::new();
    fs::write(
        s.p("test.jsonl"),
        "{\"text\": \"the cat\", \"label\": \"pos\"}\n{\"text\": \"a mat\", \"label\": \"zzz\"}\n",
    )
    .unwrap();
    s.fails(
        &["--train", "train.jsonl", "--test", "test.jsonl"],
        &["test.jsonl", "line 2", "label `zzz` does not occur", "neg, neu, pos"],
    );
}

#[test]
fn an_empty_file_and_a_taken_out_dir() {
    let s = Setup::new();
    fs::write(s.p("empty.jsonl"), "\n\n").unwrap();
    s.fails(
        &["--train", "empty.jsonl", "--holdout", "0.3"],
        &["empty.jsonl", "no labelled examples"],
    );
    fs::create_dir(s.p("out")).unwrap();
    fs::write(s.p("out/keep.txt"), "mine").unwrap();
    let out = s.run(&["--train", "train.jsonl", "--holdout", "0.3", "--out", "out"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already exists and is not empty"), "{err}");
    let left: Vec<_> = fs::read_dir(s.p("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec!["keep.txt"]);
    assert_eq!(fs::read_to_string(s.p("out/keep.txt")).unwrap(), "mine");
}
