// The tensor-core GEMM main loop shared by the GEMM family's `mma` variants (cuda/gemm.cu) and
// the composition's (cuda/compose_mma.cu): a 128×128 output tile per block, K in steps of 32
// through a 3-stage cp.async pipeline in XOR-swizzled shared memory (48 KiB), mma.sync.m16n8k16
// with f32 accumulators, fragments loaded with ldmatrix (.trans for the operands stored
// k-major). Callers add the epilogue. Two warp layouts (`Tile<TBM, TWN>`):
//   TWN = 32: 8 warps, 2 along M × 4 along N, 64×32 each (4×4 mma tiles): `mma`;
//   TWN = 64: 4 warps, 2 × 2, 64×64 each (4×8 mma tiles): `mma_w64`, the warp tile of CUTLASS's
//             sm_80 128×128×32 configuration. Per k16 step a warp issues 8 ldmatrix.x4 for 32
//             mma (against 6 for 16): a third less shared-memory traffic per FLOP, and 32
//             independent mma a warp to hide latency with, at 4 warps a block instead of 8.
// Each K tile's fragments (both k16 steps) are loaded before its first mma, so that the second
// step's ldmatrix can overlap the first step's mma. `mainloop`, `Frag` and `epilogue_axpby` also
// take 64-row tiles (TBM = 64: the same warps, 32 rows each), for grids that 128-row tiles would
// leave short of the SMs.
#pragma once

#include "common.cuh"

namespace mma_tile {

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 3;
constexpr int WARPS_M = 2;     // rows of warps in every layout
constexpr int TILE = BM * BK;  // elements per operand tile and stage
static_assert(BM * BK == BN * BK, "A and B tiles share one size");
// A block tile of TBM rows (128, or 64 where 128-row tiles leave SMs idle: the same warps, each
// TBM / 2 rows) by BN columns in warps TWN columns wide (32: 4 along N; 64: 2): the rows and
// columns a warp covers, its m16 and n8 tiles, the block's threads, the elements of one A stage.
template <int TBM, int TWN>
struct Tile {
    static_assert(TBM == 128 || TBM == 64, "128- or 64-row tiles");
    static_assert(TWN == 32 || TWN == 64, "warps 32 or 64 columns wide");
    static constexpr int WM = TBM / WARPS_M, FRAG_M = WM / 16, TILE_A = TBM * BK;
    static constexpr int WN = TWN, FRAG_N = TWN / 8, WARPS_N = BN / TWN, THREADS = 32 * WARPS_M * WARPS_N;
};
// Shared storage in 16-byte units (ldmatrix rows and cp.async destinations are 16-byte aligned).
struct alignas(16) Chunk16 {
    unsigned words[4];
};

// Element (row, col) of a shared tile of COLS 16-bit columns: 16-byte chunk c of row r is stored
// at chunk c ^ f(r), so that the 8 rows one ldmatrix phase reads at one chunk column land in 8
// distinct 16-byte bank groups (rows of 64 bytes: f = (r / 2) % 4; rows of 256: f = r % 8).
template <int COLS>
__device__ __forceinline__ int swizzle(int row, int col) {
    constexpr int CHUNKS = COLS / 8;
    static_assert(CHUNKS == 4 || CHUNKS >= 8, "rows of 4 or at least 8 chunks");
    const int chunk = col / 8;
    const int stored = CHUNKS >= 8 ? chunk ^ (row & 7) : chunk ^ ((row >> 1) & 3);
    return row * COLS + stored * 8 + col % 8;
}

// Rows [row0, row0 + ROWS) × columns [col0, col0 + COLS) of the row-major matrix `src` (row
// stride `ld` elements) into a swizzled tile; elements at or past row `rows` or column `cols`
// are 0 (`cols` ≤ `ld`: a split-K range ends there). `vector`: every row starts 16-byte
// aligned, so chunks wholly in range go by cp.async.
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void load_tile(T* tile, const T* __restrict__ src, int rows, int cols, int ld, int row0,
                                          int col0, bool vector) {
    constexpr int CHUNKS_PER_ROW = COLS / 8;
    static_assert((ROWS * CHUNKS_PER_ROW) % NTHREADS == 0, "whole chunks per thread");
    LC_UNROLL
    for (int c = threadIdx.x; c < ROWS * CHUNKS_PER_ROW; c += NTHREADS) {
        const int r = c / CHUNKS_PER_ROW, col = (c % CHUNKS_PER_ROW) * 8;
        const int gr = row0 + r, gc = col0 + col;
        T* dst = tile + swizzle<COLS>(r, col);
        if (vector && gr < rows && gc + 8 <= cols) {
            lc::cp_async16(dst, src + (size_t)gr * ld + gc);
        } else {
            for (int e = 0; e < 8; ++e)
                dst[e] = (gr < rows && gc + e < cols) ? src[(size_t)gr * ld + gc + e] : lc::from_f32<T>(0.0f);
        }
    }
}

// The block's accumulators in a warp layout L (Tile<TBM, TWN>, or the wgmma GEMM's: any type
// with WM, WN, FRAG_M, FRAG_N, WARPS_N — warp w covers rows (w / WARPS_N)·WM and columns
// (w % WARPS_N)·WN of the block tile in FRAG_M × FRAG_N m16n8 tiles): acc[i][j][v] is output
// (row(i, v), col(j, v)) of the block tile.
template <class L>
struct Frag {
    int lane, wm0, wn0;
    __device__ __forceinline__ Frag() : lane(threadIdx.x % 32) {
        const int warp = threadIdx.x / 32;
        wm0 = (warp / L::WARPS_N) * L::WM;
        wn0 = (warp % L::WARPS_N) * L::WN;
    }
    // m16n8 accumulator v: row groupID + 8·(v / 2), column 2·threadID_in_group + v % 2.
    __device__ __forceinline__ int row(int i, int v) const { return wm0 + 16 * i + lane / 4 + 8 * (v / 2); }
    __device__ __forceinline__ int col(int j, int v) const { return wn0 + 8 * j + 2 * (lane % 4) + v % 2; }
};

// acc = op(A) · op(B) over k ∈ [k_begin, k_end) (a split-K range; by default all of K) for the
// TBM × BN block tile at (m0, n0), in warps TWN columns wide: A stored (M, K), or (K, M) when
// TA; B stored (K, N), or (N, K) when TB. `k_begin` is a multiple of BK. `a_tiles` and
// `b_tiles` are the pipeline's shared memory (STAGES · Tile::TILE_A and STAGES · TILE elements).
// Every thread of the block (Tile::THREADS) must call it; on return every copy has landed and
// every thread is past its last read of the tiles (they may be reused).
template <typename T, bool TA, bool TB, int TBM, int TWN>
__device__ __forceinline__ void mainloop(float (&acc)[Tile<TBM, TWN>::FRAG_M][Tile<TBM, TWN>::FRAG_N][4], T* a_tiles,
                                         T* b_tiles, const T* __restrict__ A, const T* __restrict__ B, int M, int N,
                                         int K, int m0, int n0, int k_begin = 0, int k_end = -1) {
    using L = Tile<TBM, TWN>;
    constexpr int FM = L::FRAG_M, FN = L::FRAG_N, NT = L::THREADS, KS = BK / 16;
    const Frag<L> f;
    if (k_end < 0) k_end = K;
    const bool a_vector = (TA ? M : K) % 8 == 0 && reinterpret_cast<size_t>(A) % 16 == 0;
    const bool b_vector = (TB ? K : N) % 8 == 0 && reinterpret_cast<size_t>(B) % 16 == 0;
    const int k_tiles = lc::ceil_div(k_end - k_begin, BK);
    // K-tile kt of the range, of op(A) (TBM × BK) and op(B) (BK × BN), into a stage, in the
    // orientation they are stored in; k ≥ k_end reads as 0.
    auto load_stage = [&](int stage, int kt) {
        const int k0 = k_begin + kt * BK;
        T* a = a_tiles + stage * L::TILE_A;
        T* b = b_tiles + stage * TILE;
        if (TA)
            load_tile<T, BK, TBM, NT>(a, A, k_end, M, M, k0, m0, a_vector);
        else
            load_tile<T, TBM, BK, NT>(a, A, M, k_end, K, m0, k0, a_vector);
        if (TB)
            load_tile<T, BN, BK, NT>(b, B, N, k_end, K, n0, k0, b_vector);
        else
            load_tile<T, BK, BN, NT>(b, B, k_end, N, N, k0, n0, b_vector);
    };

    // Fully unrolled wherever acc is indexed, so that it lives in registers.
    LC_UNROLL
    for (int i = 0; i < FM; ++i)
        LC_UNROLL
        for (int j = 0; j < FN; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;

    // Prologue: STAGES - 1 tiles in flight, one commit group each (empty past the last tile, so
    // that the group count, and with it the wait depth below, is the same every step).
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s, s);
        lc::cp_async_commit();
    }
    for (int kt = 0; kt < k_tiles; ++kt) {
        lc::cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed
        __syncthreads();                  // everyone's have; and everyone is done with tile kt - 1
        const int next = kt + STAGES - 1;  // into the stage tile kt - 1 used
        if (next < k_tiles) load_stage(next % STAGES, next);
        lc::cp_async_commit();

        const T* a = a_tiles + (kt % STAGES) * L::TILE_A;
        const T* b = b_tiles + (kt % STAGES) * TILE;
        // The fragments of both k16 steps first, then their mma: the second step's ldmatrix
        // are in flight while the first step's mma issue. (asm volatile keeps this order in the
        // PTX; ptxas schedules the SASS itself, so how much this adds is for a GPU to show.)
        unsigned a_frag[KS][FM][4], b_frag[KS][FN][2];
        LC_UNROLL
        for (int s = 0; s < KS; ++s) {
            const int ks = 16 * s;
            // Lane l addresses row l % 8 of 8×8 matrix l / 8: for A the fragment's registers
            // (m 0-7 | 8-15) × (k 0-7 | 8-15); for B two n8 tiles' (k 0-7, k 8-15).
            const int sub = f.lane % 8, quad = f.lane / 8;
            LC_UNROLL
            for (int i = 0; i < FM; ++i) {
                const int m = f.wm0 + 16 * i + 8 * (quad & 1), k = ks + 8 * (quad >> 1);
                if (TA)
                    lc::ldmatrix<4, true>(a_frag[s][i], &a[swizzle<TBM>(k + sub, m)]);
                else
                    lc::ldmatrix<4, false>(a_frag[s][i], &a[swizzle<BK>(m + sub, k)]);
            }
            LC_UNROLL
            for (int j = 0; j < FN; j += 2) {
                const int n = f.wn0 + 8 * j + 8 * (quad >> 1), k = ks + 8 * (quad & 1);
                unsigned r[4];
                if (TB)
                    lc::ldmatrix<4, false>(r, &b[swizzle<BK>(n + sub, k)]);
                else
                    lc::ldmatrix<4, true>(r, &b[swizzle<BN>(k + sub, n)]);
                b_frag[s][j][0] = r[0], b_frag[s][j][1] = r[1], b_frag[s][j + 1][0] = r[2], b_frag[s][j + 1][1] = r[3];
            }
        }
        LC_UNROLL
        for (int s = 0; s < KS; ++s)
            LC_UNROLL
            for (int i = 0; i < FM; ++i)
                LC_UNROLL
                for (int j = 0; j < FN; ++j)
                    lc::mma_m16n8k16<T>(acc[i][j], a_frag[s][i], b_frag[s][j], acc[i][j]);
    }
    lc::cp_async_wait<0>();  // only empty groups remain; leave none behind
    __syncthreads();         // every warp's last ldmatrix is done before the tiles are reused
}

// The old values of the block's ROWS × COLS tile of `out` at (m0, n0) into L2 (one
// prefetch.global.L2 per 128-byte line of each row in range, NTHREADS threads), issued by an
// accumulating kernel (beta ≠ 0, not split) before its main loop, so that DRAM delivers them
// while it runs and the epilogue reads them from L2 instead of waiting on DRAM after it.
template <typename T, int ROWS, int COLS, int NTHREADS>
__device__ __forceinline__ void prefetch_tile(const T* out, int M, int N, int m0, int n0) {
    constexpr int LINE = 128 / sizeof(T), LINES = COLS / LINE;  // elements a line, lines a row
    static_assert(COLS % LINE == 0, "whole lines");
    for (int i = threadIdx.x; i < ROWS * LINES; i += NTHREADS) {
        const int row = m0 + i / LINES, col = n0 + (i % LINES) * LINE;
        if (row < M && col < N) lc::prefetch_l2(out + (size_t)row * N + col);
    }
}

// The block tile's accumulators stored to out (M × N), each rounded once (T = float:
// as they are): the split ∂U's finish, and store_partial.
template <typename T, class L>
__device__ __forceinline__ void store_tile(const float (&acc)[L::FRAG_M][L::FRAG_N][4], T* __restrict__ out, int M, int N,
                                           int m0, int n0) {
    const Frag<L> f;
    LC_UNROLL
    for (int i = 0; i < L::FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < L::FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int row = m0 + f.row(i, v), col = n0 + f.col(j, v);
                if (row < M && col < N) out[(size_t)row * N + col] = lc::from_f32<T>(acc[i][j][v]);
            }
}

// Split K: the block's partial tile, f32 and unrounded, to work[blockIdx.z][row][col] (splits ×
// M × N); the tile's last split to finish adds the splits in order (split_finish).
template <class L>
__device__ __forceinline__ void store_partial(const float (&acc)[L::FRAG_M][L::FRAG_N][4], float* __restrict__ work,
                                              int M, int N, int m0, int n0) {
    store_tile<float, L>(acc, work + (size_t)blockIdx.z * M * N, M, N, m0, n0);
}

// Two consecutive elements as one access (16-bit: 4 bytes; f32: 8).
template <typename T>
struct alignas(2 * sizeof(T)) Pair {
    T lo, hi;
};

// The tile's last split (split_finish): acc = Σ_z work[z] over the block's tile, in split order
// from 0.0f — the f32 sums of a finishing launch's lc::sum_splits, the same bits whichever split
// arrived last. Each thread loads the elements of its own accumulator fragments (its own partial
// too: the registers of `acc` are reused) as column pairs — one 8-byte load where N is even and
// the workspace 8-byte aligned (a view into a larger one need not be), two 4-byte ones otherwise
// — in chunks of 4 pairs of a fragment row; no store comes between the loads, so the compiler
// may issue several chunks ahead of their adds.
template <class L>
__device__ __forceinline__ void sum_partials_into(float (&acc)[L::FRAG_M][L::FRAG_N][4], const float* __restrict__ work,
                                                  int M, int N, int m0, int n0) {
    constexpr int JC = L::FRAG_N < 4 ? L::FRAG_N : 4;
    static_assert(L::FRAG_N % JC == 0, "whole chunks of fragment columns");
    const Frag<L> f;
    // Then every fragment's column pair (an even column) is one aligned 8-byte load.
    const bool pairs = N % 2 == 0 && reinterpret_cast<size_t>(work) % sizeof(Pair<float>) == 0;
    LC_UNROLL
    for (int i = 0; i < L::FRAG_M; ++i)
        LC_UNROLL
        for (int j = 0; j < L::FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) acc[i][j][v] = 0.0f;
    for (int z = 0; z < (int)gridDim.z; ++z) {
        const float* part = work + (size_t)z * M * N;
        LC_UNROLL
        for (int i = 0; i < L::FRAG_M; ++i)
            LC_UNROLL
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + f.row(i, 2 * h);
                const float* rp = part + (size_t)row * N;
                LC_UNROLL
                for (int j0 = 0; j0 < L::FRAG_N; j0 += JC) {
                    Pair<float> p[JC];
                    LC_UNROLL
                    for (int j = 0; j < JC; ++j) {
                        const int col = n0 + f.col(j0 + j, 0);
                        p[j] = {0.0f, 0.0f};
                        if (row < M && col < N) {
                            if (pairs) {
                                p[j] = *reinterpret_cast<const Pair<float>*>(rp + col);
                            } else {
                                p[j].lo = rp[col];
                                if (col + 1 < N) p[j].hi = rp[col + 1];
                            }
                        }
                    }
                    LC_UNROLL
                    for (int j = 0; j < JC; ++j) {
                        acc[i][j0 + j][2 * h] += p[j].lo;
                        acc[i][j0 + j][2 * h + 1] += p[j].hi;
                    }
                }
            }
    }
}

// The last split's finish of a ROWS × COLS tile at (m0, n0) of an M × N output straight from the
// workspace, without the accumulators: out = alpha · Σ_z work[z] + beta · out (beta = 0: out is
// not read), the splits added in order from 0.0f (lc::sum_splits), rounded once. For kernels
// where summing into the accumulators and running their epilogue would spill (the GEMM family's
// split kernels). Block-strided, consecutive threads on consecutive columns, batches of 8
// elements a thread whose loads all precede their stores (a store through `out` may alias a
// later load through it as far as the compiler can tell).
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void finish_tile(const float* __restrict__ work, T* __restrict__ out, int M, int N, int m0,
                                            int n0, float alpha, float beta) {
    constexpr int BATCH = 8;
    const int stride = (int)blockDim.x;
    for (int e0 = (int)threadIdx.x; e0 < ROWS * COLS; e0 += BATCH * stride) {
        float value[BATCH];
        LC_UNROLL
        for (int b = 0; b < BATCH; ++b) {
            const int e = e0 + b * stride, r = m0 + e / COLS, c = n0 + e % COLS;
            value[b] = 0.0f;
            if (e < ROWS * COLS && r < M && c < N) {
                const size_t at = (size_t)r * N + c;
                const float old = beta != 0.0f ? beta * lc::to_f32(out[at]) : 0.0f;
                value[b] = alpha * lc::sum_splits(work, gridDim.z, (size_t)M * N, at) + old;
            }
        }
        LC_UNROLL
        for (int b = 0; b < BATCH; ++b) {
            const int e = e0 + b * stride, r = m0 + e / COLS, c = n0 + e % COLS;
            if (e < ROWS * COLS && r < M && c < N) out[(size_t)r * N + c] = lc::from_f32<T>(value[b]);
        }
    }
}

// Split K without a finishing launch: the block's partial to work[blockIdx.z] (store_partial);
// false if another split of the tile is still to finish (the block is done), true in the last
// one (lc::last_split on the tile's ticket in `tickets`), which then holds the
// whole-K sum in `acc` (sum_partials_into) for the kernel's own whole-K epilogue. `flag`: an int
// of shared memory the block no longer uses (the pipeline's stages, past the main loop).
template <class L>
__device__ __forceinline__ bool split_finish(float (&acc)[L::FRAG_M][L::FRAG_N][4], float* __restrict__ work,
                                             unsigned* __restrict__ tickets, int* flag, int M, int N, int m0, int n0) {
    store_partial<L>(acc, work, M, N, m0, n0);
    if (!lc::last_split(tickets, flag)) return false;
    sum_partials_into<L>(acc, work, M, N, m0, n0);
    return true;
}

// The split `hidden` kernels' ∂U (gridDim.z > 1, ∂U asked for): after hidden_epilogue stored
// the block's partial ∂U (H ∘ D, f32), the tile's last split sums the partials in split order
// and stores ∂U, each element rounded once.
template <typename T, class L>
__device__ __forceinline__ void split_finish_du(float (&acc)[L::FRAG_M][L::FRAG_N][4], const float* __restrict__ work,
                                                unsigned* __restrict__ tickets, int* flag, T* __restrict__ dU,
                                                int n_tokens, int R, int m0, int n0) {
    if (gridDim.z == 1 || !dU || !lc::last_split(tickets, flag)) return;
    sum_partials_into<L>(acc, work, n_tokens, R, m0, n0);
    store_tile<T, L>(acc, dU, n_tokens, R, m0, n0);
}

// out[row][col] = alpha · acc + beta · out[row][col] over the block tile at (m0, n0), rounded
// once (beta == 0: out is not read). Every old value a thread needs is loaded before it stores
// any: as far as the compiler can tell a store through `out` may alias a later load through it,
// so a read-add-store per element waits one memory latency each — the sm_90 SASS of the
// composition's expand showed 32 LDG → STG round trips a thread, and the H200 run had the
// expand and ∂X kernels (K = R, a full grid) at under half the rate of the shrink. Column
// pairs go as one 4-byte access when N is even and `out` is 4-byte aligned, two m16 rows of
// fragments at a time; otherwise element by element, loads first, one m16 row at a time.
template <typename T, class L>
__device__ __forceinline__ void epilogue_axpby(const float (&acc)[L::FRAG_M][L::FRAG_N][4], T* __restrict__ out, int M,
                                               int N, int m0, int n0, float alpha, float beta) {
    constexpr int FM = L::FRAG_M, FRAG_N = L::FRAG_N;
    const Frag<L> f;
    const bool read = beta != 0.0f;
    if (N % 2 == 0 && reinterpret_cast<size_t>(out) % sizeof(Pair<T>) == 0) {
        // Fragment pair h of (i, j) is accumulators 2h and 2h + 1: one row, columns col, col + 1
        // (col even, so col < N means both are in range). Two m16 rows of fragments at a time:
        // 16 pairs in flight, two round trips a thread (all 32 at once spill).
        constexpr int IC = FM % 2 == 0 ? 2 : 1;
        LC_UNROLL
        for (int i0 = 0; i0 < FM; i0 += IC) {
            Pair<T> old[IC][FRAG_N][2];
            if (read) {
                LC_UNROLL
                for (int i = 0; i < IC; ++i)
                    LC_UNROLL
                    for (int j = 0; j < FRAG_N; ++j)
                        LC_UNROLL
                        for (int h = 0; h < 2; ++h) {
                            const int row = m0 + f.row(i0 + i, 2 * h), col = n0 + f.col(j, 0);
                            if (row < M && col < N)
                                old[i][j][h] = *reinterpret_cast<const Pair<T>*>(out + (size_t)row * N + col);
                        }
            }
            LC_UNROLL
            for (int i = 0; i < IC; ++i)
                LC_UNROLL
                for (int j = 0; j < FRAG_N; ++j)
                    LC_UNROLL
                    for (int h = 0; h < 2; ++h) {
                        const int row = m0 + f.row(i0 + i, 2 * h), col = n0 + f.col(j, 0);
                        if (row >= M || col >= N) continue;
                        const float p0 = read ? beta * lc::to_f32(old[i][j][h].lo) : 0.0f;
                        const float p1 = read ? beta * lc::to_f32(old[i][j][h].hi) : 0.0f;
                        Pair<T> v;
                        v.lo = lc::from_f32<T>(alpha * acc[i0 + i][j][2 * h] + p0);
                        v.hi = lc::from_f32<T>(alpha * acc[i0 + i][j][2 * h + 1] + p1);
                        *reinterpret_cast<Pair<T>*>(out + (size_t)row * N + col) = v;
                    }
        }
        return;
    }
    LC_UNROLL
    for (int i = 0; i < FM; ++i) {
        float old[FRAG_N][4];
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int row = m0 + f.row(i, v), col = n0 + f.col(j, v);
                old[j][v] = read && row < M && col < N ? beta * lc::to_f32(out[(size_t)row * N + col]) : 0.0f;
            }
        LC_UNROLL
        for (int j = 0; j < FRAG_N; ++j)
            LC_UNROLL
            for (int v = 0; v < 4; ++v) {
                const int row = m0 + f.row(i, v), col = n0 + f.col(j, v);
                if (row < M && col < N) out[(size_t)row * N + col] = lc::from_f32<T>(alpha * acc[i][j][v] + old[j][v]);
            }
    }
}

// Every in-range output of the block tile at (m0, n0) of an (n_tokens, R) composition output, with
// its D[t, j] = C[sample_of[t], module_of[j]] · col_scale[j]: visit(index t·R + j, acc, D) (the
// sample read once per row). L: the accumulators' warp layout (as Frag).
template <class L, class Visit>
__device__ __forceinline__ void for_each_scaled(const float (&acc)[L::FRAG_M][L::FRAG_N][4], const float* __restrict__ C,
                                                const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                                const float* __restrict__ col_scale, int n_tokens, int R,
                                                int n_modules, int m0, int n0, Visit visit) {
    const Frag<L> f;
    LC_UNROLL
    for (int i = 0; i < L::FRAG_M; ++i)
        LC_UNROLL
        for (int v = 0; v < 4; ++v) {
            const int t = m0 + f.row(i, v);
            if (t >= n_tokens) continue;
            const int sample = sample_of[t];
            LC_UNROLL
            for (int j = 0; j < L::FRAG_N; ++j) {
                const int col = n0 + f.col(j, v);
                if (col >= R) continue;
                visit((size_t)t * R + col, acc[i][j][v], lc::diag(C, n_modules, module_of, col_scale, sample, col));
            }
        }
}

// The composition's shrink epilogue (U = acc, Z = U ∘ D): U (null skips it) and Z overwritten,
// each rounded once.
template <typename T, class L>
__device__ __forceinline__ void scale_epilogue(const float (&acc)[L::FRAG_M][L::FRAG_N][4], const float* __restrict__ C,
                                               const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                               const float* __restrict__ col_scale, T* __restrict__ U,
                                               T* __restrict__ Z, int n_tokens, int R, int n_modules, int m0,
                                               int n0) {
    for_each_scaled<L>(acc, C, sample_of, module_of, col_scale, n_tokens, R, n_modules, m0, n0,
                       [&](size_t at, float u, float d) {
                           if (U) U[at] = lc::from_f32<T>(u);
                           Z[at] = lc::from_f32<T>(u * d);
                       });
}

// The composition's backward epilogue over an H tile in registers (TBM × TBN at (m0, n0) of the
// (n_tokens, R) output; L the accumulators' warp layout, with THREADS): ∂U (if given) = H ∘ D,
// or with several splits (gridDim.z > 1) its f32 partial to work[blockIdx.z], which the tile's
// last split sums (the kernels, after this); ∂C (if given) += the tile's s_j H U, segmented by module and by runs of tokens of one sample,
// in two halves of TBM / 2 rows through `scratch` (the pipeline's shared memory, free once the
// main loop has returned): part[TBM / 2][TBN + 1] f32, then the tile's module ids, token samples
// and segment list (int32). Every thread of the block calls it (barriers inside when dC).
template <typename T, class L, int TBM>
__device__ __forceinline__ void hidden_epilogue(const float (&acc)[L::FRAG_M][L::FRAG_N][4], float* scratch,
                                                const T* __restrict__ U, const float* __restrict__ C,
                                                const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                                const float* __restrict__ col_scale, float* __restrict__ dC,
                                                T* __restrict__ dU, float* __restrict__ work, int n_tokens, int R,
                                                int n_modules, int m0, int n0) {
    constexpr int TBN = L::WN * L::WARPS_N;  // the tile's columns: BN, or 256 for wgmma_wide
    static_assert(TBN <= L::THREADS, "a thread per column of the tile");
    constexpr int FM = L::FRAG_M, FN = L::FRAG_N, NT = L::THREADS, PART_ROWS = TBM / 2;
    const Frag<L> f;
    const bool split = gridDim.z > 1;
    float* du_part = split ? work + (size_t)blockIdx.z * n_tokens * R : nullptr;
    if (dU)
        for_each_scaled<L>(acc, C, sample_of, module_of, col_scale, n_tokens, R, n_modules, m0, n0,
                           [&](size_t at, float h, float d) {
                               if (split)
                                   du_part[at] = h * d;
                               else
                                   dU[at] = lc::from_f32<T>(h * d);
                           });
    if (!dC) return;  // uniform across the block: no barrier below is skipped by only some threads

    // A segment is a maximal run of the tile's columns that belong to one module.
    const int tid = threadIdx.x;
    const int n_cols = min(TBN, R - n0);
    float(*part)[TBN + 1] = reinterpret_cast<float(*)[TBN + 1]>(scratch);
    // The tile's module ids (tile_module[n], n < n_cols) and token samples (tile_sample[m],
    // m0 + m < n_tokens), staged once; the mainloop's last barrier has ended every read of the
    // stages.
    int* tile_module = reinterpret_cast<int*>(&part[PART_ROWS][0]);
    int* tile_sample = tile_module + TBN;
    int* seg_first = tile_sample + TBM;  // segment s: columns [seg_first[s], seg_end[s])
    int* seg_end = seg_first + TBN;
    int* n_segs_at = seg_end + TBN;
    for (int n = tid; n < n_cols; n += NT) tile_module[n] = module_of[n0 + n];
    for (int m = tid; m < TBM && m0 + m < n_tokens; m += NT) tile_sample[m] = sample_of[m0 + m];
    __syncthreads();
    auto is_segment_start = [&](int n) { return n == 0 || tile_module[n] != tile_module[n - 1]; };
    // The segment list, in column order: the thread of each start counts the starts before it
    // and finds its end; the last segment's thread writes the count (n_cols ≤ TBN ≤ NT: a thread
    // per column). The first barrier of the half loop publishes them.
    if (tid < n_cols && is_segment_start(tid)) {
        int s = 0;
        for (int c = 1; c <= tid; ++c) s += is_segment_start(c) ? 1 : 0;
        int end = tid + 1;
        while (end < n_cols && !is_segment_start(end)) ++end;
        seg_first[s] = tid;
        seg_end[s] = end;
        if (end == n_cols) *n_segs_at = s + 1;
    }
    for (int half = 0; half < TBM / PART_ROWS; ++half) {
        const int row0 = m0 + half * PART_ROWS;
        // part[m][n] = s_j H[t, j] U[t, j] for the half's rows (0 outside the problem), written
        // by the warps that hold them.
        if (f.wm0 / PART_ROWS == half) {
            LC_UNROLL
            for (int i = 0; i < FM; ++i)
                LC_UNROLL
                for (int j = 0; j < FN; ++j)
                    LC_UNROLL
                    for (int v = 0; v < 4; ++v) {
                        const int m = f.row(i, v) - half * PART_ROWS, n = f.col(j, v);
                        const int t = row0 + m, col = n0 + n;
                        part[m][n] = (t < n_tokens && col < R)
                                         ? acc[i][j][v] * lc::to_f32(U[(size_t)t * R + col]) * col_scale[col]
                                         : 0.0f;
                    }
        }
        __syncthreads();
        // Stage 1: one thread per (row, segment) sums the segment into part[m][first], columns
        // in order, for the half's rows that hold tokens (stage 2 reads no other). Only segment
        // starts are written, each by the thread that owns it, and only its own segment is
        // read. Consecutive threads take consecutive rows (distinct banks).
        const int n_segs = *n_segs_at;
        const int rows = min(PART_ROWS, n_tokens - row0);
        for (int e = tid; e < max(rows, 0) * n_segs; e += NT) {
            const int s = e / rows, m = e % rows;
            const int first = seg_first[s], end = seg_end[s];
            float sum = part[m][first];
            for (int c = first + 1; c < end; ++c) sum += part[m][c];
            part[m][first] = sum;
        }
        __syncthreads();
        // Stage 2: one thread per segment walks the half's tokens and adds each run of tokens of
        // one sample with a single atomicAdd.
        if (rows > 0 && tid < n_segs) {
            const int col = seg_first[tid];
            const int module = tile_module[col];
            const int* samples = tile_sample + half * PART_ROWS;
            float run = 0.0f;
            int run_sample = samples[0];
            for (int m = 0; m < rows; ++m) {
                const int sample = samples[m];
                if (sample != run_sample) {
                    atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
                    run = 0.0f;
                    run_sample = sample;
                }
                run += part[m][col];
            }
            atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
        }
        __syncthreads();  // everyone done with part before the next half overwrites it
    }
}

}  // namespace mma_tile
