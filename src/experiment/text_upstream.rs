//! `upstream-text`: the language library of DESIGN §5 — one LoRA module per upstream text task
//! ([`text::text_tasks`] with role `Upstream`: 9 WordNet supersense groups, 4 tweet domains)
//! on all-MiniLM-L6-v2, each saved as a PEFT adapter with Hugging Face `BertModel` module
//! paths (`base_model.model.encoder.layer.L.attention.self.{query,value}.lora_{A,B}.weight`),
//! so PEFT loads it onto sentence-transformers/all-MiniLM-L6-v2's `BertModel`.
//!
//! What adapts, and why: rank 8 (alpha 16) on query and value of the top `--top-layers`
//! blocks (default 2 of 6). The backward then stops at the lowest adapted block, which cuts
//! a step's cost to about the forward plus a third of it, so 13 modules train within the
//! hour on 2 cores (the measured step time is in data/README.md and in each module's
//! `adapter_config.json`). The frozen lower blocks are recomputed each step (the model has no
//! entry point that starts from hidden states); caching them would cut the rest.
//!
//! Each module's own-task test accuracy (on the task's hash-split test texts, at most
//! `--test-per-class` a class) is written under `lora_compose` in its `adapter_config.json`
//! and printed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use super::text::{self, Example, Split, TextSources, TextTaskSpec};
use super::{log_run, new_head, progress, say};
use crate::compose::layer::DeviceArg;
use crate::model::bert::{load_bert, Tokenizer};
use crate::model::train::{epoch_order, evaluate, lr_at, train_step, AdamW};
use crate::model::{Batch, Model, Trainable};
use crate::peft::{Adapter, AdapterConfig, LoraLayer, StoreDtype, TargetModules};
use crate::{Error, Result};

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct TextUpstreamArgs {
    /// A BERT directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, default_value = "assets/minilm")]
    pub model: PathBuf,
    /// Library directory: one PEFT adapter directory per upstream text task.
    #[arg(long, default_value = "data/text-library")]
    pub out: PathBuf,
    /// Adapt query and value of this many top blocks.
    #[arg(long, default_value_t = 2)]
    pub top_layers: usize,
    #[arg(long, default_value_t = 8)]
    pub rank: usize,
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f64,
    #[arg(long, default_value_t = 150)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    /// Token ids per text, `[CLS]` and `[SEP]` included (see text::MAX_TOKENS).
    #[arg(long, default_value_t = text::MAX_TOKENS)]
    pub max_tokens: usize,
    /// Training texts a class at most (the train split's lowest hashes).
    #[arg(long, default_value_t = 1000)]
    pub train_per_class: usize,
    /// Test texts a class at most.
    #[arg(long, default_value_t = 100)]
    pub test_per_class: usize,
    /// Base seed; a module trains with this plus its task's position in the upstream list.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only these upstream tasks (comma separated) [default: all].
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Element type of the written adapter tensors.
    #[arg(long, value_enum, default_value_t = StoreDtype::F32)]
    #[serde(serialize_with = "dtype_name")]
    pub dtype: StoreDtype,
    #[arg(long, default_value = "results")]
    pub log_dir: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

fn dtype_name<S: serde::Serializer>(d: &StoreDtype, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}").to_lowercase())
}

/// The PEFT targets: query and value of the top `top` of `layers` blocks, as `BertModel`
/// module paths.
pub fn targets(layers: usize, top: usize) -> Result<Vec<String>> {
    if top == 0 || top > layers {
        return Err(Error::Arg(format!(
            "--top-layers {top} must be between 1 and the model's {layers} layers"
        )));
    }
    Ok((layers - top..layers)
        .flat_map(|l| ["query", "value"].map(|m| format!("encoder.layer.{l}.attention.self.{m}")))
        .collect())
}

/// Token ids and labels of `examples`.
fn encode(tok: &Tokenizer, examples: &[Example], max_tokens: usize) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let ids = examples
        .iter()
        .map(|e| text::token_ids(tok, &e.text, max_tokens))
        .collect::<Result<Vec<_>>>()?;
    Ok((ids, examples.iter().map(|e| e.label).collect()))
}

/// One trained module: the adapter and what its training measured.
pub struct Trained {
    pub adapter: Adapter,
    pub test_accuracy: f64,
    pub final_loss: f64,
    pub ms_per_step: f64,
}

/// Trains one module for `spec` on `train`, tests it on `test`.
#[allow(clippy::too_many_arguments)]
pub fn train_module(
    base: &Model<f32>,
    tok: &Tokenizer,
    spec: &TextTaskSpec,
    train: &[Example],
    test: &[Example],
    args: &TextUpstreamArgs,
    seed: u64,
    pb: Option<&indicatif::ProgressBar>,
) -> Result<Trained> {
    let n_classes = spec.classes.len();
    for (what, set) in [("train", train), ("test", test)] {
        for c in 0..n_classes {
            if !set.iter().any(|e| e.label == c) {
                return Err(Error::Input(format!(
                    "task {}: class `{}` has no {what} texts",
                    spec.name, spec.classes[c].0
                )));
            }
        }
    }
    let (train_ids, train_y) = encode(tok, train, args.max_tokens)?;
    let (test_ids, test_y) = encode(tok, test, args.max_tokens)?;
    let targets = targets(base.config.layers, args.top_layers)?;
    let target_refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    let mut model = base.clone();
    new_head(&mut model, n_classes, seed)?;
    model.attach_lora(&target_refs, args.rank, args.alpha, seed)?;
    let mut opt = AdamW::new(0.0);
    let n = train_ids.len();
    let batch = args.batch.min(n).max(1);
    let (mut order, mut pos, mut epoch, mut last) = (Vec::new(), usize::MAX, 0u64, f64::NAN);
    let started = Instant::now();
    for step in 0..args.steps {
        if pos == usize::MAX || pos + batch > n {
            order = epoch_order(n, seed, epoch);
            epoch += 1;
            pos = 0;
        }
        let idx = &order[pos..pos + batch];
        pos += batch;
        let seqs: Vec<&[u32]> = idx.iter().map(|&i| train_ids[i].as_slice()).collect();
        let ys: Vec<usize> = idx.iter().map(|&i| train_y[i]).collect();
        let lr_now = lr_at(step, args.steps, args.steps / 20 + 1, args.lr, args.lr * 0.05);
        let stats = train_step(
            &mut model,
            &mut opt,
            &Batch::tokens(&seqs)?,
            &ys,
            Trainable::LORA_HEAD,
            lr_now,
            Some(1.0),
        )?;
        last = stats.loss;
        if !last.is_finite() {
            return Err(Error::Input(format!(
                "task {}: training diverged (loss {last}) at step {step}",
                spec.name
            )));
        }
        if let Some(pb) = pb {
            pb.inc(1);
            pb.set_message(format!("{} loss {last:.3}", spec.name));
        }
    }
    let ms_per_step = started.elapsed().as_secs_f64() * 1e3 / args.steps.max(1) as f64;
    model.sync_host()?;
    let (test_accuracy, _) = evaluate(&model, &test_y, 64, |idx| {
        let seqs: Vec<&[u32]> = idx.iter().map(|&i| test_ids[i].as_slice()).collect();
        Batch::tokens(&seqs)
    })?;
    let mut config = AdapterConfig::new(args.rank, args.alpha, TargetModules::List(targets.clone()));
    config.raw.insert(
        "base_model_name_or_path".into(),
        "sentence-transformers/all-MiniLM-L6-v2".into(),
    );
    config.raw.insert(
        "lora_compose".into(),
        serde_json::json!({
            "task": spec, "test_accuracy": test_accuracy, "train_texts": train.len(),
            "test_texts": test.len(), "steps": args.steps, "batch": batch, "lr": args.lr,
            "max_tokens": args.max_tokens, "seed": seed, "final_loss": last,
            "ms_per_step": ms_per_step,
        }),
    );
    let mut layers = BTreeMap::new();
    for (path, mods) in model.lora_modules() {
        let m = &mods[0];
        let l = model.linear(&path).expect("adapted layer exists");
        layers.insert(
            path.clone(),
            LoraLayer {
                path,
                a: m.a.clone(),
                b: m.b.clone(),
                r: args.rank,
                d_in: l.d_in,
                d_out: l.d_out,
                alpha: args.alpha as f32,
                scale: m.scale,
            },
        );
    }
    Ok(Trained {
        adapter: Adapter {
            dir: None,
            name: spec.name.clone(),
            config,
            layers,
        },
        test_accuracy,
        final_loss: last,
        ms_per_step,
    })
}

/// Trains and writes every upstream task of `specs` whose adapter is not in `args.out` yet;
/// returns (task, own-task test accuracy) for the ones trained.
pub fn build_library(
    src: &TextSources,
    specs: &[TextTaskSpec],
    base: &Model<f32>,
    tok: &Tokenizer,
    args: &TextUpstreamArgs,
) -> Result<Vec<(String, f64)>> {
    let todo: Vec<&TextTaskSpec> = specs
        .iter()
        .filter(|s| !args.out.join(&s.name).join("adapter_model.safetensors").exists())
        .collect();
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let pb = progress(todo.len() * args.steps, "upstream");
    let mut out = Vec::new();
    for spec in todo {
        let train_task = text::build_task(src, spec, args.train_per_class);
        let test_task = text::build_task(src, spec, args.test_per_class);
        let empty = Vec::new();
        let train = train_task.splits.get(&Split::Train).unwrap_or(&empty);
        let test = test_task.splits.get(&Split::Test).unwrap_or(&empty);
        let seed = module_seed(args.seed, &spec.name);
        let t = train_module(base, tok, spec, train, test, args, seed, Some(&pb))?;
        say(
            &pb,
            format!(
                "{:<20} own-task test accuracy {:.4} ({} test texts; train loss {:.3}, {:.0} ms/step)",
                spec.name,
                t.test_accuracy,
                test.len(),
                t.final_loss,
                t.ms_per_step
            ),
        );
        crate::merge::write_adapter_atomic(&args.out.join(&spec.name), &t.adapter, args.dtype)?;
        out.push((spec.name.clone(), t.test_accuracy));
    }
    pb.finish();
    Ok(out)
}

/// The seed of the module of upstream task `name`: `base` plus the task's position in the whole
/// upstream list, so that a module gets the same seed whether the library is built in one
/// run, resumed after an interruption, or rebuilt one task at a time with `--tasks`.
fn module_seed(base: u64, name: &str) -> u64 {
    let position = upstream_tasks()
        .iter()
        .position(|t| t.name == name)
        .expect("an upstream task");
    base + position as u64
}

/// Every upstream text task, in the list's order.
fn upstream_tasks() -> Vec<TextTaskSpec> {
    text::text_tasks()
        .into_iter()
        .filter(|t| t.role == text::Role::Upstream)
        .collect()
}

/// The upstream text tasks `names` selects (all when empty), or an error naming an unknown one.
fn selected(names: &[String]) -> Result<Vec<TextTaskSpec>> {
    let up = upstream_tasks();
    if let Some(bad) = names.iter().find(|n| !up.iter().any(|t| &t.name == *n)) {
        return Err(Error::Arg(format!(
            "`{bad}` is not an upstream text task ({})",
            up.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(up
        .into_iter()
        .filter(|t| names.is_empty() || names.contains(&t.name))
        .collect())
}

pub fn run_text_upstream(args: TextUpstreamArgs) -> Result<()> {
    let started = Instant::now();
    super::code_version();
    let specs = selected(&args.tasks)?;
    let src = TextSources::load(&super::data::assets_dir())?;
    let tok = Tokenizer::from_file(&args.model.join("tokenizer.json"))?;
    let mut base = load_bert(&args.model, 2, args.seed)?;
    base.to_device(&args.device.select()?)?;
    let trained = build_library(&src, &specs, &base, &tok, &args)?;
    let mut accs = serde_json::Map::new();
    for spec in &specs {
        let acc = match trained.iter().find(|(n, _)| *n == spec.name) {
            Some((_, a)) => serde_json::Value::from(*a),
            None => {
                let a = Adapter::load(args.out.join(&spec.name))?;
                let acc = a
                    .config
                    .raw
                    .get("lora_compose")
                    .and_then(|v| v.get("test_accuracy"))
                    .cloned()
                    .unwrap_or_default();
                eprintln!("{:<20} own-task test accuracy {acc} (saved)", spec.name);
                acc
            }
        };
        accs.insert(spec.name.clone(), acc);
    }
    log_run(
        &args.log_dir,
        "upstream-text",
        &args,
        started,
        serde_json::Value::Object(accs),
    )
}

/// For [`Path`]-taking callers that build the arguments in code (tests, scripts).
impl TextUpstreamArgs {
    pub fn with_defaults(model: &Path, out: &Path) -> TextUpstreamArgs {
        TextUpstreamArgs {
            model: model.into(),
            out: out.into(),
            top_layers: 2,
            rank: 8,
            alpha: 16.0,
            steps: 150,
            batch: 32,
            lr: 2e-3,
            max_tokens: text::MAX_TOKENS,
            train_per_class: 1000,
            test_per_class: 100,
            seed: 0,
            tasks: Vec::new(),
            dtype: StoreDtype::F32,
            log_dir: PathBuf::from("results"),
            device: DeviceArg::CPU,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::text::{CleanStats, Cleaned, Record, Source};
    use crate::model::Config;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    const VOCAB: [&str; 16] = [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "dog", "flight", "late", "great", "bad", "good", "@",
        "united", "a", "!",
    ];

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

    /// A random 3-layer BERT (d = 8) written as config.json, model.safetensors, tokenizer.json.
    fn tiny_bert_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let config = Config {
            hidden: 8,
            layers: 3,
            heads: 2,
            intermediate: 16,
            max_positions: 16,
            vocab_size: VOCAB.len(),
            ..Config::minilm(0)
        };
        let model = Model::<f32>::init(config, 7).unwrap();
        let ts: Vec<(String, Vec<usize>, Vec<u8>)> = model
            .params()
            .into_iter()
            .map(|p| (p.name, p.shape, p.data.iter().flat_map(|x| x.to_le_bytes()).collect()))
            .collect();
        let views: Vec<(String, TensorView)> = ts
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"hidden_size": 8, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 16,
 "max_position_embeddings": 16, "vocab_size": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
 "hidden_act": "gelu", "model_type": "bert"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer_json()).unwrap();
        dir
    }

    fn tweets() -> TextSources {
        let words = ["great", "bad", "good", "late", "cat", "dog", "the", "a"];
        let mut records = Vec::new();
        for i in 0..120 {
            let label = ["negative", "neutral", "positive"][i % 3];
            let text = format!(
                "@united flight {} {} {} {i}",
                words[i % 8],
                words[(i / 8) % 8],
                ["bad", "the", "great"][i % 3]
            );
            records.push(Record {
                text,
                label: label.into(),
                source: Source::Tweets,
                domain: "airline".into(),
            });
        }
        TextSources {
            tweets: Cleaned {
                records,
                stats: CleanStats::default(),
            },
            ..TextSources::default()
        }
    }

    /// Two steps on a tiny random BERT write a PEFT adapter with `BertModel` paths on the top
    /// layer's query and value only, its accuracy in the config; a rerun skips it.
    #[test]
    fn smoke_two_steps_write_a_peft_module() {
        let model_dir = tiny_bert_dir();
        let out = tempfile::tempdir().unwrap();
        let mut args = TextUpstreamArgs::with_defaults(model_dir.path(), &out.path().join("lib"));
        args.top_layers = 1;
        args.rank = 4;
        args.alpha = 8.0;
        args.steps = 2;
        args.batch = 8;
        args.max_tokens = 8;
        args.tasks = vec!["tw-airline".into()];
        args.seed = 3;
        let specs = selected(&args.tasks).unwrap();
        let tok = Tokenizer::from_file(&model_dir.path().join("tokenizer.json")).unwrap();
        let base = load_bert(model_dir.path(), 2, 0).unwrap();
        let src = tweets();
        let got = build_library(&src, &specs, &base, &tok, &args).unwrap();
        assert_eq!(got.len(), 1);
        assert!((0.0..=1.0).contains(&got[0].1));
        let a = Adapter::load(args.out.join("tw-airline")).unwrap();
        let paths: Vec<&str> = a.layers.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "encoder.layer.2.attention.self.query",
                "encoder.layer.2.attention.self.value"
            ]
        );
        assert_eq!(a.config.r, 4);
        let l = &a.layers["encoder.layer.2.attention.self.query"];
        assert_eq!((l.a.len(), l.b.len()), (4 * 8, 8 * 4));
        // Two Adam steps move B off its zero start.
        assert!(l.b.iter().any(|&x| x != 0.0));
        let info = &a.config.raw["lora_compose"];
        assert_eq!(info["test_accuracy"].as_f64().unwrap(), got[0].1);
        assert_eq!(info["task"]["name"], "tw-airline");
        // The module's seed comes from the task (tw-airline is the 10th upstream task), not
        // from its place among the tasks this run trains: the committed library's tw-airline
        // was trained with seed 9 in the full run, and built alone it gets seed 9 again.
        assert_eq!(info["seed"], 3 + 9);
        let st = std::fs::read(args.out.join("tw-airline/adapter_model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let mut names = st.names();
        names.sort();
        assert_eq!(
            names,
            [
                "base_model.model.encoder.layer.2.attention.self.query.lora_A.weight",
                "base_model.model.encoder.layer.2.attention.self.query.lora_B.weight",
                "base_model.model.encoder.layer.2.attention.self.value.lora_A.weight",
                "base_model.model.encoder.layer.2.attention.self.value.lora_B.weight",
            ]
        );
        // A rerun finds the module and trains nothing.
        assert!(build_library(&src, &specs, &base, &tok, &args).unwrap().is_empty());
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(selected(&["tw-cars".into()])
            .unwrap_err()
            .to_string()
            .contains("`tw-cars` is not an upstream"));
        assert_eq!(selected(&[]).unwrap().len(), 13);
        assert!(targets(6, 0).is_err() && targets(6, 7).is_err());
        assert_eq!(targets(6, 1).unwrap()[1], "encoder.layer.5.attention.self.value");
    }
}
