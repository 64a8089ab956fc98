// BROKEN on purpose (for this project's rules): SIMD-group functions that not all
// lanes of a SIMD-group call together.
#include <metal_stdlib>
using namespace metal;

// Lanes 0-15 and 16-31 call different SIMD functions.
kernel void simd_if_else(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  if (lane < 16) {
    v = simd_sum(v);
  } else {
    v = simd_max(v);
  }
  out[gid] = v;
}

// Out-of-range threads return before the reduction, so the last SIMD-group runs
// simd_sum with some lanes gone: mask the load instead.
kernel void simd_after_return(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid >= n) {
    return;
  }
  out[gid] = simd_sum(x[gid]);
}

// simd_shuffle_down's delta must be the same in all lanes.
kernel void shuffle_nonuniform_delta(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  out[gid] = simd_shuffle_down(x[gid], ushort(lane % 2 + 1));
}

// Half of a SIMD-group waits in simd_sum for lanes that wait at a barrier for it.
kernel void simd_or_barrier(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  float v = 1.0f;
  if (lane < 16) {
    v = simd_sum(v);
  } else {
    threadgroup_barrier(mem_flags::mem_none);
  }
  out[gid] = v;
}
