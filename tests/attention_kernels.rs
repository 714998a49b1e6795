//! Attention kernels (`cuda/attention.cu`) against the f64 references in `kernels::attention`:
//! first the backward reference against f64 central differences of the forward reference (and
//! the forward reference against the CPU model's), then every variant × storage type × shape ×
//! thread order through the CPU harness (outputs poisoned with NaN, the workspace from
//! `Backend::alloc`), and the same bodies through the GPU in `gpu_matches_reference`
//! (`#[ignore]`d: it needs a CUDA GPU and fails when the GPU is not usable).
//!
//! Tolerances come from the numerics (u = 2⁻²⁴; the inputs are exact in f32), per element:
//! - a score S_ij = scale·(Q_i·K_j) is off by at most ε_ij = (dh + 2)·u·scale·Σ_c|Q_ic||K_jc|;
//!   through the normalisation P_ij is off relatively by ε_ij + E_i (E_i = max_j ε_ij) plus the
//!   rounding of S − m and of exp, and the (online) sums of T terms, (|S_ij − m_i| + 3T + 16)·u;
//!   ctx_ic = Σ_j P_ij V_jc then carries Σ_j P_ij |V_jc| times that;
//! - the backward is given lse and ctx (the reference's, stored as the forward stores them), so
//!   P_ij = exp(S_ij − lse_i) is off relatively by ρ_ij = ε_ij + (|lse_i| + |S_ij − lse_i| + 4)·u;
//!   ∂P_ij and dot_i are dh-term dot products; ∂S, ∂Q, ∂K, ∂V propagate those and add T-term sums;
//! - f32 storage: every element within twice that bound; bf16: the kernel's largest error at most
//!   twice that of the same math done on the CPU (f32 arithmetic on the bf16 inputs, outputs
//!   rounded to bf16) plus the f32 bound as a floor (`kernel_tol::within_twice_cpu`). lse is f32 in
//!   both and held to the f32 bound; −∞ (a sequence without a real key) must be exactly −∞.

mod kernel_tol;

use kernel_tol::{stored, wide, within_twice_cpu, U32};
use lora_compose::check::{compare, compare_with, Tol};
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::attention::{self, AttnShape, Entry, Variant};
use lora_compose::kernels::{Backend, DType, Element, KernelError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn shape(batch: usize, seq: usize, heads: usize, head_dim: usize) -> AttnShape {
    AttnShape {
        batch,
        seq,
        heads,
        head_dim,
    }
}

fn values<T: Element>(rng: &mut ChaCha8Rng, len: usize, magnitude: f32) -> Vec<T> {
    (0..len)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0) * magnitude))
        .collect()
}

/// Real tokens per sequence: `(least, most)`, clipped to the sequence length.
type RealTokens = (usize, usize);
/// Any number of real tokens, at the front or scattered.
const ANY: RealTokens = (1, usize::MAX);

/// Per sequence a random number of real tokens in `real`, at the front as the batcher pads or
/// (when `real` allows any number) scattered; sequence 1 (when there is one) fully padded; real
/// tokens are any non-zero value.
fn random_mask(rng: &mut ChaCha8Rng, batch: usize, seq: usize, real: RealTokens) -> Vec<i32> {
    let mut mask = vec![0; batch * seq];
    for b in 0..batch {
        let n = if b == 1 {
            0
        } else {
            rng.random_range(real.0.min(seq)..=real.1.min(seq))
        };
        let scattered = b != 1 && real == ANY && rng.random_bool(0.3);
        for t in 0..seq {
            let real = if scattered { rng.random_bool(0.6) } else { t < n };
            mask[b * seq + t] = if real { rng.random_range(1..3) } else { 0 };
        }
    }
    mask
}

struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    dctx: Vec<T>,
    mask: Vec<i32>,
    scale: f32,
}

/// Q of magnitude `sharpness` (large: peaked softmax rows), K, V, ∂ctx in (−1, 1).
fn inputs<T: Element>(shape: &AttnShape, data_seed: u64, sharpness: f32, real: RealTokens) -> Inputs<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(data_seed);
    let n = shape.rows() * shape.width();
    Inputs {
        q: values(&mut rng, n, sharpness),
        k: values(&mut rng, n, 1.0),
        v: values(&mut rng, n, 1.0),
        dctx: values(&mut rng, n, 1.0),
        mask: random_mask(&mut rng, shape.batch, shape.seq, real),
        scale: 1.0 / (shape.head_dim as f32).sqrt(),
    }
}

/// Everything the checks need about one (b, h), row-major (T, T) where two-dimensional.
struct HeadMath {
    s: Vec<f64>,   // scores
    eps: Vec<f64>, // ε_ij
    p: Vec<f64>,   // probabilities
    m: Vec<f64>,   // row max over real keys (−∞ without one)
    lse: Vec<f64>,
}

fn head_math(shape: &AttnShape, scale: f64, q: &[f64], k: &[f64], mask: &[i32], b: usize, h: usize) -> HeadMath {
    let (t, d, dh) = (shape.seq, shape.width(), shape.head_dim);
    let at = |x: &[f64], i: usize, c: usize| x[(b * t + i) * d + h * dh + c];
    let mut hm = HeadMath {
        s: vec![0.0; t * t],
        eps: vec![0.0; t * t],
        p: vec![0.0; t * t],
        m: vec![f64::NEG_INFINITY; t],
        lse: vec![f64::NEG_INFINITY; t],
    };
    let real = |j: usize| mask[b * t + j] != 0;
    for i in 0..t {
        for j in 0..t {
            let (mut s, mut a) = (0.0, 0.0);
            for c in 0..dh {
                s += at(q, i, c) * at(k, j, c);
                a += (at(q, i, c) * at(k, j, c)).abs();
            }
            hm.s[i * t + j] = s * scale;
            hm.eps[i * t + j] = (dh as f64 + 2.0) * U32 * a * scale.abs();
            if real(j) {
                hm.m[i] = hm.m[i].max(s * scale);
            }
        }
        if hm.m[i] == f64::NEG_INFINITY {
            continue;
        }
        let z: f64 = (0..t)
            .filter(|&j| real(j))
            .map(|j| (hm.s[i * t + j] - hm.m[i]).exp())
            .sum();
        hm.lse[i] = hm.m[i] + z.ln();
        for j in (0..t).filter(|&j| real(j)) {
            hm.p[i * t + j] = (hm.s[i * t + j] - hm.lse[i]).exp();
        }
    }
    hm
}

/// The f32 error bounds of (ctx, lse) and of (∂Q, ∂K, ∂V), as the module comment derives them.
struct Bounds {
    ctx: Vec<f64>,
    lse: Vec<f64>,
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
}

fn bounds(shape: &AttnShape, scale: f64, x: [&[f64]; 4], ctx: &[f64], mask: &[i32]) -> Bounds {
    let [q, k, v, g] = x;
    let (t, d, dh) = (shape.seq, shape.width(), shape.head_dim);
    let n = shape.rows() * d;
    let tf = t as f64;
    let mut out = Bounds {
        ctx: vec![0.0; n],
        lse: vec![0.0; attention::lse_len(shape)],
        dq: vec![0.0; n],
        dk: vec![0.0; n],
        dv: vec![0.0; n],
    };
    for b in 0..shape.batch {
        for h in 0..shape.heads {
            let hm = head_math(shape, scale, q, k, mask, b, h);
            let row = |i: usize| (b * t + i) * d + h * dh;
            let abs_dot = |x: &[f64], y: &[f64], i: usize, j: usize| -> f64 {
                (0..dh).map(|c| (x[row(i) + c] * y[row(j) + c]).abs()).sum()
            };
            for i in 0..t {
                if hm.m[i] == f64::NEG_INFINITY {
                    continue; // exact zeros and −∞
                }
                let e_i = (0..t)
                    .filter(|&j| hm.p[i * t + j] > 0.0)
                    .map(|j| hm.eps[i * t + j])
                    .fold(0.0, f64::max);
                out.lse[(b * shape.heads + h) * t + i] =
                    2.0 * (e_i + (hm.m[i].abs() + hm.lse[i].abs() + 2.0 * tf + 16.0) * U32);
                let dot_i: f64 = (0..dh).map(|c| g[row(i) + c] * ctx[row(i) + c]).sum();
                let zeta = (dh as f64 + 2.0) * U32 * abs_dot(g, ctx, i, i);
                for j in 0..t {
                    let p = hm.p[i * t + j];
                    if p == 0.0 {
                        continue;
                    }
                    let (s, eps) = (hm.s[i * t + j], hm.eps[i * t + j]);
                    let fwd_rel = eps + e_i + ((s - hm.m[i]).abs() + 3.0 * tf + 16.0) * U32;
                    let rho = eps + (hm.lse[i].abs() + (s - hm.lse[i]).abs() + 4.0) * U32;
                    let dp: f64 = (0..dh).map(|c| g[row(i) + c] * v[row(j) + c]).sum();
                    let eta = (dh as f64 + 1.0) * U32 * abs_dot(g, v, i, j);
                    let ds = p * (dp - dot_i);
                    let ds_err = p * (rho * (dp - dot_i).abs() + eta + zeta) + 2.0 * U32 * ds.abs();
                    let ds_mag = ds_err + (tf + 2.0) * U32 * ds.abs();
                    for c in 0..dh {
                        out.ctx[row(i) + c] += 2.0 * p * v[row(j) + c].abs() * fwd_rel;
                        out.dq[row(i) + c] += 2.0 * scale.abs() * ds_mag * k[row(j) + c].abs();
                        out.dk[row(j) + c] += 2.0 * scale.abs() * ds_mag * q[row(i) + c].abs();
                        out.dv[row(j) + c] += 2.0 * p * (rho + (tf + 2.0) * U32) * g[row(i) + c].abs();
                    }
                }
            }
        }
    }
    // Below f32's smallest normal the spacing is absolute.
    for bound in [&mut out.ctx, &mut out.lse, &mut out.dq, &mut out.dk, &mut out.dv] {
        bound.iter_mut().for_each(|e| *e += 2.0 * f64::from(f32::MIN_POSITIVE));
    }
    out
}

/// The kernels' math on the CPU in f32 (two-pass softmax), each output rounded to T: ctx; and
/// ∂Q, ∂K, ∂V given the stored ctx and f32 lse.
fn cpu_low_precision<T: Element>(shape: &AttnShape, inp: &Inputs<T>, ctx_t: &[T], lse32: &[f32]) -> [Vec<f64>; 4] {
    let (t, d, dh) = (shape.seq, shape.width(), shape.head_dim);
    let n = shape.rows() * d;
    let f = |x: &[T], i: usize| x[i].to_f32();
    let (mut ctx, mut dq, mut dk, mut dv) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    for b in 0..shape.batch {
        let real = |j: usize| inp.mask[b * t + j] != 0;
        for h in 0..shape.heads {
            let row = |i: usize| (b * t + i) * d + h * dh;
            let dot = |x: &[T], y: &[T], i: usize, j: usize| -> f32 {
                (0..dh).map(|c| f(x, row(i) + c) * f(y, row(j) + c)).sum()
            };
            for i in 0..t {
                let s: Vec<f32> = (0..t).map(|j| dot(&inp.q, &inp.k, i, j) * inp.scale).collect();
                let m = (0..t)
                    .filter(|&j| real(j))
                    .map(|j| s[j])
                    .fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                let z: f32 = (0..t).filter(|&j| real(j)).map(|j| (s[j] - m).exp()).sum();
                let lse = lse32[(b * shape.heads + h) * t + i];
                let dot_i: f32 = (0..dh).map(|c| f(&inp.dctx, row(i) + c) * f(ctx_t, row(i) + c)).sum();
                for j in (0..t).filter(|&j| real(j)) {
                    let p_fwd = (s[j] - m).exp() / z;
                    let p = (s[j] - lse).exp();
                    let ds = p * (dot(&inp.dctx, &inp.v, i, j) - dot_i);
                    for c in 0..dh {
                        ctx[row(i) + c] += p_fwd * f(&inp.v, row(j) + c);
                        dq[row(i) + c] += ds * f(&inp.k, row(j) + c) * inp.scale;
                        dk[row(j) + c] += ds * f(&inp.q, row(i) + c) * inp.scale;
                        dv[row(j) + c] += p * f(&inp.dctx, row(i) + c);
                    }
                }
            }
        }
    }
    [ctx, dq, dk, dv].map(|x| x.into_iter().map(stored::<T>).collect())
}

/// lse with −∞ where the reference has −∞ (checked exactly), then the finite ones by bound.
fn check_lse(got: &[f64], want: &[f64], bound: &[f64]) -> Result<(), String> {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if (w == f64::NEG_INFINITY) != (g == f64::NEG_INFINITY) {
            return Err(format!("lse[{i}] is {g}, reference {w} (−∞ only without a real key)"));
        }
    }
    let finite = |x: &[f64]| -> Vec<f64> { x.iter().map(|&v| if v.is_infinite() { 0.0 } else { v }).collect() };
    compare_with("lse", &finite(got), &finite(want), |i| bound[i])?;
    Ok(())
}

fn check_output<T: Element>(name: &str, got: &[f64], want: &[f64], cpu: &[f64], bound: &[f64]) -> Result<(), String> {
    if T::DTYPE == DType::F32 {
        compare_with(name, got, want, |i| bound[i])?;
    } else {
        let floor = bound.iter().copied().fold(0.0, f64::max);
        within_twice_cpu(name, got, want, cpu, floor)?;
    }
    Ok(())
}

/// Forward and backward of every variant for one shape and data seed; returns each variant's
/// (ctx, ∂Q, ∂K, ∂V) bits for the determinism test.
fn check_case<T: Element, B: Backend>(
    backend: &B,
    shape: &AttnShape,
    data_seed: u64,
    sharpness: f32,
    real: RealTokens,
) -> Result<Vec<Vec<u32>>, String> {
    let inp = inputs::<T>(shape, data_seed, sharpness, real);
    let context = |e: &dyn std::fmt::Display| {
        format!(
            "{} {:?} {shape:?} data seed {data_seed} sharpness {sharpness}: {e}",
            backend.name(),
            T::DTYPE
        )
    };
    let (q, k, v, g) = (wide(&inp.q), wide(&inp.k), wide(&inp.v), wide(&inp.dctx));
    let scale = f64::from(inp.scale);
    let (want_ctx, want_lse) = attention::reference_forward(shape, scale, &q, &k, &v, &inp.mask);
    let (want_dq, want_dk, want_dv) = attention::reference_backward(shape, scale, &q, &k, &v, &inp.mask, &g);
    // What the backward is given: the reference forward as the forward stores it.
    let ctx_t: Vec<T> = want_ctx.iter().map(|&x| T::from_f32(x as f32)).collect();
    let lse32: Vec<f32> = want_lse.iter().map(|&x| x as f32).collect();
    let bound = bounds(shape, scale, [&q, &k, &v, &g], &wide(&ctx_t), &inp.mask);
    let [cpu_ctx, cpu_dq, cpu_dk, cpu_dv] = cpu_low_precision(shape, &inp, &ctx_t, &lse32);

    let mut bits = Vec::new();
    for &variant in attention::ALL {
        let context = |e: &dyn std::fmt::Display| context(&format!("{variant:?}: {e}"));
        let out = run::<T, B>(backend, variant, shape, &inp, &ctx_t, &lse32).map_err(|e| context(&e))?;
        check_output::<T>("ctx", &wide(&out.ctx), &want_ctx, &cpu_ctx, &bound.ctx).map_err(|e| context(&e))?;
        let got_lse: Vec<f64> = out.lse.iter().map(|&x| f64::from(x)).collect();
        check_lse(&got_lse, &want_lse, &bound.lse).map_err(|e| context(&e))?;
        check_output::<T>("dq", &wide(&out.dq), &want_dq, &cpu_dq, &bound.dq).map_err(|e| context(&e))?;
        check_output::<T>("dk", &wide(&out.dk), &want_dk, &cpu_dk, &bound.dk).map_err(|e| context(&e))?;
        check_output::<T>("dv", &wide(&out.dv), &want_dv, &cpu_dv, &bound.dv).map_err(|e| context(&e))?;
        let mut all: Vec<u32> = out.lse.iter().map(|x| x.to_bits()).collect();
        for x in [&out.ctx, &out.dq, &out.dk, &out.dv] {
            all.extend(x.iter().map(|e| e.to_f32().to_bits()));
        }
        bits.push(all);
    }
    Ok(bits)
}

struct Outputs<T> {
    ctx: Vec<T>,
    lse: Vec<f32>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// The forward, then the backward given `ctx_t` and `lse32`, on `backend`; outputs poisoned
/// with NaN beforehand.
fn run<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &AttnShape,
    inp: &Inputs<T>,
    ctx_t: &[T],
    lse32: &[f32],
) -> Result<Outputs<T>, KernelError> {
    let n = shape.rows() * shape.width();
    let dev_q = backend.upload(&inp.q)?;
    let dev_k = backend.upload(&inp.k)?;
    let dev_v = backend.upload(&inp.v)?;
    let dev_mask = backend.upload(&inp.mask)?;
    let mut ctx = backend.upload(&vec![T::poison(); n])?;
    let mut lse = backend.upload(&vec![f32::NAN; attention::lse_len(shape)])?;
    attention::forward::<T, B>(
        backend, variant, shape, inp.scale, &dev_q, &dev_k, &dev_v, &dev_mask, &mut ctx, &mut lse,
    )?;
    let dev_ctx = backend.upload(ctx_t)?;
    let dev_lse = backend.upload(lse32)?;
    let dev_g = backend.upload(&inp.dctx)?;
    let mut dq = backend.upload(&vec![T::poison(); n])?;
    let mut dk = backend.upload(&vec![T::poison(); n])?;
    let mut dv = backend.upload(&vec![T::poison(); n])?;
    // Unwritten: the harness fails a kernel that reads the workspace before writing it.
    let mut work = backend.alloc::<f32>(attention::backward_workspace_len(variant, shape))?;
    attention::backward::<T, B>(
        backend, variant, shape, inp.scale, &dev_q, &dev_k, &dev_v, &dev_mask, &dev_ctx, &dev_lse, &dev_g, &mut dq,
        &mut dk, &mut dv, &mut work,
    )?;
    Ok(Outputs {
        ctx: backend.download(&ctx)?,
        lse: backend.download(&lse)?,
        dq: backend.download(&dq)?,
        dk: backend.download(&dk)?,
        dv: backend.download(&dv)?,
    })
}

/// (batch, seq, heads, head_dim, sharpness, real tokens per sequence).
type Case = (usize, usize, usize, usize, f32, RealTokens);

/// T ∈ {1, 7, 17, 33}, head_dim ∈ {20, 33, 64} and the extremes 1 and 128; sequence 1 of each
/// batch of ≥ 2 fully padded; one case with peaked softmax rows.
const SHAPES: &[Case] = &[
    (1, 1, 1, 20, 1.0, ANY),
    (2, 7, 3, 33, 2.0, ANY),
    (3, 17, 2, 64, 1.0, ANY),
    (2, 9, 1, 128, 1.0, ANY),
    (4, 5, 2, 1, 3.0, ANY),
    (2, 33, 2, 20, 8.0, ANY),
];
/// Long sequences, one thread order each: T = 128 with every key real, T = 512 with 96–160 real
/// tokens (a short text padded to the model's length). The naive kernels cost one warp_sum
/// butterfly (5 warp barriers, 32 fiber switches each on the harness) per dot product and pair
/// of a real key with a query: 512 real keys would take ~60 s per storage type here.
const LONG_SHAPES: &[Case] = &[(1, 128, 2, 64, 2.0, (128, 128)), (1, 512, 1, 33, 2.0, (96, 160))];

fn check_shapes<B: Backend>(backend: &B, shapes: &[Case], data_seed: u64) -> Result<(), String> {
    for (i, &(b, t, h, dh, sharpness, real)) in shapes.iter().enumerate() {
        let s = shape(b, t, h, dh);
        check_case::<f32, B>(backend, &s, data_seed + i as u64, sharpness, real)?;
        check_case::<half::bf16, B>(backend, &s, data_seed + i as u64, sharpness, real)?;
    }
    Ok(())
}

/// The backward reference against f64 central differences of the forward reference, for the
/// loss L = Σ ∂ctx ∘ ctx (so ∂L/∂ctx = ∂ctx), with a padded key, a padded query and a sequence
/// without a real key (its gradients are 0).
#[test]
fn reference_backward_matches_finite_differences() {
    for (i, (s, mask)) in [
        (shape(2, 4, 2, 3), vec![1, 1, 0, 1, 0, 0, 0, 0]),
        (shape(1, 5, 1, 4), vec![0, 2, 1, 1, 0]),
        (shape(1, 1, 1, 1), vec![1]),
    ]
    .into_iter()
    .enumerate()
    {
        let mut inp = inputs::<f32>(&s, 40 + i as u64, 2.0, ANY);
        inp.mask = mask;
        let (q, k, v, g) = (wide(&inp.q), wide(&inp.k), wide(&inp.v), wide(&inp.dctx));
        let scale = 0.8;
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (ctx, _) = attention::reference_forward(&s, scale, q, k, v, &inp.mask);
            ctx.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let (dq, dk, dv) = attention::reference_backward(&s, scale, &q, &k, &v, &inp.mask, &g);
        let h = 1e-6;
        let central = |x: &[f64], at: usize, eval: &dyn Fn(&[f64]) -> f64| {
            let (mut plus, mut minus) = (x.to_vec(), x.to_vec());
            plus[at] += h;
            minus[at] -= h;
            (eval(&plus) - eval(&minus)) / (2.0 * h)
        };
        let fd_q: Vec<f64> = (0..q.len()).map(|a| central(&q, a, &|x| loss(x, &k, &v))).collect();
        let fd_k: Vec<f64> = (0..k.len()).map(|a| central(&k, a, &|x| loss(&q, x, &v))).collect();
        let fd_v: Vec<f64> = (0..v.len()).map(|a| central(&v, a, &|x| loss(&q, &k, x))).collect();
        // Truncation O(h²) times the third derivative and cancellation ~1e-16·|L|/h: both below
        // 1e-7 here (|L| < 10, derivatives of order one).
        let tol = Tol::new(1e-7, 1e-6);
        let ctx = |e: String| format!("{s:?}: {e}");
        compare("dq", &dq, &fd_q, tol).map_err(ctx).unwrap();
        compare("dk", &dk, &fd_k, tol).map_err(ctx).unwrap();
        compare("dv", &dv, &fd_v, tol).map_err(ctx).unwrap();
        let padded = |b: usize| (0..s.seq).all(|t| inp.mask[b * s.seq + t] == 0);
        for (r, row) in dq.chunks(s.width()).enumerate() {
            if padded(r / s.seq) {
                assert!(row.iter().all(|&x| x == 0.0), "a fully padded sequence has a gradient");
            }
        }
    }
}

/// The forward reference is the CPU model's attention (scale 1/√dh, every sequence with a real
/// token).
#[test]
fn reference_forward_matches_the_model() {
    use lora_compose::model::layers;
    let s = shape(3, 6, 2, 5);
    let mut inp = inputs::<f32>(&s, 3, 2.0, ANY);
    inp.mask = vec![1, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1];
    let (q, k, v) = (wide(&inp.q), wide(&inp.k), wide(&inp.v));
    let real: Vec<bool> = inp.mask.iter().map(|&m| m != 0).collect();
    let model_shape = layers::AttnShape {
        batch: 3,
        seq: 6,
        heads: 2,
        head_dim: 5,
    };
    let (model_ctx, _) = layers::attention_forward(&q, &k, &v, &real, model_shape);
    let (ctx, _) = attention::reference_forward(&s, 1.0 / 5f64.sqrt(), &q, &k, &v, &inp.mask);
    compare("ctx vs model", &ctx, &model_ctx, Tol::new(1e-14, 1e-12)).unwrap();
}

#[test]
fn harness_every_variant_shape_and_thread_order() {
    for seed in [0, 1, 2] {
        check_shapes(&CpuHarness::new(seed), SHAPES, 100 * seed).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn harness_long_sequences() {
    check_shapes(&CpuHarness::new(3), LONG_SHAPES, 7).unwrap_or_else(|e| panic!("{e}"));
}

/// Fixed-order sums: the same bits in every thread and block order.
#[test]
fn harness_results_are_deterministic() {
    let s = shape(2, 37, 2, 20);
    let bits =
        |seed: u64| check_case::<f32, _>(&CpuHarness::new(seed), &s, 5, 2.0, ANY).unwrap_or_else(|e| panic!("{e}"));
    let first = bits(0);
    for seed in [1, 2, 3] {
        assert!(bits(seed) == first, "results differ between thread orders 0 and {seed}");
    }
}

#[test]
fn bad_arguments_are_errors() {
    let h = CpuHarness::new(0);
    let s = shape(2, 3, 2, 4);
    let n = 2 * 3 * 8;
    let x = h.upload(&vec![0.5f32; n]).unwrap();
    let short_mask = h.upload(&[1i32; 5]).unwrap();
    let mut ctx = h.alloc::<f32>(n).unwrap();
    let mut lse = h.alloc::<f32>(12).unwrap();
    let err = attention::forward::<f32, _>(&h, Variant::Tiled, &s, 0.5, &x, &x, &x, &short_mask, &mut ctx, &mut lse)
        .expect_err("short mask");
    assert!(err.to_string().contains("mask has 5 elements, needs 6"), "{err}");
    let mask = h.upload(&[1i32; 6]).unwrap();
    let err = attention::forward::<f32, _>(&h, Variant::Naive, &s, f32::NAN, &x, &x, &x, &mask, &mut ctx, &mut lse)
        .expect_err("NaN scale");
    assert!(err.to_string().contains("scale"), "{err}");
    let wide_head = shape(1, 1, 1, 129);
    let y = h.upload(&vec![0.5f32; 129]).unwrap();
    let one = h.upload(&[1i32]).unwrap();
    let mut out = h.alloc::<f32>(129).unwrap();
    let mut lse1 = h.alloc::<f32>(1).unwrap();
    let err = attention::forward::<f32, _>(
        &h,
        Variant::Tiled,
        &wide_head,
        0.1,
        &y,
        &y,
        &y,
        &one,
        &mut out,
        &mut lse1,
    )
    .expect_err("head_dim 129");
    assert!(err.to_string().contains("head_dim 129 exceeds 128"), "{err}");
    let (mut dq, mut dk, mut dv) = (
        h.alloc::<f32>(n).unwrap(),
        h.alloc::<f32>(n).unwrap(),
        h.alloc::<f32>(n).unwrap(),
    );
    let lse_in = h.upload(&[0.0f32; 12]).unwrap();
    let mut work = h.alloc::<f32>(11).unwrap();
    let err = attention::backward::<f32, _>(
        &h,
        Variant::Tiled,
        &s,
        0.5,
        &x,
        &x,
        &x,
        &mask,
        &x,
        &lse_in,
        &x,
        &mut dq,
        &mut dk,
        &mut dv,
        &mut work,
    )
    .expect_err("short workspace");
    assert!(
        err.to_string().contains("work has 11 elements, needs at least 12"),
        "{err}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    // No static shared memory: the tiled kernels' is all dynamic, sized by the launch config.
    for &variant in attention::ALL {
        for entry in [
            Entry::Forward(variant),
            Entry::Dq(variant),
            Entry::Dkv(variant),
            Entry::Dot,
        ] {
            let function = gpu.function(&attention::kernel(entry, DType::BF16).unwrap()).unwrap();
            assert_eq!(function.shared_size_bytes().unwrap(), 0, "{entry:?}");
        }
    }
    for seed in [0, 1] {
        check_shapes(&gpu, SHAPES, 100 * seed).unwrap_or_else(|e| panic!("{e}"));
    }
    check_shapes(&gpu, LONG_SHAPES, 7).unwrap_or_else(|e| panic!("{e}"));
    // The model's shapes: MiniLM (12 heads of 32) and the widest head, at full length.
    let model_shapes: &[Case] = &[
        (8, 512, 12, 32, 2.0, (400, 512)),
        (2, 512, 2, 128, 1.0, (512, 512)),
        (16, 50, 4, 24, 2.0, ANY),
    ];
    check_shapes(&gpu, model_shapes, 9).unwrap_or_else(|e| panic!("{e}"));
}
