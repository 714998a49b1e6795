//! Factor-mode composition kernels (`cuda/compose_factor.cu` + the GEMM family, through
//! `kernels::compose_factor`) against the f64 reference of `compose::reference` (`Mode::Factor`):
//! first the reference's ∂C and ∂X against f64 central differences of its forward, then every
//! variant × storage (f32, bf16) × case × thread order through the CPU harness, and the same
//! bodies through the GPU in `gpu_matches_reference` (`#[ignore]`d: it needs a CUDA GPU and fails
//! when the GPU is not usable).
//!
//! Cases: odd sizes (T ∈ {1, 7, 9, 17, 33}, d_in / d_out not multiples of 32), N ∈ {1, 3, 5, 8},
//! r ∈ {1, 3, 4, 8, 40} (3: lane groups that do not fill a warp; 40: two rank chunks in the warp
//! kernels), per-sample coefficient rows with tokens in mixed order, coefficients random / zero /
//! negative / one-hot. Overwritten outputs (U, Z, H, ∂U, ∂C) are poisoned with NaN and the
//! workspace comes from `Backend::alloc` (unwritten: reading it before writing fails); the
//! accumulated ones (Y, ∂X) start from random values, so the accumulation itself is checked.
//!
//! Tolerances from the numerics, per output, normwise (as tests/compose_kernels.rs):
//! - f32: `16·ε₃₂·max Σ|terms|` (the reference run on absolute values gives Σ|terms|);
//! - bf16 (`kernel_tol::within_twice_cpu`): the kernel's largest error against f64 at most twice
//!   that of the same computation done on the CPU in bf16 (U, Z, H, ∂U and each output rounded
//!   where the kernels round them), plus that f32 floor.

mod common;
mod kernel_tol;

use common::*;
use lora_compose::check::{compare, Tol};
use lora_compose::compose::{reference, Mode, ModuleStack, Rows, Train};
use lora_compose::gpu::GpuBackend;
use lora_compose::harness::CpuHarness;
use lora_compose::kernels::compose_factor::{self, Shape, Tables, TokenRows, Variant};
use lora_compose::kernels::{Backend, DType, Element, KernelError};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const KAPPA: f64 = 16.0 * f32::EPSILON as f64;

fn round<T: Element>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}
fn f32s<T: Element>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}
fn rt<T: Element>(x: f32) -> f32 {
    T::from_f32(x).to_f32()
}
fn max_of(v: impl IntoIterator<Item = f64>) -> f64 {
    v.into_iter().fold(0.0, f64::max)
}
fn plus(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}
fn abs_plus(a: &[f64], b: &[f64]) -> f64 {
    max_of(a.iter().zip(b).map(|(x, y)| x.abs() + y.abs()))
}

/// One case in storage T: the operands as the kernels see them and the starting values of the
/// accumulated outputs.
struct Prepared<T> {
    shape: Shape,
    r: usize,
    x: Vec<T>,
    a_cat: Vec<T>,
    b_cat: Vec<T>,
    g: Vec<T>,
    scales: Vec<f32>,
    c: Vec<f32>,
    sample_of: Vec<usize>,
    y0: Vec<T>,
    dx0: Vec<T>,
    /// U as the forward stores it (the CPU mirror's), the backward's input.
    u: Vec<T>,
}

fn prepare<T: Element>(case: &Case, seed: u64) -> Prepared<T> {
    let m = &case.modules;
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfac7);
    let shape = Shape {
        t: case.t,
        d_in: case.d_in,
        d_out: case.d_out,
        n_samples: case.n_samples,
        ranks: m.ranks.clone(),
    };
    let (x, a_cat): (Vec<T>, Vec<T>) = (round(&case.x), round(&m.a_cat));
    let u = mirror_u(&shape, &f32s(&x), &f32s(&a_cat))
        .into_iter()
        .map(T::from_f32)
        .collect();
    Prepared {
        r: m.ranks.first().copied().unwrap_or(0),
        x,
        a_cat,
        b_cat: round(&m.b_cat),
        g: round(&case.g),
        scales: m.scales.clone(),
        c: case.c.clone(),
        sample_of: case.sample_of.clone(),
        y0: round(&randn(&mut rng, case.t * case.d_out, 1.0)),
        dx0: round(&randn(&mut rng, case.t * case.d_in, 1.0)),
        u,
        shape,
    }
}

/// f32 `X A_catᵀ` (T, R), sequential sums, before rounding to storage.
fn mirror_u(s: &Shape, x: &[f32], a: &[f32]) -> Vec<f32> {
    let (t, big_r, d_in) = (s.t, s.r_total(), s.d_in);
    let mut u = vec![0.0f32; t * big_r];
    for tt in 0..t {
        for j in 0..big_r {
            u[tt * big_r + j] = (0..d_in).map(|k| x[tt * d_in + k] * a[j * d_in + k]).sum();
        }
    }
    u
}

/// What the f64 reference says, and the same computed on absolute values (for the normwise
/// scale of each output).
struct Want {
    u: Vec<f64>,
    z: Vec<f64>,
    y: Vec<f64>,
    dx: Vec<f64>,
    dc: Vec<f64>,
    u_abs: Vec<f64>,
    z_abs: Vec<f64>,
    y_abs: Vec<f64>,
    dx_abs: Vec<f64>,
    dc_abs: Vec<f64>,
}

fn want_of<T: Element>(p: &Prepared<T>) -> Want {
    let s = &p.shape;
    let rows = Rows {
        sample_of: &p.sample_of,
        n_samples: s.n_samples,
    };
    let (t, n, r, big_r, d_in) = (s.t, s.n(), p.r, s.r_total(), s.d_in);
    let wide = |v: &[T]| kernel_tol::wide(v);
    let run = |abs: bool| {
        let f = |v: Vec<f64>| if abs { v.iter().map(|x| x.abs()).collect() } else { v };
        let (x, a, b, g) = (f(wide(&p.x)), f(wide(&p.a_cat)), f(wide(&p.b_cat)), f(wide(&p.g)));
        let c = f(to_f64(&p.c));
        let stack = ModuleStack {
            d_in,
            d_out: s.d_out,
            ranks: s.ranks.clone(),
            scales: f(to_f64(&p.scales)),
            a_cat: a.clone(),
            b_cat: b,
        };
        let w = vec![0.0; s.d_out * d_in];
        let layer = reference::Layer {
            w: &w,
            bias: None,
            modules: &stack,
            mode: Mode::Factor,
        };
        let y = reference::forward(&layer, &x, &c, rows).unwrap();
        let train = Train {
            input: true,
            coeffs: true,
            modules: false,
            base: false,
        };
        let grads = reference::backward(&layer, &x, &c, rows, &g, train).unwrap();
        // U = X A_catᵀ and Z[t, j·r + q] = c_j Σ_i c_i s_i U[t, i·r + q], spelled out.
        let mut u = vec![0.0; t * big_r];
        let mut z = vec![0.0; t * big_r];
        for tt in 0..t {
            let ct = &c[p.sample_of[tt] * n..(p.sample_of[tt] + 1) * n];
            for j in 0..big_r {
                u[tt * big_r + j] = (0..d_in).map(|k| x[tt * d_in + k] * a[j * d_in + k]).sum();
            }
            for q in 0..r {
                let v: f64 = (0..n)
                    .map(|i| ct[i] * stack.scales[i] * u[tt * big_r + i * r + q])
                    .sum();
                for j in 0..n {
                    z[tt * big_r + j * r + q] = ct[j] * v;
                }
            }
        }
        (u, z, y, grads.dx, grads.dc)
    };
    let (u, z, y, dx, dc) = run(false);
    let (u_abs, z_abs, y_abs, dx_abs, dc_abs) = run(true);
    Want {
        u,
        z,
        y,
        dx,
        dc,
        u_abs,
        z_abs,
        y_abs,
        dx_abs,
        dc_abs,
    }
}

/// f32: `|got − want| ≤ 16·ε₃₂·scale` elementwise; bf16: at most twice the CPU mirror's largest
/// error plus that floor.
fn judge<T: Element>(name: &str, got: &[f64], want: &[f64], mirror: &[f64], scale: f64) -> Result<(), String> {
    let floor = KAPPA * scale + 1e-30;
    if T::DTYPE == DType::F32 {
        compare(name, got, want, Tol::new(floor, 0.0)).map(|_| ())
    } else {
        kernel_tol::within_twice_cpu(name, got, want, mirror, floor)
    }
}

fn err(context: &str) -> impl Fn(KernelError) -> String + '_ {
    move |e| format!("{context}: {e}")
}

#[allow(clippy::type_complexity)]
fn upload_tables<T: Element, B: Backend>(
    backend: &B,
    p: &Prepared<T>,
) -> Result<(Tables<B>, TokenRows<B>, B::Buffer<f32>), KernelError> {
    let rows = Rows {
        sample_of: &p.sample_of,
        n_samples: p.shape.n_samples,
    };
    let tables = Tables::upload(backend, &p.shape.ranks, &p.scales)?;
    Ok((tables, TokenRows::upload(backend, rows)?, backend.upload(&p.c)?))
}

fn check_forward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    p: &Prepared<T>,
    w: &Want,
) -> Result<(), String> {
    let s = &p.shape;
    let (t, n, r, big_r, d_out) = (s.t, s.n(), p.r, s.r_total(), s.d_out);
    let ctx = format!(
        "{} forward {variant:?} {:?} T={t} d_in={} d_out={d_out} N={n} r={r} S={}",
        backend.name(),
        T::DTYPE,
        s.d_in,
        s.n_samples
    );
    let e = err(&ctx);
    let (tables, rows, c) = upload_tables(backend, p).map_err(&e)?;
    let up = |v: &[T]| backend.upload(v).map_err(&e);
    let (x, a, b) = (up(&p.x)?, up(&p.a_cat)?, up(&p.b_cat)?);
    let mut u = up(&vec![T::poison(); t * big_r])?;
    let mut z = up(&vec![T::poison(); t * big_r])?;
    let mut y = up(&p.y0)?;
    compose_factor::forward(
        backend, variant, s, &x, &a, &b, &c, &rows, &tables, &mut u, &mut z, &mut y,
    )
    .map_err(&e)?;
    let dl = |v: &B::Buffer<T>| backend.download(v).map(|v| kernel_tol::wide(&v)).map_err(&e);
    let (u, z, y) = (dl(&u)?, dl(&z)?, dl(&y)?);

    // The CPU mirror in storage T: U, Z and Y rounded where the kernels round them.
    let (b32, y0) = (f32s(&p.b_cat), f32s(&p.y0));
    let u_m: Vec<f32> = mirror_u(s, &f32s(&p.x), &f32s(&p.a_cat))
        .into_iter()
        .map(rt::<T>)
        .collect();
    let mut z_m = vec![0.0f32; t * big_r];
    for tt in 0..t {
        let ct = &p.c[p.sample_of[tt] * n..(p.sample_of[tt] + 1) * n];
        for q in 0..r {
            let v: f32 = (0..n).map(|i| ct[i] * p.scales[i] * u_m[tt * big_r + i * r + q]).sum();
            for j in 0..n {
                z_m[tt * big_r + j * r + q] = rt::<T>(ct[j] * v);
            }
        }
    }
    let mut y_m = vec![0.0f64; t * d_out];
    for tt in 0..t {
        for o in 0..d_out {
            let acc: f32 = (0..big_r).map(|j| z_m[tt * big_r + j] * b32[o * big_r + j]).sum();
            y_m[tt * d_out + o] = f64::from(rt::<T>(y0[tt * d_out + o] + acc));
        }
    }
    let y0 = kernel_tol::wide(&p.y0);
    let check = || -> Result<(), String> {
        judge::<T>("U", &u, &w.u, &to_f64(&u_m), max_of(w.u_abs.iter().cloned()))?;
        judge::<T>("Z", &z, &w.z, &to_f64(&z_m), max_of(w.z_abs.iter().cloned()))?;
        judge::<T>("Y", &y, &plus(&y0, &w.y), &y_m, abs_plus(&y0, &w.y_abs))
    };
    check().map_err(|m| format!("{ctx}: {m}"))
}

/// The backward for ∂X and/or ∂C; returns ∂C (empty when not asked for).
fn check_backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    p: &Prepared<T>,
    w: &Want,
    want_dx: bool,
    want_dc: bool,
) -> Result<Vec<f32>, String> {
    let s = &p.shape;
    let (t, n, r, big_r, d_in, d_out) = (s.t, s.n(), p.r, s.r_total(), s.d_in, s.d_out);
    let ctx = format!(
        "{} backward {variant:?} {:?} dx={want_dx} dc={want_dc} T={t} d_in={d_in} d_out={d_out} N={n} r={r} S={}",
        backend.name(),
        T::DTYPE,
        s.n_samples
    );
    let e = err(&ctx);
    let (tables, rows, c) = upload_tables(backend, p).map_err(&e)?;
    let up = |v: &[T]| backend.upload(v).map_err(&e);
    let (g, x, u, a, b) = (up(&p.g)?, up(&p.x)?, up(&p.u)?, up(&p.a_cat)?, up(&p.b_cat)?);
    let mut dx = up(&p.dx0)?;
    let mut dc = backend.upload(&vec![f32::NAN; s.n_samples * n]).map_err(&e)?;
    let mut h = up(&vec![T::poison(); t * big_r])?;
    let mut du = up(&vec![T::poison(); t * big_r])?;
    // Uninitialised: the harness fails a kernel that reads workspace it did not write.
    let mut work = backend
        .alloc::<f32>(compose_factor::workspace_len(variant, s))
        .map_err(&e)?;
    compose_factor::backward(
        backend,
        variant,
        s,
        &g,
        &x,
        &u,
        &a,
        &b,
        &c,
        &rows,
        &tables,
        want_dx.then_some(&mut dx),
        want_dc.then_some(&mut dc),
        &mut h,
        &mut du,
        &mut work,
    )
    .map_err(&e)?;
    let dx = backend.download(&dx).map_err(&e)?;
    let dc = backend.download(&dc).map_err(&e)?;

    // The CPU mirror in storage T: H and ∂U rounded (the GEMM stores them), ∂C summed in f32,
    // ∂X rounded once.
    let (g32, b32, u32, a32) = (f32s(&p.g), f32s(&p.b_cat), f32s(&p.u), f32s(&p.a_cat));
    let mut du_m = vec![0.0f32; t * big_r];
    let mut dc_m = vec![0.0f32; s.n_samples * n];
    for tt in 0..t {
        let sample = p.sample_of[tt];
        let ct = &p.c[sample * n..(sample + 1) * n];
        let h: Vec<f32> = (0..big_r)
            .map(|j| rt::<T>((0..d_out).map(|o| g32[tt * d_out + o] * b32[o * big_r + j]).sum()))
            .collect();
        let ut = &u32[tt * big_r..(tt + 1) * big_r];
        let v: Vec<f32> = (0..r)
            .map(|q| (0..n).map(|i| ct[i] * p.scales[i] * ut[i * r + q]).sum())
            .collect();
        let dv: Vec<f32> = (0..r).map(|q| (0..n).map(|i| ct[i] * h[i * r + q]).sum()).collect();
        for i in 0..n {
            let mut hv = 0.0f32;
            let mut dvu = 0.0f32;
            for q in 0..r {
                du_m[tt * big_r + i * r + q] = rt::<T>(ct[i] * p.scales[i] * dv[q]);
                hv += h[i * r + q] * v[q];
                dvu += dv[q] * ut[i * r + q];
            }
            dc_m[sample * n + i] += hv + p.scales[i] * dvu;
        }
    }
    let check = || -> Result<(), String> {
        if want_dc {
            judge::<T>(
                "dC",
                &to_f64(&dc),
                &w.dc,
                &to_f64(&dc_m),
                max_of(w.dc_abs.iter().cloned()),
            )?;
        } else if dc.iter().any(|v| !v.is_nan()) {
            return Err("dC was written although not asked for".into());
        }
        let dx0 = kernel_tol::wide(&p.dx0);
        if want_dx {
            let mut mirror = vec![0.0; t * d_in];
            for tt in 0..t {
                for k in 0..d_in {
                    let acc: f32 = (0..big_r).map(|j| du_m[tt * big_r + j] * a32[j * d_in + k]).sum();
                    mirror[tt * d_in + k] = f64::from(rt::<T>(p.dx0[tt * d_in + k].to_f32() + acc));
                }
            }
            judge::<T>(
                "dX",
                &kernel_tol::wide(&dx),
                &plus(&dx0, &w.dx),
                &mirror,
                abs_plus(&dx0, &w.dx_abs),
            )?;
        } else if kernel_tol::wide(&dx) != dx0 {
            return Err("dX changed although not asked for".into());
        }
        Ok(())
    };
    check().map_err(|m| format!("{ctx}: {m}"))?;
    Ok(dc)
}

/// Every variant × storage for one case: the forward, and the backward for (∂X, ∂C), ∂C alone
/// and ∂X alone.
fn check_all<B: Backend>(backend: &B, case: &Case, seed: u64) -> Result<(), String> {
    fn one<T: Element, B: Backend>(backend: &B, case: &Case, seed: u64) -> Result<(), String> {
        let p = prepare::<T>(case, seed);
        let w = want_of(&p);
        for &variant in compose_factor::ALL {
            check_forward(backend, variant, &p, &w)?;
            for (dx, dc) in [(true, true), (false, true), (true, false)] {
                check_backward(backend, variant, &p, &w, dx, dc)?;
            }
        }
        Ok(())
    }
    one::<f32, B>(backend, case, seed)?;
    one::<half::bf16, B>(backend, case, seed)
}

/// (seed, T, d_in, d_out, N, r, rows, coefficients).
fn fixed_cases() -> Vec<Case> {
    use Assign::*;
    use CoeffKind::*;
    let case = |seed, t, d_in, d_out, n, r: usize, rows, kind| {
        make_case_with_ranks(seed, t, d_in, d_out, &vec![r; n], Mode::Factor, rows, kind)
    };
    vec![
        case(1, 1, 1, 1, 1, 1, AllSame, Random),
        case(2, 7, 13, 11, 3, 4, Uniform, Random),
        case(3, 33, 37, 29, 8, 8, Zipf, Negative),
        case(4, 7, 33, 45, 3, 1, AllDistinct, OneHot),
        case(5, 33, 20, 35, 1, 8, Uniform, Zero),
        case(6, 17, 65, 31, 8, 4, Zipf, Random),
        case(7, 33, 19, 23, 3, 8, AllDistinct, Negative),
        case(8, 9, 11, 13, 5, 3, Uniform, Random),
        case(9, 7, 21, 17, 3, 40, Zipf, OneHot),
    ]
}

/// The reference's ∂C and ∂X against f64 central differences of its forward, for the loss
/// `L = Σ G ∘ Y`, on tiny factor-mode cases with two coefficient rows.
#[test]
fn reference_backward_matches_finite_differences() {
    for (seed, t, d_in, d_out, n, r) in [(11, 3, 4, 5, 3, 2), (12, 4, 3, 2, 2, 3), (13, 1, 2, 2, 1, 1)] {
        let case = make_case_with_ranks(
            seed,
            t,
            d_in,
            d_out,
            &vec![r; n],
            Mode::Factor,
            Assign::Uniform,
            CoeffKind::Random,
        );
        let rows = Rows {
            sample_of: &case.sample_of,
            n_samples: case.n_samples,
        };
        let stack = case.modules.map(f64::from);
        let (w, x, c, g) = (to_f64(&case.w), to_f64(&case.x), to_f64(&case.c), to_f64(&case.g));
        let layer = reference::Layer {
            w: &w,
            bias: None,
            modules: &stack,
            mode: Mode::Factor,
        };
        let loss = |x: &[f64], c: &[f64]| -> f64 {
            let y = reference::forward(&layer, x, c, rows).unwrap();
            y.iter().zip(&g).map(|(a, b)| a * b).sum()
        };
        let train = Train {
            input: true,
            coeffs: true,
            modules: false,
            base: false,
        };
        let grads = reference::backward(&layer, &x, &c, rows, &g, train).unwrap();
        let h = 1e-6;
        let central = |v: &[f64], at: usize, eval: &dyn Fn(&[f64]) -> f64| {
            let (mut plus, mut minus) = (v.to_vec(), v.to_vec());
            plus[at] += h;
            minus[at] -= h;
            (eval(&plus) - eval(&minus)) / (2.0 * h)
        };
        let fd_c: Vec<f64> = (0..c.len()).map(|k| central(&c, k, &|v| loss(&x, v))).collect();
        let fd_x: Vec<f64> = (0..x.len()).map(|k| central(&x, k, &|v| loss(v, &c))).collect();
        // L is a polynomial of degree 4 in C (two in each factor): truncation O(h²·|L'''|) and
        // cancellation ~1e-16·|L|/h stay below 1e-6 for these magnitudes.
        let tol = Tol::new(1e-6, 1e-6);
        let ctx = |e: String| format!("seed {seed}: {e}");
        compare("dC", &grads.dc, &fd_c, tol).map_err(ctx).unwrap();
        compare("dX", &grads.dx, &fd_x, tol).map_err(ctx).unwrap();
    }
}

#[test]
fn harness_fixed_cases_in_several_thread_orders() {
    for (i, case) in fixed_cases().iter().enumerate() {
        for thread_order in [0, 1, 2 + i as u64] {
            check_all(&CpuHarness::new(thread_order), case, i as u64).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn harness_random_cases(
        seed in any::<u64>(),
        t in prop::sample::select(vec![1usize, 2, 5, 16, 17, 33]),
        d_in in 1usize..=40,
        d_out in 1usize..=40,
        n in 1usize..=8,
        r in prop::sample::select(vec![1usize, 2, 3, 4, 8, 16, 33]),
        rows in assign(),
        kind in coeff_kind(),
        thread_order in 0u64..1000,
    ) {
        let case = make_case_with_ranks(seed, t, d_in, d_out, &vec![r; n], Mode::Factor, rows, kind);
        check_all(&CpuHarness::new(thread_order), &case, seed).map_err(TestCaseError::fail)?;
    }
}

/// ∂C is a fixed-order reduction: the same bits in every thread and block order.
#[test]
fn harness_dc_is_deterministic() {
    let case = make_case_with_ranks(21, 33, 19, 23, &[8; 5], Mode::Factor, Assign::Zipf, CoeffKind::Random);
    let p = prepare::<f32>(&case, 21);
    let w = want_of(&p);
    for &variant in compose_factor::ALL {
        let bits = |seed: u64| -> Vec<u32> {
            let dc =
                check_backward(&CpuHarness::new(seed), variant, &p, &w, false, true).unwrap_or_else(|e| panic!("{e}"));
            dc.iter().map(|v| v.to_bits()).collect()
        };
        let first = bits(0);
        for seed in [1, 2, 3] {
            assert_eq!(
                bits(seed),
                first,
                "{variant:?}: ∂C differs between thread orders 0 and {seed}"
            );
        }
    }
}

/// Unequal ranks are an argument error naming the ranks, in the forward and the backward.
#[test]
fn unequal_ranks_are_rejected() {
    let backend = CpuHarness::new(0);
    let case = make_case_with_ranks(31, 5, 6, 7, &[4, 8], Mode::Product, Assign::Uniform, CoeffKind::Random);
    let p = prepare::<f32>(&case, 31);
    let (t, big_r) = (p.shape.t, p.shape.r_total());
    let (tables, rows, c) = upload_tables(&backend, &p).unwrap();
    let up = |v: &[f32]| backend.upload(v).unwrap();
    let (x, a, b, g) = (
        up(&f32s(&p.x)),
        up(&f32s(&p.a_cat)),
        up(&f32s(&p.b_cat)),
        up(&f32s(&p.g)),
    );
    let (mut u, mut z, mut y) = (up(&vec![0.0; t * big_r]), up(&vec![0.0; t * big_r]), up(&f32s(&p.y0)));
    for &variant in compose_factor::ALL {
        let message = compose_factor::forward(
            &backend, variant, &p.shape, &x, &a, &b, &c, &rows, &tables, &mut u, &mut z, &mut y,
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("same rank") && message.contains("[4, 8]"), "{message}");
        let (mut h, mut du) = (up(&vec![0.0; t * big_r]), up(&vec![0.0; t * big_r]));
        let mut work = backend.alloc::<f32>(t * big_r).unwrap();
        let mut dc = up(&vec![0.0; p.shape.n_samples * 2]);
        let err = compose_factor::backward(
            &backend,
            variant,
            &p.shape,
            &g,
            &x,
            &u,
            &a,
            &b,
            &c,
            &rows,
            &tables,
            None,
            Some(&mut dc),
            &mut h,
            &mut du,
            &mut work,
        )
        .unwrap_err();
        assert!(
            matches!(err, KernelError::Argument { .. }) && err.to_string().contains("same rank"),
            "{err}"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU: run with --ignored on a GPU machine (gpu-bundle/gpu-check.sh does)"]
fn gpu_matches_reference() {
    use compose_factor::Entry;
    let gpu = GpuBackend::probe().unwrap_or_else(|reason| panic!("this test needs a usable CUDA GPU: {reason}"));
    println!("GPU tests on {}", gpu.name());
    // The shared memory the driver reports must match what launch_config budgets.
    for (entry, bytes) in [
        (
            Entry::MixForward(Variant::Warp),
            compose_factor::WARP_MIX_FWD_SHARED_BYTES,
        ),
        (Entry::MixBackward(Variant::Warp), compose_factor::WARP_MIX_SHARED_BYTES),
        (Entry::MixBackward(Variant::Naive), 0),
    ] {
        let function = gpu
            .function(&compose_factor::kernel(entry, DType::BF16).unwrap())
            .unwrap();
        assert_eq!(function.shared_size_bytes().unwrap() as u32, bytes, "{entry:?}");
    }
    for (i, case) in fixed_cases().iter().enumerate() {
        check_all(&gpu, case, i as u64).unwrap_or_else(|e| panic!("{e}"));
    }
    // Larger than the harness can afford: many tokens and samples, N·r past one warp row.
    for (seed, t, d, n, r) in [(40, 300, 257, 8, 16), (41, 1000, 96, 32, 4), (42, 5, 1024, 3, 64)] {
        let case = make_case_with_ranks(
            seed,
            t,
            d,
            d + 3,
            &vec![r; n],
            Mode::Factor,
            Assign::Zipf,
            CoeffKind::Random,
        );
        check_all(&gpu, &case, seed).unwrap_or_else(|e| panic!("{e}"));
    }
}
