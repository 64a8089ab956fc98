// BROKEN on purpose: thread 0 sums what the other threads wrote to threadgroup
// memory without a barrier in between; the harness must catch it.
#include <metal_stdlib>
using namespace metal;

kernel void sum_no_barrier(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  slots[tid] = x[tid];
  // missing: threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {
    float s = 0.0f;
    for (uint i = 0; i < tpg; ++i) {
      s += slots[i];
    }
    out[0] = s;
  }
}
