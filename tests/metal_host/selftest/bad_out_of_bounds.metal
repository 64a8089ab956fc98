// BROKEN on purpose: writes one element past the end of a buffer.
#include <metal_stdlib>
using namespace metal;

// The last thread writes out[n].
kernel void shift_right(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  out[gid + 1] = x[gid];
}

// The last thread writes one float past the threadgroup buffer.
kernel void threadgroup_overrun(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  slots[tid + 1] = x[tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = slots[tid];
}
