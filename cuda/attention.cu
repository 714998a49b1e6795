// Multi-head softmax attention with a key padding mask (the CPU model: src/model/layers.rs
// `attention_forward` / `attention_backward`; the f64 references: src/kernels/attention.rs).
//
// Shapes, row-major: Q, K, V, ctx, ∂ctx, ∂Q, ∂K, ∂V (B·T, D) with D = H·dh, head h in columns
// [h·dh, (h+1)·dh), dh ≤ 128; mask (B·T) int32 (non-zero = real token); lse and the workspace
// `dot` (B, H, T) f32. Per batch b and head h (rows i, j are the tokens of sequence b):
//
//     forward    S_ij = (Q_i · K_j) · scale          (scale is an argument: the model's 1/√dh)
//                P_ij = exp(S_ij − lse_i) for real keys j (mask[b·T+j] ≠ 0), exactly 0 for padded
//                lse_i = log Σ_{j real} exp(S_ij)                               (saved, f32)
//                ctx_i = Σ_j P_ij V_j
//     backward   dot_i = Σ_c ∂ctx_ic · ctx_ic                                   (workspace)
//                ∂P_ij = ∂ctx_i · V_j,   ∂S_ij = P_ij (∂P_ij − dot_i)
//                ∂Q_i = scale · Σ_j ∂S_ij K_j,  ∂K_j = scale · Σ_i ∂S_ij Q_i,  ∂V_j = Σ_i P_ij ∂ctx_i
//
// Every query row is computed, padded tokens' rows included (they attend over the real keys, as
// in the model). A sequence with no real key at all has ctx rows 0, lse −∞ (log of an empty
// sum) and ∂Q, ∂K, ∂V rows 0; the model refuses such a batch, the kernels keep a padded batch
// slot harmless. The forward overwrites ctx and lse; the backward overwrites ∂Q, ∂K, ∂V and the
// workspace, recomputing P from Q, K and lse (the T×T scores never reach global memory). Storage
// T is float or __nv_bfloat16; arithmetic is f32 and each output is rounded once. Every sum runs
// in a fixed order (no atomics): the results are the same bits in every run.
//
// Grids: x over query (forward, ∂Q) or key (∂K/∂V) rows, y = head, z = batch.
//
// Variants (src/kernels/attention.rs `Variant`, same order):
//   1. naive   one warp per row: the forward and ∂Q per query row, ∂K/∂V per key row. Lanes own
//              the head's columns lane + 32n (n < 4); each score is a warp_sum butterfly; the
//              forward is an online softmax over the keys one at a time; K, V, Q, ∂ctx are read
//              from global memory. 4 rows per 128-thread block.
//   2. tiled   one 128-thread block per TILE = 16 rows; ROW_THREADS = 8 threads per row, thread c
//              of a row owning the columns c + 8n (n < 16) and the scores of the other side's
//              rows c + 8m (m < 2). The block's own 16 rows (Q and ∂ctx, or K and V) stay in
//              shared memory while 16-row tiles of the other side stream through it; scores of
//              one tile go through a [16][17] shared tile to the row's 8 threads. Forward: online
//              softmax per tile (row max and sum by 8-lane shuffles). ∂Q: one block per query
//              tile over key tiles; ∂K, ∂V: one block per key tile over query tiles. Dynamic
//              shared memory, f32, rows padded to an odd stride (dh | 1): at dh = 128 the ∂K/∂V
//              kernel uses 35,328 bytes.
//   Both variants take `dot` from bwd_dot: one warp per (row, head).
#include "common.cuh"

namespace attention {

constexpr int WARP = 32;
// Largest head_dim. Mirrored by `HEAD_DIM_MAX` in src/kernels/attention.rs.
constexpr int HEAD_DIM_MAX = 128;
// The naive kernels' and bwd_dot's block: 4 warps, one row each. Mirrored by `NAIVE_THREADS`.
constexpr int NAIVE_THREADS = 128;
constexpr int NAIVE_ROWS = NAIVE_THREADS / WARP;
constexpr int LANE_COLS = HEAD_DIM_MAX / WARP;  // columns per lane in the naive kernels
// The tiled kernels' tile: TILE rows, ROW_THREADS threads per row. Mirrored by `TILE` and
// `ROW_THREADS` in src/kernels/attention.rs (which also sizes the dynamic shared memory).
constexpr int TILE = 16;
constexpr int ROW_THREADS = 8;
constexpr int TILED_THREADS = TILE * ROW_THREADS;           // 128
constexpr int THREAD_COLS = HEAD_DIM_MAX / ROW_THREADS;     // 16 columns per thread
constexpr int THREAD_PEERS = TILE / ROW_THREADS;            // 2 scores per thread per tile
constexpr int SCORE_LD = TILE + 1;                          // stride of the score tiles

// Where head h of sequence b lives: element (b·T + i, h·dh + c) is at base + i·D + c.
struct Head {
    size_t base;
    int D;
    __device__ __forceinline__ size_t at(int i, int c) const { return base + (size_t)i * D + c; }
};

__device__ __forceinline__ Head head_of(int seq, int heads, int dh) {
    const int D = heads * dh;
    return Head{(size_t)blockIdx.z * seq * D + (size_t)blockIdx.y * dh, D};
}

// Index of (b, h, i) in lse and dot.
__device__ __forceinline__ size_t stat_index(int seq, int heads, int i) {
    return ((size_t)blockIdx.z * heads + blockIdx.y) * seq + i;
}

__device__ __forceinline__ bool is_real(const int* mask, int seq, int j) {
    return mask[(size_t)blockIdx.z * seq + j] != 0;
}

// ---- variant 1: one warp per row ------------------------------------------------------------

// Row i of a head, lane's columns (0 past dh).
template <typename T>
__device__ __forceinline__ void load_lane_row(float (&r)[LANE_COLS], const T* __restrict__ x, const Head& hd, int i,
                                              int dh) {
    const int lane = threadIdx.x % WARP;
    for (int n = 0; n < LANE_COLS; ++n) {
        const int c = lane + WARP * n;
        r[n] = c < dh ? lc::to_f32(x[hd.at(i, c)]) : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void store_lane_row(const float (&r)[LANE_COLS], float factor, T* __restrict__ x,
                                               const Head& hd, int i, int dh) {
    const int lane = threadIdx.x % WARP;
    for (int n = 0; n < LANE_COLS; ++n) {
        const int c = lane + WARP * n;
        if (c < dh) x[hd.at(i, c)] = lc::from_f32<T>(r[n] * factor);
    }
}

// a · b over the head's columns, the same bits in every lane. All 32 lanes must call it.
__device__ __forceinline__ float warp_dot(const float (&a)[LANE_COLS], const float (&b)[LANE_COLS]) {
    float part = 0.0f;
    for (int n = 0; n < LANE_COLS; ++n) part += a[n] * b[n];
    return lc::warp_sum(part);
}

// Grid (ceil(T / 4), H, B), 128 threads: warp w of block x takes query row x·4 + w. A warp past
// the end returns as a whole (no block barrier in these kernels), so every shuffle has 32 lanes.
template <typename T>
__device__ __forceinline__ void fwd_naive(const T* q, const T* k, const T* v, const int* mask, T* ctx, float* lse,
                                          int seq, int heads, int dh, float scale) {
    const int i = blockIdx.x * NAIVE_ROWS + threadIdx.x / WARP;
    if (i >= seq) return;
    const Head hd = head_of(seq, heads, dh);
    float qi[LANE_COLS], acc[LANE_COLS], kj[LANE_COLS], vj[LANE_COLS];
    load_lane_row(qi, q, hd, i, dh);
    for (int n = 0; n < LANE_COLS; ++n) acc[n] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // running max and Σ exp(S − m) over the real keys so far
    for (int j = 0; j < seq; ++j) {
        if (!is_real(mask, seq, j)) continue;  // the same j for every lane: uniform
        load_lane_row(kj, k, hd, j, dh);
        load_lane_row(vj, v, hd, j, dh);
        const float s = warp_dot(qi, kj) * scale;
        const float m_new = fmaxf(m, s);
        const float alpha = expf(m - m_new);  // 0 at the first real key (m = −∞)
        const float p = expf(s - m_new);
        l = l * alpha + p;
        for (int n = 0; n < LANE_COLS; ++n) acc[n] = acc[n] * alpha + p * vj[n];
        m = m_new;
    }
    store_lane_row(acc, l > 0.0f ? 1.0f / l : 0.0f, ctx, hd, i, dh);
    if (threadIdx.x % WARP == 0) lse[stat_index(seq, heads, i)] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// ∂Q, one warp per query row. Grid and block as fwd_naive.
template <typename T>
__device__ __forceinline__ void dq_naive(const T* q, const T* k, const T* v, const int* mask, const float* lse,
                                         const float* dot, const T* dctx, T* dq, int seq, int heads, int dh,
                                         float scale) {
    const int i = blockIdx.x * NAIVE_ROWS + threadIdx.x / WARP;
    if (i >= seq) return;
    const Head hd = head_of(seq, heads, dh);
    float qi[LANE_COLS], gi[LANE_COLS], acc[LANE_COLS], kj[LANE_COLS], vj[LANE_COLS];
    load_lane_row(qi, q, hd, i, dh);
    load_lane_row(gi, dctx, hd, i, dh);
    for (int n = 0; n < LANE_COLS; ++n) acc[n] = 0.0f;
    const float lse_i = lse[stat_index(seq, heads, i)], dot_i = dot[stat_index(seq, heads, i)];
    for (int j = 0; j < seq; ++j) {
        if (!is_real(mask, seq, j)) continue;
        load_lane_row(kj, k, hd, j, dh);
        load_lane_row(vj, v, hd, j, dh);
        const float p = expf(warp_dot(qi, kj) * scale - lse_i);
        const float ds = p * (warp_dot(gi, vj) - dot_i);
        for (int n = 0; n < LANE_COLS; ++n) acc[n] += ds * kj[n];
    }
    store_lane_row(acc, scale, dq, hd, i, dh);
}

// ∂K and ∂V, one warp per key row j over every query row. Grid (ceil(T / 4), H, B), 128 threads.
template <typename T>
__device__ __forceinline__ void dkv_naive(const T* q, const T* k, const T* v, const int* mask, const float* lse,
                                          const float* dot, const T* dctx, T* dk, T* dv, int seq, int heads, int dh,
                                          float scale) {
    const int j = blockIdx.x * NAIVE_ROWS + threadIdx.x / WARP;
    if (j >= seq) return;
    const Head hd = head_of(seq, heads, dh);
    float kj[LANE_COLS], vj[LANE_COLS], acc_k[LANE_COLS], acc_v[LANE_COLS], qi[LANE_COLS], gi[LANE_COLS];
    load_lane_row(kj, k, hd, j, dh);
    load_lane_row(vj, v, hd, j, dh);
    for (int n = 0; n < LANE_COLS; ++n) acc_k[n] = acc_v[n] = 0.0f;
    if (is_real(mask, seq, j)) {  // a padded key has P = 0 in every row: ∂K_j = ∂V_j = 0
        for (int i = 0; i < seq; ++i) {
            load_lane_row(qi, q, hd, i, dh);
            load_lane_row(gi, dctx, hd, i, dh);
            const size_t at = stat_index(seq, heads, i);
            const float p = expf(warp_dot(qi, kj) * scale - lse[at]);
            const float ds = p * (warp_dot(gi, vj) - dot[at]);
            for (int n = 0; n < LANE_COLS; ++n) {
                acc_k[n] += ds * qi[n];
                acc_v[n] += p * gi[n];
            }
        }
    }
    store_lane_row(acc_k, scale, dk, hd, j, dh);
    store_lane_row(acc_v, 1.0f, dv, hd, j, dh);
}

// dot_i = ∂ctx_i · ctx_i, one warp per (row, head). Grid (ceil(B·T / 4), H), 128 threads.
template <typename T>
__device__ __forceinline__ void bwd_dot(const T* dctx, const T* ctx, float* dot, int rows, int seq, int heads,
                                        int dh) {
    const int row = blockIdx.x * NAIVE_ROWS + threadIdx.x / WARP;
    if (row >= rows) return;
    const int lane = threadIdx.x % WARP, D = heads * dh;
    const size_t base = (size_t)row * D + (size_t)blockIdx.y * dh;
    float part = 0.0f;
    for (int c = lane; c < dh; c += WARP) part += lc::to_f32(dctx[base + c]) * lc::to_f32(ctx[base + c]);
    const float total = lc::warp_sum(part);
    const int b = row / seq, i = row % seq;
    if (lane == 0) dot[((size_t)b * heads + blockIdx.y) * seq + i] = total;
}

// ---- variant 2: tiles in shared memory --------------------------------------------------------

// The row-th ROW_THREADS-lane group of a warp reduces over its lanes (xor butterflies inside the
// group); every lane of the group gets the same bits. All 32 lanes must call it.
__device__ __forceinline__ float group_sum(float x) {
    for (int offset = ROW_THREADS / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ __forceinline__ float group_max(float x) {
    for (int offset = ROW_THREADS / 2; offset > 0; offset >>= 1)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// tile[r][c] = x(row0 + r, c) for r < TILE, c < dh (stride ld), 0 for rows past the sequence.
// Consecutive threads take consecutive columns (coalesced).
template <typename T>
__device__ __forceinline__ void load_tile(float* tile, int ld, const T* __restrict__ x, const Head& hd, int row0,
                                          int seq, int dh) {
    for (int idx = threadIdx.x; idx < TILE * dh; idx += TILED_THREADS) {
        const int r = idx / dh, c = idx % dh;
        tile[r * ld + c] = row0 + r < seq ? lc::to_f32(x[hd.at(row0 + r, c)]) : 0.0f;
    }
}

// Σ_c a[c]·b[c] over a head row in shared memory.
__device__ __forceinline__ float row_dot(const float* a, const float* b, int dh) {
    float s = 0.0f;
    for (int c = 0; c < dh; ++c) s += a[c] * b[c];
    return s;
}

template <typename T>
__device__ __forceinline__ void store_thread_row(const float (&r)[THREAD_COLS], float factor, T* __restrict__ x,
                                                 const Head& hd, int i, int dh) {
    const int c0 = threadIdx.x % ROW_THREADS;
LC_UNROLL
    for (int n = 0; n < THREAD_COLS; ++n) {
        const int c = c0 + ROW_THREADS * n;
        if (c < dh) x[hd.at(i, c)] = lc::from_f32<T>(r[n] * factor);
    }
}

// Grid (ceil(T / TILE), H, B), 128 threads; dynamic shared memory (3·TILE·ld + TILE·SCORE_LD +
// TILE) floats, ld = dh | 1. Thread (r, c) = (tid / 8, tid % 8) owns query row i0 + r.
template <typename T>
__device__ __forceinline__ void fwd_tiled(const T* q, const T* k, const T* v, const int* mask, T* ctx, float* lse,
                                          int seq, int heads, int dh, float scale) {
    EXTERN_SHARED(float, smem);
    const int ld = dh | 1;  // odd stride: rows of a warp's reads fall in different banks
    float* q_s = smem;                  // [TILE][ld]  this block's query rows
    float* k_s = q_s + TILE * ld;       // [TILE][ld]  the current key tile
    float* v_s = k_s + TILE * ld;       // [TILE][ld]
    float* p_s = v_s + TILE * ld;       // [TILE][SCORE_LD]  p_s[r][jj] = exp(S − m_new)
    float* real_s = p_s + TILE * SCORE_LD;  // [TILE]  1 for a real key, 0 for padding or past T
    const Head hd = head_of(seq, heads, dh);
    const int r = threadIdx.x / ROW_THREADS, c = threadIdx.x % ROW_THREADS;
    const int i0 = blockIdx.x * TILE;
    load_tile(q_s, ld, q, hd, i0, seq, dh);
    float o[THREAD_COLS];
LC_UNROLL
    for (int n = 0; n < THREAD_COLS; ++n) o[n] = 0.0f;
    float m = -INFINITY, l = 0.0f;  // running max and Σ exp(S − m) of row r over the real keys
    for (int j0 = 0; j0 < seq; j0 += TILE) {
        load_tile(k_s, ld, k, hd, j0, seq, dh);
        load_tile(v_s, ld, v, hd, j0, seq, dh);
        if (threadIdx.x < TILE)
            real_s[threadIdx.x] = j0 + (int)threadIdx.x < seq && is_real(mask, seq, j0 + threadIdx.x) ? 1.0f : 0.0f;
        __syncthreads();  // the key tile is complete before anyone reads it
        float s[THREAD_PEERS];
        float tile_max = -INFINITY;
        for (int t = 0; t < THREAD_PEERS; ++t) {
            const int jj = c + ROW_THREADS * t;
            s[t] = real_s[jj] != 0.0f ? row_dot(q_s + r * ld, k_s + jj * ld, dh) * scale : -INFINITY;
            tile_max = fmaxf(tile_max, s[t]);
        }
        const float m_new = fmaxf(m, group_max(tile_max));
        // m_new = −∞: no real key yet, o and l are still 0 and stay so.
        const float alpha = m_new == -INFINITY ? 1.0f : expf(m - m_new);
        float p_sum = 0.0f;
        for (int t = 0; t < THREAD_PEERS; ++t) {
            const int jj = c + ROW_THREADS * t;
            const float p = real_s[jj] != 0.0f ? expf(s[t] - m_new) : 0.0f;
            p_s[r * SCORE_LD + jj] = p;
            p_sum += p;
        }
        l = l * alpha + group_sum(p_sum);
        __syncwarp();  // row r's probabilities, written by its 8 lanes (one warp), are complete
        // Fully unrolled with a guard, not a `break`: o stays in registers (a break at a
        // run-time bound makes ptxas keep the array in local memory).
LC_UNROLL
        for (int n = 0; n < THREAD_COLS; ++n) {
            const int col = c + ROW_THREADS * n;
            if (col < dh) {
                float acc = o[n] * alpha;
                for (int jj = 0; jj < TILE; ++jj) acc += p_s[r * SCORE_LD + jj] * v_s[jj * ld + col];
                o[n] = acc;
            }
        }
        m = m_new;
        __syncthreads();  // everyone is done with k_s, v_s, p_s before the next tile overwrites them
    }
    const int i = i0 + r;
    if (i < seq) {
        store_thread_row(o, l > 0.0f ? 1.0f / l : 0.0f, ctx, hd, i, dh);
        if (c == 0) lse[stat_index(seq, heads, i)] = l > 0.0f ? m + logf(l) : -INFINITY;
    }
}

// ∂Q. Grid (ceil(T / TILE), H, B), 128 threads; dynamic shared memory (4·TILE·ld + TILE·SCORE_LD
// + TILE) floats. Thread (r, c) owns query row i0 + r; key tiles stream through shared memory.
template <typename T>
__device__ __forceinline__ void dq_tiled(const T* q, const T* k, const T* v, const int* mask, const float* lse,
                                         const float* dot, const T* dctx, T* dq, int seq, int heads, int dh,
                                         float scale) {
    EXTERN_SHARED(float, smem);
    const int ld = dh | 1;
    float* q_s = smem;                  // [TILE][ld]  this block's query rows
    float* g_s = q_s + TILE * ld;       // [TILE][ld]  their ∂ctx
    float* k_s = g_s + TILE * ld;       // [TILE][ld]  the current key tile
    float* v_s = k_s + TILE * ld;       // [TILE][ld]
    float* ds_s = v_s + TILE * ld;      // [TILE][SCORE_LD]  ∂S of (query r, key jj)
    float* real_s = ds_s + TILE * SCORE_LD;  // [TILE]
    const Head hd = head_of(seq, heads, dh);
    const int r = threadIdx.x / ROW_THREADS, c = threadIdx.x % ROW_THREADS;
    const int i0 = blockIdx.x * TILE, i = i0 + r;
    load_tile(q_s, ld, q, hd, i0, seq, dh);
    load_tile(g_s, ld, dctx, hd, i0, seq, dh);
    // Rows past the sequence compute on zero rows and are never stored.
    const float lse_i = i < seq ? lse[stat_index(seq, heads, i)] : 0.0f;
    const float dot_i = i < seq ? dot[stat_index(seq, heads, i)] : 0.0f;
    float acc[THREAD_COLS];
LC_UNROLL
    for (int n = 0; n < THREAD_COLS; ++n) acc[n] = 0.0f;
    for (int j0 = 0; j0 < seq; j0 += TILE) {
        load_tile(k_s, ld, k, hd, j0, seq, dh);
        load_tile(v_s, ld, v, hd, j0, seq, dh);
        if (threadIdx.x < TILE)
            real_s[threadIdx.x] = j0 + (int)threadIdx.x < seq && is_real(mask, seq, j0 + threadIdx.x) ? 1.0f : 0.0f;
        __syncthreads();  // tiles complete
        for (int t = 0; t < THREAD_PEERS; ++t) {
            const int jj = c + ROW_THREADS * t;
            float ds = 0.0f;
            if (real_s[jj] != 0.0f) {
                const float p = expf(row_dot(q_s + r * ld, k_s + jj * ld, dh) * scale - lse_i);
                ds = p * (row_dot(g_s + r * ld, v_s + jj * ld, dh) - dot_i);
            }
            ds_s[r * SCORE_LD + jj] = ds;
        }
        __syncwarp();  // row r's ∂S, written by its 8 lanes (one warp), is complete
LC_UNROLL
        for (int n = 0; n < THREAD_COLS; ++n) {
            const int col = c + ROW_THREADS * n;
            if (col < dh) {
                float sum = acc[n];
                for (int jj = 0; jj < TILE; ++jj) sum += ds_s[r * SCORE_LD + jj] * k_s[jj * ld + col];
                acc[n] = sum;
            }
        }
        __syncthreads();  // done with k_s, v_s, ds_s before the next tile
    }
    if (i < seq) store_thread_row(acc, scale, dq, hd, i, dh);
}

// ∂K, ∂V. Grid (ceil(T / TILE), H, B), 128 threads; dynamic shared memory (4·TILE·ld +
// 2·TILE·SCORE_LD + 2·TILE) floats. Thread (r, c) owns key row j0 + r; query tiles stream through
// shared memory with their lse and dot.
template <typename T>
__device__ __forceinline__ void dkv_tiled(const T* q, const T* k, const T* v, const int* mask, const float* lse,
                                          const float* dot, const T* dctx, T* dk, T* dv, int seq, int heads, int dh,
                                          float scale) {
    EXTERN_SHARED(float, smem);
    const int ld = dh | 1;
    float* k_s = smem;                  // [TILE][ld]  this block's key rows
    float* v_s = k_s + TILE * ld;       // [TILE][ld]
    float* q_s = v_s + TILE * ld;       // [TILE][ld]  the current query tile
    float* g_s = q_s + TILE * ld;       // [TILE][ld]  its ∂ctx
    float* p_s = g_s + TILE * ld;       // [TILE][SCORE_LD]  P of (key r, query ii)
    float* ds_s = p_s + TILE * SCORE_LD;    // [TILE][SCORE_LD]  ∂S of (key r, query ii)
    float* lse_s = ds_s + TILE * SCORE_LD;  // [TILE]
    float* dot_s = lse_s + TILE;            // [TILE]
    const Head hd = head_of(seq, heads, dh);
    const int r = threadIdx.x / ROW_THREADS, c = threadIdx.x % ROW_THREADS;
    const int j = blockIdx.x * TILE + r;
    load_tile(k_s, ld, k, hd, blockIdx.x * TILE, seq, dh);
    load_tile(v_s, ld, v, hd, blockIdx.x * TILE, seq, dh);
    // A padded key (or one past the sequence) has P = 0 in every row: ∂K_j = ∂V_j = 0.
    const bool real_j = j < seq && is_real(mask, seq, j);
    float acc_k[THREAD_COLS], acc_v[THREAD_COLS];
LC_UNROLL
    for (int n = 0; n < THREAD_COLS; ++n) acc_k[n] = acc_v[n] = 0.0f;
    for (int i0 = 0; i0 < seq; i0 += TILE) {
        load_tile(q_s, ld, q, hd, i0, seq, dh);
        load_tile(g_s, ld, dctx, hd, i0, seq, dh);
        if (threadIdx.x < TILE) {
            const int i = i0 + threadIdx.x;
            lse_s[threadIdx.x] = i < seq ? lse[stat_index(seq, heads, i)] : 0.0f;
            dot_s[threadIdx.x] = i < seq ? dot[stat_index(seq, heads, i)] : 0.0f;
        }
        __syncthreads();  // the query tile is complete
        for (int t = 0; t < THREAD_PEERS; ++t) {
            const int ii = c + ROW_THREADS * t;
            float p = 0.0f, ds = 0.0f;
            if (real_j && i0 + ii < seq) {
                p = expf(row_dot(q_s + ii * ld, k_s + r * ld, dh) * scale - lse_s[ii]);
                ds = p * (row_dot(g_s + ii * ld, v_s + r * ld, dh) - dot_s[ii]);
            }
            p_s[r * SCORE_LD + ii] = p;
            ds_s[r * SCORE_LD + ii] = ds;
        }
        __syncwarp();  // key row r's P and ∂S, written by its 8 lanes (one warp), are complete
        // Query rows outer, columns inner (unrolled, guarded): both accumulators stay in
        // registers; each element still adds its 16 terms in ii order.
        for (int ii = 0; ii < TILE; ++ii) {
            const float ds = ds_s[r * SCORE_LD + ii], p = p_s[r * SCORE_LD + ii];
LC_UNROLL
            for (int n = 0; n < THREAD_COLS; ++n) {
                const int col = c + ROW_THREADS * n;
                if (col < dh) {
                    acc_k[n] += ds * q_s[ii * ld + col];
                    acc_v[n] += p * g_s[ii * ld + col];
                }
            }
        }
        __syncthreads();  // done with the query tile, p_s and ds_s before the next tile
    }
    if (j < seq) {
        store_thread_row(acc_k, scale, dk, hd, j, dh);
        store_thread_row(acc_v, 1.0f, dv, hd, j, dh);
    }
}

}  // namespace attention

// Unmangled entry points: attention_<kernel>_<dtype>.
#define ATTENTION_FWD_ENTRY(variant, suffix, T, threads)                                                           \
    extern "C" __global__ void __launch_bounds__(threads) attention_fwd_##variant##_##suffix(                      \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ mask,  \
        T* __restrict__ ctx, float* __restrict__ lse, int seq, int heads, int dh, float scale) {                  \
        attention::fwd_##variant<T>(q, k, v, mask, ctx, lse, seq, heads, dh, scale);                               \
    }
#define ATTENTION_DQ_ENTRY(variant, suffix, T, threads)                                                            \
    extern "C" __global__ void __launch_bounds__(threads) attention_dq_##variant##_##suffix(                       \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ mask,  \
        const float* __restrict__ lse, const float* __restrict__ dot, const T* __restrict__ dctx,                 \
        T* __restrict__ dq, int seq, int heads, int dh, float scale) {                                            \
        attention::dq_##variant<T>(q, k, v, mask, lse, dot, dctx, dq, seq, heads, dh, scale);                      \
    }
#define ATTENTION_DKV_ENTRY(variant, suffix, T, threads)                                                           \
    extern "C" __global__ void __launch_bounds__(threads) attention_dkv_##variant##_##suffix(                      \
        const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const int* __restrict__ mask,  \
        const float* __restrict__ lse, const float* __restrict__ dot, const T* __restrict__ dctx,                 \
        T* __restrict__ dk, T* __restrict__ dv, int seq, int heads, int dh, float scale) {                        \
        attention::dkv_##variant<T>(q, k, v, mask, lse, dot, dctx, dk, dv, seq, heads, dh, scale);                 \
    }
#define ATTENTION_ENTRIES(suffix, T)                                                                               \
    ATTENTION_FWD_ENTRY(naive, suffix, T, 128)                                                                     \
    ATTENTION_FWD_ENTRY(tiled, suffix, T, 128)                                                                     \
    ATTENTION_DQ_ENTRY(naive, suffix, T, 128)                                                                      \
    ATTENTION_DQ_ENTRY(tiled, suffix, T, 128)                                                                      \
    ATTENTION_DKV_ENTRY(naive, suffix, T, 128)                                                                     \
    ATTENTION_DKV_ENTRY(tiled, suffix, T, 128)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dot_##suffix(                                  \
        const T* __restrict__ dctx, const T* __restrict__ ctx, float* __restrict__ dot, int rows, int seq,        \
        int heads, int dh) {                                                                                       \
        attention::bwd_dot<T>(dctx, ctx, dot, rows, seq, heads, dh);                                               \
    }

ATTENTION_ENTRIES(f32, float)
ATTENTION_ENTRIES(bf16, __nv_bfloat16)
