// Produces float32 subnormals several ways, one per output slot, for the harness's
// flush-to-zero mode (tests/test_metal_harness.py): without the mode each slot holds
// the IEEE subnormal the CPU computes; with it, zero, as an Apple GPU gives. The
// bfloat slot: a bfloat subnormal widened to float is a float32 subnormal, flushed
// when used; the half slot: a half subnormal is a normal float32, and Apple GPUs keep
// half subnormals, so it survives the mode.
#include <metal_stdlib>
using namespace metal;

kernel void subnormal_probe(
    device const float* x [[buffer(0)]],      // {1e-20, 1e-40 (subnormal), -100, 1e-30, 2}
    device const bfloat* xb [[buffer(1)]],    // {a bfloat subnormal}
    device const half* xh [[buffer(2)]],      // {a half subnormal}
    device float* out [[buffer(3)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid != 0) {
    return;
  }
  out[0] = x[0] * x[0];                       // normal * normal -> 1e-40: result flushed
  // (x * 1.0f would be folded away by the compiler: multiply by a loaded 2.)
  out[1] = x[1] * x[4];                       // subnormal operand: flushed on input
  out[2] = exp(x[2]);                         // e^-100 = 3.7e-44: the math library's result
  out[3] = fma(x[3], x[3] * 1e-10f, 0.0f);    // fused: 1e-70 rounds to 0 either way ...
  out[4] = fma(x[0], x[0], -0.0f);            // ... 1e-40 through fma
  out[5] = float(xb[0]) * x[4];               // bfloat subnormal, widened then used
  out[6] = float(xh[0]) * x[4];               // half subnormal: normal as float, kept
  out[7] = x[1] > 0.0f ? 1.0f : 0.0f;         // a comparison reads the flushed operand
}
