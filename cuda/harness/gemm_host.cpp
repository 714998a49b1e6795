// CPU-harness build of cuda/gemm.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../gemm.cu"

LC_HARNESS_ENTRY(gemm_naive_f32)
LC_HARNESS_ENTRY(gemm_tiled64_f32)
LC_HARNESS_ENTRY(gemm_tiled128_f32)
LC_HARNESS_ENTRY(gemm_naive_f16)
LC_HARNESS_ENTRY(gemm_tiled64_f16)
LC_HARNESS_ENTRY(gemm_tiled128_f16)
LC_HARNESS_ENTRY(gemm_naive_bf16)
LC_HARNESS_ENTRY(gemm_tiled64_bf16)
LC_HARNESS_ENTRY(gemm_tiled128_bf16)
LC_HARNESS_ENTRY(gemm_mma_f16)
LC_HARNESS_ENTRY(gemm_mma_bf16)
LC_HARNESS_ENTRY(gemm_mma_split_f16)
LC_HARNESS_ENTRY(gemm_mma_split_bf16)
LC_HARNESS_ENTRY(gemm_mma_w64_f16)
LC_HARNESS_ENTRY(gemm_mma_w64_bf16)
LC_HARNESS_ENTRY(gemm_mma_w64_split_f16)
LC_HARNESS_ENTRY(gemm_mma_w64_split_bf16)
