//! One composed linear layer (DESIGN §2).
//!
//! Base `W` (d_out × d_in), bias `b`; modules `A_i` (r_i × d_in), `B_i` (d_out × r_i), scale
//! `s_i`; coefficients `C` (S × N), one row per sample σ; token t belongs to sample σ(t).
//!
//! ```text
//! product (the study):  y_t = W x_t + b + Σ_i C[σ,i] s_i B_i A_i x_t
//! factor  (LoraHub):    y_t = W x_t + b + (Σ_i C[σ,i] B_i)(Σ_i C[σ,i] s_i A_i) x_t   (equal ranks)
//! ```
//!
//! The scale of the factor mode sits on the A side, so with equal scales s it is
//! `s·(Σ c_i B_i)(Σ c_i A_i)`, LoraHub's merge.
//!
//! Coefficients come from trainable values `v` through a [`Param`]: raw (`c = v`, LoRA Soups),
//! softmax per row (the study's learned composition, with the true softmax Jacobian), or
//! uniform (`c = 1/N`, nothing trained).
//!
//! Two implementations with one contract:
//! - [`reference`]: plain loops, f64, module by module — the readable specification;
//! - [`fast`]: the fused form, two GEMMs for all N modules (`U = X A_catᵀ`, `Y += Z B_catᵀ`),
//!   multi-threaded, f32.

pub mod fast;
pub mod layer;
pub mod reference;

use crate::{Error, Result};

/// How the modules' factors combine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `Σ c_i s_i B_i A_i`: any ranks.
    Product,
    /// `(Σ c_i B_i)(Σ c_i s_i A_i)`: equal ranks only; has cross terms between modules.
    Factor,
}

/// How trainable values map to coefficients, row by row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Param {
    /// `c = v` (LoRA Soups / CAT): unconstrained.
    Raw,
    /// `c = softmax(v)` per row (the study's learned composition).
    Softmax,
    /// `c = 1/N`; `v` is ignored and receives no gradient.
    Uniform,
}

/// Which gradients a backward pass computes: what trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Train {
    /// `∂X`, needed whenever a layer below trains.
    pub input: bool,
    /// `∂C` (per sample rows).
    pub coeffs: bool,
    /// `∂A_i`, `∂B_i` (LoRA from scratch).
    pub modules: bool,
    /// `∂W`, `∂b` (full fine-tuning).
    pub base: bool,
}

impl Train {
    pub const ALL: Train = Train {
        input: true,
        coeffs: true,
        modules: true,
        base: true,
    };
    pub const COEFFS: Train = Train {
        input: false,
        coeffs: true,
        modules: false,
        base: false,
    };
}

/// N modules for one layer, stacked: `A_cat = [A_1; …; A_N]` (R × d_in) and
/// `B_cat = [B_1 … B_N]` (d_out × R), R = Σ r_i. Row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct ModuleStack<T> {
    pub d_in: usize,
    pub d_out: usize,
    pub ranks: Vec<usize>,
    pub scales: Vec<T>,
    /// (R, d_in)
    pub a_cat: Vec<T>,
    /// (d_out, R)
    pub b_cat: Vec<T>,
}

impl<T: Copy + Default> ModuleStack<T> {
    /// Stacks modules given as `(A_i (r_i × d_in), B_i (d_out × r_i), s_i)`.
    pub fn from_modules(d_in: usize, d_out: usize, modules: &[(&[T], &[T], T)]) -> Result<Self> {
        let mut ranks = Vec::with_capacity(modules.len());
        for (i, (a, b, _)) in modules.iter().enumerate() {
            if d_in == 0 || a.len() % d_in != 0 {
                return Err(Error::Shape(format!(
                    "module {i}: A has {} elements, not a multiple of d_in = {d_in}",
                    a.len()
                )));
            }
            let r = a.len() / d_in;
            if b.len() != d_out * r {
                return Err(Error::Shape(format!(
                    "module {i}: A is {r}×{d_in} so B must be {d_out}×{r} = {} elements, got {}",
                    d_out * r,
                    b.len()
                )));
            }
            ranks.push(r);
        }
        let r_total: usize = ranks.iter().sum();
        let mut a_cat = Vec::with_capacity(r_total * d_in);
        for (a, _, _) in modules {
            a_cat.extend_from_slice(a);
        }
        let mut b_cat = vec![T::default(); d_out * r_total];
        let mut off = 0;
        for ((_, b, _), &r) in modules.iter().zip(&ranks) {
            for o in 0..d_out {
                b_cat[o * r_total + off..o * r_total + off + r].copy_from_slice(&b[o * r..(o + 1) * r]);
            }
            off += r;
        }
        Ok(ModuleStack {
            d_in,
            d_out,
            scales: modules.iter().map(|m| m.2).collect(),
            ranks,
            a_cat,
            b_cat,
        })
    }

    pub fn n(&self) -> usize {
        self.ranks.len()
    }

    /// R = Σ r_i.
    pub fn total_rank(&self) -> usize {
        self.ranks.iter().sum()
    }

    /// Start of each module's block in the stacked rank dimension, plus R at the end.
    pub fn offsets(&self) -> Vec<usize> {
        let mut off = Vec::with_capacity(self.n() + 1);
        let mut acc = 0;
        off.push(0);
        for &r in &self.ranks {
            acc += r;
            off.push(acc);
        }
        off
    }

    /// Module i's A (r_i × d_in) and B (d_out × r_i), unstacked.
    pub fn module(&self, i: usize) -> (Vec<T>, Vec<T>) {
        let off = self.offsets();
        let (lo, hi) = (off[i], off[i + 1]);
        let r_total = self.total_rank();
        let a = self.a_cat[lo * self.d_in..hi * self.d_in].to_vec();
        let mut b = Vec::with_capacity(self.d_out * (hi - lo));
        for o in 0..self.d_out {
            b.extend_from_slice(&self.b_cat[o * r_total + lo..o * r_total + hi]);
        }
        (a, b)
    }

    /// Checks that `mode` can combine these modules: factor mode needs equal ranks.
    pub fn check_mode(&self, mode: Mode) -> Result<()> {
        if mode == Mode::Factor {
            if let Some(&r0) = self.ranks.first() {
                if let Some((i, &r)) = self.ranks.iter().enumerate().find(|(_, &r)| r != r0) {
                    return Err(Error::Mismatch(format!(
                        "factor mode needs equal ranks: module 0 has rank {r0}, module {i} has rank {r}"
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn map<U>(&self, f: impl Fn(T) -> U) -> ModuleStack<U> {
        ModuleStack {
            d_in: self.d_in,
            d_out: self.d_out,
            ranks: self.ranks.clone(),
            scales: self.scales.iter().map(|&x| f(x)).collect(),
            a_cat: self.a_cat.iter().map(|&x| f(x)).collect(),
            b_cat: self.b_cat.iter().map(|&x| f(x)).collect(),
        }
    }
}

/// Which coefficient row each token uses: `sample_of[t] < n_samples`.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    pub sample_of: &'a [usize],
    pub n_samples: usize,
}

impl Rows<'_> {
    pub fn check(&self, t: usize) -> Result<()> {
        if self.sample_of.len() != t {
            return Err(Error::Shape(format!(
                "{} token→sample entries for {t} tokens",
                self.sample_of.len()
            )));
        }
        if let Some((tok, &s)) = self.sample_of.iter().enumerate().find(|(_, &s)| s >= self.n_samples) {
            return Err(Error::Shape(format!(
                "token {tok} maps to sample {s}, but there are {} coefficient rows",
                self.n_samples
            )));
        }
        Ok(())
    }
}

/// Coefficients `c` (S × N) from trainable values `v` (S × N), row by row.
pub fn coefficients(param: Param, v: &[f64], n: usize) -> Vec<f64> {
    assert!(n > 0 && v.len() % n == 0, "values are not S × N");
    match param {
        Param::Raw => v.to_vec(),
        Param::Uniform => vec![1.0 / n as f64; v.len()],
        Param::Softmax => {
            let mut c = v.to_vec();
            for row in c.chunks_mut(n) {
                let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut z = 0.0;
                for x in row.iter_mut() {
                    *x = (*x - m).exp();
                    z += *x;
                }
                for x in row.iter_mut() {
                    *x /= z;
                }
            }
            c
        }
    }
}

/// `∂v` from `∂c`, row by row. Softmax uses the true Jacobian: `∂v = c ∘ (∂c − ⟨∂c, c⟩)`.
pub fn coefficients_backward(param: Param, v: &[f64], dc: &[f64], n: usize) -> Vec<f64> {
    assert_eq!(v.len(), dc.len());
    match param {
        Param::Raw => dc.to_vec(),
        Param::Uniform => vec![0.0; v.len()],
        Param::Softmax => {
            let c = coefficients(Param::Softmax, v, n);
            let mut dv = vec![0.0; v.len()];
            for ((dv, c), dc) in dv.chunks_mut(n).zip(c.chunks(n)).zip(dc.chunks(n)) {
                let dot: f64 = c.iter().zip(dc).map(|(c, d)| c * d).sum();
                for j in 0..n {
                    dv[j] = c[j] * (dc[j] - dot);
                }
            }
            dv
        }
    }
}

/// Sums per-sample rows (S × N) into one row (N): the gradient of one coefficient row shared
/// by every sample.
pub fn reduce_rows<T: Copy + Into<f64>>(rows: &[T], n: usize) -> Vec<f64> {
    let mut out = vec![0.0; n];
    for row in rows.chunks(n) {
        for (o, &x) in out.iter_mut().zip(row) {
            *o += x.into();
        }
    }
    out
}

/// Shape of one composed-layer call, for benchmarks and napkin math.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub t: usize,
    pub d_in: usize,
    pub d_out: usize,
    /// R = Σ r_i
    pub r_total: usize,
}

impl Shape {
    /// FLOPs of the forward: base `2·T·d_in·d_out`, shrink `2·T·d_in·R`, expand `2·T·R·d_out`.
    pub fn forward_flops(&self) -> f64 {
        let (t, di, d_o, r) = (self.t as f64, self.d_in as f64, self.d_out as f64, self.r_total as f64);
        2.0 * t * di * d_o + 2.0 * t * di * r + 2.0 * t * r * d_o
    }

    /// FLOPs of the backward with every gradient: `H`, `∂X` (two GEMMs), `∂A`, `∂B`, `∂W`.
    pub fn backward_flops(&self) -> f64 {
        let (t, di, d_o, r) = (self.t as f64, self.d_in as f64, self.d_out as f64, self.r_total as f64);
        2.0 * t * r * d_o
            + (2.0 * t * d_o * di + 2.0 * t * r * di)
            + 2.0 * r * t * di
            + 2.0 * d_o * t * r
            + 2.0 * d_o * t * di
    }
}

/// One composed layer's frozen parts; `T` is f64 in [`reference`] and f32 in [`fast`].
#[derive(Clone, Copy, Debug)]
pub struct LayerOf<'a, T> {
    /// (d_out, d_in)
    pub w: &'a [T],
    /// (d_out)
    pub bias: Option<&'a [T]>,
    pub modules: &'a ModuleStack<T>,
    pub mode: Mode,
}

impl<T: Copy + Default> LayerOf<'_, T> {
    /// Checks the shapes of one call — `x` (T × d_in), `c` (S × N), token rows, and `G`
    /// (T × d_out) for a backward — and returns T.
    pub(crate) fn check(&self, x_len: usize, c_len: usize, rows: Rows, g_len: Option<usize>) -> Result<usize> {
        let m = self.modules;
        let t = check_call(
            m,
            self.mode,
            self.w.len(),
            self.bias.map(|b| b.len()),
            x_len,
            c_len,
            rows,
        )?;
        if let Some(g_len) = g_len {
            if g_len != t * m.d_out {
                return Err(Error::Shape(format!(
                    "G has {g_len} elements, expected {t}×{}",
                    m.d_out
                )));
            }
        }
        Ok(t)
    }
}

/// Gradients of a scalar loss; a field is empty when [`Train`] did not ask for it.
#[derive(Clone, Debug, Default)]
pub struct GradsOf<T> {
    /// (T, d_in)
    pub dx: Vec<T>,
    /// (S, N): one row per sample, accumulated in f64 over tokens; [`reduce_rows`] sums them.
    pub dc: Vec<f64>,
    /// (R, d_in), stacked like `A_cat`.
    pub da_cat: Vec<T>,
    /// (d_out, R), stacked like `B_cat`.
    pub db_cat: Vec<T>,
    /// (d_out, d_in)
    pub dw: Vec<T>,
    /// (d_out); empty without a bias.
    pub dbias: Vec<T>,
}

fn check_call<T: Copy + Default>(
    modules: &ModuleStack<T>,
    mode: Mode,
    w_len: usize,
    bias_len: Option<usize>,
    x_len: usize,
    c_len: usize,
    rows: Rows,
) -> Result<usize> {
    let (d_in, d_out, n) = (modules.d_in, modules.d_out, modules.n());
    modules.check_mode(mode)?;
    if w_len != d_out * d_in {
        return Err(Error::Shape(format!("W has {w_len} elements, expected {d_out}×{d_in}")));
    }
    if let Some(b) = bias_len {
        if b != d_out {
            return Err(Error::Shape(format!("bias has {b} elements, expected {d_out}")));
        }
    }
    if x_len % d_in != 0 {
        return Err(Error::Shape(format!(
            "X has {x_len} elements, not a multiple of d_in = {d_in}"
        )));
    }
    if c_len != rows.n_samples * n {
        return Err(Error::Shape(format!(
            "C has {c_len} elements, expected {} rows × {n} modules",
            rows.n_samples
        )));
    }
    let t = x_len / d_in;
    rows.check(t)?;
    Ok(t)
}
