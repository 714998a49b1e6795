//! The model resident on a kernel device: every parameter, the optimizer's moments, the
//! activations the backward needs and the gradients live in device buffers across forward,
//! backward and the AdamW step; every op is a kernel of `cuda/` (DESIGN §3–4).
//!
//! Layout. The parameters are one flat f32 buffer `theta` in [`Model::params`] order, with a
//! gradient buffer `grad` of the same layout and, once a step has run, the moments `m`, `v`: the
//! optimizer and the gradient-norm clipping each run as one multi-tensor launch over a table of
//! the trained tensors ([`optim`]). Each layer holds views of its own parameters and gradients.
//! Frozen module libraries have their own buffers. Activations are allocated once per input
//! shape (B, T) and reused by every later batch of that shape.
//!
//! Traffic. A training step uploads the batch (ids, token types and mask, or pixels; the
//! embedding backward's token index; the labels) and downloads three f32: the mean loss, the
//! gradient norm and the clipping scale. [`Backend::traffic`] counts it; `tests/model_device.rs`
//! asserts it.
//!
//! The host copy of the weights in [`Model`] is refreshed from the device by
//! [`Model::sync_host`]; a training step on the device leaves it stale until then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::batch::Batch;
use super::linear::{Adapter, Composition, Linear};
use super::net::{Embeddings, LayerNorm, Model};
use super::{Arch, Kind, Pool, Real, Trainable};
use crate::compose::layer::Device;
use crate::compose::{Mode, Param, Rows, Train};
use crate::gpu::GpuBackend;
use crate::harness::CpuHarness;
use crate::kernels::compose_common::{Shape as CompShape, Tables, TokenRows};
use crate::kernels::loss::{Labels, PoolMode, PoolShape, PoolVariant, XentShape, XentVariant};
use crate::kernels::optim::{AdamParams, TensorSpan, TensorTable};
use crate::kernels::{
    attention, coeffs, compose_bwd, compose_factor, compose_fwd, elementwise, embedding, gemm, layernorm, loss, optim,
    Backend, KernelError,
};
use crate::kernels::{DType, Element, Scalar};
use crate::{Error, Result};
use half::bf16;

/// A buffer of the storage type E (weights, activations, gradients).
type Buf<B, E> = <B as Backend>::Buffer<E>;
/// An f32 buffer (master weights, moments, coefficient rows, statistics, workspaces).
type F32<B> = <B as Backend>::Buffer<f32>;
type KResult<T> = std::result::Result<T, KernelError>;

/// A storage type of the resident model: f32 or bf16. Kernels accumulate in f32 either way; the
/// master weights and the optimizer's moments are f32 whatever E is.
pub(crate) trait Storage: Element {
    /// The f32 master buffer itself as an E buffer, when E is f32 (no working copy, no cast).
    fn share_master<B: Backend>(be: &B, master: &F32<B>) -> Option<Buf<B, Self>>;
    /// An E buffer as an f32 buffer, when E is f32 (coefficient gradients land in `grad`
    /// directly instead of through an f32 buffer and a cast).
    fn as_f32<B: Backend>(be: &B, buf: &Buf<B, Self>) -> Option<F32<B>>;
}

impl Storage for f32 {
    fn share_master<B: Backend>(be: &B, master: &F32<B>) -> Option<F32<B>> {
        Some(alias(be, master))
    }
    fn as_f32<B: Backend>(be: &B, buf: &F32<B>) -> Option<F32<B>> {
        Some(alias(be, buf))
    }
}

impl Storage for bf16 {
    fn share_master<B: Backend>(_: &B, _: &F32<B>) -> Option<Buf<B, bf16>> {
        None
    }
    fn as_f32<B: Backend>(_: &B, _: &Buf<B, bf16>) -> Option<F32<B>> {
        None
    }
}

/// An E-typed gradient view with the f32 buffer the coefficient kernels write it through: the
/// view itself for f32 storage, an own buffer cast into the view after the backward for bf16.
struct F32Grad<B: Backend, E: Storage> {
    grad: Buf<B, E>,
    f32: F32<B>,
    cast: bool,
}

impl<B: Backend, E: Storage> F32Grad<B, E> {
    fn new(be: &B, grad: Buf<B, E>) -> KResult<Self> {
        Ok(match E::as_f32(be, &grad) {
            Some(f32) => F32Grad { grad, f32, cast: false },
            None => {
                let mut f32 = be.alloc::<f32>(be.buffer_len(&grad))?;
                be.zero(&mut f32)?;
                F32Grad { grad, f32, cast: true }
            }
        })
    }

    /// The f32 gradient into the E-typed gradient view (nothing to do for f32 storage).
    fn finish(&self, be: &B) -> KResult<()> {
        if self.cast {
            elementwise::launch_cast::<E, B>(be, &self.f32, &mut alias(be, &self.grad))?;
        }
        Ok(())
    }
}

/// The variants the model runs (each family's fastest correct one on the harness's checks).
/// GEMM: the tensor cores for 16-bit storage ([`gemm::Variant::MmaW64`]: split-K where its
/// 128×128 tiles leave SMs idle), the SIMT tiles for f32. Compositions: per call,
/// [`compose_fwd::choose_variant`] by rows and storage.
fn gemm_variant(dtype: DType) -> gemm::Variant {
    if gemm::Variant::MmaW64.applies(dtype) {
        gemm::Variant::MmaW64
    } else {
        gemm::Variant::Tiled64
    }
}
const LN: layernorm::Variant = layernorm::Variant::Warp;
const BIAS_GRAD: elementwise::Variant = elementwise::Variant::Chunked;
const FACTOR: compose_factor::Variant = compose_factor::Variant::Warp;
const ATTENTION: attention::Variant = attention::Variant::Tiled;
const COEFFS: coeffs::Variant = coeffs::Variant::Warp;

fn device_error(e: KernelError) -> Error {
    Error::Device(e.to_string())
}

/// One parameter of the flat buffers.
#[derive(Clone, Debug)]
struct Slot {
    name: String,
    kind: Kind,
    offset: usize,
    len: usize,
    decay: bool,
}

/// A layer norm's γ, β and their gradients (views).
struct DevLn<B: Backend, E: Storage> {
    gamma: Buf<B, E>,
    beta: Buf<B, E>,
    dgamma: Buf<B, E>,
    dbeta: Buf<B, E>,
}

/// How a composed layer gets its coefficient row (1, N).
enum Coeffs<B: Backend, E: Storage> {
    /// 1/N, constant.
    Uniform { c: F32<B> },
    /// This layer's own values v (a view of the f32 master `theta`): `c = v` (raw) or
    /// `softmax(v)` into `c`; `dc` receives ∂C; ∂v is formed in f32 and lands in `grad`.
    Layer {
        v: F32<B>,
        dv: F32Grad<B, E>,
        c: F32<B>,
        dc: F32<B>,
    },
    /// The model's global row.
    Global,
}

enum DevAdapter<B: Backend, E: Storage> {
    None,
    /// One trainable module, coefficient 1.
    Lora {
        a: Buf<B, E>,
        b: Buf<B, E>,
        da: Buf<B, E>,
        db: Buf<B, E>,
        tables: Tables<B>,
        ranks: Vec<usize>,
        one: F32<B>,
    },
    /// A frozen library (own buffers), mixed by coefficients.
    Compose {
        a_cat: Buf<B, E>,
        b_cat: Buf<B, E>,
        tables: Tables<B>,
        ranks: Vec<usize>,
        mode: Mode,
        coeffs: Coeffs<B, E>,
    },
}

struct DevLinear<B: Backend, E: Storage> {
    d_in: usize,
    d_out: usize,
    w: Buf<B, E>,
    b: Buf<B, E>,
    dw: Buf<B, E>,
    db: Buf<B, E>,
    adapter: DevAdapter<B, E>,
    /// Index of this layer's kept U in the activations (composed and LoRA layers).
    u_slot: Option<usize>,
}

struct DevBlock<B: Backend, E: Storage> {
    /// query, key, value, attn_out, ffn_in, ffn_out
    lin: [DevLinear<B, E>; 6],
    ln1: DevLn<B, E>,
    ln2: DevLn<B, E>,
}

enum DevEmb<B: Backend, E: Storage> {
    Bert {
        word: Buf<B, E>,
        position: Buf<B, E>,
        token_type: Buf<B, E>,
        dword: Buf<B, E>,
        dposition: Buf<B, E>,
        dtoken_type: Buf<B, E>,
        ln: DevLn<B, E>,
    },
    Vit {
        patch: DevLinear<B, E>,
        cls: Buf<B, E>,
        position: Buf<B, E>,
        dcls: Buf<B, E>,
        dposition: Buf<B, E>,
    },
}

/// The global coefficient row of a LoraHub-style composition (f32, like every coefficient row).
struct DevGlobal<B: Backend, E: Storage> {
    v: F32<B>,
    dv: F32Grad<B, E>,
    c: F32<B>,
    dc: F32<B>,
}

/// One block's activations.
struct BlockActs<B: Backend, E: Storage> {
    /// ViT: LN₁(x); BERT: unused (the block input is `h[l]`).
    qkv_in: Buf<B, E>,
    mean1: F32<B>,
    rstd1: F32<B>,
    q: Buf<B, E>,
    k: Buf<B, E>,
    v: Buf<B, E>,
    ctx: Buf<B, E>,
    lse: F32<B>,
    o: Buf<B, E>,
    h1: Buf<B, E>,
    mlp_in: Buf<B, E>,
    mean2: F32<B>,
    rstd2: F32<B>,
    /// (rows, F): ffn_in's output before its bias and GELU
    f1: Buf<B, E>,
    g: Buf<B, E>,
    f2: Buf<B, E>,
    /// BERT: mlp_in + f2, LN₂'s input
    s: Buf<B, E>,
}

/// Every buffer of one input shape.
struct Acts<B: Backend, E: Storage> {
    batch: usize,
    seq: usize,
    mask: B::Buffer<i32>,
    ids: B::Buffer<i32>,
    type_ids: B::Buffer<i32>,
    pixels: B::Buffer<f32>,
    /// ViT: (B·np, p²) and the projected patches (B·np, D)
    patches: Buf<B, E>,
    pe: Buf<B, E>,
    /// BERT: the embedding sum before its layer norm
    emb: Buf<B, E>,
    emb_mean: F32<B>,
    emb_rstd: F32<B>,
    /// L + 1 hidden states (rows, D): the embeddings' output, then each block's
    h: Vec<Buf<B, E>>,
    blocks: Vec<BlockActs<B, E>>,
    /// ViT: the final layer norm's output and statistics
    hf: Buf<B, E>,
    meanf: F32<B>,
    rstdf: F32<B>,
    pooled: Buf<B, E>,
    logits: Buf<B, E>,
    dlogits: Buf<B, E>,
    row_loss: F32<B>,
    /// mean loss, gradient norm, clipping scale
    stats: F32<B>,
    /// kept U per composed layer (rows, R)
    u: Vec<Buf<B, E>>,
    /// all-zero token rows (one coefficient row)
    rows0: TokenRows<B>,
    labels: Option<Labels<B>>,
    /// BERT training: the rows of each token id, for the embedding backward
    token_index: Option<embedding::TokenIndex<B>>,
    vit_mask_ready: bool,
    // Backward scratch.
    d: [Buf<B, E>; 8],
    df: [Buf<B, E>; 2],
    dpooled: Buf<B, E>,
    /// shared scratch of the composition kernels and workspaces, viewed at the exact length a
    /// call needs
    scratch: Scratch<B, E>,
}

/// Scratch buffers of one input shape: E-typed operands of the composition kernels (Z, ∂U, H)
/// and f32 workspaces (split-K partials, layer-norm and bias-gradient partials, attention's
/// workspace, a factor layer's ∂C), each [`DeviceModel::scratch_len`] elements.
struct Scratch<B: Backend, E: Storage> {
    ops: [Buf<B, E>; 2],
    work: [F32<B>; 2],
}

/// The kept U and the composition scratch a linear layer's forward needs.
struct LinForward<'a, B: Backend, E: Storage> {
    u: Option<&'a mut Buf<B, E>>,
    scratch: &'a mut Scratch<B, E>,
    /// Every token on coefficient row 0 (this shape's, uploaded once).
    rows: &'a TokenRows<B>,
    /// A population forward's per-candidate coefficient rows and each token's candidate, used
    /// by composed layers instead of their own row (LoRA layers keep their coefficient 1).
    pop: Option<(&'a F32<B>, &'a TokenRows<B>)>,
    global_c: Option<&'a F32<B>>,
}

/// The model's parameters, gradients and optimizer state on `B`.
pub(crate) struct DeviceModel<B: Backend, E: Storage> {
    arch: Arch,
    pool: Pool,
    eps: f32,
    hidden: usize,
    heads: usize,
    inter: usize,
    labels: usize,
    vocab: usize,
    positions: usize,
    types: usize,
    image: usize,
    patch_size: usize,
    composition: Option<Composition>,
    slots: Vec<Slot>,
    /// The f32 master weights, [`Model::params`] order: what AdamW updates.
    theta: F32<B>,
    /// The weights the kernels read, in the storage type: `theta` itself for f32, else a copy
    /// cast from it after the upload and after every optimizer step.
    weights: Buf<B, E>,
    weights_shared: bool,
    grad: Buf<B, E>,
    moments: Option<(F32<B>, F32<B>, u64)>,
    emb: DevEmb<B, E>,
    blocks: Vec<DevBlock<B, E>>,
    final_ln: Option<DevLn<B, E>>,
    head: DevLinear<B, E>,
    global: Option<DevGlobal<B, E>>,
    /// U buffer widths (R) of the composed layers, by `u_slot`
    u_widths: Vec<usize>,
    acts: Option<Acts<B, E>>,
    tables: HashMap<(bool, bool, bool, bool), TensorTable<B>>,
    generation: u64,
}

impl<B: Backend, E: Storage> DeviceModel<B, E> {
    /// Uploads `model` (its host weights) to `backend`.
    pub(crate) fn new<T: Real>(be: &B, model: &Model<T>) -> Result<Self> {
        Self::build(be, model).map_err(device_error)
    }

    fn build<T: Real>(be: &B, model: &Model<T>) -> KResult<Self> {
        let cfg = &model.config;
        let mut slots = Vec::new();
        let mut flat: Vec<f32> = Vec::new();
        for p in model.params() {
            let decay = p.shape.len() >= 2 && matches!(p.kind, Kind::Base | Kind::Head | Kind::LoraA | Kind::LoraB);
            slots.push(Slot {
                name: p.name.clone(),
                kind: p.kind,
                offset: flat.len(),
                len: p.data.len(),
                decay,
            });
            flat.extend(p.data.iter().map(|&x| Into::<f64>::into(x) as f32));
        }
        let total = flat.len().max(1);
        flat.resize(total, 0.0);
        let theta = be.upload(&flat)?;
        let (weights, weights_shared) = match E::share_master(be, &theta) {
            Some(w) => (w, true),
            None => {
                let mut w = be.alloc::<E>(total)?;
                elementwise::launch_cast::<E, B>(be, &theta, &mut w)?;
                (w, false)
            }
        };
        let mut grad = be.alloc::<E>(total)?;
        be.zero(&mut grad)?;
        let by_name: HashMap<&str, &Slot> = slots.iter().map(|s| (s.name.as_str(), s)).collect();
        let slot = |name: &str| -> (usize, usize) {
            let s = by_name
                .get(name)
                .unwrap_or_else(|| panic!("parameter {name} in the layout"));
            (s.offset, s.len)
        };
        // The kernels' weights, the gradients (both E) and the f32 master values (coefficients).
        let view = |buf: &Buf<B, E>, name: &str| -> Buf<B, E> {
            let (offset, len) = slot(name);
            be.view(buf, offset, len)
        };
        let master = |name: &str| -> F32<B> {
            let (offset, len) = slot(name);
            be.view(&theta, offset, len)
        };
        let ln = |l: &LayerNorm<T>| DevLn {
            gamma: view(&weights, &format!("{}.weight", l.name)),
            beta: view(&weights, &format!("{}.bias", l.name)),
            dgamma: view(&grad, &format!("{}.weight", l.name)),
            dbeta: view(&grad, &format!("{}.bias", l.name)),
        };
        let comp = model.composition;
        let mut u_widths = Vec::new();
        let mut linear = |l: &Linear<T>| -> KResult<DevLinear<B, E>> {
            let name = &l.name;
            let m = &l.modules;
            let f32s = |v: &[T]| -> Vec<f32> { v.iter().map(|&x| Into::<f64>::into(x) as f32).collect() };
            let stored = |v: &[T]| -> Vec<E> { v.iter().map(|&x| E::from_f32(Into::<f64>::into(x) as f32)).collect() };
            let adapter = match &l.adapter {
                Adapter::None => DevAdapter::None,
                Adapter::Lora => DevAdapter::Lora {
                    a: view(&weights, &format!("{name}.lora_A.weight")),
                    b: view(&weights, &format!("{name}.lora_B.weight")),
                    da: view(&grad, &format!("{name}.lora_A.weight")),
                    db: view(&grad, &format!("{name}.lora_B.weight")),
                    tables: Tables::upload(be, &m.ranks, &f32s(&m.scales))?,
                    ranks: m.ranks.clone(),
                    one: be.upload(&[1.0f32])?,
                },
                Adapter::Compose { .. } => {
                    let comp = comp.expect("a composed layer has the model's composition");
                    let n = m.n();
                    let coeffs = if comp.global {
                        Coeffs::Global
                    } else if comp.param == Param::Uniform {
                        Coeffs::Uniform {
                            c: be.upload(&vec![1.0 / n as f32; n])?,
                        }
                    } else {
                        let mut dc = be.alloc::<f32>(n)?;
                        be.zero(&mut dc)?;
                        Coeffs::Layer {
                            v: master(&format!("{name}.compose_logits")),
                            dv: F32Grad::new(be, view(&grad, &format!("{name}.compose_logits")))?,
                            c: be.alloc::<f32>(n)?,
                            dc,
                        }
                    };
                    DevAdapter::Compose {
                        a_cat: be.upload(&stored(&m.a_cat))?,
                        b_cat: be.upload(&stored(&m.b_cat))?,
                        tables: Tables::upload(be, &m.ranks, &f32s(&m.scales))?,
                        ranks: m.ranks.clone(),
                        mode: comp.mode,
                        coeffs,
                    }
                }
            };
            let u_slot = match adapter {
                DevAdapter::None => None,
                _ => {
                    u_widths.push(m.total_rank());
                    Some(u_widths.len() - 1)
                }
            };
            Ok(DevLinear {
                d_in: l.d_in,
                d_out: l.d_out,
                w: view(&weights, &format!("{name}.weight")),
                b: view(&weights, &format!("{name}.bias")),
                dw: view(&grad, &format!("{name}.weight")),
                db: view(&grad, &format!("{name}.bias")),
                adapter,
                u_slot,
            })
        };
        let emb = match &model.embeddings {
            Embeddings::Bert { ln: l, .. } => DevEmb::Bert {
                word: view(&weights, "embeddings.word_embeddings.weight"),
                position: view(&weights, "embeddings.position_embeddings.weight"),
                token_type: view(&weights, "embeddings.token_type_embeddings.weight"),
                dword: view(&grad, "embeddings.word_embeddings.weight"),
                dposition: view(&grad, "embeddings.position_embeddings.weight"),
                dtoken_type: view(&grad, "embeddings.token_type_embeddings.weight"),
                ln: ln(l),
            },
            Embeddings::Vit { patch, .. } => DevEmb::Vit {
                patch: linear(patch)?,
                cls: view(&weights, "embeddings.cls_token"),
                position: view(&weights, "embeddings.position_embeddings"),
                dcls: view(&grad, "embeddings.cls_token"),
                dposition: view(&grad, "embeddings.position_embeddings"),
            },
        };
        let mut blocks = Vec::new();
        for blk in &model.blocks {
            blocks.push(DevBlock {
                lin: [
                    linear(&blk.query)?,
                    linear(&blk.key)?,
                    linear(&blk.value)?,
                    linear(&blk.attn_out)?,
                    linear(&blk.ffn_in)?,
                    linear(&blk.ffn_out)?,
                ],
                ln1: ln(&blk.ln1),
                ln2: ln(&blk.ln2),
            });
        }
        let head = linear(&model.head)?;
        let final_ln = model.final_ln.as_ref().map(ln);
        let global = match comp {
            Some(c) if c.global && !model.global_v.is_empty() => {
                let n = model.global_v.len();
                let (v, dv) = if c.param == Param::Uniform {
                    (be.upload(&vec![0.0f32; n])?, be.alloc::<E>(n)?)
                } else {
                    (
                        master(super::linear::GLOBAL_LOGITS),
                        view(&grad, super::linear::GLOBAL_LOGITS),
                    )
                };
                let dv = F32Grad::new(be, dv)?;
                let c_buf = if c.param == Param::Uniform {
                    be.upload(&vec![1.0 / n as f32; n])?
                } else {
                    be.alloc::<f32>(n)?
                };
                let mut dc = be.alloc::<f32>(n)?;
                be.zero(&mut dc)?;
                Some(DevGlobal { v, dv, c: c_buf, dc })
            }
            _ => None,
        };
        Ok(DeviceModel {
            arch: cfg.arch,
            pool: cfg.pool,
            eps: cfg.layer_norm_eps as f32,
            hidden: cfg.hidden,
            heads: cfg.heads,
            inter: cfg.intermediate,
            labels: cfg.num_labels,
            vocab: cfg.vocab_size,
            positions: cfg.max_positions,
            types: cfg.type_vocab_size,
            image: cfg.image_size,
            patch_size: cfg.patch_size,
            composition: comp,
            slots,
            theta,
            weights,
            weights_shared,
            grad,
            moments: None,
            emb,
            blocks,
            final_ln,
            head,
            global,
            u_widths,
            acts: None,
            tables: HashMap::new(),
            generation: 0,
        })
    }

    /// The flat parameters, downloaded: [`Model::params`] order.
    pub(crate) fn download_params(&self, be: &B) -> Result<Vec<f32>> {
        be.download(&self.theta).map_err(device_error)
    }

    /// Gradients of the tensors `trainable` trains, downloaded, by name (tests and
    /// [`Model::backward`]).
    pub(crate) fn download_grads<T: Real>(
        &self,
        be: &B,
        model: &Model<T>,
        trainable: Trainable,
    ) -> Result<Vec<(String, Vec<f32>)>> {
        let all = be.download(&self.grad).map_err(device_error)?;
        Ok(self
            .slots
            .iter()
            .filter(|s| model.trains_kind(trainable, s.kind))
            .map(|s| {
                let g = all[s.offset..s.offset + s.len].iter().map(|&x| x.to_f32()).collect();
                (s.name.clone(), g)
            })
            .collect())
    }

    fn n_patches(&self) -> usize {
        let side = self.image / self.patch_size.max(1);
        side * side
    }

    /// The activations for (batch, seq), allocated on first use of that shape.
    fn acts_for(&mut self, be: &B, batch: usize, seq: usize) -> KResult<()> {
        if self.acts.as_ref().is_some_and(|a| a.batch == batch && a.seq == seq) {
            return Ok(());
        }
        self.acts = None;
        let (d, f, rows) = (self.hidden, self.inter, batch * seq);
        let alloc = |n: usize| be.alloc::<E>(n.max(1));
        let alloc32 = |n: usize| be.alloc::<f32>(n.max(1));
        let vit = self.arch == Arch::Vit;
        let np = self.n_patches();
        let p2 = self.patch_size * self.patch_size;
        let heads = self.heads;
        let mut blocks = Vec::new();
        for _ in 0..self.blocks.len() {
            blocks.push(BlockActs {
                qkv_in: alloc(if vit { rows * d } else { 1 })?,
                mean1: alloc32(rows)?,
                rstd1: alloc32(rows)?,
                q: alloc(rows * d)?,
                k: alloc(rows * d)?,
                v: alloc(rows * d)?,
                ctx: alloc(rows * d)?,
                lse: alloc32(batch * heads * seq)?,
                o: alloc(rows * d)?,
                h1: alloc(rows * d)?,
                mlp_in: alloc(rows * d)?,
                mean2: alloc32(rows)?,
                rstd2: alloc32(rows)?,
                f1: alloc(rows * f)?,
                g: alloc(rows * f)?,
                f2: alloc(rows * d)?,
                s: alloc(if vit { 1 } else { rows * d })?,
            });
        }
        let r_max = self.u_widths.iter().copied().max().unwrap_or(0);
        let mut u = Vec::new();
        for &r in &self.u_widths {
            u.push(alloc(rows * r)?);
        }
        let scratch_len = self.scratch_len(be, batch, seq, r_max);
        let rows0 = TokenRows::upload(
            be,
            Rows {
                sample_of: &vec![0usize; rows],
                n_samples: 1,
            },
        )?;
        let i32s = |n: usize| be.alloc::<i32>(n.max(1));
        self.acts = Some(Acts {
            batch,
            seq,
            mask: i32s(rows)?,
            ids: i32s(if vit { 1 } else { rows })?,
            type_ids: i32s(if vit { 1 } else { rows })?,
            pixels: alloc32(if vit { batch * self.image * self.image } else { 1 })?,
            patches: alloc(if vit { batch * np * p2 } else { 1 })?,
            pe: alloc(if vit { batch * np * d } else { 1 })?,
            emb: alloc(if vit { 1 } else { rows * d })?,
            emb_mean: alloc32(rows)?,
            emb_rstd: alloc32(rows)?,
            h: (0..=self.blocks.len())
                .map(|_| alloc(rows * d))
                .collect::<KResult<_>>()?,
            blocks,
            hf: alloc(rows * d)?,
            meanf: alloc32(rows)?,
            rstdf: alloc32(rows)?,
            pooled: alloc(batch * d)?,
            logits: alloc(batch * self.labels)?,
            dlogits: alloc(batch * self.labels)?,
            row_loss: alloc32(batch)?,
            stats: alloc32(3)?,
            u,
            rows0,
            labels: None,
            token_index: None,
            vit_mask_ready: false,
            d: [
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
                alloc(rows * d)?,
            ],
            df: [alloc(rows * f)?, alloc(rows * f)?],
            dpooled: alloc(batch * d)?,
            scratch: Scratch {
                ops: [alloc(scratch_len)?, alloc(scratch_len)?],
                work: [alloc32(scratch_len)?, alloc32(scratch_len)?],
            },
        });
        Ok(())
    }

    /// Elements of each scratch buffer: the largest composition operand or workspace, layer-norm
    /// or bias-gradient workspace, or attention workspace any call of this shape needs.
    fn scratch_len(&self, be: &B, batch: usize, seq: usize, r_max: usize) -> usize {
        let rows = batch * seq;
        let (d, f) = (self.hidden, self.inter);
        let mut need = rows * r_max;
        let ln = |rows: usize| layernorm::workspace_len(LN, &layernorm::LnShape { rows, d });
        need = need.max(ln(rows));
        for width in [d, f, self.labels.max(1)] {
            for r in [rows, batch, batch * self.n_patches().max(1)] {
                need = need.max(elementwise::workspace_len(
                    BIAS_GRAD,
                    &elementwise::RowsShape { rows: r, d: width },
                ));
            }
        }
        need = need.max(attention::backward_workspace_len(
            ATTENTION,
            &self.attn_shape(batch, seq),
        ));
        let sm = be.sm_count();
        let all = Train {
            input: true,
            coeffs: true,
            modules: true,
            base: false,
        };
        for lin in self.all_linears() {
            let shape = match &lin.adapter {
                DevAdapter::None => continue,
                DevAdapter::Lora { ranks, .. } | DevAdapter::Compose { ranks, .. } => CompShape {
                    t: rows,
                    d_in: lin.d_in,
                    d_out: lin.d_out,
                    // The population forward's sample count is not known here; workspaces grow
                    // with it only through ∂C, which the population forward never computes.
                    n_samples: 1,
                    ranks: ranks.clone(),
                },
            };
            let variant = compose_fwd::choose_variant(shape.t, E::DTYPE);
            need = need.max(compose_fwd::workspace_len(variant, &shape, sm));
            need = need.max(compose_bwd::workspace_len(variant, &shape, all, sm));
            if matches!(lin.adapter, DevAdapter::Compose { mode: Mode::Factor, .. }) {
                need = need.max(compose_factor::workspace_len(FACTOR, &shape));
            }
        }
        need.max(1)
    }

    fn all_linears(&self) -> impl Iterator<Item = &DevLinear<B, E>> {
        let patch = match &self.emb {
            DevEmb::Vit { patch, .. } => Some(patch),
            DevEmb::Bert { .. } => None,
        };
        patch
            .into_iter()
            .chain(self.blocks.iter().flat_map(|b| b.lin.iter()))
            .chain(std::iter::once(&self.head))
    }

    fn attn_shape(&self, batch: usize, seq: usize) -> attention::AttnShape {
        attention::AttnShape {
            batch,
            seq,
            heads: self.heads,
            head_dim: self.hidden / self.heads,
        }
    }

    /// Uploads the batch's inputs into this shape's buffers; returns T.
    fn upload_batch(&mut self, be: &B, batch: &Batch, seq: usize) -> KResult<()> {
        self.acts_for(be, batch.batch, seq)?;
        let acts = self.acts.as_mut().expect("allocated above");
        match self.arch {
            Arch::Bert => {
                let to_i32 = |v: &[u32]| -> Vec<i32> { v.iter().map(|&x| x as i32).collect() };
                be.upload_into(&mut acts.ids, &to_i32(&batch.ids))?;
                be.upload_into(&mut acts.type_ids, &to_i32(&batch.type_ids))?;
                let mask: Vec<i32> = batch.mask.iter().map(|&m| m as i32).collect();
                be.upload_into(&mut acts.mask, &mask)?;
            }
            Arch::Vit => {
                be.upload_into(&mut acts.pixels, &batch.pixels)?;
                // Every ViT token is real: the mask is uploaded once per shape.
                if !acts.vit_mask_ready {
                    be.upload_into(&mut acts.mask, &vec![1i32; batch.batch * seq])?;
                    acts.vit_mask_ready = true;
                }
            }
        }
        Ok(())
    }
}

/// `dst (m × n) = op(a) op(b) + beta·dst`; nothing for an empty product.
#[allow(clippy::too_many_arguments)]
fn gemm<B: Backend, E: Storage>(
    be: &B,
    (m, n, k): (usize, usize, usize),
    (trans_a, trans_b): (bool, bool),
    beta: f32,
    a: &Buf<B, E>,
    b: &Buf<B, E>,
    dst: &mut Buf<B, E>,
) -> KResult<()> {
    if m == 0 || n == 0 {
        return Ok(());
    }
    let params = gemm::GemmParams {
        shape: gemm::GemmShape {
            m,
            n,
            k,
            trans_a,
            trans_b,
        },
        alpha: 1.0,
        beta,
    };
    gemm::launch::<E, B>(be, gemm_variant(E::DTYPE), &params, a, b, dst)
}

/// A second handle on a parameter's gradient view, to write through: gradients live in `grad`,
/// apart from every buffer a kernel reads them with, which the model's `&self` borrows of its
/// layers cannot express.
fn alias<B: Backend, T: Scalar>(be: &B, buf: &B::Buffer<T>) -> B::Buffer<T> {
    be.view(buf, 0, be.buffer_len(buf))
}

/// The first `len` elements of a scratch buffer, as a buffer of exactly that length.
fn part<B: Backend, T: Scalar>(be: &B, buf: &B::Buffer<T>, len: usize) -> B::Buffer<T> {
    be.view(buf, 0, len)
}

fn comp_shape<B: Backend, E: Storage>(l: &DevLinear<B, E>, t: usize, n_samples: usize, ranks: &[usize]) -> CompShape {
    CompShape {
        t,
        d_in: l.d_in,
        d_out: l.d_out,
        n_samples,
        ranks: ranks.to_vec(),
    }
}

/// The coefficient buffer (S, N) and the sample count a composed layer uses in this forward.
fn coeff_buffer<'a, B: Backend, E: Storage>(
    coeffs: &'a Coeffs<B, E>,
    param: Param,
    global_c: Option<&'a F32<B>>,
) -> &'a F32<B> {
    match coeffs {
        Coeffs::Uniform { c } => c,
        Coeffs::Layer { v, c, .. } => {
            if param == Param::Raw {
                v
            } else {
                c
            }
        }
        Coeffs::Global => global_c.expect("a global composition computes its row first"),
    }
}

/// `Y = X Wᵀ (+ b) + composition(X)` for T rows. The bias is left out when `bias` is false (the
/// caller fuses it, as GELU does).
#[allow(clippy::too_many_arguments)]
fn lin_forward<B: Backend, E: Storage>(
    be: &B,
    l: &DevLinear<B, E>,
    param: Param,
    x: &Buf<B, E>,
    t: usize,
    y: &mut Buf<B, E>,
    bias: bool,
    ctx: LinForward<'_, B, E>,
) -> KResult<()> {
    if l.d_out == 0 {
        return Ok(());
    }
    gemm(be, (t, l.d_out, l.d_in), (false, true), 0.0, x, &l.w, y)?;
    if bias {
        elementwise::launch_bias_add::<E, B>(be, &elementwise::RowsShape { rows: t, d: l.d_out }, &l.b, y)?;
    }
    let LinForward {
        u,
        scratch,
        rows,
        pop,
        global_c,
    } = ctx;
    let (a_cat, b_cat, tables, ranks, c, mode, rows) = match &l.adapter {
        DevAdapter::None => return Ok(()),
        DevAdapter::Lora {
            a,
            b,
            tables,
            ranks,
            one,
            ..
        } => (a, b, tables, ranks, one, Mode::Product, rows),
        DevAdapter::Compose {
            a_cat,
            b_cat,
            tables,
            ranks,
            mode,
            coeffs,
        } => match pop {
            Some((c, pop_rows)) => (a_cat, b_cat, tables, ranks, c, *mode, pop_rows),
            None => (
                a_cat,
                b_cat,
                tables,
                ranks,
                coeff_buffer(coeffs, param, global_c),
                *mode,
                rows,
            ),
        },
    };
    let shape = comp_shape(l, t, rows.n_samples, ranks);
    let r = shape.r_total();
    let u = u.expect("composed layers keep U");
    let mut z = part(be, &scratch.ops[0], t * r);
    match mode {
        Mode::Product => {
            let variant = compose_fwd::choose_variant(shape.t, E::DTYPE);
            let mut work = part(
                be,
                &scratch.work[0],
                compose_fwd::workspace_len(variant, &shape, be.sm_count()).max(1),
            );
            let inputs = compose_fwd::Inputs {
                x,
                a_cat,
                b_cat,
                c,
                rows,
                tables,
            };
            let outputs = compose_fwd::Outputs {
                u: Some(u),
                z: &mut z,
                y,
                work: &mut work,
            };
            compose_fwd::launch(be, variant, &shape, &inputs, outputs)
        }
        Mode::Factor => {
            compose_factor::forward::<E, B>(be, FACTOR, &shape, x, a_cat, b_cat, c, rows, tables, u, &mut z, y)
        }
    }
}

/// What one linear layer's backward computes.
#[derive(Clone, Copy)]
struct LinTrain {
    base: bool,
    modules: bool,
    coeffs: bool,
}

/// Backward of [`lin_forward`] given `G = ∂L/∂Y` (T rows): ∂X into `dx` (overwritten when
/// `beta` is 0, added when 1), ∂W and ∂b into the layer's gradient views when `train.base`,
/// ∂A, ∂B when `train.modules`, and ∂C added onto `dc` when `train.coeffs`.
#[allow(clippy::too_many_arguments)]
fn lin_backward<B: Backend, E: Storage>(
    be: &B,
    l: &DevLinear<B, E>,
    param: Param,
    x: &Buf<B, E>,
    g: &Buf<B, E>,
    t: usize,
    u: Option<&Buf<B, E>>,
    mut dx: Option<(&mut Buf<B, E>, f32)>,
    train: LinTrain,
    dc: Option<&mut F32<B>>,
    global_c: Option<&F32<B>>,
    rows: &TokenRows<B>,
    scratch: &mut Scratch<B, E>,
) -> KResult<()> {
    if l.d_out == 0 {
        return Ok(());
    }
    if let Some((dx, beta)) = dx.as_mut() {
        gemm(be, (t, l.d_in, l.d_out), (false, false), *beta, g, &l.w, dx)?;
    }
    if train.base {
        let (mut dw, mut db) = (alias(be, &l.dw), alias(be, &l.db));
        let (dw, db) = (&mut dw, &mut db);
        gemm(be, (l.d_out, l.d_in, t), (true, false), 0.0, g, x, dw)?;
        let shape = elementwise::RowsShape { rows: t, d: l.d_out };
        let work_len = elementwise::workspace_len(BIAS_GRAD, &shape);
        let mut work = (work_len > 0).then(|| part(be, &scratch.work[1], work_len));
        elementwise::launch_bias_grad::<E, B>(be, BIAS_GRAD, &shape, g, db, work.as_mut())?;
    }
    let want_dx = dx.is_some();
    let Scratch {
        ops: [s0, s1],
        work: [w0, w1],
    } = scratch;
    match &l.adapter {
        DevAdapter::None => Ok(()),
        DevAdapter::Lora {
            a,
            b,
            da,
            db,
            tables,
            ranks,
            one,
        } => {
            if !(want_dx || train.modules) {
                return Ok(());
            }
            let shape = comp_shape(l, t, 1, ranks);
            let tr = Train {
                input: want_dx,
                coeffs: false,
                modules: train.modules,
                base: false,
            };
            let r = shape.r_total();
            let mut du = part(be, s0, t * r);
            let variant = compose_fwd::choose_variant(shape.t, E::DTYPE);
            let mut work = part(
                be,
                w0,
                compose_bwd::workspace_len(variant, &shape, tr, be.sm_count()).max(1),
            );
            let (mut da_v, mut db_v) = (alias(be, da), alias(be, db));
            let inputs = compose_bwd::Inputs {
                g,
                x,
                u: u.expect("LoRA layers keep U"),
                a_cat: a,
                b_cat: b,
                c: one,
                rows,
                tables,
            };
            let outputs = compose_bwd::Outputs {
                dc: None,
                du: Some(&mut du),
                dx: dx.map(|(d, _)| d),
                da_cat: train.modules.then_some(&mut da_v),
                db_cat: train.modules.then_some(&mut db_v),
                work: &mut work,
            };
            compose_bwd::launch(be, variant, &shape, tr, &inputs, outputs)
        }
        DevAdapter::Compose {
            a_cat,
            b_cat,
            tables,
            ranks,
            mode,
            coeffs,
        } => {
            if !(want_dx || train.coeffs) {
                return Ok(());
            }
            let shape = comp_shape(l, t, 1, ranks);
            let c = coeff_buffer(coeffs, param, global_c);
            let u = u.expect("composed layers keep U");
            let r = shape.r_total();
            match mode {
                Mode::Product => {
                    let tr = Train {
                        input: want_dx,
                        coeffs: train.coeffs,
                        modules: false,
                        base: false,
                    };
                    let mut du = part(be, s0, t * r);
                    let variant = compose_fwd::choose_variant(shape.t, E::DTYPE);
                    let mut work = part(
                        be,
                        w0,
                        compose_bwd::workspace_len(variant, &shape, tr, be.sm_count()).max(1),
                    );
                    let inputs = compose_bwd::Inputs {
                        g,
                        x,
                        u,
                        a_cat,
                        b_cat,
                        c,
                        rows,
                        tables,
                    };
                    let outputs = compose_bwd::Outputs {
                        dc: if train.coeffs { dc } else { None },
                        du: want_dx.then_some(&mut du),
                        dx: dx.map(|(d, _)| d),
                        da_cat: None,
                        db_cat: None,
                        work: &mut work,
                    };
                    compose_bwd::launch(be, variant, &shape, tr, &inputs, outputs)
                }
                Mode::Factor => {
                    let mut h = part(be, s0, t * r);
                    let mut du = part(be, s1, t * r);
                    let mut work = part(be, w0, compose_factor::workspace_len(FACTOR, &shape).max(1));
                    // The factor kernels overwrite ∂C; the model accumulates it (a global row
                    // sums every layer's), so it goes through scratch and is added on.
                    let mut dc_layer = part(be, w1, shape.n());
                    let dc = if train.coeffs { dc } else { None };
                    compose_factor::backward::<E, B>(
                        be,
                        FACTOR,
                        &shape,
                        g,
                        x,
                        u,
                        a_cat,
                        b_cat,
                        c,
                        rows,
                        tables,
                        dx.map(|(d, _)| d),
                        dc.is_some().then_some(&mut dc_layer),
                        &mut h,
                        &mut du,
                        &mut work,
                    )?;
                    match dc {
                        Some(dc) => elementwise::launch_add_acc::<f32, B>(be, &dc_layer, dc),
                        None => Ok(()),
                    }
                }
            }
        }
    }
}

/// A population forward's per-candidate coefficient rows (P, N) and each token's candidate.
pub(crate) struct Population<'a> {
    pub coeffs: &'a [f32],
    pub token_candidate: &'a [usize],
    pub candidates: usize,
}

/// Which layers the backward reaches and what trains (computed by the model from `Trainable`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    pub trainable: Trainable,
    /// The lowest block the backward enters; `None` when only the head trains.
    pub lowest: Option<usize>,
}

#[allow(clippy::too_many_arguments)]
fn lf<B: Backend, E: Storage>(
    be: &B,
    l: &DevLinear<B, E>,
    param: Param,
    x: &Buf<B, E>,
    t: usize,
    y: &mut Buf<B, E>,
    bias: bool,
    u: &mut [Buf<B, E>],
    scratch: &mut Scratch<B, E>,
    rows: &TokenRows<B>,
    pop: Option<(&F32<B>, &TokenRows<B>)>,
    global_c: Option<&F32<B>>,
) -> KResult<()> {
    let ctx = LinForward {
        u: l.u_slot.map(|i| &mut u[i]),
        scratch,
        rows,
        pop,
        global_c,
    };
    lin_forward(be, l, param, x, t, y, bias, ctx)
}

#[allow(clippy::too_many_arguments)]
fn ln_forward<B: Backend, E: Storage>(
    be: &B,
    ln: &DevLn<B, E>,
    eps: f32,
    rows: usize,
    d: usize,
    x: &Buf<B, E>,
    y: &mut Buf<B, E>,
    mean: &mut F32<B>,
    rstd: &mut F32<B>,
) -> KResult<()> {
    let shape = layernorm::LnShape { rows, d };
    layernorm::launch_forward::<E, B>(be, LN, &shape, eps, x, &ln.gamma, &ln.beta, y, mean, rstd)
}

#[allow(clippy::too_many_arguments)]
fn ln_backward<B: Backend, E: Storage>(
    be: &B,
    ln: &DevLn<B, E>,
    rows: usize,
    d: usize,
    dy: &Buf<B, E>,
    x: &Buf<B, E>,
    mean: &F32<B>,
    rstd: &F32<B>,
    dx: &mut Buf<B, E>,
    work: &F32<B>,
) -> KResult<()> {
    let shape = layernorm::LnShape { rows, d };
    let work_len = layernorm::workspace_len(LN, &shape);
    let mut work = (work_len > 0).then(|| part(be, work, work_len));
    let (mut dgamma, mut dbeta) = (alias(be, &ln.dgamma), alias(be, &ln.dbeta));
    layernorm::launch_backward::<E, B>(
        be,
        LN,
        &shape,
        dy,
        x,
        &ln.gamma,
        mean,
        rstd,
        dx,
        &mut dgamma,
        &mut dbeta,
        work.as_mut(),
    )
}

impl<B: Backend, E: Storage> DeviceModel<B, E> {
    fn param(&self) -> Param {
        self.composition.map_or(Param::Raw, |c| c.param)
    }

    /// Coefficient rows of this forward: `softmax(v)` where the parametrisation asks for it.
    fn coeffs_forward(&mut self, be: &B) -> KResult<()> {
        if self.param() != Param::Softmax {
            return Ok(());
        }
        let softmax = |v: &F32<B>, c: &mut F32<B>| {
            let n = be.buffer_len(v);
            coeffs::softmax(be, COEFFS, &coeffs::Shape { rows: 1, n }, v, c)
        };
        if let Some(g) = &mut self.global {
            softmax(&g.v, &mut g.c)?;
        }
        for blk in &mut self.blocks {
            for l in &mut blk.lin {
                if let DevAdapter::Compose {
                    coeffs: Coeffs::Layer { v, c, .. },
                    ..
                } = &mut l.adapter
                {
                    softmax(v, c)?;
                }
            }
        }
        Ok(())
    }

    /// Forward of `batch` (uploaded here, T = `seq` tokens): the logits, the pooled output and
    /// what the backward needs stay in the activations.
    pub(crate) fn forward(&mut self, be: &B, batch: &Batch, seq: usize, pop: Option<Population>) -> Result<()> {
        self.forward_k(be, batch, seq, pop).map_err(device_error)
    }

    /// Forwards run so far: a tape names the forward whose activations it is.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    fn forward_k(&mut self, be: &B, batch: &Batch, seq: usize, pop: Option<Population>) -> KResult<()> {
        self.generation += 1;
        self.upload_batch(be, batch, seq)?;
        self.coeffs_forward(be)?;
        let pop = match pop {
            Some(p) => Some((
                be.upload(p.coeffs)?,
                TokenRows::upload(
                    be,
                    Rows {
                        sample_of: p.token_candidate,
                        n_samples: p.candidates,
                    },
                )?,
            )),
            None => None,
        };
        let param = self.param();
        let (d, eps, pre) = (self.hidden, self.eps, self.arch == Arch::Vit);
        let (vocab, positions, types, image, psize, np) = (
            self.vocab,
            self.positions,
            self.types,
            self.image,
            self.patch_size,
            self.n_patches(),
        );
        let attn = self.attn_shape(batch.batch, seq);
        let scale = 1.0 / ((d / self.heads) as f32).sqrt();
        let pool = self.pool;
        let DeviceModel {
            emb,
            blocks,
            final_ln,
            head,
            global,
            acts,
            ..
        } = self;
        let acts = acts.as_mut().expect("allocated by upload_batch");
        let (b, t) = (acts.batch, acts.seq);
        let rows = b * t;
        // A raw global row is its own coefficients.
        let global_c = global.as_ref().map(|g| if param == Param::Raw { &g.v } else { &g.c });
        let pop_ref = pop.as_ref().map(|(c, r)| (c, r));
        match emb {
            DevEmb::Bert {
                word,
                position,
                token_type,
                ln,
                ..
            } => {
                let shape = embedding::BertShape {
                    rows,
                    seq: t,
                    hidden: d,
                    vocab,
                    positions,
                    types,
                };
                embedding::bert_forward::<E, B>(
                    be,
                    &shape,
                    &acts.ids,
                    &acts.type_ids,
                    word,
                    position,
                    token_type,
                    &mut acts.emb,
                )?;
                ln_forward(
                    be,
                    ln,
                    eps,
                    rows,
                    d,
                    &acts.emb,
                    &mut acts.h[0],
                    &mut acts.emb_mean,
                    &mut acts.emb_rstd,
                )?;
            }
            DevEmb::Vit {
                patch, cls, position, ..
            } => {
                let shape = embedding::VitShape {
                    batch: b,
                    side: image,
                    patch: psize,
                    hidden: d,
                };
                embedding::vit_patches::<E, B>(be, &shape, &acts.pixels, &mut acts.patches)?;
                lf(
                    be,
                    patch,
                    param,
                    &acts.patches,
                    b * np,
                    &mut acts.pe,
                    true,
                    &mut acts.u,
                    &mut acts.scratch,
                    &acts.rows0,
                    None,
                    None,
                )?;
                embedding::vit_assemble::<E, B>(be, &shape, &acts.pe, cls, position, &mut acts.h[0])?;
            }
        }
        for (l, blk) in blocks.iter().enumerate() {
            let (lo, hi) = acts.h.split_at_mut(l + 1);
            let (x, out) = (&lo[l], &mut hi[0]);
            let BlockActs {
                qkv_in,
                mean1,
                rstd1,
                q,
                k,
                v,
                ctx,
                lse,
                o,
                h1,
                mlp_in,
                mean2,
                rstd2,
                f1,
                g,
                f2,
                s,
            } = &mut acts.blocks[l];
            let [lq, lk, lv, lo_, l1, l2] = &blk.lin;
            if pre {
                ln_forward(be, &blk.ln1, eps, rows, d, x, qkv_in, mean1, rstd1)?;
            }
            let a_in: &Buf<B, E> = if pre { qkv_in } else { x };
            let (u, sc, r0) = (&mut acts.u, &mut acts.scratch, &acts.rows0);
            lf(be, lq, param, a_in, rows, q, true, u, sc, r0, pop_ref, global_c)?;
            lf(be, lk, param, a_in, rows, k, true, u, sc, r0, pop_ref, global_c)?;
            lf(be, lv, param, a_in, rows, v, true, u, sc, r0, pop_ref, global_c)?;
            attention::forward::<E, B>(be, ATTENTION, &attn, scale, q, k, v, &acts.mask, ctx, lse)?;
            lf(be, lo_, param, ctx, rows, o, true, u, sc, r0, pop_ref, global_c)?;
            elementwise::launch_add::<E, B>(be, x, o, h1)?;
            if pre {
                ln_forward(be, &blk.ln2, eps, rows, d, h1, mlp_in, mean2, rstd2)?;
            } else {
                ln_forward(be, &blk.ln1, eps, rows, d, h1, mlp_in, mean1, rstd1)?;
            }
            lf(be, l1, param, mlp_in, rows, f1, false, u, sc, r0, pop_ref, global_c)?;
            let fshape = elementwise::RowsShape { rows, d: l1.d_out };
            elementwise::launch_gelu_bias_forward::<E, B>(be, &fshape, f1, &l1.b, g)?;
            lf(be, l2, param, g, rows, f2, true, u, sc, r0, pop_ref, global_c)?;
            if pre {
                elementwise::launch_add::<E, B>(be, h1, f2, out)?;
            } else {
                elementwise::launch_add::<E, B>(be, mlp_in, f2, s)?;
                ln_forward(be, &blk.ln2, eps, rows, d, s, out, mean2, rstd2)?;
            }
        }
        let top = blocks.len();
        if let Some(ln) = final_ln {
            ln_forward(
                be,
                ln,
                eps,
                rows,
                d,
                &acts.h[top],
                &mut acts.hf,
                &mut acts.meanf,
                &mut acts.rstdf,
            )?;
        }
        let last = if final_ln.is_some() { &acts.hf } else { &acts.h[top] };
        let pshape = PoolShape {
            batch: b,
            seq: t,
            hidden: d,
            mode: pool_mode(pool),
        };
        loss::pool_forward::<E, B>(be, PoolVariant::Column, &pshape, last, &acts.mask, &mut acts.pooled)?;
        lf(
            be,
            head,
            param,
            &acts.pooled,
            b,
            &mut acts.logits,
            true,
            &mut acts.u,
            &mut acts.scratch,
            &acts.rows0,
            None,
            None,
        )
    }

    /// The logits (B, labels) of the last forward.
    pub(crate) fn download_logits(&self, be: &B) -> Result<Vec<f32>> {
        let acts = self.acts.as_ref().expect("a forward ran");
        let logits = be.download(&acts.logits).map_err(device_error)?;
        Ok(logits.into_iter().map(|x| x.to_f32()).collect())
    }

    /// The pooled encoder output (B, D) of the last forward.
    pub(crate) fn download_pooled(&self, be: &B) -> Result<Vec<f32>> {
        let acts = self.acts.as_ref().expect("a forward ran");
        let pooled = be.download(&acts.pooled).map_err(device_error)?;
        Ok(pooled.into_iter().map(|x| x.to_f32()).collect())
    }

    /// Uploads the token index the BERT embedding backward needs (training only).
    pub(crate) fn prepare_backward(&mut self, be: &B, ids: &[u32], plan: &Plan) -> Result<()> {
        if self.arch == Arch::Bert && plan.trainable.base {
            let index = embedding::TokenIndex::upload(be, ids, self.vocab).map_err(device_error)?;
            self.acts.as_mut().expect("a forward ran").token_index = Some(index);
        }
        Ok(())
    }

    /// Cross-entropy of the last forward's logits against `labels`: ∂logits into the
    /// activations, the mean loss into the stats buffer.
    pub(crate) fn loss(&mut self, be: &B, labels: &[usize]) -> Result<()> {
        let classes = self.labels;
        let acts = self.acts.as_mut().expect("a forward ran");
        let mut run = || -> KResult<()> {
            let lab = Labels::upload(be, labels, classes)?;
            let shape = XentShape {
                batch: acts.batch,
                classes,
            };
            let mut mean = be.view(&acts.stats, 0, 1);
            loss::cross_entropy::<E, B>(
                be,
                XentVariant::Warp,
                &shape,
                &acts.logits,
                &lab,
                &mut acts.dlogits,
                &mut acts.row_loss,
                &mut mean,
            )?;
            acts.labels = Some(lab);
            Ok(())
        };
        run().map_err(device_error)
    }

    /// Sets ∂logits from the host (for [`Model::backward`]).
    pub(crate) fn set_dlogits(&mut self, be: &B, dlogits: &[f32]) -> Result<()> {
        let acts = self.acts.as_mut().expect("a forward ran");
        let stored: Vec<E> = dlogits.iter().map(|&x| E::from_f32(x)).collect();
        be.upload_into(&mut acts.dlogits, &stored).map_err(device_error)
    }

    /// The backward of the last forward from the ∂logits in the activations: the gradient of
    /// every tensor `plan` trains, in `grad`.
    pub(crate) fn backward(&mut self, be: &B, plan: &Plan) -> Result<()> {
        self.backward_k(be, plan).map_err(device_error)
    }

    fn backward_k(&mut self, be: &B, plan: &Plan) -> KResult<()> {
        let param = self.param();
        let tr = plan.trainable;
        let coeffs_train = tr.coeffs && param != Param::Uniform;
        let (d, pre) = (self.hidden, self.arch == Arch::Vit);
        let np = self.n_patches();
        let (vocab, positions, types, image, psize) =
            (self.vocab, self.positions, self.types, self.image, self.patch_size);
        let pool = self.pool;
        let attn_scale = 1.0 / ((d / self.heads) as f32).sqrt();
        let (b, t) = self.acts.as_ref().map(|a| (a.batch, a.seq)).expect("a forward ran");
        let ashape = self.attn_shape(b, t);
        let DeviceModel {
            emb,
            blocks,
            final_ln,
            head,
            global,
            acts,
            ..
        } = self;
        let acts = acts.as_mut().expect("a forward ran");
        let rows = b * t;
        // ∂C targets start at zero (the composition kernels accumulate onto them).
        // A raw row's ∂C is its ∂v (in f32, cast into `grad` at the end).
        let dc_target = |coeffs: &Coeffs<B, E>| -> Option<F32<B>> {
            match coeffs {
                Coeffs::Layer { dv, dc, .. } => Some(alias(be, if param == Param::Raw { &dv.f32 } else { dc })),
                _ => None,
            }
        };
        let mut global_dc = global
            .as_ref()
            .map(|g| alias(be, if param == Param::Raw { &g.dv.f32 } else { &g.dc }));
        if coeffs_train {
            if let Some(g) = &mut global_dc {
                be.zero(g)?;
            }
            for blk in blocks.iter() {
                for l in &blk.lin {
                    if let DevAdapter::Compose { coeffs, .. } = &l.adapter {
                        if let Some(mut dc) = dc_target(coeffs) {
                            be.zero(&mut dc)?;
                        }
                    }
                }
            }
        }
        let global_c = global.as_ref().map(|g| if param == Param::Raw { &g.v } else { &g.c });
        let lin_train = |l: &DevLinear<B, E>, head: bool| LinTrain {
            base: if head { tr.head } else { tr.base },
            modules: matches!(l.adapter, DevAdapter::Lora { .. }) && tr.lora,
            coeffs: matches!(l.adapter, DevAdapter::Compose { .. }) && coeffs_train,
        };
        // Head: ∂pooled and the head's own gradients.
        {
            let Acts {
                pooled,
                dlogits,
                dpooled,
                scratch,
                rows0,
                ..
            } = acts;
            let dx = plan.lowest.map(|_| (dpooled, 0.0f32));
            lin_backward(
                be,
                head,
                param,
                pooled,
                dlogits,
                b,
                None,
                dx,
                lin_train(head, true),
                None,
                None,
                rows0,
                scratch,
            )?;
        }
        let Some(lowest) = plan.lowest else {
            return Ok(());
        };
        let top = blocks.len();
        let pshape = PoolShape {
            batch: b,
            seq: t,
            hidden: d,
            mode: pool_mode(pool),
        };
        loss::pool_backward::<E, B>(
            be,
            PoolVariant::Column,
            &pshape,
            &acts.dpooled,
            &acts.mask,
            &mut acts.d[0],
        )?;
        if let Some(ln) = final_ln {
            let [d0, d1, ..] = &mut acts.d;
            ln_backward(
                be,
                ln,
                rows,
                d,
                d0,
                &acts.h[top],
                &acts.meanf,
                &acts.rstdf,
                d1,
                &acts.scratch.work[1],
            )?;
            std::mem::swap(d0, d1);
        }
        for l in (lowest..top).rev() {
            let need_dx = l > lowest || tr.base;
            let blk = &blocks[l];
            let x_in = &acts.h[l];
            let BlockActs {
                qkv_in,
                mean1,
                rstd1,
                q,
                k,
                v,
                ctx,
                lse,
                h1,
                mlp_in,
                mean2,
                rstd2,
                f1,
                g,
                s,
                ..
            } = &acts.blocks[l];
            let [lq, lk, lv, lo, l1, l2] = &blk.lin;
            let [d0, d1, d2, d3, d4, d5, d6, d7] = &mut acts.d;
            let [df0, df1] = &mut acts.df;
            let sc = &mut acts.scratch;
            let r0 = &acts.rows0;
            let u_of = |l: &DevLinear<B, E>| l.u_slot.map(|i| &acts.u[i]);
            let dc_of = |l: &DevLinear<B, E>| -> Option<F32<B>> {
                match &l.adapter {
                    DevAdapter::Compose {
                        coeffs: Coeffs::Global, ..
                    } => global_dc.as_ref().map(|g| alias(be, g)),
                    DevAdapter::Compose { coeffs, .. } => dc_target(coeffs),
                    _ => None,
                }
            };
            // d0 holds the running ∂ of the residual stream throughout. The MLP branch: post-LN
            // first undoes LN₂ (∂ of mlp_in + f2 into d0).
            if !pre {
                ln_backward(be, &blk.ln2, rows, d, d0, s, mean2, rstd2, d1, &sc.work[1])?;
                std::mem::swap(d0, d1);
            }
            let mut dc = dc_of(l2);
            lin_backward(
                be,
                l2,
                param,
                g,
                d0,
                rows,
                u_of(l2),
                Some((df0, 0.0)),
                lin_train(l2, false),
                dc.as_mut(),
                global_c,
                r0,
                sc,
            )?;
            let fshape = elementwise::RowsShape { rows, d: l1.d_out };
            elementwise::launch_gelu_bias_backward::<E, B>(be, &fshape, df0, f1, &l1.b, df1)?;
            let mut dc = dc_of(l1);
            lin_backward(
                be,
                l1,
                param,
                mlp_in,
                df1,
                rows,
                u_of(l1),
                Some((d2, 0.0)),
                lin_train(l1, false),
                dc.as_mut(),
                global_c,
                r0,
                sc,
            )?;
            // ∂h₁ (the attention residual's sum) into d0.
            if pre {
                ln_backward(be, &blk.ln2, rows, d, d2, h1, mean2, rstd2, d3, &sc.work[1])?;
                elementwise::launch_add_acc::<E, B>(be, d3, d0)?;
            } else {
                elementwise::launch_add_acc::<E, B>(be, d2, d0)?;
                ln_backward(be, &blk.ln1, rows, d, d0, h1, mean1, rstd1, d3, &sc.work[1])?;
                std::mem::swap(d0, d3);
            }
            let mut dc = dc_of(lo);
            lin_backward(
                be,
                lo,
                param,
                ctx,
                d0,
                rows,
                u_of(lo),
                Some((d4, 0.0)),
                lin_train(lo, false),
                dc.as_mut(),
                global_c,
                r0,
                sc,
            )?;
            let work_len = attention::backward_workspace_len(ATTENTION, &ashape);
            let mut work = part(be, &sc.work[1], work_len.max(1));
            attention::backward::<E, B>(
                be, ATTENTION, &ashape, attn_scale, q, k, v, &acts.mask, ctx, lse, d4, d5, d6, d7, &mut work,
            )?;
            let want_qkv = need_dx || (pre && tr.base);
            let a_in: &Buf<B, E> = if pre { qkv_in } else { x_in };
            for (lin, dy, beta) in [(lq, &*d5, 0.0f32), (lk, &*d6, 1.0), (lv, &*d7, 1.0)] {
                let mut dc = dc_of(lin);
                let dx = if want_qkv { Some((&mut *d2, beta)) } else { None };
                lin_backward(
                    be,
                    lin,
                    param,
                    a_in,
                    dy,
                    rows,
                    u_of(lin),
                    dx,
                    lin_train(lin, false),
                    dc.as_mut(),
                    global_c,
                    r0,
                    sc,
                )?;
            }
            if !want_qkv {
                continue;
            }
            // ∂x = ∂h₁ + (pre-LN: LN₁ᵀ of) ∂qkv_in.
            if pre {
                ln_backward(be, &blk.ln1, rows, d, d2, x_in, mean1, rstd1, d1, &sc.work[1])?;
                if need_dx {
                    elementwise::launch_add_acc::<E, B>(be, d1, d0)?;
                }
            } else {
                elementwise::launch_add_acc::<E, B>(be, d2, d0)?;
            }
        }
        if tr.base {
            match emb {
                DevEmb::Bert {
                    ln,
                    dword,
                    dposition,
                    dtoken_type,
                    ..
                } => {
                    let [d0, d1, ..] = &mut acts.d;
                    ln_backward(
                        be,
                        ln,
                        rows,
                        d,
                        d0,
                        &acts.emb,
                        &acts.emb_mean,
                        &acts.emb_rstd,
                        d1,
                        &acts.scratch.work[1],
                    )?;
                    let shape = embedding::BertShape {
                        rows,
                        seq: t,
                        hidden: d,
                        vocab,
                        positions,
                        types,
                    };
                    let index = acts
                        .token_index
                        .as_ref()
                        .expect("prepare_backward uploaded the token index");
                    let (mut dw, mut dp, mut dt) = (alias(be, dword), alias(be, dposition), alias(be, dtoken_type));
                    embedding::bert_backward::<E, B>(be, &shape, index, &acts.type_ids, d1, &mut dw, &mut dp, &mut dt)?;
                }
                DevEmb::Vit {
                    patch, dcls, dposition, ..
                } => {
                    let shape = embedding::VitShape {
                        batch: b,
                        side: image,
                        patch: psize,
                        hidden: d,
                    };
                    let [d0, d1, ..] = &mut acts.d;
                    let mut dpe = part(be, d1, b * np * d);
                    let (mut dc, mut dp) = (alias(be, dcls), alias(be, dposition));
                    embedding::vit_assemble_backward::<E, B>(be, &shape, d0, &mut dpe, &mut dc, &mut dp)?;
                    lin_backward(
                        be,
                        patch,
                        param,
                        &acts.patches,
                        &dpe,
                        b * np,
                        None,
                        None,
                        lin_train(patch, false),
                        None,
                        None,
                        &acts.rows0,
                        &mut acts.scratch,
                    )?;
                }
            }
        }
        if coeffs_train {
            // ∂v in f32 (softmax: from ∂C; raw: ∂C itself), then into the E-typed `grad`.
            let finish = |c: &F32<B>, dc: &F32<B>, dv: &F32Grad<B, E>| {
                if param == Param::Softmax {
                    let n = be.buffer_len(c);
                    let mut dv32 = alias(be, &dv.f32);
                    coeffs::softmax_backward(be, COEFFS, &coeffs::Shape { rows: 1, n }, c, dc, &mut dv32)?;
                }
                dv.finish(be)
            };
            if let Some(g) = global.as_ref() {
                finish(&g.c, &g.dc, &g.dv)?;
            }
            for blk in blocks.iter() {
                for l in &blk.lin {
                    if let DevAdapter::Compose {
                        coeffs: Coeffs::Layer { c, dc, dv, .. },
                        ..
                    } = &l.adapter
                    {
                        finish(c, dc, dv)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Gradient-norm clipping and one AdamW step of the tensors `trainable` trains, then the
    /// stats (mean loss, gradient norm, clip scale) downloaded in one copy.
    pub(crate) fn step(
        &mut self,
        be: &B,
        spans: Vec<TensorSpan>,
        key: (bool, bool, bool, bool),
        hp: AdamParams,
        clip: Option<f64>,
        optimizer: u64,
    ) -> Result<[f32; 3]> {
        self.step_k(be, spans, key, hp, clip, optimizer).map_err(device_error)
    }

    fn step_k(
        &mut self,
        be: &B,
        spans: Vec<TensorSpan>,
        key: (bool, bool, bool, bool),
        hp: AdamParams,
        clip: Option<f64>,
        optimizer: u64,
    ) -> KResult<[f32; 3]> {
        let total = be.buffer_len(&self.theta);
        let acts = self.acts.as_mut().expect("a forward ran");
        if !spans.is_empty() {
            let table = match self.tables.entry(key) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(TensorTable::upload(be, &spans, total)?),
            };
            let mut partials = be.alloc::<f32>(table.partials_len())?;
            let mut norm_scale = be.view(&acts.stats, 1, 2);
            optim::clip_grad_norm::<E, B>(
                be,
                table,
                &mut self.grad,
                clip.map(|c| c as f32),
                &mut partials,
                &mut norm_scale,
            )?;
            if self.moments.as_ref().is_none_or(|m| m.2 != optimizer) {
                let (mut m, mut v) = (be.alloc::<f32>(total)?, be.alloc::<f32>(total)?);
                be.zero(&mut m)?;
                be.zero(&mut v)?;
                self.moments = Some((m, v, optimizer));
            }
            let (m, v, _) = self.moments.as_mut().expect("allocated above");
            optim::adamw::<E, B>(be, &hp, table, &mut self.theta, &self.grad, m, v)?;
            if !self.weights_shared {
                elementwise::launch_cast::<E, B>(be, &self.theta, &mut self.weights)?;
            }
        } else {
            be.upload_into(&mut be.view(&acts.stats, 1, 2), &[0.0, 1.0])?;
        }
        let stats = be.download(&acts.stats)?;
        Ok([stats[0], stats[1], stats[2]])
    }

    /// The flat-buffer spans of the tensors `trainable` trains (the optimizer's table).
    pub(crate) fn spans<T: Real>(&self, model: &Model<T>, trainable: Trainable) -> Vec<TensorSpan> {
        self.slots
            .iter()
            .filter(|s| model.trains_kind(trainable, s.kind))
            .map(|s| TensorSpan {
                offset: s.offset,
                len: s.len,
                decay: s.decay,
            })
            .collect()
    }
}

fn pool_mode(pool: Pool) -> PoolMode {
    match pool {
        Pool::Cls => PoolMode::Cls,
        Pool::Mean => PoolMode::Mean,
    }
}

/// A model's device state on one of the kernel backends.
pub(crate) enum DeviceState {
    Cuda(Arc<GpuBackend>, DeviceModel<GpuBackend, f32>),
    CudaBf16(Arc<GpuBackend>, DeviceModel<GpuBackend, bf16>),
    Harness(CpuHarness, DeviceModel<CpuHarness, f32>),
    HarnessBf16(CpuHarness, DeviceModel<CpuHarness, bf16>),
}

/// Runs `$body` with `$be` the backend and `$dm` the device model of a [`DeviceState`].
macro_rules! on_device {
    ($state:expr, |$be:ident, $dm:ident| $body:expr) => {
        match $state {
            $crate::model::resident::DeviceState::Cuda(gpu, $dm) => {
                let $be = gpu.as_ref();
                $body
            }
            $crate::model::resident::DeviceState::CudaBf16(gpu, $dm) => {
                let $be = gpu.as_ref();
                $body
            }
            $crate::model::resident::DeviceState::Harness(harness, $dm) => {
                let $be = &*harness;
                $body
            }
            $crate::model::resident::DeviceState::HarnessBf16(harness, $dm) => {
                let $be = &*harness;
                $body
            }
        }
    };
}
pub(crate) use on_device;

/// The parameters' names and lengths: a model whose structure changed after it went to the
/// device no longer matches its device copy.
type Signature = Vec<(String, usize)>;

fn signature<T: Real>(model: &Model<T>) -> Signature {
    model.params().into_iter().map(|p| (p.name, p.data.len())).collect()
}

/// What a [`Model`] holds of its device copy: built on first use (or by `to_device`), dropped
/// when the model's structure changes. Clones of a model start without one and upload their
/// own.
#[derive(Default)]
pub(crate) struct ResidentSlot {
    state: Mutex<Option<(DeviceState, Signature)>>,
    /// A training step on the device changed the weights since the host copy was refreshed.
    pub(crate) host_stale: AtomicBool,
}

impl Clone for ResidentSlot {
    fn clone(&self) -> Self {
        ResidentSlot::default()
    }
}

impl PartialEq for ResidentSlot {
    /// The device copy is a cache of the host weights (see [`Model::sync_host`]).
    fn eq(&self, _: &ResidentSlot) -> bool {
        true
    }
}

impl std::fmt::Debug for ResidentSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.state.lock().map(|s| s.is_some()).unwrap_or(false);
        write!(
            f,
            "ResidentSlot(on device: {held}, host stale: {})",
            self.host_stale.load(Ordering::Relaxed)
        )
    }
}

impl ResidentSlot {
    /// Drops the device copy (the next use uploads the host weights again).
    pub(crate) fn clear(&self) {
        *self.state.lock().expect("device state lock") = None;
        self.host_stale.store(false, Ordering::Relaxed);
    }

    pub(crate) fn is_stale(&self) -> bool {
        self.host_stale.load(Ordering::Relaxed)
    }

    /// Runs `f` on the device copy of `model` (uploading it first when there is none). `None`
    /// when the model runs on the CPU.
    pub(crate) fn with<T: Real, R>(
        &self,
        model: &Model<T>,
        f: impl FnOnce(&mut DeviceState) -> Result<R>,
    ) -> Result<Option<R>> {
        let device = model.device();
        if device.is_cpu() {
            return Ok(None);
        }
        let mut guard = self
            .state
            .lock()
            .map_err(|_| Error::Device("device state lock poisoned".into()))?;
        let sig = signature(model);
        if let Some((_, held)) = guard.as_ref() {
            if *held != sig {
                let what = sig
                    .iter()
                    .zip(held)
                    .find(|(a, b)| a != b)
                    .map(|((name, len), (_, was))| format!("`{name}` has {len} elements, {was} on the device"))
                    .unwrap_or_else(|| format!("{} parameters, {} on the device", sig.len(), held.len()));
                return Err(Error::Device(format!(
                    "the model changed since it went to the device ({what}); call Model::sync_device"
                )));
            }
        }
        if guard.is_none() {
            if self.is_stale() {
                return Err(Error::Device(
                    "the host weights are older than the device's; call Model::sync_host first".into(),
                ));
            }
            let state = match (device, model.storage()) {
                (Device::Cuda(gpu), DType::F32) => {
                    DeviceState::Cuda(gpu.clone(), DeviceModel::new(gpu.as_ref(), model)?)
                }
                (Device::Cuda(gpu), DType::BF16) => {
                    DeviceState::CudaBf16(gpu.clone(), DeviceModel::new(gpu.as_ref(), model)?)
                }
                (Device::Harness(h), DType::F32) => DeviceState::Harness(*h, DeviceModel::new(h, model)?),
                (Device::Harness(h), DType::BF16) => DeviceState::HarnessBf16(*h, DeviceModel::new(h, model)?),
                (_, DType::F16) => unreachable!("Model::to_device_storage refuses f16"),
                (Device::Cpu, _) => unreachable!("handled above"),
            };
            *guard = Some((state, sig));
        }
        let (state, _) = guard.as_mut().expect("built above");
        f(state).map(Some)
    }
}
