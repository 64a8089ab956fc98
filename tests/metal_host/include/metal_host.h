// Host side of the Metal-on-CPU harness: what an adaptor .cpp uses to run a kernel.
//
// A kernel test builds one shared library from [metal_host.h, the .metal sources,
// its adaptor] (build.py does this). The adaptor exports `extern "C"` entry points
// that take plain pointers and scalars from Python and dispatch the kernel:
//
//   extern "C" int sum_rows(float* out, const float* x, uint32_t rows, uint32_t n) {
//     return mh::guarded([&] {
//       mh::dispatch_threadgroups({rows}, {256}, {32 * sizeof(float)},
//                                 [&](const mh::ThreadCtx& t) {
//         sum_rows_kernel(x, out, n, t.threadgroup_memory<float>(0),
//                         t.threadgroup_position_in_grid.x,
//                         t.thread_index_in_threadgroup, t.thread_index_in_simdgroup,
//                         t.simdgroup_index_in_threadgroup);
//       });
//     });
//   }
//
// Every GPU thread runs as a fiber; threadgroups run one after another. Barriers and
// SIMD-group functions are checked rendezvous (see runtime.cpp); misuse raises
// mh::Error, which guarded() turns into a nonzero return and Python into an exception.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "mh_hooks.h"

namespace mh {

// Same type as metal::uint3, so it can be passed to `uint3 ... [[attribute]]` directly.
using uint3 = unsigned __attribute__((ext_vector_type(3)));

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

// A kernel bug or API misuse found by the harness; the message names the call site.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The thread attributes of MSL, named as in MSL, for the adaptor to pass on.
struct ThreadCtx {
  uint3 thread_position_in_grid;
  uint3 threadgroup_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threads_per_threadgroup;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint32_t thread_index_in_threadgroup;
  uint32_t thread_index_in_simdgroup;
  uint32_t simdgroup_index_in_threadgroup;
  uint32_t threads_per_simdgroup;
  uint32_t simdgroups_per_threadgroup;

  // The [[threadgroup(index)]] buffer of the running group.
  template <class T>
  T* threadgroup_memory(std::size_t index) const {
    if (index >= threadgroup_buffers->size())
      throw Error("threadgroup_memory(" + std::to_string(index) + "): the dispatch declared only " +
                  std::to_string(threadgroup_buffers->size()) + " threadgroup buffers");
    return static_cast<T*>((*threadgroup_buffers)[index]);
  }
  const std::vector<void*>* threadgroup_buffers;
};

using Kernel = std::function<void(const ThreadCtx&)>;

// MTLComputeCommandEncoder::dispatchThreadgroups: groups x threads_per_group threads.
// threadgroup_bytes[i] is setThreadgroupMemoryLength(bytes, i): a multiple of 16,
// 32 KiB in total at most, as Metal requires.
void dispatch_threadgroups(Dim3 groups, Dim3 threads_per_group,
                           const std::vector<std::size_t>& threadgroup_bytes,
                           const Kernel& kernel);

// MTLComputeCommandEncoder::dispatchThreads: exactly `threads` threads; the last
// group in each dimension is cut short (non-uniform threadgroups).
void dispatch_threads(Dim3 threads, Dim3 threads_per_group,
                      const std::vector<std::size_t>& threadgroup_bytes, const Kernel& kernel);

// How a launch is executed. Python runs each launch under several schedules and
// compares the outputs bit for bit: a difference means a race, a read of
// uninitialised memory, or a read that depends on a missing memory flag.
//
// order: which ready fiber runs next.
//   forward / reverse / random: lock-step rounds; every ready fiber runs to its
//     next rendezvous, then released SIMD-groups all continue together.
//   ahead / ahead_reverse: one SIMD-group at a time runs as far as it can
//     (through its SIMD functions, up to a threadgroup barrier or its end)
//     before the next one moves, in SIMD-group order or in reverse order (with
//     the lanes reversed too). This is how write-after-read races across SIMD
//     functions show: a SIMD-group reuses scratch that another has not read yet.
// poison: a 16-bit pattern that fills threadgroup memory at every group start and
//   the values of SIMD lanes that do not exist (0xFFFF: NaN in float, half and
//   bfloat; 0x7BFF / 0xFBFF: +-65504 in half, +-2.7e36 in float and bfloat,
//   large integers of either sign, so that both min and max see garbage).
// memory: coherent (every write visible at once) or strict: a SIMD-group's
//   writes stay invisible to the other SIMD-groups until a threadgroup_barrier
//   whose flags cover that memory (mem_threadgroup for threadgroup memory,
//   mem_device for the registered device buffers) releases them; strict needs
//   an `ahead` order, where a SIMD-group is the unit that runs between switches.
enum class Order : int { forward = 0, reverse = 1, random = 2, ahead = 3, ahead_reverse = 4 };
enum class Memory : int { coherent = 0, strict = 1 };
struct Schedule {
  Order order = Order::forward;
  uint64_t seed = 0;
  uint16_t poison = 0xFFFF;
  Memory memory = Memory::coherent;
};
void set_schedule(const Schedule& schedule);

namespace detail {
void set_last_error(const char* message);
}

// Runs f, turning any exception into a nonzero return code for the C ABI; Python
// then reads the message with mh_last_error().
template <class F>
int guarded(F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    detail::set_last_error(e.what());
  } catch (...) {
    detail::set_last_error("unknown C++ exception");
  }
  return 1;
}

}  // namespace mh

extern "C" {
// For the Python driver (driver.py).
void mh_set_schedule(int order, uint64_t seed, int poison, int memory);
// The device buffers of the next run (their data bytes), for the strict memory
// model; n = 0 leaves device memory coherent.
void mh_set_device_buffers(void* const* pointers, const size_t* sizes, int n);
const char* mh_last_error();
}
