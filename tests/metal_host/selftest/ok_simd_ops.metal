// SIMD-group functions whose per-lane results the test recomputes in NumPy,
// dispatched with dispatchThreads so that the last group, and its last
// SIMD-group, are partial.
#include <metal_stdlib>
using namespace metal;

kernel void simd_ops(
    device const float* x [[buffer(0)]],
    device float4* out [[buffer(1)]],
    device uint* sizes [[buffer(2)]],
    uint gid [[thread_position_in_grid]],
    uint tpg [[threads_per_threadgroup]]) {
  const float v = x[gid];
  out[gid] = float4(simd_prefix_exclusive_sum(v), simd_max(v),
                    simd_shuffle_xor(v, ushort(1)), simd_broadcast(v, ushort(0)));
  // The non-uniform edge group must see its own size.
  sizes[gid] = tpg;
}

// The twin of helper_if_else (bad_divergent_simd.metal): the helper is called
// once by the whole SIMD-group, the branch only chooses the value.
static float lanes_total_uniform(float v) {
  return simd_sum(v);
}

kernel void helper_uniform(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]]) {
  const float v = x[gid];
  out[gid] = lanes_total_uniform(lane < 16 ? v : 2.0f * v);
}
