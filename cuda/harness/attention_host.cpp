// CPU-harness build of cuda/attention.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../attention.cu"

LC_HARNESS_ENTRY(attention_fwd_naive_f32)
LC_HARNESS_ENTRY(attention_fwd_tiled_f32)
LC_HARNESS_ENTRY(attention_bwd_dot_f32)
LC_HARNESS_ENTRY(attention_dq_naive_f32)
LC_HARNESS_ENTRY(attention_dq_tiled_f32)
LC_HARNESS_ENTRY(attention_dkv_naive_f32)
LC_HARNESS_ENTRY(attention_dkv_tiled_f32)
LC_HARNESS_ENTRY(attention_fwd_naive_bf16)
LC_HARNESS_ENTRY(attention_fwd_tiled_bf16)
LC_HARNESS_ENTRY(attention_bwd_dot_bf16)
LC_HARNESS_ENTRY(attention_dq_naive_bf16)
LC_HARNESS_ENTRY(attention_dq_tiled_bf16)
LC_HARNESS_ENTRY(attention_dkv_naive_bf16)
LC_HARNESS_ENTRY(attention_dkv_tiled_bf16)
