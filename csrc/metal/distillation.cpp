// eval_gpu of the distillation divergences (metal/distillation.metal); plans
// from launch_plan.cpp.
#include "metal/host.h"
#include "ops/distillation.h"

namespace fl {

namespace {

struct KdLayout {
  mplan::KDtype student;
  mplan::KDtype teacher;
  int64_t rows;
  int vocab;
  KdArgs args;
};

KdLayout kd_layout(const std::vector<mx::array>& inputs, const DistillParams& p) {
  KdLayout l;
  l.student = gpu::kernel_dtype(inputs[0].dtype());
  l.teacher = gpu::kernel_dtype(inputs[1].dtype());
  l.vocab = inputs[0].shape(-1);
  l.rows = l.vocab ? int64_t(inputs[0].size()) / l.vocab : 0;
  l.args = mplan::make_kd_args(l.vocab, p.has_targets, p.has_ignore_index, p.ignore_index,
                               p.inv_temperature, p.beta, p.d_scale, p.alpha);
  gpu::require_dense(inputs[0], "student_logits");
  gpu::require_dense(inputs[1], "teacher_logits");
  if (p.has_targets) {
    gpu::require_dense(inputs[2], "targets");
    if (inputs[2].dtype() != mx::int64) {
      throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
    }
  }
  return l;
}

} // namespace

void Distill::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  KdLayout l = kd_layout(inputs, params_);
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::kd_forward_plan(l.student, l.teacher, params_.kind, l.rows, l.vocab, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_KD_FWD_STUDENT);
  enc.set_input_array(inputs[1], FL_KD_FWD_TEACHER);
  // Without targets: bound to the student, never read.
  enc.set_input_array(params_.has_targets ? inputs[2] : inputs[0], FL_KD_FWD_INDEX);
  enc.set_output_array(outputs[0], FL_KD_FWD_LOSS);
  enc.set_output_array(outputs[1], FL_KD_FWD_STATS);
  enc.set_bytes(l.args, FL_KD_FWD_ARGS);
  x.dispatch();
}

void DistillVJP::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  gpu::alloc_or_reuse(grad, inputs[0]);
  KdLayout l = kd_layout(inputs, params_);
  // inputs: student, teacher, [targets], stats, g_loss
  const size_t n = inputs.size();
  gpu::require_dense(inputs[n - 2], "stats");
  gpu::require_dense(inputs[n - 1], "g_loss");
  auto x = gpu::launch(stream(), [&](int max_threads) {
    return mplan::kd_backward_plan(l.student, l.teacher, params_.kind, l.rows, l.vocab, max_threads);
  });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_KD_BWD_STUDENT);
  enc.set_input_array(inputs[1], FL_KD_BWD_TEACHER);
  enc.set_input_array(params_.has_targets ? inputs[2] : inputs[0], FL_KD_BWD_INDEX);
  enc.set_input_array(inputs[n - 2], FL_KD_BWD_STATS);
  enc.set_input_array(inputs[n - 1], FL_KD_BWD_GLOSS);
  enc.set_output_array(grad, FL_KD_BWD_GRAD);
  enc.set_bytes(l.args, FL_KD_BWD_ARGS);
  x.dispatch();
}

} // namespace fl
