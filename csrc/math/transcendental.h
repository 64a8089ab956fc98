// float32 exp, log, log1p and pow written as straight-line
// arithmetic and bit manipulation, shared by the CPU kernels and the Metal
// kernels.
//
// Why our own: (1) the CPU loops must vectorize, and a call into libm's expf
// stops GCC's vectorizer; (2) Metal has no log1p, and its fast:: variants are
// not accurate enough near 0 for the focal losses; (3) one implementation means
// the CPU and GPU paths differ only in summation order.
//
// Accuracy (checked in tests/test_math.py against float64 over dense sweeps of
// the float32 range, subnormal inputs and results included): exp and log
// within 2 ulp, log1p within 2.5 ulp (2.2 measured, from Goldberg's correction
// for x > sqrt(2) - 1); +-inf and NaN handled as IEEE-754 says.
// The code relies on strict IEEE arithmetic (no -ffast-math): the rounding
// constant trick and Goldberg's log1p correction must not be reassociated.
// MLX's metallib build passes -fno-fast-math; our CMake never enables it.
#pragma once

#include "portable.h"

namespace flm {

FLM_CONST float kLn2Hi = 0.693145751953125f; // high bits of ln 2, exact in n*hi
FLM_CONST float kLn2Lo = 1.428606765330187e-06f; // ln 2 - kLn2Hi
FLM_CONST float kLog2e = 1.4426950408889634f;
// Adding then subtracting 1.5 * 2^23 rounds a float of magnitude < 2^22 to the
// nearest integer without a call to rint (which does not vectorize everywhere).
FLM_CONST float kRoundMagic = 12582912.0f;

// 2^n for integer-valued float n in [-126, 127], by building the exponent.
FLM_INLINE float exp2_int(float n) {
  return bits_float(u32(i32(n) + 127) << 23);
}

// e^x = poly * 2^n for a clamped x: Cody-Waite reduction x = n ln2 + r,
// |r| <= ln2/2, then a degree-7 Taylor polynomial (truncation error < 2^-27
// relative on that interval). Shared by the two exp variants below.
struct ExpParts {
  float poly;
  float n;
};

// e^r for |r| <= ln2/2 (a little more is fine).
// Horner with FMAs: one rounding per step.
FLM_INLINE float exp_poly(float r) {
  float p = 1.0f / 5040.0f;
  p = mul_add(p, r, 1.0f / 720.0f);
  p = mul_add(p, r, 1.0f / 120.0f);
  p = mul_add(p, r, 1.0f / 24.0f);
  p = mul_add(p, r, 1.0f / 6.0f);
  p = mul_add(p, r, 0.5f);
  p = mul_add(p, r, 1.0f);
  return mul_add(p, r, 1.0f);
}

// r = x - n ln2 in two FMAs: n * kLn2Hi is exact anyway, and the FMA keeps
// n * kLn2Lo's rounding out of r.
FLM_INLINE float exp_reduce(float x, float n) {
  return mul_add(-n, kLn2Lo, mul_add(-n, kLn2Hi, x));
}

FLM_INLINE ExpParts exp_parts(float xc) {
  ExpParts e;
  e.n = mul_add(xc, kLog2e, kRoundMagic) - kRoundMagic;
  e.poly = exp_poly(exp_reduce(xc, e.n));
  return e;
}

// e^x over the whole float range. 2^n is applied as two factors so results in
// the subnormal range round once.
FLM_INLINE float exp_f32(float x) {
  ExpParts e = exp_parts(fmin(fmax(x, -104.0f), 89.0f)); // e^-104 -> 0, e^89 -> inf
  float n_half = mul_add(e.n, 0.5f, kRoundMagic) - kRoundMagic; // n = n_half + rest
  float y = e.poly * exp2_int(n_half) * exp2_int(e.n - n_half);
  return is_nan(x) ? x : y;
}

// e^x for x <= 0 (or NaN), subnormal results included: the same bits as
// exp_f32 there, for fewer operations (the sigmoid losses' e^-|x|, and
// pow_unit's e^(gamma log b)). 2^n is applied as 2^(n + 64) (built from the
// bits of the rounding sum, as in exp_nonpos_f32; normal for n >= -150) times
// the constant 2^-64: the first product is exact, the second rounds once, the
// single rounding of poly * 2^n that exp_f32's two factors also give. The
// clamp at -104 (e^-104 rounds to 0) keeps a NaN x, which then makes poly NaN.
FLM_INLINE float exp_neg_f32(float x) {
  float xc = x < -104.0f ? -104.0f : x;
  float t = mul_add(xc, kLog2e, kRoundMagic);
  float n = t - kRoundMagic;
  u32 biased_n = float_bits(t) - (float_bits(kRoundMagic) - 127u - 64u); // n + 64 + 127
  return exp_poly(exp_reduce(xc, n)) * bits_float(biased_n << 23) * 5.421010862427522e-20f; // 2^-64
}

// e^x for the softmax terms, x = logit - max or logit - lse <= 0 (valid up to
// x = 88): results below FLT_MIN (2^-126) are flushed to 0. Such a term cannot
// change a sum that contains the max's e^0 = 1, nor a probability noticeably.
// This is the hot loop of every row-wise kernel: no clamp and no NaN test.
// n is read from the bits of the rounding sum t = x log2e + 1.5 * 2^23 (integer
// arithmetic, defined for every t: no float-to-int conversion, which would be
// undefined behaviour for +-inf and NaN), and 2^n is applied by a multiply
// (exact while the result is normal: for x >= ln FLT_MIN either n > -126 or
// n = -126 and poly >= 1). Outside the valid range the bits are garbage but
// harmless: x < ln FLT_MIN (-inf included) is replaced by 0 at the end, and a
// NaN x (or +inf, reachable only from a row that also holds a NaN) makes r and
// so poly NaN, which any 2^n keeps NaN.
// The exponent bias 127 is folded into the rounding constant (1.5 * 2^23 + 127
// rounds exactly as 1.5 * 2^23 does: x log2e is never half-way between two
// integers for a float x in range), so float_bits(t) = float_bits(1.5 * 2^23)
// + 127 + n, and shifting it left by 23 drops float_bits(1.5 * 2^23), whose
// low 9 bits are zero: 2^n's bits in one shift, one integer add fewer per
// element than subtracting the bias first (the same bits).
FLM_CONST float kRoundMagicBiased = 12583039.0f; // 1.5 * 2^23 + 127
FLM_INLINE float exp_nonpos_f32(float x) {
  float t = mul_add(x, kLog2e, kRoundMagicBiased);
  float n = t - kRoundMagicBiased;
  float y = exp_poly(exp_reduce(x, n)) * bits_float(float_bits(t) << 23); // 2^n for |n| < 2^22
  return x < -87.33654f ? 0.0f : y; // e^-87.33654 = FLT_MIN
}

// log(1 + f) + e ln 2 for f in [sqrt(1/2) - 1, sqrt(2) - 1]. With
// s = f / (2 + f), log(1 + f) = 2 atanh(s) = f - (f^2/2 - s (f^2/2 + R)),
// R = 2/3 s^2 + 2/5 s^4 + ... (to s^8; truncation < 2^-28 relative): f carries
// the leading bits exactly and the rounding stays in the small terms (fdlibm's
// arrangement).
FLM_INLINE float log1p_reduced(float f, float e) {
  float s = f / (2.0f + f);
  float z = s * s;
  float r = 2.0f / 9.0f;
  r = mul_add(r, z, 2.0f / 7.0f);
  r = mul_add(r, z, 2.0f / 5.0f);
  r = mul_add(r, z, 2.0f / 3.0f);
  r = r * z;
  float half_f2 = 0.5f * f * f;
  return mul_add(e, kLn2Hi, f - (half_f2 - mul_add(s, half_f2 + r, e * kLn2Lo)));
}

// Natural log: x = 2^e * m with m in [sqrt(1/2), sqrt(2)), then log1p_reduced.
FLM_INLINE float log_f32(float x) {
  bool subnormal = x < 1.17549435e-38f;
  float xs = subnormal ? x * 8388608.0f : x; // scale subnormals by 2^23
  u32 bits = float_bits(xs);
  float e = float(i32((bits >> 23) & 0xffu) - 127) - (subnormal ? 23.0f : 0.0f);
  float m = bits_float((bits & 0x007fffffu) | 0x3f800000u); // in [1, 2)
  bool high = m > 1.41421356f;
  m = high ? m * 0.5f : m;
  e = high ? e + 1.0f : e;
  float y = log1p_reduced(m - 1.0f, e); // m - 1 is exact: m is within 2x of 1
  y = x == 0.0f ? -kInf : y;
  y = x < 0.0f ? kNaN : y;
  y = (is_inf(x) && x > 0.0f) ? x : y;
  return is_nan(x) ? x : y;
}

// log(1 + x): directly from the series where x itself is in the reduced range
// (no rounding of 1 + x at all), else log(u) * x / (u - 1) with u = 1 + x
// rounded (Goldberg's correction, which cancels that rounding).
FLM_INLINE float log1p_f32(float x) {
  float u = 1.0f + x;
  float y = log_f32(u) * (x / (u - 1.0f));
  bool reduced = x > -0.29289322f && x < 0.41421356f;
  y = reduced ? log1p_reduced(x, 0.0f) : y;
  y = is_inf(u) ? u : y;
  y = (x == -1.0f) ? -kInf : y;
  return is_nan(x) ? x : y;
}

// log(1 + x) for x in [0, 1] (softplus's log1p(exp(-|x|)), the sigmoid focal
// loss's hot loop) as x Q(x), Q a degree-9 polynomial fitted to log1p(x) / x
// on [0, 1] in relative error (iteratively reweighted least squares on
// Chebyshev nodes: 0.08 ulp of approximation error; log1p's nearest
// singularity, -1, is far enough from [0, 1] for a polynomial to converge
// fast). Ten FMAs and no division or select: the general reduction
// (log1p_reduced: a division s = f / (2 + f) and a range select) cost about
// twice the instructions, and the divider is the loop's scarcest unit.
// Error within 2 ulp (tests/test_math.py: 1.6 measured), relative for
// every x including subnormals (x Q(x) with Q(0) = 1).
FLM_INLINE float log1p_unit(float x) {
  float q = -3.243872896e-03f;
  q = mul_add(q, x, 1.985077746e-02f);
  q = mul_add(q, x, -5.695825070e-02f);
  q = mul_add(q, x, 1.060352474e-01f);
  q = mul_add(q, x, -1.530551612e-01f);
  q = mul_add(q, x, 1.967591345e-01f);
  q = mul_add(q, x, -2.495412827e-01f);
  q = mul_add(q, x, 3.332996070e-01f);
  q = mul_add(q, x, -4.999990165e-01f);
  q = mul_add(q, x, 1.0f);
  return x * q;
}

// base^gamma for base in [0, 1] and gamma >= 0, with 0^0 = 1 (the focal
// losses' (1-p)^gamma at gamma = 0 must reduce to cross-entropy exactly:
// exp(0 * log(base)) is exactly 1). Only the base is tested per element: a
// select on the loop-invariant gamma mixed with per-element masks stops GCC's
// vectorizer, so the gamma test is reduced to a scalar computed once.
FLM_INLINE float pow_unit(float base, float gamma) {
  float zero_pow = gamma == 0.0f ? 1.0f : 0.0f;
  float y = exp_neg_f32(gamma * log_f32(base)); // log(base) <= 0
  return base == 0.0f ? zero_pow : y;
}

// gamma = 2, the focal losses' usual exponent, as a type: kernels that know it
// at compile time get base * base instead of exp(2 log base) (two fewer
// transcendentals per element, and exact).
struct GammaTwo {};
FLM_INLINE float pow_unit(float base, GammaTwo) {
  return base * base;
}
FLM_INLINE float gamma_value(float gamma) {
  return gamma;
}
FLM_INLINE float gamma_value(GammaTwo) {
  return 2.0f;
}

} // namespace flm
