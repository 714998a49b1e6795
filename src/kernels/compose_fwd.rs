//! Composition forward: `U = X A_catᵀ`, `Z = U ∘ D`, `Y += Z B_catᵀ` for N modules of any ranks
//! with per-sample coefficient rows (`cuda/compose_fwd.cu` has the shapes, the semantics and the
//! variants). CPU reference: [`crate::compose::reference::forward`] (the f64 specification) and
//! [`crate::compose::fast::forward`] (the fused CPU path with the same two-GEMM structure).
//!
//! Also the pieces both composition families share: the problem [`Shape`], the per-column and
//! per-module [`Tables`], the checked token → sample [`TokenRows`], and the split-K plan.

use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};
use crate::compose::Rows;

/// The kernel variants, in the order of `cuda/compose_fwd.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per output element; two launches.
    Naive,
    /// Per module one shrink and one expand launch (2N launches): the serving-system baseline.
    Loop,
    /// All modules as one rank-R product: tiled shrink with the scale epilogue, tiled expand,
    /// split-K when the tiles cannot fill the GPU.
    Fused,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[Variant::Naive, Variant::Loop, Variant::Fused];

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Loop => "loop",
            Variant::Fused => "fused",
        }
    }
}

/// Block tile of every tiled composition kernel: `lc::ComposeTile` in `cuda/common.cuh`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: usize,
    pub bn: usize,
    pub bk: usize,
    pub tm: usize,
    pub tn: usize,
}

pub const TILE: Tile = Tile {
    bm: 32,
    bn: 64,
    bk: 16,
    tm: 2,
    tn: 4,
};
/// Threads of a tiled block: (BM/TM)·(BN/TN); `__launch_bounds__(256)` in the `.cu` files.
pub const TILE_THREADS: u32 = ((TILE.bm / TILE.tm) * (TILE.bn / TILE.tn)) as u32;
/// Static shared memory of the tiled main loop: f32 `a_tile[BK][BM + 4]` and `b_tile[BK][BN + 4]`.
pub const TILE_SHARED_BYTES: u32 = (4 * TILE.bk * (TILE.bm + 4) + 4 * TILE.bk * (TILE.bn + 4)) as u32;
/// Naive kernels: 16×16 threads, one per output element.
const NAIVE_BLOCK: u32 = 16;
/// 1-D kernels (reductions): threads per block.
const LINEAR_BLOCK: u32 = 256;
/// A split-K plan aims for at least this many blocks per SM of the device it runs on
/// ([`Backend::sm_count`]).
pub const BLOCKS_PER_SM: usize = 2;
/// The shortest K range one split covers (two K steps of the tile).
const MIN_CHUNK: usize = 2 * TILE.bk;

/// One composed-layer call: T tokens, `n_samples` coefficient rows, modules of `ranks`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shape {
    pub t: usize,
    pub d_in: usize,
    pub d_out: usize,
    pub n_samples: usize,
    pub ranks: Vec<usize>,
}

impl Shape {
    pub fn n(&self) -> usize {
        self.ranks.len()
    }

    /// R = Σ r_i.
    pub fn r_total(&self) -> usize {
        self.ranks.iter().sum()
    }

    /// Start of each module's columns in the stacked rank dimension, plus R at the end.
    pub fn offsets(&self) -> Vec<usize> {
        std::iter::once(0)
            .chain(self.ranks.iter().scan(0, |acc, &r| {
                *acc += r;
                Some(*acc)
            }))
            .collect()
    }

    /// Nothing to compute: no tokens, no rank columns, or an empty side.
    pub fn is_empty(&self) -> bool {
        self.t == 0 || self.r_total() == 0 || self.d_in == 0 || self.d_out == 0
    }

    /// Every dimension and the products that index buffers fit the kernels' int32 arithmetic
    /// and the grid limits.
    pub(crate) fn check(&self, kernel: &'static str) -> Result<(), KernelError> {
        let big = [
            self.t * self.d_in.max(self.d_out).max(self.r_total()),
            self.r_total() * self.d_in.max(self.d_out),
            self.n_samples * self.n(),
        ];
        if big.iter().any(|&v| v > i32::MAX as usize) {
            return Err(KernelError::Argument {
                kernel,
                message: format!("{self:?}: too large for int32 indexing"),
            });
        }
        let rows = self.t.max(self.d_out).max(self.r_total());
        if rows.div_ceil(NAIVE_BLOCK as usize) > super::MAX_GRID_YZ as usize {
            return Err(KernelError::Argument {
                kernel,
                message: format!("{self:?}: exceeds the grid limit"),
            });
        }
        Ok(())
    }
}

/// An index table as the kernels read it (`const int*`).
pub fn index_table(values: &[usize]) -> Vec<i32> {
    values
        .iter()
        .map(|&v| i32::try_from(v).expect("index fits int32"))
        .collect()
}

/// Per rank column `module_of[j]` (int32) and `col_scale[j] = s_i`; per module `mod_offsets`
/// (N + 1, int32) and `mod_scale` (N). Built from the ranks, so the kernels' lookups stay in
/// bounds by construction.
pub struct Tables<B: Backend> {
    pub ranks: Vec<usize>,
    pub module_of: B::Buffer<i32>,
    pub col_scale: B::Buffer<f32>,
    pub mod_offsets: B::Buffer<i32>,
    pub mod_scale: B::Buffer<f32>,
}

impl<B: Backend> Tables<B> {
    pub fn upload(backend: &B, ranks: &[usize], scales: &[f32]) -> Result<Self, KernelError> {
        assert_eq!(ranks.len(), scales.len(), "one scale per module");
        let mut module_of = Vec::new();
        let mut col_scale = Vec::new();
        let mut offsets = vec![0];
        for (i, (&r, &s)) in ranks.iter().zip(scales).enumerate() {
            module_of.extend(std::iter::repeat_n(i, r));
            col_scale.extend(std::iter::repeat_n(s, r));
            offsets.push(offsets[i] + r);
        }
        // Buffers of zero elements are still valid allocations to point at.
        fn nonempty<T: Default>(mut v: Vec<T>) -> Vec<T> {
            if v.is_empty() {
                v.push(T::default());
            }
            v
        }
        Ok(Tables {
            ranks: ranks.to_vec(),
            module_of: backend.upload(&nonempty(index_table(&module_of)))?,
            col_scale: backend.upload(&nonempty(col_scale))?,
            mod_offsets: backend.upload(&index_table(&offsets))?,
            mod_scale: backend.upload(&nonempty(scales.to_vec()))?,
        })
    }
}

/// Token → coefficient row on the device (int32), checked against `n_samples` on upload: the
/// kernels index C with it.
pub struct TokenRows<B: Backend> {
    pub sample_of: B::Buffer<i32>,
    pub n_samples: usize,
    pub len: usize,
}

impl<B: Backend> TokenRows<B> {
    pub fn upload(backend: &B, rows: Rows) -> Result<Self, KernelError> {
        rows.check(rows.sample_of.len()).map_err(|e| KernelError::Argument {
            kernel: "compose",
            message: e.to_string(),
        })?;
        let mut table = index_table(rows.sample_of);
        if table.is_empty() {
            table.push(0);
        }
        Ok(TokenRows {
            sample_of: backend.upload(&table)?,
            n_samples: rows.n_samples,
            len: rows.sample_of.len(),
        })
    }
}

/// K split into `splits` chunks of `chunk` (a multiple of the tile's K step).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub chunk: usize,
    pub splits: usize,
}

impl Split {
    /// The whole of K in one block.
    pub fn none(k: usize) -> Split {
        Split {
            chunk: k.max(1),
            splits: 1,
        }
    }
}

/// Split K so that `tiles` output tiles become at least [`BLOCKS_PER_SM`] blocks per SM of a
/// device with `sm_count` SMs, each split covering at least two K steps.
pub fn split_k(tiles: usize, k: usize, sm_count: usize) -> Split {
    let wanted = (BLOCKS_PER_SM * sm_count.max(1)).div_ceil(tiles.max(1));
    if wanted <= 1 || k <= MIN_CHUNK {
        return Split::none(k);
    }
    // Rounded down to whole K steps, so that there are at least `wanted` splits.
    let chunk = (k / wanted / TILE.bk * TILE.bk).max(MIN_CHUNK);
    let splits = k.div_ceil(chunk);
    if splits <= 1 {
        Split::none(k)
    } else {
        Split { chunk, splits }
    }
}

/// Grid of a tiled kernel over a (rows, cols) output with `splits` K chunks.
pub(crate) fn tiled_dims(rows: usize, cols: usize, splits: usize) -> LaunchDims {
    let dims = LaunchDims {
        grid: [
            u32::try_from(cols.div_ceil(TILE.bn)).expect("grid x fits u32"),
            u32::try_from(rows.div_ceil(TILE.bm)).expect("grid y fits u32"),
            u32::try_from(splits).expect("grid z fits u32"),
        ],
        block: [TILE_THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(TILE_SHARED_BYTES + super::compose_bwd::EPILOGUE_SHARED_BYTES);
    dims
}

/// Grid of a naive kernel: one 16×16 block per 16×16 outputs, x over `cols`.
pub(crate) fn naive_dims(rows: usize, cols: usize) -> LaunchDims {
    let dims = LaunchDims {
        grid: [
            u32::try_from(cols.div_ceil(NAIVE_BLOCK as usize)).expect("grid x fits u32"),
            u32::try_from(rows.div_ceil(NAIVE_BLOCK as usize)).expect("grid y fits u32"),
            1,
        ],
        block: [NAIVE_BLOCK, NAIVE_BLOCK, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

/// Grid of a 1-D kernel over `n` elements.
pub(crate) fn linear_dims(n: usize) -> LaunchDims {
    let dims = LaunchDims {
        grid: [
            u32::try_from(n.div_ceil(LINEAR_BLOCK as usize)).expect("grid x fits u32"),
            1,
            1,
        ],
        block: [LINEAR_BLOCK, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(0);
    dims
}

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

/// f32 elements of the workspace `variant` needs for `shape` (split-K partials); at least 1.
pub fn workspace_len(variant: Variant, shape: &Shape, sm_count: usize) -> usize {
    let t = shape.t;
    launch_config(variant, shape, sm_count)
        .iter()
        .map(|(step, _)| match *step {
            Step::ShrinkTiled { j0, j1, split } if split.splits > 1 => split.splits * t * (j1 - j0),
            Step::ExpandTiled { split, .. } if split.splits > 1 => split.splits * t * shape.d_out,
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
    use crate::harness::entries::compose_fwd as e;
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
    })
}

/// The composition families are built for f32 and bf16 storage only.
pub(crate) fn not_built(family: &'static str) -> KernelError {
    KernelError::Argument {
        kernel: family,
        message: "the composition kernels are built for f32 and bf16 storage".into(),
    }
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

/// `Err(Argument)` unless `len` is `want` (or at least `want` when `at_least`).
pub(crate) fn check_len(
    kernel: &'static str,
    what: &str,
    len: usize,
    want: usize,
    at_least: bool,
) -> Result<(), KernelError> {
    let ok = if at_least { len >= want } else { len == want };
    if ok {
        Ok(())
    } else {
        Err(KernelError::Argument {
            kernel,
            message: format!(
                "{what} has {len} elements, needs {}{want}",
                if at_least { "at least " } else { "" }
            ),
        })
    }
}

/// Checks the tables and token rows against the shape: lengths the kernels index.
pub(crate) fn check_tables<B: Backend>(
    backend: &B,
    kernel: &'static str,
    shape: &Shape,
    c_len: usize,
    rows: &TokenRows<B>,
    tables: &Tables<B>,
) -> Result<(), KernelError> {
    shape.check(kernel)?;
    if tables.ranks != shape.ranks {
        return Err(KernelError::Argument {
            kernel,
            message: format!("tables for ranks {:?}, shape has {:?}", tables.ranks, shape.ranks),
        });
    }
    if rows.len != shape.t || rows.n_samples != shape.n_samples {
        return Err(KernelError::Argument {
            kernel,
            message: format!(
                "token rows for {} tokens and {} samples, shape has {} and {}",
                rows.len, rows.n_samples, shape.t, shape.n_samples
            ),
        });
    }
    debug_assert!(backend.buffer_len(&rows.sample_of) >= shape.t);
    check_len(kernel, "C", c_len, shape.n_samples * shape.n(), false)
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
            Step::ShrinkTiled { j0, j1, split } => (
                Entry::ShrinkTiled,
                vec![
                    x,
                    a_cat,
                    c,
                    sample_of,
                    module_of,
                    col_scale,
                    u,
                    z,
                    work,
                    i(t),
                    i(d_in),
                    i(r),
                    i(n),
                    i(j0),
                    i(j1),
                    i(split.chunk),
                ],
            ),
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
            Step::ExpandTiled { j0, j1, split } => (
                Entry::ExpandTiled,
                vec![z, b_cat, y, work, i(t), i(r), i(d_out), i(j0), i(j1), i(split.chunk)],
            ),
            Step::SumPartials { splits } => (
                Entry::SumPartials,
                vec![work, i(splits), y, i(t), i(d_out), i(d_out), i(0), i(1)],
            ),
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
