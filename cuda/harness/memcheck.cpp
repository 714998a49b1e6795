// The harness's memory checker: what compute-sanitizer's memcheck, initcheck and racecheck do on
// a GPU, done on the CPU for every access a kernel makes (cuda/README.md, DESIGN §6).
//
// How accesses arrive: the kernel sources are compiled with GCC's -fsanitize=thread, which calls
// __tsan_read4(addr), __tsan_write8(addr), … before every load and store that may touch memory
// other than the thread's own locals. The ThreadSanitizer runtime is not linked; this file
// defines those entry points. This file itself is not instrumented.
//
// Where memory lives:
// - device memory: one arena of virtual memory (kArenaBytes, reserved without commit). Each
//   allocation starts on a 64 KiB chunk and is followed by at least one unused chunk, so no
//   access past one buffer lands in another; a per-chunk owner table finds an address's
//   allocation in O(1). Each allocation has a per-granule "written" map (initcheck).
// - shared memory: one arena per OS thread. The launch's dynamic shared memory sits at a fixed
//   place; each SHARED array (one per call site) gets its own place, all between red zones.
//
// Shadow memory: a record per 2-byte granule (the smallest element, bf16/f16) remembering the
// last write and the two most recent distinct readers (block, thread, epoch, atomic), valid for
// one launch (device memory) or one block run (shared memory). An access by thread B conflicts
// with a recorded access by thread A when one of them writes, not both are atomic, and A's
// access is not ordered before B's. In one block, A's access is ordered if A passed a
// __syncthreads since (barrier_epoch), or if A is in B's warp and B has since synchronised with A
// through a warp sync / _sync intrinsic (B's vector clock). Blocks are ordered only by a release
// that the other block acquires (ordering between blocks, below), or by a cooperative launch's
// grid barrier (a new stamp).
#include "internal.h"

#include <sys/mman.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>

namespace lc_harness {

// Parameter names of every kernel, parsed from cuda/*.cu by build.rs: {pattern, "a,b,c"}.
// A pattern ending in "##" matches that prefix followed by a dtype suffix; "family:*" matches
// any kernel of the family that no other pattern matches (kernels named by a macro parameter).
struct KernelParams {
    const char* pattern;
    const char* names;
};
#include "lc_kernel_params.inc"

namespace {

constexpr size_t kChunkShift = 16;
constexpr size_t kChunkBytes = size_t(1) << kChunkShift;
constexpr size_t kArenaBytes = size_t(16) << 30;
constexpr size_t kChunks = kArenaBytes >> kChunkShift;
constexpr unsigned kGranuleShift = 1;  // shadow per 2 bytes

// ---- shadow records -------------------------------------------------------------------------
enum : uint16_t { kValid = 1, kAtomic = 2 };
enum : uint32_t { kManyReadBlocks = 1, kSharedWritten = 2 };

struct Access {
    uint32_t block;
    uint32_t epoch;
    uint16_t tid;
    uint16_t flags;
};

struct Record {
    uint32_t stamp;       // launch (device memory) or block run (shared memory) it belongs to
    uint32_t read_block;  // 1 + first block that read it in this launch, 0 if none
    uint32_t flags;
    Access write, read1, read2;  // read1 is the most recent reader, read2 another thread
};
static_assert(sizeof(Record) == 48, "shadow record layout");

enum class Kind { Read, Write, Atomic };

// ---- device allocations -----------------------------------------------------------------------
struct Allocation {
    uintptr_t base;
    size_t bytes;
    size_t first_chunk, chunks;  // chunks includes the trailing unused one
    std::atomic<uint8_t>* written;  // per granule
};

struct Arena {
    uintptr_t base = 0;
    std::mutex mutex;
    std::map<size_t, size_t> free_chunks;  // first chunk -> count
    std::atomic<Allocation*>* owner = nullptr;
    std::vector<Record*> thread_shadows;  // every OS thread's shadow of the arena
};

uintptr_t g_arena_base = 0;  // 0 until the arena exists
std::atomic<Allocation*>* g_owner = nullptr;

Arena& arena() {
    static Arena* a = [] {
        auto* arena = new Arena;
        void* p = mmap(nullptr, kArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        void* owners = mmap(nullptr, kChunks * sizeof(std::atomic<Allocation*>), PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED || owners == MAP_FAILED) {
            std::fprintf(stderr, "lc_harness: cannot reserve %zu GiB of address space for device memory\n",
                         kArenaBytes >> 30);
            std::abort();
        }
        arena->base = reinterpret_cast<uintptr_t>(p);
        arena->owner = static_cast<std::atomic<Allocation*>*>(owners);  // zero pages: all null
        arena->free_chunks[1] = kChunks - 1;  // chunk 0 stays unused: nothing precedes the first buffer
        g_owner = arena->owner;
        g_arena_base = arena->base;
        return arena;
    }();
    return *a;
}

size_t granules(size_t bytes) { return (bytes + (size_t(1) << kGranuleShift) - 1) >> kGranuleShift; }

// This OS thread's shadow of the device arena, reserved on first use and released at thread exit.
struct ThreadShadow {
    Record* records = nullptr;
    ~ThreadShadow() {
        if (!records) return;
        Arena& a = arena();
        std::lock_guard<std::mutex> lock(a.mutex);
        for (auto& r : a.thread_shadows)
            if (r == records) r = nullptr;
        munmap(records, (kArenaBytes >> kGranuleShift) * sizeof(Record));
    }
};
thread_local ThreadShadow t_shadow;

Record* device_shadow() {
    if (t_shadow.records) return t_shadow.records;
    Arena& a = arena();
    void* p = mmap(nullptr, (kArenaBytes >> kGranuleShift) * sizeof(Record), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        std::fprintf(stderr, "lc_harness: cannot reserve shadow memory for the device arena\n");
        std::abort();
    }
    t_shadow.records = static_cast<Record*>(p);
    std::lock_guard<std::mutex> lock(a.mutex);
    a.thread_shadows.push_back(t_shadow.records);
    return t_shadow.records;
}

// Returns the pages of [begin, end) to the system (they read as zero afterwards).
void release_pages(uintptr_t begin, uintptr_t end) {
    const uintptr_t page = 4096;
    begin = (begin + page - 1) & ~(page - 1);
    end &= ~(page - 1);
    if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

// ---- shared memory ----------------------------------------------------------------------------
constexpr size_t kSharedArenaBytes = size_t(8) << 20;
constexpr size_t kSharedUnitShift = 6;  // owner map per 64 bytes
constexpr size_t kRedZone = 256;
constexpr size_t kDynamicOffset = 4096;
constexpr size_t kDynamicCapacity = size_t(256) << 10;  // more than any GPU's 227 KiB per block
constexpr uint16_t kDynamicOwner = 0xffff;

struct SiteInfo {
    const char* name;
    size_t offset, bytes, element_bytes;
};

struct SharedArena {
    uintptr_t base = 0;
    size_t next = kDynamicOffset + kDynamicCapacity + kRedZone;
    size_t dynamic_bytes = 0;
    std::vector<SiteInfo> sites;
    std::vector<uint16_t> owner;  // per 64-byte unit: 0 red zone, site index + 1, or kDynamicOwner
    Record* shadow = nullptr;

    SharedArena() {
        void* p = mmap(nullptr, kSharedArenaBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        void* s = mmap(nullptr, (kSharedArenaBytes >> kGranuleShift) * sizeof(Record), PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED || s == MAP_FAILED) {
            std::fprintf(stderr, "lc_harness: cannot reserve the shared-memory arena\n");
            std::abort();
        }
        base = reinterpret_cast<uintptr_t>(p);
        shadow = static_cast<Record*>(s);
        owner.assign(kSharedArenaBytes >> kSharedUnitShift, 0);
        for (size_t u = kDynamicOffset >> kSharedUnitShift; u < (kDynamicOffset + kDynamicCapacity) >> kSharedUnitShift;
             ++u)
            owner[u] = kDynamicOwner;
    }
    ~SharedArena() {
        munmap(reinterpret_cast<void*>(base), kSharedArenaBytes);
        munmap(shadow, (kSharedArenaBytes >> kGranuleShift) * sizeof(Record));
    }
};

SharedArena& shared_arena() {
    static thread_local SharedArena a;
    return a;
}
__thread SharedArena* t_shared = nullptr;  // set with the arena's first use on this thread

// ---- per-launch view of the arguments ---------------------------------------------------------
struct LaunchBuffer {
    Allocation* allocation;
    bool writable;  // some non-const pointer argument points into it
};

// Per OS thread: the launch's buffers, and (as __thread plain data, read on every access without
// a thread_local initialisation guard) the last buffer accessed, the device shadow and whether an
// unwritten read is pending.
struct Checker {
    std::string pending;  // the first unwritten read of this barrier interval, if any
    std::vector<LaunchBuffer> buffers;
};
thread_local Checker t_checker;
__thread Allocation* t_last = nullptr;
__thread bool t_last_writable = false;
__thread Record* t_device_shadow = nullptr;
__thread bool t_pending = false;

// One cp.async in flight: its source bytes (read at issue) and the commit group it belongs to.
struct AsyncCopy {
    uintptr_t dst;
    uint32_t group;
    uint32_t bytes;
    uint8_t data[16];
};
struct AsyncState {
    std::vector<AsyncCopy> in_flight;
    uint32_t committed = 0;  // groups committed so far; uncommitted copies carry this number
};
// Per thread of the running block (reset at every block start).
thread_local std::vector<AsyncState> t_async;

// One wgmma.mma_async in flight for one thread: the operand elements its accumulators need
// (their shared addresses and the bits read at issue), and where its result goes.
struct WgmmaOp {
    float* d;
    uint32_t group;
    uint16_t n;
    uint8_t scale_d;
    MmaInput input;
    std::vector<uintptr_t> a_addr, b_addr;  // [2 rows][16 k], [n/8 · 2 columns][16 k]
    std::vector<uint16_t> a_bits, b_bits;
};
// An accumulator array with operations in flight: its value, which the kernel's registers
// (poisoned with NaN meanwhile) receive when the last of them completes.
struct WgmmaAcc {
    float* d;
    uint16_t n;
    std::vector<float> value;
};
struct WgmmaState {
    std::vector<WgmmaOp> in_flight;
    std::vector<WgmmaAcc> accumulators;
    uint32_t committed = 0;
    uint32_t issued = 0;      // wgmma issued so far (the warpgroup's warps must agree on each)
    bool fenced = false;      // a wgmma.fence since the last commit
    uint32_t proxy_epoch = 0;  // this thread's epoch at its last fence.proxy.async (0: none)
};
thread_local std::vector<WgmmaState> t_wgmma;
// Per warpgroup of the running block: the operands of its k-th wgmma (descriptors, N, scale-d)
// as the first of its warps to issue it gave them; the other three must give the same.
thread_local std::vector<std::vector<std::pair<uint64_t, uint64_t>>> t_wgmma_issues;

const char* const* find_param_names(const char* kernel, size_t n_params) {
    static thread_local std::map<std::string, std::vector<std::string>> cache_strings;
    static thread_local std::map<std::string, std::vector<const char*>> cache;
    auto hit = cache.find(kernel);
    if (hit != cache.end()) return hit->second.size() == n_params ? hit->second.data() : nullptr;
    const std::string name = kernel;
    const KernelParams* exact = nullptr;
    const KernelParams* suffixed = nullptr;
    const KernelParams* family = nullptr;
    for (const KernelParams& k : kKernelParams) {
        const std::string pattern = k.pattern;
        if (pattern == name) {
            exact = &k;
        } else if (pattern.size() > 2 && pattern.compare(pattern.size() - 2, 2, "##") == 0) {
            const std::string prefix = pattern.substr(0, pattern.size() - 2);
            const std::string rest = name.size() > prefix.size() ? name.substr(prefix.size()) : "";
            if (name.compare(0, prefix.size(), prefix) == 0 && (rest == "f32" || rest == "f16" || rest == "bf16"))
                suffixed = &k;
        } else if (pattern.size() > 2 && pattern.compare(pattern.size() - 2, 2, ":*") == 0) {
            const std::string prefix = pattern.substr(0, pattern.size() - 2) + "_";
            if (name.compare(0, prefix.size(), prefix) == 0) family = &k;
        }
    }
    const KernelParams* found = exact ? exact : suffixed ? suffixed : family;
    std::vector<std::string>& strings = cache_strings[name];
    std::vector<const char*>& names = cache[name];
    if (found) {
        std::string all = found->names;
        size_t start = 0;
        while (start <= all.size()) {
            const size_t comma = all.find(',', start);
            strings.push_back(all.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
            if (comma == std::string::npos) break;
            start = comma + 1;
        }
        for (const std::string& s : strings) names.push_back(s.c_str());
    }
    return names.size() == n_params ? names.data() : nullptr;
}

// "`work`" or "argument 9".
std::string param_label(const LaunchState& l, size_t i) {
    if (l.param_names) return std::string("`") + l.param_names[i] + "`";
    return "argument " + std::to_string(i);
}

// The argument through which `a` is best described: the one pointing into `alloc` at the
// highest address <= a (or the lowest one when a lies before them all).
std::string describe_device(const LaunchState& l, const Allocation* alloc, uintptr_t a) {
    long best = -1;
    for (size_t i = 0; i < l.n_params; ++i) {
        const ParamInfo& p = l.params[i];
        if (!p.is_pointer || p.value < alloc->base || p.value > alloc->base + alloc->bytes) continue;
        if (best < 0) {
            best = long(i);
            continue;
        }
        const ParamInfo& b = l.params[best];
        const bool p_below = p.value <= a, b_below = b.value <= a;
        if ((p_below && (!b_below || p.value > b.value)) || (!p_below && !b_below && p.value < b.value))
            best = long(i);
    }
    char buf[160];
    if (best < 0) {
        std::snprintf(buf, sizeof buf, "a %zu-byte harness buffer that is not an argument of this launch, byte %lld",
                      alloc->bytes, (long long)(a - alloc->base));
        return buf;
    }
    const ParamInfo& p = l.params[best];
    const long long delta = (long long)a - (long long)p.value;
    const long long element = delta >= 0 ? delta / p.pointee_bytes : -((-delta + p.pointee_bytes - 1) / p.pointee_bytes);
    std::snprintf(buf, sizeof buf, "%s[%lld] (%zu-byte buffer)", param_label(l, best).c_str(), element, alloc->bytes);
    return buf;
}

std::string describe_shared(uintptr_t a) {
    SharedArena& s = *t_shared;
    const size_t off = a - s.base;
    char buf[160];
    const uint16_t o = s.owner[off >> kSharedUnitShift];
    if (o == kDynamicOwner) {
        std::snprintf(buf, sizeof buf, "dynamic shared memory byte %zu (launched with %zu bytes)", off - kDynamicOffset,
                      s.dynamic_bytes);
        return buf;
    }
    // The site at or below the address (the red zone after an array belongs to it).
    const SiteInfo* site = nullptr;
    for (const SiteInfo& si : s.sites)
        if (si.offset <= off && (!site || si.offset > site->offset)) site = &si;
    if (!site) {
        if (off >= kDynamicOffset) {
            std::snprintf(buf, sizeof buf, "dynamic shared memory byte %zu (launched with %zu bytes)",
                          off - kDynamicOffset, s.dynamic_bytes);
        } else {
            std::snprintf(buf, sizeof buf, "shared memory %zu bytes before the dynamic shared memory",
                          kDynamicOffset - off);
        }
        return buf;
    }
    std::snprintf(buf, sizeof buf, "shared `%s`[%zu] (%zu bytes)", site->name, (off - site->offset) / site->element_bytes,
                  site->bytes);
    return buf;
}

std::string who(const Access& x) { return thread_name(x.tid) + " of block " + block_name(x.block); }

const char* verb(Kind k) { return k == Kind::Read ? "read" : k == Kind::Write ? "write" : "atomic"; }

[[noreturn]] void report_race(const std::string& where, const std::string& earlier, bool other_block, bool same_warp,
                              Kind kind, const Access& me) {
    const char* why = other_block ? (t_launch && t_launch->cooperative
                                         ? "no grid barrier or release/acquire orders them"
                                         : "no release/acquire orders them: blocks of one launch synchronise only "
                                           "through __threadfence then an atomic, read by an atomic then "
                                           "__threadfence")
                      : same_warp ? "no __syncthreads, __syncwarp or _sync intrinsic orders them"
                                  : "no __syncthreads orders them";
    fail(std::string("data race on ") + where + ": " + earlier + ", then " + verb(kind) + " by " + who(me) + " (" +
         why + ")");
}

[[noreturn]] void report_race(const std::string& where, const Access& earlier, bool earlier_write, Kind kind,
                              const Access& me) {
    const char* what = (earlier.flags & kAtomic) ? "atomic" : earlier_write ? "write" : "read";
    report_race(where, std::string(what) + " by " + who(earlier), earlier.block != me.block,
                earlier.tid / 32 == me.tid / 32, kind, me);
}

// ---- ordering between blocks: __threadfence and atomics -------------------------------------
// The PTX memory model's release and acquire patterns at device scope, as CUDA code writes them:
// a thread releases with __threadfence() then an atomic on device memory; a thread of another
// block that reads that atomic's value with its own atomic on the same address acquires with a
// __threadfence() after it. Everything the releasing block did before the fence (its thread's
// accesses, and its other threads' accesses before the last __syncthreads or warp sync the
// releasing thread passed) is then ordered before what the acquiring thread does after its fence,
// and before what every thread of its block does after the next __syncthreads. Releases are
// cumulative (what the releasing block had acquired travels with it), and a location's releases
// accumulate (an atomic read-modify-write extends the release sequence: the block that draws the
// last ticket acquires every earlier block's release). A fence starts a new epoch for its thread,
// so an access between the fence and the releasing atomic is not released.
// Not modelled: spin-waits on a flag (blocks run one after another here: a wait on a block that
// has not run would never end), acquire through a warp sync, and fences of block scope.
//
// A cut of one block's history: the accesses of thread t with epoch <= upto[t].
struct Cut {
    std::vector<uint32_t> upto;
};
// What happened before, in other blocks: a cut per block.
using Knowledge = std::map<uint32_t, std::shared_ptr<const Cut>>;

void join(Knowledge& into, const Knowledge& from) {
    for (const auto& entry : from) {
        auto it = into.find(entry.first);
        if (it == into.end()) {
            into.emplace(entry.first, entry.second);
        } else if (it->second != entry.second) {
            auto merged = std::make_shared<Cut>(*it->second);
            const std::vector<uint32_t>& other = entry.second->upto;
            for (size_t t = 0; t < merged->upto.size() && t < other.size(); ++t)
                merged->upto[t] = std::max(merged->upto[t], other[t]);
            it->second = std::move(merged);
        }
    }
}

// Per thread of the running block (reset at every block start and resume).
struct BlockSync {
    Knowledge block_known;               // acquired by some thread, then a __syncthreads
    std::vector<Knowledge> thread_known;  // acquired by thread t, until the next __syncthreads
    std::vector<Knowledge> atomic_seen;   // releases thread t's atomics read since its last fence
    std::vector<std::shared_ptr<const Knowledge>> release;  // taken at thread t's last fence
};
thread_local BlockSync t_sync;
__thread bool t_sync_known = false;  // some thread of the running block knows a cut: look
// Per launch and grid-barrier interval (the stamp): the releases each atomic address carries.
struct SyncLocations {
    uint32_t stamp = 0;
    std::map<uintptr_t, Knowledge> at;
};
thread_local SyncLocations t_sync_at;

void sync_begin_block(size_t threads) {
    t_sync.block_known.clear();
    t_sync.thread_known.assign(threads, {});
    t_sync.atomic_seen.assign(threads, {});
    t_sync.release.assign(threads, nullptr);
    t_sync_known = false;
}

// Is `x`, an access by another block, ordered before the current thread's access `me`?
bool acquired(const Access& x, const Access& me) {
    auto covers = [&](const Knowledge& k) {
        auto it = k.find(x.block);
        return it != k.end() && x.tid < it->second->upto.size() && x.epoch <= it->second->upto[x.tid];
    };
    return covers(t_sync.block_known) || covers(t_sync.thread_known[me.tid]);
}

// Is `x` (an earlier access of this launch) ordered before the current thread's access?
inline bool ordered(const LaunchState& l, const Access& x, const Access& me) {
    if (x.block != me.block) return t_sync_known && acquired(x, me);
    if (x.tid == me.tid) return true;
    if (x.epoch <= l.barrier_epoch[x.tid]) return true;
    const FiberView* f = t_current;
    return x.tid / 32 == f->warp && x.epoch <= f->vc[x.tid % 32];
}

inline bool same_thread(const Access& x, const Access& me) {
    return (x.flags & kValid) && x.block == me.block && x.tid == me.tid;
}

// Checks and records one granule.
inline void check_granule(const LaunchState& l, Record& r, uint32_t stamp, Kind kind, const Access& me,
                          uintptr_t a, bool shared) {
    if (r.stamp != stamp) r = Record{stamp, 0, 0, {}, {}, {}};
    const bool atomic = kind == Kind::Atomic;
    auto conflicts = [&](const Access& x) {
        return (x.flags & kValid) && !same_thread(x, me) && !(atomic && (x.flags & kAtomic)) && !ordered(l, x, me);
    };
    auto where = [&]() { return shared ? describe_shared(a) : describe_device(l, t_last, a); };
    if (conflicts(r.write)) report_race(where(), r.write, true, kind, me);
    if (kind != Kind::Read) {
        if (conflicts(r.read1)) report_race(where(), r.read1, false, kind, me);
        if (conflicts(r.read2)) report_race(where(), r.read2, false, kind, me);
        // Reads by other blocks of this launch whose thread records were since replaced.
        if (!shared && r.read_block && ((r.flags & kManyReadBlocks) || r.read_block != me.block + 1)) {
            const std::string earlier = r.read_block != me.block + 1
                                            ? "read by block " + block_name(r.read_block - 1)
                                            : std::string("reads by several blocks");
            report_race(where(), earlier, true, false, kind, me);
        }
        r.write = me;
        r.read1 = Access{};
        r.read2 = Access{};
        if (shared) r.flags |= kSharedWritten;
        return;
    }
    if (same_thread(r.read1, me)) {
        r.read1.epoch = me.epoch;
    } else {
        if (!same_thread(r.read2, me)) r.read2 = r.read1;
        r.read1 = me;
    }
    if (!shared) {
        if (r.read_block == 0)
            r.read_block = me.block + 1;
        else if (r.read_block != me.block + 1)
            r.flags |= kManyReadBlocks;
    }
}

[[noreturn]] void report_null(uintptr_t a, size_t size, Kind kind) {
    char buf[128];
    std::snprintf(buf, sizeof buf, "%s of %zu bytes at address %#llx: a null pointer", verb(kind), size,
                  (unsigned long long)a);
    fail(buf);
}

void device_access(const LaunchState& l, uintptr_t a, size_t size, Kind kind) {
    const size_t chunk = (a - g_arena_base) >> kChunkShift;
    Allocation* alloc = g_owner[chunk].load(std::memory_order_relaxed);
    char buf[96];
    if (!alloc || a < alloc->base || a + size > alloc->base + alloc->bytes) {
        // Name the nearest allocation: the owner of this chunk (whose tail this is) or of the
        // next used chunk (whose head lies past the address).
        Allocation* near = alloc;
        for (size_t k = chunk + 1; !near && k < kChunks && k < chunk + 4096; ++k)
            near = g_owner[k].load(std::memory_order_relaxed);
        for (size_t k = chunk; !near && k-- > 0 && k + 4096 > chunk;) near = g_owner[k].load(std::memory_order_relaxed);
        std::snprintf(buf, sizeof buf, "out-of-bounds %s of %zu bytes at ", verb(kind), size);
        if (!near) fail(std::string(buf) + "an address inside the device arena that no buffer owns");
        t_last = near;
        const char* where = a >= near->base + near->bytes ? ": past the end of the buffer"
                            : a < near->base              ? ": before the start of the buffer"
                                                          : ": across the end of the buffer";
        fail(std::string(buf) + describe_device(l, near, a) + where);
    }
    if (alloc != t_last) {
        bool found = false;
        for (const LaunchBuffer& b : t_checker.buffers)
            if (b.allocation == alloc) {
                t_last_writable = b.writable;
                found = true;
            }
        t_last = alloc;
        if (!found) {
            std::snprintf(buf, sizeof buf, "%s of %zu bytes at ", verb(kind), size);
            fail(std::string(buf) + describe_device(l, alloc, a) +
                 ": the kernel was not given this buffer (a stale or computed pointer)");
        }
    }
    if (kind != Kind::Read && !t_last_writable) {
        std::snprintf(buf, sizeof buf, "%s of %zu bytes at ", verb(kind), size);
        fail(std::string(buf) + describe_device(l, alloc, a) +
             ": the kernel receives this buffer only through pointers to const (an input)");
    }
    const size_t g0 = (a - alloc->base) >> kGranuleShift;
    const size_t g1 = (a + size - 1 - alloc->base) >> kGranuleShift;
    if (kind != Kind::Write && !t_pending) {
        for (size_t g = g0; g <= g1; ++g)
            if (!alloc->written[g].load(std::memory_order_relaxed)) {
                std::snprintf(buf, sizeof buf, "uninitialised %s of %zu bytes at ", verb(kind), size);
                t_checker.pending = std::string(buf) + describe_device(l, alloc, a) + " by " +
                                    thread_name(t_current->tid) + ": neither the host nor a kernel has written it";
                t_pending = true;
                break;
            }
    }
    const FiberView* f = t_current;
    const Access me{l.block, f->vc[f->lane], uint16_t(f->tid), uint16_t(kValid | (kind == Kind::Atomic ? kAtomic : 0))};
    Record* shadow = t_device_shadow + ((a - g_arena_base) >> kGranuleShift);
    for (size_t g = g0; g <= g1; ++g) check_granule(l, shadow[g - g0], l.stamp, kind, me, a, false);
    if (kind != Kind::Read)
        for (size_t g = g0; g <= g1; ++g) alloc->written[g].store(1, std::memory_order_relaxed);
}

void shared_access(const LaunchState& l, uintptr_t a, size_t size, Kind kind) {
    SharedArena& s = *t_shared;
    const size_t off = a - s.base, end = off + size;
    char buf[96];
    const uint16_t o = s.owner[off >> kSharedUnitShift];
    bool inside = false;
    if (o == kDynamicOwner)
        inside = end <= kDynamicOffset + s.dynamic_bytes;
    else if (o != 0)
        inside = end <= s.sites[o - 1].offset + s.sites[o - 1].bytes;
    if (!inside) {
        std::snprintf(buf, sizeof buf, "out-of-bounds shared-memory %s of %zu bytes at ", verb(kind), size);
        fail(std::string(buf) + describe_shared(a) + ": past the end of the array");
    }
    const FiberView* f = t_current;
    const Access me{l.block, f->vc[f->lane], uint16_t(f->tid), uint16_t(kValid | (kind == Kind::Atomic ? kAtomic : 0))};
    const size_t g0 = off >> kGranuleShift, g1 = (end - 1) >> kGranuleShift;
    for (size_t g = g0; g <= g1; ++g) {
        Record& r = s.shadow[g];
        if (kind != Kind::Write && !t_pending &&
            (r.stamp != l.block_stamp || !(r.flags & kSharedWritten))) {
            std::snprintf(buf, sizeof buf, "uninitialised shared-memory %s of %zu bytes at ", verb(kind), size);
            t_checker.pending = std::string(buf) + describe_shared(a) + " by " + thread_name(t_current->tid) +
                                ": no thread of this block has written it";
            t_pending = true;
        }
        check_granule(l, r, l.block_stamp, kind, me, a, true);
    }
}

inline void on_access(const void* p, size_t size, Kind kind) {
    const LaunchState* l = t_launch;
    if (!l || size == 0) return;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - g_arena_base < kArenaBytes) {
        device_access(*l, a, size, kind);
    } else if (t_shared && a - t_shared->base < kSharedArenaBytes) {
        shared_access(*l, a, size, kind);
    } else if (a < 65536) {
        report_null(a, size, kind);
    }
    // Anything else is the thread's own memory (stack, harness state): not device memory.
}

}  // namespace

// ---- scheduler interface ------------------------------------------------------------------
bool memcheck_begin_launch(LaunchState& l) {
    Arena& a = arena();
    (void)a;
    Checker& c = t_checker;
    c.buffers.clear();
    c.pending.clear();
    t_pending = false;
    t_last = nullptr;
    t_device_shadow = device_shadow();
    l.param_names = find_param_names(l.kernel, l.n_params);
    for (size_t i = 0; i < l.n_params; ++i) {
        const ParamInfo& p = l.params[i];
        if (!p.is_pointer || p.value == 0) continue;
        const uintptr_t v = p.value;
        Allocation* alloc = v - g_arena_base < kArenaBytes ? g_owner[(v - g_arena_base) >> kChunkShift].load() : nullptr;
        if (!alloc || v < alloc->base || v > alloc->base + alloc->bytes) {
            set_launch_error(param_label(l, i) +
                             " is not a harness buffer (pointers passed to a kernel come from lc_harness_alloc)");
            return false;
        }
        bool seen = false;
        for (LaunchBuffer& b : c.buffers)
            if (b.allocation == alloc) {
                b.writable |= !p.is_const;
                seen = true;
            }
        if (!seen) c.buffers.push_back({alloc, !p.is_const});
    }
    return true;
}

bool memcheck_pending_ok() {
    if (!t_pending) return true;
    set_launch_error(t_checker.pending);
    return false;
}

void memcheck_block_barrier() {
    if (!t_sync_known) return;
    for (Knowledge& k : t_sync.thread_known) {
        join(t_sync.block_known, k);
        k.clear();
    }
}

// __threadfence(): acquires what this thread's atomics read since its last fence, then takes
// the cut its next atomics release (what is ordered before this point, and what this block
// knows of others), and starts a new epoch.
void thread_fence() {
    const LaunchState* l = t_launch;
    FiberView* f = t_current;
    if (!l || !f) return;
    const unsigned tid = f->tid;
    Knowledge& seen = t_sync.atomic_seen[tid];
    if (!seen.empty()) {
        join(t_sync.thread_known[tid], seen);
        seen.clear();
        t_sync_known = true;
    }
    auto cut = std::make_shared<Cut>();
    cut->upto = l->barrier_epoch;
    const size_t base = size_t(f->warp) * 32;
    for (size_t lane = 0; lane < 32 && base + lane < cut->upto.size(); ++lane)
        cut->upto[base + lane] = std::max(cut->upto[base + lane], f->vc[lane]);
    auto release = std::make_shared<Knowledge>(t_sync.block_known);
    join(*release, t_sync.thread_known[tid]);
    join(*release, Knowledge{{l->block, cut}});
    t_sync.release[tid] = std::move(release);
    ++f->vc[f->lane];
}

// After an atomic on `p` by the current thread: it reads the releases the address carries and,
// if the thread has fenced, adds its own.
void atomic_sync(const void* p) {
    const LaunchState* l = t_launch;
    const FiberView* f = t_current;
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!l || !f || a - g_arena_base >= kArenaBytes) return;  // shared-memory atomics: one block
    SyncLocations& s = t_sync_at;
    const std::shared_ptr<const Knowledge>& release = t_sync.release[f->tid];
    if (s.stamp != l->stamp) {
        s.at.clear();
        s.stamp = l->stamp;
    }
    if (s.at.empty() && !release) return;
    auto it = s.at.find(a);
    if (it != s.at.end()) join(t_sync.atomic_seen[f->tid], it->second);
    if (release) join(s.at[a], *release);
}

void memcheck_end_launch() {
    t_checker.pending.clear();
    t_pending = false;
    t_checker.buffers.clear();
    t_last = nullptr;
}

bool shared_begin_block(size_t dynamic_bytes) {
    SharedArena& s = shared_arena();
    t_shared = &s;
    if (dynamic_bytes > kDynamicCapacity) {
        set_launch_error("dynamic shared memory of " + std::to_string(dynamic_bytes) + " bytes exceeds the harness's " +
                         std::to_string(kDynamicCapacity));
        return false;
    }
    s.dynamic_bytes = dynamic_bytes;
    sync_begin_block(size_t(t_block_dim.x) * t_block_dim.y * t_block_dim.z);
    t_async.assign(t_block_dim.x * t_block_dim.y * t_block_dim.z, AsyncState{});
    t_wgmma.assign(t_block_dim.x * t_block_dim.y * t_block_dim.z, WgmmaState{});
    t_wgmma_issues.assign((t_block_dim.x * t_block_dim.y * t_block_dim.z + 127) / 128, {});
    std::memset(reinterpret_cast<void*>(s.base + kDynamicOffset), 0xff, dynamic_bytes);
    for (const SiteInfo& site : s.sites) std::memset(reinterpret_cast<void*>(s.base + site.offset), 0xff, site.bytes);
    return true;
}

void* dynamic_shared() { return reinterpret_cast<void*>(shared_arena().base + kDynamicOffset); }

struct SavedShared {
    size_t dynamic_bytes = 0;
    size_t sites_end = 0;  // the arena's `next` when saved: its static arrays end there
    std::vector<uint8_t> dynamic_data, site_data;
    std::vector<Record> dynamic_shadow, site_shadow;
    std::vector<AsyncState> async;
    std::vector<WgmmaState> wgmma;
    std::vector<std::vector<std::pair<uint64_t, uint64_t>>> wgmma_issues;
};

namespace {
constexpr size_t kSitesBegin = kDynamicOffset + kDynamicCapacity + kRedZone;

void copy_out(const SharedArena& s, size_t begin, size_t end, std::vector<uint8_t>& data, std::vector<Record>& shadow) {
    data.assign(reinterpret_cast<const uint8_t*>(s.base + begin), reinterpret_cast<const uint8_t*>(s.base + end));
    shadow.assign(s.shadow + (begin >> kGranuleShift), s.shadow + (end >> kGranuleShift));
}

void copy_in(SharedArena& s, size_t begin, const std::vector<uint8_t>& data, const std::vector<Record>& shadow) {
    std::memcpy(reinterpret_cast<void*>(s.base + begin), data.data(), data.size());
    std::copy(shadow.begin(), shadow.end(), s.shadow + (begin >> kGranuleShift));
}
}  // namespace

SavedShared* shared_suspend() {
    SharedArena& s = shared_arena();
    auto* saved = new SavedShared;
    saved->dynamic_bytes = s.dynamic_bytes;
    saved->sites_end = s.next;
    const size_t dynamic_end = kDynamicOffset + ((s.dynamic_bytes + 1) & ~size_t(1));
    copy_out(s, kDynamicOffset, dynamic_end, saved->dynamic_data, saved->dynamic_shadow);
    copy_out(s, kSitesBegin, s.next, saved->site_data, saved->site_shadow);
    saved->async.swap(t_async);
    saved->wgmma.swap(t_wgmma);
    saved->wgmma_issues.swap(t_wgmma_issues);
    return saved;
}

// Arrays first reached by other blocks while this one was set aside lie past `sites_end`: their
// shadow records carry those blocks' stamps, so this block sees them unwritten, as it should.
void shared_resume(SavedShared* saved) {
    SharedArena& s = shared_arena();
    t_shared = &s;
    s.dynamic_bytes = saved->dynamic_bytes;
    copy_in(s, kDynamicOffset, saved->dynamic_data, saved->dynamic_shadow);
    copy_in(s, kSitesBegin, saved->site_data, saved->site_shadow);
    t_async.swap(saved->async);
    t_wgmma.swap(saved->wgmma);
    t_wgmma_issues.swap(saved->wgmma_issues);
    // Past a grid barrier everything before it is ordered (a new stamp): what was acquired before
    // it no longer matters.
    sync_begin_block(t_async.size());
    delete saved;
}

void shared_discard(SavedShared* saved) { delete saved; }

SharedSite::SharedSite(const char* name, size_t bytes, size_t element_bytes) {
    SharedArena& s = shared_arena();
    t_shared = &s;
    const size_t offset = (s.next + 63) & ~size_t(63);
    if (offset + bytes + kRedZone > kSharedArenaBytes) {
        std::fprintf(stderr, "lc_harness: shared-memory arena full at array `%s`\n", name);
        std::abort();
    }
    s.next = offset + bytes + kRedZone;
    s.sites.push_back({name, offset, bytes, element_bytes});
    const uint16_t id = uint16_t(s.sites.size());
    for (size_t u = offset >> kSharedUnitShift; u < (offset + bytes + 63) >> kSharedUnitShift; ++u) s.owner[u] = id;
    address = reinterpret_cast<void*>(s.base + offset);
    std::memset(address, 0xff, bytes);  // poisoned, and unwritten for the running block
}

// ---- ldmatrix and cp.async -------------------------------------------------------------------
namespace {
bool in_shared(uintptr_t a) { return t_shared && a - t_shared->base < kSharedArenaBytes; }


[[noreturn]] void fail_at(const char* what, uintptr_t a, const std::string& why) {
    char buf[160];
    std::snprintf(buf, sizeof buf, "%s by %s at address %#llx: ", what, thread_name(t_current->tid).c_str(),
                  (unsigned long long)a);
    fail(std::string(buf) + why);
}
}  // namespace

void ldmatrix(int count, bool trans, uint32_t* r, const void* row_address) {
    if (count != 1 && count != 2 && count != 4) fail("ldmatrix: .x1, .x2 or .x4 only");
    // Lanes 0..8·count-1 each give one row address; every lane receives from every matrix.
    const uint64_t* slots = warp_gather(0xffffffffu, reinterpret_cast<uint64_t>(row_address));
    uintptr_t rows[32];
    for (int l = 0; l < 8 * count; ++l) rows[l] = uintptr_t(slots[l]);
    const unsigned lane = t_current->lane;
    const LaunchState* l = t_launch;
    auto load = [&](uintptr_t row, unsigned byte, unsigned bytes, unsigned source_lane) {
        if (!in_shared(row))
            fail_at("ldmatrix", row, "the row address of lane " + std::to_string(source_lane) + " is not shared memory");
        if (row % 16 != 0)
            fail_at("ldmatrix", row, "the row address of lane " + std::to_string(source_lane) + " is not 16-byte aligned");
        const uintptr_t a = row + byte;
        if (l) shared_access(*l, a, bytes, Kind::Read);
        uint32_t v = 0;
        std::memcpy(&v, reinterpret_cast<const void*>(a), bytes);
        return v;
    };
    for (int i = 0; i < count; ++i) {
        if (!trans) {
            // Row lane/4 of matrix i, elements 2·(lane%4) and 2·(lane%4) + 1.
            const unsigned src = 8 * i + lane / 4;
            r[i] = load(rows[src], 4 * (lane % 4), 4, src);
        } else {
            // Column lane/4 of matrix i, rows 2·(lane%4) and 2·(lane%4) + 1 (the transpose).
            const unsigned src0 = 8 * i + 2 * (lane % 4), src1 = src0 + 1;
            r[i] = load(rows[src0], 2 * (lane / 4), 2, src0) | load(rows[src1], 2 * (lane / 4), 2, src1) << 16;
        }
    }
}

void cp_async(void* dst, const void* src, int bytes, const char* instruction) {
    const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
    if (!in_shared(d)) fail_at(instruction, d, "the destination is not shared memory");
    if (d % unsigned(bytes) != 0 || s % unsigned(bytes) != 0)
        fail_at(instruction, d % unsigned(bytes) ? d : s,
                "source and destination must be aligned to the copy size (" + std::to_string(bytes) + " bytes)");
    if (s - g_arena_base >= kArenaBytes) fail_at(instruction, s, "the source is not device (global) memory");
    const LaunchState* l = t_launch;
    AsyncState& state = t_async[t_current->tid];
    AsyncCopy copy{d, state.committed, uint32_t(bytes), {}};
    if (l) {
        device_access(*l, s, size_t(bytes), Kind::Read);
        // The copy writes its destination: checked now against unordered readers and writers,
        // then unwritten (and poisoned) until a wait completes it.
        shared_access(*l, d, size_t(bytes), Kind::Write);
        SharedArena& sa = *t_shared;
        for (size_t g = (d - sa.base) >> kGranuleShift; g <= (d + bytes - 1 - sa.base) >> kGranuleShift; ++g)
            sa.shadow[g].flags &= ~uint32_t(kSharedWritten);
    }
    std::memcpy(copy.data, src, size_t(bytes));
    std::memset(dst, 0xff, size_t(bytes));
    state.in_flight.push_back(copy);
}

void cp_async_commit() { ++t_async[t_current->tid].committed; }

void prefetch_l2(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a - g_arena_base >= kArenaBytes) fail_at("prefetch.global.L2", a, "the address is not device (global) memory");
    const Allocation* alloc = g_owner[(a - g_arena_base) >> kChunkShift].load(std::memory_order_relaxed);
    bool given = false;
    for (const LaunchBuffer& b : t_checker.buffers) given |= b.allocation == alloc;
    if (!alloc || a < alloc->base || a >= alloc->base + alloc->bytes || !given)
        fail_at("prefetch.global.L2", a,
                "no buffer of the launch holds the address (a GPU ignores the hint; here it is a wrong address)");
}

void cp_async_wait(int pending_groups) {
    AsyncState& state = t_async[t_current->tid];
    const LaunchState* l = t_launch;
    auto& q = state.in_flight;
    size_t kept = 0;
    for (size_t i = 0; i < q.size(); ++i) {
        const AsyncCopy& c = q[i];
        // Complete: committed, and older than the newest `pending_groups` committed groups.
        if (c.group < state.committed && state.committed - c.group > uint32_t(pending_groups)) {
            if (l) shared_access(*l, c.dst, c.bytes, Kind::Write);
            std::memcpy(reinterpret_cast<void*>(c.dst), c.data, c.bytes);
        } else {
            q[kept++] = c;
        }
    }
    q.resize(kept);
}

// ---- wgmma (sm_90a) -------------------------------------------------------------------------
// The PTX ISA's matrix descriptor ("Matrix Descriptor Format" of the asynchronous warpgroup
// MMA): bits 0-13 start address >> 4, 16-29 leading dimension byte offset (LBO) >> 4, 32-45
// stride dimension byte offset (SBO) >> 4, 49-51 base offset, 62-63 swizzle mode (0: none).
// In the no-swizzle canonical layouts an operand is made of 8×8 core matrices of 16-bit
// elements, each 8 rows of 16 contiguous bytes (128 contiguous bytes): K-major, a core
// matrix's rows are along M (or N) and its 16 bytes along K; MN-major ("transposed"), its rows
// are along K and its 16 bytes along M (or N). Core matrices adjacent in K lie LBO bytes apart,
// adjacent in M (or N) SBO bytes apart, for both majors.
uint32_t shared_window_address(const void* p) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (!in_shared(a)) fail_at("a wgmma descriptor", a, "the address is not shared memory");
    const uintptr_t window = a - t_shared->base;
    if (window >= (uintptr_t(1) << 18))
        fail_at("a wgmma descriptor", a,
                "past the 256 KiB a descriptor's 14-bit start address reaches (in the harness static shared arrays "
                "lie there: give wgmma operands dynamic shared memory)");
    return uint32_t(window);
}

namespace {
struct Descriptor {
    uintptr_t start, lbo, sbo;
};

Descriptor decode_descriptor(uint64_t desc, const char* operand) {
    const unsigned swizzle = unsigned(desc >> 62), base_offset = unsigned(desc >> 49) & 7;
    if (swizzle != 0)
        fail(std::string("wgmma: the descriptor of ") + operand + " asks for swizzle mode " + std::to_string(swizzle) +
             "; the harness emulates the no-swizzle layout only");
    if (base_offset != 0) fail(std::string("wgmma: the descriptor of ") + operand + " has a non-zero base offset");
    const uint64_t field = 0x3fff;
    return {t_shared->base + uintptr_t((desc & field) << 4), uintptr_t(((desc >> 16) & field) << 4),
            uintptr_t(((desc >> 32) & field) << 4)};
}

// Element (x, k) of a 16-bit operand (x: row of A or column of B; k < 16).
uintptr_t operand_address(const Descriptor& d, bool mn_major, unsigned x, unsigned k) {
    const uintptr_t core = d.start + (x / 8) * d.sbo + (k / 8) * d.lbo;
    return mn_major ? core + (k % 8) * 16 + (x % 8) * 2 : core + (x % 8) * 16 + (k % 8) * 2;
}

// A wgmma operand read: checked as a shared read (bounds, initialisation, races), and against
// generic-proxy writes no fence.proxy.async has ordered before the async proxy's reads.
uint16_t wgmma_read(uintptr_t a, const char* operand) {
    if (!in_shared(a)) fail_at("wgmma", a, std::string("operand ") + operand + " is not shared memory");
    const LaunchState* l = t_launch;
    if (l) {
        shared_access(*l, a, 2, Kind::Read);
        const Record& r = t_shared->shadow[(a - t_shared->base) >> kGranuleShift];
        if (r.stamp == l->block_stamp && (r.write.flags & kValid) && r.write.block == l->block &&
            r.write.epoch > t_wgmma[r.write.tid].proxy_epoch)
            fail_at("wgmma", a,
                    std::string("operand ") + operand + " at " + describe_shared(a) + " was written by " +
                        thread_name(r.write.tid) +
                        " with no fence.proxy.async after the write: the generic proxy's writes are not ordered "
                        "before the async proxy's reads");
    }
    uint16_t v;
    std::memcpy(&v, reinterpret_cast<const void*>(a), 2);
    return v;
}

float wgmma_value(uint16_t bits, MmaInput input) {
    return input == MmaInput::BF16 ? bf16_bits_to_f32(bits) : f16_bits_to_f32(bits);
}

WgmmaAcc* find_accumulator(WgmmaState& state, float* d) {
    for (WgmmaAcc& acc : state.accumulators)
        if (acc.d == d) return &acc;
    return nullptr;
}
}  // namespace

void wgmma(MmaInput input, int n, float* d, uint64_t desc_a, uint64_t desc_b, int scale_d, int trans_a, int trans_b) {
    if (n < 8 || n > 256 || n % 8 != 0) fail("wgmma: N must be a multiple of 8 in [8, 256]");
    const unsigned threads = t_block_dim.x * t_block_dim.y * t_block_dim.z;
    if (threads % 128 != 0) fail("wgmma: the block is not a whole number of warpgroups (128 threads)");
    // .sync.aligned: every lane of the warp issues it, with the same operands.
    const uint64_t* slots = warp_gather(0xffffffffu, desc_a);
    for (unsigned l = 0; l < 32; ++l)
        if (slots[l] != desc_a) fail("wgmma: the lanes of a warp give different descriptors of A (or not all issue it)");
    const uint64_t b_shape = desc_b ^ (uint64_t(n) << 46) ^ (uint64_t(scale_d != 0) << 47);
    slots = warp_gather(0xffffffffu, b_shape);
    for (unsigned l = 0; l < 32; ++l)
        if (slots[l] != b_shape) fail("wgmma: the lanes of a warp give different descriptors of B, shapes or scale-d");
    WgmmaState& state = t_wgmma[t_current->tid];
    // .aligned across the warpgroup: its 4 warps issue the same sequence of wgmma.
    if (t_current->lane == 0) {
        auto& issues = t_wgmma_issues[t_current->tid / 128];
        if (state.issued < issues.size()) {
            if (issues[state.issued] != std::make_pair(desc_a, b_shape))
                fail("wgmma: the warps of warpgroup " + std::to_string(t_current->tid / 128) +
                     " give different operands (descriptors, N or scale-d) to their wgmma number " +
                     std::to_string(state.issued));
        } else {
            issues.emplace_back(desc_a, b_shape);
        }
    }
    ++state.issued;
    if (!state.fenced)
        fail("wgmma.mma_async by " + thread_name(t_current->tid) +
             " with no wgmma.fence since its last wgmma.commit_group (the fence orders the accumulator registers' "
             "earlier accesses before the asynchronous MMA)");
    const Descriptor a = decode_descriptor(desc_a, "A"), b = decode_descriptor(desc_b, "B");
    const unsigned warp_in_group = t_current->warp % 4, lane = t_current->lane;
    WgmmaOp op{d, state.committed, uint16_t(n), uint8_t(scale_d != 0), input, {}, {}, {}, {}};
    for (unsigned h = 0; h < 2; ++h)
        for (unsigned k = 0; k < 16; ++k) {
            const uintptr_t addr = operand_address(a, trans_a != 0, 16 * warp_in_group + lane / 4 + 8 * h, k);
            op.a_addr.push_back(addr);
            op.a_bits.push_back(wgmma_read(addr, "A"));
        }
    for (unsigned j = 0; j < unsigned(n) / 8; ++j)
        for (unsigned c = 0; c < 2; ++c)
            for (unsigned k = 0; k < 16; ++k) {
                const uintptr_t addr = operand_address(b, trans_b != 0, 8 * j + 2 * (lane % 4) + c, k);
                op.b_addr.push_back(addr);
                op.b_bits.push_back(wgmma_read(addr, "B"));
            }
    WgmmaAcc* acc = find_accumulator(state, d);
    if (!acc) {
        state.accumulators.push_back({d, uint16_t(n), std::vector<float>(d, d + n / 2)});
        for (int i = 0; i < n / 2; ++i) d[i] = std::nanf("");
    } else if (acc->n != n) {
        fail("wgmma: an accumulator in flight reused with another N");
    }
    state.in_flight.push_back(std::move(op));
}

void wgmma_fence() {
    warp_gather(0xffffffffu, 0);
    t_wgmma[t_current->tid].fenced = true;
}

void wgmma_commit() {
    warp_gather(0xffffffffu, 0);
    WgmmaState& state = t_wgmma[t_current->tid];
    ++state.committed;
    state.fenced = false;
}

void wgmma_wait(int pending) {
    warp_gather(0xffffffffu, 0);
    WgmmaState& state = t_wgmma[t_current->tid];
    size_t kept = 0;
    for (size_t i = 0; i < state.in_flight.size(); ++i) {
        WgmmaOp& op = state.in_flight[i];
        if (!(op.group < state.committed && state.committed - op.group > uint32_t(pending))) {
            if (kept != i) state.in_flight[kept] = std::move(op);
            ++kept;
            continue;
        }
        // The async proxy may read the operands any time until now: they must not have changed.
        for (size_t e = 0; e < op.a_addr.size() + op.b_addr.size(); ++e) {
            const bool is_a = e < op.a_addr.size();
            const uintptr_t addr = is_a ? op.a_addr[e] : op.b_addr[e - op.a_addr.size()];
            const uint16_t then = is_a ? op.a_bits[e] : op.b_bits[e - op.a_addr.size()];
            uint16_t now;
            std::memcpy(&now, reinterpret_cast<const void*>(addr), 2);
            if (now != then)
                fail_at("wgmma", addr,
                        std::string("operand ") + (is_a ? "A" : "B") + " at " + describe_shared(addr) +
                            " changed while the wgmma.mma_async reading it was in flight (written before the "
                            "wgmma.wait_group that completes it)");
        }
        WgmmaAcc* acc = find_accumulator(state, op.d);
        for (unsigned j = 0; j < op.n / 8u; ++j)
            for (unsigned v = 0; v < 4; ++v) {
                const unsigned h = v / 2, c = v % 2;
                // Products of two 16-bit floats are exact in f32; the sum accumulates in f32.
                float sum = op.scale_d ? acc->value[4 * j + v] : 0.0f;
                for (unsigned k = 0; k < 16; ++k)
                    sum += wgmma_value(op.a_bits[16 * h + k], op.input) *
                           wgmma_value(op.b_bits[(2 * j + c) * 16 + k], op.input);
                acc->value[4 * j + v] = sum;
            }
    }
    state.in_flight.resize(kept);
    // Accumulators with nothing left in flight go back to the kernel's registers.
    size_t live = 0;
    for (size_t i = 0; i < state.accumulators.size(); ++i) {
        WgmmaAcc& acc = state.accumulators[i];
        bool busy = false;
        for (const WgmmaOp& op : state.in_flight) busy |= op.d == acc.d;
        if (busy) {
            if (live != i) state.accumulators[live] = std::move(acc);
            ++live;
        } else {
            std::memcpy(acc.d, acc.value.data(), acc.value.size() * sizeof(float));
        }
    }
    state.accumulators.resize(live);
}

void fence_proxy_async() {
    FiberView* f = t_current;
    t_wgmma[f->tid].proxy_epoch = f->vc[f->lane];
    // Accesses after the fence carry a newer epoch, so they are told from those before it.
    ++f->vc[f->lane];
}

}  // namespace lc_harness

using lc_harness::Kind;

// ---- the ThreadSanitizer entry points GCC's instrumentation calls --------------------------
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define LC_TSAN_ACCESS(n)                                                                              \
    void __tsan_read##n(void* p) { lc_harness::on_access(p, n, Kind::Read); }                          \
    void __tsan_write##n(void* p) { lc_harness::on_access(p, n, Kind::Write); }                        \
    void __tsan_unaligned_read##n(void* p) { lc_harness::on_access(p, n, Kind::Read); }                \
    void __tsan_unaligned_write##n(void* p) { lc_harness::on_access(p, n, Kind::Write); }              \
    void __tsan_volatile_read##n(void* p) { lc_harness::on_access(p, n, Kind::Read); }                 \
    void __tsan_volatile_write##n(void* p) { lc_harness::on_access(p, n, Kind::Write); }               \
    void __tsan_unaligned_volatile_read##n(void* p) { lc_harness::on_access(p, n, Kind::Read); }       \
    void __tsan_unaligned_volatile_write##n(void* p) { lc_harness::on_access(p, n, Kind::Write); }
LC_TSAN_ACCESS(1)
LC_TSAN_ACCESS(2)
LC_TSAN_ACCESS(4)
LC_TSAN_ACCESS(8)
LC_TSAN_ACCESS(16)
#undef LC_TSAN_ACCESS
void __tsan_read_range(void* p, unsigned long size) { lc_harness::on_access(p, size, Kind::Read); }
void __tsan_write_range(void* p, unsigned long size) { lc_harness::on_access(p, size, Kind::Write); }
}

void __threadfence() { lc_harness::thread_fence(); }

// ---- atomics: checked as atomic accesses, then done atomically -----------------------------
namespace {
template <class T, class Op>
T atomic_update(T* address, Op op) {
    lc_harness::on_access(address, sizeof(T), Kind::Atomic);
    lc_harness::atomic_sync(address);
    T old = __atomic_load_n(address, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(address, &old, op(old), false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return old;
}
template <class F>
F atomic_update_float(F* address, F value, bool exchange) {
    using Bits = typename std::conditional<sizeof(F) == 4, uint32_t, uint64_t>::type;
    lc_harness::on_access(address, sizeof(F), Kind::Atomic);
    lc_harness::atomic_sync(address);
    Bits* bits = reinterpret_cast<Bits*>(address);
    Bits old = __atomic_load_n(bits, __ATOMIC_RELAXED);
    for (;;) {
        F old_value;
        std::memcpy(&old_value, &old, sizeof(F));
        const F new_value = exchange ? value : old_value + value;
        Bits next;
        std::memcpy(&next, &new_value, sizeof(F));
        if (__atomic_compare_exchange_n(bits, &old, next, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) return old_value;
    }
}
}  // namespace

#define LC_INT_ATOMICS(T)                                                                                  \
    T atomicAdd(T* a, T v) { return atomic_update(a, [v](T old) { return T(old + v); }); }                 \
    T atomicMax(T* a, T v) { return atomic_update(a, [v](T old) { return old < v ? v : old; }); }          \
    T atomicMin(T* a, T v) { return atomic_update(a, [v](T old) { return v < old ? v : old; }); }          \
    T atomicExch(T* a, T v) { return atomic_update(a, [v](T) { return v; }); }                             \
    T atomicCAS(T* a, T compare, T v) {                                                                    \
        lc_harness::on_access(a, sizeof(T), Kind::Atomic);                                                 \
        lc_harness::atomic_sync(a);                                                                        \
        T expected = compare;                                                                              \
        __atomic_compare_exchange_n(a, &expected, v, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);           \
        return expected;                                                                                   \
    }
LC_INT_ATOMICS(int)
LC_INT_ATOMICS(unsigned)
using lc_ull = unsigned long long;
LC_INT_ATOMICS(lc_ull)
#undef LC_INT_ATOMICS
float atomicAdd(float* a, float v) { return atomic_update_float(a, v, false); }
double atomicAdd(double* a, double v) { return atomic_update_float(a, v, false); }
float atomicExch(float* a, float v) { return atomic_update_float(a, v, true); }

// ---- device memory for Rust (src/harness.rs) ----------------------------------------------
extern "C" void* lc_harness_alloc(size_t bytes) {
    using namespace lc_harness;
    Arena& a = arena();
    const size_t data_chunks = bytes == 0 ? 1 : (bytes + kChunkBytes - 1) >> kChunkShift;
    const size_t need = data_chunks + 1;  // + an unused chunk after it
    auto* alloc = new Allocation{};
    alloc->bytes = bytes;
    alloc->written = new std::atomic<uint8_t>[granules(bytes) + 1]();
    {
        std::lock_guard<std::mutex> lock(a.mutex);
        auto it = a.free_chunks.begin();
        while (it != a.free_chunks.end() && it->second < need) ++it;
        if (it == a.free_chunks.end()) {
            delete[] alloc->written;
            delete alloc;
            return nullptr;
        }
        const size_t first = it->first, count = it->second;
        a.free_chunks.erase(it);
        if (count > need) a.free_chunks[first + need] = count - need;
        alloc->first_chunk = first;
        alloc->chunks = need;
        alloc->base = a.base + (first << kChunkShift);
        for (size_t k = first; k < first + need; ++k) a.owner[k].store(alloc, std::memory_order_relaxed);
    }
    return reinterpret_cast<void*>(alloc->base);
}

extern "C" void lc_harness_free(void* p) {
    using namespace lc_harness;
    if (!p) return;
    Arena& a = arena();
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    std::lock_guard<std::mutex> lock(a.mutex);
    Allocation* alloc = a.owner[(address - a.base) >> kChunkShift].load(std::memory_order_relaxed);
    if (!alloc || alloc->base != address) {
        std::fprintf(stderr, "lc_harness_free: %p is not a harness allocation\n", p);
        std::abort();
    }
    const uintptr_t begin = alloc->base, end = begin + (alloc->chunks << kChunkShift);
    release_pages(begin, end);
    for (Record* shadow : a.thread_shadows) {
        if (!shadow) continue;
        release_pages(reinterpret_cast<uintptr_t>(shadow + ((begin - a.base) >> kGranuleShift)),
                      reinterpret_cast<uintptr_t>(shadow + ((end - a.base) >> kGranuleShift)));
    }
    for (size_t k = alloc->first_chunk; k < alloc->first_chunk + alloc->chunks; ++k)
        a.owner[k].store(nullptr, std::memory_order_relaxed);
    // Return the chunks, merged with free neighbours.
    size_t first = alloc->first_chunk, count = alloc->chunks;
    auto next = a.free_chunks.lower_bound(first);
    if (next != a.free_chunks.end() && next->first == first + count) {
        count += next->second;
        next = a.free_chunks.erase(next);
    }
    if (next != a.free_chunks.begin()) {
        auto prev = std::prev(next);
        if (prev->first + prev->second == first) {
            first = prev->first;
            count += prev->second;
            a.free_chunks.erase(prev);
        }
    }
    a.free_chunks[first] = count;
    delete[] alloc->written;
    delete alloc;
}

// Marks [p, p + bytes) as written by the host (an upload); p must lie in one allocation.
extern "C" void lc_harness_mark_written(void* p, size_t bytes) {
    using namespace lc_harness;
    if (bytes == 0) return;
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    Allocation* alloc = g_owner[(address - g_arena_base) >> kChunkShift].load(std::memory_order_relaxed);
    const size_t g0 = (address - alloc->base) >> kGranuleShift, g1 = (address + bytes - 1 - alloc->base) >> kGranuleShift;
    for (size_t g = g0; g <= g1; ++g) alloc->written[g].store(1, std::memory_order_relaxed);
}

// Whether every granule of [p, p + bytes) has been written (by the host or a kernel).
extern "C" int lc_harness_is_written(const void* p, size_t bytes) {
    using namespace lc_harness;
    if (bytes == 0) return 1;
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    Allocation* alloc = g_owner[(address - g_arena_base) >> kChunkShift].load(std::memory_order_relaxed);
    const size_t g0 = (address - alloc->base) >> kGranuleShift, g1 = (address + bytes - 1 - alloc->base) >> kGranuleShift;
    for (size_t g = g0; g <= g1; ++g)
        if (!alloc->written[g].load(std::memory_order_relaxed)) return 0;
    return 1;
}
