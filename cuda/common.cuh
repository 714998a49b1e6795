// Device helpers shared by every kernel family, and the one switch between the GPU (nvcc) and
// the CPU harness (g++): kernel sources include only this header.
#pragma once

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
// Static shared memory; the CPU harness version also registers the array for poisoning.
#define SHARED(type, name, dims) __shared__ type name dims
// Dynamic shared memory (the launch's shared-bytes argument), viewed as `type*`.
#define EXTERN_SHARED(type, name)                                     \
    extern __shared__ __align__(16) unsigned char lc_dynamic_shared[]; \
    type* name = reinterpret_cast<type*>(lc_dynamic_shared)
#else
#include "harness/cuda_cpu.h"
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

}  // namespace lc
