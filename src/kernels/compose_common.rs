//! What both composition families (`compose_fwd`, `compose_bwd`) share: the variants, the tile,
//! the problem [`Shape`], the per-column and per-module [`Tables`], the checked token → sample
//! [`TokenRows`], the split-K plan, the launch grids and the argument checks.

use super::{check_len, Backend, DType, Kernel, KernelError, LaunchDims};
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
    /// For T ≤ [`GEMV_MAX_T`] (decode-like steps, few-shot batches): shrink, expand, `H` with the
    /// fused `∂C`, and `∂X` as batched GEMVs streaming `A_cat` and `B_cat` once for all tokens
    /// (`cuda/compose_gemv.cu`), split-K sized from the SM count with atomics into an f32
    /// workspace (the forward at T = 1: one slice per split, summed in order by the expand,
    /// [`GEMV_SLICES_MAX`]). For larger T it runs the fused plan. `∂A_cat`, `∂B_cat` use the fused
    /// variant's tiled kernels.
    Gemv,
    /// [`Variant::Gemv`]'s kernels with the steps of each pass in one cooperative launch
    /// (`compose_gemv_forward`, `compose_gemv_backward`): its blocks take the steps' blocks in
    /// turn and meet at grid barriers where the separate launches waited for the previous kernel
    /// (a dependent launch cost ~4.5 µs on the H200). The same sums; T ≤ [`GEMV_MAX_T`], the
    /// fused plan above.
    GemvCoop,
    /// Tensor cores for large T, bf16 storage only (`cuda/compose_mma.cu`): the fused plan's
    /// shrink (scale epilogue), expand, `H` with the fused `∂C`, and `∂X` as `mma.sync.m16n8k16`
    /// GEMMs (f32 accumulators) with a 3-stage `cp.async` pipeline and `ldmatrix` loads; 128×128
    /// tiles (64×128 where those leave SMs idle), and split-K where even those do
    /// ([`mma_plan`]). `∂A_cat = ∂Uᵀ X` is the GEMM family's `mma_w64` variant; `∂B_cat` uses the
    /// fused variant's tiled kernel (it re-forms `Z = U ∘ D` in f32 on load; the tensor cores
    /// would need Z rounded to bf16 first, a second rounding).
    Mma,
    /// Hopper's warpgroup MMA (sm_90 only on a GPU; `cuda/compose_wgmma.cu`, PTX for
    /// compute_90a, run on the CPU harness through its wgmma emulation), bf16 storage: the
    /// shrink (scale epilogue), expand, `H` with the fused `∂C`, and `∂X` as
    /// `wgmma.mma_async.m64n128k16` GEMMs on 128×128 tiles of 2 warpgroups
    /// (`cuda/wgmma_tile.cuh`), split-K where the tiles leave SMs idle ([`wgmma_step`]).
    /// `∂A_cat` and `∂B_cat` are [`Variant::Mma`]'s steps.
    Wgmma,
    /// [`Variant::Wgmma`] on 128×256 tiles (`wgmma.mma_async.m64n256k16`, 128 f32 accumulators a
    /// thread, 96 KiB of dynamic shared memory, one block an SM): a quarter less L2-to-SM
    /// traffic per FLOP, the limit the `wgmma` predictions name; split-K over one block an SM
    /// ([`wgmma_step`]). The same kernels' bodies (`cuda/compose_wgmma.cu`, `TBN` = 256). A step
    /// whose output columns the wide tiles would pad more than the narrow ones
    /// ([`wide_tiles_fit`]: R = 128 at N = 8, r = 16) runs [`Variant::Wgmma`]'s kernel.
    WgmmaWide,
}

/// Every variant: tests and benches iterate this list (skipping the storage types a variant
/// does not apply to, [`Variant::applies`]).
pub const ALL: &[Variant] = &[
    Variant::Naive,
    Variant::Loop,
    Variant::Fused,
    Variant::Gemv,
    Variant::GemvCoop,
    Variant::Mma,
    Variant::Wgmma,
    Variant::WgmmaWide,
];

/// Fewest tokens for which [`choose_variant`] takes the tensor cores (bf16 storage): the
/// smallest T the first H200 run measured them at, where they already beat the fused variant
/// (d = 4096, forward: N = 32 145.8 µs against 234.8, N = 128 182.2 against 740.1; backward
/// likewise). Below it the crossover is unmeasured (predicted lower since the shrink and hidden
/// split K: `benches/README.md`), so the fused variant keeps those shapes.
pub const MMA_MIN_T: usize = 256;

/// The variant for a call with `t` tokens and `dtype` storage: [`Variant::Gemv`] up to
/// [`GEMV_MAX_T`] tokens (the memory-bound regime), [`Variant::Mma`] from [`MMA_MIN_T`] tokens
/// for bf16 storage, [`Variant::Fused`] otherwise.
pub fn choose_variant(t: usize, dtype: DType) -> Variant {
    if t <= GEMV_MAX_T {
        Variant::Gemv
    } else if t >= MMA_MIN_T && Variant::Mma.applies(dtype) {
        Variant::Mma
    } else {
        Variant::Fused
    }
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Loop => "loop",
            Variant::Fused => "fused",
            Variant::Gemv => "gemv",
            Variant::GemvCoop => "gemv_coop",
            Variant::Mma => "mma",
            Variant::Wgmma => "wgmma",
            Variant::WgmmaWide => "wgmma_wide",
        }
    }

    /// Whether the variant has kernels for storage `dtype`: tensor cores take 16-bit inputs and
    /// the composition families are built for bf16, so [`Variant::Mma`] and the `wgmma` variants
    /// are bf16 only. Tests and benches skip the other combinations explicitly; launching one is
    /// an error.
    pub fn applies(self, dtype: DType) -> bool {
        !(matches!(self, Variant::Mma | Variant::Wgmma | Variant::WgmmaWide) && dtype != DType::BF16)
    }

    /// Built for sm_90a ([`Variant::Wgmma`], [`Variant::WgmmaWide`]): runs where
    /// [`Backend::runs_sm90a`] says so.
    pub fn needs_sm90a(self) -> bool {
        matches!(self, Variant::Wgmma | Variant::WgmmaWide)
    }

    /// Whether `backend` can run the variant's kernels ([`Variant::needs_sm90a`]): tests and
    /// benches skip it, saying so, where it cannot.
    pub fn runs_on<B: Backend>(self, backend: &B) -> bool {
        !self.needs_sm90a() || backend.runs_sm90a()
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

/// Most tokens the GEMV kernels take (`MAX_T` in `cuda/compose_gemv.cu`); [`Variant::Gemv`]
/// runs the fused plan above it.
pub const GEMV_MAX_T: usize = 16;
/// Most f32 of split partials (splits × T × R) the GEMV forward keeps as one slice per split
/// rather than adding them with atomics into a zeroed T × R: every expand block sums all of
/// them while staging Z, so 64 KB each (16 MB of L2 reads over d_out = 4096's 256 blocks, ~1 µs
/// spread over the SMs) against the zeroing launch it saves (the first H200 run: ~4.5 µs a
/// dependent launch). It holds at T = 1 for N = 8, 32, 128 at d = 4096 on 132 SMs (8192 f32).
pub const GEMV_SLICES_MAX: usize = 16_384;
/// Threads of a GEMV block (`__launch_bounds__(256)`).
pub const GEMV_THREADS: u32 = 256;
/// Static shared memory of every GEMV kernel but `zero` and `finish`: f32 `smem[16 × 512]`
/// (the staged operand, then the block's reduction).
pub const GEMV_SHARED_BYTES: u32 = 4 * 16 * 512;
/// Rows of A_cat per shrink block (2 warps × 16 row pairs) and of B_cat per expand block.
pub const GEMV_SHRINK_ROWS: usize = 32;
pub const GEMV_EXPAND_ROWS: usize = 16;
/// A row-GEMV split covers a multiple of 16 elements of K; a column-GEMV split a multiple of
/// the block's 8 warps' rows.
const GEMV_K_ALIGN: usize = 16;
const GEMV_ROW_ALIGN: usize = 8;

/// Columns of one column-GEMV block (`hidden`, `dx`) for `t` tokens: the warp's 32 lanes are
/// TG = 1, 2 or 4 groups of 4 tokens, each lane 8 columns.
pub fn gemv_column_tile(t: usize) -> usize {
    let token_groups = if t <= 4 {
        1
    } else if t <= 8 {
        2
    } else {
        4
    };
    32 / token_groups * 8
}

/// Split K of a GEMV into chunks (multiples of `align`) so that `tiles` blocks × splits come
/// as close to [`BLOCKS_PER_SM`] blocks per SM of a device with `sm_count` SMs as they can
/// without passing it: the GEMV kernels hold two blocks an SM (registers), so one block more
/// than that starts a second wave, which the first H200 profile showed costing up to half the
/// kernel's time (64 row tiles × 5 splits = 320 blocks on 264 slots).
pub fn gemv_split(tiles: usize, k: usize, align: usize, sm_count: usize) -> Split {
    let wanted = (BLOCKS_PER_SM * sm_count.max(1)) / tiles.max(1);
    let splits = wanted.clamp(1, k.div_ceil(align).max(1));
    let chunk = k.div_ceil(splits).div_ceil(align) * align;
    let splits = k.div_ceil(chunk.max(1));
    if splits <= 1 {
        Split::none(k)
    } else {
        Split { chunk, splits }
    }
}

/// The row-GEMV split of K (shrink: K = d_in).
pub(crate) fn gemv_row_split(tiles: usize, k: usize, sm_count: usize) -> Split {
    gemv_split(tiles, k, GEMV_K_ALIGN, sm_count)
}

/// The column-GEMV split of the rows (hidden: d_out, ∂X: R).
pub(crate) fn gemv_col_split(tiles: usize, k: usize, sm_count: usize) -> Split {
    gemv_split(tiles, k, GEMV_ROW_ALIGN, sm_count)
}

/// Grid of a GEMV kernel: (tiles, splits) blocks of 256 threads.
/// `args` (a composition kernel's operands and sizes) followed by what every tiled and
/// tensor-core step takes last: the rank columns `[j0, j1)` it covers — the tiled kernels only
/// (`cols`: Some); the tensor-core ones cover all R — then its split-K chunk. One argument
/// list per kernel shape serves both ABIs.
/// The tickets argument of a tensor-core kernel that may split K (`lc::last_split`): one ticket
/// per tile of the grid's x × y from [`Backend::tickets`] when `dims` splits K along z, a null
/// pointer otherwise (the kernel then never reads it).
pub(crate) fn split_tickets<B: Backend>(backend: &B, dims: &LaunchDims) -> Result<super::KernelArg, KernelError> {
    if dims.grid[2] > 1 {
        backend.tickets(dims.grid[0] as usize * dims.grid[1] as usize)
    } else {
        Ok(super::KernelArg::Ptr(0))
    }
}

pub(crate) fn with_cols_and_chunk(
    mut args: Vec<super::KernelArg>,
    cols: Option<(usize, usize)>,
    split: Split,
) -> Vec<super::KernelArg> {
    let i = |v: usize| super::KernelArg::I32(v as i32);
    if let Some((j0, j1)) = cols {
        args.extend([i(j0), i(j1)]);
    }
    args.push(i(split.chunk));
    args
}

/// A cooperative GEMV launch ([`Variant::GemvCoop`]) for `items` work items: 1-D, one block per
/// item as planned; [`launch_cooperative`] caps it at the co-resident blocks.
pub(crate) fn gemv_coop_dims(items: usize) -> LaunchDims {
    gemv_dims(items.max(1), 1)
}

/// Launches cooperative `kernel` with `dims.grid[0]` capped at what the backend can keep
/// co-resident (its blocks take the work items in turn, so any grid computes the same).
///
/// # Safety
/// As [`Backend::launch`].
pub(crate) unsafe fn launch_cooperative<B: Backend>(
    backend: &B,
    kernel: &Kernel,
    dims: &LaunchDims,
    args: &[super::KernelArg],
) -> Result<(), KernelError> {
    let resident = backend.cooperative_blocks(kernel, dims.threads_per_block(), dims.dynamic_shared_bytes)?;
    if resident == 0 {
        return Err(KernelError::Unavailable(format!(
            "{}: no block fits an SM",
            kernel.name
        )));
    }
    let mut dims = *dims;
    dims.grid[0] = dims.grid[0].min(u32::try_from(resident).unwrap_or(u32::MAX));
    // SAFETY: the caller's guarantees; the grid only shrinks, and the kernel strides over its
    // work items by gridDim.x.
    unsafe { backend.launch(kernel, &dims, args) }
}

pub(crate) fn gemv_dims(tiles: usize, splits: usize) -> LaunchDims {
    let dims = LaunchDims {
        grid: [
            u32::try_from(tiles).expect("grid x fits u32"),
            u32::try_from(splits).expect("grid y fits u32"),
            1,
        ],
        block: [GEMV_THREADS, 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(GEMV_SHARED_BYTES);
    dims
}

/// The kernels of `cuda/compose_gemv.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvEntry {
    /// Zeroes the f32 workspace the split-K atomics add into (storage-independent).
    Zero,
    Shrink,
    Expand,
    Hidden,
    Dx,
    Finish,
    /// The forward in one cooperative launch ([`Variant::GemvCoop`]).
    Forward,
    /// The backward's h, ∂C, ∂X and finish in one cooperative launch.
    Backward,
}

/// The compiled kernel `compose_gemv_<entry>_<dtype>` (`compose_gemv_zero` for any dtype), or an
/// error for f16.
pub fn gemv_kernel(entry: GemvEntry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_gemv as e;
    use DType::{BF16, F32};
    use GemvEntry::*;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, dtype) {
        (_, DType::F16) => return Err(not_built("compose_gemv")),
        (Zero, _) => kernel_entry!(e::lc_run_compose_gemv_zero),
        (Shrink, F32) => kernel_entry!(e::lc_run_compose_gemv_shrink_f32),
        (Shrink, BF16) => kernel_entry!(e::lc_run_compose_gemv_shrink_bf16),
        (Expand, F32) => kernel_entry!(e::lc_run_compose_gemv_expand_f32),
        (Expand, BF16) => kernel_entry!(e::lc_run_compose_gemv_expand_bf16),
        (Hidden, F32) => kernel_entry!(e::lc_run_compose_gemv_hidden_f32),
        (Hidden, BF16) => kernel_entry!(e::lc_run_compose_gemv_hidden_bf16),
        (Dx, F32) => kernel_entry!(e::lc_run_compose_gemv_dx_f32),
        (Dx, BF16) => kernel_entry!(e::lc_run_compose_gemv_dx_bf16),
        (Finish, F32) => kernel_entry!(e::lc_run_compose_gemv_finish_f32),
        (Finish, BF16) => kernel_entry!(e::lc_run_compose_gemv_finish_bf16),
        (Forward, F32) => kernel_entry!(e::lc_run_compose_gemv_forward_f32),
        (Forward, BF16) => kernel_entry!(e::lc_run_compose_gemv_forward_bf16),
        (Backward, F32) => kernel_entry!(e::lc_run_compose_gemv_backward_f32),
        (Backward, BF16) => kernel_entry!(e::lc_run_compose_gemv_backward_bf16),
    };
    Ok(Kernel {
        family: "compose_gemv",
        name,
        harness_entry,
        cooperative: matches!(entry, Forward | Backward),
    })
}

/// The tensor-core variant's tiling, mirroring `compose_mma` in `cuda/compose_mma.cu`: a BM×BN
/// output tile per block of 4 warps of 64×64 (8 of 32×32 on 64-row tiles: [`MmaEntry::threads`]),
/// K steps of BK, STAGES shared-memory stages of bf16 A and B tiles in one static array (48 KiB,
/// also the ∂C epilogue's `part[64][129]` f32).
pub mod mma_tile {
    pub const BM: usize = 128;
    pub const BN: usize = 128;
    pub const BK: usize = 32;
    pub const STAGES: usize = 3;
    pub const THREADS: u32 = 256;
    /// A block of 2 × 2 warps of 64×64 (the GEMM family's `mma_w64` layout).
    pub const THREADS_W64: u32 = 128;
    pub const SHARED_BYTES: u32 = (STAGES * (BM * BK + BN * BK) * 2) as u32;
}

/// Rows of the block tile of a tensor-core kernel over a (T, `r`) output (shrink and hidden: R
/// columns; expand and ∂X: d_out or d_in): 128, or 64 where 128-row tiles would give fewer
/// blocks than the device has SMs (R ≤ 512 at T = 4096 on an H200: 128 tiles of one 8-warp
/// block per SM, which the first H200 run measured at 157 TFLOP/s for the shrink's GEMM shape
/// against 241 at full grids; every output at small T).
pub fn mma_tile_rows(t: usize, r: usize, sm_count: usize) -> usize {
    if t.div_ceil(mma_tile::BM) * r.div_ceil(mma_tile::BN) < sm_count {
        mma_tile::BM / 2
    } else {
        mma_tile::BM
    }
}

/// The shortest K range a tensor-core split covers: four K steps, twice the pipeline's depth of
/// copies in flight, so that most of a split's time is in the steady loop.
pub const MMA_MIN_CHUNK: usize = 4 * mma_tile::BK;

/// Split K of a tensor-core GEMM whose `tiles` output tiles leave SMs idle, so
/// that tiles × splits come as close to [`BLOCKS_PER_SM`] blocks per SM as they can without
/// passing it (as [`gemv_split`]: a second wave costs up to a whole kernel), each split at
/// least [`MMA_MIN_CHUNK`] long and a multiple of the K step. Where the tiles fill the GPU (the
/// first H200 run's large-T shapes but R = 128) it does not split. Each split costs a T × R f32
/// partial written and read again by the finishing kernel.
pub fn mma_split(tiles: usize, k: usize, sm_count: usize) -> Split {
    split_over_slots(tiles, k, BLOCKS_PER_SM * sm_count.max(1))
}

/// [`mma_split`] for kernels that fit `slots` blocks on the whole device at once (the
/// `wgmma_wide` kernels of both families: one an SM).
pub fn split_over_slots(tiles: usize, k: usize, slots: usize) -> Split {
    let wanted = slots.max(1) / tiles.max(1);
    let splits = wanted.clamp(1, (k / MMA_MIN_CHUNK).max(1));
    let chunk = k.div_ceil(splits).div_ceil(mma_tile::BK) * mma_tile::BK;
    let splits = k.div_ceil(chunk.max(1));
    if splits <= 1 {
        Split::none(k)
    } else {
        Split { chunk, splits }
    }
}

/// The tiling and K split of a tensor-core kernel over a (T, `cols`) output with inner dimension
/// `k` (shrink: (T, R), K = d_in; hidden: (T, R), K = d_out; expand: (T, d_out), K = R; ∂X:
/// (T, d_in), K = R): [`mma_tile_rows`], then [`mma_split`] over the tiles of that height.
pub fn mma_plan(t: usize, cols: usize, k: usize, sm_count: usize) -> (usize, Split) {
    let tile_rows = mma_tile_rows(t, cols, sm_count);
    let tiles = t.div_ceil(tile_rows) * cols.div_ceil(mma_tile::BN);
    (tile_rows, mma_split(tiles, k, sm_count))
}

/// One tensor-core step: [`mma_plan`] for `entry` over a (T, `cols`) output with inner dimension
/// `k`, and the launch of its kernel on tiles of that height ([`MmaEntry::on_rows`]): grid
/// (⌈cols / 128⌉, ⌈T / tile_rows⌉, splits), block [`MmaEntry::threads`]. Returns the tile rows,
/// the split and the dims.
pub(crate) fn mma_step(
    entry: MmaEntry,
    t: usize,
    cols: usize,
    k: usize,
    sm_count: usize,
) -> (usize, Split, LaunchDims) {
    let (tile_rows, split) = mma_plan(t, cols, k, sm_count);
    let dims = LaunchDims {
        grid: tile_grid(t, cols, tile_rows, mma_tile::BN, split.splits),
        block: [entry.on_rows(tile_rows).threads(), 1, 1],
        dynamic_shared_bytes: 0,
    };
    dims.assert_valid(mma_tile::SHARED_BYTES);
    (tile_rows, split, dims)
}

/// The kernels of `cuda/compose_mma.cu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaEntry {
    /// U, Z = (X A_catᵀ) ∘ D, tiles of 128 rows (4 warps of 64×64).
    Shrink,
    /// The same on tiles of 64 rows ([`mma_tile_rows`]).
    Shrink64,
    /// Y += Z B_catᵀ, tiles of 128 rows (4 warps of 64×64).
    Expand,
    /// The same on tiles of 64 rows.
    Expand64,
    /// H = G B_cat in registers: ∂U = H ∘ D and the fused ∂C, tiles of 128 rows (4 warps of
    /// 64×64).
    Hidden,
    /// The same on tiles of 64 rows.
    Hidden64,
    /// ∂X += ∂U A_cat, tiles of 128 rows (4 warps of 64×64).
    Dx,
    /// The same on tiles of 64 rows.
    Dx64,
}

impl MmaEntry {
    /// The kernel for block tiles of `tile_rows` rows (the plan's [`mma_tile_rows`]): this one
    /// for 128, its 64-row twin for 64.
    pub fn on_rows(self, tile_rows: usize) -> MmaEntry {
        match (tile_rows == mma_tile::BM, self) {
            (true, entry) => entry,
            (false, MmaEntry::Shrink | MmaEntry::Shrink64) => MmaEntry::Shrink64,
            (false, MmaEntry::Expand | MmaEntry::Expand64) => MmaEntry::Expand64,
            (false, MmaEntry::Hidden | MmaEntry::Hidden64) => MmaEntry::Hidden64,
            (false, MmaEntry::Dx | MmaEntry::Dx64) => MmaEntry::Dx64,
        }
    }

    /// Threads of the kernel's block (its `__launch_bounds__`): 128-row tiles run 4 warps of
    /// 64×64 (a third less shared-memory traffic per FLOP than 8 of 64×32: the GEMM family's
    /// `mma_w64` against `mma`); the 64-row tiles keep 8 warps of 32×32.
    pub fn threads(self) -> u32 {
        match self {
            MmaEntry::Shrink | MmaEntry::Expand | MmaEntry::Hidden | MmaEntry::Dx => mma_tile::THREADS_W64,
            MmaEntry::Shrink64 | MmaEntry::Expand64 | MmaEntry::Hidden64 | MmaEntry::Dx64 => mma_tile::THREADS,
        }
    }
}

/// The compiled kernel `compose_mma_<entry>_bf16`, or an error for f32 and f16 storage (tensor
/// cores take 16-bit inputs; the composition families are built for bf16).
pub fn mma_kernel(entry: MmaEntry, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_mma as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match entry {
        MmaEntry::Shrink => kernel_entry!(e::lc_run_compose_mma_shrink_bf16),
        MmaEntry::Shrink64 => kernel_entry!(e::lc_run_compose_mma_shrink64_bf16),
        MmaEntry::Expand => kernel_entry!(e::lc_run_compose_mma_expand_bf16),
        MmaEntry::Expand64 => kernel_entry!(e::lc_run_compose_mma_expand64_bf16),
        MmaEntry::Hidden => kernel_entry!(e::lc_run_compose_mma_hidden_bf16),
        MmaEntry::Hidden64 => kernel_entry!(e::lc_run_compose_mma_hidden64_bf16),
        MmaEntry::Dx => kernel_entry!(e::lc_run_compose_mma_dx_bf16),
        MmaEntry::Dx64 => kernel_entry!(e::lc_run_compose_mma_dx64_bf16),
    };
    tensor_core_kernel("compose_mma", (name, harness_entry), dtype)
}

/// A tensor-core composition kernel of `family` for storage `dtype`, or the error for f32 and
/// f16 (tensor cores take 16-bit inputs; the composition families are built for bf16).
fn tensor_core_kernel(
    family: &'static str,
    (name, harness_entry): (&'static str, super::HarnessEntry),
    dtype: DType,
) -> Result<Kernel, KernelError> {
    if dtype != DType::BF16 {
        return Err(KernelError::Argument {
            kernel: family,
            message: format!("the tensor-core composition kernels take bf16 storage, not {dtype:?}"),
        });
    }
    Ok(Kernel {
        family,
        name,
        harness_entry,
        cooperative: false,
    })
}

/// Grid over a (T, `cols`) output in tiles of `tile_rows` × `tile_cols`, `splits` K chunks along z.
fn tile_grid(t: usize, cols: usize, tile_rows: usize, tile_cols: usize, splits: usize) -> [u32; 3] {
    [
        u32::try_from(cols.div_ceil(tile_cols)).expect("grid x fits u32"),
        u32::try_from(t.div_ceil(tile_rows)).expect("grid y fits u32"),
        u32::try_from(splits).expect("grid z fits u32"),
    ]
}

/// The kernels of the `wgmma` variant (`cuda/compose_wgmma.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgmmaEntry {
    /// U, Z = (X A_catᵀ) ∘ D.
    Shrink,
    /// Y += Z B_catᵀ.
    Expand,
    /// H = G B_cat in registers: ∂U = H ∘ D and the fused ∂C.
    Hidden,
    /// ∂X += ∂U A_cat.
    Dx,
}

/// The compiled kernel `compose_wgmma_<entry>_bf16` (`compose_wgmma_wide_<entry>_bf16` on the
/// wide tile), or an error for f32 and f16 storage.
pub fn wgmma_kernel(entry: WgmmaEntry, wide: bool, dtype: DType) -> Result<Kernel, KernelError> {
    use super::entries::compose_wgmma as e;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (entry, wide) {
        (WgmmaEntry::Shrink, false) => kernel_entry!(e::lc_run_compose_wgmma_shrink_bf16),
        (WgmmaEntry::Expand, false) => kernel_entry!(e::lc_run_compose_wgmma_expand_bf16),
        (WgmmaEntry::Hidden, false) => kernel_entry!(e::lc_run_compose_wgmma_hidden_bf16),
        (WgmmaEntry::Dx, false) => kernel_entry!(e::lc_run_compose_wgmma_dx_bf16),
        (WgmmaEntry::Shrink, true) => kernel_entry!(e::lc_run_compose_wgmma_wide_shrink_bf16),
        (WgmmaEntry::Expand, true) => kernel_entry!(e::lc_run_compose_wgmma_wide_expand_bf16),
        (WgmmaEntry::Hidden, true) => kernel_entry!(e::lc_run_compose_wgmma_wide_hidden_bf16),
        (WgmmaEntry::Dx, true) => kernel_entry!(e::lc_run_compose_wgmma_wide_dx_bf16),
    };
    tensor_core_kernel("compose_wgmma", (name, harness_entry), dtype)
}

/// One `wgmma` step over a (T, `cols`) output with inner dimension `k`: 128×128 tiles, K split
/// as [`mma_split`] splits the `mma` kernels' (where the tiles leave SMs idle; every `wgmma`
/// kernel fits [`BLOCKS_PER_SM`] blocks an SM: ≤ 128 registers a thread, 64 KiB of shared
/// memory each); grid (⌈cols / 128⌉, ⌈T / 128⌉, splits), 256 threads, the pipeline's 64 KiB of
/// dynamic shared memory. `wide` ([`Variant::WgmmaWide`]): 128×256 tiles where they cover no
/// more padded columns than 128×128 ones ([`wide_tiles_fit`]), one block an SM (164–255
/// registers, 96 KiB), K split to fill one block an SM. Returns whether the step is wide.
pub(crate) fn wgmma_step(t: usize, cols: usize, k: usize, sm_count: usize, wide: bool) -> (Split, LaunchDims, bool) {
    use super::gemm::{mma_tile::THREADS_WGMMA, Variant as Gemm};
    // The GEMM family's variant of the same tile holds its shape, blocks an SM and shared memory.
    let wide = wide && wide_tiles_fit(cols);
    let tile = if wide { Gemm::WgmmaWide } else { Gemm::Wgmma };
    let split = tile.split_k(t, cols, k, sm_count);
    let (bm, bn) = tile.block_tile();
    let dims = LaunchDims {
        grid: tile_grid(t, cols, bm as usize, bn as usize, split.splits),
        block: [THREADS_WGMMA, 1, 1],
        dynamic_shared_bytes: tile.dynamic_shared_bytes(),
    };
    dims.assert_valid(0);
    (split, dims, wide)
}

/// Whether 256-column tiles cover `cols` output columns with no more padding than 128-column
/// ones (an even number of the latter): at R = 128 (N = 8) a wide tile would do twice the
/// tensor-core work of the narrow one and hold one block an SM instead of two.
pub fn wide_tiles_fit(cols: usize) -> bool {
    cols.div_ceil(mma_tile::BN) % 2 == 0
}

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

/// The composition families are built for f32 and bf16 storage only.
pub(crate) fn not_built(family: &'static str) -> KernelError {
    KernelError::Argument {
        kernel: family,
        message: "the composition kernels are built for f32 and bf16 storage".into(),
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
