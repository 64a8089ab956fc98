// Cross-entropy formulas shared by the CPU kernel (csrc/cpu/cross_entropy.cpp)
// and the Metal kernel (metal/cross_entropy.metal), and the per-row online
// state that any kernel reducing a row of logits in pieces can reuse (e.g. the
// epilogue of a fused linear cross-entropy, which sees a row tile by tile).
//
// Definitions. For one row of K logits x, class weights w (all 1 when absent)
// and a target distribution q, the loss is
//     loss = sum_j w_j q_j (lse - x_j) + z_loss * lse^2,   lse = logsumexp(x).
// q is the label-smoothed target: q_j = c_other + c_target * t_j, where t is
// the one-hot class (index targets) or the given probabilities (soft targets)
// and the two coefficients come from ce_smoothing(). With the "uniform" mode this
// is PyTorch's F.cross_entropy(weight=w, label_smoothing=eps) and, without
// class weights, mlx.nn.losses.cross_entropy.
//
// Online state of a row (CeState), everything relative to the running max m
// (more exactly to ref = lse_ref(m): m, or 0 while m = -inf):
//     lse.max  m                            lse.sum   s = sum_j exp(x_j - ref)
//     all      sum_j w_j, and the gap sum_j w_j (ref - x_j)
//     target   sum_j w_j t_j, and the gap sum_j w_j t_j (ref - x_j)   (soft)
// Every term of a gap is >= 0 and each x_j - ref is exact (Sterbenz) for the
// logits near the max, so a gap has no cancellation even for logits like
// 1e5 + N(0, 1); when the max moves up by d, a gap grows by d * its weight sum
// (state_move). Then, with A = sum_j w_j q_j,
//     loss = A log(s) + c_target * gap_target + c_other * gap_all + z lse^2,
// a sum of non-negative parts.
//
// Saved for backward: lse as a float32 pair (lse, lse_lo) with lse + lse_lo =
// m + log(s) exactly, and A. The gradient (p_j = exp(x_j - lse))
//     dloss/dx_j = (A + 2 z lse) p_j - w_j q_j
// evaluates x_j - lse as (x_j - lse) - lse_lo: exact for the logits that
// matter, so p_j keeps float32 accuracy whatever the logits' offset or scale
// (a single float32 lse would cost |lse| * 2^-24 absolute in every exponent).
#pragma once

#include "transcendental.h"

namespace flm {

// How label smoothing spreads eps over K classes.
FLM_CONST int kSmoothUniform = 0; // eps/K on every class (PyTorch, MLX)
FLM_CONST int kSmoothOthers = 1; // 1-eps on the true class, eps/(K-1) elsewhere

struct CeSmoothing {
  float c_target; // weight of the target (one-hot or given probabilities)
  float c_other; // mass every class receives
};

// q_j = c_other + c_target * t_j. For soft targets the "others" mode gives
// (1-eps) t + eps/(K-1) (1-t), which is the same linear form. c_target is
// negative in the "others" mode when eps > (K-1)/K; q_j stays >= 0.
FLM_INLINE CeSmoothing ce_smoothing(float eps, int mode, int num_classes) {
  CeSmoothing c;
  if (mode == kSmoothOthers) {
    // One class has no "others": the target keeps all its mass.
    c.c_other = num_classes > 1 ? eps / float(num_classes - 1) : 0.0f;
    c.c_target = num_classes > 1 ? 1.0f - eps - c.c_other : 1.0f;
  } else {
    c.c_other = eps / float(num_classes);
    c.c_target = 1.0f - eps;
  }
  return c;
}

// ---- online log-sum-exp ------------------------------------------------------

// The max seen so far and the sum of exp(x - lse_ref(max)).
struct LseState {
  float max;
  float sum;
};

FLM_INLINE LseState lse_empty() {
  LseState st;
  st.max = -kInf;
  st.sum = 0.0f;
  return st;
}

// What sums are kept relative to: the max, or 0 while every logit seen is
// -inf (exp(-inf - 0) = 0, where exp(-inf + inf) would be NaN).
FLM_INLINE float lse_ref(float max) {
  return max == -kInf ? 0.0f : max;
}

// Factor that rescales a sum of exp(x - from_max) to be relative to to_max.
// Equal maxima give exactly 1, which also covers two states that have seen only
// -inf.
FLM_INLINE float lse_scale(float from_max, float to_max) {
  return from_max == to_max ? 1.0f : exp_f32(from_max - to_max);
}

// A move of the running max from `from_max` up to `to_max` (>= from_max):
//   shift  the new reference, lse_ref(to_max): new terms are exp(x - shift)
//   scale  multiplies an exp-sum kept relative to the old max
//   delta  lse_ref(to_max) - lse_ref(from_max): a gap grows by delta * weight
struct MaxMove {
  float shift;
  float scale;
  float delta;
};

FLM_INLINE MaxMove max_move(float from_max, float to_max) {
  MaxMove mv;
  mv.shift = lse_ref(to_max);
  mv.scale = lse_scale(from_max, to_max);
  mv.delta = from_max == to_max ? 0.0f : mv.shift - lse_ref(from_max);
  return mv;
}

// Product v * x that treats a zero weight as "absent": 0 * inf is 0 here, so a
// soft target of 0 on a -inf logit does not make the row NaN.
FLM_INLINE float weighted(float v, float x) {
  return v == 0.0f ? 0.0f : v * x;
}

// ---- weighted gaps -------------------------------------------------------------

// weight = sum_j v_j and gap = sum_j v_j (ref - x_j) over the logits seen.
struct GapSum {
  float weight;
  float gap;
};

FLM_INLINE GapSum gap_empty() {
  GapSum g;
  g.weight = 0.0f;
  g.gap = 0.0f;
  return g;
}

// The same sums relative to the moved reference.
FLM_INLINE GapSum gap_moved(GapSum g, MaxMove mv) {
  g.gap += weighted(g.weight, mv.delta);
  return g;
}

// Sums over disjoint sets of logits, both relative to the same reference.
FLM_INLINE GapSum gap_add(GapSum a, GapSum b) {
  a.weight += b.weight;
  a.gap += b.gap;
  return a;
}

// ---- the whole row state -------------------------------------------------------

struct CeState {
  LseState lse;
  GapSum all; // v_j = w_j
  GapSum target; // v_j = w_j t_j (soft targets; unused for class indices)
};

FLM_INLINE CeState ce_state_empty() {
  CeState st;
  st.lse = lse_empty();
  st.all = gap_empty();
  st.target = gap_empty();
  return st;
}

// The state relative to a new max (to_max >= st.lse.max). A kernel moves its
// state to max(old max, max of the next piece), then adds that piece's terms
// exp(x_j - mv.shift), w_j (mv.shift - x_j), ... computed against mv.shift.
FLM_INLINE CeState ce_state_move(CeState st, float to_max) {
  MaxMove mv = max_move(st.lse.max, to_max);
  st.lse.sum *= mv.scale;
  st.lse.max = to_max;
  st.all = gap_moved(st.all, mv);
  st.target = gap_moved(st.target, mv);
  return st;
}

// The state of the union of two disjoint pieces of a row (any order: tiles of
// the vocabulary, threads, SIMD lanes).
FLM_INLINE CeState ce_state_merge(CeState a, CeState b) {
  float m = fmax(a.lse.max, b.lse.max);
  a = ce_state_move(a, m);
  b = ce_state_move(b, m);
  a.lse.sum += b.lse.sum;
  a.all = gap_add(a.all, b.all);
  a.target = gap_add(a.target, b.target);
  return a;
}

// ---- finishing a row -------------------------------------------------------------

// Per-row outputs of the forward pass.
struct CeRow {
  float loss;
  float lse; // float32 log-sum-exp
  float lse_lo; // its rounding error: lse + lse_lo = max + log(sum) exactly
  float a_sum; // A = sum_j w_j q_j, saved for backward
};

// The error-free sum hi + lo = a + b (Knuth's TwoSum: no ordering condition,
// no FMA). Infinite or NaN sums get lo = 0, so hi alone carries them.
FLM_INLINE float two_sum_lo(float a, float b, float hi) {
  float bb = hi - a;
  float lo = (a - (hi - bb)) + (b - bb);
  return is_inf(hi) || is_nan(hi) ? 0.0f : lo;
}

// c_target * gap_target + c_other * gap_all. Each loss term w_j q_j (lse - x_j)
// has q_j >= 0, so when c_target < 0 ("others" mode, eps > (K-1)/K) and a -inf
// logit carries weight, the -inf of the first part meets the +inf of the
// second: the loss is +inf, not NaN. A zero coefficient contributes exactly 0.
FLM_INLINE float ce_gap_total(float target_part, float other_part) {
  return (target_part == -kInf && other_part == kInf) ? kInf : target_part + other_part;
}

FLM_INLINE CeRow ce_finish_row(LseState st, float a_sum, float gap, float z_loss) {
  CeRow r;
  float log_s = log_f32(st.sum);
  float ref = lse_ref(st.max);
  r.lse = ref + log_s;
  r.lse_lo = two_sum_lo(ref, log_s, r.lse);
  r.a_sum = a_sum;
  float loss = a_sum * log_s + gap;
  r.loss = z_loss != 0.0f ? loss + z_loss * r.lse * r.lse : loss;
  return r;
}

// Soft targets: everything is in the state.
FLM_INLINE CeRow ce_finish_soft(CeState st, CeSmoothing c, float z_loss) {
  float a_sum = c.c_target * st.target.weight + c.c_other * st.all.weight;
  float gap = ce_gap_total(weighted(c.c_target, st.target.gap), weighted(c.c_other, st.all.gap));
  return ce_finish_row(st.lse, a_sum, gap, z_loss);
}

// Class-index target with weight w_t and logit x_t.
FLM_INLINE CeRow ce_finish_hard(CeState st, CeSmoothing c, float w_t, float x_t, float z_loss) {
  float coef_t = c.c_target * w_t;
  float a_sum = coef_t + c.c_other * st.all.weight;
  float gap = ce_gap_total(weighted(coef_t, lse_ref(st.lse.max) - x_t),
                           weighted(c.c_other, st.all.gap));
  return ce_finish_row(st.lse, a_sum, gap, z_loss);
}

// The row that an ignored target or an out-of-range class index produces.
// Ignored rows contribute nothing; a bad index poisons its row with NaN
// (documented) so the error is visible instead of silently reading memory.
FLM_INLINE CeRow ce_masked_row(bool out_of_range) {
  CeRow r;
  r.loss = out_of_range ? kNaN : 0.0f;
  r.lse = 0.0f;
  r.lse_lo = 0.0f;
  r.a_sum = out_of_range ? kNaN : 0.0f;
  return r;
}

// ---- row statistics (return_stats) ---------------------------------------------------
//
// Entropy of softmax(x), H = lse - sum_j p_j x_j = log(s) - ent / s, from the
// exp-sum s of the state and the entropy sum
//     ent = sum_j exp(x_j - ref) (x_j - ref)          (every term <= 0),
// kept relative to the same reference. When the reference moves up by delta,
// each exp term is scaled by scale = exp(-delta) and each (x_j - ref) loses
// delta: ent' = scale * (ent - delta * s). A -inf logit adds exactly 0
// (entropy_term: exp 0 times -inf). A row of -inf only has no softmax: NaN.

// The term of one logit, e = x - ref <= 0 and its exp.
FLM_INLINE float entropy_term(float exp_e, float e) {
  return weighted(exp_e, e);
}

// ent relative to the moved reference; `sum` is the exp-sum before the move.
FLM_INLINE float entropy_sum_moved(float ent, float sum, MaxMove mv) {
  // weighted: an empty sum (s = 0) moved from -inf stays 0 (not 0 * inf).
  float moved = ent - weighted(sum, mv.delta);
  return weighted(mv.scale, moved); // scale 0 (all terms underflow): 0, whatever `moved`
}

FLM_INLINE float softmax_entropy(float sum, float ent) {
  return log_f32(sum) - ent / sum;
}

// The predicted class: the first index of the row's maximal logit, as
// mx.argmax (a NaN is larger than any number; -0 equals +0). argmax_key maps a
// logit to an unsigned integer with that order, so a kernel finds the max key
// of a piece with integer max instructions (vectorized, or simd_max) and the
// first index holding it; two pieces merge with argmax_merge.
FLM_INLINE u32 argmax_key(float x) {
  u32 u = x == 0.0f ? 0u : float_bits(x); // -0 -> +0
  u32 key = (u & 0x80000000u) != 0u ? ~u : (u | 0x80000000u);
  return is_nan(x) ? 0xFFFFFFFFu : key;
}

struct ArgMax {
  u32 key; // argmax_key of the best logit (0: nothing seen; every logit's key is > 0)
  i32 index; // its index
};

FLM_INLINE ArgMax argmax_empty() {
  ArgMax a;
  a.key = 0u;
  a.index = 0;
  return a;
}

// The best of two pieces: the larger key, and of equal keys the lower index.
FLM_INLINE ArgMax argmax_merge(ArgMax a, ArgMax b) {
  bool take_b = b.key > a.key || (b.key == a.key && b.index < a.index);
  return take_b ? b : a;
}

// ---- backward ---------------------------------------------------------------------

// The coefficient of p_j in the row, g * (A + 2 z lse) + g_lse, where g is the
// cotangent of the row's loss and g_lse that of its lse.
FLM_INLINE float ce_row_softmax_coef(float g, float g_lse, float a_sum, float lse, float z_loss) {
  float dlse = z_loss != 0.0f ? a_sum + 2.0f * z_loss * lse : a_sum;
  return g * dlse + g_lse;
}

// p_j = exp(x_j - (lse + lse_lo)), the softmax probability of one logit.
FLM_INLINE float softmax_prob(float x, float lse, float lse_lo) {
  return exp_nonpos_f32((x - lse) - lse_lo);
}

// Backward for one element: coef * p_j - g * w_j q_j.
FLM_INLINE float ce_grad(float x, float lse, float lse_lo, float softmax_coef, float g_target) {
  return softmax_coef * softmax_prob(x, lse, lse_lo) - g_target;
}

} // namespace flm
