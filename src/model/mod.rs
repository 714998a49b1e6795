//! A small encoder transformer whose linear layers carry LoRA compositions (DESIGN §5).
//!
//! Two configurations of one network:
//!
//! ```text
//! ViT  (pre-LN):  h = [cls; patches·Pᵀ] + pos
//!                 h = h + O·attn(LN₁ h);  h = h + W₂ gelu(W₁ LN₂ h)      per block
//!                 logits = head(LN_f h)[pool]
//! BERT (post-LN): h = LN_e(word[id] + pos[t] + type[tt])
//!                 h = LN₁(h + O·attn(h));  h = LN₂(h + W₂ gelu(W₁ h))     per block
//!                 logits = head(pool h)
//! ```
//!
//! `attn` is multi-head softmax attention with a key padding mask; `gelu` is the exact erf form;
//! pooling is the CLS token or the mean over real (unpadded) tokens.
//!
//! Every linear layer of a block is a [`linear::Linear`], named by its PEFT module path
//! (`encoder.layer.0.attention.self.query` for BERT, `encoder.layer.0.attention.attention.query`
//! for the ViT, as in Hugging Face's models), and can carry a composition of frozen modules
//! (the crate's composed layer, [`crate::compose`]) or one trainable LoRA.
//!
//! The network is generic over [`Real`]. On the CPU, `f32` runs every linear layer through the
//! crate's fused composed layer ([`crate::compose::fast`], two GEMMs per layer on the `gemm`
//! crate) and `f64` through its plain reference, so the hand-written backward can be held to
//! f64 central differences. [`Model::to_device`] with a kernel device (`--device cuda`, or the
//! CPU execution harness in tests) moves the whole f32 model there: weights, optimizer state,
//! activations and gradients stay in device buffers and every op is a kernel of `cuda/`
//! ([`resident`]); only the batch goes up and the loss (or the logits, or the pooled output)
//! comes down.

pub mod batch;
pub mod bert;
pub mod checkpoint;
pub mod cli;
pub mod layers;
pub mod linear;
pub mod net;
pub mod pass;
pub(crate) mod resident;
pub mod train;
pub mod vmath;

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use serde::{Deserialize, Serialize};

use crate::compose::{fast, reference, Rows, Train};
use crate::{Error, Result};

pub use batch::Batch;
pub use linear::{Adapter, Composition, Library, Linear, LoraModule};
pub use net::{Embeddings, Model};
pub use pass::{Grads, Tape};

/// The element type of a model: `f32` (fast path) or `f64` (reference path, for gradient checks).
pub trait Real:
    num_traits::Float
    + Default
    + Debug
    + Send
    + Sync
    + 'static
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Into<f64>
{
    /// What one composed linear layer keeps from its forward for its backward.
    type LinCache: Default + Clone + Send + Sync;

    fn of(x: f64) -> Self;
    fn erf(self) -> Self;

    /// Exact GELU element-wise, `y = x Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2`: libm's erf here, the
    /// vectorised one of [`vmath`] for f32.
    fn gelu(x: &[Self], y: &mut [Self]) {
        let (half, s) = (Self::of(0.5), Self::of(std::f64::consts::FRAC_1_SQRT_2));
        for (y, &x) in y.iter_mut().zip(x) {
            *y = half * x * (Self::one() + (x * s).erf());
        }
    }

    /// GELU's backward, `∂x = ∂y · (Φ(x) + x φ(x))`, φ the standard normal density.
    fn gelu_backward(x: &[Self], dy: &[Self], dx: &mut [Self]) {
        let (half, s, c) = (
            Self::of(0.5),
            Self::of(std::f64::consts::FRAC_1_SQRT_2),
            Self::of(0.398_942_280_401_432_7),
        );
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let cdf = half * (Self::one() + (x * s).erf());
            let pdf = c * (-half * x * x).exp();
            *dx = dy * (cdf + x * pdf);
        }
    }

    /// Each row of `p` (rows of width t) becomes the softmax of its entries over the real keys
    /// (`mask[j]`, at least one per row); padded keys get exactly 0. libm's `exp` here, the
    /// vectorised rows of [`vmath`] for f32.
    fn softmax_rows(p: &mut [Self], t: usize, mask: &[bool]) {
        for row in p.chunks_mut(t) {
            let mut mx = Self::neg_infinity();
            for (&x, &m) in row.iter().zip(mask) {
                if m {
                    mx = mx.max(x);
                }
            }
            let mut sum = Self::zero();
            for (x, &m) in row.iter_mut().zip(mask) {
                *x = if m { (*x - mx).exp() } else { Self::zero() };
                sum += *x;
            }
            let inv = Self::one() / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    }

    /// Softmax's backward in place, rows of width t: `∂S = P ∘ (∂P − rowsum(P ∘ ∂P))·scale`,
    /// `ds` holding ∂P on entry.
    fn softmax_backward_rows(ds: &mut [Self], p: &[Self], t: usize, scale: Self) {
        for (ds, p) in ds.chunks_mut(t).zip(p.chunks(t)) {
            let rowsum = p.iter().zip(ds.iter()).fold(Self::zero(), |a, (&p, &g)| a + p * g);
            for (g, &p) in ds.iter_mut().zip(p) {
                *g = p * (*g - rowsum) * scale;
            }
        }
    }

    /// `Y = X Wᵀ + b + mix(X A_catᵀ) B_catᵀ`, (T, d_out), on the CPU: the fused fast path for
    /// f32, the plain reference for f64. (A model on a kernel device runs
    /// [`resident`] instead; this trait is numeric only.)
    fn linear_forward(l: LinArgs<Self>, x: &[Self], c: &[Self], rows: Rows) -> Result<(Vec<Self>, Self::LinCache)>;

    /// Gradients of the composed layer given `G = ∂L/∂Y`; only what `train` asks is filled in.
    fn linear_backward(
        l: LinArgs<Self>,
        x: &[Self],
        cache: &Self::LinCache,
        c: &[Self],
        rows: Rows,
        g: &[Self],
        train: Train,
    ) -> Result<LinGrads<Self>>;
}

/// One composed layer's frozen parts, whatever the element type.
pub type LinArgs<'a, T> = crate::compose::LayerOf<'a, T>;

/// Gradients of one composed layer; a field is empty when not asked for.
pub type LinGrads<T> = crate::compose::GradsOf<T>;

impl Real for f32 {
    type LinCache = fast::Cache;

    fn of(x: f64) -> Self {
        x as f32
    }
    fn erf(self) -> Self {
        libm::erff(self)
    }
    fn gelu(x: &[f32], y: &mut [f32]) {
        vmath::gelu(x, y)
    }
    fn gelu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        vmath::gelu_backward(x, dy, dx)
    }
    fn softmax_rows(p: &mut [f32], t: usize, mask: &[bool]) {
        vmath::softmax_rows(p, t, mask)
    }
    fn softmax_backward_rows(ds: &mut [f32], p: &[f32], t: usize, scale: f32) {
        vmath::softmax_backward_rows(ds, p, t, scale)
    }
    fn linear_forward(l: LinArgs<f32>, x: &[f32], c: &[f32], rows: Rows) -> Result<(Vec<f32>, fast::Cache)> {
        fast::forward(&fast_layer(l), x, c, rows)
    }
    fn linear_backward(
        l: LinArgs<f32>,
        x: &[f32],
        cache: &fast::Cache,
        c: &[f32],
        rows: Rows,
        g: &[f32],
        train: Train,
    ) -> Result<LinGrads<f32>> {
        let gr = fast::backward(&fast_layer(l), x, cache, c, rows, g, train)?;
        Ok(LinGrads {
            dx: gr.dx,
            dc: gr.dc,
            da_cat: gr.da_cat,
            db_cat: gr.db_cat,
            dw: gr.dw,
            dbias: gr.dbias,
        })
    }
}

fn fast_layer(l: LinArgs<'_, f32>) -> fast::Layer<'_> {
    fast::Layer {
        w: l.w,
        bias: l.bias,
        modules: l.modules,
        mode: l.mode,
    }
}

impl Real for f64 {
    type LinCache = ();

    fn of(x: f64) -> Self {
        x
    }
    fn erf(self) -> Self {
        libm::erf(self)
    }
    fn linear_forward(l: LinArgs<f64>, x: &[f64], c: &[f64], rows: Rows) -> Result<(Vec<f64>, ())> {
        Ok((reference::forward(&ref_layer(l), x, c, rows)?, ()))
    }
    fn linear_backward(
        l: LinArgs<f64>,
        x: &[f64],
        _cache: &(),
        c: &[f64],
        rows: Rows,
        g: &[f64],
        train: Train,
    ) -> Result<LinGrads<f64>> {
        // The reference computes every gradient; keep only those asked for so both element
        // types return the same set.
        let gr = reference::backward(&ref_layer(l), x, c, rows, g, train)?;
        let keep = |on: bool, v: Vec<f64>| if on { v } else { Vec::new() };
        Ok(LinGrads {
            dx: keep(train.input, gr.dx),
            dc: keep(train.coeffs, gr.dc),
            da_cat: keep(train.modules, gr.da_cat),
            db_cat: keep(train.modules, gr.db_cat),
            dw: keep(train.base, gr.dw),
            dbias: keep(train.base, gr.dbias),
        })
    }
}

fn ref_layer(l: LinArgs<'_, f64>) -> reference::Layer<'_> {
    reference::Layer {
        w: l.w,
        bias: l.bias,
        modules: l.modules,
        mode: l.mode,
    }
}

/// Which of the two configurations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    /// Patch embedding of a 1-channel image, CLS token, learned positions, pre-LN blocks.
    Vit,
    /// Token + position + token-type embeddings, post-LN blocks (all-MiniLM-L6-v2).
    Bert,
}

/// How a sequence becomes one vector for the head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pool {
    /// The first token's final state.
    Cls,
    /// The mean over real tokens (the padding mask's ones).
    Mean,
}

/// Shapes and hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub arch: Arch,
    /// D
    pub hidden: usize,
    pub layers: usize,
    /// H; D must be a multiple of H.
    pub heads: usize,
    /// F, the MLP's inner width.
    pub intermediate: usize,
    /// BERT: the position table's length. ViT: ignored (patches + 1).
    pub max_positions: usize,
    /// BERT only.
    pub vocab_size: usize,
    /// BERT only.
    pub type_vocab_size: usize,
    /// ViT only: square images of this side.
    pub image_size: usize,
    /// ViT only: square patches of this side; must divide `image_size`.
    pub patch_size: usize,
    pub layer_norm_eps: f64,
    pub pool: Pool,
    /// Classes of the head; 0 for an encoder without a head.
    pub num_labels: usize,
}

impl Config {
    /// The tiny ViT of DESIGN §5: 28×28 images, 7×7 patches, 4 pre-LN blocks.
    pub fn vit(width: usize, layers: usize, heads: usize, num_labels: usize) -> Config {
        Config {
            arch: Arch::Vit,
            hidden: width,
            layers,
            heads,
            intermediate: 4 * width,
            max_positions: 0,
            vocab_size: 0,
            type_vocab_size: 0,
            image_size: 28,
            patch_size: 7,
            layer_norm_eps: 1e-6,
            pool: Pool::Cls,
            num_labels,
        }
    }

    /// all-MiniLM-L6-v2's shapes (the values of its `config.json`), mean pooling.
    pub fn minilm(num_labels: usize) -> Config {
        Config {
            arch: Arch::Bert,
            hidden: 384,
            layers: 6,
            heads: 12,
            intermediate: 1536,
            max_positions: 512,
            vocab_size: 30522,
            type_vocab_size: 2,
            image_size: 0,
            patch_size: 0,
            layer_norm_eps: 1e-12,
            pool: Pool::Mean,
            num_labels,
        }
    }

    /// ViT: patches per image.
    pub fn n_patches(&self) -> usize {
        let side = self.image_size / self.patch_size.max(1);
        side * side
    }

    /// The longest sequence the position table allows.
    pub fn seq_limit(&self) -> usize {
        match self.arch {
            Arch::Vit => self.n_patches() + 1,
            Arch::Bert => self.max_positions,
        }
    }

    /// Head width D / H.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Arg(format!("model config: {msg}")));
        if self.hidden == 0 || self.heads == 0 || self.hidden % self.heads != 0 {
            return bad(format!(
                "hidden size {} is not a positive multiple of {} heads",
                self.hidden, self.heads
            ));
        }
        if self.intermediate == 0 || self.layers == 0 {
            return bad("intermediate size and layer count must be positive".into());
        }
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return bad(format!("layer_norm_eps {} must be positive", self.layer_norm_eps));
        }
        match self.arch {
            Arch::Vit => {
                if self.patch_size == 0 || self.image_size == 0 || self.image_size % self.patch_size != 0 {
                    return bad(format!(
                        "patch size {} does not divide image size {}",
                        self.patch_size, self.image_size
                    ));
                }
            }
            Arch::Bert => {
                if self.vocab_size == 0 || self.max_positions == 0 || self.type_vocab_size == 0 {
                    return bad("vocab, position and token-type tables must be non-empty".into());
                }
            }
        }
        Ok(())
    }
}

/// What a parameter is, for choosing what trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Pretrained weights: embeddings, linear weights and biases, layer norms.
    Base,
    /// The classification head.
    Head,
    /// A trainable LoRA's A (r × d_in).
    LoraA,
    /// A trainable LoRA's B (d_out × r).
    LoraB,
    /// One layer's composition values v (N), mapped through the composition's [`crate::compose::Param`].
    LayerCoeffs,
    /// The one global row of composition values (N) shared by every composed layer.
    GlobalCoeffs,
}

/// Which parameter kinds train. The module libraries of compositions never do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trainable {
    pub base: bool,
    pub head: bool,
    pub lora: bool,
    pub coeffs: bool,
}

impl Trainable {
    /// Full fine-tuning (and any adapters present).
    pub const ALL: Trainable = Trainable {
        base: true,
        head: true,
        lora: true,
        coeffs: true,
    };
    /// Linear probe.
    pub const HEAD: Trainable = Trainable {
        base: false,
        head: true,
        lora: false,
        coeffs: false,
    };
    /// LoRA from scratch.
    pub const LORA_HEAD: Trainable = Trainable {
        base: false,
        head: true,
        lora: true,
        coeffs: false,
    };
    /// Learned composition.
    pub const COEFFS_HEAD: Trainable = Trainable {
        base: false,
        head: true,
        lora: false,
        coeffs: true,
    };

    pub fn trains(&self, kind: Kind) -> bool {
        match kind {
            Kind::Base => self.base,
            Kind::Head => self.head,
            Kind::LoraA | Kind::LoraB => self.lora,
            Kind::LayerCoeffs | Kind::GlobalCoeffs => self.coeffs,
        }
    }
}

/// PEFT's target rule: a module path matches a target when it equals it or ends with
/// `"." + target` (so `output.dense` matches both `attention.output.dense` and the MLP's
/// `output.dense`, as in PEFT).
pub fn matches_target(path: &str, target: &str) -> bool {
    path == target
        || (path.len() > target.len() && path.ends_with(target) && path[..path.len() - target.len()].ends_with('.'))
}
