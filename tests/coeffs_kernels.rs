//! Coefficient softmax kernels (`kernels::coeffs`): the f64 backward reference against f64
//! central differences, then every variant against the references through the CPU harness in
//! several thread orders (outputs poisoned with NaN), and on the GPU in an `#[ignore]`d test.
//! Storage is f32 only, so every tolerance is an f32 error bound (comments at each).

mod kernel_tol;

use kernel_tol::U32;
use lora_compose::check::compare_with;
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::coeffs::{self, Shape, ALL};
use lora_compose::kernels::Backend;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn backward_reference_matches_finite_differences() {
    for (seed, (rows, n)) in [(1, 1), (3, 2), (4, 10), (2, 45)].into_iter().enumerate() {
        let shape = Shape { rows, n };
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
        let v: Vec<f64> = (0..rows * n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let dc: Vec<f64> = (0..rows * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        let analytic = coeffs::softmax_backward_reference(&shape, &v, &dc);
        let mut x = v.clone();
        let numeric: Vec<f64> = (0..v.len())
            .map(|i| {
                let h = 1e-5;
                let loss = |x: &[f64]| -> f64 {
                    coeffs::softmax_reference(&shape, x)
                        .iter()
                        .zip(&dc)
                        .map(|(c, d)| c * d)
                        .sum()
                };
                x[i] = v[i] + h;
                let up = loss(&x);
                x[i] = v[i] - h;
                let down = loss(&x);
                x[i] = v[i];
                (up - down) / (2.0 * h)
            })
            .collect();
        compare_with("dv vs finite differences", &analytic, &numeric, |_| 1e-9)
            .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
    }
}

fn case<B: Backend>(backend: &B, shape: &Shape, scale: f32, data_seed: u64) -> Result<(), String> {
    let Shape { rows, n } = *shape;
    let context =
        |e: &dyn std::fmt::Display| format!("{} {shape:?} scale {scale} data seed {data_seed}: {e}", backend.name());
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let v: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    let dc: Vec<f32> = (0..rows * n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let v64: Vec<f64> = v.iter().map(|&x| f64::from(x)).collect();
    let dc64: Vec<f64> = dc.iter().map(|&x| f64::from(x)).collect();
    let want_c = coeffs::softmax_reference(shape, &v64);
    let want_dv = coeffs::softmax_backward_reference(shape, &v64, &dc64);
    let row_max: Vec<f64> = v64
        .chunks(n)
        .map(|r| r.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    // c_i = exp(v_i − m)/z: the rounding of v_i − m amplified by |v_i − m|, z's sum (n − 1)·u,
    // CUDA's expf within 2 ulp, the quotient: 4·(n + 16 + |v − m|)·u relative. Plus f32's
    // smallest normal for values that underflow.
    let rel_c = |i: usize| 4.0 * (n as f64 + 16.0 + (v64[i] - row_max[i / n]).abs()) * U32;
    let bound_c = |i: usize| rel_c(i) * want_c[i] + f64::from(f32::MIN_POSITIVE);
    // dv_i = c_i (dc_i − ⟨dc, c⟩): c's relative error, the dot's n·u·Σ|dc_k c_k| (plus c's errors
    // inside it), the subtraction and product: (n + 4)u and rel_c over c_i(|dc_i| + Σ|dc_k|c_k).
    let row_dot_mag: Vec<f64> = (0..rows)
        .map(|r| (0..n).map(|k| (dc64[r * n + k] * want_c[r * n + k]).abs()).sum())
        .collect();
    let max_rel_c: Vec<f64> = (0..rows)
        .map(|r| (0..n).map(|k| rel_c(r * n + k)).fold(0.0, f64::max))
        .collect();
    let bound_dv = |i: usize| {
        let r = i / n;
        (n as f64 + 4.0 + 1.0) * U32 * want_c[i] * (dc64[i].abs() + row_dot_mag[r])
            + rel_c(i) * want_dv[i].abs()
            + want_c[i] * max_rel_c[r] * row_dot_mag[r]
            + f64::from(f32::MIN_POSITIVE)
    };
    for &variant in ALL {
        let context = |e: &dyn std::fmt::Display| context(&format!("{variant:?}: {e}"));
        let dev_v = backend.upload(&v).map_err(|e| context(&e))?;
        let dev_dc = backend.upload(&dc).map_err(|e| context(&e))?;
        let mut dev_c = backend.upload(&vec![f32::NAN; rows * n]).map_err(|e| context(&e))?;
        let mut dev_dv = backend.upload(&vec![f32::NAN; rows * n]).map_err(|e| context(&e))?;
        coeffs::softmax(backend, variant, shape, &dev_v, &mut dev_c).map_err(|e| context(&e))?;
        coeffs::softmax_backward(backend, variant, shape, &dev_c, &dev_dc, &mut dev_dv).map_err(|e| context(&e))?;
        let got_c: Vec<f64> = backend
            .download(&dev_c)
            .map_err(|e| context(&e))?
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        let got_dv: Vec<f64> = backend
            .download(&dev_dv)
            .map_err(|e| context(&e))?
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        compare_with("c", &got_c, &want_c, bound_c).map_err(|e| context(&e))?;
        compare_with("dv", &got_dv, &want_dv, bound_dv).map_err(|e| context(&e))?;
    }
    Ok(())
}

/// Layers × modules: one layer, 7 and 17 layers, 100 rows; N = 1 (c = 1, dv = 0), 3, 10, 45,
/// 385 (past a warp many times), one large-valued case (exp would overflow without the max).
const SHAPES: &[(usize, usize, f32)] = &[
    (1, 1, 1.0),
    (1, 3, 1.0),
    (7, 10, 2.0),
    (17, 45, 1.0),
    (100, 3, 3.0),
    (9, 385, 1.0),
    (5, 33, 100.0),
];

fn check_all<B: Backend>(backend: &B, data_seed: u64) -> Result<(), String> {
    for (i, &(rows, n, scale)) in SHAPES.iter().enumerate() {
        case(backend, &Shape { rows, n }, scale, data_seed + i as u64)?;
    }
    Ok(())
}

#[test]
fn harness_matches_reference_in_several_thread_orders() {
    for seed in [0, 1, 2, 3, 23] {
        check_all(&CpuHarness::new(seed), seed).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    for seed in [0, 1, 2, 3] {
        check_all(&gpu, seed).unwrap_or_else(|e| panic!("{e}"));
    }
}
