// BROKEN on purpose (item: write-after-read across SIMD-group functions): two
// group sums share one scratch array with no barrier between the first sum's
// reads and the second sum's writes. In lock-step rounds no SIMD-group ever gets
// ahead, so this passes there; the `ahead` schedules let SIMD-group 1 write its
// second partial before SIMD-group 0 has read the first. The twin has the barrier.
#include <metal_stdlib>
using namespace metal;

// The sum over the group, valid in SIMD-group 0.
static float group_sum(float v, threadgroup float* scratch, uint sg, uint lane, uint nsg) {
  v = simd_sum(v);
  if (lane == 0) {
    scratch[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  if (sg == 0) {
    total = simd_sum(lane < nsg ? scratch[lane] : 0.0f);
  }
  return total;
}

template <bool kBarrierBetween>
[[kernel]] void sum_and_sum_of_squares(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  const float v = x[tid];
  const float sum = group_sum(v, scratch, sg, lane, nsg);
  if (kBarrierBetween) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // scratch read before reuse
  }
  const float squares = group_sum(v * v, scratch, sg, lane, nsg);
  if (tid == 0) {
    out[0] = sum;
    out[1] = squares;
  }
}

template [[host_name("scratch_reuse_broken")]] [[kernel]] decltype(sum_and_sum_of_squares<false>)
    sum_and_sum_of_squares<false>;
template [[host_name("scratch_reuse_fixed")]] [[kernel]] decltype(sum_and_sum_of_squares<true>)
    sum_and_sum_of_squares<true>;
