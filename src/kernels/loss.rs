//! Pooling (CLS token, masked mean) forward and backward, and softmax cross-entropy with its
//! gradient and a deterministic batch mean (`cuda/loss.cu` has the formulas, the shapes, the
//! semantics and the variants). CPU references: [`pool_reference`], [`pool_backward_reference`],
//! [`cross_entropy_reference`] — plain f64 statements of what the CPU model computes
//! (src/model/pass.rs pooling, [`crate::model::train::cross_entropy`]).

use super::{check_lens, Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// Pooling variants, in the order of `cuda/loss.cu`'s list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolVariant {
    /// One thread per (sample, hidden column), looping over the tokens.
    Column,
}

pub const POOL_ALL: &[PoolVariant] = &[PoolVariant::Column];

/// Cross-entropy variants, in the order of `cuda/loss.cu`'s list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XentVariant {
    /// One thread per row: the baseline.
    Row,
    /// One warp per row, shuffle reductions.
    Warp,
}

pub const XENT_ALL: &[XentVariant] = &[XentVariant::Row, XentVariant::Warp];

/// How the last hidden states become one vector per sample (`Pool` in src/model).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// The first token's state.
    Cls,
    /// The mean over real (mask ≠ 0) tokens; 0 for a row without any.
    Mean,
}

impl PoolMode {
    /// `POOL_CLS` / `POOL_MEAN` in `cuda/loss.cu`.
    fn code(self) -> i32 {
        match self {
            PoolMode::Cls => 0,
            PoolMode::Mean => 1,
        }
    }
}

/// h is (batch, seq, hidden); pooled (batch, hidden); mask (batch, seq).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub batch: usize,
    pub seq: usize,
    pub hidden: usize,
    pub mode: PoolMode,
}

/// logits (batch, classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XentShape {
    pub batch: usize,
    pub classes: usize,
}

/// Threads per pooling block (`__launch_bounds__(256)`).
const POOL_BLOCK: u32 = 256;
/// Threads per block of the row-per-thread cross-entropy (`__launch_bounds__(128)`).
const XENT_ROW_BLOCK: u32 = 128;
/// Threads per block of the warp-per-row cross-entropy: 8 rows per block.
const XENT_WARP_BLOCK: u32 = 256;
/// `loss::MEAN_THREADS`: the one block of the batch mean.
pub const MEAN_THREADS: u32 = 256;

/// Grid and block of a pooling kernel (forward and backward alike). Pure; panics on an empty
/// shape or one past the grid limits ([`pool_forward`] checks those first and returns errors).
pub fn pool_launch_config(_variant: PoolVariant, shape: &PoolShape) -> LaunchDims {
    assert!(
        shape.batch >= 1 && shape.seq >= 1 && shape.hidden >= 1,
        "empty pooling shape {shape:?}"
    );
    let dims = LaunchDims {
        grid: [
            u32::try_from(shape.hidden.div_ceil(POOL_BLOCK as usize)).expect("grid x fits u32"),
            u32::try_from(shape.batch).expect("grid y fits u32"),
            1,
        ],
        block: [POOL_BLOCK, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// Grid and block of a cross-entropy row kernel. Pure; panics on an empty shape.
pub fn xent_launch_config(variant: XentVariant, shape: &XentShape) -> LaunchDims {
    assert!(shape.batch >= 1 && shape.classes >= 1, "empty logits {shape:?}");
    let (rows_per_block, block) = match variant {
        XentVariant::Row => (XENT_ROW_BLOCK, XENT_ROW_BLOCK),
        XentVariant::Warp => (XENT_WARP_BLOCK / 32, XENT_WARP_BLOCK),
    };
    let dims = LaunchDims {
        grid: [
            u32::try_from(shape.batch.div_ceil(rows_per_block as usize)).expect("grid x fits u32"),
            1,
            1,
        ],
        block: [block, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// The batch mean: one block.
pub fn mean_launch_config() -> LaunchDims {
    let dims = LaunchDims {
        grid: [1, 1, 1],
        block: [MEAN_THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(4 * MEAN_THREADS);
    dims
}

/// Useful FLOPs and fewest bytes of one pooling pass (forward; the backward moves the same).
pub fn pool_flops_bytes(shape: &PoolShape, dtype: DType) -> (f64, f64) {
    let (b, t, d) = (shape.batch as f64, shape.seq as f64, shape.hidden as f64);
    let e = dtype.size_bytes() as f64;
    match shape.mode {
        PoolMode::Cls => (0.0, 2.0 * b * d * e),
        PoolMode::Mean => (b * t * d, (b * t * d + b * d) * e + 4.0 * b * t),
    }
}

/// Cross-entropy: ~5 FLOPs per logit (max, exp, sum, scale, subtract; exp counted once); the
/// logits read, the gradient written, labels and row losses.
pub fn xent_flops_bytes(shape: &XentShape, dtype: DType) -> (f64, f64) {
    let (b, l) = (shape.batch as f64, shape.classes as f64);
    (5.0 * b * l, 2.0 * b * l * dtype.size_bytes() as f64 + 8.0 * b)
}

/// Kernels of the family, by what they compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    PoolForward(PoolVariant),
    PoolBackward(PoolVariant),
    Xent(XentVariant),
    /// f32 only: the row losses are f32 whatever the storage.
    Mean,
}

/// The compiled kernel of `entry` for storage `dtype` (`loss_<kernel>_<dtype>`); `None` where
/// the family has no such entry (the mean exists in f32 only; storage is f32 or bf16).
pub fn kernel(entry: Entry, dtype: DType) -> Option<Kernel> {
    use super::entries::loss as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::PoolForward(PoolVariant::Column), DType::F32) => kernel_entry!(e::lc_run_loss_pool_fwd_f32),
        (Entry::PoolForward(PoolVariant::Column), DType::BF16) => kernel_entry!(e::lc_run_loss_pool_fwd_bf16),
        (Entry::PoolBackward(PoolVariant::Column), DType::F32) => kernel_entry!(e::lc_run_loss_pool_bwd_f32),
        (Entry::PoolBackward(PoolVariant::Column), DType::BF16) => kernel_entry!(e::lc_run_loss_pool_bwd_bf16),
        (Entry::Xent(XentVariant::Row), DType::F32) => kernel_entry!(e::lc_run_loss_xent_row_f32),
        (Entry::Xent(XentVariant::Row), DType::BF16) => kernel_entry!(e::lc_run_loss_xent_row_bf16),
        (Entry::Xent(XentVariant::Warp), DType::F32) => kernel_entry!(e::lc_run_loss_xent_warp_f32),
        (Entry::Xent(XentVariant::Warp), DType::BF16) => kernel_entry!(e::lc_run_loss_xent_warp_bf16),
        (Entry::Mean, DType::F32) => kernel_entry!(e::lc_run_loss_xent_mean_f32),
        _ => return None,
    };
    Some(Kernel {
        family: "loss",
        name,
        harness_entry,
        cooperative: false,
    })
}

fn kernel_for(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    kernel(entry, dtype).ok_or_else(|| KernelError::Argument {
        kernel: "loss",
        message: format!("no {entry:?} kernel for {dtype:?} storage (f32 and bf16 only)"),
    })
}

fn argument(kernel: &Kernel, message: String) -> KernelError {
    KernelError::Argument {
        kernel: kernel.name,
        message,
    }
}

fn check_pool_shape(kernel: &Kernel, shape: &PoolShape) -> Result<(), KernelError> {
    let PoolShape { batch, seq, hidden, .. } = *shape;
    if batch == 0 || seq == 0 || hidden == 0 {
        return Err(argument(kernel, format!("empty shape {shape:?}")));
    }
    if batch
        .checked_mul(seq)
        .and_then(|n| n.checked_mul(hidden))
        .is_none_or(|n| n > i32::MAX as usize)
    {
        return Err(argument(kernel, format!("{shape:?}: too large for int32 indexing")));
    }
    if batch > super::MAX_GRID_YZ as usize {
        return Err(argument(kernel, format!("batch {batch} exceeds the grid limit")));
    }
    Ok(())
}

/// `pooled = pool(h)` (overwritten). `mask` is (batch, seq), non-zero for real tokens; the CLS
/// mode does not read it but still takes it, so both modes have one signature.
pub fn pool_forward<T: Element, B: Backend>(
    backend: &B,
    variant: PoolVariant,
    shape: &PoolShape,
    h: &B::Buffer<T>,
    mask: &B::Buffer<i32>,
    pooled: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel_for(Entry::PoolForward(variant), T::DTYPE)?;
    check_pool_shape(&kernel, shape)?;
    let PoolShape { batch, seq, hidden, .. } = *shape;
    check_lens(
        kernel.name,
        &[
            ("h", backend.buffer_len(h), batch * seq * hidden),
            ("mask", backend.buffer_len(mask), batch * seq),
            ("pooled", backend.buffer_len(pooled), batch * hidden),
        ],
    )?;
    let dims = pool_launch_config(variant, shape);
    let args = [
        backend.arg_in(h),
        backend.arg_in(mask),
        backend.arg_out(pooled),
        KernelArg::I32(batch as i32),
        KernelArg::I32(seq as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(shape.mode.code()),
    ];
    // SAFETY: the arguments follow `loss_pool_fwd_*`'s parameters (h, mask, pooled, B, Tn, D,
    // mode); the lengths were checked against the shape, which fits int32, and pooled is a
    // distinct, mutably borrowed buffer.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// `dh = ∂pooled/∂h · dpooled` (overwritten everywhere, zeros where nothing flows).
pub fn pool_backward<T: Element, B: Backend>(
    backend: &B,
    variant: PoolVariant,
    shape: &PoolShape,
    dpooled: &B::Buffer<T>,
    mask: &B::Buffer<i32>,
    dh: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel_for(Entry::PoolBackward(variant), T::DTYPE)?;
    check_pool_shape(&kernel, shape)?;
    let PoolShape { batch, seq, hidden, .. } = *shape;
    check_lens(
        kernel.name,
        &[
            ("dpooled", backend.buffer_len(dpooled), batch * hidden),
            ("mask", backend.buffer_len(mask), batch * seq),
            ("dh", backend.buffer_len(dh), batch * seq * hidden),
        ],
    )?;
    let dims = pool_launch_config(variant, shape);
    let args = [
        backend.arg_in(dpooled),
        backend.arg_in(mask),
        backend.arg_out(dh),
        KernelArg::I32(batch as i32),
        KernelArg::I32(seq as i32),
        KernelArg::I32(hidden as i32),
        KernelArg::I32(shape.mode.code()),
    ];
    // SAFETY: the arguments follow `loss_pool_bwd_*`'s parameters (dpooled, mask, dh, B, Tn, D,
    // mode); lengths checked against the shape, which fits int32; dh is distinct and mutable.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// Class labels on the device (int32), each checked to be below `classes` on upload: the
/// kernels index the logits with them.
pub struct Labels<B: Backend> {
    labels: B::Buffer<i32>,
    classes: usize,
    len: usize,
}

impl<B: Backend> Labels<B> {
    pub fn upload(backend: &B, labels: &[usize], classes: usize) -> Result<Self, KernelError> {
        if let Some((i, &y)) = labels.iter().enumerate().find(|(_, &y)| y >= classes) {
            return Err(KernelError::Argument {
                kernel: "loss",
                message: format!("label {y} of example {i} is not below {classes}"),
            });
        }
        let table: Vec<i32> = labels
            .iter()
            .map(|&y| i32::try_from(y).expect("label below classes fits int32"))
            .collect();
        Ok(Labels {
            labels: backend.upload(&table)?,
            classes,
            len: labels.len(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Softmax cross-entropy of `logits` against `labels`: `dlogits` (batch, classes) and the
/// per-row losses `row_loss` (batch, f32 workspace; may come from `Backend::alloc`) are
/// overwritten, then `mean_loss[0] = Σ row_loss / batch` by one block (deterministic).
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<T: Element, B: Backend>(
    backend: &B,
    variant: XentVariant,
    shape: &XentShape,
    logits: &B::Buffer<T>,
    labels: &Labels<B>,
    dlogits: &mut B::Buffer<T>,
    row_loss: &mut B::Buffer<f32>,
    mean_loss: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel_for(Entry::Xent(variant), T::DTYPE)?;
    let XentShape { batch, classes } = *shape;
    if batch == 0 || classes == 0 {
        return Err(argument(&kernel, format!("empty logits {shape:?}")));
    }
    if batch.checked_mul(classes).is_none_or(|n| n > i32::MAX as usize) {
        return Err(argument(&kernel, format!("{shape:?}: too large for int32 indexing")));
    }
    if labels.classes != classes {
        return Err(argument(
            &kernel,
            format!(
                "labels were checked against {} classes, the logits have {classes}",
                labels.classes
            ),
        ));
    }
    check_lens(
        kernel.name,
        &[
            ("logits", backend.buffer_len(logits), batch * classes),
            ("labels", labels.len, batch),
            ("dlogits", backend.buffer_len(dlogits), batch * classes),
            ("row_loss", backend.buffer_len(row_loss), batch),
            ("mean_loss", backend.buffer_len(mean_loss), 1),
        ],
    )?;
    let dims = xent_launch_config(variant, shape);
    let args = [
        backend.arg_in(logits),
        backend.arg_in(&labels.labels),
        backend.arg_out(dlogits),
        backend.arg_out(row_loss),
        KernelArg::I32(batch as i32),
        KernelArg::I32(classes as i32),
    ];
    // SAFETY: the arguments follow `loss_xent_*`'s parameters (logits, labels, dlogits,
    // row_loss, B, L); lengths checked against the shape, labels checked below `classes` on
    // upload (so x[y] is in the row); the outputs are distinct, mutably borrowed buffers.
    unsafe { backend.launch(&kernel, &dims, &args)? };
    let mean = kernel_for(Entry::Mean, DType::F32)?;
    let args = [
        backend.arg_in(row_loss),
        backend.arg_out(mean_loss),
        KernelArg::I32(batch as i32),
    ];
    // SAFETY: `loss_xent_mean_f32(row_loss, mean_loss, B)`: row_loss holds `batch` elements,
    // all written by the launch above; mean_loss holds one.
    unsafe { backend.launch(&mean, &mean_launch_config(), &args) }
}

/// Inputs are anything that widens to f64 (the stored f32/bf16 values, or f64 for finite
/// differences).
///
/// Pooling reference, f64: pooled (batch, hidden) from h (batch, seq, hidden).
pub fn pool_reference<V: Copy + Into<f64>>(shape: &PoolShape, h: &[V], mask: &[i32]) -> Vec<f64> {
    let PoolShape {
        batch,
        seq,
        hidden,
        mode,
    } = *shape;
    let mut out = vec![0.0; batch * hidden]; // (B, D)
    for b in 0..batch {
        let n = mask[b * seq..(b + 1) * seq].iter().filter(|&&m| m != 0).count();
        for d in 0..hidden {
            let at = |t: usize| h[(b * seq + t) * hidden + d].into();
            out[b * hidden + d] = match mode {
                PoolMode::Cls => at(0),
                PoolMode::Mean if n == 0 => 0.0,
                PoolMode::Mean => (0..seq).filter(|&t| mask[b * seq + t] != 0).map(at).sum::<f64>() / n as f64,
            };
        }
    }
    out
}

/// Pooling backward reference, f64: dh (batch, seq, hidden) from dpooled (batch, hidden).
pub fn pool_backward_reference<V: Copy + Into<f64>>(shape: &PoolShape, dpooled: &[V], mask: &[i32]) -> Vec<f64> {
    let PoolShape {
        batch,
        seq,
        hidden,
        mode,
    } = *shape;
    let mut dh = vec![0.0; batch * seq * hidden]; // (B, T, D)
    for b in 0..batch {
        let n = mask[b * seq..(b + 1) * seq].iter().filter(|&&m| m != 0).count();
        for t in 0..seq {
            let share = match mode {
                PoolMode::Cls if t == 0 => 1.0,
                PoolMode::Mean if n > 0 && mask[b * seq + t] != 0 => 1.0 / n as f64,
                _ => 0.0,
            };
            for d in 0..hidden {
                dh[(b * seq + t) * hidden + d] = share * dpooled[b * hidden + d].into();
            }
        }
    }
    dh
}

/// What [`cross_entropy_reference`] returns.
#[derive(Clone, Debug)]
pub struct XentReference {
    /// (Σ row losses) / batch
    pub mean_loss: f64,
    /// (batch)
    pub row_loss: Vec<f64>,
    /// (batch, classes): (softmax − onehot) / batch
    pub dlogits: Vec<f64>,
}

/// Cross-entropy reference in f64, the CPU model's `cross_entropy` line by line.
pub fn cross_entropy_reference<V: Copy + Into<f64>>(
    shape: &XentShape,
    logits: &[V],
    labels: &[usize],
) -> XentReference {
    let XentShape { batch, classes } = *shape;
    let b = batch as f64;
    let mut row_loss = vec![0.0; batch];
    let mut dlogits = vec![0.0; batch * classes]; // (B, L)
    for r in 0..batch {
        let row: Vec<f64> = logits[r * classes..(r + 1) * classes]
            .iter()
            .map(|&x| x.into())
            .collect();
        let y = labels[r];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - m).exp()).sum();
        row_loss[r] = -(row[y] - m - z.ln());
        for (j, x) in row.iter().enumerate() {
            let p = (x - m).exp() / z;
            dlogits[r * classes + j] = (p - (j == y) as u8 as f64) / b;
        }
    }
    XentReference {
        mean_loss: row_loss.iter().sum::<f64>() / b,
        row_loss,
        dlogits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        let k = kernel(Entry::Xent(XentVariant::Warp), DType::BF16).unwrap();
        assert_eq!(k.name, "loss_xent_warp_bf16");
        assert_eq!(kernel(Entry::Mean, DType::F32).unwrap().name, "loss_xent_mean_f32");
        assert!(kernel(Entry::Mean, DType::BF16).is_none());
        assert!(kernel(Entry::Xent(XentVariant::Row), DType::F16).is_none());
    }

    #[test]
    fn grids_cover_every_row_and_column() {
        for batch in [1, 7, 8, 9, 100, 1000] {
            for &variant in XENT_ALL {
                let dims = xent_launch_config(variant, &XentShape { batch, classes: 3 });
                let rows_per_block = match variant {
                    XentVariant::Row => dims.block[0],
                    XentVariant::Warp => dims.block[0] / 32,
                } as usize;
                let blocks = dims.grid[0] as usize;
                assert!(blocks * rows_per_block >= batch && (blocks - 1) * rows_per_block < batch);
            }
            let shape = PoolShape {
                batch,
                seq: 3,
                hidden: 385,
                mode: PoolMode::Mean,
            };
            let dims = pool_launch_config(PoolVariant::Column, &shape);
            assert_eq!((dims.grid[0], dims.grid[1]), (2, batch as u32));
        }
    }

    #[test]
    #[should_panic(expected = "empty logits")]
    fn xent_launch_config_rejects_empty_logits() {
        xent_launch_config(XentVariant::Row, &XentShape { batch: 0, classes: 3 });
    }
}
