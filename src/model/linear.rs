//! A linear layer that is plain, plain + one trainable LoRA, or plain + a composition of frozen
//! modules — all three as the crate's composed layer (DESIGN §2) with 0, 1 or N modules:
//!
//! ```text
//! plain:        y = W x + b
//! LoRA:         y = W x + b + s·B A x                      (c = 1, A and B train)
//! composition:  y = W x + b + Σ_i c_i s_i B_i A_i x         (c from v: raw / softmax / uniform)
//! ```

use std::collections::BTreeMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::pass::Grads;
use super::{LinArgs, Real, Trainable};
use crate::compose::{coefficients, coefficients_backward, Mode, ModuleStack, Param, Rows, Train};
use crate::{Error, Result};

/// One LoRA module for one layer, in PEFT's layout: `ΔW = scale · B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraModule {
    /// (r, d_in): PEFT's `lora_A.weight`
    pub a: Vec<f32>,
    /// (d_out, r): PEFT's `lora_B.weight`
    pub b: Vec<f32>,
    /// `lora_alpha / r`
    pub scale: f32,
}

/// A module library: for each layer's PEFT module path (`encoder.layer.0.attention.self.query`),
/// its modules, in the same library order on every layer.
pub type Library = BTreeMap<String, Vec<LoraModule>>;

/// How a model's composed layers mix their modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Composition {
    pub mode: Mode,
    pub param: Param,
    /// One row of values shared by every composed layer (LoraHub) instead of one per layer.
    pub global: bool,
}

/// What a linear layer carries besides `W`, `b`.
#[derive(Clone, Debug, PartialEq)]
pub enum Adapter<T> {
    None,
    /// One trainable LoRA (the layer's stack holds one module; its coefficient is 1).
    Lora,
    /// A frozen module library mixed by coefficients; `v` (N) are this layer's values, empty
    /// when the composition is global.
    Compose {
        v: Vec<T>,
    },
}

/// A linear layer named by its PEFT module path.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear<T> {
    pub name: String,
    pub d_in: usize,
    pub d_out: usize,
    /// (d_out, d_in)
    pub w: Vec<T>,
    /// (d_out)
    pub b: Vec<T>,
    /// Empty, one LoRA, or the library (see [`Adapter`]).
    pub modules: ModuleStack<T>,
    pub adapter: Adapter<T>,
}

/// A standard normal draw (Box–Muller).
pub(crate) fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

pub(crate) fn randn<T: Real>(rng: &mut ChaCha8Rng, len: usize, std: f64) -> Vec<T> {
    (0..len).map(|_| T::of(normal(rng) * std)).collect()
}

pub(crate) fn empty_stack<T: Copy + Default>(d_in: usize, d_out: usize) -> ModuleStack<T> {
    ModuleStack {
        d_in,
        d_out,
        ranks: Vec::new(),
        scales: Vec::new(),
        a_cat: Vec::new(),
        b_cat: Vec::new(),
    }
}

impl<T: Real> Linear<T> {
    /// `W ~ N(0, std²)`, `b = 0`, no adapter.
    pub fn init(name: impl Into<String>, d_in: usize, d_out: usize, std: f64, rng: &mut ChaCha8Rng) -> Self {
        Linear {
            name: name.into(),
            d_in,
            d_out,
            w: randn(rng, d_out * d_in, std),
            b: vec![T::zero(); d_out],
            modules: empty_stack(d_in, d_out),
            adapter: Adapter::None,
        }
    }

    pub fn map<U: Real>(&self, f: impl Fn(T) -> U + Copy) -> Linear<U> {
        Linear {
            name: self.name.clone(),
            d_in: self.d_in,
            d_out: self.d_out,
            w: self.w.iter().map(|&x| f(x)).collect(),
            b: self.b.iter().map(|&x| f(x)).collect(),
            modules: self.modules.map(f),
            adapter: match &self.adapter {
                Adapter::None => Adapter::None,
                Adapter::Lora => Adapter::Lora,
                Adapter::Compose { v } => Adapter::Compose {
                    v: v.iter().map(|&x| f(x)).collect(),
                },
            },
        }
    }

    /// Attaches one trainable LoRA of rank r: A ~ U(±1/√d_in) (PEFT's Kaiming-uniform bound),
    /// B = 0 (so the layer starts unchanged), scale alpha/r.
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, rng: &mut ChaCha8Rng) -> Result<()> {
        if rank == 0 {
            return Err(Error::Arg(format!("{}: LoRA rank must be positive", self.name)));
        }
        let bound = 1.0 / (self.d_in as f64).sqrt();
        let a: Vec<T> = (0..rank * self.d_in)
            .map(|_| T::of(rng.random_range(-bound..bound)))
            .collect();
        let b = vec![T::zero(); self.d_out * rank];
        self.modules = ModuleStack::from_modules(self.d_in, self.d_out, &[(&a, &b, T::of(alpha / rank as f64))])?;
        self.adapter = Adapter::Lora;
        Ok(())
    }

    /// Attaches a frozen library of modules, checking each module's shapes against the layer.
    pub fn attach_library(&mut self, modules: &[LoraModule], comp: Composition) -> Result<()> {
        if modules.is_empty() {
            return Err(Error::Arg(format!(
                "{}: a composition needs at least one module",
                self.name
            )));
        }
        let cast: Vec<(Vec<T>, Vec<T>, T)> = modules
            .iter()
            .map(|m| {
                (
                    m.a.iter().map(|&x| T::of(x as f64)).collect(),
                    m.b.iter().map(|&x| T::of(x as f64)).collect(),
                    T::of(m.scale as f64),
                )
            })
            .collect();
        let refs: Vec<(&[T], &[T], T)> = cast.iter().map(|(a, b, s)| (&a[..], &b[..], *s)).collect();
        let stack = ModuleStack::from_modules(self.d_in, self.d_out, &refs)
            .map_err(|e| Error::Mismatch(format!("{} (d_in {}, d_out {}): {e}", self.name, self.d_in, self.d_out)))?;
        stack
            .check_mode(comp.mode)
            .map_err(|e| Error::Mismatch(format!("{}: {e}", self.name)))?;
        let n = modules.len();
        // Softmax of equal values and raw 1/N both start at the uniform composition.
        let init = if comp.param == Param::Raw { 1.0 / n as f64 } else { 0.0 };
        self.modules = stack;
        self.adapter = Adapter::Compose {
            v: if comp.global { Vec::new() } else { vec![T::of(init); n] },
        };
        Ok(())
    }

    pub fn detach(&mut self) {
        self.modules = empty_stack(self.d_in, self.d_out);
        self.adapter = Adapter::None;
    }

    /// The coefficient row (1, N) this layer's modules get.
    pub fn coefficients(&self, comp: Option<Composition>, global_v: &[T]) -> Vec<T> {
        match &self.adapter {
            Adapter::None => Vec::new(),
            Adapter::Lora => vec![T::one()],
            Adapter::Compose { v } => {
                let comp = comp.expect("a composed layer needs the model's composition settings");
                let row = if comp.global { global_v } else { v };
                let row: Vec<f64> = row.iter().map(|&x| x.into()).collect();
                coefficients(comp.param, &row, self.modules.n())
                    .into_iter()
                    .map(T::of)
                    .collect()
            }
        }
    }

    pub(crate) fn args(&self, comp: Option<Composition>) -> LinArgs<'_, T> {
        LinArgs {
            w: &self.w,
            bias: Some(&self.b),
            modules: &self.modules,
            mode: match (&self.adapter, comp) {
                (Adapter::Compose { .. }, Some(c)) => c.mode,
                _ => Mode::Product,
            },
        }
    }

    /// Y (T, d_out) for X (T, d_in) with coefficients `c` (1, N).
    pub fn forward(&self, comp: Option<Composition>, x: &[T], c: &[T], rows: Rows) -> Result<(Vec<T>, T::LinCache)> {
        T::linear_forward(self.args(comp), x, c, rows)
    }

    /// Whether any of this layer's parameters train under `trainable` (`base` says whether W, b
    /// count as base weights or as the head).
    pub fn trains(&self, trainable: Trainable, comp: Option<Composition>, head: bool) -> bool {
        let own = if head { trainable.head } else { trainable.base };
        own || match &self.adapter {
            Adapter::None => false,
            Adapter::Lora => trainable.lora,
            Adapter::Compose { .. } => trainable.coeffs && comp.is_some_and(|c| c.param != Param::Uniform),
        }
    }

    /// Backward given `G = ∂L/∂Y`: adds this layer's trainable gradients into `grads` (by
    /// parameter name) and returns ∂X when `want_dx` (else empty). Global composition values
    /// add into `compose.global_logits`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        comp: Option<Composition>,
        global_v: &[T],
        x: &[T],
        cache: &T::LinCache,
        c: &[T],
        rows: Rows,
        g: &[T],
        trainable: Trainable,
        head: bool,
        want_dx: bool,
        grads: &mut Grads<T>,
    ) -> Result<Vec<T>> {
        let coeffs = matches!(self.adapter, Adapter::Compose { .. })
            && trainable.coeffs
            && comp.is_some_and(|c| c.param != Param::Uniform);
        let train = Train {
            input: want_dx,
            coeffs,
            modules: matches!(self.adapter, Adapter::Lora) && trainable.lora,
            base: if head { trainable.head } else { trainable.base },
        };
        let gr = T::linear_backward(self.args(comp), x, cache, c, rows, g, train)?;
        if train.base {
            grads.add(&format!("{}.weight", self.name), gr.dw);
            grads.add(&format!("{}.bias", self.name), gr.dbias);
        }
        if train.modules {
            grads.add(&format!("{}.lora_A.weight", self.name), gr.da_cat);
            grads.add(&format!("{}.lora_B.weight", self.name), gr.db_cat);
        }
        if train.coeffs {
            let comp = comp.expect("checked above");
            let n = self.modules.n();
            let row: Vec<f64> = match (&self.adapter, comp.global) {
                (_, true) => global_v.iter().map(|&x| x.into()).collect(),
                (Adapter::Compose { v }, false) => v.iter().map(|&x| x.into()).collect(),
                _ => unreachable!("coefficients train only on composed layers"),
            };
            let dv: Vec<T> = coefficients_backward(comp.param, &row, &gr.dc, n)
                .into_iter()
                .map(T::of)
                .collect();
            let name = if comp.global {
                GLOBAL_LOGITS.to_string()
            } else {
                format!("{}.compose_logits", self.name)
            };
            grads.add(&name, dv);
        }
        Ok(gr.dx)
    }
}

/// The parameter name of a global composition's values.
pub const GLOBAL_LOGITS: &str = "compose.global_logits";
