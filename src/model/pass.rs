//! Forward and hand-written backward of the whole network.
//!
//! The forward keeps a [`Tape`] of what each backward step needs; the backward walks it top
//! down and stops below the lowest block that has anything to train.

use std::collections::BTreeMap;

use super::layers::{
    add, attention_backward, attention_forward, gelu_backward, gelu_forward, layernorm_backward, layernorm_forward,
    AttnShape, LnCache,
};
use super::linear::Adapter;
use super::net::{Block, Embeddings, LayerNorm, Model};
use super::resident::{on_device, Plan, Population as DevPopulation};
use super::{Arch, Batch, Linear, Pool, Real, Trainable};
use crate::compose::{Mode, Rows};
use crate::{Error, Result};

/// `x` through bf16 (round to nearest even, as the kernels' stores): the CPU forward's rounding
/// points under [`Model::set_round_activations`].
fn bf16_round<T: Real>(x: T) -> T {
    T::of(half::bf16::from_f64(x.into()).to_f64())
}

/// The gradients as stored in bf16 (under [`Model::set_round_activations`]).
fn round_grads<T: Real>(on: bool, mut grads: Grads<T>) -> Grads<T> {
    for g in grads.map.values_mut() {
        *g = rounded(on, std::mem::take(g));
    }
    grads
}

fn rounded<T: Real>(on: bool, mut v: Vec<T>) -> Vec<T> {
    if on {
        v.iter_mut().for_each(|x| *x = bf16_round(*x));
    }
    v
}

/// A linear layer's output as the bf16 kernels store it (src/model/resident.rs `lin_forward`):
/// `Y = r(X Wᵀ)`, `Y = r(Y + b)` when `bias`, then for a product composition or a LoRA
/// `Z = r(U ∘ D)` with `U = X A_catᵀ` and `D[t, j] = C[σ(t), module_of j] · scale`, and
/// `Y = r(Y + Z B_catᵀ)`; every sum in T. Factor compositions are not modelled.
fn rounded_linear<T: Real>(l: &Linear<T>, mode: Mode, x: &[T], c: &[T], rows: Rows, bias: bool) -> Result<Vec<T>> {
    let (d_in, d_out) = (l.d_in, l.d_out);
    let t_len = x.len() / d_in.max(1);
    let dot = |a: &[T], b: &[T]| a.iter().zip(b).fold(T::zero(), |acc, (&p, &q)| acc + p * q);
    let mut y = vec![T::zero(); t_len * d_out];
    for (t, yr) in y.chunks_mut(d_out).enumerate() {
        let xr = &x[t * d_in..(t + 1) * d_in];
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo = bf16_round(dot(xr, &l.w[o * d_in..(o + 1) * d_in]));
            if bias {
                *yo = bf16_round(*yo + l.b[o]);
            }
        }
    }
    if matches!(l.adapter, Adapter::None) {
        return Ok(y);
    }
    if mode == Mode::Factor {
        return Err(Error::Arg(
            "set_round_activations models product compositions and LoRA, not factor mode".into(),
        ));
    }
    let m = &l.modules;
    let (n, r_total) = (m.n(), m.total_rank());
    let module_of: Vec<usize> = m
        .ranks
        .iter()
        .enumerate()
        .flat_map(|(i, &r)| std::iter::repeat_n(i, r))
        .collect();
    for (t, yr) in y.chunks_mut(d_out).enumerate() {
        let xr = &x[t * d_in..(t + 1) * d_in];
        let ct = &c[rows.sample_of[t] * n..(rows.sample_of[t] + 1) * n];
        // (R): Z of this token
        let z: Vec<T> = (0..r_total)
            .map(|j| {
                let u = dot(xr, &m.a_cat[j * d_in..(j + 1) * d_in]);
                bf16_round(u * (ct[module_of[j]] * m.scales[module_of[j]]))
            })
            .collect();
        for (o, yo) in yr.iter_mut().enumerate() {
            *yo = bf16_round(*yo + dot(&z, &m.b_cat[o * r_total..(o + 1) * r_total]));
        }
    }
    Ok(y)
}

/// Gradients by parameter name (see [`Model::params`]); parameters that did not train are absent.
#[derive(Clone, Debug, Default)]
pub struct Grads<T> {
    pub map: BTreeMap<String, Vec<T>>,
}

impl<T: Real> Grads<T> {
    /// Adds `g` into the gradient of `name` (creating it).
    pub fn add(&mut self, name: &str, g: Vec<T>) {
        match self.map.get_mut(name) {
            Some(acc) => {
                for (a, x) in acc.iter_mut().zip(g) {
                    *a += x;
                }
            }
            None => {
                self.map.insert(name.to_string(), g);
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&[T]> {
        self.map.get(name).map(|v| v.as_slice())
    }

    /// The global L2 norm over every gradient, in f64.
    pub fn norm(&self) -> f64 {
        self.map
            .values()
            .flat_map(|v| v.iter())
            .map(|&x| {
                let x: f64 = x.into();
                x * x
            })
            .sum::<f64>()
            .sqrt()
    }
}

/// A linear layer's forward leftovers: its cache and the coefficients it used.
struct LinTape<T: Real> {
    cache: T::LinCache,
    c: Vec<T>,
}

/// What one block keeps. ViT: `qkv_in = LN₁(x)`, `mlp_in = LN₂(h₁)`. BERT: `qkv_in = x`,
/// `mlp_in = LN₁(x + attn)`.
struct BlockTape<T: Real> {
    qkv_in: Vec<T>,
    ln1: LnCache<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// (B, H, T, T)
    probs: Vec<T>,
    ctx: Vec<T>,
    mlp_in: Vec<T>,
    ln2: LnCache<T>,
    /// (B·T, F) before GELU
    f1: Vec<T>,
    /// (B·T, F) after GELU
    g: Vec<T>,
    /// query, key, value, attn_out, ffn_in, ffn_out
    lin: Vec<LinTape<T>>,
}

/// Everything the backward needs from one forward.
pub struct Tape<T: Real> {
    batch: usize,
    seq: usize,
    mask: Vec<bool>,
    ids: Vec<u32>,
    type_ids: Vec<u32>,
    /// ViT: (B·patches, p²)
    patches: Vec<T>,
    patch: Option<LinTape<T>>,
    emb_ln: Option<LnCache<T>>,
    blocks: Vec<BlockTape<T>>,
    final_ln: Option<LnCache<T>>,
    /// (B, D): the head's input
    pooled: Vec<T>,
    head: Option<LinTape<T>>,
    /// On a kernel device the tape is the device's activations of forward number `generation`.
    on_device: Option<u64>,
    /// The forward started from given hidden states ([`Batch::hidden`]): no embeddings to train.
    from_hidden: bool,
}

impl<T: Real> Tape<T> {
    fn device(batch: &Batch, seq: usize, generation: u64) -> Tape<T> {
        Tape {
            batch: batch.batch,
            seq,
            mask: Vec::new(),
            ids: batch.ids.clone(),
            type_ids: Vec::new(),
            patches: Vec::new(),
            patch: None,
            emb_ln: None,
            blocks: Vec::new(),
            final_ln: None,
            pooled: Vec::new(),
            head: None,
            on_device: Some(generation),
            from_hidden: false,
        }
    }
}

/// What a device forward brings back.
#[derive(Clone, Copy)]
enum Want {
    Logits,
    Pooled,
}

fn to_t<T: Real>(v: Vec<f32>) -> Vec<T> {
    v.into_iter().map(|x| T::of(x as f64)).collect()
}

/// A population forward's coefficient rows (P × N, parametrised) and each image's row.
#[derive(Clone, Copy)]
struct Population<'a, T> {
    coeffs: &'a [T],
    candidate_of: &'a [usize],
    n_candidates: usize,
}

fn add_into<T: Real>(acc: &mut [T], x: &[T]) {
    for (a, &x) in acc.iter_mut().zip(x) {
        *a += x;
    }
}

fn ln_grads<T: Real>(grads: &mut Grads<T>, ln: &LayerNorm<T>, dg: Vec<T>, db: Vec<T>) {
    if !dg.is_empty() {
        grads.add(&format!("{}.weight", ln.name), dg);
        grads.add(&format!("{}.bias", ln.name), db);
    }
}

impl<T: Real> Model<T> {
    /// On a kernel device: the forward of `batch` (with a population's rows when given), and the
    /// logits or the pooled output downloaded, with T and the number of this forward (what a
    /// tape names). `None` on the CPU.
    fn device_forward(
        &self,
        batch: &Batch,
        pop: Option<DevPopulation>,
        want: Want,
    ) -> Result<Option<(Vec<T>, usize, u64)>> {
        if self.device().is_cpu() {
            return Ok(None);
        }
        if !batch.hidden.is_empty() {
            return Err(Error::Arg(
                "a batch of hidden states runs on the CPU only (the kernel device starts from token ids)".into(),
            ));
        }
        let t = batch.check(&self.config)?;
        let (out, generation) = self
            .resident
            .with(self, |st| {
                on_device!(st, |be, dm| {
                    dm.forward(be, batch, t, pop)?;
                    let out = match want {
                        Want::Logits => dm.download_logits(be)?,
                        Want::Pooled => dm.download_pooled(be)?,
                    };
                    Ok((out, dm.generation()))
                })
            })?
            .expect("a kernel device");
        Ok(Some((to_t(out), t, generation)))
    }

    /// Logits (B, num_labels) and the tape for [`Model::backward`].
    pub fn forward(&self, batch: &Batch) -> Result<(Vec<T>, Tape<T>)> {
        if let Some((logits, t, generation)) = self.device_forward(batch, None, Want::Logits)? {
            return Ok((logits, Tape::device(batch, t, generation)));
        }
        let mut tape = self.encode_taped(batch, true, None)?;
        let zeros = vec![0usize; tape.batch];
        let rows = Rows {
            sample_of: &zeros,
            n_samples: 1,
        };
        let (logits, cache) = self.head.forward(None, &tape.pooled, &[], rows)?;
        tape.head = Some(LinTape { cache, c: Vec::new() });
        Ok((self.head_rounded(logits, &tape.pooled, rows)?, tape))
    }

    /// Logits (B, num_labels) without keeping a tape.
    pub fn logits(&self, batch: &Batch) -> Result<Vec<T>> {
        if let Some((logits, ..)) = self.device_forward(batch, None, Want::Logits)? {
            return Ok(logits);
        }
        let pooled = self.encode(batch)?;
        let zeros = vec![0usize; batch.batch];
        let rows = Rows {
            sample_of: &zeros,
            n_samples: 1,
        };
        let logits = self.head.forward(None, &pooled, &[], rows)?.0;
        self.head_rounded(logits, &pooled, rows)
    }

    /// The pooled encoder output (B, D), the head's input, without keeping a tape.
    pub fn encode(&self, batch: &Batch) -> Result<Vec<T>> {
        if let Some((pooled, ..)) = self.device_forward(batch, None, Want::Pooled)? {
            return Ok(pooled);
        }
        Ok(self.encode_taped(batch, false, None)?.pooled)
    }

    /// Logits (B, num_labels) of a whole population of global composition rows in one forward:
    /// image `i` of `batch` runs with the values `values[candidate_of[i]·N..][..N]` (the
    /// counterpart of [`Model::global_v`], before the parametrisation) through per-sample
    /// coefficient rows in every composed layer. Needs a global composition.
    pub fn logits_population(&self, batch: &Batch, values: &[T], candidate_of: &[usize]) -> Result<Vec<T>> {
        let comp = match self.composition {
            Some(c) if c.global => c,
            _ => {
                return Err(Error::Arg(
                    "a population forward needs a global composition (LoraHub-style)".into(),
                ))
            }
        };
        let n = self.global_v.len();
        if n == 0 || values.len() % n != 0 {
            return Err(Error::Shape(format!(
                "population values have {} elements, not a multiple of N = {n}",
                values.len()
            )));
        }
        let p = values.len() / n;
        if candidate_of.len() != batch.batch {
            return Err(Error::Shape(format!(
                "candidate_of has {} entries for a batch of {}",
                candidate_of.len(),
                batch.batch
            )));
        }
        if let Some((i, &c)) = candidate_of.iter().enumerate().find(|(_, &c)| c >= p) {
            return Err(Error::Arg(format!("image {i} names candidate {c} of {p}")));
        }
        let coeffs: Vec<T> = values
            .chunks(n)
            .flat_map(|row| {
                let row: Vec<f64> = row.iter().map(|&x| x.into()).collect();
                crate::compose::coefficients(comp.param, &row, n).into_iter().map(T::of)
            })
            .collect();
        if !self.device().is_cpu() {
            let t = batch.check(&self.config)?;
            let c32: Vec<f32> = coeffs.iter().map(|&x| Into::<f64>::into(x) as f32).collect();
            let token_candidate: Vec<usize> = candidate_of.iter().flat_map(|&c| std::iter::repeat_n(c, t)).collect();
            let pop = DevPopulation {
                coeffs: &c32,
                token_candidate: &token_candidate,
                candidates: p,
            };
            let (logits, ..) = self
                .device_forward(batch, Some(pop), Want::Logits)?
                .expect("a kernel device");
            return Ok(logits);
        }
        let pop = Population {
            coeffs: &coeffs,
            candidate_of,
            n_candidates: p,
        };
        let pooled = self.encode_taped(batch, false, Some(pop))?.pooled;
        let zeros = vec![0usize; batch.batch];
        let rows = Rows {
            sample_of: &zeros,
            n_samples: 1,
        };
        let logits = self.head.forward(None, &pooled, &[], rows)?.0;
        self.head_rounded(logits, &pooled, rows)
    }

    /// The head's logits as the bf16 kernels store them, under [`Model::set_round_activations`].
    fn head_rounded(&self, logits: Vec<T>, pooled: &[T], rows: Rows) -> Result<Vec<T>> {
        if !self.round_activations {
            return Ok(logits);
        }
        let c = self.head.coefficients(self.composition, &self.global_v);
        rounded_linear(&self.head, Mode::Product, pooled, &c, rows, true)
    }

    /// The hidden states (B·T, D) entering block `upto` (the output of the embeddings and of
    /// blocks `0..upto`; all blocks and the final norm when `upto` is the block count), for
    /// [`Batch::hidden`] of a model cut with [`Model::top`]. CPU only.
    pub fn hidden_states(&self, batch: &Batch, upto: usize) -> Result<Vec<T>> {
        if !self.device().is_cpu() {
            return Err(Error::Arg("hidden states are computed on the CPU only".into()));
        }
        if upto > self.blocks.len() {
            return Err(Error::Arg(format!(
                "block {upto} is past the model's {} blocks",
                self.blocks.len()
            )));
        }
        Ok(self.run_blocks(batch, false, None, upto)?.1)
    }

    fn encode_taped(&self, batch: &Batch, keep: bool, pop: Option<Population<'_, T>>) -> Result<Tape<T>> {
        let (mut tape, h) = self.run_blocks(batch, keep, pop, self.blocks.len())?;
        let (b, t, d, cfg) = (tape.batch, tape.seq, self.config.hidden, &self.config);
        let round = self.round_activations;
        let mut pooled = vec![T::zero(); b * d];
        for (img, out) in pooled.chunks_mut(d).enumerate() {
            match cfg.pool {
                Pool::Cls => out.copy_from_slice(&h[img * t * d..img * t * d + d]),
                Pool::Mean => {
                    let m = &tape.mask[img * t..(img + 1) * t];
                    let n = m.iter().filter(|&&x| x).count();
                    for (tok, _) in m.iter().enumerate().filter(|(_, &x)| x) {
                        add_into(out, &h[(img * t + tok) * d..(img * t + tok + 1) * d]);
                    }
                    let inv = T::one() / T::of(n as f64);
                    out.iter_mut().for_each(|x| *x *= inv);
                }
            }
        }
        tape.pooled = rounded(round, pooled);
        Ok(tape)
    }

    /// The forward up to block `upto`: the tape and the hidden states (B·T, D) there.
    fn run_blocks(
        &self,
        batch: &Batch,
        keep: bool,
        pop: Option<Population<'_, T>>,
        upto: usize,
    ) -> Result<(Tape<T>, Vec<T>)> {
        let t = batch.check(&self.config)?;
        let (b, d, cfg) = (batch.batch, self.config.hidden, &self.config);
        let comp = self.composition;
        let round = self.round_activations;
        let mode = comp.map_or(Mode::Product, |c| c.mode);
        let mask = match cfg.arch {
            Arch::Bert => batch.mask.clone(),
            Arch::Vit => vec![true; b * t],
        };
        let zeros = vec![0usize; b * t];
        let rows = |n: usize| Rows {
            sample_of: &zeros[..n],
            n_samples: 1,
        };
        let mut tape = Tape {
            batch: b,
            seq: t,
            mask,
            ids: batch.ids.clone(),
            type_ids: batch.type_ids.clone(),
            patches: Vec::new(),
            patch: None,
            emb_ln: None,
            blocks: Vec::new(),
            final_ln: None,
            pooled: Vec::new(),
            head: None,
            on_device: None,
            from_hidden: !batch.hidden.is_empty(),
        };
        // (B·T, D)
        let mut h = vec![T::zero(); b * t * d];
        match &self.embeddings {
            // Hidden states given (checked to be B·T·D): the blocks start from them.
            Embeddings::Bert { .. } if tape.from_hidden => {
                h = rounded(round, to_t(batch.hidden.clone()));
            }
            Embeddings::Bert {
                word,
                position,
                token_type,
                ln,
            } => {
                for (r, row) in h.chunks_mut(d).enumerate() {
                    let (id, tt, pos) = (batch.ids[r] as usize, batch.type_ids[r] as usize, r % t);
                    let (we, pe, te) = (
                        &word[id * d..][..d],
                        &position[pos * d..][..d],
                        &token_type[tt * d..][..d],
                    );
                    for j in 0..d {
                        row[j] = we[j] + pe[j] + te[j];
                    }
                }
                let h_in = rounded(round, h);
                let (y, cache) = layernorm_forward(&h_in, &ln.gamma, &ln.beta, cfg.layer_norm_eps);
                h = rounded(round, y);
                tape.emb_ln = Some(cache);
            }
            Embeddings::Vit { patch, cls, position } => {
                let (p, side, np) = (cfg.patch_size, cfg.image_size, cfg.n_patches());
                let grid = side / p;
                // (B·patches, p²): patch (gy, gx) row-major, pixels row-major inside it.
                let mut patches = vec![T::zero(); b * np * p * p];
                for (pi, out) in patches.chunks_mut(p * p).enumerate() {
                    let (img, k) = (pi / np, pi % np);
                    let (gy, gx) = (k / grid, k % grid);
                    for y in 0..p {
                        for x in 0..p {
                            out[y * p + x] =
                                T::of(batch.pixels[img * side * side + (gy * p + y) * side + gx * p + x] as f64);
                        }
                    }
                }
                let patches = rounded(round, patches);
                let (pe, cache) = patch.forward(None, &patches, &[], rows(b * np))?;
                let pe = if round {
                    rounded_linear(patch, Mode::Product, &patches, &[], rows(b * np), true)?
                } else {
                    pe
                };
                for img in 0..b {
                    for tok in 0..t {
                        let row = &mut h[(img * t + tok) * d..(img * t + tok + 1) * d];
                        let src = if tok == 0 {
                            &cls[..]
                        } else {
                            &pe[(img * np + tok - 1) * d..][..d]
                        };
                        for j in 0..d {
                            row[j] = src[j] + position[tok * d + j];
                        }
                    }
                }
                h = rounded(round, h);
                if keep {
                    tape.patches = patches;
                    tape.patch = Some(LinTape { cache, c: Vec::new() });
                }
            }
        }
        let shape = AttnShape {
            batch: b,
            seq: t,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        };
        let pre = cfg.arch == Arch::Vit;
        // Per-token candidate rows for a population forward (global composition only).
        let pop_rows: Vec<usize> = match &pop {
            Some(p) => p.candidate_of.iter().flat_map(|&c| std::iter::repeat_n(c, t)).collect(),
            None => Vec::new(),
        };
        // A linear layer's output, its tape, and (rounding) its output before the bias.
        let lin_bias = |l: &Linear<T>, x: &[T], bias: bool| -> Result<(Vec<T>, LinTape<T>)> {
            if let (Some(p), Adapter::Compose { .. }) = (&pop, &l.adapter) {
                let rows = Rows {
                    sample_of: &pop_rows,
                    n_samples: p.n_candidates,
                };
                let (y, cache) = l.forward(comp, x, p.coeffs, rows)?;
                let y = if round {
                    rounded_linear(l, mode, x, p.coeffs, rows, bias)?
                } else {
                    y
                };
                return Ok((y, LinTape { cache, c: Vec::new() }));
            }
            let c = l.coefficients(comp, &self.global_v);
            let (y, cache) = l.forward(comp, x, &c, rows(b * t))?;
            let y = if round {
                rounded_linear(l, mode, x, &c, rows(b * t), bias)?
            } else {
                y
            };
            Ok((y, LinTape { cache, c }))
        };
        let lin = |l: &Linear<T>, x: &[T]| lin_bias(l, x, true);
        for blk in &self.blocks[..upto] {
            let x = h;
            let (qkv_in, ln1) = if pre {
                let (y, c1) = layernorm_forward(&x, &blk.ln1.gamma, &blk.ln1.beta, cfg.layer_norm_eps);
                (rounded(round, y), c1)
            } else {
                (Vec::new(), LnCache::default())
            };
            let a_in = if pre { &qkv_in } else { &x };
            let (q, tq) = lin(&blk.query, a_in)?;
            let (k, tk) = lin(&blk.key, a_in)?;
            let (v, tv) = lin(&blk.value, a_in)?;
            let (ctx, probs) = attention_forward(&q, &k, &v, &tape.mask, shape);
            let ctx = rounded(round, ctx);
            let (o, to) = lin(&blk.attn_out, &ctx)?;
            let h1 = rounded(round, add(&x, &o));
            let (mlp_in, ln1, ln2_pre) = if pre {
                let (y, c2) = layernorm_forward(&h1, &blk.ln2.gamma, &blk.ln2.beta, cfg.layer_norm_eps);
                (rounded(round, y), ln1, Some(c2))
            } else {
                let (y, c1) = layernorm_forward(&h1, &blk.ln1.gamma, &blk.ln1.beta, cfg.layer_norm_eps);
                (rounded(round, y), c1, None)
            };
            // Rounding: the kernels store f1 without its bias, which GELU adds in f32.
            let (f1, t1) = lin_bias(&blk.ffn_in, &mlp_in, !round)?;
            let f1 = if round {
                add(&f1, &blk.ffn_in.b.repeat(b * t))
            } else {
                f1
            };
            let g = rounded(round, gelu_forward(&f1));
            let (f2, t2) = lin(&blk.ffn_out, &g)?;
            let (out, ln2) = if pre {
                (rounded(round, add(&h1, &f2)), ln2_pre.expect("pre-LN keeps LN₂"))
            } else {
                let s = rounded(round, add(&mlp_in, &f2));
                let (y, c2) = layernorm_forward(&s, &blk.ln2.gamma, &blk.ln2.beta, cfg.layer_norm_eps);
                (rounded(round, y), c2)
            };
            if keep {
                tape.blocks.push(BlockTape {
                    qkv_in: if pre { qkv_in } else { x },
                    ln1,
                    q,
                    k,
                    v,
                    probs,
                    ctx,
                    mlp_in,
                    ln2,
                    f1,
                    g,
                    lin: vec![tq, tk, tv, to, t1, t2],
                });
            }
            h = out;
        }
        if let Some(ln) = self.final_ln.as_ref().filter(|_| upto == self.blocks.len()) {
            let (y, cache) = layernorm_forward(&h, &ln.gamma, &ln.beta, cfg.layer_norm_eps);
            h = rounded(round, y);
            tape.final_ln = Some(cache);
        }
        Ok((tape, h))
    }

    /// Gradients of a loss whose gradient with respect to the logits is `dlogits` (B, labels),
    /// for the parameters `trainable` selects.
    pub fn backward(&self, tape: &Tape<T>, dlogits: &[T], trainable: Trainable) -> Result<Grads<T>> {
        if let Some(generation) = tape.on_device {
            return self.device_backward(tape, generation, dlogits, trainable);
        }
        let (b, t, d, cfg) = (tape.batch, tape.seq, self.config.hidden, &self.config);
        let head_tape = tape
            .head
            .as_ref()
            .ok_or_else(|| Error::Arg("backward needs the tape of Model::forward".into()))?;
        if dlogits.len() != b * cfg.num_labels {
            return Err(Error::Shape(format!(
                "∂logits has {} elements, expected {b}×{}",
                dlogits.len(),
                cfg.num_labels
            )));
        }
        let comp = self.composition;
        let r = self.round_activations;
        let dlogits = &rounded(r, dlogits.to_vec())[..];
        let mut grads = Grads::default();
        let emb_trains = trainable.base && !tape.from_hidden;
        let lowest = if emb_trains {
            Some(0)
        } else {
            self.blocks
                .iter()
                .position(|blk| blk.linears().iter().any(|l| l.trains(trainable, comp, false)))
        };
        let zeros = vec![0usize; b * t.max(cfg.n_patches())];
        let rows = |n: usize| Rows {
            sample_of: &zeros[..n],
            n_samples: 1,
        };
        let dpooled = self.head.backward(
            None,
            &[],
            &tape.pooled,
            &head_tape.cache,
            &[],
            rows(b),
            dlogits,
            trainable,
            true,
            lowest.is_some(),
            &mut grads,
        )?;
        let Some(lowest) = lowest else {
            return Ok(round_grads(r, grads));
        };
        let dpooled = rounded(r, dpooled);
        // (B·T, D)
        let mut dh = vec![T::zero(); b * t * d];
        for (img, g) in dpooled.chunks(d).enumerate() {
            match cfg.pool {
                Pool::Cls => dh[img * t * d..img * t * d + d].copy_from_slice(g),
                Pool::Mean => {
                    let m = &tape.mask[img * t..(img + 1) * t];
                    let inv = T::one() / T::of(m.iter().filter(|&&x| x).count() as f64);
                    for (tok, _) in m.iter().enumerate().filter(|(_, &x)| x) {
                        for (o, &x) in dh[(img * t + tok) * d..(img * t + tok + 1) * d].iter_mut().zip(g) {
                            *o = x * inv;
                        }
                    }
                }
            }
        }
        if let (Some(ln), Some(cache)) = (&self.final_ln, &tape.final_ln) {
            let (dx, dg, db) = layernorm_backward(&rounded(r, dh), &ln.gamma, cache, true, trainable.base);
            ln_grads(&mut grads, ln, dg, db);
            dh = rounded(r, dx);
        }
        if tape.blocks.len() != self.blocks.len() {
            return Err(Error::Arg("the tape does not belong to this model".into()));
        }
        let shape = AttnShape {
            batch: b,
            seq: t,
            heads: cfg.heads,
            head_dim: cfg.head_dim(),
        };
        for l in (lowest..self.blocks.len()).rev() {
            let need_dx = l > lowest || emb_trains;
            dh = self.block_backward(
                &self.blocks[l],
                &tape.blocks[l],
                dh,
                tape,
                shape,
                trainable,
                need_dx,
                &mut grads,
            )?;
        }
        if emb_trains {
            self.embeddings_backward(tape, dh, trainable, &mut grads)?;
        }
        Ok(round_grads(r, grads))
    }

    /// What the backward reaches under `trainable`: the lowest block with anything to train
    /// (every block when the base trains, for the embeddings below them).
    pub(crate) fn backward_plan(&self, trainable: Trainable) -> Plan {
        let comp = self.composition;
        let lowest = if trainable.base {
            Some(0)
        } else {
            self.blocks
                .iter()
                .position(|blk| blk.linears().iter().any(|l| l.trains(trainable, comp, false)))
        };
        Plan { trainable, lowest }
    }

    fn device_backward(
        &self,
        tape: &Tape<T>,
        generation: u64,
        dlogits: &[T],
        trainable: Trainable,
    ) -> Result<Grads<T>> {
        let labels = self.config.num_labels;
        if dlogits.len() != tape.batch * labels {
            return Err(Error::Shape(format!(
                "∂logits has {} elements, expected {}×{labels}",
                dlogits.len(),
                tape.batch
            )));
        }
        let plan = self.backward_plan(trainable);
        let d32: Vec<f32> = dlogits.iter().map(|&x| Into::<f64>::into(x) as f32).collect();
        let grads = self
            .resident
            .with(self, |st| {
                on_device!(st, |be, dm| {
                    if dm.generation() != generation {
                        return Err(Error::Arg(
                            "the tape is not the device's latest forward (another forward ran since)".into(),
                        ));
                    }
                    dm.set_dlogits(be, &d32)?;
                    dm.prepare_backward(be, &tape.ids, &plan)?;
                    dm.backward(be, &plan)?;
                    dm.download_grads(be, self, trainable)
                })
            })?
            .expect("a kernel device");
        let mut out = Grads::default();
        for (name, g) in grads {
            out.map.insert(name, to_t(g));
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn block_backward(
        &self,
        blk: &Block<T>,
        bt: &BlockTape<T>,
        dout: Vec<T>,
        tape: &Tape<T>,
        shape: AttnShape,
        trainable: Trainable,
        need_dx: bool,
        grads: &mut Grads<T>,
    ) -> Result<Vec<T>> {
        let comp = self.composition;
        let n = tape.batch * tape.seq;
        let zeros = vec![0usize; n];
        let rows = Rows {
            sample_of: &zeros,
            n_samples: 1,
        };
        let pre = self.config.arch == Arch::Vit;
        let base = trainable.base;
        // Under set_round_activations, every ∂ the bf16 kernels store is rounded here too.
        let r = self.round_activations;
        let lin_bwd = |l: &Linear<T>, x: &[T], lt: &LinTape<T>, g: &[T], want_dx: bool, grads: &mut Grads<T>| {
            l.backward(
                comp,
                &self.global_v,
                x,
                &lt.cache,
                &lt.c,
                rows,
                g,
                trainable,
                false,
                want_dx,
                grads,
            )
            .map(|dx| rounded(r, dx))
        };
        // MLP: ∂(h₁ or a) from the MLP branch and the residual.
        let (dmlp_out, dresid) = if pre {
            (dout.clone(), dout)
        } else {
            let (du, dg, db) = layernorm_backward(&dout, &blk.ln2.gamma, &bt.ln2, true, base);
            ln_grads(grads, &blk.ln2, dg, db);
            let du = rounded(r, du);
            (du.clone(), du)
        };
        let dgelu = lin_bwd(&blk.ffn_out, &bt.g, &bt.lin[5], &dmlp_out, true, grads)?;
        let df1 = rounded(r, gelu_backward(&bt.f1, &dgelu));
        let dmlp_in = lin_bwd(&blk.ffn_in, &bt.mlp_in, &bt.lin[4], &df1, true, grads)?;
        // ∂h₁ = ∂ of the attention residual's sum.
        let dh1 = if pre {
            let (dx, dg, db) = layernorm_backward(&dmlp_in, &blk.ln2.gamma, &bt.ln2, true, base);
            ln_grads(grads, &blk.ln2, dg, db);
            let mut dh1 = dresid;
            add_into(&mut dh1, &rounded(r, dx));
            rounded(r, dh1)
        } else {
            let mut da = dresid;
            add_into(&mut da, &dmlp_in);
            let (dx, dg, db) = layernorm_backward(&rounded(r, da), &blk.ln1.gamma, &bt.ln1, true, base);
            ln_grads(grads, &blk.ln1, dg, db);
            rounded(r, dx)
        };
        let dctx = lin_bwd(&blk.attn_out, &bt.ctx, &bt.lin[3], &dh1, true, grads)?;
        let (dq, dk, dv) = attention_backward(&bt.q, &bt.k, &bt.v, &bt.probs, &tape.mask, &dctx, shape);
        let (dq, dk, dv) = (rounded(r, dq), rounded(r, dk), rounded(r, dv));
        let want_qkv = need_dx || (pre && base);
        let mut dqkv_in = lin_bwd(&blk.query, &bt.qkv_in, &bt.lin[0], &dq, want_qkv, grads)?;
        let dxk = lin_bwd(&blk.key, &bt.qkv_in, &bt.lin[1], &dk, want_qkv, grads)?;
        let dxv = lin_bwd(&blk.value, &bt.qkv_in, &bt.lin[2], &dv, want_qkv, grads)?;
        if !want_qkv {
            return Ok(Vec::new());
        }
        add_into(&mut dqkv_in, &dxk);
        let mut dqkv_in = rounded(r, dqkv_in);
        add_into(&mut dqkv_in, &dxv);
        let dqkv_in = rounded(r, dqkv_in);
        let mut dx = dh1;
        if pre {
            let (dln, dg, db) = layernorm_backward(&dqkv_in, &blk.ln1.gamma, &bt.ln1, need_dx, base);
            ln_grads(grads, &blk.ln1, dg, db);
            if !need_dx {
                return Ok(Vec::new());
            }
            add_into(&mut dx, &rounded(r, dln));
        } else {
            add_into(&mut dx, &dqkv_in);
        }
        Ok(rounded(r, dx))
    }

    fn embeddings_backward(
        &self,
        tape: &Tape<T>,
        dh: Vec<T>,
        trainable: Trainable,
        grads: &mut Grads<T>,
    ) -> Result<()> {
        let (b, t, d, cfg) = (tape.batch, tape.seq, self.config.hidden, &self.config);
        match &self.embeddings {
            Embeddings::Bert { ln, .. } => {
                let cache = tape.emb_ln.as_ref().expect("BERT tapes keep the embedding norm");
                let (de, dg, db) = layernorm_backward(&dh, &ln.gamma, cache, true, true);
                let de = rounded(self.round_activations, de);
                ln_grads(grads, ln, dg, db);
                let mut dword = vec![T::zero(); cfg.vocab_size * d];
                let mut dpos = vec![T::zero(); cfg.max_positions * d];
                let mut dtype = vec![T::zero(); cfg.type_vocab_size * d];
                for (r, g) in de.chunks(d).enumerate() {
                    let (id, tt, pos) = (tape.ids[r] as usize, tape.type_ids[r] as usize, r % t);
                    add_into(&mut dword[id * d..(id + 1) * d], g);
                    add_into(&mut dpos[pos * d..(pos + 1) * d], g);
                    add_into(&mut dtype[tt * d..(tt + 1) * d], g);
                }
                grads.add("embeddings.word_embeddings.weight", dword);
                grads.add("embeddings.position_embeddings.weight", dpos);
                grads.add("embeddings.token_type_embeddings.weight", dtype);
            }
            Embeddings::Vit { patch, .. } => {
                let np = cfg.n_patches();
                let mut dcls = vec![T::zero(); d];
                let mut dpos = vec![T::zero(); t * d];
                // (B·patches, D)
                let mut dpe = vec![T::zero(); b * np * d];
                for img in 0..b {
                    for tok in 0..t {
                        let g = &dh[(img * t + tok) * d..(img * t + tok + 1) * d];
                        add_into(&mut dpos[tok * d..(tok + 1) * d], g);
                        if tok == 0 {
                            add_into(&mut dcls, g);
                        } else {
                            dpe[(img * np + tok - 1) * d..(img * np + tok) * d].copy_from_slice(g);
                        }
                    }
                }
                grads.add("embeddings.cls_token", dcls);
                grads.add("embeddings.position_embeddings", dpos);
                let pt = tape.patch.as_ref().expect("ViT tapes keep the patch layer");
                let zeros = vec![0usize; b * np];
                let rows = Rows {
                    sample_of: &zeros,
                    n_samples: 1,
                };
                patch.backward(
                    None,
                    &[],
                    &tape.patches,
                    &pt.cache,
                    &pt.c,
                    rows,
                    &dpe,
                    trainable,
                    false,
                    false,
                    grads,
                )?;
            }
        }
        Ok(())
    }
}
