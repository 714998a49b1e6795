//! Composition backward: per-sample `∂C` fused with forming `H = G B_cat`, `∂U = H ∘ D`,
//! `∂X += ∂U A_cat`, `∂A_cat = ∂Uᵀ X`, `∂B_cat = Gᵀ (U ∘ D)` (`cuda/compose_bwd.cu` has the
//! shapes, the semantics and the variants). CPU reference: [`crate::compose::reference::backward`]
//! and [`crate::compose::fast::backward`]. Shapes, tables and token rows are shared with
//! [`super::compose_fwd`].

use super::compose_fwd::{
    check_tables, gemv_col_split, gemv_column_tile, gemv_coop_dims, gemv_dims, gemv_kernel, launch_cooperative,
    linear_dims, mma_kernel, mma_step, naive_dims, split_k, split_tickets, tiled_dims, wgmma_kernel, wgmma_step,
    with_cols_and_chunk, GemvEntry, MmaEntry, Shape, Split, Tables, TokenRows, WgmmaEntry, GEMV_MAX_T, GEMV_THREADS,
    TILE,
};
use super::{check_len, Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};
use crate::compose::Train;

pub use super::compose_fwd::Variant;
/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = super::compose_fwd::ALL;

/// Static shared memory of `coeff_grad_tiled`'s epilogue: f32 `part[BM][BN + 1]`.
pub const EPILOGUE_SHARED_BYTES: u32 = (4 * TILE.bm * (TILE.bn + 1)) as u32;

/// Which buffer a split-K reduction finishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// ∂U (T, R), overwritten.
    DU,
    /// ∂X (T, d_in), accumulated onto.
    DX,
}

/// One launch of the backward, over rank columns `[j0, j1)` (modules `[i0, i1)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// H (f32, into the workspace) and, when `du`, ∂U.
    HiddenNaive {
        j0: usize,
        j1: usize,
        du: bool,
    },
    CoeffGradNaive {
        i0: usize,
        i1: usize,
    },
    DxNaive {
        j0: usize,
        j1: usize,
    },
    DaNaive {
        j0: usize,
        j1: usize,
    },
    DbNaive {
        j0: usize,
        j1: usize,
    },
    /// ∂C (when `dc`) and ∂U (when `du`) from an H tile held in registers.
    CoeffGradTiled {
        j0: usize,
        j1: usize,
        split: Split,
        dc: bool,
        du: bool,
    },
    SumPartials {
        target: Target,
        splits: usize,
    },
    DxTiled {
        j0: usize,
        j1: usize,
        split: Split,
    },
    DaTiled {
        j0: usize,
        j1: usize,
    },
    DbTiled {
        j0: usize,
        j1: usize,
    },
    /// Zeroes the first `len` f32 of the workspace: `h_acc` (T × R) when ∂U is needed, then
    /// `dx_acc` (T × d_in) when ∂X is.
    GemvZero {
        len: usize,
    },
    /// Over `split` of d_out: `h_acc += G B_cat` (when `h`) and the split's part of ∂C (when
    /// `dc`).
    GemvHidden {
        split: Split,
        h: bool,
        dc: bool,
    },
    /// `dx_acc += (h_acc ∘ D) A_cat` over `split` of R.
    GemvDx {
        split: Split,
    },
    /// ∂U = h_acc ∘ D (when `du`), ∂X += dx_acc (when `dx`).
    GemvFinish {
        du: bool,
        dx: bool,
    },
    /// [`Variant::GemvCoop`]: GemvZero, GemvHidden (`h_tiles` × `h_split`), GemvDx (`x_tiles`
    /// × `x_split`, when `dx`) and GemvFinish in one cooperative launch, with grid barriers
    /// between; `du`: h_acc and ∂U (else ∂C only).
    GemvBackward {
        h_split: Split,
        h_tiles: usize,
        x_split: Split,
        x_tiles: usize,
        du: bool,
        dc: bool,
        dx: bool,
    },
    /// Tensor cores: H = G B_cat in registers, ∂C (when `dc`) and ∂U (when `du`) in the
    /// epilogue.
    MmaHidden {
        dc: bool,
        du: bool,
        /// Rows of the block tile (128 or 64: [`mma_tile_rows`](super::compose_fwd::mma_tile_rows)).
        tile_rows: usize,
        /// d_out in chunks ([`mma_split`](super::compose_fwd::mma_split)): each split adds its
        /// part of ∂C and writes its ∂U partial to the workspace, and the last split of each
        /// tile to finish sums them into ∂U (a ticket a tile from [`Backend::tickets`]).
        split: Split,
    },
    /// Tensor cores: ∂X += ∂U A_cat in tiles of `tile_rows` × 128; with several splits of R the
    /// partials go to the workspace and the last split of each tile adds them onto ∂X.
    MmaDx {
        tile_rows: usize,
        split: Split,
    },
    /// Tensor cores: ∂A_cat = ∂Uᵀ X (R × d_in, K = T) by the GEMM family's `mma_w64` variant
    /// ([`super::gemm::launch`]: its own split-K and workspace).
    MmaDa,
    /// Hopper's warpgroup MMA: [`Step::MmaHidden`] on 128×128 tiles (`wide`: 128×256).
    WgmmaHidden {
        dc: bool,
        du: bool,
        split: Split,
        wide: bool,
    },
    /// Hopper's warpgroup MMA: [`Step::MmaDx`] on 128×128 tiles (`wide`: 128×256).
    WgmmaDx {
        split: Split,
        wide: bool,
    },
}

/// The launches of `variant` computing what `train` asks (`input`: ∂X, `coeffs`: ∂C,
/// `modules`: ∂A_cat and ∂B_cat; `base` is the GEMM family's), in stream order. Pure.
pub fn launch_config(variant: Variant, shape: &Shape, train: Train, sm_count: usize) -> Vec<(Step, LaunchDims)> {
    let want_du = train.input || train.modules;
    if shape.is_empty() || !(want_du || train.coeffs) {
        return Vec::new();
    }
    let (t, r, d_in, d_out) = (shape.t, shape.r_total(), shape.d_in, shape.d_out);
    let mut steps = Vec::new();
    match variant {
        Variant::Gemv if t > GEMV_MAX_T => return launch_config(Variant::Fused, shape, train, sm_count),
        Variant::Gemv => {
            let ws = if want_du { t * r } else { 0 } + if train.input { t * d_in } else { 0 };
            if ws > 0 {
                steps.push((Step::GemvZero { len: ws }, linear_dims(ws)));
            }
            let ct = gemv_column_tile(t);
            let tiles = r.div_ceil(ct);
            let split = gemv_col_split(tiles, d_out, sm_count);
            let step = Step::GemvHidden {
                split,
                h: want_du,
                dc: train.coeffs,
            };
            steps.push((step, gemv_dims(tiles, split.splits)));
            if train.input {
                let tiles = d_in.div_ceil(ct);
                let split = gemv_col_split(tiles, r, sm_count);
                steps.push((Step::GemvDx { split }, gemv_dims(tiles, split.splits)));
            }
            if want_du {
                let n = if train.input { t * r.max(d_in) } else { t * r };
                let step = Step::GemvFinish {
                    du: true,
                    dx: train.input,
                };
                steps.push((step, linear_dims(n)));
            }
            if train.modules {
                steps.push((Step::DaTiled { j0: 0, j1: r }, tiled_dims(r, d_in, 1)));
                steps.push((Step::DbTiled { j0: 0, j1: r }, tiled_dims(d_out, r, 1)));
            }
        }
        Variant::GemvCoop if t > GEMV_MAX_T => return launch_config(Variant::Fused, shape, train, sm_count),
        Variant::GemvCoop => {
            // Gemv's blocks and splits, as work items of one launch.
            let ct = gemv_column_tile(t);
            let h_tiles = r.div_ceil(ct);
            let h_split = gemv_col_split(h_tiles, d_out, sm_count);
            let x_tiles = d_in.div_ceil(ct);
            let x_split = gemv_col_split(x_tiles, r, sm_count);
            let step = Step::GemvBackward {
                h_split,
                h_tiles,
                x_split,
                x_tiles,
                du: want_du,
                dc: train.coeffs,
                dx: train.input,
            };
            let mut items = h_tiles * h_split.splits;
            if train.input {
                items = items.max(x_tiles * x_split.splits);
            }
            if want_du {
                items = items.max((t * if train.input { r.max(d_in) } else { r }).div_ceil(GEMV_THREADS as usize));
            }
            steps.push((step, gemv_coop_dims(items)));
            if train.modules {
                steps.push((Step::DaTiled { j0: 0, j1: r }, tiled_dims(r, d_in, 1)));
                steps.push((Step::DbTiled { j0: 0, j1: r }, tiled_dims(d_out, r, 1)));
            }
        }
        Variant::Mma | Variant::Wgmma | Variant::WgmmaWide => {
            let (dc, du) = (train.coeffs, want_du);
            let wgmma = variant != Variant::Mma;
            let wide = variant == Variant::WgmmaWide;
            let (step, dims) = if wgmma {
                let (split, dims, wide) = wgmma_step(t, r, d_out, sm_count, wide);
                (Step::WgmmaHidden { dc, du, split, wide }, dims)
            } else {
                let (tile_rows, split, dims) = mma_step(MmaEntry::Hidden, t, r, d_out, sm_count);
                let step = Step::MmaHidden {
                    dc,
                    du,
                    tile_rows,
                    split,
                };
                (step, dims)
            };
            // Split or not, one launch: the last split of each tile sums the ∂U partials.
            steps.push((step, dims));
            if train.input {
                let (step, dims) = if wgmma {
                    let (split, dims, wide) = wgmma_step(t, d_in, r, sm_count, wide);
                    (Step::WgmmaDx { split, wide }, dims)
                } else {
                    let (tile_rows, split, dims) = mma_step(MmaEntry::Dx, t, d_in, r, sm_count);
                    (Step::MmaDx { tile_rows, split }, dims)
                };
                steps.push((step, dims));
            }
            if train.modules {
                steps.push((
                    Step::MmaDa,
                    super::gemm::launch_config(super::gemm::Variant::MmaW64, &da_shape(shape)),
                ));
                // ∂B_cat = Gᵀ (U ∘ D): the tensor cores would need Z stored (the tiled kernel
                // re-forms it from U on load).
                steps.push((Step::DbTiled { j0: 0, j1: r }, tiled_dims(d_out, r, 1)));
            }
        }
        Variant::Naive => {
            steps.push((
                Step::HiddenNaive {
                    j0: 0,
                    j1: r,
                    du: want_du,
                },
                naive_dims(t, r),
            ));
            if train.coeffs {
                let n = shape.n();
                steps.push((Step::CoeffGradNaive { i0: 0, i1: n }, linear_dims(shape.n_samples * n)));
            }
            if train.input {
                steps.push((Step::DxNaive { j0: 0, j1: r }, naive_dims(t, d_in)));
            }
            if train.modules {
                steps.push((Step::DaNaive { j0: 0, j1: r }, naive_dims(r, d_in)));
                steps.push((Step::DbNaive { j0: 0, j1: r }, naive_dims(d_out, r)));
            }
        }
        Variant::Loop => {
            let off = shape.offsets();
            for i in 0..shape.n() {
                let (j0, j1) = (off[i], off[i + 1]);
                if j0 == j1 {
                    continue;
                }
                let (dc, du) = (train.coeffs, want_du);
                let split = Split::none(d_out);
                steps.push((
                    Step::CoeffGradTiled { j0, j1, split, dc, du },
                    tiled_dims(t, j1 - j0, 1),
                ));
                if train.input {
                    let split = Split::none(j1 - j0);
                    steps.push((Step::DxTiled { j0, j1, split }, tiled_dims(t, d_in, 1)));
                }
                if train.modules {
                    steps.push((Step::DaTiled { j0, j1 }, tiled_dims(j1 - j0, d_in, 1)));
                    steps.push((Step::DbTiled { j0, j1 }, tiled_dims(d_out, j1 - j0, 1)));
                }
            }
        }
        Variant::Fused => {
            let tiles = r.div_ceil(TILE.bn) * t.div_ceil(TILE.bm);
            let split = split_k(tiles, d_out, sm_count);
            let (dc, du) = (train.coeffs, want_du);
            steps.push((
                Step::CoeffGradTiled {
                    j0: 0,
                    j1: r,
                    split,
                    dc,
                    du,
                },
                tiled_dims(t, r, split.splits),
            ));
            if du && split.splits > 1 {
                let step = Step::SumPartials {
                    target: Target::DU,
                    splits: split.splits,
                };
                steps.push((step, linear_dims(t * r)));
            }
            if train.input {
                let tiles = d_in.div_ceil(TILE.bn) * t.div_ceil(TILE.bm);
                let split = split_k(tiles, r, sm_count);
                steps.push((Step::DxTiled { j0: 0, j1: r, split }, tiled_dims(t, d_in, split.splits)));
                if split.splits > 1 {
                    let step = Step::SumPartials {
                        target: Target::DX,
                        splits: split.splits,
                    };
                    steps.push((step, linear_dims(t * d_in)));
                }
            }
            if train.modules {
                steps.push((Step::DaTiled { j0: 0, j1: r }, tiled_dims(r, d_in, 1)));
                steps.push((Step::DbTiled { j0: 0, j1: r }, tiled_dims(d_out, r, 1)));
            }
        }
    }
    steps
}

/// ∂A_cat = ∂Uᵀ X as a GEMM: (R × d_in) from ∂U stored (T, R) and X (T, d_in).
fn da_shape(shape: &Shape) -> super::gemm::GemmShape {
    super::gemm::GemmShape {
        m: shape.r_total(),
        n: shape.d_in,
        k: shape.t,
        trans_a: true,
        trans_b: false,
    }
}

/// f32 elements of the workspace: H for the naive variant, split-K partials for the fused one,
/// `h_acc` and `dx_acc` for the GEMV one; at least 1.
pub fn workspace_len(variant: Variant, shape: &Shape, train: Train, sm_count: usize) -> usize {
    let t = shape.t;
    launch_config(variant, shape, train, sm_count)
        .iter()
        .map(|(step, _)| match *step {
            Step::HiddenNaive { .. } => t * shape.r_total(),
            Step::CoeffGradTiled {
                j0,
                j1,
                split,
                du: true,
                ..
            } if split.splits > 1 => split.splits * t * (j1 - j0),
            Step::DxTiled { split, .. } if split.splits > 1 => split.splits * t * shape.d_in,
            Step::MmaHidden { split, du: true, .. } | Step::WgmmaHidden { split, du: true, .. } if split.splits > 1 => {
                split.splits * t * shape.r_total()
            }
            Step::MmaDx { split, .. } | Step::WgmmaDx { split, .. } if split.splits > 1 => {
                split.splits * t * shape.d_in
            }
            Step::GemvZero { len } => len,
            Step::GemvBackward { du, dx, .. } => {
                (if du { t * shape.r_total() } else { 0 }) + if dx { t * shape.d_in } else { 0 }
            }
            _ => 0,
        })
        .chain([1])
        .max()
        .unwrap_or(1)
}

/// Useful FLOPs and the fewest bytes of the gradients `train` asks for. H costs `2·T·d_out·R`
/// (G and B_cat read, U read for ∂C); ∂X `2·T·R·d_in` (A_cat read, ∂X read and written); ∂A and
/// ∂B `2·R·T·d_in + 2·d_out·T·R` (X read, ∂A and ∂B written).
pub fn flops_bytes(shape: &Shape, dtype: DType, train: Train) -> (f64, f64) {
    let (t, di, d_o, r) = (
        shape.t as f64,
        shape.d_in as f64,
        shape.d_out as f64,
        shape.r_total() as f64,
    );
    let mut flops = 2.0 * t * d_o * r;
    let mut elems = t * d_o + d_o * r + t * r;
    if train.input {
        flops += 2.0 * t * r * di;
        elems += r * di + 2.0 * t * di;
    }
    if train.modules {
        flops += 2.0 * r * t * di + 2.0 * d_o * t * r;
        elems += t * di + r * di + d_o * r;
        if !train.input {
            elems += r * di;
        }
    }
    let small = 4.0 * (2.0 * shape.n_samples as f64 * shape.n() as f64 + t + 2.0 * r);
    (flops, elems * dtype.size_bytes() as f64 + small)
}

/// The kernels of this family; storage f32 and bf16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    HiddenNaive,
    CoeffGradNaive,
    DxNaive,
    DaNaive,
    DbNaive,
    CoeffGradTiled,
    DxTiled,
    DaTiled,
    DbTiled,
}

/// The compiled kernel `compose_bwd_<entry>_<dtype>`, or an error for f16.
pub fn kernel(entry: Entry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_bwd as e;
    use DType::{BF16, F32};
    use Entry::*;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (HiddenNaive, F32) => kernel_entry!(e::lc_run_compose_bwd_hidden_naive_f32),
        (HiddenNaive, BF16) => kernel_entry!(e::lc_run_compose_bwd_hidden_naive_bf16),
        (CoeffGradNaive, F32) => kernel_entry!(e::lc_run_compose_bwd_coeff_grad_naive_f32),
        (CoeffGradNaive, BF16) => kernel_entry!(e::lc_run_compose_bwd_coeff_grad_naive_bf16),
        (DxNaive, F32) => kernel_entry!(e::lc_run_compose_bwd_dx_naive_f32),
        (DxNaive, BF16) => kernel_entry!(e::lc_run_compose_bwd_dx_naive_bf16),
        (DaNaive, F32) => kernel_entry!(e::lc_run_compose_bwd_da_naive_f32),
        (DaNaive, BF16) => kernel_entry!(e::lc_run_compose_bwd_da_naive_bf16),
        (DbNaive, F32) => kernel_entry!(e::lc_run_compose_bwd_db_naive_f32),
        (DbNaive, BF16) => kernel_entry!(e::lc_run_compose_bwd_db_naive_bf16),
        (CoeffGradTiled, F32) => kernel_entry!(e::lc_run_compose_bwd_coeff_grad_tiled_f32),
        (CoeffGradTiled, BF16) => kernel_entry!(e::lc_run_compose_bwd_coeff_grad_tiled_bf16),
        (DxTiled, F32) => kernel_entry!(e::lc_run_compose_bwd_dx_tiled_f32),
        (DxTiled, BF16) => kernel_entry!(e::lc_run_compose_bwd_dx_tiled_bf16),
        (DaTiled, F32) => kernel_entry!(e::lc_run_compose_bwd_da_tiled_f32),
        (DaTiled, BF16) => kernel_entry!(e::lc_run_compose_bwd_da_tiled_bf16),
        (DbTiled, F32) => kernel_entry!(e::lc_run_compose_bwd_db_tiled_f32),
        (DbTiled, BF16) => kernel_entry!(e::lc_run_compose_bwd_db_tiled_bf16),
        (_, DType::F16) => return Err(super::compose_fwd::not_built("compose_bwd")),
    };
    Ok(Kernel {
        family: "compose_bwd",
        name,
        harness_entry,
        cooperative: false,
    })
}

/// The backward's read-only operands.
pub struct Inputs<'a, T: Element, B: Backend> {
    /// (T, d_out): ∂L/∂Y.
    pub g: &'a B::Buffer<T>,
    /// (T, d_in)
    pub x: &'a B::Buffer<T>,
    /// (T, R): the forward's unscaled U.
    pub u: &'a B::Buffer<T>,
    /// (R, d_in)
    pub a_cat: &'a B::Buffer<T>,
    /// (d_out, R)
    pub b_cat: &'a B::Buffer<T>,
    /// (S, N) f32
    pub c: &'a B::Buffer<f32>,
    pub rows: &'a TokenRows<B>,
    pub tables: &'a Tables<B>,
}

/// The backward's outputs; each must be present exactly when `train` asks for it. ∂C (S, N, f32)
/// and ∂X (T, d_in) are accumulated onto; ∂U (T, R, scratch needed for ∂X and ∂A_cat), ∂A_cat
/// (R, d_in) and ∂B_cat (d_out, R) are overwritten. The f32 workspace holds at least
/// [`workspace_len`] elements.
pub struct Outputs<'a, T: Element, B: Backend> {
    pub dc: Option<&'a mut B::Buffer<f32>>,
    pub du: Option<&'a mut B::Buffer<T>>,
    pub dx: Option<&'a mut B::Buffer<T>>,
    pub da_cat: Option<&'a mut B::Buffer<T>>,
    pub db_cat: Option<&'a mut B::Buffer<T>>,
    pub work: &'a mut B::Buffer<f32>,
}

/// The gradients `train` asks for (except `base`), with `variant` (asynchronous on the GPU).
pub fn launch<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    shape: &Shape,
    train: Train,
    inputs: &Inputs<T, B>,
    outputs: Outputs<T, B>,
) -> Result<(), KernelError> {
    let name = kernel(Entry::CoeffGradTiled, T::DTYPE)?.name;
    if !variant.applies(T::DTYPE) {
        mma_kernel(MmaEntry::Hidden, T::DTYPE)?;
    }
    let (t, r, n, d_in, d_out) = (shape.t, shape.r_total(), shape.n(), shape.d_in, shape.d_out);
    check_tables(
        backend,
        name,
        shape,
        backend.buffer_len(inputs.c),
        inputs.rows,
        inputs.tables,
    )?;
    for (what, len, want) in [
        ("G", backend.buffer_len(inputs.g), t * d_out),
        ("X", backend.buffer_len(inputs.x), t * d_in),
        ("U", backend.buffer_len(inputs.u), t * r),
        ("A_cat", backend.buffer_len(inputs.a_cat), r * d_in),
        ("B_cat", backend.buffer_len(inputs.b_cat), d_out * r),
    ] {
        check_len(name, what, len, want, false)?;
    }
    let want_du = train.input || train.modules;
    let present = |what: &str, given: bool, wanted: bool| {
        if given == wanted {
            Ok(())
        } else {
            Err(KernelError::Argument {
                kernel: name,
                message: format!(
                    "{what} {} for {train:?}",
                    if wanted { "is needed" } else { "is not computed" }
                ),
            })
        }
    };
    present("∂C", outputs.dc.is_some(), train.coeffs)?;
    present("∂U", outputs.du.is_some(), want_du)?;
    present("∂X", outputs.dx.is_some(), train.input)?;
    present("∂A_cat", outputs.da_cat.is_some(), train.modules)?;
    present("∂B_cat", outputs.db_cat.is_some(), train.modules)?;
    if let Some(dc) = &outputs.dc {
        check_len(name, "∂C", backend.buffer_len(*dc), shape.n_samples * n, false)?;
    }
    for (what, buffer, want) in [
        ("∂U", &outputs.du, t * r),
        ("∂X", &outputs.dx, t * d_in),
        ("∂A_cat", &outputs.da_cat, r * d_in),
        ("∂B_cat", &outputs.db_cat, d_out * r),
    ] {
        if let Some(buffer) = buffer {
            check_len(name, what, backend.buffer_len(*buffer), want, false)?;
        }
    }
    check_len(
        name,
        "workspace",
        backend.buffer_len(outputs.work),
        workspace_len(variant, shape, train, backend.sm_count()),
        true,
    )?;

    let null = KernelArg::Ptr(0);
    let Outputs {
        dc,
        du,
        dx,
        da_cat,
        db_cat,
        work,
    } = outputs;
    let (g, x, u) = (
        backend.arg_in(inputs.g),
        backend.arg_in(inputs.x),
        backend.arg_in(inputs.u),
    );
    let (a_cat, b_cat, c) = (
        backend.arg_in(inputs.a_cat),
        backend.arg_in(inputs.b_cat),
        backend.arg_in(inputs.c),
    );
    let sample_of = backend.arg_in(&inputs.rows.sample_of);
    let tables = inputs.tables;
    let (module_of, col_scale) = (backend.arg_in(&tables.module_of), backend.arg_in(&tables.col_scale));
    let (mod_offsets, mod_scale) = (backend.arg_in(&tables.mod_offsets), backend.arg_in(&tables.mod_scale));
    let (mut du_buffer, mut da_buffer) = (du, da_cat);
    let dc = dc.map_or(null, |b| backend.arg_out(b));
    let du = du_buffer.as_deref_mut().map_or(null, |b| backend.arg_out(b));
    let dx = dx.map_or(null, |b| backend.arg_out(b));
    let da = da_buffer.as_deref_mut().map_or(null, |b| backend.arg_out(b));
    let db = db_cat.map_or(null, |b| backend.arg_out(b));
    let work = backend.arg_out(work);
    let i = |v: usize| KernelArg::I32(v as i32);
    for (step, dims) in launch_config(variant, shape, train, backend.sm_count()) {
        if step == Step::MmaDa {
            let params = super::gemm::GemmParams {
                shape: da_shape(shape),
                alpha: 1.0,
                beta: 0.0,
            };
            let (Some(du), Some(da)) = (du_buffer.as_deref(), da_buffer.as_deref_mut()) else {
                unreachable!("∂A_cat is planned only with ∂U and ∂A_cat present (checked above)")
            };
            super::gemm::launch::<T, B>(backend, super::gemm::Variant::MmaW64, &params, du, inputs.x, da)?;
            continue;
        }
        let gemv = match step {
            Step::GemvBackward {
                h_split,
                h_tiles,
                x_split,
                x_tiles,
                du: want_du,
                dc: want_dc,
                dx: want_dx,
            } => Some((
                GemvEntry::Backward,
                vec![
                    g,
                    b_cat,
                    u,
                    a_cat,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    work,
                    if want_dc { dc } else { null },
                    if want_du { du } else { null },
                    if want_dx { dx } else { null },
                    i(t),
                    i(d_out),
                    i(r),
                    i(d_in),
                    i(n),
                    i(usize::from(want_du)),
                    i(h_tiles),
                    i(h_split.splits),
                    i(h_split.chunk),
                    i(x_tiles),
                    i(x_split.splits),
                    i(x_split.chunk),
                ],
            )),
            Step::GemvZero { len } => Some((GemvEntry::Zero, vec![work, i(len)])),
            Step::GemvHidden { split, h, dc: want_dc } => Some((
                GemvEntry::Hidden,
                vec![
                    g,
                    b_cat,
                    u,
                    sample_of,
                    module_of,
                    col_scale,
                    if h { work } else { null },
                    if want_dc { dc } else { null },
                    i(t),
                    i(d_out),
                    i(r),
                    i(n),
                    i(split.chunk),
                ],
            )),
            Step::GemvDx { split } => Some((
                GemvEntry::Dx,
                vec![
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    a_cat,
                    work,
                    i(t),
                    i(r),
                    i(d_in),
                    i(n),
                    i(split.chunk),
                ],
            )),
            Step::GemvFinish {
                du: want_du,
                dx: want_dx,
            } => Some((
                GemvEntry::Finish,
                vec![
                    work,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    if want_du { du } else { null },
                    if want_dx { dx } else { null },
                    i(t),
                    i(r),
                    i(d_in),
                    i(n),
                ],
            )),
            _ => None,
        };
        // The H-with-∂C and the ∂X kernels' arguments, tiled (`cols`: their rank columns) or on
        // the tensor cores (None: all R).
        let hidden_args =
            |want_dc: bool, want_du: bool, cols: Option<(usize, usize)>, tickets: Option<KernelArg>, split: Split| {
                let (dc, du) = (if want_dc { dc } else { null }, if want_du { du } else { null });
                let mut head = vec![g, b_cat, u, c, sample_of, module_of, col_scale, dc, du, work];
                head.extend(tickets);
                head.extend([i(t), i(d_out), i(r), i(n)]);
                with_cols_and_chunk(head, cols, split)
            };
        let dx_args = |cols: Option<(usize, usize)>, tickets: Option<KernelArg>, split: Split| {
            let mut head = vec![du, a_cat, dx, work];
            head.extend(tickets);
            head.extend([i(t), i(r), i(d_in)]);
            with_cols_and_chunk(head, cols, split)
        };
        // The tensor-core kernels take the tile tickets after the workspace (`split_tickets`;
        // null for H when ∂U is not asked for: only ∂U is summed across splits).
        let tickets = |used: bool| -> Result<Option<KernelArg>, KernelError> {
            Ok(Some(if used { split_tickets(backend, &dims)? } else { null }))
        };
        let mma = match step {
            Step::MmaHidden {
                dc: want_dc,
                du: want_du,
                tile_rows,
                split,
            } => Some((
                mma_kernel(MmaEntry::Hidden.on_rows(tile_rows), T::DTYPE)?,
                hidden_args(want_dc, want_du, None, tickets(want_du)?, split),
            )),
            Step::MmaDx { tile_rows, split } => Some((
                mma_kernel(MmaEntry::Dx.on_rows(tile_rows), T::DTYPE)?,
                dx_args(None, tickets(true)?, split),
            )),
            Step::WgmmaHidden {
                dc: want_dc,
                du: want_du,
                split,
                wide,
            } => Some((
                wgmma_kernel(WgmmaEntry::Hidden, wide, T::DTYPE)?,
                hidden_args(want_dc, want_du, None, tickets(want_du)?, split),
            )),
            Step::WgmmaDx { split, wide } => Some((
                wgmma_kernel(WgmmaEntry::Dx, wide, T::DTYPE)?,
                dx_args(None, tickets(true)?, split),
            )),
            _ => None,
        };
        if let Some((kernel, args)) = mma {
            // SAFETY: each argument list follows its signature in cuda/compose_mma.cu
            // (`COMPOSE_MMA_ENTRIES`). G, B_cat, U, A_cat, ∂C, ∂U, ∂X were checked above against
            // the shape the kernels index; an output is null exactly where `train` does not ask
            // for it (the hidden kernel skips a null ∂C or ∂U; MmaDx is planned only with ∂X,
            // which implies ∂U, written by the hidden kernel — split, by the last split of each
            // tile — before it in stream order). A split hidden kernel writes splits × T × R f32
            // partials of ∂U (only when ∂U is asked for; the tickets are the backend's, one per
            // tile) and a split MmaDx splits × T × d_in, which the workspace holds
            // (workspace_len), each summed by its kernel's last split of each tile, the first
            // before the second overwrite them, in stream order. Tables come from the same ranks, token samples
            // were checked on upload; outputs are distinct and mutably borrowed.
            unsafe { backend.launch(&kernel, &dims, &args)? };
            continue;
        }
        if let Some((entry, args)) = gemv {
            // SAFETY: each argument list follows its signature in cuda/compose_gemv.cu. The
            // workspace holds at least the plan's `h_acc` (T × R, when ∂U is needed) followed by
            // `dx_acc` (T × d_in, when ∂X is: it implies ∂U), zeroed by the plan's first step
            // before any kernel adds into it (workspace_len). G, B_cat, U, A_cat, ∂C, ∂U, ∂X
            // were checked above against the shape; an output is null exactly where `train` does
            // not ask for it and the kernels skip null outputs. Tables come from the same ranks,
            // token samples were checked on upload; outputs are distinct and mutably borrowed.
            // `compose_gemv_backward` runs those steps in one cooperative launch, zeroing first.
            let kernel = gemv_kernel(entry, T::DTYPE)?;
            if kernel.cooperative {
                unsafe { launch_cooperative(backend, &kernel, &dims, &args)? };
            } else {
                unsafe { backend.launch(&kernel, &dims, &args)? };
            }
            continue;
        }
        let (entry, args): (Entry, Vec<KernelArg>) = match step {
            Step::HiddenNaive { j0, j1, du: want } => (
                Entry::HiddenNaive,
                vec![
                    g,
                    b_cat,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    work,
                    if want { du } else { null },
                    i(t),
                    i(d_out),
                    i(r),
                    i(n),
                    i(j0),
                    i(j1),
                ],
            ),
            Step::CoeffGradNaive { i0, i1 } => (
                Entry::CoeffGradNaive,
                vec![
                    work,
                    u,
                    sample_of,
                    mod_offsets,
                    mod_scale,
                    dc,
                    i(t),
                    i(r),
                    i(n),
                    i(shape.n_samples),
                    i(i0),
                    i(i1),
                ],
            ),
            Step::DxNaive { j0, j1 } => (Entry::DxNaive, vec![du, a_cat, dx, i(t), i(r), i(d_in), i(j0), i(j1)]),
            Step::DaNaive { j0, j1 } => (Entry::DaNaive, vec![du, x, da, i(t), i(r), i(d_in), i(j0), i(j1)]),
            Step::DbNaive { j0, j1 } | Step::DbTiled { j0, j1 } => (
                if matches!(step, Step::DbNaive { .. }) {
                    Entry::DbNaive
                } else {
                    Entry::DbTiled
                },
                vec![
                    g,
                    u,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    db,
                    i(t),
                    i(r),
                    i(d_out),
                    i(n),
                    i(j0),
                    i(j1),
                ],
            ),
            Step::CoeffGradTiled {
                j0,
                j1,
                split,
                dc: want_dc,
                du: want_du,
            } => (
                Entry::CoeffGradTiled,
                hidden_args(want_dc, want_du, Some((j0, j1)), None, split),
            ),
            Step::SumPartials { target, splits } => {
                let (out, width, ld, accumulate) = match target {
                    Target::DU => (du, r, r, 0),
                    Target::DX => (dx, d_in, d_in, 1),
                };
                // The one reduction kernel lives in the forward family.
                let kernel = super::compose_fwd::kernel(super::compose_fwd::Entry::SumPartials, T::DTYPE)?;
                let args = [work, i(splits), out, i(t), i(width), i(ld), i(0), i(accumulate)];
                // SAFETY: `compose_fwd_sum_partials` takes (work, splits, out, rows, width, ld,
                // col_off, accumulate); the workspace holds `splits` × T × width partials
                // (workspace_len) and `out` is ∂U (T × R) or ∂X (T × d_in), checked above.
                unsafe { backend.launch(&kernel, &dims, &args)? };
                continue;
            }
            Step::DxTiled { j0, j1, split } => (Entry::DxTiled, dx_args(Some((j0, j1)), None, split)),
            Step::DaTiled { j0, j1 } => (Entry::DaTiled, vec![du, x, da, i(t), i(r), i(d_in), i(j0), i(j1)]),
            Step::GemvBackward { .. }
            | Step::GemvZero { .. }
            | Step::GemvHidden { .. }
            | Step::GemvDx { .. }
            | Step::GemvFinish { .. }
            | Step::MmaHidden { .. }
            | Step::MmaDx { .. }
            | Step::WgmmaHidden { .. }
            | Step::WgmmaDx { .. }
            | Step::MmaDa => unreachable!("launched above"),
        };
        // SAFETY: each argument list follows its `COMPOSE_BWD_ENTRIES` signature in
        // cuda/compose_bwd.cu. Every buffer was checked above against the shape the kernels
        // index; an output is null only where `train` does not ask for it, and the plan launches
        // no kernel that writes or reads a null output (the tiled ∂C/∂U kernel skips null ones).
        // Tables come from the same ranks, token samples were checked on upload, and output
        // buffers are distinct and mutably borrowed.
        unsafe { backend.launch(&kernel(entry, T::DTYPE)?, &dims, &args)? };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::HARNESS_SM_COUNT;

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
    fn coefficient_gradients_alone_write_no_du() {
        let plan = launch_config(
            Variant::Fused,
            &shape(16, 4096, vec![16; 32]),
            Train::COEFFS,
            HARNESS_SM_COUNT,
        );
        assert!(plan.iter().all(|(s, _)| matches!(
            s,
            Step::CoeffGradTiled {
                dc: true,
                du: false,
                ..
            }
        )));
        assert_eq!(
            workspace_len(
                Variant::Fused,
                &shape(16, 4096, vec![16; 32]),
                Train::COEFFS,
                HARNESS_SM_COUNT
            ),
            1
        );
    }

    #[test]
    fn gemv_backward_plans() {
        let s = shape(4, 4096, vec![16; 32]);
        // ∂C alone: the hidden kernel with no workspace.
        let plan = launch_config(Variant::Gemv, &s, Train::COEFFS, HARNESS_SM_COUNT);
        assert!(
            matches!(plan[..], [(Step::GemvHidden { h: false, dc: true, .. }, _)]),
            "{plan:?}"
        );
        assert_eq!(workspace_len(Variant::Gemv, &s, Train::COEFFS, HARNESS_SM_COUNT), 1);
        // ∂C and ∂X: zero h_acc and dx_acc, hidden, dx, finish.
        let train = Train {
            input: true,
            coeffs: true,
            modules: false,
            base: false,
        };
        let plan = launch_config(Variant::Gemv, &s, train, HARNESS_SM_COUNT);
        let steps: Vec<Step> = plan.iter().map(|(step, _)| *step).collect();
        assert!(
            matches!(steps[0], Step::GemvZero { len } if len == 4 * 512 + 4 * 4096),
            "{steps:?}"
        );
        assert!(matches!(steps[1], Step::GemvHidden { h: true, dc: true, .. }));
        assert!(matches!(steps[2], Step::GemvDx { .. }));
        assert_eq!(steps[3], Step::GemvFinish { du: true, dx: true });
        assert_eq!(steps.len(), 4);
        // Above 16 tokens, the fused plan.
        let s = shape(17, 768, vec![16; 8]);
        assert_eq!(
            launch_config(Variant::Gemv, &s, Train::ALL, HARNESS_SM_COUNT),
            launch_config(Variant::Fused, &s, Train::ALL, HARNESS_SM_COUNT)
        );
    }

    /// The cooperative GEMV backward: Gemv's hidden and ∂X splits and its workspace in one
    /// launch (∂C alone: no workspace, no ∂U), the modules' steps after it; the fused plan above
    /// 16 tokens.
    #[test]
    fn gemv_coop_backward_plans() {
        let s = shape(4, 4096, vec![16; 32]);
        for train in [Train::COEFFS, Train::ALL, TRAIN_INPUT_COEFFS] {
            let gemv = launch_config(Variant::Gemv, &s, train, HARNESS_SM_COUNT);
            let coop = launch_config(Variant::GemvCoop, &s, train, HARNESS_SM_COUNT);
            let Some((
                Step::GemvBackward {
                    h_split, du, dc, dx, ..
                },
                _,
            )) = coop.first()
            else {
                panic!("{coop:?}")
            };
            assert_eq!(
                (*du, *dc, *dx),
                (train.input || train.modules, train.coeffs, train.input)
            );
            let hidden = gemv.iter().find_map(|(step, _)| match step {
                Step::GemvHidden { split, .. } => Some(*split),
                _ => None,
            });
            assert_eq!(hidden, Some(*h_split));
            // The rest (∂A_cat, ∂B_cat) as Gemv plans it.
            let tail = |plan: &[(Step, LaunchDims)]| {
                plan.iter()
                    .filter(|(step, _)| matches!(step, Step::DaTiled { .. } | Step::DbTiled { .. }))
                    .map(|(step, _)| *step)
                    .collect::<Vec<_>>()
            };
            assert_eq!(tail(&coop), tail(&gemv));
            assert_eq!(coop.len(), 1 + tail(&gemv).len());
            assert_eq!(
                workspace_len(Variant::GemvCoop, &s, train, HARNESS_SM_COUNT),
                workspace_len(Variant::Gemv, &s, train, HARNESS_SM_COUNT)
            );
        }
        let s = shape(17, 768, vec![16; 8]);
        assert_eq!(
            launch_config(Variant::GemvCoop, &s, Train::ALL, HARNESS_SM_COUNT),
            launch_config(Variant::Fused, &s, Train::ALL, HARNESS_SM_COUNT)
        );
    }

    const TRAIN_INPUT_COEFFS: Train = Train {
        input: true,
        coeffs: true,
        modules: false,
        base: false,
    };

    /// The Hopper variants: `hidden` on 128×128 tiles (R = 512 at T = 4096: 128 tiles, d_out
    /// split in two, the ∂U partials summed by each tile's last split; `wgmma_wide`: 64 tiles of
    /// 128×256, one block an SM, also two splits), ∂X unsplit (1,024 tiles; wide: 512), then
    /// mma's ∂A_cat and ∂B_cat.
    #[test]
    fn wgmma_backward_plans() {
        let s = shape(4096, 4096, vec![16; 32]);
        for (variant, wide, tiles_x, shared) in [
            (Variant::Wgmma, false, [4, 32], 64 * 1024),
            (Variant::WgmmaWide, true, [2, 16], 96 * 1024),
        ] {
            let plan = launch_config(variant, &s, Train::ALL, HARNESS_SM_COUNT);
            let steps: Vec<Step> = plan.iter().map(|(step, _)| *step).collect();
            let split = Split { chunk: 2048, splits: 2 };
            assert_eq!(
                steps[..2],
                [
                    Step::WgmmaHidden {
                        dc: true,
                        du: true,
                        split,
                        wide
                    },
                    Step::WgmmaDx {
                        split: Split::none(512),
                        wide
                    },
                ]
            );
            assert!(matches!(steps[2..], [Step::MmaDa, Step::DbTiled { .. }]), "{steps:?}");
            assert_eq!(
                (plan[0].1.grid, plan[0].1.dynamic_shared_bytes),
                ([tiles_x[0], 32, 2], shared)
            );
            assert_eq!(plan[1].1.grid, [tiles_x[1], 32, 1]);
            assert_eq!(workspace_len(variant, &s, Train::ALL, HARNESS_SM_COUNT), 2 * 4096 * 512);
        }
    }

    #[test]
    fn mma_backward_plans() {
        let s = shape(4096, 4096, vec![16; 32]);
        let steps = |train| -> Vec<Step> {
            launch_config(Variant::Mma, &s, train, HARNESS_SM_COUNT)
                .iter()
                .map(|(step, _)| *step)
                .collect()
        };
        // R = 512 at T = 4096: 128 tiles of 128 rows on 132 SMs, so 64-row tiles; 256 of them
        // need no split.
        let split = Split::none(4096);
        assert_eq!(
            steps(Train::COEFFS),
            vec![Step::MmaHidden {
                dc: true,
                du: false,
                tile_rows: 64,
                split
            }]
        );
        let all = steps(Train {
            base: false,
            ..Train::ALL
        });
        assert_eq!(
            all[..2],
            [
                Step::MmaHidden {
                    dc: true,
                    du: true,
                    tile_rows: 64,
                    split
                },
                Step::MmaDx {
                    tile_rows: 128,
                    split: Split::none(512)
                }
            ]
        );
        assert!(matches!(all[2..], [Step::MmaDa, Step::DbTiled { .. }]), "{all:?}");
        assert_eq!(workspace_len(Variant::Mma, &s, Train::ALL, HARNESS_SM_COUNT), 1);
        // T = 256, R = 512: 16 tiles of 64 rows, d_out in 16 splits of 256, ∂U summed from the
        // partials by each tile's last split before ∂X reads it; ∂X on 4 × 32 tiles of 64 rows,
        // R in 2 splits of 256 (also finished by each tile's last split: no SumPartials launch);
        // ∂C alone needs no workspace.
        let s = shape(256, 4096, vec![16; 32]);
        let plan = launch_config(Variant::Mma, &s, Train::ALL, HARNESS_SM_COUNT);
        let split = Split { chunk: 256, splits: 16 };
        assert_eq!(
            plan[0].0,
            Step::MmaHidden {
                dc: true,
                du: true,
                tile_rows: 64,
                split
            }
        );
        assert_eq!((plan[0].1.grid, plan[0].1.blocks()), ([4, 4, 16], 256));
        let split = Split { chunk: 256, splits: 2 };
        assert_eq!(plan[1].0, Step::MmaDx { tile_rows: 64, split });
        assert!(
            !plan.iter().any(|(step, _)| matches!(step, Step::SumPartials { .. })),
            "{plan:?}"
        );
        assert_eq!(
            workspace_len(Variant::Mma, &s, Train::ALL, HARNESS_SM_COUNT),
            2 * 256 * 4096 // as many as the hidden kernel's 16 × 256 × 512
        );
        let plan = launch_config(Variant::Mma, &s, Train::COEFFS, HARNESS_SM_COUNT);
        assert_eq!(plan.len(), 1, "{plan:?}");
        assert_eq!(workspace_len(Variant::Mma, &s, Train::COEFFS, HARNESS_SM_COUNT), 1);
    }

    #[test]
    fn loop_variant_launches_per_module() {
        let plan = launch_config(
            Variant::Loop,
            &shape(16, 768, vec![16; 8]),
            Train::ALL,
            HARNESS_SM_COUNT,
        );
        assert_eq!(plan.len(), 4 * 8);
    }
}
