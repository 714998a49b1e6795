// lc-arch: 90a
// The GEMM family's Hopper variant (src/kernels/gemm.rs `Variant::Wgmma`), built for
// compute_90a (the first line above: build.rs), loaded only on sm_90 devices, and run on the
// CPU harness through its wgmma emulation like every other kernel. Same contract as
// cuda/gemm.cu:
//
//     C = alpha * op(A) * op(B) + beta * C          op(X) = X or X^T, f16/bf16 storage
//
//   6. wgmma     128×128 C tile per block of 2 warpgroups (256 threads), each warpgroup a
//                64×128 half with wgmma.mma_async.m64n128k16 (f32 accumulators: 64 a thread);
//                both operands from shared memory (the SS form) in the no-swizzle core-matrix
//                layout, K-major or MN-major as the operand is stored (wgmma's transpose flags
//                take either, so no transposing copy); K in steps of 32 through a 4-stage
//                cp.async pipeline in 64 KiB of dynamic shared memory (opted into by the GPU
//                backend; descriptors address the first 256 KiB of the shared window, and the
//                harness places static arrays past it). Each K tile: wait for its copies,
//                fence.proxy.async, barrier, prefetch the tile 2 ahead into the stage of tile
//                kt - 2, then 2 wgmma (k16 each) as one group, and wait until only that group
//                is in flight: one tile's wgmma overlap the next tile's barrier and copies.
//                143 registers a thread (the epilogue's loads first): one block an SM.
//                Edges: 8-element chunks in range and 16-byte aligned by cp.async, others
//                element by element with zeros past M, N, K. The epilogue is the mma
//                variants' (mma_tile::epilogue_axpby): the wgmma accumulator layout is the
//                m16n8 one, warp w of the block holding rows 16·w … 16·w + 15.
#include "mma_tile.cuh"
#include "wgmma.cuh"

namespace wgmma_gemm {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
// Tiles loaded ahead: the stages hold tile kt - 1 (its wgmma group may still run), kt, and the
// PREFETCH tiles after it.
constexpr int PREFETCH = STAGES - 2;
constexpr int OPERAND = 128 * BK;                       // elements of one operand's tile and stage
constexpr int SHARED_BYTES = STAGES * 2 * OPERAND * 2;  // 64 KiB, dynamic (opted into)
static_assert(SHARED_BYTES == 64 * 1024, "src/kernels/gemm.rs `Variant::dynamic_shared_bytes`");
// A stage's operand tile: 128 rows (M of A, N of B) × BK, as core matrices [k / 8][row / 8]
// of 64 elements (128 bytes). Core matrices adjacent in K lie LBO apart, in rows SBO apart.
constexpr int CORE_ROWS = 128 / 8;
constexpr unsigned SBO = 128, LBO = CORE_ROWS * 128;

// The accumulators' warp layout for mma_tile's epilogue: 8 warps along M, 16 rows each, all
// 128 columns in 16 m16n8 tiles.
struct Layout {
    static constexpr int WM = 16, WN = 128, FRAG_M = 1, FRAG_N = 16, WARPS_N = 1;
};

// Offset of element (row, k) in an operand tile: K-major core matrices hold 8 rows of 8
// consecutive k, MN-major ones 8 k of 8 consecutive rows.
template <bool K_MAJOR>
__device__ __forceinline__ int core_offset(int row, int k) {
    const int core = (k / 8) * CORE_ROWS + row / 8;
    return core * 64 + (K_MAJOR ? (row % 8) * 8 + k % 8 : (k % 8) * 8 + row % 8);
}

// Rows [x0, x0 + 128) × k [k0, k0 + BK) of an operand into a stage: stored K-major
// (X[x][k], row stride ld) or MN-major (X[k][x], row stride ld); elements at or past x_end or
// k_end are 0. 16-byte chunks (8 elements along the stored row) go by cp.async when `vector`
// (rows 16-byte aligned) and wholly in range; consecutive threads fill one core matrix.
template <typename T, bool K_MAJOR>
__device__ __forceinline__ void load_operand(T* tile, const T* __restrict__ X, int x_end, int k_end, int ld, int x0,
                                             int k0, bool vector) {
    LC_UNROLL
    for (int c = threadIdx.x; c < OPERAND / 8; c += THREADS) {
        // Chunk c: 8 consecutive threads take the 8 chunks of one core matrix.
        const int x = K_MAJOR ? (c / 32) * 8 + c % 8 : ((c / 8) % CORE_ROWS) * 8;
        const int k = K_MAJOR ? ((c / 8) % (BK / 8)) * 8 : (c / (8 * CORE_ROWS)) * 8 + c % 8;
        T* dst = tile + core_offset<K_MAJOR>(x, k);
        const int gx = x0 + x, gk = k0 + k;
        if (K_MAJOR) {
            if (vector && gx < x_end && gk + 8 <= k_end) {
                lc::cp_async16(dst, X + (size_t)gx * ld + gk);
            } else {
                for (int e = 0; e < 8; ++e)
                    dst[e] = (gx < x_end && gk + e < k_end) ? X[(size_t)gx * ld + gk + e] : lc::from_f32<T>(0.0f);
            }
        } else {
            if (vector && gk < k_end && gx + 8 <= x_end) {
                lc::cp_async16(dst, X + (size_t)gk * ld + gx);
            } else {
                for (int e = 0; e < 8; ++e)
                    dst[e] = (gk < k_end && gx + e < x_end) ? X[(size_t)gk * ld + gx + e] : lc::from_f32<T>(0.0f);
            }
        }
    }
}

// C = alpha·op(A)·op(B) + beta·C for the block's 128×128 tile. TA: A stored (K, M) (MN-major);
// TB: B stored (N, K) (K-major). Every thread of the block (THREADS) calls it.
template <typename T, bool TA, bool TB>
__device__ __forceinline__ void body(T* stages, const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C,
                                     int M, int N, int K, float alpha, float beta) {
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const int group = threadIdx.x / 128;  // the warpgroup: rows 64·group … of the tile
    const bool a_vector = (TA ? M : K) % 8 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
    const bool b_vector = (TB ? K : N) % 8 == 0 && reinterpret_cast<size_t>(B) % 16 == 0;
    const int k_tiles = lc::ceil_div(K, BK);
    auto a_stage = [&](int s) { return stages + s * 2 * OPERAND; };
    auto b_stage = [&](int s) { return stages + s * 2 * OPERAND + OPERAND; };
    auto load_stage = [&](int s, int kt) {
        const int k0 = kt * BK;
        if (TA)
            load_operand<T, false>(a_stage(s), A, M, K, M, m0, k0, a_vector);
        else
            load_operand<T, true>(a_stage(s), A, M, K, K, m0, k0, a_vector);
        if (TB)
            load_operand<T, true>(b_stage(s), B, N, K, K, n0, k0, b_vector);
        else
            load_operand<T, false>(b_stage(s), B, N, K, N, n0, k0, b_vector);
    };

    float acc[1][16][4];
    LC_UNROLL
    for (int j = 0; j < 16; ++j)
        LC_UNROLL
        for (int v = 0; v < 4; ++v) acc[0][j][v] = 0.0f;

    // Prologue: PREFETCH tiles in flight, one commit group each (empty past the last tile, so
    // that the group count, and with it the wait depth below, is the same every step).
    for (int s = 0; s < PREFETCH; ++s) {
        if (s < k_tiles) load_stage(s, s);
        lc::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        lc::cp_async_wait<PREFETCH - 1>();  // this thread's copies of tile kt have landed
        lc::fence_proxy_async();            // its writes of the tile, visible to wgmma
        __syncthreads();  // everyone's; and every thread is past its wait for the group of kt - 2
        const int next = kt + PREFETCH;  // into the stage tile kt - 2 used
        if (next < k_tiles) load_stage(next % STAGES, next);
        lc::cp_async_commit();

        const T* a = a_stage(kt % STAGES);
        const T* b = b_stage(kt % STAGES);
        lc::wgmma_fence();
        LC_UNROLL
        for (int s = 0; s < BK / 16; ++s) {
            // This warpgroup's 64 rows of A and all 128 columns of B, k16 step s.
            const unsigned long long da = lc::wgmma_desc(a + core_offset<!TA>(64 * group, 16 * s), LBO, SBO);
            const unsigned long long db = lc::wgmma_desc(b + core_offset<TB>(0, 16 * s), LBO, SBO);
            lc::wgmma_m64n128k16<T, TA ? 1 : 0, TB ? 0 : 1>(acc[0], da, db, 1);
        }
        lc::wgmma_commit();
        lc::wgmma_wait<1>();  // tile kt - 1's group is done (tile kt's may still run)
    }
    lc::wgmma_wait<0>();
    lc::fence_accumulators(acc[0]);
    lc::cp_async_wait<0>();  // only empty groups remain; leave none behind
    mma_tile::epilogue_axpby<T, Layout>(acc, C, M, N, m0, n0, alpha, beta);
}

// Grid (ceil(N/128), ceil(M/128)), block 256, SHARED_BYTES of dynamic shared memory.
template <typename T>
__device__ __forceinline__ void gemm(const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M, int N,
                                     int K, int trans_a, int trans_b, float alpha, float beta) {
    EXTERN_SHARED(T, stages);
    if (trans_a) {
        if (trans_b)
            body<T, true, true>(stages, A, B, C, M, N, K, alpha, beta);
        else
            body<T, true, false>(stages, A, B, C, M, N, K, alpha, beta);
    } else {
        if (trans_b)
            body<T, false, true>(stages, A, B, C, M, N, K, alpha, beta);
        else
            body<T, false, false>(stages, A, B, C, M, N, K, alpha, beta);
    }
}

}  // namespace wgmma_gemm

#define GEMM_WGMMA_ENTRY(suffix, T)                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) gemm_wgmma_##suffix(                                            \
        const T* __restrict__ A, const T* __restrict__ B, T* __restrict__ C, int M, int N, int K, int trans_a,       \
        int trans_b, float alpha, float beta) {                                                                      \
        wgmma_gemm::gemm<T>(A, B, C, M, N, K, trans_a, trans_b, alpha, beta);                                         \
    }
GEMM_WGMMA_ENTRY(f16, __half)
GEMM_WGMMA_ENTRY(bf16, __nv_bfloat16)

// ---- the emulation's own test (src/harness/selftest/tensorcore.rs) ----------------------------
// One warpgroup: d = A·B (+ d_in when scale_d) through one wgmma.m64n128k16, A (64×16) and B
// (16×128) staged from `a` and `b` into dynamic shared memory exactly as given (`a_words` and
// `b_words` 16-bit words, laid out by the test), the descriptors built from byte offsets and
// LBO/SBO given by the test. d_out[t][64]: thread t's accumulators in register order.
// mode 0: as the protocol says; 1: no wgmma.fence; 2: accumulators read before the wait;
// 3: operand A overwritten before the wait; 4: no fence.proxy.async.
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
    const unsigned long long da = lc::wgmma_desc(staged + desc_args[0] / 2, desc_args[1], desc_args[2]);
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
