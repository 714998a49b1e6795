// lc-arch: 90a
// The GEMM family's Hopper variant (src/kernels/gemm.rs `Variant::Wgmma`), built for
// compute_90a (the first line above: build.rs), loaded only on sm_90 devices, and run on the
// CPU harness through its wgmma emulation like every other kernel. Same contract as
// cuda/gemm.cu:
//
//     C = alpha * op(A) * op(B) + beta * C          op(X) = X or X^T, f16/bf16 storage
//
//   6. wgmma     the 128×128 tile of cuda/wgmma_tile.cuh: 2 warpgroups (256 threads) of
//                wgmma.mma_async.m64n128k16, operands from shared memory in the no-swizzle
//                core-matrix layout, K- or MN-major as stored (no transposing copy), a 4-stage
//                cp.async pipeline in 64 KiB of dynamic shared memory (opted into by the GPU
//                backend) with one wgmma group in flight; then wgmma_tile::epilogue_axpby. 127
//                registers a thread: 2 blocks an SM. Where the tiles leave SMs idle the Rust
//                side splits K as for `mma` (gemm_wgmma_split_*: f32 partials to a workspace, and
//                each tile's last split forms C from them in split order).
//   7. wgmma_wide the same on a 128×256 tile (wgmma.mma_async.m64n256k16, 128 accumulators a
//                thread; 96 KiB of dynamic shared memory): 24 KB of operands per K step of 2.1
//                MFLOP where the 128×128 tile moves 16 KB per 1.05 — a quarter less L2-to-SM
//                traffic per FLOP. 216 registers: one block an SM (its split kernel gemm_wgmma_wide_split_*: 255).
#include "wgmma_tile.cuh"

namespace wgmma_gemm {

using namespace wgmma_tile;

// C = alpha·op(A)·op(B) + beta·C; or, split (gridDim.z > 1), the partials of K, from which each
// tile's last split forms C (wgmma_tile::tile_axpby). trans_a: A stored (K, M), MN-major;
// trans_b: B stored (N, K), K-major. Grid (ceil(N/128), ceil(M/128), splits), block 256,
// SHARED_BYTES of dynamic shared memory.
template <typename T, int TBN>
__device__ __forceinline__ void gemm(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                                     float* __restrict__ work, unsigned* __restrict__ tickets, int M, int N, int K,
                                     int trans_a, int trans_b, float alpha, float beta, int chunk) {
    EXTERN_SHARED(T, stages);
    if (trans_a) {
        if (trans_b)
            tile_axpby<T, true, true, TBN>(stages, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
        else
            tile_axpby<T, true, false, TBN>(stages, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
    } else {
        if (trans_b)
            tile_axpby<T, false, true, TBN>(stages, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
        else
            tile_axpby<T, false, false, TBN>(stages, A, B, C, work, tickets, M, N, K, alpha, beta, chunk);
    }
}

}  // namespace wgmma_gemm

#define GEMM_WGMMA_ENTRY(suffix, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) gemm_wgmma_##suffix(                                            \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M, int N, int K, int trans_a,       \
        int trans_b, float alpha, float beta) {                                                                      \
        wgmma_gemm::gemm<T, 128>(A, B, C, nullptr, nullptr, M, N, K, trans_a, trans_b, alpha, beta, K);                             \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) gemm_wgmma_split_##suffix(                                      \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, float* __restrict__ work,               \
        unsigned* __restrict__ tickets, int M, int N, int K, int trans_a, int trans_b, float alpha, float beta,      \
        int chunk) {                                                                                                 \
        wgmma_gemm::gemm<T, 128>(A, B, C, work, tickets, M, N, K, trans_a, trans_b, alpha, beta, chunk);                       \
    }
GEMM_WGMMA_ENTRY(f16, __half)
GEMM_WGMMA_ENTRY(bf16, __nv_bfloat16)

// The wide tile (`Variant::WgmmaWide`): 128×256, m64n256k16, 96 KiB of dynamic shared memory, one
// block an SM. Same contract and split-K as the above; grid (ceil(N/256), ceil(M/128), splits).
#define GEMM_WGMMA_WIDE_ENTRY(suffix, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(256, 1) gemm_wgmma_wide_##suffix(                                    \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M, int N, int K, int trans_a,       \
        int trans_b, float alpha, float beta) {                                                                      \
        wgmma_gemm::gemm<T, 256>(A, B, C, nullptr, nullptr, M, N, K, trans_a, trans_b, alpha, beta, K);                        \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(256, 1) gemm_wgmma_wide_split_##suffix(                              \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, float* __restrict__ work,               \
        unsigned* __restrict__ tickets, int M, int N, int K, int trans_a, int trans_b, float alpha, float beta,      \
        int chunk) {                                                                                                 \
        wgmma_gemm::gemm<T, 256>(A, B, C, work, tickets, M, N, K, trans_a, trans_b, alpha, beta, chunk);                  \
    }
GEMM_WGMMA_WIDE_ENTRY(f16, __half)
GEMM_WGMMA_WIDE_ENTRY(bf16, __nv_bfloat16)

// ---- the emulation's own test (src/harness/selftest/tensorcore.rs) ----------------------------
// One warpgroup: d = A·B (+ d_in when scale_d) through one wgmma.m64n128k16, A (64×16) and B
// (16×128) staged from `a` and `b` into dynamic shared memory exactly as given (`a_words` and
// `b_words` 16-bit words, laid out by the test), the descriptors built from byte offsets and
// LBO/SBO given by the test. d_out[t][64]: thread t's accumulators in register order.
// mode 0: as the protocol says; 1: no wgmma.fence; 2: accumulators read before the wait;
// 3: operand A overwritten before the wait; 4: no fence.proxy.async; 5: the warps of the
// warpgroup disagree on A's descriptor.
template <typename T>
__device__ __forceinline__ void selftest_wgmma(const unsigned short* a, int a_words, const unsigned short* b,
                                               int b_words, const unsigned* desc_args, const float* d_in,
                                               float* d_out, int mode) {
    EXTERN_SHARED(unsigned short, staged);
    const int t = threadIdx.x;
    for (int i = t; i < a_words + b_words; i += 128) staged[i] = i < a_words ? a[i] : b[i - a_words];
    if (mode != 4) lc::fence_proxy_async();
    __syncthreads();
    float d[16][4];
    for (int j = 0; j < 16; ++j)
        for (int v = 0; v < 4; ++v) d[j][v] = d_in[t * 64 + 4 * j + v];
    // desc_args: A's byte offset, LBO, SBO, transpose; then B's; then scale_d.
    // mode 5: warp 1 of the warpgroup gives A 16 bytes further on.
    const int a_skew = mode == 5 && t / 32 == 1 ? 8 : 0;
    const unsigned long long da = lc::wgmma_desc(staged + desc_args[0] / 2 + a_skew, desc_args[1], desc_args[2]);
    const unsigned long long db = lc::wgmma_desc(staged + a_words + desc_args[4] / 2, desc_args[5], desc_args[6]);
    const int scale_d = int(desc_args[8]);
    if (mode != 1) lc::wgmma_fence();
    const int ta = int(desc_args[3]), tb = int(desc_args[7]);
    if (ta == 0 && tb == 0) lc::wgmma_m64n128k16<T, 0, 0>(d, da, db, scale_d);
    if (ta == 0 && tb == 1) lc::wgmma_m64n128k16<T, 0, 1>(d, da, db, scale_d);
    if (ta == 1 && tb == 0) lc::wgmma_m64n128k16<T, 1, 0>(d, da, db, scale_d);
    if (ta == 1 && tb == 1) lc::wgmma_m64n128k16<T, 1, 1>(d, da, db, scale_d);
    lc::wgmma_commit();
    if (mode == 2)
        for (int j = 0; j < 16; ++j)
            for (int v = 0; v < 4; ++v) d_out[t * 64 + 4 * j + v] = d[j][v];
    if (mode == 3) {
        __syncthreads();
        if (t == 0) staged[desc_args[0] / 2] = (unsigned short)(staged[desc_args[0] / 2] ^ 0x0100u);
    }
    lc::wgmma_wait<0>();
    lc::fence_accumulators(d);
    if (mode != 2)
        for (int j = 0; j < 16; ++j)
            for (int v = 0; v < 4; ++v) d_out[t * 64 + 4 * j + v] = d[j][v];
}

#define SELFTEST_WGMMA_ENTRY(suffix, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) selftest_wgmma_##suffix(                                        \
        const unsigned short* a, int a_words, const unsigned short* b, int b_words, const unsigned* desc_args,       \
        const float* d_in, float* d_out, int mode) {                                                                 \
        selftest_wgmma<T>(a, a_words, b, b_words, desc_args, d_in, d_out, mode);                                     \
    }
SELFTEST_WGMMA_ENTRY(f16, __half)
SELFTEST_WGMMA_ENTRY(bf16, __nv_bfloat16)
