// The transformer's head end: pooling of the last hidden states and softmax cross-entropy
// (the CPU model: src/model/pass.rs `Pool`, src/model/train.rs `cross_entropy`).
//
// Pooling, h (B, T, D) row-major, mask (B, T) int32 (non-zero = real token), pooled (B, D):
//     CLS:   pooled[b, :] = h[b, 0, :]
//     mean:  pooled[b, :] = (Σ_{t: mask[b,t]} h[b, t, :]) · (1 / n_b),  n_b = #real tokens of b;
//            n_b = 0 (a fully padded row) gives pooled[b, :] = 0. The CPU model refuses such a
//            batch ("sequence b of the batch has no real tokens"), so it never computes one;
//            0 is the value that keeps a padded batch slot harmless (no NaN), and its gradient
//            is 0 too.
// Pooling backward, dpooled (B, D) → dh (B, T, D), overwritten everywhere:
//     CLS:   dh[b, 0, :] = dpooled[b, :], dh[b, t>0, :] = 0
//     mean:  dh[b, t, :] = mask[b,t] ? dpooled[b, :] · (1 / n_b) : 0
//
// Cross-entropy, logits (B, L), labels (B) int32 in [0, L) (checked on upload by
// src/kernels/loss.rs `Labels`), one kernel per row:
//     m = max_j x_j,  z = Σ_j exp(x_j − m)
//     row_loss[b]   = −(x_y − m − ln z)                          (f32 workspace, overwritten)
//     dlogits[b, j] = (exp(x_j − m) / z − [j = y]) / B           (overwritten)
// and the batch mean, deterministically, by one block (no atomics):
//     mean_loss[0] = (Σ_b row_loss[b]) / B                           (f32, overwritten)
// The 1/B scaling of dlogits is the CPU model's: ∂(mean loss)/∂logits.
//
// Storage T (h, pooled, dh, dpooled, logits, dlogits) is float or __nv_bfloat16; everything
// accumulates in f32 and each output is rounded once.
//
// Variants (src/kernels/loss.rs, same order):
//   pooling:        1. column  one thread per (b, d) column, looping over t (coalesced along d).
//   cross-entropy:  1. row     one thread per row, three passes over its L logits. The baseline.
//                   2. warp    one warp per row (8 rows per 256-thread block), lanes stride the
//                              row, max and sum by butterfly shuffles.
//   batch mean:     1. block   one block of 256 threads, fixed-order strided sums and a tree.
#include "common.cuh"

namespace loss {

constexpr int POOL_CLS = 0;
constexpr int POOL_MEAN = 1;

// Number of real tokens of row b.
__device__ __forceinline__ int real_tokens(const int* mask, int b, int T) {
    int n = 0;
    for (int t = 0; t < T; ++t) n += mask[(size_t)b * T + t] != 0;
    return n;
}

// Grid (ceil(D/256), B), block 256.
template <typename T>
__device__ __forceinline__ void pool_fwd(const T* __restrict__ h, const int* __restrict__ mask,
                                         T* __restrict__ pooled, int B, int Tn, int D, int mode) {
    const int b = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || d >= D) return;
    const T* row = h + (size_t)b * Tn * D + d;
    float out;
    if (mode == POOL_CLS) {
        out = lc::to_f32(row[0]);
    } else {
        float sum = 0.0f;
        int n = 0;
        // Not unrolled: the unrolled loop spilled on sm_90 (ptxas -v: 12 bytes) for no gain on a
        // loop whose trip count is the sequence length.
#ifdef __CUDACC__
#pragma unroll 1
#endif
        for (int t = 0; t < Tn; ++t) {
            if (mask[(size_t)b * Tn + t] != 0) {
                sum += lc::to_f32(row[(size_t)t * D]);
                ++n;
            }
        }
        out = n > 0 ? sum * (1.0f / (float)n) : 0.0f;
    }
    pooled[(size_t)b * D + d] = lc::from_f32<T>(out);
}

// Grid (ceil(D/256), B), block 256.
template <typename T>
__device__ __forceinline__ void pool_bwd(const T* __restrict__ dpooled, const int* __restrict__ mask,
                                         T* __restrict__ dh, int B, int Tn, int D, int mode) {
    const int b = blockIdx.y;
    const int d = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B || d >= D) return;
    const float g = lc::to_f32(dpooled[(size_t)b * D + d]);
    T* out = dh + (size_t)b * Tn * D + d;
    if (mode == POOL_MEAN) {
        const int n = real_tokens(mask, b, Tn);
        const float share = n > 0 ? g * (1.0f / (float)n) : 0.0f;
        for (int t = 0; t < Tn; ++t)
            out[(size_t)t * D] = lc::from_f32<T>(mask[(size_t)b * Tn + t] != 0 ? share : 0.0f);
    } else {
        for (int t = 0; t < Tn; ++t) out[(size_t)t * D] = lc::from_f32<T>(t == 0 ? g : 0.0f);
    }
}

// Cross-entropy variant 1. Grid ceil(B/128), block 128.
template <typename T>
__device__ __forceinline__ void xent_row(const T* __restrict__ logits, const int* __restrict__ labels,
                                         T* __restrict__ dlogits, float* __restrict__ row_loss, int B, int L) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const T* x = logits + (size_t)b * L;
    const int y = labels[b];
    float m = -INFINITY;
    for (int j = 0; j < L; ++j) m = fmaxf(m, lc::to_f32(x[j]));
    float z = 0.0f;
    for (int j = 0; j < L; ++j) z += expf(lc::to_f32(x[j]) - m);
    row_loss[b] = -(lc::to_f32(x[y]) - m - logf(z));
    const float inv_z = 1.0f / z;
    for (int j = 0; j < L; ++j) {
        const float p = expf(lc::to_f32(x[j]) - m) * inv_z;
        dlogits[(size_t)b * L + j] = lc::from_f32<T>((p - (j == y ? 1.0f : 0.0f)) / (float)B);
    }
}

// Cross-entropy variant 2. Grid ceil(B/8), block 256: warp w of block k takes row 8k + w. A warp
// past the last row leaves as a whole, so every shuffle has its full warp.
template <typename T>
__device__ __forceinline__ void xent_warp(const T* __restrict__ logits, const int* __restrict__ labels,
                                          T* __restrict__ dlogits, float* __restrict__ row_loss, int B, int L) {
    const int lane = threadIdx.x % 32;
    const int b = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (b >= B) return;
    const T* x = logits + (size_t)b * L;
    const int y = labels[b];
    float m = -INFINITY;
    for (int j = lane; j < L; j += 32) m = fmaxf(m, lc::to_f32(x[j]));
    m = lc::warp_max(m);
    float z = 0.0f;
    for (int j = lane; j < L; j += 32) z += expf(lc::to_f32(x[j]) - m);
    z = lc::warp_sum(z);
    if (lane == 0) row_loss[b] = -(lc::to_f32(x[y]) - m - logf(z));
    const float inv_z = 1.0f / z;
    for (int j = lane; j < L; j += 32) {
        const float p = expf(lc::to_f32(x[j]) - m) * inv_z;
        dlogits[(size_t)b * L + j] = lc::from_f32<T>((p - (j == y ? 1.0f : 0.0f)) / (float)B);
    }
}

constexpr int MEAN_THREADS = 256;

// Grid 1, block MEAN_THREADS: loss[0] = Σ row_loss / B, thread i summing rows i, i + 256, … in
// order, then a tree: the same bits on every run and every backend order.
__device__ __forceinline__ void xent_mean(const float* __restrict__ row_loss, float* __restrict__ mean_loss, int B) {
    SHARED(float, partial, [MEAN_THREADS]);
    float sum = 0.0f;
    for (int b = threadIdx.x; b < B; b += MEAN_THREADS) sum += row_loss[b];
    const float total = lc::block_sum<MEAN_THREADS>(sum, partial);
    if (threadIdx.x == 0) mean_loss[0] = total / (float)B;
}

}  // namespace loss

#define LOSS_ENTRIES(suffix, T)                                                                                   \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        loss_pool_fwd_##suffix(const T* __restrict__ h, const int* __restrict__ mask, T* __restrict__ pooled,    \
                               int B, int Tn, int D, int mode) {                                                  \
        loss::pool_fwd<T>(h, mask, pooled, B, Tn, D, mode);                                                       \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        loss_pool_bwd_##suffix(const T* __restrict__ dpooled, const int* __restrict__ mask, T* __restrict__ dh,  \
                               int B, int Tn, int D, int mode) {                                                  \
        loss::pool_bwd<T>(dpooled, mask, dh, B, Tn, D, mode);                                                     \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(128)                                                             \
        loss_xent_row_##suffix(const T* __restrict__ logits, const int* __restrict__ labels,                      \
                               T* __restrict__ dlogits, float* __restrict__ row_loss, int B, int L) {             \
        loss::xent_row<T>(logits, labels, dlogits, row_loss, B, L);                                               \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                                             \
        loss_xent_warp_##suffix(const T* __restrict__ logits, const int* __restrict__ labels,                     \
                                T* __restrict__ dlogits, float* __restrict__ row_loss, int B, int L) {            \
        loss::xent_warp<T>(logits, labels, dlogits, row_loss, B, L);                                              \
    }

LOSS_ENTRIES(f32, float)
LOSS_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(loss::MEAN_THREADS)
    loss_xent_mean_f32(const float* __restrict__ row_loss, float* __restrict__ mean_loss, int B) {
    loss::xent_mean(row_loss, mean_loss, B);
}
