// CPU-harness build of cuda/compose_factor.cu: the unchanged kernel source compiled as C++17, plus
// one extern "C" launch entry per kernel for src/harness.rs.
#include "../compose_factor.cu"

LC_HARNESS_ENTRY(compose_factor_mix_fwd_naive_f32)
LC_HARNESS_ENTRY(compose_factor_mix_fwd_warp_f32)
LC_HARNESS_ENTRY(compose_factor_mix_bwd_naive_f32)
LC_HARNESS_ENTRY(compose_factor_mix_bwd_warp_f32)
LC_HARNESS_ENTRY(compose_factor_mix_fwd_naive_bf16)
LC_HARNESS_ENTRY(compose_factor_mix_fwd_warp_bf16)
LC_HARNESS_ENTRY(compose_factor_mix_bwd_naive_bf16)
LC_HARNESS_ENTRY(compose_factor_mix_bwd_warp_bf16)
LC_HARNESS_ENTRY(compose_factor_coeff_grad_naive_f32)
LC_HARNESS_ENTRY(compose_factor_coeff_grad_warp_f32)
