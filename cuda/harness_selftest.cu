// Small kernels that exercise the CPU harness itself (src/harness/selftest.rs): warp shuffles
// and votes, atomics, dynamic shared memory, and the errors it must report. They are valid CUDA
// too, so the PTX build checks that the harness subset compiles under nvcc. One block each;
// `in`/`out` hold one element per thread unless noted.
#include "common.cuh"

// out[t] = sum of in over t's warp (xor butterfly); lanes past a partial warp are absent.
extern "C" __global__ void selftest_warp_sum(const float* in, float* out) {
    const int t = threadIdx.x;
    float v = in[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[t] = v;
}

// out[4t..4t+4) = shfl from lane+3 (wrapping), shfl_down by 1, shfl_up by 2, shfl within 8-wide
// segments from segment lane 0.
extern "C" __global__ void selftest_shuffles(const float* in, float* out) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    const float v = in[t];
    out[4 * t + 0] = __shfl_sync(0xffffffffu, v, (lane + 3) % 32);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 1);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 0, 8);
}

// votes[3 w ..] = ballot, any, all of (in[t] > 0) over warp w.
extern "C" __global__ void selftest_votes(const float* in, unsigned* votes) {
    const int t = threadIdx.x;
    const bool positive = in[t] > 0.0f;
    const unsigned ballot = __ballot_sync(0xffffffffu, positive);
    const int any = __any_sync(0xffffffffu, positive);
    const int all = __all_sync(0xffffffffu, positive);
    if (t % 32 == 0) {
        votes[3 * (t / 32) + 0] = ballot;
        votes[3 * (t / 32) + 1] = (unsigned)any;
        votes[3 * (t / 32) + 2] = (unsigned)all;
    }
}

// total[0] += in[t] for every thread; count[0] += 1 for every thread.
extern "C" __global__ void selftest_atomics(const float* in, float* total, int* count) {
    atomicAdd(total, in[threadIdx.x]);
    atomicAdd(count, 1);
}

// out[t] = in[n - 1 - t] through dynamic shared memory; `synchronize` = 0 drops the barrier
// (a planted race the harness must expose).
extern "C" __global__ void selftest_reverse(const float* in, float* out, int synchronize) {
    EXTERN_SHARED(float, staged);
    const int t = threadIdx.x;
    const int n = blockDim.x;
    staged[t] = in[t];
    if (synchronize) __syncthreads();
    out[t] = staged[n - 1 - t];
}

// Threads below `exit_below` return before a __syncthreads the others wait at.
extern "C" __global__ void selftest_barrier_divergence(float* out, int exit_below) {
    if ((int)threadIdx.x < exit_below) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Only lanes below 16 reach a full-warp shuffle.
extern "C" __global__ void selftest_warp_divergence(float* out) {
    const int t = threadIdx.x;
    if (t % 32 < 16) out[t] = __shfl_sync(0xffffffffu, (float)t, 0);
}

// ---- the memory checker (cuda/harness/memcheck.cpp) ------------------------------------------

// Every thread of every block adds 1 to count[0]: with atomicAdd (atomic = 1) or a plain
// read-modify-write (a lost-update race the checker must report).
extern "C" __global__ void selftest_increments(int* count, int atomic) {
    if (atomic)
        atomicAdd(count, 1);
    else
        count[0] += 1;
}

// atomicMax, atomicMin, atomicExch and atomicCAS on one address each: ops[0] = max of the thread
// indices, ops[1] = min, ops[2] = some thread index, ops[3] = the one thread whose CAS from -1
// succeeded (each thread adds its index + 1 to claims[0] when its CAS wins).
extern "C" __global__ void selftest_atomic_ops(int* ops, int* claims) {
    const int t = threadIdx.x;
    atomicMax(&ops[0], t);
    atomicMin(&ops[1], t);
    atomicExch(&ops[2], t);
    if (atomicCAS(&ops[3], -1, t) == -1) atomicAdd(&claims[0], t + 1);
}

// out[t] = in[min(t, n - 1)] for t < n + extra: extra = 1 overruns `out` by one element.
extern "C" __global__ void selftest_copy(const float* in, float* out, int n, int extra) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n + extra) out[t] = in[t < n ? t : n - 1];
}

// Writes through a pointer the kernel receives as const.
extern "C" __global__ void selftest_write_input(const float* in, float* out) {
    out[threadIdx.x] = in[threadIdx.x];
    const_cast<float*>(in)[threadIdx.x] = 0.0f;
}

// Each block writes its own tile out[b·blockDim ..]; with `neighbour` = 1 it also writes the next
// block's tile (a race between blocks: blocks never synchronise).
extern "C" __global__ void selftest_block_tiles(float* out, int neighbour) {
    const int b = blockIdx.x, t = threadIdx.x, n = blockDim.x;
    out[b * n + t] = (float)b;
    if (neighbour && b + 1 < (int)gridDim.x) out[(b + 1) * n + t] = (float)b;
}

// Stages in[t] in a 64-element shared array at index t + past (past = 1 writes one element past
// it for the last thread), then out[t] = tile[t] after a barrier.
extern "C" __global__ void selftest_shared_past_end(const float* in, float* out, int past) {
    SHARED(float, tile, [64]);
    const int t = threadIdx.x;
    tile[t + past] = in[t];
    __syncthreads();
    out[t] = tile[t];
}

// Lane 0 of each warp writes flag[warp]; after __syncwarp (sync = 1) or without (0), lane 1 reads
// it: a warp-synchronous exchange. `cross` = 1 has lane 1 of the *next* warp read it instead, which
// __syncwarp does not order (only __syncthreads would).
extern "C" __global__ void selftest_warp_handoff(float* out, int sync, int cross) {
    SHARED(float, flag, [32]);
    const int t = threadIdx.x, lane = t % 32, warp = t / 32, warps = blockDim.x / 32;
    if (lane == 0) flag[warp] = (float)warp;
    if (sync) __syncwarp();
    const int source = cross ? (warp + warps - 1) % warps : warp;
    if (lane == 1) out[warp] = flag[source];
}

// Partial masks: each half-warp shuffles and votes among its own 16 lanes only.
// out[2t] = value of the next lane in t's half (wrapping), out[2t + 1] = ballot of in > 0 in the half.
extern "C" __global__ void selftest_half_warps(const float* in, float* out) {
    const int t = threadIdx.x, lane = t % 32;
    const unsigned half = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    const int base = lane < 16 ? 0 : 16;
    const float v = in[t];
    out[2 * t] = __shfl_sync(half, v, base + (lane - base + 1) % 16);
    out[2 * t + 1] = (float)__ballot_sync(half, v > 0.0f);
}

// mode 0: lane 5 calls a shuffle whose mask leaves it out; mode 1: lanes 0-15 sync with the full
// mask while lanes 16-31 use their half only (mismatched warp synchronisation).
extern "C" __global__ void selftest_bad_masks(float* out, int mode) {
    const int lane = threadIdx.x % 32;
    float v = (float)lane;
    if (mode == 0) {
        v = __shfl_sync(lane == 5 ? 0x0000ffdfu : 0xffffffffu, v, 0);
    } else {
        v = __shfl_sync(lane < 16 ? 0xffffffffu : 0xffff0000u, v, 0);
    }
    out[threadIdx.x] = v;
}

// Threads below 16 wait at one __syncthreads, the others at another (a divergent barrier).
extern "C" __global__ void selftest_divergent_barriers(float* out) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    out[threadIdx.x] = 1.0f;
}

// out[t] = workspace[t] + 1, the workspace written first only when `fill` = 1.
extern "C" __global__ void selftest_workspace(float* workspace, float* out, int fill) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (fill) workspace[t] = (float)t;
    out[t] = workspace[t] + 1.0f;
}

// Threads below 32 fill their element of a 64-element shared array; after a barrier every
// thread reads its own (threads 32 and up read elements nobody wrote).
extern "C" __global__ void selftest_shared_unwritten(float* out) {
    SHARED(float, tile, [64]);
    const int t = threadIdx.x;
    if (t < 32) tile[t] = (float)t;
    __syncthreads();
    out[t] = tile[t];
}

// ---- tensor cores and asynchronous copies (src/harness/selftest/tensorcore.rs) ----------------

// One warp: d = a·b + c through lc::mma_m16n8k16 with the fragments given per lane:
// a[4 lane + r], b[2 lane + r] (two 16-bit elements per register), c[4 lane + i], d[4 lane + i].
template <typename T>
__device__ __forceinline__ void selftest_mma(const unsigned* a, const unsigned* b, const float* c, float* d) {
    const int lane = threadIdx.x % 32;
    const unsigned a_frag[4] = {a[4 * lane], a[4 * lane + 1], a[4 * lane + 2], a[4 * lane + 3]};
    const unsigned b_frag[2] = {b[2 * lane], b[2 * lane + 1]};
    const float c_frag[4] = {c[4 * lane], c[4 * lane + 1], c[4 * lane + 2], c[4 * lane + 3]};
    float d_frag[4];
    lc::mma_m16n8k16<T>(d_frag, a_frag, b_frag, c_frag);
    for (int i = 0; i < 4; ++i) d[4 * lane + i] = d_frag[i];
}
extern "C" __global__ void selftest_mma_bf16(const unsigned* a, const unsigned* b, const float* c, float* d) {
    selftest_mma<__nv_bfloat16>(a, b, c, d);
}
extern "C" __global__ void selftest_mma_f16(const unsigned* a, const unsigned* b, const float* c, float* d) {
    selftest_mma<__half>(a, b, c, d);
}

// Block of 64 threads. Warp 1 stages `rows` (32 rows of 8 b16, row-major) in shared memory; after
// a barrier (none when mode = 1) warp 0 runs ldmatrix .x{count}{.trans}: lane l passes the
// address of staged row source_row[l] (plus 2 bytes when mode = 2: misaligned), and
// out[4 l + i] = its register i (i < count).
template <int COUNT, bool TRANS>
__device__ __forceinline__ void selftest_ldmatrix_body(const unsigned short* staged, const int* source_row,
                                                       unsigned* out, int mode) {
    const int lane = threadIdx.x % 32;
    unsigned r[COUNT];
    const char* row = reinterpret_cast<const char*>(staged + 8 * source_row[lane]) + (mode == 2 ? 2 : 0);
    lc::ldmatrix<COUNT, TRANS>(r, row);
    for (int i = 0; i < COUNT; ++i) out[4 * lane + i] = r[i];
}
extern "C" __global__ void selftest_ldmatrix(const unsigned short* rows, const int* source_row, unsigned* out,
                                             int count, int trans, int mode) {
    SHARED(unsigned short, staged, [32 * 8]);
    const int t = threadIdx.x;
    if (t >= 32)
        for (int j = 0; j < 8; ++j) staged[8 * (t - 32) + j] = rows[8 * (t - 32) + j];
    if (mode != 1) __syncthreads();
    if (t >= 32) return;
    if (count == 1 && !trans) selftest_ldmatrix_body<1, false>(staged, source_row, out, mode);
    if (count == 1 && trans) selftest_ldmatrix_body<1, true>(staged, source_row, out, mode);
    if (count == 2 && !trans) selftest_ldmatrix_body<2, false>(staged, source_row, out, mode);
    if (count == 2 && trans) selftest_ldmatrix_body<2, true>(staged, source_row, out, mode);
    if (count == 4 && !trans) selftest_ldmatrix_body<4, false>(staged, source_row, out, mode);
    if (count == 4 && trans) selftest_ldmatrix_body<4, true>(staged, source_row, out, mode);
}

// n = blockDim.x threads; `in` and `out` hold 11 n floats: [0, 4n) copied by cp.async.cg 16,
// [4n, 8n) by cp.async.ca 16 (group 0), [8n, 10n) by cp.async.ca 8 and [10n, 11n) by
// cp.async.ca 4 (group 1); thread t copies its own slice of each, and after the waits and a
// barrier thread t writes thread (n - 1 - t)'s slices to its own place in `out`.
// mode 0: correct; 1: no wait at all; 2: waits but no barrier; 3: cp.async.wait_group 1 only
// (group 1 may still be in flight when it is read).
extern "C" __global__ void selftest_cp_async(const float* in, float* out, int mode) {
    SHARED(float, staged, [11 * 64]);
    const int t = threadIdx.x, n = blockDim.x, u = n - 1 - t;
    lc::cp_async16(&staged[4 * t], &in[4 * t]);
    lc::cp_async_ca<16>(&staged[4 * n + 4 * t], &in[4 * n + 4 * t]);
    lc::cp_async_commit();
    lc::cp_async_ca<8>(&staged[8 * n + 2 * t], &in[8 * n + 2 * t]);
    lc::cp_async_ca<4>(&staged[10 * n + t], &in[10 * n + t]);
    lc::cp_async_commit();
    if (mode == 0 || mode == 2) lc::cp_async_wait<0>();
    if (mode == 3) lc::cp_async_wait<1>();
    if (mode != 2) __syncthreads();
    for (int j = 0; j < 4; ++j) out[4 * t + j] = staged[4 * u + j];
    for (int j = 0; j < 4; ++j) out[4 * n + 4 * t + j] = staged[4 * n + 4 * u + j];
    for (int j = 0; j < 2; ++j) out[8 * n + 2 * t + j] = staged[8 * n + 2 * u + j];
    out[10 * n + t] = staged[10 * n + u];
}

// prefetch.global.L2 (a hint): thread t prefetches out[(t + 1) % n] — unwritten, and written by
// another thread in this interval: neither an uninitialised read nor a race, since a prefetch
// accesses nothing — then copies in[t]. mode 1 also prefetches in[n + t], past the end of `in`.
extern "C" __global__ void selftest_prefetch(const float* in, float* out, int n, int mode) {
    const int t = threadIdx.x;
    if (t >= n) return;
    lc::prefetch_l2(&out[(t + 1) % n]);
    if (mode == 1) lc::prefetch_l2(&in[n + t]);
    out[t] = in[t];
}

// ---- grid barriers (cooperative launches) -----------------------------------------------------
// `rounds` rounds over a cooperative grid of at most 256-thread blocks: thread t of block b
// stores in[(r·G + b)·n + t] into `partial` (its own element), into a static shared array and,
// doubled, into dynamic shared memory (n floats); after a grid barrier it reads element
// (t + 1) % n of every block's part and the two shared arrays' elements (t + 1) % n and
// (t + 2) % n, adding them to a sum that stays in a local variable across the barriers; a second
// grid barrier ends the round. out[b·n + t] = the sum. The modes plant errors: 1 replaces the
// first with __syncthreads (blocks read parts other blocks write: a race between blocks), 2 the
// second (the next round's stores race with other blocks' reads), 3 has block 1
// return before the first barrier, 4 has thread 0 of block 0 return there.
extern "C" __global__ void selftest_grid_sync(const float* in, float* partial, float* out, int rounds, int mode) {
    SHARED(float, staged, [256]);
    EXTERN_SHARED(float, doubled);
    const int n = blockDim.x, b = blockIdx.x, t = threadIdx.x;
    float sum = 0.0f;
    for (int r = 0; r < rounds; ++r) {
        const float v = in[((size_t)r * gridDim.x + b) * n + t];
        staged[t] = v;
        doubled[t] = 2.0f * v;
        partial[(size_t)b * n + t] = v;
        if ((mode == 3 && b == 1) || (mode == 4 && b == 0 && t == 0)) return;
        if (mode == 1)
            __syncthreads();
        else
            LC_GRID_SYNC();
        for (unsigned o = 0; o < gridDim.x; ++o) sum += partial[(size_t)o * n + (t + 1) % n];
        sum += staged[(t + 1) % n] + doubled[(t + 2) % n];
        if (mode == 2)
            __syncthreads();
        else
            LC_GRID_SYNC();
    }
    out[(size_t)b * n + t] = sum;
}

// The last block sums the blocks' partial sums (the "last block" reduction of CUDA's
// threadFenceReduction sample): each block of n threads sums in[b·n .. b·n + n) into partial[b];
// thread 0 releases it (__threadfence, then atomicAdd on the ticket) and the block that draws the
// last ticket acquires (__threadfence after its atomicAdd), after which its thread n − 1 adds the
// partials in block order into total[0] and thread 0 resets the ticket with atomicExch. `mode`
// breaks one step: 1 drops the release fence, 2 the acquire fence, 3 writes the partial after the
// release fence.
extern "C" __global__ void selftest_last_block(const float* in, float* partial, unsigned* ticket, float* total,
                                               int mode) {
    SHARED(float, values, [256]);
    SHARED(int, is_last, [1]);
    const int n = blockDim.x, b = blockIdx.x, t = threadIdx.x;
    values[t] = in[(size_t)b * n + t];
    __syncthreads();
    if (t == 0) {
        float sum = 0.0f;
        for (int i = 0; i < n; ++i) sum += values[i];
        if (mode != 3) partial[b] = sum;
        if (mode != 1) __threadfence();
        if (mode == 3) partial[b] = sum;
        const unsigned drawn = atomicAdd(ticket, 1u);
        is_last[0] = drawn == gridDim.x - 1;
        if (is_last[0] && mode != 2) __threadfence();
    }
    __syncthreads();
    if (!is_last[0]) return;
    if (t == n - 1) {
        float sum = 0.0f;
        for (unsigned o = 0; o < gridDim.x; ++o) sum += partial[o];
        total[0] = sum;
    }
    if (t == 0) atomicExch(ticket, 0u);
}
