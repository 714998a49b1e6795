// CPU-harness build of cuda/gemm_wgmma.cu (wgmma through the harness's emulation).
#include "../gemm_wgmma.cu"

LC_HARNESS_ENTRY(gemm_wgmma_f16)
LC_HARNESS_ENTRY(gemm_wgmma_bf16)
LC_HARNESS_ENTRY(gemm_wgmma_split_f16)
LC_HARNESS_ENTRY(gemm_wgmma_split_bf16)
LC_HARNESS_ENTRY(gemm_wgmma_wide_f16)
LC_HARNESS_ENTRY(gemm_wgmma_wide_bf16)
LC_HARNESS_ENTRY(gemm_wgmma_wide_split_f16)
LC_HARNESS_ENTRY(gemm_wgmma_wide_split_bf16)
LC_HARNESS_ENTRY(selftest_wgmma_f16)
LC_HARNESS_ENTRY(selftest_wgmma_bf16)
