//! The device choice (`--device cpu|cuda|auto`) and one composed linear layer on a device, on its
//! own: one type, one API (forward, backward, which parameters train), several implementations.
//! (The transformer does not use it: on a kernel device the whole model is resident there,
//! `crate::model::resident`.)
//!
//! - [`Device::Cpu`]: [`super::fast`], the fused two-GEMM CPU path;
//! - [`Device::Cuda`]: the GEMM family for the base (`X Wᵀ + b`, `G W`, `Gᵀ X`) and the fused
//!   composition kernels (`kernels::compose_fwd`, `kernels::compose_bwd`) for the modules, through
//!   the launch interface;
//! - [`Device::Harness`]: the same kernel dispatch ([`KernelLayer`], generic over [`Backend`])
//!   on the CPU execution harness — slow, for tests: it runs the CUDA path of a whole model
//!   without a GPU.
//!
//! The host weights are the master copy (the optimizer updates them on the host); a
//! [`ComposedLayer`] holds the device's resident copy and is refreshed with
//! [`ComposedLayer::sync`] after they change. Activations cross to the device and back on every
//! call. Factor mode runs on the CPU fast path here whatever the device (the resident model runs
//! it with `kernels::compose_factor`).

use std::sync::Arc;

use super::fast::{self, Cache, Grads};
use super::{LayerOf, Mode, ModuleStack, Rows, Train};
use crate::gpu::GpuBackend;
use crate::harness::CpuHarness;
use crate::kernels::compose_fwd::{self, Shape, Tables, TokenRows};
use crate::kernels::gemm::{self, GemmParams, GemmShape};
use crate::kernels::{compose_bwd, Backend, KernelError};
use crate::{Error, Result};

/// What the user asked for (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    /// CUDA when the probe succeeds, else the CPU (with one line on stderr saying why).
    Auto,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda),
            "auto" => Ok(DeviceChoice::Auto),
            _ => Err(Error::Arg(format!("--device {s:?}: expected cpu, cuda or auto"))),
        }
    }
}

/// `--device`, for every command that runs a model (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceArg {
    /// Where the model runs. cpu: everything on the CPU (the fused composed layer on the `gemm`
    /// crate). cuda: the whole model on GPU 0 — weights, optimizer state, activations and
    /// gradients stay in GPU memory and every forward, backward and AdamW op is a CUDA kernel;
    /// the CPU reads and tokenizes data, uploads each batch, and writes results (an error without
    /// a usable GPU). auto: cuda when a GPU is usable, else cpu.
    #[arg(long = "device", value_name = "DEVICE", value_enum, default_value = "cpu")]
    #[serde(rename = "device")]
    pub choice: DeviceChoice,
}

impl DeviceArg {
    pub const CPU: DeviceArg = DeviceArg {
        choice: DeviceChoice::Cpu,
    };

    /// The device asked for (see [`select`]).
    pub fn select(self) -> Result<Device> {
        select(self.choice)
    }
}

/// Where a model (or a standalone composed layer) runs.
#[derive(Clone, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda(Arc<GpuBackend>),
    /// The CUDA path's kernels on the CPU execution harness (tests; slow).
    Harness(CpuHarness),
}

impl PartialEq for Device {
    fn eq(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            (Device::Harness(a), Device::Harness(b)) => a.seed == b.seed,
            _ => false,
        }
    }
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "Cpu"),
            Device::Cuda(gpu) => write!(f, "Cuda({})", gpu.name()),
            Device::Harness(h) => write!(f, "Harness(seed {})", h.seed),
        }
    }
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
}

/// The device for `choice`: `Cuda` fails when no GPU is usable; `Auto` falls back to the CPU.
pub fn select(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => GpuBackend::probe()
            .map(|gpu| Device::Cuda(Arc::new(gpu)))
            .map_err(|e| Error::Device(format!("--device cuda: {e}"))),
        DeviceChoice::Auto => Ok(match GpuBackend::probe() {
            Ok(gpu) => Device::Cuda(Arc::new(gpu)),
            Err(reason) => {
                eprintln!("device auto: {reason}; using the CPU");
                Device::Cpu
            }
        }),
    }
}

fn device_error(e: KernelError) -> Error {
    Error::Device(e.to_string())
}

/// A layer's weights resident on a kernel device (shared by clones of the layer until one of
/// them syncs new weights).
#[derive(Clone)]
enum Resident {
    /// Nothing on a device: the CPU fast path runs (CPU device, or factor mode).
    Host,
    Cuda(Arc<GpuBackend>, Arc<KernelLayer<GpuBackend>>),
    Harness(CpuHarness, Arc<KernelLayer<CpuHarness>>),
}

/// One composed linear layer on its device: `Y = X Wᵀ + b + Σ_i C[σ(t), i] s_i B_i A_i x_t`.
///
/// The host weights (`W`, `b`, the module stack, the mode) are passed to every call as a
/// [`LayerOf`]; on a kernel device this holds their resident copy, made by [`ComposedLayer::new`]
/// and refreshed by [`ComposedLayer::sync`] whenever the host weights change (the model does this
/// after every optimizer step and adapter change). A call whose layer differs in shape, ranks,
/// mode or bias from the resident copy is an error, not a silent use of stale weights.
#[derive(Clone)]
pub struct ComposedLayer {
    device: Device,
    resident: Resident,
}

impl Default for ComposedLayer {
    fn default() -> Self {
        ComposedLayer::cpu()
    }
}

impl std::fmt::Debug for ComposedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let resident = match self.resident {
            Resident::Host => "host",
            _ => "device",
        };
        write!(f, "ComposedLayer({:?}, weights on {resident})", self.device)
    }
}

/// Layers compare equal when they run on the same device (the weights are the caller's).
impl PartialEq for ComposedLayer {
    fn eq(&self, other: &ComposedLayer) -> bool {
        self.device == other.device
    }
}

impl ComposedLayer {
    /// A layer on the CPU: nothing resident, every call runs [`fast`].
    pub fn cpu() -> ComposedLayer {
        ComposedLayer {
            device: Device::Cpu,
            resident: Resident::Host,
        }
    }

    /// `layer` placed on `device`: on a kernel device in product mode its weights are uploaded.
    pub fn new(layer: &LayerOf<'_, f32>, device: &Device) -> Result<ComposedLayer> {
        let mut out = ComposedLayer {
            device: device.clone(),
            resident: Resident::Host,
        };
        out.sync(layer)?;
        Ok(out)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the weights live on a device (false on the CPU and for factor-mode layers).
    pub fn is_resident(&self) -> bool {
        !matches!(self.resident, Resident::Host)
    }

    /// Replaces the resident copy by `layer`'s current weights (nothing to do on the CPU).
    pub fn sync(&mut self, layer: &LayerOf<'_, f32>) -> Result<()> {
        layer.modules.check_mode(layer.mode)?;
        let (d_in, d_out) = (layer.modules.d_in, layer.modules.d_out);
        if layer.w.len() != d_out * d_in {
            return Err(Error::Shape(format!(
                "W has {} elements, expected {d_out}×{d_in}",
                layer.w.len()
            )));
        }
        if let Some(b) = layer.bias.filter(|b| b.len() != d_out) {
            return Err(Error::Shape(format!("bias has {} elements, expected {d_out}", b.len())));
        }
        let (w, bias, m) = (layer.w, layer.bias, layer.modules);
        self.resident = match (&self.device, layer.mode) {
            (Device::Cpu, _) | (_, Mode::Factor) => Resident::Host,
            (Device::Cuda(gpu), Mode::Product) => Resident::Cuda(
                gpu.clone(),
                Arc::new(KernelLayer::new(gpu.as_ref(), w, bias, m).map_err(device_error)?),
            ),
            (Device::Harness(h), Mode::Product) => {
                Resident::Harness(*h, Arc::new(KernelLayer::new(h, w, bias, m).map_err(device_error)?))
            }
        };
        Ok(())
    }

    /// The resident copy must have been made from a layer of `layer`'s shape, ranks, mode and
    /// bias.
    fn check_resident(&self, layer: &LayerOf<'_, f32>) -> Result<()> {
        let holds = match &self.resident {
            Resident::Host => true,
            Resident::Cuda(_, k) => k.holds(layer),
            Resident::Harness(_, k) => k.holds(layer),
        };
        if holds {
            return Ok(());
        }
        let m = layer.modules;
        Err(Error::Device(format!(
            "the layer changed since its weights went to {:?} (now {}×{}, ranks {:?}, {:?}, bias {}); sync it first",
            self.device,
            m.d_out,
            m.d_in,
            m.ranks,
            layer.mode,
            layer.bias.is_some()
        )))
    }

    /// Whether a call of `x_len` input elements has work for the kernels (an empty call has
    /// nothing to launch and nothing to allocate on the device).
    fn launches(&self, layer: &LayerOf<'_, f32>, x_len: usize) -> bool {
        let m = layer.modules;
        x_len > 0 && m.d_in > 0 && m.d_out > 0
    }

    fn fast_layer<'a>(layer: &LayerOf<'a, f32>) -> fast::Layer<'a> {
        fast::Layer {
            w: layer.w,
            bias: layer.bias,
            modules: layer.modules,
            mode: layer.mode,
        }
    }

    /// `Y` (T × d_out) and what the backward needs. `c` is (S, N): the coefficients themselves.
    pub fn forward(&self, layer: &LayerOf<'_, f32>, x: &[f32], c: &[f32], rows: Rows) -> Result<(Vec<f32>, Cache)> {
        if matches!(self.resident, Resident::Host) || !self.launches(layer, x.len()) {
            return fast::forward(&Self::fast_layer(layer), x, c, rows);
        }
        self.check_resident(layer)?;
        layer.check(x.len(), c.len(), rows, None)?;
        match &self.resident {
            Resident::Cuda(gpu, k) => k.forward(gpu.as_ref(), x, c, rows),
            Resident::Harness(h, k) => k.forward(h, x, c, rows),
            Resident::Host => unreachable!("handled above"),
        }
        .map_err(device_error)
    }

    /// Gradients of a loss with `G = ∂L/∂Y`, only those `train` asks for.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        layer: &LayerOf<'_, f32>,
        x: &[f32],
        cache: &Cache,
        c: &[f32],
        rows: Rows,
        g: &[f32],
        train: Train,
    ) -> Result<Grads> {
        if matches!(self.resident, Resident::Host) || !self.launches(layer, x.len()) {
            return fast::backward(&Self::fast_layer(layer), x, cache, c, rows, g, train);
        }
        self.check_resident(layer)?;
        let t = layer.check(x.len(), c.len(), rows, Some(g.len()))?;
        cache.check(t, layer.modules.total_rank())?;
        match &self.resident {
            Resident::Cuda(gpu, k) => k.backward(gpu.as_ref(), x, cache, c, rows, g, train),
            Resident::Harness(h, k) => k.backward(h, x, cache, c, rows, g, train),
            Resident::Host => unreachable!("handled above"),
        }
        .map_err(device_error)
    }
}

/// A product-mode layer's weights on a kernel backend, and the launches of its forward and
/// backward: the GEMM family for the base, the fused composition kernels for the modules.
/// Arguments are checked by the caller ([`ComposedLayer`] uses `LayerOf::check`), and T, d_in
/// and d_out are non-zero. A layer without modules (R = 0) launches only the base GEMMs.
pub struct KernelLayer<B: Backend> {
    d_in: usize,
    d_out: usize,
    ranks: Vec<usize>,
    bias: Option<Vec<f32>>,
    /// (d_out, d_in)
    w: B::Buffer<f32>,
    /// (R, d_in)
    a_cat: B::Buffer<f32>,
    /// (d_out, R)
    b_cat: B::Buffer<f32>,
    tables: Tables<B>,
}

/// The composition variant a layer runs (f32 storage): the memory-bound GEMV one for few
/// tokens, the fused tiled one above ([`compose_fwd::choose_variant`]).
fn variant(shape: &Shape) -> compose_fwd::Variant {
    compose_fwd::choose_variant(shape.t, crate::kernels::DType::F32)
}
/// The GEMM variant for the base.
const GEMM: gemm::Variant = gemm::Variant::Tiled64;

impl<B: Backend> KernelLayer<B> {
    pub fn new(
        backend: &B,
        w: &[f32],
        bias: Option<&[f32]>,
        modules: &ModuleStack<f32>,
    ) -> std::result::Result<Self, KernelError> {
        let nonempty = |v: &[f32]| if v.is_empty() { vec![0.0] } else { v.to_vec() };
        Ok(KernelLayer {
            d_in: modules.d_in,
            d_out: modules.d_out,
            ranks: modules.ranks.clone(),
            bias: bias.map(<[f32]>::to_vec),
            w: backend.upload(w)?,
            a_cat: backend.upload(&nonempty(&modules.a_cat))?,
            b_cat: backend.upload(&nonempty(&modules.b_cat))?,
            tables: Tables::upload(backend, &modules.ranks, &modules.scales)?,
        })
    }

    /// Whether these are the device weights of a layer shaped like `layer` (product mode, the
    /// same dimensions, ranks and bias).
    fn holds(&self, layer: &LayerOf<'_, f32>) -> bool {
        let m = layer.modules;
        layer.mode == Mode::Product
            && (self.d_in, self.d_out) == (m.d_in, m.d_out)
            && self.ranks == m.ranks
            && self.bias.is_some() == layer.bias.is_some()
    }

    fn shape(&self, t: usize, n_samples: usize) -> Shape {
        Shape {
            t,
            d_in: self.d_in,
            d_out: self.d_out,
            n_samples,
            ranks: self.ranks.clone(),
        }
    }

    /// `dst (m × n) = op(a) op(b) + beta·dst` with the base GEMM; nothing for an empty product.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        backend: &B,
        (m, n, k): (usize, usize, usize),
        (trans_a, trans_b): (bool, bool),
        beta: f32,
        a: &B::Buffer<f32>,
        b: &B::Buffer<f32>,
        dst: &mut B::Buffer<f32>,
    ) -> std::result::Result<(), KernelError> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let params = GemmParams {
            shape: GemmShape {
                m,
                n,
                k,
                trans_a,
                trans_b,
            },
            alpha: 1.0,
            beta,
        };
        gemm::launch::<f32, B>(backend, GEMM, &params, a, b, dst)
    }

    /// Forward on `backend`; the cache holds U (unscaled) and Z.
    pub fn forward(
        &self,
        backend: &B,
        x: &[f32],
        c: &[f32],
        rows: Rows,
    ) -> std::result::Result<(Vec<f32>, Cache), KernelError> {
        let t = rows.sample_of.len();
        let shape = self.shape(t, rows.n_samples);
        let r = shape.r_total();
        let y0 = match &self.bias {
            Some(b) => b.repeat(t),
            None => vec![0.0; t * self.d_out],
        };
        let mut y = backend.upload(&y0)?;
        let x_buf = backend.upload(x)?;
        let beta = if self.bias.is_some() { 1.0 } else { 0.0 };
        Self::gemm(
            backend,
            (t, self.d_out, self.d_in),
            (false, true),
            beta,
            &x_buf,
            &self.w,
            &mut y,
        )?;
        if r == 0 {
            return Ok((backend.download(&y)?, Cache::default()));
        }
        let c_buf = backend.upload(c)?;
        let token_rows = TokenRows::upload(backend, rows)?;
        let mut u = backend.alloc::<f32>(t * r)?;
        let mut z = backend.alloc::<f32>(t * r)?;
        let mut work = backend.alloc::<f32>(compose_fwd::workspace_len(variant(&shape), &shape, backend.sm_count()))?;
        let inputs = compose_fwd::Inputs {
            x: &x_buf,
            a_cat: &self.a_cat,
            b_cat: &self.b_cat,
            c: &c_buf,
            rows: &token_rows,
            tables: &self.tables,
        };
        let outputs = compose_fwd::Outputs {
            u: Some(&mut u),
            z: &mut z,
            y: &mut y,
            work: &mut work,
        };
        compose_fwd::launch(backend, variant(&shape), &shape, &inputs, outputs)?;
        let cache = Cache {
            u: backend.download(&u)?,
            z: backend.download(&z)?,
            w: Vec::new(),
        };
        Ok((backend.download(&y)?, cache))
    }

    /// Backward on `backend`: the gradients `train` asks for, as [`fast::backward`] returns them.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        backend: &B,
        x: &[f32],
        cache: &Cache,
        c: &[f32],
        rows: Rows,
        g: &[f32],
        train: Train,
    ) -> std::result::Result<Grads, KernelError> {
        let t = rows.sample_of.len();
        let shape = self.shape(t, rows.n_samples);
        let (d_in, d_out, r, n) = (self.d_in, self.d_out, shape.r_total(), shape.n());
        let (x_buf, g_buf) = (backend.upload(x)?, backend.upload(g)?);
        let mut grads = Grads::default();
        let mut dx = backend.upload(&vec![0.0f32; t * d_in])?;
        if train.input {
            Self::gemm(backend, (t, d_in, d_out), (false, false), 0.0, &g_buf, &self.w, &mut dx)?;
        }
        let lora = Train { base: false, ..train };
        if r == 0 {
            // No modules: only the base GEMMs have work.
            if train.input {
                grads.dx = backend.download(&dx)?;
            }
            if train.base {
                self.base_grads(backend, t, &x_buf, &g_buf, g, &mut grads)?;
            }
            return Ok(grads);
        }
        let mut dc = backend.upload(&vec![0.0f32; rows.n_samples * n])?;
        let mut da = backend.upload(&vec![0.0f32; r * d_in])?;
        let mut db = backend.upload(&vec![0.0f32; d_out * r])?;
        // The composition's buffers and their borrows end with this block.
        {
            let u = backend.upload(&cache.u)?;
            let c_buf = backend.upload(c)?;
            let token_rows = TokenRows::upload(backend, rows)?;
            let mut du = backend.alloc::<f32>(t * r)?;
            let mut work = backend.alloc::<f32>(compose_bwd::workspace_len(
                variant(&shape),
                &shape,
                lora,
                backend.sm_count(),
            ))?;
            let inputs = compose_bwd::Inputs {
                g: &g_buf,
                x: &x_buf,
                u: &u,
                a_cat: &self.a_cat,
                b_cat: &self.b_cat,
                c: &c_buf,
                rows: &token_rows,
                tables: &self.tables,
            };
            let outputs = compose_bwd::Outputs {
                dc: lora.coeffs.then_some(&mut dc),
                du: (lora.input || lora.modules).then_some(&mut du),
                dx: lora.input.then_some(&mut dx),
                da_cat: lora.modules.then_some(&mut da),
                db_cat: lora.modules.then_some(&mut db),
                work: &mut work,
            };
            compose_bwd::launch(backend, variant(&shape), &shape, lora, &inputs, outputs)?;
        }
        if train.input {
            grads.dx = backend.download(&dx)?;
        }
        if train.coeffs {
            grads.dc = backend.download(&dc)?.into_iter().map(f64::from).collect();
        }
        if train.modules {
            grads.da_cat = backend.download(&da)?;
            grads.db_cat = backend.download(&db)?;
        }
        if train.base {
            self.base_grads(backend, t, &x_buf, &g_buf, g, &mut grads)?;
        }
        Ok(grads)
    }

    /// `∂W = Gᵀ X` on the backend and `∂b = Σ_t G[t]` (in f64, on the host).
    fn base_grads(
        &self,
        backend: &B,
        t: usize,
        x_buf: &B::Buffer<f32>,
        g_buf: &B::Buffer<f32>,
        g: &[f32],
        grads: &mut Grads,
    ) -> std::result::Result<(), KernelError> {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let mut dw = backend.upload(&vec![0.0f32; d_out * d_in])?;
        Self::gemm(backend, (d_out, d_in, t), (true, false), 0.0, g_buf, x_buf, &mut dw)?;
        grads.dw = backend.download(&dw)?;
        if self.bias.is_some() {
            grads.dbias = super::reduce_rows(g, d_out).into_iter().map(|v| v as f32).collect();
        }
        Ok(())
    }
}
