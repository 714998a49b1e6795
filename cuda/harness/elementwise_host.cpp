// CPU-harness build of cuda/elementwise.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../elementwise.cu"

LC_HARNESS_ENTRY(elementwise_gelu_bias_fwd_f32)
LC_HARNESS_ENTRY(elementwise_gelu_bias_bwd_f32)
LC_HARNESS_ENTRY(elementwise_add_f32)
LC_HARNESS_ENTRY(elementwise_add_acc_f32)
LC_HARNESS_ENTRY(elementwise_bias_add_f32)
LC_HARNESS_ENTRY(elementwise_cast_f32)
LC_HARNESS_ENTRY(elementwise_bias_grad_naive_f32)
LC_HARNESS_ENTRY(elementwise_bias_grad_partial_f32)
LC_HARNESS_ENTRY(elementwise_bias_grad_sum_f32)
LC_HARNESS_ENTRY(elementwise_gelu_bias_fwd_bf16)
LC_HARNESS_ENTRY(elementwise_gelu_bias_bwd_bf16)
LC_HARNESS_ENTRY(elementwise_add_bf16)
LC_HARNESS_ENTRY(elementwise_add_acc_bf16)
LC_HARNESS_ENTRY(elementwise_bias_add_bf16)
LC_HARNESS_ENTRY(elementwise_cast_bf16)
LC_HARNESS_ENTRY(elementwise_bias_grad_naive_bf16)
LC_HARNESS_ENTRY(elementwise_bias_grad_partial_bf16)
LC_HARNESS_ENTRY(elementwise_bias_grad_sum_bf16)
