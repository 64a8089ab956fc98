// BROKEN on purpose: barriers that not every thread of the group reaches. On a GPU
// these hang or corrupt; the harness must report them.
#include <metal_stdlib>
using namespace metal;

// Threads 16 and up skip the barrier and return.
kernel void barrier_in_branch(
    device float* out [[buffer(0)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid < 16) {
    slots[tid] = float(tid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[tid] = slots[15 - tid];
  }
}

// Every thread reaches a barrier, but odd and even threads different ones.
kernel void barrier_per_branch(
    device float* out [[buffer(0)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  slots[tid] = float(tid);
  if (tid % 2 == 1) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = slots[tid ^ 1];
}
