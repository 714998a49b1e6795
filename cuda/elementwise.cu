// Element-wise transformer ops and the bias gradient (src/model/layers.rs `gelu_forward`,
// `gelu_backward`, `add`):
//
//     gelu_bias_fwd   h = x[r,j] + b[j]     y[r,j] = h · Φ(h),  Φ(h) = (1 + erf(h / √2)) / 2   (exact erf)
//     gelu_bias_bwd   ∂x[r,j] = ∂y[r,j] · (Φ(h) + h · φ(h)),   φ(h) = exp(−h²/2) / √(2π)
//     add             out[i] = a[i] + b[i]
//     add_acc         out[i] = out[i] + a[i]
//     bias_add        y[r,j] = y[r,j] + b[j]        (a linear layer's bias after its GEMM)
//     bias_grad       ∂b[j] = Σ_r ∂y[r,j]
//     cast            out[i] = T(src[i])            (src f32: the model's f32 master weights into
//                                                     its T-typed working copy, f32 gradients into T)
//
// Shapes, row-major: x, y, ∂y, ∂x (rows, D); b, ∂b (D); a, b, out of add/add_acc and src, out of
// cast (n). Storage T is
// float or __nv_bfloat16, arithmetic f32 (erff, expf), one rounding per stored element. y, ∂x, out
// (add) and ∂b are overwritten; add_acc and bias_add accumulate onto out and y. The forward stores nothing beside y:
// the backward recomputes h = x + b from the same inputs (x is the GEMM output, kept anyway), so
// h is exact in f32 and never rounded to T. ∂b of the fused bias is bias_grad over the ∂x that
// gelu_bias_bwd wrote. bias_grad is deterministic: fixed-order sums, no float atomics.
//
// The maps are one kernel each: one thread per element, 1-D grid of 256-thread blocks.
// Variants of bias_grad (src/kernels/elementwise.rs `Variant`, same order):
//   1. naive     one thread per column, rows in order.
//   2. chunked   bias_grad_partial: a 32-column × CHUNK-row tile per block (8 row-threads per
//                column, reduced through shared memory in a fixed order), one partial per chunk
//                into the f32 workspace; then bias_grad_sum: one thread per column, chunks in
//                order. Fills the GPU when D is small and rows many.
#include "common.cuh"

namespace elementwise {

constexpr int WARP = 32;
// bias_grad_partial's block: 32 columns × ROW_THREADS row-threads. Mirrored by `ROW_THREADS` in
// src/kernels/elementwise.rs.
constexpr int ROW_THREADS = 8;
constexpr float SQRT_HALF = 0.70710678118654752f;
constexpr float INV_SQRT_TAU = 0.39894228040143268f;  // 1/√(2π)

__device__ __forceinline__ long long element_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }

__device__ __forceinline__ float gelu(float h) { return 0.5f * h * (1.0f + erff(h * SQRT_HALF)); }

__device__ __forceinline__ float gelu_grad(float h) {
    const float cdf = 0.5f * (1.0f + erff(h * SQRT_HALF));
    const float pdf = INV_SQRT_TAU * expf(-0.5f * h * h);
    return cdf + h * pdf;
}

template <typename T>
__device__ __forceinline__ void gelu_bias_fwd(const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y,
                                              int rows, int D) {
    const long long i = element_index();
    if (i >= (long long)rows * D) return;
    y[i] = lc::from_f32<T>(gelu(lc::to_f32(x[i]) + lc::to_f32(b[i % D])));
}

template <typename T>
__device__ __forceinline__ void gelu_bias_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                              const T* __restrict__ b, T* __restrict__ dx, int rows, int D) {
    const long long i = element_index();
    if (i >= (long long)rows * D) return;
    dx[i] = lc::from_f32<T>(lc::to_f32(dy[i]) * gelu_grad(lc::to_f32(x[i]) + lc::to_f32(b[i % D])));
}

template <typename T>
__device__ __forceinline__ void add(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int n) {
    const long long i = element_index();
    if (i < n) out[i] = lc::from_f32<T>(lc::to_f32(a[i]) + lc::to_f32(b[i]));
}

template <typename T>
__device__ __forceinline__ void add_acc(const T* __restrict__ a, T* __restrict__ out, int n) {
    const long long i = element_index();
    if (i < n) out[i] = lc::from_f32<T>(lc::to_f32(out[i]) + lc::to_f32(a[i]));
}

template <typename T>
__device__ __forceinline__ void bias_add(const T* __restrict__ b, T* __restrict__ y, int rows, int D) {
    const long long i = element_index();
    if (i < (long long)rows * D) y[i] = lc::from_f32<T>(lc::to_f32(y[i]) + lc::to_f32(b[i % D]));
}

template <typename T>
__device__ __forceinline__ void cast(const float* __restrict__ src, T* __restrict__ out, int n) {
    const long long i = element_index();
    if (i < n) out[i] = lc::from_f32<T>(src[i]);
}

// Variant 1. 1-D grid over D.
template <typename T>
__device__ __forceinline__ void bias_grad_naive(const T* __restrict__ dy, T* __restrict__ db, int rows, int D) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    float sum = 0.0f;
    for (int r = 0; r < rows; ++r) sum += lc::to_f32(dy[(size_t)r * D + j]);
    db[j] = lc::from_f32<T>(sum);
}

// Variant 2, step 1. Grid (ceil(D / 32), ceil(rows / chunk)), block (32, ROW_THREADS). Block
// (bx, c) sums rows [c·chunk, min(rows, (c + 1)·chunk)) of columns bx·32 + [0, 32): thread (tx, ty)
// takes rows c·chunk + ty + k·ROW_THREADS, then row-thread 0 of each column adds the ROW_THREADS
// sums in order into work[c·D + j].
template <typename T>
__device__ __forceinline__ void bias_grad_partial(const T* __restrict__ dy, float* __restrict__ work, int rows, int D,
                                                  int chunk) {
    SHARED(float, part, [ROW_THREADS][WARP + 1]);
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int j = blockIdx.x * WARP + tx;
    const int r0 = blockIdx.y * chunk, r1 = min(rows, r0 + chunk);
    float sum = 0.0f;
    if (j < D)
        for (int r = r0 + ty; r < r1; r += ROW_THREADS) sum += lc::to_f32(dy[(size_t)r * D + j]);
    part[ty][tx] = sum;
    __syncthreads();  // every row-thread's sum is in shared memory
    if (ty == 0 && j < D) {
        float total = 0.0f;
        for (int k = 0; k < ROW_THREADS; ++k) total += part[k][tx];
        work[(size_t)blockIdx.y * D + j] = total;
    }
}

// Variant 2, step 2. 1-D grid over D: ∂b[j] = the chunk partials of column j in chunk order.
template <typename T>
__device__ __forceinline__ void bias_grad_sum(const float* __restrict__ work, T* __restrict__ db, int D, int chunks) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= D) return;
    float total = 0.0f;
    for (int c = 0; c < chunks; ++c) total += work[(size_t)c * D + j];
    db[j] = lc::from_f32<T>(total);
}

}  // namespace elementwise

// Unmangled entry points: elementwise_<kernel>_<dtype>.
#define ELEMENTWISE_ENTRIES(suffix, T)                                                                                 \
    extern "C" __global__ void __launch_bounds__(256) elementwise_gelu_bias_fwd_##suffix(                              \
        const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ y, int rows, int D) {                       \
        elementwise::gelu_bias_fwd<T>(x, b, y, rows, D);                                                               \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_gelu_bias_bwd_##suffix(                              \
        const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ b, T* __restrict__ dx, int rows,     \
        int D) {                                                                                                       \
        elementwise::gelu_bias_bwd<T>(dy, x, b, dx, rows, D);                                                          \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_add_##suffix(                                        \
        const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, int n) {                               \
        elementwise::add<T>(a, b, out, n);                                                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_add_acc_##suffix(const T* __restrict__ a,            \
                                                                                   T* __restrict__ out, int n) {      \
        elementwise::add_acc<T>(a, out, n);                                                                            \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_bias_add_##suffix(                                   \
        const T* __restrict__ b, T* __restrict__ y, int rows, int D) {                                                \
        elementwise::bias_add<T>(b, y, rows, D);                                                                       \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_cast_##suffix(const float* __restrict__ src,         \
                                                                                T* __restrict__ out, int n) {         \
        elementwise::cast<T>(src, out, n);                                                                             \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_bias_grad_naive_##suffix(                            \
        const T* __restrict__ dy, T* __restrict__ db, int rows, int D) {                                              \
        elementwise::bias_grad_naive<T>(dy, db, rows, D);                                                              \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_bias_grad_partial_##suffix(                          \
        const T* __restrict__ dy, float* __restrict__ work, int rows, int D, int chunk) {                             \
        elementwise::bias_grad_partial<T>(dy, work, rows, D, chunk);                                                   \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) elementwise_bias_grad_sum_##suffix(                              \
        const float* __restrict__ work, T* __restrict__ db, int D, int chunks) {                                      \
        elementwise::bias_grad_sum<T>(work, db, D, chunks);                                                            \
    }

ELEMENTWISE_ENTRIES(f32, float)
ELEMENTWISE_ENTRIES(bf16, __nv_bfloat16)
