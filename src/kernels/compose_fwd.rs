//! Composition forward: `U = X A_catᵀ`, `Z = U ∘ D`, `Y += Z B_catᵀ` for N modules of any ranks
//! with per-sample coefficient rows (`cuda/compose_fwd.cu` has the shapes, the semantics and the
//! variants). CPU reference: [`crate::compose::reference::forward`] (the f64 specification) and
//! [`crate::compose::fast::forward`] (the fused CPU path with the same two-GEMM structure).
//! The pieces both composition families share are in [`super::compose_common`], re-exported
//! here.

pub use super::compose_common::*;
use super::{check_len, Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// One launch of the forward: which kernel, over which rank columns `[j0, j1)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    ShrinkNaive {
        j0: usize,
        j1: usize,
    },
    ExpandNaive {
        j0: usize,
        j1: usize,
    },
    ShrinkTiled {
        j0: usize,
        j1: usize,
        split: Split,
    },
    /// Finishes a split shrink: U, Z from `splits` partials.
    ShrinkReduce {
        j0: usize,
        j1: usize,
        splits: usize,
    },
    ExpandTiled {
        j0: usize,
        j1: usize,
        split: Split,
    },
    /// Finishes a split expand: Y += Σ partials (T × d_out).
    SumPartials {
        splits: usize,
    },
    /// Zeroes the first `len` f32 of the workspace (the GEMV shrink's `u_acc`, T × R).
    GemvZero {
        len: usize,
    },
    /// `u_acc += X A_catᵀ` over `split` of d_in: atomics into the zeroed `u_acc`, or with
    /// `slices` each split's partial into its own T × R slice (no zeroing, no atomics).
    GemvShrink {
        split: Split,
        slices: bool,
    },
    /// `U` = the sum of `slices` slices of `u_acc` in order (1: the atomics' sum), `Z = U ∘ D`,
    /// `Y += Z B_catᵀ`.
    GemvExpand {
        slices: usize,
    },
    /// [`Variant::GemvCoop`]: the GEMV forward in one cooperative launch — `u_acc` zeroed
    /// (without `slices`), the shrink's `shrink_tiles` × `split.splits` blocks, the expand's
    /// `expand_tiles`, with grid barriers between.
    GemvForward {
        split: Split,
        slices: bool,
        shrink_tiles: usize,
        expand_tiles: usize,
    },
    /// Tensor cores: `U`, `Z = (X A_catᵀ) ∘ D` over all R columns, in tiles of `tile_rows`
    /// (128 or 64: [`mma_tile_rows`]) × 128; with several splits of d_in ([`mma_split`]) the
    /// partials go to the workspace and the last split of each tile to finish sums them and
    /// applies the scale (a ticket a tile from [`Backend::tickets`]; no reduce launch).
    MmaShrink {
        tile_rows: usize,
        split: Split,
    },
    /// Tensor cores: `Y += Z B_catᵀ` in tiles of `tile_rows` × 128; with several splits of R
    /// the partials go to the workspace and the last split of each tile adds them onto Y.
    MmaExpand {
        tile_rows: usize,
        split: Split,
    },
    /// Hopper's warpgroup MMA: U, Z as [`Step::MmaShrink`], on 128×128 tiles (`wide`: 128×256).
    WgmmaShrink {
        split: Split,
        wide: bool,
    },
    /// Hopper's warpgroup MMA: Y as [`Step::MmaExpand`], on 128×128 tiles (`wide`: 128×256).
    WgmmaExpand {
        split: Split,
        wide: bool,
    },
}

/// The launches of `variant` for `shape`, in stream order, with their grids. Pure; asserts the
/// launch limits. Empty for an empty shape.
pub fn launch_config(variant: Variant, shape: &Shape, sm_count: usize) -> Vec<(Step, LaunchDims)> {
    if shape.is_empty() {
        return Vec::new();
    }
    let (t, r) = (shape.t, shape.r_total());
    let mut steps = Vec::new();
    match variant {
        Variant::Gemv if t > GEMV_MAX_T => return launch_config(Variant::Fused, shape, sm_count),
        Variant::Gemv => {
            let tiles = r.div_ceil(GEMV_SHRINK_ROWS);
            let split = gemv_row_split(tiles, shape.d_in, sm_count);
            // Slices where every expand block can read them all cheaply (T = 1), which saves the
            // zeroing launch; atomics into one zeroed T × R otherwise.
            let slices = split.splits * t * r <= GEMV_SLICES_MAX;
            if !slices {
                steps.push((Step::GemvZero { len: t * r }, linear_dims(t * r)));
            }
            steps.push((Step::GemvShrink { split, slices }, gemv_dims(tiles, split.splits)));
            let slices = if slices { split.splits } else { 1 };
            let dims = gemv_dims(shape.d_out.div_ceil(GEMV_EXPAND_ROWS), 1);
            steps.push((Step::GemvExpand { slices }, dims));
        }
        Variant::GemvCoop if t > GEMV_MAX_T => return launch_config(Variant::Fused, shape, sm_count),
        Variant::GemvCoop => {
            // Gemv's blocks and splits, as work items of one launch.
            let shrink_tiles = r.div_ceil(GEMV_SHRINK_ROWS);
            let split = gemv_row_split(shrink_tiles, shape.d_in, sm_count);
            let slices = split.splits * t * r <= GEMV_SLICES_MAX;
            let expand_tiles = shape.d_out.div_ceil(GEMV_EXPAND_ROWS);
            let step = Step::GemvForward {
                split,
                slices,
                shrink_tiles,
                expand_tiles,
            };
            steps.push((step, gemv_coop_dims((shrink_tiles * split.splits).max(expand_tiles))));
        }
        Variant::Mma => {
            let (tile_rows, split, dims) = mma_step(MmaEntry::Shrink, t, r, shape.d_in, sm_count);
            // Split or not, one launch a step: the last split of each tile finishes it.
            steps.push((Step::MmaShrink { tile_rows, split }, dims));
            let (tile_rows, split, dims) = mma_step(MmaEntry::Expand, t, shape.d_out, r, sm_count);
            steps.push((Step::MmaExpand { tile_rows, split }, dims));
        }
        Variant::Wgmma | Variant::WgmmaWide => {
            let wide = variant == Variant::WgmmaWide;
            let (split, dims, shrink_wide) = wgmma_step(t, r, shape.d_in, sm_count, wide);
            steps.push((
                Step::WgmmaShrink {
                    split,
                    wide: shrink_wide,
                },
                dims,
            ));
            let (split, dims, wide) = wgmma_step(t, shape.d_out, r, sm_count, wide);
            steps.push((Step::WgmmaExpand { split, wide }, dims));
        }
        Variant::Naive => {
            steps.push((Step::ShrinkNaive { j0: 0, j1: r }, naive_dims(t, r)));
            steps.push((Step::ExpandNaive { j0: 0, j1: r }, naive_dims(t, shape.d_out)));
        }
        Variant::Loop => {
            let off = shape.offsets();
            for i in 0..shape.n() {
                let (j0, j1) = (off[i], off[i + 1]);
                if j0 == j1 {
                    continue;
                }
                let split = Split::none(shape.d_in);
                steps.push((Step::ShrinkTiled { j0, j1, split }, tiled_dims(t, j1 - j0, 1)));
                let split = Split::none(j1 - j0);
                steps.push((Step::ExpandTiled { j0, j1, split }, tiled_dims(t, shape.d_out, 1)));
            }
        }
        Variant::Fused => {
            let tiles = r.div_ceil(TILE.bn) * t.div_ceil(TILE.bm);
            let split = split_k(tiles, shape.d_in, sm_count);
            steps.push((
                Step::ShrinkTiled { j0: 0, j1: r, split },
                tiled_dims(t, r, split.splits),
            ));
            if split.splits > 1 {
                let splits = split.splits;
                steps.push((Step::ShrinkReduce { j0: 0, j1: r, splits }, linear_dims(t * r)));
            }
            let tiles = shape.d_out.div_ceil(TILE.bn) * t.div_ceil(TILE.bm);
            let split = split_k(tiles, r, sm_count);
            steps.push((
                Step::ExpandTiled { j0: 0, j1: r, split },
                tiled_dims(t, shape.d_out, split.splits),
            ));
            if split.splits > 1 {
                let splits = split.splits;
                steps.push((Step::SumPartials { splits }, linear_dims(t * shape.d_out)));
            }
        }
    }
    steps
}

/// f32 elements of the workspace `variant` needs for `shape` (split-K partials, the GEMV's
/// `u_acc`); at least 1.
pub fn workspace_len(variant: Variant, shape: &Shape, sm_count: usize) -> usize {
    let t = shape.t;
    launch_config(variant, shape, sm_count)
        .iter()
        .map(|(step, _)| match *step {
            Step::ShrinkTiled { j0, j1, split } if split.splits > 1 => split.splits * t * (j1 - j0),
            Step::MmaShrink { split, .. } | Step::WgmmaShrink { split, .. } if split.splits > 1 => {
                split.splits * t * shape.r_total()
            }
            Step::MmaExpand { split, .. } | Step::WgmmaExpand { split, .. } if split.splits > 1 => {
                split.splits * t * shape.d_out
            }
            Step::ExpandTiled { split, .. } if split.splits > 1 => split.splits * t * shape.d_out,
            Step::GemvZero { len } => len,
            Step::GemvShrink { split, slices: true }
            | Step::GemvForward {
                split, slices: true, ..
            } => split.splits * t * shape.r_total(),
            Step::GemvForward { slices: false, .. } => t * shape.r_total(),
            _ => 0,
        })
        .chain([1])
        .max()
        .unwrap_or(1)
}

/// Useful FLOPs (`2·T·d_in·R + 2·T·R·d_out`) and the fewest bytes: X, A_cat, B_cat read once,
/// Y read and written, U written when kept, C and the token rows read.
pub fn flops_bytes(shape: &Shape, dtype: DType, keep_u: bool) -> (f64, f64) {
    let (t, di, d_o, r) = (
        shape.t as f64,
        shape.d_in as f64,
        shape.d_out as f64,
        shape.r_total() as f64,
    );
    let flops = 2.0 * t * di * r + 2.0 * t * r * d_o;
    let elems = t * di + r * di + d_o * r + 2.0 * t * d_o + if keep_u { t * r } else { 0.0 };
    let small = 4.0 * (shape.n_samples as f64 * shape.n() as f64 + t + 2.0 * r);
    (flops, elems * dtype.size_bytes() as f64 + small)
}

/// The kernels of this family; storage f32 and bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    ShrinkNaive,
    ExpandNaive,
    ShrinkTiled,
    ShrinkReduce,
    ExpandTiled,
    SumPartials,
}

/// The compiled kernel `compose_fwd_<entry>_<dtype>`, or an error for a storage type this family
/// was not built for (f16).
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_fwd as e;
    use DType::{BF16, F32};
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (Entry::ShrinkNaive, F32) => kernel_entry!(e::lc_run_compose_fwd_shrink_naive_f32),
        (Entry::ShrinkNaive, BF16) => kernel_entry!(e::lc_run_compose_fwd_shrink_naive_bf16),
        (Entry::ExpandNaive, F32) => kernel_entry!(e::lc_run_compose_fwd_expand_naive_f32),
        (Entry::ExpandNaive, BF16) => kernel_entry!(e::lc_run_compose_fwd_expand_naive_bf16),
        (Entry::ShrinkTiled, F32) => kernel_entry!(e::lc_run_compose_fwd_shrink_tiled_f32),
        (Entry::ShrinkTiled, BF16) => kernel_entry!(e::lc_run_compose_fwd_shrink_tiled_bf16),
        (Entry::ShrinkReduce, F32) => kernel_entry!(e::lc_run_compose_fwd_shrink_reduce_f32),
        (Entry::ShrinkReduce, BF16) => kernel_entry!(e::lc_run_compose_fwd_shrink_reduce_bf16),
        (Entry::ExpandTiled, F32) => kernel_entry!(e::lc_run_compose_fwd_expand_tiled_f32),
        (Entry::ExpandTiled, BF16) => kernel_entry!(e::lc_run_compose_fwd_expand_tiled_bf16),
        (Entry::SumPartials, F32) => kernel_entry!(e::lc_run_compose_fwd_sum_partials_f32),
        (Entry::SumPartials, BF16) => kernel_entry!(e::lc_run_compose_fwd_sum_partials_bf16),
        (_, DType::F16) => return Err(not_built("compose_fwd")),
    };
    Ok(Kernel {
        family: "compose_fwd",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// The forward's read-only operands.
pub struct Inputs<'a, T: Element, B: Backend> {
    /// (T, d_in)
    pub x: &'a B::Buffer<T>,
    /// (R, d_in)
    pub a_cat: &'a B::Buffer<T>,
    /// (d_out, R)
    pub b_cat: &'a B::Buffer<T>,
    /// (S, N) f32: the coefficients themselves.
    pub c: &'a B::Buffer<f32>,
    pub rows: &'a TokenRows<B>,
    pub tables: &'a Tables<B>,
}

/// The forward's outputs: U (T, R) overwritten when given, Z (T, R) overwritten, Y (T, d_out)
/// accumulated onto, and an f32 workspace of at least [`workspace_len`] elements.
pub struct Outputs<'a, T: Element, B: Backend> {
    pub u: Option<&'a mut B::Buffer<T>>,
    pub z: &'a mut B::Buffer<T>,
    pub y: &'a mut B::Buffer<T>,
    pub work: &'a mut B::Buffer<f32>,
}

/// `U = X A_catᵀ`, `Z = U ∘ D`, `Y += Z B_catᵀ` with `variant` (asynchronous on the GPU).
pub fn launch<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    inputs: &Inputs<T, B>,
    outputs: Outputs<T, B>,
) -> Result<(), KernelError> {
    let name = kernel(Entry::ShrinkTiled, T::DTYPE)?.name;
    if !variant.applies(T::DTYPE) {
        mma_kernel(MmaEntry::Shrink, T::DTYPE)?;
    }
    let (t, r, d_in, d_out) = (shape.t, shape.r_total(), shape.d_in, shape.d_out);
    check_tables(
        backend,
        name,
        shape,
        backend.buffer_len(inputs.c),
        inputs.rows,
        inputs.tables,
    )?;
    for (what, len, want) in [
        ("X", backend.buffer_len(inputs.x), t * d_in),
        ("A_cat", backend.buffer_len(inputs.a_cat), r * d_in),
        ("B_cat", backend.buffer_len(inputs.b_cat), d_out * r),
        ("Z", backend.buffer_len(outputs.z), t * r),
        ("Y", backend.buffer_len(outputs.y), t * d_out),
    ] {
        check_len(name, what, len, want, false)?;
    }
    if let Some(u) = &outputs.u {
        check_len(name, "U", backend.buffer_len(*u), t * r, false)?;
    }
    check_len(
        name,
        "workspace",
        backend.buffer_len(outputs.work),
        workspace_len(variant, shape, backend.sm_count()),
        true,
    )?;

    let Outputs { u, z, y, work } = outputs;
    let (x, a_cat, b_cat) = (
        backend.arg_in(inputs.x),
        backend.arg_in(inputs.a_cat),
        backend.arg_in(inputs.b_cat),
    );
    let c = backend.arg_in(inputs.c);
    let sample_of = backend.arg_in(&inputs.rows.sample_of);
    let module_of = backend.arg_in(&inputs.tables.module_of);
    let col_scale = backend.arg_in(&inputs.tables.col_scale);
    let u = u.map_or(KernelArg::Ptr(0), |u| backend.arg_out(u));
    let (z, y, work) = (backend.arg_out(z), backend.arg_out(y), backend.arg_out(work));
    let i = |v: usize| KernelArg::I32(v as i32);
    let n = shape.n();
    for (step, dims) in launch_config(variant, shape, backend.sm_count()) {
        let gemv = match step {
            Step::GemvZero { len } => Some((GemvEntry::Zero, vec![work, i(len)])),
            Step::GemvShrink { split, slices } => Some((
                GemvEntry::Shrink,
                vec![
                    x,
                    a_cat,
                    work,
                    i(t),
                    i(d_in),
                    i(r),
                    i(split.chunk),
                    i(usize::from(slices)),
                ],
            )),
            Step::GemvExpand { slices } => Some((
                GemvEntry::Expand,
                vec![
                    work,
                    i(slices),
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    b_cat,
                    u,
                    z,
                    y,
                    i(t),
                    i(r),
                    i(d_out),
                    i(n),
                ],
            )),
            Step::GemvForward {
                split,
                slices,
                shrink_tiles,
                expand_tiles,
            } => Some((
                GemvEntry::Forward,
                vec![
                    x,
                    a_cat,
                    b_cat,
                    work,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    u,
                    z,
                    y,
                    i(t),
                    i(d_in),
                    i(r),
                    i(d_out),
                    i(n),
                    i(shrink_tiles),
                    i(split.splits),
                    i(split.chunk),
                    i(usize::from(slices)),
                    i(expand_tiles),
                ],
            )),
            _ => None,
        };
        // The shrink's and the expand's arguments: tiled (`cols`: their rank columns; no
        // tickets) or on the tensor cores (`cols` None: all R; the tile tickets after the
        // workspace, `split_tickets`).
        let shrink_args = |cols: Option<(usize, usize)>, tickets: Option<KernelArg>, split: Split| {
            let mut head = vec![x, a_cat, c, sample_of, module_of, col_scale, u, z, work];
            head.extend(tickets);
            head.extend([i(t), i(d_in), i(r), i(n)]);
            with_cols_and_chunk(head, cols, split)
        };
        let expand_args = |cols: Option<(usize, usize)>, tickets: Option<KernelArg>, split: Split| {
            let mut head = vec![z, b_cat, y, work];
            head.extend(tickets);
            head.extend([i(t), i(r), i(d_out)]);
            with_cols_and_chunk(head, cols, split)
        };
        let tickets = || split_tickets(backend, &dims).map(Some);
        let mma = match step {
            Step::MmaShrink { tile_rows, split } => Some((
                mma_kernel(MmaEntry::Shrink.on_rows(tile_rows), T::DTYPE)?,
                shrink_args(None, tickets()?, split),
            )),
            Step::MmaExpand { tile_rows, split } => Some((
                mma_kernel(MmaEntry::Expand.on_rows(tile_rows), T::DTYPE)?,
                expand_args(None, tickets()?, split),
            )),
            Step::WgmmaShrink { split, wide } => Some((
                wgmma_kernel(WgmmaEntry::Shrink, wide, T::DTYPE)?,
                shrink_args(None, tickets()?, split),
            )),
            Step::WgmmaExpand { split, wide } => Some((
                wgmma_kernel(WgmmaEntry::Expand, wide, T::DTYPE)?,
                expand_args(None, tickets()?, split),
            )),
            _ => None,
        };
        if let Some((kernel, args)) = mma {
            // SAFETY: each argument list follows its signature in cuda/compose_mma.cu
            // (`COMPOSE_MMA_ENTRIES`), which cuda/compose_wgmma.cu's entries repeat. X, A_cat, B_cat, U, Z, Y were checked above against the
            // shape the kernels index (whole matrices, R columns); the tables come from the same
            // ranks and every token's sample was checked on upload; a null U is skipped by the
            // shrink. Output buffers are distinct and mutably borrowed; a split shrink writes
            // splits × T × R f32 partials and a split expand splits × T × d_out, which the
            // workspace holds (workspace_len) — each launch's are summed by its own last split of
            // each tile, the shrink's before the expand's overwrite them, in stream order; the
            // tickets are the backend's, one per tile of the grid (`Backend::tickets`).
            unsafe { backend.launch(&kernel, &dims, &args)? };
            continue;
        }
        if let Some((entry, args)) = gemv {
            // SAFETY: each argument list follows its signature in cuda/compose_gemv.cu
            // (`compose_gemv_zero` and `COMPOSE_GEMV_ENTRIES`). The workspace holds at least
            // T × R f32 (workspace_len: `u_acc`), zeroed by the first step before the shrink adds
            // into it — or, with slices, splits × T × R, each slice written whole by its split's
            // blocks before the expand reads it; X, A_cat, B_cat, U, Z, Y were checked above
            // against the shape, the tables
            // come from the same ranks and every token's sample was checked on upload; a null U
            // is skipped by the expand kernel. Output buffers are distinct and mutably borrowed.
            // `compose_gemv_forward` is GemvShrink and GemvExpand (after GemvZero without
            // slices) in one cooperative launch, the same arguments.
            let kernel = gemv_kernel(entry, T::DTYPE)?;
            if kernel.cooperative {
                unsafe { launch_cooperative(backend, &kernel, &dims, &args)? };
            } else {
                unsafe { backend.launch(&kernel, &dims, &args)? };
            }
            continue;
        }
        let (entry, args): (Entry, Vec<KernelArg>) = match step {
            Step::ShrinkNaive { j0, j1 } => (
                Entry::ShrinkNaive,
                vec![
                    x,
                    a_cat,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    u,
                    z,
                    i(t),
                    i(d_in),
                    i(r),
                    i(n),
                    i(j0),
                    i(j1),
                ],
            ),
            Step::ExpandNaive { j0, j1 } => (
                Entry::ExpandNaive,
                vec![z, b_cat, y, i(t), i(r), i(d_out), i(j0), i(j1)],
            ),
            Step::ShrinkTiled { j0, j1, split } => (Entry::ShrinkTiled, shrink_args(Some((j0, j1)), None, split)),
            Step::ShrinkReduce { j0, j1, splits } => (
                Entry::ShrinkReduce,
                vec![
                    work,
                    i(splits),
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    u,
                    z,
                    i(t),
                    i(r),
                    i(n),
                    i(j0),
                    i(j1),
                ],
            ),
            Step::ExpandTiled { j0, j1, split } => (Entry::ExpandTiled, expand_args(Some((j0, j1)), None, split)),
            Step::SumPartials { splits } => (
                Entry::SumPartials,
                vec![work, i(splits), y, i(t), i(d_out), i(d_out), i(0), i(1)],
            ),
            Step::GemvZero { .. }
            | Step::GemvShrink { .. }
            | Step::GemvExpand { .. }
            | Step::GemvForward { .. }
            | Step::MmaShrink { .. }
            | Step::MmaExpand { .. }
            | Step::WgmmaShrink { .. }
            | Step::WgmmaExpand { .. } => {
                unreachable!("launched above")
            }
        };
        // SAFETY: each argument list follows its `COMPOSE_FWD_ENTRIES` signature in
        // cuda/compose_fwd.cu. The buffers were checked above against the shape the kernels
        // index (X, A_cat, B_cat, Y, Z, U exactly; the workspace at least as large as the plan's
        // partials); the tables were built from the same ranks, and every token's sample was
        // checked against the rows of C on upload. Output buffers are distinct, mutably
        // borrowed, and a null U is skipped by the kernels.
        unsafe { backend.launch(&kernel(entry, T::DTYPE)?, &dims, &args)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::compose_common::wide_tiles_fit;
    use crate::kernels::HARNESS_SM_COUNT;
    use proptest::prelude::*;

    fn shape(t: usize, d: usize, ranks: Vec<usize>) -> Shape {
        Shape {
            t,
            d_in: d,
            d_out: d,
            n_samples: 1,
            ranks,
        }
    }

    #[test]
    fn loop_variant_launches_two_kernels_per_module() {
        let s = shape(16, 4096, vec![16; 128]);
        assert_eq!(launch_config(Variant::Loop, &s, HARNESS_SM_COUNT).len(), 256);
        assert_eq!(launch_config(Variant::Naive, &s, HARNESS_SM_COUNT).len(), 2);
    }

    #[test]
    fn fused_splits_k_when_the_tiles_cannot_fill_the_gpu() {
        // Decode: T = 16, R = 512 → 8 shrink tiles: split d_in = 4096.
        let s = shape(16, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Fused, &s, HARNESS_SM_COUNT);
        let Step::ShrinkTiled { split, .. } = plan[0].0 else {
            panic!("{plan:?}")
        };
        assert!(
            split.splits > 1 && split.splits * 8 >= BLOCKS_PER_SM * HARNESS_SM_COUNT,
            "{split:?}"
        );
        assert!(matches!(plan[1].0, Step::ShrinkReduce { .. }));
        // Prefill: T = 4096 has tiles enough.
        let s = shape(4096, 4096, vec![16; 32]);
        assert!(launch_config(Variant::Fused, &s, HARNESS_SM_COUNT)
            .iter()
            .all(|(step, dims)| dims.grid[2] == 1 && !matches!(step, Step::ShrinkReduce { .. })));
    }

    proptest! {
        #[test]
        fn split_covers_k_exactly(tiles in 1usize..400, k in 0usize..10_000) {
            let s = split_k(tiles, k, HARNESS_SM_COUNT);
            prop_assert!(s.splits >= 1 && s.chunk >= 1);
            prop_assert!(s.chunk * s.splits >= k, "{s:?}");
            prop_assert!(s.splits == 1 || (s.splits - 1) * s.chunk < k, "{s:?}: an empty split");
            prop_assert!(s.splits == 1 || s.chunk % TILE.bk == 0);
        }
    }

    proptest! {
        #[test]
        fn mma_split_covers_k_exactly(tiles in 1usize..400, k in 1usize..20_000, sms in 1usize..200) {
            let s = mma_split(tiles, k, sms);
            prop_assert!(s.splits >= 1 && s.chunk >= 1);
            prop_assert!(s.splits == 1 || tiles * s.splits <= BLOCKS_PER_SM * sms, "{s:?}: a second wave");
            prop_assert!(s.chunk * s.splits >= k, "{s:?}");
            prop_assert!(s.splits == 1 || (s.splits - 1) * s.chunk < k, "{s:?}: an empty split");
            prop_assert!(s.splits == 1 || (s.chunk % mma_tile::BK == 0 && s.chunk >= MMA_MIN_CHUNK), "{s:?}");
            // It splits whenever the tiles leave half the slots empty and K allows two chunks.
            prop_assert!(s.splits > 1 || 2 * tiles > BLOCKS_PER_SM * sms || k < 2 * MMA_MIN_CHUNK, "{s:?}");
        }
    }

    /// The cooperative GEMV forward is Gemv's plan in one launch: the same splits and slices,
    /// one block per work item as planned (the launch caps it at the co-resident blocks), the
    /// same workspace; the fused plan above 16 tokens.
    #[test]
    fn gemv_coop_is_the_gemv_plan_in_one_launch() {
        for (t, d, ranks) in [
            (1, 4096, vec![16; 32]),
            (16, 4096, vec![16; 32]),
            (5, 33, vec![3, 1, 8]),
        ] {
            let s = shape(t, d, ranks);
            for sm_count in [1, 5, HARNESS_SM_COUNT] {
                let gemv = launch_config(Variant::Gemv, &s, sm_count);
                let coop = launch_config(Variant::GemvCoop, &s, sm_count);
                let [(
                    Step::GemvForward {
                        split,
                        slices,
                        shrink_tiles,
                        expand_tiles,
                    },
                    dims,
                )] = coop[..]
                else {
                    panic!("{coop:?}")
                };
                let shrink = gemv.iter().find_map(|(step, dims)| match step {
                    Step::GemvShrink { split, slices } => Some((*split, *slices, dims.grid)),
                    _ => None,
                });
                let (Some((gemv_split, gemv_slices, shrink_grid)), Some((_, expand_dims))) = (shrink, gemv.last())
                else {
                    panic!("{gemv:?}")
                };
                assert_eq!((split, slices), (gemv_split, gemv_slices));
                assert_eq!([shrink_tiles as u32, split.splits as u32], shrink_grid[..2]);
                assert_eq!(expand_tiles as u32, expand_dims.grid[0]);
                assert_eq!(
                    dims.grid,
                    [(shrink_tiles * split.splits).max(expand_tiles) as u32, 1, 1]
                );
                assert_eq!(
                    workspace_len(Variant::GemvCoop, &s, sm_count),
                    workspace_len(Variant::Gemv, &s, sm_count)
                );
            }
        }
        let s = shape(GEMV_MAX_T + 1, 64, vec![4; 3]);
        assert_eq!(
            launch_config(Variant::GemvCoop, &s, HARNESS_SM_COUNT),
            launch_config(Variant::Fused, &s, HARNESS_SM_COUNT)
        );
    }

    #[test]
    fn gemv_runs_up_to_sixteen_tokens_and_the_fused_plan_above() {
        for dtype in [DType::F32, DType::BF16] {
            assert_eq!(choose_variant(1, dtype), Variant::Gemv);
            assert_eq!(choose_variant(GEMV_MAX_T, dtype), Variant::Gemv);
            assert_eq!(choose_variant(GEMV_MAX_T + 1, dtype), Variant::Fused);
            assert_eq!(choose_variant(MMA_MIN_T - 1, dtype), Variant::Fused);
        }
        // The tensor cores from MMA_MIN_T tokens, for the storage they take.
        assert_eq!(choose_variant(MMA_MIN_T, DType::BF16), Variant::Mma);
        assert_eq!(choose_variant(4096, DType::BF16), Variant::Mma);
        assert_eq!(choose_variant(4096, DType::F32), Variant::Fused);
        let s = shape(16, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Gemv, &s, HARNESS_SM_COUNT);
        assert_eq!(plan[0].0, Step::GemvZero { len: 16 * 512 });
        let (Step::GemvShrink { split, slices: false }, dims) = plan[1] else {
            panic!("{plan:?}")
        };
        // Split-K from the SM count: 16 row blocks × 16 splits of 256 fill 2 blocks per SM.
        assert_eq!(split, Split { chunk: 256, splits: 16 });
        assert!(
            dims.blocks() as usize >= BLOCKS_PER_SM * HARNESS_SM_COUNT - 16,
            "{dims:?}"
        );
        assert_eq!(plan[2].0, Step::GemvExpand { slices: 1 });
        assert_eq!(plan.len(), 3);
        assert_eq!(workspace_len(Variant::Gemv, &s, HARNESS_SM_COUNT), 16 * 512);
        // One SM: the 16 row blocks are enough, d_in is not split, and the one slice is stored
        // without zeroing or atomics.
        let plan = launch_config(Variant::Gemv, &s, 1);
        assert_eq!(
            plan.iter().map(|(step, _)| *step).collect::<Vec<_>>(),
            [
                Step::GemvShrink {
                    split: Split::none(4096),
                    slices: true
                },
                Step::GemvExpand { slices: 1 }
            ]
        );
        // Decode, T = 1: 16 slices of 1 × 512, two launches.
        let s = shape(1, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Gemv, &s, HARNESS_SM_COUNT);
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(
            plan[0].0,
            Step::GemvShrink {
                split: Split { chunk: 256, splits: 16 },
                slices: true
            }
        );
        assert_eq!(plan[1].0, Step::GemvExpand { slices: 16 });
        assert_eq!(workspace_len(Variant::Gemv, &s, HARNESS_SM_COUNT), 16 * 512);
        // N = 8 and N = 128 at T = 1 too.
        for n in [8, 128] {
            let s = shape(1, 4096, vec![16; n]);
            let plan = launch_config(Variant::Gemv, &s, HARNESS_SM_COUNT);
            assert!(matches!(plan[0].0, Step::GemvShrink { slices: true, .. }), "{plan:?}");
        }
        let s = shape(17, 4096, vec![16; 32]);
        assert_eq!(
            launch_config(Variant::Gemv, &s, HARNESS_SM_COUNT),
            launch_config(Variant::Fused, &s, HARNESS_SM_COUNT)
        );
    }

    proptest! {
        #[test]
        fn gemv_split_covers_k_exactly(tiles in 1usize..400, k in 1usize..10_000, sms in 1usize..200) {
            for align in [8, 16] {
                let s = gemv_split(tiles, k, align, sms);
                prop_assert!(s.splits >= 1 && s.chunk >= 1);
                prop_assert!(s.splits == 1 || tiles * s.splits <= BLOCKS_PER_SM * sms, "{s:?}: a second wave");
                prop_assert!(s.chunk * s.splits >= k, "{s:?}");
                prop_assert!(s.splits == 1 || (s.splits - 1) * s.chunk < k, "{s:?}: an empty split");
                prop_assert!(s.splits == 1 || s.chunk % align == 0, "{s:?}");
            }
        }
    }

    /// The Hopper variants: 128×128 tiles of 256 threads with 64 KiB of dynamic shared memory
    /// (`wgmma_wide`: 128×256, 96 KiB); at d = 4096, N = 32, T = 4096 the shrink's 128 tiles
    /// split d_in in two (256 blocks on 132 SMs, two an SM; wide: 64 tiles, 128 blocks, one an
    /// SM) and the last split of each tile finishes it (no reduce launch); the expand's 1,024
    /// tiles (wide: 512) do not split.
    #[test]
    fn wgmma_plans_128_row_tiles_with_dynamic_shared_memory() {
        let s = shape(4096, 4096, vec![16; 32]);
        for (variant, wide, tiles_x, shared) in [
            (Variant::Wgmma, false, [4, 32], 64 * 1024),
            (Variant::WgmmaWide, true, [2, 16], 96 * 1024),
        ] {
            let plan = launch_config(variant, &s, HARNESS_SM_COUNT);
            let steps: Vec<Step> = plan.iter().map(|p| p.0).collect();
            let split = Split { chunk: 2048, splits: 2 };
            assert_eq!(
                steps,
                [
                    Step::WgmmaShrink { split, wide },
                    Step::WgmmaExpand {
                        split: Split::none(512),
                        wide
                    },
                ]
            );
            assert_eq!((plan[0].1.grid, plan[0].1.block), ([tiles_x[0], 32, 2], [256, 1, 1]));
            assert_eq!(plan[1].1.grid, [tiles_x[1], 32, 1]);
            for (_, dims) in &plan {
                assert_eq!(dims.dynamic_shared_bytes, shared);
            }
            assert_eq!(workspace_len(variant, &s, HARNESS_SM_COUNT), 2 * 4096 * 512);
            assert!(variant.applies(DType::BF16) && !variant.applies(DType::F32));
        }
        // N = 8 (R = 128): one 128-column tile; a wide one would pad it to 256, so the wide
        // variant's shrink is the narrow kernel (128 tiles split 2 ways onto 2 blocks an SM) and
        // only its expand (4,096 columns) is wide.
        let s = shape(4096, 4096, vec![16; 8]);
        let plan = launch_config(Variant::WgmmaWide, &s, HARNESS_SM_COUNT);
        assert!(matches!(plan[0].0, Step::WgmmaShrink { wide: false, .. }), "{plan:?}");
        assert_eq!(plan[0].1.dynamic_shared_bytes, 64 * 1024);
        assert!(
            matches!(plan.last().unwrap().0, Step::WgmmaExpand { wide: true, .. }),
            "{plan:?}"
        );
        let fits: Vec<usize> = (1..=1100).filter(|&c| wide_tiles_fit(c)).collect();
        assert_eq!((fits[0], fits[127], fits[128], fits.len()), (129, 256, 385, 512));
    }

    #[test]
    fn mma_plans_two_tensor_core_launches_and_splits_k_only_for_idle_sms() {
        let s = shape(4096, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Mma, &s, HARNESS_SM_COUNT);
        assert_eq!(plan.len(), 2, "{plan:?}");
        // Shrink: R = 512 → 4 column tiles × 32 row tiles; expand: 32 × 32.
        // 4 × 32 = 128 tiles of 128 rows leave SMs idle on 132: 64-row tiles, 4 × 64 blocks,
        // which fill 2 an SM (264) as nearly as one split can.
        let whole = Split::none(4096);
        assert_eq!(
            (plan[0].0, plan[0].1.grid),
            (
                Step::MmaShrink {
                    tile_rows: 64,
                    split: whole
                },
                [4, 64, 1]
            )
        );
        let expand = Step::MmaExpand {
            tile_rows: 128,
            split: Split::none(512),
        };
        assert_eq!((plan[1].0, plan[1].1.grid), (expand, [32, 32, 1]));
        assert_eq!(plan[0].1.block, [256, 1, 1]);
        assert_eq!(workspace_len(Variant::Mma, &s, HARNESS_SM_COUNT), 1);
        // R = 128 at T = 4096: 64 tiles of 64 rows, d_in in 4 splits of 1024, finished by each
        // tile's last split: no reduce launch.
        let s = shape(4096, 4096, vec![16; 8]);
        let plan = launch_config(Variant::Mma, &s, HARNESS_SM_COUNT);
        let split = Split { chunk: 1024, splits: 4 };
        assert_eq!(
            (plan[0].0, plan[0].1.grid),
            (Step::MmaShrink { tile_rows: 64, split }, [1, 64, 4])
        );
        let expand = Step::MmaExpand {
            tile_rows: 128,
            split: Split::none(128),
        };
        assert_eq!(plan[1].0, expand);
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(workspace_len(Variant::Mma, &s, HARNESS_SM_COUNT), 4 * 4096 * 128);
        // T = 16, R = 512: 4 tiles; 66 wanted, d_in = 4096 allows 32 of 128.
        let s = shape(16, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Mma, &s, HARNESS_SM_COUNT);
        let split = Split { chunk: 128, splits: 32 };
        assert_eq!(plan[0].0, Step::MmaShrink { tile_rows: 64, split });
        // Its expand: 32 tiles of 64 rows, R in 4 splits of 128, added onto Y by each tile's
        // last split: two launches in all.
        let split = Split { chunk: 128, splits: 4 };
        assert_eq!(
            (plan[1].0, plan[1].1.grid),
            (Step::MmaExpand { tile_rows: 64, split }, [32, 1, 4])
        );
        assert_eq!(plan.len(), 2, "{plan:?}");
        assert_eq!(
            workspace_len(Variant::Mma, &s, HARNESS_SM_COUNT),
            4 * 16 * 4096 // as many as the shrink's 32 × 16 × 512
        );
        // One SM: 128-row tiles, no split.
        let plan = launch_config(Variant::Mma, &s, 1);
        let whole = Split::none(4096);
        assert_eq!(
            plan[0].0,
            Step::MmaShrink {
                tile_rows: 128,
                split: whole
            }
        );
        assert_eq!(plan.len(), 2);
        assert!(Variant::Mma.applies(DType::BF16) && !Variant::Mma.applies(DType::F32));
        assert!(mma_kernel(MmaEntry::Shrink, DType::F32).is_err());
        assert!(mma_kernel(MmaEntry::Dx, DType::BF16).is_ok());
    }

    // The tensor-core stages fit the static shared memory of every GPU.
    const _: () = assert!(mma_tile::SHARED_BYTES <= super::super::MAX_STATIC_SHARED_BYTES);

    #[test]
    fn index_tables_are_int32() {
        assert_eq!(index_table(&[0, 1, 7, 123_456]), vec![0i32, 1, 7, 123_456]);
    }

    // The tiles and the ∂C epilogue fit the static shared memory of every GPU.
    const _: () = assert!(
        TILE_SHARED_BYTES + super::super::compose_bwd::EPILOGUE_SHARED_BYTES <= super::super::MAX_STATIC_SHARED_BYTES
    );

    #[test]
    fn tile_constants_match_the_thread_count() {
        assert_eq!(TILE_THREADS, 256);
    }
}
