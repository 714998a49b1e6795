//! Training pieces: cross-entropy, AdamW with decoupled weight decay, warm-up + cosine
//! schedule, global-norm clipping, seeded data order, batched evaluation.
//!
//! Determinism: every reduction here runs in a fixed order, and the model's forward and
//! backward do too (row-parallel work is independent per row; column sums use fixed chunks), so
//! one seed gives bit-identical runs on one machine.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::pass::Grads;
use super::resident::on_device;
use super::{Batch, Kind, Model, Real, Trainable};
use crate::kernels::optim::AdamParams;
use crate::{Error, Result};

/// Every label is a class index below `n_labels`.
fn check_labels(labels: &[usize], n_labels: usize) -> Result<()> {
    match labels.iter().enumerate().find(|(_, &y)| y >= n_labels) {
        Some((i, &y)) => Err(Error::Arg(format!("label {y} of example {i} is not below {n_labels}"))),
        None => Ok(()),
    }
}

/// Mean cross-entropy over the batch of `logits` (B, L) against `labels` (B); returns the loss
/// and `∂loss/∂logits = (softmax − onehot) / B`.
pub fn cross_entropy<T: Real>(logits: &[T], labels: &[usize], n_labels: usize) -> Result<(f64, Vec<T>)> {
    if n_labels == 0 || logits.len() != labels.len() * n_labels {
        return Err(Error::Shape(format!(
            "{} logits for {} labels of {n_labels} classes",
            logits.len(),
            labels.len()
        )));
    }
    check_labels(labels, n_labels)?;
    let b = labels.len() as f64;
    let mut loss = 0.0;
    let mut grad = vec![T::zero(); logits.len()];
    for ((row, g), &y) in logits.chunks(n_labels).zip(grad.chunks_mut(n_labels)).zip(labels) {
        let row: Vec<f64> = row.iter().map(|&x| x.into()).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        loss += -(row[y] - m - z.ln());
        for (j, (g, x)) in g.iter_mut().zip(&row).enumerate() {
            let p = (x - m).exp() / z;
            *g = T::of((p - (j == y) as u8 as f64) / b);
        }
    }
    Ok((loss / b, grad))
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to `floor` at `total`.
pub fn lr_at(step: usize, total: usize, warmup: usize, peak: f64, floor: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Scales every gradient so the global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm<T: Real>(grads: &mut Grads<T>, max_norm: f64) -> f64 {
    let norm = grads.norm();
    if norm > max_norm && norm > 0.0 {
        let s = T::of(max_norm / norm);
        for v in grads.map.values_mut() {
            v.iter_mut().for_each(|x| *x *= s);
        }
    }
    norm
}

/// AdamW (Loshchilov & Hutter): Adam moments, bias correction, and weight decay applied to the
/// weights directly (`θ ← θ − lr·λ·θ`), not through the gradient. Decay applies to matrices and
/// embeddings (2-D parameters), never to biases, norms or composition values.
#[derive(Clone, Debug)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    step: u64,
    /// first and second moments by parameter name, in f64 (on the CPU; a model on a kernel
    /// device keeps its moments there, tagged with `id`)
    moments: BTreeMap<String, (Vec<f64>, Vec<f64>)>,
    /// Tells the device which optimizer its moments belong to: a new optimizer starts from zero.
    id: u64,
}

static OPTIMIZERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl AdamW {
    pub fn new(weight_decay: f64) -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            moments: BTreeMap::new(),
            id: OPTIMIZERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update of every parameter that has a gradient, on the host copy (a model on a kernel
    /// device is brought back to the host first and re-uploaded after; [`train_step`] updates a
    /// device model on the device instead).
    pub fn step<T: Real>(&mut self, model: &mut Model<T>, grads: &Grads<T>, lr: f64) -> Result<()> {
        model.sync_host()?;
        self.step_host(model, grads, lr)?;
        if !model.device().is_cpu() {
            model.sync_device()?;
        }
        Ok(())
    }

    fn step_host<T: Real>(&mut self, model: &mut Model<T>, grads: &Grads<T>, lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.step as i32), 1.0 - b2.powi(self.step as i32));
        for p in model.params_mut() {
            let Some(g) = grads.get(&p.name) else { continue };
            if g.len() != p.data.len() {
                return Err(Error::Shape(format!(
                    "gradient of `{}` has {} elements, the parameter {}",
                    p.name,
                    g.len(),
                    p.data.len()
                )));
            }
            let (m, v) = self
                .moments
                .entry(p.name.clone())
                .or_insert_with(|| (vec![0.0; g.len()], vec![0.0; g.len()]));
            let decay = if p.shape.len() >= 2 && matches!(p.kind, Kind::Base | Kind::Head | Kind::LoraA | Kind::LoraB) {
                self.weight_decay
            } else {
                0.0
            };
            for (((w, &g), m), v) in p.data.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                let g: f64 = g.into();
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                let mut x: f64 = (*w).into();
                x -= lr * decay * x;
                x -= lr * (*m / c1) / ((*v / c2).sqrt() + self.eps);
                *w = T::of(x);
            }
        }
        Ok(())
    }
}

/// The example order of one epoch: a permutation of 0..n from (seed, epoch) alone.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    idx.shuffle(&mut rng);
    idx
}

/// What a training step reports.
#[derive(Clone, Copy, Debug)]
pub struct StepStats {
    pub loss: f64,
    /// global gradient norm before clipping
    pub grad_norm: f64,
}

/// Forward, cross-entropy, backward of what `trainable` selects, optional clipping, AdamW.
/// On the CPU a large batch runs as data-parallel parts ([`data_parts`]: forward and backward
/// of each part on the thread pool, gradients weighted by share and summed in order) — the
/// whole batch's step up to rounding, and the same on every machine.
pub fn train_step<T: Real>(
    model: &mut Model<T>,
    opt: &mut AdamW,
    batch: &Batch,
    labels: &[usize],
    trainable: Trainable,
    lr: f64,
    clip: Option<f64>,
) -> Result<StepStats> {
    if !model.device().is_cpu() {
        return device_train_step(model, opt, batch, labels, trainable, lr, clip);
    }
    let p = data_parts(batch.batch, batch.check(&model.config)?);
    let (loss, mut grads) = if labels.len() != batch.batch || p == 1 {
        let (logits, tape) = model.forward(batch)?;
        let (loss, dlogits) = cross_entropy(&logits, labels, model.config.num_labels)?;
        (loss, model.backward(&tape, &dlogits, trainable)?)
    } else {
        let b = batch.batch;
        let ranges: Vec<_> = (0..p).map(|i| i * b / p..(i + 1) * b / p).collect();
        let batches: Vec<Batch> = ranges.iter().map(|r| batch.rows(r.clone())).collect();
        let parts: Vec<(&Batch, &[usize])> = batches
            .iter()
            .zip(&ranges)
            .map(|(x, r)| (x, &labels[r.clone()]))
            .collect();
        parts_loss_grads(model, &parts, b, trainable)?
    };
    let grad_norm = match clip {
        Some(c) => clip_grad_norm(&mut grads, c),
        None => grads.norm(),
    };
    opt.step_host(model, &grads, lr)?;
    Ok(StepStats { loss, grad_norm })
}

/// Examples a data-parallel part of a CPU training step holds at least, and token rows.
const PART_EXAMPLES: usize = 32;
const PART_TOKENS: usize = 1024;

/// How many data-parallel parts [`train_step`] cuts a CPU batch into: as many as keep
/// [`PART_EXAMPLES`] examples and [`PART_TOKENS`] token rows each, at most 8. A function of the
/// batch's shape alone, never of the thread count, so a seed trains the same on any machine's
/// pool (the parts' gradients are summed in order).
fn data_parts(examples: usize, tokens_each: usize) -> usize {
    (examples / PART_EXAMPLES)
        .min(examples * tokens_each / PART_TOKENS)
        .clamp(1, 8)
}

/// The mean cross-entropy over `n` examples given as `parts` and its gradient: each part's
/// forward and backward in parallel (rayon; the parts are independent, the model is shared),
/// its gradient weighted by its share of the examples, summed in part order.
fn parts_loss_grads<T: Real>(
    model: &Model<T>,
    parts: &[(&Batch, &[usize])],
    n: usize,
    trainable: Trainable,
) -> Result<(f64, Grads<T>)> {
    use rayon::prelude::*;
    let results = parts
        .par_iter()
        .map(|(batch, labels)| -> Result<(f64, Grads<T>)> {
            let w = labels.len() as f64 / n as f64;
            let (logits, tape) = model.forward(batch)?;
            let (part_loss, mut dlogits) = cross_entropy(&logits, labels, model.config.num_labels)?;
            let s = T::of(w);
            dlogits.iter_mut().for_each(|g| *g *= s);
            let grads = model.backward(&tape, &dlogits, trainable)?;
            Ok((part_loss * w, grads))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut loss = 0.0;
    let mut grads = Grads::default();
    for (part_loss, part) in results {
        loss += part_loss;
        for (name, g) in part.map {
            grads.add(&name, g);
        }
    }
    Ok((loss, grads))
}

/// [`train_step`] on one batch given in parts (grouped by length so that little is padded, say):
/// the loss is the mean over every part's examples, each part's gradient weighted by its share
/// of them and summed, then one clipping and one AdamW step — the step of the whole batch, up
/// to rounding. One part is exactly [`train_step`]; several run on the CPU only, in parallel.
pub fn train_step_parts<T: Real>(
    model: &mut Model<T>,
    opt: &mut AdamW,
    parts: &[(Batch, Vec<usize>)],
    trainable: Trainable,
    lr: f64,
    clip: Option<f64>,
) -> Result<StepStats> {
    match parts {
        [] => return Err(Error::Arg("a training step needs examples".into())),
        [(batch, labels)] => return train_step(model, opt, batch, labels, trainable, lr, clip),
        _ => {}
    }
    if !model.device().is_cpu() {
        return Err(Error::Arg(
            "a batch in parts trains on the CPU; on a kernel device give it whole".into(),
        ));
    }
    let n: usize = parts.iter().map(|(_, y)| y.len()).sum();
    let parts: Vec<(&Batch, &[usize])> = parts.iter().map(|(b, y)| (b, &y[..])).collect();
    let (loss, mut grads) = parts_loss_grads(model, &parts, n, trainable)?;
    let grad_norm = match clip {
        Some(c) => clip_grad_norm(&mut grads, c),
        None => grads.norm(),
    };
    opt.step_host(model, &grads, lr)?;
    Ok(StepStats { loss, grad_norm })
}

/// [`train_step`] on a kernel device: the batch and labels go up, every op runs there, and the
/// loss, the gradient norm and the clipping scale come down in one copy.
fn device_train_step<T: Real>(
    model: &mut Model<T>,
    opt: &mut AdamW,
    batch: &Batch,
    labels: &[usize],
    trainable: Trainable,
    lr: f64,
    clip: Option<f64>,
) -> Result<StepStats> {
    let t = batch.check(&model.config)?;
    if labels.len() != batch.batch {
        return Err(Error::Shape(format!(
            "{} labels for a batch of {}",
            labels.len(),
            batch.batch
        )));
    }
    check_labels(labels, model.config.num_labels)?;
    let plan = model.backward_plan(trainable);
    opt.step += 1;
    let hp = AdamParams {
        lr,
        beta1: opt.beta1,
        beta2: opt.beta2,
        eps: opt.eps,
        weight_decay: opt.weight_decay,
        step: opt.step,
    };
    let key = (trainable.base, trainable.head, trainable.lora, trainable.coeffs);
    let model_ref: &Model<T> = model;
    let stats = model_ref
        .resident
        .with(model_ref, |st| {
            on_device!(st, |be, dm| {
                dm.forward(be, batch, t, None)?;
                dm.loss(be, labels)?;
                dm.prepare_backward(be, &batch.ids, &plan)?;
                dm.backward(be, &plan)?;
                let spans = dm.spans(model_ref, trainable);
                dm.step(be, spans, key, hp, clip, opt.id)
            })
        })?
        .expect("a kernel device");
    model
        .resident
        .host_stale
        .store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(StepStats {
        loss: f64::from(stats[0]),
        grad_norm: f64::from(stats[1]),
    })
}

/// Accuracy and mean cross-entropy over examples, `batch_size` at a time; `make_batch` builds
/// the batch of the given example indices.
pub fn evaluate<T: Real>(
    model: &Model<T>,
    labels: &[usize],
    batch_size: usize,
    make_batch: impl Fn(&[usize]) -> Result<Batch>,
) -> Result<(f64, f64)> {
    if labels.is_empty() || batch_size == 0 {
        return Err(Error::Arg("evaluation needs examples and a positive batch size".into()));
    }
    let idx: Vec<usize> = (0..labels.len()).collect();
    let (mut correct, mut loss) = (0usize, 0.0);
    let l = model.config.num_labels;
    for chunk in idx.chunks(batch_size) {
        let logits = model.logits(&make_batch(chunk)?)?;
        let ys: Vec<usize> = chunk.iter().map(|&i| labels[i]).collect();
        let (batch_loss, _) = cross_entropy(&logits, &ys, l)?;
        loss += batch_loss * chunk.len() as f64;
        for (row, &y) in logits.chunks(l).zip(&ys) {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, T::neg_infinity()),
                    |acc, (j, &x)| if x > acc.1 { (j, x) } else { acc },
                )
                .0;
            correct += (best == y) as usize;
        }
    }
    Ok((correct as f64 / labels.len() as f64, loss / labels.len() as f64))
}
