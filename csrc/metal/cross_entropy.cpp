// eval_gpu of the fused cross-entropy (metal/cross_entropy.metal). Built only
// where MLX has Metal (_METAL_); the kernel choice, grid and buffer order come
// from launch_plan.cpp, the same plan the CPU harness tests dispatch.
#include "metal/host.h"
#include "ops/cross_entropy.h"

namespace fl {

namespace {

struct CeLayout {
  mplan::KDtype dtype;
  int64_t rows;
  int num_classes;
  CeArgs args;
};

CeLayout ce_layout(const std::vector<mx::array>& inputs, const CrossEntropyParams& p) {
  const auto& logits = inputs[0];
  CeLayout l;
  l.dtype = gpu::kernel_dtype(logits.dtype());
  l.num_classes = logits.ndim() ? logits.shape(-1) : 1;
  l.rows = l.num_classes ? int64_t(logits.size()) / l.num_classes : 0;
  l.args = mplan::make_ce_args(l.num_classes, p.label_smoothing, p.smoothing_mode,
                               p.has_ignore_index, p.ignore_index, p.z_loss, p.logit_softcap,
                               p.stats);
  gpu::require_dense(logits, "logits");
  gpu::require_dense(inputs[1], "targets");
  if (!p.soft_targets && inputs[1].dtype() != mx::int64) {
    throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
  }
  if (p.soft_targets && inputs[1].dtype() != logits.dtype()) {
    throw std::runtime_error("mlx_fused_losses: target probabilities must have the logits' dtype");
  }
  if (p.has_class_weights) {
    gpu::require_dense(inputs[2], "class_weights");
  }
  return l;
}

// Binds logits, targets and class weights; a slot the instantiation does not
// read gets the logits buffer so that no [[buffer(n)]] is left unbound.
void bind_ce_inputs(mx::metal::CommandEncoder& enc, const std::vector<mx::array>& inputs,
                    const CrossEntropyParams& p, int i_logits, int i_index, int i_probs,
                    int i_weights) {
  const auto& logits = inputs[0];
  enc.set_input_array(logits, i_logits);
  enc.set_input_array(p.soft_targets ? logits : inputs[1], i_index);
  enc.set_input_array(p.soft_targets ? inputs[1] : logits, i_probs);
  enc.set_input_array(p.has_class_weights ? inputs[2] : logits, i_weights);
}

} // namespace

void CrossEntropy::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  CeLayout l = ce_layout(inputs, params_);
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::ce_forward_plan(l.dtype, l.rows, l.num_classes, params_.soft_targets,
                                  params_.has_class_weights, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  bind_ce_inputs(enc, inputs, params_, FL_CE_FWD_LOGITS, FL_CE_FWD_INDEX, FL_CE_FWD_PROBS,
                 FL_CE_FWD_WEIGHTS);
  enc.set_output_array(outputs[0], FL_CE_FWD_LOSS);
  enc.set_output_array(outputs[1], FL_CE_FWD_LSE);
  enc.set_output_array(outputs[2], FL_CE_FWD_LSE_LO);
  enc.set_output_array(outputs[3], FL_CE_FWD_ASUM);
  // return_stats: outputs 4-7 (ops/cross_entropy.h); otherwise the slots get
  // the loss buffer, which the kernel then never reaches through them.
  const int stat_slots[] = {FL_CE_FWD_STAT_LSE, FL_CE_FWD_ENTROPY, FL_CE_FWD_ARGMAX,
                            FL_CE_FWD_CORRECT};
  for (int i = 0; i < 4; ++i) {
    enc.set_output_array(params_.stats ? outputs[4 + i] : outputs[0], stat_slots[i]);
  }
  enc.set_bytes(l.args, FL_CE_FWD_ARGS);
  x.dispatch();
}

void CrossEntropyVJP::eval_gpu(const std::vector<mx::array>& inputs,
                               std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  gpu::alloc_or_reuse(grad, inputs[0]);
  CeLayout l = ce_layout(inputs, params_);
  // inputs: logits, targets, [class_weights], lse, lse_lo, a_sum, g_loss, g_lse
  size_t n = inputs.size();
  const auto& lse = inputs[n - 5];
  const auto& lse_lo = inputs[n - 4];
  const auto& a_sum = inputs[n - 3];
  const auto& g_loss = inputs[n - 2];
  const auto& g_lse = inputs[n - 1];
  gpu::require_dense(lse, "lse");
  gpu::require_dense(lse_lo, "lse_lo");
  gpu::require_dense(a_sum, "a_sum");
  gpu::require_dense(g_loss, "g_loss");
  gpu::require_dense(g_lse, "g_lse");
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::ce_backward_plan(l.dtype, l.rows, l.num_classes, params_.soft_targets,
                                   params_.has_class_weights, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  bind_ce_inputs(enc, inputs, params_, FL_CE_BWD_LOGITS, FL_CE_BWD_INDEX, FL_CE_BWD_PROBS,
                 FL_CE_BWD_WEIGHTS);
  enc.set_input_array(lse, FL_CE_BWD_LSE);
  enc.set_input_array(lse_lo, FL_CE_BWD_LSE_LO);
  enc.set_input_array(a_sum, FL_CE_BWD_ASUM);
  enc.set_input_array(g_loss, FL_CE_BWD_GLOSS);
  enc.set_input_array(g_lse, FL_CE_BWD_GLSE);
  enc.set_output_array(grad, FL_CE_BWD_GRAD);
  enc.set_bytes(l.args, FL_CE_BWD_ARGS);
  x.dispatch();
}

} // namespace fl
