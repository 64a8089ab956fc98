// The logit soft-cap (Gemma 2): the logits become z = c tanh(y / c) before
// the softmax, so none exceeds c in magnitude. Shared by the cross-entropy
// (csrc/cpu/cross_entropy.cpp, metal/cross_entropy.metal: y the given logit)
// and the fused linear cross-entropy (y = hidden . w + bias).
//
// Gradient. The loss sees only z, so with dL/dz_j from cross_entropy.h
// (g ((A + 2 z_loss lse) p_j - w_j q_j), p = softmax(z), lse of z),
//     dL/dy_j = dL/dz_j * dz_j/dy_j,
//     dz/dy = c * (1 - tanh(y / c)^2) / c = 1 - tanh(y / c)^2 = 1 - (z / c)^2,
// so the backward needs only the capped logit z, recomputed from y. A -inf
// logit is capped to -c (tanh(-inf) = -1) with dz/dy = 0: it takes part in
// the softmax as a finite logit and receives no gradient.
#pragma once

#include "transcendental.h"

namespace flm {

// tanh for float32 in straight-line code (vectorizes). For |x| >= 1/8 it is
// (1 - e) / (1 + e) with e = exp(-2|x|) (no cancellation: 1 - e >= 0.22);
// below, the odd Taylor series to x^7 (next term < 2e-9 relative), where
// 1 - e would lose most of its digits.
FLM_INLINE float tanh_f32(float x) {
  float ax = fabs(x);
  float e = exp_nonpos_f32(-2.0f * ax);
  float big = (1.0f - e) / (1.0f + e);
  float x2 = x * x;
  // x - x^3/3 + 2x^5/15 - 17x^7/315
  float small = ax * (1.0f + x2 * (-0.33333333f + x2 * (0.13333333f + x2 * -0.05396825f)));
  float t = ax < 0.125f ? small : big;
  return x < 0.0f ? -t : t;
}

FLM_INLINE float softcap(float y, float cap) {
  return cap * tanh_f32(y / cap);
}

// d softcap / dy written with the capped value z = softcap(y, cap).
FLM_INLINE float softcap_grad(float z, float cap) {
  float t = z / cap;
  return 1.0f - t * t;
}

} // namespace flm
