// CPU-harness build of cuda/layernorm.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../layernorm.cu"

LC_HARNESS_ENTRY(layernorm_fwd_naive_f32)
LC_HARNESS_ENTRY(layernorm_fwd_warp_f32)
LC_HARNESS_ENTRY(layernorm_fwd_block_f32)
LC_HARNESS_ENTRY(layernorm_dx_naive_f32)
LC_HARNESS_ENTRY(layernorm_dx_warp_f32)
LC_HARNESS_ENTRY(layernorm_dx_block_f32)
LC_HARNESS_ENTRY(layernorm_params_naive_f32)
LC_HARNESS_ENTRY(layernorm_params_partial_f32)
LC_HARNESS_ENTRY(layernorm_params_sum_f32)
LC_HARNESS_ENTRY(layernorm_fwd_naive_bf16)
LC_HARNESS_ENTRY(layernorm_fwd_warp_bf16)
LC_HARNESS_ENTRY(layernorm_fwd_block_bf16)
LC_HARNESS_ENTRY(layernorm_dx_naive_bf16)
LC_HARNESS_ENTRY(layernorm_dx_warp_bf16)
LC_HARNESS_ENTRY(layernorm_dx_block_bf16)
LC_HARNESS_ENTRY(layernorm_params_naive_bf16)
LC_HARNESS_ENTRY(layernorm_params_partial_bf16)
LC_HARNESS_ENTRY(layernorm_params_sum_bf16)
