// INVALID on purpose: MSL has no C++ standard library; std::exp compiles here
// (the shim is C++) but not under `xcrun metal`. static_check.py must reject it.
#include <metal_stdlib>
#include <cmath>
using namespace metal;

kernel void std_exp(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  out[gid] = std::exp(x[gid]);
}
