//! The specification: one composed linear layer in plain loops, f64, module by module.
//!
//! Nothing here is stacked or fused; every sum is written as it appears in DESIGN §2, so a
//! reader can check it against the math line by line. Tests hold the fast path and every
//! kernel to these functions, and these functions to f64 central differences.

// Index loops are the point here: each one is a Σ in DESIGN §2.
#![allow(clippy::needless_range_loop)]

use super::{GradsOf, LayerOf, Mode, ModuleStack, Rows, Train};
use crate::Result;

/// One composed layer's frozen parts (f64).
pub type Layer<'a> = LayerOf<'a, f64>;

/// Gradients (f64).
pub type Grads = GradsOf<f64>;

/// Module i's factors as index functions, with `A_i[j][k]` (r_i × d_in), `B_i[o][j]` (d_out × r_i).
struct Module<'a> {
    m: &'a ModuleStack<f64>,
    off: usize,
    r: usize,
    s: f64,
}

impl Module<'_> {
    fn a(&self, j: usize, k: usize) -> f64 {
        self.m.a_cat[(self.off + j) * self.m.d_in + k]
    }
    fn b(&self, o: usize, j: usize) -> f64 {
        self.m.b_cat[o * self.m.total_rank() + self.off + j]
    }
}

fn modules(m: &ModuleStack<f64>) -> Vec<Module<'_>> {
    let off = m.offsets();
    (0..m.n())
        .map(|i| Module {
            m,
            off: off[i],
            r: m.ranks[i],
            s: m.scales[i],
        })
        .collect()
}

/// `y_t = W x_t + b + ΔW_σ(t) x_t` with ΔW per mode. Returns Y (T, d_out).
/// `c` is (S, N): the coefficients themselves (see [`super::coefficients`]).
pub fn forward(layer: &Layer, x: &[f64], c: &[f64], rows: Rows) -> Result<Vec<f64>> {
    let m = layer.modules;
    let t_len = layer.check(x.len(), c.len(), rows, None)?;
    let (d_in, d_out, n) = (m.d_in, m.d_out, m.n());
    let mods = modules(m);
    let mut y = vec![0.0; t_len * d_out]; // (T, d_out)
    for t in 0..t_len {
        let xt = &x[t * d_in..(t + 1) * d_in];
        let ct = &c[rows.sample_of[t] * n..(rows.sample_of[t] + 1) * n];
        for o in 0..d_out {
            let mut acc = layer.bias.map_or(0.0, |b| b[o]);
            for k in 0..d_in {
                acc += layer.w[o * d_in + k] * xt[k];
            }
            y[t * d_out + o] = acc;
        }
        match layer.mode {
            Mode::Product => {
                for (i, mi) in mods.iter().enumerate() {
                    for j in 0..mi.r {
                        let u: f64 = (0..d_in).map(|k| mi.a(j, k) * xt[k]).sum(); // (A_i x_t)_j
                        for o in 0..d_out {
                            y[t * d_out + o] += ct[i] * mi.s * mi.b(o, j) * u;
                        }
                    }
                }
            }
            Mode::Factor => {
                let r = mods.first().map_or(0, |mi| mi.r);
                for j in 0..r {
                    // v_j = ((Σ_i c_i s_i A_i) x_t)_j
                    let v: f64 = (0..d_in)
                        .map(|k| {
                            mods.iter()
                                .enumerate()
                                .map(|(i, mi)| ct[i] * mi.s * mi.a(j, k))
                                .sum::<f64>()
                                * xt[k]
                        })
                        .sum();
                    for o in 0..d_out {
                        let b_bar: f64 = mods.iter().enumerate().map(|(i, mi)| ct[i] * mi.b(o, j)).sum();
                        y[t * d_out + o] += b_bar * v;
                    }
                }
            }
        }
    }
    Ok(y)
}

/// Gradients of `L = Σ G ∘ Y` (so `G = ∂L/∂Y`, (T, d_out)) with respect to what `train` asks.
pub fn backward(layer: &Layer, x: &[f64], c: &[f64], rows: Rows, g: &[f64], train: Train) -> Result<Grads> {
    let m = layer.modules;
    let t_len = layer.check(x.len(), c.len(), rows, Some(g.len()))?;
    let (d_in, d_out, n, r_total) = (m.d_in, m.d_out, m.n(), m.total_rank());
    let mods = modules(m);
    let mut gr = Grads {
        dx: vec![0.0; t_len * d_in],
        dc: vec![0.0; rows.n_samples * n],
        da_cat: vec![0.0; r_total * d_in],
        db_cat: vec![0.0; d_out * r_total],
        dw: vec![0.0; d_out * d_in],
        dbias: vec![0.0; if layer.bias.is_some() { d_out } else { 0 }],
    };
    for t in 0..t_len {
        let xt = &x[t * d_in..(t + 1) * d_in];
        let gt = &g[t * d_out..(t + 1) * d_out];
        let sigma = rows.sample_of[t];
        let ct = &c[sigma * n..(sigma + 1) * n];
        // Base: ∂x += Wᵀ g, ∂W += g xᵀ, ∂b += g.
        for o in 0..d_out {
            for k in 0..d_in {
                gr.dx[t * d_in + k] += layer.w[o * d_in + k] * gt[o];
                gr.dw[o * d_in + k] += gt[o] * xt[k];
            }
            if layer.bias.is_some() {
                gr.dbias[o] += gt[o];
            }
        }
        match layer.mode {
            Mode::Product => {
                for (i, mi) in mods.iter().enumerate() {
                    for j in 0..mi.r {
                        let u: f64 = (0..d_in).map(|k| mi.a(j, k) * xt[k]).sum(); // (A_i x_t)_j
                        let h: f64 = (0..d_out).map(|o| gt[o] * mi.b(o, j)).sum(); // (B_iᵀ g_t)_j
                        gr.dc[sigma * n + i] += mi.s * h * u;
                        for k in 0..d_in {
                            gr.dx[t * d_in + k] += ct[i] * mi.s * h * mi.a(j, k);
                            gr.da_cat[(mi.off + j) * d_in + k] += ct[i] * mi.s * h * xt[k];
                        }
                        for o in 0..d_out {
                            gr.db_cat[o * r_total + mi.off + j] += gt[o] * ct[i] * mi.s * u;
                        }
                    }
                }
            }
            Mode::Factor => {
                // ΔW_σ = B̄ Ā with B̄ = Σ c_i B_i (d_out × r), Ā = Σ c_i s_i A_i (r × d_in).
                let r = mods.first().map_or(0, |mi| mi.r);
                for j in 0..r {
                    let a_bar = |k: usize| {
                        mods.iter()
                            .enumerate()
                            .map(|(i, mi)| ct[i] * mi.s * mi.a(j, k))
                            .sum::<f64>()
                    };
                    let b_bar = |o: usize| mods.iter().enumerate().map(|(i, mi)| ct[i] * mi.b(o, j)).sum::<f64>();
                    let v: f64 = (0..d_in).map(|k| a_bar(k) * xt[k]).sum(); // (Ā x_t)_j
                    let h: f64 = (0..d_out).map(|o| gt[o] * b_bar(o)).sum(); // (B̄ᵀ g_t)_j
                                                                             // ∂B̄[o][j] = g_o v_j and ∂Ā[j][k] = h_j x_k, pushed to each module's factors.
                    for (i, mi) in mods.iter().enumerate() {
                        let mut dci = 0.0;
                        for o in 0..d_out {
                            dci += gt[o] * v * mi.b(o, j);
                            gr.db_cat[o * r_total + mi.off + j] += ct[i] * gt[o] * v;
                        }
                        for k in 0..d_in {
                            dci += mi.s * h * xt[k] * mi.a(j, k);
                            gr.da_cat[(mi.off + j) * d_in + k] += ct[i] * mi.s * h * xt[k];
                        }
                        gr.dc[sigma * n + i] += dci;
                    }
                    for k in 0..d_in {
                        gr.dx[t * d_in + k] += a_bar(k) * h;
                    }
                }
            }
        }
    }
    if !train.input {
        gr.dx.clear();
    }
    if !train.coeffs {
        gr.dc.clear();
    }
    if !train.modules {
        gr.da_cat.clear();
        gr.db_cat.clear();
    }
    if !train.base {
        gr.dw.clear();
        gr.dbias.clear();
    }
    Ok(gr)
}
