// Composition at small T (T ≤ 16 tokens: decode-like steps and few-shot batches), DESIGN §2,
// product mode, as batched GEMVs that stream A_cat and B_cat once for all T tokens. Variant 4
// (`gemv`) of src/kernels/compose_common.rs `Variant`; for T > 16 the Rust plan runs the fused
// variant instead (cuda/compose_fwd.cu, cuda/compose_bwd.cu).
//
// Forward, with D[σ, j] = C[σ, module_of[j]] · col_scale[j]:
//     u_acc  = X A_catᵀ                (T, R) f32 workspace, zeroed first, split-K atomics; or,
//                                      where splits × T × R is small (T = 1), one slice per
//                                      split, stored without atomics or zeroing: two launches
//                                      instead of three, and the sum in a fixed order
//     U = u_acc, Z = U ∘ D             (T, R) overwritten (rounded once to storage); U the sum
//                                      of the slices, in split order
//     Y     += Z B_catᵀ                (T, d_out) accumulated onto (read, add, round once)
// Backward, given G = ∂L/∂Y:
//     h_acc  = G B_cat                 (T, R) f32 workspace, zeroed first, split-K atomics
//     ∂C[σ, i] += s_i Σ_{t: σ(t)=σ} Σ_{j ∈ block i} H[t, j] U[t, j]   per split (linear in H)
//     ∂U     = h_acc ∘ D               (T, R) overwritten
//     dx_acc = ∂U A_cat                (T, d_in) f32 workspace, zeroed first, split-K atomics
//     ∂X    += dx_acc                  (T, d_in) accumulated onto (rounded once)
// ∂A_cat and ∂B_cat (outer products over T) use the fused variant's tiled kernels.
//
// Shapes, row-major: X (T, d_in), A_cat (R, d_in), B_cat (d_out, R), G (T, d_out), U (T, R);
// C (S, N) f32, sample_of (T), module_of (R) int32, col_scale (R) f32. Storage T is float or
// __nv_bfloat16, accumulation f32.
//
// Two GEMV shapes, 256 threads (8 warps) per block:
//   row GEMV    out[t][row] = Σ_k x[t][k] M[row][k], the reduction along M's contiguous rows
//               (shrink: M = A_cat; expand: M = B_cat). Two lanes per row, each loading every
//               other 16-byte vector of it, so one warp instruction reads 16 rows × 32 bytes
//               (whole sectors); warps split the block's K range. The kernel takes one of three
//               code paths by the token count — TB = 1, ≤ 4 or ≤ 16 tokens — each with TB
//               accumulators and loops of TB tokens, and stages x (TB × 8192/TB f32) in shared
//               memory, so at T = 1 a block's whole K range is one pass with one barrier pair
//               (the first H200 profile: at T = 1 the one path for 16 tokens spent its issue
//               slots on tokens that were not there and its time in passes of 512). Loads are
//               double-buffered: a lane has a batch of 16-byte vectors (8; 4 on the 16-token
//               path) in flight while it multiplies the previous batch, and the first batch is in
//               flight while the block stages x. Each x value is a broadcast read.
//   column GEMV out[t][col] = Σ_k l[t][k] M[k][col], the reduction across M's rows (hidden:
//               M = B_cat, ∂X: M = A_cat). A lane owns 8 consecutive columns (one 16-byte bf16
//               vector, two f32 ones) for a group of 4 tokens; the warp's lanes cover 32/TG
//               column groups × TG token groups (TG = ceil(T / 4) rounded to 1, 2, 4), so a
//               row's columns are read as 128–512 contiguous bytes; warps take every 8th row,
//               each lane loading COL_BATCH rows before the first FMA. l (≤ STAGE_ROWS rows ×
//               16 tokens) is staged in shared memory as float4 per (row, token group).
// Rows that are not 16-byte aligned (odd d_in or R, or a view at an odd offset) are read with
// scalar loads at their ends (row GEMV: head before the first aligned vector, tail after the last
// whole one) or per element (column GEMV), so every shape is exact.
// Split-K: blockIdx.y takes K range [y·chunk, min(K, (y + 1)·chunk)); each block reduces its
// warps in shared memory in a fixed order and adds its partial with one atomicAdd per output
// into the zeroed f32 workspace (the order between blocks is not fixed: sums may differ in the
// last bits between runs) — except the forward's shrink where all splits' partials are small
// (src/kernels/compose_common.rs `GEMV_SLICES_MAX`: T = 1 at d = 4096), which stores each
// split's partial in its own slice for the expand to add in split order (no zeroing launch,
// the same bits every run). The plan sizes the splits from the device's SM count.
#include "common.cuh"

namespace compose_gemv {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int MAX_T = 16;        // GEMV_MAX_T in src/kernels/compose_common.rs
constexpr int ROW_SMEM = 8192;   // row GEMV: x[t][k] staged per pass, TB × (ROW_SMEM / TB) f32 = 32 KB
constexpr int STAGE_ROWS = 256;  // column GEMV: l[k][t] staged per pass, STAGE_ROWS × MAX_T f32 = 16 KB
constexpr int SMEM_FLOATS = ROW_SMEM;  // one buffer: the staged operand, then the reduction
static_assert(SMEM_FLOATS >= STAGE_ROWS * MAX_T, "the column GEMV's stage fits");
constexpr int PAIR = 2;          // lanes per row in the row GEMV
constexpr int ROW_BATCH = 8;     // 16-byte vectors per batch of a lane (row GEMV; 4 on the 16-token path)
constexpr int COL_BATCH = 4;     // rows a lane has in flight (column GEMV)
constexpr int LANE_COLS = 8;     // columns a lane owns (column GEMV)
constexpr int K_ALIGN = 16;      // warp K ranges start on multiples of 16 elements

// ---- 16-byte loads ------------------------------------------------------------------------
// nvcc: one ld.global.nc.v4 per vector. The harness has no vector types; a 16-byte aligned
// struct copy is one 16-byte access to its memory checker.
#ifdef __CUDACC__
using Raw16 = uint4;
__device__ __forceinline__ Raw16 load_raw16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ float bits_to_f32(unsigned u) { return __uint_as_float(u); }
// Four consecutive floats of shared memory (16-byte aligned): one ld.shared.v4.
__device__ __forceinline__ void load_f4(const float* p, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
}
#else
struct alignas(16) Raw16 {
    unsigned x, y, z, w;
};
inline Raw16 load_raw16(const void* p) { return *reinterpret_cast<const Raw16*>(p); }
inline float bits_to_f32(unsigned u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}
inline void load_f4(const float* p, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = p[i];
}
#endif

// The shared buffer's element: 16-byte aligned, so that the float4 reads of load_f4 are aligned
// wherever the compiler places the array.
struct alignas(16) SharedQuad {
    float v[4];
};

// Storage elements per 16-byte vector.
template <typename T>
struct Vec {
    static constexpr int N = 16 / (int)sizeof(T);
};

// The vector's elements as f32 (exact: f32 and bf16 widen by moving bits).
template <typename T>
__device__ __forceinline__ void widen(const Raw16& r, float (&a)[Vec<T>::N]);
template <>
__device__ __forceinline__ void widen<float>(const Raw16& r, float (&a)[4]) {
    a[0] = bits_to_f32(r.x), a[1] = bits_to_f32(r.y), a[2] = bits_to_f32(r.z), a[3] = bits_to_f32(r.w);
}
template <>
__device__ __forceinline__ void widen<__nv_bfloat16>(const Raw16& r, float (&a)[8]) {
    const unsigned w[4] = {r.x, r.y, r.z, r.w};
    LC_UNROLL
    for (int i = 0; i < 4; ++i) {
        a[2 * i] = bits_to_f32(w[i] << 16);  // element 2i is the low half (little-endian)
        a[2 * i + 1] = bits_to_f32(w[i] & 0xffff0000u);
    }
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
    return reinterpret_cast<unsigned long long>(p) % 16 == 0;
}

// ---- row GEMV -------------------------------------------------------------------------------

// The row GEMV's code path for up to TB tokens: x staged as xs[t · STAGE + k - pass start].
template <int TB>
struct RowPath {
    static_assert(TB >= 1 && TB <= MAX_T && ROW_SMEM % TB == 0, "a token bound of 1 to 16");
    static constexpr int STAGE = ROW_SMEM / TB;  // 8192, 2048 or 512 elements of K per pass
    // Vectors per batch: two batches are in registers; the 16-token path has 16 accumulators
    // and ~160 instructions of FMA work per vector to hide a batch's latency behind.
    static constexpr int BATCH = TB == MAX_T ? ROW_BATCH / 2 : ROW_BATCH;
    static_assert(STAGE % K_ALIGN == 0, "passes start on whole vectors");
    // Token t of a path runs when t < n_tokens (always, for t = 0 and for the one-token path).
    static __device__ __forceinline__ bool runs(int t, int n_tokens) { return TB == 1 || t == 0 || t < n_tokens; }
};

// acc[t] += x[t][k] · a for the staged x, t < n_tokens.
template <int TB>
__device__ __forceinline__ void fma_scalar(float (&acc)[TB], float a, const float* xs, int off, int n_tokens) {
    LC_UNROLL
    for (int t = 0; t < TB; ++t)
        if (RowPath<TB>::runs(t, n_tokens)) acc[t] += a * xs[t * RowPath<TB>::STAGE + off];
}

// acc[t] += Σ_c x[t][off + c] · a[c] over one vector's V elements.
template <int TB, int V>
__device__ __forceinline__ void fma_vector(float (&acc)[TB], const float (&a)[V], const float* xs, int off,
                                           int n_tokens) {
    const bool x_aligned = (off & 3) == 0;  // always, unless the row is not 16-byte aligned
    LC_UNROLL
    for (int t = 0; t < TB; ++t) {
        if (!RowPath<TB>::runs(t, n_tokens)) continue;
        const float* xr = xs + t * RowPath<TB>::STAGE + off;
        float x[V];
        if (x_aligned) {
            LC_UNROLL
            for (int c = 0; c < V; c += 4) load_f4(xr + c, x + c);
        } else {
            LC_UNROLL
            for (int c = 0; c < V; ++c) x[c] = xr[c];
        }
        float s = acc[t];
        LC_UNROLL
        for (int c = 0; c < V; ++c) s += a[c] * x[c];
        acc[t] = s;
    }
}

// Rows per block of a row GEMV with WR warps along rows (the other WARPS / WR split K).
template <int WR>
struct RowShape {
    static constexpr int WK = WARPS / WR;
    static constexpr int ROWS = 16 * WR;  // 32 lanes / PAIR rows per warp
};

// One batch: buf[i] = vector (b0 + q + PAIR·i) of the lane's row part, where it exists.
template <typename T, int B>
__device__ __forceinline__ void load_batch(Raw16 (&buf)[B], const T* body, int b0, int q, int n_vecs) {
    constexpr int V = Vec<T>::N;
    LC_UNROLL
    for (int i = 0; i < B; ++i) {
        const int v = b0 + q + PAIR * i;
        if (v < n_vecs) buf[i] = load_raw16(body + (size_t)v * V);
    }
}

// acc += the batch loaded from vectors b0 + q + PAIR·i (those that exist).
template <typename T, int TB, int B>
__device__ __forceinline__ void fma_batch(float (&acc)[TB], const Raw16 (&buf)[B], const float* xs, int x_off,
                                          int b0, int q, int n_vecs, int n_tokens) {
    constexpr int V = Vec<T>::N;
    LC_UNROLL
    for (int i = 0; i < B; ++i) {
        const int v = b0 + q + PAIR * i;
        if (v >= n_vecs) continue;
        float a[V];
        widen<T>(buf[i], a);
        fma_vector<TB, V>(acc, a, xs, x_off + v * V, n_tokens);
    }
}

// acc[t] += Σ_{k ∈ [k_begin, k_end) ∩ this lane's share} x(t, k) · M[row][k] for this lane's row
// (row0 + 16·(warp / WK) + lane / 2), M being rows × ld, t < n_tokens ≤ TB. `stage(xs, s0, s1)`
// writes xs[t · STAGE + k - s0] for t < n_tokens, k ∈ [s0, s1). Every thread of the block calls
// it.
template <typename T, int WR, int TB, class Stage>
__device__ __forceinline__ void row_mainloop(float (&acc)[TB], float* xs, const T* __restrict__ M, int ld, int rows,
                                             int row0, int n_tokens, int k_begin, int k_end, const Stage& stage) {
    constexpr int V = Vec<T>::N, WK = RowShape<WR>::WK, B = RowPath<TB>::BATCH, STEP = PAIR * B;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int row = row0 + (warp / WK) * 16 + lane / PAIR, q = lane % PAIR, wk = warp % WK;
    for (int s0 = k_begin; s0 < k_end; s0 += RowPath<TB>::STAGE) {
        const int s1 = min(k_end, s0 + RowPath<TB>::STAGE);
        const int sub = lc::ceil_div(lc::ceil_div(s1 - s0, WK), K_ALIGN) * K_ALIGN;
        const int ka = min(s1, s0 + wk * sub), kz = min(s1, ka + sub);
        // This lane's part of the row: a scalar head up to the first 16-byte boundary, whole
        // vectors (every other one, by q), a scalar tail.
        const int len = row < rows ? kz - ka : 0;
        const T* p = M + (size_t)(row < rows ? row : 0) * ld + ka;
        const int misaligned = (int)(reinterpret_cast<unsigned long long>(p) % 16 / sizeof(T));
        const int head = min(len, (V - misaligned) % V);
        const int n_vecs = (len - head) / V;
        const T* body = p + head;
        const int x_off = ka + head - s0;
        Raw16 buf_a[B], buf_b[B];
        load_batch<T, B>(buf_a, body, 0, q, n_vecs);
        __syncthreads();  // the previous pass is done reading xs
        stage(xs, s0, s1);
        __syncthreads();  // xs complete
        for (int e = q; e < head; e += PAIR) fma_scalar<TB>(acc, lc::to_f32(p[e]), xs, ka + e - s0, n_tokens);
        for (int e = head + n_vecs * V + q; e < len; e += PAIR)
            fma_scalar<TB>(acc, lc::to_f32(p[e]), xs, ka + e - s0, n_tokens);
        // Two batches a trip: the next batch's loads are issued before the current one's FMAs.
        for (int b0 = 0; b0 < n_vecs; b0 += 2 * STEP) {
            if (b0 + STEP < n_vecs) load_batch<T, B>(buf_b, body, b0 + STEP, q, n_vecs);
            fma_batch<T, TB, B>(acc, buf_a, xs, x_off, b0, q, n_vecs, n_tokens);
            if (b0 + 2 * STEP < n_vecs) load_batch<T, B>(buf_a, body, b0 + 2 * STEP, q, n_vecs);
            if (b0 + STEP < n_vecs) fma_batch<T, TB, B>(acc, buf_b, xs, x_off, b0 + STEP, q, n_vecs, n_tokens);
        }
    }
}

// Sums the block's partials of each (t, row) in a fixed order and hands each sum to
// finish(t, row_in_block, sum), one thread per (t, row). Reuses xs; every thread calls it.
template <int WR, int TB, class Finish>
__device__ __forceinline__ void row_epilogue(const float (&acc)[TB], float* xs, int n_tokens, const Finish& finish) {
    constexpr int WK = RowShape<WR>::WK, ROWS = RowShape<WR>::ROWS;
    static_assert(WK * PAIR * TB * ROWS <= SMEM_FLOATS, "the partials fit the buffer");
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int r = (warp / WK) * 16 + lane / PAIR, part = (warp % WK) * PAIR + lane % PAIR;
    float* red = xs;  // red[(part · TB + t) · ROWS + r]
    __syncthreads();  // every lane is done reading xs
    LC_UNROLL
    for (int t = 0; t < TB; ++t)
        if (RowPath<TB>::runs(t, n_tokens)) red[(part * TB + t) * ROWS + r] = acc[t];
    __syncthreads();
    for (int e = threadIdx.x; e < n_tokens * ROWS; e += THREADS) {
        const int t = e / ROWS, rr = e % ROWS;
        float s = 0.0f;
        for (int u = 0; u < WK * PAIR; ++u) s += red[(u * TB + t) * ROWS + rr];
        finish(t, rr, s);
    }
}

// ---- column GEMV ----------------------------------------------------------------------------

// Token groups of 4 for T tokens (1, 2 or 4; the lanes of a warp split into TG × 32/TG).
__device__ __forceinline__ int token_groups(int n_tokens) { return n_tokens <= 4 ? 1 : n_tokens <= 8 ? 2 : 4; }

// Columns [col, col + 8) of the row at `rp` as f32 (0 past `cols`): 16-byte vectors when the
// row is aligned and whole, else element by element.
template <typename T>
__device__ __forceinline__ void load_lane_cols(const T* __restrict__ rp, int col, int cols, bool vec,
                                               const Raw16 (&raw)[LANE_COLS / Vec<T>::N], float (&a)[LANE_COLS]) {
    constexpr int V = Vec<T>::N;
    if (vec) {
        LC_UNROLL
        for (int h = 0; h < LANE_COLS / V; ++h) {
            float part[V];
            widen<T>(raw[h], part);
            LC_UNROLL
            for (int c = 0; c < V; ++c) a[h * V + c] = part[c];
        }
    } else {
        LC_UNROLL
        for (int c = 0; c < LANE_COLS; ++c) a[c] = col + c < cols ? lc::to_f32(rp[col + c]) : 0.0f;
    }
}

// One batch of a lane's column-GEMV rows: rows k_first + WARPS·i, i < COL_BATCH, as 16-byte
// vectors where the lane's 8 columns of the row are whole and aligned (vec[i]).
template <typename T>
struct ColBatch {
    Raw16 raw[COL_BATCH][LANE_COLS / Vec<T>::N];
    bool vec[COL_BATCH];
};

template <typename T>
__device__ __forceinline__ void load_col_batch(ColBatch<T>& b, const T* __restrict__ M, int ld, int cols, int col,
                                               int k_first, int s1) {
    constexpr int V = Vec<T>::N, NV = LANE_COLS / V;
    LC_UNROLL
    for (int i = 0; i < COL_BATCH; ++i) {
        const int k = k_first + WARPS * i;
        const T* rp = M + (size_t)k * ld;
        b.vec[i] = k < s1 && col + LANE_COLS <= cols && aligned16(rp + col);
        if (b.vec[i]) {
            LC_UNROLL
            for (int h = 0; h < NV; ++h) b.raw[i][h] = load_raw16(rp + col + h * V);
        }
    }
}

// acc[ti][c] += l(4g + ti, k) · M[k][col + c] over the batch's rows k = kb + WARPS·i < s1.
template <typename T>
__device__ __forceinline__ void fma_col_batch(float (&acc)[4][LANE_COLS], const ColBatch<T>& b,
                                              const T* __restrict__ M, int ld, int cols, int col, int g,
                                              const float* ls, int s0, int kb, int s1) {
    LC_UNROLL
    for (int i = 0; i < COL_BATCH; ++i) {
        const int k = kb + WARPS * i;
        if (k >= s1) continue;
        float a[LANE_COLS];
        load_lane_cols<T>(M + (size_t)k * ld, col, cols, b.vec[i], b.raw[i], a);
        float l[4];
        load_f4(ls + (k - s0) * MAX_T + 4 * g, l);
        LC_UNROLL
        for (int ti = 0; ti < 4; ++ti) {
            LC_UNROLL
            for (int c = 0; c < LANE_COLS; ++c) acc[ti][c] += l[ti] * a[c];
        }
    }
}

// acc[i][c] += Σ_{k ∈ [k_begin, k_end)} l(4g + i, k) · M[k][col + c] for this lane's token
// group g and columns [col, col + 8), M being (K, cols) row-major with leading dimension ld;
// warps take rows k ≡ warp (mod 8). `stage(ls, s0, s1)` writes ls[(k - s0) · MAX_T + t] for
// k ∈ [s0, s1) and t < 4·TG, zero for t ≥ n_tokens. Every thread of the block calls it. For
// bf16 the loads are double-buffered as in the row GEMV: the next batch of rows is in flight
// while the lane multiplies the current one (the first, for both types, while the block stages
// l).
template <typename T, class Stage>
__device__ __forceinline__ void col_mainloop(float (&acc)[4][LANE_COLS], float* ls, const T* __restrict__ M, int ld,
                                             int cols, int col0, int tg, int k_begin, int k_end, const Stage& stage) {
    constexpr int STEP = WARPS * COL_BATCH;
    // Two batches in registers for bf16 (one 16-byte vector a row); f32 (two) would spill.
    constexpr bool DOUBLE_BUFFER = Vec<T>::N == LANE_COLS;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int cv = 32 / tg, g = lane / cv, col = col0 + (lane % cv) * LANE_COLS;
    for (int s0 = k_begin; s0 < k_end; s0 += STAGE_ROWS) {
        const int s1 = min(k_end, s0 + STAGE_ROWS);
        ColBatch<T> batch_a;
        load_col_batch<T>(batch_a, M, ld, cols, col, s0 + warp, s1);
        __syncthreads();  // the previous pass is done reading ls
        stage(ls, s0, s1);
        __syncthreads();  // ls complete
        if (DOUBLE_BUFFER) {
            ColBatch<T> batch_b;
            for (int kb = s0 + warp; kb < s1; kb += 2 * STEP) {
                if (kb + STEP < s1) load_col_batch<T>(batch_b, M, ld, cols, col, kb + STEP, s1);
                fma_col_batch<T>(acc, batch_a, M, ld, cols, col, g, ls, s0, kb, s1);
                if (kb + 2 * STEP < s1) load_col_batch<T>(batch_a, M, ld, cols, col, kb + 2 * STEP, s1);
                if (kb + STEP < s1) fma_col_batch<T>(acc, batch_b, M, ld, cols, col, g, ls, s0, kb + STEP, s1);
            }
        } else {
            for (int kb = s0 + warp; kb < s1; kb += STEP) {
                if (kb != s0 + warp) load_col_batch<T>(batch_a, M, ld, cols, col, kb, s1);
                fma_col_batch<T>(acc, batch_a, M, ld, cols, col, g, ls, s0, kb, s1);
            }
        }
    }
}

// Sums the 8 warps' partials of each (t, column) in a fixed order and hands each sum to
// finish(t, column_in_block, sum), one thread per (t, column). Reuses ls; every thread calls it.
// Afterwards red[t · CT + cc] (warp 0's slice) belongs to the thread that finished (t, cc).
template <class Finish>
__device__ __forceinline__ void col_epilogue(const float (&acc)[4][LANE_COLS], float* red, int n_tokens, int tg,
                                             const Finish& finish) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int cv = 32 / tg, g = lane / cv, cc0 = (lane % cv) * LANE_COLS;
    const int tok = 4 * tg, ct = cv * LANE_COLS;  // red[(warp · tok + t) · ct + cc]: 8 · 8192/8 floats
    __syncthreads();  // every lane is done reading ls
    LC_UNROLL
    for (int ti = 0; ti < 4; ++ti) {
        const int t = 4 * g + ti;
        if (t >= n_tokens) continue;
        LC_UNROLL
        for (int c = 0; c < LANE_COLS; ++c) red[(warp * tok + t) * ct + cc0 + c] = acc[ti][c];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n_tokens * ct; e += THREADS) {
        const int t = e / ct, cc = e % ct;
        float s = 0.0f;
        for (int w = 0; w < WARPS; ++w) s += red[(w * tok + t) * ct + cc];
        finish(t, cc, s);
    }
}

// ---- the kernels ----------------------------------------------------------------------------

// work[0 .. n) = 0, grid-stride over 256-thread blocks (`compose_gemv_zero`: a 1-D grid that
// covers n, one element a thread; the cooperative kernels: their grid).
__device__ __forceinline__ void zero(float* __restrict__ work, long long n) {
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * THREADS)
        work[i] = 0.0f;
}

// u_acc += X A_catᵀ over K split `by` of row tile `bx`, on the TB-token path; or, `slices`, the
// split's partial stored into its own slice u_acc[by] (T × R); smem: the block's buffer.
template <typename T, int TB>
__device__ __forceinline__ void shrink_path(float* smem, const T* __restrict__ X, const T* __restrict__ A_cat,
                                            float* __restrict__ u_acc, int n_tokens, int d_in, int R, int chunk,
                                            bool slices, int bx, int by) {
    constexpr int WR = 2;
    const int row0 = bx * RowShape<WR>::ROWS;
    const int k_begin = by * chunk, k_end = min(d_in, k_begin + chunk);
    auto stage_x = [&](float* xs, int s0, int s1) {
        const int w = s1 - s0;
        for (int e = threadIdx.x; e < n_tokens * w; e += THREADS) {
            const int t = e / w, kk = e % w;
            xs[t * RowPath<TB>::STAGE + kk] = lc::to_f32(X[(size_t)t * d_in + s0 + kk]);
        }
    };
    float acc[TB] = {};
    row_mainloop<T, WR, TB>(acc, smem, A_cat, d_in, R, row0, n_tokens, k_begin, k_end, stage_x);
    float* slice = u_acc + (size_t)by * n_tokens * R;
    row_epilogue<WR, TB>(acc, smem, n_tokens, [&](int t, int r, float s) {
        if (row0 + r >= R) return;
        if (slices)
            slice[(size_t)t * R + row0 + r] = s;
        else
            atomicAdd(&u_acc[(size_t)t * R + row0 + r], s);
    });
}

// u_acc += X A_catᵀ over this block's K split (u_acc zeroed first), or with `slices` != 0 the
// split's partial into slice blockIdx.y of u_acc (splits × T × R, no zeroing, no atomics: the
// expand adds the slices in order). Grid (ceil(R / 32), splits). The token count picks the code
// path (uniform across the grid).
template <typename T>
__device__ __forceinline__ void shrink(const T* __restrict__ X, const T* __restrict__ A_cat, float* __restrict__ u_acc,
                                       int n_tokens, int d_in, int R, int chunk, int slices) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    float* smem = reinterpret_cast<float*>(smem_quads);
    if (n_tokens == 1)
        shrink_path<T, 1>(smem, X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices != 0, blockIdx.x, blockIdx.y);
    else if (n_tokens <= 4)
        shrink_path<T, 4>(smem, X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices != 0, blockIdx.x, blockIdx.y);
    else
        shrink_path<T, MAX_T>(smem, X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices != 0, blockIdx.x, blockIdx.y);
}

// Y += Z B_catᵀ for row tile `bx` of B_cat on the TB-token path (tile 0 also stores U and Z);
// smem: the block's buffer.
template <typename T, int TB>
__device__ __forceinline__ void expand_path(float* smem, const float* __restrict__ u_acc, int slices,
                                            const float* __restrict__ C, const int* __restrict__ sample_of,
                                            const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                            const T* __restrict__ B_cat, T* __restrict__ U, T* __restrict__ Z,
                                            T* __restrict__ Y, int n_tokens, int R, int d_out, int n_modules, int bx) {
    constexpr int WR = 1;
    const int row0 = bx * RowShape<WR>::ROWS;
    const bool store_uz = bx == 0;
    // One thread per column j walks the tokens: the column's module and scale are loaded once
    // (D[σ, j] = C[σ, module_of[j]] · col_scale[j], as lc::diag forms it).
    auto stage_z = [&](float* xs, int s0, int s1) {
        for (int j = s0 + threadIdx.x; j < s1; j += THREADS) {
            const int module = module_of[j];
            const float scale = col_scale[j];
            for (int t = 0; t < n_tokens; ++t) {
                const float u = lc::sum_splits(u_acc, slices, (size_t)n_tokens * R, (size_t)t * R + j);
                const T z = lc::from_f32<T>(u * (C[(size_t)sample_of[t] * n_modules + module] * scale));
                xs[t * RowPath<TB>::STAGE + (j - s0)] = lc::to_f32(z);
                if (store_uz) {
                    if (U) U[(size_t)t * R + j] = lc::from_f32<T>(u);
                    Z[(size_t)t * R + j] = z;
                }
            }
        }
    };
    float acc[TB] = {};
    row_mainloop<T, WR, TB>(acc, smem, B_cat, R, d_out, row0, n_tokens, 0, R, stage_z);
    row_epilogue<WR, TB>(acc, smem, n_tokens, [&](int t, int r, float s) {
        const int o = row0 + r;
        if (o >= d_out) return;
        T* y = Y + (size_t)t * d_out + o;
        *y = lc::from_f32<T>(lc::to_f32(*y) + s);
    });
}

// Y += Z B_catᵀ with Z = U ∘ D formed while staging, U the sum of u_acc's `slices` slices of
// T × R (1: the atomics' zeroed sum); block x = 0 also stores U (when given) and Z. Grid
// (ceil(d_out / 16)); K = R in passes of 8192 / TB, no split. The token count picks the code
// path (uniform across the grid).
template <typename T>
__device__ __forceinline__ void expand(const float* __restrict__ u_acc, int slices, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, const T* __restrict__ B_cat,
                                       T* __restrict__ U, T* __restrict__ Z, T* __restrict__ Y, int n_tokens, int R,
                                       int d_out, int n_modules) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    float* smem = reinterpret_cast<float*>(smem_quads);
    if (n_tokens == 1)
        expand_path<T, 1>(smem, u_acc, slices, C, sample_of, module_of, col_scale, B_cat, U, Z, Y, n_tokens, R,
                              d_out, n_modules, blockIdx.x);
    else if (n_tokens <= 4)
        expand_path<T, 4>(smem, u_acc, slices, C, sample_of, module_of, col_scale, B_cat, U, Z, Y, n_tokens, R,
                              d_out, n_modules, blockIdx.x);
    else
        expand_path<T, MAX_T>(smem, u_acc, slices, C, sample_of, module_of, col_scale, B_cat, U, Z, Y, n_tokens, R,
                              d_out, n_modules, blockIdx.x);
}

// h_acc += G B_cat over this block's split of d_out (when h_acc is given), and the split's part
// of ∂C (when dC is given): Σ over the block's tokens and each module's columns of
// s_i H[t, j] U[t, j], one atomicAdd per (run of tokens of one sample, module segment). Grid
// (ceil(R / (256 / TG)), splits); `hidden_block` does block (bx, by)'s share with the block's
// buffer `smem`.
template <typename T>
__device__ __forceinline__ void hidden_block(float* smem, const T* __restrict__ G, const T* __restrict__ B_cat,
                                             const T* __restrict__ U, const int* __restrict__ sample_of,
                                             const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                             float* __restrict__ h_acc, float* __restrict__ dC, int n_tokens,
                                             int d_out, int R, int n_modules, int chunk, int bx, int by) {
    const int tg = token_groups(n_tokens), ct = 32 / tg * LANE_COLS;
    const int col0 = bx * ct;
    const int k_begin = by * chunk, k_end = min(d_out, k_begin + chunk);
    auto stage_g = [&](float* ls, int s0, int s1) {
        const int tok = 4 * tg;
        for (int e = threadIdx.x; e < tok * (s1 - s0); e += THREADS) {
            const int t = e / (s1 - s0), kk = e % (s1 - s0);  // consecutive threads, consecutive o
            ls[kk * MAX_T + t] = t < n_tokens ? lc::to_f32(G[(size_t)t * d_out + s0 + kk]) : 0.0f;
        }
    };
    float acc[4][LANE_COLS] = {};
    col_mainloop<T>(acc, smem, B_cat, R, R, col0, tg, k_begin, k_end, stage_g);
    float* part = smem;  // part[t · ct + cc] = s_j H[t, j] U[t, j] (0 outside the problem)
    col_epilogue(acc, smem, n_tokens, tg, [&](int t, int cc, float s) {
        const int j = col0 + cc;
        if (h_acc && j < R) atomicAdd(&h_acc[(size_t)t * R + j], s);
        if (dC) part[t * ct + cc] = j < R ? s * lc::to_f32(U[(size_t)t * R + j]) * col_scale[j] : 0.0f;
    });
    if (!dC) return;  // uniform across the block
    __syncthreads();
    // A segment is a maximal run of the block's columns of one module; one thread per segment
    // walks the tokens and adds each run of tokens of one sample with a single atomicAdd.
    const int n_cols = min(ct, R - col0);
    auto is_segment_start = [&](int n) { return n == 0 || module_of[col0 + n] != module_of[col0 + n - 1]; };
    for (int n = threadIdx.x; n < n_cols; n += THREADS) {
        if (!is_segment_start(n)) continue;
        int end = n + 1;
        while (end < n_cols && !is_segment_start(end)) ++end;
        const int module = module_of[col0 + n];
        float run = 0.0f;
        int run_sample = sample_of[0];
        for (int t = 0; t < n_tokens; ++t) {
            const int sample = sample_of[t];
            if (sample != run_sample) {
                atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
                run = 0.0f;
                run_sample = sample;
            }
            for (int c = n; c < end; ++c) run += part[t * ct + c];
        }
        atomicAdd(&dC[(size_t)run_sample * n_modules + module], run);
    }
}

template <typename T>
__device__ __forceinline__ void hidden(const T* __restrict__ G, const T* __restrict__ B_cat, const T* __restrict__ U,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, float* __restrict__ h_acc,
                                       float* __restrict__ dC, int n_tokens, int d_out, int R, int n_modules, int chunk) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    hidden_block<T>(reinterpret_cast<float*>(smem_quads), G, B_cat, U, sample_of, module_of, col_scale, h_acc, dC,
                    n_tokens, d_out, R, n_modules, chunk, blockIdx.x, blockIdx.y);
}

// dx_acc += ∂U A_cat over this block's split of R, with ∂U = h_acc ∘ D (rounded to storage)
// formed while staging; the workspace holds h_acc (T × R) then dx_acc (T × d_in). Grid
// (ceil(d_in / (256 / TG)), splits); `dx_block` does block (bx, by)'s share with the block's
// buffer `smem`.
template <typename T>
__device__ __forceinline__ void dx_block(float* smem, const float* __restrict__ C, const int* __restrict__ sample_of,
                                         const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                         const T* __restrict__ A_cat, float* work, int n_tokens, int R, int d_in,
                                         int n_modules, int chunk, int bx, int by) {
    const float* h_acc = work;
    float* dx_acc = work + (size_t)n_tokens * R;
    const int tg = token_groups(n_tokens), ct = 32 / tg * LANE_COLS;
    const int col0 = bx * ct;
    const int k_begin = by * chunk, k_end = min(R, k_begin + chunk);
    // One thread per row j of the pass (module and scale loaded once), as lc::diag forms D.
    auto stage_du = [&](float* ls, int s0, int s1) {
        const int tok = 4 * tg;
        for (int j = s0 + threadIdx.x; j < s1; j += THREADS) {
            const int module = module_of[j];
            const float scale = col_scale[j];
            for (int t = 0; t < tok; ++t) {
                float du = 0.0f;
                if (t < n_tokens) {
                    const float h = h_acc[(size_t)t * R + j];
                    du = lc::to_f32(lc::from_f32<T>(h * (C[(size_t)sample_of[t] * n_modules + module] * scale)));
                }
                ls[(j - s0) * MAX_T + t] = du;
            }
        }
    };
    float acc[4][LANE_COLS] = {};
    col_mainloop<T>(acc, smem, A_cat, d_in, d_in, col0, tg, k_begin, k_end, stage_du);
    col_epilogue(acc, smem, n_tokens, tg, [&](int t, int cc, float s) {
        const int k = col0 + cc;
        if (k < d_in) atomicAdd(&dx_acc[(size_t)t * d_in + k], s);
    });
}

template <typename T>
__device__ __forceinline__ void dx(const float* __restrict__ C, const int* __restrict__ sample_of,
                                   const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                   const T* __restrict__ A_cat, float* work, int n_tokens, int R, int d_in,
                                   int n_modules, int chunk) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    dx_block<T>(reinterpret_cast<float*>(smem_quads), C, sample_of, module_of, col_scale, A_cat, work, n_tokens, R,
                d_in, n_modules, chunk, blockIdx.x, blockIdx.y);
}

// ∂U = h_acc ∘ D (when dU is given) and ∂X += dx_acc (when dX is given), rounded once; the
// workspace holds h_acc (T × R) then dx_acc (T × d_in); `finish_element`: element i of both.
template <typename T>
__device__ __forceinline__ void finish_element(long long i, const float* __restrict__ work, const float* __restrict__ C,
                                               const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                               const float* __restrict__ col_scale, T* __restrict__ dU,
                                               T* __restrict__ dX, int n_tokens, int R, int d_in, int n_modules) {
    if (dU && i < (long long)n_tokens * R) {
        const int t = (int)(i / R), j = (int)(i % R);
        dU[i] = lc::from_f32<T>(work[i] * lc::diag(C, n_modules, module_of, col_scale, sample_of[t], j));
    }
    if (dX && i < (long long)n_tokens * d_in) {
        const float* dx_acc = work + (size_t)n_tokens * R;
        dX[i] = lc::from_f32<T>(lc::to_f32(dX[i]) + dx_acc[i]);
    }
}

// Grid-stride over the elements of both (`compose_gemv_finish`: a 1-D grid that covers them,
// one a thread; the cooperative backward: its grid).
template <typename T>
__device__ __forceinline__ void finish(const float* __restrict__ work, const float* __restrict__ C,
                                       const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                       const float* __restrict__ col_scale, T* __restrict__ dU, T* __restrict__ dX,
                                       int n_tokens, int R, int d_in, int n_modules) {
    const long long n = (long long)n_tokens * max(dU ? R : 0, dX ? d_in : 0);
    for (long long i = (long long)blockIdx.x * THREADS + threadIdx.x; i < n; i += (long long)gridDim.x * THREADS)
        finish_element<T>(i, work, C, sample_of, module_of, col_scale, dU, dX, n_tokens, R, d_in, n_modules);
}

// ---- one launch for each pass (cooperative: grid barriers between the steps) -----------------
// The same steps as the kernels above, in one cooperative launch whose blocks take the steps'
// blocks in turn (block b does work items b, b + gridDim.x, …; a barrier before each item reuses
// the shared buffer) and meet at a grid barrier where the next step reads what the last wrote —
// where the separate launches paid a dependent launch each (~4.5 µs on the H200, measured). Grid:
// 1-D, at most as many blocks as are co-resident (src/kernels/compose_fwd.rs plans it). Each work
// item computes what the same block of the separate kernels computes, with the same sums in the
// same order (the atomics' order aside, as there).

// One work item each, as a call rather than inlined: the item index is then not a value the
// step's body must keep live beside its own (inlined into the item loops, shrink and expand went
// to 128 registers with 4–8 bytes spilled on sm_80, where the separate kernels read their block
// index from a special register whenever they need it). Same code inside.
template <typename T, int TB>
__device__ LC_NOINLINE void shrink_item(float* smem, const T* __restrict__ X, const T* __restrict__ A_cat,
                                         float* __restrict__ u_acc, int n_tokens, int d_in, int R, int chunk,
                                         bool slices, int bx, int by) {
    shrink_path<T, TB>(smem, X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices, bx, by);
}

template <typename T, int TB>
__device__ LC_NOINLINE void expand_item(float* smem, const float* __restrict__ u_acc, int slices,
                                         const float* __restrict__ C, const int* __restrict__ sample_of,
                                         const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                         const T* __restrict__ B_cat, T* __restrict__ U, T* __restrict__ Z,
                                         T* __restrict__ Y, int n_tokens, int R, int d_out, int n_modules, int bx) {
    expand_path<T, TB>(smem, u_acc, slices, C, sample_of, module_of, col_scale, B_cat, U, Z, Y, n_tokens, R, d_out,
                       n_modules, bx);
}

template <typename T>
__device__ LC_NOINLINE void hidden_item(float* smem, const T* __restrict__ G, const T* __restrict__ B_cat,
                                         const T* __restrict__ U, const int* __restrict__ sample_of,
                                         const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                         float* __restrict__ h_acc, float* __restrict__ dC, int n_tokens, int d_out,
                                         int R, int n_modules, int chunk, int bx, int by) {
    hidden_block<T>(smem, G, B_cat, U, sample_of, module_of, col_scale, h_acc, dC, n_tokens, d_out, R, n_modules,
                    chunk, bx, by);
}

template <typename T>
__device__ LC_NOINLINE void dx_item(float* smem, const float* __restrict__ C, const int* __restrict__ sample_of,
                                     const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                     const T* __restrict__ A_cat, float* work, int n_tokens, int R, int d_in,
                                     int n_modules, int chunk, int bx, int by) {
    dx_block<T>(smem, C, sample_of, module_of, col_scale, A_cat, work, n_tokens, R, d_in, n_modules, chunk, bx, by);
}

// The forward on the TB-token path: [zero u_acc (unless slices) | grid barrier] shrink (row tiles
// × splits items) | grid barrier | expand (expand_tiles items).
template <typename T, int TB>
__device__ __forceinline__ void forward_path(float* smem, const T* __restrict__ X, const T* __restrict__ A_cat,
                                             const T* __restrict__ B_cat, float* __restrict__ u_acc,
                                             const float* __restrict__ C, const int* __restrict__ sample_of,
                                             const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                             T* __restrict__ U, T* __restrict__ Z, T* __restrict__ Y, int n_tokens,
                                             int d_in, int R, int d_out, int n_modules, int shrink_tiles, int splits,
                                             int chunk, int slices, int expand_tiles) {
    if (!slices) {
        zero(u_acc, (long long)n_tokens * R);
        LC_GRID_SYNC();
    }
    for (int item = blockIdx.x; item < shrink_tiles * splits; item += gridDim.x) {
        __syncthreads();  // the previous item is done with smem
        shrink_item<T, TB>(smem, X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices != 0, item % shrink_tiles,
                           item / shrink_tiles);
    }
    LC_GRID_SYNC();
    for (int item = blockIdx.x; item < expand_tiles; item += gridDim.x) {
        __syncthreads();
        expand_item<T, TB>(smem, u_acc, slices ? splits : 1, C, sample_of, module_of, col_scale, B_cat, U, Z, Y,
                           n_tokens, R, d_out, n_modules, item);
    }
}

template <typename T>
__device__ __forceinline__ void forward(const T* __restrict__ X, const T* __restrict__ A_cat,
                                        const T* __restrict__ B_cat, float* __restrict__ u_acc,
                                        const float* __restrict__ C, const int* __restrict__ sample_of,
                                        const int* __restrict__ module_of, const float* __restrict__ col_scale,
                                        T* __restrict__ U, T* __restrict__ Z, T* __restrict__ Y, int n_tokens, int d_in,
                                        int R, int d_out, int n_modules, int shrink_tiles, int splits, int chunk,
                                        int slices, int expand_tiles) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    float* smem = reinterpret_cast<float*>(smem_quads);
    if (n_tokens == 1)
        forward_path<T, 1>(smem, X, A_cat, B_cat, u_acc, C, sample_of, module_of, col_scale, U, Z, Y, n_tokens, d_in, R,
                           d_out, n_modules, shrink_tiles, splits, chunk, slices, expand_tiles);
    else if (n_tokens <= 4)
        forward_path<T, 4>(smem, X, A_cat, B_cat, u_acc, C, sample_of, module_of, col_scale, U, Z, Y, n_tokens, d_in, R,
                           d_out, n_modules, shrink_tiles, splits, chunk, slices, expand_tiles);
    else
        forward_path<T, MAX_T>(smem, X, A_cat, B_cat, u_acc, C, sample_of, module_of, col_scale, U, Z, Y, n_tokens, d_in,
                               R, d_out, n_modules, shrink_tiles, splits, chunk, slices, expand_tiles);
}

// The backward: zero the workspace's first ws_len floats | grid barrier | hidden (h_tiles ×
// h_splits items, h_acc when `du`, ∂C when dC) | grid barrier | [∂X (x_tiles × x_splits items) |
// grid barrier, when dX] | finish (∂U when `du`, ∂X when dX). The flags are uniform across the
// grid, so every block meets every barrier.
template <typename T>
__device__ __forceinline__ void backward(const T* __restrict__ G, const T* __restrict__ B_cat, const T* __restrict__ U,
                                         const T* __restrict__ A_cat, const float* __restrict__ C,
                                         const int* __restrict__ sample_of, const int* __restrict__ module_of,
                                         const float* __restrict__ col_scale, float* __restrict__ work,
                                         float* __restrict__ dC, T* __restrict__ dU, T* __restrict__ dX, int n_tokens,
                                         int d_out, int R, int d_in, int n_modules, int du, int h_tiles, int h_splits,
                                         int h_chunk, int x_tiles, int x_splits, int x_chunk) {
    SHARED(SharedQuad, smem_quads, [SMEM_FLOATS / 4]);
    float* smem = reinterpret_cast<float*>(smem_quads);
    const long long ws = (du ? (long long)n_tokens * R : 0) + (dX ? (long long)n_tokens * d_in : 0);
    if (ws > 0) {
        zero(work, ws);
        LC_GRID_SYNC();
    }
    for (int item = blockIdx.x; item < h_tiles * h_splits; item += gridDim.x) {
        __syncthreads();
        hidden_item<T>(smem, G, B_cat, U, sample_of, module_of, col_scale, du ? work : nullptr, dC, n_tokens, d_out, R,
                       n_modules, h_chunk, item % h_tiles, item / h_tiles);
    }
    if (!du) return;  // ∂C only: nothing reads what the hidden step wrote (uniform)
    LC_GRID_SYNC();
    if (dX) {
        for (int item = blockIdx.x; item < x_tiles * x_splits; item += gridDim.x) {
            __syncthreads();
            dx_item<T>(smem, C, sample_of, module_of, col_scale, A_cat, work, n_tokens, R, d_in, n_modules, x_chunk,
                       item % x_tiles, item / x_tiles);
        }
        LC_GRID_SYNC();
    }
    finish<T>(work, C, sample_of, module_of, col_scale, dU, dX, n_tokens, R, d_in, n_modules);
}

}  // namespace compose_gemv

// Unmangled entry points: compose_gemv_<kernel>_<dtype> (zero is storage-independent).
extern "C" __global__ void __launch_bounds__(256) compose_gemv_zero(float* work, int n) {
    compose_gemv::zero(work, n);
}

#define COMPOSE_GEMV_ENTRIES(suffix, T)                                                                                \
    extern "C" __global__ void __launch_bounds__(256) compose_gemv_shrink_##suffix(                                    \
        const T* X, const T* A_cat, float* u_acc, int n_tokens, int d_in, int R, int chunk, int slices) {              \
        compose_gemv::shrink<T>(X, A_cat, u_acc, n_tokens, d_in, R, chunk, slices);                                    \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_gemv_expand_##suffix(                                    \
        const float* u_acc, int slices, const float* C, const int* sample_of, const int* module_of,                    \
        const float* col_scale, const T* B_cat, T* U, T* Z, T* Y, int n_tokens, int R, int d_out, int n_modules) {     \
        compose_gemv::expand<T>(u_acc, slices, C, sample_of, module_of, col_scale, B_cat, U, Z, Y, n_tokens, R,        \
                                d_out, n_modules);                                                                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_gemv_hidden_##suffix(                                    \
        const T* G, const T* B_cat, const T* U, const int* sample_of, const int* module_of, const float* col_scale,    \
        float* h_acc, float* dC, int n_tokens, int d_out, int R, int n_modules, int chunk) {                           \
        compose_gemv::hidden<T>(G, B_cat, U, sample_of, module_of, col_scale, h_acc, dC, n_tokens, d_out, R,           \
                                n_modules, chunk);                                                                     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_gemv_dx_##suffix(                                        \
        const float* C, const int* sample_of, const int* module_of, const float* col_scale, const T* A_cat,            \
        float* work, int n_tokens, int R, int d_in, int n_modules, int chunk) {                                        \
        compose_gemv::dx<T>(C, sample_of, module_of, col_scale, A_cat, work, n_tokens, R, d_in, n_modules, chunk);     \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2) compose_gemv_forward_##suffix(                                \
        const T* X, const T* A_cat, const T* B_cat, float* u_acc, const float* C, const int* sample_of,                \
        const int* module_of, const float* col_scale, T* U, T* Z, T* Y, int n_tokens, int d_in, int R, int d_out,      \
        int n_modules, int shrink_tiles, int splits, int chunk, int slices, int expand_tiles) {                        \
        compose_gemv::forward<T>(X, A_cat, B_cat, u_acc, C, sample_of, module_of, col_scale, U, Z, Y, n_tokens, d_in,  \
                                 R, d_out, n_modules, shrink_tiles, splits, chunk, slices, expand_tiles);              \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256, 2) compose_gemv_backward_##suffix(                               \
        const T* G, const T* B_cat, const T* U, const T* A_cat, const float* C, const int* sample_of,                  \
        const int* module_of, const float* col_scale, float* work, float* dC, T* dU, T* dX, int n_tokens, int d_out,   \
        int R, int d_in, int n_modules, int du, int h_tiles, int h_splits, int h_chunk, int x_tiles, int x_splits,     \
        int x_chunk) {                                                                                                 \
        compose_gemv::backward<T>(G, B_cat, U, A_cat, C, sample_of, module_of, col_scale, work, dC, dU, dX, n_tokens,  \
                                  d_out, R, d_in, n_modules, du, h_tiles, h_splits, h_chunk, x_tiles, x_splits,        \
                                  x_chunk);                                                                            \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) compose_gemv_finish_##suffix(                                    \
        const float* work, const float* C, const int* sample_of, const int* module_of, const float* col_scale,         \
        T* dU, T* dX, int n_tokens, int R, int d_in, int n_modules) {                                                  \
        compose_gemv::finish<T>(work, C, sample_of, module_of, col_scale, dU, dX, n_tokens, R, d_in, n_modules);       \
    }

COMPOSE_GEMV_ENTRIES(f32, float)
COMPOSE_GEMV_ENTRIES(bf16, __nv_bfloat16)
