// The Hopper GEMM main loop shared by the GEMM family's `wgmma` variants (cuda/gemm_wgmma.cu)
// and the composition's (cuda/compose_wgmma.cu), both built for compute_90a: a 128×128 output
// tile per block of 2 warpgroups (256 threads), each warpgroup a 64×128 half with
// wgmma.mma_async.m64n128k16 (f32 accumulators, 64 a thread) — or, TBN = 256 (`wgmma_wide`), a
// 128×256 tile of 64×256 halves with m64n256k16 (128 a thread); both operands from shared memory
// in the no-swizzle core-matrix layout, K-major or MN-major as the operand is stored (wgmma's
// transpose flags take either); K in steps of 32 through a 4-stage cp.async pipeline in 64 KiB
// (wide: 96 KiB) of dynamic shared memory, one wgmma group kept in flight. Callers add the
// epilogue (this file's epilogue_axpby; mma_tile's store_partial, scale_epilogue and
// hidden_epilogue take `LayoutN<TBN>`: the wgmma accumulators are the m16n8 layout, warp w of
// the block holding rows 16·w … 16·w + 15).
#pragma once

#include "mma_tile.cuh"
#include "wgmma.cuh"

namespace wgmma_tile {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
// Tiles loaded ahead: the stages hold tile kt - 1 (its wgmma group may still run), kt, and the
// PREFETCH tiles after it.
constexpr int PREFETCH = STAGES - 2;
// A stage of a BM × TBN block tile: A's 128 rows × BK, then B's TBN rows × BK, each as core
// matrices [k / 8][row / 8] of 64 elements (128 bytes): core matrices adjacent in K lie
// (rows / 8) · 128 bytes apart (LBO for A, Shape::B_LBO for B), adjacent in rows SBO apart. TBN
// is 128 (the `wgmma` variants: m64n128k16) or 256 (`wgmma_wide`: m64n256k16, 128 accumulators a
// thread).
template <int TBN>
struct Shape {
    static_assert(TBN == 128 || TBN == 256, "m64n128k16 or m64n256k16");
    static constexpr int A_OPERAND = BM * BK, B_OPERAND = TBN * BK, STAGE = A_OPERAND + B_OPERAND;
    static constexpr int SHARED_BYTES = STAGES * STAGE * 2;  // dynamic (opted into)
    static constexpr unsigned B_LBO = (TBN / 8) * 128;  // B's core matrices adjacent in K
};
constexpr int SHARED_BYTES = Shape<128>::SHARED_BYTES;  // 64 KiB
static_assert(SHARED_BYTES == 64 * 1024, "src/kernels/gemm.rs `Variant::dynamic_shared_bytes`");
static_assert(Shape<256>::SHARED_BYTES == 96 * 1024, "src/kernels/gemm.rs `Variant::dynamic_shared_bytes`");
constexpr unsigned SBO = 128, LBO = (BM / 8) * 128;  // LBO: A's (and a 128-row B's)

// The accumulators' warp layout for mma_tile's epilogue: 8 warps along M, 16 rows each, all
// TBN columns in TBN / 8 m16n8 tiles.
template <int TBN>
struct LayoutN {
    static constexpr int WM = 16, WN = TBN, FRAG_M = 1, FRAG_N = TBN / 8, WARPS_N = 1, THREADS = 256;
};
using Layout = LayoutN<128>;

// Offset of element (row, k) in an operand tile: K-major core matrices hold 8 rows of 8
// consecutive k, MN-major ones 8 k of 8 consecutive rows.
template <bool K_MAJOR, int ROWS = BM>
__device__ __forceinline__ int core_offset(int row, int k) {
    const int core = (k / 8) * (ROWS / 8) + row / 8;
    return core * 64 + (K_MAJOR ? (row % 8) * 8 + k % 8 : (k % 8) * 8 + row % 8);
}

// Rows [x0, x0 + ROWS) × k [k0, k0 + BK) of an operand into a stage: stored K-major
// (X[x][k], row stride ld) or MN-major (X[k][x], row stride ld); elements at or past x_end or
// k_end are 0. 16-byte chunks (8 elements along the stored row) go by cp.async when `vector`
// (rows 16-byte aligned) and wholly in range; consecutive threads fill one core matrix.
template <typename T, bool K_MAJOR, int ROWS>
__device__ __forceinline__ void load_operand(T* tile, const T* __restrict__ X, int x_end, int k_end, int ld, int x0,
                                             int k0, bool vector) {
    constexpr int CORE_ROWS = ROWS / 8;
    LC_UNROLL
    for (int c = threadIdx.x; c < ROWS * BK / 8; c += THREADS) {
        // Chunk c: 8 consecutive threads take the 8 chunks of one core matrix.
        const int x = K_MAJOR ? (c / 32) * 8 + c % 8 : ((c / 8) % CORE_ROWS) * 8;
        const int k = K_MAJOR ? ((c / 8) % (BK / 8)) * 8 : (c / (8 * CORE_ROWS)) * 8 + c % 8;
        T* dst = tile + core_offset<K_MAJOR, ROWS>(x, k);
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

// acc = op(A) · op(B) over k ∈ [k_begin, k_end) (a split-K range; k_begin a multiple of BK) for
// the 128×TBN block tile at (m0, n0): A stored (M, K), or (K, M) when TA; B stored (K, N), or
// (N, K) when TB. `stages` is the pipeline's dynamic shared memory (Shape<TBN>::SHARED_BYTES).
// Every thread of the block (THREADS) calls it; on return this thread's copies and its
// warpgroup's wgmma have completed (the other warpgroup's may still read the stages: a barrier
// before reusing them).
template <typename T, bool TA, bool TB, int TBN = BN>
__device__ __forceinline__ void mainloop(float (&acc)[1][TBN / 8][4], T* stages, const T* __restrict__ A,
                                         const T* __restrict__ B, int M, int N, int K, int m0, int n0, int k_begin,
                                         int k_end) {
    const int group = threadIdx.x / 128;  // the warpgroup: rows 64·group … of the tile
    const bool a_vector = (TA ? M : K) % 8 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
    const bool b_vector = (TB ? K : N) % 8 == 0 && reinterpret_cast<size_t>(B) % 16 == 0;
    const int k_tiles = lc::ceil_div(k_end - k_begin, BK);
    using S = Shape<TBN>;
    auto a_stage = [&](int s) { return stages + s * S::STAGE; };
    auto b_stage = [&](int s) { return stages + s * S::STAGE + S::A_OPERAND; };
    // K tile kt of the range into a stage; k ≥ k_end reads as 0.
    auto load_stage = [&](int s, int kt) {
        const int k0 = k_begin + kt * BK;
        if (TA)
            load_operand<T, false, BM>(a_stage(s), A, M, k_end, M, m0, k0, a_vector);
        else
            load_operand<T, true, BM>(a_stage(s), A, M, k_end, K, m0, k0, a_vector);
        if (TB)
            load_operand<T, true, TBN>(b_stage(s), B, N, k_end, K, n0, k0, b_vector);
        else
            load_operand<T, false, TBN>(b_stage(s), B, N, k_end, N, n0, k0, b_vector);
    };

    LC_UNROLL
    for (int j = 0; j < TBN / 8; ++j)
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
            // This warpgroup's 64 rows of A and all TBN columns of B, k16 step s.
            const unsigned long long da = lc::wgmma_desc(a + core_offset<!TA>(64 * group, 16 * s), LBO, SBO);
            const unsigned long long db = lc::wgmma_desc(b + core_offset<TB, TBN>(0, 16 * s), S::B_LBO, SBO);
            if constexpr (TBN == 128)
                lc::wgmma_m64n128k16<T, TA ? 1 : 0, TB ? 0 : 1>(acc[0], da, db, 1);
            else
                lc::wgmma_m64n256k16<T, TA ? 1 : 0, TB ? 0 : 1>(acc[0], da, db, 1);
        }
        lc::wgmma_commit();
        lc::wgmma_wait<1>();  // tile kt - 1's group is done (tile kt's may still run)
    }
    lc::wgmma_wait<0>();
    lc::fence_accumulators(acc[0]);
    lc::cp_async_wait<0>();  // only empty groups remain; leave none behind
}

// out[row][col] = alpha · acc + beta · out[row][col] over the 128×TBN block tile at (m0, n0),
// rounded once (beta == 0: out not read): what mma_tile::epilogue_axpby computes, for this
// layout, a thread's two rows in turn through one base pointer each, 16 column pairs at a time —
// the old values of those pairs loaded before any is stored. Column pairs as one 4-byte access
// when N is even and `out` 4-byte aligned, else element by element. mma_tile's version, which
// addresses every pair from its (row, column), costs the 128-column kernels 144–181 registers a
// thread (one block an SM); this one 127 (two).
template <typename T, int TBN = BN>
__device__ __forceinline__ void epilogue_axpby(const float (&acc)[1][TBN / 8][4], T* __restrict__ out, int M, int N,
                                               int m0, int n0, float alpha, float beta) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const bool read = beta != 0.0f;
    const bool pairs = N % 2 == 0 && reinterpret_cast<size_t>(out) % (2 * sizeof(T)) == 0;
    const int col0 = n0 + 2 * (lane % 4);
    LC_UNROLL
    for (int h = 0; h < 2; ++h) {
        const int row = m0 + 16 * warp + lane / 4 + 8 * h;
        if (row >= M) continue;
        LC_UNROLL
        for (int q = 0; q < TBN / 128; ++q) {
            T* base = out + (size_t)row * N + col0 + 128 * q;
            float old[16][2];
            LC_UNROLL
            for (int j = 0; j < 16; ++j) {
                const int col = col0 + 128 * q + 8 * j;
                old[j][0] = old[j][1] = 0.0f;
                if (!read) continue;
                if (pairs) {
                    if (col < N) {
                        const mma_tile::Pair<T> p = *reinterpret_cast<const mma_tile::Pair<T>*>(base + 8 * j);
                        old[j][0] = lc::to_f32(p.lo), old[j][1] = lc::to_f32(p.hi);
                    }
                } else {
                    if (col < N) old[j][0] = lc::to_f32(base[8 * j]);
                    if (col + 1 < N) old[j][1] = lc::to_f32(base[8 * j + 1]);
                }
            }
            LC_UNROLL
            for (int j = 0; j < 16; ++j) {
                const int col = col0 + 128 * q + 8 * j;
                const float* a = acc[0][16 * q + j];
                const T lo = lc::from_f32<T>(alpha * a[2 * h] + beta * old[j][0]);
                const T hi = lc::from_f32<T>(alpha * a[2 * h + 1] + beta * old[j][1]);
                if (pairs) {
                    if (col < N) {
                        mma_tile::Pair<T> p;
                        p.lo = lo, p.hi = hi;
                        *reinterpret_cast<mma_tile::Pair<T>*>(base + 8 * j) = p;
                    }
                } else {
                    if (col < N) base[8 * j] = lo;
                    if (col + 1 < N) base[8 * j + 1] = hi;
                }
            }
        }
    }
}

// The block's tile of out = alpha·op(A)·op(B) + beta·out (grid (ceil(N/TBN), ceil(M/128),
// splits)); or, split (gridDim.z > 1), the partial of K range [z·chunk, (z + 1)·chunk) to
// work[z] (splits × M × N f32), from which the tile's last split to finish forms out
// (mma_tile::split_finish; its ticket in `tickets`). `stages`: Shape<TBN>::SHARED_BYTES of
// dynamic shared memory. The GEMM family's variants and the composition's expand and ∂X.
template <typename T, bool TA, bool TB, int TBN = BN>
__device__ __forceinline__ void tile_axpby(T* stages, const T* __restrict__ A, const T* __restrict__ B,
                                           T* __restrict__ out, float* __restrict__ work,
                                           unsigned* __restrict__ tickets, int M, int N, int K, float alpha,
                                           float beta, int chunk) {
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * TBN;
    float acc[1][TBN / 8][4];
    // With one block an SM (the wide tile) nothing else hides the epilogue's wait on out.
    if (gridDim.z == 1 && beta != 0.0f) mma_tile::prefetch_tile<T, BM, TBN, THREADS>(out, M, N, m0, n0);
    mainloop<T, TA, TB, TBN>(acc, stages, A, B, M, N, K, m0, n0, lc::split_begin(chunk), lc::split_end(chunk, K));
    if (gridDim.z > 1 &&
        !mma_tile::split_finish<LayoutN<TBN>>(acc, work, tickets, reinterpret_cast<int*>(stages), M, N, m0, n0))
        return;
    epilogue_axpby<T, TBN>(acc, out, M, N, m0, n0, alpha, beta);
}

}  // namespace wgmma_tile
