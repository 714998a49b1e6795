// lc-arch: 90a
// Composition on Hopper's warpgroup MMA: the forward of variant 6 (`wgmma`) of
// src/kernels/compose_common.rs `Variant`, built for compute_90a (loaded on sm_90 only; the CPU
// harness runs it through its wgmma emulation). The same products and semantics as the `mma`
// variant's forward (cuda/compose_mma.cu), D[σ, j] = C[σ, module_of[j]] · col_scale[j]:
//     U  = X A_catᵀ          (T, R)      shrink; U (optional: null skips it) and Z = U ∘ D are
//                                        overwritten, the scale applied in the epilogue
//     Y += Z B_catᵀ          (T, d_out)  expand, accumulated onto (read, add, round once)
// each on cuda/wgmma_tile.cuh's main loop: 128×128 tiles of 2 warpgroups, wgmma.m64n128k16
// with bf16 operands from shared memory (both K-major here: A_cat and B_cat are stored (N, K)),
// a 4-stage cp.async pipeline in 64 KiB of dynamic shared memory. Where the tiles leave SMs
// idle the plan splits K along gridDim.z (src/kernels/compose_common.rs `wgmma_step`): block z
// covers k ∈ [z·chunk, (z + 1)·chunk) and writes its f32 partial tile to work[z]
// (mma_tile::store_partial), which compose_fwd's shrink_reduce / sum_partials finish in split
// order. The backward, given G = ∂L/∂Y, likewise:
//     H  = G B_cat           (T, R)      never stored; ∂U = H ∘ D and the fused ∂C in the epilogue
//                                        (mma_tile::hidden_epilogue, the mma variant's)
//     ∂X += ∂U A_cat         (T, d_in)   accumulated onto
// with B_cat and A_cat MN-major in shared memory (stored (K, N)); ∂A_cat and ∂B_cat are the mma
// variant's steps.
#include "wgmma_tile.cuh"

namespace compose_wgmma {

using namespace wgmma_tile;

// Grid (ceil(R / 128), ceil(T / 128), splits), block 256, SHARED_BYTES dynamic.
template <typename T>
__device__ __forceinline__ void shrink(const T* __restrict__ X, const T* __restrict__ A_cat, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, T* __restrict__ U, T* __restrict__ Z,
                                       float* __restrict__ work, int n_tokens, int d_in, int R, int n_modules,
                                       int chunk) {
    EXTERN_SHARED(T, stages);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[1][16][4];
    mainloop<T, false, true>(acc, stages, X, A_cat, n_tokens, R, d_in, m0, n0, lc::split_begin(chunk),
                             lc::split_end(chunk, d_in));
    if (gridDim.z > 1)
        mma_tile::store_partial<Layout>(acc, work, n_tokens, R, m0, n0);
    else
        mma_tile::scale_epilogue<T, Layout>(acc, C, sample_of, module_of, col_scale, U, Z, n_tokens, R, n_modules,
                                            m0, n0);
}

// Grid (ceil(N / 128), ceil(M / 128), splits), block 256, SHARED_BYTES dynamic. out (M, N) +=
// A · op(B), A row-major (M, K): the expand (A = Z, B = B_cat stored (N, K): TB, K = R) and ∂X
// (A = ∂U, B = A_cat stored (K, N), K = R); with several splits of K, partials to `work`.
template <typename T, bool TB>
__device__ __forceinline__ void accumulate(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ out,
                                           float* __restrict__ work, int M, int N, int K, int chunk) {
    EXTERN_SHARED(T, stages);
    tile_axpby<T, false, TB>(stages, A, B, out, work, M, N, K, 1.0f, 1.0f, chunk);
}

// Grid (ceil(R / 128), ceil(T / 128), splits), block 256, SHARED_BYTES dynamic; K = d_out.
// H = G B_cat in registers (B_cat stored (d_out, R): MN-major); ∂U (if given) = H ∘ D and ∂C (if
// given) += the tile's s_j H U, segmented (mma_tile::hidden_epilogue, as the mma variant's:
// with several splits each adds the ∂C of its K range, and its partial ∂U goes to `work`).
template <typename T>
__device__ __forceinline__ void hidden(const T* __restrict__ G, const T* __restrict__ B_cat, const T* __restrict__ U,
                                       const float* __restrict__ C, const int* __restrict__ sample_of,
                                       const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                       float* __restrict__ dC, T* __restrict__ dU, float* __restrict__ work,
                                       int n_tokens, int d_out, int R, int n_modules, int chunk) {
    // part[64][129] f32 and 5 × 128 + 1 int32 (module ids, samples, segments) in the stages.
    static_assert((BM / 2) * (BN + 1) * 4 + (BN + BM + 2 * BN + 1) * 4 <= SHARED_BYTES, "the ∂C scratch fits");
    EXTERN_SHARED(T, stages);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    float acc[1][16][4];
    mainloop<T, false, false>(acc, stages, G, B_cat, n_tokens, R, d_out, m0, n0, lc::split_begin(chunk),
                              lc::split_end(chunk, d_out));
    __syncthreads();  // every warp's wgmma reads of the stages are done before the scratch reuses them
    mma_tile::hidden_epilogue<T, Layout, BM>(acc, reinterpret_cast<float*>(stages), U, C, sample_of, module_of,
                                             col_scale, dC, dU, work, n_tokens, R, n_modules, m0, n0);
}

}  // namespace compose_wgmma

// Tensor cores take 16-bit inputs, and the composition families are built for bf16: bf16 only.
// The parameter lists are compose_mma's entries'.
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_shrink_bf16(const __nv_bfloat16* X, const __nv_bfloat16* A_cat, const float* C, const int* sample_of,
                              const int* module_of, const float* col_scale, __nv_bfloat16* U, __nv_bfloat16* Z,
                              float* work, int n_tokens, int d_in, int R, int n_modules, int chunk) {
    compose_wgmma::shrink(X, A_cat, C, sample_of, module_of, col_scale, U, Z, work, n_tokens, d_in, R, n_modules,
                          chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_expand_bf16(const __nv_bfloat16* Z, const __nv_bfloat16* B_cat, __nv_bfloat16* Y, float* work,
                              int n_tokens, int R, int d_out, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, true>(Z, B_cat, Y, work, n_tokens, d_out, R, chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_hidden_bf16(const __nv_bfloat16* G, const __nv_bfloat16* B_cat, const __nv_bfloat16* U,
                              const float* C, const int* sample_of, const int* module_of, const float* col_scale,
                              float* dC, __nv_bfloat16* dU, float* work, int n_tokens, int d_out, int R, int n_modules,
                              int chunk) {
    compose_wgmma::hidden(G, B_cat, U, C, sample_of, module_of, col_scale, dC, dU, work, n_tokens, d_out, R, n_modules,
                          chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_dx_bf16(const __nv_bfloat16* dU, const __nv_bfloat16* A_cat, __nv_bfloat16* dX, float* work,
                          int n_tokens, int R, int d_in, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, false>(dU, A_cat, dX, work, n_tokens, d_in, R, chunk);
}
