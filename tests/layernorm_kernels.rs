//! Layer norm kernels (`cuda/layernorm.cu`) against the f64 references in
//! `kernels::layernorm`: first the backward reference against central finite differences of the
//! forward reference, then every variant × storage type × shape × thread order through the CPU
//! harness, and the same bodies through the GPU in `gpu_matches_reference` (`#[ignore]`d: it
//! needs a CUDA GPU and fails when the GPU is not usable).
//!
//! Tolerances come from the numerics (u = 2⁻²⁴, n the length of the longest sum):
//! - f32: per element `2·(n + 8)·u·m`, with m the magnitude of the terms behind that element
//!   (a forward error bound of f32 sums in any order, the rsqrt and the epilogue);
//! - bf16: the kernel's largest error against f64 must be at most twice the largest error of the
//!   same math done on the CPU (f32 arithmetic on the bf16 inputs, outputs rounded to bf16) plus
//!   the f32 floor, and no element may be off by more than one bf16 ulp plus that floor. mean and
//!   rstd are f32 in every storage type and are held to the f32 bound.

use lora_compose::check::{compare, compare_with, Tol};
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::layernorm::{self, Entry, LnShape, Variant};
use lora_compose::kernels::{Backend, DType, Element};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const UNIT_ROUNDOFF_F32: f64 = 1.0 / (1u64 << 24) as f64;
const EPS: f32 = 1e-5;

/// Odd widths, widths past one warp and past one block, single rows and columns, several
/// ∂γ/∂β row chunks (64 rows each).
const SHAPES: &[(usize, usize)] = &[
    (1, 1),
    (1, 7),
    (7, 17),
    (17, 33),
    (33, 100),
    (100, 385),
    (33, 768),
    (130, 33),
    (200, 1),
    (5, 1025),
];
const SEEDS: &[u64] = &[0, 1, 2, 3, 11];

fn f64s<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| f64::from(x.to_f32())).collect()
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

/// f32 forward error bound of a quantity made from sums of n terms of total magnitude m.
fn f32_bound(n: usize, m: f64) -> f64 {
    2.0 * (n as f64 + 8.0) * UNIT_ROUNDOFF_F32 * m + 1e-30
}

struct Inputs<T> {
    x: Vec<T>,
    gamma: Vec<T>,
    beta: Vec<T>,
    dy: Vec<T>,
}

/// Rows off-centre by a per-seed offset (so the two-pass statistics matter), γ of both signs.
fn inputs<T: Element>(shape: &LnShape, seed: u64) -> Inputs<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let offset = [0.0f32, 3.0, -10.0, 0.5][seed as usize % 4];
    let mut values = |n: usize, lo: f32, hi: f32, shift: f32| -> Vec<T> {
        (0..n).map(|_| T::from_f32(shift + rng.random_range(lo..hi))).collect()
    };
    let (rows, d) = (shape.rows, shape.d);
    Inputs {
        x: values(rows * d, -2.0, 2.0, offset),
        gamma: values(d, -1.5, 1.5, 0.0),
        beta: values(d, -1.0, 1.0, 0.0),
        dy: values(rows * d, -1.0, 1.0, 0.0),
    }
}

/// The forward as the kernels do it, on the CPU: f32 arithmetic on the stored inputs, y rounded
/// to T. Returns y as f64.
fn cpu_f32_forward<T: Element>(shape: &LnShape, inp: &Inputs<T>) -> Vec<f64> {
    let LnShape { rows, d } = *shape;
    let f = |v: &[T], i: usize| v[i].to_f32();
    let mut y = vec![0.0; rows * d];
    for r in 0..rows {
        let mu = (0..d).map(|j| f(&inp.x, r * d + j)).sum::<f32>() / d as f32;
        let var = (0..d).map(|j| (f(&inp.x, r * d + j) - mu).powi(2)).sum::<f32>() / d as f32;
        let rs = 1.0 / (var + EPS).sqrt();
        for j in 0..d {
            let v = (f(&inp.x, r * d + j) - mu) * rs * f(&inp.gamma, j) + f(&inp.beta, j);
            y[r * d + j] = f64::from(T::from_f32(v).to_f32());
        }
    }
    y
}

/// The backward as the kernels do it, on the CPU, given f32 statistics: ∂x, ∂γ, ∂β rounded to T.
fn cpu_f32_backward<T: Element>(shape: &LnShape, inp: &Inputs<T>, mean: &[f32], rstd: &[f32]) -> [Vec<f64>; 3] {
    let LnShape { rows, d } = *shape;
    let f = |v: &[T], i: usize| v[i].to_f32();
    let round = |v: f32| f64::from(T::from_f32(v).to_f32());
    let mut dx = vec![0.0; rows * d];
    let (mut dgamma, mut dbeta) = (vec![0.0f32; d], vec![0.0f32; d]);
    for r in 0..rows {
        let xhat = |j: usize| (f(&inp.x, r * d + j) - mean[r]) * rstd[r];
        let g = |j: usize| f(&inp.dy, r * d + j) * f(&inp.gamma, j);
        let mean_g = (0..d).map(g).sum::<f32>() / d as f32;
        let mean_gx = (0..d).map(|j| g(j) * xhat(j)).sum::<f32>() / d as f32;
        for j in 0..d {
            dx[r * d + j] = round((g(j) - mean_g - xhat(j) * mean_gx) * rstd[r]);
            dgamma[j] += f(&inp.dy, r * d + j) * xhat(j);
            dbeta[j] += f(&inp.dy, r * d + j);
        }
    }
    [
        dx,
        dgamma.into_iter().map(round).collect(),
        dbeta.into_iter().map(round).collect(),
    ]
}

/// Checks one output: the f32 bound per element for f32 storage; for bf16, one ulp plus the f32
/// bound per element and at most twice the CPU's low-precision error overall.
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

/// The forward of `variant` on `backend` against the reference; returns the kernel's mean and
/// rstd for the backward's determinism check.
fn check_forward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &LnShape,
    seed: u64,
) -> Result<(), String> {
    let LnShape { rows, d } = *shape;
    let inp = inputs::<T>(shape, seed);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} forward {variant:?} {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let run = || -> Result<[Vec<f64>; 3], lora_compose::kernels::KernelError> {
        let x = backend.upload(&inp.x)?;
        let gamma = backend.upload(&inp.gamma)?;
        let beta = backend.upload(&inp.beta)?;
        let mut y = backend.upload(&vec![T::poison(); rows * d])?;
        let mut mean = backend.upload(&vec![f32::NAN; rows])?;
        let mut rstd = backend.upload(&vec![f32::NAN; rows])?;
        layernorm::launch_forward::<T, B>(
            backend, variant, shape, EPS, &x, &gamma, &beta, &mut y, &mut mean, &mut rstd,
        )?;
        Ok([
            f64s(&backend.download(&y)?),
            f64s(&backend.download(&mean)?),
            f64s(&backend.download(&rstd)?),
        ])
    };
    let [y, mean, rstd] = run().map_err(|e| context(&e))?;

    let (x, gamma, beta) = (f64s(&inp.x), f64s(&inp.gamma), f64s(&inp.beta));
    let [want_y, want_mean, want_rstd] = layernorm::reference_forward(shape, &x, &gamma, &beta, f64::from(EPS));
    let mean_abs: Vec<f64> = (0..rows)
        .map(|r| x[r * d..(r + 1) * d].iter().map(|v| v.abs()).sum::<f64>() / d as f64)
        .collect();
    let y_bounds: Vec<f64> = (0..rows * d)
        .map(|i| {
            let (r, j) = (i / d, i % d);
            let centred = mean_abs[r] + (x[i] - want_mean[r]).abs();
            f32_bound(d, want_rstd[r] * gamma[j].abs() * centred + beta[j].abs())
        })
        .collect();
    let mean_bounds: Vec<f64> = mean_abs.iter().map(|&m| f32_bound(d, m)).collect();
    let rstd_bounds: Vec<f64> = want_rstd.iter().map(|&r| f32_bound(d, r)).collect();
    let cpu_y = cpu_f32_forward(shape, &inp);
    check_output::<T>("y", &y, &want_y, &cpu_y, &y_bounds).map_err(|e| context(&e))?;
    check_output::<f32>("mean", &mean, &want_mean, &[], &mean_bounds).map_err(|e| context(&e))?;
    check_output::<f32>("rstd", &rstd, &want_rstd, &[], &rstd_bounds).map_err(|e| context(&e))?;
    Ok(())
}

/// The backward of `variant` on `backend` against the reference, given the reference's
/// statistics rounded to f32 (as the forward saves them). Returns ∂γ's bits, for the
/// determinism check.
fn check_backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &LnShape,
    seed: u64,
) -> Result<Vec<T>, String> {
    let LnShape { rows, d } = *shape;
    let inp = inputs::<T>(shape, seed);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} backward {variant:?} {:?} {shape:?} seed {seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let (x, gamma, beta, dy) = (f64s(&inp.x), f64s(&inp.gamma), f64s(&inp.beta), f64s(&inp.dy));
    let [_, mean64, rstd64] = layernorm::reference_forward(shape, &x, &gamma, &beta, f64::from(EPS));
    let mean: Vec<f32> = mean64.iter().map(|&v| v as f32).collect();
    let rstd: Vec<f32> = rstd64.iter().map(|&v| v as f32).collect();

    let run = || -> Result<[Vec<T>; 3], lora_compose::kernels::KernelError> {
        let dev_dy = backend.upload(&inp.dy)?;
        let dev_x = backend.upload(&inp.x)?;
        let dev_gamma = backend.upload(&inp.gamma)?;
        let dev_mean = backend.upload(&mean)?;
        let dev_rstd = backend.upload(&rstd)?;
        let mut dx = backend.upload(&vec![T::poison(); rows * d])?;
        let mut dgamma = backend.upload(&vec![T::poison(); d])?;
        let mut dbeta = backend.upload(&vec![T::poison(); d])?;
        // Unwritten: the harness fails a kernel that reads the workspace before writing it.
        let work_len = layernorm::workspace_len(variant, shape);
        let mut work = if work_len > 0 {
            Some(backend.alloc::<f32>(work_len)?)
        } else {
            None
        };
        layernorm::launch_backward::<T, B>(
            backend,
            variant,
            shape,
            &dev_dy,
            &dev_x,
            &dev_gamma,
            &dev_mean,
            &dev_rstd,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
            work.as_mut(),
        )?;
        Ok([
            backend.download(&dx)?,
            backend.download(&dgamma)?,
            backend.download(&dbeta)?,
        ])
    };
    let [dx, dgamma, dbeta] = run().map_err(|e| context(&e))?;

    let (mean_f, rstd_f): (Vec<f64>, Vec<f64>) = (f64s(&mean), f64s(&rstd));
    let [want_dx, want_dgamma, want_dbeta] = layernorm::reference_backward(shape, &dy, &x, &gamma, &mean_f, &rstd_f);
    let g = |i: usize| (dy[i] * gamma[i % d]).abs();
    let xhat = |i: usize| ((x[i] - mean_f[i / d]) * rstd_f[i / d]).abs();
    let mut mean_g = vec![0.0; rows];
    let mut mean_gx = vec![0.0; rows];
    for i in 0..rows * d {
        mean_g[i / d] += g(i) / d as f64;
        mean_gx[i / d] += g(i) * xhat(i) / d as f64;
    }
    let dx_bounds: Vec<f64> = (0..rows * d)
        .map(|i| f32_bound(d, (g(i) + mean_g[i / d] + xhat(i) * mean_gx[i / d]) * rstd_f[i / d]))
        .collect();
    let (mut mag_gamma, mut mag_beta) = (vec![0.0; d], vec![0.0; d]);
    for i in 0..rows * d {
        mag_gamma[i % d] += (dy[i] * xhat(i)).abs();
        mag_beta[i % d] += dy[i].abs();
    }
    let dgamma_bounds: Vec<f64> = mag_gamma.iter().map(|&m| f32_bound(rows, m)).collect();
    let dbeta_bounds: Vec<f64> = mag_beta.iter().map(|&m| f32_bound(rows, m)).collect();
    let [cpu_dx, cpu_dgamma, cpu_dbeta] = cpu_f32_backward(shape, &inp, &mean, &rstd);
    check_output::<T>("dx", &f64s(&dx), &want_dx, &cpu_dx, &dx_bounds).map_err(|e| context(&e))?;
    check_output::<T>("dgamma", &f64s(&dgamma), &want_dgamma, &cpu_dgamma, &dgamma_bounds).map_err(|e| context(&e))?;
    check_output::<T>("dbeta", &f64s(&dbeta), &want_dbeta, &cpu_dbeta, &dbeta_bounds).map_err(|e| context(&e))?;
    Ok(dgamma)
}

fn check_all<B: Backend>(backend: &B, shape: &LnShape, seed: u64) -> Result<(), String> {
    for &variant in layernorm::ALL {
        check_forward::<f32, B>(backend, variant, shape, seed)?;
        check_forward::<half::bf16, B>(backend, variant, shape, seed)?;
        check_backward::<f32, B>(backend, variant, shape, seed)?;
        check_backward::<half::bf16, B>(backend, variant, shape, seed)?;
    }
    Ok(())
}

/// The backward reference against f64 central differences of the forward reference, for the
/// loss `L = Σ ∂y ∘ y` (so ∂L/∂y = ∂y): ∂x through the statistics, ∂γ and ∂β.
#[test]
fn reference_backward_matches_finite_differences() {
    for (i, &(rows, d)) in [(1, 1), (1, 7), (3, 17), (2, 33), (4, 5)].iter().enumerate() {
        let shape = LnShape { rows, d };
        let inp = inputs::<f32>(&shape, i as u64);
        let (x, gamma, beta, dy) = (f64s(&inp.x), f64s(&inp.gamma), f64s(&inp.beta), f64s(&inp.dy));
        let eps = 1e-5;
        let loss = |x: &[f64], gamma: &[f64], beta: &[f64]| -> f64 {
            let [y, _, _] = layernorm::reference_forward(&shape, x, gamma, beta, eps);
            y.iter().zip(&dy).map(|(a, b)| a * b).sum()
        };
        let [_, mean, rstd] = layernorm::reference_forward(&shape, &x, &gamma, &beta, eps);
        let [dx, dgamma, dbeta] = layernorm::reference_backward(&shape, &dy, &x, &gamma, &mean, &rstd);
        let h = 1e-6;
        let central = |v: &[f64], at: usize, eval: &dyn Fn(&[f64]) -> f64| {
            let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
            plus[at] += h;
            minus[at] -= h;
            (eval(&plus) - eval(&minus)) / (2.0 * h)
        };
        let fd_x: Vec<f64> = (0..x.len())
            .map(|k| central(&x, k, &|v| loss(v, &gamma, &beta)))
            .collect();
        let fd_gamma: Vec<f64> = (0..d).map(|k| central(&gamma, k, &|v| loss(&x, v, &beta))).collect();
        let fd_beta: Vec<f64> = (0..d).map(|k| central(&beta, k, &|v| loss(&x, &gamma, v))).collect();
        // Central differences: truncation O(h²) and cancellation ~1e-16·|L|/h, both below 1e-6
        // for these magnitudes (|L| < 100, derivatives of order rstd ≤ 1/sqrt(eps)).
        let tol = Tol::new(1e-6, 1e-6);
        let ctx = |e: String| format!("{shape:?}: {e}");
        compare("dx", &dx, &fd_x, tol).map_err(ctx).unwrap();
        compare("dgamma", &dgamma, &fd_gamma, tol).map_err(ctx).unwrap();
        compare("dbeta", &dbeta, &fd_beta, tol).map_err(ctx).unwrap();
    }
}

#[test]
fn harness_every_variant_shape_and_thread_order() {
    for &seed in SEEDS {
        let harness = CpuHarness::new(seed);
        for &(rows, d) in SHAPES {
            check_all(&harness, &LnShape { rows, d }, seed).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// ∂γ and ∂β are fixed-order sums: the same bits in every thread and block order.
#[test]
fn harness_param_grads_are_deterministic() {
    let shape = LnShape { rows: 300, d: 65 };
    for &variant in layernorm::ALL {
        let bits = |seed: u64| -> Vec<u32> {
            let grads =
                check_backward::<f32, _>(&CpuHarness::new(seed), variant, &shape, 5).unwrap_or_else(|e| panic!("{e}"));
            grads.iter().map(|g| g.to_bits()).collect()
        };
        let first = bits(0);
        for seed in [1, 2, 3] {
            assert_eq!(
                bits(seed),
                first,
                "{variant:?}: ∂γ differs between thread orders 0 and {seed}"
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    for &variant in layernorm::ALL {
        // The shared memory the driver reports must match what launch_config budgets.
        let function = gpu
            .function(&layernorm::kernel(Entry::Forward(variant), DType::F32).unwrap())
            .unwrap();
        assert_eq!(
            function.shared_size_bytes().unwrap() as u32,
            variant.row_shared_bytes(),
            "{variant:?}"
        );
    }
    let partial = gpu
        .function(&layernorm::kernel(Entry::ParamsPartial, DType::BF16).unwrap())
        .unwrap();
    assert_eq!(
        partial.shared_size_bytes().unwrap() as u32,
        layernorm::PARAM_PARTIAL_SHARED_BYTES
    );
    for (i, &(rows, d)) in SHAPES.iter().enumerate() {
        check_all(&gpu, &LnShape { rows, d }, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    for &(rows, d) in &[(4096, 768), (1000, 4097), (70_000, 3)] {
        check_all(&gpu, &LnShape { rows, d }, 9).unwrap_or_else(|e| panic!("{e}"));
    }
}
