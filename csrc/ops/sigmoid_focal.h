// Sigmoid focal loss (element-wise; math in csrc/math/focal.h).
#pragma once

#include "ops/pointwise_loss.h"

namespace fl {

// gamma >= 0 and alpha <= 1 (alpha < 0 disables the class-balance factor):
// run by the op and by nn.SigmoidFocalLoss at construction (bindings.cpp).
void check_sigmoid_focal_options(float alpha, float gamma);

// Element-wise (Reduce::None) or summed float32 sigmoid focal loss.
// alpha < 0 disables the class-balance factor; targets are in [0, 1] (the
// kernels give NaN for a target outside, see csrc/math/focal.h).
mx::array sigmoid_focal_loss(const mx::array& inputs, const mx::array& targets, float alpha,
                             float gamma, Reduce reduce, mx::StreamOrDevice s = {});

} // namespace fl
