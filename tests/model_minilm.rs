//! all-MiniLM-L6-v2 with its real weights. Every test here is `#[ignore]`d, so a plain
//! `cargo test` lists them as ignored rather than passing them without the weights:
//! `scripts/fetch-minilm.sh` puts the weights in assets/minilm, then
//! `cargo test --release --test model_minilm -- --ignored` runs them (CI does), and they fail
//! when the weights are absent. The full agreement check against an independent reference is
//! `scripts/embed-crosscheck.sh`.

use std::path::Path;

use lora_compose::model::bert::Encoder;
use lora_compose::model::Trainable;

const MINILM_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/minilm");

/// Loaded once for all tests of this file; panics with what to run when the weights are absent.
fn encoder() -> &'static Encoder {
    static ENCODER: std::sync::OnceLock<Encoder> = std::sync::OnceLock::new();
    ENCODER.get_or_init(|| {
        let dir = Path::new(MINILM_DIR);
        assert!(
            dir.join("model.safetensors").exists(),
            "needs all-MiniLM-L6-v2 in {MINILM_DIR}: run scripts/fetch-minilm.sh, then \
             cargo test --release --test model_minilm -- --ignored"
        );
        Encoder::load(dir).unwrap()
    })
}

fn cos(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Token ids and leading/trailing components from the float64 numpy reference of
/// scripts/embed-crosscheck.py (sentence-transformers' pipeline) for one sentence.
#[test]
#[ignore = "needs all-MiniLM-L6-v2 in assets/minilm: scripts/fetch-minilm.sh, then cargo test --release --test model_minilm -- --ignored"]
fn matches_reference_values_for_one_sentence() {
    let enc = encoder();
    let text = "A man is eating food.".to_string();
    let (ids, _) = enc.tokenize(std::slice::from_ref(&text), 512).unwrap();
    assert_eq!(ids[0], vec![101, 1037, 2158, 2003, 5983, 2833, 1012, 102]);
    let v = &enc.embed(&[text], 512, 16).unwrap().vectors[0];
    let want_head = [0.0332416, 0.0044061, -0.0062769, 0.0483787, -0.1387022, -0.0336174];
    let want_tail = [-0.0245848, -0.0375644];
    assert_eq!(v.len(), 384);
    for (got, want) in v[..6].iter().chain(&v[382..]).zip(want_head.iter().chain(&want_tail)) {
        assert!((got - want).abs() < 2e-6, "{got} vs {want}");
    }
}

/// Padding in a batch must not change an embedding: the same text alone and beside much
/// longer texts.
#[test]
#[ignore = "needs all-MiniLM-L6-v2 in assets/minilm: scripts/fetch-minilm.sh, then cargo test --release --test model_minilm -- --ignored"]
fn padding_does_not_change_embeddings_and_similar_texts_are_close() {
    let enc = encoder();
    let texts: Vec<String> = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "A monkey is playing drums.",
        "Someone in a gorilla costume is playing a set of drums, loudly, for a long time in the night.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let batched = enc.embed(&texts, 512, 16).unwrap().vectors;
    for (i, t) in texts.iter().enumerate() {
        let alone = &enc.embed(std::slice::from_ref(t), 512, 1).unwrap().vectors[0];
        assert!(cos(alone, &batched[i]) > 0.999_999, "text {i}");
    }
    assert!(cos(&batched[0], &batched[1]) > cos(&batched[0], &batched[2]));
    assert!(cos(&batched[2], &batched[3]) > cos(&batched[1], &batched[3]));
}

/// The real model with a head and LoRA on query/value trains: one step runs end to end and
/// produces finite gradients for exactly the LoRA and head.
#[test]
#[ignore = "needs all-MiniLM-L6-v2 in assets/minilm: scripts/fetch-minilm.sh, then cargo test --release --test model_minilm -- --ignored"]
fn minilm_with_lora_backward_runs() {
    let enc = encoder();
    let mut model = enc.model.clone();
    model.config.num_labels = 2;
    model.head =
        lora_compose::model::Linear::init("classifier", 384, 2, 0.02, &mut rand::SeedableRng::seed_from_u64(0));
    model.attach_lora(&["query", "value"], 4, 8.0, 1).unwrap();
    let (ids, _) = enc
        .tokenize(&["good movie".into(), "a dull, long film".into()], 512)
        .unwrap();
    let batch = lora_compose::model::Batch::tokens(&ids).unwrap();
    let (logits, tape) = model.forward(&batch).unwrap();
    let (_, dl) = lora_compose::model::train::cross_entropy(&logits, &[1, 0], 2).unwrap();
    let g = model.backward(&tape, &dl, Trainable::LORA_HEAD).unwrap();
    assert_eq!(g.map.len(), 2 + 6 * 2 * 2);
    assert!(g.map.values().flatten().all(|x| x.is_finite()));
}

#[test]
#[ignore = "needs all-MiniLM-L6-v2 in assets/minilm: scripts/fetch-minilm.sh, then cargo test --release --test model_minilm -- --ignored"]
fn embed_cli_prints_one_json_array_per_text() {
    encoder();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lora-compose"))
        .args(["embed", "--model", MINILM_DIR])
        .args(["--text", "hello world", "--text", "A man is eating food."])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Vec<f32>> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!((lines[1][0] - 0.0332416).abs() < 2e-6);
    let empty = std::process::Command::new(env!("CARGO_BIN_EXE_lora-compose"))
        .args(["embed", "--model", MINILM_DIR, "--text", ""])
        .output()
        .unwrap();
    assert!(!empty.status.success());
    assert!(String::from_utf8_lossy(&empty.stderr).contains("text 0 is empty"));
}
