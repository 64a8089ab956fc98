// The quantized weight heads of the fused linear cross-entropy on Metal: stage
// a tile of the dequantised weight into threadgroup memory, where the tile
// GEMMs of metal/linear_cross_entropy.metal read it exactly as they read a
// dense weight's tile. The weight never exists dequantised in device memory.
//
// Formats: every one mx.quantize makes in mlx 0.32.4, as it returns them
// (layouts and value rules: csrc/math/quantized.h, shared with the CPU
// unpacking csrc/cpu/quantized_head.cpp, which reads the same bytes):
//   QuantizedHead<S, kBits>   affine, kBits 1, 2, 3, 4, 5, 6 or 8, group_size
//                             32/64/128, scales and biases of dtype S:
//       w[v, k] = fma(scales[v, g], q[v, k], biases[v, g]),  g = k / group_size
//   FpQuantizedHead<kMode>    mxfp4, mxfp8, nvfp4: uint8 scale codes, no biases
//       w[v, k] = element(code[v, k]) * scale(scales[v, g])
//   (nvfp4 with a global scale g: scale(scales[v, g]) * (g / 2688) first)
// w_q is uint32 [V, H * bits / 32], one little-endian bit stream per row.
// mx.quantize requires H to be a multiple of group_size (>= 16), so a row is a
// whole number of words and, for the widths that divide 32 (1, 2, 4, 8 bits
// and the fp modes), a word never straddles a group nor the end of a row.
// 3, 5 and 6 bits pack values across words: those heads stage value by value
// (one or two word loads each), the others a word (32 / bits values, at most
// 16) at a time.
//
// Arithmetic. Affine: fma in float32, rounded once (then once more to the
// tile's type); mx.dequantize on the CPU rounds scale * q first, so the two
// differ by at most one float32 ulp, and the fma is within half an ulp of the
// exact value (tests/test_metal_quantized_head.py checks both). FP modes: the
// product of an E2M1/E4M3 element and an E8M0/E4M3 scale is exact in float32
// (equal to mx.dequantize(..., dtype=mx.float32)) except where it is a float32
// subnormal, which an Apple GPU flushes to zero (only with E8M0 scales below
// 2^-117 for mxfp8, 2^-125 for mxfp4; MLX's own Metal kernels compute the same
// product). nvfp4 with mx.quantize's global_scale: scale * (global / 2688)
// first, as mx.dequantize and MLX's loader round it.
//
// Bounds: tile elements outside [0, V) x [0, H) are written as 0 and nothing
// outside w_q, scales or biases is read: the address of a word is formed only
// for an in-range (row, word), and the second word of a straddling value only
// when the value reaches into it (the last value of a row never does). Row
// offsets are 64-bit.
#pragma once

#include <metal_stdlib>

#include "../csrc/math/quantized.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace flk {

// log2 of a group size (16, 32, 64 or 128; the op admits no other).
inline int group_shift_of(int group_size) {
  return group_size == 16 ? 4 : group_size == 32 ? 5 : group_size == 64 ? 6 : 7;
}

// The head policy of the linear cross-entropy kernels (the interface of
// DenseHead in metal/lce_head.h): the kernels read W only
// through stage(). Affine heads.
template <typename S, int kBits>
struct QuantizedHead {
  static_assert(kBits >= 1 && kBits <= 8 && kBits != 7, "affine bits must be 1-6 or 8");
  // Static data members have static storage: MSL puts those in the constant
  // address space only (MSL specification 4.2, "program scope variables must be
  // declared in the constant address space"), as MLX writes them.
  // Values staged per unit of work: where the width divides 32, a whole word
  // (at most 16 values, so that a 16-column block, BK of the kernels, holds
  // whole units: a 1-bit word is two units); else one value (it may
  // straddle two words).
  static constexpr constant bool kStraddles = 32 % kBits != 0;
  static constexpr constant int kPerUnit = kStraddles ? 1 : 32 / kBits > 16 ? 16 : 32 / kBits;
  static constexpr constant uint kMask = (1u << kBits) - 1u;
  typedef uint weight_t; // the packed words
  typedef S scale_t; // scales and biases

  device const uint* w_q; // [V, words_per_row]
  device const S* scales; // [V, groups_per_row]
  device const S* biases; // [V, groups_per_row]
  int vocab; // V
  int hidden; // H, a multiple of group_size
  int group_shift; // log2(group_size)

  QuantizedHead(
      device const uint* w_q_,
      device const S* scales_,
      device const S* biases_,
      int vocab_,
      int hidden_,
      int group_size)
      : w_q(w_q_),
        scales(scales_),
        biases(biases_),
        vocab(vocab_),
        hidden(hidden_),
        group_shift(group_shift_of(group_size)) {}

  // As the kernels build a head: from the bound buffers and the call's args.
  QuantizedHead(
      device const uint* w_q_,
      device const S* scales_,
      device const S* biases_,
      constant LceArgs& args)
      : QuantizedHead(w_q_, scales_, biases_, args.vocab, args.hidden, args.group_size) {}

  int words_per_row() const {
    return hidden / 32 * kBits; // H is a multiple of 32
  }
  int groups_per_row() const {
    return hidden >> group_shift;
  }

  // Dequantises W[v0 + i, h0 + j] (i < BV, j < BH) into
  // dst[i * stride_v + j * stride_h] as TT, 0 where v0 + i >= V or
  // h0 + j >= H (never reading there). Strides let a caller keep the block
  // row-major (stride_v = ld, stride_h = 1) or transposed (stride_v = 1,
  // stride_h = ld). h0 must be a multiple of kPerUnit (blocks start at
  // multiples of BH). The threads tid = 0 .. nthreads - 1 of the group share
  // the work, one unit (kPerUnit values) at a time; no barrier inside (the
  // caller puts one between staging and reading).
  template <int BV, int BH, typename TT>
  void stage(
      threadgroup TT* dst,
      int v0,
      int h0,
      int stride_v,
      int stride_h,
      uint tid,
      uint nthreads) const {
    static_assert(BH % kPerUnit == 0, "a staged row must hold whole packed words");
    constexpr int kUnitsPerBlockRow = BH / kPerUnit;
    const int words = words_per_row();
    const int groups = groups_per_row();
    for (uint u = tid; u < uint(BV * kUnitsPerBlockRow); u += nthreads) {
      const int i = int(u) / kUnitsPerBlockRow;
      const int ju = int(u) % kUnitsPerBlockRow;
      const int v = v0 + i;
      const int h = h0 + ju * kPerUnit; // first column of this unit
      threadgroup TT* out = dst + i * stride_v + ju * kPerUnit * stride_h;
      if (v < vocab && h < hidden) {
        const ulong row = ulong(v);
        const ulong g = row * ulong(groups) + ulong(h >> group_shift);
        const float scale = float(scales[g]);
        const float shift = float(biases[g]);
        device const uint* row_words = w_q + row * ulong(words);
        if (kStraddles) {
          const int bit = h * kBits;
          const int shift_bits = bit & 31;
          const uint lo = row_words[bit >> 5];
          const uint hi = shift_bits + kBits > 32 ? row_words[(bit >> 5) + 1] : 0u;
          const uint q = flm::straddled_code(lo, hi, shift_bits, kBits);
          out[0] = TT(fma(scale, float(q), shift));
        } else {
          const int bit = h * kBits; // the unit lies in one word
          const uint word = row_words[bit >> 5] >> uint(bit & 31);
          for (int e = 0; e < kPerUnit; ++e) {
            const uint q = (word >> uint(e * kBits)) & kMask;
            out[e * stride_h] = TT(fma(scale, float(q), shift));
          }
        }
      } else {
        for (int e = 0; e < kPerUnit; ++e) {
          out[e * stride_h] = TT(0.0f);
        }
      }
    }
  }
};

// The floating-point modes (kMode: flm::kQuantMxfp4, kQuantMxfp8 or
// kQuantNvfp4): 4-bit codes 8 per word or 8-bit codes 4 per word, one uint8
// scale code per group (E8M0, or E4M3 for nvfp4), no biases: the host binds
// the scales to both scale slots and the second is never read, except by an
// nvfp4 head with a global scale (kGlobal): the host binds mx.quantize's
// global_scale (float32 [1]) to the second slot, and every group scale is
// multiplied by flm::nvfp4_global_factor of it (as mx.dequantize does).
template <int kMode, bool kGlobal = false>
struct FpQuantizedHead {
  static_assert(!kGlobal || kMode == flm::kQuantNvfp4, "a global scale is nvfp4's only");
  static constexpr constant int kBits = kMode == flm::kQuantMxfp8 ? 8 : 4;
  static constexpr constant int kPerWord = 32 / kBits;
  static constexpr constant uint kMask = (1u << kBits) - 1u;
  typedef uint weight_t;
  typedef uchar scale_t;

  device const uint* w_q; // [V, H / kPerWord]
  device const uchar* scales; // [V, H / group_size]
  int vocab;
  int hidden;
  int group_shift;
  float factor; // the global scale's factor (kGlobal), else 1

  // `second`: the second scale slot (unread, or the global scale: a float32
  // buffer bound there, read through a cast in the same address space).
  FpQuantizedHead(
      device const uint* w_q_,
      device const uchar* scales_,
      device const uchar* second,
      int vocab_,
      int hidden_,
      int group_size)
      : w_q(w_q_), scales(scales_), vocab(vocab_), hidden(hidden_),
        group_shift(group_shift_of(group_size)),
        factor(kGlobal ? flm::nvfp4_global_factor(*(device const float*)second) : 1.0f) {}

  FpQuantizedHead(
      device const uint* w_q_,
      device const uchar* scales_,
      device const uchar* second,
      constant LceArgs& args)
      : FpQuantizedHead(w_q_, scales_, second, args.vocab, args.hidden, args.group_size) {}

  // As QuantizedHead::stage, a word (kPerWord values) per unit.
  template <int BV, int BH, typename TT>
  void stage(
      threadgroup TT* dst,
      int v0,
      int h0,
      int stride_v,
      int stride_h,
      uint tid,
      uint nthreads) const {
    static_assert(BH % kPerWord == 0, "a staged row must hold whole packed words");
    constexpr int kWordsPerBlockRow = BH / kPerWord;
    const int words = hidden / kPerWord;
    const int groups = hidden >> group_shift;
    for (uint u = tid; u < uint(BV * kWordsPerBlockRow); u += nthreads) {
      const int i = int(u) / kWordsPerBlockRow;
      const int jw = int(u) % kWordsPerBlockRow;
      const int v = v0 + i;
      const int h = h0 + jw * kPerWord;
      threadgroup TT* out = dst + i * stride_v + jw * kPerWord * stride_h;
      if (v < vocab && h < hidden) {
        const ulong row = ulong(v);
        const uint word = w_q[row * ulong(words) + ulong(h / kPerWord)];
        float scale =
            flm::fp_scale_value(kMode, uint(scales[row * ulong(groups) + ulong(h >> group_shift)]));
        if (kGlobal) {
          scale = scale * factor;
        }
        for (int e = 0; e < kPerWord; ++e) {
          const uint code = (word >> uint(e * kBits)) & kMask;
          out[e * stride_h] = TT(flm::fp_element_value(kMode, code) * scale);
        }
      } else {
        for (int e = 0; e < kPerWord; ++e) {
          out[e * stride_h] = TT(0.0f);
        }
      }
    }
  }
};

// One name per format, for the instantiation macros of
// linear_cross_entropy.metal (a macro argument cannot hold the comma of
// QuantizedHead<S, kBits>).
template <typename S>
using QuantizedHead1 = QuantizedHead<S, 1>;
template <typename S>
using QuantizedHead2 = QuantizedHead<S, 2>;
template <typename S>
using QuantizedHead3 = QuantizedHead<S, 3>;
template <typename S>
using QuantizedHead4 = QuantizedHead<S, 4>;
template <typename S>
using QuantizedHead5 = QuantizedHead<S, 5>;
template <typename S>
using QuantizedHead6 = QuantizedHead<S, 6>;
template <typename S>
using QuantizedHead8 = QuantizedHead<S, 8>;
typedef FpQuantizedHead<flm::kQuantMxfp4> Mxfp4Head;
typedef FpQuantizedHead<flm::kQuantMxfp8> Mxfp8Head;
typedef FpQuantizedHead<flm::kQuantNvfp4> Nvfp4Head;
typedef FpQuantizedHead<flm::kQuantNvfp4, true> Nvfp4GlobalHead;

} // namespace flk
