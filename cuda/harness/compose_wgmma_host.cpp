// CPU-harness build of cuda/compose_wgmma.cu (wgmma through the harness's emulation).
#include "../compose_wgmma.cu"

LC_HARNESS_ENTRY(compose_wgmma_shrink_bf16)
LC_HARNESS_ENTRY(compose_wgmma_expand_bf16)
LC_HARNESS_ENTRY(compose_wgmma_hidden_bf16)
LC_HARNESS_ENTRY(compose_wgmma_dx_bf16)
LC_HARNESS_ENTRY(compose_wgmma_wide_shrink_bf16)
LC_HARNESS_ENTRY(compose_wgmma_wide_expand_bf16)
LC_HARNESS_ENTRY(compose_wgmma_wide_hidden_bf16)
LC_HARNESS_ENTRY(compose_wgmma_wide_dx_bf16)
