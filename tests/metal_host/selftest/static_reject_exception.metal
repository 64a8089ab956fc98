// INVALID on purpose: MSL has no exceptions; static_check.py must reject `throw`.
#include <metal_stdlib>
using namespace metal;

kernel void throw_on_negative(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  if (x[gid] < 0.0f) {
    throw 1;
  }
  out[gid] = sqrt(x[gid]);
}
