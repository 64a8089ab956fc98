// One pass of sums over a whole row of float32 logits whose max is known, in
// a fixed order whatever the vector width: the epilogues of the chunked-head
// losses (linear cross-entropy, row statistics) share it, so their log-sum-exp
// agree bit for bit.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/vectorize.h"
#include "math/cross_entropy.h"
#include "math/transcendental.h"

namespace fl::cpu {

// With ref = lse_ref(m) (the max, or 0 for an all -inf row):
struct RowSums {
  float sum_exp; // s = sum_j exp(z_j - ref)
  float sum_gap; // sum_j (ref - z_j)                 (label smoothing)
  float sum_exp_gap; // sum_j exp(z_j - ref) (z_j - ref)  (entropy)
};

// Partial sums per block of a row: element j of a block goes to lane
// j % kSumLanes. Written out rather than left to an `omp simd` reduction so
// that the order of the additions, hence the rounding, is the same whether the
// compiler vectorizes the loop (16, 8 or 4 lanes) or not: unvectorized (the
// ASan/UBSan build), a block of 2048 was summed in a single float, and on
// peaked rows (1 + 2047 terms each below half an ulp of the sum) the lse came
// out ~140 ulp off, 2.6e-5 in the gradients at V = 4097, where 16 lanes lose
// ~20 ulp (tests/test_linear_cross_entropy.py under .ci/sanitize).
constexpr int kSumLanes = 16;

// One pass over a row whose max is known. Each block of kChunk is summed in
// kSumLanes float lanes, and the lanes and blocks in double, so V = 256k
// loses nothing to the sum.
FLM_INLINE RowSums row_sums(const float* z, int64_t V, float m, bool with_gap) {
  double s = 0.0, gap = 0.0, ent = 0.0;
  float shift = flm::lse_ref(m); // an all -inf row: exp(-inf) = 0, not NaN
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, V - c0);
    const int64_t whole = n - n % kSumLanes;
    const float* x = z + c0;
    float bs[kSumLanes] = {}, bg[kSumLanes] = {}, be[kSumLanes] = {};
    auto add = [&](int64_t j, int lane) FL_LAMBDA_INLINE {
      float d = x[j] - shift;
      float e = flm::exp_nonpos_f32(d);
      bs[lane] += e;
      be[lane] += flm::weighted(e, d);
    };
    for (int64_t j = 0; j < whole; j += kSumLanes) {
      FL_SIMD
      for (int lane = 0; lane < kSumLanes; ++lane) {
        add(j + lane, lane);
      }
    }
    for (int64_t j = whole; j < n; ++j) {
      add(j, int(j - whole));
    }
    if (with_gap) {
      for (int64_t j = 0; j < whole; j += kSumLanes) {
        FL_SIMD
        for (int lane = 0; lane < kSumLanes; ++lane) {
          bg[lane] += shift - x[j + lane];
        }
      }
      for (int64_t j = whole; j < n; ++j) {
        bg[j - whole] += shift - x[j];
      }
    }
    for (int lane = 0; lane < kSumLanes; ++lane) {
      s += bs[lane];
      gap += bg[lane];
      ent += be[lane];
    }
  }
  return {float(s), float(gap), float(ent)};
}

// sum_j z_j of a row, in the same lanes and order as row_sums (float lanes per
// block of kChunk, blocks and lanes added in double).
FLM_INLINE float row_plain_sum(const float* z, int64_t V) {
  double s = 0.0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min<int64_t>(kChunk, V - c0);
    const int64_t whole = n - n % kSumLanes;
    const float* x = z + c0;
    float bs[kSumLanes] = {};
    for (int64_t j = 0; j < whole; j += kSumLanes) {
      FL_SIMD
      for (int lane = 0; lane < kSumLanes; ++lane) {
        bs[lane] += x[j + lane];
      }
    }
    for (int64_t j = whole; j < n; ++j) {
      bs[j - whole] += x[j];
    }
    for (int lane = 0; lane < kSumLanes; ++lane) {
      s += bs[lane];
    }
  }
  return float(s);
}

} // namespace fl::cpu
