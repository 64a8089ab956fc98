// One thread evaluates shim functions whose Metal results are known exactly; the
// test lists the expected values in the same order.
#include <metal_stdlib>
using namespace metal;

kernel void shim_values(device float* out [[buffer(0)]]) {
  uint i = 0;
  // Vector constructors: splat, concatenation, element-wise conversion.
  const float4 v = float4(float2(1.0f, 2.0f), 3.0f, 4.0f);
  out[i++] = dot(v, float4(1.0f));
  const half2 h = half2(float2(0.1f, 65519.0f));
  out[i++] = float(h.x);
  out[i++] = float(h.y);  // rounds to the largest half, 65504
  // bfloat keeps 8 significant bits, rounding to nearest even.
  out[i++] = float(bfloat(1.00390625f));  // halfway between 1 and 1.0078125 -> 1
  out[i++] = float(bfloat(1.01171875f));  // halfway between 1.0078125 and 1.015625 -> 1.015625
  out[i++] = float(numeric_limits<half>::max());
  out[i++] = float(numeric_limits<bfloat>::lowest());
  out[i++] = as_type<float>(0x3f800000u);
  out[i++] = float(as_type<uint>(2.0f) >> 23);
  out[i++] = select(1.0f, 2.0f, true);
  out[i++] = sign(-3.0f);
  out[i++] = float(clamp(7, 0, 5));
  out[i++] = max(numeric_limits<float>::quiet_NaN(), 1.5f);  // NaN is dropped
  out[i++] = round(-2.5f);  // away from zero
  out[i++] = fract(-0.25f);
  out[i++] = precise::exp(1.0f);
  out[i++] = fast::log(1.0f);
  out[i++] = log1p(1e-10f);
  out[i++] = float(isinf(numeric_limits<half>::infinity()));
  // half arithmetic rounds every operation: 2048 + 1 is not representable.
  out[i++] = float(half(2048.0f) + half(1.0f));
}
