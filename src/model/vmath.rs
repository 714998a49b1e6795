//! Vectorisable f32 `erf` and `exp`, and the f32 loops built on them (GELU forward and
//! backward, the softmax's exponentials).
//!
//! libm's scalar `erff`/`expf` are accurate to an ulp but are calls the compiler cannot
//! vectorise; GELU's forward and backward spent a third of a tiny-ViT training step in them.
//! Here both are branch-free polynomials (clamps and selects only), so a loop of them compiles
//! to 8-wide AVX2 + FMA code: the loops below run inside [`pulp::Arch::dispatch`], which picks
//! the widest instruction set the CPU has at run time (and plain SSE2 code elsewhere).
//!
//! Accuracy (asserted by the tests below on dense grids, every input compared with the f64
//! `libm::erf` / `exp`):
//! - [`erf`]: absolute error ≤ 4e-7 over all of f32 (measured 3.44e-7 on [-6, 6]); libm's
//!   `erff` is within 1 ulp (6e-8 near 1). GELU's `Φ(x) = (1 + erf(x/√2))/2` is then within
//!   2e-7 of the exact Φ.
//! - [`exp`]: relative error ≤ 1.2e-7 (2 ulp; measured 8.5e-8) wherever the result is a normal
//!   f32; results below f32's smallest normal (x < ln(f32::MIN_POSITIVE) ≈ −87.34) are flushed to 0, above ln(f32::MAX) give +∞.
//!
//! The coefficients come from `scripts/fit-vmath.py` (rational minimax fit of erf on
//! [0, 3.925], polynomial minimax fit of exp on [-ln2/2, ln2/2]), which prints them and the
//! errors above. The f64 model keeps libm's erf and exp.

/// Beyond ±ERF_CLAMP, erf(x) rounds to ±1 in f32 (erf(3.925) = 1 − 8e-9).
const ERF_CLAMP: f32 = 3.925;
/// erf(x) ≈ x·P(x²)/Q(x²) on [−ERF_CLAMP, ERF_CLAMP], coefficients from the lowest power up.
/// (P's first is the fitted value, 1.5 ulp from 2/√π.)
#[allow(clippy::approx_constant)]
const ERF_P: [f32; 6] = [
    1.128_379,
    0.192_942_9,
    0.053_079_877,
    0.003_874_871_4,
    0.000_287_428_06,
    2.030_707e-6,
];
const ERF_Q: [f32; 6] = [
    1.0,
    0.504_322_8,
    0.115_154_68,
    0.015_185_513,
    0.001_189_335_8,
    3.802_637e-5,
];
/// e^r ≈ Σ c_k r^k on [−ln2/2, ln2/2].
const EXP_C: [f32; 7] = [
    1.0,
    1.0,
    0.499_999_94,
    0.166_664_32,
    0.041_668,
    0.008_374_156,
    0.001_384_365_1,
];
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody–Waite): LN2_HI has 16 significant bits, so n·LN2_HI is exact for
/// every |n| ≤ 255.
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// The smallest f32 above ln(f32::MIN_POSITIVE): below it, e^x is under f32's smallest normal.
const EXP_MIN: f32 = -87.336_54;
/// The largest f32 below ln(f32::MAX): above it, e^x overflows f32.
const EXP_MAX: f32 = 88.722_83;
const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π)
const INV_SQRT_TAU: f32 = 0.398_942_3;

#[inline(always)]
fn horner<const N: usize>(c: &[f32; N], s: f32) -> f32 {
    let mut acc = c[N - 1];
    for k in (0..N - 1).rev() {
        acc = acc.mul_add(s, c[k]);
    }
    acc
}

/// erf(x) in f32, branch-free (see the module notes for its error bound). NaN gives NaN.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let xc = x.clamp(-ERF_CLAMP, ERF_CLAMP);
    let s = xc * xc;
    let y = xc * horner(&ERF_P, s) / horner(&ERF_Q, s);
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// e^x in f32, branch-free (see the module notes for its error bound). NaN gives NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    let n = (xc * LOG2_E + 0.5).floor();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let p = horner(&EXP_C, r);
    // 2^n (n in [−126, 128]) as two exact power-of-two factors, each built in the exponent
    // bits: 2^128 itself is not an f32, though p·2^128 can be (x up to ln(f32::MAX)).
    let n = n as i32;
    let half = n >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * pow2(half) * pow2(n - half);
    if x < EXP_MIN {
        0.0
    } else if x > EXP_MAX {
        f32::INFINITY
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Runs `op` inside pulp's run-time dispatch: `with_simd` is inlined into a function compiled
/// for the widest instruction set the CPU has (AVX2 + FMA on the build machine), so the plain
/// scalar loops of the ops below are auto-vectorised there and `mul_add` is one instruction.
///
/// The ops are structs implementing [`pulp::WithSimd`] with an `#[inline(always)]` method, not
/// closures: a closure handed to `dispatch` is called through its `FnOnce::call_once` shim,
/// which is not inlined into the dispatched function. Measured (perf, `cpu-peer embed`): with
/// closures these loops ran as scalar SSE code calling `fmaf` and `floorf`, ~20% of the run.
#[inline(always)]
fn run<Op: pulp::WithSimd>(op: Op) -> Op::Output {
    pulp::Arch::new().dispatch(op)
}

struct Gelu<'a> {
    x: &'a [f32],
    y: &'a mut [f32],
}

impl pulp::WithSimd for Gelu<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (y, &x) in self.y.iter_mut().zip(self.x) {
            *y = 0.5 * x * (1.0 + erf(x * SQRT_HALF));
        }
    }
}

struct GeluBackward<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a mut [f32],
}

impl pulp::WithSimd for GeluBackward<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for ((dx, &x), &dy) in self.dx.iter_mut().zip(self.x).zip(self.dy) {
            let cdf = 0.5 * (1.0 + erf(x * SQRT_HALF));
            let pdf = INV_SQRT_TAU * exp(-0.5 * x * x);
            *dx = dy * (cdf + x * pdf);
        }
    }
}

/// Exact GELU, `y = x Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2`, element-wise.
pub fn gelu(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len());
    run(Gelu { x, y })
}

/// GELU's backward, `∂x = ∂y · (Φ(x) + x φ(x))`, φ the standard normal density.
pub fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(x.len() == dy.len() && x.len() == dx.len());
    run(GeluBackward { x, dy, dx })
}

/// Lanes of the reductions below: eight independent partial maxima / sums, one AVX2 register,
/// so the loop is not serialised on one accumulator (f32 addition is not reassociated by the
/// compiler on its own).
const LANES: usize = 8;

#[inline(always)]
fn masked_max(row: &[f32], mask: &[bool]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (rc, mc) = (row.chunks_exact(LANES), mask.chunks_exact(LANES));
    let (rt, mt) = (rc.remainder(), mc.remainder());
    for (r, m) in rc.zip(mc) {
        for l in 0..LANES {
            let v = if m[l] { r[l] } else { f32::NEG_INFINITY };
            acc[l] = if v > acc[l] { v } else { acc[l] };
        }
    }
    for (&v, &m) in rt.iter().zip(mt) {
        if m && v > acc[0] {
            acc[0] = v;
        }
    }
    acc.into_iter().fold(f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn lane_sum(row: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let chunks = row.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        acc[l] += v;
    }
    acc.into_iter().sum()
}

struct SoftmaxRows<'a> {
    p: &'a mut [f32],
    t: usize,
    mask: &'a [bool],
}

impl pulp::WithSimd for SoftmaxRows<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let mask = &self.mask[..self.t];
        for row in self.p.chunks_mut(self.t) {
            let mx = masked_max(row, mask);
            for (x, &m) in row.iter_mut().zip(mask) {
                let e = exp(*x - mx);
                *x = if m { e } else { 0.0 };
            }
            let inv = 1.0 / lane_sum(row);
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }
}

/// Each row of `p` (rows of width t) becomes the softmax of its entries over the real keys
/// (`mask[j]`, at least one per row); padded keys get exactly 0. The exponentials are [`exp`].
pub fn softmax_rows(p: &mut [f32], t: usize, mask: &[bool]) {
    assert!(t > 0 && p.len() % t == 0 && mask.len() >= t);
    run(SoftmaxRows { p, t, mask })
}

struct SoftmaxBackwardRows<'a> {
    ds: &'a mut [f32],
    p: &'a [f32],
    t: usize,
    scale: f32,
}

impl pulp::WithSimd for SoftmaxBackwardRows<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (ds, p) in self.ds.chunks_mut(self.t).zip(self.p.chunks(self.t)) {
            let mut acc = [0.0f32; LANES];
            let (gc, pc) = (ds.chunks_exact(LANES), p.chunks_exact(LANES));
            let (gt, pt) = (gc.remainder(), pc.remainder());
            for (g, q) in gc.zip(pc) {
                for l in 0..LANES {
                    acc[l] += q[l] * g[l];
                }
            }
            for (l, (&g, &q)) in gt.iter().zip(pt).enumerate() {
                acc[l] += q * g;
            }
            let rowsum: f32 = acc.into_iter().sum();
            for (g, &q) in ds.iter_mut().zip(p) {
                *g = q * (*g - rowsum) * self.scale;
            }
        }
    }
}

/// Softmax's backward in place, row by row (rows of width t): `∂S = P ∘ (∂P − rowsum(P ∘ ∂P))`,
/// times `scale`. `ds` holds ∂P on entry.
pub fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
    assert!(t > 0 && ds.len() == p.len() && p.len() % t == 0);
    run(SoftmaxBackwardRows { ds, p, t, scale })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every f32 in [lo, hi] at a spacing of (hi − lo)/n, plus the f32 neighbours of each.
    fn grid(lo: f64, hi: f64, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).flat_map(move |i| {
            let x = (lo + (hi - lo) * i as f64 / n as f64) as f32;
            [x.next_down(), x, x.next_up()]
        })
    }

    #[test]
    fn erf_within_its_bound_of_f64_erf() {
        let mut worst = (0.0f64, 0.0f32);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::rng().random());
        let random = (0..200_000).map(|_| rng.random_range(-8.0f32..8.0));
        let special = [
            0.0,
            -0.0,
            1e-30,
            -1e-30,
            1e-8,
            ERF_CLAMP,
            -ERF_CLAMP,
            1e30,
            -1e30,
            f32::MAX,
            f32::MIN,
        ];
        for x in grid(-6.0, 6.0, 1_000_000).chain(random).chain(special) {
            let err = (erf(x) as f64 - libm::erf(x as f64)).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 <= 4e-7, "erf: error {:.3e} at x = {:e}", worst.0, worst.1);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert!(erf(f32::NAN).is_nan());
        // Odd, and exactly so: a sign error on one side would show here.
        for x in grid(0.0, 5.0, 10_000) {
            assert_eq!(erf(-x), -erf(x), "erf(-{x}) is not -erf({x})");
        }
    }

    #[test]
    fn exp_within_its_bound_of_f64_exp() {
        let mut worst = (0.0f64, 0.0f32);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::rng().random());
        let random = (0..200_000).map(|_| rng.random_range(EXP_MIN..EXP_MAX));
        for x in grid(EXP_MIN as f64, EXP_MAX as f64, 2_000_000).chain(random) {
            let want = (x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 || want > f32::MAX as f64 {
                continue;
            }
            let err = (exp(x) as f64 / want - 1.0).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(
            worst.0 <= 1.2e-7,
            "exp: relative error {:.3e} at x = {:e}",
            worst.0,
            worst.1
        );
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_and_its_backward_match_the_f64_formulas() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::rng().random());
        // Odd length: the vector loop's tail runs too.
        let n = 10_007;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                if i % 3 == 0 {
                    rng.random_range(-12.0f32..12.0)
                } else {
                    rng.random_range(-3.0f32..3.0)
                }
            })
            .collect();
        let dy: Vec<f32> = (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let (mut y, mut dx) = (vec![f32::NAN; n], vec![f32::NAN; n]);
        gelu(&x, &mut y);
        gelu_backward(&x, &dy, &mut dx);
        for i in 0..n {
            let (xf, dyf) = (x[i] as f64, dy[i] as f64);
            let cdf = 0.5 * (1.0 + libm::erf(xf * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * xf * xf).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want_y, want_dx) = (xf * cdf, dyf * (cdf + xf * pdf));
            // Φ within 2e-7 (half erf's bound) plus f32 rounding of the few products.
            let tol_y = 2.1e-7 * xf.abs() + 4.0 * f32::EPSILON as f64 * want_y.abs();
            let tol_dx = dyf.abs() * (2.1e-7 + xf.abs() * pdf * 3e-7) + 4.0 * f32::EPSILON as f64 * want_dx.abs();
            assert!(
                (y[i] as f64 - want_y).abs() <= tol_y,
                "gelu({}) = {}, want {want_y}",
                x[i],
                y[i]
            );
            assert!(
                (dx[i] as f64 - want_dx).abs() <= tol_dx,
                "gelu'({}) · {} = {}, want {want_dx}",
                x[i],
                dy[i],
                dx[i]
            );
        }
    }

    /// Softmax rows and their backward against the f64 formulas, on every row width 1..=40
    /// (vector body and tail) with random key masks; padded keys must come out exactly 0.
    #[test]
    fn softmax_rows_and_backward_match_f64() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(rand::rng().random());
        for t in 1..=40usize {
            let rows = 3;
            let mut mask: Vec<bool> = (0..t).map(|_| rng.random_bool(0.7)).collect();
            let real = rng.random_range(0..t);
            mask[real] = true;
            let s: Vec<f32> = (0..rows * t).map(|_| rng.random_range(-30.0f32..30.0)).collect();
            let dp: Vec<f32> = (0..rows * t).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let scale = 0.37f32;
            let mut p = s.clone();
            softmax_rows(&mut p, t, &mask);
            let mut ds = dp.clone();
            softmax_backward_rows(&mut ds, &p, t, scale);
            for r in 0..rows {
                let row = &s[r * t..(r + 1) * t];
                let mx = (0..t)
                    .filter(|&j| mask[j])
                    .map(|j| row[j] as f64)
                    .fold(f64::MIN, f64::max);
                let e: Vec<f64> = (0..t)
                    .map(|j| if mask[j] { (row[j] as f64 - mx).exp() } else { 0.0 })
                    .collect();
                let sum: f64 = e.iter().sum();
                let want: Vec<f64> = e.iter().map(|x| x / sum).collect();
                let pr = &p[r * t..(r + 1) * t];
                let g = &dp[r * t..(r + 1) * t];
                // The backward is checked on the f32 probabilities it was given.
                let rowsum: f64 = (0..t).map(|j| pr[j] as f64 * g[j] as f64).sum();
                for j in 0..t {
                    if !mask[j] {
                        assert_eq!(pr[j], 0.0, "t = {t}: padded key {j} got {}", pr[j]);
                    }
                    // exp within 1.2e-7 relative; its argument x − max rounded to f32 (relative
                    // error |x − max|·ε/2 in e^(x − max)); the sum and the division a few
                    // f32 roundings.
                    let arg = (row[j] as f64 - mx).abs() * f32::EPSILON as f64 / 2.0;
                    let tol = (1.2e-7 + arg + (t as f64 + 4.0) * f32::EPSILON as f64) * want[j] + 1e-30;
                    assert!(
                        (pr[j] as f64 - want[j]).abs() <= tol,
                        "t = {t}, row {r}, key {j}: p = {}, want {}",
                        pr[j],
                        want[j]
                    );
                    let want_ds = pr[j] as f64 * (g[j] as f64 - rowsum) * scale as f64;
                    let mag = pr[j] as f64 * (g[j].abs() as f64 + 2.0) * scale as f64;
                    let tol_ds = (t as f64 + 4.0) * f32::EPSILON as f64 * mag + 1e-30;
                    let got = ds[r * t + j] as f64;
                    assert!(
                        (got - want_ds).abs() <= tol_ds,
                        "t = {t}, row {r}, key {j}: ds = {got}, want {want_ds}"
                    );
                }
            }
        }
    }
}
