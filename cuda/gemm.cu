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
#include "common.cuh"

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

    for (int i = 0; i < TM; ++i) {
        const int row = row0 + ty + i * THREADS_M;
        for (int j = 0; j < TN; ++j) {
            const int col = col0 + tx + j * THREADS_N;
            if (row < M && col < N) store_c(C, (size_t)row * N + col, acc[i][j], alpha, beta);
        }
    }
}

// ---- variant 4: tensor cores -------------------------------------------------------------------
namespace mma {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3;
constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 x 32 per warp
constexpr int FRAG_M = WM / 16, FRAG_N = WN / 8;     // m16 x n8 mma tiles per warp
constexpr int TILE = BM * BK;                        // elements per operand tile (BN·BK too)
static_assert(BM * BK == BN * BK, "A and B tiles share one size");

// Shared storage in 16-byte units (ldmatrix rows and cp.async destinations are 16-byte aligned).
struct alignas(16) Chunk16 {
    unsigned words[4];
};

// Element (row, col) of a shared tile of COLS 16-bit columns: 16-byte chunk c of row r is stored
// at chunk c ^ f(r), so that the 8 rows one ldmatrix phase reads at one chunk column land in 8
// distinct 16-byte bank groups (rows of 64 bytes: f = (r / 2) % 4; rows of 256: f = r % 8).
template <int COLS>
__device__ __forceinline__ int swizzle(int row, int col) {
    constexpr int CHUNKS = COLS / 8;
    static_assert(CHUNKS == 4 || CHUNKS >= 8, "rows of 4 or at least 8 chunks");
    const int chunk = col / 8;
    const int stored = CHUNKS >= 8 ? chunk ^ (row & 7) : chunk ^ ((row >> 1) & 3);
    return row * COLS + stored * 8 + col % 8;
}

// Rows [row0, row0 + ROWS) x columns [col0, col0 + COLS) of the row-major (rows, cols) matrix
// `src` into a swizzled tile; elements past the edges are 0. `vector` says every row starts
// 16-byte aligned (cols % 8 == 0 and an aligned base), so full in-range chunks go by cp.async.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* tile, const T* __restrict__ src, int rows, int cols, int row0, int col0,
                                          bool vector) {
    constexpr int CHUNKS_PER_ROW = COLS / 8;
    static_assert((ROWS * CHUNKS_PER_ROW) % THREADS == 0, "whole chunks per thread");
    LC_UNROLL
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += THREADS) {
        const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
        const int gr = row0 + r, gc = col0 + col;
        T* dst = tile + swizzle<COLS>(r, col);
        if (vector && gr < rows && gc + 8 <= cols) {
            lc::cp_async16(dst, src + (size_t)gr * cols + gc);
        } else {
            for (int e = 0; e < 8; ++e)
                dst[e] = (gr < rows && gc + e < cols) ? src[(size_t)gr * cols + gc + e] : lc::from_f32<T>(0.0f);
        }
    }
}

// K-tile `kt` of op(A) (BM x BK) and op(B) (BK x BN) into pipeline stage `stage`, in the
// orientation they are stored in: A as m-rows of k (or, transposed, k-rows of m), B as n-rows of
// k (transposed) or k-rows of n.
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void load_stage(T* a_tiles, T* b_tiles, int stage, int kt, const T* A, const T* B, int M,
                                           int N, int K, int m0, int n0, bool a_vector, bool b_vector) {
    const int k0 = kt * BK;
    T* a = a_tiles + stage * TILE;
    T* b = b_tiles + stage * TILE;
    if (TA)
        load_tile<T, BK, BM>(a, A, K, M, k0, m0, a_vector);
    else
        load_tile<T, BM, BK>(a, A, M, K, m0, k0, a_vector);
    if (TB)
        load_tile<T, BN, BK>(b, B, N, K, n0, k0, b_vector);
    else
        load_tile<T, BK, BN>(b, B, K, N, k0, n0, b_vector);
}

template <typename T, bool TA, bool TB>
__device__ __forceinline__ void body(T* a_tiles, T* b_tiles, const T* __restrict__ A, const T* __restrict__ B,
                                     T* __restrict__ C, int M, int N, int K, float alpha, float beta) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int wm0 = (warp / WARPS_N) * WM, wn0 = (warp % WARPS_N) * WN;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const bool a_vector = (TA ? M : K) % 8 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
    const bool b_vector = (TB ? K : N) % 8 == 0 && reinterpret_cast<size_t>(B) % 16 == 0;
    const int k_tiles = lc::ceil_div(K, BK);

    // Fully unrolled wherever acc is indexed, so that it lives in registers.
    float acc[FRAG_M][FRAG_N][4];
    LC_UNROLL
    for (int i = 0; i < FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

    // Prologue: STAGES - 1 tiles in flight, one commit group each (empty past the last tile, so
    // that the group count, and with it the wait depth below, is the same every iteration).
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage<T, TA, TB>(a_tiles, b_tiles, s, s, A, B, M, N, K, m0, n0, a_vector, b_vector);
        lc::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        lc::cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed
        __syncthreads();                  // everyone's have; and everyone is done with tile kt - 1
        const int next = kt + STAGES - 1;  // into the stage tile kt - 1 used
        if (next < k_tiles)
            load_stage<T, TA, TB>(a_tiles, b_tiles, next % STAGES, next, A, B, M, N, K, m0, n0, a_vector, b_vector);
        lc::cp_async_commit();

        const T* a = a_tiles + (kt % STAGES) * TILE;
        const T* b = b_tiles + (kt % STAGES) * TILE;
        LC_UNROLL
        for (int ks = 0; ks < BK; ks += 16) {
            // Lane l addresses row l % 8 of 8x8 matrix l / 8; matrices 0-3 are the A fragment's
            // registers (m 0-7 | 8-15) x (k 0-7 | 8-15), and for B two n8 tiles' (k 0-7, k 8-15).
            const int sub = lane % 8, quad = lane / 8;
            unsigned a_frag[FRAG_M][4], b_frag[FRAG_N][2];
            LC_UNROLL
            for (int i = 0; i < FRAG_M; ++i) {
                const int m = wm0 + 16 * i + 8 * (quad & 1), k = ks + 8 * (quad >> 1);
                if (TA)
                    lc::ldmatrix<4, true>(a_frag[i], &a[swizzle<BM>(k + sub, m)]);
                else
                    lc::ldmatrix<4, false>(a_frag[i], &a[swizzle<BK>(m + sub, k)]);
            }
            LC_UNROLL
            for (int j = 0; j < FRAG_N; j += 2) {
                const int n = wn0 + 8 * j + 8 * (quad >> 1), k = ks + 8 * (quad & 1);
                unsigned r[4];
                if (TB)
                    lc::ldmatrix<4, false>(r, &b[swizzle<BK>(n + sub, k)]);
                else
                    lc::ldmatrix<4, true>(r, &b[swizzle<BN>(k + sub, n)]);
                b_frag[j][0] = r[0], b_frag[j][1] = r[1], b_frag[j + 1][0] = r[2], b_frag[j + 1][1] = r[3];
            }
            LC_UNROLL
            for (int i = 0; i < FRAG_M; ++i)
                LC_UNROLL
                for (int j = 0; j < FRAG_N; ++j) lc::mma_m16n8k16<T>(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
        }
    }
    lc::cp_async_wait<0>();  // only empty groups remain; leave none behind

    // Accumulator v of tile (i, j): row groupID + 8·(v / 2), column 2·threadID_in_group + v % 2.
    LC_UNROLL
    for (int i = 0; i < FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int row = m0 + wm0 + 16 * i + lane / 4 + 8 * (v / 2);
                const int col = n0 + wn0 + 8 * j + 2 * (lane % 4) + v % 2;
                if (row < M && col < N) store_c(C, (size_t)row * N + col, acc[i][j][v], alpha, beta);
            }
}
}  // namespace mma

// Variant 4. Grid (ceil(N/128), ceil(M/128)), block (256, 1); T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void tensor_core(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M,
                                            int N, int K, int trans_a, int trans_b, float alpha, float beta) {
    // One allocation for whichever transpose instantiation runs (48 KiB: the static limit).
    SHARED(mma::Chunk16, a_chunks, [mma::STAGES * mma::TILE / 8]);
    SHARED(mma::Chunk16, b_chunks, [mma::STAGES * mma::TILE / 8]);
    T* a_tiles = reinterpret_cast<T*>(a_chunks);
    T* b_tiles = reinterpret_cast<T*>(b_chunks);
    if (trans_a) {
        if (trans_b)
            mma::body<T, true, true>(a_tiles, b_tiles, A, B, C, M, N, K, alpha, beta);
        else
            mma::body<T, true, false>(a_tiles, b_tiles, A, B, C, M, N, K, alpha, beta);
    } else {
        if (trans_b)
            mma::body<T, false, true>(a_tiles, b_tiles, A, B, C, M, N, K, alpha, beta);
        else
            mma::body<T, false, false>(a_tiles, b_tiles, A, B, C, M, N, K, alpha, beta);
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
GEMM_ENTRY(gemm_mma_f16, __half, (gemm::tensor_core<__half>))
GEMM_ENTRY(gemm_mma_bf16, __nv_bfloat16, (gemm::tensor_core<__nv_bfloat16>))
