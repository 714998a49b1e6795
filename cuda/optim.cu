// Optimizer kernels: AdamW over many tensors in one launch, and global-norm gradient clipping
// (the CPU model: src/model/train.rs `AdamW::step`, `clip_grad_norm`, `Grads::norm`).
//
// Layout: every role is ONE flat buffer — params (P, f32 master weights), grads (P, storage G =
// float or __nv_bfloat16), m and v (P, f32 moments) — and a tensor table (n_tensors, 3) int32 of
// (offset, len, decay) rows, tensors disjoint, elements outside every tensor untouched (frozen
// parameters may sit between them). Flat buffers rather than a table of pointers: each launch
// argument is then one real allocation whose bounds the harness checks on every access (device
// pointers inside a table would be opaque to it, and would need 64-bit entries), and one
// optimizer-state arena is what a trainer keeps anyway.
// Per-tensor kernels run on a grid (chunks, n_tensors): block (c, k) strides tensor k's elements
// c·256 + tid, c·256 + tid + chunks·256, …
//
// AdamW, step t ≥ 1, c1 = 1 − β1^t, c2 = 1 − β2^t, 1 − β1 and 1 − β2 computed by the host in
// f64 (as the CPU model does) and passed as f32 (1 − β2 formed from an f32 β2 would be off by
// u·β2/(1 − β2) ≈ 1000u relative); decay = weight_decay where the table's flag is set, else 0:
//     m ← β1·m + (1 − β1)·g
//     v ← β2·v + (1 − β2)·g²
//     x ← x − lr·decay·x
//     x ← x − lr·(m / c1) / (√(v / c2) + ε)
// in that order, in f32; params, m and v are updated in place.
//
// Clipping, in three launches (deterministic: fixed grid, fixed-order sums, no float atomics):
//     sq_partials:  partials[k·chunks + c] = Σ g² over block (c, k)'s elements      (overwritten)
//     norm_finish:  norm = √(Σ partials) in order; scale = max_norm / norm if norm > max_norm
//                   and norm > 0, else 1; norm_scale = [norm, scale]                (overwritten)
//     clip_scale:   g ← g · scale for every tensor's element (skipped when scale = 1), in place.
//
// Variants (src/kernels/optim.rs, same order): one each —
//   1. adamw        one element per thread, grid-stride within its tensor.
//   2. sq_partials  per block a strided sum of squares and a shared-memory tree.
//   3. norm_finish  one block of 256 threads.
//   4. clip_scale   one element per thread, grid-stride within its tensor.
#include "common.cuh"

namespace optim {

constexpr int THREADS = 256;

struct Span {
    int offset, len, decay;
};

__device__ __forceinline__ Span span_of(const int* table, int k) {
    return Span{table[3 * k], table[3 * k + 1], table[3 * k + 2]};
}

template <typename G>
__device__ __forceinline__ void adamw(float* __restrict__ params, const G* __restrict__ grads, float* __restrict__ m,
                                      float* __restrict__ v, const int* __restrict__ table, float lr, float beta1,
                                      float beta2, float one_minus_beta1, float one_minus_beta2, float eps,
                                      float weight_decay, float c1, float c2) {
    const Span s = span_of(table, blockIdx.y);
    const float decay = s.decay ? weight_decay : 0.0f;
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < s.len; i += gridDim.x * THREADS) {
        const size_t at = (size_t)s.offset + i;
        const float g = lc::to_f32(grads[at]);
        const float m_new = beta1 * m[at] + one_minus_beta1 * g;
        const float v_new = beta2 * v[at] + one_minus_beta2 * g * g;
        float x = params[at];
        x -= lr * decay * x;
        x -= lr * (m_new / c1) / (sqrtf(v_new / c2) + eps);
        m[at] = m_new;
        v[at] = v_new;
        params[at] = x;
    }
}

template <typename G>
__device__ __forceinline__ void sq_partials(const G* __restrict__ grads, const int* __restrict__ table,
                                            float* __restrict__ partials) {
    SHARED(float, scratch, [THREADS]);
    const Span s = span_of(table, blockIdx.y);
    float sum = 0.0f;
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < s.len; i += gridDim.x * THREADS) {
        const float g = lc::to_f32(grads[(size_t)s.offset + i]);
        sum += g * g;
    }
    const float total = lc::block_sum<THREADS>(sum, scratch);
    if (threadIdx.x == 0) partials[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = total;
}

// Grid 1, block THREADS.
__device__ __forceinline__ void norm_finish(const float* __restrict__ partials, int n_partials, float max_norm,
                                            float* __restrict__ norm_scale) {
    SHARED(float, scratch, [THREADS]);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n_partials; i += THREADS) sum += partials[i];
    const float total = lc::block_sum<THREADS>(sum, scratch);
    if (threadIdx.x == 0) {
        const float norm = sqrtf(total);
        norm_scale[0] = norm;
        norm_scale[1] = (norm > max_norm && norm > 0.0f) ? max_norm / norm : 1.0f;
    }
}

template <typename G>
__device__ __forceinline__ void clip_scale(G* __restrict__ grads, const int* __restrict__ table,
                                           const float* __restrict__ norm_scale) {
    const float scale = norm_scale[1];
    if (scale == 1.0f) return;
    const Span s = span_of(table, blockIdx.y);
    for (int i = blockIdx.x * THREADS + threadIdx.x; i < s.len; i += gridDim.x * THREADS) {
        G* g = grads + (size_t)s.offset + i;
        *g = lc::from_f32<G>(lc::to_f32(*g) * scale);
    }
}

}  // namespace optim

#define OPTIM_ENTRIES(suffix, G)                                                                                    \
    extern "C" __global__ void __launch_bounds__(optim::THREADS)                                                    \
        optim_adamw_##suffix(float* __restrict__ params, const G* __restrict__ grads, float* __restrict__ m,       \
                             float* __restrict__ v, const int* __restrict__ table, float lr, float beta1,          \
                             float beta2, float one_minus_beta1, float one_minus_beta2, float eps,                 \
                             float weight_decay, float c1, float c2) {                                             \
        optim::adamw<G>(params, grads, m, v, table, lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps,       \
                        weight_decay, c1, c2);                                                                      \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(optim::THREADS)                                                    \
        optim_sq_partials_##suffix(const G* __restrict__ grads, const int* __restrict__ table,                     \
                                   float* __restrict__ partials) {                                                  \
        optim::sq_partials<G>(grads, table, partials);                                                              \
    }                                                                                                               \
    extern "C" __global__ void __launch_bounds__(optim::THREADS)                                                    \
        optim_clip_scale_##suffix(G* __restrict__ grads, const int* __restrict__ table,                            \
                                  const float* __restrict__ norm_scale) {                                           \
        optim::clip_scale<G>(grads, table, norm_scale);                                                             \
    }

OPTIM_ENTRIES(f32, float)
OPTIM_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(optim::THREADS)
    optim_norm_finish_f32(const float* __restrict__ partials, int n_partials, float max_norm,
                          float* __restrict__ norm_scale) {
    optim::norm_finish(partials, n_partials, max_norm, norm_scale);
}
