//! AdamW over many tensors in one launch and deterministic global-norm gradient clipping
//! (`cuda/optim.cu` has the formulas, the flat-buffer + tensor-table layout and why, and the
//! variants). CPU references: [`adamw_reference`], [`clip_reference`] — the formulas of
//! [`crate::model::train::AdamW::step`] and [`crate::model::train::clip_grad_norm`] in f64.

use super::{check_lens, Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// The kernels, in the order of `cuda/optim.cu`'s list (one variant each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    AdamW,
    SqPartials,
    /// f32 only: it reads the f32 partials.
    NormFinish,
    ClipScale,
}

pub const ALL: &[Entry] = &[Entry::AdamW, Entry::SqPartials, Entry::NormFinish, Entry::ClipScale];

/// `optim::THREADS`.
pub const THREADS: u32 = 256;
/// At most this many blocks per tensor: enough to fill a GPU with a few large tensors, few
/// enough that the norm's partials stay a short, one-block sum.
pub const MAX_CHUNKS: usize = 64;

/// One tensor of the flat buffers: elements `offset .. offset + len`; `decay` selects the
/// weight decay (the CPU model decays 2-D base, head and LoRA matrices only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSpan {
    pub offset: usize,
    pub len: usize,
    pub decay: bool,
}

/// The tensor table on the device, checked on upload: every span non-empty, inside the flat
/// buffers of `total_len` elements, and disjoint from the others (blocks of different tensors
/// write concurrently).
pub struct TensorTable<B: Backend> {
    table: B::Buffer<i32>,
    spans: Vec<TensorSpan>,
    total_len: usize,
    max_len: usize,
}

impl<B: Backend> TensorTable<B> {
    pub fn upload(backend: &B, spans: &[TensorSpan], total_len: usize) -> Result<Self, KernelError> {
        let error = |message: String| KernelError::Argument {
            kernel: "optim",
            message,
        };
        if spans.is_empty() || spans.len() > super::MAX_GRID_YZ as usize {
            return Err(error(format!("{} tensors (1..=65535)", spans.len())));
        }
        if total_len > i32::MAX as usize {
            return Err(error(format!("{total_len} elements: too many for int32 offsets")));
        }
        let mut sorted = spans.to_vec();
        sorted.sort_by_key(|s| s.offset);
        for (i, s) in sorted.iter().enumerate() {
            if s.len == 0 || s.offset + s.len > total_len {
                return Err(error(format!("tensor {s:?} is empty or outside {total_len} elements")));
            }
            if let Some(next) = sorted.get(i + 1) {
                if s.offset + s.len > next.offset {
                    return Err(error(format!("tensors {s:?} and {next:?} overlap")));
                }
            }
        }
        let table: Vec<i32> = spans
            .iter()
            .flat_map(|s| [s.offset as i32, s.len as i32, s.decay as i32])
            .collect();
        Ok(TensorTable {
            table: backend.upload(&table)?,
            spans: spans.to_vec(),
            total_len,
            max_len: spans.iter().map(|s| s.len).max().unwrap_or(0),
        })
    }

    pub fn spans(&self) -> &[TensorSpan] {
        &self.spans
    }

    /// Blocks per tensor of the per-tensor kernels.
    pub fn chunks(&self) -> usize {
        self.max_len.div_ceil(THREADS as usize).clamp(1, MAX_CHUNKS)
    }

    /// Elements of the norm's partials workspace.
    pub fn partials_len(&self) -> usize {
        self.chunks() * self.spans.len()
    }
}

/// Grid (chunks, tensors) × 256 threads of the per-tensor kernels (AdamW, partials, scale).
pub fn launch_config(chunks: usize, tensors: usize) -> LaunchDims {
    assert!((1..=MAX_CHUNKS).contains(&chunks), "{chunks} chunks per tensor");
    let dims = LaunchDims {
        grid: [chunks as u32, u32::try_from(tensors).expect("tensors fit u32"), 1],
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(4 * THREADS);
    dims
}

/// The one block of `norm_finish`.
pub fn finish_launch_config() -> LaunchDims {
    let dims = LaunchDims {
        grid: [1, 1, 1],
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(4 * THREADS);
    dims
}

/// AdamW: ~12 FLOPs per element (sqrt and division counted once); params, m, v read and written,
/// grads read.
pub fn adamw_flops_bytes(elements: usize, grad_dtype: DType) -> (f64, f64) {
    let n = elements as f64;
    (12.0 * n, n * (6.0 * 4.0 + grad_dtype.size_bytes() as f64))
}

/// Clipping: the squares read the grads once, the scale reads and writes them once.
pub fn clip_flops_bytes(elements: usize, grad_dtype: DType) -> (f64, f64) {
    let n = elements as f64;
    (3.0 * n, 3.0 * n * grad_dtype.size_bytes() as f64)
}

/// The compiled kernel of `entry` for gradient storage `dtype` (`optim_<kernel>_<dtype>`);
/// `None` where there is none (f16 grads; `norm_finish` exists in f32 only).
pub fn kernel(entry: Entry, dtype: DType) -> Option<Kernel> {
    use super::entries::optim as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::AdamW, DType::F32) => kernel_entry!(e::lc_run_optim_adamw_f32),
        (Entry::AdamW, DType::BF16) => kernel_entry!(e::lc_run_optim_adamw_bf16),
        (Entry::SqPartials, DType::F32) => kernel_entry!(e::lc_run_optim_sq_partials_f32),
        (Entry::SqPartials, DType::BF16) => kernel_entry!(e::lc_run_optim_sq_partials_bf16),
        (Entry::ClipScale, DType::F32) => kernel_entry!(e::lc_run_optim_clip_scale_f32),
        (Entry::ClipScale, DType::BF16) => kernel_entry!(e::lc_run_optim_clip_scale_bf16),
        (Entry::NormFinish, DType::F32) => kernel_entry!(e::lc_run_optim_norm_finish_f32),
        _ => return None,
    };
    Some(Kernel {
        family: "optim",
        name,
        harness_entry,
        cooperative: false,
    })
}

fn kernel_for(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    kernel(entry, dtype).ok_or_else(|| KernelError::Argument {
        kernel: "optim",
        message: format!("no {entry:?} kernel for {dtype:?} gradients (f32 and bf16 only)"),
    })
}

/// Hyper-parameters of one AdamW step; `step` counts from 1 (the CPU model increments before use).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub step: u64,
}

impl AdamParams {
    /// The bias corrections `(1 − β1^t, 1 − β2^t)`, in f64 as the CPU model computes them.
    pub fn bias_corrections(&self) -> (f64, f64) {
        let t = self.step as i32;
        (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t))
    }
}

/// One AdamW step of every tensor in `table`, in place on `params`, `m`, `v` (flat f32 buffers
/// of the table's total length), reading `grads`.
pub fn adamw<G: Element, B: Backend>(
    backend: &B,
    hp: &AdamParams,
    table: &TensorTable<B>,
    params: &mut B::Buffer<f32>,
    grads: &B::Buffer<G>,
    m: &mut B::Buffer<f32>,
    v: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel_for(Entry::AdamW, G::DTYPE)?;
    if hp.step == 0 || hp.step > i32::MAX as u64 {
        return Err(KernelError::Argument {
            kernel: kernel.name,
            message: format!("step {} (AdamW counts steps from 1)", hp.step),
        });
    }
    let n = table.total_len;
    check_lens(
        kernel.name,
        &[
            ("params", backend.buffer_len(params), n),
            ("grads", backend.buffer_len(grads), n),
            ("m", backend.buffer_len(m), n),
            ("v", backend.buffer_len(v), n),
        ],
    )?;
    let (c1, c2) = hp.bias_corrections();
    let dims = launch_config(table.chunks(), table.spans.len());
    let args = [
        backend.arg_out(params),
        backend.arg_in(grads),
        backend.arg_out(m),
        backend.arg_out(v),
        backend.arg_in(&table.table),
        KernelArg::F32(hp.lr as f32),
        KernelArg::F32(hp.beta1 as f32),
        KernelArg::F32(hp.beta2 as f32),
        KernelArg::F32((1.0 - hp.beta1) as f32),
        KernelArg::F32((1.0 - hp.beta2) as f32),
        KernelArg::F32(hp.eps as f32),
        KernelArg::F32(hp.weight_decay as f32),
        KernelArg::F32(c1 as f32),
        KernelArg::F32(c2 as f32),
    ];
    // SAFETY: the arguments follow `optim_adamw_*`'s parameters (params, grads, m, v, table, lr,
    // beta1, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, c1, c2); the table was checked on upload (disjoint spans
    // inside total_len, one row per grid y) and every flat buffer holds total_len elements; the
    // three written buffers are distinct, mutably borrowed.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// The global L2 norm of the grads in `table`, and, with `max_norm`, the grads scaled in place
/// so it is at most `max_norm` (the CPU model's `clip_grad_norm`). `partials`
/// ([`TensorTable::partials_len`] elements, may be unwritten memory) is a workspace;
/// `norm_scale` (2) receives `[norm, scale]`.
pub fn clip_grad_norm<G: Element, B: Backend>(
    backend: &B,
    table: &TensorTable<B>,
    grads: &mut B::Buffer<G>,
    max_norm: Option<f32>,
    partials: &mut B::Buffer<f32>,
    norm_scale: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let sq = kernel_for(Entry::SqPartials, G::DTYPE)?;
    check_lens(
        sq.name,
        &[
            ("grads", backend.buffer_len(grads), table.total_len),
            ("partials", backend.buffer_len(partials), table.partials_len()),
            ("norm_scale", backend.buffer_len(norm_scale), 2),
        ],
    )?;
    if max_norm.is_some_and(|m| m.is_nan() || m < 0.0) {
        return Err(KernelError::Argument {
            kernel: sq.name,
            message: format!("max_norm {max_norm:?} must be a non-negative number"),
        });
    }
    let dims = launch_config(table.chunks(), table.spans.len());
    let args = [
        backend.arg_in(grads),
        backend.arg_in(&table.table),
        backend.arg_out(partials),
    ];
    // SAFETY: `optim_sq_partials_*(grads, table, partials)`; the grid writes partials
    // [0, chunks·tensors), its checked length; spans checked on upload.
    unsafe { backend.launch(&sq, &dims, &args)? };
    let finish = kernel_for(Entry::NormFinish, DType::F32)?;
    let args = [
        backend.arg_in(partials),
        KernelArg::I32(table.partials_len() as i32),
        KernelArg::F32(max_norm.unwrap_or(f32::INFINITY)),
        backend.arg_out(norm_scale),
    ];
    // SAFETY: `optim_norm_finish_f32(partials, n_partials, max_norm, norm_scale)`: partials
    // holds n_partials elements, all written above; norm_scale holds 2.
    unsafe { backend.launch(&finish, &finish_launch_config(), &args)? };
    if max_norm.is_none() {
        return Ok(());
    }
    let scale = kernel_for(Entry::ClipScale, G::DTYPE)?;
    let args = [
        backend.arg_out(grads),
        backend.arg_in(&table.table),
        backend.arg_in(norm_scale),
    ];
    // SAFETY: `optim_clip_scale_*(grads, table, norm_scale)`: spans checked on upload and
    // disjoint, grads holds total_len elements; norm_scale[1] was written above.
    unsafe { backend.launch(&scale, &dims, &args) }
}

/// What [`adamw_reference`] returns: the updated flat buffers.
#[derive(Clone, Debug)]
pub struct AdamState {
    pub params: Vec<f64>,
    pub m: Vec<f64>,
    pub v: Vec<f64>,
}

/// One AdamW step in f64, the CPU model's loop line by line; elements outside every span keep
/// their values.
pub fn adamw_reference(
    hp: &AdamParams,
    spans: &[TensorSpan],
    params: &[f64],
    grads: &[f64],
    m: &[f64],
    v: &[f64],
) -> AdamState {
    let (b1, b2) = (hp.beta1, hp.beta2);
    let (c1, c2) = hp.bias_corrections();
    let mut out = AdamState {
        params: params.to_vec(),
        m: m.to_vec(),
        v: v.to_vec(),
    };
    for s in spans {
        let decay = if s.decay { hp.weight_decay } else { 0.0 };
        let r = s.offset..s.offset + s.len;
        let params = out.params[r.clone()].iter_mut();
        let moments = out.m[r.clone()].iter_mut().zip(out.v[r.clone()].iter_mut());
        for ((x, &g), (m, v)) in params.zip(&grads[r]).zip(moments) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *x -= hp.lr * decay * *x;
            *x -= hp.lr * (*m / c1) / ((*v / c2).sqrt() + hp.eps);
        }
    }
    out
}

/// Global-norm clipping in f64: the norm over every span, and the grads scaled by
/// `max_norm / norm` when the norm exceeds it (elements outside the spans untouched).
pub fn clip_reference(spans: &[TensorSpan], grads: &[f64], max_norm: Option<f64>) -> (f64, Vec<f64>) {
    let norm = spans
        .iter()
        .flat_map(|s| &grads[s.offset..s.offset + s.len])
        .map(|g| g * g)
        .sum::<f64>()
        .sqrt();
    let mut out = grads.to_vec();
    if let Some(max_norm) = max_norm {
        if norm > max_norm && norm > 0.0 {
            let s = max_norm / norm;
            for span in spans {
                out[span.offset..span.offset + span.len]
                    .iter_mut()
                    .for_each(|g| *g *= s);
            }
        }
    }
    (norm, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::CpuHarness;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        assert_eq!(kernel(Entry::AdamW, DType::BF16).unwrap().name, "optim_adamw_bf16");
        assert_eq!(
            kernel(Entry::NormFinish, DType::F32).unwrap().name,
            "optim_norm_finish_f32"
        );
        assert!(kernel(Entry::NormFinish, DType::BF16).is_none());
    }

    #[test]
    fn tensor_tables_refuse_overlap_empty_and_out_of_range_spans() {
        let h = CpuHarness::new(0);
        let span = |offset, len| TensorSpan {
            offset,
            len,
            decay: false,
        };
        assert!(TensorTable::upload(&h, &[span(0, 4), span(3, 2)], 10).is_err());
        assert!(TensorTable::upload(&h, &[span(0, 0)], 10).is_err());
        assert!(TensorTable::upload(&h, &[span(8, 3)], 10).is_err());
        assert!(TensorTable::upload(&h, &[], 10).is_err());
        let t = TensorTable::upload(&h, &[span(5, 600), span(0, 5)], 605).unwrap();
        assert_eq!((t.chunks(), t.partials_len()), (3, 6));
    }
}
