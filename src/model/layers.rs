//! The transformer's non-linear layers, each forward beside its backward.
//!
//! Activations are row-major `(rows, width)` with `rows = B·T`. Row work runs in parallel
//! (rayon) with no allocation per element; reductions over rows (parameter gradients) use
//! fixed chunks summed in order, so results do not depend on thread scheduling.

use rayon::prelude::*;

use super::Real;

/// Rows per parallel task in row-wise loops.
const ROW_CHUNK: usize = 16;
/// Rows per partial sum in column reductions: fixed, so the summation order is too.
const REDUCE_CHUNK: usize = 64;

/// `Σ a_i b_i` with eight independent accumulators, so the loop vectorises.
#[inline]
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [T::zero(); 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ta, tb) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        s += *x * *y;
    }
    s
}

/// `y += alpha · x`.
#[inline]
pub fn axpy<T: Real>(y: &mut [T], alpha: T, x: &[T]) {
    debug_assert_eq!(y.len(), x.len());
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Column sums over `rows` rows of width `width`, where `add_row(r, acc)` adds row r's
/// contribution into `acc` (f64). Chunks of [`REDUCE_CHUNK`] rows run in parallel; their
/// partial sums are added in chunk order.
pub fn column_sums(rows: usize, width: usize, add_row: impl Fn(usize, &mut [f64]) + Sync) -> Vec<f64> {
    let chunks = rows.div_ceil(REDUCE_CHUNK);
    let partials: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|ci| {
            let mut acc = vec![0.0f64; width];
            for r in ci * REDUCE_CHUNK..((ci + 1) * REDUCE_CHUNK).min(rows) {
                add_row(r, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![0.0f64; width];
    for p in partials {
        for (t, x) in total.iter_mut().zip(p) {
            *t += x;
        }
    }
    total
}

/// `out = a + b`, element-wise (residual connections).
pub fn add<T: Real>(a: &[T], b: &[T]) -> Vec<T> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}

/// What layer norm keeps for its backward.
#[derive(Clone, Debug, Default)]
pub struct LnCache<T> {
    /// (rows, D): `(x − μ) / σ`
    pub xhat: Vec<T>,
    /// (rows): `1 / σ`, σ = sqrt(var + eps)
    pub rstd: Vec<T>,
}

/// `y = (x − μ)/σ · γ + β` per row of width D; statistics in f64 (two passes).
pub fn layernorm_forward<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> (Vec<T>, LnCache<T>) {
    let d = gamma.len();
    assert!(d > 0 && x.len() % d == 0 && beta.len() == d);
    let rows = x.len() / d;
    let mut y = vec![T::zero(); x.len()];
    let mut xhat = vec![T::zero(); x.len()];
    let mut rstd = vec![T::zero(); rows];
    y.par_chunks_mut(d)
        .zip(xhat.par_chunks_mut(d))
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(d))
        .with_min_len(ROW_CHUNK)
        .for_each(|(((y, xh), rs), x)| {
            let mean = x.iter().map(|&v| v.into()).sum::<f64>() / d as f64;
            let var = x
                .iter()
                .map(|&v| {
                    let c = v.into() - mean;
                    c * c
                })
                .sum::<f64>()
                / d as f64;
            let r = 1.0 / (var + eps).sqrt();
            let (mean_t, r_t) = (T::of(mean), T::of(r));
            *rs = r_t;
            for ((((y, xh), &x), &g), &b) in y.iter_mut().zip(xh.iter_mut()).zip(x).zip(gamma).zip(beta) {
                *xh = (x - mean_t) * r_t;
                *y = *xh * g + b;
            }
        });
    (y, LnCache { xhat, rstd })
}

/// Layer norm's backward: `∂x = (∂x̂ − mean(∂x̂) − x̂·mean(∂x̂∘x̂)) / σ` with `∂x̂ = ∂y ∘ γ`;
/// `∂γ = Σ_rows ∂y∘x̂`, `∂β = Σ_rows ∂y` when `params` is set (else both empty).
pub fn layernorm_backward<T: Real>(
    dy: &[T],
    gamma: &[T],
    cache: &LnCache<T>,
    want_dx: bool,
    params: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let d = gamma.len();
    assert_eq!(dy.len(), cache.xhat.len());
    let rows = dy.len() / d;
    let mut dx = Vec::new();
    if want_dx {
        dx = vec![T::zero(); dy.len()];
        dx.par_chunks_mut(d)
            .zip(dy.par_chunks(d))
            .zip(cache.xhat.par_chunks(d))
            .zip(cache.rstd.par_iter())
            .with_min_len(ROW_CHUNK)
            .for_each(|(((dx, dy), xh), &r)| {
                let (mut a, mut b) = (0.0f64, 0.0f64);
                for ((&dy, &g), &xh) in dy.iter().zip(gamma).zip(xh) {
                    let dxh: f64 = (dy * g).into();
                    a += dxh;
                    b += dxh * xh.into();
                }
                let (a, b) = (T::of(a / d as f64), T::of(b / d as f64));
                for (((dx, &dy), &g), &xh) in dx.iter_mut().zip(dy).zip(gamma).zip(xh) {
                    *dx = (dy * g - a - xh * b) * r;
                }
            });
    }
    let (mut dgamma, mut dbeta) = (Vec::new(), Vec::new());
    if params {
        let sums = column_sums(rows, 2 * d, |r, acc| {
            let (dy, xh) = (&dy[r * d..(r + 1) * d], &cache.xhat[r * d..(r + 1) * d]);
            let (ag, ab) = acc.split_at_mut(d);
            for j in 0..d {
                ag[j] += (dy[j] * xh[j]).into();
                ab[j] += dy[j].into();
            }
        });
        dgamma = sums[..d].iter().map(|&x| T::of(x)).collect();
        dbeta = sums[d..].iter().map(|&x| T::of(x)).collect();
    }
    (dx, dgamma, dbeta)
}

const SQRT_HALF: f64 = std::f64::consts::FRAC_1_SQRT_2;
/// 1/sqrt(2π)
const INV_SQRT_TAU: f64 = 0.398_942_280_401_432_7;

/// Exact GELU, `x Φ(x)` with `Φ(x) = (1 + erf(x/√2)) / 2`.
pub fn gelu_forward<T: Real>(x: &[T]) -> Vec<T> {
    let (half, s) = (T::of(0.5), T::of(SQRT_HALF));
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = half * x * (T::one() + (x * s).erf());
        }
    });
    y
}

/// `∂x = ∂y · (Φ(x) + x φ(x))`, φ the standard normal density.
pub fn gelu_backward<T: Real>(x: &[T], dy: &[T]) -> Vec<T> {
    assert_eq!(x.len(), dy.len());
    let (half, s, c) = (T::of(0.5), T::of(SQRT_HALF), T::of(INV_SQRT_TAU));
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(4096)
        .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
        .for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let cdf = half * (T::one() + (x * s).erf());
                let pdf = c * (-half * x * x).exp();
                *dx = dy * (cdf + x * pdf);
            }
        });
    dx
}

/// Shapes of one attention call: rows are `B·T`, width `D = H·dh`.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Multi-head attention with a key padding mask (B, T; true = real token):
/// `P = softmax(Q_h K_hᵀ / √dh)` over real keys only (padded keys get probability exactly 0),
/// `ctx_h = P V_h`. Returns ctx (B·T, D) and P (B, H, T, T). Every sequence needs ≥ 1 real token.
pub fn attention_forward<T: Real>(q: &[T], k: &[T], v: &[T], mask: &[bool], s: AttnShape) -> (Vec<T>, Vec<T>) {
    let (t, d, dh) = (s.seq, s.width(), s.head_dim);
    assert!(q.len() == s.batch * t * d && k.len() == q.len() && v.len() == q.len() && mask.len() == s.batch * t);
    let scale = T::of(1.0 / (dh as f64).sqrt());
    let mut ctx = vec![T::zero(); q.len()];
    let mut probs = vec![T::zero(); s.batch * s.heads * t * t];
    ctx.par_chunks_mut(t * d)
        .zip(probs.par_chunks_mut(s.heads * t * t))
        .enumerate()
        .for_each(|(b, (ctx, probs))| {
            let base = b * t * d;
            let mask = &mask[b * t..(b + 1) * t];
            for h in 0..s.heads {
                let col = h * dh;
                for i in 0..t {
                    let qi = &q[base + i * d + col..base + i * d + col + dh];
                    let p = &mut probs[(h * t + i) * t..(h * t + i + 1) * t];
                    let mut mx = T::neg_infinity();
                    for j in 0..t {
                        if mask[j] {
                            let sc = dot(qi, &k[base + j * d + col..base + j * d + col + dh]) * scale;
                            p[j] = sc;
                            mx = mx.max(sc);
                        }
                    }
                    let mut sum = T::zero();
                    for j in 0..t {
                        p[j] = if mask[j] { (p[j] - mx).exp() } else { T::zero() };
                        sum += p[j];
                    }
                    let inv = T::one() / sum;
                    let out = &mut ctx[i * d + col..i * d + col + dh];
                    for j in 0..t {
                        if mask[j] {
                            p[j] *= inv;
                            axpy(out, p[j], &v[base + j * d + col..base + j * d + col + dh]);
                        }
                    }
                }
            }
        });
    (ctx, probs)
}

/// Attention's backward, per head: `∂P = ∂ctx Vᵀ`, `∂S = P ∘ (∂P − rowsum(P ∘ ∂P))`,
/// `∂Q = ∂S K / √dh`, `∂K = ∂Sᵀ Q / √dh`, `∂V = Pᵀ ∂ctx`. Returns (∂Q, ∂K, ∂V), each (B·T, D).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    mask: &[bool],
    dctx: &[T],
    s: AttnShape,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, d, dh) = (s.seq, s.width(), s.head_dim);
    assert!(dctx.len() == q.len() && probs.len() == s.batch * s.heads * t * t);
    let scale = T::of(1.0 / (dh as f64).sqrt());
    let (mut dq, mut dk, mut dv) = (
        vec![T::zero(); q.len()],
        vec![T::zero(); q.len()],
        vec![T::zero(); q.len()],
    );
    dq.par_chunks_mut(t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(b, ((dq, dk), dv))| {
            let base = b * t * d;
            let mask = &mask[b * t..(b + 1) * t];
            let mut ds = vec![T::zero(); t];
            for h in 0..s.heads {
                let col = h * dh;
                for i in 0..t {
                    let p = &probs[((b * s.heads + h) * t + i) * t..((b * s.heads + h) * t + i + 1) * t];
                    let gi = &dctx[base + i * d + col..base + i * d + col + dh];
                    let mut rowsum = T::zero();
                    for j in 0..t {
                        ds[j] = if mask[j] {
                            dot(gi, &v[base + j * d + col..base + j * d + col + dh])
                        } else {
                            T::zero()
                        };
                        rowsum += p[j] * ds[j];
                    }
                    let qi = &q[base + i * d + col..base + i * d + col + dh];
                    for j in 0..t {
                        if !mask[j] {
                            continue;
                        }
                        let dsj = p[j] * (ds[j] - rowsum) * scale;
                        let kj = &k[base + j * d + col..base + j * d + col + dh];
                        axpy(&mut dq[i * d + col..i * d + col + dh], dsj, kj);
                        axpy(&mut dk[j * d + col..j * d + col + dh], dsj, qi);
                        axpy(&mut dv[j * d + col..j * d + col + dh], p[j], gi);
                    }
                }
            }
        });
    (dq, dk, dv)
}
