//! Times one piece of CPU work the way `scripts/torch_peer.py` times PyTorch on the same work,
//! and prints one JSON line: `{"work", "median_s", "min_s", "reps", "cpu_s", "flops"}`.
//!
//! ```text
//! cpu-peer gemm N                        N³ f32 GEMM (the machine's ceiling through `gemm`)
//! cpu-peer compose-fwd T D N R           composed layer forward, product mode, one row
//! cpu-peer compose-fwdbwd T D N R        forward + backward for ∂X and ∂C only
//! cpu-peer vit-step                      tiny ViT (width 64, 4 layers, 4 heads), batch 128,
//!                                        every parameter trains: forward, loss, backward, AdamW
//! cpu-peer embed MODEL_DIR TEXTS.jsonl   `Encoder::embed`, batch 16 (one JSON string a line)
//! ```
//!
//! Each work runs once to warm up, then repeats until `--secs` (default 3) have passed, at
//! least `--min-reps` (default 5) times. Not a benchmark harness: `scripts/torch-peer.sh`
//! alternates this binary with PyTorch so that a noisy machine slows both alike.

use std::path::Path;
use std::time::Instant;

use lora_compose::compose::{fast, Mode, ModuleStack, Rows, Train};
use lora_compose::model::bert::Encoder;
use lora_compose::model::train::{train_step, AdamW};
use lora_compose::model::{Batch, Config, Model, Trainable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn usage() -> ! {
    eprintln!(
        "usage: cpu-peer [--secs S] [--min-reps N] (gemm N | compose-fwd T D N R | compose-fwdbwd T D N R | vit-step | embed MODEL_DIR TEXTS.jsonl)"
    );
    std::process::exit(2)
}

fn num(s: Option<&String>) -> usize {
    s.and_then(|s| s.parse().ok()).unwrap_or_else(|| usage())
}

/// This process's user + system CPU seconds so far (Linux; 0 elsewhere).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name's closing parenthesis; utime and stime are the 12th and
    // 13th of them, in clock ticks (100 a second on Linux).
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 1)..];
    let f: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|x| x.parse().ok())
        .collect();
    f.iter().sum::<f64>() / 100.0
}

/// Median and minimum wall seconds of `f` after one warm-up call, the repetitions, and the
/// CPU seconds (all threads) per call: on a loaded machine the CPU time still says how much
/// work a call is, when wall time no longer does.
fn time(secs: f64, min_reps: usize, mut f: impl FnMut()) -> (f64, f64, usize, f64) {
    f();
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let mut v = Vec::new();
    while v.len() < min_reps || start.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        f();
        v.push(t.elapsed().as_secs_f64());
    }
    let cpu = (cpu_seconds() - cpu0) / v.len() as f64;
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v.len(), cpu)
}

struct ComposeWork {
    d: usize,
    modules: ModuleStack<f32>,
    w: Vec<f32>,
    bias: Vec<f32>,
    x: Vec<f32>,
    gy: Vec<f32>,
    coeffs: Vec<f32>,
    sample_of: Vec<usize>,
}

impl ComposeWork {
    fn new(t: usize, d: usize, n: usize, r: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mods: Vec<(Vec<f32>, Vec<f32>, f32)> = (0..n)
            .map(|_| (rand_vec(&mut rng, r * d), rand_vec(&mut rng, d * r), 2.0))
            .collect();
        let refs: Vec<(&[f32], &[f32], f32)> = mods.iter().map(|(a, b, s)| (&a[..], &b[..], *s)).collect();
        ComposeWork {
            d,
            modules: ModuleStack::from_modules(d, d, &refs).unwrap(),
            w: rand_vec(&mut rng, d * d),
            bias: rand_vec(&mut rng, d),
            x: rand_vec(&mut rng, t * d),
            gy: rand_vec(&mut rng, t * d),
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

    /// Forward: base GEMM, shrink, expand. Backward: ∂X through W, H = G·B_cat, ∂U·A_cat.
    fn flops(&self, backward: bool) -> f64 {
        let (t, d, r) = (
            self.sample_of.len() as f64,
            self.d as f64,
            self.modules.total_rank() as f64,
        );
        let fwd = 2.0 * t * d * d + 4.0 * t * d * r;
        fwd + if backward {
            2.0 * t * d * d + 4.0 * t * d * r
        } else {
            0.0
        }
    }
}

fn main() {
    lora_compose::alloc::keep_freed_pages();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mut secs, mut min_reps, mut rest) = (3.0, 5, Vec::new());
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--secs" => secs = it.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--min-reps" => min_reps = num(it.next()),
            _ => rest.push(a.clone()),
        }
    }
    let work = rest.first().cloned().unwrap_or_else(|| usage());
    let ((median, min, reps, cpu), flops) = match work.as_str() {
        "gemm" => {
            let n = num(rest.get(1));
            let mut rng = ChaCha8Rng::seed_from_u64(1);
            let (a, b) = (rand_vec(&mut rng, n * n), rand_vec(&mut rng, n * n));
            let mut out = vec![0.0f32; n * n];
            let t = time(secs, min_reps, || {
                fast::matmul(&mut out, fast::View::new(&a, n, n), fast::View::new(&b, n, n), false)
            });
            (t, 2.0 * (n as f64).powi(3))
        }
        "compose-fwd" | "compose-fwdbwd" => {
            let dims: Vec<usize> = (1..5).map(|i| num(rest.get(i))).collect();
            let w = ComposeWork::new(dims[0], dims[1], dims[2], dims[3]);
            if work == "compose-fwd" {
                (time(secs, min_reps, || drop(w.forward())), w.flops(false))
            } else {
                (time(secs, min_reps, || drop(w.forward_backward())), w.flops(true))
            }
        }
        "vit-step" => {
            let batch_size = 128;
            let mut model = Model::<f32>::init(Config::vit(64, 4, 4, 10), 0).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(3);
            let px: Vec<f32> = (0..batch_size * 784).map(|_| rng.random_range(0.0f32..1.0)).collect();
            let batch = Batch::images(&px, 28).unwrap();
            let labels: Vec<usize> = (0..batch_size).map(|i| i % 10).collect();
            let mut opt = AdamW::new(0.01);
            let t = time(secs, min_reps, || {
                train_step(&mut model, &mut opt, &batch, &labels, Trainable::ALL, 1e-3, None).unwrap();
            });
            (t, 0.0)
        }
        "embed" => {
            let (dir, file) = (
                rest.get(1).unwrap_or_else(|| usage()),
                rest.get(2).unwrap_or_else(|| usage()),
            );
            let encoder = Encoder::load(Path::new(dir)).unwrap();
            let texts: Vec<String> = std::fs::read_to_string(file)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let t = time(secs, min_reps, || drop(encoder.embed(&texts, 512, 16).unwrap()));
            (t, 0.0)
        }
        _ => usage(),
    };
    println!(
        "{}",
        serde_json::json!({"work": rest.join(" "), "median_s": median, "min_s": min, "reps": reps, "cpu_s": cpu, "flops": flops})
    );
}
