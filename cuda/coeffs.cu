// Composition coefficients of the learned (softmax) mode, one row per layer (DESIGN §2,
// src/compose/mod.rs `coefficients` / `coefficients_backward`):
//
//     forward:   c[l, :] = softmax(v[l, :])              c_i = exp(v_i − max v) / Σ_k exp(v_k − max v)
//     backward:  dv[l, :] = c ∘ (dc − ⟨dc, c⟩)           the true softmax Jacobian
//
// Shapes: v, c, dc, dv (rows, N) row-major, rows = layers (or layers × samples: any number of
// independent rows). c and dv are overwritten. Storage is f32 only: the coefficients are
// trainable values (master weights, f32 like every optimizer-owned tensor) and the composition
// kernels read C as `const float*`; accumulation f32. The backward takes the forward's c rather
// than recomputing it from v.
//
// Variants (src/kernels/coeffs.rs, same order):
//   1. row   one thread per row, passes over its N values. The baseline (rows are few: layers).
//   2. warp  one warp per row (8 rows per 256-thread block), lanes stride the row, max and sums
//            by butterfly shuffles: N in the hundreds stays one warp's work.
#include "common.cuh"

namespace coeffs {

// Grid ceil(rows/128), block 128.
__device__ __forceinline__ void softmax_row(const float* __restrict__ v, float* __restrict__ c, int rows, int n) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* x = v + (size_t)r * n;
    float m = -INFINITY;
    for (int i = 0; i < n; ++i) m = fmaxf(m, x[i]);
    float z = 0.0f;
    for (int i = 0; i < n; ++i) z += expf(x[i] - m);
    const float inv_z = 1.0f / z;
    for (int i = 0; i < n; ++i) c[(size_t)r * n + i] = expf(x[i] - m) * inv_z;
}

// Grid ceil(rows/8), block 256; a warp past the last row leaves whole.
__device__ __forceinline__ void softmax_warp(const float* __restrict__ v, float* __restrict__ c, int rows, int n) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const float* x = v + (size_t)r * n;
    float m = -INFINITY;
    for (int i = lane; i < n; i += 32) m = fmaxf(m, x[i]);
    m = lc::warp_max(m);
    float z = 0.0f;
    for (int i = lane; i < n; i += 32) z += expf(x[i] - m);
    z = lc::warp_sum(z);
    const float inv_z = 1.0f / z;
    for (int i = lane; i < n; i += 32) c[(size_t)r * n + i] = expf(x[i] - m) * inv_z;
}

__device__ __forceinline__ void backward_row(const float* __restrict__ c, const float* __restrict__ dc,
                                             float* __restrict__ dv, int rows, int n) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const size_t base = (size_t)r * n;
    float dot = 0.0f;
    for (int i = 0; i < n; ++i) dot += dc[base + i] * c[base + i];
    for (int i = 0; i < n; ++i) dv[base + i] = c[base + i] * (dc[base + i] - dot);
}

__device__ __forceinline__ void backward_warp(const float* __restrict__ c, const float* __restrict__ dc,
                                              float* __restrict__ dv, int rows, int n) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const size_t base = (size_t)r * n;
    float dot = 0.0f;
    for (int i = lane; i < n; i += 32) dot += dc[base + i] * c[base + i];
    dot = lc::warp_sum(dot);
    for (int i = lane; i < n; i += 32) dv[base + i] = c[base + i] * (dc[base + i] - dot);
}

}  // namespace coeffs

extern "C" __global__ void __launch_bounds__(128)
    coeffs_softmax_row_f32(const float* __restrict__ v, float* __restrict__ c, int rows, int n) {
    coeffs::softmax_row(v, c, rows, n);
}
extern "C" __global__ void __launch_bounds__(256)
    coeffs_softmax_warp_f32(const float* __restrict__ v, float* __restrict__ c, int rows, int n) {
    coeffs::softmax_warp(v, c, rows, n);
}
extern "C" __global__ void __launch_bounds__(128) coeffs_softmax_bwd_row_f32(
    const float* __restrict__ c, const float* __restrict__ dc, float* __restrict__ dv, int rows, int n) {
    coeffs::backward_row(c, dc, dv, rows, n);
}
extern "C" __global__ void __launch_bounds__(256) coeffs_softmax_bwd_warp_f32(
    const float* __restrict__ c, const float* __restrict__ dc, float* __restrict__ dv, int rows, int n) {
    coeffs::backward_warp(c, dc, dv, rows, n);
}
