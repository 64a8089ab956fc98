#include "ops/smooth_l1.h"

namespace fl {

namespace {

mx::array regression(PointwiseKind kind, const char* pred_name, const mx::array& predictions,
                     const mx::array& targets, float param, Reduce reduce,
                     mx::StreamOrDevice s) {
  check_pointwise_inputs(predictions, targets, pred_name);
  PointwiseParams p;
  p.kind = kind;
  p.param0 = param;
  p.reduce = reduce;
  return pointwise_loss(predictions, targets, p, s);
}

} // namespace

void check_smooth_l1_options(float beta) {
  if (!(beta >= 0.0f)) {
    fail_value("beta must be >= 0 (0 is plain L1), got ", beta);
  }
}

void check_huber_options(float delta) {
  if (!(delta > 0.0f)) {
    fail_value("delta must be > 0 (delta = 0 makes the loss and its gradient 0 everywhere; "
               "PyTorch rejects it too), got ", delta);
  }
}

mx::array smooth_l1_loss(const mx::array& predictions, const mx::array& targets, float beta,
                         Reduce reduce, mx::StreamOrDevice s) {
  check_smooth_l1_options(beta);
  return regression(PointwiseKind::SmoothL1, "predictions", predictions, targets, beta, reduce, s);
}

mx::array huber_loss(const mx::array& inputs, const mx::array& targets, float delta,
                     Reduce reduce, mx::StreamOrDevice s) {
  check_huber_options(delta);
  return regression(PointwiseKind::Huber, "inputs", inputs, targets, delta, reduce, s);
}

} // namespace fl
