//! The fused CPU path: N modules as one rank-R product (DESIGN §2, "the fused form").
//!
//! ```text
//! U = X A_catᵀ                 (T, R)   shrink: one GEMM for all modules
//! Z = mix(U; C, σ)             (T, R)   per-sample diagonal (product) or block mix (factor)
//! Y = X Wᵀ + b + Z B_catᵀ      (T, d_out)
//! ```
//!
//! Backward, given `G = ∂L/∂Y`:
//!
//! ```text
//! H  = G B_cat                 (T, R)
//! ∂U, ∂C = mixᵀ(H; U, C, σ)    per-sample ∂C rows, reduced in f64
//! ∂X = G W + ∂U A_cat,  ∂A_cat = ∂Uᵀ X,  ∂B_cat = Gᵀ Z,  ∂W = Gᵀ X,  ∂b = Σ_t G_t
//! ```
//!
//! With one coefficient row (product mode, S = 1) and many tokens the modules can instead be
//! merged into the weight first, `W' = W + B_cat diag(D) A_cat` (2·R·d_in·d_out flops instead
//! of the per-token route's 2·T·R·(d_in + d_out)); [`merges`] picks the cheaper. Then
//!
//! ```text
//! Y = X W'ᵀ + b,   ∂X = G W'
//! ∂C_i = s_i Σ_{j ∈ block i} ⟨(B_catᵀ P)_j, A_cat,j⟩ with P = Gᵀ X   (or through U, H when cheaper)
//! ```
//!
//! and the cache holds `W'` instead of `U` and `Z` (∂A_cat, ∂B_cat recompute them).
//!
//! GEMMs run on the `gemm` crate, multi-threaded through rayon; the mixes are row-parallel.
//! Storage and GEMM accumulation are f32; the `∂C` reduction over tokens is f64.

use rayon::prelude::*;

use super::{GradsOf, LayerOf, Mode, ModuleStack, Rows, Train};
use crate::{Error, Result};

/// A strided matrix view: element (i, j) is `data[i·rs + j·cs]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major (rows, cols) matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "view is not {rows}×{cols}");
        View {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without copying.
    pub fn t(self) -> Self {
        View {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Up to this many rows, [`matmul`] runs the GEMM column-major (see there).
const SMALL_M: usize = 64;

/// `dst (m, n) row-major = [dst +] a (m, k) · b (k, n)`, on the `gemm` crate.
///
/// The crate's microkernel wants the destination and the left operand column-major; given a
/// row-major destination it solves the transposed problem, whose left operand is then `bᵀ` —
/// for `Y = X Wᵀ` that is W itself, row-major, which it repacks on every call, and more than
/// once (per column block). At few rows (m ≤ [`SMALL_M`], a multiple of 8) that repacking costs
/// more than the multiply-adds, so there `a` is copied column-major, the product is formed
/// column-major in a scratch buffer and copied back: 2·m·(k + n) moves instead of ≥ k·n.
pub fn matmul(dst: &mut [f32], a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "inner dimensions differ: {m}×{k} · {}×{n}", b.rows);
    assert_eq!(dst.len(), m * n, "destination is not {m}×{n}");
    for v in [&a, &b] {
        if v.rows > 0 && v.cols > 0 {
            assert!(
                (v.rows - 1) * v.rs + (v.cols - 1) * v.cs < v.data.len(),
                "view out of bounds"
            );
        }
    }
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    if m <= SMALL_M && m % 8 == 0 && a.rs != 1 && n >= 32 && k >= 32 {
        // aᵀ-major copy: element (i, l) at i + l·m.
        let mut at = vec![0.0f32; m * k];
        for (l, col) in at.chunks_mut(m).enumerate() {
            for (i, x) in col.iter_mut().enumerate() {
                *x = a.data[i * a.rs + l * a.cs];
            }
        }
        let mut dt = vec![0.0f32; m * n];
        if accumulate {
            for (j, col) in dt.chunks_mut(m).enumerate() {
                for (i, x) in col.iter_mut().enumerate() {
                    *x = dst[i * n + j];
                }
            }
        }
        let at_view = View {
            data: &at,
            rows: m,
            cols: k,
            rs: 1,
            cs: m,
        };
        gemm_raw(&mut dt, (m, 1), at_view, b, accumulate);
        for (j, col) in dt.chunks(m).enumerate() {
            for (i, &x) in col.iter().enumerate() {
                dst[i * n + j] = x;
            }
        }
        return;
    }
    gemm_raw(dst, (1, n), a, b, accumulate);
}

/// `dst = [dst +] a · b` for a destination with column stride `cs` and row stride `rs`,
/// shapes and bounds already checked by [`matmul`].
fn gemm_raw(dst: &mut [f32], (cs, rs): (usize, usize), a: View, b: View, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    debug_assert!((m - 1) * rs + (n - 1) * cs < dst.len());
    // SAFETY: matmul's asserts keep every index the kernel forms, (i·rs + j·cs) for i < rows,
    // j < cols, inside each slice (the scratch buffers are exactly m·k and m·n); `dst` is an
    // exclusive borrow and does not alias the shared inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            cs as isize,
            rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// One composed layer's frozen parts (f32).
pub type Layer<'a> = LayerOf<'a, f32>;

/// What the forward keeps for the backward.
#[derive(Clone, Debug, Default)]
pub struct Cache {
    /// (T, R): `X A_catᵀ`, unscaled (empty after a merged forward).
    pub u: Vec<f32>,
    /// (T, R): the mixed `Z` that met `B_cat` (empty after a merged forward).
    pub z: Vec<f32>,
    /// (d_out, d_in): the merged weight `W + B_cat diag(D) A_cat` when the forward merged
    /// ([`merges`]), else empty.
    pub w: Vec<f32>,
}

impl Cache {
    /// Checks that this cache came from a forward over T tokens and total rank R.
    pub fn check(&self, t: usize, r_total: usize) -> Result<()> {
        if self.u.len() != t * r_total || self.z.len() != t * r_total {
            return Err(Error::Shape("the forward cache does not belong to this call".into()));
        }
        Ok(())
    }

    /// The same for the fast path, whose cache holds either U and Z or the merged weight.
    fn check_fast(&self, t: usize, m: &ModuleStack<f32>, merged: bool) -> Result<()> {
        if merged {
            if self.w.len() != m.d_out * m.d_in || !self.u.is_empty() {
                return Err(Error::Shape("the forward cache does not belong to this call".into()));
            }
            return Ok(());
        }
        self.check(t, m.total_rank())
    }
}

/// Whether [`forward`] merges the modules into the weight: one coefficient row in product mode,
/// and the merge (2·R·d_in·d_out flops) cheaper than the per-token shrink and expand
/// (2·T·R·(d_in + d_out)). A function of the shapes only, so forward and backward agree.
pub fn merges(m: &ModuleStack<f32>, mode: Mode, rows: Rows, t_len: usize) -> bool {
    mode == Mode::Product && rows.n_samples == 1 && m.total_rank() > 0 && t_len * (m.d_in + m.d_out) > m.d_in * m.d_out
}

/// Whether a merged backward forms `∂C` from `P = Gᵀ X` (2·d_in·d_out·(T + R) flops) rather
/// than from `U = X A_catᵀ` and `H = G B_cat` (2·T·R·(d_in + d_out)); shapes only, so the
/// gradients do not depend on which others `train` asks for.
pub fn dc_through_p(m: &ModuleStack<f32>, t_len: usize) -> bool {
    let r_total = m.total_rank();
    m.d_in * m.d_out * (t_len + r_total) < t_len * r_total * (m.d_in + m.d_out)
}

/// Gradients (f32; `∂C` in f64).
pub type Grads = GradsOf<f32>;

/// Per-sample diagonal of the product mode: `D[σ, j] = C[σ, i(j)] · s_i` (S, R).
fn product_diag(m: &ModuleStack<f32>, c: &[f32], n_samples: usize) -> Vec<f32> {
    let r_total = m.total_rank();
    let mut d = Vec::with_capacity(n_samples * r_total);
    for row in c.chunks(m.n()).take(n_samples) {
        for (i, &r) in m.ranks.iter().enumerate() {
            d.extend(std::iter::repeat_n(row[i] * m.scales[i], r));
        }
    }
    d
}

/// Rows of this many tokens are one unit of parallel work in the mixes.
const MIX_CHUNK: usize = 16;

/// `Z = mix(U)`. Product: `Z[t] = U[t] ∘ D[σ(t)]`. Factor (rank r each):
/// `v = Σ_i c_i s_i U[t, block i]`, `Z[t, block j] = c_j v`.
fn mix(m: &ModuleStack<f32>, mode: Mode, u: &[f32], c: &[f32], rows: Rows) -> Vec<f32> {
    let (n, r_total) = (m.n(), m.total_rank());
    let mut z = vec![0.0f32; u.len()];
    if r_total == 0 {
        return z;
    }
    match mode {
        Mode::Product => {
            let d = product_diag(m, c, rows.n_samples);
            z.par_chunks_mut(r_total * MIX_CHUNK)
                .zip(u.par_chunks(r_total * MIX_CHUNK))
                .enumerate()
                .for_each(|(chunk, (z, u))| {
                    for (tt, (z, u)) in z.chunks_mut(r_total).zip(u.chunks(r_total)).enumerate() {
                        let s = rows.sample_of[chunk * MIX_CHUNK + tt];
                        let d = &d[s * r_total..(s + 1) * r_total];
                        for ((z, u), d) in z.iter_mut().zip(u).zip(d) {
                            *z = u * d;
                        }
                    }
                });
        }
        Mode::Factor => {
            let r = r_total / n;
            z.par_chunks_mut(r_total)
                .zip(u.par_chunks(r_total))
                .enumerate()
                .for_each(|(t, (z, u))| {
                    let ct = &c[rows.sample_of[t] * n..(rows.sample_of[t] + 1) * n];
                    let mut v = vec![0.0f32; r];
                    for (i, ub) in u.chunks(r).enumerate() {
                        let w = ct[i] * m.scales[i];
                        for (v, u) in v.iter_mut().zip(ub) {
                            *v += w * u;
                        }
                    }
                    for (j, zb) in z.chunks_mut(r).enumerate() {
                        for (z, v) in zb.iter_mut().zip(&v) {
                            *z = ct[j] * v;
                        }
                    }
                });
        }
    }
    z
}

/// The mix's transpose: `∂U` (T, R) and the per-token `∂C` contributions (T, N), from
/// `H = G B_cat`. Both are O(T·R), small beside the GEMMs, so both are always formed.
fn mix_backward(m: &ModuleStack<f32>, mode: Mode, u: &[f32], h: &[f32], c: &[f32], rows: Rows) -> (Vec<f32>, Vec<f64>) {
    let (n, r_total) = (m.n(), m.total_rank());
    let t_len = rows.sample_of.len();
    let mut du = vec![0.0f32; t_len * r_total];
    let mut dc_tok = vec![0.0f64; t_len * n];
    if r_total == 0 {
        return (du, dc_tok);
    }
    let off = m.offsets();
    let d = if mode == Mode::Product {
        product_diag(m, c, rows.n_samples)
    } else {
        Vec::new()
    };
    du.par_chunks_mut(r_total)
        .zip(dc_tok.par_chunks_mut(n))
        .enumerate()
        .with_min_len(MIX_CHUNK)
        .for_each(|(t, (du, dc))| {
            let s = rows.sample_of[t];
            let (ut, ht) = (&u[t * r_total..(t + 1) * r_total], &h[t * r_total..(t + 1) * r_total]);
            let ct = &c[s * n..(s + 1) * n];
            match mode {
                Mode::Product => {
                    let dt = &d[s * r_total..(s + 1) * r_total];
                    for ((du, h), d) in du.iter_mut().zip(ht).zip(dt) {
                        *du = h * d;
                    }
                    for i in 0..n {
                        let dot: f64 = (off[i]..off[i + 1]).map(|j| ht[j] as f64 * ut[j] as f64).sum();
                        dc[i] = m.scales[i] as f64 * dot;
                    }
                }
                Mode::Factor => {
                    let r = r_total / n;
                    // v = Σ_i c_i s_i U[block i];  ∂v = Σ_j c_j H[block j]
                    let mut v = vec![0.0f64; r];
                    let mut dv = vec![0.0f64; r];
                    for i in 0..n {
                        let w = ct[i] as f64 * m.scales[i] as f64;
                        for q in 0..r {
                            v[q] += w * ut[i * r + q] as f64;
                            dv[q] += ct[i] as f64 * ht[i * r + q] as f64;
                        }
                    }
                    for i in 0..n {
                        let w = ct[i] as f64 * m.scales[i] as f64;
                        let mut acc = 0.0;
                        for q in 0..r {
                            acc += ht[i * r + q] as f64 * v[q] + m.scales[i] as f64 * dv[q] * ut[i * r + q] as f64;
                            du[i * r + q] = (w * dv[q]) as f32;
                        }
                        dc[i] = acc;
                    }
                }
            }
        });
    (du, dc_tok)
}

/// `X wᵀ + b` (T, d_out) for a weight `w` of the layer's shape (its own or the merged one).
fn base_product(layer: &Layer, xv: View, w: &[f32]) -> Vec<f32> {
    let (d_in, d_out) = (layer.modules.d_in, layer.modules.d_out);
    let mut y = vec![0.0f32; xv.rows * d_out];
    if let Some(b) = layer.bias {
        for row in y.chunks_mut(d_out) {
            row.copy_from_slice(b);
        }
    }
    matmul(&mut y, xv, View::new(w, d_out, d_in).t(), layer.bias.is_some());
    y
}

/// `Y = X Wᵀ + b + mix(X A_catᵀ) B_catᵀ`; returns Y (T, d_out) and the cache for the backward.
/// `c` is (S, N): the coefficients themselves.
pub fn forward(layer: &Layer, x: &[f32], c: &[f32], rows: Rows) -> Result<(Vec<f32>, Cache)> {
    let m = layer.modules;
    let t_len = layer.check(x.len(), c.len(), rows, None)?;
    let (d_in, d_out, r_total) = (m.d_in, m.d_out, m.total_rank());
    let xv = View::new(x, t_len, d_in);

    if merges(m, layer.mode, rows, t_len) {
        // W' = W + (B_cat diag(D)) A_cat, then one GEMM.
        let d = product_diag(m, c, 1);
        let mut bd = m.b_cat.clone(); // (d_out, R)
        for row in bd.chunks_mut(r_total) {
            for (b, d) in row.iter_mut().zip(&d) {
                *b *= d;
            }
        }
        let mut w = layer.w.to_vec();
        matmul(
            &mut w,
            View::new(&bd, d_out, r_total),
            View::new(&m.a_cat, r_total, d_in),
            true,
        );
        let y = base_product(layer, xv, &w);
        return Ok((y, Cache { w, ..Cache::default() }));
    }

    let mut u = vec![0.0f32; t_len * r_total]; // (T, R)
    matmul(&mut u, xv, View::new(&m.a_cat, r_total, d_in).t(), false);
    let z = mix(m, layer.mode, &u, c, rows);

    let mut y = base_product(layer, xv, layer.w); // (T, d_out)
    matmul(
        &mut y,
        View::new(&z, t_len, r_total),
        View::new(&m.b_cat, d_out, r_total).t(),
        true,
    );
    Ok((y, Cache { u, z, w: Vec::new() }))
}

/// Gradients of a loss with `G = ∂L/∂Y` (T, d_out), computing only what `train` asks for.
pub fn backward(
    layer: &Layer,
    x: &[f32],
    cache: &Cache,
    c: &[f32],
    rows: Rows,
    g: &[f32],
    train: Train,
) -> Result<Grads> {
    let m = layer.modules;
    let t_len = layer.check(x.len(), c.len(), rows, Some(g.len()))?;
    let (d_in, d_out, n, r_total) = (m.d_in, m.d_out, m.n(), m.total_rank());
    let merged = merges(m, layer.mode, rows, t_len);
    cache.check_fast(t_len, m, merged)?;
    if merged {
        return backward_merged(layer, x, cache, c, rows, g, train);
    }
    let (xv, gv) = (View::new(x, t_len, d_in), View::new(g, t_len, d_out));
    let a_cat = View::new(&m.a_cat, r_total, d_in);
    let b_cat = View::new(&m.b_cat, d_out, r_total);
    let mut gr = Grads::default();

    let want_du = train.input || train.modules;
    if want_du || train.coeffs {
        let mut h = vec![0.0f32; t_len * r_total]; // (T, R)
        matmul(&mut h, gv, b_cat, false);
        let (du, dc_tok) = mix_backward(m, layer.mode, &cache.u, &h, c, rows);
        if train.coeffs {
            gr.dc = dc_per_sample(&dc_tok, rows, n);
        }
        if train.input {
            gr.dx = vec![0.0f32; t_len * d_in];
            matmul(&mut gr.dx, gv, View::new(layer.w, d_out, d_in), false);
            matmul(&mut gr.dx, View::new(&du, t_len, r_total), a_cat, true);
        }
        if train.modules {
            gr.da_cat = vec![0.0f32; r_total * d_in];
            matmul(&mut gr.da_cat, View::new(&du, t_len, r_total).t(), xv, false);
            gr.db_cat = vec![0.0f32; d_out * r_total];
            matmul(&mut gr.db_cat, gv.t(), View::new(&cache.z, t_len, r_total), false);
        }
    } else if train.input {
        gr.dx = vec![0.0f32; t_len * d_in];
        matmul(&mut gr.dx, gv, View::new(layer.w, d_out, d_in), false);
    }
    if train.base {
        gr.dw = vec![0.0f32; d_out * d_in];
        matmul(&mut gr.dw, gv.t(), xv, false);
        gr.dbias = bias_grad(layer, g);
    }
    Ok(gr)
}

/// The per-token `∂C` contributions (T, N) of [`mix_backward`] summed into their samples' rows
/// (S, N), in token order.
fn dc_per_sample(dc_tok: &[f64], rows: Rows, n: usize) -> Vec<f64> {
    let mut dc = vec![0.0f64; rows.n_samples * n];
    // Without modules dc_tok is empty (and chunks of 0 are not allowed).
    for (t, row) in dc_tok.chunks(n.max(1)).enumerate() {
        let s = rows.sample_of[t];
        for (acc, &x) in dc[s * n..(s + 1) * n].iter_mut().zip(row) {
            *acc += x;
        }
    }
    dc
}

/// `∂b = Σ_t G_t` (f64 sums) when the layer has a bias, else empty.
fn bias_grad(layer: &Layer, g: &[f32]) -> Vec<f32> {
    if layer.bias.is_none() {
        return Vec::new();
    }
    let d_out = layer.modules.d_out;
    let mut acc = vec![0.0f64; d_out];
    for row in g.chunks(d_out) {
        for (a, &x) in acc.iter_mut().zip(row) {
            *a += x as f64;
        }
    }
    acc.into_iter().map(|x| x as f32).collect()
}

/// [`backward`] after a merged forward (one row, product mode): `∂X = G W'`; `∂C` from
/// `P = Gᵀ X` or from `U` and `H` ([`dc_through_p`]); `∂A_cat`, `∂B_cat` from `U` and `H`
/// recomputed; `∂W = P`.
fn backward_merged(
    layer: &Layer,
    x: &[f32],
    cache: &Cache,
    c: &[f32],
    rows: Rows,
    g: &[f32],
    train: Train,
) -> Result<Grads> {
    let m = layer.modules;
    let (d_in, d_out, n, r_total) = (m.d_in, m.d_out, m.n(), m.total_rank());
    let t_len = rows.sample_of.len();
    let (xv, gv) = (View::new(x, t_len, d_in), View::new(g, t_len, d_out));
    let a_cat = View::new(&m.a_cat, r_total, d_in);
    let b_cat = View::new(&m.b_cat, d_out, r_total);
    let through_p = dc_through_p(m, t_len);
    let mut gr = Grads::default();
    if train.input {
        gr.dx = vec![0.0f32; t_len * d_in];
        matmul(&mut gr.dx, gv, View::new(&cache.w, d_out, d_in), false);
    }
    // P = Gᵀ X (d_out, d_in): ∂W, and ∂C's route when cheaper.
    let p = if train.base || (train.coeffs && through_p) {
        let mut p = vec![0.0f32; d_out * d_in];
        matmul(&mut p, gv.t(), xv, false);
        p
    } else {
        Vec::new()
    };
    if train.coeffs && through_p {
        // Q = B_catᵀ P (R, d_in); ∂c_i = s_i Σ_{j ∈ block i} ⟨Q_j, A_cat,j⟩.
        let mut q = vec![0.0f32; r_total * d_in];
        matmul(&mut q, b_cat.t(), View::new(&p, d_out, d_in), false);
        let off = m.offsets();
        gr.dc = (0..n)
            .map(|i| {
                let dot: f64 = q[off[i] * d_in..off[i + 1] * d_in]
                    .iter()
                    .zip(&m.a_cat[off[i] * d_in..off[i + 1] * d_in])
                    .map(|(&q, &a)| q as f64 * a as f64)
                    .sum();
                m.scales[i] as f64 * dot
            })
            .collect();
    }
    if train.modules || (train.coeffs && !through_p) {
        let mut u = vec![0.0f32; t_len * r_total];
        matmul(&mut u, xv, a_cat.t(), false);
        let mut h = vec![0.0f32; t_len * r_total];
        matmul(&mut h, gv, b_cat, false);
        let (du, dc_tok) = mix_backward(m, layer.mode, &u, &h, c, rows);
        if train.coeffs && !through_p {
            gr.dc = dc_per_sample(&dc_tok, rows, n);
        }
        if train.modules {
            let z = mix(m, layer.mode, &u, c, rows);
            gr.da_cat = vec![0.0f32; r_total * d_in];
            matmul(&mut gr.da_cat, View::new(&du, t_len, r_total).t(), xv, false);
            gr.db_cat = vec![0.0f32; d_out * r_total];
            matmul(&mut gr.db_cat, gv.t(), View::new(&z, t_len, r_total), false);
        }
    }
    if train.base {
        gr.dw = p;
        gr.dbias = bias_grad(layer, g);
    }
    Ok(gr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// [`matmul`] against an f64 product, for both of its routes (few rows: column-major scratch;
    /// otherwise straight to the crate), with and without accumulation, on row-major and
    /// transposed views. Bound: k·ε_f32·Σ|a||b| per element (the f32 accumulation error).
    #[test]
    fn matmul_matches_f64_on_both_routes() {
        let seed = rand::rng().random();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        // (m, k, n): the small-m route needs m ≤ 64, m % 8 == 0, k, n ≥ 32.
        let shapes = [
            (8, 40, 33),
            (16, 96, 64),
            (64, 32, 37),
            (24, 129, 50),
            (72, 40, 40),
            (16, 20, 64),
            (7, 64, 64),
        ];
        for &(m, k, n) in &shapes {
            for (a_t, b_t, acc) in [
                (false, true, false),
                (false, true, true),
                (false, false, true),
                (true, false, false),
            ] {
                let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                let d0: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
                // Stored so that the logical operands are (m, k) and (k, n) either way.
                let av = if a_t {
                    View::new(&a, k, m).t()
                } else {
                    View::new(&a, m, k)
                };
                let bv = if b_t {
                    View::new(&b, n, k).t()
                } else {
                    View::new(&b, k, n)
                };
                let mut dst = if acc { d0.clone() } else { vec![f32::NAN; m * n] };
                matmul(&mut dst, av, bv, acc);
                for i in 0..m {
                    for j in 0..n {
                        let (mut want, mut mag) = (if acc { d0[i * n + j] as f64 } else { 0.0 }, 0.0f64);
                        for l in 0..k {
                            let p = av.data[i * av.rs + l * av.cs] as f64 * bv.data[l * bv.rs + j * bv.cs] as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = dst[i * n + j] as f64;
                        let bound = (k + 1) as f64 * f32::EPSILON as f64 * (mag + 1.0);
                        assert!(
                            (got - want).abs() <= bound,
                            "seed {seed}: {m}×{k}·{k}×{n} (a_t {a_t}, b_t {b_t}, acc {acc}) at ({i}, {j}): got {got}, want {want}"
                        );
                    }
                }
            }
        }
    }
}
