//! GEMM: `C = α·op(A)·op(B) + β·C`, row-major, op = N or T (`cuda/gemm.cu` has the shapes,
//! the semantics and the variants). CPU reference: [`reference`].

use super::{Backend, DType, Element, Kernel, KernelArg, KernelError, LaunchDims};

/// The kernel variants, in the order of `cuda/gemm.cu`'s numbered list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// One thread per output element.
    Naive,
    /// 64×64 shared-memory tile, 4×4 register block per thread.
    Tiled64,
    /// 128×128 shared-memory tile, 8×8 register block per thread.
    Tiled128,
    /// Tensor cores (`mma.sync.m16n8k16`, f32 accumulators), f16/bf16 storage only: 128×128
    /// tile, 8 warps, 3-stage `cp.async` pipeline, `ldmatrix` fragment loads; K split across
    /// blocks where the tiles leave SMs idle ([`mma_split`]: one launch, a workspace allocated
    /// per call, C formed by each tile's last split).
    Mma,
    /// [`Variant::Mma`]'s tile, pipeline and split-K in 4 warps of 64×64 (4×8 mma tiles each)
    /// instead of 8 of 64×32: a third less shared-memory traffic per FLOP (8 `ldmatrix.x4` per
    /// 32 mma a warp and k16 step, against 6 per 16), 128 threads a block.
    MmaW64,
    /// Hopper's warpgroup MMA (`wgmma.mma_async.m64n128k16`, f32 accumulators), f16/bf16
    /// storage, sm_90 only on a GPU (`cuda/gemm_wgmma.cu`, built for compute_90a; the CPU
    /// harness runs it through its wgmma emulation): 128×128 tile of 2 warpgroups, operands from
    /// shared memory in the no-swizzle core-matrix layout, 4-stage `cp.async` pipeline in 64 KiB
    /// of dynamic shared memory, one wgmma group kept in flight; split-K as [`Variant::Mma`]
    /// ([`mma_split`], [`Variant::splits_k`]: 2 blocks an SM, 127 registers a thread, 138 for
    /// the split kernel).
    Wgmma,
    /// [`Variant::Wgmma`] on a 128×256 tile (`wgmma.mma_async.m64n256k16`, 128 f32 accumulators
    /// a thread): a quarter less L2-to-SM traffic per FLOP (24 KB per K step of 2.1 MFLOP,
    /// against 16 KB per 1.05), the traffic the `wgmma` predictions name as its limit. 96 KiB of
    /// dynamic shared memory (4 stages), 216 registers a thread: one block an SM; split-K by the
    /// same rule over one block an SM ([`mma_split`]).
    WgmmaWide,
}

/// Every variant: tests and benches iterate this list.
pub const ALL: &[Variant] = &[
    Variant::Naive,
    Variant::Tiled64,
    Variant::Tiled128,
    Variant::Mma,
    Variant::MmaW64,
    Variant::Wgmma,
    Variant::WgmmaWide,
];

/// Block tile of a tiled variant; mirrors the template arguments in `cuda/gemm.cu`'s
/// `GEMM_ENTRIES` (a GPU test checks the shared-memory size the driver reports).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tile {
    pub bm: u32,
    pub bn: u32,
    pub bk: u32,
    pub tm: u32,
    pub tn: u32,
}

/// `a_tile` is padded by 4 floats per row (`PAD` in `cuda/gemm.cu`).
const A_TILE_PAD: u32 = 4;
/// Block of the naive variant: 16×16 threads, one per output element.
const NAIVE_BLOCK: u32 = 16;

/// The tensor-core variants' tiling, mirroring `gemm::mma` in `cuda/gemm.cu`: a BM×BN block
/// tile of 8 warps (`mma`; 4 for `mma_w64`: [`THREADS_W64`](mma_tile::THREADS_W64)), K steps of
/// BK, STAGES shared-memory stages of 16-bit A and B tiles.
pub mod mma_tile {
    pub const BM: u32 = 128;
    pub const BN: u32 = 128;
    pub const BK: u32 = 32;
    pub const STAGES: u32 = 3;
    pub const THREADS: u32 = 256;
    /// Threads of a `mma_w64` block: 2 × 2 warps of 64×64.
    pub const THREADS_W64: u32 = 128;
    /// Shared memory per block: STAGES × (BM·BK + BN·BK) 2-byte elements (48 KiB).
    pub const SHARED_BYTES: u32 = STAGES * (BM * BK + BN * BK) * 2;
    /// Threads of a `wgmma` block: 2 warpgroups of 64×128.
    pub const THREADS_WGMMA: u32 = 256;
    /// `wgmma`'s dynamic shared memory: 4 stages of 16-bit A and B tiles (64 KiB).
    pub const WGMMA_SHARED_BYTES: u32 = 4 * (BM * BK + BN * BK) * 2;
    /// Columns of `wgmma_wide`'s block tile (m64n256k16).
    pub const BN_WIDE: u32 = 256;
    /// `wgmma_wide`'s dynamic shared memory: 4 stages of a 128-row A and a 256-row B tile (96 KiB).
    pub const WGMMA_WIDE_SHARED_BYTES: u32 = 4 * (BM * BK + BN_WIDE * BK) * 2;
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Naive => "naive",
            Variant::Tiled64 => "tiled64",
            Variant::Tiled128 => "tiled128",
            Variant::Mma => "mma",
            Variant::MmaW64 => "mma_w64",
            Variant::Wgmma => "wgmma",
            Variant::WgmmaWide => "wgmma_wide",
        }
    }

    /// Whether the variant has a kernel for storage `dtype`: tensor cores take f16/bf16 only.
    /// Tests and benches skip the other combinations explicitly.
    pub fn applies(self, dtype: DType) -> bool {
        !(self.splits_k() && dtype == DType::F32)
    }

    /// The `mma.sync` variants ([`Variant::Mma`], [`Variant::MmaW64`]): 16-bit storage, one
    /// 128×128 tile and pipeline, split-K where the tiles leave SMs idle ([`mma_split`]).
    /// ([`Variant::Wgmma`] and [`Variant::WgmmaWide`], also 16-bit only, are not: their own
    /// family and shared memory.)
    pub fn is_tensor_core(self) -> bool {
        matches!(self, Variant::Mma | Variant::MmaW64)
    }

    /// The variants that split K where their tiles leave SMs idle ([`mma_split`]): the
    /// tensor-core ones and the `wgmma` ones.
    pub fn splits_k(self) -> bool {
        self.is_tensor_core() || self.needs_sm90a()
    }

    /// Built for sm_90a ([`Variant::Wgmma`], [`Variant::WgmmaWide`]): runs where
    /// [`Backend::runs_sm90a`] says so.
    pub fn needs_sm90a(self) -> bool {
        matches!(self, Variant::Wgmma | Variant::WgmmaWide)
    }

    /// Blocks an SM holds at once (registers and shared memory, from ptxas): what [`mma_split`]
    /// fills. Two for the 128×128 tensor-core tiles, one for [`Variant::WgmmaWide`].
    pub fn blocks_per_sm(self) -> usize {
        if self == Variant::WgmmaWide {
            1
        } else {
            super::compose_common::BLOCKS_PER_SM
        }
    }

    /// [`mma_split`] over an m × n output with inner dimension k: the variant's tiles
    /// ([`Variant::block_tile`]) against its [`Variant::blocks_per_sm`] slots on `sm_count` SMs.
    /// The composition's `wgmma` steps plan with it too.
    pub fn split_k(self, m: usize, n: usize, k: usize, sm_count: usize) -> super::compose_common::Split {
        let (bm, bn) = self.block_tile();
        let tiles = m.div_ceil(bm as usize) * n.div_ceil(bn as usize);
        super::compose_common::split_over_slots(tiles, k, self.blocks_per_sm() * sm_count.max(1))
    }

    /// Whether `backend` can run the variant's kernels ([`Variant::needs_sm90a`]): tests and
    /// benches skip it, saying so, where it cannot.
    pub fn runs_on<B: Backend>(self, backend: &B) -> bool {
        !self.needs_sm90a() || backend.runs_sm90a()
    }

    pub fn tile(self) -> Option<Tile> {
        match self {
            Variant::Naive | Variant::Mma | Variant::MmaW64 | Variant::Wgmma | Variant::WgmmaWide => None,
            Variant::Tiled64 => Some(Tile {
                bm: 64,
                bn: 64,
                bk: 16,
                tm: 4,
                tn: 4,
            }),
            Variant::Tiled128 => Some(Tile {
                bm: 128,
                bn: 128,
                bk: 8,
                tm: 8,
                tn: 8,
            }),
        }
    }

    /// Static shared memory per block: the f32 tiles `a_tile[BK][BM + PAD]`, `b_tile[BK][BN]`
    /// of the tiled variants; the 16-bit pipeline stages of the tensor-core one. (The `wgmma`
    /// variants' stages are dynamic: [`Variant::dynamic_shared_bytes`].)
    pub fn static_shared_bytes(self) -> u32 {
        if self.needs_sm90a() {
            return 0;
        }
        if self.is_tensor_core() {
            return mma_tile::SHARED_BYTES;
        }
        self.tile()
            .map_or(0, |t| 4 * (t.bk * (t.bm + A_TILE_PAD) + t.bk * t.bn))
    }

    /// Dynamic shared memory per launch: the `wgmma` variants' 4 pipeline stages, 64 KiB
    /// (`wgmma_wide`: 96 KiB; their descriptors address the shared window's first 256 KiB,
    /// where the harness keeps dynamic memory; past 48 KiB the GPU backend opts the kernel in).
    pub fn dynamic_shared_bytes(self) -> u32 {
        match self {
            Variant::Wgmma => mma_tile::WGMMA_SHARED_BYTES,
            Variant::WgmmaWide => mma_tile::WGMMA_WIDE_SHARED_BYTES,
            _ => 0,
        }
    }

    /// (rows, columns) of C per block.
    pub fn block_tile(self) -> (u32, u32) {
        match (self, self.tile()) {
            (Variant::Mma | Variant::MmaW64 | Variant::Wgmma, _) => (mma_tile::BM, mma_tile::BN),
            (Variant::WgmmaWide, _) => (mma_tile::BM, mma_tile::BN_WIDE),
            (_, Some(t)) => (t.bm, t.bn),
            (_, None) => (NAIVE_BLOCK, NAIVE_BLOCK),
        }
    }
}

/// Problem shape: op(A) is (m, k), op(B) is (k, n), C is (m, n).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// A is stored (k, m) instead of (m, k).
    pub trans_a: bool,
    /// B is stored (n, k) instead of (k, n).
    pub trans_b: bool,
}

/// Everything one launch computes: `C = alpha·op(A)·op(B) + beta·C`; beta = 0 overwrites C
/// without reading it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmParams {
    pub shape: GemmShape,
    pub alpha: f32,
    pub beta: f32,
}

/// Grid and block of `variant` for `shape`. Pure; panics on a shape the kernels cannot take
/// (m or n zero, or past the grid limits) — [`launch`] checks those first and returns errors.
pub fn launch_config(variant: Variant, shape: &GemmShape) -> LaunchDims {
    assert!(shape.m >= 1 && shape.n >= 1, "empty output {}×{}", shape.m, shape.n);
    let (tile_m, tile_n, block) = match variant.tile() {
        None if variant == Variant::Mma => (mma_tile::BM, mma_tile::BN, [mma_tile::THREADS, 1, 1]),
        None if variant == Variant::MmaW64 => (mma_tile::BM, mma_tile::BN, [mma_tile::THREADS_W64, 1, 1]),
        None if variant.needs_sm90a() => {
            let (bm, bn) = variant.block_tile();
            (bm, bn, [mma_tile::THREADS_WGMMA, 1, 1])
        }
        None => (NAIVE_BLOCK, NAIVE_BLOCK, [NAIVE_BLOCK, NAIVE_BLOCK, 1]),
        Some(t) => {
            assert!(
                t.bm % t.tm == 0 && t.bn % t.tn == 0,
                "{t:?}: register block must divide the tile"
            );
            (t.bm, t.bn, [(t.bm / t.tm) * (t.bn / t.tn), 1, 1])
        }
    };
    let blocks_n = shape.n.div_ceil(tile_n as usize);
    let blocks_m = shape.m.div_ceil(tile_m as usize);
    let dims = LaunchDims {
        grid: [
            u32::try_from(blocks_n).expect("grid x fits u32"),
            u32::try_from(blocks_m).expect("grid y fits u32"),
            1,
        ],
        block,
        dynamic_shared_bytes: variant.dynamic_shared_bytes(),
    };
    dims.assert_valid(variant.static_shared_bytes());
    dims
}

/// Useful FLOPs (2mnk) and the fewest bytes moved: A and B read once, C written once and,
/// when beta ≠ 0, read once.
pub fn flops_bytes(params: &GemmParams, dtype: DType) -> (f64, f64) {
    let GemmShape { m, n, k, .. } = params.shape;
    let (m, n, k) = (m as f64, n as f64, k as f64);
    let c_passes = if params.beta != 0.0 { 2.0 } else { 1.0 };
    let bytes = (m * k + k * n + c_passes * m * n) * dtype.size_bytes() as f64;
    (2.0 * m * n * k, bytes)
}

/// The compiled kernel of `variant` for storage `dtype` (`gemm_<variant>_<dtype>`); `None`
/// where the variant does not apply ([`Variant::applies`]).
pub fn kernel(variant: Variant, dtype: DType) -> Option<Kernel> {
    use super::entries::gemm as e;
    use super::entries::gemm_wgmma as w;
    let (name, harness_entry): (&'static str, super::HarnessEntry) = match (variant, dtype) {
        (Variant::Naive, DType::F32) => kernel_entry!(e::lc_run_gemm_naive_f32),
        (Variant::Naive, DType::F16) => kernel_entry!(e::lc_run_gemm_naive_f16),
        (Variant::Naive, DType::BF16) => kernel_entry!(e::lc_run_gemm_naive_bf16),
        (Variant::Tiled64, DType::F32) => kernel_entry!(e::lc_run_gemm_tiled64_f32),
        (Variant::Tiled64, DType::F16) => kernel_entry!(e::lc_run_gemm_tiled64_f16),
        (Variant::Tiled64, DType::BF16) => kernel_entry!(e::lc_run_gemm_tiled64_bf16),
        (Variant::Tiled128, DType::F32) => kernel_entry!(e::lc_run_gemm_tiled128_f32),
        (Variant::Tiled128, DType::F16) => kernel_entry!(e::lc_run_gemm_tiled128_f16),
        (Variant::Tiled128, DType::BF16) => kernel_entry!(e::lc_run_gemm_tiled128_bf16),
        (Variant::Mma, DType::F16) => kernel_entry!(e::lc_run_gemm_mma_f16),
        (Variant::Mma, DType::BF16) => kernel_entry!(e::lc_run_gemm_mma_bf16),
        (Variant::MmaW64, DType::F16) => kernel_entry!(e::lc_run_gemm_mma_w64_f16),
        (Variant::MmaW64, DType::BF16) => kernel_entry!(e::lc_run_gemm_mma_w64_bf16),
        (Variant::Wgmma, DType::F16) => return Some(wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_f16))),
        (Variant::Wgmma, DType::BF16) => return Some(wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_bf16))),
        (Variant::WgmmaWide, DType::F16) => return Some(wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_wide_f16))),
        (Variant::WgmmaWide, DType::BF16) => {
            return Some(wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_wide_bf16)));
        }
        (Variant::Mma | Variant::MmaW64 | Variant::Wgmma | Variant::WgmmaWide, DType::F32) => return None,
    };
    Some(gemm_kernel((name, harness_entry)))
}

/// A kernel of `cuda/gemm.cu`.
fn gemm_kernel((name, harness_entry): (&'static str, super::HarnessEntry)) -> Kernel {
    Kernel {
        family: "gemm",
        name,
        harness_entry,
        cooperative: false,
    }
}

/// A kernel of `cuda/gemm_wgmma.cu` (its own family: PTX for compute_90a).
fn wgmma_kernel((name, harness_entry): (&'static str, super::HarnessEntry)) -> Kernel {
    Kernel {
        family: "gemm_wgmma",
        name,
        harness_entry,
        cooperative: false,
    }
}

/// The split-K twin of a splitting variant's kernel ([`Variant::splits_k`]):
/// `gemm_mma_split_<dtype>`, `gemm_mma_w64_split_<dtype>`, `gemm_wgmma_split_<dtype>` or
/// `gemm_wgmma_wide_split_<dtype>` (each split's partial to the workspace, and each tile's last
/// split to finish forms C from them); `None` for f32 or another variant.
fn mma_split_kernel(variant: Variant, dtype: DType) -> Option<Kernel> {
    use super::entries::gemm as e;
    use super::entries::gemm_wgmma as w;
    Some(match (variant, dtype) {
        (Variant::Mma, DType::F16) => gemm_kernel(kernel_entry!(e::lc_run_gemm_mma_split_f16)),
        (Variant::Mma, DType::BF16) => gemm_kernel(kernel_entry!(e::lc_run_gemm_mma_split_bf16)),
        (Variant::MmaW64, DType::F16) => gemm_kernel(kernel_entry!(e::lc_run_gemm_mma_w64_split_f16)),
        (Variant::MmaW64, DType::BF16) => gemm_kernel(kernel_entry!(e::lc_run_gemm_mma_w64_split_bf16)),
        (Variant::Wgmma, DType::F16) => wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_split_f16)),
        (Variant::Wgmma, DType::BF16) => wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_split_bf16)),
        (Variant::WgmmaWide, DType::F16) => wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_wide_split_f16)),
        (Variant::WgmmaWide, DType::BF16) => wgmma_kernel(kernel_entry!(w::lc_run_gemm_wgmma_wide_split_bf16)),
        _ => return None,
    })
}

/// How a splitting variant ([`Variant::splits_k`]) splits K for `shape` on a device of
/// `sm_count` SMs: where its tiles (128×128; 128×256 for [`Variant::WgmmaWide`]) leave the
/// [`Variant::blocks_per_sm`] slots of the SMs idle (decode's 16 × 4096 × 4096: 32 tiles, each walking K in 128 dependent
/// steps — the first H200 run measured 127 µs, cuBLAS 19), K in chunks
/// ([`compose_common::mma_split`](super::compose_common::mma_split)): the split kernel writes
/// each chunk's f32 partial to a workspace of splits × m × n that [`launch`] allocates per call,
/// and the last split of each tile to finish forms `C = alpha·Σ + beta·C` from them, the splits
/// added in order (one launch).
pub fn mma_split(variant: Variant, shape: &GemmShape, sm_count: usize) -> super::compose_common::Split {
    variant.split_k(shape.m, shape.n, shape.k, sm_count)
}

fn check_shape<T: Element, B: Backend>(
    backend: &B,
    kernel: &Kernel,
    shape: &GemmShape,
    a: &B::Buffer<T>,
    b: &B::Buffer<T>,
    c: &B::Buffer<T>,
) -> Result<(), KernelError> {
    let error = |message: String| KernelError::Argument {
        kernel: kernel.name,
        message,
    };
    let GemmShape { m, n, k, .. } = *shape;
    if m == 0 || n == 0 {
        return Err(error(format!("empty output {m}×{n}")));
    }
    if [m, n, k].iter().any(|&d| d > i32::MAX as usize) {
        return Err(error(format!("{m}×{n}×{k}: dimensions must fit i32")));
    }
    for (what, len, want) in [
        ("A", backend.buffer_len(a), m * k),
        ("B", backend.buffer_len(b), k * n),
        ("C", backend.buffer_len(c), m * n),
    ] {
        if len != want {
            return Err(error(format!("{what} has {len} elements, {m}×{n}×{k} needs {want}")));
        }
    }
    if m.div_ceil(16) > super::MAX_GRID_YZ as usize {
        return Err(error(format!("m = {m} exceeds the grid limit")));
    }
    Ok(())
}

/// `C = alpha·op(A)·op(B) + beta·C` with `variant` on `backend` (asynchronous on the GPU).
pub fn launch<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    params: &GemmParams,
    a: &B::Buffer<T>,
    b: &B::Buffer<T>,
    c: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = kernel(variant, T::DTYPE).ok_or_else(|| KernelError::Argument {
        kernel: "gemm",
        message: format!(
            "the {} variant has no {:?} kernel (tensor cores take f16 or bf16)",
            variant.name(),
            T::DTYPE
        ),
    })?;
    let shape = &params.shape;
    check_shape::<T, B>(backend, &kernel, shape, a, b, c)?;
    if variant.splits_k() {
        let split = mma_split(variant, shape, backend.sm_count());
        if split.splits > 1 {
            return launch_mma_split(backend, variant, params, split, a, b, c);
        }
    }
    let dims = launch_config(variant, shape);
    let args = [
        backend.arg_in(a),
        backend.arg_in(b),
        backend.arg_out(c),
        KernelArg::I32(shape.m as i32),
        KernelArg::I32(shape.n as i32),
        KernelArg::I32(shape.k as i32),
        KernelArg::I32(shape.trans_a as i32),
        KernelArg::I32(shape.trans_b as i32),
        KernelArg::F32(params.alpha),
        KernelArg::F32(params.beta),
    ];
    // SAFETY: the arguments follow `GEMM_ENTRY`'s parameter list (A, B, C, M, N, K, trans_a,
    // trans_b, alpha, beta); check_shape verified each buffer holds exactly the elements the
    // kernel indexes for this shape, and C is a distinct, mutably borrowed buffer.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// A splitting variant with K in `split.splits` chunks: one launch, the partials into a workspace
/// allocated here (freed in stream order when it drops), C formed by each tile's last split from
/// them (a ticket a tile, [`Backend::tickets`]).
fn launch_mma_split<T: Element, B: Backend>(
    backend: &B,
    variant: Variant,
    params: &GemmParams,
    split: super::compose_common::Split,
    a: &B::Buffer<T>,
    b: &B::Buffer<T>,
    c: &mut B::Buffer<T>,
) -> Result<(), KernelError> {
    let kernel = mma_split_kernel(variant, T::DTYPE).expect("the splitting variants apply to 16-bit storage");
    let shape = &params.shape;
    let (m, n) = (shape.m, shape.n);
    let mut work = backend.alloc::<f32>(split.splits * m * n)?;
    let mut dims = launch_config(variant, shape);
    dims.grid[2] = u32::try_from(split.splits).expect("splits fit u32");
    dims.assert_valid(variant.static_shared_bytes());
    let tickets = super::compose_common::split_tickets(backend, &dims)?;
    let i = |v: usize| KernelArg::I32(v as i32);
    let args = [
        backend.arg_in(a),
        backend.arg_in(b),
        backend.arg_out(c),
        backend.arg_out(&mut work),
        tickets,
        i(m),
        i(n),
        i(shape.k),
        i(usize::from(shape.trans_a)),
        i(usize::from(shape.trans_b)),
        KernelArg::F32(params.alpha),
        KernelArg::F32(params.beta),
        i(split.chunk),
    ];
    // SAFETY: the arguments follow `gemm_mma_split_*`'s parameter list (A, B, C, work, tickets,
    // M, N, K, trans_a, trans_b, alpha, beta, chunk); check_shape verified A, B and C hold exactly
    // the elements the kernel indexes, C distinct and mutably borrowed; `work` holds splits × m ×
    // n f32, one m × n slice per split of the grid's z, and the backend's tickets one per tile of
    // the grid's x × y.
    unsafe { backend.launch(&kernel, &dims, &args) }
}

/// The reference: plain loops, f64 accumulation of the stored (already rounded) inputs, no
/// rounding of the result. Returns C as f64, (m, n).
pub fn reference<T: Element>(params: &GemmParams, a: &[T], b: &[T], c: &[T]) -> Vec<f64> {
    let GemmShape {
        m,
        n,
        k,
        trans_a,
        trans_b,
    } = params.shape;
    let op_a = |i: usize, p: usize| f64::from(if trans_a { a[p * m + i] } else { a[i * k + p] }.to_f32()); // (m, k)
    let op_b = |p: usize, j: usize| f64::from(if trans_b { b[j * k + p] } else { b[p * n + j] }.to_f32()); // (k, n)
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k).map(|p| op_a(i, p) * op_b(p, j)).sum();
            let previous = if params.beta != 0.0 {
                f64::from(params.beta) * f64::from(c[i * n + j].to_f32())
            } else {
                0.0
            };
            out[i * n + j] = f64::from(params.alpha) * dot + previous;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Names come from the harness symbols (`kernel_entry!`): the PTX name is the symbol
    /// without `lc_run_`, as `extern "C" __global__` names it in cuda/*.cu.
    #[test]
    fn kernel_names_match_the_cuda_entries() {
        assert_eq!(
            kernel(Variant::Tiled128, DType::BF16).unwrap().name,
            "gemm_tiled128_bf16"
        );
        assert_eq!(kernel(Variant::Mma, DType::F16).unwrap().name, "gemm_mma_f16");
        assert!(kernel(Variant::Mma, DType::F32).is_none() && !Variant::Mma.applies(DType::F32));
        assert_eq!(kernel(Variant::MmaW64, DType::BF16).unwrap().name, "gemm_mma_w64_bf16");
        assert!(kernel(Variant::MmaW64, DType::F32).is_none() && !Variant::MmaW64.applies(DType::F32));
        let split = mma_split_kernel(Variant::MmaW64, DType::F16).unwrap();
        assert_eq!(split.name, "gemm_mma_w64_split_f16");
        let k = super::super::compose_bwd::kernel(super::super::compose_bwd::Entry::CoeffGradTiled, DType::F32);
        assert_eq!(k.unwrap().name, "compose_bwd_coeff_grad_tiled_f32");
    }

    proptest! {
        // The grid covers every output element, with no block entirely outside C, and every
        // launch respects the CUDA limits (asserted inside launch_config).
        #[test]
        fn grid_covers_every_output(m in 1usize..5000, n in 1usize..5000, k in 0usize..100) {
            let shape = GemmShape { m, n, k, trans_a: false, trans_b: false };
            for &variant in ALL {
                let dims = launch_config(variant, &shape);
                let (tile_m, tile_n) = variant.block_tile();
                let (tile_m, tile_n) = (tile_m as usize, tile_n as usize);
                let (gx, gy) = (dims.grid[0] as usize, dims.grid[1] as usize);
                prop_assert!(gx * tile_n >= n && (gx - 1) * tile_n < n, "{variant:?} {dims:?}");
                prop_assert!(gy * tile_m >= m && (gy - 1) * tile_m < m, "{variant:?} {dims:?}");
            }
        }
    }

    #[test]
    fn variants_use_their_launch_bounds_and_fit_shared_memory() {
        let shape = GemmShape {
            m: 1,
            n: 1,
            k: 1,
            trans_a: false,
            trans_b: false,
        };
        for &variant in ALL {
            let dims = launch_config(variant, &shape);
            // __launch_bounds__ in cuda/gemm.cu: 256, and 128 for the 4 warps of mma_w64
            let threads = if variant == Variant::MmaW64 { 128 } else { 256 };
            assert_eq!(dims.threads_per_block(), threads, "{variant:?}");
            assert!(variant.static_shared_bytes() <= super::super::MAX_STATIC_SHARED_BYTES);
        }
    }

    #[test]
    #[should_panic(expected = "empty output")]
    fn launch_config_rejects_empty_output() {
        let shape = GemmShape {
            m: 0,
            n: 4,
            k: 4,
            trans_a: false,
            trans_b: false,
        };
        launch_config(Variant::Naive, &shape);
    }

    #[test]
    fn flops_and_bytes_of_a_square_product() {
        let params = GemmParams {
            shape: GemmShape {
                m: 2,
                n: 2,
                k: 2,
                trans_a: false,
                trans_b: false,
            },
            alpha: 1.0,
            beta: 1.0,
        };
        assert_eq!(flops_bytes(&params, DType::BF16), (16.0, 2.0 * (4.0 + 4.0 + 8.0)));
    }
}
