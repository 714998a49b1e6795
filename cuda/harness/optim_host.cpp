// CPU-harness build of cuda/optim.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../optim.cu"

LC_HARNESS_ENTRY(optim_adamw_f32)
LC_HARNESS_ENTRY(optim_sq_partials_f32)
LC_HARNESS_ENTRY(optim_clip_scale_f32)
LC_HARNESS_ENTRY(optim_adamw_bf16)
LC_HARNESS_ENTRY(optim_sq_partials_bf16)
LC_HARNESS_ENTRY(optim_clip_scale_bf16)
LC_HARNESS_ENTRY(optim_norm_finish_f32)
