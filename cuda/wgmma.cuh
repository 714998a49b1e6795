// Hopper's warpgroup MMA (wgmma.mma_async, sm_90a) for kernels built for compute_90a
// (build.rs: a family whose first line is `// lc-arch: 90a`), with its CPU-harness emulation
// (cuda/harness/cuda_cpu.h, memcheck.cpp) behind the same calls. Both operands come from shared
// memory through matrix descriptors, in the PTX ISA's no-swizzle canonical layouts: 8×8 core
// matrices of 16-bit elements, each 128 contiguous bytes (8 rows of 16 bytes: rows along M or N
// for a K-major operand, along K for an MN-major one); LBO is the byte distance between core
// matrices adjacent in K, SBO between those adjacent in M or N.
//
// The protocol (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"), which the
// harness checks: shared-memory operands written by ordinary stores or cp.async are made
// visible to the async proxy by fence_proxy_async() in the writing thread (then a barrier);
// wgmma_fence() before a batch of wgmma; wgmma_commit() closes the batch into a group;
// wgmma_wait<N>() waits until at most N groups are pending, and only then may the accumulators
// be read (fence_accumulators() keeps the compiler from moving their reads above the wait) or
// the operands' shared memory be overwritten.
#pragma once

#include "common.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "wgmma needs sm_90a: build.rs compiles a family whose first line is `// lc-arch: 90a` for compute_90a"
#endif

namespace lc {

// The matrix descriptor of a no-swizzle operand starting at `smem` (16-byte aligned): start
// address, LBO and SBO in 16-byte units; base offset 0; swizzle mode 0.
__device__ __forceinline__ unsigned long long wgmma_desc(const void* smem, unsigned lbo_bytes, unsigned sbo_bytes) {
#ifdef __CUDACC__
    const unsigned address = shared_address(smem);
#else
    const unsigned address = ::lc_harness::shared_window_address(smem);
#endif
    return (unsigned long long)((address >> 4) & 0x3fff) | (unsigned long long)((lbo_bytes >> 4) & 0x3fff) << 16 |
           (unsigned long long)((sbo_bytes >> 4) & 0x3fff) << 32;
}

#ifdef __CUDACC__
// The accumulator operands of a wgmma's inline PTX: %0 … %(N/2 - 1) in the instruction's list
// (64 or 128 a thread), and row j of d (4 a thread) in the asm's output list.
#define LC_WGMMA_D0_63                                                                 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, " \
    "%18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, " \
    "%34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, " \
    "%50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define LC_WGMMA_D64_127                                                               \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, " \
    "%110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, "   \
    "%123, %124, %125, %126, %127"
#define LC_WGMMA_ACC(j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#endif

// d = A·B + (scale_d ? d : 0) for the warpgroup's 64×128 tile, K = 16:
// wgmma.mma_async.sync.aligned.m64n128k16.f32.{bf16,f16}.{bf16,f16}, A (64×16) and B (16×128)
// from shared memory; TRANS_A / TRANS_B: the operand is MN-major (1) or K-major (0). Thread t
// of the warpgroup (warp w = t / 32, lane l) holds d[j][v] = D(16·w + l/4 + 8·(v/2),
// 8·j + 2·(l % 4) + v % 2). Every thread of the warpgroup calls it with the same arguments.
template <typename T, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[16][4], unsigned long long desc_a,
                                                 unsigned long long desc_b, int scale_d) {
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or f16 inputs");
#ifdef __CUDACC__
// One input type's instruction (TYPE: its PTX name): 64 accumulators in and out, the
// descriptors, scale-d as a predicate, the transposes as immediates.
#define LC_WGMMA_M64N128K16(TYPE)                                                        \
    asm volatile(                                                                        \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                     \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " {" LC_WGMMA_D0_63 \
        "}, %64, %65, p, 1, 1, %67, %68;\n}\n"                                           \
        : LC_WGMMA_ACC(0), LC_WGMMA_ACC(1), LC_WGMMA_ACC(2), LC_WGMMA_ACC(3),            \
          LC_WGMMA_ACC(4), LC_WGMMA_ACC(5), LC_WGMMA_ACC(6), LC_WGMMA_ACC(7),            \
          LC_WGMMA_ACC(8), LC_WGMMA_ACC(9), LC_WGMMA_ACC(10), LC_WGMMA_ACC(11),          \
          LC_WGMMA_ACC(12), LC_WGMMA_ACC(13), LC_WGMMA_ACC(14), LC_WGMMA_ACC(15)         \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B))
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        LC_WGMMA_M64N128K16("bf16");
    else
        LC_WGMMA_M64N128K16("f16");
#undef LC_WGMMA_M64N128K16
#else
    ::lc_harness::wgmma(std::is_same<T, __nv_bfloat16>::value ? ::lc_harness::MmaInput::BF16
                                                             : ::lc_harness::MmaInput::F16,
                        128, &d[0][0], desc_a, desc_b, scale_d, TRANS_A, TRANS_B);
#endif
}

// d = A·B + (scale_d ? d : 0) for the warpgroup's 64×256 tile, K = 16:
// wgmma.mma_async.sync.aligned.m64n256k16.f32.{bf16,f16}.{bf16,f16}; as wgmma_m64n128k16, with
// 32 m16n8 column tiles (128 accumulators a thread): d[j][v] = D(16·w + l/4 + 8·(v/2),
// 8·j + 2·(l % 4) + v % 2).
template <typename T, int TRANS_A, int TRANS_B>
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[32][4], unsigned long long desc_a,
                                                 unsigned long long desc_b, int scale_d) {
    static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or f16 inputs");
#ifdef __CUDACC__
#define LC_WGMMA_M64N256K16(TYPE)                                                                              \
    asm volatile(                                                                                              \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                                          \
        "wgmma.mma_async.sync.aligned.m64n256k16.f32." TYPE "." TYPE " {" LC_WGMMA_D0_63 ", " LC_WGMMA_D64_127 \
        "}, %128, %129, p, 1, 1, %131, %132;\n}\n"                                                             \
        : LC_WGMMA_ACC(0), LC_WGMMA_ACC(1), LC_WGMMA_ACC(2), LC_WGMMA_ACC(3),                                  \
          LC_WGMMA_ACC(4), LC_WGMMA_ACC(5), LC_WGMMA_ACC(6), LC_WGMMA_ACC(7),                                  \
          LC_WGMMA_ACC(8), LC_WGMMA_ACC(9), LC_WGMMA_ACC(10), LC_WGMMA_ACC(11),                                \
          LC_WGMMA_ACC(12), LC_WGMMA_ACC(13), LC_WGMMA_ACC(14), LC_WGMMA_ACC(15),                              \
          LC_WGMMA_ACC(16), LC_WGMMA_ACC(17), LC_WGMMA_ACC(18), LC_WGMMA_ACC(19),                              \
          LC_WGMMA_ACC(20), LC_WGMMA_ACC(21), LC_WGMMA_ACC(22), LC_WGMMA_ACC(23),                              \
          LC_WGMMA_ACC(24), LC_WGMMA_ACC(25), LC_WGMMA_ACC(26), LC_WGMMA_ACC(27),                              \
          LC_WGMMA_ACC(28), LC_WGMMA_ACC(29), LC_WGMMA_ACC(30), LC_WGMMA_ACC(31)                               \
        : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B))
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        LC_WGMMA_M64N256K16("bf16");
    else
        LC_WGMMA_M64N256K16("f16");
#undef LC_WGMMA_M64N256K16
#else
    ::lc_harness::wgmma(std::is_same<T, __nv_bfloat16>::value ? ::lc_harness::MmaInput::BF16
                                                             : ::lc_harness::MmaInput::F16,
                        256, &d[0][0], desc_a, desc_b, scale_d, TRANS_A, TRANS_B);
#endif
}

// wgmma.fence.sync.aligned: orders this warpgroup's earlier accesses of the accumulator
// registers (and shared operands) before the wgmma that follow.
__device__ __forceinline__ void wgmma_fence() {
#ifdef __CUDACC__
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
    ::lc_harness::wgmma_fence();
#endif
}

// wgmma.commit_group.sync.aligned: the wgmma issued since the last commit form one group.
__device__ __forceinline__ void wgmma_commit() {
#ifdef __CUDACC__
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
    ::lc_harness::wgmma_commit();
#endif
}

// wgmma.wait_group.sync.aligned N: until at most N committed groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#ifdef __CUDACC__
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
    ::lc_harness::wgmma_wait(N);
#endif
}

// After wgmma_wait: an empty asm that "rewrites" each accumulator, so the compiler cannot
// schedule their reads above the wait (the wgmma asm is their last visible writer).
template <int FRAG_N>
__device__ __forceinline__ void fence_accumulators(float (&d)[FRAG_N][4]) {
#ifdef __CUDACC__
    LC_UNROLL
    for (int j = 0; j < FRAG_N; ++j)
        LC_UNROLL
        for (int v = 0; v < 4; ++v) asm volatile("" : "+f"(d[j][v])::"memory");
#else
    (void)d;
#endif
}

// fence.proxy.async.shared::cta: this thread's earlier shared-memory writes (stores, landed
// cp.async) are ordered before later reads by the async proxy (wgmma), once a barrier also
// orders them for the other threads.
__device__ __forceinline__ void fence_proxy_async() {
#ifdef __CUDACC__
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
    ::lc_harness::fence_proxy_async();
#endif
}

}  // namespace lc
