//! AdamW and global-norm clipping kernels (`kernels::optim`) against their f64 references
//! through the CPU harness in several thread orders, f32 and bf16 gradients, tensors of odd
//! sizes with gaps between them (elements outside every tensor must stay untouched), and the
//! same bodies on the GPU in an `#[ignore]`d test. AdamW has no backward (no finite-difference
//! test); each step is checked against the reference applied to the kernel's own previous state,
//! so every step's error is measured alone.

mod kernel_tol;

use kernel_tol::{stored, wide, within_twice_cpu, U32};
use lora_compose::check::compare_with;
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::optim::{self, AdamParams, TensorSpan, TensorTable};
use lora_compose::kernels::{Backend, DType, Element};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Tensors of 1, 7, 17, 100, 385, 3 and 45 elements with gaps of 0–3 elements between them,
/// decay on every other one, listed out of order.
fn layout(rng: &mut ChaCha8Rng) -> (Vec<TensorSpan>, usize) {
    let mut spans = Vec::new();
    let mut at = rng.random_range(0..3);
    for (i, len) in [1, 7, 17, 100, 385, 3, 45].into_iter().enumerate() {
        spans.push(TensorSpan {
            offset: at,
            len,
            decay: i % 2 == 0,
        });
        at += len + rng.random_range(0..4);
    }
    spans.swap(0, 4);
    (spans, at)
}

fn uniform(rng: &mut ChaCha8Rng, len: usize, scale: f64) -> Vec<f64> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

fn to_f32s(xs: &[f64]) -> Vec<f32> {
    xs.iter().map(|&x| x as f32).collect()
}

fn download_f64<B: Backend>(backend: &B, buffer: &B::Buffer<f32>) -> Result<Vec<f64>, String> {
    Ok(backend
        .download(buffer)
        .map_err(|e| e.to_string())?
        .iter()
        .map(|&x| f64::from(x))
        .collect())
}

fn adamw_case<G: Element, B: Backend>(backend: &B, data_seed: u64) -> Result<(), String> {
    let context =
        |e: &dyn std::fmt::Display| format!("{} {:?} grads, data seed {data_seed}: {e}", backend.name(), G::DTYPE);
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let (spans, total) = layout(&mut rng);
    let table = TensorTable::upload(backend, &spans, total).map_err(|e| context(&e))?;
    let mut params = to_f32s(&uniform(&mut rng, total, 1.0));
    let mut dev_params = backend.upload(&params).map_err(|e| context(&e))?;
    let mut dev_m = backend.upload(&vec![0.0f32; total]).map_err(|e| context(&e))?;
    let mut dev_v = backend.upload(&vec![0.0f32; total]).map_err(|e| context(&e))?;
    let (mut m, mut v) = (vec![0.0; total], vec![0.0; total]);
    for step in 1..=4u64 {
        let context = |e: &dyn std::fmt::Display| context(&format!("step {step}: {e}"));
        let hp = AdamParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step,
        };
        // Gradients of all sizes, some exactly zero (v may stay 0: the ε path).
        let grads: Vec<G> = (0..total)
            .map(|i| {
                G::from_f32(if i % 11 == 0 {
                    0.0
                } else {
                    rng.random_range(-2.0f32..2.0)
                })
            })
            .collect();
        let dev_grads = backend.upload(&grads).map_err(|e| context(&e))?;
        let g = wide(&grads);
        let x: Vec<f64> = params.iter().map(|&p| f64::from(p)).collect();
        let want = optim::adamw_reference(&hp, &spans, &x, &g, &m, &v);
        optim::adamw::<G, B>(
            backend,
            &hp,
            &table,
            &mut dev_params,
            &dev_grads,
            &mut dev_m,
            &mut dev_v,
        )
        .map_err(|e| context(&e))?;
        let got_params = download_f64(backend, &dev_params)?;
        let got_m = download_f64(backend, &dev_m)?;
        let got_v = download_f64(backend, &dev_v)?;
        // Error bounds of the f32 step (each product, sum and quotient at most u relative; the
        // f32 roundings of 1 − β, c1, c2 and the hyper-parameters a few u more):
        //   m: 4u·(β1|m| + (1 − β1)|g|), v: 5u·(β2 v + (1 − β2) g²);
        //   x: 4u·(|x| + lr·λ|x|) + lr·|update|·(12u + err_m/|m'| + err_v/(2v')).
        let (b1, b2) = (hp.beta1, hp.beta2);
        let err_m = |i: usize| 4.0 * U32 * (b1 * m[i].abs() + (1.0 - b1) * g[i].abs());
        let err_v = |i: usize| 5.0 * U32 * (b2 * v[i] + (1.0 - b2) * g[i] * g[i]);
        let (c1, c2) = hp.bias_corrections();
        let bound_x = |i: usize| {
            let update = (want.m[i] / c1) / ((want.v[i] / c2).sqrt() + hp.eps);
            let rel_m = if want.m[i] != 0.0 {
                err_m(i) / want.m[i].abs()
            } else {
                0.0
            };
            let rel_v = if want.v[i] != 0.0 {
                err_v(i) / (2.0 * want.v[i])
            } else {
                0.0
            };
            4.0 * U32 * x[i].abs() * (1.0 + hp.lr * hp.weight_decay)
                + hp.lr * update.abs() * (12.0 * U32 + rel_m + rel_v)
                + 1e-30
        };
        compare_with("m", &got_m, &want.m, err_m).map_err(|e| context(&e))?;
        compare_with("v", &got_v, &want.v, err_v).map_err(|e| context(&e))?;
        compare_with("params", &got_params, &want.params, bound_x).map_err(|e| context(&e))?;
        // Continue from the kernel's own state.
        params = to_f32s(&got_params);
        m = got_m;
        v = got_v;
    }
    Ok(())
}

fn clip_case<G: Element, B: Backend>(backend: &B, max_norm: Option<f32>, data_seed: u64) -> Result<(), String> {
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} {:?} grads, max_norm {max_norm:?}, data seed {data_seed}: {e}",
            backend.name(),
            G::DTYPE
        )
    };
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let (spans, total) = layout(&mut rng);
    let table = TensorTable::upload(backend, &spans, total).map_err(|e| context(&e))?;
    let grads: Vec<G> = (0..total)
        .map(|_| G::from_f32(rng.random_range(-1.0f32..1.0)))
        .collect();
    let g = wide(&grads);
    let (want_norm, want) = optim::clip_reference(&spans, &g, max_norm.map(f64::from));
    let mut dev_grads = backend.upload(&grads).map_err(|e| context(&e))?;
    let mut partials = backend.alloc::<f32>(table.partials_len()).map_err(|e| context(&e))?;
    let mut norm_scale = backend.alloc::<f32>(2).map_err(|e| context(&e))?;
    optim::clip_grad_norm::<G, B>(
        backend,
        &table,
        &mut dev_grads,
        max_norm,
        &mut partials,
        &mut norm_scale,
    )
    .map_err(|e| context(&e))?;
    let got = wide(&backend.download(&dev_grads).map_err(|e| context(&e))?);
    let ns = backend.download(&norm_scale).map_err(|e| context(&e))?;
    // Σ g² over P elements in f32 (any order): (P + 2)·u relative; the square root halves it.
    let elements: usize = spans.iter().map(|s| s.len).sum();
    let norm_bound = (elements as f64 + 4.0) * U32 * want_norm;
    compare_with("norm", &[f64::from(ns[0])], &[want_norm], |_| norm_bound).map_err(|e| context(&e))?;
    let rel_scale = (elements as f64 + 8.0) * U32;
    if G::DTYPE == DType::F32 {
        // g·s: s carries the norm's relative error, the product one rounding more.
        compare_with("clipped grads", &got, &want, |i| (rel_scale + U32) * want[i].abs()).map_err(|e| context(&e))?;
    } else {
        // The same math on the CPU: an f32 scale from an f64 norm, g·s in f32, rounded to G.
        let scale = match max_norm {
            Some(mx) if want_norm > f64::from(mx) && want_norm > 0.0 => (f64::from(mx) / want_norm) as f32,
            _ => 1.0,
        };
        let mut cpu = g.clone();
        for s in &spans {
            for i in s.offset..s.offset + s.len {
                cpu[i] = stored::<G>(grads[i].to_f32() * scale);
            }
        }
        within_twice_cpu("clipped grads", &got, &want, &cpu, rel_scale).map_err(|e| context(&e))?;
    }
    // Outside the tensors nothing changes, bit for bit.
    let inside = |i: usize| spans.iter().any(|s| (s.offset..s.offset + s.len).contains(&i));
    if let Some(i) = (0..total).find(|&i| !inside(i) && got[i].to_bits() != g[i].to_bits()) {
        return Err(context(&format!("element {i} outside every tensor changed")));
    }
    Ok(())
}

fn check_all<B: Backend>(backend: &B, data_seed: u64) -> Result<(), String> {
    adamw_case::<f32, B>(backend, data_seed)?;
    adamw_case::<half::bf16, B>(backend, data_seed)?;
    // Clipping (norm ≈ 13), not clipping, and the norm alone.
    for max_norm in [Some(1.0), Some(1e6), None] {
        clip_case::<f32, B>(backend, max_norm, data_seed)?;
        clip_case::<half::bf16, B>(backend, max_norm, data_seed)?;
    }
    Ok(())
}

#[test]
fn harness_matches_reference_in_several_thread_orders() {
    for seed in [0, 1, 2, 3, 11] {
        check_all(&CpuHarness::new(seed), seed).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn the_reference_is_the_cpu_models_adamw_formula() {
    // Step 1 from zero moments: m̂ = g, v̂ = g², so x' = x(1 − lr·λ) − lr·g/(|g| + ε).
    let hp = AdamParams {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.5,
        step: 1,
    };
    let spans = [TensorSpan {
        offset: 0,
        len: 2,
        decay: true,
    }];
    let out = optim::adamw_reference(&hp, &spans, &[1.0, -2.0], &[0.5, -3.0], &[0.0; 2], &[0.0; 2]);
    let want = [
        1.0 * 0.95 - 0.1 * 0.5 / (0.5 + 1e-8),
        -2.0 * 0.95 + 0.1 * 3.0 / (3.0 + 1e-8),
    ];
    compare_with("x", &out.params, &want, |_| 1e-15).unwrap();
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
