// Composition backward (DESIGN §2, product mode), given G = ∂L/∂Y:
//
//     H      = G B_cat                                   (T, R)   never stored by the fused variant
//     ∂U     = H ∘ D,  D[σ, j] = C[σ, module_of[j]] · col_scale[j]
//     ∂C[σ, i] += s_i Σ_{t: σ(t) = σ} Σ_{j ∈ block i} H[t, j] U[t, j]      (S, N) per-sample rows
//     ∂X     += ∂U A_cat                                  (T, d_in)   onto the base part G W
//     ∂A_cat  = ∂Uᵀ X                                     (R, d_in)
//     ∂B_cat  = Gᵀ (U ∘ D)                                (d_out, R)  Z re-formed from U on load
//
// Shapes, row-major: G (T, d_out), B_cat (d_out, R), U (T, R) unscaled from the forward,
// X (T, d_in), A_cat (R, d_in); C (S, N) f32, sample_of (T) int32, per column module_of (R)
// int32 and col_scale (R) f32, per module mod_offsets (N + 1) int32 and mod_scale (N) f32.
// Storage T is float or __nv_bfloat16, accumulation f32. ∂C is f32 and accumulated onto
// (zero it for a fresh gradient; reducing its S rows to one is a separate cheap step). ∂X is
// accumulated onto; ∂U, ∂A_cat and ∂B_cat are overwritten. A null ∂C or ∂U skips that output.
// Every kernel takes a column range [j0, j1) of the stacked rank dimension (the loop baseline
// runs them module by module).
//
// Variants (src/kernels/compose_bwd.rs `Variant`, same order):
//   1. naive   one thread per output: hidden_naive writes H (f32 workspace) and ∂U,
//              coeff_grad_naive (one thread per (σ, i)) reduces H ∘ U, then dx/da/db_naive.
//   2. loop    per module, the tiled kernels below over its columns, no split-K (4N launches
//              for every gradient): the serving-system pattern.
//   3. fused   coeff_grad_tiled forms an H tile in registers and, in its epilogue, writes ∂U
//              and reduces s_i H ∘ U over each module's columns and each run of tokens of one
//              sample in shared memory, one atomicAdd per (run, module) into ∂C: H never
//              reaches global memory. Split-K over d_out when the tiles cannot fill the GPU (∂C
//              is linear in H, so each split adds its own part; ∂U partials go through the
//              workspace). Then dx_tiled (split-K too), da_tiled, db_tiled.
#include "common.cuh"

namespace compose_bwd {

using Tile = lc::ComposeTile;

// Variant 1. Grid (ceil((j1 - j0) / 16), ceil(T / 16)), block (16, 16). H is (T, R) f32.
template <typename T>
__device__ __forceinline__ void hidden_naive(const T* __restrict__ G, const T* __restrict__ B_cat,
                                             const float* __restrict__ C, const int* __restrict__ sample_of,
                                             const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                             float* __restrict__ H, T* __restrict__ dU, int n_tokens, int d_out, int R,
                                             int n_modules, int j0, int j1) {
    const int j = j0 + blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || j >= j1) return;
    float h = 0.0f;
    for (int o = 0; o < d_out; ++o) h += lc::to_f32(G[(size_t)t * d_out + o]) * lc::to_f32(B_cat[(size_t)o * R + j]);
    H[(size_t)t * R + j] = h;
    if (dU) dU[(size_t)t * R + j] = lc::from_f32<T>(h * lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j));
}

// Variant 1. One thread per (σ, i), i ∈ [i0, i1); 1-D grid over n_samples × (i1 - i0).
template <typename T>
__device__ __forceinline__ void coeff_grad_naive(const float* __restrict__ H, const T* __restrict__ U,
                                                 const int* __restrict__ sample_of, const int* __restrict__ mod_offsets,
                                                 const float* __restrict__ mod_scale, float* __restrict__ dC,
                                                 int n_tokens, int R, int n_modules, int n_samples, int i0, int i1) {
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= n_samples * (i1 - i0)) return;
    const int sample = idx / (i1 - i0), i = i0 + idx % (i1 - i0);
    float acc = 0.0f;
    for (int t = 0; t < n_tokens; ++t) {
        if (sample_of[t] != sample) continue;
        for (int j = mod_offsets[i]; j < mod_offsets[i + 1]; ++j)
            acc += H[(size_t)t * R + j] * lc::to_f32(U[(size_t)t * R + j]);
    }
    dC[(size_t)sample * n_modules + i] += mod_scale[i] * acc;
}

// Variant 1. Grid (ceil(d_in / 16), ceil(T / 16)), block (16, 16). ∂X += ∂U[:, j0:j1] A_cat[j0:j1].
template <typename T>
__device__ __forceinline__ void dx_naive(const T* __restrict__ dU, const T* __restrict__ A_cat, T* __restrict__ dX,
                                         int n_tokens, int R, int d_in, int j0, int j1) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || k >= d_in) return;
    float acc = 0.0f;
    for (int j = j0; j < j1; ++j) acc += lc::to_f32(dU[(size_t)t * R + j]) * lc::to_f32(A_cat[(size_t)j * d_in + k]);
    dX[(size_t)t * d_in + k] = lc::from_f32<T>(lc::to_f32(dX[(size_t)t * d_in + k]) + acc);
}

// Variant 1. Grid (ceil(d_in / 16), ceil((j1 - j0) / 16)), block (16, 16). ∂A_cat[j] = Σ_t ∂U[t, j] X[t].
template <typename T>
__device__ __forceinline__ void da_naive(const T* __restrict__ dU, const T* __restrict__ X, T* __restrict__ dA,
                                         int n_tokens, int R, int d_in, int j0, int j1) {
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = j0 + blockIdx.y * blockDim.y + threadIdx.y;
    if (j >= j1 || k >= d_in) return;
    float acc = 0.0f;
    for (int t = 0; t < n_tokens; ++t) acc += lc::to_f32(dU[(size_t)t * R + j]) * lc::to_f32(X[(size_t)t * d_in + k]);
    dA[(size_t)j * d_in + k] = lc::from_f32<T>(acc);
}

// Variant 1. Grid (ceil((j1 - j0) / 16), ceil(d_out / 16)), block (16, 16).
// ∂B_cat[o, j] = Σ_t G[t, o] U[t, j] D[σ(t), j].
template <typename T>
__device__ __forceinline__ void db_naive(const T* __restrict__ G, const T* __restrict__ U, const float* __restrict__ C,
                                         const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                         const float* __restrict__ col_scale, T* __restrict__ dB, int n_tokens, int R,
                                         int d_out, int n_modules, int j0, int j1) {
    const int j = j0 + blockIdx.x * blockDim.x + threadIdx.x;
    const int o = blockIdx.y * blockDim.y + threadIdx.y;
    if (o >= d_out || j >= j1) return;
    float acc = 0.0f;
    for (int t = 0; t < n_tokens; ++t)
        acc += lc::to_f32(G[(size_t)t * d_out + o]) * lc::to_f32(U[(size_t)t * R + j]) *
               lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j);
    dB[(size_t)o * R + j] = lc::from_f32<T>(acc);
}

// Z = U ∘ D formed on load, addressed (outer = column j - j0, k = token t) for db_tiled.
template <typename T>
struct ScaledU {
    const T* U;
    const float* C;
    const int* sample_of;
    const int* module_of;
    const float* col_scale;
    int R, n_modules, j0;
    static constexpr bool K_CONTIGUOUS = false;
    __device__ __forceinline__ float operator()(int jj, int t) const {
        const int j = j0 + jj;
        return lc::to_f32(U[(size_t)t * R + j]) * lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j);
    }
};

// Variants 2 and 3. Grid (ceil((j1 - j0) / BN), ceil(T / BM), splits), block (256); K = d_out.
template <typename T>
__device__ __forceinline__ void coeff_grad_tiled(const T* __restrict__ G, const T* __restrict__ B_cat,
                                                 const T* __restrict__ U, const float* __restrict__ C,
                                                 const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                                 const float* __restrict__ col_scale, float* __restrict__ dC,
                                                 T* __restrict__ dU, float* __restrict__ work, int n_tokens, int d_out,
                                                 int R, int n_modules, int j0, int j1, int chunk) {
    const int width = j1 - j0;
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};  // this thread's part of the H tile (of this split)
    lc::tile_mainloop<Tile>(acc, row0, col0, n_tokens, width, lc::split_begin(chunk), lc::split_end(chunk, d_out),
                            lc::OuterRows<T>{G, d_out, 0, 0}, lc::KRows<T>{B_cat, R, j0, 0});
    const int tid = threadIdx.x;
    const int tx = tid % Tile::THREADS_N, ty = tid / Tile::THREADS_N;

    if (dU) {
        for (int i = 0; i < Tile::TM; ++i) {
            const int t = row0 + ty + i * Tile::THREADS_M;
            if (t >= n_tokens) continue;
            const int sample = sample_of[t];
            for (int q = 0; q < Tile::TN; ++q) {
                const int jj = col0 + tx + q * Tile::THREADS_N;
                if (jj >= width) continue;
                const float du = acc[i][q] * lc::diag(C, n_modules, module_of, col_scale, sample, j0 + jj);
                if (gridDim.z > 1)
                    work[((size_t)blockIdx.z * n_tokens + t) * width + jj] = du;
                else
                    dU[(size_t)t * R + j0 + jj] = lc::from_f32<T>(du);
            }
        }
    }
    if (!dC) return;  // uniform across the block: no barrier below is skipped by only some threads

    // part[m][n] = s_j H[t, j] U[t, j] for the tile (0 outside the problem).
    SHARED(float, part, [Tile::BM][Tile::BN + 1]);
    for (int i = 0; i < Tile::TM; ++i) {
        const int m = ty + i * Tile::THREADS_M, t = row0 + m;
        for (int q = 0; q < Tile::TN; ++q) {
            const int n = tx + q * Tile::THREADS_N, jj = col0 + n;
            part[m][n] = (t < n_tokens && jj < width)
                             ? acc[i][q] * lc::to_f32(U[(size_t)t * R + j0 + jj]) * col_scale[j0 + jj]
                             : 0.0f;
        }
    }
    __syncthreads();
    // A segment is a maximal run of the tile's columns that belong to one module. Stage 1: each
    // (row, segment start) sums its segment into part[m][start]. Only segment starts are
    // written, each by the thread that owns it, and only non-starts (or its own) are read.
    const int n_cols = min(Tile::BN, width - col0);
    auto is_segment_start = [&](int n) {
        return n == 0 || module_of[j0 + col0 + n] != module_of[j0 + col0 + n - 1];
    };
    for (int e = tid; e < Tile::BM * Tile::BN; e += Tile::THREADS) {
        const int m = e / Tile::BN, n = e % Tile::BN;
        if (n >= n_cols || !is_segment_start(n)) continue;
        float s = part[m][n];
        for (int c = n + 1; c < n_cols && !is_segment_start(c); ++c) s += part[m][c];
        part[m][n] = s;
    }
    __syncthreads();
    // Stage 2: one thread per segment walks the tile's tokens and adds each run of tokens of one
    // sample with a single atomicAdd (sequences are contiguous runs in practice).
    if (tid < n_cols && is_segment_start(tid)) {
        const int module = module_of[j0 + col0 + tid];
        const int rows = min(Tile::BM, n_tokens - row0);
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
}

// Variants 2 and 3. Grid (ceil(d_in / BN), ceil(T / BM), splits), block (256); K = j1 - j0.
// One split: ∂X += the tile. Several: partials to work[z][t][k], then sum_partials.
template <typename T>
__device__ __forceinline__ void dx_tiled(const T* __restrict__ dU, const T* __restrict__ A_cat, T* __restrict__ dX,
                                         float* __restrict__ work, int n_tokens, int R, int d_in, int j0, int j1,
                                         int chunk) {
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};
    lc::tile_mainloop<Tile>(acc, row0, col0, n_tokens, d_in, lc::split_begin(chunk), lc::split_end(chunk, j1 - j0),
                            lc::OuterRows<T>{dU, R, 0, j0}, lc::KRows<T>{A_cat, d_in, 0, j0});
    lc::add_tile_or_partial<Tile>(acc, row0, col0, n_tokens, d_in, dX, work);
}

// Variants 2 and 3. Grid (ceil(d_in / BN), ceil((j1 - j0) / BM)), block (256); K = T.
template <typename T>
__device__ __forceinline__ void da_tiled(const T* __restrict__ dU, const T* __restrict__ X, T* __restrict__ dA,
                                         int n_tokens, int R, int d_in, int j0, int j1) {
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};
    lc::tile_mainloop<Tile>(acc, row0, col0, j1 - j0, d_in, 0, n_tokens, lc::KRows<T>{dU, R, j0, 0},
                            lc::KRows<T>{X, d_in, 0, 0});
    const int tx = threadIdx.x % Tile::THREADS_N, ty = threadIdx.x / Tile::THREADS_N;
    for (int i = 0; i < Tile::TM; ++i) {
        const int jj = row0 + ty + i * Tile::THREADS_M;
        if (jj >= j1 - j0) continue;
        for (int q = 0; q < Tile::TN; ++q) {
            const int k = col0 + tx + q * Tile::THREADS_N;
            if (k < d_in) dA[(size_t)(j0 + jj) * d_in + k] = lc::from_f32<T>(acc[i][q]);
        }
    }
}

// Variants 2 and 3. Grid (ceil((j1 - j0) / BN), ceil(d_out / BM)), block (256); K = T.
template <typename T>
__device__ __forceinline__ void db_tiled(const T* __restrict__ G, const T* __restrict__ U, const float* __restrict__ C,
                                         const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                         const float* __restrict__ col_scale, T* __restrict__ dB, int n_tokens, int R,
                                         int d_out, int n_modules, int j0, int j1) {
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};
    lc::tile_mainloop<Tile>(acc, row0, col0, d_out, j1 - j0, 0, n_tokens, lc::KRows<T>{G, d_out, 0, 0},
                            ScaledU<T>{U, C, sample_of, module_of, col_scale, R, n_modules, j0});
    const int tx = threadIdx.x % Tile::THREADS_N, ty = threadIdx.x / Tile::THREADS_N;
    for (int i = 0; i < Tile::TM; ++i) {
        const int o = row0 + ty + i * Tile::THREADS_M;
        if (o >= d_out) continue;
        for (int q = 0; q < Tile::TN; ++q) {
            const int jj = col0 + tx + q * Tile::THREADS_N;
            if (jj < j1 - j0) dB[(size_t)o * R + j0 + jj] = lc::from_f32<T>(acc[i][q]);
        }
    }
}

}  // namespace compose_bwd

// Unmangled entry points: compose_bwd_<kernel>_<dtype>.
#define COMPOSE_BWD_ENTRIES(suffix, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_hidden_naive_##suffix(                                \
        const T* G, const T* B_cat, const float* C, const int* sample_of, const int* module_of,                      \
        const float* col_scale, float* H, T* dU, int n_tokens, int d_out, int R, int n_modules, int j0, int j1) {     \
        compose_bwd::hidden_naive<T>(G, B_cat, C, sample_of, module_of, col_scale, H, dU, n_tokens, d_out, R,         \
                                     n_modules, j0, j1);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_coeff_grad_naive_##suffix(                            \
        const float* H, const T* U, const int* sample_of, const int* mod_offsets, const float* mod_scale, float* dC,  \
        int n_tokens, int R, int n_modules, int n_samples, int i0, int i1) {                                          \
        compose_bwd::coeff_grad_naive<T>(H, U, sample_of, mod_offsets, mod_scale, dC, n_tokens, R, n_modules,         \
                                         n_samples, i0, i1);                                                           \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_dx_naive_##suffix(                                    \
        const T* dU, const T* A_cat, T* dX, int n_tokens, int R, int d_in, int j0, int j1) {                          \
        compose_bwd::dx_naive<T>(dU, A_cat, dX, n_tokens, R, d_in, j0, j1);                                            \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_da_naive_##suffix(                                    \
        const T* dU, const T* X, T* dA, int n_tokens, int R, int d_in, int j0, int j1) {                              \
        compose_bwd::da_naive<T>(dU, X, dA, n_tokens, R, d_in, j0, j1);                                                \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_db_naive_##suffix(                                    \
        const T* G, const T* U, const float* C, const int* sample_of, const int* module_of, const float* col_scale,   \
        T* dB, int n_tokens, int R, int d_out, int n_modules, int j0, int j1) {                                       \
        compose_bwd::db_naive<T>(G, U, C, sample_of, module_of, col_scale, dB, n_tokens, R, d_out, n_modules, j0, j1); \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_coeff_grad_tiled_##suffix(                            \
        const T* G, const T* B_cat, const T* U, const float* C, const int* sample_of, const int* module_of,           \
        const float* col_scale, float* dC, T* dU, float* work, int n_tokens, int d_out, int R, int n_modules, int j0, \
        int j1, int chunk) {                                                                                           \
        compose_bwd::coeff_grad_tiled<T>(G, B_cat, U, C, sample_of, module_of, col_scale, dC, dU, work, n_tokens,     \
                                         d_out, R, n_modules, j0, j1, chunk);                                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_dx_tiled_##suffix(                                    \
        const T* dU, const T* A_cat, T* dX, float* work, int n_tokens, int R, int d_in, int j0, int j1, int chunk) {  \
        compose_bwd::dx_tiled<T>(dU, A_cat, dX, work, n_tokens, R, d_in, j0, j1, chunk);                               \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_da_tiled_##suffix(                                    \
        const T* dU, const T* X, T* dA, int n_tokens, int R, int d_in, int j0, int j1) {                              \
        compose_bwd::da_tiled<T>(dU, X, dA, n_tokens, R, d_in, j0, j1);                                                \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_bwd_db_tiled_##suffix(                                    \
        const T* G, const T* U, const float* C, const int* sample_of, const int* module_of, const float* col_scale,   \
        T* dB, int n_tokens, int R, int d_out, int n_modules, int j0, int j1) {                                       \
        compose_bwd::db_tiled<T>(G, U, C, sample_of, module_of, col_scale, dB, n_tokens, R, d_out, n_modules, j0, j1); \
    }

COMPOSE_BWD_ENTRIES(f32, float)
COMPOSE_BWD_ENTRIES(bf16, __nv_bfloat16)
