// The quantized weight formats of mx.quantize (mlx 0.32.4), decoded value by
// value: one definition, included by the CPU unpacking (cpu/quantized_head.cpp)
// and the Metal head (metal/quantized_head.h), so both read the same bits.
//
// Every format is a row-major packed matrix w_q uint32 [V, H * bits / 32] with
// one scale per group of group_size consecutive columns of a row:
//
//   mode     bits              group_size   element          scale        bias
//   affine   1,2,3,4,5,6,8     32, 64, 128  unsigned int q   scales' dtype  yes
//   mxfp4    4                 32           E2M1 (fp4)       E8M0 (uint8)   no
//   mxfp8    8                 32           E4M3 (fp8)       E8M0 (uint8)   no
//   nvfp4    4                 16           E2M1 (fp4)       E4M3 (uint8)   no
//            (optionally with a float32 global scale: nvfp4_global_factor)
//
// Packing (MLX's affine_dequantize / fp_dequantize fallbacks define it): a row's
// values form one little-endian bit stream, value k in bits [k * bits, (k + 1) *
// bits), bit i of the stream being bit i % 32 of word i / 32. For 1, 2, 4 and 8
// bits a word holds 32 / bits whole values; 3, 5 and 6 bits straddle words
// (32 values fill exactly `bits` words). A group is a multiple of 16 values,
// and of 32 for the straddling widths, so every group starts on a word.
//
// Values:
//   affine  w = scale * q + bias (the caller rounds as it documents)
//   fp      w = element(code) * scale(code_s), both decoded exactly here: the
//           product of an E2M1/E4M3 value and a power of two (E8M0) or an E4M3
//           scale is exact in float32 unless it leaves float32's range, which
//           is what mx.dequantize(..., dtype=mx.float32) computes.
#pragma once

#include "portable.h"

namespace flm {

// The mode (LinearCrossEntropyParams::quant_mode). An enum, not FLM_CONST
// constants: plain C++ that includes this header after a Metal source had
// portable.h (the harness's translation units) has no `constant` to expand.
enum QuantMode : int { kQuantAffine = 0, kQuantMxfp4 = 1, kQuantMxfp8 = 2, kQuantNvfp4 = 3 };

// Value k (0-based within the words) of a bit stream of `bits`-wide values,
// given the word holding its first bit (`lo`) and the next word (`hi`, read
// only when the value straddles into it: shift + bits > 32).
FLM_INLINE u32 straddled_code(u32 lo, u32 hi, i32 shift, i32 bits) {
  const u32 mask = (1u << u32(bits)) - 1u;
  const u32 low = lo >> u32(shift);
  return (shift + bits > 32 ? low | (hi << u32(32 - shift)) : low) & mask;
}

// E2M1 (OCP MX fp4): sign, 2 exponent bits (bias 1), 1 mantissa bit; codes
// 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6 (MLX's table; code 8 is -0).
FLM_INLINE float e2m1_value(u32 code) {
  const u32 mag = code & 7u;
  const u32 e = mag >> 1;
  const u32 m = mag & 1u;
  const u32 bits = mag == 0u ? 0u
                   : mag == 1u ? 0x3F000000u // 0.5, the one subnormal
                               : ((e + 126u) << 23) | (m << 22);
  return bits_float(bits | ((code & 8u) << 28));
}

// E4M3 (fp8 "fn": no infinities, 0x7F and 0xFF are NaN): sign, 4 exponent
// bits (bias 7), 3 mantissa bits; subnormals m * 2^-9. Written as selects of
// bit patterns, no branch, so that the CPU loops over codes vectorize.
FLM_INLINE float e4m3_value(u32 code) {
  const u32 e = (code >> 3) & 15u;
  const u32 m = code & 7u;
  const u32 sign = (code & 0x80u) << 24;
  const u32 normal = ((e + 120u) << 23) | (m << 20);
  const u32 subnormal = float_bits(float(i32(m)) * bits_float(0x3B000000u)); // m * 2^-9, exact
  const u32 mag = e == 0u ? subnormal : (e == 15u && m == 7u) ? 0x7FC00000u : normal;
  return bits_float(sign | mag);
}

// E8M0 (the MX scale): 2^(code - 127); code 0 is 2^-127 (a float32
// subnormal) and code 255 is +inf, as MLX computes it (2^128 overflows).
FLM_INLINE float e8m0_value(u32 code) {
  return bits_float(code == 0u ? 0x00400000u : (code & 0xFFu) << 23);
}

// The scale of a floating-point mode's group from its uint8 code.
FLM_INLINE float fp_scale_value(i32 mode, u32 code) {
  return mode == kQuantNvfp4 ? e4m3_value(code) : e8m0_value(code);
}

// The element of a floating-point mode from its 4- or 8-bit code.
FLM_INLINE float fp_element_value(i32 mode, u32 code) {
  return mode == kQuantMxfp8 ? e4m3_value(code) : e2m1_value(code);
}

// nvfp4's optional global scale (mx.quantize(..., global_scale=g)) multiplies
// every group scale by g / (448 * 6) (E4M3's and E2M1's largest values), in
// float32, before the element: scale = e4m3(code) * nvfp4_global_factor(g),
// as mx.dequantize and MLX's Metal loader compute it.
FLM_INLINE float nvfp4_global_factor(float global_scale) {
  return global_scale / 2688.0f;
}

} // namespace flm
