//! The composed linear layer the transformer uses: one type, one API (forward, backward, which
//! parameters train), two implementations behind a device chosen once for the model
//! (`--device cpu|cuda|auto`):
//!
//! - [`Device::Cpu`]: [`super::fast`], the fused two-GEMM CPU path;
//! - [`Device::Cuda`]: the GEMM family for the base (`X Wᵀ + b`, `G W`, `Gᵀ X`) and the fused
//!   composition kernels (`kernels::compose_fwd`, `kernels::compose_bwd`) for the modules, through
//!   the launch interface. The dispatch code ([`KernelLayer`]) is generic over
//!   [`Backend`], so tests run it unchanged on the CPU execution harness.
//!
//! Factor mode (LoraHub's block mix, equal ranks) has no kernel yet: a Cuda layer in factor mode
//! runs on the CPU fast path.

use std::sync::Arc;

use super::fast::{self, Cache, Grads};
use super::{Mode, ModuleStack, Rows, Train};
use crate::gpu::GpuBackend;
use crate::kernels::compose_fwd::{self, Shape, Tables, TokenRows};
use crate::kernels::gemm::{self, GemmParams, GemmShape};
use crate::kernels::{compose_bwd, Backend, KernelError};
use crate::{Error, Result};

/// What the user asked for (`--device`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// Where every composed layer of a model runs.
#[derive(Clone)]
pub enum Device {
    Cpu,
    Cuda(Arc<GpuBackend>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "Cpu"),
            Device::Cuda(gpu) => write!(f, "Cuda({})", gpu.name()),
        }
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

/// One composed linear layer: frozen base `W` (d_out × d_in) and bias, the stacked modules, the
/// mode, and where it runs.
pub struct ComposedLayer {
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub modules: ModuleStack<f32>,
    pub mode: Mode,
    device: Device,
    /// The weights on the GPU, for a Cuda layer in product mode.
    kernels: Option<KernelLayer<GpuBackend>>,
}

impl ComposedLayer {
    pub fn new(
        w: Vec<f32>,
        bias: Option<Vec<f32>>,
        modules: ModuleStack<f32>,
        mode: Mode,
        device: &Device,
    ) -> Result<Self> {
        modules.check_mode(mode)?;
        let (d_in, d_out) = (modules.d_in, modules.d_out);
        if w.len() != d_out * d_in {
            return Err(Error::Shape(format!(
                "W has {} elements, expected {d_out}×{d_in}",
                w.len()
            )));
        }
        if let Some(b) = bias.as_ref().filter(|b| b.len() != d_out) {
            return Err(Error::Shape(format!("bias has {} elements, expected {d_out}", b.len())));
        }
        let kernels = match (device, mode) {
            (Device::Cuda(gpu), Mode::Product) => {
                Some(KernelLayer::new(gpu.as_ref(), &w, bias.as_deref(), &modules).map_err(device_error)?)
            }
            _ => None,
        };
        Ok(ComposedLayer {
            w,
            bias,
            modules,
            mode,
            device: device.clone(),
            kernels,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernels for this call, unless it is degenerate (no tokens, rank columns or features:
    /// nothing for a kernel to do, and nothing to allocate on the device).
    fn kernels_for(&self, x_len: usize) -> Option<(&GpuBackend, &KernelLayer<GpuBackend>)> {
        let m = &self.modules;
        match (&self.device, &self.kernels) {
            (Device::Cuda(gpu), Some(k)) if x_len > 0 && m.total_rank() > 0 && m.d_out > 0 => Some((gpu.as_ref(), k)),
            _ => None,
        }
    }

    fn fast_layer(&self) -> fast::Layer<'_> {
        fast::Layer {
            w: &self.w,
            bias: self.bias.as_deref(),
            modules: &self.modules,
            mode: self.mode,
        }
    }

    /// `Y = X Wᵀ + b + Σ_i C[σ(t), i] s_i B_i A_i x_t` (T × d_out) and what the backward needs.
    /// `c` is (S, N): the coefficients themselves.
    pub fn forward(&self, x: &[f32], c: &[f32], rows: Rows) -> Result<(Vec<f32>, Cache)> {
        match self.kernels_for(x.len()) {
            Some((gpu, k)) => {
                self.fast_layer().check(x.len(), c.len(), rows, None)?;
                k.forward(gpu, x, c, rows).map_err(device_error)
            }
            None => fast::forward(&self.fast_layer(), x, c, rows),
        }
    }

    /// Gradients of a loss with `G = ∂L/∂Y`, only those `train` asks for.
    pub fn backward(&self, x: &[f32], cache: &Cache, c: &[f32], rows: Rows, g: &[f32], train: Train) -> Result<Grads> {
        match self.kernels_for(x.len()) {
            Some((gpu, k)) => {
                let t = self.fast_layer().check(x.len(), c.len(), rows, Some(g.len()))?;
                cache.check(t, self.modules.total_rank())?;
                k.backward(gpu, x, cache, c, rows, g, train).map_err(device_error)
            }
            None => fast::backward(&self.fast_layer(), x, cache, c, rows, g, train),
        }
    }
}

/// A product-mode layer's weights on a kernel backend, and the launches of its forward and
/// backward: the GEMM family for the base, the fused composition kernels for the modules.
/// Arguments are checked by the caller ([`ComposedLayer`] uses `LayerOf::check`), and every
/// dimension (T, R, d_in, d_out) is non-zero: device buffers are never empty.
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

/// The composition variant a layer runs.
const VARIANT: compose_fwd::Variant = compose_fwd::Variant::Fused;
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
        let c_buf = backend.upload(c)?;
        let token_rows = TokenRows::upload(backend, rows)?;
        let mut u = backend.upload(&vec![0.0f32; t * r])?;
        let mut z = backend.upload(&vec![0.0f32; t * r])?;
        let mut work = backend.upload(&vec![0.0f32; compose_fwd::workspace_len(VARIANT, &shape)])?;
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
        compose_fwd::launch(backend, VARIANT, &shape, &inputs, outputs)?;
        let cache = Cache {
            u: backend.download(&u)?,
            z: backend.download(&z)?,
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
        let mut dc = backend.upload(&vec![0.0f32; rows.n_samples * n])?;
        let mut da = backend.upload(&vec![0.0f32; r * d_in])?;
        let mut db = backend.upload(&vec![0.0f32; d_out * r])?;
        // The composition's buffers and their borrows end with this block.
        {
            let u = backend.upload(&cache.u)?;
            let c_buf = backend.upload(c)?;
            let token_rows = TokenRows::upload(backend, rows)?;
            let mut du = backend.upload(&vec![0.0f32; t * r])?;
            let mut work = backend.upload(&vec![0.0f32; compose_bwd::workspace_len(VARIANT, &shape, lora)])?;
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
            compose_bwd::launch(backend, VARIANT, &shape, lora, &inputs, outputs)?;
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
            let mut dw = backend.upload(&vec![0.0f32; d_out * d_in])?;
            Self::gemm(backend, (d_out, d_in, t), (true, false), 0.0, &g_buf, &x_buf, &mut dw)?;
            grads.dw = backend.download(&dw)?;
            if self.bias.is_some() {
                // Σ_t G[t] in f64: the column sums of G.
                grads.dbias = super::reduce_rows(g, d_out).into_iter().map(|v| v as f32).collect();
            }
        }
        Ok(grads)
    }
}
