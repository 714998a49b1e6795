//! Element-wise kernels (`cuda/elementwise.cu`) against the f64 references in
//! `kernels::elementwise`: first the GELU backward reference (and the bias gradient over it)
//! against central finite differences of the forward reference, then every kernel and bias
//! gradient variant × storage type × shape × thread order through the CPU harness, and the same
//! bodies through the GPU in `gpu_matches_reference` (`#[ignore]`d: it needs a CUDA GPU).
//!
//! Tolerances come from the numerics (u = 2⁻²⁴):
//! - f32: GELU forward `8u·(|h| + |x| + |b|)` (h = x + b rounded once, gelu' ≤ 1.13, erff within
//!   2 ulp of a value ≤ 2 in magnitude); backward `8u·|∂y|·(1 + |h| + |x| + |b|)` (likewise, with
//!   |gelu''| ≤ 0.8); add `2u·(|a| + |b|)`; bias gradient `2·(rows + 8)·u·Σ|∂y|` (any order);
//! - bf16: the kernel's largest error against f64 at most twice the largest error of the same math
//!   done on the CPU (f32 arithmetic with libm's erff/expf on the bf16 inputs, output rounded to
//!   bf16) plus the f32 floor, and no element off by more than one bf16 ulp plus that floor;
//! - cast (f32 → T): bit-exact with `T::from_f32`.

use lora_compose::check::{compare, compare_with, Tol};
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::elementwise::{self, Entry, RowsShape, Variant};
use lora_compose::kernels::{Backend, DType, Element, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const UNIT_ROUNDOFF_F32: f64 = 1.0 / (1u64 << 24) as f64;

/// Odd widths, widths past a warp and past a block, single rows and columns, several row chunks
/// of the bias gradient (64 rows each).
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (7, 17),
    (17, 33),
    (33, 100),
    (100, 385),
    (7, 768),
    (130, 33),
    (200, 1),
    (65, 1025),
];
const SEEDS: &[u64] = &[0, 1, 2, 3, 11];

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
}

fn random<T: Element>(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(scale * rng.random_range(-1.0f32..1.0)))
        .collect()
}

/// One ulp of T at |x|.
fn ulp<T: Element>(x: f64) -> f64 {
    let mantissa_bits = match T::DTYPE {
        DType::F32 => 23,
        DType::F16 => 10,
        DType::BF16 => 7,
    };
    let exponent = x.abs().max(f64::MIN_POSITIVE).log2().floor().max(-126.0);
    2f64.powf(exponent - f64::from(mantissa_bits))
}

/// f32 bound per element for f32 storage; for bf16, one ulp plus the f32 bound per element and at
/// most twice the CPU's low-precision error (`cpu`, already rounded to T) overall.
fn check_output<T: Element>(
    name: &str,
    got: &[f64],
    want: &[f64],
    cpu: &[f64],
    f32_bounds: &[f64],
) -> Result<(), String> {
    if T::DTYPE == DType::F32 {
        compare_with(name, got, want, |i| f32_bounds[i])?;
        return Ok(());
    }
    let kernel_err = compare_with(name, got, want, |i| ulp::<T>(want[i]) + f32_bounds[i])?.max_abs;
    let cpu_err = compare_with(name, cpu, want, |_| f64::INFINITY)?.max_abs;
    let floor = f32_bounds.iter().copied().fold(0.0, f64::max);
    if kernel_err > 2.0 * cpu_err + floor {
        return Err(format!(
            "{name}: max error {kernel_err:.3e} exceeds twice the CPU's low-precision error {cpu_err:.3e} (+ f32 floor {floor:.1e})"
        ));
    }
    Ok(())
}

fn round<T: Element>(v: f32) -> f64 {
    f64::from(T::from_f32(v).to_f32())
}

fn cpu_gelu(h: f32) -> f32 {
    0.5 * h * (1.0 + libm::erff(h * std::f32::consts::FRAC_1_SQRT_2))
}

fn cpu_gelu_grad(h: f32) -> f32 {
    let cdf = 0.5 * (1.0 + libm::erff(h * std::f32::consts::FRAC_1_SQRT_2));
    let pdf = 0.398_942_3 * libm::expf(-0.5 * h * h);
    cdf + h * pdf
}

/// GELU forward and backward of one shape on `backend`.
fn check_gelu<T: Element, B: Backend>(backend: &B, shape: &RowsShape, seed: u64) -> Result<(), String> {
    let RowsShape { rows, d } = *shape;
    let n = rows * d;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (x, b, dy): (Vec<T>, Vec<T>, Vec<T>) = (
        random(&mut rng, n, 4.0),
        random(&mut rng, d, 1.0),
        random(&mut rng, n, 1.0),
    );
    let context =
        |e: &dyn std::fmt::Display| format!("{} GELU {:?} {shape:?} seed {seed}: {e}", backend.name(), T::DTYPE);
    let run = || -> Result<(Vec<T>, Vec<T>), KernelError> {
        let (dev_x, dev_b, dev_dy) = (backend.upload(&x)?, backend.upload(&b)?, backend.upload(&dy)?);
        let mut y = backend.upload(&vec![T::poison(); n])?;
        let mut dx = backend.upload(&vec![T::poison(); n])?;
        elementwise::launch_gelu_bias_forward::<T, B>(backend, shape, &dev_x, &dev_b, &mut y)?;
        elementwise::launch_gelu_bias_backward::<T, B>(backend, shape, &dev_dy, &dev_x, &dev_b, &mut dx)?;
        Ok((backend.download(&y)?, backend.download(&dx)?))
    };
    let (y, dx) = run().map_err(|e| context(&e))?;

    let (x64, b64, dy64) = (f64s(&x), f64s(&b), f64s(&dy));
    let want_y = elementwise::reference_gelu_bias_forward(shape, &x64, &b64);
    let want_dx = elementwise::reference_gelu_bias_backward(shape, &dy64, &x64, &b64);
    let h = |i: usize| x64[i] + b64[i % d];
    let size = |i: usize| h(i).abs() + x64[i].abs() + b64[i % d].abs();
    let y_bounds: Vec<f64> = (0..n).map(|i| 8.0 * UNIT_ROUNDOFF_F32 * size(i) + 1e-30).collect();
    let dx_bounds: Vec<f64> = (0..n)
        .map(|i| 8.0 * UNIT_ROUNDOFF_F32 * dy64[i].abs() * (1.0 + size(i)) + 1e-30)
        .collect();
    let h32 = |i: usize| x[i].to_f32() + b[i % d].to_f32();
    let cpu_y: Vec<f64> = (0..n).map(|i| round::<T>(cpu_gelu(h32(i)))).collect();
    let cpu_dx: Vec<f64> = (0..n)
        .map(|i| round::<T>(dy[i].to_f32() * cpu_gelu_grad(h32(i))))
        .collect();
    check_output::<T>("y", &f64s(&y), &want_y, &cpu_y, &y_bounds).map_err(|e| context(&e))?;
    check_output::<T>("dx", &f64s(&dx), &want_dx, &cpu_dx, &dx_bounds).map_err(|e| context(&e))?;
    Ok(())
}

/// add (out poisoned first) and add_acc over n = rows·d elements on `backend`.
fn check_adds<T: Element, B: Backend>(backend: &B, n: usize, seed: u64) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xadd);
    let (a, b): (Vec<T>, Vec<T>) = (random(&mut rng, n, 3.0), random(&mut rng, n, 3.0));
    let context = |e: &dyn std::fmt::Display| format!("{} add {:?} n={n} seed {seed}: {e}", backend.name(), T::DTYPE);
    let run = || -> Result<(Vec<T>, Vec<T>), KernelError> {
        let (dev_a, dev_b) = (backend.upload(&a)?, backend.upload(&b)?);
        let mut out = backend.upload(&vec![T::poison(); n])?;
        elementwise::launch_add::<T, B>(backend, &dev_a, &dev_b, &mut out)?;
        let mut acc = backend.upload(&b)?;
        elementwise::launch_add_acc::<T, B>(backend, &dev_a, &mut acc)?;
        Ok((backend.download(&out)?, backend.download(&acc)?))
    };
    let (out, acc) = run().map_err(|e| context(&e))?;
    let (a64, b64) = (f64s(&a), f64s(&b));
    let want = elementwise::reference_add(&a64, &b64);
    let bounds: Vec<f64> = (0..n)
        .map(|i| 2.0 * UNIT_ROUNDOFF_F32 * (a64[i].abs() + b64[i].abs()) + 1e-30)
        .collect();
    let cpu: Vec<f64> = (0..n).map(|i| round::<T>(a[i].to_f32() + b[i].to_f32())).collect();
    check_output::<T>("out", &f64s(&out), &want, &cpu, &bounds).map_err(|e| context(&e))?;
    check_output::<T>("out (accumulated)", &f64s(&acc), &want, &cpu, &bounds).map_err(|e| context(&e))?;
    Ok(())
}

/// cast (f32 → T, out poisoned first) over n elements on `backend`: bit-exact with
/// `T::from_f32` (round to nearest even), ties and values past T's range included.
fn check_cast<T: Element, B: Backend>(backend: &B, n: usize, seed: u64) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xca57);
    let special = [
        0.0f32,
        -0.0,
        1.0,
        f32::MAX,
        -f32::MAX,
        f32::INFINITY,
        f32::MIN_POSITIVE / 3.0,
    ];
    let src: Vec<f32> = (0..n)
        .map(|i| match i % 4 {
            // A tie of bf16 rounding: the 16 dropped bits exactly half an ulp.
            0 => f32::from_bits((rng.random::<u32>() & 0x7fff_0000 & !0x7f80_0000 | 0x3f80_0000) | 0x8000),
            1 => special[(i / 4) % special.len()],
            _ => 1e3 * rng.random_range(-1.0f32..1.0),
        })
        .collect();
    let context = |e: &dyn std::fmt::Display| format!("{} cast {:?} n={n} seed {seed}: {e}", backend.name(), T::DTYPE);
    let run = || -> Result<Vec<T>, KernelError> {
        let dev_src = backend.upload(&src)?;
        let mut out = backend.upload(&vec![T::poison(); n])?;
        elementwise::launch_cast::<T, B>(backend, &dev_src, &mut out)?;
        backend.download(&out)
    };
    let out = run().map_err(|e| context(&e))?;
    for (i, (&x, got)) in src.iter().zip(&out).enumerate() {
        let want = T::from_f32(x);
        if bytemuck::bytes_of(got) != bytemuck::bytes_of(&want) {
            return Err(context(&format!("out[{i}] = {got:?}, want {want:?} (from {x:e})")));
        }
    }
    Ok(())
}

/// bias_add (y += b broadcast over rows) on `backend`.
fn check_bias_add<T: Element, B: Backend>(backend: &B, shape: &RowsShape, seed: u64) -> Result<(), String> {
    let RowsShape { rows, d } = *shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb1a);
    let (y0, b): (Vec<T>, Vec<T>) = (random(&mut rng, rows * d, 3.0), random(&mut rng, d, 3.0));
    let context =
        |e: &dyn std::fmt::Display| format!("{} bias add {:?} {shape:?} seed {seed}: {e}", backend.name(), T::DTYPE);
    let run = || -> Result<Vec<T>, KernelError> {
        let dev_b = backend.upload(&b)?;
        let mut y = backend.upload(&y0)?;
        elementwise::launch_bias_add::<T, B>(backend, shape, &dev_b, &mut y)?;
        backend.download(&y)
    };
    let y = run().map_err(|e| context(&e))?;
    let (y64, b64) = (f64s(&y0), f64s(&b));
    let want = elementwise::reference_bias_add(shape, &y64, &b64);
    let bounds: Vec<f64> = (0..rows * d)
        .map(|i| 2.0 * UNIT_ROUNDOFF_F32 * (y64[i].abs() + b64[i % d].abs()) + 1e-30)
        .collect();
    let cpu: Vec<f64> = (0..rows * d)
        .map(|i| round::<T>(y0[i].to_f32() + b[i % d].to_f32()))
        .collect();
    check_output::<T>("y", &f64s(&y), &want, &cpu, &bounds).map_err(|e| context(&e))?;
    Ok(())
}

/// The bias gradient of `variant` on `backend`; returns ∂b for the determinism check.
fn check_bias_grad<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &RowsShape,
    seed: u64,
) -> Result<Vec<T>, String> {
    let RowsShape { rows, d } = *shape;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xb1a5);
    let dy: Vec<T> = random(&mut rng, rows * d, 1.0);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} bias grad {variant:?} {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<Vec<T>, KernelError> {
        let dev_dy = backend.upload(&dy)?;
        let mut db = backend.upload(&vec![T::poison(); d])?;
        // Unwritten: the harness fails a kernel that reads the workspace before writing it.
        let work_len = elementwise::workspace_len(variant, shape);
        let mut work = if work_len > 0 {
            Some(backend.alloc::<f32>(work_len)?)
        } else {
            None
        };
        elementwise::launch_bias_grad::<T, B>(backend, variant, shape, &dev_dy, &mut db, work.as_mut())?;
        backend.download(&db)
    };
    let db = run().map_err(|e| context(&e))?;
    let dy64 = f64s(&dy);
    let want = elementwise::reference_bias_grad(shape, &dy64);
    let bounds: Vec<f64> = (0..d)
        .map(|j| {
            let magnitude: f64 = (0..rows).map(|r| dy64[r * d + j].abs()).sum();
            2.0 * (rows as f64 + 8.0) * UNIT_ROUNDOFF_F32 * magnitude + 1e-30
        })
        .collect();
    let cpu: Vec<f64> = (0..d)
        .map(|j| round::<T>((0..rows).map(|r| dy[r * d + j].to_f32()).sum()))
        .collect();
    check_output::<T>("db", &f64s(&db), &want, &cpu, &bounds).map_err(|e| context(&e))?;
    Ok(db)
}

fn check_all<B: Backend>(backend: &B, shape: &RowsShape, seed: u64) -> Result<(), String> {
    check_gelu::<f32, B>(backend, shape, seed)?;
    check_gelu::<half::bf16, B>(backend, shape, seed)?;
    check_adds::<f32, B>(backend, shape.rows * shape.d, seed)?;
    check_adds::<half::bf16, B>(backend, shape.rows * shape.d, seed)?;
    check_cast::<f32, B>(backend, shape.rows * shape.d, seed)?;
    check_cast::<half::bf16, B>(backend, shape.rows * shape.d, seed)?;
    check_bias_add::<f32, B>(backend, shape, seed)?;
    check_bias_add::<half::bf16, B>(backend, shape, seed)?;
    for &variant in elementwise::ALL {
        check_bias_grad::<f32, B>(backend, variant, shape, seed)?;
        check_bias_grad::<half::bf16, B>(backend, variant, shape, seed)?;
    }
    Ok(())
}

/// The GELU backward reference and the bias gradient over it against f64 central differences of
/// the forward reference, for `L = Σ ∂y ∘ gelu(x + b)`: ∂L/∂x = ∂x, ∂L/∂b = Σ_rows ∂x.
#[test]
fn reference_backward_matches_finite_differences() {
    for (i, &(rows, d)) in [(1, 1), (1, 7), (3, 17), (5, 4)].iter().enumerate() {
        let shape = RowsShape { rows, d };
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let (x, b, dy): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            random(&mut rng, rows * d, 4.0),
            random(&mut rng, d, 1.0),
            random(&mut rng, rows * d, 1.0),
        );
        let (x, b, dy) = (f64s(&x), f64s(&b), f64s(&dy));
        let loss = |x: &[f64], b: &[f64]| -> f64 {
            let y = elementwise::reference_gelu_bias_forward(&shape, x, b);
            y.iter().zip(&dy).map(|(a, g)| a * g).sum()
        };
        let dx = elementwise::reference_gelu_bias_backward(&shape, &dy, &x, &b);
        let db = elementwise::reference_bias_grad(&shape, &dx);
        let h = 1e-6;
        let central = |v: &[f64], at: usize, eval: &dyn Fn(&[f64]) -> f64| {
            let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
            plus[at] += h;
            minus[at] -= h;
            (eval(&plus) - eval(&minus)) / (2.0 * h)
        };
        let fd_x: Vec<f64> = (0..x.len()).map(|k| central(&x, k, &|v| loss(v, &b))).collect();
        let fd_b: Vec<f64> = (0..d).map(|k| central(&b, k, &|v| loss(&x, v))).collect();
        // Truncation O(h²·|gelu'''|) and cancellation ~1e-16·|L|/h: both far below 1e-7 here.
        let tol = Tol::new(1e-7, 1e-7);
        compare("dx", &dx, &fd_x, tol)
            .map_err(|e| format!("{shape:?}: {e}"))
            .unwrap();
        compare("db", &db, &fd_b, tol)
            .map_err(|e| format!("{shape:?}: {e}"))
            .unwrap();
    }
}

#[test]
fn harness_every_kernel_shape_and_thread_order() {
    for &seed in SEEDS {
        let harness = CpuHarness::new(seed);
        for &(rows, d) in SHAPES {
            check_all(&harness, &RowsShape { rows, d }, seed).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// ∂b is a fixed-order sum: the same bits in every thread and block order.
#[test]
fn harness_bias_grad_is_deterministic() {
    let shape = RowsShape { rows: 300, d: 65 };
    for &variant in elementwise::ALL {
        let bits = |seed: u64| -> Vec<u32> {
            let db =
                check_bias_grad::<f32, _>(&CpuHarness::new(seed), variant, &shape, 5).unwrap_or_else(|e| panic!("{e}"));
            db.iter().map(|v| v.to_bits()).collect()
        };
        let first = bits(0);
        for seed in [1, 2, 3] {
            assert_eq!(
                bits(seed),
                first,
                "{variant:?}: ∂b differs between thread orders 0 and {seed}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    let partial = gpu
        .function(&elementwise::kernel(Entry::BiasGradPartial, DType::F32).unwrap())
        .unwrap();
    assert_eq!(
        partial.shared_size_bytes().unwrap() as u32,
        elementwise::PARTIAL_SHARED_BYTES
    );
    for (i, &(rows, d)) in SHAPES.iter().enumerate() {
        check_all(&gpu, &RowsShape { rows, d }, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    for &(rows, d) in &[(4096, 3072), (1000, 4097), (70_000, 3)] {
        check_all(&gpu, &RowsShape { rows, d }, 9).unwrap_or_else(|e| panic!("{e}"));
    }
}
