//! Times every GEMM variant × storage type on the GPU with CUDA events (median of many runs)
//! over a named table of shapes, and prints a markdown table: ms, TFLOP/s, GB/s. Each timed
//! configuration is first checked on sampled output elements against an f64 dot product.
//!
//! Then the composition kernels (every forward and backward variant) over DESIGN §3's shapes,
//! with GB/s, TFLOP/s and the ratio to the lower bound from `flops_bytes`, and the issue's
//! targets as measured ratios.
//!
//! cuBLAS (through cudarc's bindings, loaded at run time) is timed beside our kernels where
//! libcublas loads: each GEMM row shows ours as a percentage of cuBLAS's throughput beside the
//! percentage of the physical bound, and the composition's forward is also timed as two cuBLAS
//! GEMMs (shrink without the scale, then expand onto Y) as a reference point. Where libcublas
//! is missing the bench says so once and prints "n/a" in those columns.
//!
//! `gpu-bench --cublas-status` says whether libcublas loads here (no GPU needed) and exits.
//!
//! The composition's multi-launch variants (`gemv` at T ≤ 16, `mma`) and cuBLAS's pair are also
//! timed as CUDA graphs (`GpuBackend::capture`, rows "… graph"): the same launches replayed with
//! one call, which shows what the host's launch calls cost (the difference between the rows).
//!
//! Usage: `gpu-bench [--runs N] [--compose-only] [--shapes "d,N,T;…"] [--no-model] [--no-flush]`
//! (default 20 timed runs after 3 warm-ups; `--shapes` times only those composition shapes and
//! skips the targets summary; `--no-model` skips the whole-model bench; `--no-flush` times
//! without the L2 flush: the flush writes 256 MB, and whether the dirty lines it leaves cost the
//! next small kernel their write-back is what comparing the two shows);
//! `gpu-bench --dump-ptx FAMILY PATH` writes the embedded PTX of `cuda/FAMILY.cu` to PATH and
//! exits (gpu-check.sh compiles it with ptxas to read the SASS of the tensor-core kernels).

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr};

use lora_compose::compose::{Rows, Train};
use lora_compose::gpu::{GpuBackend, GpuBuffer};
use lora_compose::kernels::compose_fwd::{self, Shape, Tables, TokenRows};
use lora_compose::kernels::gemm::{self, GemmParams, GemmShape, Variant};
use lora_compose::kernels::{compose_bwd, Backend, DType, Element, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (name, m, n, k): a square GEMM, a transformer projection over 4096 tokens, a decode step
/// (16 tokens), and the fused LoRA shrink and expand of DESIGN §2 (N·r = 32·16 = 512): the
/// composition's `mma` kernels run these two GEMMs with their epilogues, so the tensor-core
/// variants' rows here compare their warp layouts (`mma`, `mma_w64`) at its shapes.
const SHAPES: &[(&str, usize, usize, usize)] = &[
    ("square 4096", 4096, 4096, 4096),
    ("proj T=4096 d=4096", 4096, 4096, 1024),
    ("decode T=16 d=4096", 16, 4096, 4096),
    ("lora shrink T=4096 Nr=512", 4096, 512, 4096),
    ("lora expand T=4096 Nr=512", 4096, 4096, 512),
];
const WARMUP_RUNS: usize = 3;
const CHECKED_ELEMENTS: usize = 64;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--cublas-status") {
        match cublas_present() {
            Ok(()) => println!("cuBLAS: libcublas loads"),
            Err(reason) => println!("cuBLAS: unavailable ({reason})"),
        }
        return ExitCode::SUCCESS;
    }
    if let Some(i) = args.iter().position(|a| a == "--dump-ptx") {
        let (Some(family), Some(path)) = (args.get(i + 1), args.get(i + 2)) else {
            eprintln!("usage: gpu-bench --dump-ptx FAMILY PATH");
            return ExitCode::FAILURE;
        };
        let Some(ptx) = lora_compose::gpu::ptx::get(family) else {
            eprintln!("no embedded PTX for family {family:?} (built without nvcc?)");
            return ExitCode::FAILURE;
        };
        if let Err(e) = std::fs::write(path, ptx) {
            eprintln!("cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
        return ExitCode::SUCCESS;
    }
    let runs = parse_runs().unwrap_or(20);
    let gpu = match GpuBackend::probe() {
        Ok(gpu) => std::sync::Arc::new(gpu),
        Err(reason) => {
            println!("GPU bench skipped: {reason}");
            return ExitCode::SUCCESS;
        }
    };
    println!(
        "GEMM on {}, median of {runs} runs (CUDA events), beta = 0\n",
        gpu.name()
    );
    let blas = match load_cublas(gpu.stream()) {
        Ok(blas) => {
            println!("cuBLAS: loaded (cublasGemmEx, f32 accumulation): the reference beside our kernels\n");
            Some(blas)
        }
        Err(reason) => {
            println!("cuBLAS: unavailable ({reason}); the cuBLAS columns show n/a\n");
            None
        }
    };
    let compose_only = std::env::args().any(|a| a == "--compose-only");
    if !gpu.runs_sm90a() {
        println!("Skipped on this GPU: the `wgmma` variants (built for sm_90a, Hopper only)\n");
    }
    println!("| shape | m×n×k | variant | dtype | ms | TFLOP/s | GB/s | % of bound | % of cuBLAS | check |");
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---|");
    let mut failed = false;
    for &(name, m, n, k) in SHAPES.iter().filter(|_| !compose_only) {
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
            let (flops, bytes) = gemm::flops_bytes(&params, dtype);
            let bound_s = (bytes / PEAK_BYTES_PER_S).max(flops / peak_flops(dtype));
            let cublas_ms = match &blas {
                None => None,
                Some(blas) => {
                    let timed = match dtype {
                        DType::F32 => bench_cublas::<f32>(&gpu, blas, m, n, k, runs),
                        DType::F16 => bench_cublas::<half::f16>(&gpu, blas, m, n, k, runs),
                        DType::BF16 => bench_cublas::<half::bf16>(&gpu, blas, m, n, k, runs),
                    };
                    match timed {
                        Ok(ms) => {
                            let seconds = ms * 1e-3;
                            println!(
                                "| {name} | {m}×{n}×{k} | cuBLAS | {} | {ms:.3} | {:.1} | {:.0} | {:.0}% | 100% | reference |",
                                dtype.suffix(),
                                flops / seconds / 1e12,
                                bytes / seconds / 1e9,
                                100.0 * bound_s / seconds
                            );
                            Some(ms)
                        }
                        Err(e) => {
                            println!(
                                "| {name} | {m}×{n}×{k} | cuBLAS | {} | error: {e} | | | | | |",
                                dtype.suffix()
                            );
                            None
                        }
                    }
                }
            };
            for variant in gemm_variants(&gpu).into_iter().filter(|v| v.applies(dtype)) {
                let result = match dtype {
                    DType::F32 => bench::<f32>(&gpu, variant, &params, runs),
                    DType::F16 => bench::<half::f16>(&gpu, variant, &params, runs),
                    DType::BF16 => bench::<half::bf16>(&gpu, variant, &params, runs),
                };
                match result {
                    Ok((ms, check)) => {
                        let seconds = ms * 1e-3;
                        failed |= check.starts_with("FAIL");
                        println!(
                            "| {name} | {m}×{n}×{k} | {} | {} | {ms:.3} | {:.1} | {:.0} | {:.0}% | {} | {check} |",
                            variant.name(),
                            dtype.suffix(),
                            flops / seconds / 1e12,
                            bytes / seconds / 1e9,
                            100.0 * bound_s / seconds,
                            percent_of(cublas_ms, ms)
                        );
                    }
                    Err(e) => {
                        failed = true;
                        println!(
                            "| {name} | {m}×{n}×{k} | {} | {} | error: {e} | | | | | |",
                            variant.name(),
                            dtype.suffix()
                        );
                    }
                }
            }
        }
    }
    match compose_bench(&gpu, blas.as_ref(), runs) {
        Ok(compose_failed) => failed |= compose_failed,
        Err(e) => {
            failed = true;
            println!("composition bench error: {e}");
        }
    }
    if args.iter().any(|a| a == "--no-model") {
        return if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS };
    }
    if let Err(e) = model_bench(gpu, runs.min(10)) {
        failed = true;
        println!("whole-model bench error: {e}");
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// `--shapes "d,N,T;d,N,T"`: the composition shapes to time instead of DESIGN §3's list.
fn parse_shapes() -> Option<Vec<(usize, usize, usize)>> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--shapes")?;
    let list = args.get(i + 1)?;
    let shapes: Vec<(usize, usize, usize)> = list
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let v: Vec<usize> = s
                .split(',')
                .map(|x| {
                    x.trim()
                        .parse()
                        .unwrap_or_else(|_| panic!("--shapes: {s:?} is not d,N,T"))
                })
                .collect();
            assert!(v.len() == 3 && v.iter().all(|&x| x > 0), "--shapes: {s:?} is not d,N,T");
            (v[0], v[1], v[2])
        })
        .collect();
    Some(shapes)
}

fn parse_runs() -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == "--runs")?;
    args.get(i + 1)?.parse().ok()
}

/// Dense peak of the H200 for a storage type: the tensor cores' 790 TFLOP/s for 16-bit inputs;
/// for f32 the SIMT cores' FMA rate (~67 TFLOP/s), which our f32 kernels and cuBLAS's default
/// f32 GEMM (no TF32) run on.
fn peak_flops(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => PEAK_F32_FLOPS,
        DType::F16 | DType::BF16 => PEAK_FLOPS,
    }
}
const PEAK_F32_FLOPS: f64 = 67e12;

/// Ours as a percentage of cuBLAS's throughput (cuBLAS time / our time), or n/a.
fn percent_of(cublas_ms: Option<f64>, ms: f64) -> String {
    cublas_ms.map_or_else(|| "n/a".into(), |c| format!("{:.0}%", 100.0 * c / ms))
}

/// The GEMM variants this GPU runs: the sm_90a ones (`wgmma`, `wgmma_wide`) on an sm_90 GPU only.
fn gemm_variants(gpu: &GpuBackend) -> Vec<gemm::Variant> {
    gemm::ALL.iter().copied().filter(|v| v.runs_on(gpu)).collect()
}

/// The composition variants this GPU runs: the sm_90a ones (`wgmma`, `wgmma_wide`) on an sm_90 GPU only.
fn compose_variants(gpu: &GpuBackend) -> Vec<compose_fwd::Variant> {
    compose_fwd::ALL.iter().copied().filter(|v| v.runs_on(gpu)).collect()
}

/// Whether libcublas loads here (no GPU needed), or why not.
fn cublas_present() -> Result<(), String> {
    // SAFETY: only tries to open the shared library (dlopen) by cudarc's candidate names.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(
            "libcublas not found on the library path: it ships with the CUDA toolkit and the \
             nvidia-cublas wheels; add its directory to LD_LIBRARY_PATH"
                .into(),
        )
    }
}

/// cuBLAS on the backend's stream, or why not: libcublas is loaded at run time (cudarc's
/// `dynamic-loading`), so a machine without it still runs the rest of the bench.
fn load_cublas(stream: &Arc<CudaStream>) -> Result<CudaBlas, String> {
    cublas_present()?;
    CudaBlas::new(stream.clone()).map_err(|e| format!("cublasCreate failed: {e:?}"))
}

/// `C = A·B` (row-major A (m, k), B (k, n), C (m, n)) as cuBLAS sees it, column-major:
/// `Cᵀ = Bᵀ·Aᵀ`, with B's buffer as the first operand (n × k, ld n) and A's as the second
/// (k × m, ld k). `beta` 0 overwrites C, 1 accumulates.
fn row_major_config<T>(m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, alpha: T, beta: T) -> GemmConfig<T> {
    use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
    let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
    let int = |v: usize| i32::try_from(v).expect("GEMM sizes fit int32");
    GemmConfig {
        // op(B)ᵀ: B stored (k, n) row-major is Bᵀ column-major (ld n); stored (n, k) it is B (ld k).
        transa: op(trans_b),
        transb: op(trans_a),
        m: int(n),
        n: int(m),
        k: int(k),
        alpha,
        lda: int(if trans_b { k } else { n }),
        ldb: int(if trans_a { m } else { k }),
        beta,
        ldc: int(n),
    }
}

/// Median milliseconds of `runs` cuBLAS GEMMs `C = A·B` (row-major, random inputs, beta = 0).
fn bench_cublas<T: Element + DeviceRepr>(
    gpu: &GpuBackend,
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    runs: usize,
) -> Result<f64, KernelError>
where
    CudaBlas: Gemm<T>,
{
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let a: Vec<T> = (0..m * k).map(|_| T::from_f32(rng.random_range(-1.0..1.0))).collect();
    let b: Vec<T> = (0..k * n).map(|_| T::from_f32(rng.random_range(-1.0..1.0))).collect();
    let stream = gpu.stream();
    let dev_a = stream.clone_htod(&a).map_err(driver("cuBLAS operand upload"))?;
    let dev_b = stream.clone_htod(&b).map_err(driver("cuBLAS operand upload"))?;
    let mut dev_c = stream
        .clone_htod(&vec![T::from_f32(0.0); m * n])
        .map_err(driver("cuBLAS output"))?;
    let config = row_major_config(m, n, k, false, false, T::from_f32(1.0), T::from_f32(0.0));
    let mut launch = || {
        // SAFETY: A holds m·k, B k·n and C m·n elements, as the configuration's sizes and leading
        // dimensions index them (row_major_config); all three live on the handle's stream.
        unsafe { blas.gemm(config, &dev_b, &dev_a, &mut dev_c) }.map_err(driver("cublasGemmEx"))
    };
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    for _ in 0..WARMUP_RUNS {
        launch()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        gpu.record(&start)?;
        launch()?;
        gpu.record(&end)?;
        times.push(f64::from(start.elapsed_ms(&end).map_err(driver("event timing"))?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
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

// ---- composition kernels ----------------------------------------------------------------------

/// H200 limits (DESIGN §3, measured there): copy bandwidth and dense bf16 throughput. The lower
/// bound of a call is `max(bytes / PEAK_BYTES_PER_S, flops / PEAK_FLOPS)` from `flops_bytes`.
const PEAK_BYTES_PER_S: f64 = 4.3e12;
const PEAK_FLOPS: f64 = 790e12;
/// Written before every timed run (outside the timed interval) so that weights do not sit in
/// the 60 MB L2 from the previous run.
const L2_FLUSH_BYTES: usize = 256 << 20;
/// Rank of every module in the bench (DESIGN §3).
const RANK: usize = 16;
/// (d, N, T): DESIGN §3's shapes at d = 4096 and the same at d = 768, with T = 4 for the GEMV
/// variant's predictions (benches/README.md).
fn compose_shapes() -> Vec<(usize, usize, usize)> {
    if let Some(shapes) = parse_shapes() {
        return shapes;
    }
    let mut shapes = Vec::new();
    for d in [4096, 768] {
        for n in [8, 32, 128] {
            for t in [1, 4, 16, 256, 4096] {
                shapes.push((d, n, t));
            }
        }
    }
    shapes
}

/// One timed composition call.
struct Timing {
    d: usize,
    n: usize,
    t: usize,
    pass: &'static str,
    variant: &'static str,
    ms: f64,
    flops: f64,
    bytes: f64,
}

impl Timing {
    /// A row of shape (d, N, T): `ms` for `flops_bytes`' (flops, bytes).
    fn of(
        (d, n, t): (usize, usize, usize),
        pass: &'static str,
        variant: &'static str,
        ms: f64,
        fb: (f64, f64),
    ) -> Timing {
        let (flops, bytes) = fb;
        Timing {
            d,
            n,
            t,
            pass,
            variant,
            ms,
            flops,
            bytes,
        }
    }
}

/// The backward timed: what learned composition needs (∂C and ∂X for the layer below), and ∂X
/// alone for the ∂C overhead.
const BWD_COEFFS_INPUT: Train = Train {
    input: true,
    coeffs: true,
    modules: false,
    base: false,
};
const BWD_INPUT: Train = Train {
    input: true,
    coeffs: false,
    modules: false,
    base: false,
};

fn driver<E: std::fmt::Debug>(context: &'static str) -> impl Fn(E) -> KernelError {
    move |e| KernelError::Driver {
        context: context.into(),
        message: format!("{e:?}"),
    }
}

/// Median milliseconds of `runs` calls of `launch`, each after an L2 flush (none with
/// `--no-flush`: operands that fit stay in the L2 from the previous run), timed with events.
fn time_runs(
    gpu: &GpuBackend,
    flush: &mut GpuBuffer<u8>,
    runs: usize,
    mut launch: impl FnMut() -> Result<(), KernelError>,
) -> Result<f64, KernelError> {
    let (start, end) = (gpu.timing_event()?, gpu.timing_event()?);
    for _ in 0..WARMUP_RUNS {
        launch()?;
    }
    let mut times = Vec::with_capacity(runs);
    let no_flush = std::env::args().any(|a| a == "--no-flush");
    for _ in 0..runs {
        if !no_flush {
            gpu.zero(flush)?;
        }
        gpu.record(&start)?;
        launch()?;
        gpu.record(&end)?;
        times.push(f64::from(start.elapsed_ms(&end).map_err(driver("event timing"))?));
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Like `time_runs`, for `launch` recorded once into a CUDA graph and replayed.
fn time_graph(
    gpu: &GpuBackend,
    flush: &mut GpuBuffer<u8>,
    runs: usize,
    mut launch: impl FnMut() -> Result<(), KernelError>,
) -> Result<f64, KernelError> {
    launch()?; // modules loaded before the capture
    let graph = gpu.capture(|_| launch())?;
    time_runs(gpu, flush, runs, || graph.launch())
}

/// The graph row of a variant timed both ways, if it is: `gemv` where it runs its own kernels
/// (T ≤ 16), `mma`.
fn graph_name(variant: &str, t: usize) -> Option<&'static str> {
    match variant {
        "gemv" if t <= compose_fwd::GEMV_MAX_T => Some("gemv graph"),
        "mma" => Some("mma graph"),
        _ => None,
    }
}

fn random_bf16(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<half::bf16> {
    (0..len)
        .map(|_| half::bf16::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

/// Times every forward and backward variant on one shape (bf16 storage, one coefficient row).
/// Each forward variant is first checked against the naive one on a fresh Y.
fn bench_compose_shape(
    gpu: &GpuBackend,
    blas: Option<&CudaBlas>,
    flush: &mut GpuBuffer<u8>,
    (d, n, t): (usize, usize, usize),
    runs: usize,
    out: &mut Vec<Timing>,
) -> Result<String, KernelError> {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let ranks = vec![RANK; n];
    let r = RANK * n;
    let shape = Shape {
        t,
        d_in: d,
        d_out: d,
        n_samples: 1,
        ranks: ranks.clone(),
    };
    let scale_x = 1.0;
    let host_x = random_bf16(&mut rng, t * d, scale_x);
    let host_a = random_bf16(&mut rng, r * d, 1.0 / (d as f32).sqrt());
    let host_b = random_bf16(&mut rng, d * r, 1.0 / (RANK as f32).sqrt());
    let x = gpu.upload(&host_x)?;
    let a_cat = gpu.upload(&host_a)?;
    let b_cat = gpu.upload(&host_b)?;
    let g = gpu.upload(&random_bf16(&mut rng, t * d, 1.0))?;
    let c = gpu.upload(&vec![1.0 / n as f32; n])?;
    let sample_of = vec![0usize; t];
    let rows = TokenRows::upload(
        gpu,
        Rows {
            sample_of: &sample_of,
            n_samples: 1,
        },
    )?;
    let tables = Tables::upload(gpu, &ranks, &vec![2.0f32; n])?;
    let zeros = |len: usize| gpu.upload(&vec![half::bf16::ZERO; len]);
    let (mut u, mut z, mut y) = (zeros(t * r)?, zeros(t * r)?, zeros(t * d)?);
    let variants = compose_variants(gpu);
    let work_len = variants
        .iter()
        .map(|&v| compose_fwd::workspace_len(v, &shape, gpu.sm_count()))
        .chain(
            [BWD_COEFFS_INPUT, BWD_INPUT]
                .iter()
                .flat_map(|&train| variants.iter().map(move |&v| (v, train)))
                .map(|(v, train)| compose_bwd::workspace_len(v, &shape, train, gpu.sm_count())),
        )
        .max()
        .unwrap_or(1);
    let mut work = gpu.upload(&vec![0.0f32; work_len])?;
    let fwd_inputs = compose_fwd::Inputs {
        x: &x,
        a_cat: &a_cat,
        b_cat: &b_cat,
        c: &c,
        rows: &rows,
        tables: &tables,
    };

    // Check: every variant's Y against the naive variant's, from Y = 0.
    let mut y_of = |variant, y: &mut GpuBuffer<half::bf16>| -> Result<Vec<f32>, KernelError> {
        gpu.zero(y)?;
        let outputs = compose_fwd::Outputs {
            u: Some(&mut u),
            z: &mut z,
            y,
            work: &mut work,
        };
        compose_fwd::launch(gpu, variant, &shape, &fwd_inputs, outputs)?;
        Ok(gpu.download(y)?.iter().map(|v| v.to_f32()).collect())
    };
    let y_naive = y_of(compose_fwd::Variant::Naive, &mut y)?;
    let norm = y_naive
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()))
        .max(f32::MIN_POSITIVE);
    let mut worst = 0.0f32;
    for &variant in &variants {
        let yv = y_of(variant, &mut y)?;
        let err = yv.iter().zip(&y_naive).fold(0.0f32, |m, (a, b)| m.max((a - b).abs())) / norm;
        worst = if err.is_nan() { f32::INFINITY } else { worst.max(err) };
    }
    // bf16 outputs; the loop rounds Y once per module. A gross-error check, the tests are exact.
    let check = if worst <= 5e-2 {
        format!("ok (max |ΔY| {worst:.1e} of max |Y|)")
    } else {
        format!("FAIL (max |ΔY| {worst:.1e} of max |Y|)")
    };

    for &variant in &variants {
        let mut launch = || {
            let outputs = compose_fwd::Outputs {
                u: Some(&mut u),
                z: &mut z,
                y: &mut y,
                work: &mut work,
            };
            compose_fwd::launch(gpu, variant, &shape, &fwd_inputs, outputs)
        };
        let ms = time_runs(gpu, flush, runs, &mut launch)?;
        let graph_ms = match graph_name(variant.name(), t) {
            Some(name) => Some((name, time_graph(gpu, flush, runs, &mut launch)?)),
            None => None,
        };
        let (flops, bytes) = compose_fwd::flops_bytes(&shape, DType::BF16, true);
        for (variant, ms) in std::iter::once((variant.name(), ms)).chain(graph_ms) {
            out.push(Timing::of((d, n, t), "forward", variant, ms, (flops, bytes)));
        }
    }

    if let Some(blas) = blas {
        let (ms, graph_ms) = time_cublas_forward(gpu, blas, flush, (t, d, r), (&host_x, &host_a, &host_b), runs)?;
        let (flops, bytes) = compose_fwd::flops_bytes(&shape, DType::BF16, true);
        for (variant, ms) in [("cuBLAS×2", Some(ms)), ("cuBLAS×2 graph", graph_ms)] {
            if let Some(ms) = ms {
                out.push(Timing::of((d, n, t), "forward", variant, ms, (flops, bytes)));
            }
        }
    }

    let mut dc = gpu.upload(&vec![0.0f32; n])?;
    let (mut du, mut dx) = (zeros(t * r)?, zeros(t * d)?);
    let bwd_inputs = compose_bwd::Inputs {
        g: &g,
        x: &x,
        u: &u,
        a_cat: &a_cat,
        b_cat: &b_cat,
        c: &c,
        rows: &rows,
        tables: &tables,
    };
    let dx_alone = [
        compose_bwd::Variant::Fused,
        compose_bwd::Variant::Gemv,
        compose_bwd::Variant::GemvCoop,
        compose_bwd::Variant::Mma,
        compose_bwd::Variant::Wgmma,
        compose_bwd::Variant::WgmmaWide,
    ];
    let runs_of = variants.iter().map(|&v| (v, BWD_COEFFS_INPUT, "backward ∂C+∂X")).chain(
        dx_alone
            .into_iter()
            .filter(|v| variants.contains(v))
            .map(|v| (v, BWD_INPUT, "backward ∂X")),
    );
    for (variant, train, pass) in runs_of {
        let mut launch = || {
            let outputs = compose_bwd::Outputs {
                dc: train.coeffs.then_some(&mut dc),
                du: Some(&mut du),
                dx: Some(&mut dx),
                da_cat: None,
                db_cat: None,
                work: &mut work,
            };
            compose_bwd::launch(gpu, variant, &shape, train, &bwd_inputs, outputs)
        };
        let ms = time_runs(gpu, flush, runs, &mut launch)?;
        let graph_ms = match graph_name(variant.name(), t) {
            Some(name) => Some((name, time_graph(gpu, flush, runs, &mut launch)?)),
            None => None,
        };
        let (flops, bytes) = compose_bwd::flops_bytes(&shape, DType::BF16, train);
        for (variant, ms) in std::iter::once((variant.name(), ms)).chain(graph_ms) {
            out.push(Timing::of((d, n, t), pass, variant, ms, (flops, bytes)));
        }
    }
    Ok(check)
}

/// The composition's forward as two cuBLAS GEMMs, a reference point for the fused kernels:
/// `U = X A_catᵀ` (no per-sample scale: cuBLAS has no such epilogue) and `Y += U B_catᵀ`, bf16
/// with f32 accumulation, timed like the kernels (median after an L2 flush).
fn time_cublas_forward(
    gpu: &GpuBackend,
    blas: &CudaBlas,
    flush: &mut GpuBuffer<u8>,
    (t, d, r): (usize, usize, usize),
    (x, a_cat, b_cat): (&[half::bf16], &[half::bf16], &[half::bf16]),
    runs: usize,
) -> Result<(f64, Option<f64>), KernelError> {
    let stream = gpu.stream();
    let upload = |host: &[half::bf16]| -> Result<CudaSlice<half::bf16>, KernelError> {
        stream.clone_htod(host).map_err(driver("cuBLAS operand upload"))
    };
    let (x, a_cat, b_cat) = (upload(x)?, upload(a_cat)?, upload(b_cat)?);
    let (mut u, mut y) = (
        upload(&vec![half::bf16::ZERO; t * r])?,
        upload(&vec![half::bf16::ZERO; t * d])?,
    );
    let (one, zero) = (half::bf16::ONE, half::bf16::ZERO);
    // U (t, r) = X (t, d) · A_catᵀ (A_cat stored (r, d)); Y (t, d) += U (t, r) · B_catᵀ (B_cat (d, r)).
    let shrink = row_major_config(t, r, d, false, true, one, zero);
    let expand = row_major_config(t, d, r, false, true, one, one);
    let mut run = || {
        // SAFETY: X (t·d), A_cat (r·d), U (t·r), B_cat (d·r) and Y (t·d) hold exactly what the
        // two configurations index (row_major_config), all on the handle's stream.
        unsafe {
            blas.gemm(shrink, &a_cat, &x, &mut u).map_err(driver("cublasGemmEx"))?;
            blas.gemm(expand, &b_cat, &u, &mut y).map_err(driver("cublasGemmEx"))
        }
    };
    let ms = time_runs(gpu, flush, runs, &mut run)?;
    // The same two calls as a graph; cuBLAS may refuse to be captured: then no row.
    let graph_ms = match gpu.capture(|_| run()) {
        Ok(graph) => Some(time_runs(gpu, flush, runs, || graph.launch())?),
        Err(e) => {
            println!("cuBLAS×2 graph: not captured ({e})");
            None
        }
    };
    Ok((ms, graph_ms))
}

/// Prints the composition table and the targets as measured ratios; returns whether a
/// check failed.
fn compose_bench(gpu: &GpuBackend, blas: Option<&CudaBlas>, runs: usize) -> Result<bool, KernelError> {
    let mut flush = gpu.alloc::<u8>(L2_FLUSH_BYTES)?;
    gpu.zero(&mut flush)?;
    println!(
        "\nComposition kernels on {}, bf16, r = {RANK}, median of {runs} runs after an L2 flush\n",
        gpu.name()
    );
    println!("| d | N | T | pass | variant | ms | GB/s | TFLOP/s | bound ms | % of bound | check |");
    println!("|---|---:|---:|---|---|---:|---:|---:|---:|---:|---|");
    let mut all = Vec::new();
    let mut failed = false;
    for shape in compose_shapes() {
        let first = all.len();
        let check = bench_compose_shape(gpu, blas, &mut flush, shape, runs, &mut all)?;
        failed |= check.starts_with("FAIL");
        for tm in &all[first..] {
            let seconds = tm.ms * 1e-3;
            let bound = (tm.bytes / PEAK_BYTES_PER_S).max(tm.flops / PEAK_FLOPS);
            println!(
                "| {} | {} | {} | {} | {} | {:.4} | {:.0} | {:.2} | {:.4} | {:.0}% | {check} |",
                tm.d,
                tm.n,
                tm.t,
                tm.pass,
                tm.variant,
                tm.ms,
                tm.bytes / seconds / 1e9,
                tm.flops / seconds / 1e12,
                bound * 1e3,
                100.0 * bound / seconds
            );
        }
    }

    if parse_shapes().is_some() {
        return Ok(failed); // the targets need DESIGN §3's shapes
    }
    // Targets (the issue), as measured ratios.
    let find = |d: usize, n: usize, t: usize, pass: &str, variant: &str| {
        all.iter()
            .find(|tm| (tm.d, tm.n, tm.t, tm.pass, tm.variant) == (d, n, t, pass, variant))
            .map(|tm| tm.ms)
    };
    println!("\n### Targets (measured)\n");
    for d in [4096, 768] {
        let worst_small_t = all
            .iter()
            .filter(|tm| tm.d == d && tm.t <= 16 && tm.pass == "forward" && tm.variant == "fused")
            .map(|tm| (tm.bytes / PEAK_BYTES_PER_S) / (tm.ms * 1e-3))
            .fold(f64::INFINITY, f64::min);
        println!(
            "- d = {d}, fused forward at T ≤ 16: worst {:.0}% of the memory bound (target ≥ 80%)",
            100.0 * worst_small_t
        );
        for (pass, variant) in ["forward", "backward ∂C+∂X"]
            .into_iter()
            .flat_map(|pass| [(pass, "gemv"), (pass, "gemv_coop")])
        {
            let gemv = |n: usize| {
                all.iter()
                    .filter(|tm| tm.d == d && tm.n == n && tm.t <= 16 && tm.pass == pass && tm.variant == variant)
                    .map(|tm| (tm.bytes / PEAK_BYTES_PER_S) / (tm.ms * 1e-3))
                    .fold(f64::INFINITY, f64::min)
            };
            println!(
                "- d = {d}, {variant} {pass} at T ≤ 16: worst {:.0}% / {:.0}% / {:.0}% of the memory bound at N = 8 / 32 / 128 (target ≥ 60%)",
                100.0 * gemv(8),
                100.0 * gemv(32),
                100.0 * gemv(128)
            );
        }
        // The measured bf16 GEMM throughput: the best GEMM variant on the base projection T×d×d.
        let gemm_params = GemmParams {
            shape: GemmShape {
                m: 4096,
                n: d,
                k: d,
                trans_a: false,
                trans_b: true,
            },
            alpha: 1.0,
            beta: 0.0,
        };
        let mut gemm_tflops: f64 = 0.0;
        for variant in gemm_variants(gpu) {
            let (ms, _) = bench::<half::bf16>(gpu, variant, &gemm_params, runs)?;
            gemm_tflops = gemm_tflops.max(gemm::flops_bytes(&gemm_params, DType::BF16).0 / (ms * 1e-3) / 1e12);
        }
        for n in [8, 32, 128] {
            if let Some(tm) = all
                .iter()
                .find(|tm| (tm.d, tm.n, tm.t, tm.pass, tm.variant) == (d, n, 4096, "forward", "fused"))
            {
                let tflops = tm.flops / (tm.ms * 1e-3) / 1e12;
                println!(
                    "- d = {d}, N = {n}, T = 4096 fused forward: {tflops:.1} TFLOP/s = {:.0}% of the measured bf16 GEMM ({gemm_tflops:.1} TFLOP/s; target ≥ 50%)",
                    100.0 * tflops / gemm_tflops
                );
            }
        }
        for (n, variant) in [8, 32, 128]
            .into_iter()
            .flat_map(|n| [(n, "mma"), (n, "wgmma"), (n, "wgmma_wide")])
        {
            if let Some(tm) = all
                .iter()
                .find(|tm| (tm.d, tm.n, tm.t, tm.pass, tm.variant) == (d, n, 4096, "forward", variant))
            {
                let tflops = tm.flops / (tm.ms * 1e-3) / 1e12;
                let cublas = find(d, n, 4096, "forward", "cuBLAS×2");
                println!(
                    "- d = {d}, N = {n}, T = 4096 {variant} forward: {tflops:.1} TFLOP/s = {:.0}% of the dense bf16 peak ({:.0} TFLOP/s; target ≥ 50%), {:.0}% of the measured bf16 GEMM, {} of two cuBLAS GEMMs",
                    100.0 * tflops * 1e12 / PEAK_FLOPS,
                    PEAK_FLOPS / 1e12,
                    100.0 * tflops / gemm_tflops,
                    percent_of(cublas, tm.ms)
                );
            }
        }
        if let (Some(lp), Some(fu)) = (
            find(d, 128, 16, "forward", "loop"),
            find(d, 128, 16, "forward", "fused"),
        ) {
            println!(
                "- d = {d}, N = 128, T = 16: the 2N-launch loop takes {:.1}× the fused forward (target ≥ 20×)",
                lp / fu
            );
        }
        for (t, variant) in [
            (16, "fused"),
            (4096, "fused"),
            (16, "gemv"),
            (16, "gemv_coop"),
            (4096, "mma"),
            (4096, "wgmma"),
            (4096, "wgmma_wide"),
        ] {
            if let (Some(both), Some(dx)) = (
                find(d, 32, t, "backward ∂C+∂X", variant),
                find(d, 32, t, "backward ∂X", variant),
            ) {
                println!(
                    "- d = {d}, N = 32, T = {t}: ∂C adds {:.0}% to the {variant} backward of ∂X alone (target ≤ 15%)",
                    100.0 * (both / dx - 1.0)
                );
            }
        }
    }
    Ok(failed)
}

/// Median wall milliseconds of `runs` calls of `f` after one warm-up (each call ends with a copy
/// to the host, so it has finished on the GPU).
fn wall_ms(runs: usize, mut f: impl FnMut() -> lora_compose::Result<()>) -> lora_compose::Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = std::time::Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The whole model resident on the GPU (f32): a ViT training step (the default run's ViT, batch
/// 128, every parameter, AdamW) and the MiniLM forward (batch 64 × 128 tokens) without adapters
/// and with N = 8, 32, 128 rank-8 modules composed on query, value, attention output and both FFN
/// layers; the composition's overhead as a ratio of the plain forward.
fn model_bench(gpu: std::sync::Arc<GpuBackend>, runs: usize) -> lora_compose::Result<()> {
    use lora_compose::compose::layer::Device;
    use lora_compose::compose::{Mode, Param};
    use lora_compose::model::train::{train_step, AdamW};
    use lora_compose::model::{Batch, Composition, Config, Model, Trainable};
    let device = Device::Cuda(gpu.clone());
    println!(
        "\n## Whole model on {} (median of {runs} runs, wall clock; f32 storage runs the SIMT kernels, bf16 the tensor cores)\n",
        gpu.name()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(5);

    let pixels: Vec<f32> = (0..128 * 28 * 28).map(|_| rng.random_range(0.0f32..1.0)).collect();
    let labels: Vec<usize> = (0..128).map(|i| i % 10).collect();
    let images = Batch::images(&pixels, 28)?;
    for storage in [DType::F32, DType::BF16] {
        let mut vit = Model::<f32>::init(Config::vit(64, 4, 4, 10), 1)?;
        vit.to_device_storage(&device, storage)?;
        let mut opt = AdamW::new(0.01);
        let ms = wall_ms(runs, || {
            train_step(&mut vit, &mut opt, &images, &labels, Trainable::ALL, 1e-3, Some(1.0)).map(|_| ())
        })?;
        println!("- ViT (width 64, 4 blocks) training step, batch 128, {storage:?}: {ms:.2} ms");
    }

    let (batch, seq) = (64, 128);
    let seqs: Vec<Vec<u32>> = (0..batch)
        .map(|_| (0..seq).map(|_| rng.random_range(1000u32..30000)).collect())
        .collect();
    let tokens = Batch::tokens(&seqs)?;
    let targets = [
        "query",
        "value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ];
    let base = Model::<f32>::init(Config::minilm(2), 2)?;
    for storage in [DType::F32, DType::BF16] {
        let mut plain_ms = None;
        for n in [0usize, 8, 32, 128] {
            let mut m = base.clone();
            if n > 0 {
                let lib = m.random_library(&targets, n, 8, 0.01, 3)?;
                m.attach_composition(
                    &lib,
                    Composition {
                        mode: Mode::Product,
                        param: Param::Softmax,
                        global: false,
                    },
                )?;
            }
            m.to_device_storage(&device, storage)?;
            let ms = wall_ms(runs, || m.logits(&tokens).map(|_| ()))?;
            let plain = *plain_ms.get_or_insert(ms);
            println!(
                "- MiniLM forward, {batch} × {seq} tokens, N = {n}, {storage:?}: {ms:.2} ms, {:.0} tokens/s, {:.2}× the plain forward",
                (batch * seq) as f64 / (ms * 1e-3),
                ms / plain
            );
        }
    }
    Ok(())
}
