//! Element-wise ops: GELU (exact erf) fused with the bias add, forward and backward; the residual
//! add (overwriting and accumulating); the f32 → T cast; the deterministic bias gradient
//! `∂b = Σ_rows ∂y`.
//! `cuda/elementwise.cu` has the formulas, the shapes, the semantics and the variants. CPU
//! references: [`reference_gelu_bias_forward`], [`reference_gelu_bias_backward`],
//! [`reference_add`], [`reference_bias_grad`] (the model's versions are
//! `crate::model::layers::{gelu_forward, gelu_backward, add}`).

use super::check_len;
use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims, MAX_GRID_YZ};

/// Variants of the bias gradient, in the order of `cuda/elementwise.cu`'s numbered list (the maps
/// are one kernel each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per column.
    Naive,
    /// Row-chunk partials in a workspace, then one thread per column adding them in order.
    Chunked,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Chunked];

/// Threads per block of every kernel.
pub const THREADS: u32 = 256;
const WARP: u32 = 32;
/// Row-threads per column in `bias_grad_partial` (`ROW_THREADS` in `cuda/elementwise.cu`).
pub const ROW_THREADS: u32 = 8;
/// Rows per partial sum of the chunked bias gradient: fixed, so the summation order (and the
/// bits of ∂b) is the same on every device.
pub const CHUNK_ROWS: usize = 64;
/// `bias_grad_partial`'s shared memory: f32 `part[8][33]`.
pub const PARTIAL_SHARED_BYTES: u32 = 4 * ROW_THREADS * (WARP + 1);

/// (rows, d) activations with a per-column bias of length d.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowsShape {
    pub rows: usize,
    pub d: usize,
}

/// One kernel of the family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    GeluBiasForward,
    GeluBiasBackward,
    Add,
    AddAcc,
    BiasAdd,
    Cast,
    BiasGradNaive,
    BiasGradPartial,
    BiasGradSum,
}

/// One launch of the bias gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Naive,
    /// `chunks` partials of [`CHUNK_ROWS`] rows each into the workspace.
    Partial {
        chunks: usize,
    },
    Sum {
        chunks: usize,
    },
}

fn linear_dims(n: usize) -> LaunchDims {
    assert!(n >= 1, "empty element-wise op");
    let dims = LaunchDims {
        grid: [
            u32::try_from(n.div_ceil(THREADS as usize)).expect("grid x fits u32"),
            1,
            1,
        ],
        block: [THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// The launch of a map over `n` elements (GELU forward/backward over rows·d, add, add_acc).
/// Pure; panics on n = 0 or past the grid limit.
pub fn map_config(n: usize) -> LaunchDims {
    linear_dims(n)
}

/// Row chunks of the chunked bias gradient.
pub fn chunks(shape: &RowsShape) -> usize {
    shape.rows.div_ceil(CHUNK_ROWS)
}

/// f32 elements of the bias gradient's workspace ((chunks, d) partials); 0 for the naive variant.
pub fn workspace_len(variant: Variant, shape: &RowsShape) -> usize {
    match variant {
        Variant::Naive => 0,
        Variant::Chunked => chunks(shape) * shape.d,
    }
}

/// The bias gradient's launches in stream order. Pure; panics on an empty shape.
pub fn bias_grad_config(variant: Variant, shape: &RowsShape) -> Vec<(Step, LaunchDims)> {
    assert!(shape.rows >= 1 && shape.d >= 1, "empty bias gradient {shape:?}");
    let columns = linear_dims(shape.d);
    match variant {
        Variant::Naive => vec![(Step::Naive, columns)],
        Variant::Chunked => {
            let chunks = chunks(shape);
            let partial = LaunchDims {
                grid: [
                    u32::try_from(shape.d.div_ceil(WARP as usize)).expect("grid x fits u32"),
                    u32::try_from(chunks).expect("chunks fit u32"),
                    1,
                ],
                block: [WARP, ROW_THREADS, 1],
                dynamic_shared_bytes: 0,
            };
            partial.assert_valid(PARTIAL_SHARED_BYTES);
            vec![(Step::Partial { chunks }, partial), (Step::Sum { chunks }, columns)]
        }
    }
}

/// Useful FLOPs and fewest bytes of one kernel over (rows, d) (`rows = 1, d = n` for the adds):
/// every input read once, every output written once (and read once when accumulated). GELU's erf
/// and exp are counted as 10 FLOPs each, a rough figure.
pub fn flops_bytes(entry: Entry, shape: &RowsShape, dtype: DType) -> (f64, f64) {
    let (n, d) = ((shape.rows * shape.d) as f64, shape.d as f64);
    let size = dtype.size_bytes() as f64;
    match entry {
        Entry::GeluBiasForward => (15.0 * n, (2.0 * n + d) * size),
        Entry::GeluBiasBackward => (30.0 * n, (3.0 * n + d) * size),
        Entry::Add | Entry::AddAcc => (n, 3.0 * n * size),
        Entry::BiasAdd => (n, (2.0 * n + d) * size),
        Entry::Cast => (0.0, n * (4.0 + size)),
        Entry::BiasGradNaive | Entry::BiasGradPartial | Entry::BiasGradSum => (n, (n + d) * size),
    }
}

/// The compiled kernel of `entry` for storage `dtype` (`elementwise_<kernel>_<dtype>`).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::elementwise as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::GeluBiasForward, DType::F32) => kernel_entry!(e::lc_run_elementwise_gelu_bias_fwd_f32),
        (Entry::GeluBiasForward, DType::BF16) => kernel_entry!(e::lc_run_elementwise_gelu_bias_fwd_bf16),
        (Entry::GeluBiasBackward, DType::F32) => kernel_entry!(e::lc_run_elementwise_gelu_bias_bwd_f32),
        (Entry::GeluBiasBackward, DType::BF16) => kernel_entry!(e::lc_run_elementwise_gelu_bias_bwd_bf16),
        (Entry::Add, DType::F32) => kernel_entry!(e::lc_run_elementwise_add_f32),
        (Entry::Add, DType::BF16) => kernel_entry!(e::lc_run_elementwise_add_bf16),
        (Entry::AddAcc, DType::F32) => kernel_entry!(e::lc_run_elementwise_add_acc_f32),
        (Entry::AddAcc, DType::BF16) => kernel_entry!(e::lc_run_elementwise_add_acc_bf16),
        (Entry::BiasAdd, DType::F32) => kernel_entry!(e::lc_run_elementwise_bias_add_f32),
        (Entry::BiasAdd, DType::BF16) => kernel_entry!(e::lc_run_elementwise_bias_add_bf16),
        (Entry::Cast, DType::F32) => kernel_entry!(e::lc_run_elementwise_cast_f32),
        (Entry::Cast, DType::BF16) => kernel_entry!(e::lc_run_elementwise_cast_bf16),
        (Entry::BiasGradNaive, DType::F32) => kernel_entry!(e::lc_run_elementwise_bias_grad_naive_f32),
        (Entry::BiasGradNaive, DType::BF16) => kernel_entry!(e::lc_run_elementwise_bias_grad_naive_bf16),
        (Entry::BiasGradPartial, DType::F32) => kernel_entry!(e::lc_run_elementwise_bias_grad_partial_f32),
        (Entry::BiasGradPartial, DType::BF16) => kernel_entry!(e::lc_run_elementwise_bias_grad_partial_bf16),
        (Entry::BiasGradSum, DType::F32) => kernel_entry!(e::lc_run_elementwise_bias_grad_sum_f32),
        (Entry::BiasGradSum, DType::BF16) => kernel_entry!(e::lc_run_elementwise_bias_grad_sum_bf16),
        (_, DType::F16) => {
            return Err(KernelError::Argument {
                kernel: "elementwise",
                message: "f16 storage is not built (f32 and bf16 are)".into(),
            })
        }
    };
    Ok(Kernel {
        family: "elementwise",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// Errors a caller can cause: an empty shape, one past the kernels' `int` arguments or the grid,
/// buffers of the wrong length.
fn check(kernel: &'static str, shape: &RowsShape, lens: &[(&str, usize, usize)]) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument { kernel, message };
    let RowsShape { rows, d } = *shape;
    if rows == 0 || d == 0 {
        return Err(error(format!("empty shape {rows}×{d}")));
    }
    if rows > i32::MAX as usize || d > i32::MAX as usize {
        return Err(error(format!("{rows}×{d}: dimensions must fit i32")));
    }
    if (rows * d).div_ceil(THREADS as usize) > i32::MAX as usize || chunks(shape) > MAX_GRID_YZ as usize {
        return Err(error(format!("{rows}×{d} exceeds the grid limits")));
    }
    for &(what, len, want) in lens {
        check_len(kernel, what, len, want, false)?;
    }
    Ok(())
}

/// `y = gelu(x + b)` over (rows, d), b broadcast over rows; y overwritten.
pub fn launch_gelu_bias_forward<T: Element, B: Backend>(
    backend: &B,
    shape: &RowsShape,
    x: &B::Buffer<T>,
    b: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::GeluBiasForward, T::DTYPE)?;
    let n = shape.rows * shape.d;
    check(
        kernel.name,
        shape,
        &[
            ("x", backend.buffer_len(x), n),
            ("b", backend.buffer_len(b), shape.d),
            ("y", backend.buffer_len(y), n),
        ],
    )?;
    let args = [
        backend.arg_in(x),
        backend.arg_in(b),
        backend.arg_out(y),
        KernelArg::I32(shape.rows as i32),
        KernelArg::I32(shape.d as i32),
    ];
    // SAFETY: the arguments follow elementwise_gelu_bias_fwd's parameters (x, b, y, rows, D);
    // `check` verified the lengths for this shape; y is a distinct, mutably borrowed buffer.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `∂x = ∂y · gelu'(x + b)` over (rows, d), from the forward's inputs; ∂x overwritten. The bias
/// gradient is then [`launch_bias_grad`] over ∂x.
pub fn launch_gelu_bias_backward<T: Element, B: Backend>(
    backend: &B,
    shape: &RowsShape,
    dy: &B::Buffer<T>,
    x: &B::Buffer<T>,
    b: &B::Buffer<T>,
    dx: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::GeluBiasBackward, T::DTYPE)?;
    let n = shape.rows * shape.d;
    check(
        kernel.name,
        shape,
        &[
            ("dy", backend.buffer_len(dy), n),
            ("x", backend.buffer_len(x), n),
            ("b", backend.buffer_len(b), shape.d),
            ("dx", backend.buffer_len(dx), n),
        ],
    )?;
    let args = [
        backend.arg_in(dy),
        backend.arg_in(x),
        backend.arg_in(b),
        backend.arg_out(dx),
        KernelArg::I32(shape.rows as i32),
        KernelArg::I32(shape.d as i32),
    ];
    // SAFETY: the arguments follow elementwise_gelu_bias_bwd's parameters (dy, x, b, dx, rows,
    // D); `check` verified the lengths; dx is a distinct, mutably borrowed buffer.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `out = a + b` (n elements), out overwritten.
pub fn launch_add<T: Element, B: Backend>(
    backend: &B,
    a: &B::Buffer<T>,
    b: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::Add, T::DTYPE)?;
    let n = backend.buffer_len(a);
    let shape = RowsShape { rows: 1, d: n };
    check(
        kernel.name,
        &shape,
        &[("b", backend.buffer_len(b), n), ("out", backend.buffer_len(out), n)],
    )?;
    let args = [
        backend.arg_in(a),
        backend.arg_in(b),
        backend.arg_out(out),
        KernelArg::I32(n as i32),
    ];
    // SAFETY: the arguments follow elementwise_add's parameters (a, b, out, n); `check` verified
    // that all three hold n elements and n fits i32; out is distinct and mutably borrowed.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `out += a` (n elements): the residual stream accumulating a branch.
pub fn launch_add_acc<T: Element, B: Backend>(
    backend: &B,
    a: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::AddAcc, T::DTYPE)?;
    let n = backend.buffer_len(a);
    let shape = RowsShape { rows: 1, d: n };
    check(kernel.name, &shape, &[("out", backend.buffer_len(out), n)])?;
    let args = [backend.arg_in(a), backend.arg_out(out), KernelArg::I32(n as i32)];
    // SAFETY: the arguments follow elementwise_add_acc's parameters (a, out, n); `check` verified
    // both hold n elements and n fits i32; out is mutably borrowed, so it is not `a`.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `y[r, j] += b[j]` over (rows, d): a linear layer's bias after its GEMM.
pub fn launch_bias_add<T: Element, B: Backend>(
    backend: &B,
    shape: &RowsShape,
    b: &B::Buffer<T>,
    y: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::BiasAdd, T::DTYPE)?;
    let n = shape.rows * shape.d;
    check(
        kernel.name,
        shape,
        &[("b", backend.buffer_len(b), shape.d), ("y", backend.buffer_len(y), n)],
    )?;
    let args = [
        backend.arg_in(b),
        backend.arg_out(y),
        KernelArg::I32(shape.rows as i32),
        KernelArg::I32(shape.d as i32),
    ];
    // SAFETY: the arguments follow elementwise_bias_add's parameters (b, y, rows, D); `check`
    // verified b holds d and y rows·d elements, within i32; y is mutably borrowed, so not b.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `out = T(src)` (n elements, rounded to nearest even), out overwritten: the model's f32
/// master weights into its storage-typed working copy, f32 coefficient gradients into the
/// storage-typed gradient buffer.
pub fn launch_cast<T: Element, B: Backend>(
    backend: &B,
    src: &B::Buffer<f32>,
    out: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(Entry::Cast, T::DTYPE)?;
    let n = backend.buffer_len(src);
    let shape = RowsShape { rows: 1, d: n };
    check(kernel.name, &shape, &[("out", backend.buffer_len(out), n)])?;
    let args = [backend.arg_in(src), backend.arg_out(out), KernelArg::I32(n as i32)];
    // SAFETY: the arguments follow elementwise_cast's parameters (src, out, n); `check` verified
    // both hold n elements and n fits i32; out is mutably borrowed, so it is not src.
    unsafe { backend.launch(&kernel, &map_config(n), &args) }
}

/// `y[r, j] + b[j]`, the reference of [`launch_bias_add`].
pub fn reference_bias_add(shape: &RowsShape, y: &[f64], b: &[f64]) -> Vec<f64> {
    y.iter().enumerate().map(|(i, &v)| v + b[i % shape.d]).collect()
}

/// `∂b[j] = Σ_rows ∂y[r, j]` with `variant`, ∂b (d) overwritten. `work` holds
/// [`workspace_len`] f32 elements (`None` when that is 0) and need not be initialised.
pub fn launch_bias_grad<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &RowsShape,
    dy: &B::Buffer<T>,
    db: &mut B::Buffer<T>,
    mut work: Option<&mut B::Buffer<f32>>,
) -> Result<(), KernelError> {
    let naive = kernel(Entry::BiasGradNaive, T::DTYPE)?;
    let work_len = work.as_ref().map_or(0, |w| backend.buffer_len(&**w));
    check(
        naive.name,
        shape,
        &[
            ("dy", backend.buffer_len(dy), shape.rows * shape.d),
            ("db", backend.buffer_len(db), shape.d),
            ("work", work_len, workspace_len(variant, shape)),
        ],
    )?;
    let (rows, d) = (KernelArg::I32(shape.rows as i32), KernelArg::I32(shape.d as i32));
    for (step, dims) in bias_grad_config(variant, shape) {
        let (kernel, args) = match step {
            Step::Naive => (naive, vec![backend.arg_in(dy), backend.arg_out(db), rows, d]),
            Step::Partial { .. } => (
                kernel(Entry::BiasGradPartial, T::DTYPE)?,
                vec![
                    backend.arg_in(dy),
                    backend.arg_out(work.as_deref_mut().expect("checked: the workspace is not empty")),
                    rows,
                    d,
                    KernelArg::I32(CHUNK_ROWS as i32),
                ],
            ),
            Step::Sum { chunks } => (
                kernel(Entry::BiasGradSum, T::DTYPE)?,
                vec![
                    backend.arg_in(work.as_deref().expect("checked: the workspace is not empty")),
                    backend.arg_out(db),
                    d,
                    KernelArg::I32(chunks as i32),
                ],
            ),
        };
        // SAFETY: each argument list follows its entry in cuda/elementwise.cu (bias_grad_naive:
        // dy, db, rows, D; bias_grad_partial: dy, work, rows, D, chunk; bias_grad_sum: work, db,
        // D, chunks); `check` verified every length, the workspace's for this plan's chunks; the
        // buffer written is distinct from the one read in each launch.
        unsafe { backend.launch(&kernel, &dims, &args)? };
    }
    Ok(())
}

/// `Φ(h)`, the standard normal CDF, and `φ(h)`, its density.
fn normal_cdf_pdf(h: f64) -> (f64, f64) {
    (
        0.5 * (1.0 + libm::erf(h * std::f64::consts::FRAC_1_SQRT_2)),
        (-0.5 * h * h).exp() / (2.0 * std::f64::consts::PI).sqrt(),
    )
}

/// `y = gelu(x + b)`, plain f64 loops. Returns y (rows, d).
pub fn reference_gelu_bias_forward(shape: &RowsShape, x: &[f64], b: &[f64]) -> Vec<f64> {
    let RowsShape { rows, d } = *shape;
    assert!(x.len() == rows * d && b.len() == d);
    let mut y = vec![0.0; rows * d]; // (rows, d)
    for r in 0..rows {
        for j in 0..d {
            let h = x[r * d + j] + b[j];
            y[r * d + j] = h * normal_cdf_pdf(h).0;
        }
    }
    y
}

/// `∂x = ∂y · (Φ(h) + h φ(h))`, h = x + b, plain f64 loops. Returns ∂x (rows, d).
pub fn reference_gelu_bias_backward(shape: &RowsShape, dy: &[f64], x: &[f64], b: &[f64]) -> Vec<f64> {
    let RowsShape { rows, d } = *shape;
    assert!(dy.len() == rows * d && x.len() == rows * d && b.len() == d);
    let mut dx = vec![0.0; rows * d]; // (rows, d)
    for r in 0..rows {
        for j in 0..d {
            let h = x[r * d + j] + b[j];
            let (cdf, pdf) = normal_cdf_pdf(h);
            dx[r * d + j] = dy[r * d + j] * (cdf + h * pdf);
        }
    }
    dx
}

/// `a + b`, element-wise (n).
pub fn reference_add(a: &[f64], b: &[f64]) -> Vec<f64> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `∂b[j] = Σ_r ∂y[r, j]`, plain f64 loops. Returns ∂b (d).
pub fn reference_bias_grad(shape: &RowsShape, dy: &[f64]) -> Vec<f64> {
    let RowsShape { rows, d } = *shape;
    assert_eq!(dy.len(), rows * d);
    let mut db = vec![0.0; d]; // (d)
    for r in 0..rows {
        for j in 0..d {
            db[j] += dy[r * d + j];
        }
    }
    db
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn kernel_names_match_the_cuda_entries() {
        let k = kernel(Entry::BiasGradPartial, DType::BF16).unwrap();
        assert_eq!(k.name, "elementwise_bias_grad_partial_bf16");
        assert_eq!(
            kernel(Entry::AddAcc, DType::F32).unwrap().name,
            "elementwise_add_acc_f32"
        );
        assert!(kernel(Entry::Add, DType::F16).is_err());
    }

    proptest! {
        #[test]
        fn grids_cover_every_element_and_column(rows in 1usize..100_000, d in 1usize..5000) {
            let shape = RowsShape { rows, d };
            let n = rows * d;
            let map = map_config(n);
            prop_assert!(map.blocks() as usize * THREADS as usize >= n);
            prop_assert!((map.blocks() as usize - 1) * (THREADS as usize) < n);
            for &variant in ALL {
                for (step, dims) in bias_grad_config(variant, &shape) {
                    prop_assert_eq!(dims.threads_per_block(), THREADS);
                    match step {
                        Step::Naive | Step::Sum { .. } => prop_assert!(dims.grid[0] as usize * THREADS as usize >= d),
                        Step::Partial { chunks } => {
                            prop_assert!(chunks * CHUNK_ROWS >= rows && (chunks - 1) * CHUNK_ROWS < rows);
                            prop_assert!(dims.grid[0] as usize * WARP as usize >= d);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn gelu_reference_values() {
        let shape = RowsShape { rows: 1, d: 3 };
        let y = reference_gelu_bias_forward(&shape, &[0.0, 1.0, -1.0], &[0.0, 0.0, 0.0]);
        // x Φ(x): Φ(1) = 0.841344746068543
        assert!(y[0] == 0.0 && (y[1] - 0.841_344_746_068_543).abs() < 1e-15);
        assert!((y[2] + (1.0 - 0.841_344_746_068_543)).abs() < 1e-15);
    }
}
