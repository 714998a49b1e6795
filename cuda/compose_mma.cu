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
// ∂A_cat and ∂B_cat (K = T) use the fused variant's tiled kernels.
//
// Shapes, row-major: X (T, d_in), A_cat (R, d_in), B_cat (d_out, R), G (T, d_out), U, ∂U, Z
// (T, R); C (S, N) f32, sample_of (T), module_of (R) int32, col_scale (R) f32. Storage bf16
// only (tensor cores take 16-bit inputs: `Variant::applies` says no for f32), accumulation f32,
// every output rounded once.
//
// All four kernels are one GEMM main loop, out(M, N) = A(M, K) · op(B), A row-major (M, K) and
// B stored (N, K) ("nk": A_cat in the shrink, B_cat in the expand) or (K, N) ("kn": B_cat in H,
// A_cat in ∂X), with different epilogues:
//   - a 128×128 output tile per block of 8 warps (2 along M × 4 along N, 64×32 each: 4×4
//     m16n8k16 tiles, 64 f32 accumulators per lane);
//   - K in steps of 32 through a 3-stage cp.async.cg pipeline (one commit group per stage,
//     `wait_group 1` before each step) in XOR-swizzled shared memory (48 KiB);
//   - fragments by ldmatrix.x4 (.trans for the kn operand);
//   - ragged edges in M, N and K: 16-byte chunks wholly in range go by cp.async when every row
//     of the operand is 16-byte aligned (its row length a multiple of 8, an aligned base), the
//     others element by element with zeros past the edges; the epilogues guard rows and columns.
// The ∂C epilogue reuses the pipeline's shared memory for s_j H[t, j] U[t, j] in two halves of
// 64 rows (f32 part[64][129], 33 KB): segmented sums over each module's columns, then one
// atomicAdd per (run of tokens of one sample, module) per half tile.
#include "common.cuh"

namespace compose_mma {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3;
constexpr int WARPS_M = 2, WARPS_N = 4, THREADS = 32 * WARPS_M * WARPS_N;
constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;  // 64 × 32 per warp
constexpr int FRAG_M = WM / 16, FRAG_N = WN / 8;     // m16 × n8 mma tiles per warp
constexpr int TILE = BM * BK;                        // elements per operand tile and stage
static_assert(BM * BK == BN * BK, "A and B tiles share one size");
// The ∂C epilogue's part[PART_ROWS][BN + 1] f32 in the pipeline's shared memory.
constexpr int PART_ROWS = BM / 2;
static_assert(PART_ROWS == WM, "one half of the tile is one row of warps");
static_assert(PART_ROWS * (BN + 1) * 4 <= 2 * STAGES * TILE * 2, "part fits the pipeline stages");

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

// Rows [row0, row0 + ROWS) × columns [col0, col0 + COLS) of the row-major (rows, cols) matrix
// `src` into a swizzled tile; elements past the edges are 0. `vector`: every row starts 16-byte
// aligned, so chunks wholly in range go by cp.async.
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

// The block's accumulators: acc[i][j][v] is output (row(i, v), col(j, v)) of the block tile.
struct Frag {
    int lane, wm0, wn0;
    __device__ __forceinline__ Frag() : lane(threadIdx.x % 32) {
        const int warp = threadIdx.x / 32;
        wm0 = (warp / WARPS_N) * WM;
        wn0 = (warp % WARPS_N) * WN;
    }
    // m16n8 accumulator v: row groupID + 8·(v / 2), column 2·threadID_in_group + v % 2.
    __device__ __forceinline__ int row(int i, int v) const { return wm0 + 16 * i + lane / 4 + 8 * (v / 2); }
    __device__ __forceinline__ int col(int j, int v) const { return wn0 + 8 * j + 2 * (lane % 4) + v % 2; }
};

// acc = A · op(B) for the block tile at (m0, n0): A (M, K) row-major; B stored (N, K) when NK,
// else (K, N). `stages` is the pipeline's shared memory (2 · STAGES · TILE elements). Every
// thread of the block must call it; on return every copy has landed and every thread is past
// its last read of `stages` (it may be reused).
template <typename T, bool NK>
__device__ __forceinline__ void mainloop(float (&acc)[FRAG_M][FRAG_N][4], T* stages, const T* __restrict__ A,
                                         const T* __restrict__ B, int M, int N, int K, int m0, int n0) {
    T* a_tiles = stages;
    T* b_tiles = stages + STAGES * TILE;
    const Frag f;
    const bool a_vector = K % 8 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
    const bool b_vector = (NK ? K : N) % 8 == 0 && reinterpret_cast<size_t>(B) % 16 == 0;
    const int k_tiles = lc::ceil_div(K, BK);
    auto load_stage = [&](int stage, int kt) {
        const int k0 = kt * BK;
        load_tile<T, BM, BK>(a_tiles + stage * TILE, A, M, K, m0, k0, a_vector);
        if (NK)
            load_tile<T, BN, BK>(b_tiles + stage * TILE, B, N, K, n0, k0, b_vector);
        else
            load_tile<T, BK, BN>(b_tiles + stage * TILE, B, K, N, k0, n0, b_vector);
    };

    LC_UNROLL
    for (int i = 0; i < FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

    // Prologue: STAGES - 1 tiles in flight, one commit group each (empty past the last tile, so
    // that the wait depth below is the same every step).
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        lc::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        lc::cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed
        __syncthreads();                  // everyone's have; and everyone is done with tile kt - 1
        const int next = kt + STAGES - 1;  // into the stage tile kt - 1 used
        if (next < k_tiles) load_stage(next % STAGES, next);
        lc::cp_async_commit();

        const T* a = a_tiles + (kt % STAGES) * TILE;
        const T* b = b_tiles + (kt % STAGES) * TILE;
        LC_UNROLL
        for (int ks = 0; ks < BK; ks += 16) {
            // Lane l addresses row l % 8 of 8×8 matrix l / 8: for A the fragment's registers
            // (m 0-7 | 8-15) × (k 0-7 | 8-15); for B two n8 tiles' (k 0-7, k 8-15).
            const int sub = f.lane % 8, quad = f.lane / 8;
            unsigned a_frag[FRAG_M][4], b_frag[FRAG_N][2];
            LC_UNROLL
            for (int i = 0; i < FRAG_M; ++i) {
                const int m = f.wm0 + 16 * i + 8 * (quad & 1), k = ks + 8 * (quad >> 1);
                lc::ldmatrix<4, false>(a_frag[i], &a[swizzle<BK>(m + sub, k)]);
            }
            LC_UNROLL
            for (int j = 0; j < FRAG_N; j += 2) {
                const int n = f.wn0 + 8 * j + 8 * (quad >> 1), k = ks + 8 * (quad & 1);
                unsigned r[4];
                if (NK)
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
    __syncthreads();         // every warp's last ldmatrix is done before the stages are reused
}

// Grid (ceil(R / BN), ceil(T / BM)), block (256). U (if given) = X A_catᵀ, Z = U ∘ D.
template <typename T>
__device__ __forceinline__ void shrink(T* stages, const T* __restrict__ X, const T* __restrict__ A_cat,
                                       const float* __restrict__ C, const int* __restrict__ sample_of,
                                       const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                       T* __restrict__ U, T* __restrict__ Z, int n_tokens, int d_in, int R,
                                       int n_modules) {
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[FRAG_M][FRAG_N][4];
    mainloop<T, true>(acc, stages, X, A_cat, n_tokens, R, d_in, m0, n0);
    const Frag f;
    LC_UNROLL
    for (int i = 0; i < FRAG_M; ++i)
        LC_UNROLL
        for (int v = 0; v < 4; ++v) {
            const int t = m0 + f.row(i, v);
            if (t >= n_tokens) continue;
            const int sample = sample_of[t];
            LC_UNROLL
            for (int j = 0; j < FRAG_N; ++j) {
                const int col = n0 + f.col(j, v);
                if (col >= R) continue;
                if (U) U[(size_t)t * R + col] = lc::from_f32<T>(acc[i][j][v]);
                Z[(size_t)t * R + col] =
                    lc::from_f32<T>(acc[i][j][v] * lc::diag(C, n_modules, module_of, col_scale, sample, col));
            }
        }
}

// Grid (ceil(N / BN), ceil(M / BM)), block (256). out (M, N) += A · op(B): the expand
// (A = Z, B = B_cat stored nk, K = R) and ∂X (A = ∂U, B = A_cat stored kn, K = R).
template <typename T, bool NK>
__device__ __forceinline__ void accumulate(T* stages, const T* __restrict__ A, const T* __restrict__ B,
                                           T* __restrict__ out, int M, int N, int K) {
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[FRAG_M][FRAG_N][4];
    mainloop<T, NK>(acc, stages, A, B, M, N, K, m0, n0);
    const Frag f;
    LC_UNROLL
    for (int i = 0; i < FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int row = m0 + f.row(i, v), col = n0 + f.col(j, v);
                if (row < M && col < N) {
                    T* o = out + (size_t)row * N + col;
                    *o = lc::from_f32<T>(lc::to_f32(*o) + acc[i][j][v]);
                }
            }
}

// Grid (ceil(R / BN), ceil(T / BM)), block (256); K = d_out. H = G B_cat in registers; ∂U (if
// given) = H ∘ D; ∂C (if given) += the tile's s_j H U, segmented by module and by runs of tokens
// of one sample.
template <typename T>
__device__ __forceinline__ void hidden(T* stages, const T* __restrict__ G, const T* __restrict__ B_cat,
                                       const T* __restrict__ U, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, float* __restrict__ dC,
                                       T* __restrict__ dU, int n_tokens, int d_out, int R, int n_modules) {
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[FRAG_M][FRAG_N][4];
    mainloop<T, false>(acc, stages, G, B_cat, n_tokens, R, d_out, m0, n0);
    const Frag f;
    if (dU) {
        LC_UNROLL
        for (int i = 0; i < FRAG_M; ++i)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int t = m0 + f.row(i, v);
                if (t >= n_tokens) continue;
                const int sample = sample_of[t];
                LC_UNROLL
                for (int j = 0; j < FRAG_N; ++j) {
                    const int col = n0 + f.col(j, v);
                    if (col < R)
                        dU[(size_t)t * R + col] = lc::from_f32<T>(
                            acc[i][j][v] * lc::diag(C, n_modules, module_of, col_scale, sample, col));
                }
            }
    }
    if (!dC) return;  // uniform across the block: no barrier below is skipped by only some threads

    // A segment is a maximal run of the tile's columns that belong to one module.
    const int tid = threadIdx.x;
    const int n_cols = min(BN, R - n0);
    auto is_segment_start = [&](int n) { return n == 0 || module_of[n0 + n] != module_of[n0 + n - 1]; };
    float(*part)[BN + 1] = reinterpret_cast<float(*)[BN + 1]>(stages);
    for (int half = 0; half < BM / PART_ROWS; ++half) {
        const int row0 = m0 + half * PART_ROWS;
        // part[m][n] = s_j H[t, j] U[t, j] for the half's rows (0 outside the problem), written
        // by the row of warps that holds them.
        if (f.wm0 == half * PART_ROWS) {
            LC_UNROLL
            for (int i = 0; i < FRAG_M; ++i)
                LC_UNROLL
                for (int j = 0; j < FRAG_N; ++j)
                    LC_UNROLL
                    for (int v = 0; v < 4; ++v) {
                        const int m = f.row(i, v) - f.wm0, n = f.col(j, v);
                        const int t = row0 + m, col = n0 + n;
                        part[m][n] = (t < n_tokens && col < R)
                                         ? acc[i][j][v] * lc::to_f32(U[(size_t)t * R + col]) * col_scale[col]
                                         : 0.0f;
                    }
        }
        __syncthreads();
        // Stage 1: each (row, segment start) sums its segment into part[m][start]. Only segment
        // starts are written, each by the thread that owns it, and only non-starts (or its own)
        // are read.
        for (int e = tid; e < PART_ROWS * BN; e += THREADS) {
            const int m = e / BN, n = e % BN;
            if (n >= n_cols || !is_segment_start(n)) continue;
            float s = part[m][n];
            for (int c = n + 1; c < n_cols && !is_segment_start(c); ++c) s += part[m][c];
            part[m][n] = s;
        }
        __syncthreads();
        // Stage 2: one thread per segment walks the half's tokens and adds each run of tokens of
        // one sample with a single atomicAdd.
        const int rows = min(PART_ROWS, n_tokens - row0);
        if (rows > 0 && tid < n_cols && is_segment_start(tid)) {
            const int module = module_of[n0 + tid];
            float run = 0.0f;
            int run_sample = sample_of[row0];
            for (int m = 0; m < rows; ++m) {
                const int sample = sample_of[row0 + m];
                if (sample != run_sample) {
                    atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
                    run = 0.0f;
                    run_sample = sample;
                }
                run += part[m][tid];
            }
            atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
        }
        __syncthreads();  // everyone done with part before the next half overwrites it
    }
}

}  // namespace compose_mma

// Unmangled entry points: compose_mma_<kernel>_bf16. One static allocation per kernel holds the
// pipeline's A and B stages (48 KiB: the static limit).
#define COMPOSE_MMA_STAGES(T)                                                                      \
    SHARED(compose_mma::Chunk16, stage_chunks, [2 * compose_mma::STAGES * compose_mma::TILE / 8]); \
    T* stages = reinterpret_cast<T*>(stage_chunks)

#define COMPOSE_MMA_ENTRIES(suffix, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) compose_mma_shrink_##suffix(                                      \
        const T* X, const T* A_cat, const float* C, const int* sample_of, const int* module_of,                      \
        const float* col_scale, T* U, T* Z, int n_tokens, int d_in, int R, int n_modules) {                          \
        COMPOSE_MMA_STAGES(T);                                                                                         \
        compose_mma::shrink<T>(stages, X, A_cat, C, sample_of, module_of, col_scale, U, Z, n_tokens, d_in, R,         \
                               n_modules);                                                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_mma_expand_##suffix(const T* Z, const T* B_cat, T* Y,     \
                                                                                int n_tokens, int R, int d_out) {      \
        COMPOSE_MMA_STAGES(T);                                                                                         \
        compose_mma::accumulate<T, true>(stages, Z, B_cat, Y, n_tokens, d_out, R);                                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_mma_hidden_##suffix(                                      \
        const T* G, const T* B_cat, const T* U, const float* C, const int* sample_of, const int* module_of,           \
        const float* col_scale, float* dC, T* dU, int n_tokens, int d_out, int R, int n_modules) {                    \
        COMPOSE_MMA_STAGES(T);                                                                                         \
        compose_mma::hidden<T>(stages, G, B_cat, U, C, sample_of, module_of, col_scale, dC, dU, n_tokens, d_out, R,   \
                               n_modules);                                                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_mma_dx_##suffix(const T* dU, const T* A_cat, T* dX,       \
                                                                            int n_tokens, int R, int d_in) {           \
        COMPOSE_MMA_STAGES(T);                                                                                         \
        compose_mma::accumulate<T, false>(stages, dU, A_cat, dX, n_tokens, d_in, R);                                   \
    }

// Tensor cores take 16-bit inputs: no f32 entry (`Variant::applies` in src/kernels/compose_common.rs).
COMPOSE_MMA_ENTRIES(bf16, __nv_bfloat16)
