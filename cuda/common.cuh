// Device helpers shared by every kernel family, and the one switch between the GPU (nvcc) and
// the CPU harness (g++): kernel sources include only this header (or mma_tile.cuh, which
// includes it).
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
// Static shared memory; the CPU harness version also registers the array for poisoning.
#define SHARED(type, name, dims) __shared__ type name dims
// Dynamic shared memory (the launch's shared-bytes argument), viewed as `type*`.
#define EXTERN_SHARED(type, name)                                     \
    extern __shared__ __align__(16) unsigned char lc_dynamic_shared[]; \
    type* name = reinterpret_cast<type*>(lc_dynamic_shared)
// `#pragma unroll` for nvcc (the harness's host compiler does not know the pragma).
#define LC_UNROLL _Pragma("unroll")
// A grid-wide barrier: every thread of every block waits until all have arrived, and the
// blocks' earlier memory accesses are visible to all after it. Only in kernels launched
// cooperatively (`Kernel::cooperative`: cuLaunchCooperativeKernel, whose grid the driver checks
// is co-resident); cooperative groups' grid.sync, no separate compilation needed.
#include <cooperative_groups.h>
#define LC_GRID_SYNC() cooperative_groups::this_grid().sync()
// A device function called, not inlined (the name `__noinline__` would clash with GCC's
// `__attribute__((__noinline__))` in the harness's system headers).
#define LC_NOINLINE __noinline__
#else
#include "harness/cuda_cpu.h"
#define LC_UNROLL
#define LC_GRID_SYNC() ::lc_harness::grid_barrier(__FILE__ ":" LC_HARNESS_STR(__LINE__))
#define LC_NOINLINE __attribute__((noinline))
#endif

namespace lc {

// Storage <-> f32: every kernel loads its storage type into f32 registers, accumulates in f32
// and rounds once when it stores (round to nearest even).
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// ---- tiled GEMM main loop shared by the composition kernels ----------------------------------
//
// acc[i][j] += Σ_{k ∈ [k_begin, k_end)} a(row, k) · b(col, k)  for this thread's TM×TN outputs,
// row = row0 + ty + i·THREADS_M, col = col0 + tx + j·THREADS_N (tx = tid % THREADS_N,
// ty = tid / THREADS_N): strided so that shared-memory reads are broadcasts or consecutive.
// Both operands are addressed as (outer index, k) through loaders, so one loop serves every
// layout: a loader says whether consecutive k are contiguous in memory (K_CONTIGUOUS) and the
// tile fill walks memory in that order (coalesced). Out-of-range elements load as 0. Every
// thread of the block must call it (two barriers per K step).
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct TileShape {
    static constexpr int BM = BM_, BN = BN_, BK = BK_, TM = TM_, TN = TN_;
    static constexpr int THREADS_M = BM / TM, THREADS_N = BN / TN;
    static constexpr int THREADS = THREADS_M * THREADS_N;
    static constexpr int PAD = 4;  // keeps transposed tile stores off one bank
};

// Element (outer, k) of a row-major matrix whose rows are indexed by `outer`:
// p[(outer + outer_off)·ld + k + k_off].
template <typename T>
struct OuterRows {
    const T* p;
    int ld, outer_off, k_off;
    static constexpr bool K_CONTIGUOUS = true;
    __device__ __forceinline__ float operator()(int outer, int k) const {
        return to_f32(p[(size_t)(outer + outer_off) * ld + k + k_off]);
    }
};

// Element (outer, k) of a row-major matrix whose rows are indexed by `k`:
// p[(k + k_off)·ld + outer + outer_off].
template <typename T>
struct KRows {
    const T* p;
    int ld, outer_off, k_off;
    static constexpr bool K_CONTIGUOUS = false;
    __device__ __forceinline__ float operator()(int outer, int k) const {
        return to_f32(p[(size_t)(k + k_off) * ld + outer + outer_off]);
    }
};

template <class S, class LoadA, class LoadB>
__device__ __forceinline__ void tile_mainloop(float (&acc)[S::TM][S::TN], int row0, int col0, int M, int N,
                                              int k_begin, int k_end, const LoadA& load_a, const LoadB& load_b) {
    SHARED(float, a_tile, [S::BK][S::BM + S::PAD]);  // a_tile[k][m] = a(row0 + m, k0 + k)
    SHARED(float, b_tile, [S::BK][S::BN + S::PAD]);  // b_tile[k][n] = b(col0 + n, k0 + k)
    const int tid = threadIdx.x;
    const int tx = tid % S::THREADS_N, ty = tid / S::THREADS_N;
    for (int k0 = k_begin; k0 < k_end; k0 += S::BK) {
        for (int i = tid; i < S::BM * S::BK; i += S::THREADS) {
            const int m = LoadA::K_CONTIGUOUS ? i / S::BK : i % S::BM;
            const int k = LoadA::K_CONTIGUOUS ? i % S::BK : i / S::BM;
            const int gm = row0 + m, gk = k0 + k;
            a_tile[k][m] = (gm < M && gk < k_end) ? load_a(gm, gk) : 0.0f;
        }
        for (int i = tid; i < S::BN * S::BK; i += S::THREADS) {
            const int n = LoadB::K_CONTIGUOUS ? i / S::BK : i % S::BN;
            const int k = LoadB::K_CONTIGUOUS ? i % S::BK : i / S::BN;
            const int gn = col0 + n, gk = k0 + k;
            b_tile[k][n] = (gn < N && gk < k_end) ? load_b(gn, gk) : 0.0f;
        }
        __syncthreads();  // tiles complete before anyone reads them
        for (int k = 0; k < S::BK; ++k) {
            float a_frag[S::TM], b_frag[S::TN];
            for (int i = 0; i < S::TM; ++i) a_frag[i] = a_tile[k][ty + i * S::THREADS_M];
            for (int j = 0; j < S::TN; ++j) b_frag[j] = b_tile[k][tx + j * S::THREADS_N];
            for (int i = 0; i < S::TM; ++i)
                for (int j = 0; j < S::TN; ++j) acc[i][j] += a_frag[i] * b_frag[j];
        }
        __syncthreads();  // everyone done reading before the next K step overwrites the tiles
    }
}

// Split-K: block z of gridDim.z covers k ∈ [z·chunk, min(K, (z + 1)·chunk)).
__device__ __forceinline__ int split_begin(int chunk) { return blockIdx.z * chunk; }
__device__ __forceinline__ int split_end(int chunk, int K) { return min(K, (int)(blockIdx.z + 1) * chunk); }

// The composition's per-sample diagonal: D[σ, j] = C[σ, module_of[j]] · col_scale[j].
__device__ __forceinline__ float diag(const float* C, int n_modules, const int* module_of, const float* col_scale,
                                      int sample, int j) {
    return C[(size_t)sample * n_modules + module_of[j]] * col_scale[j];
}

// The tile of every tiled composition kernel (cuda/compose_fwd.cu, cuda/compose_bwd.cu): 32 rows ×
// 64 columns per block of 256 threads, K steps of 16, a 2×4 register block per thread. Mirrored by
// `TILE` in src/kernels/compose_fwd.rs.
using ComposeTile = TileShape<32, 64, 16, 2, 4>;

// Σ_z work[z·stride + at] over z < splits, added in split order (the fixed sum of split-K
// partials: the same bits every run), four loads in flight before their adds — a plain loop
// would wait one memory latency per split.
__device__ __forceinline__ float sum_splits(const float* __restrict__ work, int splits, size_t stride, size_t at) {
    float sum = 0.0f;
    int z = 0;
    for (; z + 4 <= splits; z += 4) {
        const float p0 = work[(z + 0) * stride + at], p1 = work[(z + 1) * stride + at];
        const float p2 = work[(z + 2) * stride + at], p3 = work[(z + 3) * stride + at];
        sum += p0;
        sum += p1;
        sum += p2;
        sum += p3;
    }
    for (; z < splits; ++z) sum += work[z * stride + at];
    return sum;
}

// Split-K without a reduce launch: once every thread of a block of a split grid (gridDim.z > 1)
// has stored its partial tile, whether the block is the last of its tile's splits to finish —
// the one that then sums them. Thread 0 releases the block's partial (a device-scope fence, then
// atomicAdd on the tile's ticket); the block that draws the last ticket acquires the other
// splits' partials (a fence after its atomic) and resets the ticket for the next launch; a
// barrier hands the answer, and the acquire, to every thread. The tile's ticket is
// tickets[blockIdx.y · gridDim.x + blockIdx.x], zero when its first split arrives (src/launch.rs
// `Backend::tickets`: zeroed once, left zero by every launch); `flag` is one int of shared memory
// the block does not otherwise touch until it returns.
// Arrival order decides only which block sums, never the order of the sum
// (mma_tile::split_finish).
__device__ __forceinline__ bool last_split(unsigned* tickets, int* flag) {
    unsigned* ticket = tickets + blockIdx.y * gridDim.x + blockIdx.x;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const bool last = atomicAdd(ticket, 1u) == gridDim.z - 1;
        if (last) {
            __threadfence();
            atomicExch(ticket, 0u);
        }
        *flag = last;
    }
    __syncthreads();
    return *flag != 0;
}

// Epilogue of a split-K tile whose product is added onto `out` (rows × cols, row-major): with one
// split, out += acc (rounded once); with several, block z stores acc to work[z][row][col] for
// sum_partials. Thread layout as in tile_mainloop.
template <class S, typename T>
__device__ __forceinline__ void add_tile_or_partial(const float (&acc)[S::TM][S::TN], int row0, int col0, int rows,
                                                    int cols, T* __restrict__ out, float* __restrict__ work) {
    const int tx = threadIdx.x % S::THREADS_N, ty = threadIdx.x / S::THREADS_N;
    for (int i = 0; i < S::TM; ++i) {
        const int r = row0 + ty + i * S::THREADS_M;
        if (r >= rows) continue;
        if (gridDim.z > 1) {
            for (int q = 0; q < S::TN; ++q) {
                const int c = col0 + tx + q * S::THREADS_N;
                if (c < cols) work[((size_t)blockIdx.z * rows + r) * cols + c] = acc[i][q];
            }
            continue;
        }
        // The row's old values all loaded before any is stored (a store through `out` may
        // alias a later load through it as far as the compiler can tell: a load-add-store per
        // element would wait one memory latency each).
        float old[S::TN];
        for (int q = 0; q < S::TN; ++q) {
            const int c = col0 + tx + q * S::THREADS_N;
            old[q] = c < cols ? to_f32(out[(size_t)r * cols + c]) : 0.0f;
        }
        for (int q = 0; q < S::TN; ++q) {
            const int c = col0 + tx + q * S::THREADS_N;
            if (c < cols) out[(size_t)r * cols + c] = from_f32<T>(old[q] + acc[i][q]);
        }
    }
}

// Sums split-K partials: out[r·ld + col_off + c] (=|+=) Σ_z work[(z·rows + r)·width + c], in
// order z = 0, 1, … (deterministic). One thread per (r, c); 1-D grid.
template <typename T>
__device__ __forceinline__ void sum_partials(const float* __restrict__ work, int splits, T* __restrict__ out, int rows,
                                             int width, int ld, int col_off, int accumulate) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)rows * width) return;
    const int r = (int)(idx / width), c = (int)(idx % width);
    const float acc = sum_splits(work, splits, (size_t)rows * width, (size_t)r * width + c);
    T* o = out + (size_t)r * ld + col_off + c;
    *o = from_f32<T>(accumulate ? to_f32(*o) + acc : acc);
}

// ---- warp and block reductions (loss, optim, coeffs) -----------------------------------------
//
// Butterfly over a full warp: every lane of the warp must call it (mask 0xffffffff) and every
// lane gets the result. The order of the additions is fixed, so the result is deterministic.
__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Sum over a block of THREADS (a power of two) threads, each contributing `x`: a tree in shared
// memory in a fixed order (deterministic). Every thread must call it and every thread gets the
// sum. `scratch` holds THREADS floats; it ends with a barrier, so it may be reused right after.
template <int THREADS>
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    static_assert((THREADS & (THREADS - 1)) == 0, "THREADS must be a power of two");
    const int tid = threadIdx.x;
    scratch[tid] = x;
    __syncthreads();
    for (int half = THREADS / 2; half > 0; half >>= 1) {
        if (tid < half) scratch[tid] += scratch[tid + half];
        __syncthreads();
    }
    const float total = scratch[0];
    __syncthreads();
    return total;
}

// ---- tensor cores and asynchronous copies (sm_80 and later) ----------------------------------
//
// One call for both builds: inline PTX on a GPU build for sm_80 and later, the CPU harness's
// warp-collective emulation otherwise (cuda/README.md lists what it checks). A fragment register
// holds two 16-bit elements, the lower-indexed one in the low half (PTX ISA fragment layouts).
// Device code for an architecture before sm_80 compiles these to a trap (reaching one is a bug).
#if defined(__CUDACC__) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define LC_SM80_ASM 0
#else
#define LC_SM80_ASM 1
#endif

#ifdef __CUDACC__
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#endif

// d = a·b + c: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (T picks the
// input type). Every lane of the warp must call it, with the same T. d may alias c.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                             const float (&c)[4]) {
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or f16 inputs");
#ifdef __CUDACC__
#if !LC_SM80_ASM
    __trap();
#else
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
              "f"(c[3]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%10,%11,%12,%13};\n"
            : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
              "f"(c[3]));
    }
#endif
#else
    ::lc_harness::mma_m16n8k16(
        std::is_same<T, __nv_bfloat16>::value ? ::lc_harness::MmaInput::BF16 : ::lc_harness::MmaInput::F16, d, a, b, c);
#endif
}

// ldmatrix.sync.aligned.m8n8.x{COUNT}{.trans if TRANS}.shared.b16: lane l < 8·COUNT passes the
// address of row l % 8 of matrix l / 8 (16-byte aligned shared memory; other lanes' addresses
// are ignored); r[i] receives this lane's two elements of matrix i. Every lane must call it.
template <int COUNT, bool TRANS>
__device__ __forceinline__ void ldmatrix(unsigned (&r)[COUNT], const void* smem_row) {
    static_assert(COUNT == 1 || COUNT == 2 || COUNT == 4, "ldmatrix .x1, .x2 or .x4");
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    const unsigned a = shared_address(smem_row);
    if constexpr (COUNT == 1 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
    else if constexpr (COUNT == 1 && TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
    else if constexpr (COUNT == 2 && !TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else if constexpr (COUNT == 2 && TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(a));
    else if constexpr (!TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
#else
    ::lc_harness::ldmatrix(COUNT, TRANS, r, smem_row);
#endif
}

// cp.async.cg.shared.global, 16 bytes (cached in L2 only): both addresses 16-byte aligned. The
// destination may be read only after a cp_async_wait that completes its group, and by other
// threads only after a barrier following that wait.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)), "l"(gmem) : "memory");
#else
    ::lc_harness::cp_async(smem, gmem, 16, "cp.async.cg");
#endif
}

// prefetch.global.L2: a hint to bring the 128-byte line holding `p` into L2 (no access, no fault
// on a GPU; the harness checks that a buffer of the launch holds the address).
__device__ __forceinline__ void prefetch_l2(const void* p) {
#ifdef __CUDACC__
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
#else
    ::lc_harness::prefetch_l2(p);
#endif
}

// cp.async.ca.shared.global of BYTES = 4, 8 or 16 (cached in L1 too), aligned to BYTES.
template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* smem, const void* gmem) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(shared_address(smem)), "l"(gmem), "n"(BYTES)
                 : "memory");
#else
    ::lc_harness::cp_async(smem, gmem, BYTES, "cp.async.ca");
#endif
}

// cp.async.commit_group: this thread's copies issued since the last commit form one group.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#else
    ::lc_harness::cp_async_commit();
#endif
}

// cp.async.wait_group N: waits until at most N of this thread's committed groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#else
    ::lc_harness::cp_async_wait(N);
#endif
}

// cp.async.wait_all: commits the pending copies and waits for all of them.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDACC__) && !LC_SM80_ASM
    __trap();
#elif defined(__CUDACC__)
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#else
    ::lc_harness::cp_async_commit();
    ::lc_harness::cp_async_wait(0);
#endif
}

}  // namespace lc
