//! The network's parameters: structure, seeded initialisation, names, adapters.
//!
//! Names follow Hugging Face's models (the safetensors of all-MiniLM-L6-v2 load by name), with
//! adapters under PEFT's names (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`) and a
//! layer's composition values under `<layer>.compose_logits`.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::linear::{randn, Adapter, Composition, Library, Linear, LoraModule, GLOBAL_LOGITS};
use super::resident::ResidentSlot;
use super::{matches_target, Arch, Config, Kind, Real};
use crate::compose::layer::Device;
use crate::kernels::DType;
use crate::{Error, Result};

/// γ and β of one layer norm.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerNorm<T> {
    pub name: String,
    /// (D)
    pub gamma: Vec<T>,
    /// (D)
    pub beta: Vec<T>,
}

impl<T: Real> LayerNorm<T> {
    fn new(name: String, d: usize) -> Self {
        LayerNorm {
            name,
            gamma: vec![T::one(); d],
            beta: vec![T::zero(); d],
        }
    }
    fn map<U: Real>(&self, f: impl Fn(T) -> U) -> LayerNorm<U> {
        LayerNorm {
            name: self.name.clone(),
            gamma: self.gamma.iter().map(|&x| f(x)).collect(),
            beta: self.beta.iter().map(|&x| f(x)).collect(),
        }
    }
}

/// One encoder block. BERT (post-LN): `ln1` follows attention, `ln2` the MLP. ViT (pre-LN):
/// `ln1` precedes attention, `ln2` the MLP.
#[derive(Clone, Debug, PartialEq)]
pub struct Block<T> {
    pub query: Linear<T>,
    pub key: Linear<T>,
    pub value: Linear<T>,
    pub attn_out: Linear<T>,
    pub ln1: LayerNorm<T>,
    pub ffn_in: Linear<T>,
    pub ffn_out: Linear<T>,
    pub ln2: LayerNorm<T>,
}

impl<T> Block<T> {
    pub fn linears(&self) -> [&Linear<T>; 6] {
        [
            &self.query,
            &self.key,
            &self.value,
            &self.attn_out,
            &self.ffn_in,
            &self.ffn_out,
        ]
    }
    pub fn linears_mut(&mut self) -> [&mut Linear<T>; 6] {
        [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.attn_out,
            &mut self.ffn_in,
            &mut self.ffn_out,
        ]
    }
}

/// The input side of the network.
// One per model: the size difference between the variants (the ViT's patch projection is a
// whole linear layer) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Embeddings<T> {
    Bert {
        /// (V, D)
        word: Vec<T>,
        /// (P, D)
        position: Vec<T>,
        /// (types, D)
        token_type: Vec<T>,
        ln: LayerNorm<T>,
    },
    Vit {
        /// (D, p²): a 1-channel p×p convolution with stride p, as a linear layer on patches.
        patch: Linear<T>,
        /// (D)
        cls: Vec<T>,
        /// (patches + 1, D)
        position: Vec<T>,
    },
}

/// The whole network. See the module docs of [`crate::model`] for the math.
#[derive(Debug, PartialEq)]
pub struct Model<T> {
    pub config: Config,
    pub embeddings: Embeddings<T>,
    pub blocks: Vec<Block<T>>,
    /// ViT only: the layer norm after the last block.
    pub final_ln: Option<LayerNorm<T>>,
    /// (num_labels, D): `classifier`.
    pub head: Linear<T>,
    /// How composed layers mix their modules; `None` until a library is attached.
    pub composition: Option<Composition>,
    /// (N): the global composition row, when `composition.global`.
    pub global_v: Vec<T>,
    /// Where the model runs ([`Model::to_device`]); the CPU until moved.
    device: Device,
    /// The storage type of the device copy ([`Model::to_device_storage`]); f32 until chosen.
    storage: DType,
    /// Test switch of the CPU forward: every activation the bf16 kernels store rounded to bf16
    /// at the same points ([`Model::set_round_activations`]).
    pub(crate) round_activations: bool,
    /// The device copy on a kernel device ([`super::resident`]).
    pub(crate) resident: ResidentSlot,
}

impl<T: Real> Clone for Model<T> {
    /// A copy on the same device, with its own device copy (uploaded on first use). A model
    /// trained on the device is cloned with its current weights (downloaded for the copy).
    fn clone(&self) -> Self {
        let mut out = Model {
            config: self.config.clone(),
            embeddings: self.embeddings.clone(),
            blocks: self.blocks.clone(),
            final_ln: self.final_ln.clone(),
            head: self.head.clone(),
            composition: self.composition,
            global_v: self.global_v.clone(),
            device: self.device.clone(),
            storage: self.storage,
            round_activations: self.round_activations,
            resident: ResidentSlot::default(),
        };
        if self.resident.is_stale() {
            match self.download_params() {
                Ok(Some(flat)) => out.write_params(&flat),
                _ => out
                    .resident
                    .host_stale
                    .store(true, std::sync::atomic::Ordering::Relaxed),
            }
        }
        out
    }
}

/// One named parameter: `D` is `&Vec<T>` or `&mut Vec<T>`.
#[derive(Debug)]
pub struct Param<'a, D> {
    pub name: String,
    pub kind: Kind,
    pub shape: Vec<usize>,
    pub data: D,
    _life: std::marker::PhantomData<&'a ()>,
}

fn param<'a, D>(name: String, kind: Kind, shape: Vec<usize>, data: D) -> Param<'a, D> {
    Param {
        name,
        kind,
        shape,
        data,
        _life: std::marker::PhantomData,
    }
}

/// Lists every parameter of a model in one fixed order (base, head, then adapters), borrowed
/// shared or mutably (`$($m)?` is `mut` or nothing), so both views share one traversal.
macro_rules! collect_params {
    ($model:expr, $($m:tt)?) => {{
        let model = $model;
        let (d, types) = (model.config.hidden, model.config.type_vocab_size);
        let (vocab, positions) = (model.config.vocab_size, model.config.max_positions);
        let tokens = model.config.n_patches() + 1;
        let mut base = Vec::new();
        let mut adapters = Vec::new();
        macro_rules! ln {
            ($ln:expr) => {{
                let LayerNorm { name, gamma, beta } = $ln;
                base.push(param(format!("{name}.weight"), Kind::Base, vec![d], gamma));
                base.push(param(format!("{name}.bias"), Kind::Base, vec![d], beta));
            }};
        }
        macro_rules! lin {
            ($lin:expr, $kind:expr) => {{
                let Linear { name, d_in, d_out, w, b, modules, adapter, .. } = $lin;
                let (d_in, d_out) = (*d_in, *d_out);
                base.push(param(format!("{name}.weight"), $kind, vec![d_out, d_in], w));
                base.push(param(format!("{name}.bias"), $kind, vec![d_out], b));
                let r = modules.total_rank();
                match adapter {
                    Adapter::None => {}
                    Adapter::Lora => {
                        adapters.push(param(format!("{name}.lora_A.weight"), Kind::LoraA, vec![r, d_in], & $($m)? modules.a_cat));
                        adapters.push(param(format!("{name}.lora_B.weight"), Kind::LoraB, vec![d_out, r], & $($m)? modules.b_cat));
                    }
                    Adapter::Compose { v } => {
                        if !v.is_empty() {
                            let n = v.len();
                            adapters.push(param(format!("{name}.compose_logits"), Kind::LayerCoeffs, vec![n], v));
                        }
                    }
                }
            }};
        }
        match & $($m)? model.embeddings {
            Embeddings::Bert { word, position, token_type, ln } => {
                base.push(param("embeddings.word_embeddings.weight".into(), Kind::Base, vec![vocab, d], word));
                base.push(param("embeddings.position_embeddings.weight".into(), Kind::Base, vec![positions, d], position));
                base.push(param("embeddings.token_type_embeddings.weight".into(), Kind::Base, vec![types, d], token_type));
                ln!(ln);
            }
            Embeddings::Vit { patch, cls, position } => {
                base.push(param("embeddings.cls_token".into(), Kind::Base, vec![d], cls));
                base.push(param("embeddings.position_embeddings".into(), Kind::Base, vec![tokens, d], position));
                lin!(patch, Kind::Base);
            }
        }
        for blk in & $($m)? model.blocks {
            let Block { query, key, value, attn_out, ln1, ffn_in, ffn_out, ln2 } = blk;
            lin!(query, Kind::Base);
            lin!(key, Kind::Base);
            lin!(value, Kind::Base);
            lin!(attn_out, Kind::Base);
            ln!(ln1);
            lin!(ffn_in, Kind::Base);
            lin!(ffn_out, Kind::Base);
            ln!(ln2);
        }
        if let Some(ln) = & $($m)? model.final_ln {
            ln!(ln);
        }
        lin!(& $($m)? model.head, Kind::Head);
        if model.composition.is_some_and(|c| c.global) {
            let n = model.global_v.len();
            adapters.push(param(GLOBAL_LOGITS.into(), Kind::GlobalCoeffs, vec![n], & $($m)? model.global_v));
        }
        base.extend(adapters);
        base
    }};
}

impl<T: Real> Model<T> {
    /// A seeded random model: weights and embeddings `N(0, 0.02²)` (BERT's and ViT's
    /// initializer range), biases 0, layer norms γ = 1, β = 0. No adapters.
    pub fn init(config: Config, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (d, f, std) = (config.hidden, config.intermediate, 0.02);
        let bert = config.arch == Arch::Bert;
        let embeddings = if bert {
            Embeddings::Bert {
                word: randn(&mut rng, config.vocab_size * d, std),
                position: randn(&mut rng, config.max_positions * d, std),
                token_type: randn(&mut rng, config.type_vocab_size * d, std),
                ln: LayerNorm::new("embeddings.LayerNorm".into(), d),
            }
        } else {
            let p2 = config.patch_size * config.patch_size;
            Embeddings::Vit {
                patch: Linear::init("embeddings.patch_embeddings.projection", p2, d, std, &mut rng),
                cls: randn(&mut rng, d, std),
                position: randn(&mut rng, (config.n_patches() + 1) * d, std),
            }
        };
        let blocks = (0..config.layers)
            .map(|l| {
                let p = format!("encoder.layer.{l}");
                let att = if bert { "attention.self" } else { "attention.attention" };
                let (ln1, ln2) = if bert {
                    ("attention.output.LayerNorm", "output.LayerNorm")
                } else {
                    ("layernorm_before", "layernorm_after")
                };
                Block {
                    query: Linear::init(format!("{p}.{att}.query"), d, d, std, &mut rng),
                    key: Linear::init(format!("{p}.{att}.key"), d, d, std, &mut rng),
                    value: Linear::init(format!("{p}.{att}.value"), d, d, std, &mut rng),
                    attn_out: Linear::init(format!("{p}.attention.output.dense"), d, d, std, &mut rng),
                    ln1: LayerNorm::new(format!("{p}.{ln1}"), d),
                    ffn_in: Linear::init(format!("{p}.intermediate.dense"), d, f, std, &mut rng),
                    ffn_out: Linear::init(format!("{p}.output.dense"), f, d, std, &mut rng),
                    ln2: LayerNorm::new(format!("{p}.{ln2}"), d),
                }
            })
            .collect();
        Ok(Model {
            final_ln: (!bert).then(|| LayerNorm::new("layernorm".into(), d)),
            head: Linear::init("classifier", d, config.num_labels, std, &mut rng),
            config,
            embeddings,
            blocks,
            composition: None,
            global_v: Vec::new(),
            device: Device::Cpu,
            storage: DType::F32,
            round_activations: false,
            resident: ResidentSlot::default(),
        })
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Runs the model on `device` from now on. On a kernel device (CUDA, or the CPU harness)
    /// the whole model goes there now: weights, and later the optimizer's moments, activations
    /// and gradients, all in device buffers; training steps update the device copy only (see
    /// [`Model::sync_host`]). Structural changes (adapters attached or removed) re-upload it on
    /// next use; after editing host weights directly, call [`Model::sync_device`]. f64 models run
    /// on the CPU only.
    pub fn to_device(&mut self, device: &Device) -> Result<()> {
        self.to_device_storage(device, DType::F32)
    }

    /// [`Model::to_device`] with the device copy stored as `storage`: [`DType::F32`], or
    /// [`DType::BF16`] — weights (a bf16 working copy of f32 master weights, refreshed after
    /// every optimizer step), gradients, activations and frozen libraries in bf16; kernels
    /// accumulate in f32; coefficient rows, layer-norm statistics, attention's log-sum-exp, the
    /// loss, the optimizer's moments and workspaces stay f32. The choice is kept across
    /// [`Model::sync_device`] and clones. On the CPU the storage is recorded and has no effect.
    pub fn to_device_storage(&mut self, device: &Device, storage: DType) -> Result<()> {
        if storage == DType::F16 {
            return Err(Error::Arg(
                "f16 storage is not supported for the resident model (f32 and bf16 are)".into(),
            ));
        }
        if !device.is_cpu() && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f64>() {
            return Err(Error::Device(format!(
                "f64 models run the CPU reference only, not on {device:?}"
            )));
        }
        self.sync_host()?;
        self.device = device.clone();
        self.storage = storage;
        self.sync_device()
    }

    /// The storage type of the device copy (f32 unless [`Model::to_device_storage`] chose bf16).
    pub fn storage(&self) -> DType {
        self.storage
    }

    /// For tests of bf16 storage: when set, the CPU forward rounds every activation the bf16
    /// kernels store (linear layers' GEMM, bias and composition outputs and their rank-R
    /// intermediate Z, q, k, v, the attention context, residual sums, layer-norm outputs, GELU,
    /// the embeddings, patches, the pooled output, the logits) to bf16 at the same points, so
    /// that a CPU f32 model with bf16-rounded weights is "the same math done on the CPU in
    /// bf16". The backward is unchanged (f32, on the rounded activations).
    pub fn set_round_activations(&mut self, on: bool) {
        self.round_activations = on;
    }

    /// Replaces the device copy by the current host weights (after editing them directly).
    pub fn sync_device(&mut self) -> Result<()> {
        self.resident.clear();
        self.resident.with(self, |_| Ok(()))?;
        Ok(())
    }

    /// Copies the device's weights back into the host copy after training on the device (a
    /// no-op on the CPU or when nothing changed there). Checkpoints, `lora_modules` and the
    /// experiment's reports read the host copy.
    pub fn sync_host(&mut self) -> Result<()> {
        if !self.resident.is_stale() {
            return Ok(());
        }
        if let Some(flat) = self.download_params()? {
            self.write_params(&flat);
        }
        self.resident
            .host_stale
            .store(false, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The device's flat parameters ([`Model::params`] order), when on a kernel device.
    fn download_params(&self) -> Result<Option<Vec<f32>>> {
        // A stale host copy cannot rebuild the device copy, so only an existing one is read.
        if !self.resident.is_stale() {
            return Ok(None);
        }
        self.resident.with(self, |state| {
            super::resident::on_device!(state, |be, dm| dm.download_params(be))
        })
    }

    fn write_params(&mut self, flat: &[f32]) {
        let mut at = 0;
        for p in self.params_mut() {
            for x in p.data.iter_mut() {
                *x = T::of(flat[at] as f64);
                at += 1;
            }
        }
    }

    /// Before a structural change: the host copy made current, the device copy dropped.
    fn invalidate_device(&mut self) -> Result<()> {
        self.sync_host()?;
        self.resident.clear();
        Ok(())
    }

    /// Every parameter in a fixed order: base (embeddings, blocks, final norm), head, adapters.
    pub fn params(&self) -> Vec<Param<'_, &Vec<T>>> {
        collect_params!(self,)
    }

    pub fn params_mut(&mut self) -> Vec<Param<'_, &mut Vec<T>>> {
        collect_params!(self, mut)
    }

    /// The same model in another element type.
    pub fn cast<U: Real>(&self) -> Model<U> {
        let f = |x: T| U::of(x.into());
        Model {
            config: self.config.clone(),
            embeddings: match &self.embeddings {
                Embeddings::Bert {
                    word,
                    position,
                    token_type,
                    ln,
                } => Embeddings::Bert {
                    word: word.iter().map(|&x| f(x)).collect(),
                    position: position.iter().map(|&x| f(x)).collect(),
                    token_type: token_type.iter().map(|&x| f(x)).collect(),
                    ln: ln.map(f),
                },
                Embeddings::Vit { patch, cls, position } => Embeddings::Vit {
                    patch: patch.map(f),
                    cls: cls.iter().map(|&x| f(x)).collect(),
                    position: position.iter().map(|&x| f(x)).collect(),
                },
            },
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    query: b.query.map(f),
                    key: b.key.map(f),
                    value: b.value.map(f),
                    attn_out: b.attn_out.map(f),
                    ln1: b.ln1.map(f),
                    ffn_in: b.ffn_in.map(f),
                    ffn_out: b.ffn_out.map(f),
                    ln2: b.ln2.map(f),
                })
                .collect(),
            final_ln: self.final_ln.as_ref().map(|l| l.map(f)),
            head: self.head.map(f),
            composition: self.composition,
            global_v: self.global_v.iter().map(|&x| f(x)).collect(),
            device: Device::Cpu,
            storage: self.storage,
            round_activations: self.round_activations,
            resident: ResidentSlot::default(),
        }
    }

    /// Every block linear layer's PEFT module path, bottom to top.
    pub fn layer_names(&self) -> Vec<String> {
        self.blocks
            .iter()
            .flat_map(|b| b.linears().map(|l| l.name.clone()))
            .collect()
    }

    pub fn linear(&self, path: &str) -> Option<&Linear<T>> {
        self.blocks.iter().flat_map(|b| b.linears()).find(|l| l.name == path)
    }

    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear<T>> {
        self.blocks
            .iter_mut()
            .flat_map(|b| b.linears_mut())
            .find(|l| l.name == path)
    }

    /// Block layers matching PEFT-style targets (see [`super::matches_target`]); every target
    /// must match at least one layer.
    pub fn resolve_targets(&self, targets: &[&str]) -> Result<Vec<String>> {
        let names = self.layer_names();
        for t in targets {
            if !names.iter().any(|n| matches_target(n, t)) {
                return Err(Error::Arg(format!(
                    "target `{t}` matches no linear layer (layers are named like `{}`)",
                    names.first().map(String::as_str).unwrap_or("")
                )));
            }
        }
        Ok(names
            .into_iter()
            .filter(|n| targets.iter().any(|t| matches_target(n, t)))
            .collect())
    }

    /// Attaches one trainable LoRA (rank r, scale alpha/r) to every layer the targets match.
    /// Returns the layers' paths.
    pub fn attach_lora(&mut self, targets: &[&str], rank: usize, alpha: f64, seed: u64) -> Result<Vec<String>> {
        let paths = self.resolve_targets(targets)?;
        self.invalidate_device()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for p in &paths {
            self.linear_mut(p)
                .expect("resolved above")
                .attach_lora(rank, alpha, &mut rng)?;
        }
        Ok(paths)
    }

    /// Attaches a module library: each named layer gets its modules, frozen, mixed per `comp`.
    /// Layers not in the library stay as they are. A global composition needs the same module
    /// count N on every layer; its row starts uniform (softmax of zeros, or 1/N when raw).
    pub fn attach_composition(&mut self, library: &Library, comp: Composition) -> Result<()> {
        self.invalidate_device()?;
        let mut n_global = None;
        for (path, modules) in library {
            let known = self.layer_names();
            let lin = self.linear_mut(path).ok_or_else(|| {
                Error::Mismatch(format!(
                    "module library names layer `{path}`, which this model does not have (it has e.g. `{}`)",
                    known.first().map(String::as_str).unwrap_or("")
                ))
            })?;
            if comp.global {
                if let Some(n) = n_global.filter(|&n| n != modules.len()) {
                    return Err(Error::Mismatch(format!(
                        "a global composition needs equal module counts: layer `{path}` has {}, others {n}",
                        modules.len()
                    )));
                }
                n_global = Some(modules.len());
            }
            lin.attach_library(modules, comp)?;
        }
        self.composition = Some(comp);
        self.global_v = match n_global {
            Some(n) => {
                let init = if comp.param == crate::compose::Param::Raw {
                    1.0 / n as f64
                } else {
                    0.0
                };
                vec![T::of(init); n]
            }
            None => Vec::new(),
        };
        Ok(())
    }

    /// A synthetic library for the layers `targets` match: `n` modules of rank `rank` each,
    /// factors uniform in ±`amplitude`, scale 2 — for benchmarks, tests and smoke runs.
    pub fn random_library(
        &self,
        targets: &[&str],
        n: usize,
        rank: usize,
        amplitude: f32,
        seed: u64,
    ) -> Result<Library> {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut lib = Library::new();
        for name in self.resolve_targets(targets)? {
            let l = self.linear(&name).expect("resolved above");
            let mods = (0..n)
                .map(|_| LoraModule {
                    a: (0..rank * l.d_in)
                        .map(|_| rng.random_range(-amplitude..amplitude))
                        .collect(),
                    b: (0..l.d_out * rank)
                        .map(|_| rng.random_range(-amplitude..amplitude))
                        .collect(),
                    scale: 2.0,
                })
                .collect();
            lib.insert(name, mods);
        }
        Ok(lib)
    }

    /// Removes every adapter (LoRA and compositions).
    pub fn detach_adapters(&mut self) -> Result<()> {
        self.invalidate_device()?;
        for b in &mut self.blocks {
            for l in b.linears_mut() {
                l.detach();
            }
        }
        self.composition = None;
        self.global_v.clear();
        Ok(())
    }

    /// The model from block `from` up: blocks `from..` (keeping their names, so adapters and
    /// libraries attach to them by the full model's paths), the head, and the embeddings
    /// (unused when it runs on [`super::Batch::hidden`] from [`Model::hidden_states`]`(_, from)`:
    /// the two together are the full model's forward). BERT on the CPU only.
    pub fn top(&self, from: usize) -> Result<Model<T>> {
        if self.config.arch != super::Arch::Bert || !self.device().is_cpu() {
            return Err(Error::Arg("only a BERT on the CPU splits at a block".into()));
        }
        if from > self.blocks.len() {
            return Err(Error::Arg(format!(
                "block {from} is past the model's {} blocks",
                self.blocks.len()
            )));
        }
        let mut out = self.clone();
        out.blocks.drain(..from);
        out.config.layers -= from;
        Ok(out)
    }

    /// The trained LoRAs as library modules (f32), e.g. to compose later.
    pub fn lora_modules(&self) -> Library {
        let mut out = BTreeMap::new();
        for l in self.blocks.iter().flat_map(|b| b.linears()) {
            if l.adapter == Adapter::Lora {
                out.insert(
                    l.name.clone(),
                    vec![LoraModule {
                        a: l.modules.a_cat.iter().map(|&x| x.into() as f32).collect(),
                        b: l.modules.b_cat.iter().map(|&x| x.into() as f32).collect(),
                        scale: l.modules.scales[0].into() as f32,
                    }],
                );
            }
        }
        out
    }

    /// Number of elements of the parameters that `trainable` trains.
    pub fn trainable_count(&self, trainable: super::Trainable) -> usize {
        self.params()
            .iter()
            .filter(|p| self.trains_kind(trainable, p.kind))
            .map(|p| p.data.len())
            .sum()
    }

    /// Whether parameters of `kind` train under `trainable` (uniform coefficients never do).
    pub(crate) fn trains_kind(&self, trainable: super::Trainable, kind: Kind) -> bool {
        trainable.trains(kind) && !self.frozen_coeffs(kind)
    }

    /// Uniform compositions list their values but never train them.
    pub(crate) fn frozen_coeffs(&self, kind: Kind) -> bool {
        matches!(kind, Kind::LayerCoeffs | Kind::GlobalCoeffs)
            && self
                .composition
                .is_none_or(|c| c.param == crate::compose::Param::Uniform)
    }
}
