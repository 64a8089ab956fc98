// eval_gpu of the softmax focal loss (metal/softmax_focal.metal); plans from
// launch_plan.cpp.
#include "metal/host.h"
#include "ops/softmax_focal.h"

namespace fl {

namespace {

struct SfLayout {
  mplan::KDtype dtype;
  int64_t rows;
  int num_classes;
  SfArgs args;
};

SfLayout sf_layout(const std::vector<mx::array>& inputs, const SoftmaxFocalParams& p) {
  const auto& logits = inputs[0];
  SfLayout l;
  l.dtype = gpu::kernel_dtype(logits.dtype());
  l.num_classes = logits.shape(-1);
  l.rows = l.num_classes ? int64_t(logits.size()) / l.num_classes : 0;
  l.args = mplan::make_sf_args(l.num_classes, p.gamma, p.alpha, p.has_class_alpha,
                               p.has_ignore_index, p.ignore_index);
  gpu::require_dense(logits, "logits");
  gpu::require_dense(inputs[1], "targets");
  if (inputs[1].dtype() != mx::int64) {
    throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
  }
  return l;
}

} // namespace

void SoftmaxFocal::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  SfLayout l = sf_layout(inputs, params_);
  if (params_.has_class_alpha) {
    gpu::require_dense(inputs[2], "alpha");
  }
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::sf_forward_plan(l.dtype, l.rows, l.num_classes, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_SF_FWD_LOGITS);
  enc.set_input_array(inputs[1], FL_SF_FWD_INDEX);
  // Unused without per-class alpha: bound to the logits, never read.
  enc.set_input_array(params_.has_class_alpha ? inputs[2] : inputs[0], FL_SF_FWD_ALPHA);
  enc.set_output_array(outputs[0], FL_SF_FWD_LOSS);
  enc.set_output_array(outputs[1], FL_SF_FWD_LSE);
  enc.set_output_array(outputs[2], FL_SF_FWD_LSE_LO);
  enc.set_output_array(outputs[3], FL_SF_FWD_COEF);
  enc.set_bytes(l.args, FL_SF_FWD_ARGS);
  x.dispatch();
}

void SoftmaxFocalVJP::eval_gpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  gpu::alloc_or_reuse(grad, inputs[0]);
  SfLayout l = sf_layout(inputs, params_);
  // inputs: logits, class indices, lse, lse_lo, coef, g_loss
  for (int i = 2; i < 6; ++i) {
    gpu::require_dense(inputs[i], "lse/lse_lo/coef/g_loss");
  }
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::sf_backward_plan(l.dtype, l.rows, l.num_classes, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_SF_BWD_LOGITS);
  enc.set_input_array(inputs[1], FL_SF_BWD_INDEX);
  enc.set_input_array(inputs[2], FL_SF_BWD_LSE);
  enc.set_input_array(inputs[3], FL_SF_BWD_LSE_LO);
  enc.set_input_array(inputs[4], FL_SF_BWD_COEF);
  enc.set_input_array(inputs[5], FL_SF_BWD_GLOSS);
  enc.set_output_array(grad, FL_SF_BWD_GRAD);
  enc.set_bytes(l.args, FL_SF_BWD_ARGS);
  x.dispatch();
}

} // namespace fl
