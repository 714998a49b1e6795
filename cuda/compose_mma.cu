// Composition on tensor cores (DESIGN §2, product mode): variant 5 (`mma`) of
// src/kernels/compose_common.rs `Variant`, for large T. The same products as the fused variant
// (cuda/compose_fwd.cu, cuda/compose_bwd.cu) with the same semantics, each as a GEMM on
// `mma.sync.m16n8k16` with bf16 inputs and f32 accumulators:
//
// Forward, D[σ, j] = C[σ, module_of[j]] · col_scale[j]:
//     U  = X A_catᵀ          (T, R)      shrink; U (optional: null skips it) and Z = U ∘ D are
//                                        overwritten, the scale applied in the epilogue
//     Y += Z B_catᵀ          (T, d_out)  expand, accumulated onto (read, add, round once)
// Backward, given G = ∂L/∂Y:
//     H  = G B_cat           (T, R)      never stored; in the epilogue ∂U = H ∘ D (overwritten,
//                                        null skips it) and ∂C[σ, i] += s_i Σ_{t: σ(t) = σ}
//                                        Σ_{j ∈ block i} H[t, j] U[t, j] (f32, accumulated; null
//                                        skips it), as coeff_grad_tiled does
//     ∂X += ∂U A_cat         (T, d_in)   accumulated onto
// ∂A_cat = ∂Uᵀ X (K = T) is the GEMM family's `mma_w64` variant (src/kernels/compose_bwd.rs
// `Step::MmaDa`); ∂B_cat = Gᵀ (U ∘ D) stays on the fused variant's tiled kernel, which re-forms
// Z from U in f32 on load. Tensor cores would need Z stored in bf16 first: a second rounding
// the contract (one rounding per output) does not allow — tried, and harness_random_cases
// caught it (one ∂B_cat element 12% past its bound).
//
// Shapes, row-major: X (T, d_in), A_cat (R, d_in), B_cat (d_out, R), G (T, d_out), U, ∂U, Z
// (T, R); C (S, N) f32, sample_of (T), module_of (R) int32, col_scale (R) f32. Storage bf16
// only (tensor cores take 16-bit inputs: `Variant::applies` says no for f32), accumulation f32,
// every output rounded once.
//
// All four kernels are one GEMM main loop (cuda/mma_tile.cuh, shared with gemm.cu's `mma` and
// `mma_w64`), out(M, N) = A(M, K) · op(B), A row-major (M, K) and B stored (N, K) ("nk": A_cat
// in the shrink, B_cat in the expand) or (K, N) ("kn": B_cat in H, A_cat in ∂X), with different
// epilogues:
//   - a 128×128 output tile per block of 4 warps (2 × 2, 64×64 each: 4×8 m16n8k16 tiles, 128
//     f32 accumulators per lane; the GEMM's `mma_w64` layout, a third less shared-memory
//     traffic per FLOP than its 8 warps of 64×32; src/kernels/compose_common.rs
//     `MmaEntry::threads`); every kernel also comes on 64×128 tiles
//     (`_shrink64`, `_expand64`, `_hidden64`, `_dx64`: warps of 32×32), which the plan picks
//     when 128-row tiles would give fewer blocks than SMs (src/kernels/compose_common.rs
//     `mma_tile_rows`: R ≤ 512 at T = 4096 on 132 SMs, where the first H200 run had one 8-warp
//     block per SM; every output at small T); where even those leave SMs idle (small T, or
//     R = 128), the kernels split K along gridDim.z (`mma_split`; partials through an f32
//     workspace, summed in split order by each tile's last split to finish) — the
//     first H200 run had the shrink at T ≤ 256 walk d_in = 4096 in 128 dependent steps on 4–8
//     blocks (~145 µs, whatever T);
//   - K in steps of 32 through a 3-stage cp.async.cg pipeline (one commit group per stage,
//     `wait_group 1` before each step) in XOR-swizzled shared memory (48 KiB);
//   - fragments by ldmatrix.x4 (.trans for the kn operand);
//   - ragged edges in M, N and K: 16-byte chunks wholly in range go by cp.async when every row
//     of the operand is 16-byte aligned (its row length a multiple of 8, an aligned base), the
//     others element by element with zeros past the edges; the epilogues guard rows and columns.
// The ∂C epilogue reuses the pipeline's shared memory for s_j H[t, j] U[t, j] in two halves of
// the tile (f32 part[64][129], 33 KB; part[32][129] on 64-row tiles): segmented sums over each
// module's columns, then one atomicAdd per (run of tokens of one sample, module) per half tile.
// The tile's module ids and token samples are staged once beside `part` (int32), so the serial
// loops of the segmented sums read shared memory, not a chain of dependent global loads; so is
// the tile's list of segments (first and one-past-last column of each), so that the segmented
// sums run one thread per (row, segment) — not one per (row, column) with 15 of every 16 idle,
// each start's thread walking its segment while testing every column for a start, which the
// H200 profile (ncu: the hidden kernel at 196 µs with ∂C, ~106 µs without) showed costing more
// than the GEMM itself.
#include "mma_tile.cuh"

namespace compose_mma {

using namespace mma_tile;
// The ∂C epilogue of a TBM-row tile: part[PART_ROWS][BN + 1] f32 in the pipeline's shared
// memory, beside it tile_module[BN], tile_sample[TBM], seg_first[BN], seg_end[BN], n_segs.
template <int TBM, int TWN>
struct Epilogue {
    static constexpr int PART_ROWS = TBM / 2;
    static_assert(PART_ROWS == Tile<TBM, TWN>::WM, "one half of the tile is one row of warps");
    static_assert(BN <= Tile<TBM, TWN>::THREADS, "a thread per column of the tile");
    static constexpr int INTS = BN + TBM + 2 * BN + 1;
    static_assert(PART_ROWS * (BN + 1) * 4 + INTS * 4 <= 2 * STAGES * TILE * 2,
                  "part, the staged module ids and samples and the segment list fit the pipeline stages");
};

// Split K: block z of a grid with gridDim.z = splits > 1 covers k ∈ [z·chunk, (z + 1)·chunk) and
// writes its partial tile, f32 and unrounded, to work[z] (mma_tile::store_partial: splits × T ×
// R for the shrink and hidden, × d_out or d_in for the expand and ∂X) in place of the outputs;
// the last split of each tile to finish sums them in split order and finishes the tile
// (lc::last_split: a release/acquire on the tile's ticket, src/launch.rs `Backend::tickets`) —
// no finishing launch. The
// plan (src/kernels/compose_common.rs `mma_split`) splits only where the tiles alone leave SMs
// idle (small T, or R = 128 at T = 4096).

// Grid (ceil(R / BN), ceil(T / TBM), splits), block (Tile<TBM, TWN>::THREADS). U (if given) =
// X A_catᵀ, Z = U ∘ D; with several splits, partials of X A_catᵀ to `work` (above), and the last
// split of each tile to finish (its ticket: tickets[blockIdx.y · gridDim.x + blockIdx.x],
// lc::last_split) sums them in split order and applies the scale — no reduce launch.
template <typename T, int TBM, int TWN>
__device__ __forceinline__ void shrink(T* stages, const T* __restrict__ X, const T* __restrict__ A_cat,
                                       const float* __restrict__ C, const int* __restrict__ sample_of,
                                       const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                       T* __restrict__ U, T* __restrict__ Z, float* __restrict__ work,
                                       unsigned* __restrict__ tickets, int n_tokens, int d_in, int R, int n_modules,
                                       int chunk) {
    using L = Tile<TBM, TWN>;
    const int m0 = blockIdx.y * TBM, n0 = blockIdx.x * BN;
    float acc[L::FRAG_M][L::FRAG_N][4];
    mainloop<T, false, true, TBM, TWN>(acc, stages, stages + STAGES * L::TILE_A, X, A_cat, n_tokens, R, d_in, m0, n0,
                                       lc::split_begin(chunk), lc::split_end(chunk, d_in));
    if (gridDim.z > 1 && !split_finish<L>(acc, work, tickets, reinterpret_cast<int*>(stages), n_tokens, R, m0, n0))
        return;
    scale_epilogue<T, L>(acc, C, sample_of, module_of, col_scale, U, Z, n_tokens, R, n_modules, m0, n0);
}

// Grid (ceil(N / BN), ceil(M / TBM), splits), block (Tile<TBM, TWN>::THREADS). out (M, N) +=
// A · op(B): the expand (A = Z, B = B_cat stored nk, K = R) and ∂X (A = ∂U, B = A_cat stored kn,
// K = R); with several splits of K, partials to `work`, which the tile's last split to finish
// adds onto out (mma_tile::split_finish).
template <typename T, bool NK, int TBM, int TWN>
__device__ __forceinline__ void accumulate(T* stages, const T* __restrict__ A, const T* __restrict__ B,
                                           T* __restrict__ out, float* __restrict__ work, unsigned* __restrict__ tickets,
                                           int M, int N, int K, int chunk) {
    using L = Tile<TBM, TWN>;
    const int m0 = blockIdx.y * TBM, n0 = blockIdx.x * BN;
    float acc[L::FRAG_M][L::FRAG_N][4];
    if (gridDim.z == 1) prefetch_tile<T, TBM, BN, L::THREADS>(out, M, N, m0, n0);
    mainloop<T, false, NK, TBM, TWN>(acc, stages, stages + STAGES * L::TILE_A, A, B, M, N, K, m0, n0,
                                     lc::split_begin(chunk), lc::split_end(chunk, K));
    if (gridDim.z > 1 && !split_finish<L>(acc, work, tickets, reinterpret_cast<int*>(stages), M, N, m0, n0)) return;
    epilogue_axpby<T, L>(acc, out, M, N, m0, n0, 1.0f, 1.0f);
}

// Grid (ceil(R / BN), ceil(T / TBM), splits), block (Tile<TBM, TWN>::THREADS); K = d_out. H = G B_cat in registers;
// ∂U (if given) = H ∘ D; ∂C (if given) += the tile's s_j H U, segmented by module and by runs of
// tokens of one sample. With several splits each block holds the H of its K range: ∂C is linear
// in H, so each adds its own part; its partial ∂U (H ∘ D, f32) goes to `work`, and the last
// split of the tile to finish sums them into ∂U (lc::last_split, as the shrink).
template <typename T, int TBM, int TWN>
__device__ __forceinline__ void hidden(T* stages, const T* __restrict__ G, const T* __restrict__ B_cat,
                                       const T* __restrict__ U, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, float* __restrict__ dC,
                                       T* __restrict__ dU, float* __restrict__ work, unsigned* __restrict__ tickets,
                                       int n_tokens, int d_out, int R, int n_modules, int chunk) {
    using L = Tile<TBM, TWN>;
    static_assert(Epilogue<TBM, TWN>::INTS > 0, "the ∂C epilogue's scratch fits the stages");
    const int m0 = blockIdx.y * TBM, n0 = blockIdx.x * BN;
    float acc[L::FRAG_M][L::FRAG_N][4];
    mainloop<T, false, false, TBM, TWN>(acc, stages, stages + STAGES * L::TILE_A, G, B_cat, n_tokens, R, d_out, m0, n0,
                                        lc::split_begin(chunk), lc::split_end(chunk, d_out));
    hidden_epilogue<T, L, TBM>(acc, reinterpret_cast<float*>(stages), U, C, sample_of, module_of, col_scale, dC, dU,
                               work, n_tokens, R, n_modules, m0, n0);
    split_finish_du<T, L>(acc, work, tickets, reinterpret_cast<int*>(stages), dU, n_tokens, R, m0, n0);
}

}  // namespace compose_mma

// Unmangled entry points, two per kernel: compose_mma_<name>_<suffix> on 128-row tiles in 4
// warps of 64×64, and compose_mma_<name>64_<suffix> on 64-row tiles in 8 warps of 32×32 (the
// block sizes src/kernels/compose_common.rs `MmaEntry::threads` launches). BODY(T, TBM, TWN)
// calls the kernel's template; the entries' parameter list follows it. One static allocation
// per kernel holds the pipeline's A and B stages (48 KiB: the static limit). The 64-row entries
// ask for 2 blocks an SM (≤ 128 registers): without it ptxas gave the split ∂U finish of
// `hidden64` 80 registers and a 16-byte spill.
#define COMPOSE_MMA_TWINS(name, suffix, T, BODY, ...)                                                   \
    extern "C" __global__ void __launch_bounds__(128) compose_mma_##name##_##suffix(__VA_ARGS__) {      \
        static_assert(compose_mma::Tile<128, 64>::THREADS == 128, "the 128-row layout's block");        \
        SHARED(compose_mma::Chunk16, stage_chunks, [2 * compose_mma::STAGES * compose_mma::TILE / 8]);  \
        BODY(T, 128, 64);                                                                               \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(256, 2) compose_mma_##name##64_##suffix(__VA_ARGS__) { \
        static_assert(compose_mma::Tile<64, 32>::THREADS == 256, "the 64-row layout's block");          \
        SHARED(compose_mma::Chunk16, stage_chunks, [2 * compose_mma::STAGES * compose_mma::TILE / 8]);  \
        BODY(T, 64, 32);                                                                                \
    }

#define COMPOSE_MMA_SHRINK(T, TBM, TWN)                                                                     \
    compose_mma::shrink<T, TBM, TWN>(reinterpret_cast<T*>(stage_chunks), X, A_cat, C, sample_of, module_of, \
                                     col_scale, U, Z, work, tickets, n_tokens, d_in, R, n_modules, chunk)
#define COMPOSE_MMA_EXPAND(T, TBM, TWN)                                                                         \
    compose_mma::accumulate<T, true, TBM, TWN>(reinterpret_cast<T*>(stage_chunks), Z, B_cat, Y, work, tickets, \
                                               n_tokens, d_out, R, chunk)
#define COMPOSE_MMA_HIDDEN(T, TBM, TWN)                                                                        \
    compose_mma::hidden<T, TBM, TWN>(reinterpret_cast<T*>(stage_chunks), G, B_cat, U, C, sample_of, module_of, \
                                     col_scale, dC, dU, work, tickets, n_tokens, d_out, R, n_modules, chunk)
#define COMPOSE_MMA_DX(T, TBM, TWN)                                                                                \
    compose_mma::accumulate<T, false, TBM, TWN>(reinterpret_cast<T*>(stage_chunks), dU, A_cat, dX, work, tickets, \
                                                n_tokens, d_in, R, chunk)

#define COMPOSE_MMA_ENTRIES(suffix, T)                                                                         \
    COMPOSE_MMA_TWINS(shrink, suffix, T, COMPOSE_MMA_SHRINK, const T* X, const T* A_cat, const float* C,       \
                      const int* sample_of, const int* module_of, const float* col_scale, T* U, T* Z,          \
                      float* work, unsigned* tickets, int n_tokens, int d_in, int R, int n_modules, int chunk) \
    COMPOSE_MMA_TWINS(expand, suffix, T, COMPOSE_MMA_EXPAND, const T* Z, const T* B_cat, T* Y, float* work,    \
                      unsigned* tickets, int n_tokens, int R, int d_out, int chunk)                            \
    COMPOSE_MMA_TWINS(hidden, suffix, T, COMPOSE_MMA_HIDDEN, const T* G, const T* B_cat, const T* U,           \
                      const float* C, const int* sample_of, const int* module_of, const float* col_scale,      \
                      float* dC, T* dU, float* work, unsigned* tickets, int n_tokens, int d_out, int R,        \
                      int n_modules, int chunk)                                                                \
    COMPOSE_MMA_TWINS(dx, suffix, T, COMPOSE_MMA_DX, const T* dU, const T* A_cat, T* dX, float* work,          \
                      unsigned* tickets, int n_tokens, int R, int d_in, int chunk)

// Tensor cores take 16-bit inputs: no f32 entry (`Variant::applies` in src/kernels/compose_common.rs).
COMPOSE_MMA_ENTRIES(bf16, __nv_bfloat16)
