//! Times every GEMM variant × storage type on the GPU with CUDA events (median of many runs)
//! over a named table of shapes, and prints a markdown table: ms, TFLOP/s, GB/s. Each timed
//! configuration is first checked on sampled output elements against an f64 dot product.
//!
//! Usage: `gpu-bench [--runs N]` (default 20 timed runs after 3 warm-ups).

use std::process::ExitCode;

use lora_compose::gpu::GpuBackend;
use lora_compose::kernels::gemm::{self, GemmParams, GemmShape, Variant};
use lora_compose::kernels::{Backend, DType, Element, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (name, m, n, k): a square GEMM, a transformer projection over 4096 tokens, a decode step
/// (16 tokens), and the fused LoRA shrink of DESIGN §2 (N·r = 32·16 = 512 columns).
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("square 4096", 4096, 4096, 4096),
    ("proj T=4096 d=4096", 4096, 4096, 1024),
    ("decode T=16 d=4096", 16, 4096, 4096),
    ("lora shrink T=4096 Nr=512", 4096, 512, 4096),
];
const WARMUP_RUNS: usize = 3;
const CHECKED_ELEMENTS: usize = 64;

fn main() -> ExitCode {
    let runs = parse_runs().unwrap_or(20);
    let gpu = match GpuBackend::probe() {
        Ok(gpu) => gpu,
        Err(reason) => {
            println!("GPU bench skipped: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    println!(
        "GEMM on {}, median of {runs} runs (CUDA events), beta = 0\n",
        gpu.name()
    );
    println!("| shape | m×n×k | variant | dtype | ms | TFLOP/s | GB/s | check |");
    println!("|---|---|---|---|---:|---:|---:|---|");
    let mut failed = false;
    for &(name, m, n, k) in SHAPES {
        for &variant in gemm::ALL {
            for &dtype in DType::ALL {
                let params = GemmParams {
                    shape: GemmShape {
                        m,
                        n,
                        k,
                        trans_a: false,
                        trans_b: false,
                    },
                    alpha: 1.0,
                    beta: 0.0,
                };
                let result = match dtype {
                    DType::F32 => bench::<f32>(&gpu, variant, &params, runs),
                    DType::F16 => bench::<half::f16>(&gpu, variant, &params, runs),
                    DType::BF16 => bench::<half::bf16>(&gpu, variant, &params, runs),
                };
                match result {
                    Ok((ms, check)) => {
                        let (flops, bytes) = gemm::flops_bytes(&params, dtype);
                        let seconds = ms * 1e-3;
                        failed |= check.starts_with("FAIL");
                        println!(
                            "| {name} | {m}×{n}×{k} | {} | {} | {ms:.3} | {:.1} | {:.0} | {check} |",
                            variant.name(),
                            dtype.suffix(),
                            flops / seconds / 1e12,
                            bytes / seconds / 1e9
                        );
                    }
                    Err(e) => {
                        failed = true;
                        println!(
                            "| {name} | {m}×{n}×{k} | {} | {} | error: {e} | | | |",
                            variant.name(),
                            dtype.suffix()
                        );
                    }
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn parse_runs() -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--runs")?;
    args.get(i + 1)?.parse().ok()
}

/// Median milliseconds of `runs` launches, and the verdict of the sampled check.
fn bench<T: Element>(
    gpu: &GpuBackend,
    variant: Variant,
    params: &GemmParams,
    runs: usize,
) -> Result<(f64, String), KernelError> {
    let GemmShape { m, n, k, .. } = params.shape;
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let a: Vec<T> = (0..m * k).map(|_| T::from_f32(rng.random_range(-1.0..1.0))).collect();
    let b: Vec<T> = (0..k * n).map(|_| T::from_f32(rng.random_range(-1.0..1.0))).collect();
    let dev_a = gpu.upload(&a)?;
    let dev_b = gpu.upload(&b)?;
    let mut dev_c = gpu.upload(&vec![T::poison(); m * n])?;
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    for _ in 0..WARMUP_RUNS {
        gemm::launch::<T, _>(gpu, variant, params, &dev_a, &dev_b, &mut dev_c)?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        gpu.record(&start)?;
        gemm::launch::<T, _>(gpu, variant, params, &dev_a, &dev_b, &mut dev_c)?;
        gpu.record(&end)?;
        let ms = start.elapsed_ms(&end).map_err(|e| KernelError::Driver {
            context: "event timing".into(),
            message: format!("{e:?}"),
        })?;
        times.push(f64::from(ms));
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let c = gpu.download(&dev_c)?;
    Ok((median, check_samples(params, &a, &b, &c, &mut rng)))
}

/// Compares sampled elements of C with f64 dot products; tolerance: one ulp of T plus the f32
/// accumulation bound `2(k + 4)·2⁻²⁴·Σ|a||b|`.
fn check_samples<T: Element>(params: &GemmParams, a: &[T], b: &[T], c: &[T], rng: &mut ChaCha8Rng) -> String {
    let GemmShape { m, n, k, .. } = params.shape;
    let mut worst: f64 = 0.0;
    for _ in 0..CHECKED_ELEMENTS {
        let (i, j) = (rng.random_range(0..m), rng.random_range(0..n));
        let (mut dot, mut magnitude) = (0.0f64, 0.0f64);
        for p in 0..k {
            let product = f64::from(a[i * k + p].to_f32()) * f64::from(b[p * n + j].to_f32());
            dot += product;
            magnitude += product.abs();
        }
        let got = f64::from(c[i * n + j].to_f32());
        let ulp = f64::from(T::from_f32(dot as f32).to_f32()).abs()
            * match T::DTYPE {
                DType::F32 => 2f64.powi(-23),
                DType::F16 => 2f64.powi(-10),
                DType::BF16 => 2f64.powi(-7),
            };
        let bound = ulp + 2.0 * (k as f64 + 4.0) * 2f64.powi(-24) * magnitude + 1e-30;
        let ratio = (got - dot).abs() / bound;
        worst = if ratio.is_nan() {
            f64::INFINITY
        } else {
            worst.max(ratio)
        };
    }
    if worst <= 1.0 {
        format!("ok ({CHECKED_ELEMENTS} samples, worst {worst:.2} of bound)")
    } else {
        format!("FAIL (worst sample {worst:.1}× its bound)")
    }
}
