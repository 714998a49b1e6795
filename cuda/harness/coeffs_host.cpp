// CPU-harness build of cuda/coeffs.cu: the unchanged kernel source compiled as C++17, plus one
// extern "C" launch entry per kernel for src/harness.rs.
#include "../coeffs.cu"

LC_HARNESS_ENTRY(coeffs_softmax_row_f32)
LC_HARNESS_ENTRY(coeffs_softmax_warp_f32)
LC_HARNESS_ENTRY(coeffs_softmax_bwd_row_f32)
LC_HARNESS_ENTRY(coeffs_softmax_bwd_warp_f32)
