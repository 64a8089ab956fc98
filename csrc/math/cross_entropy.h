// Cross-entropy formulas shared by the CPU kernel (csrc/cpu/cross_entropy.cpp)
// and the Metal kernel (metal/cross_entropy.metal).
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
// A row is reduced in one pass to:
//     m      running max of x                 s     sum_j exp(x_j - m)
//     a_sum  sum_j w_j q_j   ("A")            a_gap sum_j w_j q_j (m - x_j)
// and then loss = A log(s) + a_gap + z lse^2. Keeping x_j - m inside a_gap
// (instead of A*lse - sum a_j x_j) avoids cancellation for logits like 1e4.
//
// Gradient (one pass, p_j = exp(x_j - lse)):
//     dloss/dx_j = (A + 2 z lse) p_j - w_j q_j
// so backward needs per row only lse and A, which forward saves.
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
// (1-eps) t + eps/(K-1) (1-t), which is the same linear form.
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

// Online log-sum-exp state: the max seen so far and the sum of exp(x - max).
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

// Factor that rescales a sum of exp(x - from_max) to be relative to to_max.
// Equal maxima give exactly 1, which also covers two states that have seen only
// -inf (where exp(-inf + inf) would be NaN).
FLM_INLINE float lse_scale(float from_max, float to_max) {
  return from_max == to_max ? 1.0f : exp_f32(from_max - to_max);
}

// One term of a_gap: coef * sum_j v_j (m - x_j), from the raw running sums
// sum_v = sum_j v_j and sum_vx = sum_j v_j x_j (v = class weight, or weight
// times target probability). A zero coefficient contributes exactly 0, so -inf
// logits elsewhere in the row cannot turn plain cross-entropy into inf * 0.
FLM_INLINE float ce_gap(float coef, float m, float sum_v, float sum_vx) {
  return coef == 0.0f ? 0.0f : coef * (m * sum_v - sum_vx);
}

// Product v * x that treats a zero weight as "absent": 0 * -inf is 0 here, so a
// soft target of 0 on a -inf logit does not make the row NaN.
FLM_INLINE float weighted(float v, float x) {
  return v == 0.0f ? 0.0f : v * x;
}

// Per-row outputs of the forward pass.
struct CeRow {
  float loss;
  float lse;
  float a_sum; // A = sum_j w_j q_j, saved for backward
};

FLM_INLINE CeRow ce_finish_row(LseState st, float a_sum, float a_gap, float z_loss) {
  CeRow r;
  float log_s = log_f32(st.sum);
  r.lse = st.max + log_s;
  r.a_sum = a_sum;
  float loss = a_sum * log_s + a_gap;
  r.loss = z_loss != 0.0f ? loss + z_loss * r.lse * r.lse : loss;
  return r;
}

// The row that an ignored target or an out-of-range class index produces.
// Ignored rows contribute nothing; a bad index poisons its row with NaN
// (documented) so the error is visible instead of silently reading memory.
FLM_INLINE CeRow ce_masked_row(bool out_of_range) {
  CeRow r;
  r.loss = out_of_range ? kNaN : 0.0f;
  r.lse = 0.0f;
  r.a_sum = out_of_range ? kNaN : 0.0f;
  return r;
}

// Backward: the coefficient of p_j in the row, g * (A + 2 z lse) + g_lse,
// where g is the cotangent of the row's loss and g_lse that of its lse.
FLM_INLINE float ce_row_softmax_coef(float g, float g_lse, float a_sum, float lse, float z_loss) {
  float dlse = z_loss != 0.0f ? a_sum + 2.0f * z_loss * lse : a_sum;
  return g * dlse + g_lse;
}

// Backward for one element: coef * p_j - g * w_j q_j.
FLM_INLINE float ce_grad(float x, float lse, float softmax_coef, float g_target) {
  return softmax_coef * exp_nonpos_f32(x - lse) - g_target;
}

} // namespace flm
