// INVALID on purpose: a kernel may not keep state in a mutable program-scope
// variable (only `constant` globals exist in MSL); static_check.py must reject it.
#include <metal_stdlib>
using namespace metal;

float calls_so_far;

kernel void count_calls(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  calls_so_far += 1.0f;
  out[gid] = x[gid] + calls_so_far;
}
