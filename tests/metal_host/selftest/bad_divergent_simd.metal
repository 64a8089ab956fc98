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

// The same SIMD function reached from two divergent branches through one helper:
// one source site, two call paths. On a GPU each branch's simd_sum involves only
// its own 16 lanes; a harness that keys rendezvous by source site alone lets all
// 32 lanes meet and sums across the branches.
static float lanes_total(float v) {
  return simd_sum(v);
}

kernel void helper_if_else(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  float v = x[gid];
  if (lane < 16) {
    v = lanes_total(v);
  } else {
    v = lanes_total(2.0f * v);
  }
  out[gid] = v;
}

// A barrier in a helper called from divergent branches: two barriers.
static void sync_group() {
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

kernel void helper_barrier_if_else(
    device float* out [[buffer(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (tid % 2 == 0) {
    sync_group();
  } else {
    sync_group();
  }
  out[tid] = float(tid);
}
