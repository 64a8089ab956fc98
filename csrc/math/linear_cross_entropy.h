// Formulas of the fused linear cross-entropy that are not plain cross-entropy:
// the row state of a vocabulary seen in tiles, with its entropy sum. Shared by
// the CPU kernel (csrc/cpu/linear_cross_entropy.cpp) and the Metal kernels; the
// loss and the gradient of the logits themselves come from cross_entropy.h,
// the logit soft-cap from softcap.h (z = softcap(hidden . w + bias)).
#pragma once

#include "cross_entropy.h"
#include "softcap.h"
#include "transcendental.h"

namespace flm {

// ---- a row seen in pieces (the Metal kernels' vocabulary tiles) -----------------
//
// The cross-entropy state of cross_entropy.h (lse; all = (number of logits,
// sum (ref - z))) plus the entropy sum
//     ent = sum_j exp(z_j - ref) (z_j - ref)          (every term <= 0),
// so that entropy = log(s) - ent / s (the CPU's formula on a whole row).
// When the reference moves up by delta, each exp term is scaled by
// scale = exp(-delta) and each (z_j - ref) loses delta:
//     ent' = scale * (ent - delta * s).
struct LceRowState {
  CeState ce;
  float ent;
};

FLM_INLINE LceRowState lce_state_empty() {
  LceRowState st;
  st.ce = ce_state_empty();
  st.ent = 0.0f;
  return st;
}

// The state relative to a new max to_max >= st.ce.lse.max.
FLM_INLINE LceRowState lce_state_move(LceRowState st, float to_max) {
  MaxMove mv = max_move(st.ce.lse.max, to_max);
  st.ent = entropy_sum_moved(st.ent, st.ce.lse.sum, mv);
  st.ce = ce_state_move(st.ce, to_max);
  return st;
}

// Adds a piece's sums, computed against shift = lse_ref(st.ce.lse.max):
// sum_exp = sum exp(z - shift), gap = sum (shift - z), ent = sum exp(z - shift)(z - shift)
// over `count` logits.
FLM_INLINE LceRowState lce_state_add(LceRowState st, float sum_exp, float gap, float ent, float count) {
  st.ce.lse.sum += sum_exp;
  st.ce.all.weight += count;
  st.ce.all.gap += gap;
  st.ent += ent;
  return st;
}

// The state of the union of two disjoint pieces of a row.
FLM_INLINE LceRowState lce_state_merge(LceRowState a, LceRowState b) {
  float m = fmax(a.ce.lse.max, b.ce.lse.max);
  a = lce_state_move(a, m);
  b = lce_state_move(b, m);
  return lce_state_add(a, b.ce.lse.sum, b.ce.all.gap, b.ent, b.ce.all.weight);
}

// Entropy (nats) of the softmax of the row.
FLM_INLINE float lce_entropy(LceRowState st) {
  return softmax_entropy(st.ce.lse.sum, st.ent);
}

} // namespace flm
