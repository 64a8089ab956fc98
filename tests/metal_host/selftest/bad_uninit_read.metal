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

// min() drops a NaN and the +huge poison alike; only a large NEGATIVE poison
// shows that the unwritten slots took part (item: finite poisons of both signs).
// kMasked is the twin: slots of absent SIMD-groups are never read.
template <typename T, bool kMax, bool kMasked>
[[kernel]] void extremum_of_partials(
    device const T* x [[buffer(0)]],
    device T* out [[buffer(1)]],
    threadgroup T* partial [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  T v = kMax ? simd_max(x[tid]) : simd_min(x[tid]);
  if (lane == 0) {
    partial[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    T p = (!kMasked || lane < nsg) ? partial[lane] : partial[0];
    v = kMax ? simd_max(p) : simd_min(p);
    if (lane == 0) {
      out[0] = v;
    }
  }
}

// float min and half max: NaN poison hides both (min/max drop it), and 0x7F
// bytes are NaN in half, so before the finite poisons both passed.
template [[host_name("min_uninit_f32")]] [[kernel]] decltype(
    extremum_of_partials<float, false, false>) extremum_of_partials<float, false, false>;
template [[host_name("min_masked_f32")]] [[kernel]] decltype(
    extremum_of_partials<float, false, true>) extremum_of_partials<float, false, true>;
template [[host_name("max_uninit_f16")]] [[kernel]] decltype(
    extremum_of_partials<half, true, false>) extremum_of_partials<half, true, false>;
template [[host_name("max_masked_f16")]] [[kernel]] decltype(
    extremum_of_partials<half, true, true>) extremum_of_partials<half, true, true>;
template [[host_name("max_uninit_i32")]] [[kernel]] decltype(
    extremum_of_partials<int, true, false>) extremum_of_partials<int, true, false>;
template [[host_name("max_masked_i32")]] [[kernel]] decltype(
    extremum_of_partials<int, true, true>) extremum_of_partials<int, true, true>;
