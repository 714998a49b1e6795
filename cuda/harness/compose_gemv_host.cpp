// CPU-harness build of cuda/compose_gemv.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../compose_gemv.cu"

LC_HARNESS_ENTRY(compose_gemv_zero)
LC_HARNESS_ENTRY(compose_gemv_shrink_f32)
LC_HARNESS_ENTRY(compose_gemv_expand_f32)
LC_HARNESS_ENTRY(compose_gemv_hidden_f32)
LC_HARNESS_ENTRY(compose_gemv_dx_f32)
LC_HARNESS_ENTRY(compose_gemv_finish_f32)
LC_HARNESS_ENTRY(compose_gemv_shrink_bf16)
LC_HARNESS_ENTRY(compose_gemv_expand_bf16)
LC_HARNESS_ENTRY(compose_gemv_hidden_bf16)
LC_HARNESS_ENTRY(compose_gemv_dx_bf16)
LC_HARNESS_ENTRY(compose_gemv_finish_bf16)
LC_HARNESS_ENTRY(compose_gemv_forward_f32)
LC_HARNESS_ENTRY(compose_gemv_backward_f32)
LC_HARNESS_ENTRY(compose_gemv_forward_bf16)
LC_HARNESS_ENTRY(compose_gemv_backward_bf16)
