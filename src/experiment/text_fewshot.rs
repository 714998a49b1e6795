//! The language half of the few-shot comparison (DESIGN §5, issue 13 items 3–4):
//!
//! - `prepare-text`: the held-out text tasks ([`text::text_tasks`] with a role other than
//!   `Upstream`: 3 supersense groups (label shift), 2 tweet domains (covariate shift), movie
//!   polarity and subjectivity (task shift)) as MiniLM token ids → one compact bundle
//!   (`data/text-downstream.safetensors.gz`): per task a pool (train split) and a test set
//!   (test split), capped per class; a text in both is refused.
//! - `fewshot-text`: the same seven methods, step budget, seeds, results file, shards and
//!   report as the vision sweep, on all-MiniLM-L6-v2 with the text library.
//! - `language`: the reduced comparison (one task per kind, K ∈ {1, 4, 16}, 3 seeds).
//!
//! Speed: the library adapts only the top blocks, so everything below them is frozen for every
//! method. Their output for the fixed pool and test texts is computed once per task
//! ([`Model::hidden_states`]) and each unit runs the cut model ([`Model::top`]) on it — the
//! same forward and backward, minus the frozen part. Head-only and uniform composition train
//! only the head on a frozen encoder, so their pooled features are computed once per task as
//! well and the head trains on them (a zero-block model: mean pooling of one token is that
//! token). "Full fine-tuning" here trains every weight of the adapted top blocks and the head
//! (not the frozen lower blocks nor the embeddings): its trainable count says so.
//!
//! Head: a linear probe on the mean-pooled last hidden states (MiniLM's own sentence pooling).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::{Deserialize, Serialize};

use super::data::{length_groups, Samples, Texts};
use super::methods::{run_table, run_unit, select_modules, Budget, FewshotArgs, Method, TaskEntry, Unit};
use super::text::{self, Role, Split, TextSources};
use super::PART_ROWS;
use crate::compose::layer::DeviceArg;
use crate::compose::{Mode, Param};
use crate::model::bert::{load_bert, Tokenizer};
use crate::model::{Batch, Composition, Kind, Library, Model};
use crate::{Error, Result};

/// Pool and test texts a class in the committed bundle (the lowest hashes of each split).
pub const POOL_PER_CLASS: usize = 100;
pub const TEST_PER_CLASS: usize = 100;
const FORMAT: &str = "lora-compose-text-downstream/1";

/// A downstream text task as the bundle stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextTaskInfo {
    pub name: String,
    /// "label shift", "covariate shift" or "task shift".
    pub kind: String,
    /// Class names, in label order.
    pub classes: Vec<String>,
}

/// One downstream text task: the pool shots are drawn from and the test set, as token ids.
#[derive(Clone, Debug, PartialEq)]
pub struct TextTaskData {
    pub info: TextTaskInfo,
    pub pool: Texts,
    pub test: Texts,
}

fn kind_name(role: Role) -> &'static str {
    match role {
        Role::Upstream => "upstream",
        Role::LabelShift => "label shift",
        Role::CovariateShift => "covariate shift",
        Role::TaskShift => "task shift",
    }
}

/// The downstream tasks of `src`, tokenized (≤ `max_tokens` ids each).
pub fn build_text_downstream(
    src: &TextSources,
    tok: &Tokenizer,
    pool_per_class: usize,
    test_per_class: usize,
    max_tokens: usize,
) -> Result<Vec<TextTaskData>> {
    let mut out = Vec::new();
    for spec in text::text_tasks().into_iter().filter(|s| s.role != Role::Upstream) {
        let part = |split: Split, cap: usize| -> Result<Texts> {
            let task = text::build_task(src, &spec, cap);
            let ex = task.splits.get(&split).cloned().unwrap_or_default();
            Ok(Texts {
                ids: ex
                    .iter()
                    .map(|e| text::token_ids(tok, &e.text, max_tokens))
                    .collect::<Result<_>>()?,
                labels: ex.iter().map(|e| e.label).collect(),
            })
        };
        let t = TextTaskData {
            info: TextTaskInfo {
                name: spec.name.clone(),
                kind: kind_name(spec.role).into(),
                classes: spec.classes.iter().map(|c| c.0.clone()).collect(),
            },
            pool: part(Split::Train, pool_per_class)?,
            test: part(Split::Test, test_per_class)?,
        };
        check_task(&t).map_err(Error::Input)?;
        out.push(t);
    }
    Ok(out)
}

/// A task's invariants: every class in pool and test, labels in range, no sequence in both.
pub fn check_task(t: &TextTaskData) -> std::result::Result<(), String> {
    let n = t.info.classes.len();
    for (part, set) in [("pool", &t.pool), ("test", &t.test)] {
        if let Some(&y) = set.labels.iter().find(|&&y| y >= n) {
            return Err(format!(
                "{}: {part} label {y} outside the task's {n} classes",
                t.info.name
            ));
        }
        if let Some(c) = (0..n).find(|&c| !set.labels.contains(&c)) {
            return Err(format!(
                "{}: class `{}` has no {part} texts",
                t.info.name, t.info.classes[c]
            ));
        }
        if set.ids.iter().any(|s| s.len() < 2) {
            return Err(format!("{}: a {part} text has fewer than 2 tokens", t.info.name));
        }
    }
    let pool: std::collections::HashSet<&Vec<u32>> = t.pool.ids.iter().collect();
    if let Some(i) = t.test.ids.iter().position(|s| pool.contains(s)) {
        return Err(format!(
            "{}: test text {i} is also in the pool (token ids {:?})",
            t.info.name, t.test.ids[i]
        ));
    }
    Ok(())
}

/// Writes the bundle as gzipped safetensors: `<task>.{pool,test}.{ids (U16, concatenated),
/// lengths (U8), labels (U8)}`, the task list in the metadata.
pub fn save_text_bundle(path: &Path, tasks: &[TextTaskData]) -> Result<()> {
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for t in tasks {
        check_task(t).map_err(|m| Error::File {
            path: path.into(),
            msg: m,
        })?;
        for (part, set) in [("pool", &t.pool), ("test", &t.test)] {
            let mut ids = Vec::new();
            for s in &set.ids {
                for &id in s {
                    let id = u16::try_from(id).map_err(|_| Error::File {
                        path: path.into(),
                        msg: format!("token id {id} does not fit the bundle's u16 ids"),
                    })?;
                    ids.extend_from_slice(&id.to_le_bytes());
                }
            }
            let lens = set
                .ids
                .iter()
                .map(|s| u8::try_from(s.len()))
                .collect::<std::result::Result<Vec<u8>, _>>()
                .map_err(|_| Error::File {
                    path: path.into(),
                    msg: "a text of over 255 tokens".into(),
                })?;
            let labels: Vec<u8> = set.labels.iter().map(|&y| y as u8).collect();
            let name = &t.info.name;
            bufs.push((format!("{name}.{part}.ids"), Dtype::U16, vec![ids.len() / 2], ids));
            bufs.push((format!("{name}.{part}.lengths"), Dtype::U8, vec![lens.len()], lens));
            bufs.push((format!("{name}.{part}.labels"), Dtype::U8, vec![labels.len()], labels));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = bufs
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("sizes match")))
        .collect();
    let infos: Vec<&TextTaskInfo> = tasks.iter().map(|t| &t.info).collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("tasks".to_string(), serde_json::to_string(&infos).expect("serialises"));
    super::write_safetensors_gz(path, views, meta)
}

/// Reads what [`save_text_bundle`] wrote, checking every task ([`check_task`]).
pub fn load_text_bundle(path: &Path) -> Result<Vec<TextTaskData>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = super::data::gunzip_if_gz(path, raw)?;
    let bad = |msg: String| Error::Safetensors { path: path.into(), msg };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a text downstream bundle (format {:?}, expected {FORMAT}); run `lora-compose prepare-text`",
            meta.get("format")
        )));
    }
    let infos: Vec<TextTaskInfo> = meta
        .get("tasks")
        .ok_or_else(|| bad("no `tasks` metadata".into()))
        .and_then(|t| serde_json::from_str(t).map_err(|e| bad(format!("tasks: {e}"))))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let tensor = |name: String, dtype: Dtype| -> Result<Vec<u8>> {
        let t = st.tensor(&name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != dtype {
            return Err(bad(format!("{name}: dtype {:?}, expected {dtype:?}", t.dtype())));
        }
        Ok(t.data().to_vec())
    };
    let mut out = Vec::new();
    for info in infos {
        let mut parts = BTreeMap::new();
        for part in ["pool", "test"] {
            let n = &info.name;
            let ids: Vec<u32> = tensor(format!("{n}.{part}.ids"), Dtype::U16)?
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect();
            let lens = tensor(format!("{n}.{part}.lengths"), Dtype::U8)?;
            let labels: Vec<usize> = tensor(format!("{n}.{part}.labels"), Dtype::U8)?
                .iter()
                .map(|&y| y as usize)
                .collect();
            let total: usize = lens.iter().map(|&l| l as usize).sum();
            if total != ids.len() || lens.len() != labels.len() {
                return Err(bad(format!(
                    "{n}.{part}: {} ids for lengths summing to {total}, {} lengths for {} labels",
                    ids.len(),
                    lens.len(),
                    labels.len()
                )));
            }
            let mut seqs = Vec::with_capacity(lens.len());
            let mut at = 0;
            for &l in &lens {
                seqs.push(ids[at..at + l as usize].to_vec());
                at += l as usize;
            }
            parts.insert(part, Texts { ids: seqs, labels });
        }
        let t = TextTaskData {
            pool: parts.remove("pool").expect("inserted"),
            test: parts.remove("test").expect("inserted"),
            info,
        };
        check_task(&t).map_err(bad)?;
        out.push(t);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// prepare-text

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PrepareTextArgs {
    #[arg(long, default_value = "data/text-downstream.safetensors.gz")]
    pub out: PathBuf,
    /// The BERT directory whose tokenizer.json tokenizes the texts.
    #[arg(long, default_value = "assets/minilm")]
    pub model: PathBuf,
    #[arg(long, default_value_t = POOL_PER_CLASS)]
    pub pool_per_class: usize,
    #[arg(long, default_value_t = TEST_PER_CLASS)]
    pub test_per_class: usize,
    #[arg(long, default_value_t = text::MAX_TOKENS)]
    pub max_tokens: usize,
}

pub fn run_prepare_text(args: PrepareTextArgs) -> Result<()> {
    let tok = Tokenizer::from_file(&minilm_file(&args.model, "tokenizer.json")?)?;
    let src = TextSources::load(&super::data::assets_dir())?;
    let tasks = build_text_downstream(&src, &tok, args.pool_per_class, args.test_per_class, args.max_tokens)?;
    for t in &tasks {
        eprintln!(
            "{:<20} {:<16} pool {:>4} test {:>4}",
            t.info.name,
            t.info.kind,
            t.pool.len(),
            t.test.len()
        );
    }
    save_text_bundle(&args.out, &tasks)?;
    let size = std::fs::metadata(&args.out).map_err(|e| Error::io(&args.out, e))?.len();
    eprintln!("wrote {} ({size} bytes)", args.out.display());
    Ok(())
}

/// `dir/file`, or an error naming the script that fetches MiniLM.
fn minilm_file(dir: &Path, file: &str) -> Result<PathBuf> {
    let p = dir.join(file);
    if p.exists() {
        Ok(p)
    } else {
        Err(Error::File {
            path: p,
            msg: "missing; run scripts/fetch-minilm.sh (all-MiniLM-L6-v2 into assets/minilm)".into(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// cached activations

/// Texts with the activations the cut model starts from: per text its (T_i, D) hidden states
/// (or one pooled row, T_i = 1). Token ids are not kept: the cut model reads only the mask.
#[derive(Clone, Debug, Default)]
pub struct Hidden {
    pub states: Vec<Vec<f32>>,
    pub labels: Vec<usize>,
    pub d: usize,
}

impl Samples for Hidden {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn label(&self, i: usize) -> usize {
        self.labels[i]
    }

    fn select(&self, idx: &[usize]) -> Hidden {
        Hidden {
            states: idx.iter().map(|&i| self.states[i].clone()).collect(),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            d: self.d,
        }
    }

    /// (B, T) zero ids and the mask of each text's tokens, with (B, T, D) hidden states.
    fn batch(&self, idx: &[usize]) -> Result<Batch> {
        let d = self.d;
        let t = idx.iter().map(|&i| self.states[i].len() / d).max().unwrap_or(0);
        let seqs: Vec<Vec<u32>> = idx.iter().map(|&i| vec![0; self.states[i].len() / d]).collect();
        let mut b = Batch::tokens(&seqs)?;
        b.hidden = vec![0.0; idx.len() * t * d];
        for (row, &i) in idx.iter().enumerate() {
            let s = &self.states[i];
            b.hidden[row * t * d..row * t * d + s.len()].copy_from_slice(s);
        }
        Ok(b)
    }

    fn length(&self, i: usize) -> usize {
        self.states[i].len() / self.d.max(1)
    }
}

/// `f` of each length group of `samples` ([`length_groups`]), in parallel, one row per sample
/// back in the samples' order.
fn per_sample<S: Samples>(samples: &S, f: impl Fn(&[usize]) -> Result<Vec<Vec<f32>>> + Sync) -> Result<Vec<Vec<f32>>> {
    let all: Vec<usize> = (0..samples.len()).collect();
    let groups = length_groups(samples, &all, PART_ROWS);
    // Groups of at most 16 texts, so that both cores have work while the first task caches.
    let groups: Vec<&[usize]> = groups.iter().flat_map(|g| g.chunks(16)).collect();
    let rows = groups.par_iter().map(|g| f(g)).collect::<Result<Vec<_>>>()?;
    let mut out = vec![Vec::new(); samples.len()];
    for (g, rows) in groups.iter().zip(rows) {
        for (&i, row) in g.iter().zip(rows) {
            out[i] = row;
        }
    }
    Ok(out)
}

/// The hidden states of `texts` entering block `upto` of `model`.
pub fn hidden_of(model: &Model<f32>, texts: &Texts, upto: usize) -> Result<Hidden> {
    let d = model.config.hidden;
    let states = per_sample(texts, |c| {
        let b = texts.batch(c)?;
        let h = model.hidden_states(&b, upto)?;
        Ok(c.iter()
            .enumerate()
            .map(|(r, &i)| h[r * b.seq * d..(r * b.seq + texts.ids[i].len()) * d].to_vec())
            .collect())
    })?;
    Ok(Hidden {
        states,
        labels: texts.labels.clone(),
        d,
    })
}

/// The pooled encoder output of `samples` under `model` (frozen), one row a text.
pub fn features_of<S: Samples>(model: &Model<f32>, samples: &S) -> Result<Hidden> {
    let d = model.config.hidden;
    let states = per_sample(samples, |c| {
        let pooled = model.encode(&samples.batch(c)?)?;
        Ok(pooled.chunks(d).map(<[f32]>::to_vec).collect())
    })?;
    Ok(Hidden {
        states,
        labels: (0..samples.len()).map(|i| samples.label(i)).collect(),
        d,
    })
}

// ---------------------------------------------------------------------------------------------
// the library

/// The upstream text tasks' names, in library order.
pub fn library_names() -> Vec<String> {
    text::text_tasks()
        .into_iter()
        .filter(|t| t.role == Role::Upstream)
        .map(|t| t.name)
        .collect()
}

/// The text library in `dir`: names, per-layer modules, and the (rank, alpha) of its modules.
pub fn load_text_library(dir: &Path) -> Result<(Vec<String>, Library, usize, f64)> {
    let names = library_names();
    let dirs: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(d) = dirs.iter().find(|d| !d.exists()) {
        return Err(Error::File {
            path: d.clone(),
            msg: "missing upstream module; run `lora-compose upstream-text` or restore data/ from git".into(),
        });
    }
    let lib = crate::peft::Library::load(&dirs)?;
    // The (rank, alpha) of the last adapter's last layer: every module of the library is built
    // alike by `upstream-text`.
    let (rank, alpha) = match (lib.adapters.last(), lib.layer_paths().last()) {
        (Some(a), Some(path)) => (a.layers[path].r, a.layers[path].alpha as f64),
        _ => (0, 0.0),
    };
    Ok((names, super::model_library(&lib), rank, alpha))
}

/// The lowest block any library layer is in (`encoder.layer.L.…`): the cut.
fn lowest_block(library: &Library, layers: usize) -> Result<usize> {
    library
        .keys()
        .map(|p| {
            p.strip_prefix("encoder.layer.")
                .and_then(|r| r.split('.').next())
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&l| l < layers)
                .ok_or_else(|| Error::Arg(format!("library layer `{p}` is not in a block of this BERT")))
        })
        .try_fold(layers, |m, l| Ok(m.min(l?)))
}

// ---------------------------------------------------------------------------------------------
// fewshot-text

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct TextFewshotArgs {
    /// The BERT directory (config.json, model.safetensors).
    #[arg(long, default_value = "assets/minilm")]
    pub model: PathBuf,
    #[arg(long, default_value = "data/text-library")]
    pub library: PathBuf,
    #[arg(long, default_value = "data/text-downstream.safetensors.gz")]
    pub data: PathBuf,
    /// The results file (JSON lines); finished units in it are skipped.
    #[arg(long, default_value = "results/lang/fewshot.jsonl")]
    pub out: PathBuf,
    /// Task names (default: all in the data file).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Shots per class; 0 means the whole pool.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,0")]
    pub shots: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    #[arg(long, value_delimiter = ',', value_enum)]
    pub methods: Vec<Method>,
    /// Gradient steps per method.
    #[arg(long, default_value_t = 100)]
    pub steps: usize,
    /// Largest batch (full batch up to it, seeded minibatches beyond).
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 8)]
    pub es_population: usize,
    #[arg(long, default_value_t = 5)]
    pub es_generations: usize,
    /// Test texts a class (the first ones of each task's test set; default all).
    #[arg(long)]
    pub test_per_class: Option<usize>,
    /// Compose only the library modules whose name contains one of these (`tw-`: the 4 tweet
    /// domains; `ss-`: the 9 supersense groups); default all 13. Use a separate --out each.
    #[arg(long, value_delimiter = ',')]
    pub modules: Vec<String>,
    /// Run only shard I of N (see `fewshot --shard`).
    #[arg(long, value_name = "I/N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<super::shard::Shard>,
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

impl TextFewshotArgs {
    /// The sweep's settings as the shared machinery reads them (`base`: the weights file).
    fn sweep(&self) -> FewshotArgs {
        FewshotArgs {
            base: self.model.join("model.safetensors"),
            library: self.library.clone(),
            data: self.data.clone(),
            out: self.out.clone(),
            tasks: self.tasks.clone(),
            shots: self.shots.clone(),
            seeds: self.seeds,
            methods: self.methods.clone(),
            steps: self.steps,
            batch: self.batch,
            es_population: self.es_population,
            es_generations: self.es_generations,
            test_per_class: self.test_per_class,
            modules: self.modules.clone(),
            shard: self.shard,
            shard_count: self.shard_count,
            device: self.device,
        }
    }
}

/// One task's cached inputs: hidden states at the cut (pool, test) and pooled features of the
/// frozen base and of the uniform composition (pool, test).
struct Cached {
    pool: Hidden,
    test: Hidden,
    head: (Hidden, Hidden),
    uniform: (Hidden, Hidden),
}

pub fn run_text_fewshot(args: TextFewshotArgs) -> Result<()> {
    let started = Instant::now();
    super::code_version();
    let sweep = args.sweep();
    super::shard::resolve(sweep.shard, sweep.shard_count, &|name| std::env::var(name).ok())?;
    if !args.device.select()?.is_cpu() {
        return Err(Error::Arg(
            "the language sweep runs on the CPU (it starts from cached hidden states)".into(),
        ));
    }
    minilm_file(&args.model, "model.safetensors")?;
    let (names, mut library, rank, alpha) = load_text_library(&args.library)?;
    select_modules(&names, &mut library, &args.modules)?;
    let n_modules = library.values().next().map_or(0, Vec::len);
    let mut all = load_text_bundle(&args.data)?;
    if let Some(cap) = args.test_per_class {
        for t in &mut all {
            let mut seen = vec![0usize; t.info.classes.len()];
            let keep: Vec<usize> = (0..t.test.len())
                .filter(|&i| {
                    seen[t.test.labels[i]] += 1;
                    seen[t.test.labels[i]] <= cap
                })
                .collect();
            t.test = t.test.select(&keep);
        }
    }
    let chosen: Vec<&TextTaskData> = if args.tasks.is_empty() {
        all.iter().collect()
    } else {
        args.tasks
            .iter()
            .map(|t| {
                all.iter().find(|d| &d.info.name == t).ok_or_else(|| {
                    let names: Vec<&str> = all.iter().map(|d| d.info.name.as_str()).collect();
                    Error::Arg(format!(
                        "no task `{t}` in {} (it has {})",
                        args.data.display(),
                        names.join(", ")
                    ))
                })
            })
            .collect::<Result<_>>()?
    };
    let full = load_bert(&args.model, 2, 0)?;
    let cut = lowest_block(&library, full.config.layers)?;
    let top = full.top(cut)?;
    let mut uniform = top.clone();
    uniform.attach_composition(
        &library,
        Composition {
            mode: Mode::Product,
            param: Param::Uniform,
            global: false,
        },
    )?;
    let features = top.top(top.blocks.len())?;
    let t0 = Instant::now();
    let cached: Vec<Cached> = chosen
        .iter()
        .map(|t| -> Result<Cached> {
            let pool = hidden_of(&full, &t.pool, cut)?;
            let test = hidden_of(&full, &t.test, cut)?;
            Ok(Cached {
                head: (features_of(&top, &pool)?, features_of(&top, &test)?),
                uniform: (features_of(&uniform, &pool)?, features_of(&uniform, &test)?),
                pool,
                test,
            })
        })
        .collect::<Result<_>>()?;
    eprintln!(
        "fewshot-text: frozen blocks 0..{cut} and pooled features of {} tasks cached in {:.1} s; \
         units run blocks {cut}..{}",
        chosen.len(),
        t0.elapsed().as_secs_f64(),
        full.config.layers
    );
    let entries: Vec<TaskEntry<'_, Hidden>> = chosen
        .iter()
        .zip(&cached)
        .map(|(t, c)| TaskEntry {
            name: &t.info.name,
            n_classes: t.info.classes.len(),
            pool: &c.pool,
        })
        .collect();
    let budget = Budget {
        lora_rank: rank,
        lora_alpha: alpha,
        ..Budget::of(&sweep)
    };
    let embedding_params: usize = top
        .params()
        .iter()
        .filter(|p| p.kind == Kind::Base && p.name.starts_with("embeddings."))
        .map(|p| p.data.len())
        .sum();
    let empty = Library::new();
    run_table(&sweep, &names, n_modules, &entries, started, &|ti, k, seed, idx, m| {
        let (t, c) = (chosen[ti], &cached[ti]);
        fn unit<'a>(
            t: &'a TextTaskData,
            pool: &Hidden,
            test: &'a Hidden,
            k: usize,
            seed: u64,
            idx: &[usize],
        ) -> Unit<'a, Hidden> {
            Unit {
                task: &t.info.name,
                kind: &t.info.kind,
                n_classes: t.info.classes.len(),
                test,
                k,
                seed,
                shots: pool.select(idx),
            }
        }
        match m {
            Method::Head | Method::Uniform => {
                let (pool, test) = if m == Method::Head { &c.head } else { &c.uniform };
                let mut r = run_unit(
                    &features,
                    &empty,
                    &unit(t, pool, test, k, seed, idx),
                    Method::Head,
                    &budget,
                )?;
                r.method = m;
                if m == Method::Uniform {
                    r.modules = n_modules;
                }
                Ok(r)
            }
            _ => {
                let mut r = run_unit(&top, &library, &unit(t, &c.pool, &c.test, k, seed, idx), m, &budget)?;
                if m == Method::Full {
                    // The cut model keeps the (untrained) embeddings: they are not counted.
                    r.trainable -= embedding_params;
                }
                Ok(r)
            }
        }
    })
}

// ---------------------------------------------------------------------------------------------
// language: the default reduced run

/// The reduced language comparison's tasks (one per kind), step budget and test cap, chosen
/// for time before any downstream result was seen.
pub const DEFAULT_TASKS: [&str; 3] = ["ss-noun-mind", "tw-cars", "movie-polarity"];
pub const DEFAULT_STEPS: usize = 30;
pub const DEFAULT_TEST_PER_CLASS: usize = 50;

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct LanguageArgs {
    /// The BERT directory (from scripts/fetch-minilm.sh).
    #[arg(long, default_value = "assets/minilm")]
    pub model: PathBuf,
    #[arg(long, default_value = "data/text-library")]
    pub library: PathBuf,
    #[arg(long, default_value = "data/text-downstream.safetensors.gz")]
    pub data: PathBuf,
    /// Results, report and plots go here.
    #[arg(long, default_value = "results/default-lang")]
    pub out: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

pub fn run_language(args: LanguageArgs) -> Result<()> {
    let started = Instant::now();
    minilm_file(&args.model, "config.json")?;
    minilm_file(&args.model, "model.safetensors")?;
    run_text_fewshot(TextFewshotArgs {
        model: args.model,
        library: args.library,
        data: args.data,
        out: args.out.join("fewshot.jsonl"),
        tasks: DEFAULT_TASKS.iter().map(|s| s.to_string()).collect(),
        shots: vec![1, 4, 16],
        seeds: 3,
        methods: Vec::new(),
        steps: DEFAULT_STEPS,
        batch: 64,
        es_population: 8,
        es_generations: 3,
        test_per_class: Some(DEFAULT_TEST_PER_CLASS),
        modules: Vec::new(),
        shard: None,
        shard_count: None,
        device: args.device,
    })?;
    super::run_report(super::ReportArgs {
        dir: args.out,
        results: Vec::new(),
    })?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
