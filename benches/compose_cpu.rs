//! CPU composition forward and backward on the fused fast path, beside the machine's own f32
//! GEMM ceiling through the same GEMM crate. Throughput is reported as elements = FLOPs, so
//! criterion's `Gelem/s` reads as GFLOP/s.
//!
//! `cargo bench --bench compose_cpu`
//!
//! After criterion's runs, a ratio table: the ceiling GEMM and each composition call are timed
//! in alternation, best of several rounds each, so a shared, noisy machine slows all of them
//! alike and the ratios stay meaningful.

use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use lora_compose::compose::{fast, Mode, ModuleStack, Rows, Shape, Train};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// (T, d_in = d_out, N, r)
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

    fn backward(&self, cache: &fast::Cache) -> fast::Grads {
        fast::backward(
            &self.layer(),
            &self.x,
            cache,
            &self.coeffs,
            self.rows(),
            &self.gy,
            Train::ALL,
        )
        .unwrap()
    }
}

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);

    let mut g = c.benchmark_group("gemm_ceiling_f32");
    let (a, b) = (
        rand_vec(&mut rng, CEILING_N * CEILING_N),
        rand_vec(&mut rng, CEILING_N * CEILING_N),
    );
    let mut out = vec![0.0f32; CEILING_N * CEILING_N];
    g.throughput(Throughput::Elements(2 * (CEILING_N as u64).pow(3)));
    g.bench_function(BenchmarkId::from_parameter(format!("{CEILING_N}^3 flop")), |bch| {
        bch.iter(|| {
            fast::matmul(
                &mut out,
                fast::View::new(&a, CEILING_N, CEILING_N),
                fast::View::new(&b, CEILING_N, CEILING_N),
                false,
            )
        })
    });
    g.finish();

    for (t, d, n, r) in SHAPES {
        let setup = Setup::new(&mut rng, (t, d, n, r));
        let shape = setup.shape;
        let id = format!("T{t}_d{d}_N{n}_r{r} flop");

        let mut g = c.benchmark_group("compose_forward");
        g.throughput(Throughput::Elements(shape.forward_flops() as u64));
        g.bench_function(BenchmarkId::from_parameter(&id), |bch| bch.iter(|| setup.forward()));
        g.finish();

        let (_, cache) = setup.forward();
        let mut g = c.benchmark_group("compose_backward_all");
        g.throughput(Throughput::Elements(shape.backward_flops() as u64));
        g.bench_function(BenchmarkId::from_parameter(&id), |bch| {
            bch.iter(|| setup.backward(&cache))
        });
        g.finish();
    }
}

/// Best wall time of `f` over `reps` calls.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn ratio_table() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let (a, b) = (
        rand_vec(&mut rng, CEILING_N * CEILING_N),
        rand_vec(&mut rng, CEILING_N * CEILING_N),
    );
    let mut out = vec![0.0f32; CEILING_N * CEILING_N];
    let ceiling_flops = 2.0 * (CEILING_N as f64).powi(3);
    let mut ceiling = || {
        best_of(8, || {
            fast::matmul(
                &mut out,
                fast::View::new(&a, CEILING_N, CEILING_N),
                fast::View::new(&b, CEILING_N, CEILING_N),
                false,
            )
        })
    };
    println!("\n| shape (T, d, N, r) | pass | best time | GFLOP/s | of GEMM ceiling |");
    println!("|---|---|---|---|---|");
    let mut best_ceiling = f64::INFINITY;
    for (t, d, n, r) in SHAPES {
        let setup = Setup::new(&mut rng, (t, d, n, r));
        let shape = setup.shape;
        let (_, cache) = setup.forward();
        let reps = (2e9 / shape.forward_flops()).clamp(3.0, 200.0) as usize;
        let (mut fwd, mut bwd) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..3 {
            best_ceiling = best_ceiling.min(ceiling());
            fwd = fwd.min(best_of(reps, || drop(setup.forward())));
            bwd = bwd.min(best_of(reps, || drop(setup.backward(&cache))));
        }
        let ceiling_rate = ceiling_flops / best_ceiling;
        for (pass, secs, flops) in [
            ("forward", fwd, shape.forward_flops()),
            ("backward (all)", bwd, shape.backward_flops()),
        ] {
            println!(
                "| ({t}, {d}, {n}, {r}) | {pass} | {:.3} ms | {:.1} | {:.0}% |",
                secs * 1e3,
                flops / secs / 1e9,
                100.0 * flops / secs / ceiling_rate
            );
        }
    }
    println!(
        "| {CEILING_N}³ f32 GEMM | ceiling | {:.1} ms | {:.1} | 100% |",
        best_ceiling * 1e3,
        ceiling_flops / best_ceiling / 1e9
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    ratio_table();
}
