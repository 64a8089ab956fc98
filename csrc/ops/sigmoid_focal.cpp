#include "ops/sigmoid_focal.h"

namespace fl {

void check_sigmoid_focal_options(float alpha, float gamma) {
  if (!(gamma >= 0.0f)) {
    fail_value("gamma must be >= 0, got ", gamma);
  }
  if (!(alpha <= 1.0f)) {
    fail_value("alpha must be <= 1 (or negative to disable it), got ", alpha);
  }
}

mx::array sigmoid_focal_loss(const mx::array& inputs, const mx::array& targets, float alpha,
                             float gamma, Reduce reduce, mx::StreamOrDevice s) {
  check_sigmoid_focal_options(alpha, gamma);
  check_pointwise_inputs(inputs, targets, "inputs");
  PointwiseParams p;
  p.kind = PointwiseKind::SigmoidFocal;
  p.param0 = alpha;
  p.param1 = gamma;
  p.reduce = reduce;
  return pointwise_loss(inputs, targets, p, s);
}

} // namespace fl
