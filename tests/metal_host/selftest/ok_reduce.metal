// Correct two-level reductions: simd_sum/simd_max within each SIMD-group, partials
// through threadgroup memory, then a second SIMD reduction by SIMD-group 0 only.
// Must pass with any group size, including a partial last SIMD-group.
#include <metal_stdlib>
using namespace metal;

// Partials in a [[threadgroup(0)]] buffer of 32 floats.
template <typename T>
[[kernel]] void row_sum(
    device const T* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    threadgroup float* partial [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  float acc = 0.0f;
  for (uint i = tid; i < n; i += tpg) {
    acc += float(x[ulong(row) * n + i]);
  }
  acc = simd_sum(acc);
  if (lane == 0) {
    partial[sg] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float v = lane < nsg ? partial[lane] : 0.0f;
    v = simd_sum(v);
    if (lane == 0) {
      out[row] = v;
    }
  }
}

#define instantiate_row_sum(name, T)                                           \
  template [[host_name("row_sum_" #name)]] [[kernel]] void row_sum<T>(         \
      device const T*, device float*, constant uint&, threadgroup float*,      \
      uint, uint, uint, uint, uint, uint);

instantiate_row_sum(float32, float)
instantiate_row_sum(float16, half)

// Partials in a function-scope threadgroup array; the empty slots of a group with
// fewer than 32 SIMD-groups are masked with -inf, never read.
[[kernel]] void row_max(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& n [[buffer(2)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  threadgroup float partial[32];
  float m = -numeric_limits<float>::infinity();
  for (uint i = tid; i < n; i += tpg) {
    m = max(m, x[ulong(row) * n + i]);
  }
  m = simd_max(m);
  if (lane == 0) {
    partial[sg] = m;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    m = simd_max(lane < nsg ? partial[lane] : -numeric_limits<float>::infinity());
    if (lane == 0) {
      out[row] = m;
    }
  }
}
