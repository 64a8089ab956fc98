#include "ops/smooth_l1.h"

namespace fl {

namespace {

mx::array regression(PointwiseKind kind, const char* pred_name, const char* param_name,
                     const mx::array& predictions, const mx::array& targets, float param,
                     Reduce reduce, mx::StreamOrDevice s) {
  check_pointwise_inputs(predictions, targets, pred_name);
  if (!(param >= 0.0f)) {
    fail_value(param_name, " must be >= 0, got ", param);
  }
  PointwiseParams p;
  p.kind = kind;
  p.param0 = param;
  p.reduce = reduce;
  return pointwise_loss(predictions, targets, p, s);
}

} // namespace

mx::array smooth_l1_loss(const mx::array& predictions, const mx::array& targets, float beta,
                         Reduce reduce, mx::StreamOrDevice s) {
  return regression(PointwiseKind::SmoothL1, "predictions", "beta", predictions, targets, beta,
                    reduce, s);
}

mx::array huber_loss(const mx::array& inputs, const mx::array& targets, float delta,
                     Reduce reduce, mx::StreamOrDevice s) {
  return regression(PointwiseKind::Huber, "inputs", "delta", inputs, targets, delta, reduce, s);
}

} // namespace fl
