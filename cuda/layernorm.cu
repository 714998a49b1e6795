// Layer normalisation over the last dimension (src/model/layers.rs `layernorm_forward` /
// `layernorm_backward`):
//
//     forward    μ_r = (1/D) Σ_j x[r,j]        var_r = (1/D) Σ_j (x[r,j] − μ_r)²   (biased, two-pass)
//                rstd_r = 1 / sqrt(var_r + eps)
//                x̂[r,j] = (x[r,j] − μ_r) · rstd_r
//                y[r,j] = x̂[r,j] · γ[j] + β[j]
//     backward   g[r,j] = ∂y[r,j] · γ[j]
//                ∂x[r,j] = (g[r,j] − mean_j(g[r,·]) − x̂[r,j] · mean_j(g[r,·] ∘ x̂[r,·])) · rstd_r
//                ∂γ[j] = Σ_r ∂y[r,j] · x̂[r,j]        ∂β[j] = Σ_r ∂y[r,j]
//
// Shapes, row-major: x, y, ∂y, ∂x (rows, D); γ, β, ∂γ, ∂β (D); mean, rstd (rows) f32. Storage T is
// float or __nv_bfloat16; statistics and sums are f32. The forward overwrites y, mean and rstd (the
// backward recomputes x̂ from x, mean and rstd instead of storing it: rows·D fewer elements
// written and read). The backward overwrites ∂x, ∂γ and ∂β (add them to earlier gradients with
// cuda/elementwise.cu's accumulating add). ∂γ and ∂β are deterministic: fixed-order sums, no
// float atomics.
//
// Variants (src/kernels/layernorm.rs `Variant`, same order; fwd and dx kernels share the strategy):
//   1. naive   one thread per row, three passes over the row in global memory (mean, variance,
//              output); params_naive: one thread per column summing every row in order.
//   2. warp    one warp per row (8 rows per 256-thread block); lanes stride the row (coalesced),
//              sums by __shfl_xor_sync butterflies (every lane gets the same bits); ∂γ/∂β by
//              params_partial (a 32-column × CHUNK-row tile per block: 8 row-threads per column,
//              reduced through shared memory in a fixed order, one partial per chunk into the f32
//              workspace) then params_sum (one thread per column, chunks in order).
//   3. block   one 256-thread block per row: warp butterflies, then the 8 warp sums through shared
//              memory, each thread adding them in the same order; for wide rows. Params as in 2.
#include "common.cuh"

namespace layernorm {

constexpr int WARP = 32;
// Threads per block of every variant but params_partial. Mirrored by `THREADS` in
// src/kernels/layernorm.rs.
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / WARP;
// params_partial's block: 32 columns × PARAM_ROW_THREADS row-threads. Mirrored by
// `PARAM_ROW_THREADS` in src/kernels/layernorm.rs.
constexpr int PARAM_ROW_THREADS = 8;

// Sum of `v` over the block's 256 threads, identical in every thread. Every thread must call it;
// `partial` is a WARPS-float shared array, free again when it returns.
__device__ __forceinline__ float block_sum(float v, float* partial) {
    v = lc::warp_sum(v);
    if (threadIdx.x % WARP == 0) partial[threadIdx.x / WARP] = v;
    __syncthreads();  // every warp's sum is in `partial`
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) total += partial[w];
    __syncthreads();  // everyone has read `partial` before a next call overwrites it
    return total;
}

// Where a row's statistics and sums are computed: one thread (stride 1), a warp's lanes (stride
// 32) or a block's threads (stride 256). `reduce` turns each thread's partial sum into the row's.
struct PerThread {
    __device__ __forceinline__ int first() const { return 0; }
    __device__ __forceinline__ int stride() const { return 1; }
    __device__ __forceinline__ float reduce(float v) const { return v; }
};
struct PerWarp {
    __device__ __forceinline__ int first() const { return threadIdx.x % WARP; }
    __device__ __forceinline__ int stride() const { return WARP; }
    __device__ __forceinline__ float reduce(float v) const { return lc::warp_sum(v); }
};
struct PerBlock {
    float* partial;
    __device__ __forceinline__ int first() const { return threadIdx.x; }
    __device__ __forceinline__ int stride() const { return THREADS; }
    __device__ __forceinline__ float reduce(float v) const { return block_sum(v, partial); }
};

// The forward of one row, by the threads `group` names.
template <typename T, class Group>
__device__ __forceinline__ void forward_row(const Group& group, const T* __restrict__ x, const T* __restrict__ gamma,
                                            const T* __restrict__ beta, T* __restrict__ y, float* __restrict__ mean,
                                            float* __restrict__ rstd, int row, int D, float eps) {
    const T* xr = x + (size_t)row * D;
    float sum = 0.0f;
    for (int j = group.first(); j < D; j += group.stride()) sum += lc::to_f32(xr[j]);
    const float mu = group.reduce(sum) / D;
    float sq = 0.0f;
    for (int j = group.first(); j < D; j += group.stride()) {
        const float c = lc::to_f32(xr[j]) - mu;
        sq += c * c;
    }
    const float r = rsqrtf(group.reduce(sq) / D + eps);
    T* yr = y + (size_t)row * D;
    for (int j = group.first(); j < D; j += group.stride())
        yr[j] = lc::from_f32<T>((lc::to_f32(xr[j]) - mu) * r * lc::to_f32(gamma[j]) + lc::to_f32(beta[j]));
    if (group.first() == 0) {
        mean[row] = mu;
        rstd[row] = r;
    }
}

// ∂x of one row, by the threads `group` names.
template <typename T, class Group>
__device__ __forceinline__ void dx_row(const Group& group, const T* __restrict__ dy, const T* __restrict__ x,
                                       const T* __restrict__ gamma, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, T* __restrict__ dx, int row, int D) {
    const T* dyr = dy + (size_t)row * D;
    const T* xr = x + (size_t)row * D;
    const float mu = mean[row], r = rstd[row];
    float sum_g = 0.0f, sum_gx = 0.0f;
    for (int j = group.first(); j < D; j += group.stride()) {
        const float g = lc::to_f32(dyr[j]) * lc::to_f32(gamma[j]);
        sum_g += g;
        sum_gx += g * (lc::to_f32(xr[j]) - mu) * r;
    }
    const float mean_g = group.reduce(sum_g) / D;
    const float mean_gx = group.reduce(sum_gx) / D;
    T* dxr = dx + (size_t)row * D;
    for (int j = group.first(); j < D; j += group.stride()) {
        const float g = lc::to_f32(dyr[j]) * lc::to_f32(gamma[j]);
        const float xhat = (lc::to_f32(xr[j]) - mu) * r;
        dxr[j] = lc::from_f32<T>((g - mean_g - xhat * mean_gx) * r);
    }
}

// Variant 1. 1-D grid over rows, THREADS threads per block.
template <typename T>
__device__ __forceinline__ void fwd_naive(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
                                          int rows, int D, float eps) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row < rows) forward_row(PerThread{}, x, gamma, beta, y, mean, rstd, row, D, eps);
}

// Variant 2. Grid ceil(rows / WARPS), THREADS threads: warp w of block b takes row b·WARPS + w.
// A warp whose row is past the end returns as a whole, so every shuffle has all 32 lanes.
template <typename T>
__device__ __forceinline__ void fwd_warp(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
                                         int rows, int D, float eps) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP;
    if (row < rows) forward_row(PerWarp{}, x, gamma, beta, y, mean, rstd, row, D, eps);
}

// Variant 3. Grid rows, THREADS threads: block b takes row b.
template <typename T>
__device__ __forceinline__ void fwd_block(const T* x, const T* gamma, const T* beta, T* y, float* mean, float* rstd,
                                          int rows, int D, float eps) {
    if ((int)blockIdx.x >= rows) return;  // the whole block: no barrier is left waiting
    SHARED(float, partial, [WARPS]);
    forward_row(PerBlock{partial}, x, gamma, beta, y, mean, rstd, (int)blockIdx.x, D, eps);
}

template <typename T>
__device__ __forceinline__ void dx_naive(const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd,
                                         T* dx, int rows, int D) {
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row < rows) dx_row(PerThread{}, dy, x, gamma, mean, rstd, dx, row, D);
}

template <typename T>
__device__ __forceinline__ void dx_warp(const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd,
                                        T* dx, int rows, int D) {
    const int row = blockIdx.x * WARPS + threadIdx.x / WARP;
    if (row < rows) dx_row(PerWarp{}, dy, x, gamma, mean, rstd, dx, row, D);
}

template <typename T>
__device__ __forceinline__ void dx_block(const T* dy, const T* x, const T* gamma, const float* mean, const float* rstd,
                                         T* dx, int rows, int D) {
    if ((int)blockIdx.x >= rows) return;  // the whole block: no barrier is left waiting
    SHARED(float, partial, [WARPS]);
    dx_row(PerBlock{partial}, dy, x, gamma, mean, rstd, dx, (int)blockIdx.x, D);
}

// Variant 1's ∂γ, ∂β: one thread per column, rows in order. 1-D grid over D, THREADS threads.
template <typename T>
__device__ __forceinline__ void params_naive(const T* dy, const T* x, const float* mean, const float* rstd, T* dgamma,
                                             T* dbeta, int rows, int D) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    float sum_gamma = 0.0f, sum_beta = 0.0f;
    for (int r = 0; r < rows; ++r) {
        const float d = lc::to_f32(dy[(size_t)r * D + j]);
        sum_gamma += d * (lc::to_f32(x[(size_t)r * D + j]) - mean[r]) * rstd[r];
        sum_beta += d;
    }
    dgamma[j] = lc::from_f32<T>(sum_gamma);
    dbeta[j] = lc::from_f32<T>(sum_beta);
}

// Variants 2 and 3, step 1. Grid (ceil(D / 32), ceil(rows / chunk)), block (32, PARAM_ROW_THREADS).
// Block (bx, c) sums rows [c·chunk, min(rows, (c + 1)·chunk)) of columns bx·32 + [0, 32): thread
// (tx, ty) takes rows c·chunk + ty + k·PARAM_ROW_THREADS, then row-thread 0 of each column adds the
// PARAM_ROW_THREADS sums in order into work[c·D + j] (∂γ) and work[(chunks + c)·D + j] (∂β).
template <typename T>
__device__ __forceinline__ void params_partial(const T* dy, const T* x, const float* mean, const float* rstd,
                                               float* work, int rows, int D, int chunk) {
    SHARED(float, part_gamma, [PARAM_ROW_THREADS][WARP + 1]);
    SHARED(float, part_beta, [PARAM_ROW_THREADS][WARP + 1]);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * WARP + tx;
    const int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float sum_gamma = 0.0f, sum_beta = 0.0f;
    if (j < D) {
        for (int r = r0 + ty; r < r1; r += PARAM_ROW_THREADS) {
            const float d = lc::to_f32(dy[(size_t)r * D + j]);
            sum_gamma += d * (lc::to_f32(x[(size_t)r * D + j]) - mean[r]) * rstd[r];
            sum_beta += d;
        }
    }
    part_gamma[ty][tx] = sum_gamma;
    part_beta[ty][tx] = sum_beta;
    __syncthreads();  // every row-thread's sums are in shared memory
    if (ty == 0 && j < D) {
        float total_gamma = 0.0f, total_beta = 0.0f;
        for (int k = 0; k < PARAM_ROW_THREADS; ++k) {
            total_gamma += part_gamma[k][tx];
            total_beta += part_beta[k][tx];
        }
        const int chunks = gridDim.y;
        work[(size_t)blockIdx.y * D + j] = total_gamma;
        work[(size_t)(chunks + blockIdx.y) * D + j] = total_beta;
    }
}

// Variants 2 and 3, step 2. 1-D grid over D, THREADS threads: ∂γ[j], ∂β[j] = the chunk partials of
// column j added in chunk order.
template <typename T>
__device__ __forceinline__ void params_sum(const float* work, T* dgamma, T* dbeta, int D, int chunks) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    float total_gamma = 0.0f, total_beta = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        total_gamma += work[(size_t)c * D + j];
        total_beta += work[(size_t)(chunks + c) * D + j];
    }
    dgamma[j] = lc::from_f32<T>(total_gamma);
    dbeta[j] = lc::from_f32<T>(total_beta);
}

}  // namespace layernorm

// Unmangled entry points: layernorm_<kernel>_<dtype>. `kernel` is parenthesised at the use site.
#define LAYERNORM_FWD_ENTRY(name, T, kernel)                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                               \
        name(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y,  \
             float* __restrict__ mean, float* __restrict__ rstd, int rows, int D, float eps) {                     \
        kernel(x, gamma, beta, y, mean, rstd, rows, D, eps);                                                        \
    }
#define LAYERNORM_DX_ENTRY(name, T, kernel)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                                \
        name(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ gamma,                        \
             const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx, int rows, int D) { \
        kernel(dy, x, gamma, mean, rstd, dx, rows, D);                                                               \
    }
#define LAYERNORM_ENTRIES(suffix, T)                                                                                   \
    LAYERNORM_FWD_ENTRY(layernorm_fwd_naive_##suffix, T, (layernorm::fwd_naive<T>))                                    \
    LAYERNORM_FWD_ENTRY(layernorm_fwd_warp_##suffix, T, (layernorm::fwd_warp<T>))                                      \
    LAYERNORM_FWD_ENTRY(layernorm_fwd_block_##suffix, T, (layernorm::fwd_block<T>))                                    \
    LAYERNORM_DX_ENTRY(layernorm_dx_naive_##suffix, T, (layernorm::dx_naive<T>))                                       \
    LAYERNORM_DX_ENTRY(layernorm_dx_warp_##suffix, T, (layernorm::dx_warp<T>))                                         \
    LAYERNORM_DX_ENTRY(layernorm_dx_block_##suffix, T, (layernorm::dx_block<T>))                                       \
    extern "C" __global__ void __launch_bounds__(256) layernorm_params_naive_##suffix(                                 \
        const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,                             \
        const float* __restrict__ rstd, T* __restrict__ dgamma, T* __restrict__ dbeta, int rows, int D) {              \
        layernorm::params_naive<T>(dy, x, mean, rstd, dgamma, dbeta, rows, D);                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) layernorm_params_partial_##suffix(                               \
        const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ mean,                             \
        const float* __restrict__ rstd, float* __restrict__ work, int rows, int D, int chunk) {                        \
        layernorm::params_partial<T>(dy, x, mean, rstd, work, rows, D, chunk);                                         \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) layernorm_params_sum_##suffix(                                   \
        const float* __restrict__ work, T* __restrict__ dgamma, T* __restrict__ dbeta, int D, int chunks) {            \
        layernorm::params_sum<T>(work, dgamma, dbeta, D, chunks);                                                      \
    }

LAYERNORM_ENTRIES(f32, float)
LAYERNORM_ENTRIES(bf16, __nv_bfloat16)
