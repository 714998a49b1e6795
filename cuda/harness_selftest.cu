// Small kernels that exercise the CPU harness itself (src/harness/selftest.rs): warp shuffles
// and votes, atomics, dynamic shared memory, and the errors it must report. They are valid CUDA
// too, so the PTX build checks that the harness subset compiles under nvcc. One block each;
// `in`/`out` hold one element per thread unless noted.
#include "common.cuh"

// out[t] = sum of in over t's warp (xor butterfly); lanes past a partial warp are absent.
extern "C" __global__ void selftest_warp_sum(const float* in, float* out) {
    const int t = threadIdx.x;
    float v = in[t];
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    out[t] = v;
}

// out[4t..4t+4) = shfl from lane+3 (wrapping), shfl_down by 1, shfl_up by 2, shfl within 8-wide
// segments from segment lane 0.
extern "C" __global__ void selftest_shuffles(const float* in, float* out) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    const float v = in[t];
    out[4 * t + 0] = __shfl_sync(0xffffffffu, v, (lane + 3) % 32);
    out[4 * t + 1] = __shfl_down_sync(0xffffffffu, v, 1);
    out[4 * t + 2] = __shfl_up_sync(0xffffffffu, v, 2);
    out[4 * t + 3] = __shfl_sync(0xffffffffu, v, 0, 8);
}

// votes[3 w ..] = ballot, any, all of (in[t] > 0) over warp w.
extern "C" __global__ void selftest_votes(const float* in, unsigned* votes) {
    const int t = threadIdx.x;
    const bool positive = in[t] > 0.0f;
    const unsigned ballot = __ballot_sync(0xffffffffu, positive);
    const int any = __any_sync(0xffffffffu, positive);
    const int all = __all_sync(0xffffffffu, positive);
    if (t % 32 == 0) {
        votes[3 * (t / 32) + 0] = ballot;
        votes[3 * (t / 32) + 1] = (unsigned)any;
        votes[3 * (t / 32) + 2] = (unsigned)all;
    }
}

// total[0] += in[t] for every thread; count[0] += 1 for every thread.
extern "C" __global__ void selftest_atomics(const float* in, float* total, int* count) {
    atomicAdd(total, in[threadIdx.x]);
    atomicAdd(count, 1);
}

// out[t] = in[n - 1 - t] through dynamic shared memory; `synchronize` = 0 drops the barrier
// (a planted race the harness must expose).
extern "C" __global__ void selftest_reverse(const float* in, float* out, int synchronize) {
    EXTERN_SHARED(float, staged);
    const int t = threadIdx.x;
    const int n = blockDim.x;
    staged[t] = in[t];
    if (synchronize) __syncthreads();
    out[t] = staged[n - 1 - t];
}

// Threads below `exit_below` return before a __syncthreads the others wait at.
extern "C" __global__ void selftest_barrier_divergence(float* out, int exit_below) {
    if ((int)threadIdx.x < exit_below) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Only lanes below 16 reach a full-warp shuffle.
extern "C" __global__ void selftest_warp_divergence(float* out) {
    const int t = threadIdx.x;
    if (t % 32 < 16) out[t] = __shfl_sync(0xffffffffu, (float)t, 0);
}
