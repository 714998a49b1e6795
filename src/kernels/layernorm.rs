//! Layer normalisation over rows, forward (saving per-row mean and rstd) and backward (∂x and the
//! deterministic column sums ∂γ, ∂β): `cuda/layernorm.cu` has the formulas, the shapes, the
//! semantics and the variants. CPU references: [`reference_forward`], [`reference_backward`]
//! (the model's f32/f64 version is `crate::model::layers::layernorm_forward`).

use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims, MAX_GRID_YZ};

/// The kernel variants, in the order of `cuda/layernorm.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per row; ∂γ/∂β one thread per column.
    Naive,
    /// One warp per row, shuffle reductions; ∂γ/∂β by row-chunk partials in a workspace.
    Warp,
    /// One block per row, shuffles then shared memory; ∂γ/∂β as `Warp`.
    Block,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Warp, Variant::Block];

/// Threads per block of every kernel but `params_partial` (`THREADS` in `cuda/layernorm.cu`).
pub const THREADS: u32 = 256;
const WARP: u32 = 32;
/// Row-threads per column in `params_partial` (`PARAM_ROW_THREADS` in `cuda/layernorm.cu`).
pub const PARAM_ROW_THREADS: u32 = 8;
/// Rows per ∂γ/∂β partial sum. Fixed, not planned from the SM count, so the summation order (and
/// so the bits of ∂γ, ∂β) is the same on every device.
pub const PARAM_CHUNK_ROWS: usize = 64;

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Warp => "warp",
            Variant::Block => "block",
        }
    }

    /// Static shared memory of the row kernels: `block` reduces through `partial[WARPS]`.
    pub fn row_shared_bytes(self) -> u32 {
        match self {
            Variant::Block => 4 * (THREADS / WARP),
            Variant::Naive | Variant::Warp => 0,
        }
    }
}

/// `params_partial`'s shared memory: f32 `part_gamma` and `part_beta`, each `[8][33]`.
pub const PARAM_PARTIAL_SHARED_BYTES: u32 = 2 * 4 * PARAM_ROW_THREADS * (WARP + 1);

/// `x`, `y`, `∂y`, `∂x` are (rows, d); γ, β (d); mean, rstd (rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LnShape {
    pub rows: usize,
    pub d: usize,
}

/// One kernel of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Forward(Variant),
    Dx(Variant),
    ParamsNaive,
    ParamsPartial,
    ParamsSum,
}

/// One launch of the backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Dx,
    /// ∂γ, ∂β in one kernel (variant 1).
    ParamsNaive,
    /// Row-chunk partials of ∂γ, ∂β into the workspace: `chunks` of [`PARAM_CHUNK_ROWS`] rows.
    ParamsPartial {
        chunks: usize,
    },
    /// The partials of each column added in chunk order.
    ParamsSum {
        chunks: usize,
    },
}

fn grid_1d(units: usize, per_block: u32) -> [u32; 3] {
    let blocks = units.div_ceil(per_block as usize);
    [u32::try_from(blocks).expect("grid x fits u32"), 1, 1]
}

/// Grid of a row kernel (forward or ∂x) of `variant`.
fn row_dims(variant: Variant, shape: &LnShape) -> LaunchDims {
    assert!(shape.rows >= 1 && shape.d >= 1, "empty layer norm {shape:?}");
    let grid = match variant {
        Variant::Naive => grid_1d(shape.rows, THREADS),
        Variant::Warp => grid_1d(shape.rows, THREADS / WARP),
        Variant::Block => grid_1d(shape.rows, 1),
    };
    let dims = LaunchDims {
        grid,
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(variant.row_shared_bytes());
    dims
}

/// The forward's one launch. Pure; panics on an empty shape or one past the grid limits
/// ([`launch_forward`] checks those first and returns errors).
pub fn forward_config(variant: Variant, shape: &LnShape) -> LaunchDims {
    row_dims(variant, shape)
}

/// Row chunks of the ∂γ/∂β partials.
pub fn param_chunks(shape: &LnShape) -> usize {
    shape.rows.div_ceil(PARAM_CHUNK_ROWS)
}

/// f32 elements of the backward's workspace (`∂γ` then `∂β` partials, (chunks, d) each); 0 for
/// the naive variant, which needs none.
pub fn workspace_len(variant: Variant, shape: &LnShape) -> usize {
    match variant {
        Variant::Naive => 0,
        Variant::Warp | Variant::Block => 2 * param_chunks(shape) * shape.d,
    }
}

/// The backward's launches in stream order. Pure; panics like [`forward_config`].
pub fn backward_config(variant: Variant, shape: &LnShape) -> Vec<(Step, LaunchDims)> {
    let column_dims = LaunchDims {
        grid: grid_1d(shape.d, THREADS),
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    column_dims.assert_valid(0);
    let mut steps = vec![(Step::Dx, row_dims(variant, shape))];
    match variant {
        Variant::Naive => steps.push((Step::ParamsNaive, column_dims)),
        Variant::Warp | Variant::Block => {
            let chunks = param_chunks(shape);
            let partial = LaunchDims {
                grid: [
                    grid_1d(shape.d, WARP)[0],
                    u32::try_from(chunks).expect("chunks fit u32"),
                    1,
                ],
                block: [WARP, PARAM_ROW_THREADS, 1],
                dynamic_shared_bytes: 0,
            };
            partial.assert_valid(PARAM_PARTIAL_SHARED_BYTES);
            steps.push((Step::ParamsPartial { chunks }, partial));
            steps.push((Step::ParamsSum { chunks }, column_dims));
        }
    }
    steps
}

/// Useful FLOPs and the fewest bytes of the forward: x read once, γ and β once, y written once,
/// mean and rstd (f32) written once.
pub fn forward_flops_bytes(shape: &LnShape, dtype: DType) -> (f64, f64) {
    let (rows, d) = (shape.rows as f64, shape.d as f64);
    let size = dtype.size_bytes() as f64;
    (8.0 * rows * d, (2.0 * rows * d + 2.0 * d) * size + 8.0 * rows)
}

/// Useful FLOPs and the fewest bytes of the backward: ∂y and x read once, ∂x written once, γ read
/// and ∂γ, ∂β written once, mean and rstd read once.
pub fn backward_flops_bytes(shape: &LnShape, dtype: DType) -> (f64, f64) {
    let (rows, d) = (shape.rows as f64, shape.d as f64);
    let size = dtype.size_bytes() as f64;
    (16.0 * rows * d, (3.0 * rows * d + 3.0 * d) * size + 8.0 * rows)
}

/// The compiled kernel of `entry` for storage `dtype` (`layernorm_<kernel>_<dtype>`).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::layernorm as e;
    use Variant::{Block, Naive, Warp};
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::Forward(Naive), DType::F32) => kernel_entry!(e::lc_run_layernorm_fwd_naive_f32),
        (Entry::Forward(Naive), DType::BF16) => kernel_entry!(e::lc_run_layernorm_fwd_naive_bf16),
        (Entry::Forward(Warp), DType::F32) => kernel_entry!(e::lc_run_layernorm_fwd_warp_f32),
        (Entry::Forward(Warp), DType::BF16) => kernel_entry!(e::lc_run_layernorm_fwd_warp_bf16),
        (Entry::Forward(Block), DType::F32) => kernel_entry!(e::lc_run_layernorm_fwd_block_f32),
        (Entry::Forward(Block), DType::BF16) => kernel_entry!(e::lc_run_layernorm_fwd_block_bf16),
        (Entry::Dx(Naive), DType::F32) => kernel_entry!(e::lc_run_layernorm_dx_naive_f32),
        (Entry::Dx(Naive), DType::BF16) => kernel_entry!(e::lc_run_layernorm_dx_naive_bf16),
        (Entry::Dx(Warp), DType::F32) => kernel_entry!(e::lc_run_layernorm_dx_warp_f32),
        (Entry::Dx(Warp), DType::BF16) => kernel_entry!(e::lc_run_layernorm_dx_warp_bf16),
        (Entry::Dx(Block), DType::F32) => kernel_entry!(e::lc_run_layernorm_dx_block_f32),
        (Entry::Dx(Block), DType::BF16) => kernel_entry!(e::lc_run_layernorm_dx_block_bf16),
        (Entry::ParamsNaive, DType::F32) => kernel_entry!(e::lc_run_layernorm_params_naive_f32),
        (Entry::ParamsNaive, DType::BF16) => kernel_entry!(e::lc_run_layernorm_params_naive_bf16),
        (Entry::ParamsPartial, DType::F32) => kernel_entry!(e::lc_run_layernorm_params_partial_f32),
        (Entry::ParamsPartial, DType::BF16) => kernel_entry!(e::lc_run_layernorm_params_partial_bf16),
        (Entry::ParamsSum, DType::F32) => kernel_entry!(e::lc_run_layernorm_params_sum_f32),
        (Entry::ParamsSum, DType::BF16) => kernel_entry!(e::lc_run_layernorm_params_sum_bf16),
        (_, DType::F16) => {
            return Err(KernelError::Argument {
                kernel: "layernorm",
                message: "f16 storage is not built (f32 and bf16 are)".into(),
            })
        }
    };
    Ok(Kernel {
        family: "layernorm",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// Errors a caller can cause: an empty shape, one that does not fit the kernels' `int` indices or
/// the grid, or a buffer of the wrong length.
fn check_shape(kernel: &'static str, shape: &LnShape, lens: &[(&str, usize, usize)]) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument { kernel, message };
    let LnShape { rows, d } = *shape;
    if rows == 0 || d == 0 {
        return Err(error(format!("empty layer norm {rows}×{d}")));
    }
    if rows > i32::MAX as usize || d > i32::MAX as usize {
        return Err(error(format!("{rows}×{d}: dimensions must fit i32")));
    }
    if param_chunks(shape) > MAX_GRID_YZ as usize {
        return Err(error(format!("{rows} rows exceed the ∂γ/∂β grid limit")));
    }
    for &(what, len, want) in lens {
        super::check_len(kernel, what, len, want, false)?;
    }
    Ok(())
}

/// `y = LN(x)·γ + β` with `variant`, overwriting y (rows, d) and the saved mean and rstd (rows,
/// f32).
#[allow(clippy::too_many_arguments)]
pub fn launch_forward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &LnShape,
    eps: f32,
    x: &B::Buffer<T>,
    gamma: &B::Buffer<T>,
    beta: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
    mean: &mut B::Buffer<f32>,
    rstd: &mut B::Buffer<f32>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::Forward(variant), T::DTYPE)?;
    let (rows, d) = (shape.rows, shape.d);
    check_shape(
        kernel.name,
        shape,
        &[
            ("x", backend.buffer_len(x), rows * d),
            ("gamma", backend.buffer_len(gamma), d),
            ("beta", backend.buffer_len(beta), d),
            ("y", backend.buffer_len(y), rows * d),
            ("mean", backend.buffer_len(mean), rows),
            ("rstd", backend.buffer_len(rstd), rows),
        ],
    )?;
    if !(eps > 0.0 && eps.is_finite()) {
        return Err(KernelError::Argument {
            kernel: kernel.name,
            message: format!("eps {eps} must be positive and finite"),
        });
    }
    let dims = forward_config(variant, shape);
    let args = [
        backend.arg_in(x),
        backend.arg_in(gamma),
        backend.arg_in(beta),
        backend.arg_out(y),
        backend.arg_out(mean),
        backend.arg_out(rstd),
        KernelArg::I32(rows as i32),
        KernelArg::I32(d as i32),
        KernelArg::F32(eps),
    ];
    // SAFETY: the arguments follow LAYERNORM_FWD_ENTRY's parameter list (x, gamma, beta, y, mean,
    // rstd, rows, D, eps); check_shape verified each buffer holds exactly the elements the kernel
    // indexes for this shape, and y, mean, rstd are distinct, mutably borrowed buffers.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// The backward with `variant`, overwriting ∂x (rows, d), ∂γ and ∂β (d). `mean`, `rstd` are the
/// forward's; `work` holds [`workspace_len`] f32 elements (`None` when that is 0), need not be
/// initialised, and is left holding the partial sums.
#[allow(clippy::too_many_arguments)]
pub fn launch_backward<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &LnShape,
    dy: &B::Buffer<T>,
    x: &B::Buffer<T>,
    gamma: &B::Buffer<T>,
    mean: &B::Buffer<f32>,
    rstd: &B::Buffer<f32>,
    dx: &mut B::Buffer<T>,
    dgamma: &mut B::Buffer<T>,
    dbeta: &mut B::Buffer<T>,
    mut work: Option<&mut B::Buffer<f32>>,
) -> Result<(), KernelError> {
    let dx_kernel = kernel(Entry::Dx(variant), T::DTYPE)?;
    let (rows, d) = (shape.rows, shape.d);
    let work_len = work.as_ref().map_or(0, |w| backend.buffer_len(&**w));
    check_shape(
        dx_kernel.name,
        shape,
        &[
            ("dy", backend.buffer_len(dy), rows * d),
            ("x", backend.buffer_len(x), rows * d),
            ("gamma", backend.buffer_len(gamma), d),
            ("mean", backend.buffer_len(mean), rows),
            ("rstd", backend.buffer_len(rstd), rows),
            ("dx", backend.buffer_len(dx), rows * d),
            ("dgamma", backend.buffer_len(dgamma), d),
            ("dbeta", backend.buffer_len(dbeta), d),
            ("work", work_len, workspace_len(variant, shape)),
        ],
    )?;
    let (rows_arg, d_arg) = (KernelArg::I32(rows as i32), KernelArg::I32(d as i32));
    for (step, dims) in backward_config(variant, shape) {
        let (kernel, args) = match step {
            Step::Dx => (
                dx_kernel,
                vec![
                    backend.arg_in(dy),
                    backend.arg_in(x),
                    backend.arg_in(gamma),
                    backend.arg_in(mean),
                    backend.arg_in(rstd),
                    backend.arg_out(dx),
                    rows_arg,
                    d_arg,
                ],
            ),
            Step::ParamsNaive => (
                kernel(Entry::ParamsNaive, T::DTYPE)?,
                vec![
                    backend.arg_in(dy),
                    backend.arg_in(x),
                    backend.arg_in(mean),
                    backend.arg_in(rstd),
                    backend.arg_out(dgamma),
                    backend.arg_out(dbeta),
                    rows_arg,
                    d_arg,
                ],
            ),
            Step::ParamsPartial { .. } => (
                kernel(Entry::ParamsPartial, T::DTYPE)?,
                vec![
                    backend.arg_in(dy),
                    backend.arg_in(x),
                    backend.arg_in(mean),
                    backend.arg_in(rstd),
                    backend.arg_out(work.as_deref_mut().expect("checked: the workspace is not empty")),
                    rows_arg,
                    d_arg,
                    KernelArg::I32(PARAM_CHUNK_ROWS as i32),
                ],
            ),
            Step::ParamsSum { chunks } => (
                kernel(Entry::ParamsSum, T::DTYPE)?,
                vec![
                    backend.arg_in(work.as_deref().expect("checked: the workspace is not empty")),
                    backend.arg_out(dgamma),
                    backend.arg_out(dbeta),
                    d_arg,
                    KernelArg::I32(chunks as i32),
                ],
            ),
        };
        // SAFETY: each argument list follows its entry's parameter list in cuda/layernorm.cu
        // (LAYERNORM_DX_ENTRY; params_naive, params_partial, params_sum); check_shape verified
        // every buffer's length for this shape (the workspace: 2·chunks·d for the chunks this plan
        // launches), and the buffers written (dx, dgamma, dbeta, work) are distinct, mutably
        // borrowed and not read through another argument of the same launch.
        unsafe { backend.launch(&kernel, &dims, &args)? };
    }
    Ok(())
}

/// The forward reference, plain f64 loops, two-pass biased statistics as in the model. Returns
/// y (rows, d), mean (rows) and rstd (rows).
pub fn reference_forward(shape: &LnShape, x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> [Vec<f64>; 3] {
    let LnShape { rows, d } = *shape;
    assert!(x.len() == rows * d && gamma.len() == d && beta.len() == d);
    let mut y = vec![0.0; rows * d]; // (rows, d)
    let mut mean = vec![0.0; rows]; // (rows)
    let mut rstd = vec![0.0; rows]; // (rows)
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d]; // (d)
        let mu = row.iter().sum::<f64>() / d as f64;
        let var = row.iter().map(|&v| (v - mu) * (v - mu)).sum::<f64>() / d as f64;
        let rs = 1.0 / (var + eps).sqrt();
        for j in 0..d {
            y[r * d + j] = (row[j] - mu) * rs * gamma[j] + beta[j];
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
    [y, mean, rstd]
}

/// The backward reference given the saved statistics, plain f64 loops. Returns ∂x (rows, d), ∂γ
/// (d) and ∂β (d).
pub fn reference_backward(
    shape: &LnShape,
    dy: &[f64],
    x: &[f64],
    gamma: &[f64],
    mean: &[f64],
    rstd: &[f64],
) -> [Vec<f64>; 3] {
    let LnShape { rows, d } = *shape;
    assert!(dy.len() == rows * d && x.len() == rows * d && gamma.len() == d);
    assert!(mean.len() == rows && rstd.len() == rows);
    let mut dx = vec![0.0; rows * d]; // (rows, d)
    let mut dgamma = vec![0.0; d]; // (d)
    let mut dbeta = vec![0.0; d]; // (d)
    for r in 0..rows {
        let xhat = |j: usize| (x[r * d + j] - mean[r]) * rstd[r];
        let g = |j: usize| dy[r * d + j] * gamma[j]; // ∂x̂
        let mean_g = (0..d).map(g).sum::<f64>() / d as f64;
        let mean_gx = (0..d).map(|j| g(j) * xhat(j)).sum::<f64>() / d as f64;
        for j in 0..d {
            dx[r * d + j] = (g(j) - mean_g - xhat(j) * mean_gx) * rstd[r];
            dgamma[j] += dy[r * d + j] * xhat(j);
            dbeta[j] += dy[r * d + j];
        }
    }
    [dx, dgamma, dbeta]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        let k = kernel(Entry::Dx(Variant::Warp), DType::BF16).unwrap();
        assert_eq!(k.name, "layernorm_dx_warp_bf16");
        assert!(kernel(Entry::ParamsSum, DType::F16).is_err());
    }

    proptest! {
        // Every row and every column is covered by exactly the blocks the kernels expect.
        #[test]
        fn grids_cover_every_row_and_column(rows in 1usize..100_000, d in 1usize..5000) {
            let shape = LnShape { rows, d };
            for &variant in ALL {
                let fwd = forward_config(variant, &shape);
                let rows_per_block = match variant {
                    Variant::Naive => THREADS as usize,
                    Variant::Warp => (THREADS / WARP) as usize,
                    Variant::Block => 1,
                };
                let gx = fwd.grid[0] as usize;
                prop_assert!(gx * rows_per_block >= rows && (gx - 1) * rows_per_block < rows);
                for (step, dims) in backward_config(variant, &shape) {
                    match step {
                        Step::Dx => prop_assert_eq!(dims, fwd),
                        Step::ParamsNaive | Step::ParamsSum { .. } => {
                            prop_assert!(dims.grid[0] as usize * THREADS as usize >= d)
                        }
                        Step::ParamsPartial { chunks } => {
                            prop_assert_eq!(dims.grid[1] as usize, chunks);
                            prop_assert!(chunks * PARAM_CHUNK_ROWS >= rows && (chunks - 1) * PARAM_CHUNK_ROWS < rows);
                            prop_assert!(dims.grid[0] as usize * 32 >= d);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_block_has_256_threads() {
        // __launch_bounds__(256) in cuda/layernorm.cu
        let shape = LnShape { rows: 3, d: 5 };
        for &variant in ALL {
            assert_eq!(forward_config(variant, &shape).threads_per_block(), THREADS);
            for (_, dims) in backward_config(variant, &shape) {
                assert_eq!(dims.threads_per_block(), 256, "{variant:?}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "empty layer norm")]
    fn forward_config_rejects_an_empty_shape() {
        forward_config(Variant::Warp, &LnShape { rows: 0, d: 4 });
    }

    #[test]
    fn reference_normalises_each_row() {
        let shape = LnShape { rows: 2, d: 4 };
        let x = [1.0, 2.0, 3.0, 4.0, -1.0, -1.0, -1.0, -1.0];
        let [y, mean, rstd] = reference_forward(&shape, &x, &[1.0; 4], &[0.0; 4], 1e-5);
        assert_eq!(mean, [2.5, -1.0]);
        assert!((rstd[0] - 1.0 / (1.25f64 + 1e-5).sqrt()).abs() < 1e-12);
        assert!((y[..4].iter().sum::<f64>()).abs() < 1e-12 && y[4..].iter().all(|&v| v == 0.0));
    }
}
