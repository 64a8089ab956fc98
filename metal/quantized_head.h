// The affine-quantized weight head of the fused linear cross-entropy on Metal:
// stages a tile of the dequantised weight into threadgroup memory, where the
// tile GEMMs of metal/linear_cross_entropy.metal read it exactly as they read a
// dense weight's tile. The weight never exists dequantised in device memory.
//
// Format: exactly what mx.quantize(W, group_size, bits) returns in affine mode
// (the CPU kernel, csrc/cpu/linear_cross_entropy.cpp, reads the same bytes):
//   w_q     uint32 [V, H * bits / 32]   32 / bits values per word, the first
//                                        value in the lowest bits
//   scales  S      [V, H / group_size]  one (scale, bias) pair per group of
//   biases  S      [V, H / group_size]  group_size consecutive columns
//   w[v, k] = scales[v, k / group_size] * q[v, k] + biases[v, k / group_size]
// bits is 2, 4 or 8 and group_size 32, 64 or 128 (the op rejects the rest,
// ops/linear_cross_entropy.cpp). mx.quantize requires H to be a multiple of
// group_size, so H is a multiple of 32 and of the 16/8/4 values of a word: a
// word never straddles the end of a row nor a group boundary, and H * bits is
// always a whole number of words (MLX's 3/5/6-bit formats, which pack values
// across words, are rejected by the op).
//
// Arithmetic: w = fma(scale, q, bias) in float32, rounded once (then once more
// to the tile's type). mx.dequantize on the CPU rounds scale * q first; the two
// differ by at most one float32 ulp, and the fma is within half an ulp of the
// exact value (tests/test_metal_quantized_head.py checks both).
//
// Bounds: tile elements outside [0, V) x [0, H) are written as 0 and nothing
// outside w_q, scales or biases is read: the address of a word is formed only
// for an in-range (row, word). Row offsets are 64-bit.
#pragma once

#include <metal_stdlib>

#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace flk {

// The head policy of the linear cross-entropy kernels (the interface of
// DenseHead in metal/linear_cross_entropy.metal): the kernels read W only
// through stage().
template <typename S, int kBits>
struct QuantizedHead {
  static_assert(kBits == 2 || kBits == 4 || kBits == 8, "affine bits must be 2, 4 or 8");
  // Static data members have static storage: MSL puts those in the constant
  // address space only (MSL specification 4.2, "program scope variables must be
  // declared in the constant address space"), as MLX writes them.
  static constexpr constant int kPerWord = 32 / kBits; // values in one uint32
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
        group_shift(group_size == 32 ? 5 : group_size == 64 ? 6 : 7) {}

  // As the kernels build a head: from the bound buffers and the call's args.
  QuantizedHead(
      device const uint* w_q_,
      device const S* scales_,
      device const S* biases_,
      constant LceArgs& args)
      : QuantizedHead(w_q_, scales_, biases_, args.vocab, args.hidden, args.group_size) {}

  int words_per_row() const {
    return hidden / kPerWord;
  }
  int groups_per_row() const {
    return hidden >> group_shift;
  }

  // Dequantises W[v0 + i, h0 + j] (i < BV, j < BH) into
  // dst[i * stride_v + j * stride_h] as TT, 0 where v0 + i >= V or
  // h0 + j >= H (never reading there). Strides let a caller keep the block
  // row-major (stride_v = ld, stride_h = 1) or transposed (stride_v = 1,
  // stride_h = ld). h0 must be a multiple of kPerWord (blocks start at
  // multiples of BH). The threads tid = 0 .. nthreads - 1 of the group share
  // the work, one packed word (kPerWord values) at a time; no barrier inside
  // (the caller puts one between staging and reading).
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
    const int words = words_per_row();
    const int groups = groups_per_row();
    for (uint u = tid; u < uint(BV * kWordsPerBlockRow); u += nthreads) {
      const int i = int(u) / kWordsPerBlockRow;
      const int jw = int(u) % kWordsPerBlockRow;
      const int v = v0 + i;
      const int h = h0 + jw * kPerWord; // first column of this word
      threadgroup TT* out = dst + i * stride_v + jw * kPerWord * stride_h;
      if (v < vocab && h < hidden) {
        const ulong row = ulong(v);
        const uint word = w_q[row * ulong(words) + ulong(h / kPerWord)];
        const ulong g = row * ulong(groups) + ulong(h >> group_shift);
        const float scale = float(scales[g]);
        const float shift = float(biases[g]);
        for (int e = 0; e < kPerWord; ++e) {
          const uint q = (word >> uint(e * kBits)) & kMask;
          out[e * stride_h] = TT(fma(scale, float(q), shift));
        }
      } else {
        for (int e = 0; e < kPerWord; ++e) {
          out[e * stride_h] = TT(0.0f);
        }
      }
    }
  }
};

// One name per bits value, for the instantiation macros of
// linear_cross_entropy.metal (a macro argument cannot hold the comma of
// QuantizedHead<S, kBits>).
template <typename S>
using QuantizedHead2 = QuantizedHead<S, 2>;
template <typename S>
using QuantizedHead4 = QuantizedHead<S, 4>;
template <typename S>
using QuantizedHead8 = QuantizedHead<S, 8>;

} // namespace flk
