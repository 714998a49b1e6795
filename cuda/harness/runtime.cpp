// CPU harness runtime: the block scheduler, fiber context switches, the happens-before clocks of
// barriers and warp syncs, and error reporting behind cuda_cpu.h. Memory checking is in
// memcheck.cpp. See cuda/README.md for the execution model.
#include "internal.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#if !defined(__x86_64__) || defined(LC_HARNESS_UCONTEXT)
#define LC_HARNESS_USE_UCONTEXT 1
#include <ucontext.h>
#endif

extern "C" void lc_harness_fiber_entry();

namespace lc_harness {

__thread FiberView* t_current = nullptr;
__thread uint3 t_block_idx = {0, 0, 0};
__thread dim3 t_block_dim = {1, 1, 1};
__thread dim3 t_grid_dim = {1, 1, 1};
__thread LaunchState* t_launch = nullptr;

namespace {

constexpr size_t kStackBytes = 64 * 1024;  // kernels keep tiles in shared memory, not on the stack

// ---- context switch -------------------------------------------------------------------------
#ifndef LC_HARNESS_USE_UCONTEXT
// x86-64 System V: save the callee-saved registers, MXCSR and the x87 control word on the old
// stack, swap stack pointers, restore from the new one. No signal-mask system call, unlike
// swapcontext (DESIGN §4 measured ~1 µs per swapcontext).
extern "C" void lc_harness_switch(void** save_sp, void* load_sp);
extern "C" void lc_harness_trampoline();
asm(R"(
    .text
    .globl lc_harness_switch
    .hidden lc_harness_switch
    .type lc_harness_switch,@function
lc_harness_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lc_harness_switch, .-lc_harness_switch

    .globl lc_harness_trampoline
    .hidden lc_harness_trampoline
    .type lc_harness_trampoline,@function
lc_harness_trampoline:
    callq *%r13
    ud2
    .size lc_harness_trampoline, .-lc_harness_trampoline
)");

struct Context {
    void* sp = nullptr;
};

void switch_context(Context& from, Context& to) { lc_harness_switch(&from.sp, to.sp); }

// Lays out a fresh stack so that the first switch into it "returns" into the trampoline with
// r13 = entry and a 16-byte aligned stack pointer at the call.
void init_context(Context& c, char* stack, size_t bytes) {
    uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
    auto* slot = reinterpret_cast<uint64_t*>(top);
    slot[-1] = 0;                                                   // padding
    slot[-2] = 0;                                                   // padding
    slot[-3] = reinterpret_cast<uint64_t>(&lc_harness_trampoline);  // return address
    slot[-4] = 0;                                                   // rbp
    slot[-5] = 0;                                                   // rbx
    slot[-6] = 0;                                                   // r12
    slot[-7] = reinterpret_cast<uint64_t>(&lc_harness_fiber_entry);  // r13
    slot[-8] = 0;                                                   // r14
    slot[-9] = 0;                                                   // r15
    uint32_t mxcsr;
    uint16_t fpu_control;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpu_control));
    uint64_t control = uint64_t(mxcsr) | (uint64_t(fpu_control) << 32);
    slot[-10] = control;
    c.sp = &slot[-10];
}
#else
// Portable fallback (any POSIX target): ucontext, ~1 µs per switch.
struct Context {
    ucontext_t uc;
};

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

void init_context(Context& c, char* stack, size_t bytes) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack;
    c.uc.uc_stack.ss_size = bytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, &lc_harness_fiber_entry, 0);
}
#endif

struct Fiber {
    FiberView view;
    Wait wait;
    unsigned warp_mask;
    const char* barrier_site;  // the __syncthreads it waits at
    Context context;
    uint64_t inbox[32];  // this lane's copy of its warp's slots at the last warp sync
    char* parked;        // an address in its frame at its last hand-back (grid barriers: stack saving)
};

// A block of a cooperative launch set aside at a grid barrier: its fibers, the live part of
// each fiber's stack (every block's thread t runs on stack t, so the bytes go back to the same
// addresses and every pointer into them stays valid), its shared memory and checker state.
struct SavedBlock {
    std::vector<Fiber> fibers;
    std::vector<std::vector<char>> stacks;  // per fiber: the bytes from its low water to the top
    uint32_t block_stamp = 0;
    std::vector<uint32_t> barrier_epoch;
    SavedShared* shared = nullptr;
    enum State : uint8_t { NotStarted, Parked, Ended } state = NotStarted;
    ~SavedBlock() { shared_discard(shared); }
};

struct Runtime {
    std::vector<Fiber> fibers;
    char* stacks = nullptr;  // one mapping: per fiber a guard page, then its stack
    size_t stack_capacity = 0;
    Context scheduler;
    Fiber* running = nullptr;
    Invoke invoke = nullptr;
    void* invoke_ctx = nullptr;
    bool failed = false;
    std::string error;
    uint64_t outbox[kMaxWarps][32];
    std::vector<unsigned> order;
    std::vector<uint64_t> block_order;
    LaunchState launch;
    uint32_t flags = 0;   // LaunchDims::flags of the running launch
    uint32_t stamps = 0;  // launch and block-run stamps, never 0
};

Runtime& runtime() {
    static thread_local Runtime rt;
    return rt;
}

size_t page_size() { return size_t(sysconf(_SC_PAGESIZE)); }

bool ensure_stacks(Runtime& rt, size_t threads) {
    if (threads <= rt.stack_capacity) return true;
    const size_t per_fiber = kStackBytes + page_size();
    if (rt.stacks) munmap(rt.stacks, rt.stack_capacity * per_fiber);
    rt.stacks = nullptr;
    rt.stack_capacity = 0;
    void* p = mmap(nullptr, threads * per_fiber, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return false;
    rt.stacks = static_cast<char*>(p);
    rt.stack_capacity = threads;
    // A stack overflow hits the guard page and crashes loudly instead of corrupting a neighbour.
    for (size_t i = 0; i < threads; ++i) mprotect(rt.stacks + i * per_fiber, page_size(), PROT_NONE);
    return true;
}

char* stack_of(Runtime& rt, size_t i) { return rt.stacks + i * (kStackBytes + page_size()) + page_size(); }

// splitmix64: a small, well-mixed generator for the thread orders.
uint64_t mix(uint64_t& state) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void order_ready_fibers(Runtime& rt, uint64_t seed, uint64_t block, uint64_t sweep) {
    rt.order.clear();
    for (unsigned i = 0; i < rt.fibers.size(); ++i)
        if (rt.fibers[i].wait == Wait::Running) rt.order.push_back(i);
    if (seed == 0) return;
    if (seed == 1) {
        std::reverse(rt.order.begin(), rt.order.end());
        return;
    }
    uint64_t state = seed ^ (block * 0x632be59bd9b4e019ull) ^ (sweep * 0x85157af5ull);
    for (size_t i = rt.order.size(); i > 1; --i) std::swap(rt.order[i - 1], rt.order[mix(state) % i]);
}

void set_error(Runtime& rt, const std::string& message) {
    if (rt.failed) return;
    rt.failed = true;
    char where[96];
    std::snprintf(where, sizeof where, " [block (%u,%u,%u)]", t_block_idx.x, t_block_idx.y, t_block_idx.z);
    rt.error = message + where;
}

std::string thread_name(const Fiber& f) { return lc_harness::thread_name(f.view.tid); }

uint32_t next_stamp(Runtime& rt) {
    if (++rt.stamps == 0) ++rt.stamps;
    return rt.stamps;
}

// Releases every group of lanes whose warp-level barrier is complete. Returns how many lanes
// were released; sets an error for a barrier that can never complete.
size_t release_warp_syncs(Runtime& rt) {
    const size_t threads = rt.fibers.size();
    size_t released = 0;
    for (const Fiber& f : rt.fibers) {
        if (f.wait == Wait::WarpSync && !(f.warp_mask & (1u << f.view.lane))) {
            set_error(rt, thread_name(f) + " calls a warp intrinsic with a mask that excludes its own lane");
            return 0;
        }
    }
    for (Fiber& f : rt.fibers) {
        if (f.wait != Wait::WarpSync) continue;
        const unsigned mask = f.warp_mask;
        const unsigned base = f.view.warp * 32;
        const size_t lanes_here = threads - base < 32 ? threads - base : 32;
        const unsigned existing = lanes_here == 32 ? 0xffffffffu : ((1u << lanes_here) - 1);
        const unsigned group = mask & existing;
        for (unsigned l = 0; l < 32; ++l) {
            if (!(group & (1u << l))) continue;
            const Fiber& other = rt.fibers[base + l];
            if (other.wait != Wait::WarpSync || other.warp_mask != mask) {
                const char* state = other.wait == Wait::Exited         ? "has exited"
                                    : other.wait == Wait::BlockBarrier ? "waits at __syncthreads"
                                                                       : "waits at a warp sync with another mask";
                set_error(rt, "warp divergence: " + thread_name(f) + " waits at a warp shuffle/vote/__syncwarp while " +
                                  thread_name(other) + " (in its mask) " + state);
                return 0;
            }
        }
        // What the group's lanes deposited; absent lanes and lanes outside the mask read as
        // poison.
        uint64_t deposited[32];
        for (unsigned l = 0; l < 32; ++l) deposited[l] = (group & (1u << l)) ? rt.outbox[f.view.warp][l] : ~uint64_t(0);
        // A warp sync orders what each lane of the group did before it before what every lane
        // of the group does after it: join the lanes' clocks, then each starts a new epoch.
        uint32_t joined[32] = {};
        for (unsigned l = 0; l < 32; ++l) {
            if (!(group & (1u << l))) continue;
            const uint32_t* vc = rt.fibers[base + l].view.vc;
            for (unsigned k = 0; k < 32; ++k) joined[k] = std::max(joined[k], vc[k]);
        }
        for (unsigned l = 0; l < 32; ++l) {
            if (!(group & (1u << l))) continue;
            Fiber& lane = rt.fibers[base + l];
            std::memcpy(lane.inbox, deposited, sizeof lane.inbox);
            std::memcpy(lane.view.vc, joined, sizeof joined);
            ++lane.view.vc[l];
            lane.wait = Wait::Running;
            ++released;
        }
    }
    return released;
}

// How a block's run ended: an error, every thread exited, or (cooperative launches) every
// thread waits at one grid barrier.
enum class BlockEnd { Failed, Exited, AtGridBarrier };

// Runs one block until every thread has exited or waits at a grid barrier.
BlockEnd run_block(Runtime& rt, uint64_t seed, uint64_t block) {
    for (uint64_t sweep = 0;; ++sweep) {
        order_ready_fibers(rt, seed, block, sweep);
        for (unsigned i : rt.order) {
            Fiber& f = rt.fibers[i];
            rt.running = &f;
            t_current = &f.view;
            switch_context(rt.scheduler, f.context);
            if (rt.failed) return BlockEnd::Failed;
        }
        rt.running = nullptr;
        t_current = nullptr;
        if (release_warp_syncs(rt) > 0) continue;
        if (rt.failed) return BlockEnd::Failed;
        // Every thread waits at __syncthreads or has exited: an unwritten read that no racing
        // write explained by now is reported as such.
        if (!memcheck_pending_ok()) return BlockEnd::Failed;
        size_t at_barrier = 0, at_grid = 0;
        const Fiber* exited = nullptr;
        const Fiber* waiting = nullptr;
        const Fiber* grid_waiting = nullptr;
        for (const Fiber& f : rt.fibers) {
            if (f.wait == Wait::BlockBarrier) {
                ++at_barrier;
                waiting = &f;
            } else if (f.wait == Wait::GridBarrier) {
                ++at_grid;
                grid_waiting = &f;
            } else if (f.wait == Wait::Exited) {
                exited = &f;
            }
        }
        if (at_barrier == 0 && at_grid == 0) return BlockEnd::Exited;  // every thread has exited
        if (at_grid > 0) {
            // grid.sync() waits for every thread of the grid: all of this block's must be there.
            if (waiting) {
                set_error(rt, "divergent barrier: " + thread_name(*grid_waiting) + " waits at the grid barrier at " +
                                  grid_waiting->barrier_site + " while " + thread_name(*waiting) +
                                  " waits at __syncthreads at " + waiting->barrier_site);
                return BlockEnd::Failed;
            }
            if (exited) {
                set_error(rt, "grid barrier divergence: " + thread_name(*grid_waiting) + " (and " +
                                  std::to_string(at_grid - 1) + " more) wait at the grid barrier at " +
                                  grid_waiting->barrier_site + " while " + thread_name(*exited) +
                                  " has exited (a grid barrier needs every thread of the grid)");
                return BlockEnd::Failed;
            }
            waiting = grid_waiting;
        } else if (exited) {
            set_error(rt, "barrier divergence: " + thread_name(*waiting) + " (and " + std::to_string(at_barrier - 1) +
                              " more) wait at __syncthreads while " + thread_name(*exited) + " has exited");
            return BlockEnd::Failed;
        }
        for (const Fiber& f : rt.fibers) {
            if (f.barrier_site != waiting->barrier_site && std::strcmp(f.barrier_site, waiting->barrier_site) != 0) {
                const char* what = at_grid > 0 ? "the grid barrier" : "__syncthreads";
                set_error(rt, std::string("divergent barrier: ") + thread_name(f) + " waits at " + what + " at " +
                                  f.barrier_site + " while " + thread_name(*waiting) + " waits at " +
                                  waiting->barrier_site);
                return BlockEnd::Failed;
            }
        }
        if (at_grid > 0) return BlockEnd::AtGridBarrier;
        // Everything before the barrier is ordered before everything after it.
        for (Fiber& f : rt.fibers) {
            rt.launch.barrier_epoch[f.view.tid] = f.view.vc[f.view.lane];
            ++f.view.vc[f.view.lane];
            f.wait = Wait::Running;
        }
        memcheck_block_barrier();
    }
}

}  // namespace

void yield_to_scheduler(Wait wait, unsigned warp_mask) {
    Runtime& rt = runtime();
    Fiber* f = rt.running;
    if (!f) {
        std::fprintf(stderr, "lc_harness: barrier called outside a kernel launch\n");
        std::abort();
    }
    f->wait = wait;
    f->warp_mask = warp_mask;
    char here;
    f->parked = &here;
    switch_context(f->context, rt.scheduler);
}

void block_barrier(const char* site) {
    Runtime& rt = runtime();
    if (rt.running) rt.running->barrier_site = site;
    yield_to_scheduler(Wait::BlockBarrier, 0);
}

void grid_barrier(const char* site) {
    Runtime& rt = runtime();
    if (rt.running && !(rt.flags & kCooperative))
        fail(std::string("grid barrier at ") + site +
             " in a launch that is not cooperative: on a GPU its blocks need not be co-resident, and it may never "
             "return (launch the kernel cooperatively: `Kernel::cooperative`)");
    if (rt.running) rt.running->barrier_site = site;
    yield_to_scheduler(Wait::GridBarrier, 0);
}

void fail(const std::string& message) { fail(message.c_str()); }

void set_launch_error(const std::string& message) { set_error(runtime(), message); }

std::string block_name(uint32_t linear) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "(%u,%u,%u)", linear % t_grid_dim.x, (linear / t_grid_dim.x) % t_grid_dim.y,
                  linear / (t_grid_dim.x * t_grid_dim.y));
    return buf;
}

std::string thread_name(uint32_t tid) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "thread (%u,%u,%u)", tid % t_block_dim.x, (tid / t_block_dim.x) % t_block_dim.y,
                  tid / (t_block_dim.x * t_block_dim.y));
    return buf;
}

void fail(const char* message) {
    Runtime& rt = runtime();
    set_error(rt, message);
    if (!rt.running) {
        std::fprintf(stderr, "lc_harness: %s (outside a kernel launch)\n", message);
        std::abort();
    }
    // The launch is abandoned: this fiber is never resumed and its stack is reused.
    switch_context(rt.running->context, rt.scheduler);
    __builtin_unreachable();
}

uint64_t* warp_slots_for_write() { return runtime().outbox[t_current->warp]; }
const uint64_t* warp_slots_for_read() { return runtime().running->inbox; }

// ---- mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 --------------------------
// Fragment layouts from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), with groupID = lane >> 2 and threadID_in_group = lane % 4. Register r of a fragment
// holds two 16-bit elements, the lower-indexed one in the low half.
namespace {
struct FragmentSlot {
    unsigned lane, reg, half;
};
// A (16x16, row-major): a0..a7 in registers {a0,a1} {a2,a3} {a4,a5} {a6,a7}; a0,a1,a4,a5 at row
// groupID and a2,a3,a6,a7 at row groupID + 8; column threadID_in_group·2 + (i & 1), plus 8 for
// a4..a7.
FragmentSlot mma_a_slot(unsigned row, unsigned col) { return {(row % 8) * 4 + (col % 8) / 2, row / 8 + 2 * (col / 8), col % 2}; }
// B (16x8, "col": k down, n across): b0..b3 in registers {b0,b1} {b2,b3}; row (k)
// threadID_in_group·2 + (i & 1), plus 8 for b2,b3; column (n) groupID.
FragmentSlot mma_b_slot(unsigned k, unsigned n) { return {n * 4 + (k % 8) / 2, k / 8, k % 2}; }
// C/D (16x8): c0,c1 at row groupID, c2,c3 at groupID + 8; column threadID_in_group·2 + (i & 1).
unsigned mma_c_row(unsigned lane, unsigned i) { return lane / 4 + 8 * (i / 2); }
unsigned mma_c_col(unsigned lane, unsigned i) { return 2 * (lane % 4) + i % 2; }

float half_of(uint32_t reg, unsigned half, MmaInput input) {
    const uint16_t bits = uint16_t(reg >> (16 * half));
    return input == MmaInput::BF16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}
}  // namespace

void mma_m16n8k16(MmaInput input, float* d, const uint32_t* a, const uint32_t* b, const float* c) {
    // Three full-warp exchanges: A's registers 0-1, A's 2-3, B's 0-1 of every lane.
    uint32_t warp_a[32][4], warp_b[32][2];
    const uint64_t* slots = warp_gather(0xffffffffu, uint64_t(a[0]) | uint64_t(a[1]) << 32);
    for (unsigned l = 0; l < 32; ++l) warp_a[l][0] = uint32_t(slots[l]), warp_a[l][1] = uint32_t(slots[l] >> 32);
    slots = warp_gather(0xffffffffu, uint64_t(a[2]) | uint64_t(a[3]) << 32);
    for (unsigned l = 0; l < 32; ++l) warp_a[l][2] = uint32_t(slots[l]), warp_a[l][3] = uint32_t(slots[l] >> 32);
    slots = warp_gather(0xffffffffu, uint64_t(b[0]) | uint64_t(b[1]) << 32);
    for (unsigned l = 0; l < 32; ++l) warp_b[l][0] = uint32_t(slots[l]), warp_b[l][1] = uint32_t(slots[l] >> 32);
    const unsigned lane = t_current->lane;
    float out[4];
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = mma_c_row(lane, i), col = mma_c_col(lane, i);
        // Products of two 16-bit floats are exact in f32; the sum is accumulated in f32.
        float acc = c[i];
        for (unsigned k = 0; k < 16; ++k) {
            const FragmentSlot sa = mma_a_slot(row, k), sb = mma_b_slot(k, col);
            acc += half_of(warp_a[sa.lane][sa.reg], sa.half, input) * half_of(warp_b[sb.lane][sb.reg], sb.half, input);
        }
        out[i] = acc;
    }
    for (unsigned i = 0; i < 4; ++i) d[i] = out[i];
}

namespace {
// The order blocks run in: forward, reverse, or a seeded permutation.
void order_blocks(Runtime& rt, uint64_t blocks, uint64_t seed) {
    rt.block_order.resize(blocks);
    for (uint64_t n = 0; n < blocks; ++n) rt.block_order[n] = seed == 1 ? blocks - 1 - n : n;
    if (seed < 2) return;
    uint64_t state = seed * 0xd1342543de82ef95ull + 0x2545f4914f6cdd1dull;
    for (uint64_t i = blocks; i > 1; --i) std::swap(rt.block_order[i - 1], rt.block_order[mix(state) % i]);
}

void set_block_index(Runtime& rt, const LaunchDims* dims, uint64_t b) {
    t_block_idx = {unsigned(b % dims->grid[0]), unsigned((b / dims->grid[0]) % dims->grid[1]),
                   unsigned(b / (uint64_t(dims->grid[0]) * dims->grid[1]))};
    rt.launch.block = uint32_t(b);
}

// Fresh fibers, shared memory and stamps for block b; false on error.
bool start_block(Runtime& rt, const LaunchDims* dims, uint64_t threads, uint64_t b) {
    set_block_index(rt, dims, b);
    rt.launch.block_stamp = next_stamp(rt);
    rt.launch.barrier_epoch.assign(threads, 0);
    if (!shared_begin_block(dims->dynamic_shared_bytes)) return false;
    rt.fibers.resize(threads);
    for (uint64_t t = 0; t < threads; ++t) {
        Fiber& f = rt.fibers[t];
        f.view.thread_idx = {unsigned(t % dims->block[0]), unsigned((t / dims->block[0]) % dims->block[1]),
                             unsigned(t / (uint64_t(dims->block[0]) * dims->block[1]))};
        f.view.tid = unsigned(t);
        f.view.lane = unsigned(t % 32);
        f.view.warp = unsigned(t / 32);
        std::memset(f.view.vc, 0, sizeof f.view.vc);
        f.view.vc[f.view.lane] = 1;
        f.wait = Wait::Running;
        f.warp_mask = 0;
        f.barrier_site = "";
        f.parked = nullptr;
        init_context(f.context, stack_of(rt, t), kStackBytes);
    }
    return true;
}

// The lowest stack address a parked fiber still uses: its saved stack pointer, or (ucontext,
// whose stack pointer is opaque) an address in the frame that parked it less a margin for the
// frames of the switch below it.
char* stack_low(const Fiber& f) {
#ifndef LC_HARNESS_USE_UCONTEXT
    return static_cast<char*>(f.context.sp);
#else
    return f.parked - 4096;
#endif
}

// Sets the running block aside at a grid barrier.
void save_block(Runtime& rt, SavedBlock& saved) {
    saved.stacks.resize(rt.fibers.size());
    for (size_t t = 0; t < rt.fibers.size(); ++t) {
        std::vector<char>& bytes = saved.stacks[t];
        bytes.clear();
        if (rt.fibers[t].wait == Wait::Exited) continue;
        char* top = stack_of(rt, t) + kStackBytes;
        char* low = std::max(stack_low(rt.fibers[t]), stack_of(rt, t));
        bytes.assign(low, top);
    }
    saved.fibers = std::move(rt.fibers);
    rt.fibers.clear();
    saved.block_stamp = rt.launch.block_stamp;
    saved.barrier_epoch = std::move(rt.launch.barrier_epoch);
    saved.shared = shared_suspend();
    saved.state = SavedBlock::Parked;
}

// Resumes a block set aside at a grid barrier, past the barrier: like a __syncthreads, it
// orders each thread's earlier accesses before every thread's later ones.
void resume_block(Runtime& rt, const LaunchDims* dims, uint64_t b, SavedBlock& saved) {
    set_block_index(rt, dims, b);
    rt.fibers = std::move(saved.fibers);
    saved.fibers.clear();
    for (size_t t = 0; t < rt.fibers.size(); ++t) {
        const std::vector<char>& bytes = saved.stacks[t];
        std::memcpy(stack_of(rt, t) + kStackBytes - bytes.size(), bytes.data(), bytes.size());
    }
    rt.launch.block_stamp = saved.block_stamp;
    rt.launch.barrier_epoch = std::move(saved.barrier_epoch);
    shared_resume(saved.shared);
    saved.shared = nullptr;
    saved.state = SavedBlock::Ended;  // until it parks again
    for (Fiber& f : rt.fibers) {
        if (f.wait != Wait::GridBarrier) continue;
        rt.launch.barrier_epoch[f.view.tid] = f.view.vc[f.view.lane];
        ++f.view.vc[f.view.lane];
        f.wait = Wait::Running;
    }
}

// A cooperative launch: every block runs to its first grid barrier (or to its end) in the
// launch's block order and is set aside; when all have arrived they resume, one after another,
// to the next barrier; and so on. A block that ends while others wait at a barrier is an error
// (on a GPU the others would wait forever). The barrier ends the device memory's happens-before
// records (a new stamp, as between launches): everything before it is ordered before
// everything after it, in every block.
int run_cooperative(Runtime& rt, const LaunchDims* dims, uint64_t threads, uint64_t blocks) {
    if (blocks > kMaxCooperativeBlocks) {
        set_error(rt, "cooperative launch of " + std::to_string(blocks) + " blocks: the harness co-schedules at most " +
                          std::to_string(kMaxCooperativeBlocks));
        return 1;
    }
    std::vector<SavedBlock> saved(blocks);
    for (uint64_t phase = 0;; ++phase) {
        order_blocks(rt, blocks, dims->seed < 2 ? dims->seed : dims->seed + 7919 * phase);
        uint64_t arrived = 0, waiter = 0;
        for (uint64_t n = 0; n < blocks; ++n) {
            const uint64_t b = rt.block_order[n];
            if (saved[b].state == SavedBlock::Ended) continue;
            if (saved[b].state == SavedBlock::NotStarted) {
                if (!start_block(rt, dims, threads, b)) return 1;
                saved[b].state = SavedBlock::Ended;  // until it parks
            } else {
                resume_block(rt, dims, b, saved[b]);
            }
            const BlockEnd end = run_block(rt, dims->seed, b);
            if (end == BlockEnd::Failed) return 1;
            if (end == BlockEnd::AtGridBarrier) {
                save_block(rt, saved[b]);
                ++arrived;
                waiter = b;
            }
        }
        if (arrived == 0) return 0;
        if (arrived != blocks) {
            uint64_t ended = 0;
            while (saved[ended].state != SavedBlock::Ended) ++ended;
            set_block_index(rt, dims, waiter);
            set_error(rt, "grid barrier divergence: block " + block_name(uint32_t(waiter)) +
                              " waits at the grid barrier at " + saved[waiter].fibers[0].barrier_site + " while block " +
                              block_name(uint32_t(ended)) +
                              " has exited (a grid barrier needs every block of the grid)");
            return 1;
        }
        rt.launch.stamp = next_stamp(rt);
    }
}

int run_blocks(Runtime& rt, const LaunchDims* dims, uint64_t threads, uint64_t blocks) {
    if (!memcheck_begin_launch(rt.launch)) return 1;
    if (dims->flags & kCooperative) return run_cooperative(rt, dims, threads, blocks);
    order_blocks(rt, blocks, dims->seed);
    for (uint64_t n = 0; n < blocks; ++n) {
        const uint64_t b = rt.block_order[n];
        if (!start_block(rt, dims, threads, b)) return 1;
        if (run_block(rt, dims->seed, b) != BlockEnd::Exited) return 1;
    }
    return 0;
}
}  // namespace

int run_grid(const char* kernel, const LaunchDims* dims, const ParamInfo* params, size_t n_params, Invoke invoke,
             void* ctx) {
    Runtime& rt = runtime();
    rt.failed = false;
    rt.error.clear();
    t_block_idx = {0, 0, 0};
    const uint64_t threads = uint64_t(dims->block[0]) * dims->block[1] * dims->block[2];
    const uint64_t blocks = uint64_t(dims->grid[0]) * dims->grid[1] * dims->grid[2];
    if (threads == 0 || threads > kMaxThreads || blocks == 0) {
        set_error(rt, "invalid launch: block must have 1..=1024 threads and the grid at least one block");
        return 1;
    }
    if (!ensure_stacks(rt, threads)) {
        set_error(rt, "cannot map fiber stacks");
        return 1;
    }
    rt.invoke = invoke;
    rt.invoke_ctx = ctx;
    rt.flags = dims->flags;
    rt.launch.cooperative = (dims->flags & kCooperative) != 0;
    rt.fibers.resize(threads);
    t_block_dim = {dims->block[0], dims->block[1], dims->block[2]};
    t_grid_dim = {dims->grid[0], dims->grid[1], dims->grid[2]};
    rt.launch.kernel = kernel;
    rt.launch.params = params;
    rt.launch.n_params = n_params;
    rt.launch.stamp = next_stamp(rt);
    t_launch = &rt.launch;
    const int status = run_blocks(rt, dims, threads, blocks);
    t_launch = nullptr;
    memcheck_end_launch();
    rt.running = nullptr;
    t_current = nullptr;
    return status;
}

}  // namespace lc_harness

extern "C" void lc_harness_fiber_entry() {
    lc_harness::Runtime& rt = lc_harness::runtime();
    rt.invoke(rt.invoke_ctx);
    lc_harness::Fiber* f = rt.running;
    f->wait = lc_harness::Wait::Exited;
    lc_harness::switch_context(f->context, rt.scheduler);
    __builtin_unreachable();
}

// ---- entries used by src/harness.rs --------------------------------------------------------
extern "C" const char* lc_harness_last_error() { return lc_harness::runtime().error.c_str(); }
extern "C" uint16_t lc_harness_f32_to_f16_bits(float f) { return lc_harness::f32_to_f16_bits(f); }
extern "C" float lc_harness_f16_bits_to_f32(uint16_t h) { return lc_harness::f16_bits_to_f32(h); }
extern "C" uint16_t lc_harness_f32_to_bf16_bits(float f) { return lc_harness::f32_to_bf16_bits(f); }
extern "C" float lc_harness_bf16_bits_to_f32(uint16_t b) { return lc_harness::bf16_bits_to_f32(b); }
