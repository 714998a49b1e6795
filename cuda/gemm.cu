// GEMM for the transformer layers:
//
//     C = alpha * op(A) * op(B) + beta * C          op(X) = X or X^T
//
// Shapes, all row-major and contiguous:
//     op(A): (M, K)   stored as A (M, K) when trans_a == 0, as A (K, M) when trans_a == 1
//     op(B): (K, N)   stored as B (K, N) when trans_b == 0, as B (N, K) when trans_b == 1
//     C:     (M, N)
// Storage T is float, __half or __nv_bfloat16; products accumulate in f32 and C is rounded
// once, to nearest even. beta == 0 overwrites C without reading it (NaN in C is ignored, as in
// BLAS); otherwise C is accumulated onto.
//
// Variants (src/kernels/gemm.rs `Variant`, same order; the Rust side computes the grid):
//   1. naive     one thread per C element, 16x16 threads per block, A and B read from global
//                memory in the K loop. The baseline.
//   2. tiled64   64x64 C tile per block of 256 threads; K in steps of 16 staged through shared
//                memory as f32; each thread accumulates a 4x4 register block (rows ty + 16 i,
//                columns tx + 16 j, so shared reads are broadcasts or consecutive).
//   3. tiled128  the same with a 128x128 tile, K steps of 8 and an 8x8 register block per
//                thread: twice the reuse of each shared-memory load.
//   4. mma       tensor cores, f16/bf16 storage only (no f32 entry): 128x128 C tile per block of
//                8 warps (2 along M x 4 along N, 64x32 each, 4x4 mma.sync.m16n8k16 tiles with f32
//                accumulators); K in steps of 32 through a 3-stage cp.async pipeline in XOR-
//                swizzled shared memory (48 KiB), fragments loaded with ldmatrix (.trans for an
//                operand stored k-major: A^T, or B not transposed). 8-element chunks that lie
//                in range and 16-byte aligned are copied by cp.async; the others (ragged M, N, K
//                edges, rows not 16-byte aligned) element by element, zeros past the edges.
//                Where the tiles leave SMs idle (decode: M = 16), the Rust side splits K across
//                gridDim.z (gemm_mma_split_*: f32 partials to a workspace), and the last split
//                of each tile to finish forms C from them in split order (lc::last_split).
//   5. mma_w64   the same tile, pipeline and split-K with 4 warps (2 x 2, 64x64 each, 4x8 mma
//                tiles): 8 ldmatrix.x4 per 32 mma a warp and k16 step instead of 6 per 16, so a
//                third less shared-memory traffic per FLOP, at 4 warps a block (gemm_mma_w64_*,
//                gemm_mma_w64_split_*, finished the same way).
#include "mma_tile.cuh"

namespace gemm {

template <typename T>
__device__ __forceinline__ float load_op_a(const T* A, int M, int K, int trans_a, int m, int k) {
    return lc::to_f32(trans_a ? A[(size_t)k * M + m] : A[(size_t)m * K + k]);
}

template <typename T>
__device__ __forceinline__ float load_op_b(const T* B, int K, int N, int trans_b, int k, int n) {
    return lc::to_f32(trans_b ? B[(size_t)n * K + k] : B[(size_t)k * N + n]);
}

template <typename T>
__device__ __forceinline__ void store_c(T* C, size_t index, float acc, float alpha, float beta) {
    const float previous = beta != 0.0f ? beta * lc::to_f32(C[index]) : 0.0f;
    C[index] = lc::from_f32<T>(alpha * acc + previous);
}

// Variant 1. Grid (ceil(N/16), ceil(M/16)), block (16, 16).
template <typename T>
__device__ __forceinline__ void naive(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M,
                                      int N, int K, int trans_a, int trans_b, float alpha, float beta) {
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    const int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= M || col >= N) return;
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) acc += load_op_a(A, M, K, trans_a, row, k) * load_op_b(B, K, N, trans_b, k, col);
    store_c(C, (size_t)row * N + col, acc, alpha, beta);
}

// Variants 2 and 3. Grid (ceil(N/BN), ceil(M/BM)), block (THREADS, 1) with
// THREADS = (BM/TM) * (BN/TN); every thread reaches both barriers of every K step.
template <typename T, int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void tiled(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M,
                                      int N, int K, int trans_a, int trans_b, float alpha, float beta) {
    constexpr int THREADS_M = BM / TM;
    constexpr int THREADS_N = BN / TN;
    constexpr int THREADS = THREADS_M * THREADS_N;
    constexpr int PAD = 4;  // keeps the transposed stores of a non-transposed A off one bank
    SHARED(float, a_tile, [BK][BM + PAD]);  // a_tile[k][m] = op(A)[row0 + m][k0 + k]
    SHARED(float, b_tile, [BK][BN]);        // b_tile[k][n] = op(B)[k0 + k][col0 + n]

    const int tid = threadIdx.x;
    const int tx = tid % THREADS_N;
    const int ty = tid / THREADS_N;
    const int row0 = blockIdx.y * BM;
    const int col0 = blockIdx.x * BN;

    float acc[TM][TN];
    for (int i = 0; i < TM; ++i)
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += BK) {
        // Consecutive threads load consecutive addresses of the stored matrix (coalesced),
        // whichever way it is transposed; out-of-range elements load as 0.
        for (int i = tid; i < BM * BK; i += THREADS) {
            const int m = trans_a ? i % BM : i / BK;
            const int k = trans_a ? i / BM : i % BK;
            const int gm = row0 + m, gk = k0 + k;
            a_tile[k][m] = (gm < M && gk < K) ? load_op_a(A, M, K, trans_a, gm, gk) : 0.0f;
        }
        for (int i = tid; i < BK * BN; i += THREADS) {
            const int n = trans_b ? i / BK : i % BN;
            const int k = trans_b ? i % BK : i / BN;
            const int gk = k0 + k, gn = col0 + n;
            b_tile[k][n] = (gk < K && gn < N) ? load_op_b(B, K, N, trans_b, gk, gn) : 0.0f;
        }
        __syncthreads();  // tiles complete before anyone reads them
        for (int k = 0; k < BK; ++k) {
            float a_frag[TM], b_frag[TN];
            for (int i = 0; i < TM; ++i) a_frag[i] = a_tile[k][ty + i * THREADS_M];
            for (int j = 0; j < TN; ++j) b_frag[j] = b_tile[k][tx + j * THREADS_N];
            for (int i = 0; i < TM; ++i)
                for (int j = 0; j < TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
        __syncthreads();  // everyone done reading before the next K step overwrites the tiles
    }

    // A row of the thread's outputs at a time, its old values all loaded before any is stored
    // (a store through C may alias a later load through it as far as the compiler can tell: a
    // load-add-store per element would wait one memory latency each).
    for (int i = 0; i < TM; ++i) {
        const int row = row0 + ty + i * THREADS_M;
        if (row >= M) continue;
        float previous[TN];
        for (int j = 0; j < TN; ++j) {
            const int col = col0 + tx + j * THREADS_N;
            previous[j] = beta != 0.0f && col < N ? beta * lc::to_f32(C[(size_t)row * N + col]) : 0.0f;
        }
        for (int j = 0; j < TN; ++j) {
            const int col = col0 + tx + j * THREADS_N;
            if (col < N) C[(size_t)row * N + col] = lc::from_f32<T>(alpha * acc[i][j] + previous[j]);
        }
    }
}

// ---- variant 4: tensor cores -------------------------------------------------------------------
namespace mma {
using namespace mma_tile;

// C = alpha·acc + beta·C over the block's tile; or, split (gridDim.z > 1), the partial of K
// range [z·chunk, (z + 1)·chunk) to work[z] (splits × M × N f32), and the tile's last split to
// finish forms C from them in split order (mma_tile::finish_tile).
// TWN: the warps' width (32 for `mma`, 64 for `mma_w64`). SPLIT: the split-K kernel (a
// compile-time choice: the whole-K kernel carries no split-K code).
template <typename T, bool TA, bool TB, int TWN, bool SPLIT>
__device__ __forceinline__ void body(T* a_tiles, T* b_tiles, const T* __restrict__ A, const T* __restrict__ B,
                                     T* __restrict__ C, float* __restrict__ work, unsigned* __restrict__ tickets,
                                     int M, int N, int K, float alpha, float beta, int chunk) {
    using L = Tile<BM, TWN>;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[L::FRAG_M][L::FRAG_N][4];
    if (!SPLIT && beta != 0.0f) prefetch_tile<T, BM, BN, L::THREADS>(C, M, N, m0, n0);
    mainloop<T, TA, TB, BM, TWN>(acc, a_tiles, b_tiles, A, B, M, N, K, m0, n0, lc::split_begin(chunk),
                                 lc::split_end(chunk, K));
    if (!SPLIT) {
        epilogue_axpby<T, L>(acc, C, M, N, m0, n0, alpha, beta);
        return;
    }
    // The last split forms C from the workspace (finish_tile): summing into the accumulators and
    // running epilogue_axpby on them spills in both warp layouts.
    store_partial<L>(acc, work, M, N, m0, n0);
    if (lc::last_split(tickets, reinterpret_cast<int*>(a_tiles)))
        finish_tile<T, BM, BN>(work, C, M, N, m0, n0, alpha, beta);
}
}  // namespace mma

// Variants 4 and 5. Grid (ceil(N/128), ceil(M/128), splits), block (Tile<128, TWN>::THREADS:
// 256 for `mma`, 128 for `mma_w64`); T is __half or __nv_bfloat16. One split:
// C = alpha·op(A)·op(B) + beta·C. Several (`gemm_mma_split_*`, for
// shapes whose tiles leave SMs idle, e.g. decode's 16 × 4096 × 4096: 32 tiles, each walking
// K = 4096 in 128 dependent steps), partials to `work` and each tile's last split forms C.
template <typename T, int TWN, bool SPLIT>
__device__ __forceinline__ void tensor_core(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                                            float* __restrict__ work, unsigned* __restrict__ tickets, int M, int N,
                                            int K, int trans_a, int trans_b, float alpha, float beta, int chunk) {
    // One allocation for whichever transpose instantiation runs (48 KiB: the static limit).
    SHARED(mma::Chunk16, a_chunks, [mma::STAGES * mma::TILE / 8]);
    SHARED(mma::Chunk16, b_chunks, [mma::STAGES * mma::TILE / 8]);
    T* a_tiles = reinterpret_cast<T*>(a_chunks);
    T* b_tiles = reinterpret_cast<T*>(b_chunks);
    if (trans_a) {
        if (trans_b)
            mma::body<T, true, true, TWN, SPLIT>(a_tiles, b_tiles, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
        else
            mma::body<T, true, false, TWN, SPLIT>(a_tiles, b_tiles, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
    } else {
        if (trans_b)
            mma::body<T, false, true, TWN, SPLIT>(a_tiles, b_tiles, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
        else
            mma::body<T, false, false, TWN, SPLIT>(a_tiles, b_tiles, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
    }
}

}  // namespace gemm

// Unmangled entry points, one per variant and storage type: gemm_<variant>_<dtype>. `kernel` is
// parenthesised at the use site so the commas of its template arguments survive the macro.
#define GEMM_ENTRY(name, T, kernel)                                                                        \
    extern "C" __global__ void __launch_bounds__(256) name(const T* __restrict__ A, const T* __restrict__ B, \
                                                          T* __restrict__ C, int M, int N, int K, int trans_a,  \
                                                          int trans_b, float alpha, float beta) {              \
        kernel(A, B, C, M, N, K, trans_a, trans_b, alpha, beta);                                               \
    }
#define GEMM_ENTRIES(suffix, T)                                                  \
    GEMM_ENTRY(gemm_naive_##suffix, T, (gemm::naive<T>))                         \
    GEMM_ENTRY(gemm_tiled64_##suffix, T, (gemm::tiled<T, 64, 64, 16, 4, 4>))     \
    GEMM_ENTRY(gemm_tiled128_##suffix, T, (gemm::tiled<T, 128, 128, 8, 8, 8>))

GEMM_ENTRIES(f32, float)
GEMM_ENTRIES(f16, __half)
GEMM_ENTRIES(bf16, __nv_bfloat16)
// Tensor cores take 16-bit inputs only: no f32 entry (`Variant::applies` in src/kernels/gemm.rs).
// gemm_mma_* and gemm_mma_w64_* run one split; gemm_mma_split_* and gemm_mma_w64_split_* write
// the partials of gridDim.z splits of K to `work`, and each tile's last split forms C from them
// (its ticket in `tickets`, src/launch.rs `Backend::tickets`).
// One warp layout's pair: gemm_<name> (one split) and gemm_<split> (gridDim.z splits);
// NT, the block's threads, is Tile<BM, TWN>::THREADS (a literal: __launch_bounds__ is a macro).
#define GEMM_MMA_LAYOUT_ENTRIES(name, split, T, TWN, NT)                                                              \
    extern "C" __global__ void __launch_bounds__(NT) gemm_##name(                                                     \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M, int N, int K, int trans_a,        \
        int trans_b, float alpha, float beta) {                                                                       \
        static_assert(mma_tile::Tile<mma_tile::BM, TWN>::THREADS == NT, "the layout's threads");                     \
        gemm::tensor_core<T, TWN, false>(A, B, C, nullptr, nullptr, M, N, K, trans_a, trans_b, alpha, beta, K);              \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(NT) gemm_##split(                                                    \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, float* __restrict__ work,                \
        unsigned* __restrict__ tickets, int M, int N, int K, int trans_a, int trans_b, float alpha, float beta,       \
        int chunk) {                                                                                                  \
        gemm::tensor_core<T, TWN, true>(A, B, C, work, tickets, M, N, K, trans_a, trans_b, alpha, beta, chunk);             \
    }
#define GEMM_MMA_ENTRIES(suffix, T)                                                                                   \
    GEMM_MMA_LAYOUT_ENTRIES(mma_##suffix, mma_split_##suffix, T, 32, 256)                                             \
    GEMM_MMA_LAYOUT_ENTRIES(mma_w64_##suffix, mma_w64_split_##suffix, T, 64, 128)
GEMM_MMA_ENTRIES(f16, __half)
GEMM_MMA_ENTRIES(bf16, __nv_bfloat16)
