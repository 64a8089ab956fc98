// eval_gpu of the element-wise losses (metal/pointwise_loss.metal); plans from
// launch_plan.cpp. The fused sum is deterministic: fixed-size blocks give
// partial sums, which one threadgroup then adds in a fixed order. A target
// that broadcasts to the predictions is read in place (the _bcast kernels,
// through its PwTargetLayout): no full-size copy of it.
#include "metal/host.h"
#include "ops/pointwise_loss.h"

namespace fl {

namespace {

// The layout the kernels read the target through (bound for every variant;
// the plain kernels never read it). The op passes a row-contiguous target of
// the predictions' dtype whose shape broadcasts to theirs, in few enough
// groups (ops/pointwise_loss.cpp, target_for_kernels).
PwTargetLayout target_layout(const mx::array& pred, const mx::array& target) {
  if (target.dtype() != pred.dtype()) {
    throw std::runtime_error("mlx_fused_losses: targets must reach the kernel in the predictions' dtype");
  }
  PwTargetLayout layout;
  std::vector<int64_t> pshape(pred.shape().begin(), pred.shape().end());
  std::vector<int64_t> tshape(target.shape().begin(), target.shape().end());
  if (!mplan::make_pw_target_layout(pshape, tshape, &layout)) {
    throw std::runtime_error("mlx_fused_losses: targets broadcast in too many groups for the kernel");
  }
  return layout;
}

} // namespace

void PointwiseLoss::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  gpu::alloc(out);
  const auto& pred = inputs[0];
  const auto& target = inputs[1];
  gpu::require_dense(pred, "predictions");
  gpu::require_dense(target, "targets");
  const PwTargetLayout layout = target_layout(pred, target);
  const mplan::KDtype dt = gpu::kernel_dtype(pred.dtype());
  const uint64_t n = pred.size();
  const int kind = mplan::pw_kernel_kind(int(params_.kind), params_.param1);
  const int reduce = int(params_.reduce);
  PwArgs args = mplan::make_pw_args(n, params_.param0, params_.param1, reduce);
  const mx::Stream s = stream();
  auto elementwise = [&](int max_threads) {
    return mplan::pw_forward_plan(dt, kind, n, reduce, max_threads, &layout);
  };
  if (reduce == 0) {
    auto x = gpu::launch(s, elementwise);
    if (!x) {
      return;
    }
    auto& enc = x.encoder();
    enc.set_input_array(pred, FL_PW_FWD_PRED);
    enc.set_input_array(target, FL_PW_FWD_TARGET);
    enc.set_output_array(out, FL_PW_FWD_OUT);
    enc.set_bytes(args, FL_PW_FWD_ARGS);
    enc.set_bytes(layout, FL_PW_FWD_TLAYOUT);
    x.dispatch();
    return;
  }

  // Sum / mean: partial sums (at least one slot, so the buffer is valid even
  // for n = 0), then the finish kernel, which always writes the result.
  uint64_t num_partials = args.num_partials;
  mx::array partials({int(num_partials > 0 ? num_partials : 1)}, mx::float32, nullptr, {});
  gpu::alloc(partials);
  mx::metal::get_command_encoder(s).add_temporary(partials);
  if (auto x = gpu::launch(s, elementwise)) {
    auto& enc = x.encoder();
    enc.set_input_array(pred, FL_PW_FWD_PRED);
    enc.set_input_array(target, FL_PW_FWD_TARGET);
    enc.set_output_array(partials, FL_PW_FWD_OUT);
    enc.set_bytes(args, FL_PW_FWD_ARGS);
    enc.set_bytes(layout, FL_PW_FWD_TLAYOUT);
    x.dispatch();
  }
  // Never empty: it always writes the result.
  auto finish = gpu::launch(
      s, [&](int max_threads) { return mplan::pw_sum_finish_plan(num_partials, max_threads); });
  auto& enc = finish.encoder();
  enc.set_input_array(partials, FL_PW_SUM_PARTIALS); // the encoder orders it after the writer
  enc.set_output_array(out, FL_PW_SUM_OUT);
  enc.set_bytes(args, FL_PW_SUM_ARGS);
  finish.dispatch();
}

void PointwiseLossVJP::eval_gpu(const std::vector<mx::array>& inputs,
                                std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  gpu::alloc_or_reuse(grad, inputs[0]);
  const auto& pred = inputs[0];
  const auto& target = inputs[1];
  const auto& cotan = inputs[2];
  gpu::require_dense(pred, "predictions");
  gpu::require_dense(target, "targets");
  gpu::require_dense(cotan, "cotangent");
  const PwTargetLayout layout = target_layout(pred, target);
  const uint64_t n = pred.size();
  const int reduce = int(params_.reduce);
  if (cotan.size() != (reduce == 0 ? n : 1)) {
    throw std::runtime_error("mlx_fused_losses: cotangent of unexpected size");
  }
  // ops/pointwise_loss.cpp passes an element-wise cotangent in the
  // predictions' dtype or float32, a reduced loss's scalar in float32.
  bool cotan_in_dtype = reduce == 0 && cotan.dtype() == pred.dtype();
  if (!cotan_in_dtype && cotan.dtype() != mx::float32) {
    throw std::runtime_error("mlx_fused_losses: cotangent of unexpected dtype");
  }
  const mplan::KDtype dt = gpu::kernel_dtype(pred.dtype());
  const int kind = mplan::pw_kernel_kind(int(params_.kind), params_.param1);
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::pw_backward_plan(dt, kind, n, cotan_in_dtype, max_threads, &layout);
  });
  if (!x) {
    return;
  }
  PwArgs args = mplan::make_pw_args(n, params_.param0, params_.param1, reduce);
  auto& enc = x.encoder();
  enc.set_input_array(pred, FL_PW_BWD_PRED);
  enc.set_input_array(target, FL_PW_BWD_TARGET);
  enc.set_input_array(cotan, FL_PW_BWD_COTAN);
  enc.set_output_array(grad, FL_PW_BWD_GRAD);
  enc.set_bytes(args, FL_PW_BWD_ARGS);
  enc.set_bytes(layout, FL_PW_BWD_TLAYOUT);
  x.dispatch();
}

} // namespace fl
