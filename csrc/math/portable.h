// The few language differences between C++ (CPU kernels) and Metal Shading
// Language (metal/*.metal) that the shared formulas in csrc/math need.
//
// Everything in csrc/math is written in the common subset of both languages:
// plain functions on float/int scalars, no pointers, no std:: containers, no
// exceptions. Include this header first; it opens namespace `flm` (fused-loss
// math) and provides bit casts and the handful of IEEE helpers both sides use.
//
// The transcendental functions (exp, log, log1p) are our own (fl_math.h) rather
// than the platform's so that the CPU path vectorizes (no libm calls in the hot
// loop) and both paths round identically: only summation order differs.
#pragma once

#if defined(__METAL_VERSION__)

#include <metal_stdlib>

#define FLM_INLINE inline
// Program-scope constants live in the constant address space in MSL.
#define FLM_CONST constant constexpr
namespace flm {
using namespace metal;
typedef uint u32;
typedef int i32;
FLM_INLINE u32 float_bits(float x) {
  return as_type<u32>(x);
}
FLM_INLINE float bits_float(u32 u) {
  return as_type<float>(u);
}
FLM_INLINE float mul_add(float a, float b, float c) {
  return fma(a, b, c);
}
} // namespace flm

#else // C++

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__)
#define FLM_INLINE inline __attribute__((always_inline))
#else
#define FLM_INLINE inline
#endif
#define FLM_CONST constexpr

namespace flm {
typedef uint32_t u32;
typedef int32_t i32;
FLM_INLINE u32 float_bits(float x) {
  u32 u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
FLM_INLINE float bits_float(u32 u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}
// Branch-free min/max that the vectorizer turns into maxps/minps.
FLM_INLINE float fmax(float a, float b) {
  return a > b ? a : b;
}
FLM_INLINE float fmin(float a, float b) {
  return a < b ? a : b;
}
FLM_INLINE float fabs(float a) {
  return bits_float(float_bits(a) & 0x7fffffffu);
}
// a * b + c rounded once (IEEE-754 fusedMultiplyAdd). The shared formulas ask
// for their FMAs by name rather than leaving them to the compiler's
// contraction (the build passes -ffp-contract=off): an explicit FMA has one
// exactly specified result, so the vector body of a loop, its scalar tail,
// another instruction set and the Metal kernels all compute the same bits.
// Where the CPU has FMA instructions (every clone but x86-64's baseline one,
// see cpu/vectorize.h) this is one instruction and vectorizes; the baseline
// x86-64 clone gets libm's exact software fmaf: slower, same results.
FLM_INLINE float mul_add(float a, float b, float c) {
#if defined(__GNUC__)
  return __builtin_fmaf(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
} // namespace flm

#endif

namespace flm {

FLM_CONST float kInf = INFINITY;
FLM_CONST float kNaN = NAN;

// isnan/isinf by bit pattern: immune to -ffast-math style assumptions and
// identical on both languages.
FLM_INLINE bool is_nan(float x) {
  return (float_bits(x) & 0x7fffffffu) > 0x7f800000u;
}
FLM_INLINE bool is_inf(float x) {
  return (float_bits(x) & 0x7fffffffu) == 0x7f800000u;
}
// sign(x) with sign(0) = 0, as the gradient of |x| at 0, and sign(NaN) = NaN
// (a NaN input must give a NaN gradient, not 0).
FLM_INLINE float sign0(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (is_nan(x) ? x : 0.0f));
}

// min(max(x, lo), hi) that keeps a NaN x (fmin/fmax would return a bound).
FLM_INLINE float clamp_keep_nan(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

} // namespace flm
