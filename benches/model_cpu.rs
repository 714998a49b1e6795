//! The model on the CPU beside the machine's f32 GEMM ceiling (a 2048³ `fast::matmul`) in the
//! same run. Throughput is reported as elements = FLOPs, so criterion's `Gelem/s` reads as
//! GFLOP/s; a summary with each workload's fraction of the ceiling prints at the end.
//!
//! Workloads: MiniLM forward at batch 16 × 32 tokens (real weights when assets/minilm exists,
//! else random weights of its shapes); MiniLM forward + backward with a 16-module composition
//! (rank 8) on query and value, training coefficients + head; the tiny ViT (28×28, patch 7,
//! width 64, 4 layers, 4 heads) forward + backward at batch 64, training everything.
//!
//! `cargo bench --bench model_cpu`

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lora_compose::compose::{fast, Mode, Param};
use lora_compose::model::train::cross_entropy;
use lora_compose::model::{bert, Batch, Composition, Config, Model, Trainable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CEILING_N: usize = 2048;

/// FLOPs of one block stack's forward: linears `2·rows·(4D² + 2DF)`, attention `4·B·T²·D`,
/// composed layers `4·rows·D·R` each (shrink + expand).
fn forward_flops(c: &Config, b: usize, t: usize, composed_r: usize, composed_layers: usize) -> f64 {
    let (d, f, rows) = (c.hidden as f64, c.intermediate as f64, (b * t) as f64);
    let per_layer = 2.0 * rows * (4.0 * d * d + 2.0 * d * f) + 4.0 * b as f64 * (t * t) as f64 * d;
    c.layers as f64 * per_layer + composed_layers as f64 * 4.0 * rows * d * composed_r as f64
}

/// Backward FLOPs: ∂X of every linear (same as its forward) plus ∂W when the base trains,
/// attention backward (twice its forward), composed layers `H`, `∂U·A` (4·rows·D·R each).
fn backward_flops(c: &Config, b: usize, t: usize, composed_r: usize, composed_layers: usize, base: bool) -> f64 {
    let (d, f, rows) = (c.hidden as f64, c.intermediate as f64, (b * t) as f64);
    let lin = 2.0 * rows * (4.0 * d * d + 2.0 * d * f);
    let per_layer = lin * if base { 2.0 } else { 1.0 } + 8.0 * b as f64 * (t * t) as f64 * d;
    c.layers as f64 * per_layer + composed_layers as f64 * 4.0 * rows * d * composed_r as f64
}

fn median_secs(mut f: impl FnMut(), reps: usize) -> f64 {
    f();
    let mut v: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[reps / 2]
}

fn minilm() -> Model<f32> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/minilm");
    if dir.join("model.safetensors").exists() {
        bert::load_bert(&dir, 2, 0).unwrap()
    } else {
        eprintln!("assets/minilm absent: random weights of MiniLM's shapes");
        Model::init(Config::minilm(2), 0).unwrap()
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut summary: Vec<(String, f64, f64)> = Vec::new();

    let (a, b) = (
        (0..CEILING_N * CEILING_N)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>(),
        (0..CEILING_N * CEILING_N)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>(),
    );
    let mut out = vec![0.0f32; CEILING_N * CEILING_N];
    let ceiling_flops = 2.0 * (CEILING_N as f64).powi(3);
    let mut ceiling = || {
        fast::matmul(
            &mut out,
            fast::View::new(&a, CEILING_N, CEILING_N),
            fast::View::new(&b, CEILING_N, CEILING_N),
            false,
        )
    };
    let mut g = c.benchmark_group("model_gemm_ceiling_f32");
    g.throughput(Throughput::Elements(ceiling_flops as u64));
    g.bench_function(BenchmarkId::from_parameter(format!("{CEILING_N}^3 flop")), |bch| {
        bch.iter(&mut ceiling)
    });
    g.finish();
    summary.push((
        "gemm 2048^3 (ceiling)".into(),
        median_secs(&mut ceiling, 5),
        ceiling_flops,
    ));

    // MiniLM forward, batch 16 × 32 tokens.
    let mut model = minilm();
    let (bsz, t) = (16, 32);
    let seqs: Vec<Vec<u32>> = (0..bsz)
        .map(|_| (0..t).map(|_| rng.random_range(1000..30000)).collect())
        .collect();
    let batch = Batch::tokens(&seqs).unwrap();
    let flops = forward_flops(&model.config, bsz, t, 0, 0);
    let mut g = c.benchmark_group("minilm_forward");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function(BenchmarkId::from_parameter("B16_T32 flop"), |bch| {
        bch.iter(|| model.encode(&batch).unwrap())
    });
    g.finish();
    summary.push((
        "minilm forward B16 T32".into(),
        median_secs(|| drop(model.encode(&batch).unwrap()), 5),
        flops,
    ));

    // MiniLM forward + backward, 16 rank-8 modules on query and value, coefficients + head.
    let lib = model.random_library(&["query", "value"], 16, 8, 0.05, 1).unwrap();
    let comp = Composition {
        mode: Mode::Product,
        param: Param::Softmax,
        global: false,
    };
    model.attach_composition(&lib, comp).unwrap();
    let labels: Vec<usize> = (0..bsz).map(|i| i % 2).collect();
    let step = |m: &Model<f32>| {
        let (logits, tape) = m.forward(&batch).unwrap();
        let (_, dl) = cross_entropy(&logits, &labels, 2).unwrap();
        m.backward(&tape, &dl, Trainable::COEFFS_HEAD).unwrap()
    };
    let composed = 2 * model.config.layers;
    let flops = forward_flops(&model.config, bsz, t, 128, composed)
        + backward_flops(&model.config, bsz, t, 128, composed, false);
    let mut g = c.benchmark_group("minilm_fwd_bwd_compose16");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function(BenchmarkId::from_parameter("B16_T32_N16_r8 flop"), |bch| {
        bch.iter(|| step(&model))
    });
    g.finish();
    summary.push((
        "minilm fwd+bwd, 16 modules on q,v".into(),
        median_secs(|| drop(step(&model)), 5),
        flops,
    ));

    // Tiny ViT forward + backward, batch 64, everything trains.
    let vit = Model::<f32>::init(Config::vit(64, 4, 4, 10), 0).unwrap();
    let px: Vec<f32> = (0..64 * 784).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let vbatch = Batch::images(&px, 28).unwrap();
    let vlabels: Vec<usize> = (0..64).map(|i| i % 10).collect();
    let vstep = || {
        let (logits, tape) = vit.forward(&vbatch).unwrap();
        let (_, dl) = cross_entropy(&logits, &vlabels, 10).unwrap();
        vit.backward(&tape, &dl, Trainable::ALL).unwrap()
    };
    let vt = vit.config.n_patches() + 1;
    let flops = forward_flops(&vit.config, 64, vt, 0, 0) + backward_flops(&vit.config, 64, vt, 0, 0, true);
    let mut g = c.benchmark_group("vit_tiny_fwd_bwd");
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function(BenchmarkId::from_parameter("B64_w64_L4 flop"), |bch| bch.iter(vstep));
    g.finish();
    summary.push((
        "tiny ViT fwd+bwd B64 (all train)".into(),
        median_secs(|| drop(vstep()), 5),
        flops,
    ));

    let ceiling_gflops = summary[0].2 / summary[0].1 / 1e9;
    println!("\n{:<38} {:>10} {:>10} {:>10}", "workload", "ms", "GFLOP/s", "ceiling");
    for (name, secs, flops) in &summary {
        let gf = flops / secs / 1e9;
        println!(
            "{name:<38} {:>10.2} {gf:>10.1} {:>9.0}%",
            secs * 1e3,
            100.0 * gf / ceiling_gflops
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
