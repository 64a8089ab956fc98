// Smooth-L1 and Huber losses (element-wise; math in csrc/math/smooth_l1.h).
#pragma once

#include "ops/pointwise_loss.h"

namespace fl {

// Element-wise (Reduce::None) or summed float32 smooth-L1 loss.
mx::array smooth_l1_loss(const mx::array& predictions, const mx::array& targets, float beta,
                         Reduce reduce, mx::StreamOrDevice s = {});

// Element-wise (Reduce::None) or summed float32 Huber loss.
mx::array huber_loss(const mx::array& inputs, const mx::array& targets, float delta,
                     Reduce reduce, mx::StreamOrDevice s = {});

} // namespace fl
