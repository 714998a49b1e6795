//! The language few-shot path: the cut model on cached hidden states against the full forward,
//! the text bundle's round trip and its pool/test separation, `fewshot-text` end to end on a
//! tiny random BERT, and (ignored) the real default language run.

use std::collections::BTreeMap;
use std::path::Path;

use lora_compose::compose::layer::DeviceArg;
use lora_compose::compose::{Mode, Param};
use lora_compose::experiment::data::Texts;
use lora_compose::experiment::methods::{read_results, Method};
use lora_compose::experiment::text::{text_tasks, Family, Record, Role, Source, TextSources};
use lora_compose::experiment::text_fewshot::{
    build_text_downstream, library_names, load_text_bundle, run_text_fewshot, save_text_bundle, TextFewshotArgs,
    TextTaskData, TextTaskInfo,
};
use lora_compose::model::bert::Tokenizer;
use lora_compose::model::train::{train_step, AdamW};
use lora_compose::model::{Batch, Composition, Config, Model, Trainable};
use lora_compose::peft::{Adapter, AdapterConfig, LoraLayer, StoreDtype, TargetModules};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

const VOCAB: [&str; 16] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "dog", "flight", "late", "great", "bad", "good", "car", "movie",
    "a", "!",
];

fn tiny_config() -> Config {
    Config {
        hidden: 8,
        layers: 3,
        heads: 2,
        intermediate: 16,
        max_positions: 16,
        vocab_size: VOCAB.len(),
        ..Config::minilm(0)
    }
}

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

/// A random 3-layer BERT (d = 8) as config.json, model.safetensors and tokenizer.json.
fn tiny_bert_dir(dir: &Path) -> Model<f32> {
    std::fs::create_dir_all(dir).unwrap();
    let model = Model::<f32>::init(tiny_config(), 7).unwrap();
    let ts: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params()
        .into_iter()
        .map(|p| (p.name, p.shape, p.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView)> = ts
        .iter()
        .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 16,
 "max_position_embeddings": 16, "vocab_size": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
 "hidden_act": "gelu", "model_type": "bert"}"#,
    )
    .unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json()).unwrap();
    model
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 + 1e-4 * y.abs(),
            "{what}[{i}]: {x} from the cut model, {y} from the full one"
        );
    }
}

/// The model cut at block 1 on the hidden states entering it gives the full model's logits,
/// and a training step changes the top block's weights, the coefficients and the head as the
/// full model's step does (composition, LoRA and full fine-tuning of the top).
#[test]
fn top_from_hidden_states_is_the_full_forward() {
    let full = Model::<f32>::init(
        Config {
            num_labels: 2,
            ..tiny_config()
        },
        3,
    )
    .unwrap();
    let targets = [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.value",
        "encoder.layer.2.attention.self.query",
        "encoder.layer.2.attention.self.value",
    ];
    let library = full.random_library(&targets, 3, 2, 0.3, 5).unwrap();
    let seqs: [&[u32]; 3] = [&[2, 5, 9, 3], &[2, 7, 8, 10, 11, 12, 3], &[2, 4, 3]];
    let batch = Batch::tokens(&seqs).unwrap();
    let labels = [1, 0, 1];
    for (what, trainable) in [
        ("learned", Trainable::COEFFS_HEAD),
        ("lora", Trainable::LORA_HEAD),
        ("full", Trainable::ALL),
    ] {
        let mut a = full.clone();
        if what == "lora" {
            a.attach_lora(&["query", "value"], 2, 4.0, 1).unwrap();
            // B starts at zero: give it values so the step's gradients reach A as well.
            for blk in &mut a.blocks {
                for l in blk.linears_mut() {
                    l.modules
                        .b_cat
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, x)| *x = (j % 5) as f32 * 0.1);
                }
            }
        } else {
            a.attach_composition(
                &library,
                Composition {
                    mode: Mode::Product,
                    param: Param::Softmax,
                    global: false,
                },
            )
            .unwrap();
        }
        let mut top = a.top(1).unwrap();
        assert_eq!(top.blocks.len(), 2);
        let mut cut = batch.clone();
        cut.hidden = a.hidden_states(&batch, 1).unwrap();
        assert_eq!(cut.hidden.len(), 3 * 7 * 8);
        close(
            &top.logits(&cut).unwrap(),
            &a.logits(&batch).unwrap(),
            &format!("{what} logits"),
        );
        // Gradients of one loss: every parameter of the top blocks and the head gets the full
        // model's gradient; the cut model has none for what lies below the cut.
        let dlogits: Vec<f32> = (0..3 * 2).map(|i| (i as f32 * 0.37).sin()).collect();
        let (_, tape_a) = a.forward(&batch).unwrap();
        let (_, tape_t) = top.forward(&cut).unwrap();
        let ga = a.backward(&tape_a, &dlogits, trainable).unwrap();
        let gt = top.backward(&tape_t, &dlogits, trainable).unwrap();
        let mut seen = 0;
        for p in top.params() {
            let below = p.name.starts_with("embeddings.");
            match (gt.get(&p.name), ga.get(&p.name)) {
                (Some(g), Some(w)) if !below => {
                    close(g, w, &format!("{what} ∂{}", p.name));
                    seen += 1;
                }
                (None, None) => {}
                (Some(_), _) if below => panic!("{what}: the cut model has a gradient for {}", p.name),
                (None, Some(_)) if below => {}
                (g, w) => panic!("{what} {}: cut {:?} vs full {:?}", p.name, g.is_some(), w.is_some()),
            }
        }
        assert!(seen >= 3, "{what}: compared {seen} gradients");
        let _ = labels;
        let mut opt = AdamW::new(0.0);
        train_step(&mut top, &mut opt, &cut, &labels, trainable, 1e-2, Some(1.0)).unwrap();
    }
}

fn task(name: &str, kind: &str, n: usize, pool: Texts, test: Texts) -> TextTaskData {
    TextTaskData {
        info: TextTaskInfo {
            name: name.into(),
            kind: kind.into(),
            classes: (0..n).map(|c| format!("c{c}")).collect(),
        },
        pool,
        test,
    }
}

fn texts(n: usize, classes: usize, salt: u32) -> Texts {
    Texts {
        ids: (0..n as u32)
            .map(|i| {
                let len = 3 + (i as usize * 7 + salt as usize) % 9;
                let mut s = vec![2];
                s.extend((0..len).map(|j| 4 + (i * 3 + j as u32 * 5 + salt) % 12));
                s.push(i % 16 + salt % 3);
                s.push(3);
                s
            })
            .collect(),
        labels: (0..n).map(|i| i % classes).collect(),
    }
}

/// Saved and loaded, a bundle is what was written; a text in both a pool and its test set is
/// refused on writing, and text sources are split so that the prepared tasks never have one.
#[test]
fn text_bundle_round_trip_and_pool_test_separation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors.gz");
    let tasks = vec![
        task("tw-cars", "covariate shift", 3, texts(12, 3, 0), texts(9, 3, 100)),
        task("movie-polarity", "task shift", 2, texts(8, 2, 1), texts(6, 2, 50)),
    ];
    save_text_bundle(&path, &tasks).unwrap();
    assert_eq!(load_text_bundle(&path).unwrap(), tasks);
    let mut leak = tasks[0].clone();
    leak.test.ids[4] = leak.pool.ids[2].clone();
    let err = save_text_bundle(&dir.path().join("leak.gz"), &[leak])
        .unwrap_err()
        .to_string();
    assert!(err.contains("test text 4 is also in the pool"), "{err}");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(load_text_bundle(&path)
        .unwrap_err()
        .to_string()
        .contains("t.safetensors.gz"));

    // Prepared from sources: 60 distinct texts for every label of every downstream task (each
    // a distinct sequence of in-vocabulary words); the hash split keeps each on one side.
    let mut src = TextSources::default();
    let mut n = 0usize;
    for spec in text_tasks().into_iter().filter(|t| t.role != Role::Upstream) {
        for (_, labels) in &spec.classes {
            for label in labels {
                for _ in 0..60 {
                    let words: Vec<&str> = (0..4).map(|j| VOCAB[4 + (n / 12usize.pow(j)) % 12]).collect();
                    n += 1;
                    let r = Record {
                        text: words.join(" "),
                        label: label.clone(),
                        source: Source::Tweets,
                        domain: spec.domain.clone().unwrap_or_default(),
                    };
                    match spec.family {
                        Family::Supersense => src.wordnet.records.push(r),
                        Family::Sentiment => src.tweets.records.push(r),
                        Family::Movie => src.movies.records.push(r),
                    }
                }
            }
        }
    }
    let tok_path = dir.path().join("tokenizer.json");
    std::fs::write(&tok_path, tokenizer_json()).unwrap();
    let tok = Tokenizer::from_file(&tok_path).unwrap();
    let built = build_text_downstream(&src, &tok, 30, 30, 16).unwrap();
    assert_eq!(built.len(), 7);
    for t in &built {
        assert!(t.pool.len() > t.test.len() && !t.test.is_empty(), "{}", t.info.name);
        for s in &t.test.ids {
            assert!(!t.pool.ids.contains(s), "{}: a test text in the pool", t.info.name);
        }
    }
    save_text_bundle(&path, &built).unwrap();
    assert_eq!(load_text_bundle(&path).unwrap(), built);
}

/// `fewshot-text` on a tiny random BERT with a 13-module library on its top block and a
/// two-task bundle, 2 steps: every method writes a line with the expected counts, a rerun
/// redoes nothing, and the report renders.
#[test]
fn fewshot_text_end_to_end_on_a_tiny_bert() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s);
    let base = tiny_bert_dir(&p("bert"));
    let targets = [
        "encoder.layer.2.attention.self.query",
        "encoder.layer.2.attention.self.value",
    ];
    let names = library_names();
    assert_eq!(names.len(), 13);
    let lib = base.random_library(&targets, names.len(), 4, 0.2, 9).unwrap();
    for (i, name) in names.iter().enumerate() {
        let mut layers = BTreeMap::new();
        for (path, mods) in &lib {
            let l = base.linear(path).unwrap();
            layers.insert(
                path.clone(),
                LoraLayer {
                    path: path.clone(),
                    a: mods[i].a.clone(),
                    b: mods[i].b.clone(),
                    r: 4,
                    d_in: l.d_in,
                    d_out: l.d_out,
                    alpha: 8.0,
                    scale: 2.0,
                },
            );
        }
        Adapter {
            dir: None,
            name: name.clone(),
            config: AdapterConfig::new(
                4,
                8.0,
                TargetModules::List(targets.iter().map(|s| s.to_string()).collect()),
            ),
            layers,
        }
        .save(p("lib").join(name), StoreDtype::F32)
        .unwrap();
    }
    save_text_bundle(
        &p("d.gz"),
        &[
            task("tw-cars", "covariate shift", 3, texts(12, 3, 0), texts(9, 3, 100)),
            task("movie-polarity", "task shift", 2, texts(8, 2, 1), texts(6, 2, 50)),
        ],
    )
    .unwrap();
    let args = TextFewshotArgs {
        model: p("bert"),
        library: p("lib"),
        data: p("d.gz"),
        out: p("r/fewshot.jsonl"),
        tasks: vec!["tw-cars".into()],
        shots: vec![1],
        seeds: 1,
        methods: Vec::new(),
        steps: 2,
        batch: 64,
        es_population: 2,
        es_generations: 1,
        test_per_class: Some(2),
        modules: Vec::new(),
        shard: None,
        shard_count: None,
        device: DeviceArg::CPU,
    };
    run_text_fewshot(args.clone()).unwrap();
    let rs = read_results(&args.out).unwrap();
    assert_eq!(rs.len(), 7);
    let by = |m: Method| rs.iter().find(|r| r.method == m).unwrap();
    for r in &rs {
        assert_eq!(
            (r.train_images, r.test_images, r.kind.as_str()),
            (3, 6, "covariate shift")
        );
        assert!(r.accuracy.is_some(), "{:?} diverged", r.method);
    }
    let head = 3 * 8 + 3;
    assert_eq!(by(Method::Head).trainable, head);
    assert_eq!(by(Method::Uniform).trainable, head);
    assert_eq!((by(Method::Uniform).modules, by(Method::Head).modules), (13, 0));
    assert_eq!(by(Method::Learned).trainable, head + 2 * 13);
    assert_eq!(by(Method::Learned).coeffs.len(), 2, "query and value of the top block");
    assert_eq!(by(Method::Lorahub).coeffs["global"].len(), 13);
    // LoRA from scratch: the library's rank 4 on query and value (d = 8): 2·(4·8 + 8·4).
    assert_eq!(by(Method::Lora).trainable, head + 2 * (4 * 8 + 8 * 4));
    // Full: the top block (4 linears of 8×8, 8→16, 16→8, two norms) and the head.
    let block = 4 * (64 + 8) + (8 * 16 + 16) + (16 * 8 + 8) + 2 * 16;
    assert_eq!(by(Method::Full).trainable, head + block);
    let before = std::fs::read(&args.out).unwrap();
    run_text_fewshot(args.clone()).unwrap();
    assert_eq!(std::fs::read(&args.out).unwrap(), before, "a rerun redoes nothing");
    // The unrelated library (supersense modules only) into its own file.
    let sub = TextFewshotArgs {
        modules: vec!["ss-".into()],
        methods: vec![Method::Learned],
        out: p("r/ss.jsonl"),
        ..args.clone()
    };
    run_text_fewshot(sub.clone()).unwrap();
    let rs = read_results(&sub.out).unwrap();
    assert_eq!((rs[0].modules, rs[0].coeffs.values().next().unwrap().len()), (9, 9));
    lora_compose::experiment::run_report(lora_compose::experiment::ReportArgs {
        dir: p("r"),
        results: Vec::new(),
    })
    .unwrap();
    assert!(std::fs::read_to_string(p("r/report.md"))
        .unwrap()
        .contains("covariate shift"));
}

/// The real default language run (`lora-compose language`), from the repository root.
#[test]
#[ignore = "needs assets/minilm (scripts/fetch-minilm.sh) and data/text-library; minutes on 2 cores"]
fn default_language_run() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    if !root.join("assets/minilm/model.safetensors").exists() {
        panic!("assets/minilm is missing: run scripts/fetch-minilm.sh");
    }
    let out = tempfile::tempdir().unwrap();
    let args = lora_compose::experiment::text_fewshot::LanguageArgs {
        model: root.join("assets/minilm"),
        library: root.join("data/text-library"),
        data: root.join("data/text-downstream.safetensors.gz"),
        out: out.path().to_path_buf(),
        device: DeviceArg::CPU,
    };
    lora_compose::experiment::text_fewshot::run_language(args).unwrap();
    let rs = read_results(&out.path().join("fewshot.jsonl")).unwrap();
    assert_eq!(rs.len(), 3 * 3 * 3 * 7);
    assert!(out.path().join("accuracy_vs_shots.svg").exists());
}
