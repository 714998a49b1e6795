//! The model on the CPU (issue 12's tiny-ViT and MiniLM targets), beside the machine's own f32
//! GEMM ceiling through the same GEMM crate. Throughput is reported as elements = FLOPs, so
//! criterion's `Gelem/s` reads as GFLOP/s.
//!
//! | target | criterion id | shape | FLOPs counted |
//! |---|---|---|---|
//! | tiny ViT training step | `vit_train_step/B128_w64_L4_H4` | `Config::vit(64, 4, 4, 10)`, batch 128 of 28×28 images (17 tokens), `Trainable::ALL`, AdamW(wd 0.01), lr 1e-3, no clipping (as `cpu-peer vit-step`) | forward + backward of the blocks with ∂W (AdamW, patch embedding and head not counted) |
//! | MiniLM sentence embeddings | `minilm_embed/128x122tok_B16` | `Encoder::embed` of 128 texts of 122 tokens, batch 16, all-MiniLM-L6-v2 from assets/minilm (as `cpu-peer embed`) | forward of the blocks per batch of 16, padded to its longest text |
//! | extra, not an issue-12 target: MiniLM composition step | `minilm_fwd_bwd_compose16/B16_T32_N16_r8` | MiniLM, batch 16 × 32 tokens, 16 rank-8 modules on query and value, coefficients + head train | forward + backward of the blocks and composed layers |
//! | GEMM ceiling | `model_gemm_ceiling_f32/1024^3` | 1024³ f32 `fast::matmul` | 2·1024³ |
//!
//! The embedding texts are built like `scripts/torch_peer.py` builds them: whole words of the
//! vocabulary (ASCII letters, longer than two), drawn by a seeded generator and appended while
//! the tokenized text stays within 122 tokens, until it has exactly 122 (`[CLS]` + 120 +
//! `[SEP]`). Without assets/minilm (`scripts/fetch-minilm.sh`) the embedding target is
//! skipped, with a message saying so, and the composition step runs on random weights of
//! MiniLM's shapes.
//!
//! `cargo bench --bench model_cpu` (`-- --quick` for a short smoke run)
//!
//! After criterion's runs, a ratio table prints per target: our median time, the ceiling
//! GEMM's GFLOP/s measured beside it (the ceiling and the target alternate, several rounds,
//! so a shared, noisy machine slows both alike), our GFLOP/s and the fraction of the ceiling.
//! `benches/compose_cpu.rs` prints its table in the same format.

use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use lora_compose::compose::{fast, Mode, Param};
use lora_compose::model::bert::{self, Encoder};
use lora_compose::model::train::{cross_entropy, train_step, AdamW};
use lora_compose::model::{Batch, Composition, Config, Model, Trainable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CEILING_N: usize = 1024;
const VIT_BATCH: usize = 128;
const EMBED_TEXTS: usize = 128;
const EMBED_TOKENS: usize = 122;
const EMBED_BATCH: usize = 16;

fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

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

fn minilm_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/minilm")
}

/// 128 texts of exactly 122 tokens, built the way `scripts/torch_peer.py` builds them.
fn make_texts(encoder: &Encoder, vocab: &Path) -> Vec<String> {
    let vocab = std::fs::read_to_string(vocab).unwrap();
    let words: Vec<&str> = vocab
        .lines()
        .map(str::trim)
        .filter(|w| w.len() > 2 && w.bytes().all(|c| c.is_ascii_alphabetic()))
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut texts = Vec::with_capacity(EMBED_TEXTS);
    while texts.len() < EMBED_TEXTS {
        let (mut text, mut n) = (String::new(), 2);
        while n < EMBED_TOKENS {
            let word = words[rng.random_range(0..words.len())];
            let cand = if text.is_empty() {
                word.to_string()
            } else {
                format!("{text} {word}")
            };
            let m = encoder.tokenizer.encode(&cand).unwrap().len();
            if m <= EMBED_TOKENS {
                (text, n) = (cand, m);
            }
        }
        texts.push(text);
    }
    texts
}

/// FLOPs of `Encoder::embed`: batches of `EMBED_BATCH` texts in length order, each padded to
/// its longest text.
fn embed_flops(encoder: &Encoder, texts: &[String]) -> f64 {
    let (ids, _) = encoder.tokenize(texts, 512).unwrap();
    let mut lens: Vec<usize> = ids.iter().map(Vec::len).collect();
    lens.sort_unstable();
    lens.chunks(EMBED_BATCH)
        .map(|c| forward_flops(&encoder.model.config, c.len(), *c.last().unwrap(), 0, 0))
        .sum()
}

/// One row of the table at the top: criterion group and id, the shape as the table names it,
/// FLOPs of one call, and the call.
struct Target<'a> {
    name: &'static str,
    group: &'static str,
    id: String,
    shape: String,
    flops: f64,
    run: Box<dyn FnMut() + 'a>,
}

// ---- ratio table: the same code and format in benches/compose_cpu.rs and benches/model_cpu.rs

fn secs_of(f: &mut dyn FnMut()) -> f64 {
    let t0 = Instant::now();
    f();
    t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// After one warm-up call of each, `rounds` alternations of three ceiling GEMMs and enough
/// target calls to fill `budget_s`: the medians of all the target's and all the ceiling's
/// calls, in seconds.
fn beside(rounds: usize, budget_s: f64, ceiling: &mut dyn FnMut(), target: &mut dyn FnMut()) -> (f64, f64) {
    secs_of(ceiling);
    let reps = (budget_s / secs_of(target)).clamp(1.0, 200.0) as usize;
    let (mut ours, mut ceil) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for _ in 0..3 {
            ceil.push(secs_of(ceiling));
        }
        for _ in 0..reps {
            ours.push(secs_of(target));
        }
    }
    (median(ours), median(ceil))
}

fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else {
        format!("{:.3} ms", s * 1e3)
    }
}

/// The ratio table of `targets`, each timed beside the ceiling GEMM (`ceiling_flops` a call).
/// `quick`: two rounds of ~0.1 s instead of three of ~0.5 s.
fn ratio_table(targets: &mut [Target<'_>], ceiling: &mut dyn FnMut(), ceiling_flops: f64, quick: bool) {
    let (rounds, budget) = if quick { (2, 0.1) } else { (3, 0.5) };
    println!("\n| target | shape | our median | GFLOP/s | GEMM ceiling {CEILING_N}³ beside it | of ceiling |");
    println!("|---|---|---|---|---|---|");
    for t in targets.iter_mut() {
        let (ours, ceil) = beside(rounds, budget, ceiling, &mut t.run);
        let (ours_rate, ceil_rate) = (t.flops / ours / 1e9, ceiling_flops / ceil / 1e9);
        println!(
            "| {} | {} | {} | {ours_rate:.1} | {ceil_rate:.1} GFLOP/s ({}) | {:.0}% |",
            t.name,
            t.shape,
            fmt_secs(ours),
            fmt_secs(ceil),
            100.0 * ours_rate / ceil_rate
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) criterion runs each
    // bench once as a test and the ratio table is skipped.
    let bench_mode = args.iter().any(|a| a == "--bench");
    let quick = args.iter().any(|a| a == "--quick");

    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (a, b) = (
        rand_vec(&mut rng, CEILING_N * CEILING_N),
        rand_vec(&mut rng, CEILING_N * CEILING_N),
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

    // Tiny ViT training step, exactly `cpu-peer vit-step`.
    let mut vit = Model::<f32>::init(Config::vit(64, 4, 4, 10), 0).unwrap();
    let mut vit_rng = ChaCha8Rng::seed_from_u64(3);
    let px: Vec<f32> = (0..VIT_BATCH * 784)
        .map(|_| vit_rng.random_range(0.0f32..1.0))
        .collect();
    let vit_batch = Batch::images(&px, 28).unwrap();
    let vit_labels: Vec<usize> = (0..VIT_BATCH).map(|i| i % 10).collect();
    let vt = vit.config.n_patches() + 1;
    let vit_flops =
        forward_flops(&vit.config, VIT_BATCH, vt, 0, 0) + backward_flops(&vit.config, VIT_BATCH, vt, 0, 0, true);
    let mut opt = AdamW::new(0.01);
    // MiniLM sentence embeddings, as `cpu-peer embed`.
    let dir = minilm_dir();
    let encoder = if dir.join("model.safetensors").exists() && dir.join("vocab.txt").exists() {
        Some(Encoder::load(&dir).unwrap())
    } else {
        println!(
            "SKIPPED: MiniLM sentence embeddings (target minilm_embed): {} absent; run scripts/fetch-minilm.sh",
            dir.display()
        );
        None
    };
    let texts = encoder.as_ref().map(|e| make_texts(e, &dir.join("vocab.txt")));
    // Extra, not an issue-12 target: MiniLM forward + backward with 16 rank-8 modules on query
    // and value, coefficients + head train (the experiment's composition step).
    let mut minilm = if encoder.is_some() {
        bert::load_bert(&dir, 2, 0).unwrap()
    } else {
        eprintln!("assets/minilm absent: the composition step runs on random weights of MiniLM's shapes");
        Model::init(Config::minilm(2), 0).unwrap()
    };
    let (bsz, t) = (16, 32);
    let seqs: Vec<Vec<u32>> = (0..bsz)
        .map(|_| (0..t).map(|_| rng.random_range(1000..30000)).collect())
        .collect();
    let batch = Batch::tokens(&seqs).unwrap();
    let lib = minilm.random_library(&["query", "value"], 16, 8, 0.05, 1).unwrap();
    let comp = Composition {
        mode: Mode::Product,
        param: Param::Softmax,
        global: false,
    };
    minilm.attach_composition(&lib, comp).unwrap();
    let labels: Vec<usize> = (0..bsz).map(|i| i % 2).collect();
    let composed = 2 * minilm.config.layers;
    let flops = forward_flops(&minilm.config, bsz, t, 128, composed)
        + backward_flops(&minilm.config, bsz, t, 128, composed, false);
    let minilm = &minilm;
    let mut targets = vec![Target {
        name: "tiny ViT training step",
        group: "vit_train_step",
        id: "B128_w64_L4_H4".into(),
        shape: format!("width 64, 4 layers, 4 heads, batch {VIT_BATCH} of 28×28 ({vt} tokens), all train, AdamW"),
        flops: vit_flops,
        run: Box::new(|| {
            train_step(&mut vit, &mut opt, &vit_batch, &vit_labels, Trainable::ALL, 1e-3, None).unwrap();
        }),
    }];

    if let (Some(encoder), Some(texts)) = (&encoder, &texts) {
        targets.push(Target {
            name: "MiniLM sentence embeddings",
            group: "minilm_embed",
            id: format!("{EMBED_TEXTS}x{EMBED_TOKENS}tok_B{EMBED_BATCH}"),
            shape: format!("`Encoder::embed`, {EMBED_TEXTS} texts of {EMBED_TOKENS} tokens, batch {EMBED_BATCH}"),
            flops: embed_flops(encoder, texts),
            run: Box::new(move || drop(encoder.embed(texts, 512, EMBED_BATCH).unwrap())),
        });
    }

    targets.push(Target {
        name: "extra (not an issue-12 target): MiniLM composition step",
        group: "minilm_fwd_bwd_compose16",
        id: "B16_T32_N16_r8".into(),
        shape: "batch 16 × 32 tokens, 16 rank-8 modules on query and value, coefficients + head train".into(),
        flops,
        run: Box::new(move || {
            let (logits, tape) = minilm.forward(&batch).unwrap();
            let (_, dl) = cross_entropy(&logits, &labels, 2).unwrap();
            drop(minilm.backward(&tape, &dl, Trainable::COEFFS_HEAD).unwrap());
        }),
    });

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group("model_gemm_ceiling_f32");
    g.throughput(Throughput::Elements(ceiling_flops as u64));
    g.bench_function(BenchmarkId::from_parameter(format!("{CEILING_N}^3")), |bch| {
        bch.iter(&mut ceiling)
    });
    g.finish();
    for t in targets.iter_mut() {
        let mut g = c.benchmark_group(t.group);
        g.throughput(Throughput::Elements(t.flops as u64));
        g.bench_function(BenchmarkId::from_parameter(&t.id), |bch| bch.iter(&mut t.run));
        g.finish();
    }
    c.final_summary();

    if bench_mode {
        ratio_table(&mut targets, &mut ceiling, ceiling_flops, quick);
    }
}
