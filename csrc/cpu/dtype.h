// Element types of the CPU kernels and their conversion to and from float32.
//
// Half and bfloat16 are read and written as 16-bit patterns and converted in
// registers with integer arithmetic, so the loops vectorize (a _Float16 cast on
// x86 without F16C is a libgcc call per element). Rounding is to nearest even,
// NaN stays NaN, overflow goes to inf, subnormals are exact.
#pragma once

#include <cstdint>

#include "math/portable.h"
#include "mlx/array.h"

namespace fl::cpu {

struct Half {
  uint16_t bits;
};
struct BFloat {
  uint16_t bits;
};

FLM_INLINE float to_float(float x) {
  return x;
}

FLM_INLINE float to_float(BFloat x) {
  return flm::bits_float(uint32_t(x.bits) << 16);
}

FLM_INLINE float to_float(Half x) {
  uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  uint32_t mag = x.bits & 0x7fffu;
  // Shift the exponent and mantissa into place, then rescale by 2^(127-15):
  // exact for normal and subnormal halves alike.
  float f = flm::bits_float(mag << 13) * 5.192296858534828e33f; // 2^112
  // inf stays inf; a NaN keeps its payload and is made quiet, as F16C's
  // vcvtph2ps does (convert.h's native path must give the same bits).
  uint32_t special = (mag << 13) | 0x7f800000u | (mag > 0x7c00u ? 0x00400000u : 0u);
  uint32_t bits = mag >= 0x7c00u ? special : flm::float_bits(f);
  return flm::bits_float(bits | sign);
}

template <typename T>
FLM_INLINE T from_float(float x);

template <>
FLM_INLINE float from_float<float>(float x) {
  return x;
}

template <>
FLM_INLINE BFloat from_float<BFloat>(float x) {
  uint32_t u = flm::float_bits(x);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return BFloat{uint16_t(flm::is_nan(x) ? ((u >> 16) | 0x40u) : rounded)};
}

template <>
FLM_INLINE Half from_float<Half>(float x) {
  uint32_t u = flm::float_bits(x);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t mag = u & 0x7fffffffu;
  uint32_t out;
  if (mag >= 0x47800000u) { // >= 65536: inf; or NaN, quiet, with the top of
    // its payload, as vcvtps2ph does
    out = mag > 0x7f800000u ? (0x7e00u | ((mag >> 13) & 0x3ffu)) : 0x7c00u;
  } else if (mag < 0x38800000u) { // below the smallest normal half
    // Adding 0.5 aligns the value's bits with the half subnormal grid; the
    // float addition itself performs round-to-nearest-even.
    float shifted = flm::bits_float(mag) + 0.5f;
    out = flm::float_bits(shifted) - 0x3f000000u;
  } else {
    uint32_t odd = (mag >> 13) & 1u;
    out = (mag + 0xc8000fffu + odd) >> 13; // rebias exponent 127 -> 15, round
  }
  return Half{uint16_t(out | sign)};
}

// Call f with a value of the C++ element type matching `dtype`.
template <typename F>
void dispatch_float(mlx::core::Dtype dtype, F&& f) {
  if (dtype == mlx::core::float32) {
    f(float{});
  } else if (dtype == mlx::core::float16) {
    f(Half{});
  } else if (dtype == mlx::core::bfloat16) {
    f(BFloat{});
  } else {
    throw std::invalid_argument("mlx_fused_losses: unsupported dtype in a CPU kernel");
  }
}

} // namespace fl::cpu
