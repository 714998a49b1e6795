//! `lora-compose adapt`: composition on a user's own BERT, PEFT adapters and labelled file.
//!
//! Inputs: a BERT-layout model directory (`config.json`, `model.safetensors`,
//! `tokenizer.json`, as `embed` reads them), PEFT adapters for that model, a labelled file
//! (JSONL `{"text": …, "label": …}` per line, or CSV with a header naming `text` and `label`)
//! and either a test file of the same form or `--holdout FRACTION` (a seeded split, stratified
//! by class). Labels are strings; classes are the training file's labels in sorted order.
//!
//! Every method trains on the whole training split (K = all) with the few-shot comparison's
//! machinery ([`super::methods::run_unit`]) and is scored on the test split. Everything is
//! checked before any training, and the outputs are written into a temporary directory beside
//! `--out` that is renamed to `--out` only once every file is in it, so a failed run leaves no
//! `--out` behind. `--out` receives:
//!
//! - `results.json`: inputs, classes, settings and one result per method;
//! - `coefficients.json`: method → layer → coefficients, for the methods that learn any;
//! - `report.md`: the table printed on stdout;
//! - `learned/`, `soups/`: the composed adapter of that method in `merge --mode cat` layout
//!   (`ΔW = Σ_i c_i s_i B_i A_i` with the layer's learned `c`, rank `Σ r_i`), loadable by PEFT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

use super::data::Texts;
use super::methods::{train_unit, Budget, Method, Unit, UnitResult};
use super::model_library;
use crate::compose::layer::DeviceArg;
use crate::model::bert::{config_from_json, load_bert, Tokenizer};
use crate::model::Model;
use crate::peft::{Adapter, StoreDtype};
use crate::{Error, Result};

/// The methods `adapt` runs when `--methods` is not given.
pub const DEFAULT_METHODS: [Method; 5] = [
    Method::Head,
    Method::Uniform,
    Method::Learned,
    Method::Soups,
    Method::Lorahub,
];

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct AdaptArgs {
    /// BERT-layout model directory: config.json, model.safetensors, tokenizer.json.
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A PEFT adapter directory for that model (adapter_config.json +
    /// adapter_model.safetensors), or a directory whose subdirectories are adapters; repeat it.
    #[arg(long = "adapter", value_name = "DIR", required = true)]
    pub adapters: Vec<PathBuf>,
    /// Labelled training examples: .jsonl ({"text": …, "label": …} a line) or .csv (header
    /// with `text` and `label` columns).
    #[arg(long, value_name = "FILE")]
    pub train: PathBuf,
    /// Labelled test examples, same formats; or use --holdout.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "holdout",
        required_unless_present = "holdout"
    )]
    pub test: Option<PathBuf>,
    /// Hold out this fraction of each class of --train for testing (seeded by --seed).
    #[arg(long, value_name = "FRACTION")]
    pub holdout: Option<f64>,
    /// Methods to run [default: head, uniform, learned, soups, lorahub].
    #[arg(long, value_delimiter = ',', value_enum)]
    pub methods: Vec<Method>,
    /// Output directory (must not exist or be empty); written whole or not at all.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Gradient steps per method (learning rates are fixed per method).
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Largest batch: training sets up to this size train full batch, larger ones in seeded
    /// shuffled minibatches of this size.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// LoraHub: candidates per generation and generations.
    #[arg(long, default_value_t = 8)]
    pub es_population: usize,
    #[arg(long, default_value_t = 5)]
    pub es_generations: usize,
    /// Seed of the split, the new head and the minibatch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cut texts longer than the model's positions to [CLS] + first pieces + [SEP] (without
    /// it such a text is an error).
    #[arg(long)]
    pub truncate: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

/// One labelled example of a file, with the line it starts on.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub line: usize,
    pub text: String,
    pub label: String,
}

fn bad(path: &Path, msg: impl Into<String>) -> Error {
    Error::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads a labelled file: JSONL (`.jsonl`, `.json`, `.ndjson`) or CSV (`.csv`), chosen by the
/// extension. Every error names the file and, where one applies, the line.
pub fn read_labelled(path: &Path) -> Result<Vec<Example>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        bad(path, format!("line {line}: not UTF-8 (invalid byte at offset {at})"))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let examples = match ext.as_str() {
        "jsonl" | "json" | "ndjson" => read_jsonl(path, text)?,
        "csv" => read_csv(path, text)?,
        _ => {
            return Err(bad(
                path,
                "unknown format: name it .jsonl ({\"text\": …, \"label\": …} a line) or .csv (header text,label)",
            ))
        }
    };
    if examples.is_empty() {
        return Err(bad(path, "no labelled examples (the file is empty)"));
    }
    Ok(examples)
}

fn read_jsonl(path: &Path, text: &str) -> Result<Vec<Example>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| bad(path, format!("line {n}: not a JSON object: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad(path, format!("line {n}: not a JSON object")))?;
        let text = match obj.get("text") {
            Some(serde_json::Value::String(s)) => s.clone(),
            None | Some(serde_json::Value::Null) => return Err(bad(path, format!("line {n}: no \"text\""))),
            Some(other) => return Err(bad(path, format!("line {n}: \"text\" is {other}, not a string"))),
        };
        let label = match obj.get("label") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v.to_string(),
            None | Some(serde_json::Value::Null) => return Err(bad(path, format!("line {n}: no \"label\""))),
            Some(other) => {
                return Err(bad(
                    path,
                    format!("line {n}: \"label\" is {other}, not a string or number"),
                ))
            }
        };
        out.push(checked(path, n, text, label)?);
    }
    Ok(out)
}

fn checked(path: &Path, line: usize, text: String, label: String) -> Result<Example> {
    if text.trim().is_empty() {
        return Err(bad(path, format!("line {line}: empty text")));
    }
    if label.trim().is_empty() {
        return Err(bad(path, format!("line {line}: empty label")));
    }
    Ok(Example { line, text, label })
}

/// CSV records (RFC 4180: fields in double quotes may hold commas, newlines and doubled
/// quotes), each with the line it starts on.
fn csv_records(path: &Path, text: &str) -> Result<Vec<(usize, Vec<String>)>> {
    let mut records = Vec::new();
    let (mut fields, mut field) = (Vec::new(), String::new());
    let (mut line, mut start, mut quoted, mut was_quoted) = (1usize, 1usize, false, false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                _ => {
                    if c == '\n' {
                        line += 1;
                    }
                    field.push(c);
                }
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !was_quoted => {
                quoted = true;
                was_quoted = true;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                was_quoted = false;
                let rec = std::mem::take(&mut fields);
                if !(rec.len() == 1 && rec[0].trim().is_empty()) {
                    records.push((start, rec));
                }
                line += 1;
                start = line;
            }
            _ if was_quoted => {
                return Err(bad(path, format!("line {line}: text after a closing quote")));
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err(bad(path, format!("line {start}: a quoted field is never closed")));
    }
    if !field.is_empty() || !fields.is_empty() || was_quoted {
        fields.push(field);
        records.push((start, fields));
    }
    Ok(records)
}

fn read_csv(path: &Path, text: &str) -> Result<Vec<Example>> {
    let records = csv_records(path, text)?;
    let Some(((_, header), rows)) = records.split_first() else {
        return Ok(Vec::new());
    };
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.trim().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                bad(
                    path,
                    format!("line 1: the header ({}) has no `{name}` column", header.join(",")),
                )
            })
    };
    let (t, l) = (col("text")?, col("label")?);
    rows.iter()
        .map(|(n, r)| {
            if r.len() != header.len() {
                return Err(bad(
                    path,
                    format!("line {n}: {} fields, the header has {}", r.len(), header.len()),
                ));
            }
            checked(path, *n, r[t].clone(), r[l].trim().to_string())
        })
        .collect()
}

/// Seeded split of `labels` (class per example) holding out `fraction` of each class
/// (rounded); returns (train, test) indices in file order. A class left without training
/// examples is an error naming it.
pub fn stratified_split(
    labels: &[usize],
    classes: &[String],
    fraction: f64,
    seed: u64,
) -> std::result::Result<(Vec<usize>, Vec<usize>), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5b11_7000);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (c, name) in classes.iter().enumerate() {
        let mut idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == c).collect();
        idx.shuffle(&mut rng);
        let n_test = (fraction * idx.len() as f64).round() as usize;
        if n_test >= idx.len() {
            return Err(format!(
                "class `{name}` has {} example(s); --holdout {fraction} holds out {n_test}, leaving none \
                 for training (give it more examples or a smaller --holdout)",
                idx.len()
            ));
        }
        test.extend_from_slice(&idx[..n_test]);
        train.extend_from_slice(&idx[n_test..]);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// The adapters `--adapter` names: each an adapter directory, or a directory of them (its
/// subdirectories holding `adapter_config.json`, in name order).
fn adapter_dirs(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for dir in args {
        if dir.join("adapter_config.json").exists() || !dir.is_dir() {
            out.push(dir.clone());
            continue;
        }
        let mut subs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("adapter_config.json").exists())
            .collect();
        if subs.is_empty() {
            return Err(bad(
                dir,
                "neither a PEFT adapter (no adapter_config.json) nor a directory of adapters",
            ));
        }
        subs.sort();
        out.extend(subs);
    }
    Ok(out)
}

/// Checks every adapter layer against the model: the module exists, the shapes agree.
fn check_against_model(model: &Model<f32>, model_dir: &Path, adapters: &[Adapter]) -> Result<()> {
    for a in adapters {
        let where_ = a.dir.as_ref().map_or(a.name.clone(), |d| d.display().to_string());
        if a.config.fan_in_fan_out {
            return Err(Error::Mismatch(format!(
                "adapter `{}` ({where_}) has fan_in_fan_out = true (Conv1D layers); a BERT's layers are Linear",
                a.name
            )));
        }
        for (path, l) in &a.layers {
            let Some(lin) = model.linear(path) else {
                let names = model.layer_names();
                let hint = match path.strip_prefix("bert.") {
                    Some(p) if model.linear(p).is_some() => {
                        format!(" (it is `{p}` here: the adapter was saved for a model wrapping BertModel as `bert`)")
                    }
                    _ => String::new(),
                };
                return Err(Error::Mismatch(format!(
                    "adapter `{}` ({where_}): module `{path}` is not a linear layer of the model in {}{hint}; \
                     its layers are named like `{}`",
                    a.name,
                    model_dir.display(),
                    names.first().map(String::as_str).unwrap_or("")
                )));
            };
            if (l.d_out, l.d_in) != (lin.d_out, lin.d_in) {
                return Err(Error::Mismatch(format!(
                    "adapter `{}` ({where_}): module `{path}` has d_out×d_in = {}×{}, the model in {} has {}×{}",
                    a.name,
                    l.d_out,
                    l.d_in,
                    model_dir.display(),
                    lin.d_out,
                    lin.d_in
                )));
            }
        }
    }
    Ok(())
}

/// The composition with per-layer coefficients `coeffs` (layer → one per adapter) as one
/// adapter in `merge --mode cat` layout: `ΔW = Σ_i c_i s_i B_i A_i`, rank `Σ r_i`.
pub fn composed_adapter(
    lib: &crate::peft::Library,
    coeffs: &BTreeMap<String, Vec<f64>>,
    name: &str,
) -> Result<Adapter> {
    let mut scaled = lib.clone();
    for (i, a) in scaled.adapters.iter_mut().enumerate() {
        for (path, l) in a.layers.iter_mut() {
            let c = coeffs
                .get(path)
                .and_then(|row| row.get(i))
                .ok_or_else(|| Error::Arg(format!("no coefficient of adapter {i} for layer `{path}`")))?;
            // Cat mode puts w_i s_i on A_i's rows; c_i rides on A_i with w_i = 1.
            l.a.iter_mut().for_each(|x| *x = (*x as f64 * c) as f32);
        }
    }
    let mut out = crate::merge::merge(&scaled, &vec![1.0; lib.adapters.len()], crate::merge::Mode::Cat)?;
    out.name = name.into();
    Ok(out)
}

/// Token ids of every example, `[CLS] … [SEP]`; a text over `max_positions` tokens is an error
/// naming the file and line unless `truncate`, when it is cut (and counted).
fn tokenize(
    tok: &Tokenizer,
    path: &Path,
    examples: &[Example],
    max_positions: usize,
    truncate: bool,
) -> Result<(Vec<Vec<u32>>, usize)> {
    let mut cut = 0;
    let ids = examples
        .iter()
        .map(|e| {
            let mut ids = tok.encode(&e.text)?;
            if ids.len() > max_positions {
                if !truncate {
                    return Err(bad(
                        path,
                        format!(
                            "line {}: the text has {} tokens, more than the model's {max_positions} positions \
                             (shorten it, or pass --truncate to cut such texts)",
                            e.line,
                            ids.len()
                        ),
                    ));
                }
                cut += 1;
                ids.truncate(max_positions - 1);
                ids.push(tok.sep_id());
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    Ok((ids, cut))
}

/// A directory beside `--out` that is removed when dropped unless renamed into place.
struct Staging {
    path: PathBuf,
    done: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

fn write_in(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
}

pub fn run_adapt(args: AdaptArgs) -> Result<()> {
    let started = Instant::now();
    super::code_version();
    if let Some(f) = args.holdout.filter(|f| !(f > &0.0 && f < &1.0)) {
        return Err(Error::Arg(format!("--holdout {f} must be between 0 and 1 (exclusive)")));
    }
    if args.steps == 0 || args.batch == 0 {
        return Err(Error::Arg("--steps and --batch must be positive".into()));
    }
    let out_taken = |out: &Path| match std::fs::read_dir(out) {
        Ok(mut it) => it.next().is_some(),
        Err(_) => out.exists(),
    };
    if out_taken(&args.out) {
        return Err(bad(
            &args.out,
            "already exists and is not empty; choose another --out (nothing is overwritten)",
        ));
    }
    let methods: Vec<Method> = if args.methods.is_empty() {
        DEFAULT_METHODS.to_vec()
    } else {
        let mut m = args.methods.clone();
        m.sort();
        m.dedup();
        m
    };

    // The data: classes from the training file, sorted.
    let train_ex = read_labelled(&args.train)?;
    let classes: Vec<String> = {
        let mut c: Vec<String> = train_ex.iter().map(|e| e.label.clone()).collect();
        c.sort();
        c.dedup();
        c
    };
    if classes.len() < 2 {
        return Err(bad(
            &args.train,
            format!("needs at least 2 classes, has only `{}`", classes[0]),
        ));
    }
    let class_of = |e: &Example| classes.binary_search(&e.label).ok();
    let train_labels: Vec<usize> = train_ex.iter().map(|e| class_of(e).expect("own labels")).collect();
    let test_ex = match &args.test {
        Some(p) => {
            let ex = read_labelled(p)?;
            if let Some(e) = ex.iter().find(|e| class_of(e).is_none()) {
                return Err(bad(
                    p,
                    format!(
                        "line {}: label `{}` does not occur in {} (its classes: {})",
                        e.line,
                        e.label,
                        args.train.display(),
                        classes.join(", ")
                    ),
                ));
            }
            Some(ex)
        }
        None => None,
    };

    // The model and its tokenizer.
    let config = config_from_json(&args.model.join("config.json"), classes.len())?;
    let tok = Tokenizer::from_file(&args.model.join("tokenizer.json"))?;
    let (train_ids, cut_train) = tokenize(&tok, &args.train, &train_ex, config.max_positions, args.truncate)?;
    let all = Texts {
        ids: train_ids,
        labels: train_labels.clone(),
    };
    let (train, test, cut_test) = match (&test_ex, args.holdout) {
        (Some(ex), _) => {
            let p = args.test.as_deref().expect("with test examples");
            let (ids, cut) = tokenize(&tok, p, ex, config.max_positions, args.truncate)?;
            let labels = ex.iter().map(|e| class_of(e).expect("checked")).collect();
            (all, Texts { ids, labels }, cut)
        }
        (None, Some(f)) => {
            let (tr, te) = stratified_split(&train_labels, &classes, f, args.seed).map_err(|m| bad(&args.train, m))?;
            (all.select(&tr), all.select(&te), 0)
        }
        (None, None) => return Err(Error::Arg("give --test FILE or --holdout FRACTION".into())),
    };
    if cut_train + cut_test > 0 {
        eprintln!(
            "warning: {} text(s) cut to the model's {} positions (--truncate)",
            cut_train + cut_test,
            config.max_positions
        );
    }
    if test.is_empty() {
        return Err(bad(
            args.test.as_deref().unwrap_or(&args.train),
            "no test examples (raise --holdout, or give a --test file)",
        ));
    }

    let mut base = load_bert(&args.model, classes.len(), args.seed)?;
    let dirs = adapter_dirs(&args.adapters)?;
    // Each adapter against the model first (the likelier mistake), then against each other.
    let adapters: Vec<Adapter> = dirs.iter().map(Adapter::load).collect::<Result<_>>()?;
    check_against_model(&base, &args.model, &adapters)?;
    let peft_lib = crate::peft::Library::new(adapters)?;
    let library = model_library(&peft_lib);
    if methods.contains(&Method::Lorahub) {
        for (path, mods) in &library {
            let ranks: Vec<usize> = mods
                .iter()
                .map(|m| m.a.len() / base.linear(path).expect("checked").d_in)
                .collect();
            if ranks.iter().any(|&r| r != ranks[0]) {
                let names: Vec<String> = peft_lib
                    .adapters
                    .iter()
                    .zip(&ranks)
                    .map(|(a, r)| format!("`{}` r = {r}", a.name))
                    .collect();
                return Err(Error::Mismatch(format!(
                    "lorahub averages the factors and needs equal ranks, but layer `{path}` has {}; \
                     leave lorahub out of --methods",
                    names.join(", ")
                )));
            }
        }
    }
    base.to_device(&args.device.select()?)?;
    let names: Vec<String> = peft_lib.adapters.iter().map(|a| a.name.clone()).collect();
    eprintln!(
        "adapt: {} classes ({}), {} training and {} test texts, {} adapters on {} layers, methods {}",
        classes.len(),
        classes.join(", "),
        train.len(),
        test.len(),
        names.len(),
        library.len(),
        methods.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ")
    );

    let task = args
        .train
        .file_name()
        .map_or_else(|| "train".into(), |n| n.to_string_lossy().into_owned());
    let unit = Unit {
        task: &task,
        kind: "your data",
        n_classes: classes.len(),
        test: &test,
        k: 0,
        seed: args.seed,
        shots: train,
    };
    let budget = Budget {
        steps: args.steps,
        batch: args.batch,
        es_population: args.es_population,
        es_generations: args.es_generations,
        // LoRA from scratch: the crate's rank-4 (alpha 8) LoRA on query/value, as before.
        lora_rank: super::RANK,
        lora_alpha: super::ALPHA,
    };
    let trained: Vec<(UnitResult, Model<f32>)> = methods
        .par_iter()
        .map(|&m| {
            let (r, model) = train_unit(&base, &library, &unit, m, &budget)?;
            eprintln!(
                "{:<22} accuracy {} ({} trainable, final loss {:.4}, {:.1} s)",
                m.name(),
                r.accuracy
                    .map_or("– (diverged)".into(), |a| format!("{:.2}%", 100.0 * a)),
                r.trainable,
                r.final_loss,
                r.seconds
            );
            Ok((r, model))
        })
        .collect::<Result<_>>()?;
    let results: Vec<UnitResult> = trained.iter().map(|(r, _)| r.clone()).collect();

    // Everything in memory; now the files.
    let table = super::report::render(&results);
    let coefficients: BTreeMap<String, &BTreeMap<String, Vec<f64>>> = results
        .iter()
        .filter(|r| !r.coeffs.is_empty())
        .map(|r| (method_arg(r.method), &r.coeffs))
        .collect();
    let mut composed = Vec::new();
    let n_adapters = peft_lib.adapters.len();
    for r in results.iter().filter(|r| !r.diverged) {
        let name = method_arg(r.method);
        match r.method {
            Method::Learned | Method::Soups => composed.push(composed_adapter(&peft_lib, &r.coeffs, &name)?),
            Method::Uniform => {
                let rows = peft_lib
                    .layer_paths()
                    .map(|p| (p.to_string(), vec![1.0 / n_adapters as f64; n_adapters]))
                    .collect();
                composed.push(composed_adapter(&peft_lib, &rows, &name)?);
            }
            Method::Lorahub => {
                let row = r
                    .coeffs
                    .get("global")
                    .ok_or_else(|| Error::Arg("LoraHub's result has no global coefficient row".into()))?;
                let mut a = crate::merge::merge(&peft_lib, row, crate::merge::Mode::Lorahub)?;
                a.name = name;
                composed.push(a);
            }
            _ => {}
        }
    }
    let heads = heads_file(&trained, &classes, &composed)?;
    let report = serde_json::json!({
        "command": "adapt",
        "version": super::code_version(),
        "model": args.model,
        "adapters": peft_lib.adapters.iter().map(|a| serde_json::json!({"name": a.name, "dir": a.dir})).collect::<Vec<_>>(),
        "train": args.train,
        "test": args.test,
        "holdout": args.holdout,
        "classes": classes,
        "train_texts": unit.shots.len(),
        "test_texts": test.len(),
        "settings": {"steps": args.steps, "batch": args.batch, "es_population": args.es_population,
                     "es_generations": args.es_generations, "seed": args.seed, "truncate": args.truncate},
        "composed_adapters": composed.iter().map(|a| a.name.clone()).collect::<Vec<_>>(),
        "results": results,
        "wall_s": started.elapsed().as_secs_f64(),
    });
    let parent = args
        .out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let leaf = args
        .out
        .file_name()
        .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut staging = Staging {
        path: parent.join(format!(".{leaf}.lora-compose-tmp-{}-{nanos}", std::process::id())),
        done: false,
    };
    // create_dir gives the mode the user's umask allows (a temporary directory would be 0700).
    std::fs::create_dir(&staging.path).map_err(|e| Error::io(&staging.path, e))?;
    write_in(&staging.path, "results.json", pretty(&report).as_bytes())?;
    write_in(&staging.path, "coefficients.json", pretty(&coefficients).as_bytes())?;
    write_in(&staging.path, "report.md", table.as_bytes())?;
    for a in &composed {
        a.save(staging.path.join(&a.name), StoreDtype::F32)?;
    }
    write_in(&staging.path, "heads.safetensors", &heads)?;
    if out_taken(&args.out) {
        return Err(bad(
            &args.out,
            "appeared while this run went on and is not empty; nothing is overwritten",
        ));
    }
    if args.out.is_dir() {
        std::fs::remove_dir(&args.out).map_err(|e| Error::io(&args.out, e))?;
    }
    std::fs::rename(&staging.path, &args.out).map_err(|e| Error::io(&args.out, e))?;
    staging.done = true;
    println!("{table}");
    eprintln!(
        "wrote {} (results.json, coefficients.json, report.md, heads.safetensors{}) in {:.1} s",
        args.out.display(),
        composed.iter().map(|a| format!(", {}/", a.name)).collect::<String>(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The classifier heads of the methods whose encoder the user can rebuild — the base model
/// (`head`) or the base with one of the written adapters — as safetensors: `<method>.weight`
/// (classes × hidden), `<method>.bias` (classes), f32; metadata: the classes in label order,
/// the pooling (`mean` of the last hidden states over real tokens) and, per method, the adapter
/// directory it sits on (`""` for the bare base). LoRA from scratch and full fine-tuning change
/// the encoder in ways not written out, so their heads are not exported.
fn heads_file(trained: &[(UnitResult, Model<f32>)], classes: &[String], composed: &[Adapter]) -> Result<Vec<u8>> {
    let mut bufs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut on = BTreeMap::new();
    for (r, model) in trained.iter().filter(|(r, _)| !r.diverged) {
        let name = method_arg(r.method);
        let adapter = match r.method {
            Method::Head => String::new(),
            _ if composed.iter().any(|a| a.name == name) => name.clone(),
            _ => continue,
        };
        let h = &model.head;
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        bufs.push((format!("{name}.weight"), vec![h.d_out, h.d_in], bytes(&h.w)));
        bufs.push((format!("{name}.bias"), vec![h.d_out], bytes(&h.b)));
        on.insert(name, adapter);
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bufs
        .iter()
        .map(|(n, shape, b)| {
            let v =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).expect("sizes match");
            (n.clone(), v)
        })
        .collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "lora-compose-heads/1".to_string());
    meta.insert(
        "classes".to_string(),
        serde_json::to_string(classes).expect("serialises"),
    );
    meta.insert("pooling".to_string(), "mean".to_string());
    meta.insert("adapters".to_string(), serde_json::to_string(&on).expect("serialises"));
    safetensors::tensor::serialize(views, Some(meta)).map_err(|e| Error::Arg(format!("heads.safetensors: {e}")))
}

/// The method as `--methods` spells it.
fn method_arg(m: Method) -> String {
    clap::ValueEnum::to_possible_value(&m)
        .expect("no skipped methods")
        .get_name()
        .to_string()
}

/// Pretty JSON with a final newline.
fn pretty<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string_pretty(v).expect("in-memory values serialise");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn csv_quotes_commas_newlines_and_header_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "d.csv",
            b"label,text\r\npos,\"a, b\"\"c\"\"\"\nneg,\"two\nlines\"\n\nneu,plain\n",
        );
        let ex = read_labelled(&p).unwrap();
        let got: Vec<(usize, &str, &str)> = ex.iter().map(|e| (e.line, e.text.as_str(), e.label.as_str())).collect();
        assert_eq!(
            got,
            vec![(2, "a, b\"c\"", "pos"), (3, "two\nlines", "neg"), (6, "plain", "neu")]
        );
        let p = write(dir.path(), "e.csv", b"text,label\nfine,a\nno label here\n");
        let e = read_labelled(&p).unwrap_err().to_string();
        assert!(
            e.contains("e.csv") && e.contains("line 3") && e.contains("1 fields"),
            "{e}"
        );
        let p = write(dir.path(), "f.csv", b"text,lab\nx,y\n");
        let e = read_labelled(&p).unwrap_err().to_string();
        assert!(e.contains("no `label` column"), "{e}");
        let p = write(dir.path(), "g.csv", b"text,label\n\"open,a\n");
        assert!(read_labelled(&p).unwrap_err().to_string().contains("never closed"));
    }

    #[test]
    fn split_is_seeded_stratified_and_keeps_every_class() {
        let labels: Vec<usize> = (0..30).map(|i| i % 3).collect();
        let classes: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let (tr, te) = stratified_split(&labels, &classes, 0.3, 4).unwrap();
        assert_eq!((tr.len(), te.len()), (21, 9));
        for c in 0..3 {
            assert_eq!(te.iter().filter(|&&i| labels[i] == c).count(), 3);
        }
        let mut all = [tr.clone(), te.clone()].concat();
        all.sort();
        assert_eq!(all, (0..30).collect::<Vec<_>>());
        assert_eq!(stratified_split(&labels, &classes, 0.3, 4).unwrap(), (tr.clone(), te));
        assert_ne!(stratified_split(&labels, &classes, 0.3, 5).unwrap().0, tr);
        let e = stratified_split(&[0, 0, 1], &classes[..2], 0.5, 0).unwrap_err();
        assert!(e.contains("class `b` has 1 example"), "{e}");
    }
}
