// Smooth-L1 and Huber losses, element-wise, shared by CPU and Metal kernels.
//
//   smooth_l1(d; beta) = 0.5 d^2 / beta      if |d| < beta
//                        |d| - 0.5 beta      otherwise          (d = pred - target)
//   huber(d; delta)    = delta * smooth_l1(d; delta)
//                      = 0.5 d^2 if |d| <= delta, delta (|d| - 0.5 delta) otherwise
//
// beta = 0 is plain L1 (mlx.nn.losses divides by zero there; we take the limit),
// and delta = 0 gives a zero loss, which is what MLX's formula yields.
#pragma once

#include "transcendental.h"

namespace flm {

FLM_CONST int kSmoothL1 = 0;
FLM_CONST int kHuber = 1;

// Loss and d loss / d pred for one difference d. `param` is beta or delta.
FLM_INLINE float smooth_l1_loss(float d, float beta) {
  float a = fabs(d);
  return a < beta ? 0.5f * d * d / beta : a - 0.5f * beta;
}

FLM_INLINE float smooth_l1_grad(float d, float beta) {
  return fabs(d) < beta ? d / beta : sign0(d);
}

FLM_INLINE float regression_loss(int kind, float d, float param) {
  if (kind == kHuber) {
    float a = fabs(d);
    return a <= param ? 0.5f * d * d : param * (a - 0.5f * param);
  }
  return smooth_l1_loss(d, param);
}

// The gradient w.r.t. the target is the negative of this.
FLM_INLINE float regression_grad(int kind, float d, float param) {
  if (kind == kHuber) {
    return clamp_keep_nan(d, -param, param); // clamp(d, -delta, delta); NaN stays NaN
  }
  return smooth_l1_grad(d, param);
}

} // namespace flm
