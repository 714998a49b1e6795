// CPU-harness build of cuda/compose_mma.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../compose_mma.cu"

LC_HARNESS_ENTRY(compose_mma_shrink_bf16)
LC_HARNESS_ENTRY(compose_mma_shrink64_bf16)
LC_HARNESS_ENTRY(compose_mma_expand_bf16)
LC_HARNESS_ENTRY(compose_mma_expand64_bf16)
LC_HARNESS_ENTRY(compose_mma_hidden_bf16)
LC_HARNESS_ENTRY(compose_mma_hidden64_bf16)
LC_HARNESS_ENTRY(compose_mma_dx_bf16)
LC_HARNESS_ENTRY(compose_mma_dx64_bf16)
