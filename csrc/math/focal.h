// Focal losses (Lin et al., RetinaNet), shared by CPU and Metal kernels.
//
// Sigmoid focal, element-wise (torchvision.ops.sigmoid_focal_loss semantics):
//   p = sigmoid(x), ce = softplus(x) - x t,  m = 1 - p_t = p (1 - t) + (1 - p) t
// ce is evaluated as x (1 - t) + log1p(e^-x) for x >= 0 and -x t + log1p(e^x)
// for x < 0: both parts >= 0 for t in [0, 1], so a confident prediction
// (x = 16, t = 1: ce = 1.1e-7) keeps its bits instead of cancelling
// softplus(16) - 16 to 0. Likewise p - t = p (1 - t) - (1 - p) t.
//   loss = alpha_t * ce * m^gamma,  alpha_t = alpha t + (1 - alpha)(1 - t)
//   (alpha < 0 disables alpha_t).
// Gradient: d/dx = alpha_t [ (p - t) m^gamma + gamma ce m^(gamma-1) p(1-p)(1-2t) ].
// For gamma < 1 the factor m^(gamma-1) is singular where the prediction is
// saturated (m -> 0). Since m lies between p and 1-p, the ratio r = p(1-p)/m is
// in [0, 1] and m^(gamma-1) p(1-p) = m^gamma r stays finite: we compute that.
//
// Softmax focal, per row with class index t:
//   u = 1 - p_t (computed as sum_{j != t} e^{x_j - m} / sum_j e^{x_j - m}, no
//   cancellation), loss = alpha_t u^gamma (-log p_t).
// Gradient: d/dx_j = alpha_t C (p_j - [j == t]),
//   C = u^gamma (1 + gamma p_t (-log p_t) / u), and (-log p_t)/u -> 1 as u -> 0,
// so backward needs per row only lse (as the pair lse + lse_lo, see
// cross_entropy.h) and alpha_t C, which forward saves.
#pragma once

#include "cross_entropy.h"

namespace flm {

FLM_INLINE float focal_alpha_t(float t, float alpha) {
  return alpha < 0.0f ? 1.0f : alpha * t + (1.0f - alpha) * (1.0f - t);
}

// sigmoid(x), sigmoid(-x) = 1 - sigmoid(x) and log(1 + e^-|x|), each without
// cancellation, from a single exp(-|x|).
struct SigmoidParts {
  float p; // sigmoid(x)
  float q; // 1 - p
  float log1p_e; // log(1 + e^-|x|) = softplus(x) - max(x, 0)
};

FLM_INLINE SigmoidParts sigmoid_parts(float x) {
  float e = exp_neg_f32(-fabs(x)); // in (0, 1]: never overflows
  float inv = 1.0f / (1.0f + e);
  SigmoidParts s;
  s.p = x >= 0.0f ? inv : e * inv;
  s.q = x >= 0.0f ? e * inv : inv;
  s.log1p_e = log1p_unit(e);
  return s;
}

// Binary cross-entropy with logits, softplus(x) - x t, without cancellation.
// (weighted: a target of exactly 1 or 0 on an infinite logit of its own sign
// costs 0, not inf * 0.)
FLM_INLINE float bce_with_logits(SigmoidParts s, float x, float t) {
  float linear = x >= 0.0f ? weighted(1.0f - t, x) : weighted(t, -x);
  return linear + s.log1p_e;
}

// m = 1 - p_t = p (1 - t) + (1 - p) t, from p and 1 - p.
FLM_INLINE float sigmoid_focal_modulator(SigmoidParts s, float t) {
  return s.p * (1.0f - t) + s.q * t;
}

// `value` where the target t is in [0, 1], else NaN (a NaN t included). The
// formula is no loss outside [0, 1] (it goes negative, and the forms above
// rely on t in [0, 1]); the kernel itself marks such an element, so nothing
// reads the targets on the host: no sync, the same under mx.compile, as an
// out-of-range class index gives a NaN row.
FLM_INLINE float if_unit_target(float t, float value) {
  return t >= 0.0f && t <= 1.0f ? value : kNaN;
}

// Gamma: float, or GammaTwo for a kernel specialised to gamma = 2.
template <typename Gamma>
FLM_INLINE float sigmoid_focal_loss(float x, float t, float alpha, Gamma gamma) {
  SigmoidParts s = sigmoid_parts(x);
  float ce = bce_with_logits(s, x, t);
  return if_unit_target(
      t, focal_alpha_t(t, alpha) * ce * pow_unit(sigmoid_focal_modulator(s, t), gamma));
}

// m^gamma * r with r = p(1-p)/m in [0, 1] (the focus term's m^(gamma-1)
// p(1-p), finite for every gamma >= 0); its limit when m underflows to 0 is
// irrelevant because m^gamma = 0 (gamma > 0) or gamma = 0 multiplies it away.
FLM_INLINE float focal_m_pow_r(float m, float m_pow, SigmoidParts s, float) {
  float r = m > 0.0f ? (s.p * s.q) / m : 1.0f;
  return m_pow * r;
}
// gamma = 2: m^2 p(1-p)/m = m p(1-p), with no division (the costliest
// instruction of the loop) and no m = 0 special case.
FLM_INLINE float focal_m_pow_r(float m, float, SigmoidParts s, GammaTwo) {
  return m * (s.p * s.q);
}

template <typename Gamma>
FLM_INLINE float sigmoid_focal_grad(float x, float t, float alpha, Gamma gamma) {
  SigmoidParts s = sigmoid_parts(x);
  float ce = bce_with_logits(s, x, t);
  float m = sigmoid_focal_modulator(s, t);
  float m_pow = pow_unit(m, gamma);
  float g = gamma_value(gamma);
  float focus = g == 0.0f ? 0.0f : g * ce * focal_m_pow_r(m, m_pow, s, gamma) * (1.0f - 2.0f * t);
  float p_minus_t = s.p * (1.0f - t) - s.q * t; // exact 1 - p, not p - 1, at t = 1
  return if_unit_target(t, focal_alpha_t(t, alpha) * (p_minus_t * m_pow + focus));
}

// Per-row results of the softmax focal forward pass.
struct FocalRow {
  float loss;
  float lse;
  float lse_lo; // lse + lse_lo = max + log(sum) exactly
  float coef; // alpha_t * C, saved for backward
};

// From the row's max m, s = sum_j e^{x_j - m}, s_other = the same sum without
// the target, and the target logit x_t.
FLM_INLINE FocalRow softmax_focal_finish_row(float m, float s, float s_other, float x_t,
                                             float alpha_t, float gamma) {
  FocalRow r;
  float log_s = log_f32(s);
  float ref = lse_ref(m); // what s is relative to
  r.lse = ref + log_s;
  r.lse_lo = two_sum_lo(ref, log_s, r.lse);
  float u = s_other / s; // 1 - p_t
  float gap_t = ref - x_t; // exact near the max, whatever the logits' offset
  float p_t = exp_f32(-gap_t - log_s);
  // -log p_t: from u when p_t is near 1 (log1p keeps its bits), else directly.
  float nll = u < 0.5f ? -log1p_f32(-u) : gap_t + log_s;
  float u_pow = pow_unit(u, gamma);
  r.loss = alpha_t * u_pow * nll;
  float ratio = u > 0.0f ? nll / u : 1.0f;
  r.coef = alpha_t * (gamma == 0.0f ? 1.0f : u_pow * (1.0f + gamma * p_t * ratio));
  return r;
}

FLM_INLINE FocalRow softmax_focal_masked_row(bool out_of_range) {
  FocalRow r;
  r.loss = out_of_range ? kNaN : 0.0f;
  r.lse = 0.0f;
  r.lse_lo = 0.0f;
  r.coef = out_of_range ? kNaN : 0.0f;
  return r;
}

// Backward for one element: row_coef (p_j - [j == t]), row_coef = g alpha_t C.
FLM_INLINE float softmax_focal_grad(float x, float lse, float lse_lo, float row_coef,
                                    bool is_target) {
  float p = softmax_prob(x, lse, lse_lo);
  return row_coef * (is_target ? p - 1.0f : p);
}

} // namespace flm
