//! The model's hand-written backward against f64 central differences of its own forward, on
//! tiny BERT and ViT configurations carrying every parameter kind at once: base weights,
//! trainable LoRAs (query, intermediate.dense), compositions (key, output.dense) with per-layer
//! or global coefficients, and the head. Loss: cross-entropy of the logits.
//!
//! Error budget of a central difference in f64 with step h: truncation h²/6·|L'''| plus
//! rounding ≈ ε·|L|/h. With h = 1e-5, |L| ≈ 1 and |L'''| ≲ 1e2 on these well-conditioned tiny
//! models, both are below 2e-9; the tolerance 1e-8 + 1e-6·|g| is ~5× that estimate (measured:
//! worst error/bound ≤ 0.01, printed with --nocapture) and 10⁵ times smaller than a wrong
//! Jacobian term: dropping the attention softmax's `− rowsum(P∘∂P)` makes every case here fail
//! by errors of order 1e-1.

use lora_compose::check::{compare, Tol};
use lora_compose::compose::{Mode, Param};
use lora_compose::model::pass::Grads;
use lora_compose::model::train::cross_entropy;
use lora_compose::model::{Arch, Batch, Composition, Config, Kind, Library, LoraModule, Model, Pool, Trainable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

const H: f64 = 1e-5;
const TOL: Tol = Tol::new(1e-8, 1e-6);

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn tiny(arch: Arch, pool: Pool) -> Config {
    Config {
        arch,
        hidden: 8,
        layers: 2,
        heads: 2,
        intermediate: 12,
        max_positions: 7,
        vocab_size: 13,
        type_vocab_size: 2,
        image_size: 6,
        patch_size: 3,
        layer_norm_eps: 1e-5,
        pool,
        num_labels: 3,
    }
}

fn library(model: &Model<f64>, rng: &mut ChaCha8Rng, ranks: &[usize]) -> Library {
    let mut lib = Library::new();
    for name in model.layer_names() {
        if !(name.ends_with(".key") || name.ends_with("layer.0.output.dense") || name.ends_with("layer.1.output.dense"))
        {
            continue;
        }
        let l = model.linear(&name).unwrap();
        let mods = ranks
            .iter()
            .map(|&r| LoraModule {
                a: (0..r * l.d_in).map(|_| (normal(rng) * 0.5) as f32).collect(),
                b: (0..l.d_out * r).map(|_| (normal(rng) * 0.5) as f32).collect(),
                scale: 2.0 / r as f32,
            })
            .collect();
        lib.insert(name, mods);
    }
    lib
}

/// A tiny model with every parameter kind, all values random and O(1) so that every gradient
/// is non-trivial, plus a batch and labels.
fn setup(arch: Arch, pool: Pool, comp: Composition, seed: u64) -> (Model<f64>, Batch, Vec<usize>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = Model::<f64>::init(tiny(arch, pool), seed).unwrap();
    let ranks: &[usize] = if comp.mode == Mode::Factor {
        &[2, 2, 2]
    } else {
        &[1, 3, 2]
    };
    let lib = library(&model, &mut rng, ranks);
    model.attach_composition(&lib, comp).unwrap();
    model
        .attach_lora(&["query", "intermediate.dense"], 2, 4.0, seed)
        .unwrap();
    for p in model.params_mut() {
        let name = p.name.clone();
        let (scale, offset) = if name.contains("LayerNorm") || name.contains("layernorm") {
            (0.3, if name.ends_with("weight") { 1.0 } else { 0.0 })
        } else if p.kind == Kind::LayerCoeffs || p.kind == Kind::GlobalCoeffs {
            (0.5, 0.0)
        } else {
            (0.4, 0.0)
        };
        for x in p.data.iter_mut() {
            *x = offset + scale * normal(&mut rng);
        }
    }
    let batch = match arch {
        Arch::Bert => {
            let seqs: Vec<Vec<u32>> = [5usize, 3, 4]
                .iter()
                .map(|&n| (0..n).map(|_| rng.random_range(1..13)).collect())
                .collect();
            let mut b = Batch::tokens(&seqs).unwrap();
            for t in b.type_ids.iter_mut() {
                *t = rng.random_range(0..2);
            }
            b
        }
        Arch::Vit => {
            let px: Vec<f32> = (0..3 * 36).map(|_| rng.random_range(0.0f32..1.0)).collect();
            Batch::images(&px, 6).unwrap()
        }
    };
    (model, batch, vec![2, 0, 1])
}

fn loss(model: &Model<f64>, batch: &Batch, labels: &[usize]) -> f64 {
    let logits = model.logits(batch).unwrap();
    cross_entropy(&logits, labels, 3).unwrap().0
}

fn analytic(model: &Model<f64>, batch: &Batch, labels: &[usize], trainable: Trainable) -> Grads<f64> {
    let (logits, tape) = model.forward(batch).unwrap();
    let (_, dlogits) = cross_entropy(&logits, labels, 3).unwrap();
    model.backward(&tape, &dlogits, trainable).unwrap()
}

/// Central differences for every element of every parameter; returns (name, kind, numeric).
fn numeric(model: &Model<f64>, batch: &Batch, labels: &[usize]) -> Vec<(String, Kind, Vec<f64>)> {
    let specs: Vec<(String, Kind, usize)> = model
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.kind, p.data.len()))
        .collect();
    specs
        .iter()
        .enumerate()
        .map(|(pi, (name, kind, len))| {
            let fd = (0..*len)
                .into_par_iter()
                .map(|e| {
                    let at = |delta: f64| {
                        let mut m = model.clone();
                        m.params_mut()[pi].data[e] += delta;
                        loss(&m, batch, labels)
                    };
                    (at(H) - at(-H)) / (2.0 * H)
                })
                .collect();
            (name.clone(), *kind, fd)
        })
        .collect()
}

fn check(arch: Arch, pool: Pool, comp: Composition, seed: u64) {
    let (model, batch, labels) = setup(arch, pool, comp, seed);
    let all = analytic(&model, &batch, &labels, Trainable::ALL);
    let fd = numeric(&model, &batch, &labels);
    let mut kinds_seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    let mut worst = 0.0f64;
    for (name, kind, want) in &fd {
        let got = all.get(name).unwrap_or_else(|| panic!("no gradient for `{name}`"));
        kinds_seen.insert(*kind);
        // A key bias shifts every score of a query row equally, which softmax ignores: its
        // gradient is exactly zero, and the check below holds the backward to that.
        if !name.ends_with("key.bias") {
            assert!(
                want.iter().any(|&x| x.abs() > 1e-6),
                "`{name}`: numeric gradient is all ~0, test is vacuous"
            );
        }
        for (g, w) in got.iter().zip(want) {
            worst = worst.max((g - w).abs() / (TOL.atol + TOL.rtol * w.abs()));
        }
        if let Err(e) = compare(name, got, want, TOL) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{arch:?} {comp:?}:\n{}", failures.join("\n"));
    let n: usize = fd.iter().map(|f| f.2.len()).sum();
    eprintln!("{arch:?} {comp:?}: {n} elements, worst error / bound = {worst:.3}");
    let coeff_kind = if comp.global {
        Kind::GlobalCoeffs
    } else {
        Kind::LayerCoeffs
    };
    for k in [Kind::Base, Kind::Head, Kind::LoraA, Kind::LoraB, coeff_kind] {
        assert!(kinds_seen.contains(&k), "{k:?} not covered");
    }
    assert_eq!(all.map.len(), fd.len(), "gradients for parameters that do not exist");

    // Each selector returns exactly its kinds, with the same values as the full backward.
    for tr in [Trainable::HEAD, Trainable::LORA_HEAD, Trainable::COEFFS_HEAD] {
        let part = analytic(&model, &batch, &labels, tr);
        for (name, kind, _) in &fd {
            match part.get(name) {
                Some(g) => {
                    assert!(tr.trains(*kind), "{tr:?} returned a gradient for frozen `{name}`");
                    compare(name, g, all.get(name).unwrap(), Tol::new(1e-14, 1e-12)).unwrap();
                }
                None => assert!(!tr.trains(*kind), "{tr:?} gave no gradient for `{name}`"),
            }
        }
    }
}

#[test]
fn bert_mean_pool_per_layer_softmax_product() {
    let comp = Composition {
        mode: Mode::Product,
        param: Param::Softmax,
        global: false,
    };
    check(Arch::Bert, Pool::Mean, comp, 1);
}

#[test]
fn bert_cls_pool_global_raw_factor() {
    let comp = Composition {
        mode: Mode::Factor,
        param: Param::Raw,
        global: true,
    };
    check(Arch::Bert, Pool::Cls, comp, 2);
}

#[test]
fn vit_cls_pool_per_layer_raw_product() {
    let comp = Composition {
        mode: Mode::Product,
        param: Param::Raw,
        global: false,
    };
    check(Arch::Vit, Pool::Cls, comp, 3);
}

#[test]
fn vit_mean_pool_global_softmax_product() {
    let comp = Composition {
        mode: Mode::Product,
        param: Param::Softmax,
        global: true,
    };
    check(Arch::Vit, Pool::Mean, comp, 4);
}
