//! The few-shot comparison: methods × downstream tasks × shots × seeds, one unit at a time.
//!
//! Every method gets the same gradient-step budget ([`FewshotArgs::steps`]; full batch up to
//! [`FewshotArgs::batch`] images, seeded minibatches of that size beyond) and
//! hyper-parameters fixed before any downstream result was seen ([`Method::lr`]). A unit's
//! K-shot sample and the new head's initialisation depend only on (task, K, seed), so every
//! method of a unit sees the same shots and starts from the same head.
//!
//! LoraHub-style search: each generation of the evolution strategy is scored in one batched
//! forward: the K-shot set repeated once per candidate, every composed layer taking one
//! coefficient row per candidate through per-sample rows ([`Model::logits_population`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::data::{length_groups, Samples};
use super::shard::Plan;
use super::tasks::{self, TaskData};
use super::{
    accuracy, batch_of, labels_of, load_base, load_library, new_head, progress, say, write_atomic, ALPHA, PART_ROWS,
    RANK, TARGETS,
};
use crate::compose::layer::DeviceArg;
use crate::compose::{Mode, Param};
use crate::model::linear::Adapter as LinAdapter;
use crate::model::pass::Grads;
use crate::model::train::{clip_grad_norm, cross_entropy, lr_at, train_step_parts, AdamW};
use crate::model::{Batch, Composition, Library, Model, Trainable};
use crate::{Error, Result};

/// The compared methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum)]
pub enum Method {
    /// Linear probe: only the new head trains.
    Head,
    /// Full fine-tuning.
    Full,
    /// A rank-4 LoRA on query/value from scratch, plus the head.
    Lora,
    /// Uniform composition of the library (c = 1/N), head trains.
    Uniform,
    /// Learned composition: softmax per layer, trained with the head (the study).
    Learned,
    /// Unconstrained per-layer coefficients (LoRA Soups / CAT), init 1/N.
    Soups,
    /// LoraHub-style: one global row, factor merge, found by an evolution strategy with an L1
    /// penalty, bounded to ±1.5; the head trains before and after the search.
    Lorahub,
}

impl Method {
    pub const ALL: [Method; 7] = [
        Method::Head,
        Method::Full,
        Method::Lora,
        Method::Uniform,
        Method::Learned,
        Method::Soups,
        Method::Lorahub,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Head => "head only",
            Method::Full => "full fine-tuning",
            Method::Lora => "LoRA from scratch",
            Method::Uniform => "uniform composition",
            Method::Learned => "learned composition",
            Method::Soups => "LoRA Soups (CAT)",
            Method::Lorahub => "LoraHub (ES)",
        }
    }

    /// Peak learning rate, fixed in advance.
    pub fn lr(self) -> f64 {
        match self {
            Method::Full => 1e-3,
            Method::Lora => 5e-3,
            _ => 1e-2,
        }
    }
}

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct FewshotArgs {
    #[arg(long, default_value = "data/base.safetensors")]
    pub base: PathBuf,
    #[arg(long, default_value = "data/library")]
    pub library: PathBuf,
    #[arg(long, default_value = "data/downstream.safetensors.gz")]
    pub data: PathBuf,
    /// The results file (JSON lines); finished units in it are skipped.
    #[arg(long, default_value = "results/fewshot.jsonl")]
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
    /// Largest batch: K-shot sets up to this size train full batch, larger ones (the whole
    /// pool) in seeded shuffled minibatches of this size. Same step count either way.
    #[arg(long, default_value_t = 80)]
    pub batch: usize,
    /// LoraHub: candidates per generation and generations.
    #[arg(long, default_value_t = 8)]
    pub es_population: usize,
    #[arg(long, default_value_t = 5)]
    pub es_generations: usize,
    /// Test images a class (the first ones of each task's test set; default all).
    #[arg(long)]
    pub test_per_class: Option<usize>,
    /// Compose only the library modules whose upstream task name contains one of these
    /// (`-id`: the 4 plain-MNIST modules; `-id,invert`: 8); default all 16. Use a
    /// separate --out for each choice.
    #[arg(long, value_delimiter = ',')]
    pub modules: Vec<String>,
    /// Run only shard I of N (0-based) of the units, into `<out stem>.shard-III-of-NNN.jsonl`
    /// beside --out, with the plan in `<out stem>.plan.json` (see docs/cluster.md). Without
    /// it, a Slurm array task (SLURM_ARRAY_TASK_ID/_MIN/_COUNT) or a Kubernetes Indexed Job
    /// (JOB_COMPLETION_INDEX, with --shard-count) picks its shard from the environment.
    #[arg(long, value_name = "I/N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard: Option<super::shard::Shard>,
    /// The number of shards, where the environment gives only an index (Kubernetes).
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shard_count: Option<usize>,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

/// One finished unit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UnitResult {
    pub task: String,
    pub kind: String,
    pub method: Method,
    /// Shots per class (0: the whole pool).
    pub k: usize,
    pub seed: u64,
    /// Test accuracy; `None` when the run diverged.
    pub accuracy: Option<f64>,
    pub diverged: bool,
    pub final_loss: f64,
    pub trainable: usize,
    pub train_images: usize,
    pub test_images: usize,
    pub seconds: f64,
    /// Learned coefficients by layer path (`global` for LoraHub), when the method has any.
    #[serde(default)]
    pub coeffs: BTreeMap<String, Vec<f64>>,
    /// Library modules composed (0 for methods without a library, and in older files).
    #[serde(default)]
    pub modules: usize,
    /// The id of the sharded sweep's plan this unit belongs to (absent without `--shard`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

impl UnitResult {
    pub(crate) fn key(&self) -> (String, Method, usize, u64) {
        (self.task.clone(), self.method, self.k, self.seed)
    }

    /// The unit's name in plans and messages, e.g. `mnist-01567/K=4/seed=2/learned`.
    pub fn unit_key(&self) -> String {
        unit_key(&self.task, self.k, self.seed, self.method)
    }
}

/// A unit's name: task, shots per class (`all` for the whole pool), seed, method (as
/// `--methods` spells it).
pub fn unit_key(task: &str, k: usize, seed: u64, method: Method) -> String {
    let k = if k == 0 { "all".to_string() } else { k.to_string() };
    let m = clap::ValueEnum::to_possible_value(&method).expect("no skipped methods");
    format!("{task}/K={k}/seed={seed}/{}", m.get_name())
}

/// Reads a results file; a line that does not parse is an error naming the file and line (the
/// file is then left as it is).
pub fn read_results(path: &Path) -> Result<Vec<UnitResult>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Json {
                path: path.into(),
                msg: format!("line {}: {e} (fix or delete the file; it is not overwritten)", i + 1),
            })
        })
        .collect()
}

/// K samples a class from the pool (all when K = 0), seeded by (task, K, seed).
pub fn sample_shots<S: Samples>(pool: &S, n_classes: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9) ^ (k as u64) << 32);
    let mut out = Vec::new();
    for c in 0..n_classes {
        let mut idx: Vec<usize> = (0..pool.len()).filter(|&i| pool.label(i) == c).collect();
        rand::seq::SliceRandom::shuffle(&mut idx[..], &mut rng);
        if k > 0 {
            idx.truncate(k);
        }
        out.extend(idx);
    }
    out
}

/// One (task, K, seed) of a comparison: the shots every method of it trains on, and the test
/// set it is scored on.
pub(crate) struct Unit<'a, S> {
    /// Task name and kind, as the results file records them.
    pub task: &'a str,
    pub kind: &'a str,
    pub n_classes: usize,
    pub test: &'a S,
    pub k: usize,
    pub seed: u64,
    pub shots: S,
}

/// What every method of a unit may spend: gradient steps, the largest batch, LoraHub's
/// population and generations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget {
    pub steps: usize,
    pub batch: usize,
    pub es_population: usize,
    pub es_generations: usize,
    /// LoRA from scratch: rank and alpha (the library's), on the layers named `query`/`value`.
    pub lora_rank: usize,
    pub lora_alpha: f64,
}

impl Budget {
    /// The vision sweep's budget (rank-4 LoRA from scratch, as the vision library).
    pub fn of(args: &FewshotArgs) -> Budget {
        Budget {
            steps: args.steps,
            batch: args.batch,
            es_population: args.es_population,
            es_generations: args.es_generations,
            lora_rank: RANK,
            lora_alpha: ALPHA,
        }
    }
}

fn coeff_rows(model: &Model<f32>) -> BTreeMap<String, Vec<f64>> {
    let mut out = BTreeMap::new();
    let Some(comp) = model.composition else { return out };
    if comp.global {
        let v: Vec<f64> = model.global_v.iter().map(|&x| x as f64).collect();
        out.insert("global".into(), crate::compose::coefficients(comp.param, &v, v.len()));
        return out;
    }
    for l in model.blocks.iter().flat_map(|b| b.linears()) {
        if let LinAdapter::Compose { .. } = l.adapter {
            let c: Vec<f64> = l
                .coefficients(Some(comp), &model.global_v)
                .iter()
                .map(|&x| x as f64)
                .collect();
            out.insert(l.name.clone(), c);
        }
    }
    out
}

/// The batch of samples `idx` with their labels, in parts grouped by length
/// ([`length_groups`]; one part when all have the same length).
fn parts_of<S: Samples>(shots: &S, idx: &[usize]) -> Result<Vec<(Batch, Vec<usize>)>> {
    length_groups(shots, idx, PART_ROWS)
        .into_iter()
        .map(|g| {
            let sel: Vec<usize> = g.iter().map(|&p| idx[p]).collect();
            Ok((batch_of(shots, &sel)?, labels_of(shots, &sel)))
        })
        .collect()
}

/// The seeded batches of `fit`: all `n` samples each step when they fit in `batch`, else
/// shuffled minibatches of `batch`, a fresh order each epoch.
struct Batches {
    n: usize,
    batch: usize,
    seed: u64,
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
}

impl Batches {
    fn new(n: usize, batch: usize, seed: u64) -> Batches {
        Batches {
            n,
            batch,
            seed,
            order: Vec::new(),
            pos: usize::MAX,
            epoch: 0,
        }
    }

    /// The whole set (`None`) or the next minibatch.
    fn next(&mut self) -> Option<&[usize]> {
        if self.n <= self.batch {
            return None;
        }
        if self.pos == usize::MAX || self.pos + self.batch > self.n {
            self.order = crate::model::train::epoch_order(self.n, self.seed ^ 0xba7c, self.epoch);
            self.epoch += 1;
            self.pos = 0;
        }
        self.pos += self.batch;
        Some(&self.order[self.pos - self.batch..self.pos])
    }
}

/// [`fit`] of the head alone on the CPU: the encoder is frozen, so the pooled features of the
/// shots are computed once ([`Model::encode`], in length groups) and every step runs only the
/// head on them — the same batches, cross-entropy, clipping, schedule and AdamW, up to
/// rounding (the head's products summed in another order).
fn fit_head<S: Samples>(
    model: &mut Model<f32>,
    shots: &S,
    steps: usize,
    lr: f64,
    batch: usize,
    seed: u64,
) -> Result<f64> {
    let (n, d, c) = (shots.len(), model.config.hidden, model.config.num_labels);
    let all: Vec<usize> = (0..n).collect();
    let mut features = vec![0f32; n * d];
    for g in length_groups(shots, &all, PART_ROWS) {
        let pooled = model.encode(&batch_of(shots, &g)?)?;
        for (&i, row) in g.iter().zip(pooled.chunks(d)) {
            features[i * d..(i + 1) * d].copy_from_slice(row);
        }
    }
    let labels = labels_of(shots, &all);
    let (w_name, b_name) = (
        format!("{}.weight", model.head.name),
        format!("{}.bias", model.head.name),
    );
    let mut opt = AdamW::new(0.0);
    let mut loss = f64::NAN;
    let mut batches = Batches::new(n, batch, seed);
    for step in 0..steps {
        let idx = batches.next().unwrap_or(&all);
        let head = &model.head;
        let mut logits = vec![0f32; idx.len() * c];
        for (row, &i) in logits.chunks_mut(c).zip(idx) {
            let f = &features[i * d..(i + 1) * d];
            for (o, l) in row.iter_mut().enumerate() {
                *l = head.b[o]
                    + head.w[o * d..(o + 1) * d]
                        .iter()
                        .zip(f)
                        .map(|(w, x)| w * x)
                        .sum::<f32>();
            }
        }
        let ys: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
        let (l, dlogits) = cross_entropy(&logits, &ys, c)?;
        loss = l;
        if !loss.is_finite() {
            break;
        }
        let (mut dw, mut db) = (vec![0f32; c * d], vec![0f32; c]);
        for (g, &i) in dlogits.chunks(c).zip(idx) {
            let f = &features[i * d..(i + 1) * d];
            for (o, &go) in g.iter().enumerate() {
                db[o] += go;
                for (w, &x) in dw[o * d..(o + 1) * d].iter_mut().zip(f) {
                    *w += go * x;
                }
            }
        }
        let mut grads = Grads::default();
        grads.add(&w_name, dw);
        grads.add(&b_name, db);
        clip_grad_norm(&mut grads, 1.0);
        opt.step(model, &grads, lr_at(step, steps, steps / 10 + 1, lr, lr * 0.1))?;
    }
    Ok(loss)
}

/// Training of what `trainable` selects for `steps` steps: full batch when the shots fit in
/// `batch`, else seeded shuffled minibatches of `batch` (the whole-pool runs). Returns the last
/// loss (NaN or infinite when it diverged, and then it stops).
pub(crate) fn fit<S: Samples>(
    model: &mut Model<f32>,
    shots: &S,
    trainable: Trainable,
    steps: usize,
    lr: f64,
    batch: usize,
    seed: u64,
) -> Result<f64> {
    if trainable == Trainable::HEAD && model.device().is_cpu() {
        return fit_head(model, shots, steps, lr, batch, seed);
    }
    fit_model(model, shots, trainable, steps, lr, batch, seed)
}

/// [`fit`] through the whole model's forward and backward, whatever trains.
fn fit_model<S: Samples>(
    model: &mut Model<f32>,
    shots: &S,
    trainable: Trainable,
    steps: usize,
    lr: f64,
    batch: usize,
    seed: u64,
) -> Result<f64> {
    let n = shots.len();
    let all: Vec<usize> = (0..n).collect();
    let full = parts_of(shots, &all)?;
    let mut opt = AdamW::new(0.0);
    let mut loss = f64::NAN;
    let mut batches = Batches::new(n, batch, seed);
    for step in 0..steps {
        let mini;
        let parts = match batches.next() {
            None => &full,
            Some(idx) => {
                mini = parts_of(shots, idx)?;
                &mini
            }
        };
        loss = train_step_parts(
            model,
            &mut opt,
            parts,
            trainable,
            lr_at(step, steps, steps / 10 + 1, lr, lr * 0.1),
            Some(1.0),
        )?
        .loss;
        if !loss.is_finite() {
            break;
        }
    }
    // The weights trained on the device come back to the host copy (coefficient heatmaps and
    // the composed adapter read it).
    model.sync_host()?;
    Ok(loss)
}

#[cfg(test)]
fn loss_on<S: Samples>(model: &Model<f32>, shots: &S) -> Result<f64> {
    let idx: Vec<usize> = (0..shots.len()).collect();
    let logits = model.logits(&batch_of(shots, &idx)?)?;
    Ok(cross_entropy(&logits, &labels_of(shots, &idx), model.config.num_labels)?.0)
}

/// Few-shot loss of each candidate row in `values` (P × N), the whole population in one batched
/// forward: the shots repeated P times, copy p running with row p (per-sample coefficient rows).
fn population_losses<S: Samples>(model: &Model<f32>, shots: &S, values: &[f32]) -> Result<Vec<f64>> {
    let n = model.global_v.len();
    let p = values.len() / n;
    let m = shots.len();
    let k = model.config.num_labels;
    let idx: Vec<usize> = (0..p).flat_map(|_| 0..m).collect();
    let candidate_of: Vec<usize> = (0..p).flat_map(|c| std::iter::repeat_n(c, m)).collect();
    // Copies of a length run together (one group when all lengths are equal).
    let mut logits = vec![0f32; p * m * k];
    for g in length_groups(shots, &idx, PART_ROWS) {
        let sel: Vec<usize> = g.iter().map(|&q| idx[q]).collect();
        let cands: Vec<usize> = g.iter().map(|&q| candidate_of[q]).collect();
        let part = model.logits_population(&batch_of(shots, &sel)?, values, &cands)?;
        for (&q, row) in g.iter().zip(part.chunks(k)) {
            logits[q * k..(q + 1) * k].copy_from_slice(row);
        }
    }
    let labels = labels_of(shots, &(0..m).collect::<Vec<_>>());
    logits
        .chunks(m * k)
        .map(|l| Ok(cross_entropy(l, &labels, k)?.0))
        .collect()
}

/// LoraHub-style search over the global row: (μ, λ) evolution strategy, the best candidate so
/// far kept, objective = few-shot loss + λ₁·mean|c|, coefficients clipped to ±1.5. Each
/// generation's population is scored in one batched forward ([`population_losses`]).
fn lorahub_search<S: Samples>(
    model: &mut Model<f32>,
    shots: &S,
    population: usize,
    generations: usize,
    seed: u64,
) -> Result<()> {
    const L1: f64 = 0.05;
    const BOUND: f64 = 1.5;
    let n = model.global_v.len();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x10a4);
    let objectives = |m: &Model<f32>, cands: &[Vec<f64>]| -> Result<Vec<f64>> {
        let values: Vec<f32> = cands.iter().flatten().map(|&x| x as f32).collect();
        let losses = population_losses(m, shots, &values)?;
        Ok(losses
            .iter()
            .zip(cands)
            .map(|(l, c)| l + L1 * c.iter().map(|x| x.abs()).sum::<f64>() / n as f64)
            .collect())
    };
    let mut mean: Vec<f64> = model.global_v.iter().map(|&x| x as f64).collect();
    let mut best = (objectives(model, std::slice::from_ref(&mean))?[0], mean.clone());
    let mut sigma = 0.3;
    for _ in 0..generations {
        let cands: Vec<Vec<f64>> = (0..population)
            .map(|_| {
                mean.iter()
                    .map(|&m| (m + sigma * super::super::model::linear::normal(&mut rng)).clamp(-BOUND, BOUND))
                    .collect()
            })
            .collect();
        let mut scored: Vec<(f64, Vec<f64>)> = objectives(model, &cands)?
            .into_iter()
            .zip(cands)
            .filter(|(f, _)| f.is_finite())
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(top) = scored.first().filter(|t| t.0 < best.0) {
            best = top.clone();
        }
        let elite = &scored[..scored.len().min(population.div_ceil(3))];
        if !elite.is_empty() {
            mean = (0..n)
                .map(|j| elite.iter().map(|e| e.1[j]).sum::<f64>() / elite.len() as f64)
                .collect();
        }
        sigma *= 0.8;
        let _ = rng.random::<u32>();
    }
    for (v, &x) in model.global_v.iter_mut().zip(&best.1) {
        *v = x as f32;
    }
    // The host row changed: the device copy takes it.
    model.sync_device()
}

pub(crate) fn run_unit<S: Samples>(
    base: &Model<f32>,
    library: &Library,
    unit: &Unit<'_, S>,
    method: Method,
    args: &Budget,
) -> Result<UnitResult> {
    Ok(train_unit(base, library, unit, method, args)?.0)
}

/// [`run_unit`], also returning the trained model (its head, its coefficients).
pub(crate) fn train_unit<S: Samples>(
    base: &Model<f32>,
    library: &Library,
    unit: &Unit<'_, S>,
    method: Method,
    args: &Budget,
) -> Result<(UnitResult, Model<f32>)> {
    let started = Instant::now();
    let n_classes = unit.n_classes;
    let mut model = base.clone();
    new_head(&mut model, n_classes, unit.seed ^ (unit.k as u64) << 20)?;
    let composition = |param, mode, global| Composition { mode, param, global };
    let (steps, bs, seed) = (args.steps, args.batch.max(1), unit.seed);
    let (trainable, loss) = match method {
        Method::Head => (
            Trainable::HEAD,
            fit(&mut model, &unit.shots, Trainable::HEAD, steps, method.lr(), bs, seed)?,
        ),
        Method::Full => (
            Trainable::ALL,
            fit(&mut model, &unit.shots, Trainable::ALL, steps, method.lr(), bs, seed)?,
        ),
        Method::Lora => {
            model.attach_lora(&TARGETS, args.lora_rank, args.lora_alpha, unit.seed)?;
            (
                Trainable::LORA_HEAD,
                fit(
                    &mut model,
                    &unit.shots,
                    Trainable::LORA_HEAD,
                    steps,
                    method.lr(),
                    bs,
                    seed,
                )?,
            )
        }
        Method::Uniform | Method::Learned | Method::Soups => {
            let param = match method {
                Method::Uniform => Param::Uniform,
                Method::Learned => Param::Softmax,
                _ => Param::Raw,
            };
            model.attach_composition(library, composition(param, Mode::Product, false))?;
            let tr = if method == Method::Uniform {
                Trainable::HEAD
            } else {
                Trainable::COEFFS_HEAD
            };
            (tr, fit(&mut model, &unit.shots, tr, steps, method.lr(), bs, seed)?)
        }
        Method::Lorahub => {
            model.attach_composition(library, composition(Param::Raw, Mode::Factor, true))?;
            let first = fit(
                &mut model,
                &unit.shots,
                Trainable::HEAD,
                steps / 2,
                method.lr(),
                bs,
                seed,
            )?;
            if first.is_finite() {
                lorahub_search(
                    &mut model,
                    &unit.shots,
                    args.es_population,
                    args.es_generations,
                    unit.seed,
                )?;
                (
                    Trainable::COEFFS_HEAD,
                    fit(
                        &mut model,
                        &unit.shots,
                        Trainable::HEAD,
                        steps - steps / 2,
                        method.lr(),
                        bs,
                        seed,
                    )?,
                )
            } else {
                (Trainable::COEFFS_HEAD, first)
            }
        }
    };
    let diverged = !loss.is_finite();
    let acc = if diverged {
        None
    } else {
        Some(accuracy(&model, unit.test)?)
    };
    // LoraHub's row is found without gradients but still fitted to the task: count it.
    let trainable = match method {
        Method::Lorahub => model.trainable_count(Trainable::HEAD) + model.global_v.len(),
        _ => model.trainable_count(trainable),
    };
    let result = UnitResult {
        task: unit.task.into(),
        kind: unit.kind.into(),
        method,
        k: unit.k,
        seed: unit.seed,
        accuracy: acc,
        diverged,
        final_loss: loss,
        trainable,
        train_images: unit.shots.len(),
        test_images: unit.test.len(),
        seconds: started.elapsed().as_secs_f64(),
        coeffs: if method == Method::Uniform {
            BTreeMap::new()
        } else {
            coeff_rows(&model)
        },
        modules: match method {
            Method::Uniform | Method::Learned | Method::Soups | Method::Lorahub => {
                library.values().next().map_or(0, Vec::len)
            }
            _ => 0,
        },
        plan: None,
    };
    Ok((result, model))
}

pub fn run_fewshot(args: FewshotArgs) -> Result<()> {
    let started = Instant::now();
    super::code_version();
    // A malformed shard is refused before anything loads (run_table resolves it again).
    super::shard::resolve(args.shard, args.shard_count, &|name| std::env::var(name).ok())?;
    let mut base = load_base(&args.base)?;
    base.to_device(&args.device.select()?)?;
    let (names, mut library) = load_library(&args.library)?;
    select_modules(&names, &mut library, &args.modules)?;
    let n_modules = library.values().next().map_or(0, Vec::len);
    let mut all = tasks::load_bundle(&args.data)?;
    if let Some(cap) = args.test_per_class {
        for t in &mut all {
            let mut seen = vec![0usize; t.spec.classes.len()];
            let keep: Vec<usize> = (0..t.test.len())
                .filter(|&i| {
                    let c = &mut seen[t.test.labels[i] as usize];
                    *c += 1;
                    *c <= cap
                })
                .collect();
            t.test = t.test.select(&keep);
        }
    }
    let chosen: Vec<&TaskData> = if args.tasks.is_empty() {
        all.iter().collect()
    } else {
        args.tasks
            .iter()
            .map(|t| {
                all.iter().find(|d| &d.spec.name == t).ok_or_else(|| {
                    let names: Vec<&str> = all.iter().map(|d| d.spec.name.as_str()).collect();
                    Error::Arg(format!(
                        "no task `{t}` in {} (it has {})",
                        args.data.display(),
                        names.join(", ")
                    ))
                })
            })
            .collect::<Result<_>>()?
    };
    let entries: Vec<TaskEntry<'_, _>> = chosen
        .iter()
        .map(|t| TaskEntry {
            name: &t.spec.name,
            n_classes: t.spec.classes.len(),
            pool: &t.pool,
        })
        .collect();
    let budget = Budget::of(&args);
    run_table(&args, &names, n_modules, &entries, started, &|task, k, seed, idx, m| {
        let t = chosen[task];
        let unit = Unit {
            task: &t.spec.name,
            kind: t.spec.kind.name(),
            n_classes: t.spec.classes.len(),
            test: &t.test,
            k,
            seed,
            shots: t.pool.select(idx),
        };
        run_unit(&base, &library, &unit, m, &budget)
    })
}

/// Keeps only the library modules whose name contains one of `modules` (all when empty),
/// printing which; an error names the modules when none matches.
pub(crate) fn select_modules(names: &[String], library: &mut Library, modules: &[String]) -> Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let keep: Vec<usize> = (0..names.len())
        .filter(|&i| modules.iter().any(|m| names[i].contains(m.as_str())))
        .collect();
    if keep.is_empty() {
        return Err(Error::Arg(format!(
            "--modules {}: no library module's name contains any of them (they are {})",
            modules.join(","),
            names.join(", ")
        )));
    }
    let kept: Vec<&str> = keep.iter().map(|&i| names[i].as_str()).collect();
    eprintln!(
        "composing {} of {} modules: {}",
        keep.len(),
        names.len(),
        kept.join(", ")
    );
    for mods in library.values_mut() {
        *mods = keep.iter().map(|&i| mods[i].clone()).collect();
    }
    Ok(())
}

/// One downstream task of a sweep: what the results record, and the pool its shots come from.
pub(crate) struct TaskEntry<'a, S> {
    pub name: &'a str,
    pub n_classes: usize,
    pub pool: &'a S,
}

/// What runs one unit: (task index, K, seed, the shots' indices in the task's pool, method).
pub(crate) type RunUnit<'a> = dyn Fn(usize, usize, u64, &[usize], Method) -> Result<UnitResult> + Sync + 'a;

/// The sweep over `tasks` × shots × seeds × methods for any samples: the shard's share, the
/// plan, resuming from the results file, each unit saved as it finishes, the run log.
pub(crate) fn run_table<S: Samples>(
    args: &FewshotArgs,
    names: &[String],
    n_modules: usize,
    tasks: &[TaskEntry<'_, S>],
    started: Instant,
    run: &RunUnit<'_>,
) -> Result<()> {
    let shard = super::shard::resolve(args.shard, args.shard_count, &|name| std::env::var(name).ok())?;
    let methods: Vec<Method> = if args.methods.is_empty() {
        Method::ALL.to_vec()
    } else {
        args.methods.clone()
    };
    // The whole table, in order: task × shots × seed × method.
    let mut table = Vec::new();
    for (ti, _) in tasks.iter().enumerate() {
        for &k in &args.shots {
            for seed in 0..args.seeds {
                for &m in &methods {
                    table.push((ti, k, seed, m));
                }
            }
        }
    }
    let (out, plan_id) = match &shard {
        None => (args.out.clone(), None),
        Some((shard, source)) => {
            let keys: Vec<String> = table
                .iter()
                .map(|(t, k, seed, m)| unit_key(tasks[*t].name, *k, *seed, *m))
                .collect();
            let plan = Plan::new(plan_settings(args, names, n_modules)?, keys.clone());
            let plan_path = super::shard::plan_path(&args.out);
            match Plan::load(&plan_path)? {
                Some(old) if old != plan => {
                    return Err(Error::File {
                        path: plan_path,
                        msg: format!(
                            "holds plan {} and this run is plan {} ({}); shards of different \
                             plans cannot share a results directory: use another --out \
                             directory, or delete the old plan and its shard files",
                            old.id,
                            plan.id,
                            plan_difference(&old, &plan)
                        ),
                    });
                }
                Some(_) => {}
                None => write_atomic(&plan_path, plan.to_text().as_bytes())?,
            }
            let mine = super::shard::units_of(&keys, *shard);
            eprintln!(
                "fewshot: shard {shard} ({source}): {} of {} units, plan {}",
                mine.len(),
                table.len(),
                plan.id
            );
            table = mine.into_iter().map(|u| table[u]).collect();
            (super::shard::results_path(&args.out, *shard), Some(plan.id))
        }
    };
    let results = read_results(&out)?;
    if let Some(r) = results.iter().find(|r| r.modules != 0 && r.modules != n_modules) {
        return Err(Error::Arg(format!(
            "{} holds runs that composed {} modules, this one composes {n_modules}; use another --out",
            out.display(),
            r.modules
        )));
    }
    if let Some(r) = results.iter().find(|r| r.plan != plan_id) {
        return Err(Error::File {
            path: out.clone(),
            msg: format!(
                "holds unit {} of plan {}, this run is plan {}; use another --out",
                r.unit_key(),
                r.plan.as_deref().unwrap_or("(none: a run without --shard)"),
                plan_id.as_deref().unwrap_or("(none: a run without --shard)")
            ),
        });
    }
    let done: BTreeSet<_> = results.iter().map(UnitResult::key).collect();
    let todo: Vec<_> = table
        .into_iter()
        .filter(|(task, k, seed, m)| !done.contains(&(tasks[*task].name.to_string(), *m, *k, *seed)))
        .collect();
    eprintln!(
        "fewshot: {} units to run, {} already in {}",
        todo.len(),
        results.len(),
        out.display()
    );
    let pb = progress(todo.len(), "fewshot");
    let saved = std::sync::Mutex::new(results);
    // One (task, K, seed) group at a time: its methods run in parallel (each is mostly
    // single-threaded at these sizes), and each is saved as soon as it finishes, so an
    // interrupted run loses only the units still running.
    let mut groups: Vec<(usize, usize, u64, Vec<Method>)> = Vec::new();
    for (task, k, seed, m) in todo {
        match groups.last_mut() {
            Some(g) if g.0 == task && g.1 == k && g.2 == seed => g.3.push(m),
            _ => groups.push((task, k, seed, vec![m])),
        }
    }
    for (ti, k, seed, ms) in groups {
        let task = &tasks[ti];
        let idx = sample_shots(task.pool, task.n_classes, k, seed);
        pb.set_message(format!("{} K={k} seed {seed}", task.name));
        ms.par_iter().try_for_each(|&m| -> Result<()> {
            let mut r = run(ti, k, seed, &idx, m)?;
            r.plan = plan_id.clone();
            if r.diverged {
                say(
                    &pb,
                    format!(
                        "{} K={k} seed {seed} {}: diverged (loss {})",
                        r.task,
                        r.method.name(),
                        r.final_loss
                    ),
                );
            }
            let mut all = saved.lock().unwrap_or_else(|e| e.into_inner());
            all.push(r);
            let text: String = all
                .iter()
                .map(|r| serde_json::to_string(r).expect("results serialise") + "\n")
                .collect();
            write_atomic(&out, text.as_bytes())?;
            pb.inc(1);
            if pb.is_hidden() {
                // No terminal (a batch job's log): one line a unit instead of the bar.
                let r = all.last().expect("pushed");
                eprintln!(
                    "fewshot {}/{} {} K={k} seed {seed} {}: accuracy {} ({:.1} s), {:.0} s elapsed",
                    pb.position(),
                    pb.length().unwrap_or(0),
                    r.task,
                    r.method.name(),
                    r.accuracy.map_or("-".into(), |a| format!("{a:.3}")),
                    r.seconds,
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        })?;
    }
    pb.finish_and_clear();
    let results = saved.into_inner().unwrap_or_else(|e| e.into_inner());
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    // Shards running at once would lose each other's records in one shared log.
    let log = match shard {
        None => dir.join("runs.jsonl"),
        Some((s, _)) => dir.join(format!("runs.shard-{:03}-of-{:03}.jsonl", s.index, s.count)),
    };
    super::log_run_to(
        &log,
        "fewshot",
        args,
        started,
        serde_json::json!({"units": results.len()}),
    )
}

/// What decides a unit's result besides its key: the step budget and search sizes, the test
/// cap, the sub-library, and fingerprints of the input files' bytes (base, library modules,
/// downstream data). The device is left out: CPU and GPU shards of one plan may be merged,
/// and `report` refuses any unit on which they disagree.
fn plan_settings(args: &FewshotArgs, names: &[String], n_modules: usize) -> Result<serde_json::Value> {
    use super::shard::fnv1a64;
    let digest = |path: &Path| -> Result<String> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(format!("{:016x}", fnv1a64(&bytes)))
    };
    let mut library = serde_json::Map::new();
    for name in names {
        let dir = args.library.join(name);
        let files = ["adapter_config.json", "adapter_model.safetensors"]
            .iter()
            .map(|f| digest(&dir.join(f)))
            .collect::<Result<Vec<_>>>()?;
        library.insert(name.clone(), files.join(" ").into());
    }
    Ok(serde_json::json!({
        "steps": args.steps,
        "batch": args.batch,
        "es_population": args.es_population,
        "es_generations": args.es_generations,
        "test_per_class": args.test_per_class,
        "modules": args.modules,
        "n_modules": n_modules,
        "base": digest(&args.base)?,
        "data": digest(&args.data)?,
        "library": library,
    }))
}

/// A short account of how two plans differ, for the refusal message.
fn plan_difference(a: &Plan, b: &Plan) -> String {
    let mut out = Vec::new();
    if let (Some(x), Some(y)) = (a.settings.as_object(), b.settings.as_object()) {
        for (k, v) in x {
            let w = y.get(k).unwrap_or(&serde_json::Value::Null);
            if v != w {
                let (v, w) = (v.to_string(), w.to_string());
                // Fingerprint maps are long: name them only.
                if v.len() + w.len() > 80 {
                    out.push(format!("{k} differs"));
                } else {
                    out.push(format!("{k}: {v} vs {w}"));
                }
            }
        }
    }
    if a.units != b.units {
        out.push(format!("units: {} vs {}", a.units.len(), b.units.len()));
    }
    if out.is_empty() {
        "same settings and units".into()
    } else {
        out.join("; ")
    }
}

/// `lora-compose` with no subcommand: the reduced comparison from the committed `data/`, then
/// the report; `--full` runs the whole sweep.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct DefaultArgs {
    #[arg(long)]
    pub full: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

pub fn run_default(args: DefaultArgs) -> Result<()> {
    let started = Instant::now();
    let (out, fewshot) = if args.full {
        (
            PathBuf::from("results/full"),
            FewshotArgs {
                base: "data/base.safetensors".into(),
                library: "data/library".into(),
                data: "data/downstream.safetensors.gz".into(),
                out: "results/full/fewshot.jsonl".into(),
                tasks: Vec::new(),
                shots: vec![1, 2, 4, 8, 16, 0],
                seeds: 5,
                methods: Vec::new(),
                steps: 100,
                batch: 80,
                es_population: 8,
                es_generations: 5,
                test_per_class: None,
                modules: Vec::new(),
                shard: None,
                shard_count: None,
                device: args.device,
            },
        )
    } else {
        (
            PathBuf::from("results/default"),
            FewshotArgs {
                base: "data/base.safetensors".into(),
                library: "data/library".into(),
                data: "data/downstream.safetensors.gz".into(),
                out: "results/default/fewshot.jsonl".into(),
                tasks: DEFAULT_TASKS.iter().map(|s| s.to_string()).collect(),
                shots: vec![1, 4, 16],
                seeds: 3,
                methods: Vec::new(),
                steps: DEFAULT_STEPS,
                batch: 80,
                es_population: 8,
                es_generations: 3,
                test_per_class: Some(DEFAULT_TEST_PER_CLASS),
                modules: Vec::new(),
                shard: None,
                shard_count: None,
                device: args.device,
            },
        )
    };
    run_fewshot(fewshot)?;
    super::run_report(super::ReportArgs {
        dir: out,
        results: Vec::new(),
    })?;
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The reduced comparison's tasks and step budget (chosen for time, before seeing accuracies).
pub const DEFAULT_TASKS: [&str; 2] = ["mnist-01567", "digits8x8-01234"];
pub const DEFAULT_STEPS: usize = 40;
pub const DEFAULT_TEST_PER_CLASS: usize = 60;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::data::{Images, Texts, PIXELS};
    use crate::experiment::tasks::{downstream_tasks, save_bundle, upstream_tasks};
    use crate::model::checkpoint;

    /// The batched population forward of the LoraHub search scores every candidate as a forward
    /// with that candidate's row alone would, in both composition modes: ViT images (one
    /// batch) and BERT texts of 1–16 tokens (the copies grouped by length into several).
    #[test]
    fn population_forward_matches_one_candidate_at_a_time() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let base = Model::<f32>::init(crate::experiment::vit_config(3), 7).unwrap();
        let shots = Images {
            pixels: (0..7 * PIXELS).map(|_| rng.random_range(0.0..1.0)).collect(),
            labels: (0..7).map(|i| (i % 3) as u8).collect(),
        };
        check_population(&base, &shots, &mut rng);
        let mut base = Model::<f32>::init(tiny_bert(), 7).unwrap();
        // An O(1) head, so that the candidates' losses differ well above the tolerance.
        base.head.w.iter_mut().for_each(|w| *w = rng.random_range(-1.0..1.0));
        let texts = Texts {
            ids: (0..12)
                .map(|_| (0..rng.random_range(1..17)).map(|_| rng.random_range(0..50)).collect())
                .collect(),
            labels: (0..12).map(|i| i % 3).collect(),
        };
        let copies: Vec<usize> = (0..4).flat_map(|_| 0..12).collect();
        assert!(length_groups(&texts, &copies, PART_ROWS).len() > 1, "several groups");
        check_population(&base, &texts, &mut rng);
        let err = base.logits_population(&batch_of(&texts, &[0]).unwrap(), &[0.0; 5], &[0]);
        assert!(err.is_err(), "no composition attached");
    }

    /// A 2-block BERT of width 16 (vocabulary 50, 16 positions), 3 labels.
    fn tiny_bert() -> crate::model::Config {
        crate::model::Config {
            hidden: 16,
            heads: 2,
            intermediate: 32,
            layers: 2,
            vocab_size: 50,
            max_positions: 16,
            ..crate::model::Config::minilm(3)
        }
    }

    fn check_population<S: Samples>(base: &Model<f32>, shots: &S, rng: &mut ChaCha8Rng) {
        use crate::model::{Composition, LoraModule};
        let n = 5;
        let mut lib = Library::new();
        for blk in &base.blocks {
            for l in [&blk.query, &blk.value] {
                let mods = (0..n)
                    .map(|_| LoraModule {
                        a: (0..RANK * l.d_in).map(|_| rng.random_range(-0.3..0.3)).collect(),
                        b: (0..l.d_out * RANK).map(|_| rng.random_range(-0.3..0.3)).collect(),
                        scale: 2.0,
                    })
                    .collect();
                lib.insert(l.name.clone(), mods);
            }
        }
        for (mode, param) in [(Mode::Factor, Param::Raw), (Mode::Product, Param::Softmax)] {
            let mut model = base.clone();
            model
                .attach_composition(
                    &lib,
                    Composition {
                        mode,
                        param,
                        global: true,
                    },
                )
                .unwrap();
            let values: Vec<f32> = (0..4 * n).map(|_| rng.random_range(-1.5..1.5)).collect();
            let got = population_losses(&model, shots, &values).unwrap();
            assert_eq!(got.len(), 4);
            for (p, row) in values.chunks(n).enumerate() {
                model.global_v.copy_from_slice(row);
                let want = loss_on(&model, shots).unwrap();
                assert!(
                    (got[p] - want).abs() <= 1e-5 * want.abs().max(1.0),
                    "{mode:?} candidate {p}: batched {} vs alone {want}",
                    got[p]
                );
            }
            assert!(
                got.windows(2).any(|w| (w[0] - w[1]).abs() > 1e-3),
                "candidates differ: {got:?}"
            );
        }
    }

    /// The head-only fit on cached features takes the steps the whole-model fit takes with only
    /// the head training: BERT texts of 1–16 tokens, full batch and seeded minibatches, a
    /// learning rate large enough that clipping acts. Head weights agree to f32 rounding of
    /// the head's sums (1e-5 of their scale after 12 AdamW steps; a missing clip, bias or
    /// schedule moves them by ≥ 1e-3).
    #[test]
    fn head_fit_on_features_matches_the_whole_model_fit() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let base = Model::<f32>::init(tiny_bert(), 8).unwrap();
        let texts = Texts {
            ids: (0..10)
                .map(|_| (0..rng.random_range(1..17)).map(|_| rng.random_range(0..50)).collect())
                .collect(),
            labels: (0..10).map(|i| i % 3).collect(),
        };
        for batch in [16, 4] {
            let (mut a, mut b) = (base.clone(), base.clone());
            let la = fit(&mut a, &texts, Trainable::HEAD, 12, 0.5, batch, 3).unwrap();
            let lb = fit_model(&mut b, &texts, Trainable::HEAD, 12, 0.5, batch, 3).unwrap();
            assert!(
                (la - lb).abs() <= 1e-5 * lb.abs().max(1.0),
                "batch {batch}: loss {la} vs {lb}"
            );
            let scale = b.head.w.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
            crate::check::compare(
                "head.w",
                &a.head.w,
                &b.head.w,
                crate::check::Tol::new(1e-5 * scale, 1e-5),
            )
            .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
            crate::check::compare(
                "head.b",
                &a.head.b,
                &b.head.b,
                crate::check::Tol::new(1e-5 * scale, 1e-5),
            )
            .unwrap_or_else(|e| panic!("batch {batch}: {e}"));
            assert!(a.head.w != base.head.w, "the head trained");
            assert_eq!(a.blocks, base.blocks, "the encoder stays frozen");
        }
    }

    /// A random base, a random 16-module library and a one-task bundle, run end to end with a
    /// tiny budget: every method writes a line, a rerun skips them, a corrupt file is refused.
    /// Every method of one unit on the kernel device (the CPU harness running the CUDA path)
    /// gives the CPU's result: the model trains, searches (LoraHub's population forward and the
    /// row written back), syncs its weights back to the host and is evaluated there.
    #[test]
    fn every_method_runs_on_the_kernel_device_as_on_the_cpu() {
        use crate::compose::layer::Device;
        // A narrow ViT (the harness is slow); the default run's has width 64 and 4 blocks.
        let base = Model::<f32>::init(crate::model::Config::vit(16, 2, 2, 10), 1).unwrap();
        let library = base.random_library(&TARGETS, 3, RANK, 0.05, 2).unwrap();
        let img = |n: usize, salt: usize| Images {
            pixels: (0..n * PIXELS).map(|i| ((i * 31 + salt) % 97) as f32 / 97.0).collect(),
            labels: (0..n).map(|i| (i % 5) as u8).collect(),
        };
        let task = TaskData {
            spec: downstream_tasks()[0].clone(),
            pool: img(10, 0),
            test: img(5, 7),
        };
        let unit = Unit {
            task: &task.spec.name,
            kind: task.spec.kind.name(),
            n_classes: task.spec.classes.len(),
            test: &task.test,
            k: 1,
            seed: 3,
            shots: img(5, 3),
        };
        let args = FewshotArgs {
            base: PathBuf::new(),
            library: PathBuf::new(),
            data: PathBuf::new(),
            out: PathBuf::new(),
            tasks: Vec::new(),
            shots: vec![1],
            seeds: 1,
            methods: Vec::new(),
            steps: 4,
            batch: 80,
            es_population: 3,
            es_generations: 1,
            test_per_class: Some(1),
            modules: Vec::new(),
            shard: None,
            shard_count: None,
            device: DeviceArg::CPU,
        };
        let mut dev = base.clone();
        dev.to_device(&Device::Harness(crate::harness::CpuHarness::new(1)))
            .unwrap();
        for method in Method::ALL {
            let cpu = run_unit(&base, &library, &unit, method, &Budget::of(&args)).unwrap();
            let gpu = run_unit(&dev, &library, &unit, method, &Budget::of(&args)).unwrap();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * a.abs().max(1e-3);
            assert!(
                close(cpu.final_loss, gpu.final_loss),
                "{method:?}: final loss {} on the CPU, {} on the kernel device",
                cpu.final_loss,
                gpu.final_loss
            );
            assert_eq!(cpu.accuracy, gpu.accuracy, "{method:?}");
            assert_eq!(cpu.trainable, gpu.trainable, "{method:?}");
            for (layer, row) in &cpu.coeffs {
                let got = &gpu.coeffs[layer];
                assert!(
                    row.iter().zip(got).all(|(&a, &b)| close(a, b)),
                    "{method:?} {layer}: coefficients {row:?} on the CPU, {got:?} on the kernel device"
                );
            }
        }
    }

    #[test]
    fn fewshot_runs_resumes_and_refuses_corrupt_results() {
        let dir = tempfile::tempdir().unwrap();
        let p = |s: &str| dir.path().join(s);
        let base = Model::<f32>::init(crate::experiment::vit_config(10), 1).unwrap();
        checkpoint::save(&base, &p("base.safetensors"), checkpoint::Parts::ALL).unwrap();
        for (i, spec) in upstream_tasks().iter().enumerate() {
            let mut m = base.clone();
            m.attach_lora(&TARGETS, RANK, ALPHA, i as u64).unwrap();
            for b in &mut m.blocks {
                for l in b.linears_mut() {
                    l.modules
                        .b_cat
                        .iter_mut()
                        .enumerate()
                        .for_each(|(j, x)| *x = ((j + i) % 7) as f32 * 0.01);
                }
            }
            let a = crate::experiment::to_adapter(&m, &spec.name, serde_json::Value::Null).unwrap();
            a.save(p("lib").join(&spec.name), crate::peft::StoreDtype::F32).unwrap();
        }
        let spec = downstream_tasks()[0].clone();
        let img = |n: usize| Images {
            pixels: (0..n * PIXELS).map(|i| ((i * 31) % 97) as f32 / 97.0).collect(),
            labels: (0..n).map(|i| (i % 5) as u8).collect(),
        };
        save_bundle(
            &p("d.gz"),
            &[TaskData {
                spec: spec.clone(),
                pool: img(10),
                test: img(5),
            }],
        )
        .unwrap();
        let args = FewshotArgs {
            base: p("base.safetensors"),
            library: p("lib"),
            data: p("d.gz"),
            out: p("r/fewshot.jsonl"),
            tasks: vec![spec.name.clone()],
            shots: vec![1],
            seeds: 1,
            methods: Vec::new(),
            steps: 2,
            batch: 80,
            es_population: 2,
            es_generations: 1,
            test_per_class: Some(1),
            modules: Vec::new(),
            shard: None,
            shard_count: None,
            device: DeviceArg::CPU,
        };
        run_fewshot(args.clone()).unwrap();
        let rs = read_results(&args.out).unwrap();
        assert_eq!(rs.len(), 7);
        assert!(rs
            .iter()
            .all(|r| r.train_images == 5 && r.test_images == 5 && r.accuracy.is_some()));
        let learned = rs.iter().find(|r| r.method == Method::Learned).unwrap();
        assert_eq!(learned.coeffs.len(), 8, "query and value of 4 layers");
        let hub = rs.iter().find(|r| r.method == Method::Lorahub).unwrap();
        assert_eq!(hub.coeffs["global"].len(), 16);
        assert!(hub.trainable < learned.trainable);
        let before = std::fs::read(&args.out).unwrap();
        run_fewshot(args.clone()).unwrap();
        assert_eq!(std::fs::read(&args.out).unwrap(), before, "a rerun redoes nothing");
        // A sub-library into the same file is refused; into its own file it composes 4 modules.
        let sub = FewshotArgs {
            modules: vec!["-id".into()],
            methods: vec![Method::Learned],
            ..args.clone()
        };
        let err = run_fewshot(sub.clone()).unwrap_err().to_string();
        assert!(err.contains("16 modules") && err.contains("composes 4"), "{err}");
        let sub = FewshotArgs {
            out: p("r/identity.jsonl"),
            ..sub
        };
        run_fewshot(sub.clone()).unwrap();
        let rs = read_results(&sub.out).unwrap();
        assert_eq!(rs.len(), 1);
        assert_eq!((rs[0].modules, rs[0].coeffs.values().next().unwrap().len()), (4, 4));
        let err = run_fewshot(FewshotArgs {
            modules: vec!["nothing".into()],
            ..sub
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("mnist-01234-id,") || err.contains("mnist-01234-id "),
            "{err}"
        );
        std::fs::write(&args.out, "{not json\n").unwrap();
        let err = run_fewshot(args.clone()).unwrap_err().to_string();
        assert!(err.contains("fewshot.jsonl") && err.contains("line 1"), "{err}");
        assert_eq!(std::fs::read(&args.out).unwrap(), b"{not json\n");
    }
}
