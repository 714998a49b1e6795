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
// (mma_tile::store_partial), and the last split of each tile to finish sums them in split order
// and finishes the tile (lc::last_split, as compose_mma's): no finishing launch. The backward,
// given G = ∂L/∂Y, likewise:
//     H  = G B_cat           (T, R)      never stored; ∂U = H ∘ D and the fused ∂C in the epilogue
//                                        (mma_tile::hidden_epilogue, the mma variant's)
//     ∂X += ∂U A_cat         (T, d_in)   accumulated onto
// with B_cat and A_cat MN-major in shared memory (stored (K, N)); ∂A_cat and ∂B_cat are the mma
// variant's steps. Variant `wgmma_wide` runs the same bodies on 128×256 tiles (TBN = 256:
// wgmma.m64n256k16, 96 KiB of dynamic shared memory, one block an SM) where those pad no more
// columns than 128-wide ones (src/kernels/compose_common.rs `wide_tiles_fit`).
#include "wgmma_tile.cuh"

namespace compose_wgmma {

using namespace wgmma_tile;

// Grid (ceil(R / TBN), ceil(T / 128), splits), block 256, Shape<TBN>::SHARED_BYTES dynamic.
template <typename T, int TBN>
__device__ __forceinline__ void shrink(const T* __restrict__ X, const T* __restrict__ A_cat, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, T* __restrict__ U, T* __restrict__ Z,
                                       float* __restrict__ work, unsigned* __restrict__ tickets, int n_tokens,
                                       int d_in, int R, int n_modules, int chunk) {
    EXTERN_SHARED(T, stages);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * TBN;
    float acc[1][TBN / 8][4];
    mainloop<T, false, true, TBN>(acc, stages, X, A_cat, n_tokens, R, d_in, m0, n0, lc::split_begin(chunk),
                                  lc::split_end(chunk, d_in));
    if (gridDim.z > 1 && !mma_tile::split_finish<LayoutN<TBN>>(acc, work, tickets, reinterpret_cast<int*>(stages),
                                                               n_tokens, R, m0, n0))
        return;
    mma_tile::scale_epilogue<T, LayoutN<TBN>>(acc, C, sample_of, module_of, col_scale, U, Z, n_tokens, R, n_modules,
                                            m0, n0);
}

// Grid (ceil(N / TBN), ceil(M / 128), splits), block 256, Shape<TBN>::SHARED_BYTES dynamic. out (M, N) +=
// A · op(B), A row-major (M, K): the expand (A = Z, B = B_cat stored (N, K): TB, K = R) and ∂X
// (A = ∂U, B = A_cat stored (K, N), K = R); with several splits of K, partials to `work`, added
// onto out by each tile's last split.
template <typename T, bool TB, int TBN>
__device__ __forceinline__ void accumulate(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ out,
                                           float* __restrict__ work, unsigned* __restrict__ tickets, int M, int N, int K,
                                           int chunk) {
    EXTERN_SHARED(T, stages);
    tile_axpby<T, false, TB, TBN>(stages, A, B, out, work, tickets, M, N, K, 1.0f, 1.0f, chunk);
}

// Grid (ceil(R / TBN), ceil(T / 128), splits), block 256, Shape<TBN>::SHARED_BYTES dynamic; K = d_out.
// H = G B_cat in registers (B_cat stored (d_out, R): MN-major); ∂U (if given) = H ∘ D and ∂C (if
// given) += the tile's s_j H U, segmented (mma_tile::hidden_epilogue, as the mma variant's:
// with several splits each adds the ∂C of its K range, and its partial ∂U goes to `work`; the
// tile's last split to finish sums them into ∂U).
template <typename T, int TBN>
__device__ __forceinline__ void hidden(const T* __restrict__ G, const T* __restrict__ B_cat, const T* __restrict__ U,
                                       const float* __restrict__ C, const int* __restrict__ sample_of,
                                       const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                       float* __restrict__ dC, T* __restrict__ dU, float* __restrict__ work,
                                       unsigned* __restrict__ tickets, int n_tokens, int d_out, int R, int n_modules,
                                       int chunk) {
    // part[64][TBN + 1] f32 and TBN + 128 + 2·TBN + 1 int32 (module ids, samples, segments) in
    // the stages (33.3 KB of 64 KiB; wide: 69.4 KB of 96 KiB).
    static_assert((BM / 2) * (TBN + 1) * 4 + (TBN + BM + 2 * TBN + 1) * 4 <= Shape<TBN>::SHARED_BYTES,
                  "the ∂C scratch fits");
    EXTERN_SHARED(T, stages);
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * TBN;
    float acc[1][TBN / 8][4];
    mainloop<T, false, false, TBN>(acc, stages, G, B_cat, n_tokens, R, d_out, m0, n0, lc::split_begin(chunk),
                                   lc::split_end(chunk, d_out));
    __syncthreads();  // every warp's wgmma reads of the stages are done before the scratch reuses them
    mma_tile::hidden_epilogue<T, LayoutN<TBN>, BM>(acc, reinterpret_cast<float*>(stages), U, C, sample_of, module_of,
                                             col_scale, dC, dU, work, n_tokens, R, n_modules, m0, n0);
    mma_tile::split_finish_du<T, LayoutN<TBN>>(acc, work, tickets, reinterpret_cast<int*>(stages), dU, n_tokens, R,
                                               m0, n0);
}

}  // namespace compose_wgmma

// Tensor cores take 16-bit inputs, and the composition families are built for bf16: bf16 only.
// The parameter lists are compose_mma's entries'. `wgmma`: 128×128 tiles (2 blocks an SM);
// `wgmma_wide`: 128×256 tiles, wgmma.m64n256k16, 96 KiB of dynamic shared memory (1 block an SM).
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_shrink_bf16(const __nv_bfloat16* X, const __nv_bfloat16* A_cat, const float* C, const int* sample_of,
          const int* module_of, const float* col_scale, __nv_bfloat16* U, __nv_bfloat16* Z,
          float* work, unsigned* tickets, int n_tokens, int d_in, int R, int n_modules, int chunk) {
    compose_wgmma::shrink<__nv_bfloat16, 128>(X, A_cat, C, sample_of, module_of, col_scale, U, Z, work, tickets,
                                          n_tokens, d_in, R, n_modules, chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_expand_bf16(const __nv_bfloat16* Z, const __nv_bfloat16* B_cat, __nv_bfloat16* Y, float* work,
          unsigned* tickets, int n_tokens, int R, int d_out, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, true, 128>(Z, B_cat, Y, work, tickets, n_tokens, d_out, R, chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_hidden_bf16(const __nv_bfloat16* G, const __nv_bfloat16* B_cat, const __nv_bfloat16* U,
          const float* C, const int* sample_of, const int* module_of, const float* col_scale,
          float* dC, __nv_bfloat16* dU, float* work, unsigned* tickets, int n_tokens, int d_out, int R, int n_modules,
          int chunk) {
    compose_wgmma::hidden<__nv_bfloat16, 128>(G, B_cat, U, C, sample_of, module_of, col_scale, dC, dU, work, tickets, n_tokens,
                                          d_out, R, n_modules, chunk);
}
extern "C" __global__ void __launch_bounds__(256)
    compose_wgmma_dx_bf16(const __nv_bfloat16* dU, const __nv_bfloat16* A_cat, __nv_bfloat16* dX, float* work,
          unsigned* tickets, int n_tokens, int R, int d_in, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, false, 128>(dU, A_cat, dX, work, tickets, n_tokens, d_in, R, chunk);
}

// The wide tile (`wgmma_wide`).
extern "C" __global__ void __launch_bounds__(256, 1)
    compose_wgmma_wide_shrink_bf16(const __nv_bfloat16* X, const __nv_bfloat16* A_cat, const float* C, const int* sample_of,
          const int* module_of, const float* col_scale, __nv_bfloat16* U, __nv_bfloat16* Z,
          float* work, unsigned* tickets, int n_tokens, int d_in, int R, int n_modules, int chunk) {
    compose_wgmma::shrink<__nv_bfloat16, 256>(X, A_cat, C, sample_of, module_of, col_scale, U, Z, work, tickets,
                                          n_tokens, d_in, R, n_modules, chunk);
}
extern "C" __global__ void __launch_bounds__(256, 1)
    compose_wgmma_wide_expand_bf16(const __nv_bfloat16* Z, const __nv_bfloat16* B_cat, __nv_bfloat16* Y, float* work,
          unsigned* tickets, int n_tokens, int R, int d_out, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, true, 256>(Z, B_cat, Y, work, tickets, n_tokens, d_out, R, chunk);
}
extern "C" __global__ void __launch_bounds__(256, 1)
    compose_wgmma_wide_hidden_bf16(const __nv_bfloat16* G, const __nv_bfloat16* B_cat, const __nv_bfloat16* U,
          const float* C, const int* sample_of, const int* module_of, const float* col_scale,
          float* dC, __nv_bfloat16* dU, float* work, unsigned* tickets, int n_tokens, int d_out, int R, int n_modules,
          int chunk) {
    compose_wgmma::hidden<__nv_bfloat16, 256>(G, B_cat, U, C, sample_of, module_of, col_scale, dC, dU, work, tickets, n_tokens,
                                          d_out, R, n_modules, chunk);
}
extern "C" __global__ void __launch_bounds__(256, 1)
    compose_wgmma_wide_dx_bf16(const __nv_bfloat16* dU, const __nv_bfloat16* A_cat, __nv_bfloat16* dX, float* work,
          unsigned* tickets, int n_tokens, int R, int d_in, int chunk) {
    compose_wgmma::accumulate<__nv_bfloat16, false, 256>(dU, A_cat, dX, work, tickets, n_tokens, d_in, R, chunk);
}
