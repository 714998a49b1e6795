//! Training pieces and the f32 fast path: f32 vs f64 model, cross-entropy gradient, schedule,
//! clipping, AdamW, bit-identical seeded runs, checkpoints, and that a tiny model learns.

mod model_common;

use lora_compose::check::{compare, Tol};
use lora_compose::compose::{Mode, Param};
use lora_compose::model::checkpoint::{self, Parts};
use lora_compose::model::train::{
    clip_grad_norm, cross_entropy, epoch_order, evaluate, lr_at, train_step, train_step_parts, AdamW,
};
use lora_compose::model::{Adapter, Arch, Batch, Composition, Library, Model, Trainable};
use model_common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn library(model: &Model<f32>, targets: &[&str], n: usize, rank: usize, seed: u64) -> Library {
    model.random_library(targets, n, rank, 0.3, seed).unwrap()
}

/// The composition of [`composed_model`].
const COMPOSITION: Composition = Composition {
    mode: Mode::Product,
    param: Param::Softmax,
    global: false,
};

fn composed_model(seed: u64) -> Model<f32> {
    let mut m = Model::<f32>::init(vit(16, 4), seed).unwrap();
    let lib = library(&m, &["query", "value"], 4, 2, seed);
    m.attach_composition(&lib, COMPOSITION).unwrap();
    m.attach_lora(&["intermediate.dense"], 2, 4.0, seed).unwrap();
    m
}

/// The f32 model (fused fast path, f32 element-wise ops) against the same model in f64 (the
/// reference composed layer), forward and every gradient. f32 rounding (u = 6e-8) through ~40
/// dependent operations and sums of ≤ 200 terms gives relative errors of order 1e-5 of each
/// tensor's scale; the bound 1e-4·max|g| + 1e-3·|g| is 10× above that and far below the O(1)
/// errors of a wrong term.
#[test]
fn f32_fast_path_matches_f64_reference_path() {
    for arch in [Arch::Vit, Arch::Bert] {
        let cfg = match arch {
            Arch::Vit => vit(16, 4),
            Arch::Bert => bert(),
        };
        let mut m32 = Model::<f32>::init(cfg, 5).unwrap();
        let lib = library(&m32, &["key", "attention.output.dense"], 3, 2, 5);
        m32.attach_composition(
            &lib,
            Composition {
                mode: Mode::Factor,
                param: Param::Softmax,
                global: false,
            },
        )
        .unwrap();
        m32.attach_lora(&["query", "intermediate.dense"], 2, 4.0, 5).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for p in m32.params_mut() {
            for x in p.data.iter_mut() {
                *x += rng.random_range(-0.2f32..0.2);
            }
        }
        let batch = six_inputs(arch, &mut rng);
        let labels = [0, 1, 2, 3, 0, 1];
        let m64: Model<f64> = m32.cast();
        let (l32, t32) = m32.forward(&batch).unwrap();
        let (l64, t64) = m64.forward(&batch).unwrap();
        compare("logits", &l32, &l64, Tol::new(1e-4, 1e-3)).unwrap();
        let (_, d32) = cross_entropy(&l32, &labels, 4).unwrap();
        let (_, d64) = cross_entropy(&l64, &labels, 4).unwrap();
        let g32 = m32.backward(&t32, &d32, Trainable::ALL).unwrap();
        let g64 = m64.backward(&t64, &d64, Trainable::ALL).unwrap();
        compare_grads(&g32, &g64, &format!("{arch:?}"));
    }
}

#[test]
fn cross_entropy_gradient_is_softmax_minus_onehot() {
    let logits = [1.0f64, -2.0, 0.5, 3.0, 3.0, -1.0];
    let labels = [2, 0];
    let (loss, g) = cross_entropy(&logits, &labels, 3).unwrap();
    let h = 1e-6;
    for i in 0..logits.len() {
        let (mut p, mut m) = (logits, logits);
        p[i] += h;
        m[i] -= h;
        let fd = (cross_entropy(&p, &labels, 3).unwrap().0 - cross_entropy(&m, &labels, 3).unwrap().0) / (2.0 * h);
        assert!((fd - g[i]).abs() < 1e-8, "{i}: {fd} vs {}", g[i]);
    }
    assert!(loss > 0.0);
    assert!(cross_entropy(&logits, &[3, 0], 3).is_err());
}

#[test]
fn schedule_clipping_and_data_order() {
    assert!((lr_at(0, 100, 10, 1.0, 0.0) - 0.1).abs() < 1e-12);
    assert!((lr_at(9, 100, 10, 1.0, 0.0) - 1.0).abs() < 1e-12);
    assert!((lr_at(55, 100, 10, 1.0, 0.0) - 0.5).abs() < 1e-12);
    assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    let mut g = lora_compose::model::pass::Grads::<f32>::default();
    g.add("a", vec![3.0, 0.0]);
    g.add("b", vec![4.0]);
    assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-6);
    assert!((g.norm() - 1.0).abs() < 1e-6);
    let o = epoch_order(10, 3, 0);
    let mut sorted = o.clone();
    sorted.sort();
    assert_eq!(sorted, (0..10).collect::<Vec<_>>());
    assert_eq!(o, epoch_order(10, 3, 0));
    assert_ne!(o, epoch_order(10, 3, 1));
}

/// AdamW's first step moves each weight by lr·sign(g) (bias-corrected moments), plus the
/// decoupled decay lr·λ·w on matrices only.
#[test]
fn adamw_first_step() {
    let mut m = Model::<f64>::init(vit(8, 2), 1).unwrap();
    let before = m.clone();
    let (px, labels) = images(4, 2);
    let batch = Batch::images(&px, 12).unwrap();
    let (logits, tape) = m.forward(&batch).unwrap();
    let (_, dl) = cross_entropy(&logits, &labels.iter().map(|&y| y % 2).collect::<Vec<_>>(), 2).unwrap();
    let grads = m.backward(&tape, &dl, Trainable::HEAD).unwrap();
    let mut opt = AdamW::new(0.1);
    opt.step(&mut m, &grads, 0.01).unwrap();
    let (w0, w1, g) = (&before.head.w, &m.head.w, grads.get("classifier.weight").unwrap());
    for i in 0..w0.len() {
        let want = w0[i] - 0.01 * 0.1 * w0[i] - 0.01 * g[i] / (g[i].abs() + 1e-8);
        assert!((w1[i] - want).abs() < 1e-9, "{i}");
    }
    let (b0, b1) = (&before.head.b, &m.head.b);
    let gb = grads.get("classifier.bias").unwrap();
    for i in 0..b0.len() {
        assert!((b1[i] - (b0[i] - 0.01 * gb[i] / (gb[i].abs() + 1e-8))).abs() < 1e-9);
    }
    assert_eq!(m.blocks, before.blocks, "frozen blocks changed");
}

/// A batch trained in parts (texts grouped by length) takes the step of the whole padded batch:
/// f64 BERT with a composition, a LoRA and the base all training, six texts of 1–16 tokens cut
/// into parts of 3, 1 and 2 (their weights 3/6, 1/6, 2/6 matter: the mean loss of each part
/// counted alike gives another gradient). Loss, gradient norm and every parameter after one
/// AdamW step agree to 1e-10 (f64 rounding of a sum split differently is ~1e-15 of the scale;
/// AdamW's first step divides by |g| + 1e-8, so a 1e-16 difference of a zero gradient moves a
/// weight by at most lr·1e-8).
#[test]
fn a_batch_in_parts_takes_the_whole_batch_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut m = Model::<f64>::init(bert(), 21).unwrap();
    let lib = m.random_library(&["query", "value"], 3, 2, 0.3, 21).unwrap();
    m.attach_composition(&lib, COMPOSITION).unwrap();
    m.attach_lora(&["intermediate.dense"], 2, 4.0, 21).unwrap();
    let seqs: Vec<Vec<u32>> = [9usize, 4, 16, 1, 7, 12]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..50)).collect())
        .collect();
    let labels = [0usize, 3, 1, 2, 2, 0];
    let whole = Batch::tokens(&seqs).unwrap();
    let parts: Vec<(Batch, Vec<usize>)> = [vec![2usize, 5, 0], vec![3], vec![1, 4]]
        .iter()
        .map(|p| {
            let s: Vec<&[u32]> = p.iter().map(|&i| seqs[i].as_slice()).collect();
            (Batch::tokens(&s).unwrap(), p.iter().map(|&i| labels[i]).collect())
        })
        .collect();
    let (mut a, mut b) = (m.clone(), m);
    let (mut oa, mut ob) = (AdamW::new(0.01), AdamW::new(0.01));
    let sa = train_step(&mut a, &mut oa, &whole, &labels, Trainable::ALL, 1e-3, None).unwrap();
    let sb = train_step_parts(&mut b, &mut ob, &parts, Trainable::ALL, 1e-3, None).unwrap();
    assert!((sa.loss - sb.loss).abs() < 1e-10, "loss {} vs {}", sa.loss, sb.loss);
    assert!(
        (sa.grad_norm - sb.grad_norm).abs() < 1e-10,
        "gradient norm {} vs {}",
        sa.grad_norm,
        sb.grad_norm
    );
    let pb = b.params();
    let pa = a.params();
    assert_eq!(pa.len(), pb.len());
    for (x, y) in pa.iter().zip(&pb) {
        compare(&x.name, y.data, x.data, Tol::new(1e-10, 1e-10)).unwrap();
    }
    // One part is exactly train_step.
    let mut c = a.clone();
    let mut oc = AdamW::new(0.01);
    let one = [(whole.clone(), labels.to_vec())];
    let sc = train_step_parts(&mut c, &mut oc, &one, Trainable::ALL, 1e-3, None).unwrap();
    let sa2 = train_step(&mut a, &mut oa.clone(), &whole, &labels, Trainable::ALL, 1e-3, None).unwrap();
    assert_eq!(sc.loss.to_bits(), sa2.loss.to_bits());
    assert!(train_step_parts(&mut c, &mut oc, &[], Trainable::ALL, 1e-3, None).is_err());
}

/// A batch big enough for `train_step`'s data-parallel parts (192 sequences padded to 16
/// tokens: 3 parts, run on the thread pool) takes the step of the whole batch: its loss and
/// gradient norm are those of one forward and backward over all of it (f64, 1e-10), and its
/// parameters after the step those of `train_step_parts` cutting the batch elsewhere.
#[test]
fn a_large_batch_cut_for_the_threads_takes_the_whole_batch_step() {
    let seed: u64 = rand::random();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut m = Model::<f64>::init(bert(), 22).unwrap();
    let lib = m.random_library(&["query", "value"], 3, 2, 0.3, 22).unwrap();
    m.attach_composition(&lib, COMPOSITION).unwrap();
    m.attach_lora(&["intermediate.dense"], 2, 4.0, 22).unwrap();
    let seqs: Vec<Vec<u32>> = (0..192)
        .map(|i| {
            let n = if i == 7 { 16 } else { rng.random_range(1..=16) };
            (0..n).map(|_| rng.random_range(0..50)).collect()
        })
        .collect();
    let labels: Vec<usize> = (0..192).map(|_| rng.random_range(0..4)).collect();
    let whole = Batch::tokens(&seqs).unwrap();
    let (logits, tape) = m.forward(&whole).unwrap();
    let (loss, dlogits) = cross_entropy(&logits, &labels, 4).unwrap();
    let norm = m.backward(&tape, &dlogits, Trainable::ALL).unwrap().norm();
    drop(tape);
    let (mut a, mut b) = (m.clone(), m);
    let (mut oa, mut ob) = (AdamW::new(0.01), AdamW::new(0.01));
    let sa = train_step(&mut a, &mut oa, &whole, &labels, Trainable::ALL, 1e-3, None).unwrap();
    assert!(
        (sa.loss - loss).abs() < 1e-10,
        "seed {seed}: loss {} vs {loss}",
        sa.loss
    );
    assert!(
        (sa.grad_norm - norm).abs() < 1e-10,
        "seed {seed}: gradient norm {} vs {norm}",
        sa.grad_norm
    );
    let parts: Vec<(Batch, Vec<usize>)> = [0..10, 10..150, 150..192]
        .into_iter()
        .map(|r| (whole.rows(r.clone()), labels[r].to_vec()))
        .collect();
    train_step_parts(&mut b, &mut ob, &parts, Trainable::ALL, 1e-3, None).unwrap();
    for (x, y) in a.params().iter().zip(&b.params()) {
        compare(&x.name, y.data, x.data, Tol::new(1e-10, 1e-10)).unwrap();
    }
}

fn run(seed: u64, steps: usize, trainable: Trainable) -> (Model<f32>, Vec<f64>) {
    let mut m = composed_model(seed);
    let (px, labels) = images(32, seed);
    let mut opt = AdamW::new(0.01);
    let mut losses = Vec::new();
    for step in 0..steps {
        let order = epoch_order(32, seed, step as u64);
        let idx = &order[..16];
        let bp: Vec<f32> = idx.iter().flat_map(|&i| px[i * 144..(i + 1) * 144].to_vec()).collect();
        let by: Vec<usize> = idx.iter().map(|&i| labels[i]).collect();
        let lr = lr_at(step, steps, 2, 1e-2, 1e-4);
        let s = train_step(
            &mut m,
            &mut opt,
            &Batch::images(&bp, 12).unwrap(),
            &by,
            trainable,
            lr,
            Some(1.0),
        )
        .unwrap();
        losses.push(s.loss);
    }
    (m, losses)
}

#[test]
fn same_seed_gives_bit_identical_runs() {
    let (a, la) = run(7, 4, Trainable::ALL);
    let (b, lb) = run(7, 4, Trainable::ALL);
    assert_eq!(la, lb);
    for (p, q) in a.params().iter().zip(b.params().iter()) {
        assert!(
            p.data
                .iter()
                .zip(q.data.iter())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "{}",
            p.name
        );
    }
    let (c, _) = run(8, 4, Trainable::ALL);
    assert_ne!(a.head.w, c.head.w);
}

#[test]
fn a_tiny_vit_learns_and_evaluates() {
    let (m, losses) = run(3, 80, Trainable::ALL);
    assert!(losses[79] < 0.5 * losses[0], "loss {} -> {}", losses[0], losses[79]);
    let (px, labels) = images(48, 99);
    let (acc, loss) = evaluate(&m, &labels, 20, |idx| {
        let bp: Vec<f32> = idx.iter().flat_map(|&i| px[i * 144..(i + 1) * 144].to_vec()).collect();
        Batch::images(&bp, 12)
    })
    .unwrap();
    assert!(acc > 0.8 && loss.is_finite(), "accuracy {acc}, loss {loss}");
    // Only the composition values and head move under COEFFS_HEAD.
    let (m2, _) = run(3, 3, Trainable::COEFFS_HEAD);
    let m0 = composed_model(3);
    for (p, q) in m2.params().iter().zip(m0.params().iter()) {
        let moved = p.data != q.data;
        assert_eq!(moved, Trainable::COEFFS_HEAD.trains(p.kind), "{}", p.name);
    }
}

#[test]
fn checkpoints_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (trained, _) = run(5, 3, Trainable::ALL);
    for (parts, file) in [
        (Parts::ALL, "all.safetensors"),
        (Parts::HEAD_ADAPTERS, "ha.safetensors"),
    ] {
        let path = dir.path().join(file);
        checkpoint::save(&trained, &path, parts).unwrap();
        let mut fresh = Model::<f32>::init(vit(16, 4), 5).unwrap();
        if !parts.base {
            fresh = {
                let mut m = trained.clone();
                m.detach_adapters().unwrap();
                m
            };
        }
        assert_eq!(checkpoint::load(&mut fresh, &path).unwrap(), parts);
        assert_eq!(fresh, trained, "{file}");
    }
    let mut other = Model::<f32>::init(vit(8, 4), 5).unwrap();
    let err = checkpoint::load(&mut other, &dir.path().join("all.safetensors")).unwrap_err();
    assert!(err.to_string().contains("hidden: checkpoint 16, model 8"), "{err}");
    // A trained LoRA exports as a library module that composes like the LoRA itself: a
    // one-module composition has c = softmax([v]) = 1, so the model with the exported modules in
    // place of the LoRAs holds the same f32 weights and gives the same logits. Only the order of
    // f32 sums may differ between the two layer kinds' paths: 16·ε₃₂·max|logit| (the f32 bound
    // of the composition kernels, tests/compose_kernels.rs) allows that and no real difference —
    // the LoRAs themselves move the logits by > 1000× as much (checked below).
    let lib = trained.lora_modules();
    assert_eq!(lib.len(), 2);
    let mut composed = trained.clone();
    composed.attach_composition(&lib, COMPOSITION).unwrap();
    for path in lib.keys() {
        let adapter = &composed.linear(path).unwrap().adapter;
        assert!(matches!(adapter, Adapter::Compose { .. }), "{path}: {adapter:?}");
    }
    let batch = Batch::images(&images(6, 11).0, 12).unwrap();
    let want = trained.logits(&batch).unwrap();
    let peak = want.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    let tol = Tol::new(16.0 * f64::from(f32::EPSILON) * peak, 0.0);
    compare(
        "logits, exported LoRA composed",
        &composed.logits(&batch).unwrap(),
        &want,
        tol,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let mut without = trained.clone();
    for path in lib.keys() {
        without.linear_mut(path).unwrap().detach();
    }
    without.sync_device().unwrap();
    let moved = compare(
        "",
        &without.logits(&batch).unwrap(),
        &want,
        Tol::new(1000.0 * tol.atol, 0.0),
    );
    assert!(
        moved.is_err(),
        "the LoRAs barely change the logits, so this check is weak"
    );
}
