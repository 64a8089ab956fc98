// Multi-class (softmax) focal loss, row-wise like cross-entropy; math in
// csrc/math/focal.h.
#pragma once

#include "ops/common.h"

namespace fl {

struct SoftmaxFocalParams {
  float gamma = 2.0f;
  float alpha = 1.0f; // scalar class-balance factor (when no per-class alpha)
  bool has_class_alpha = false; // a per-class alpha array is the third input
  bool has_ignore_index = false;
  int64_t ignore_index = -100;

  bool operator==(const SoftmaxFocalParams&) const = default;
};

// gamma >= 0 and a scalar alpha >= 0 (a per-class alpha array is checked
// for NaN/negative values in Python, where its values can be read): run by
// the op and by nn.SoftmaxFocalLoss at construction (bindings.cpp).
void check_softmax_focal_options(float gamma, std::optional<float> alpha);

// Per-row float32 loss (logits' shape without `axis`). `alpha` is either a
// scalar or an array of shape [K] (per class); neither means 1.
mx::array softmax_focal_loss(
    const mx::array& logits,
    const mx::array& targets,
    int axis,
    float gamma,
    std::optional<float> alpha,
    const std::optional<mx::array>& class_alpha,
    std::optional<int64_t> ignore_index,
    mx::StreamOrDevice s = {});

// Forward. Inputs: logits [..., K], class indices [...] int64, optionally
// alpha [K] float32. Outputs (float32, [...]): loss, lse, lse_lo (lse's
// rounding error, see math/cross_entropy.h), coef (alpha_t * C).
class SoftmaxFocal : public LossPrimitive<SoftmaxFocalParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedSoftmaxFocal")
  FL_VJP
};

// Backward w.r.t. the logits. Inputs: logits, class indices, lse, lse_lo, coef, and
// the cotangent of the loss. Output: gradient in the logits' dtype.
class SoftmaxFocalVJP : public LossPrimitive<SoftmaxFocalParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedSoftmaxFocalVJP")
};

} // namespace fl
