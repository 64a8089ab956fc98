// BROKEN on purpose: the second reduction step reads all 32 partial slots, but a
// group of fewer than 1024 threads fills only one per SIMD-group (the bug class of
// MLX's looped softmax). The harness must catch both forms.
#include <metal_stdlib>
using namespace metal;

// The poisoned slots reach the sum: NaN under the default poison.
kernel void sum_uninit(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* partial [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  float s = simd_sum(x[tid]);
  if (lane == 0) {
    partial[sg] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    s = simd_sum(partial[lane]);
    if (lane == 0) {
      out[0] = s;
    }
  }
}

// max() drops a NaN, so this one looks right under the NaN poison; the 3.4e38
// poison of another run exposes it.
kernel void max_uninit(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* partial [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  float m = simd_max(x[tid]);
  if (lane == 0) {
    partial[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    m = simd_max(partial[lane]);
    if (lane == 0) {
      out[0] = m;
    }
  }
}
