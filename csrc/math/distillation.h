// Distillation divergences between a student's and a teacher's logits, per
// row, shared by the CPU kernels (csrc/cpu/distillation.cpp), the Metal
// kernels (metal/distillation.metal) and, as the epilogue of a chunked head,
// the fused linear distillation loss.
//
// Definitions. One row of V student logits s and teacher logits t, the
// temperature T (c = 1 / T), log-probabilities
//     lq_j = c s_j - logsumexp(c s)      (student, q = softmax(c s))
//     lp_j = c t_j - logsumexp(c t)      (teacher, p = softmax(c t))
// and the divergence D of the kind:
//     forward KL  KL(p || q) = sum_j p_j (lp_j - lq_j)          (kDistillForwardKL)
//     reverse KL  KL(q || p) = sum_j q_j (lq_j - lp_j)          (kDistillReverseKL)
//     JSD(beta)   beta KL(p || m) + (1 - beta) KL(q || m),
//                 m = beta p + (1 - beta) q, 0 < beta < 1       (kDistillJSD)
// (TRL's GKD and Liger's convention: the op maps beta = 0 to the forward KL
// and beta = 1 to the reverse KL, where the mixture formula itself would give
// 0.) The row's loss is
//     loss = d_scale D + alpha CE,  CE = logsumexp(s) - s_y (temperature 1)
// with d_scale = (1 - alpha) (times T^2 when asked, Hinton et al.) and y the
// row's class index; alpha = 0 leaves CE out.
//
// How a row is evaluated: two passes over its logits. Pass 1 keeps, for the
// student and the teacher, the running maximum of the RAW logits and
// sum_j exp(c (x_j - max)) (ScaledLse; c (x_j - max) <= 0 and x_j - max is
// exact for the logits near the max, whatever their offset: 1e5 + N(0, 1)
// logits keep their bits), and for CE at T != 1 the same sum at c = 1. Pass 2
// adds up the divergence's terms with every lq_j and lp_j known, so each term
// is computed on its own: no difference of large sums (an online one-pass KL
// would subtract sum_j p_j (lp_j - lq_j)'s parts of size |logits|, losing
// digits exactly when p ~ q, the end of a distillation run). The CPU kernels
// keep pass 1's exps per element (against each 2048-class chunk's running
// max) and turn them into q_j and p_j in pass 2 with one exp per chunk
// (distill_term_qp): pass 2 costs no exp per element; a loss summed over rows
// forms its gradient there too (csrc/cpu/distillation.cpp, fused_rows).
//
// Gradient w.r.t. the student only (the teacher is frozen). With dD/dlq_j =
// g_j (q as a free vector) and the softmax's Jacobian, dD/dz_k = q_k (g_k -
// sum_j q_j g_j) for z = c s:
//     forward KL  g_j = -p_j / q_j                  dD/dz_k = q_k - p_k
//     reverse KL  g_j = lq_j - lp_j + 1             dD/dz_k = q_k (lq_k - lp_k - D)
//     JSD         g_j = (1 - beta)(lq_j - lm_j)     dD/dz_k = (1 - beta) q_k (lq_k - lm_k - E)
//                 (the +1 terms cancel: beta p_j / m_j + (1 - beta) q_j / m_j = 1)
// with E = sum_j q_j (lq_j - lm_j) = KL(q || m), computed in pass 2 and
// saved. dCE/ds_k = softmax(s)_k - [k == y]. Then d loss / ds_k =
// d_scale c dD/dz_k + alpha dCE/ds_k: the backward needs per row only the
// saved pass-1 statistics and E (DistillStats), one read of s and t.
//
// Zero probabilities: a -inf teacher logit has p_j = 0 and contributes 0 to
// the forward KL (weighted(): 0 * inf is 0 here), +inf to the reverse KL when
// q_j > 0, as the definitions say.
#pragma once

#include "cross_entropy.h"

namespace flm {

FLM_CONST int kDistillForwardKL = 0;
FLM_CONST int kDistillReverseKL = 1;
FLM_CONST int kDistillJSD = 2;

// The number of floats DistillStats occupies in the saved per-row array.
FLM_CONST int kDistillStats = 6;

// ---- pass 1: a log-sum-exp of c x over raw logits ---------------------------------

// max: the largest raw logit seen; sum: sum_j exp(c (x_j - lse_ref(max))).
struct ScaledLse {
  float max;
  float sum;
};

FLM_INLINE ScaledLse scaled_lse_empty() {
  ScaledLse st;
  st.max = -kInf;
  st.sum = 0.0f;
  return st;
}

// The sum relative to a new maximum to_max >= st.max (equal maxima: factor 1,
// which also covers two states that have seen only -inf; from -inf: 0, the
// sum being 0 then).
FLM_INLINE ScaledLse scaled_lse_move(ScaledLse st, float to_max, float c) {
  float scale = st.max == to_max ? 1.0f : exp_nonpos_f32(c * (st.max - to_max));
  st.sum *= scale;
  st.max = to_max;
  return st;
}

// The union of two disjoint pieces of a row (threads, SIMD lanes, tiles).
FLM_INLINE ScaledLse scaled_lse_merge(ScaledLse a, ScaledLse b, float c) {
  float m = fmax(a.max, b.max);
  a = scaled_lse_move(a, m, c);
  b = scaled_lse_move(b, m, c);
  a.sum += b.sum;
  return a;
}

// The term of one logit x, against shift = lse_ref(the state's max).
FLM_INLINE float scaled_exp(float x, float shift, float c) {
  return exp_nonpos_f32(c * (x - shift));
}

// ---- what pass 2 and the backward need -------------------------------------------

// Per row, saved by the forward (kDistillStats floats, in this order).
struct DistillStats {
  float s_ref; // lse_ref(max of the raw student logits)
  float s_log; // log sum_j exp(c (s_j - s_ref))
  float t_ref; // the same for the teacher
  float t_log;
  float e_q; // reverse KL: D; JSD: E = KL(q || m); forward KL: 0
  float ce_log; // log sum_j exp(s_j - s_ref) (temperature 1; CE only)
};

FLM_INLINE DistillStats distill_stats(ScaledLse s, ScaledLse t, float ce_sum) {
  DistillStats st;
  st.s_ref = lse_ref(s.max);
  st.s_log = log_f32(s.sum);
  st.t_ref = lse_ref(t.max);
  st.t_log = log_f32(t.sum);
  st.e_q = 0.0f;
  st.ce_log = log_f32(ce_sum);
  return st;
}

// log softmax(c x)_j from the raw logit: c (x - ref) - log_sum, <= 0 (x <= ref
// and the sum holds the max's exp(0) = 1, so log_sum >= 0): exp_nonpos_f32
// takes it as is. x - ref is exact for the logits near the max.
FLM_INLINE float scaled_log_prob(float x, float ref, float log_sum, float c) {
  return c * (x - ref) - log_sum;
}

// The options of a row, as the kernels take them.
struct DistillCoefs {
  float c; // 1 / temperature
  float beta; // JSD's beta, 0 < beta < 1
  float d_scale; // (1 - alpha), times T^2 when asked
  float alpha; // CE's weight
};

// ---- pass 2: the terms -----------------------------------------------------------

// One logit's contribution: to D and to E (what DistillStats::e_q holds).
struct DistillTerm {
  float d;
  float e;
};

// From the log-probabilities and the probabilities q = e^lq, p = e^lp (those
// the kind reads: p for the forward KL, q for the reverse, both for JSD),
// however the caller obtained them (the CPU kernels keep pass 1's exps).
template <int kKind>
FLM_INLINE DistillTerm distill_term_qp(float lq, float lp, float q, float p, float beta) {
  DistillTerm r;
  if (kKind == kDistillForwardKL) {
    r.d = weighted(p, lp - lq);
    r.e = 0.0f;
  } else if (kKind == kDistillReverseKL) {
    r.d = weighted(q, lq - lp);
    r.e = r.d;
  } else {
    float lm = log_f32(beta * p + (1.0f - beta) * q);
    float kq = weighted(q, lq - lm);
    r.d = beta * weighted(p, lp - lm) + (1.0f - beta) * kq;
    r.e = kq;
  }
  return r;
}

template <int kKind>
FLM_INLINE DistillTerm distill_term(float lq, float lp, float beta) {
  float p = kKind != kDistillReverseKL ? exp_nonpos_f32(lp) : 0.0f;
  float q = kKind != kDistillForwardKL ? exp_nonpos_f32(lq) : 0.0f;
  return distill_term_qp<kKind>(lq, lp, q, p, beta);
}

// The row's loss from D (the sum of the terms) and, for CE, the class's raw
// logit s_y: logsumexp(s) - s_y = (s_ref - s_y) + ce_log.
FLM_INLINE float distill_row_loss(float d, DistillCoefs k, DistillStats st, float s_y) {
  float loss = k.d_scale * d;
  if (k.alpha != 0.0f) {
    loss += k.alpha * ((st.s_ref - s_y) + st.ce_log);
  }
  return loss;
}

// ---- backward --------------------------------------------------------------------

// d loss / d s_k for one student logit s (teacher logit t), without the CE's
// -alpha at the class (distill_grad_target adds it). g: the row's cotangent.
template <int kKind>
FLM_INLINE float distill_grad(float s, float t, DistillStats st, DistillCoefs k, float g) {
  float lq = scaled_log_prob(s, st.s_ref, st.s_log, k.c);
  float lp = scaled_log_prob(t, st.t_ref, st.t_log, k.c);
  float q = exp_nonpos_f32(lq);
  float dz;
  if (kKind == kDistillForwardKL) {
    dz = q - exp_nonpos_f32(lp);
  } else if (kKind == kDistillReverseKL) {
    dz = weighted(q, (lq - lp) - st.e_q);
  } else {
    float p = exp_nonpos_f32(lp);
    float lm = log_f32(k.beta * p + (1.0f - k.beta) * q);
    dz = (1.0f - k.beta) * weighted(q, (lq - lm) - st.e_q);
  }
  float grad = (g * k.d_scale * k.c) * dz;
  if (k.alpha != 0.0f) {
    grad += (g * k.alpha) * exp_nonpos_f32((s - st.s_ref) - st.ce_log);
  }
  return grad;
}

// The CE's -alpha g at the row's class, added to distill_grad's value there.
FLM_INLINE float distill_grad_target(float grad, DistillCoefs k, float g) {
  return grad - g * k.alpha;
}

// ---- an offline teacher: its top-k (id, log-probability) pairs per row ------------
//
// A data set that stores only the teacher's k most probable classes per token,
// as (id_i, v_i). The forward KL restricted to them,
//     D = sum_i p_i (lp_i - lq_{id_i}),   p_i = exp(lp_i)
// with lp_i = v_i as stored (the teacher's probabilities; their mass P =
// sum_i p_i <= 1, the rest of its distribution unknown and left out), or,
// renormalised, lp_i = v_i / T - logsumexp_i(v / T): the teacher's softmax over
// its top-k at temperature T. lq is the student's full log-softmax (c = 1/T).
// Gradient (z = c s): dD/dz_j = P q_j - sum_{i: id_i = j} p_i, so the backward
// needs per row the student's lse (s_ref, s_log), P, and the k pairs again.
// Saved per row in the DistillStats slots: t_ref = P, t_log = the
// renormalising logsumexp_i(v / T) (0 when not renormalised).

// lp_i of one stored value.
FLM_INLINE float topk_log_prob(float v, float c, float t_lse, bool renormalize) {
  return renormalize ? c * v - t_lse : v;
}

// One pair's term of D.
FLM_INLINE float topk_term(float lp, float lq) {
  return weighted(exp_f32(lp), lp - lq);
}

// The row of an ignored class index (zeros) or an out-of-range one (NaN).
FLM_INLINE DistillStats distill_masked_stats(bool out_of_range) {
  DistillStats st;
  float v = out_of_range ? kNaN : 0.0f;
  st.s_ref = v;
  st.s_log = v;
  st.t_ref = v;
  st.t_log = v;
  st.e_q = v;
  st.ce_log = v;
  return st;
}

} // namespace flm
