// Composition forward (DESIGN §2, product mode): N LoRA modules of any ranks as one rank-R
// product, R = Σ r_i, with per-sample coefficient rows.
//
//     U = X A_catᵀ                  (T, R)      shrink, unscaled; kept for the backward if asked
//     Z = U ∘ D,  D[σ, j] = C[σ, module_of[j]] · col_scale[j]     (per-sample diagonal)
//     Y += Z B_catᵀ                 (T, d_out)  expand, accumulated onto the base output X Wᵀ + b
//
// Shapes, row-major: X (T, d_in), A_cat (R, d_in), B_cat (d_out, R), C (S, N) f32,
// sample_of (T) int32 (token → coefficient row), module_of (R) int32 and col_scale (R) f32 (the
// module and s_i of each stacked rank column: mixed ranks without branching). Storage T is float
// or __nv_bfloat16; every product accumulates in f32 and each output is rounded once.
// U (optional: null skips it) and Z are overwritten; Y is accumulated onto (read, add, round).
// Every kernel takes a column range [j0, j1) of the stacked rank dimension so that the loop
// baseline can run them module by module.
//
// Variants (src/kernels/compose_fwd.rs `Variant`, same order; the Rust side plans the launches):
//   1. naive   one thread per output element: shrink_naive writes U and Z, expand_naive adds
//              Z B_catᵀ onto Y. Two launches; the readable baseline.
//   2. loop    what serving systems do: per module one shrink and one expand launch (2N
//              launches) over the module's columns, with the tiled kernels below and no split-K.
//   3. fused   all N modules as one rank-R product: shrink_tiled (32×64 tile, the diagonal
//              scale applied in its epilogue), then expand_tiled accumulating onto Y. When a
//              product has too few output tiles to fill the GPU (small T, the decode regime),
//              K is split across gridDim.z: each split writes f32 partials to a workspace and
//              shrink_reduce / sum_partials add them in a fixed order and apply the epilogue.
#include "common.cuh"

namespace compose_fwd {

using Tile = lc::ComposeTile;

// Variant 1. Grid (ceil((j1 - j0) / 16), ceil(T / 16)), block (16, 16).
template <typename T>
__device__ __forceinline__ void shrink_naive(const T* __restrict__ X, const T* __restrict__ A_cat,
                                             const float* __restrict__ C, const int* __restrict__ sample_of,
                                             const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                             T* __restrict__ U, T* __restrict__ Z, int n_tokens, int d_in, int R,
                                             int n_modules, int j0, int j1) {
    const int j = j0 + blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || j >= j1) return;
    float u = 0.0f;
    for (int k = 0; k < d_in; ++k) u += lc::to_f32(X[(size_t)t * d_in + k]) * lc::to_f32(A_cat[(size_t)j * d_in + k]);
    if (U) U[(size_t)t * R + j] = lc::from_f32<T>(u);
    Z[(size_t)t * R + j] = lc::from_f32<T>(u * lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j));
}

// Variant 1. Grid (ceil(d_out / 16), ceil(T / 16)), block (16, 16).
template <typename T>
__device__ __forceinline__ void expand_naive(const T* __restrict__ Z, const T* __restrict__ B_cat, T* __restrict__ Y,
                                             int n_tokens, int R, int d_out, int j0, int j1) {
    const int o = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || o >= d_out) return;
    float acc = 0.0f;
    for (int j = j0; j < j1; ++j) acc += lc::to_f32(Z[(size_t)t * R + j]) * lc::to_f32(B_cat[(size_t)o * R + j]);
    Y[(size_t)t * d_out + o] = lc::from_f32<T>(lc::to_f32(Y[(size_t)t * d_out + o]) + acc);
}

// Variants 2 and 3. Grid (ceil((j1 - j0) / BN), ceil(T / BM), splits), block (256). With one
// split the epilogue writes U and Z; with several, block z writes its partial U tile to
// work[z][t][j - j0] (splits × T × (j1 - j0) f32) and shrink_reduce finishes.
template <typename T>
__device__ __forceinline__ void shrink_tiled(const T* __restrict__ X, const T* __restrict__ A_cat,
                                             const float* __restrict__ C, const int* __restrict__ sample_of,
                                             const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                             T* __restrict__ U, T* __restrict__ Z, float* __restrict__ work,
                                             int n_tokens, int d_in, int R, int n_modules, int j0, int j1, int chunk) {
    const int width = j1 - j0;
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};
    lc::tile_mainloop<Tile>(acc, row0, col0, n_tokens, width, lc::split_begin(chunk), lc::split_end(chunk, d_in),
                            lc::OuterRows<T>{X, d_in, 0, 0}, lc::OuterRows<T>{A_cat, d_in, j0, 0});
    const int tx = threadIdx.x % Tile::THREADS_N, ty = threadIdx.x / Tile::THREADS_N;
    for (int i = 0; i < Tile::TM; ++i) {
        const int t = row0 + ty + i * Tile::THREADS_M;
        if (t >= n_tokens) continue;
        const int sample = sample_of[t];
        for (int q = 0; q < Tile::TN; ++q) {
            const int jj = col0 + tx + q * Tile::THREADS_N;
            if (jj >= width) continue;
            if (gridDim.z > 1) {
                work[((size_t)blockIdx.z * n_tokens + t) * width + jj] = acc[i][q];
                continue;
            }
            const int j = j0 + jj;
            if (U) U[(size_t)t * R + j] = lc::from_f32<T>(acc[i][q]);
            Z[(size_t)t * R + j] = lc::from_f32<T>(acc[i][q] * lc::diag(C, n_modules, module_of, col_scale, sample, j));
        }
    }
}

// Split-K epilogue of shrink_tiled: U = Σ_z partials (in order), Z = U ∘ D. One thread per
// (t, j - j0); 1-D grid of 256-thread blocks.
template <typename T>
__device__ __forceinline__ void shrink_reduce(const float* __restrict__ work, int splits, const float* __restrict__ C,
                                              const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                              const float* __restrict__ col_scale, T* __restrict__ U,
                                              T* __restrict__ Z, int n_tokens, int R, int n_modules, int j0, int j1) {
    const int width = j1 - j0;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_tokens * width) return;
    const int t = (int)(idx / width), j = j0 + (int)(idx % width);
    const float u = lc::sum_splits(work, splits, (size_t)n_tokens * width, (size_t)t * width + (j - j0));
    if (U) U[(size_t)t * R + j] = lc::from_f32<T>(u);
    Z[(size_t)t * R + j] = lc::from_f32<T>(u * lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j));
}

// Variants 2 and 3. Grid (ceil(d_out / BN), ceil(T / BM), splits), block (256); K = j1 - j0.
// With one split Y += the tile; with several, partials go to work[z][t][o] (splits × T × d_out)
// and sum_partials adds them onto Y.
template <typename T>
__device__ __forceinline__ void expand_tiled(const T* __restrict__ Z, const T* __restrict__ B_cat, T* __restrict__ Y,
                                             float* __restrict__ work, int n_tokens, int R, int d_out, int j0, int j1,
                                             int chunk) {
    const int row0 = blockIdx.y * Tile::BM, col0 = blockIdx.x * Tile::BN;
    float acc[Tile::TM][Tile::TN] = {};
    lc::tile_mainloop<Tile>(acc, row0, col0, n_tokens, d_out, lc::split_begin(chunk), lc::split_end(chunk, j1 - j0),
                            lc::OuterRows<T>{Z, R, 0, j0}, lc::OuterRows<T>{B_cat, R, 0, j0});
    lc::add_tile_or_partial<Tile>(acc, row0, col0, n_tokens, d_out, Y, work);
}

}  // namespace compose_fwd

// Unmangled entry points: compose_fwd_<kernel>_<dtype>.
#define COMPOSE_FWD_ENTRIES(suffix, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_shrink_naive_##suffix(                                \
        const T* X, const T* A_cat, const float* C, const int* sample_of, const int* module_of,                      \
        const float* col_scale, T* U, T* Z, int n_tokens, int d_in, int R, int n_modules, int j0, int j1) {          \
        compose_fwd::shrink_naive<T>(X, A_cat, C, sample_of, module_of, col_scale, U, Z, n_tokens, d_in, R,           \
                                     n_modules, j0, j1);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_expand_naive_##suffix(                                \
        const T* Z, const T* B_cat, T* Y, int n_tokens, int R, int d_out, int j0, int j1) {                           \
        compose_fwd::expand_naive<T>(Z, B_cat, Y, n_tokens, R, d_out, j0, j1);                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_shrink_tiled_##suffix(                                \
        const T* X, const T* A_cat, const float* C, const int* sample_of, const int* module_of,                      \
        const float* col_scale, T* U, T* Z, float* work, int n_tokens, int d_in, int R, int n_modules, int j0,       \
        int j1, int chunk) {                                                                                           \
        compose_fwd::shrink_tiled<T>(X, A_cat, C, sample_of, module_of, col_scale, U, Z, work, n_tokens, d_in, R,     \
                                     n_modules, j0, j1, chunk);                                                        \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_shrink_reduce_##suffix(                               \
        const float* work, int splits, const float* C, const int* sample_of, const int* module_of,                   \
        const float* col_scale, T* U, T* Z, int n_tokens, int R, int n_modules, int j0, int j1) {                     \
        compose_fwd::shrink_reduce<T>(work, splits, C, sample_of, module_of, col_scale, U, Z, n_tokens, R, n_modules, \
                                      j0, j1);                                                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_expand_tiled_##suffix(                                \
        const T* Z, const T* B_cat, T* Y, float* work, int n_tokens, int R, int d_out, int j0, int j1, int chunk) {   \
        compose_fwd::expand_tiled<T>(Z, B_cat, Y, work, n_tokens, R, d_out, j0, j1, chunk);                            \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_fwd_sum_partials_##suffix(                                \
        const float* work, int splits, T* out, int rows, int width, int ld, int col_off, int accumulate) {            \
        lc::sum_partials<T>(work, splits, out, rows, width, ld, col_off, accumulate);                                  \
    }

COMPOSE_FWD_ENTRIES(f32, float)
COMPOSE_FWD_ENTRIES(bf16, __nv_bfloat16)
