//! Every GEMM variant × storage type × transpose against the f64 reference
//! (`kernels::gemm::reference`): through the CPU harness always, with several thread orders,
//! and through the GPU in `gpu_matches_reference`, which is `#[ignore]`d (it needs a CUDA GPU:
//! `--ignored` on a GPU machine runs it, and fails if the GPU is not usable). The same test
//! bodies serve both backends.
//!
//! Tolerances come from the numerics:
//! - f32: per element `(k + 4)·u·2·(|α|·Σ|a||b| + |β||c|)` with u = 2⁻²⁴, the forward error
//!   bound of an f32 dot product (any summation order) plus the epilogue;
//! - f16/bf16: the kernel's largest error against f64 must be at most twice the largest error
//!   of the same math done on the CPU (f32 accumulation, result rounded to the storage type),
//!   and no element may be off by more than one ulp of the storage type plus f32 noise.

use lora_compose::check::compare_with;
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::gemm::{self, GemmParams, GemmShape, Variant};
use lora_compose::kernels::{Backend, DType, Element};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const UNIT_ROUNDOFF_F32: f64 = 1.0 / (1u64 << 24) as f64;

fn random_values<T: Element>(rng: &mut ChaCha8Rng, len: usize) -> Vec<T> {
    (0..len).map(|_| T::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

/// op(A)/op(B) element accessors for a shape: (m, k) and (k, n).
fn op_a<T: Element>(s: &GemmShape, a: &[T], i: usize, p: usize) -> f32 {
    if s.trans_a { a[p * s.m + i] } else { a[i * s.k + p] }.to_f32()
}
fn op_b<T: Element>(s: &GemmShape, b: &[T], p: usize, j: usize) -> f32 {
    if s.trans_b { b[j * s.k + p] } else { b[p * s.n + j] }.to_f32()
}

/// `|α|·Σ|a||b| + |β||c|` per element (m, n): the scale of the rounding errors.
fn magnitudes<T: Element>(params: &GemmParams, a: &[T], b: &[T], c: &[T]) -> Vec<f64> {
    let s = &params.shape;
    let mut out = vec![0.0; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let dot: f64 = (0..s.k)
                .map(|p| f64::from(op_a(s, a, i, p).abs()) * f64::from(op_b(s, b, p, j).abs()))
                .sum();
            let c_term = if params.beta != 0.0 {
                f64::from(params.beta.abs()) * f64::from(c[i * s.n + j].to_f32().abs())
            } else {
                0.0
            };
            out[i * s.n + j] = f64::from(params.alpha.abs()) * dot + c_term;
        }
    }
    out
}

/// The same math as the kernels on the CPU: f32 accumulation, one rounding to T at the end.
fn low_precision_cpu<T: Element>(params: &GemmParams, a: &[T], b: &[T], c: &[T]) -> Vec<f64> {
    let s = &params.shape;
    let mut out = vec![0.0; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let dot: f32 = (0..s.k).map(|p| op_a(s, a, i, p) * op_b(s, b, p, j)).sum();
            let previous = if params.beta != 0.0 {
                params.beta * c[i * s.n + j].to_f32()
            } else {
                0.0
            };
            out[i * s.n + j] = f64::from(T::from_f32(params.alpha * dot + previous).to_f32());
        }
    }
    out
}

/// One ulp of T at |x| (the spacing of T's values around x).
fn ulp<T: Element>(x: f64) -> f64 {
    let mantissa_bits = match T::DTYPE {
        DType::F32 => 23,
        DType::F16 => 10,
        DType::BF16 => 7,
    };
    let min_normal_exponent = match T::DTYPE {
        DType::F16 => -14,
        _ => -126,
    };
    let exponent = (x.abs().max(f64::MIN_POSITIVE))
        .log2()
        .floor()
        .max(f64::from(min_normal_exponent));
    2f64.powf(exponent - f64::from(mantissa_bits))
}

/// Runs `variant` on `backend` for `params` with inputs drawn from `data_seed` and checks it.
fn check_case<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    params: &GemmParams,
    data_seed: u64,
) -> Result<(), String> {
    let s = params.shape;
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let a: Vec<T> = random_values(&mut rng, s.m * s.k);
    let b: Vec<T> = random_values(&mut rng, s.k * s.n);
    // beta = 0 must overwrite C without reading it: poison it so an unwritten or read
    // element shows up as NaN.
    let c: Vec<T> = if params.beta == 0.0 {
        vec![T::poison(); s.m * s.n]
    } else {
        random_values(&mut rng, s.m * s.n)
    };
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} {:?} {:?} {s:?} α={} β={} data seed {data_seed}: {e}",
            backend.name(),
            variant,
            T::DTYPE,
            params.alpha,
            params.beta
        )
    };
    let dev_a = backend.upload(&a).map_err(|e| context(&e))?;
    let dev_b = backend.upload(&b).map_err(|e| context(&e))?;
    let mut dev_c = backend.upload(&c).map_err(|e| context(&e))?;
    gemm::launch::<T, B>(backend, variant, params, &dev_a, &dev_b, &mut dev_c).map_err(|e| context(&e))?;
    let out: Vec<f64> = backend
        .download(&dev_c)
        .map_err(|e| context(&e))?
        .iter()
        .map(|x| f64::from(x.to_f32()))
        .collect();

    let want = gemm::reference(params, &a, &b, &c);
    let mags = magnitudes(params, &a, &b, &c);
    let f32_noise = |i: usize| f32_noise_of(mags[i], s.k) + 1e-30;
    if T::DTYPE == DType::F32 {
        compare_with("C", &out, &want, f32_noise).map_err(|e| context(&e))?;
        return Ok(());
    }
    let kernel_err = compare_with("C", &out, &want, |i| ulp::<T>(want[i]) + f32_noise(i))
        .map_err(|e| context(&e))?
        .max_abs;
    // The CPU's error is only measured (an infinite bound), to scale the kernel's.
    let cpu = low_precision_cpu(params, &a, &b, &c);
    let cpu_err = compare_with("C on the CPU", &cpu, &want, |_| f64::INFINITY)
        .expect("the CPU's low-precision result is finite")
        .max_abs;
    let floor = mags.iter().map(|&m| f32_noise_of(m, s.k)).fold(0.0, f64::max);
    if kernel_err > 2.0 * cpu_err + floor {
        return Err(context(&format!(
            "max error {kernel_err:.3e} exceeds twice the CPU's low-precision error {cpu_err:.3e}"
        )));
    }
    Ok(())
}

/// Forward error bound of an f32 dot product of length k (any order) plus the epilogue.
fn f32_noise_of(magnitude: f64, k: usize) -> f64 {
    2.0 * (k as f64 + 4.0) * UNIT_ROUNDOFF_F32 * magnitude
}

/// Every variant × dtype × transpose for one shape and coefficient pair; a variant without a
/// kernel for a dtype (the tensor-core one has no f32) is skipped by `Variant::applies`.
fn check_all_combos<B: Backend>(
    backend: &B,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
    data_seed: u64,
) -> Result<(), String> {
    // The sm_90a variant (`wgmma`) is skipped on a GPU that is not sm_90 (the GPU tests say so).
    for &variant in gemm::ALL.iter().filter(|v| v.runs_on(backend)) {
        for (trans_a, trans_b) in [(false, false), (false, true), (true, false), (true, true)] {
            let params = GemmParams {
                shape: GemmShape {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                },
                alpha,
                beta,
            };
            if variant.applies(DType::F32) {
                check_case::<f32, B>(backend, variant, &params, data_seed)?;
            }
            check_case::<half::f16, B>(backend, variant, &params, data_seed)?;
            check_case::<half::bf16, B>(backend, variant, &params, data_seed)?;
        }
    }
    Ok(())
}

/// Tile multiples and non-multiples of 16, 64 and 128, 1×1, single rows and columns, k = 1;
/// ragged k-tiles of the tensor-core variant (K steps of 32) with rows both 16-byte aligned
/// (k = 136, a multiple of 8: cp.async) and not (k = 97: element loads); and the tensor-core
/// variant splitting K where its tiles leave SMs idle (`gemm::mma_split`: 2 ragged splits of
/// k = 300 by element loads and 4 of k = 520 by cp.async); and a second column tile of
/// `wgmma_wide`'s 256 (n = 300), ragged.
const EDGE_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (64, 64, 16),
    (128, 128, 8),
    (65, 129, 17),
    (1, 200, 3),
    (200, 1, 130),
    (17, 13, 1),
    (72, 40, 136),
    (33, 65, 97),
    (136, 144, 72),
    (17, 130, 300),
    (40, 72, 520),
    (70, 300, 40),
];

/// The split plan of the tensor-core variant: only where the tiles leave SMs idle, never past
/// one wave, covering K exactly; the edge shapes above run both plans.
#[test]
fn mma_splits_k_where_its_tiles_leave_sms_idle() {
    let shape = |m, n, k| GemmShape {
        m,
        n,
        k,
        trans_a: false,
        trans_b: true,
    };
    let sms = CpuHarness::new(0).sm_count();
    let splits = |m, n, k| gemm::mma_split(Variant::Mma, &shape(m, n, k), sms).splits;
    // Decode: 32 tiles × 8 splits of 512 fill 2 blocks on each of 132 SMs.
    assert_eq!(sms, 132);
    let decode = gemm::mma_split(Variant::Mma, &shape(16, 4096, 4096), sms);
    assert_eq!((decode.chunk, decode.splits), (512, 8));
    assert_eq!(splits(4096, 4096, 4096), 1);
    // 128 tiles are one block an SM: two splits make it two.
    assert_eq!(splits(4096, 512, 4096), 2);
    let edge: Vec<usize> = EDGE_SHAPES.iter().map(|&(m, n, k)| splits(m, n, k)).collect();
    assert_eq!(edge, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 1]);
    for variant in [Variant::MmaW64, Variant::Wgmma] {
        let plan = |&(m, n, k): &(usize, usize, usize)| gemm::mma_split(variant, &shape(m, n, k), sms);
        assert!(EDGE_SHAPES
            .iter()
            .all(|s| plan(s) == gemm::mma_split(Variant::Mma, &shape(s.0, s.1, s.2), sms)));
    }
    // The wide tile fills one block an SM: decode's 16 tiles of 128×256 split 8 ways (128
    // blocks), the LoRA shrink's 64 tiles 2 ways, the square GEMM's 512 tiles not at all.
    let wide = |m, n, k| gemm::mma_split(Variant::WgmmaWide, &shape(m, n, k), sms);
    assert_eq!((wide(16, 4096, 4096).chunk, wide(16, 4096, 4096).splits), (512, 8));
    assert_eq!(wide(4096, 512, 4096).splits, 2);
    assert_eq!(wide(4096, 4096, 4096).splits, 1);
    let edge: Vec<usize> = EDGE_SHAPES.iter().map(|&(m, n, k)| wide(m, n, k).splits).collect();
    assert_eq!(edge, [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 1]);
}

const COEFFICIENTS: &[(f32, f32)] = &[(1.0, 0.0), (-0.5, 1.0), (1.7, -0.75)];

/// The tensor-core variants (mma.sync and wgmma) refuse f32 storage with an error, not a panic.
#[test]
fn mma_variant_refuses_f32() {
    let harness = CpuHarness::new(0);
    let params = GemmParams {
        shape: GemmShape {
            m: 2,
            n: 2,
            k: 2,
            trans_a: false,
            trans_b: false,
        },
        alpha: 1.0,
        beta: 0.0,
    };
    for variant in [Variant::Mma, Variant::MmaW64, Variant::Wgmma, Variant::WgmmaWide] {
        let err = check_case::<f32, _>(&harness, variant, &params, 0).unwrap_err();
        assert!(err.contains("no F32 kernel"), "{variant:?}: {err}");
    }
}

#[test]
fn harness_edge_shapes_in_several_thread_orders() {
    for seed in [0, 1, 2] {
        let harness = CpuHarness::new(seed);
        for (i, &(m, n, k)) in EDGE_SHAPES.iter().enumerate() {
            let (alpha, beta) = COEFFICIENTS[i % COEFFICIENTS.len()];
            check_all_combos(&harness, m, n, k, alpha, beta, i as u64).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn harness_random_shapes(
        m in 1usize..=150,
        n in 1usize..=150,
        k in 1usize..=48,
        coefficients in 0usize..COEFFICIENTS.len(),
        thread_order in 0u64..1000,
        data_seed in any::<u64>(),
    ) {
        let (alpha, beta) = COEFFICIENTS[coefficients];
        let harness = CpuHarness::new(thread_order);
        if let Err(e) = check_all_combos(&harness, m, n, k, alpha, beta, data_seed) {
            return Err(TestCaseError::fail(e));
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    if !gpu.runs_sm90a() {
        println!("skipped on this GPU: the `wgmma` and `wgmma_wide` variants (built for sm_90a)");
    }
    for &variant in gemm::ALL.iter().filter(|v| v.runs_on(&gpu)) {
        // The shared memory the driver reports must match what launch_config budgets.
        let function = gpu.function(&gemm::kernel(variant, DType::BF16).unwrap()).unwrap();
        assert_eq!(
            function.shared_size_bytes().unwrap() as u32,
            variant.static_shared_bytes(),
            "{variant:?}"
        );
    }
    for (i, &(m, n, k)) in EDGE_SHAPES.iter().enumerate() {
        let (alpha, beta) = COEFFICIENTS[i % COEFFICIENTS.len()];
        check_all_combos(&gpu, m, n, k, alpha, beta, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for case in 0..12 {
        let (m, n, k) = (
            rng.random_range(1..700),
            rng.random_range(1..700),
            rng.random_range(1..300),
        );
        let (alpha, beta) = COEFFICIENTS[case % COEFFICIENTS.len()];
        check_all_combos(&gpu, m, n, k, alpha, beta, case as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// The cases compute-sanitizer runs on a GPU (`gpu-check.sh --sanitize`), few and small: every
/// variant, storage type and transpose on a ragged shape, on whole 128×128 tiles with aligned
/// rows (the tensor-core variant's `cp.async` path) and with the tensor-core variant splitting K.
#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_sanitizer_cases() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    for (i, &(m, n, k)) in [(37, 29, 45), (256, 128, 96), (40, 72, 520)].iter().enumerate() {
        let (alpha, beta) = COEFFICIENTS[i % COEFFICIENTS.len()];
        check_all_combos(&gpu, m, n, k, alpha, beta, 50 + i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// A split GEMM's C does not depend on which split of a tile finishes last: the last one sums
/// the partials in split order (`lc::last_split`, `mma_tile::finish_tile` and `split_finish`).
/// The harness's block orders (seed 0 forward, 1 reverse, others shuffled) make different
/// blocks the last; C must come out with the same bits every time. The data make the order
/// visible through the bf16 rounding: K's first chunk sums to ~5·10⁵, its third to exactly the
/// negative of that, the others to a few units, so an f32 sum in another order loses different
/// low bits of the small ones.
#[test]
fn split_k_gives_the_same_bits_whichever_split_finishes_last() {
    let params = GemmParams {
        shape: GemmShape {
            m: 40,
            n: 72,
            k: 520,
            trans_a: false,
            trans_b: true,
        },
        alpha: 1.7,
        beta: -0.75,
    };
    let s = params.shape;
    let sms = CpuHarness::new(0).sm_count();
    for variant in [Variant::Mma, Variant::MmaW64, Variant::Wgmma, Variant::WgmmaWide] {
        let split = gemm::mma_split(variant, &s, sms);
        assert!(split.splits >= 3, "{variant:?}: {split:?}");
        let mut rng = ChaCha8Rng::seed_from_u64(71);
        let small: Vec<half::bf16> = random_values(&mut rng, (s.m + s.n) * s.k);
        let big = half::bf16::from_f32(64.0);
        // A (m, k) and B stored (n, k): chunk 0 all 64, chunk 2 its negative (A) and copy (B).
        let value = |row: usize, k: usize, a: bool| match k / split.chunk {
            0 => big,
            2 if k - 2 * split.chunk < split.chunk => {
                if a {
                    -big
                } else {
                    big
                }
            }
            _ => small[(if a { row } else { s.m + row }) * s.k + k],
        };
        let a: Vec<half::bf16> = (0..s.m * s.k).map(|e| value(e / s.k, e % s.k, true)).collect();
        let b: Vec<half::bf16> = (0..s.n * s.k).map(|e| value(e / s.k, e % s.k, false)).collect();
        let c: Vec<half::bf16> = random_values(&mut rng, s.m * s.n);
        let run = |seed: u64| -> Vec<u16> {
            let h = CpuHarness::new(seed);
            let (dev_a, dev_b) = (h.upload(&a).unwrap(), h.upload(&b).unwrap());
            let mut dev_c = h.upload(&c).unwrap();
            gemm::launch(&h, variant, &params, &dev_a, &dev_b, &mut dev_c).unwrap();
            h.download(&dev_c).unwrap().iter().map(|x| x.to_bits()).collect()
        };
        let first = run(0);
        for seed in 1..6 {
            assert!(
                run(seed) == first,
                "{variant:?}: C differs between seed 0 and seed {seed}"
            );
        }
    }
}
