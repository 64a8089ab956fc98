// REJECTED by the static check, as by `xcrun metal`: simdgroup_load reads device or
// threadgroup memory only; there is no overload for a constant pointer.
#include <metal_stdlib>
using namespace metal;

kernel void load_from_constant(
    constant float* weights [[buffer(0)]],
    device float* out [[buffer(1)]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, weights);
  simdgroup_store(m, out);
}
