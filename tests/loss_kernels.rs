//! Pooling and cross-entropy kernels (`kernels::loss`): first the f64 references' gradients
//! against f64 central differences, then every variant × storage type against the references
//! through the CPU harness in several thread orders (outputs poisoned with NaN, workspaces from
//! `Backend::alloc`), and the same bodies on the GPU in an `#[ignore]`d test.
//!
//! Tolerances: f32 outputs per element from the error bounds of the f32 math (comments at each);
//! bf16 outputs at most twice the error of the same math on the CPU in bf16
//! (`kernel_tol::within_twice_cpu`).

mod kernel_tol;

use kernel_tol::{stored, wide, within_twice_cpu, U32};
use lora_compose::check::compare_with;
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::loss::{self, Labels, PoolMode, PoolShape, XentShape, POOL_ALL, XENT_ALL};
use lora_compose::kernels::{Backend, DType, Element};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// ---- references against finite differences ---------------------------------------------------

/// Central differences of `f` at `x`, step `h` per coordinate.
fn numeric_gradient(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    (0..x.len())
        .map(|i| {
            let keep = x[i];
            x[i] = keep + h;
            let up = f(&x);
            x[i] = keep - h;
            let down = f(&x);
            x[i] = keep;
            (up - down) / (2.0 * h)
        })
        .collect()
}

#[test]
fn cross_entropy_reference_gradient_matches_finite_differences() {
    for (seed, (batch, classes)) in [(1, 3), (7, 10), (17, 45)].into_iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64);
        let shape = XentShape { batch, classes };
        let logits: Vec<f64> = (0..batch * classes).map(|_| rng.random_range(-3.0..3.0)).collect();
        let labels: Vec<usize> = (0..batch).map(|_| rng.random_range(0..classes)).collect();
        let analytic = loss::cross_entropy_reference(&shape, &logits, &labels).dlogits;
        let numeric = numeric_gradient(&logits, 1e-5, |x| {
            loss::cross_entropy_reference(&shape, x, &labels).mean_loss
        });
        compare_with("dlogits vs finite differences", &analytic, &numeric, |_| 1e-8)
            .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
    }
}

#[test]
fn pool_reference_gradient_matches_finite_differences() {
    for mode in [PoolMode::Cls, PoolMode::Mean] {
        let shape = PoolShape {
            batch: 3,
            seq: 5,
            hidden: 4,
            mode,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let h: Vec<f64> = (0..60).map(|_| rng.random_range(-1.0..1.0)).collect();
        // Row 1 fully padded: its pooled value is 0 and no gradient flows.
        let mask = [1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1];
        let weights: Vec<f64> = (0..12).map(|_| rng.random_range(-1.0..1.0)).collect();
        let analytic = loss::pool_backward_reference(&shape, &weights, &mask);
        let numeric = numeric_gradient(&h, 1e-5, |x| {
            let pooled = loss::pool_reference(&shape, x, &mask);
            pooled.iter().zip(&weights).map(|(p, w)| p * w).sum()
        });
        compare_with("dh vs finite differences", &analytic, &numeric, |_| 1e-9)
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    }
}

// ---- kernels against the references -----------------------------------------------------------

fn normal_values<T: Element>(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0) * scale))
        .collect()
}

/// Per sample a random number of real tokens from 0 (fully padded) to seq, at the front as the
/// batcher pads, sometimes scattered; real tokens are any non-zero value.
fn random_mask(rng: &mut ChaCha8Rng, batch: usize, seq: usize) -> Vec<i32> {
    let mut mask = vec![0; batch * seq];
    for b in 0..batch {
        let n = if b == 1 { 0 } else { rng.random_range(0..=seq) };
        let scattered = rng.random_bool(0.3);
        for t in 0..seq {
            let real = if scattered { rng.random_bool(0.5) } else { t < n };
            mask[b * seq + t] = if real { rng.random_range(1..3) } else { 0 };
        }
    }
    mask
}

fn pool_case<T: Element, B: Backend>(backend: &B, shape: &PoolShape, data_seed: u64) -> Result<(), String> {
    let PoolShape {
        batch,
        seq,
        hidden,
        mode,
    } = *shape;
    let context =
        |e: &dyn std::fmt::Display| format!("{} {:?} {shape:?} data seed {data_seed}: {e}", backend.name(), T::DTYPE);
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let h: Vec<T> = normal_values(&mut rng, batch * seq * hidden, 2.0);
    let dpooled: Vec<T> = normal_values(&mut rng, batch * hidden, 1.0);
    let mask = random_mask(&mut rng, batch, seq);
    let counts: Vec<usize> = mask
        .chunks(seq)
        .map(|m| m.iter().filter(|&&x| x != 0).count())
        .collect();
    let want = loss::pool_reference(shape, &wide(&h), &mask);
    let want_dh = loss::pool_backward_reference(shape, &wide(&dpooled), &mask);

    for &variant in POOL_ALL {
        let dev_h = backend.upload(&h).map_err(|e| context(&e))?;
        let dev_mask = backend.upload(&mask).map_err(|e| context(&e))?;
        let dev_dp = backend.upload(&dpooled).map_err(|e| context(&e))?;
        let mut dev_pooled = backend
            .upload(&vec![T::poison(); batch * hidden])
            .map_err(|e| context(&e))?;
        let mut dev_dh = backend
            .upload(&vec![T::poison(); batch * seq * hidden])
            .map_err(|e| context(&e))?;
        loss::pool_forward::<T, B>(backend, variant, shape, &dev_h, &dev_mask, &mut dev_pooled)
            .map_err(|e| context(&e))?;
        loss::pool_backward::<T, B>(backend, variant, shape, &dev_dp, &dev_mask, &mut dev_dh)
            .map_err(|e| context(&e))?;
        let got = wide(&backend.download(&dev_pooled).map_err(|e| context(&e))?);
        let got_dh = wide(&backend.download(&dev_dh).map_err(|e| context(&e))?);
        let context = |e: &dyn std::fmt::Display| context(&format!("{variant:?}: {e}"));
        if T::DTYPE == DType::F32 {
            // Mean: n − 1 additions and one multiplication by a rounded 1/n, each at most u
            // relative to the running sum of magnitudes: (n + 2)·u·Σ|h|/n. CLS copies: exact.
            let bound = |i: usize| {
                let (b, d) = (i / hidden, i % hidden);
                let n = counts[b];
                if mode == PoolMode::Cls || n == 0 {
                    return 0.0;
                }
                let mag: f64 = (0..seq)
                    .filter(|&t| mask[b * seq + t] != 0)
                    .map(|t| f64::from(h[(b * seq + t) * hidden + d].to_f32()).abs())
                    .sum();
                (n as f64 + 2.0) * U32 * mag / n as f64
            };
            compare_with("pooled", &got, &want, bound).map_err(|e| context(&e))?;
            // g · fl(1/n): two roundings.
            compare_with("dh", &got_dh, &want_dh, |i| 2.0 * U32 * want_dh[i].abs()).map_err(|e| context(&e))?;
        } else {
            // The same math on the CPU: f32 sums of the stored values, rounded once to T.
            let mut cpu = vec![0.0; batch * hidden];
            let mut cpu_dh = vec![0.0; batch * seq * hidden];
            for b in 0..batch {
                let n = counts[b];
                for d in 0..hidden {
                    let at = |t: usize| h[(b * seq + t) * hidden + d].to_f32();
                    let value = match mode {
                        PoolMode::Cls => at(0),
                        PoolMode::Mean if n == 0 => 0.0,
                        PoolMode::Mean => {
                            (0..seq).filter(|&t| mask[b * seq + t] != 0).map(at).sum::<f32>() * (1.0 / n as f32)
                        }
                    };
                    cpu[b * hidden + d] = stored::<T>(value);
                    let g = dpooled[b * hidden + d].to_f32();
                    for t in 0..seq {
                        let share = match mode {
                            PoolMode::Cls if t == 0 => g,
                            PoolMode::Mean if mask[b * seq + t] != 0 => g * (1.0 / n as f32),
                            _ => 0.0,
                        };
                        cpu_dh[(b * seq + t) * hidden + d] = stored::<T>(share);
                    }
                }
            }
            let floor = 4.0 * (seq as f64 + 2.0) * U32 * 2.0;
            within_twice_cpu("pooled", &got, &want, &cpu, floor).map_err(|e| context(&e))?;
            within_twice_cpu("dh", &got_dh, &want_dh, &cpu_dh, floor).map_err(|e| context(&e))?;
        }
    }
    Ok(())
}

/// The kernels' math on the CPU in f32, rounded to T where they store T: (row losses, dlogits).
fn xent_low_precision<T: Element>(shape: &XentShape, logits: &[T], labels: &[usize]) -> (Vec<f64>, Vec<f64>) {
    let XentShape { batch, classes } = *shape;
    let mut rows = vec![0.0; batch];
    let mut grad = vec![0.0; batch * classes];
    for r in 0..batch {
        let x: Vec<f32> = logits[r * classes..(r + 1) * classes]
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = x.iter().map(|v| (v - m).exp()).sum();
        rows[r] = f64::from(-(x[labels[r]] - m - z.ln()));
        for j in 0..classes {
            let p = (x[j] - m).exp() * (1.0 / z);
            grad[r * classes + j] = stored::<T>((p - (j == labels[r]) as u8 as f32) / batch as f32);
        }
    }
    (rows, grad)
}

fn xent_case<T: Element, B: Backend>(backend: &B, shape: &XentShape, scale: f32, data_seed: u64) -> Result<(), String> {
    let XentShape { batch, classes } = *shape;
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} {:?} {shape:?} scale {scale} data seed {data_seed}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let logits: Vec<T> = normal_values(&mut rng, batch * classes, scale);
    let labels: Vec<usize> = (0..batch).map(|_| rng.random_range(0..classes)).collect();
    let want = loss::cross_entropy_reference(shape, &wide(&logits), &labels);
    let x = wide(&logits);
    // Per-row magnitudes of the loss's terms: |m| + |x_y| + |ln z| + 1.
    let row_mag: Vec<f64> = (0..batch)
        .map(|r| {
            let row = &x[r * classes..(r + 1) * classes];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v - m).exp()).sum();
            m.abs() + row[labels[r]].abs() + z.ln().abs() + 1.0
        })
        .collect();
    let row_max: Vec<f64> = x
        .chunks(classes)
        .map(|r| r.iter().cloned().fold(f64::NEG_INFINITY, f64::max))
        .collect();
    // exp(x − m) carries the rounding of x − m, amplified by |x − m|; z's sum (L − 1)·u; the
    // quotient, the subtraction and the division by B a few u more; CUDA's expf/logf are within
    // 2 ulp. So 4·(L + 16 + |x − m|)·u relative, per term.
    let l = classes as f64;
    let row_bound = |r: usize| 4.0 * (l + 16.0) * U32 * row_mag[r];
    let mean_bound = (0..batch).map(row_bound).sum::<f64>() / batch as f64
        + 2.0 * (batch as f64 + 2.0) * U32 * want.row_loss.iter().map(|v| v.abs()).sum::<f64>() / batch as f64;
    let dlogit_bound = |i: usize| {
        let (r, j) = (i / classes, i % classes);
        let onehot = (j == labels[r]) as u8 as f64;
        let p = want.dlogits[i] * batch as f64 + onehot;
        // Plus f32's smallest normal: probabilities below it underflow (subnormal spacing).
        4.0 * (l + 16.0 + (x[i] - row_max[r]).abs()) * U32 * (p + onehot) / batch as f64 + f64::from(f32::MIN_POSITIVE)
    };
    let (cpu_rows, cpu_grad) = xent_low_precision(shape, &logits, &labels);
    for &variant in XENT_ALL {
        let context = |e: &dyn std::fmt::Display| context(&format!("{variant:?}: {e}"));
        let dev_logits = backend.upload(&logits).map_err(|e| context(&e))?;
        let dev_labels = Labels::upload(backend, &labels, classes).map_err(|e| context(&e))?;
        let mut dev_grad = backend
            .upload(&vec![T::poison(); batch * classes])
            .map_err(|e| context(&e))?;
        // The row losses are a workspace: unwritten memory, so reading one early fails.
        let mut row_loss = backend.alloc::<f32>(batch).map_err(|e| context(&e))?;
        let mut mean = backend.upload(&[f32::NAN]).map_err(|e| context(&e))?;
        loss::cross_entropy::<T, B>(
            backend,
            variant,
            shape,
            &dev_logits,
            &dev_labels,
            &mut dev_grad,
            &mut row_loss,
            &mut mean,
        )
        .map_err(|e| context(&e))?;
        let got_grad = wide(&backend.download(&dev_grad).map_err(|e| context(&e))?);
        let got_rows: Vec<f64> = backend
            .download(&row_loss)
            .map_err(|e| context(&e))?
            .iter()
            .map(|&v| f64::from(v))
            .collect();
        let got_mean = f64::from(backend.download(&mean).map_err(|e| context(&e))?[0]);
        compare_with("row_loss", &got_rows, &want.row_loss, row_bound).map_err(|e| context(&e))?;
        compare_with("mean_loss", &[got_mean], &[want.mean_loss], |_| mean_bound).map_err(|e| context(&e))?;
        if T::DTYPE == DType::F32 {
            compare_with("dlogits", &got_grad, &want.dlogits, dlogit_bound).map_err(|e| context(&e))?;
        } else {
            let floor = (0..batch * classes).map(dlogit_bound).fold(0.0, f64::max);
            within_twice_cpu("dlogits", &got_grad, &want.dlogits, &cpu_grad, floor).map_err(|e| context(&e))?;
            // The row losses are f32 in both precisions: the CPU's f32 losses bound nothing
            // further, but must agree with the reference as the kernel's do.
            compare_with("row_loss on the CPU", &cpu_rows, &want.row_loss, row_bound).map_err(|e| context(&e))?;
        }
    }
    Ok(())
}

const POOL_SHAPES: &[(usize, usize, usize)] = &[(1, 1, 3), (7, 5, 10), (17, 3, 45), (100, 4, 385), (3, 17, 257)];
const XENT_SHAPES: &[(usize, usize, f32)] = &[
    (1, 3, 1.0),
    (7, 10, 4.0),
    (17, 45, 2.0),
    (100, 385, 1.0),
    (9, 33, 60.0), // logits far beyond exp's range: the max subtraction must hold
    (33, 1, 1.0),  // one class: loss 0, gradient 0
];

fn check_all<B: Backend>(backend: &B, data_seed: u64) -> Result<(), String> {
    for (i, &(batch, seq, hidden)) in POOL_SHAPES.iter().enumerate() {
        for mode in [PoolMode::Cls, PoolMode::Mean] {
            let shape = PoolShape {
                batch,
                seq,
                hidden,
                mode,
            };
            pool_case::<f32, B>(backend, &shape, data_seed + i as u64)?;
            pool_case::<half::bf16, B>(backend, &shape, data_seed + i as u64)?;
        }
    }
    for (i, &(batch, classes, scale)) in XENT_SHAPES.iter().enumerate() {
        let shape = XentShape { batch, classes };
        xent_case::<f32, B>(backend, &shape, scale, data_seed + i as u64)?;
        xent_case::<half::bf16, B>(backend, &shape, scale, data_seed + i as u64)?;
    }
    Ok(())
}

#[test]
fn harness_matches_reference_in_several_thread_orders() {
    for seed in [0, 1, 2, 3, 17] {
        check_all(&CpuHarness::new(seed), seed).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn labels_out_of_range_are_refused_on_upload() {
    let err = Labels::upload(&CpuHarness::new(0), &[0, 3], 3)
        .err()
        .expect("label 3 of 3 classes is refused");
    assert!(err.to_string().contains("label 3 of example 1"), "{err}");
}

#[test]
fn mean_loss_is_bitwise_reproducible_across_thread_orders() {
    let shape = XentShape { batch: 300, classes: 7 };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let logits: Vec<f32> = normal_values(&mut rng, 300 * 7, 3.0);
    let labels: Vec<usize> = (0..300).map(|_| rng.random_range(0..7)).collect();
    let mut seen = Vec::new();
    for seed in [0, 1, 2, 3] {
        let h = CpuHarness::new(seed);
        let dev_logits = h.upload(&logits).unwrap();
        let dev_labels = Labels::upload(&h, &labels, 7).unwrap();
        let mut grad = h.alloc::<f32>(300 * 7).unwrap();
        let mut rows = h.alloc::<f32>(300).unwrap();
        let mut mean = h.alloc::<f32>(1).unwrap();
        loss::cross_entropy::<f32, _>(
            &h,
            loss::XentVariant::Warp,
            &shape,
            &dev_logits,
            &dev_labels,
            &mut grad,
            &mut rows,
            &mut mean,
        )
        .unwrap();
        seen.push(h.download(&mean).unwrap()[0].to_bits());
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
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
