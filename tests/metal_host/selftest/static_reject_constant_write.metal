// INVALID on purpose: writes through a constant-address-space pointer. `xcrun
// metal` rejects this; static_check.py must too.
#include <metal_stdlib>
using namespace metal;

kernel void write_constant(
    constant float* params [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  params[gid] = 0.0f;
}
