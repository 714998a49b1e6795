// CPU-harness build of cuda/harness_selftest.cu (see gemm_host.cpp).
#include "../harness_selftest.cu"

LC_HARNESS_ENTRY(selftest_warp_sum)
LC_HARNESS_ENTRY(selftest_shuffles)
LC_HARNESS_ENTRY(selftest_votes)
LC_HARNESS_ENTRY(selftest_atomics)
LC_HARNESS_ENTRY(selftest_reverse)
LC_HARNESS_ENTRY(selftest_barrier_divergence)
LC_HARNESS_ENTRY(selftest_warp_divergence)
