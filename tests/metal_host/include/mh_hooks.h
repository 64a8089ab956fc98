// The few entry points through which the Metal shim (mh_metal.h) reaches the CPU
// scheduler (runtime.cpp). Kept apart from metal_host.h so that .metal code sees no
// scheduler internals, only what a Metal thread could do: wait at a barrier and
// exchange values with the other lanes of its SIMD-group.
#pragma once
#include <cstddef>
#include <source_location>

namespace mh::detail {

// Largest value one lane may contribute to a SIMD-group operation (a float4 plus an
// argument needs 20 bytes; 64 leaves room for 4-wide 64-bit types).
inline constexpr std::size_t kSimdSlotBytes = 64;

// Where a rendezvous was reached: the call site in the kernel source plus the name
// of the operation, so that divergence reports say "simd_sum at ce.metal:41:17".
struct Site {
  const char* op;
  std::source_location loc;
};

// Blocks the calling GPU thread until every thread of its threadgroup reaches a
// barrier; reaching different barriers, or some threads having returned, is an
// error reported by the scheduler. `mem_flags` are metal::mem_flags bits: under
// the strict memory model they decide which writes the barrier makes visible.
// A rendezvous is identified by its source site AND the call path that led to
// it, so one helper reached from two divergent branches is two rendezvous.
inline constexpr unsigned kMemDevice = 1, kMemThreadgroup = 2;
void threadgroup_barrier(const Site& site, unsigned mem_flags);

// Blocks until every live lane of the caller's SIMD-group has called simd_exchange
// at the same site, each depositing `size` bytes. Returns the deposits of all lanes
// (lane i at offset i * kSimdSlotBytes); inactive lanes of a partial SIMD-group hold
// the schedule's poison. The returned memory stays valid until the caller's next SIMD-group
// operation.
//
// `first` is true for exactly one lane per rendezvous: the first of its SIMD-group to
// run after the release. A collective operation (SIMD-group matrix load, store or
// product) is carried out by that lane for all 32 at that one moment, as the
// SIMD-group executes it on a GPU, and its per-lane results are left in the slots
// (hence writable) for the other lanes to pick up.
struct SimdView {
  unsigned char* slots;
  unsigned lane;       // the caller's lane
  unsigned live;       // lanes 0 .. live-1 exist; the rest of the 32 do not
  bool first;          // the first lane of the SIMD-group to resume after the release
};
SimdView simd_exchange(const Site& site, const void* value, std::size_t size);

// Called where a kernel declares a function-scope `threadgroup` variable (rewritten
// to a static by rewrite.py): the first thread of a group to get there poisons it,
// as the runtime does for [[threadgroup(n)]] buffers at group start.
void threadgroup_local(void* p, std::size_t size);

// The caller's thread_index_in_simdgroup (a SIMD-group matrix constructor needs to
// know which elements its lane holds).
unsigned lane_in_simdgroup();

// Checks the memory that a SIMD-group matrix load or store touches: the `count`
// elements of `element_bytes` bytes at `elements` (row-major over the 8x8 matrix)
// must all lie in the one threadgroup buffer, function-scope threadgroup array or
// registered device buffer (the arrays Python passed) that holds any of them;
// otherwise a kernel error names the site and the first element outside. Memory
// the runtime does not know (a buffer an adaptor allocated) is not checked.
void check_matrix_access(const Site& site, const void* const* elements, unsigned count,
                         std::size_t element_bytes);

// Fills p with the running schedule's poison pattern (what a lane that does not
// exist, or memory nobody wrote, holds).
void fill_poison(void* p, std::size_t size);

// Reports a misuse of a Metal function (e.g. a non-uniform shuffle delta) as a
// kernel error naming the call site.
[[noreturn]] void fail(const Site& site, const char* message);

}  // namespace mh::detail
