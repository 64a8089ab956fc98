// Executes Metal compute dispatches on the CPU with Metal's execution model.
//
// Every GPU thread of a threadgroup is a fiber (ucontext) on its own small stack;
// the groups of a dispatch run one after another on the calling OS thread. A fiber
// runs until it reaches a rendezvous (threadgroup_barrier, or a SIMD-group function)
// or returns; the scheduler resumes ready fibers in the schedule's order, and when
// none is ready it decides what the waiting fibers are waiting for:
//   - a SIMD-group whose live lanes all wait at the same SIMD function is released
//     (SIMD functions involve the 32 lanes of ONE SIMD-group, never the whole group,
//     so `if (simdgroup_index == 0) simd_sum(...)` is valid, as on Apple GPUs);
//   - a group whose threads all wait at the same threadgroup_barrier is released;
//   - anything else can never make progress on a GPU either (divergent barrier,
//     lanes at different SIMD call sites, a barrier some threads returned before):
//     it is reported as mh::Error naming the call sites and threads, never a hang.
// Threadgroup memory is poisoned at every group start and fenced with canaries.

#include "metal_host.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <unordered_set>

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

enum class State { ready, at_barrier, at_simd, returned };

struct Fiber {
  ucontext_t context;
  State state;
  detail::Site site;    // where it waits (valid when at_barrier / at_simd)
  unsigned simd_ops;    // SIMD functions called so far: selects the deposit bank
  std::exception_ptr error;
  ThreadCtx ctx;
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
    tg_sizes_ = tg_bytes;
    for (auto& s : tg_storage_) {
      auto addr = reinterpret_cast<std::uintptr_t>(s.data()) + kCanaryBytes;
      tg_ptrs_.push_back(reinterpret_cast<void*>((addr + 15) & ~std::uintptr_t(15)));
    }
    rng_.seed(g_schedule.seed);
  }

  // Runs one threadgroup of `size` threads (non-uniform dispatches pass smaller
  // sizes for edge groups) to completion or throws.
  void run_group(uint3 group_pos, uint3 size, uint3 groups, uint3 grid, uint3 full_size) {
    const unsigned n = size.x * size.y * size.z;
    fibers_.resize(n);
    const unsigned simdgroups = (n + kSimdWidth - 1) / kSimdWidth;
    // Two banks per SIMD-group: a lane can be at most one SIMD function ahead of a
    // lane that has not yet read the previous results (the next rendezvous needs it).
    // Slots of lanes that do not exist stay all-ones: reading them yields poison.
    simd_slots_.assign(std::size_t(simdgroups) * 2 * kSimdWidth * detail::kSimdSlotBytes, 0xFF);
    for (std::size_t i = 0; i < tg_ptrs_.size(); ++i) {
      std::memset(tg_storage_[i].data(), kCanary, tg_storage_[i].size());
      std::memset(tg_ptrs_[i], g_schedule.poison, tg_sizes_[i]);
    }
    tg_locals_seen_.clear();

    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      f.state = State::ready;
      f.simd_ops = 0;
      f.error = nullptr;
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
      f.context.uc_stack.ss_sp = stacks_.stack(i);
      f.context.uc_stack.ss_size = kStackBytes;
      f.context.uc_link = nullptr;
      makecontext(&f.context, &Dispatch::fiber_main, 0);
    }

    std::vector<unsigned> order(n);
    std::iota(order.begin(), order.end(), 0u);
    if (g_schedule.order == Order::reverse) std::reverse(order.begin(), order.end());
    group_pos_ = group_pos;
    for (;;) {
      if (g_schedule.order == Order::random) std::shuffle(order.begin(), order.end(), rng_);
      for (unsigned i : order) {
        Fiber& f = fibers_[i];
        if (f.state != State::ready) continue;
        current_ = &f;
        swapcontext(&scheduler_, &f.context);
        if (f.error) rethrow_from(i, f.error);
      }
      if (std::all_of(fibers_.begin(), fibers_.end(),
                      [](const Fiber& f) { return f.state == State::returned; }))
        break;
      release_or_report();
    }
    check_canaries();
  }

  // Hooks called from kernel code, on the current fiber's stack.
  void barrier(const detail::Site& site) { wait(State::at_barrier, site); }

  detail::SimdView simd_exchange(const detail::Site& site, const void* value, std::size_t size) {
    Fiber& f = *current_;
    const unsigned sg = f.ctx.simdgroup_index_in_threadgroup, lane = f.ctx.thread_index_in_simdgroup;
    unsigned char* bank = &simd_slots_[(std::size_t(sg) * 2 + (f.simd_ops++ & 1)) * kSimdWidth *
                                       detail::kSimdSlotBytes];
    if (size) std::memcpy(bank + lane * detail::kSimdSlotBytes, value, size);
    wait(State::at_simd, site);
    return {bank, lane, live_lanes(sg)};
  }

  void threadgroup_local(void* p, std::size_t size) {
    if (tg_locals_seen_.insert(p).second) std::memset(p, g_schedule.poison, size);
  }

 private:
  static void fiber_main() {
    Dispatch& d = *g_dispatch;
    Fiber& f = *d.current_;
    try {
      d.kernel_(f.ctx);
    } catch (...) {
      f.error = std::current_exception();
    }
    f.state = State::returned;
    // Never resumed again: the next group re-creates the context on this stack.
    setcontext(&d.scheduler_);
  }

  void wait(State state, const detail::Site& site) {
    Fiber& f = *current_;
    f.state = state;
    f.site = site;
    swapcontext(&f.context, &scheduler_);
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

  // "threads 0-31 wait in simd_sum at k.metal:9:12; threads 32-63 have returned"
  std::string describe(unsigned first, unsigned last) const {
    std::vector<std::pair<std::string, std::vector<unsigned>>> parts;
    for (unsigned i = first; i < last; ++i) {
      const Fiber& f = fibers_[i];
      std::string what = f.state == State::returned ? "have returned" : "wait in " + where(f.site);
      auto it = std::find_if(parts.begin(), parts.end(), [&](auto& p) { return p.first == what; });
      if (it == parts.end()) parts.push_back({what, {i}});
      else it->second.push_back(i);
    }
    std::string out;
    for (auto& [what, ids] : parts)
      out += (out.empty() ? "" : "; ") + std::string("threads ") + ranges(ids) + " " + what;
    return out;
  }

  void release_or_report() {
    bool released = false;
    const unsigned n = unsigned(fibers_.size());
    for (unsigned first = 0; first < n; first += kSimdWidth) {
      const unsigned last = std::min(n, first + kSimdWidth);
      unsigned at_simd = 0, returned = 0;
      for (unsigned i = first; i < last; ++i) {
        at_simd += fibers_[i].state == State::at_simd;
        returned += fibers_[i].state == State::returned;
      }
      if (at_simd == 0) continue;
      const detail::Site& site = fibers_[first_at_simd(first, last)].site;
      bool same = true;
      for (unsigned i = first; i < last; ++i)
        if (fibers_[i].state == State::at_simd && !same_site(fibers_[i].site, site)) same = false;
      if (!same)
        throw Error(group_name() + ", SIMD-group " + std::to_string(first / kSimdWidth) +
                    ": lanes reached different SIMD-group functions (divergent control flow; "
                    "this harness requires the whole SIMD-group at each call): " +
                    describe(first, last));
      if (returned > 0)
        throw Error(group_name() + ", SIMD-group " + std::to_string(first / kSimdWidth) + ": " +
                    where(site) + " reached after some lanes returned: " + describe(first, last));
      if (at_simd == last - first) {
        for (unsigned i = first; i < last; ++i) fibers_[i].state = State::ready;
        released = true;
      }
    }
    if (released) return;

    unsigned at_barrier = 0, returned = 0;
    for (const Fiber& f : fibers_) {
      at_barrier += f.state == State::at_barrier;
      returned += f.state == State::returned;
    }
    if (at_barrier + returned == n && at_barrier > 0) {
      const detail::Site& site = fibers_[first_at_barrier()].site;
      for (const Fiber& f : fibers_)
        if (f.state == State::at_barrier && !same_site(f.site, site))
          throw Error(group_name() + ": threads reached different barriers: " + describe(0, n));
      if (returned > 0)
        throw Error(group_name() + ": " + where(site) +
                    " not reached by every thread of the group: " + describe(0, n));
      for (Fiber& f : fibers_) f.state = State::ready;
      return;
    }
    throw Error(group_name() + ": deadlock, SIMD-group and threadgroup rendezvous interleaved: " +
                describe(0, n));
  }

  unsigned first_at_simd(unsigned first, unsigned last) const {
    for (unsigned i = first; i < last; ++i)
      if (fibers_[i].state == State::at_simd) return i;
    return last;
  }
  unsigned first_at_barrier() const {
    for (unsigned i = 0; i < fibers_.size(); ++i)
      if (fibers_[i].state == State::at_barrier) return i;
    return 0;
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
  std::unordered_set<void*> tg_locals_seen_;
  std::mt19937_64 rng_;
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

void threadgroup_barrier(const Site& site) { active(site.op).barrier(site); }

SimdView simd_exchange(const Site& site, const void* value, std::size_t size) {
  return active(site.op).simd_exchange(site, value, size);
}

void threadgroup_local(void* p, std::size_t size) {
  active("threadgroup variable").threadgroup_local(p, size);
}

void fail(const Site& site, const char* message) { throw Error(where(site) + ": " + message); }

void set_last_error(const char* message) { g_last_error = message; }

}  // namespace detail
}  // namespace mh

extern "C" {

void mh_set_schedule(int order, uint64_t seed, int poison) {
  mh::set_schedule({mh::Order(order), seed, static_cast<unsigned char>(poison)});
}

const char* mh_last_error() { return mh::g_last_error.c_str(); }

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
