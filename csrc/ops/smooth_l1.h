// Smooth-L1 and Huber losses (element-wise; math in csrc/math/smooth_l1.h).
#pragma once

#include "ops/pointwise_loss.h"

namespace fl {

// The checks of each loss's option, run by the op and by the Module at
// construction (bindings.cpp): beta >= 0 (0 is plain L1); delta > 0 (as
// PyTorch: delta = 0 is the zero loss, so nothing would train).
void check_smooth_l1_options(float beta);
void check_huber_options(float delta);

// Element-wise (Reduce::None) or summed float32 smooth-L1 loss.
mx::array smooth_l1_loss(const mx::array& predictions, const mx::array& targets, float beta,
                         Reduce reduce, mx::StreamOrDevice s = {});

// Element-wise (Reduce::None) or summed float32 Huber loss.
mx::array huber_loss(const mx::array& inputs, const mx::array& targets, float delta,
                     Reduce reduce, mx::StreamOrDevice s = {});

} // namespace fl
