// INVALID on purpose: Metal has no 64-bit floating point; static_check.py must
// reject `double` in kernel code (the float twin is in ok_msl_subset.metal).
#include <metal_stdlib>
using namespace metal;

kernel void accumulate_in_double(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  double acc = x[gid];
  out[gid] = float(acc * acc);
}
