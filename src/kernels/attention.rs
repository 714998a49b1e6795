//! Multi-head softmax attention with a key padding mask, forward (saving the row log-sum-exp)
//! and backward by recomputation: `cuda/attention.cu` has the formulas, the shapes, the
//! semantics (a sequence without a real key: ctx 0, lse −∞, gradients 0) and the variants. CPU
//! references: [`reference_forward`], [`reference_backward`] (the model's f32/f64 version is
//! `crate::model::layers::attention_forward`, which always uses `scale = 1/√dh`).

use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims, MAX_GRID_YZ};

/// The kernel variants, in the order of `cuda/attention.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One warp per row, online softmax over the keys one at a time, operands from global memory.
    Naive,
    /// 16-row tiles in shared memory, 8 threads per row, online softmax per key tile.
    Tiled,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Tiled];

/// Largest head dimension (`HEAD_DIM_MAX` in `cuda/attention.cu`).
pub const HEAD_DIM_MAX: usize = 128;
/// Threads per block of the naive kernels and of `bwd_dot`: 4 warps, one row each
/// (`NAIVE_THREADS`).
pub const NAIVE_THREADS: u32 = 128;
const WARP: u32 = 32;
/// Rows per block of the tiled kernels (`TILE`).
pub const TILE: usize = 16;
/// Threads per row of the tiled kernels (`ROW_THREADS`).
pub const ROW_THREADS: usize = 8;
const SCORE_LD: usize = TILE + 1;

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Tiled => "tiled",
        }
    }
}

/// Q, K, V, ctx and their gradients are (batch·seq, heads·head_dim) row-major; the mask
/// (batch·seq); lse (batch, heads, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl AttnShape {
    /// Rows of Q, K, V, ctx: batch·seq.
    pub fn rows(&self) -> usize {
        self.batch * self.seq
    }

    /// Width of Q, K, V, ctx: heads·head_dim.
    pub fn width(&self) -> usize {
        self.heads * self.head_dim
    }
}

/// Elements of lse: B·H·T.
pub fn lse_len(shape: &AttnShape) -> usize {
    shape.batch * shape.heads * shape.seq
}

/// f32 elements of the backward's workspace: `dot` = rowsum(∂ctx ∘ ctx), (B, H, T), for both
/// variants.
pub fn backward_workspace_len(variant: Variant, shape: &AttnShape) -> usize {
    match variant {
        Variant::Naive | Variant::Tiled => lse_len(shape),
    }
}

/// One kernel of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Forward(Variant),
    /// `dot` for the backward (shared by the variants).
    Dot,
    Dq(Variant),
    Dkv(Variant),
}

/// One launch of the backward, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Dot,
    Dq,
    Dkv,
}

/// Row stride (floats) of the tiled kernels' shared head rows: odd, so a warp's rows fall in
/// different banks (`dh | 1` in `cuda/attention.cu`).
fn shared_ld(head_dim: usize) -> usize {
    head_dim | 1
}

/// Dynamic shared memory of a tiled kernel (`fwd_tiled`, `dq_tiled`, `dkv_tiled`), from the
/// layouts commented there.
pub fn tiled_shared_bytes(entry: Entry, head_dim: usize) -> u32 {
    let ld = shared_ld(head_dim);
    let floats = match entry {
        Entry::Forward(_) => 3 * TILE * ld + TILE * SCORE_LD + TILE,
        Entry::Dq(_) => 4 * TILE * ld + TILE * SCORE_LD + TILE,
        Entry::Dkv(_) => 4 * TILE * ld + 2 * TILE * SCORE_LD + 2 * TILE,
        Entry::Dot => 0,
    };
    u32::try_from(4 * floats).expect("shared bytes fit u32")
}

fn to_u32(n: usize, what: &str) -> u32 {
    u32::try_from(n).unwrap_or_else(|_| panic!("{what} {n} does not fit u32"))
}

fn assert_shape(shape: &AttnShape) {
    let AttnShape {
        batch,
        seq,
        heads,
        head_dim,
    } = *shape;
    assert!(
        batch >= 1 && seq >= 1 && heads >= 1 && head_dim >= 1,
        "empty attention {shape:?}"
    );
    assert!(head_dim <= HEAD_DIM_MAX, "head_dim {head_dim} exceeds {HEAD_DIM_MAX}");
}

/// Grid and block of a per-row kernel (forward, ∂Q, ∂K/∂V) of `variant`: x over rows, y heads,
/// z batch.
fn row_dims(variant: Variant, entry: Entry, shape: &AttnShape) -> LaunchDims {
    assert_shape(shape);
    let rows_per_block = match variant {
        Variant::Naive => (NAIVE_THREADS / WARP) as usize,
        Variant::Tiled => TILE,
    };
    let dims = LaunchDims {
        grid: [
            to_u32(shape.seq.div_ceil(rows_per_block), "grid x"),
            to_u32(shape.heads, "heads"),
            to_u32(shape.batch, "batch"),
        ],
        block: [NAIVE_THREADS, 1, 1],
        dynamic_shared_bytes: match variant {
            Variant::Naive => 0,
            Variant::Tiled => tiled_shared_bytes(entry, shape.head_dim),
        },
    };
    dims.assert_valid(0);
    dims
}

/// The forward's one launch. Pure; panics on an empty shape, head_dim past [`HEAD_DIM_MAX`] or
/// a grid past the limits ([`forward`] checks those first and returns errors).
pub fn forward_config(variant: Variant, shape: &AttnShape) -> LaunchDims {
    row_dims(variant, Entry::Forward(variant), shape)
}

/// The backward's launches in stream order: `dot`, then ∂Q, then ∂K/∂V. Pure; panics like
/// [`forward_config`].
pub fn backward_config(variant: Variant, shape: &AttnShape) -> Vec<(Step, LaunchDims)> {
    assert_shape(shape);
    let dot = LaunchDims {
        grid: [
            to_u32(shape.rows().div_ceil((NAIVE_THREADS / WARP) as usize), "grid x"),
            to_u32(shape.heads, "heads"),
            1,
        ],
        block: [NAIVE_THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dot.assert_valid(0);
    vec![
        (Step::Dot, dot),
        (Step::Dq, row_dims(variant, Entry::Dq(variant), shape)),
        (Step::Dkv, row_dims(variant, Entry::Dkv(variant), shape)),
    ]
}

/// Useful FLOPs (every (query, key) pair counted, padding included) and the fewest bytes.
/// Forward: S = QKᵀ and PV, 4·B·H·T²·dh; Q, K, V read and ctx written once, lse (f32) written.
/// Backward: S recomputed, ∂P, ∂V, ∂Q, ∂K, 10·B·H·T²·dh; Q, K, V, ctx, ∂ctx read and ∂Q, ∂K, ∂V
/// written once, lse read, dot written and read.
pub fn flops_bytes(shape: &AttnShape, dtype: DType, backward: bool) -> (f64, f64) {
    let pairs = (shape.batch * shape.heads) as f64 * (shape.seq as f64).powi(2);
    let dh = shape.head_dim as f64;
    let matrix = (shape.rows() * shape.width()) as f64 * dtype.size_bytes() as f64;
    let stats = 4.0 * lse_len(shape) as f64;
    if backward {
        (10.0 * pairs * dh, 8.0 * matrix + 3.0 * stats)
    } else {
        (4.0 * pairs * dh, 4.0 * matrix + stats)
    }
}

/// The compiled kernel of `entry` for storage `dtype` (`attention_<kernel>_<dtype>`).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::attention as e;
    use Variant::{Naive, Tiled};
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::Forward(Naive), DType::F32) => kernel_entry!(e::lc_run_attention_fwd_naive_f32),
        (Entry::Forward(Naive), DType::BF16) => kernel_entry!(e::lc_run_attention_fwd_naive_bf16),
        (Entry::Forward(Tiled), DType::F32) => kernel_entry!(e::lc_run_attention_fwd_tiled_f32),
        (Entry::Forward(Tiled), DType::BF16) => kernel_entry!(e::lc_run_attention_fwd_tiled_bf16),
        (Entry::Dot, DType::F32) => kernel_entry!(e::lc_run_attention_bwd_dot_f32),
        (Entry::Dot, DType::BF16) => kernel_entry!(e::lc_run_attention_bwd_dot_bf16),
        (Entry::Dq(Naive), DType::F32) => kernel_entry!(e::lc_run_attention_dq_naive_f32),
        (Entry::Dq(Naive), DType::BF16) => kernel_entry!(e::lc_run_attention_dq_naive_bf16),
        (Entry::Dq(Tiled), DType::F32) => kernel_entry!(e::lc_run_attention_dq_tiled_f32),
        (Entry::Dq(Tiled), DType::BF16) => kernel_entry!(e::lc_run_attention_dq_tiled_bf16),
        (Entry::Dkv(Naive), DType::F32) => kernel_entry!(e::lc_run_attention_dkv_naive_f32),
        (Entry::Dkv(Naive), DType::BF16) => kernel_entry!(e::lc_run_attention_dkv_naive_bf16),
        (Entry::Dkv(Tiled), DType::F32) => kernel_entry!(e::lc_run_attention_dkv_tiled_f32),
        (Entry::Dkv(Tiled), DType::BF16) => kernel_entry!(e::lc_run_attention_dkv_tiled_bf16),
        (_, DType::F16) => {
            return Err(KernelError::Argument {
                kernel: "attention",
                message: "f16 storage is not built (f32 and bf16 are)".into(),
            })
        }
    };
    Ok(Kernel {
        family: "attention",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// Errors a caller can cause: an empty shape, head_dim past [`HEAD_DIM_MAX`], one that does not
/// fit the kernels' `int` arguments or the grid, a non-finite scale, or a buffer of the wrong
/// length (`lens`: exact; `at_least`: at least that long).
fn check_args(
    kernel: &'static str,
    shape: &AttnShape,
    scale: f32,
    lens: &[(&str, usize, usize)],
    at_least: &[(&str, usize, usize)],
) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument { kernel, message };
    let AttnShape {
        batch,
        seq,
        heads,
        head_dim,
    } = *shape;
    if batch == 0 || seq == 0 || heads == 0 || head_dim == 0 {
        return Err(error(format!("empty attention {shape:?}")));
    }
    if head_dim > HEAD_DIM_MAX {
        return Err(error(format!("head_dim {head_dim} exceeds {HEAD_DIM_MAX}")));
    }
    let elements = batch
        .checked_mul(seq)
        .and_then(|rows| rows.checked_mul(heads * head_dim));
    if elements.is_none_or(|n| n > i32::MAX as usize) || lse_len(shape) > i32::MAX as usize {
        return Err(error(format!("{shape:?}: sizes must fit i32")));
    }
    if batch > MAX_GRID_YZ as usize || heads > MAX_GRID_YZ as usize {
        return Err(error(format!(
            "{shape:?}: batch and heads must be at most {MAX_GRID_YZ} (grid z and y)"
        )));
    }
    if !scale.is_finite() {
        return Err(error(format!("scale {scale} must be finite")));
    }
    super::check_lens(kernel, lens)?;
    for &(what, len, want) in at_least {
        super::check_len(kernel, what, len, want, true)?;
    }
    Ok(())
}

/// ctx = softmax(Q Kᵀ · scale, padded keys excluded) V per head, with `variant`: overwrites ctx
/// (B·T, D) and lse (B, H, T; f32, −∞ for a sequence without a real key). `mask` (B·T): non-zero
/// for a real token.
#[allow(clippy::too_many_arguments)]
pub fn forward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &AttnShape,
    scale: f32,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    mask: &B::Buffer<i32>,
    ctx: &mut B::Buffer<T>,
    lse: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::Forward(variant), T::DTYPE)?;
    let n = shape.rows() * shape.width();
    check_args(
        kernel.name,
        shape,
        scale,
        &[
            ("q", backend.buffer_len(q), n),
            ("k", backend.buffer_len(k), n),
            ("v", backend.buffer_len(v), n),
            ("mask", backend.buffer_len(mask), shape.rows()),
            ("ctx", backend.buffer_len(ctx), n),
            ("lse", backend.buffer_len(lse), lse_len(shape)),
        ],
        &[],
    )?;
    let dims = forward_config(variant, shape);
    let args = [
        backend.arg_in(q),
        backend.arg_in(k),
        backend.arg_in(v),
        backend.arg_in(mask),
        backend.arg_out(ctx),
        backend.arg_out(lse),
        KernelArg::I32(shape.seq as i32),
        KernelArg::I32(shape.heads as i32),
        KernelArg::I32(shape.head_dim as i32),
        KernelArg::F32(scale),
    ];
    // SAFETY: the arguments follow ATTENTION_FWD_ENTRY's parameter list (q, k, v, mask, ctx, lse,
    // seq, heads, dh, scale); check_args verified each buffer holds exactly the elements the
    // kernel indexes for this shape (grid z = batch, y = heads), and ctx and lse are distinct,
    // mutably borrowed buffers. The dynamic shared memory is the tiled kernel's layout size.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// The backward with `variant`, overwriting ∂Q, ∂K, ∂V (B·T, D). `ctx` and `lse` are the
/// forward's; `work` holds at least [`backward_workspace_len`] f32 elements, need not be
/// initialised, and is left holding `dot` (B, H, T).
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &AttnShape,
    scale: f32,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    mask: &B::Buffer<i32>,
    ctx: &B::Buffer<T>,
    lse: &B::Buffer<f32>,
    dctx: &B::Buffer<T>,
    dq: &mut B::Buffer<T>,
    dk: &mut B::Buffer<T>,
    dv: &mut B::Buffer<T>,
    work: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let dq_kernel = kernel(Entry::Dq(variant), T::DTYPE)?;
    let n = shape.rows() * shape.width();
    check_args(
        dq_kernel.name,
        shape,
        scale,
        &[
            ("q", backend.buffer_len(q), n),
            ("k", backend.buffer_len(k), n),
            ("v", backend.buffer_len(v), n),
            ("mask", backend.buffer_len(mask), shape.rows()),
            ("ctx", backend.buffer_len(ctx), n),
            ("lse", backend.buffer_len(lse), lse_len(shape)),
            ("dctx", backend.buffer_len(dctx), n),
            ("dq", backend.buffer_len(dq), n),
            ("dk", backend.buffer_len(dk), n),
            ("dv", backend.buffer_len(dv), n),
        ],
        &[("work", backend.buffer_len(work), backward_workspace_len(variant, shape))],
    )?;
    let seq = KernelArg::I32(shape.seq as i32);
    let heads = KernelArg::I32(shape.heads as i32);
    let dh = KernelArg::I32(shape.head_dim as i32);
    let scale = KernelArg::F32(scale);
    for (step, dims) in backward_config(variant, shape) {
        let (kernel, args) = match step {
            Step::Dot => (
                kernel(Entry::Dot, T::DTYPE)?,
                vec![
                    backend.arg_in(dctx),
                    backend.arg_in(ctx),
                    backend.arg_out(work),
                    KernelArg::I32(shape.rows() as i32),
                    seq,
                    heads,
                    dh,
                ],
            ),
            Step::Dq => (
                dq_kernel,
                vec![
                    backend.arg_in(q),
                    backend.arg_in(k),
                    backend.arg_in(v),
                    backend.arg_in(mask),
                    backend.arg_in(lse),
                    backend.arg_in(work),
                    backend.arg_in(dctx),
                    backend.arg_out(dq),
                    seq,
                    heads,
                    dh,
                    scale,
                ],
            ),
            Step::Dkv => (
                kernel(Entry::Dkv(variant), T::DTYPE)?,
                vec![
                    backend.arg_in(q),
                    backend.arg_in(k),
                    backend.arg_in(v),
                    backend.arg_in(mask),
                    backend.arg_in(lse),
                    backend.arg_in(work),
                    backend.arg_in(dctx),
                    backend.arg_out(dk),
                    backend.arg_out(dv),
                    seq,
                    heads,
                    dh,
                    scale,
                ],
            ),
        };
        // SAFETY: each argument list follows its entry's parameter list in cuda/attention.cu
        // (attention_bwd_dot, ATTENTION_DQ_ENTRY, ATTENTION_DKV_ENTRY); check_args verified every
        // buffer's length for this shape (the workspace: at least B·H·T, of which the kernels
        // index exactly that), and the buffers written (work in its own launch, dq, dk, dv) are
        // distinct, mutably borrowed and not read through another argument of the same launch.
        unsafe { backend.launch(&kernel, &dims, &args)? };
    }
    Ok(())
}

/// Column range of head h.
fn head_cols(shape: &AttnShape, h: usize) -> std::ops::Range<usize> {
    h * shape.head_dim..(h + 1) * shape.head_dim
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The probabilities of one (b, h): P (T, T), rows over queries, exactly 0 at padded keys and
/// everywhere in a sequence without a real key; and lse (T).
fn reference_probs(
    shape: &AttnShape,
    scale: f64,
    q: &[f64],
    k: &[f64],
    mask: &[i32],
    b: usize,
    h: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (t, d) = (shape.seq, shape.width());
    let cols = head_cols(shape, h);
    let row = |x: &'_ [f64], i: usize| -> Vec<f64> { x[(b * t + i) * d..][cols.clone()].to_vec() };
    let real: Vec<bool> = (0..t).map(|j| mask[b * t + j] != 0).collect();
    let keys: Vec<Vec<f64>> = (0..t).map(|j| row(k, j)).collect();
    let mut p = vec![0.0; t * t]; // (T, T)
    let mut lse = vec![f64::NEG_INFINITY; t]; // (T)
    for i in 0..t {
        let qi = row(q, i);
        let s: Vec<f64> = (0..t).map(|j| dot(&qi, &keys[j]) * scale).collect(); // (T)
        let m = (0..t)
            .filter(|&j| real[j])
            .map(|j| s[j])
            .fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue; // no real key: P row 0, lse −∞
        }
        let z: f64 = (0..t).filter(|&j| real[j]).map(|j| (s[j] - m).exp()).sum();
        for j in (0..t).filter(|&j| real[j]) {
            p[i * t + j] = (s[j] - m).exp() / z;
        }
        lse[i] = m + z.ln();
    }
    (p, lse)
}

/// The forward reference, plain f64 loops. Returns ctx (B·T, D) and lse (B, H, T).
pub fn reference_forward(
    shape: &AttnShape,
    scale: f64,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &[i32],
) -> (Vec<f64>, Vec<f64>) {
    let (bsz, t, d) = (shape.batch, shape.seq, shape.width());
    let n = shape.rows() * d;
    assert!(q.len() == n && k.len() == n && v.len() == n && mask.len() == shape.rows());
    let mut ctx = vec![0.0; n]; // (B·T, D)
    let mut lse = vec![0.0; lse_len(shape)]; // (B, H, T)
    for b in 0..bsz {
        for h in 0..shape.heads {
            let (p, l) = reference_probs(shape, scale, q, k, mask, b, h);
            lse[(b * shape.heads + h) * t..][..t].copy_from_slice(&l);
            for i in 0..t {
                for c in head_cols(shape, h) {
                    ctx[(b * t + i) * d + c] = (0..t).map(|j| p[i * t + j] * v[(b * t + j) * d + c]).sum();
                }
            }
        }
    }
    (ctx, lse)
}

/// The backward reference, plain f64 loops, from the inputs (ctx and P recomputed exactly).
/// Returns ∂Q, ∂K, ∂V (B·T, D).
pub fn reference_backward(
    shape: &AttnShape,
    scale: f64,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: &[i32],
    dctx: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (bsz, t, d) = (shape.batch, shape.seq, shape.width());
    let n = shape.rows() * d;
    assert!(dctx.len() == n);
    let (ctx, _) = reference_forward(shape, scale, q, k, v, mask);
    let (mut dq, mut dk, mut dv) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]); // (B·T, D) each
    for b in 0..bsz {
        for h in 0..shape.heads {
            let cols = head_cols(shape, h);
            let row = |x: &'_ [f64], i: usize| -> Vec<f64> { x[(b * t + i) * d..][cols.clone()].to_vec() };
            let (p, _) = reference_probs(shape, scale, q, k, mask, b, h);
            for i in 0..t {
                let gi = row(dctx, i);
                let dot_i = dot(&gi, &row(&ctx, i));
                for j in 0..t {
                    let pij = p[i * t + j];
                    if pij == 0.0 {
                        continue; // padded key (or no real key): no gradient flows
                    }
                    let ds = pij * (dot(&gi, &row(v, j)) - dot_i); // ∂S_ij
                    for (ci, c) in cols.clone().enumerate() {
                        dq[(b * t + i) * d + c] += scale * ds * k[(b * t + j) * d + c];
                        dk[(b * t + j) * d + c] += scale * ds * q[(b * t + i) * d + c];
                        dv[(b * t + j) * d + c] += pij * gi[ci];
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        assert_eq!(
            kernel(Entry::Dkv(Variant::Tiled), DType::BF16).unwrap().name,
            "attention_dkv_tiled_bf16"
        );
        assert_eq!(kernel(Entry::Dot, DType::F32).unwrap().name, "attention_bwd_dot_f32");
        assert!(kernel(Entry::Forward(Variant::Naive), DType::F16).is_err());
    }

    #[test]
    fn grids_cover_every_row_head_and_sequence() {
        for (batch, seq, heads, head_dim) in [(1, 1, 1, 1), (3, 17, 2, 33), (2, 512, 12, 128), (5, 16, 1, 20)] {
            let shape = AttnShape {
                batch,
                seq,
                heads,
                head_dim,
            };
            for &variant in ALL {
                let rows = match variant {
                    Variant::Naive => 4,
                    Variant::Tiled => TILE,
                };
                let fwd = forward_config(variant, &shape);
                let gx = fwd.grid[0] as usize;
                assert!(gx * rows >= seq && (gx - 1) * rows < seq);
                assert_eq!((fwd.grid[1], fwd.grid[2]), (heads as u32, batch as u32));
                for (step, dims) in backward_config(variant, &shape) {
                    assert_eq!(dims.threads_per_block(), 128, "__launch_bounds__(128)");
                    match step {
                        Step::Dot => assert!(dims.grid[0] as usize * 4 >= batch * seq),
                        Step::Dq | Step::Dkv => assert_eq!(dims.grid, fwd.grid),
                    }
                }
            }
        }
    }

    #[test]
    fn tiled_shared_memory_fits_48_kib_at_the_largest_head() {
        // dh = 128: ld 129; ∂K/∂V holds K, V, Q, ∂ctx tiles, two score tiles, lse and dot.
        assert_eq!(tiled_shared_bytes(Entry::Dkv(Variant::Tiled), 128), 35_328);
        let shape = AttnShape {
            batch: 1,
            seq: 3,
            heads: 1,
            head_dim: 128,
        };
        for (_, dims) in backward_config(Variant::Tiled, &shape) {
            assert!(dims.dynamic_shared_bytes <= 48 * 1024);
        }
    }

    #[test]
    #[should_panic(expected = "head_dim 129 exceeds 128")]
    fn configs_refuse_a_head_past_the_maximum() {
        forward_config(
            Variant::Naive,
            &AttnShape {
                batch: 1,
                seq: 1,
                heads: 1,
                head_dim: 129,
            },
        );
    }

    #[test]
    fn reference_of_one_real_key_copies_its_value() {
        // Keys 0 and 2 padded: every query row (padded or not) attends to key 1 only.
        let shape = AttnShape {
            batch: 1,
            seq: 3,
            heads: 1,
            head_dim: 2,
        };
        let q = [1.0, 2.0, -1.0, 0.5, 3.0, 3.0];
        let k = [9.0, 9.0, 0.1, 0.2, -9.0, 4.0];
        let v = [5.0, 6.0, 7.0, 8.0, 1.0, 2.0];
        let (ctx, lse) = reference_forward(&shape, 0.7, &q, &k, &v, &[0, 1, 0]);
        assert_eq!(ctx, [7.0, 8.0, 7.0, 8.0, 7.0, 8.0]);
        for i in 0..3 {
            let s = (q[2 * i] * 0.1 + q[2 * i + 1] * 0.2) * 0.7;
            assert!((lse[i] - s).abs() < 1e-15);
        }
        let (_, lse) = reference_forward(&shape, 0.7, &q, &k, &v, &[0, 0, 0]);
        assert!(lse.iter().all(|&l| l == f64::NEG_INFINITY));
    }
}
