// CPU-harness build of cuda/loss.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../loss.cu"

LC_HARNESS_ENTRY(loss_pool_fwd_f32)
LC_HARNESS_ENTRY(loss_pool_bwd_f32)
LC_HARNESS_ENTRY(loss_xent_row_f32)
LC_HARNESS_ENTRY(loss_xent_warp_f32)
LC_HARNESS_ENTRY(loss_pool_fwd_bf16)
LC_HARNESS_ENTRY(loss_pool_bwd_bf16)
LC_HARNESS_ENTRY(loss_xent_row_bf16)
LC_HARNESS_ENTRY(loss_xent_warp_bf16)
LC_HARNESS_ENTRY(loss_xent_mean_f32)
