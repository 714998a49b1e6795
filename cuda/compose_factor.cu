// Composition in factor mode (DESIGN §2, LoraHub): N LoRA modules of one rank r merged factor by
// factor, ΔW_σ = (Σ_i c_i B_i)(Σ_i c_i s_i A_i), with per-sample coefficient rows c = C[σ(t)].
// CPU references: src/compose/fast.rs `mix` / `mix_backward`, src/compose/reference.rs.
//
//     U = X A_catᵀ                                  (T, R), R = N·r     shrink (GEMM family)
//     v_q = Σ_i c_i s_i U[t, i·r + q]               (r) per token        mix forward (here)
//     Z[t, j·r + q] = c_j v_q                       (T, R)
//     Y += Z B_catᵀ                                 (T, d_out)           expand (GEMM family)
//
// Backward, G = ∂L/∂Y:
//
//     H = G B_cat                                   (T, R)               hidden (GEMM family)
//     ∂v_q = Σ_j c_j H[t, j·r + q]                                        mix backward (here)
//     ∂U[t, i·r + q] = c_i s_i ∂v_q                 (T, R)
//     P[t, i] = Σ_q H[t, i·r + q] v_q + s_i Σ_q ∂v_q U[t, i·r + q]        per-token ∂C partials
//     ∂C[s, i] = Σ_{t: σ(t) = s} P[t, i]            (S, N)               coeff_grad (here)
//     ∂X += ∂U A_cat                                (T, d_in)            (GEMM family)
//
// Shapes, row-major: U, Z, H, ∂U (T, R) in storage T (float or __nv_bfloat16); C (S, N) f32;
// sample_of (T) int32 (token → coefficient row); mod_scale (N) f32 (s_i). Every sum is f32 and
// each stored value is rounded once. The mix kernels overwrite Z, ∂U and the partials; ∂C is
// overwritten. ∂C is deterministic: per-token partials in an f32 workspace, then each (s, i)
// adds its tokens in token order (no float atomics), so its bits do not depend on the launch.
// Workspace layout: work[(t·N + i)·K + k], with K = r for the naive variant (one partial per
// (t, i, q)) and K = 1 for the warp variant (q already summed).
//
// Variants (src/kernels/compose_factor.rs `Variant`, same order; the Rust side plans the launches
// and picks the GEMM variant):
//   1. naive   one thread per (token, q): v_q (and ∂v_q) summed over the modules in order, then
//              the N outputs of column q. Grid (ceil(r / 16), ceil(T / 16)), block (16, 16).
//              coeff_grad_naive: one thread per (s, i), tokens then k in order.
//   2. warp    one warp per token (8 per 256-thread block). q in chunks of w = min(32, r − q0):
//              the 32 lanes are split into G = 32 / w groups of w lanes, group g summing the
//              modules i ≡ g (mod G) for column q0 + lane % w; the G group sums are added in
//              group order through shared memory. Z / ∂U rows are then written by all lanes
//              (consecutive lanes, consecutive columns), and lane i % 32 adds module i's ∂C
//              partial over the chunk's columns. coeff_grad_warp: one warp per (s, i), lanes
//              stride the tokens, then the lc::warp_sum butterfly.
#include "common.cuh"

namespace compose_factor {

constexpr int WARP = 32;
// Threads per block of the warp kernels and of coeff_grad_naive. Mirrored by `THREADS` in
// src/kernels/compose_factor.rs.
constexpr int THREADS = 256;
constexpr int WARPS = THREADS / WARP;

// Variant 1, forward. Thread (q, t).
template <typename T>
__device__ __forceinline__ void mix_fwd_naive(const T* __restrict__ U, const float* __restrict__ C,
                                              const int* __restrict__ sample_of, const float* __restrict__ mod_scale,
                                              T* __restrict__ Z, int n_tokens, int n_modules, int r) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || q >= r) return;
    const int R = n_modules * r;
    const float* c = C + (size_t)sample_of[t] * n_modules;
    const T* u = U + (size_t)t * R;
    float v = 0.0f;
    for (int i = 0; i < n_modules; ++i) v += c[i] * mod_scale[i] * lc::to_f32(u[i * r + q]);
    T* z = Z + (size_t)t * R;
    for (int j = 0; j < n_modules; ++j) z[j * r + q] = lc::from_f32<T>(c[j] * v);
}

// Variant 1, backward. Thread (q, t); work[(t·N + i)·r + q].
template <typename T>
__device__ __forceinline__ void mix_bwd_naive(const T* __restrict__ U, const T* __restrict__ H,
                                              const float* __restrict__ C, const int* __restrict__ sample_of,
                                              const float* __restrict__ mod_scale, T* __restrict__ dU,
                                              float* __restrict__ work, int n_tokens, int n_modules, int r) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    const int t = blockIdx.y * blockDim.y + threadIdx.y;
    if (t >= n_tokens || q >= r) return;
    const int R = n_modules * r;
    const float* c = C + (size_t)sample_of[t] * n_modules;
    const T* u = U + (size_t)t * R;
    const T* h = H + (size_t)t * R;
    float v = 0.0f, dv = 0.0f;
    for (int i = 0; i < n_modules; ++i) {
        v += c[i] * mod_scale[i] * lc::to_f32(u[i * r + q]);
        dv += c[i] * lc::to_f32(h[i * r + q]);
    }
    T* du = dU + (size_t)t * R;
    for (int i = 0; i < n_modules; ++i) {
        const float ui = lc::to_f32(u[i * r + q]), hi = lc::to_f32(h[i * r + q]);
        du[i * r + q] = lc::from_f32<T>(c[i] * mod_scale[i] * dv);
        work[((size_t)t * n_modules + i) * r + q] = hi * v + mod_scale[i] * (dv * ui);
    }
}

// Variant 2: for the columns [q0, q0 + w) of token t, v (and ∂v when H is given) into
// v_chunk[0, w) (dv_chunk) of this warp; without H, part_dv and dv_chunk are not touched (the
// forward passes none). Every lane of the warp calls it; it ends with a
// __syncwarp, so the chunk is visible to every lane and `part_*` may be reused.
template <typename T>
__device__ __forceinline__ void warp_chunk(const T* __restrict__ u, const T* __restrict__ h, const float* __restrict__ c,
                                           const float* __restrict__ mod_scale, int n_modules, int r, int q0, int w,
                                           float* part_v, float* part_dv, float* v_chunk, float* dv_chunk) {
    const int lane = threadIdx.x % WARP;
    const int groups = WARP / w, g = lane / w, q = q0 + lane % w;
    float pv = 0.0f, pdv = 0.0f;
    if (g < groups) {
        for (int i = g; i < n_modules; i += groups) {
            pv += c[i] * mod_scale[i] * lc::to_f32(u[i * r + q]);
            if (h) pdv += c[i] * lc::to_f32(h[i * r + q]);
        }
    }
    part_v[lane] = pv;
    if (h) part_dv[lane] = pdv;
    __syncwarp();  // every group's sums are in part_*
    if (lane < w) {
        float v = 0.0f, dv = 0.0f;
        for (int k = 0; k < groups; ++k) {
            v += part_v[k * w + lane];
            if (h) dv += part_dv[k * w + lane];
        }
        v_chunk[lane] = v;
        if (h) dv_chunk[lane] = dv;
    }
    __syncwarp();  // the chunk is visible to every lane; part_* may be overwritten
}

// Variant 2, forward. Grid ceil(T / WARPS), THREADS threads: warp k of block b takes token
// b·WARPS + k. A warp past the last token returns as a whole, so every __syncwarp has 32 lanes.
template <typename T>
__device__ __forceinline__ void mix_fwd_warp(const T* __restrict__ U, const float* __restrict__ C,
                                             const int* __restrict__ sample_of, const float* __restrict__ mod_scale,
                                             T* __restrict__ Z, int n_tokens, int n_modules, int r) {
    SHARED(float, part_v, [WARPS][WARP]);
    SHARED(float, v_chunk, [WARPS][WARP]);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int t = blockIdx.x * WARPS + warp;
    if (t >= n_tokens) return;
    const int R = n_modules * r;
    const float* c = C + (size_t)sample_of[t] * n_modules;
    const T* u = U + (size_t)t * R;
    T* z = Z + (size_t)t * R;
    for (int q0 = 0; q0 < r; q0 += WARP) {
        const int w = min(WARP, r - q0);
        warp_chunk<T>(u, nullptr, c, mod_scale, n_modules, r, q0, w, part_v[warp], nullptr, v_chunk[warp], nullptr);
        for (int p = lane; p < n_modules * w; p += WARP) {
            const int j = p / w, q = p % w;
            z[j * r + q0 + q] = lc::from_f32<T>(c[j] * v_chunk[warp][q]);
        }
        __syncwarp();  // every lane has read v_chunk before the next chunk overwrites it
    }
}

// Variant 2, backward. Grid and warps as mix_fwd_warp; work[t·N + i], added over the q chunks
// by the lane that owns module i.
template <typename T>
__device__ __forceinline__ void mix_bwd_warp(const T* __restrict__ U, const T* __restrict__ H,
                                             const float* __restrict__ C, const int* __restrict__ sample_of,
                                             const float* __restrict__ mod_scale, T* __restrict__ dU,
                                             float* __restrict__ work, int n_tokens, int n_modules, int r) {
    SHARED(float, part_v, [WARPS][WARP]);
    SHARED(float, part_dv, [WARPS][WARP]);
    SHARED(float, v_chunk, [WARPS][WARP]);
    SHARED(float, dv_chunk, [WARPS][WARP]);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP;
    const int t = blockIdx.x * WARPS + warp;
    if (t >= n_tokens) return;
    const int R = n_modules * r;
    const float* c = C + (size_t)sample_of[t] * n_modules;
    const T* u = U + (size_t)t * R;
    const T* h = H + (size_t)t * R;
    T* du = dU + (size_t)t * R;
    float* partial = work + (size_t)t * n_modules;
    for (int q0 = 0; q0 < r; q0 += WARP) {
        const int w = min(WARP, r - q0);
        warp_chunk<T>(u, h, c, mod_scale, n_modules, r, q0, w, part_v[warp], part_dv[warp], v_chunk[warp],
                      dv_chunk[warp]);
        const float* v = v_chunk[warp];
        const float* dv = dv_chunk[warp];
        for (int p = lane; p < n_modules * w; p += WARP) {
            const int i = p / w, q = p % w;
            du[i * r + q0 + q] = lc::from_f32<T>(c[i] * mod_scale[i] * dv[q]);
        }
        for (int i = lane; i < n_modules; i += WARP) {
            float hv = 0.0f, dvu = 0.0f;
            for (int q = 0; q < w; ++q) {
                hv += lc::to_f32(h[i * r + q0 + q]) * v[q];
                dvu += dv[q] * lc::to_f32(u[i * r + q0 + q]);
            }
            const float sum = hv + mod_scale[i] * dvu;
            partial[i] = q0 == 0 ? sum : partial[i] + sum;
        }
        __syncwarp();  // every lane has read the chunk before the next one overwrites it
    }
}

// ∂C[s, i] = Σ_{t: σ(t) = s} Σ_k work[(t·N + i)·K + k], tokens in order. Variant 1: one thread
// per (s, i), 1-D grid of THREADS-thread blocks.
__device__ __forceinline__ void coeff_grad_naive(const float* __restrict__ work, const int* __restrict__ sample_of,
                                                 float* __restrict__ dC, int n_tokens, int n_samples, int n_modules,
                                                 int K) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n_samples * n_modules) return;
    const int s = (int)(idx / n_modules), i = (int)(idx % n_modules);
    float acc = 0.0f;
    for (int t = 0; t < n_tokens; ++t) {
        if (sample_of[t] != s) continue;
        const float* p = work + ((size_t)t * n_modules + i) * K;
        for (int k = 0; k < K; ++k) acc += p[k];
    }
    dC[idx] = acc;
}

// Variant 2: one warp per (s, i), grid ceil(S·N / WARPS), THREADS threads. Lane ℓ adds tokens
// ℓ, ℓ + 32, … in order; the butterfly then fixes the order of the 32 lane sums.
__device__ __forceinline__ void coeff_grad_warp(const float* __restrict__ work, const int* __restrict__ sample_of,
                                                float* __restrict__ dC, int n_tokens, int n_samples, int n_modules,
                                                int K) {
    const long long idx = (long long)blockIdx.x * WARPS + threadIdx.x / WARP;
    if (idx >= (long long)n_samples * n_modules) return;  // the whole warp
    const int s = (int)(idx / n_modules), i = (int)(idx % n_modules);
    float acc = 0.0f;
    for (int t = threadIdx.x % WARP; t < n_tokens; t += WARP) {
        if (sample_of[t] != s) continue;
        const float* p = work + ((size_t)t * n_modules + i) * K;
        for (int k = 0; k < K; ++k) acc += p[k];
    }
    acc = lc::warp_sum(acc);
    if (threadIdx.x % WARP == 0) dC[idx] = acc;
}

}  // namespace compose_factor

// Unmangled entry points: compose_factor_<kernel>_<dtype>. The ∂C reductions read and write f32
// only, so they are built once.
#define COMPOSE_FACTOR_ENTRIES(suffix, T)                                                                            \
    extern "C" __global__ void __launch_bounds__(256) compose_factor_mix_fwd_naive_##suffix(                         \
        const T* U, const float* C, const int* sample_of, const float* mod_scale, T* Z, int n_tokens,              \
        int n_modules, int r) {                                                                                      \
        compose_factor::mix_fwd_naive<T>(U, C, sample_of, mod_scale, Z, n_tokens, n_modules, r);                     \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) compose_factor_mix_fwd_warp_##suffix(                          \
        const T* U, const float* C, const int* sample_of, const float* mod_scale, T* Z, int n_tokens,              \
        int n_modules, int r) {                                                                                      \
        compose_factor::mix_fwd_warp<T>(U, C, sample_of, mod_scale, Z, n_tokens, n_modules, r);                      \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) compose_factor_mix_bwd_naive_##suffix(                         \
        const T* U, const T* H, const float* C, const int* sample_of, const float* mod_scale, T* dU, float* work,  \
        int n_tokens, int n_modules, int r) {                                                                        \
        compose_factor::mix_bwd_naive<T>(U, H, C, sample_of, mod_scale, dU, work, n_tokens, n_modules, r);           \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) compose_factor_mix_bwd_warp_##suffix(                          \
        const T* U, const T* H, const float* C, const int* sample_of, const float* mod_scale, T* dU, float* work,  \
        int n_tokens, int n_modules, int r) {                                                                        \
        compose_factor::mix_bwd_warp<T>(U, H, C, sample_of, mod_scale, dU, work, n_tokens, n_modules, r);            \
    }

COMPOSE_FACTOR_ENTRIES(f32, float)
COMPOSE_FACTOR_ENTRIES(bf16, __nv_bfloat16)

extern "C" __global__ void __launch_bounds__(256)
    compose_factor_coeff_grad_naive_f32(const float* work, const int* sample_of, float* dC, int n_tokens,
                                        int n_samples, int n_modules, int K) {
    compose_factor::coeff_grad_naive(work, sample_of, dC, n_tokens, n_samples, n_modules, K);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_factor_coeff_grad_warp_f32(const float* work, const int* sample_of, float* dC, int n_tokens,
                                       int n_samples, int n_modules, int K) {
    compose_factor::coeff_grad_warp(work, sample_of, dC, n_tokens, n_samples, n_modules, K);
}
