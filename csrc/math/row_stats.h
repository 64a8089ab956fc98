// Per-row statistics of a row of logits, and their gradients: the maths of
// the scorer (log-probs, entropy) and of what distillation and the
// vocabulary-parallel losses build from it. Shared by the CPU kernels
// (csrc/cpu/row_stats.cpp) and the Metal ones.
//
// Definitions. A row's logits are z_j = softcap(y_j) / T (y: the given logits,
// or x . w_j + b_j of a linear head; T the temperature > 0; no cap: z = y / T),
// p = softmax(z). Over the row's V classes:
//     lse       = log sum_j exp(z_j)                 dlse/dz_j      = p_j
//     target    = z_t (0 where t is ignored or another shard's)
//                                                    dtarget/dz_j   = [j == t]
//     logit_sum = sum_j z_j                          dsum/dz_j      = 1
//     expected  = E_p[z] = sum_j p_j z_j             dexpected/dz_j = p_j (1 + z_j - expected)
//     max, argmax (not differentiable)
// (dexpected/dz_j = p_j + sum_k z_k dp_k/dz_j with dp_k/dz_j = p_k([k == j] - p_j),
// so p_j + p_j z_j - p_j sum_k p_k z_k.) Then log p(t) = target - lse and the
// entropy is lse - expected. With per-row cotangents g_lse, g_t, g_sum, g_exp:
//     dL/dz_j = (g_lse + g_exp (1 + z_j - expected)) p_j + g_t [j == t] + g_sum
//     dL/dy_j = dL/dz_j * softcap'(y_j) / T,   softcap' = 1 - (c / cap)^2, c = T z_j
// (math/softcap.h). p_j comes from the saved lse pair (cross_entropy.h
// softmax_prob). A zero cotangent contributes exactly 0 (never 0 * inf), and a
// -inf logit (p_j = 0) gets the gradient g_sum only.
//
// expected from the sums of one pass relative to ref = lse_ref(max):
// s = sum_j exp(z_j - ref), ent = sum_j exp(z_j - ref)(z_j - ref) (<= 0 terms),
//     expected = ref + ent / s,   entropy = lse - expected = log(s) - ent / s
// (the linear cross-entropy's entropy, linear_cross_entropy.h). Like the lse,
// expected is kept as a float32 pair (expected + expected_lo = ref + ent / s
// exactly): with logits near 1e4 a single float32 is 5e-4 off, which
// lse - expected (the entropy) and z_j - expected (its gradient) would
// inherit; (z_j - expected) - expected_lo keeps float32 accuracy.
#pragma once

#include "cross_entropy.h"
#include "softcap.h"
#include "transcendental.h"

namespace flm {

// Which statistics a call computes (bits of an int).
enum RowStat : int {
  kStatLse = 1,
  kStatTarget = 2,
  kStatLogitSum = 4,
  kStatExpected = 8,
  kStatMax = 16,
  kStatArgmax = 32,
  kStatDifferentiable = kStatLse | kStatTarget | kStatLogitSum | kStatExpected,
  kStatAll = 63,
};

// Whether a statistic needs the row's softmax sums (one exp per logit).
FLM_INLINE bool row_stats_need_sums(int stats) {
  return (stats & (kStatLse | kStatExpected)) != 0;
}

// Row r's class in this head from its global target t (class j of the head is
// vocab_start + j; vocab_start 0 but for a shard): [0, V), or
//   -1  ignored (t == ignore_index), or another shard's (sharded and t outside
//       [vocab_start, vocab_start + V)): target 0, no gradient;
//   -2  out of range of an unsharded head: a NaN target (and gradient row).
// ignore_index is checked first (the cross-entropy's precedence).
FLM_INLINE long row_stats_class(long t, long vocab, bool has_ignore, long ignore_index, bool sharded,
                                long vocab_start) {
  if (has_ignore && t == ignore_index) {
    return -1;
  }
  // vocab_start >= 0 (checked by the op): t - vocab_start cannot overflow once t >= it.
  if (t < vocab_start || t - vocab_start >= vocab) {
    return sharded ? -1 : -2;
  }
  return t - vocab_start;
}

// The per-row cotangents of the differentiable statistics (0: absent).
struct RowStatsCotangent {
  float lse;
  float target;
  float logit_sum;
  float expected;
};

// expected as a float32 pair (hi, lo): hi + lo = ref + ent / s exactly.
struct FloatPair {
  float hi;
  float lo;
};

FLM_INLINE FloatPair row_expected(float ref, float sum_exp, float ent) {
  float q = ent / sum_exp;
  FloatPair e;
  e.hi = ref + q;
  e.lo = two_sum_lo(ref, q, e.hi);
  return e;
}

// dL/dz_j for a class other than the target (the target adds g.target).
FLM_INLINE float row_stats_grad(float z, float lse, float lse_lo, FloatPair expected, RowStatsCotangent g) {
  float p = softmax_prob(z, lse, lse_lo);
  float coef = g.lse + weighted(g.expected, 1.0f + ((z - expected.hi) - expected.lo));
  return weighted(p, coef) + g.logit_sum;
}

// The chain factor dz/dy: softcap'(y) / T from the scaled logit z (cap 0: none).
FLM_INLINE float row_stats_chain(float z, float cap, float temperature, float inv_temperature) {
  return cap != 0.0f ? softcap_grad(z * temperature, cap) * inv_temperature : inv_temperature;
}

} // namespace flm
