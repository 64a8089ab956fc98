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

using namespace metal;

namespace flk {

template <typename S, int kBits>
struct QuantizedHead {
  static_assert(kBits == 2 || kBits == 4 || kBits == 8, "affine bits must be 2, 4 or 8");
  static constexpr int kPerWord = 32 / kBits; // values in one uint32
  static constexpr uint kMask = (1u << kBits) - 1u;

  device const uint* w_q; // [V, words_per_row]
  device const S* scales; // [V, groups_per_row]
  device const S* biases; // [V, groups_per_row]
  int vocab; // V
  int hidden; // H, a multiple of group_size
  int group_shift; // log2(group_size)

  int words_per_row() const {
    return hidden / kPerWord;
  }
  int groups_per_row() const {
    return hidden >> group_shift;
  }

  // Dequantises rows [v0, v0 + R) x columns [k0, k0 + C) of W into
  // tile[i * row_stride + j * col_stride] (i < R, j < C) as TT, zero outside
  // V x H. Strides let a caller keep the tile row-major (row_stride = ld,
  // col_stride = 1) or transposed (row_stride = 1, col_stride = ld).
  // k0 must be a multiple of kPerWord (tiles start at multiples of C). The
  // threads tid = 0 .. nthreads - 1 of the group share the work, one packed
  // word (kPerWord values) at a time; the caller puts the threadgroup barrier
  // between this and the reads of the tile.
  template <typename TT, int R, int C>
  void stage(
      threadgroup TT* tile,
      int row_stride,
      int col_stride,
      int v0,
      int k0,
      uint tid,
      uint nthreads) const {
    static_assert(C % kPerWord == 0, "a tile row must hold whole packed words");
    constexpr int kWordsPerTileRow = C / kPerWord;
    const int words = words_per_row();
    const int groups = groups_per_row();
    for (uint u = tid; u < uint(R * kWordsPerTileRow); u += nthreads) {
      const int i = int(u) / kWordsPerTileRow;
      const int jw = int(u) % kWordsPerTileRow;
      const int v = v0 + i;
      const int k = k0 + jw * kPerWord; // first column of this word
      threadgroup TT* dst = tile + i * row_stride + jw * kPerWord * col_stride;
      if (v < vocab && k < hidden) {
        const ulong row = ulong(v);
        const uint word = w_q[row * ulong(words) + ulong(k / kPerWord)];
        const ulong g = row * ulong(groups) + ulong(k >> group_shift);
        const float scale = float(scales[g]);
        const float shift = float(biases[g]);
        for (int e = 0; e < kPerWord; ++e) {
          const uint q = (word >> uint(e * kBits)) & kMask;
          dst[e * col_stride] = TT(fma(scale, float(q), shift));
        }
      } else {
        for (int e = 0; e < kPerWord; ++e) {
          dst[e * col_stride] = TT(0.0f);
        }
      }
    }
  }
};

// log2 of a group size of 32, 64 or 128 (the host passes the shift).
inline int group_shift_of(int group_size) {
  return group_size == 32 ? 5 : group_size == 64 ? 6 : 7;
}

} // namespace flk
