// Sigmoid focal loss (element-wise; math in csrc/math/focal.h).
#pragma once

#include "ops/pointwise_loss.h"

namespace fl {

// Element-wise (Reduce::None) or summed float32 sigmoid focal loss.
// alpha < 0 disables the class-balance factor; targets are in [0, 1].
mx::array sigmoid_focal_loss(const mx::array& inputs, const mx::array& targets, float alpha,
                             float gamma, Reduce reduce, mx::StreamOrDevice s = {});

} // namespace fl
