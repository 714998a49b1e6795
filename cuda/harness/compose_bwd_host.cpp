// CPU-harness build of cuda/compose_bwd.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../compose_bwd.cu"

LC_HARNESS_ENTRY(compose_bwd_hidden_naive_f32)
LC_HARNESS_ENTRY(compose_bwd_coeff_grad_naive_f32)
LC_HARNESS_ENTRY(compose_bwd_dx_naive_f32)
LC_HARNESS_ENTRY(compose_bwd_da_naive_f32)
LC_HARNESS_ENTRY(compose_bwd_db_naive_f32)
LC_HARNESS_ENTRY(compose_bwd_coeff_grad_tiled_f32)
LC_HARNESS_ENTRY(compose_bwd_dx_tiled_f32)
LC_HARNESS_ENTRY(compose_bwd_da_tiled_f32)
LC_HARNESS_ENTRY(compose_bwd_db_tiled_f32)
LC_HARNESS_ENTRY(compose_bwd_hidden_naive_bf16)
LC_HARNESS_ENTRY(compose_bwd_coeff_grad_naive_bf16)
LC_HARNESS_ENTRY(compose_bwd_dx_naive_bf16)
LC_HARNESS_ENTRY(compose_bwd_da_naive_bf16)
LC_HARNESS_ENTRY(compose_bwd_db_naive_bf16)
LC_HARNESS_ENTRY(compose_bwd_coeff_grad_tiled_bf16)
LC_HARNESS_ENTRY(compose_bwd_dx_tiled_bf16)
LC_HARNESS_ENTRY(compose_bwd_da_tiled_bf16)
LC_HARNESS_ENTRY(compose_bwd_db_tiled_bf16)
