// CPU-harness build of cuda/compose_fwd.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../compose_fwd.cu"

LC_HARNESS_ENTRY(compose_fwd_shrink_naive_f32)
LC_HARNESS_ENTRY(compose_fwd_expand_naive_f32)
LC_HARNESS_ENTRY(compose_fwd_shrink_tiled_f32)
LC_HARNESS_ENTRY(compose_fwd_shrink_reduce_f32)
LC_HARNESS_ENTRY(compose_fwd_expand_tiled_f32)
LC_HARNESS_ENTRY(compose_fwd_sum_partials_f32)
LC_HARNESS_ENTRY(compose_fwd_shrink_naive_bf16)
LC_HARNESS_ENTRY(compose_fwd_expand_naive_bf16)
LC_HARNESS_ENTRY(compose_fwd_shrink_tiled_bf16)
LC_HARNESS_ENTRY(compose_fwd_shrink_reduce_bf16)
LC_HARNESS_ENTRY(compose_fwd_expand_tiled_bf16)
LC_HARNESS_ENTRY(compose_fwd_sum_partials_bf16)
