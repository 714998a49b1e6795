// State shared by the harness's scheduler (runtime.cpp) and its memory checker (memcheck.cpp).
// Neither file is compiled with instrumentation; the kernels are (build.rs), so every load and
// store a kernel makes reaches memcheck.cpp through the ThreadSanitizer entry points
// (__tsan_read4, …) that GCC's -fsanitize=thread pass emits. The ThreadSanitizer runtime is
// never linked: memcheck.cpp defines those entry points itself.
#pragma once

#include "cuda_cpu.h"

#include <string>
#include <vector>

namespace lc_harness {

constexpr unsigned kMaxThreads = 1024;
constexpr unsigned kMaxWarps = kMaxThreads / 32;

// One launch as the memory checker sees it (set up by run_grid, read by memcheck.cpp).
struct LaunchState {
    const char* kernel = "";
    const ParamInfo* params = nullptr;
    size_t n_params = 0;
    const char* const* param_names = nullptr;  // n_params names, or null when unknown
    uint32_t stamp = 0;        // unique per launch on this OS thread (never 0)
    uint32_t block_stamp = 0;  // unique per block run on this OS thread (never 0)
    uint32_t block = 0;        // linear index of the running block in the grid
    bool cooperative = false;  // its blocks may meet at grid barriers
    // Per thread of the running block: its epoch when it last passed a block barrier. Accesses
    // of thread t with epoch <= barrier_epoch[t] are ordered before everything that follows.
    std::vector<uint32_t> barrier_epoch;
};

// Non-null exactly while run_grid executes on this OS thread.
extern __thread LaunchState* t_launch;

// memcheck.cpp, called by the scheduler. begin_launch checks that every pointer argument is
// null or points into a harness allocation (false, with the error set, otherwise).
bool memcheck_begin_launch(LaunchState& launch);
void memcheck_end_launch();
// An uninitialised read is reported when every thread of the block has reached a barrier or
// exited (so that a racing write by another thread, the likelier bug, is reported instead when
// there is one): false, with the error set, if one is pending.
bool memcheck_pending_ok();
// Poisons the static and dynamic shared memory and forgets who wrote it (a new block).
bool shared_begin_block(size_t dynamic_bytes);
// A __syncthreads was released: what each thread acquired from other blocks (a fence after an
// atomic) now holds for every thread of the block.
void memcheck_block_barrier();
// A block of a cooperative launch set aside at a grid barrier: its shared memory (static and
// dynamic, contents and shadow) and its threads' cp.async and wgmma state, saved; resumed (and
// freed) before the block runs on; discarded (null: nothing) when the launch ends early.
struct SavedShared;
SavedShared* shared_suspend();
void shared_resume(SavedShared* saved);
void shared_discard(SavedShared* saved);

// Most blocks a cooperative launch may have on the harness (each set-aside block holds its
// stacks and shared memory): the Rust side plans cooperative grids of at most
// `HARNESS_COOPERATIVE_BLOCKS` (src/launch.rs).
constexpr uint64_t kMaxCooperativeBlocks = 64;

// runtime.cpp.
[[noreturn]] void fail(const std::string& message);
void set_launch_error(const std::string& message);  // outside a fiber: records, does not switch
std::string block_name(uint32_t linear_block);
std::string thread_name(uint32_t tid);

}  // namespace lc_harness
