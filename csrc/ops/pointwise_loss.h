// The element-wise losses (smooth-L1, Huber, sigmoid focal) share one pair of
// primitives: same layout (predictions, and targets that broadcast to them),
// same reduction (none, or a fused float32 sum), same backward shape. The
// formula is picked by `kind`; see csrc/math/smooth_l1.h and csrc/math/focal.h.
#pragma once

#include "metal/launch_plan.h"
#include "ops/common.h"

namespace fl {

enum class PointwiseKind : int { SmoothL1 = 0, Huber = 1, SigmoidFocal = 2 };
// The Metal kernel-name enumeration (mplan::enumerate_plan_kernels) covers kinds
// 0 .. kPwLossKinds - 1: a new kind must be counted there.
static_assert(int(PointwiseKind::SigmoidFocal) + 1 == mplan::kPwLossKinds);

struct PointwiseParams {
  PointwiseKind kind = PointwiseKind::SmoothL1;
  float param0 = 1.0f; // beta | delta | alpha
  float param1 = 0.0f; // gamma (focal)
  Reduce reduce = Reduce::None;

  bool operator==(const PointwiseParams&) const = default;
};

// Shape and dtype checks shared by the element-wise losses: `targets` must
// broadcast to `predictions`' shape (the loss keeps the predictions' shape).
void check_pointwise_inputs(const mx::array& predictions, const mx::array& targets,
                            const char* pred_name);

// Loss of predictions vs targets (broadcast together, targets cast to the
// predictions' dtype): element-wise in the predictions' dtype, or summed to a
// float32 scalar.
mx::array pointwise_loss(
    const mx::array& predictions,
    const mx::array& targets,
    const PointwiseParams& params,
    mx::StreamOrDevice s);

// Forward. Inputs: predictions, targets (same dtype, row-contiguous; the
// targets' shape broadcasts to the predictions', read in place by the CPU and
// Metal kernels).
// Output: the loss of their shape in their dtype (Reduce::None, computed in
// float32 and rounded once), or a float32 scalar (Reduce::Sum / Mean).
class PointwiseLoss : public LossPrimitive<PointwiseParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedPointwiseLoss")
  FL_VJP
};

// Backward w.r.t. the predictions. Inputs: predictions, targets, cotangent
// (element-wise in the predictions' dtype or float32; a float32 scalar for a
// reduced loss), and for a reduced loss the forward's scalar, never read: it
// orders the backward after the forward, so that once the forward has run
// nothing but the backward holds the predictions and the gradient can take
// over their buffer. Output: the gradient in the predictions' dtype.
class PointwiseLossVJP : public LossPrimitive<PointwiseParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedPointwiseLossVJP")
};

} // namespace fl
