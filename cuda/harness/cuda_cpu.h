// CPU execution harness: the subset of CUDA C++ that the kernels in cuda/ use, so the same
// kernel source compiles with g++ (C++17) and runs on the CPU. Included only through
// cuda/common.cuh, and only when __CUDACC__ is not defined. cuda/README.md lists what is
// supported and how the harness exposes races.
//
// Execution model: a launch runs its blocks one after another, in a seeded order, on the calling
// OS thread; each block's threads are fibers that run until they reach a barrier (__syncthreads,
// a warp shuffle/vote, __syncwarp) or exit. Between barriers the fibers run in a seeded order.
// All harness state is thread-local, so independent launches may run on several OS threads.
//
// Memory checking: kernels are compiled with GCC's -fsanitize=thread instrumentation (build.rs),
// and memcheck.cpp receives every load and store: device memory lives in one arena of
// allocations (lc_harness_alloc), shared memory in another, and each access is checked for
// bounds, initialisation and races against shadow memory (cuda/README.md).
#pragma once
#ifdef __CUDACC__
#error "cuda_cpu.h is the CPU harness; nvcc builds use the real CUDA headers"
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- qualifiers: no-ops on the CPU ----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// __restrict__ is a g++ keyword already.

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
};
constexpr int warpSize = 32;

namespace lc_harness {

// What a fiber is waiting for when it hands control back to the block scheduler.
enum class Wait : int { Running, BlockBarrier, WarpSync, GridBarrier, Exited };

// The part of a fiber that kernels (threadIdx, the warp intrinsics) and the memory checker see.
struct FiberView {
    uint3 thread_idx;
    unsigned tid;   // linear thread index in the block
    unsigned lane;  // tid % 32
    unsigned warp;  // tid / 32
    // Happens-before clock over the lanes of this thread's warp: vc[l] is the newest epoch of
    // lane l that this thread has synchronised with through warp syncs; vc[lane] is this
    // thread's own epoch, stamped on its accesses (memcheck.cpp, DESIGN §6).
    uint32_t vc[32];
};

extern __thread FiberView* t_current;
extern __thread uint3 t_block_idx;
extern __thread dim3 t_block_dim;
extern __thread dim3 t_grid_dim;

// Hands control back to the scheduler until the barrier `wait` is released.
// `warp_mask` is the participating-lane mask of a warp-level barrier.
void yield_to_scheduler(Wait wait, unsigned warp_mask);
// A __syncthreads at call site `site` ("file:line").
void block_barrier(const char* site);
// A grid-wide barrier (cooperative_groups' grid.sync()) at call site `site`: every thread of
// every block of a cooperative launch (LaunchDims::flags & kCooperative) waits there; the
// blocks' earlier accesses are ordered before everything after it.
void grid_barrier(const char* site);
// Ends the launch with an error (reported to Rust through lc_harness_last_error).
[[noreturn]] void fail(const char* message);

// Per-lane exchange slots of the current warp, double-buffered by generation so a lane that
// races ahead to the next shuffle cannot overwrite a value another lane has yet to read.
uint64_t* warp_slots_for_write();
const uint64_t* warp_slots_for_read();

// ---- launch -------------------------------------------------------------------------------
// Mirrors `HarnessLaunch` in src/harness.rs (repr(C)).
struct LaunchDims {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t dynamic_shared_bytes;
    uint32_t flags;  // kCooperative
    uint64_t seed;   // thread and block order: 0 forward, 1 reverse, else a seeded permutation
};
// A cooperative launch (cuLaunchCooperativeKernel): its blocks are co-resident and may meet at
// grid barriers. The harness co-schedules them: each block runs to the barrier, is set aside
// (its fibers' stacks, shared memory and checker state saved), and all resume once every block
// has arrived.
constexpr uint32_t kCooperative = 1;

// What the memory checker knows of one kernel argument: pointers are checked against the
// harness allocations (a write through a pointer to const is an error); scalars are ignored.
struct ParamInfo {
    uint64_t value;          // the pointer's address (0 for scalars)
    uint32_t pointee_bytes;  // sizeof(*p), for offsets in elements
    uint8_t is_pointer;
    uint8_t is_const;
};

using Invoke = void (*)(void* ctx);
// Runs the grid; returns 0, or 1 with the message available from lc_harness_last_error().
int run_grid(const char* kernel, const LaunchDims* dims, const ParamInfo* params, size_t n_params, Invoke invoke,
             void* ctx);

template <class T>
T read_param(void* const p) {
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
}

template <class A>
ParamInfo describe_param(const A& value) {
    ParamInfo info{0, 0, 0, 0};
    if constexpr (std::is_pointer<A>::value) {
        using E = typename std::remove_pointer<A>::type;
        info.value = reinterpret_cast<uint64_t>(value);
        if constexpr (std::is_void<E>::value)
            info.pointee_bytes = 1;
        else
            info.pointee_bytes = sizeof(E);
        info.is_pointer = 1;
        info.is_const = std::is_const<E>::value ? 1 : 0;
    }
    return info;
}

template <class... Args, size_t... I>
std::tuple<Args...> unpack_params(void* const* params, std::index_sequence<I...>) {
    return std::tuple<Args...>{read_param<Args>(params[I])...};
}

// Launches `kernel` like cuLaunchKernel: params[i] points at the i-th argument's value.
template <class... Args>
int launch(void (*kernel)(Args...), const char* name, const LaunchDims* dims, void* const* params) {
    struct Bound {
        void (*kernel)(Args...);
        std::tuple<Args...> args;
    };
    Bound bound{kernel, unpack_params<Args...>(params, std::index_sequence_for<Args...>{})};
    ParamInfo infos[sizeof...(Args) + 1] = {};
    std::apply(
        [&infos](const Args&... a) {
            size_t i = 0;
            ((infos[i++] = describe_param(a)), ...);
        },
        bound.args);
    return run_grid(
        name, dims, infos, sizeof...(Args),
        [](void* p) {
            auto* b = static_cast<Bound*>(p);
            std::apply(b->kernel, b->args);
        },
        &bound);
}

}  // namespace lc_harness

// One extern "C" entry per kernel, called from Rust (src/harness.rs).
#define LC_HARNESS_ENTRY(kernel)                                                        \
    extern "C" int lc_run_##kernel(const ::lc_harness::LaunchDims* dims,                \
                                   void* const* params) {                               \
        return ::lc_harness::launch(kernel, #kernel, dims, params);                      \
    }

// ---- built-in variables -------------------------------------------------------------------
#define threadIdx (::lc_harness::t_current->thread_idx)
#define blockIdx (::lc_harness::t_block_idx)
#define blockDim (::lc_harness::t_block_dim)
#define gridDim (::lc_harness::t_grid_dim)

// ---- shared memory ------------------------------------------------------------------------
// Static shared arrays live in the harness's shared-memory arena (one per OS thread, since
// blocks run one after another on it), each between red zones, so an access past an array is
// caught; the array is poisoned and forgotten (unwritten) at the start of every block. A plain
// __shared__ variable would escape the checker: kernels use SHARED / EXTERN_SHARED.
namespace lc_harness {
struct SharedSite {
    SharedSite(const char* name, size_t bytes, size_t element_bytes);
    void* address;
};
void* dynamic_shared();
}  // namespace lc_harness
#define __shared__ static_assert(false, "use SHARED(type, name, dims) or EXTERN_SHARED: plain __shared__ is unchecked");
#define SHARED(type, name, dims)                                                                       \
    static thread_local ::lc_harness::SharedSite name##_site(#name, sizeof(type dims), sizeof(type)); \
    type(&name) dims = *reinterpret_cast<type(*) dims>(name##_site.address)
#define EXTERN_SHARED(type, name) type* name = static_cast<type*>(::lc_harness::dynamic_shared())

// ---- synchronisation ----------------------------------------------------------------------
// A block barrier remembers its call site: threads of one block waiting at different
// __syncthreads calls is an error (divergent barrier), as compute-sanitizer's synccheck says.
#define LC_HARNESS_STR2(x) #x
#define LC_HARNESS_STR(x) LC_HARNESS_STR2(x)
#define __syncthreads() ::lc_harness::block_barrier(__FILE__ ":" LC_HARNESS_STR(__LINE__))
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    ::lc_harness::yield_to_scheduler(::lc_harness::Wait::WarpSync, mask);
}
inline void __threadfence_block() {}
// A device-scope fence (memcheck.cpp): with the atomics, the harness's model of ordering between
// blocks. The thread's accesses so far (and what a __syncthreads ordered before them) are
// released by its next atomics on device memory; what its atomics since its last fence read
// (the releases of other blocks on those addresses) is acquired from here on.
void __threadfence();

// ---- warp shuffles and votes --------------------------------------------------------------
namespace lc_harness {
template <class T>
T exchange(unsigned mask, T value, int src_lane, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a 1-8 byte value");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width must be a power of two <= 32");
    uint64_t bits = 0;
    std::memcpy(&bits, &value, sizeof(T));
    warp_slots_for_write()[t_current->lane] = bits;
    yield_to_scheduler(Wait::WarpSync, mask);
    const unsigned segment = t_current->lane & ~unsigned(width - 1);
    const unsigned src = segment + (unsigned(src_lane) & unsigned(width - 1));
    // A source lane outside the mask (or past a partial last warp) has no defined value: it
    // reads as the poison pattern, so a kernel that depends on it fails its test.
    const uint64_t out = warp_slots_for_read()[src];
    T result;
    std::memcpy(&result, &out, sizeof(T));
    return result;
}
inline unsigned vote(unsigned mask, bool predicate) {
    warp_slots_for_write()[t_current->lane] = predicate ? 1 : 0;
    yield_to_scheduler(Wait::WarpSync, mask);
    const uint64_t* slots = warp_slots_for_read();
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
        if (slots[l] == 1) ballot |= 1u << l;  // absent lanes read as poison, never 1
    return ballot;
}
}  // namespace lc_harness

template <class T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return ::lc_harness::exchange(mask, var, src_lane, width);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    const unsigned lane = ::lc_harness::t_current->lane;
    return ::lc_harness::exchange(mask, var, int((lane ^ unsigned(lane_mask)) & unsigned(width - 1)), width);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    // Lanes whose source would fall past the segment keep their own value (as on the GPU).
    const unsigned in_segment = ::lc_harness::t_current->lane & unsigned(width - 1);
    const bool keep = in_segment + delta >= unsigned(width);
    T shuffled = ::lc_harness::exchange(mask, var, int(keep ? in_segment : in_segment + delta), width);
    return keep ? var : shuffled;
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    const unsigned in_segment = ::lc_harness::t_current->lane & unsigned(width - 1);
    const bool keep = in_segment < delta;
    T shuffled = ::lc_harness::exchange(mask, var, int(keep ? in_segment : in_segment - delta), width);
    return keep ? var : shuffled;
}
inline unsigned __ballot_sync(unsigned mask, int predicate) { return ::lc_harness::vote(mask, predicate != 0); }
inline int __any_sync(unsigned mask, int predicate) { return ::lc_harness::vote(mask, predicate != 0) != 0; }
inline int __all_sync(unsigned mask, int predicate) { return ::lc_harness::vote(mask, predicate == 0) == 0; }

// ---- tensor cores and asynchronous copies (sm_80): warp-collective emulations --------------
// cuda/common.cuh wraps these as lc::mma_m16n8k16, lc::ldmatrix, lc::cp_async*: inline PTX on a
// GPU, these calls here. mma and ldmatrix are .sync.aligned: every lane of the warp must reach
// the same instruction (a full-mask warp barrier, like a shuffle's), and the lanes exchange
// their register fragments through the warp's slots. The fragment layouts are the PTX ISA's
// (runtime.cpp, memcheck.cpp); src/harness/selftest/tensorcore.rs checks them against CuTe's
// traits.
namespace lc_harness {
// Every lane of `mask` deposits `bits` and meets the others at a warp barrier; returns the
// warp's 32 deposits (absent lanes read as poison), valid until this lane's next warp sync.
inline const uint64_t* warp_gather(unsigned mask, uint64_t bits) {
    warp_slots_for_write()[t_current->lane] = bits;
    yield_to_scheduler(Wait::WarpSync, mask);
    return warp_slots_for_read();
}
enum class MmaInput : int { F16, BF16 };
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32: d = a·b + c for this lane's
// fragments (a: 4 registers of 2 halves, b: 2, c/d: 4 floats). d may alias c.
void mma_m16n8k16(MmaInput input, float* d, const uint32_t* a, const uint32_t* b, const float* c);
// ldmatrix.sync.aligned.m8n8.x{count}{.trans}.shared.b16: lanes 0..8·count-1 give the row
// addresses (16-byte aligned shared memory) of `count` 8x8 b16 matrices; r[i] receives this
// lane's two elements of matrix i.
void ldmatrix(int count, bool trans, uint32_t* r, const void* row_address);
// cp.async.{ca,cg}.shared.global [dst], [src], bytes: the source is read now; the destination
// stays poisoned (unwritten) until a cp.async.wait_group completes the copy's group.
void cp_async(void* dst, const void* src, int bytes, const char* instruction);
void cp_async_commit();                 // cp.async.commit_group
void cp_async_wait(int pending_groups);  // cp.async.wait_group N (wait_all: commit, then 0)
// prefetch.global.L2 [p]: a hint, no access. A GPU ignores a bad address; the harness reports an
// address that no buffer of the launch holds (wrong address arithmetic).
void prefetch_l2(const void* p);

// ---- warpgroup MMA (sm_90a): an emulation of wgmma.mma_async with both operands in shared --
// memory. cuda/wgmma.cuh wraps these as lc::wgmma_*, inline PTX on a GPU. A warpgroup is 4
// consecutive warps (threads 128·g … 128·g + 127); each thread computes its own accumulators
// (m64nNk16's layout: warp w of the group holds rows 16·w + lane/4 (+ 8), columns
// 8·j + 2·(lane % 4) (+ 1)), reading A and B through the descriptors as the PTX ISA's canonical
// no-swizzle ("interleave") layouts define them (memcheck.cpp). The operation is asynchronous as
// on the GPU: issuing reads the operands (checked for races, initialisation and a missing
// fence.proxy.async) and poisons the accumulators with NaN; wgmma_wait completes the committed
// groups, checking the operands are unchanged since issue, and writes the accumulators back.
// So reading the accumulators before the wait, overwriting an operand in flight, or a missing
// wgmma.fence / commit / wait each give wrong numbers or a report.
// The address a descriptor holds: the byte offset of `p` in the shared window (the harness's
// window starts 4 KiB before dynamic shared memory; a descriptor holds 18 bits, so static
// shared arrays, placed past 256 KiB here, cannot be wgmma operands: use dynamic shared memory).
uint32_t shared_window_address(const void* p);
// wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{f16,bf16}.{f16,bf16} d, desc_a, desc_b,
// scale_d, 1, 1, trans_a, trans_b: d = A·B + (scale_d ? d : 0); d holds n / 2 floats.
void wgmma(MmaInput input, int n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d, int trans_a, int trans_b);
void wgmma_fence();            // wgmma.fence.sync.aligned
void wgmma_commit();           // wgmma.commit_group.sync.aligned
void wgmma_wait(int pending);  // wgmma.wait_group.sync.aligned N
void fence_proxy_async();      // fence.proxy.async.shared::cta
}  // namespace lc_harness

// ---- atomics ------------------------------------------------------------------------------
// Real atomic read-modify-writes (memcheck.cpp), recorded as atomic accesses: two atomics on
// one address never race, an atomic and a plain access between two barriers do. The overloads
// are CUDA's; an atomic on another type does not compile, as under nvcc.
int atomicAdd(int* address, int value);
unsigned atomicAdd(unsigned* address, unsigned value);
unsigned long long atomicAdd(unsigned long long* address, unsigned long long value);
float atomicAdd(float* address, float value);
double atomicAdd(double* address, double value);
int atomicMax(int* address, int value);
unsigned atomicMax(unsigned* address, unsigned value);
unsigned long long atomicMax(unsigned long long* address, unsigned long long value);
int atomicMin(int* address, int value);
unsigned atomicMin(unsigned* address, unsigned value);
unsigned long long atomicMin(unsigned long long* address, unsigned long long value);
int atomicExch(int* address, int value);
unsigned atomicExch(unsigned* address, unsigned value);
unsigned long long atomicExch(unsigned long long* address, unsigned long long value);
float atomicExch(float* address, float value);
int atomicCAS(int* address, int compare, int value);
unsigned atomicCAS(unsigned* address, unsigned compare, unsigned value);
unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare, unsigned long long value);

// ---- math ---------------------------------------------------------------------------------
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
template <class T>
T __ldg(const T* p) { return *p; }
using std::fmaxf;
using std::fminf;
using std::min;
using std::max;

#include "half_cpu.h"
