//! The vision experiment of DESIGN §5 as resumable steps:
//!
//! 1. `pretrain`: a tiny ViT on Fashion-MNIST train → `data/base.safetensors`;
//! 2. `upstream`: 16 rank-4 LoRA modules (query, value) on MNIST tasks → `data/library/<task>/`
//!    in PEFT layout, each module's own-task accuracy in its `adapter_config.json`;
//! 3. `prepare`: the downstream tasks' pools and test sets → `data/downstream.safetensors.gz`;
//! 4. `fewshot`: methods × tasks × shots × seeds, one JSON line per unit →
//!    `results/fewshot.jsonl`;
//! 5. `report`: markdown table and SVG plot from the JSONL.
//!
//! Steps 1–3 read `assets/` (see `scripts/fetch-assets.sh`); steps 4–5 read only `data/` and
//! `results/`. Every finished unit is written atomically (temporary file + rename) and a rerun
//! skips what exists; each run appends its config, code version and timings to
//! `results/runs.jsonl`.

pub mod adapt;
pub mod data;
pub mod methods;
pub mod report;
pub mod shard;
pub mod tasks;
pub mod text;
pub mod text_fewshot;
pub mod text_upstream;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::compose::layer::DeviceArg;
use crate::model::train::{evaluate, lr_at, train_step, AdamW};
use crate::model::{checkpoint, Batch, Config, Library, Linear, LoraModule, Model, Trainable};
use crate::peft::{Adapter, AdapterConfig, LoraLayer, StoreDtype, TargetModules};
use crate::{Error, Result};
use data::{Images, Samples};
use tasks::TaskSpec;

/// The ViT of every step: width 64, 4 layers, 4 heads, 7×7 patches.
pub fn vit_config(n_labels: usize) -> Config {
    Config::vit(64, 4, 4, n_labels)
}

/// Layers the upstream modules adapt.
pub const TARGETS: [&str; 2] = ["query", "value"];
pub const RANK: usize = 4;
pub const ALPHA: f64 = 8.0;

/// Creates `path`'s directory if needed, then writes `bytes` with the crate's one atomic file
/// write ([`crate::merge::write_file_atomic`]: temporary file + rename, the umask's mode for a
/// new file, the previous mode for a replaced one).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    crate::merge::write_file_atomic(path, bytes)
}

/// The code version: crate version and, when run from a git checkout, the commit (`-dirty`
/// with uncommitted changes). Taken once, at the first call — every step calls it when it
/// starts, so a commit made while a long run goes on does not relabel it.
pub fn code_version() -> String {
    static VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    VERSION
        .get_or_init(|| {
            let commit = std::process::Command::new("git")
                .args(["describe", "--always", "--dirty", "--abbrev=12"])
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            match commit {
                Some(c) => format!("{} ({c})", env!("CARGO_PKG_VERSION")),
                None => env!("CARGO_PKG_VERSION").to_string(),
            }
        })
        .clone()
}

/// Appends one run record (command, config, version, timings) to `<dir>/runs.jsonl`.
pub fn log_run<A: Serialize>(
    dir: &Path,
    command: &str,
    args: &A,
    started: Instant,
    extra: serde_json::Value,
) -> Result<()> {
    log_run_to(&dir.join("runs.jsonl"), command, args, started, extra)
}

/// Appends one run record to the log file `path`.
pub fn log_run_to<A: Serialize>(
    path: &Path,
    command: &str,
    args: &A,
    started: Instant,
    extra: serde_json::Value,
) -> Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let rec = serde_json::json!({
        "command": command,
        "config": args,
        "version": code_version(),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "wall_s": started.elapsed().as_secs_f64(),
        "threads": rayon::current_num_threads(),
        "result": extra,
    });
    text.push_str(&rec.to_string());
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

pub(crate) fn progress(n: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(n as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// A log line above the bar, or on stderr when the bar is hidden (not a terminal).
pub(crate) fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// The model input of samples `idx` of `samples`.
pub(crate) fn batch_of<S: Samples>(samples: &S, idx: &[usize]) -> Result<Batch> {
    samples.batch(idx)
}

pub(crate) fn labels_of<S: Samples>(samples: &S, idx: &[usize]) -> Vec<usize> {
    samples.labels_at(idx)
}

/// Padded rows (sequences × their padded length) a batch of samples of different lengths may
/// take before the rest goes into another ([`data::length_groups`]): large enough for
/// efficient GEMMs, small enough that a batch of short texts is not padded to its longest.
pub(crate) const PART_ROWS: usize = 512;

/// Test accuracy of `model` on `samples` (texts grouped by length, so little is padded).
pub(crate) fn accuracy<S: Samples>(model: &Model<f32>, samples: &S) -> Result<f64> {
    use rayon::prelude::*;
    let all: Vec<usize> = (0..samples.len()).collect();
    let groups = data::length_groups(samples, &all, PART_ROWS);
    if let [_] = groups.as_slice() {
        return Ok(evaluate(model, &samples.labels_at(&all), 256, |idx| samples.batch(idx))?.0);
    }
    let correct = groups
        .par_iter()
        .map(|g| -> Result<f64> {
            let (acc, _) = evaluate(model, &samples.labels_at(g), g.len(), |c| {
                samples.batch(&c.iter().map(|&p| g[p]).collect::<Vec<_>>())
            })?;
            Ok((acc * g.len() as f64).round())
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(correct.iter().sum::<f64>() / samples.len() as f64)
}

/// Replaces the model's head by a fresh seeded one of `n` classes, on the model's device.
pub(crate) fn new_head(model: &mut Model<f32>, n: usize, seed: u64) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4ead);
    model.sync_host()?;
    model.head = Linear::init("classifier", model.config.hidden, n, 0.02, &mut rng);
    model.config.num_labels = n;
    model.sync_device()
}

/// Loads the pretrained base (10-class Fashion-MNIST head).
pub fn load_base(path: &Path) -> Result<Model<f32>> {
    if !path.exists() {
        return Err(Error::File {
            path: path.into(),
            msg: "missing; run `lora-compose pretrain` (needs scripts/fetch-assets.sh) or restore data/ from git"
                .into(),
        });
    }
    let mut model = Model::<f32>::init(vit_config(10), 0)?;
    checkpoint::load(&mut model, path)?;
    Ok(model)
}

/// Minibatch training over `images` (fixed step count, seeded order, warm-up + cosine).
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_minibatch(
    model: &mut Model<f32>,
    images: &Images,
    trainable: Trainable,
    steps: usize,
    batch: usize,
    lr: f64,
    weight_decay: f64,
    seed: u64,
    pb: Option<&ProgressBar>,
) -> Result<f64> {
    let mut opt = AdamW::new(weight_decay);
    let n = images.len();
    let mut order = Vec::new();
    let (mut epoch, mut pos, mut last) = (0u64, usize::MAX, f64::NAN);
    for step in 0..steps {
        if pos == usize::MAX || pos + batch > n {
            order = crate::model::train::epoch_order(n, seed, epoch);
            epoch += 1;
            pos = 0;
        }
        let idx = &order[pos..(pos + batch).min(n)];
        pos += batch;
        let lr_now = lr_at(step, steps, steps / 20 + 1, lr, lr * 0.05);
        let stats = train_step(
            model,
            &mut opt,
            &batch_of(images, idx)?,
            &labels_of(images, idx),
            trainable,
            lr_now,
            Some(1.0),
        )?;
        last = stats.loss;
        if !last.is_finite() {
            return Err(Error::Input(format!("training diverged (loss {last}) at step {step}")));
        }
        if let Some(pb) = pb {
            pb.inc(1);
            if step % 10 == 0 {
                pb.set_message(format!("loss {last:.3}"));
            }
            if pb.is_hidden() && (step + 1) % 100 == 0 {
                eprintln!("step {}/{steps}: loss {last:.4}", step + 1);
            }
        }
    }
    // The weights trained on the device come back to the host copy, which checkpoints,
    // adapters and reports read.
    model.sync_host()?;
    Ok(last)
}

// ---------------------------------------------------------------------------------------------
// pretrain

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PretrainArgs {
    /// Output checkpoint (skipped when it exists and loads).
    #[arg(long, default_value = "data/base.safetensors")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    #[arg(long, default_value_t = 2e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the run log goes.
    #[arg(long, default_value = "results")]
    pub log_dir: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

pub fn run_pretrain(args: PretrainArgs) -> Result<()> {
    let started = Instant::now();
    code_version();
    if args.out.exists() {
        load_base(&args.out)?;
        eprintln!(
            "{} exists and loads; nothing to do (delete it to retrain)",
            args.out.display()
        );
        return Ok(());
    }
    let assets = data::assets_dir();
    let fm = assets.join("fashion-mnist");
    let train = data::load_idx_pair(&fm, "train")?;
    let test = data::load_idx_pair(&fm, "t10k")?;
    let mut model = Model::<f32>::init(vit_config(10), args.seed)?;
    model.to_device(&args.device.select()?)?;
    let pb = progress(args.steps, "pretrain");
    let loss = train_minibatch(
        &mut model,
        &train,
        Trainable::ALL,
        args.steps,
        args.batch,
        args.lr,
        0.05,
        args.seed,
        Some(&pb),
    )?;
    pb.finish();
    let acc = accuracy(&model, &test)?;
    eprintln!("pretrained: final train loss {loss:.4}, Fashion-MNIST test accuracy {acc:.4}");
    let tmp = args.out.with_extension("partial");
    if let Some(p) = args.out.parent() {
        std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
    }
    checkpoint::save(&model, &tmp, checkpoint::Parts::ALL)?;
    std::fs::rename(&tmp, &args.out).map_err(|e| Error::io(&args.out, e))?;
    log_run(
        &args.log_dir,
        "pretrain",
        &args,
        started,
        serde_json::json!({"test_accuracy": acc, "final_loss": loss}),
    )
}

// ---------------------------------------------------------------------------------------------
// upstream

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct UpstreamArgs {
    #[arg(long, default_value = "data/base.safetensors")]
    pub base: PathBuf,
    /// Library directory: one PEFT adapter directory per upstream task.
    #[arg(long, default_value = "data/library")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 5e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value = "results")]
    pub log_dir: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
}

/// A model's trained LoRAs as one PEFT adapter named `name`.
pub(crate) fn to_adapter(model: &Model<f32>, name: &str, extra: serde_json::Value) -> Result<Adapter> {
    let mut config = AdapterConfig::new(
        RANK,
        ALPHA,
        TargetModules::List(TARGETS.iter().map(|s| s.to_string()).collect()),
    );
    config.raw.insert("lora_compose".into(), extra);
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
                r: RANK,
                d_in: l.d_in,
                d_out: l.d_out,
                alpha: ALPHA as f32,
                scale: m.scale,
            },
        );
    }
    Ok(Adapter {
        dir: None,
        name: name.into(),
        config,
        layers,
    })
}

pub fn run_upstream(args: UpstreamArgs) -> Result<()> {
    let started = Instant::now();
    code_version();
    let specs = tasks::upstream_tasks();
    let todo: Vec<&TaskSpec> = specs
        .iter()
        .filter(|s| !args.out.join(&s.name).join("adapter_model.safetensors").exists())
        .collect();
    let mut accs = serde_json::Map::new();
    if !todo.is_empty() {
        let mut base = load_base(&args.base)?;
        base.to_device(&args.device.select()?)?;
        let mnist = data::load_mnist_json(&data::assets_dir().join("mnist"))?;
        let [up_train, up_test, _, _] = tasks::mnist_split(mnist.len());
        std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
        let pb = progress(todo.len() * args.steps, "upstream");
        for (i, spec) in specs.iter().enumerate() {
            if !todo.contains(&spec) {
                continue;
            }
            pb.set_message(spec.name.clone());
            let train = tasks::task_images(&mnist, &up_train, spec, usize::MAX);
            let test = tasks::task_images(&mnist, &up_test, spec, usize::MAX);
            let mut model = base.clone();
            let seed = args.seed + i as u64;
            new_head(&mut model, spec.classes.len(), seed)?;
            model.attach_lora(&TARGETS, RANK, ALPHA, seed)?;
            let loss = train_minibatch(
                &mut model,
                &train,
                Trainable::LORA_HEAD,
                args.steps,
                args.batch,
                args.lr,
                0.0,
                seed,
                Some(&pb),
            )?;
            let acc = accuracy(&model, &test)?;
            say(
                &pb,
                format!(
                    "{:<24} own-task test accuracy {acc:.4} (train loss {loss:.3})",
                    spec.name
                ),
            );
            let info = serde_json::json!({"task": spec, "test_accuracy": acc, "train_images": train.len(),
                "test_images": test.len(), "steps": args.steps, "seed": seed});
            let adapter = to_adapter(&model, &spec.name, info)?;
            crate::merge::write_adapter_atomic(&args.out.join(&spec.name), &adapter, StoreDtype::F32)?;
            accs.insert(spec.name.clone(), acc.into());
        }
        pb.finish();
    }
    for spec in &specs {
        if !accs.contains_key(&spec.name) {
            let a = Adapter::load(args.out.join(&spec.name))?;
            let acc = a
                .config
                .raw
                .get("lora_compose")
                .and_then(|v| v.get("test_accuracy"))
                .cloned();
            eprintln!(
                "{:<24} own-task test accuracy {} (saved)",
                spec.name,
                acc.unwrap_or_default()
            );
        }
    }
    log_run(
        &args.log_dir,
        "upstream",
        &args,
        started,
        serde_json::Value::Object(accs),
    )
}

/// The library in `dir` (upstream order) as the model's per-layer module lists.
pub fn load_library(dir: &Path) -> Result<(Vec<String>, Library)> {
    let names: Vec<String> = tasks::upstream_tasks().into_iter().map(|s| s.name).collect();
    let dirs: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    if let Some(d) = dirs.iter().find(|d| !d.exists()) {
        return Err(Error::File {
            path: d.clone(),
            msg: "missing upstream module; run `lora-compose upstream` or restore data/ from git".into(),
        });
    }
    let lib = crate::peft::Library::load(&dirs)?;
    Ok((names, model_library(&lib)))
}

/// `views` and `meta` as one gzip-compressed safetensors file at `path`, written atomically
/// (the downstream bundles, vision and text).
pub(crate) fn write_safetensors_gz(
    path: &Path,
    views: Vec<(String, safetensors::tensor::TensorView<'_>)>,
    meta: std::collections::HashMap<String, String>,
) -> Result<()> {
    use std::io::Write;
    let raw = crate::peft::serialize_sorted(path, views, Some(meta))?;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&raw).map_err(|e| Error::io(path, e))?;
    let bytes = gz.finish().map_err(|e| Error::io(path, e))?;
    write_atomic(path, &bytes)
}

/// The adapters of `lib` as the model's per-layer module lists (one module per adapter, in the
/// library's order).
pub(crate) fn model_library(lib: &crate::peft::Library) -> Library {
    let mut out = Library::new();
    for path in lib.layer_paths() {
        let mods = lib
            .adapters
            .iter()
            .map(|a| {
                let l = &a.layers[path];
                LoraModule {
                    a: l.a.clone(),
                    b: l.b.clone(),
                    scale: l.scale,
                }
            })
            .collect();
        out.insert(path.to_string(), mods);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// prepare

#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PrepareArgs {
    #[arg(long, default_value = "data/downstream.safetensors.gz")]
    pub out: PathBuf,
}

pub fn run_prepare(args: PrepareArgs) -> Result<()> {
    let src = data::Sources::load(&data::assets_dir())?;
    let tasks = tasks::build_downstream(&src);
    for t in &tasks {
        eprintln!(
            "{:<20} {:<16} pool {:>4} test {:>4}",
            t.spec.name,
            t.spec.kind.name(),
            t.pool.len(),
            t.test.len()
        );
    }
    tasks::save_bundle(&args.out, &tasks)
}

pub use adapt::{run_adapt, AdaptArgs};
pub use methods::{run_default, run_fewshot, DefaultArgs, FewshotArgs};
pub use report::{run_report, ReportArgs};

#[cfg(test)]
mod tests {
    use super::*;

    /// An existing checkpoint that does not load is reported by name and left as it is (never
    /// retrained over); one that loads is kept.
    #[test]
    fn pretrain_refuses_a_corrupt_checkpoint_and_keeps_a_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("base.safetensors");
        let args = PretrainArgs {
            out: out.clone(),
            steps: 1,
            batch: 2,
            lr: 1e-3,
            seed: 0,
            log_dir: dir.path().join("logs"),
            device: DeviceArg::CPU,
        };
        std::fs::write(&out, b"not a checkpoint").unwrap();
        let err = run_pretrain(args.clone()).unwrap_err().to_string();
        assert!(err.contains("base.safetensors"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"not a checkpoint");
        let model = Model::<f32>::init(vit_config(10), 3).unwrap();
        checkpoint::save(&model, &out, checkpoint::Parts::ALL).unwrap();
        let before = std::fs::read(&out).unwrap();
        run_pretrain(args).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), before);
        assert_eq!(load_base(&out).unwrap(), model);
    }
}
