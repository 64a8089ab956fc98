// INVALID on purpose: MSL has no virtual functions; static_check.py must reject
// them (a plain member function is fine: see ok_msl_subset.metal).
#include <metal_stdlib>
using namespace metal;

struct Loss {
  virtual float value(float x) const { return x * x; }
};

kernel void virtual_loss(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  Loss loss;
  out[gid] = loss.value(x[gid]);
}
