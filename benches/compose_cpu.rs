//! The composed layer on the CPU fast path (issue 12's composed-layer targets), beside the
//! machine's own f32 GEMM ceiling through the same GEMM crate. Throughput is reported as
//! elements = FLOPs, so criterion's `Gelem/s` reads as GFLOP/s.
//!
//! Product mode, one shared coefficient row, f32, d_in = d_out = d, base W and bias,
//! R = N·r; the same work as `cpu-peer compose-fwd` / `compose-fwdbwd` and
//! `scripts/torch_peer.py`:
//!
//! | target | criterion id | shape (T, d, N, r) | FLOPs counted |
//! |---|---|---|---|
//! | composed layer forward | `compose_forward/T16_d768_N8_r16` | (16, 768, 8, 16) | 2Td² + 4TdR |
//! | composed layer forward + backward (∂X, ∂C) | `compose_fwd_bwd_dx_dc/T16_d768_N8_r16` | (16, 768, 8, 16) | 4Td² + 8TdR |
//! | composed layer forward | `compose_forward/T256_d768_N32_r16` | (256, 768, 32, 16) | 2Td² + 4TdR |
//! | composed layer forward + backward (∂X, ∂C) | `compose_fwd_bwd_dx_dc/T256_d768_N32_r16` | (256, 768, 32, 16) | 4Td² + 8TdR |
//! | composed layer forward | `compose_forward/T2048_d384_N64_r8` | (2048, 384, 64, 8) | 2Td² + 4TdR |
//! | composed layer forward + backward (∂X, ∂C) | `compose_fwd_bwd_dx_dc/T2048_d384_N64_r8` | (2048, 384, 64, 8) | 4Td² + 8TdR |
//! | GEMM ceiling | `gemm_ceiling_f32/1024^3` | 1024³ f32 `fast::matmul` | 2·1024³ |
//!
//! `cargo bench --bench compose_cpu` (`-- --quick` for a short smoke run)
//!
//! After criterion's runs, a ratio table prints per target: our median time, the ceiling
//! GEMM's GFLOP/s measured beside it (the ceiling and the target alternate, several rounds,
//! so a shared, noisy machine slows both alike), our GFLOP/s and the fraction of the ceiling.
//! `benches/model_cpu.rs` prints its table in the same format.

use criterion::{BenchmarkId, Criterion, Throughput};
use lora_compose::compose::{fast, Mode, ModuleStack, Rows, Shape, Train};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// (T, d_in = d_out, N, r), issue 12's three shapes.
const SHAPES: [(usize, usize, usize, usize); 3] = [(16, 768, 8, 16), (256, 768, 32, 16), (2048, 384, 64, 8)];
const CEILING_N: usize = 1024;

fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// One composition call's inputs: product mode, one shared coefficient row.
struct Setup {
    shape: Shape,
    modules: ModuleStack<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    x: Vec<f32>,
    gy: Vec<f32>,
    coeffs: Vec<f32>,
    sample_of: Vec<usize>,
}

impl Setup {
    fn new(rng: &mut ChaCha8Rng, (t, d, n, r): (usize, usize, usize, usize)) -> Self {
        let mods: Vec<(Vec<f32>, Vec<f32>, f32)> = (0..n)
            .map(|_| (rand_vec(rng, r * d), rand_vec(rng, d * r), 2.0))
            .collect();
        let refs: Vec<(&[f32], &[f32], f32)> = mods.iter().map(|(a, b, s)| (&a[..], &b[..], *s)).collect();
        Setup {
            shape: Shape {
                t,
                d_in: d,
                d_out: d,
                r_total: n * r,
            },
            modules: ModuleStack::from_modules(d, d, &refs).unwrap(),
            w: rand_vec(rng, d * d),
            bias: rand_vec(rng, d),
            x: rand_vec(rng, t * d),
            gy: rand_vec(rng, t * d),
            coeffs: vec![1.0 / n as f32; n],
            sample_of: vec![0; t],
        }
    }

    fn layer(&self) -> fast::Layer<'_> {
        fast::Layer {
            w: &self.w,
            bias: Some(&self.bias),
            modules: &self.modules,
            mode: Mode::Product,
        }
    }

    fn rows(&self) -> Rows<'_> {
        Rows {
            sample_of: &self.sample_of,
            n_samples: 1,
        }
    }

    fn forward(&self) -> (Vec<f32>, fast::Cache) {
        fast::forward(&self.layer(), &self.x, &self.coeffs, self.rows()).unwrap()
    }

    /// Forward, then the backward for ∂X and ∂C only (W, b, A, B frozen).
    fn forward_backward(&self) -> fast::Grads {
        let (_, cache) = self.forward();
        let train = Train {
            input: true,
            coeffs: true,
            modules: false,
            base: false,
        };
        fast::backward(
            &self.layer(),
            &self.x,
            &cache,
            &self.coeffs,
            self.rows(),
            &self.gy,
            train,
        )
        .unwrap()
    }

    /// Forward: base GEMM, shrink, expand (2Td² + 4TdR); the backward for ∂X and ∂C adds the
    /// same again (∂X through W, H = G·B_cat, ∂U·A_cat), as `cpu-peer` counts.
    fn flops(&self, backward: bool) -> f64 {
        let Shape { t, d_in, r_total, .. } = self.shape;
        let (t, d, r) = (t as f64, d_in as f64, r_total as f64);
        let fwd = 2.0 * t * d * d + 4.0 * t * d * r;
        if backward {
            2.0 * fwd
        } else {
            fwd
        }
    }
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

fn targets(setups: &[Setup]) -> Vec<Target<'_>> {
    let mut out = Vec::new();
    for s in setups {
        let Shape { t, d_in, r_total, .. } = s.shape;
        let n = s.coeffs.len();
        let r = r_total / n;
        let id = format!("T{t}_d{d_in}_N{n}_r{r}");
        let shape = format!("(T, d, N, r) = ({t}, {d_in}, {n}, {r})");
        out.push(Target {
            name: "composed layer forward",
            group: "compose_forward",
            id: id.clone(),
            shape: shape.clone(),
            flops: s.flops(false),
            run: Box::new(move || drop(s.forward())),
        });
        out.push(Target {
            name: "composed layer forward + backward (∂X, ∂C)",
            group: "compose_fwd_bwd_dx_dc",
            id,
            shape,
            flops: s.flops(true),
            run: Box::new(move || drop(s.forward_backward())),
        });
    }
    out
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
    let setups: Vec<Setup> = SHAPES.iter().map(|&s| Setup::new(&mut rng, s)).collect();
    let mut targets = targets(&setups);

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let mut g = c.benchmark_group("gemm_ceiling_f32");
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
