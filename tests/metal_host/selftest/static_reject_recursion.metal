// INVALID on purpose: MSL forbids recursion (kernels have no call stack to
// speak of); static_check.py must find the cycle in the call graph.
#include <metal_stdlib>
using namespace metal;

static float power(float x, uint n) {
  return n == 0 ? 1.0f : x * power(x, n - 1);
}

kernel void recursive_power(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  out[gid] = power(x[gid], 3);
}
