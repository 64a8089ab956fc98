// Executes Metal compute dispatches on the CPU with Metal's execution model.
//
// Every GPU thread of a threadgroup is a fiber (ucontext) on its own small stack;
// the groups of a dispatch run one after another on the calling OS thread. A fiber
// runs until it reaches a rendezvous (threadgroup_barrier, or a SIMD-group function)
// or returns. Which fiber runs next is the schedule's order (metal_host.h):
//   - lock-step (forward / reverse / random): every ready fiber runs to its next
//     rendezvous, then everything that can be released is released;
//   - ahead (forward / reverse): one SIMD-group runs as far as it can, its SIMD
//     functions released at once, before any other moves.
// When nothing can run, the scheduler decides what the waiting fibers wait for:
//   - a SIMD-group whose live lanes all wait at the same SIMD function (same
//     source site and same call path) is released (SIMD functions involve the 32
//     lanes of ONE SIMD-group, never the whole group, so
//     `if (simdgroup_index == 0) simd_sum(...)` is valid, as on Apple GPUs);
//   - a group whose threads all wait at the same threadgroup_barrier is released;
//   - anything else can never make progress on a GPU either (divergent barrier,
//     lanes at different SIMD call sites, a barrier some threads returned before):
//     it is reported as mh::Error naming the call sites and threads, never a hang.
// Threadgroup memory is poisoned at every group start and fenced with canaries;
// under the strict memory model (StrictMemory below) writes become visible to
// other SIMD-groups only through a barrier with the matching mem_flags.

#include "metal_host.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <unordered_map>

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace mh {
namespace {

constexpr unsigned kSimdWidth = 32;
constexpr unsigned kMaxThreadsPerGroup = 1024;
constexpr std::size_t kMaxThreadgroupBytes = 32 * 1024;
// Kernels keep a few registers' worth of locals; 64 KiB is ample and 1024 of them
// (one group) cost 64 MiB of address space, only touched pages becoming memory.
constexpr std::size_t kStackBytes = 64 * 1024;
// Fences around each threadgroup buffer, checked after every group.
constexpr std::size_t kCanaryBytes = 64;
constexpr unsigned char kCanary = 0xFE;
// Frames of a rendezvous' call path that are compared (innermost first).
constexpr unsigned kMaxPathDepth = 48;

enum class State { ready, at_barrier, at_simd, returned };

// The return addresses from the runtime hook up to the fiber's entry: which call
// of which helper from which branch reached the rendezvous. Kernels are compiled
// at -O0 with frame pointers (build.py), so every source-level call is its own
// call instruction and frame.
struct CallPath {
  void* ret[kMaxPathDepth];
  unsigned depth = 0;
  bool operator==(const CallPath& o) const {
    return depth == o.depth && std::equal(ret, ret + depth, o.ret);
  }
};

struct Fiber {
  ucontext_t context;
  State state;
  detail::Site site;    // where it waits (valid when at_barrier / at_simd)
  CallPath path;        // how it got there
  unsigned mem_flags;   // of the barrier it waits at
  unsigned simd_ops;    // SIMD functions called so far: selects the deposit bank
  std::exception_ptr error;
  ThreadCtx ctx;
  char* stack;
};

// One stack per fiber, kept for the life of the process and reused by every group,
// each with an inaccessible page below it so that an overflow faults at once rather
// than corrupting the neighbouring fiber.
class StackPool {
 public:
  char* stack(std::size_t i) {
    while (stacks_.size() <= i) {
      long page = sysconf(_SC_PAGESIZE);
      void* p = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw Error("metal_host: cannot map a fiber stack");
      mprotect(p, page, PROT_NONE);
      stacks_.push_back(static_cast<char*>(p) + page);
    }
    return stacks_[i];
  }

 private:
  std::vector<char*> stacks_;
};

std::string where(const detail::Site& s) {
  return std::string(s.op) + " at " + s.loc.file_name() + ":" + std::to_string(s.loc.line()) +
         ":" + std::to_string(s.loc.column());
}

bool same_site(const detail::Site& a, const detail::Site& b) {
  return std::strcmp(a.op, b.op) == 0 && a.loc.line() == b.loc.line() &&
         a.loc.column() == b.loc.column() &&
         std::strcmp(a.loc.file_name(), b.loc.file_name()) == 0;
}

// "reduce(float)+0x1c <- kernel+0x88": the frames of a path (innermost first),
// named by the dynamic symbol table where it knows them.
std::string describe_path(const CallPath& p) {
  std::string out;
  for (unsigned i = 0; i < p.depth && i < 6; ++i) {
    Dl_info info{};
    std::string frame;
    if (dladdr(p.ret[i], &info) && info.dli_sname) {
      int status = 0;
      char* name = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
      frame = status == 0 && name ? name : info.dli_sname;
      std::free(name);
      char off[32];
      std::snprintf(off, sizeof off, "+0x%lx",
                    static_cast<unsigned long>(static_cast<char*>(p.ret[i]) -
                                               static_cast<char*>(info.dli_saddr)));
      frame += off;
    } else {
      char addr[32];
      std::snprintf(addr, sizeof addr, "%p", p.ret[i]);
      frame = addr;
    }
    out += (i ? " <- " : "") + frame;
  }
  return out;
}

// "0-31, 40, 64-99"; long lists (odd/even splits) are cut after 8 ranges.
std::string ranges(const std::vector<unsigned>& ids) {
  std::string out;
  int shown = 0;
  for (std::size_t i = 0; i < ids.size(); ++shown) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (shown == 8) return out + ", ... (" + std::to_string(ids.size()) + " threads)";
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out;
}

std::string dim(uint3 v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

class Dispatch;
thread_local Dispatch* g_dispatch = nullptr;
thread_local Schedule g_schedule;
thread_local std::string g_last_error;
thread_local bool g_flush_subnormals = false;

// Apple GPUs flush float32 subnormals to zero, in operands and in results, even
// without fast math (MLX's metallibs pass -fno-fast-math and still see it:
// ml-explore/mlx#4205, M3 Pro: float32 and bfloat16 subnormals read as zero, float16
// ones survive; the applegpu probes of fma model the same flush). With
// mh_set_flush_subnormals(1) the CPU does the same while kernel code runs: x86
// MXCSR.FTZ (results) and .DAZ (operands), aarch64 FPCR.FZ (both; FZ16 stays off).
// Fibers inherit the setting: their contexts are made (getcontext) inside the
// dispatch, and swapcontext saves and restores the control register with the rest.
// float16 and bfloat16 values are widened to float by integer conversions here, so a
// bfloat16 subnormal (a float32 subnormal once widened) is flushed at its first
// arithmetic operation and a half subnormal (a normal float32) is not, as on the GPU.
// Sets flush-to-zero on or off for the calling thread; returns the previous control
// word for restore_float_control.
uint64_t set_flush_subnormals(bool flush) {
#if defined(__x86_64__) || defined(__i386__)
  const unsigned saved = _mm_getcsr();
  constexpr unsigned kFtzDaz = 0x8040;  // bit 15 flush-to-zero, bit 6 denormals-are-zero
  _mm_setcsr(flush ? (saved | kFtzDaz) : (saved & ~kFtzDaz));
  return saved;
#elif defined(__aarch64__)
  uint64_t saved;
  __asm__ volatile("mrs %0, fpcr" : "=r"(saved));
  const uint64_t fz = uint64_t(1) << 24;
  const uint64_t want = flush ? (saved | fz) : (saved & ~fz);
  __asm__ volatile("msr fpcr, %0" : : "r"(want));
  return saved;
#else
  if (flush) throw Error("flushing subnormals is implemented for x86-64 and aarch64 only");
  return 0;
#endif
}

void restore_float_control(uint64_t saved) {
#if defined(__x86_64__) || defined(__i386__)
  _mm_setcsr(static_cast<unsigned>(saved));
#elif defined(__aarch64__)
  __asm__ volatile("msr fpcr, %0" : : "r"(saved));
#else
  (void)saved;
#endif
}

// The dispatch's floating-point environment, restored when it ends.
struct FloatEnvironment {
  const uint64_t saved;
  explicit FloatEnvironment(bool flush) : saved(set_flush_subnormals(flush)) {}
  ~FloatEnvironment() { restore_float_control(saved); }
  FloatEnvironment(const FloatEnvironment&) = delete;
  FloatEnvironment& operator=(const FloatEnvironment&) = delete;
};
thread_local std::vector<std::pair<unsigned char*, std::size_t>> g_device_buffers;

void fill_pattern(void* p, std::size_t size, uint16_t pattern) {
  auto* b = static_cast<unsigned char*>(p);
  // Phase by address, so that a 2-byte element anywhere gets the whole pattern.
  for (std::size_t i = 0; i < size; ++i)
    b[i] = (reinterpret_cast<std::uintptr_t>(b + i) & 1) ? pattern >> 8 : pattern & 0xFF;
}

// The strict memory model. Memory holds the published state ("what every thread
// sees") while no SIMD-group runs; a SIMD-group's own unpublished writes are put
// in place when it is switched in and taken out (recorded by comparison with the
// published copy) when it stops at a barrier. A barrier whose mem_flags cover a
// region publishes every SIMD-group's pending writes there. A SIMD-group is the
// unit: its lanes see each other's writes (Metal orders them only with
// simdgroup_barrier, which this model does not separate).
//
// A SIMD-group that stops because it returned is not compared: no barrier can be
// released after that (it would be one not every thread reaches), so its last
// writes could only be seen by a race, which the order schedules catch; they are
// published when the group ends. This keeps kernels without barriers free of
// comparisons.
class StrictMemory {
 public:
  enum Kind : unsigned { kDevice = detail::kMemDevice, kThreadgroup = detail::kMemThreadgroup };

  void reset_dispatch(unsigned simdgroups_max) {
    regions_.clear();
    pending_.assign(simdgroups_max, {});
    for (auto& [p, n] : g_device_buffers) add(p, n, kDevice);
  }
  void start_group(unsigned simdgroups) {
    // Threadgroup regions belong to one group; device copies are re-read since
    // a returned SIMD-group's last writes went straight to memory.
    std::erase_if(regions_, [](const Region& r) { return r.kind == kThreadgroup; });
    for (Region& r : regions_) std::memcpy(r.published.data(), r.ptr, r.published.size());
    pending_.assign(simdgroups, {});
  }
  // A region whose current contents count as published (just poisoned).
  void add(unsigned char* p, std::size_t n, Kind kind) {
    regions_.push_back({p, kind, std::vector<unsigned char>(p, p + n)});
  }
  void enter(unsigned sg) {
    for (const Write& w : pending_[sg]) regions_[w.region].ptr[w.offset] = w.value;
  }
  void leave(unsigned sg) {
    std::vector<Write>& mine = pending_[sg];
    mine.clear();
    for (std::size_t r = 0; r < regions_.size(); ++r) {
      Region& reg = regions_[r];
      const std::size_t n = reg.published.size();
      for (std::size_t at = 0; at < n;) {
        // Compare in blocks; most of memory is unchanged.
        const std::size_t len = std::min<std::size_t>(256, n - at);
        if (std::memcmp(reg.ptr + at, reg.published.data() + at, len) != 0) {
          for (std::size_t i = at; i < at + len; ++i)
            if (reg.ptr[i] != reg.published[i]) {
              mine.push_back({r, i, reg.ptr[i]});
              reg.ptr[i] = reg.published[i];
            }
        }
        at += len;
      }
    }
  }
  // Called with every SIMD-group switched out.
  void publish(unsigned kinds) {
    for (auto& writes : pending_) {
      std::erase_if(writes, [&](const Write& w) {
        Region& reg = regions_[w.region];
        if (!(reg.kind & kinds)) return false;
        reg.ptr[w.offset] = reg.published[w.offset] = w.value;
        return true;
      });
    }
  }

 private:
  struct Region {
    unsigned char* ptr;
    Kind kind;
    std::vector<unsigned char> published;
  };
  struct Write {
    std::size_t region, offset;
    unsigned char value;
  };
  std::vector<Region> regions_;
  std::vector<std::vector<Write>> pending_;  // per SIMD-group
};

class Dispatch {
 public:
  Dispatch(const Kernel& kernel, const std::vector<std::size_t>& tg_bytes) : kernel_(kernel) {
    std::size_t total = 0;
    for (std::size_t i = 0; i < tg_bytes.size(); ++i) {
      if (tg_bytes[i] % 16 != 0)
        throw Error("threadgroup buffer " + std::to_string(i) + ": " +
                    std::to_string(tg_bytes[i]) +
                    " bytes; Metal requires a multiple of 16 (setThreadgroupMemoryLength)");
      total += tg_bytes[i];
      // Each buffer sits between two canary fences; 16-byte alignment as on the GPU.
      tg_storage_.emplace_back(tg_bytes[i] + 2 * kCanaryBytes + 16);
    }
    if (total > kMaxThreadgroupBytes)
      throw Error("threadgroup memory: " + std::to_string(total) + " bytes requested, Metal allows " +
                  std::to_string(kMaxThreadgroupBytes));
    tg_buffer_bytes_ = total;
    tg_sizes_ = tg_bytes;
    for (auto& s : tg_storage_) {
      auto addr = reinterpret_cast<std::uintptr_t>(s.data()) + kCanaryBytes;
      tg_ptrs_.push_back(reinterpret_cast<void*>((addr + 15) & ~std::uintptr_t(15)));
    }
    rng_.seed(g_schedule.seed);
    strict_ = g_schedule.memory == Memory::strict;
    if (strict_ && g_schedule.order != Order::ahead && g_schedule.order != Order::ahead_reverse)
      throw Error("the strict memory model needs an `ahead` order (a SIMD-group runs between "
                  "switches)");
    if (strict_) memory_.reset_dispatch(kMaxThreadsPerGroup / kSimdWidth);
  }

  // Runs one threadgroup of `size` threads (non-uniform dispatches pass smaller
  // sizes for edge groups) to completion or throws.
  void run_group(uint3 group_pos, uint3 size, uint3 groups, uint3 grid, uint3 full_size) {
    const unsigned n = size.x * size.y * size.z;
    fibers_.resize(n);
    const unsigned simdgroups = (n + kSimdWidth - 1) / kSimdWidth;
    // Two banks per SIMD-group: a lane can be at most one SIMD function ahead of a
    // lane that has not yet read the previous results (the next rendezvous needs it).
    // Slots of lanes that do not exist keep the poison: reading them yields garbage.
    simd_slots_.resize(std::size_t(simdgroups) * 2 * kSimdWidth * detail::kSimdSlotBytes);
    fill_pattern(simd_slots_.data(), simd_slots_.size(), g_schedule.poison);
    for (std::size_t i = 0; i < tg_ptrs_.size(); ++i) {
      std::memset(tg_storage_[i].data(), kCanary, tg_storage_[i].size());
      fill_pattern(tg_ptrs_[i], tg_sizes_[i], g_schedule.poison);
    }
    tg_locals_.clear();
    tg_local_bytes_ = 0;
    releases_.assign(simdgroups, 0);
    collectives_taken_.assign(simdgroups, 0);
    if (strict_) {
      memory_.start_group(simdgroups);
      for (std::size_t i = 0; i < tg_ptrs_.size(); ++i)
        memory_.add(static_cast<unsigned char*>(tg_ptrs_[i]), tg_sizes_[i],
                    StrictMemory::kThreadgroup);
    }

    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.state = State::ready;
      f.simd_ops = 0;
      f.error = nullptr;
      f.stack = stacks_.stack(i);
      ThreadCtx& c = f.ctx;
      uint3 local = {i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
      c.thread_position_in_threadgroup = local;
      c.threadgroup_position_in_grid = group_pos;
      c.thread_position_in_grid = group_pos * full_size + local;
      c.threads_per_threadgroup = size;
      c.threadgroups_per_grid = groups;
      c.threads_per_grid = grid;
      c.thread_index_in_threadgroup = i;
      c.thread_index_in_simdgroup = i % kSimdWidth;
      c.simdgroup_index_in_threadgroup = i / kSimdWidth;
      c.threads_per_simdgroup = kSimdWidth;
      c.simdgroups_per_threadgroup = simdgroups;
      c.threadgroup_buffers = &tg_ptrs_;
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack;
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &Dispatch::fiber_main, 0);
    }

    group_pos_ = group_pos;
    if (g_schedule.order == Order::ahead || g_schedule.order == Order::ahead_reverse)
      run_ahead(simdgroups);
    else
      run_lockstep(n);
    if (strict_) memory_.publish(StrictMemory::kDevice | StrictMemory::kThreadgroup);
    check_canaries();
  }

  // Hooks called from kernel code, on the current fiber's stack.
  void barrier(const detail::Site& site, unsigned mem_flags) {
    current_->mem_flags = mem_flags;
    wait(State::at_barrier, site);
  }

  detail::SimdView simd_exchange(const detail::Site& site, const void* value, std::size_t size) {
    Fiber& f = *current_;
    const unsigned sg = f.ctx.simdgroup_index_in_threadgroup, lane = f.ctx.thread_index_in_simdgroup;
    unsigned char* bank = &simd_slots_[(std::size_t(sg) * 2 + (f.simd_ops++ & 1)) * kSimdWidth *
                                       detail::kSimdSlotBytes];
    if (size) std::memcpy(bank + lane * detail::kSimdSlotBytes, value, size);
    wait(State::at_simd, site);
    const bool first = collectives_taken_[sg] != releases_[sg];
    collectives_taken_[sg] = releases_[sg];
    return {bank, lane, live_lanes(sg), first};
  }

  unsigned lane() const { return current_->ctx.thread_index_in_simdgroup; }

  // See detail::check_matrix_access: the memory a SIMD-group matrix load or store
  // touches must lie in one buffer the runtime knows.
  void check_matrix_access(const detail::Site& site, const void* const* elements, unsigned count,
                           std::size_t element_bytes) const {
    // The buffer holding address b: kind 0 threadgroup buffer, 1 function-scope
    // threadgroup array, 2 registered device buffer; index within the kind.
    struct Buffer {
      const unsigned char* start = nullptr;
      std::size_t bytes = 0;
      int kind = -1;
      std::size_t index = 0;
    };
    auto containing = [&](const unsigned char* b) {
      auto in = [b](const void* p, std::size_t n) {
        const auto* s = static_cast<const unsigned char*>(p);
        return b >= s && b < s + n;
      };
      for (std::size_t i = 0; i < tg_ptrs_.size(); ++i)
        if (in(tg_ptrs_[i], tg_sizes_[i]))
          return Buffer{static_cast<const unsigned char*>(tg_ptrs_[i]), tg_sizes_[i], 0, i};
      for (auto& [p, n] : tg_locals_)
        if (in(p, n)) return Buffer{static_cast<const unsigned char*>(p), n, 1, 0};
      for (std::size_t i = 0; i < g_device_buffers.size(); ++i)
        if (in(g_device_buffers[i].first, g_device_buffers[i].second))
          return Buffer{g_device_buffers[i].first, g_device_buffers[i].second, 2, i};
      return Buffer{};
    };
    Buffer home;
    for (unsigned i = 0; i < count && home.kind < 0; ++i)
      home = containing(static_cast<const unsigned char*>(elements[i]));
    if (home.kind < 0) return;  // memory the runtime does not know: an adaptor's own buffer
    for (unsigned i = 0; i < count; ++i) {
      const auto* b = static_cast<const unsigned char*>(elements[i]);
      if (b >= home.start && b + element_bytes <= home.start + home.bytes) continue;
      const std::string name =
          home.kind == 0   ? "threadgroup buffer " + std::to_string(home.index)
          : home.kind == 1 ? std::string("a function-scope threadgroup array")
                           : "device buffer " + std::to_string(home.index) +
                                 " (array arguments counted from 0)";
      throw Error(where(site) + ": element (" + std::to_string(i / 8) + ", " +
                  std::to_string(i % 8) + ") of the 8x8 matrix is at byte offset " +
                  std::to_string(static_cast<long long>(b - home.start)) + " of " + name + " (" +
                  std::to_string(home.bytes) + " bytes), outside it (wrong elements_per_row, "
                  "matrix_origin or tile size?)");
    }
  }

  // A function-scope `threadgroup` array, reached by a thread: the first thread of
  // the group poisons it and counts it toward the group's threadgroup memory.
  void threadgroup_local(void* p, std::size_t size) {
    if (!tg_locals_.emplace(p, size).second) return;
    tg_local_bytes_ += size;
    if (tg_buffer_bytes_ + tg_local_bytes_ > kMaxThreadgroupBytes)
      throw Error("threadgroup memory: function-scope threadgroup arrays (" +
                  std::to_string(tg_local_bytes_) + " bytes) plus [[threadgroup(n)]] buffers (" +
                  std::to_string(tg_buffer_bytes_) + " bytes) exceed the " +
                  std::to_string(kMaxThreadgroupBytes) + " bytes Metal allows");
    fill_pattern(p, size, g_schedule.poison);
    if (strict_) memory_.add(static_cast<unsigned char*>(p), size, StrictMemory::kThreadgroup);
  }

 private:
  static void fiber_main() {
    Dispatch& d = *g_dispatch;
    Fiber& f = *d.current_;
    // Inherited from the context it was made in; explicit all the same. Nothing to
    // restore: the fiber ends in setcontext to the scheduler, whose context holds
    // the dispatch's setting.
    set_flush_subnormals(g_flush_subnormals);
    try {
      d.kernel_(f.ctx);
    } catch (...) {
      f.error = std::current_exception();
    }
    f.state = State::returned;
    // Never resumed again: the next group re-creates the context on this stack.
    setcontext(&d.scheduler_);
  }

  // Lock-step rounds: each ready fiber runs to its next rendezvous; then whatever
  // can be released is released.
  void run_lockstep(unsigned n) {
    std::vector<unsigned> order(n);
    std::iota(order.begin(), order.end(), 0u);
    if (g_schedule.order == Order::reverse) std::reverse(order.begin(), order.end());
    for (;;) {
      if (g_schedule.order == Order::random) std::shuffle(order.begin(), order.end(), rng_);
      for (unsigned i : order) resume_if_ready(i);
      if (all_returned()) return;
      bool released = false;
      for (unsigned sg = 0; sg * kSimdWidth < n; ++sg) released |= release_simdgroup(sg);
      if (!released) release_barrier_or_report();
    }
  }

  // One SIMD-group at a time, as far as it can go; after any progress the first
  // SIMD-group in the order gets the next chance (it may have been released).
  void run_ahead(unsigned simdgroups) {
    const bool reverse = g_schedule.order == Order::ahead_reverse;
    for (;;) {
      bool progressed = false;
      for (unsigned k = 0; k < simdgroups && !progressed; ++k)
        progressed = advance_simdgroup(reverse ? simdgroups - 1 - k : k, reverse);
      if (progressed) continue;
      if (all_returned()) return;
      release_barrier_or_report();
    }
  }

  // Runs SIMD-group sg until none of its lanes can move; true if any did.
  bool advance_simdgroup(unsigned sg, bool reverse_lanes) {
    const unsigned first = sg * kSimdWidth, last = first + live_lanes(sg);
    auto any_ready = [&] {
      for (unsigned i = first; i < last; ++i)
        if (fibers_[i].state == State::ready) return true;
      return false;
    };
    if (!any_ready() && !release_simdgroup(sg)) return false;
    if (strict_) memory_.enter(sg);
    bool returned_all;
    do {
      for (unsigned k = 0; k < last - first; ++k)
        resume_if_ready(reverse_lanes ? last - 1 - k : first + k);
    } while (release_simdgroup(sg));
    returned_all = std::all_of(fibers_.begin() + first, fibers_.begin() + last,
                               [](const Fiber& f) { return f.state == State::returned; });
    if (strict_ && !returned_all) memory_.leave(sg);
    return true;
  }

  void resume_if_ready(unsigned i) {
    Fiber& f = fibers_[i];
    if (f.state != State::ready) return;
    current_ = &f;
    swapcontext(&scheduler_, &f.context);
    if (f.error) rethrow_from(i, f.error);
  }

  bool all_returned() const {
    return std::all_of(fibers_.begin(), fibers_.end(),
                       [](const Fiber& f) { return f.state == State::returned; });
  }

  void wait(State state, const detail::Site& site) {
    Fiber& f = *current_;
    f.state = state;
    f.site = site;
    record_path(f);
    swapcontext(&f.context, &scheduler_);
  }

  // Walks the frame-pointer chain from here to the fiber's first frame.
  void record_path(Fiber& f) {
    f.path.depth = 0;
    const auto lo = reinterpret_cast<std::uintptr_t>(f.stack);
    const auto hi = lo + kStackBytes;
    auto* fp = static_cast<void**>(__builtin_frame_address(0));
    while (f.path.depth < kMaxPathDepth) {
      const auto at = reinterpret_cast<std::uintptr_t>(fp);
      if (at < lo || at + 2 * sizeof(void*) > hi) break;
      f.path.ret[f.path.depth++] = fp[1];
      auto* next = static_cast<void**>(fp[0]);
      if (reinterpret_cast<std::uintptr_t>(next) <= at) break;
      fp = next;
    }
  }

  bool same_rendezvous(const Fiber& a, const Fiber& b) const {
    return same_site(a.site, b.site) && a.path == b.path;
  }

  unsigned live_lanes(unsigned sg) const {
    return std::min<unsigned>(kSimdWidth, unsigned(fibers_.size()) - sg * kSimdWidth);
  }

  [[noreturn]] void rethrow_from(unsigned i, std::exception_ptr e) const {
    try {
      std::rethrow_exception(e);
    } catch (const std::exception& ex) {
      throw Error(thread_name(i) + ": " + ex.what());
    }
  }

  std::string group_name() const { return "threadgroup " + dim(group_pos_); }
  std::string thread_name(unsigned i) const {
    return group_name() + ", thread " + std::to_string(i) + " (SIMD-group " +
           std::to_string(i / kSimdWidth) + ", lane " + std::to_string(i % kSimdWidth) + ")";
  }

  // "threads 0-31 wait in simd_sum at k.metal:9:12; threads 32-63 have returned".
  // Where threads wait at one site through different call paths, each path is
  // shown.
  std::string describe(unsigned first, unsigned last) const {
    std::vector<std::pair<std::string, std::vector<unsigned>>> parts;
    std::vector<const Fiber*> shown_paths;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = fibers_[i];
      std::string what = f.state == State::returned ? "have returned" : "wait in " + where(f.site);
      if (f.state != State::returned && paths_differ_at_site(f, first, last))
        what += " via " + describe_path(f.path);
      auto it = std::find_if(parts.begin(), parts.end(), [&](auto& p) { return p.first == what; });
      if (it == parts.end()) parts.push_back({what, {i}});
      else it->second.push_back(i);
    }
    std::string out;
    for (auto& [what, ids] : parts)
      out += (out.empty() ? "" : "; ") + std::string("threads ") + ranges(ids) + " " + what;
    return out;
  }
  bool paths_differ_at_site(const Fiber& f, unsigned first, unsigned last) const {
    for (unsigned i = first; i < last; ++i) {
      const Fiber& g = fibers_[i];
      if (g.state != State::returned && same_site(g.site, f.site) && !(g.path == f.path))
        return true;
    }
    return false;
  }

  // Releases SIMD-group sg if all its live lanes wait at one SIMD function; throws
  // if its lanes can never meet (different functions, or some lanes returned).
  bool release_simdgroup(unsigned sg) {
    const unsigned first = sg * kSimdWidth, last = first + live_lanes(sg);
    unsigned at_simd = 0, returned = 0, ready = 0;
    const Fiber* lead = nullptr;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = fibers_[i];
      ready += f.state == State::ready;
      returned += f.state == State::returned;
      if (f.state == State::at_simd) {
        ++at_simd;
        if (!lead) lead = &f;
      }
    }
    if (at_simd == 0 || ready > 0) return false;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = fibers_[i];
      if (f.state != State::at_simd || same_rendezvous(f, *lead)) continue;
      throw Error(group_name() + ", SIMD-group " + std::to_string(sg) + ": " +
                  (same_site(f.site, lead->site)
                       ? "lanes reached " + where(lead->site) +
                             " through different call paths (a helper called from divergent "
                             "branches: on a GPU each branch's call involves only its own "
                             "lanes)"
                       : std::string("lanes reached different SIMD-group functions")) +
                  " (divergent control flow; this harness requires the whole SIMD-group at "
                  "each call): " +
                  describe(first, last));
    }
    if (returned > 0)
      throw Error(group_name() + ", SIMD-group " + std::to_string(sg) + ": " +
                  where(lead->site) + " reached after some lanes returned: " +
                  describe(first, last));
    if (at_simd != last - first) return false;  // others wait at a barrier: deadlock
    for (unsigned i = first; i < last; ++i) fibers_[i].state = State::ready;
    ++releases_[sg];
    return true;
  }

  void release_barrier_or_report() {
    const unsigned n = unsigned(fibers_.size());
    unsigned at_barrier = 0, returned = 0;
    const Fiber* lead = nullptr;
    for (const Fiber& f : fibers_) {
      returned += f.state == State::returned;
      if (f.state == State::at_barrier) {
        ++at_barrier;
        if (!lead) lead = &f;
      }
    }
    if (at_barrier + returned != n || at_barrier == 0)
      throw Error(group_name() + ": deadlock, SIMD-group and threadgroup rendezvous interleaved: " +
                  describe(0, n));
    for (const Fiber& f : fibers_) {
      if (f.state != State::at_barrier || same_rendezvous(f, *lead)) continue;
      throw Error(group_name() + ": threads reached different barriers" +
                  (same_site(f.site, lead->site)
                       ? std::string(" (one barrier in a helper called from divergent branches)")
                       : std::string()) +
                  ": " + describe(0, n));
    }
    if (returned > 0)
      throw Error(group_name() + ": " + where(lead->site) +
                  " not reached by every thread of the group: " + describe(0, n));
    if (strict_) memory_.publish(lead->mem_flags);
    for (Fiber& f : fibers_) f.state = State::ready;
  }

  void check_canaries() const {
    for (std::size_t b = 0; b < tg_storage_.size(); ++b) {
      const unsigned char* base = tg_storage_[b].data();
      const unsigned char* start = static_cast<const unsigned char*>(tg_ptrs_[b]);
      const unsigned char* end = start + tg_sizes_[b];
      const unsigned char* stop = base + tg_storage_[b].size();
      auto check = [&](const unsigned char* from, const unsigned char* to) {
        for (const unsigned char* p = from; p < to; ++p)
          if (*p != kCanary)
            throw Error(group_name() + ": write outside threadgroup buffer " + std::to_string(b) +
                        " (" + std::to_string(tg_sizes_[b]) + " bytes) at byte offset " +
                        std::to_string(p - start));
      };
      check(base, start);
      check(end, stop);
    }
  }

  const Kernel& kernel_;
  std::vector<Fiber> fibers_;
  Fiber* current_ = nullptr;
  ucontext_t scheduler_;
  uint3 group_pos_;
  std::vector<unsigned char> simd_slots_;
  std::vector<std::vector<unsigned char>> tg_storage_;
  std::vector<std::size_t> tg_sizes_;
  std::vector<void*> tg_ptrs_;
  std::size_t tg_buffer_bytes_ = 0;
  std::size_t tg_local_bytes_ = 0;
  std::unordered_map<void*, std::size_t> tg_locals_;  // function-scope arrays: bytes
  // Per SIMD-group: rendezvous released, and collectives carried out (by the first
  // lane to resume after each release); they differ while a release is unclaimed.
  std::vector<uint64_t> releases_, collectives_taken_;
  std::mt19937_64 rng_;
  bool strict_ = false;
  StrictMemory memory_;
  static inline thread_local StackPool stacks_;
};

void check_group_size(Dim3 tpg) {
  const uint64_t n = uint64_t(tpg.x) * tpg.y * tpg.z;
  if (n == 0 || n > kMaxThreadsPerGroup)
    throw Error("threads per threadgroup (" + std::to_string(tpg.x) + "," + std::to_string(tpg.y) +
                "," + std::to_string(tpg.z) + ") = " + std::to_string(n) +
                "; Metal allows 1 to 1024");
}

void run(Dim3 groups, Dim3 tpg, Dim3 threads, const std::vector<std::size_t>& tg_bytes,
         const Kernel& kernel) {
  check_group_size(tpg);
  if (uint64_t(threads.x) * threads.y * threads.z == 0)
    throw Error("empty dispatch: the host code must skip it rather than dispatch 0 threads");
  const FloatEnvironment float_environment(g_flush_subnormals);
  Dispatch d(kernel, tg_bytes);
  struct Scope {
    Dispatch* saved;
    explicit Scope(Dispatch* d) : saved(g_dispatch) { g_dispatch = d; }
    ~Scope() { g_dispatch = saved; }
  } scope(&d);
  const uint3 g = {groups.x, groups.y, groups.z}, full = {tpg.x, tpg.y, tpg.z};
  const uint3 grid = {threads.x, threads.y, threads.z};
  for (uint32_t z = 0; z < groups.z; ++z)
    for (uint32_t y = 0; y < groups.y; ++y)
      for (uint32_t x = 0; x < groups.x; ++x) {
        const uint3 pos = {x, y, z};
        const uint3 size = {std::min(tpg.x, threads.x - x * tpg.x),
                            std::min(tpg.y, threads.y - y * tpg.y),
                            std::min(tpg.z, threads.z - z * tpg.z)};
        d.run_group(pos, size, g, grid, full);
      }
}

Dispatch& active(const char* op) {
  if (!g_dispatch)
    throw Error(std::string(op) + " called outside a dispatch (from host code?)");
  return *g_dispatch;
}

}  // namespace

void dispatch_threadgroups(Dim3 groups, Dim3 tpg, const std::vector<std::size_t>& tg_bytes,
                           const Kernel& kernel) {
  run(groups, tpg, {groups.x * tpg.x, groups.y * tpg.y, groups.z * tpg.z}, tg_bytes, kernel);
}

void dispatch_threads(Dim3 threads, Dim3 tpg, const std::vector<std::size_t>& tg_bytes,
                      const Kernel& kernel) {
  check_group_size(tpg);
  const Dim3 groups = {(threads.x + tpg.x - 1) / tpg.x, (threads.y + tpg.y - 1) / tpg.y,
                       (threads.z + tpg.z - 1) / tpg.z};
  run(groups, tpg, threads, tg_bytes, kernel);
}

void set_schedule(const Schedule& schedule) { g_schedule = schedule; }

namespace detail {

void threadgroup_barrier(const Site& site, unsigned mem_flags) {
  active(site.op).barrier(site, mem_flags);
}

SimdView simd_exchange(const Site& site, const void* value, std::size_t size) {
  return active(site.op).simd_exchange(site, value, size);
}

void threadgroup_local(void* p, std::size_t size) {
  active("threadgroup variable").threadgroup_local(p, size);
}

unsigned lane_in_simdgroup() { return active("simdgroup_matrix").lane(); }

void check_matrix_access(const Site& site, const void* const* elements, unsigned count,
                         std::size_t element_bytes) {
  active(site.op).check_matrix_access(site, elements, count, element_bytes);
}

void fill_poison(void* p, std::size_t size) { fill_pattern(p, size, g_schedule.poison); }

void fail(const Site& site, const char* message) { throw Error(where(site) + ": " + message); }

void set_last_error(const char* message) { g_last_error = message; }

}  // namespace detail
}  // namespace mh

extern "C" {

void mh_set_schedule(int order, uint64_t seed, int poison, int memory) {
  mh::set_schedule({mh::Order(order), seed, static_cast<uint16_t>(poison), mh::Memory(memory)});
}

void mh_set_device_buffers(void* const* pointers, const size_t* sizes, int n) {
  mh::g_device_buffers.clear();
  for (int i = 0; i < n; ++i)
    mh::g_device_buffers.emplace_back(static_cast<unsigned char*>(pointers[i]), sizes[i]);
}

const char* mh_last_error() { return mh::g_last_error.c_str(); }

// 1: float32 subnormals flushed to zero in the dispatches that follow, as on Apple GPUs.
void mh_set_flush_subnormals(int flush) { mh::g_flush_subnormals = flush != 0; }

// clang lowers float -> __bf16 conversions (metal::bfloat) to these libcalls, which
// libgcc only provides from GCC 13 on: round to nearest even, NaNs stay quiet NaNs.
__bf16 __truncsfbf2(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t r = (u & 0x7fffffffu) > 0x7f800000u
                   ? uint16_t((u >> 16) | 0x40u)
                   : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return __builtin_bit_cast(__bf16, r);
}
__bf16 __truncdfbf2(double d) {
  // Two roundings (double -> float -> bfloat) can differ from one only for values
  // exactly halfway after the first; kernels do not convert doubles (Metal has none).
  return __truncsfbf2(static_cast<float>(d));
}
}
