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

/// Exact GELU, `x Φ(x)` with `Φ(x) = (1 + erf(x/√2)) / 2` ([`Real::gelu`]).
pub fn gelu_forward<T: Real>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(y, x)| T::gelu(x, y));
    y
}

/// `∂x = ∂y · (Φ(x) + x φ(x))`, φ the standard normal density ([`Real::gelu_backward`]).
pub fn gelu_backward<T: Real>(x: &[T], dy: &[T]) -> Vec<T> {
    assert_eq!(x.len(), dy.len());
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(4096)
        .zip(x.par_chunks(4096).zip(dy.par_chunks(4096)))
        .for_each(|(dx, (x, dy))| T::gelu_backward(x, dy, dx));
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

/// `dst = beta · A B` (m×n, row stride `dst_rs`, unit column stride) for strided views A (m×k)
/// and B (k×n), on the calling thread: attention's per-(batch, head) products run inside a
/// parallel loop over the batch, so they take no threads of their own.
#[allow(clippy::too_many_arguments)]
fn small_gemm<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    dst_rs: usize,
    a: &[T],
    (a_rs, a_cs): (usize, usize),
    b: &[T],
    (b_rs, b_cs): (usize, usize),
    beta: T,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * dst_rs + n <= dst.len(), "destination view out of bounds");
    if k == 0 {
        for r in 0..m {
            dst[r * dst_rs..r * dst_rs + n].fill(T::zero());
        }
        return;
    }
    assert!((m - 1) * a_rs + (k - 1) * a_cs < a.len(), "lhs view out of bounds");
    assert!((k - 1) * b_rs + (n - 1) * b_cs < b.len(), "rhs view out of bounds");
    // SAFETY: the asserts keep every index the kernel forms inside its slice; `dst` is an
    // exclusive borrow, the inputs are shared borrows, so nothing aliases.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            T::zero(),
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Multi-head attention with a key padding mask (B, T; true = real token):
/// `P = softmax(Q_h K_hᵀ / √dh)` over real keys only (padded keys get probability exactly 0),
/// `ctx_h = P V_h`. Returns ctx (B·T, D) and P (B, H, T, T). Every sequence needs ≥ 1 real token.
///
/// Per (batch, head) two small GEMMs on strided views of Q, K, V (no copies) and a row softmax
/// between them; parallel over the batch.
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
            for (h, p) in probs.chunks_mut(t * t).enumerate() {
                let col = base + h * dh;
                // S = Q_h K_hᵀ / √dh into P's storage, then softmax row by row in place.
                small_gemm((t, t, dh), p, t, &q[col..], (d, 1), &k[col..], (1, d), scale);
                T::softmax_rows(p, t, mask);
                small_gemm(
                    (t, dh, t),
                    &mut ctx[h * dh..],
                    d,
                    p,
                    (t, 1),
                    &v[col..],
                    (d, 1),
                    T::one(),
                );
            }
        });
    (ctx, probs)
}

/// Attention's backward, per head: `∂P = ∂ctx Vᵀ`, `∂S = P ∘ (∂P − rowsum(P ∘ ∂P))`,
/// `∂Q = ∂S K / √dh`, `∂K = ∂Sᵀ Q / √dh`, `∂V = Pᵀ ∂ctx`. Returns (∂Q, ∂K, ∂V), each (B·T, D).
/// Padded keys have P = 0, so their ∂S, ∂K and ∂V are exactly 0. Five small GEMMs per
/// (batch, head); parallel over the batch.
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
    assert!(dctx.len() == q.len() && probs.len() == s.batch * s.heads * t * t && mask.len() == s.batch * t);
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
            let mut ds = vec![T::zero(); t * t];
            for h in 0..s.heads {
                let col = base + h * dh;
                let p = &probs[(b * s.heads + h) * t * t..(b * s.heads + h + 1) * t * t];
                // ∂P = ∂ctx_h V_hᵀ, then ∂S in place.
                small_gemm(
                    (t, t, dh),
                    &mut ds,
                    t,
                    &dctx[col..],
                    (d, 1),
                    &v[col..],
                    (1, d),
                    T::one(),
                );
                T::softmax_backward_rows(&mut ds, p, t, scale);
                let off = h * dh;
                small_gemm((t, dh, t), &mut dq[off..], d, &ds, (t, 1), &k[col..], (d, 1), T::one());
                small_gemm((t, dh, t), &mut dk[off..], d, &ds, (1, t), &q[col..], (d, 1), T::one());
                small_gemm((t, dh, t), &mut dv[off..], d, p, (1, t), &dctx[col..], (d, 1), T::one());
            }
        });
    (dq, dk, dv)
}
