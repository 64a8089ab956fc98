#include "ops/linear_topk_distillation.h"

#include "math/distillation.h"
#include "ops/student_head_grads.h"
#include "ops/vmap_slices.h"

namespace fl {

namespace {

std::vector<mx::array> make_forward(std::vector<mx::array> inputs, const LinearTopkParams& p,
                                    std::array<bool, 2> requested, mx::StreamOrDevice s) {
  auto L = lt_inputs(p);
  for (int i : {L.s_hidden, L.ids, L.values}) {
    inputs[i] = dense(inputs[i], s);
  }
  return student_head::make_forward<LinearTopkDistill>(inputs, p, L, requested, s);
}

std::vector<mx::array> make_backward(const std::vector<mx::array>& in, const LinearTopkParams& p,
                                     mx::StreamOrDevice s) {
  return student_head::make_backward<LinearTopkDistillVJP>(in, p, lt_inputs(p), s);
}

} // namespace

LtInputs lt_inputs(const LinearTopkParams& p) {
  LtInputs in;
  int next = 2;
  if (p.student.quantized()) {
    in.s_scales = next++;
    if (p.student.affine()) {
      in.s_biases = next++;
    } else if (p.student.has_global_scale) {
      in.s_global = next++;
    }
  }
  in.ids = next++;
  in.values = next++;
  if (p.d.has_targets) {
    in.targets = next++;
  }
  in.count = next;
  return in;
}

mx::array linear_topk_distill_loss(const HeadArgs& student, const mx::array& teacher_ids,
                                   const mx::array& teacher_logprobs,
                                   const std::optional<mx::array>& targets, float temperature,
                                   bool renormalize, float alpha, bool scale_by_temperature_squared,
                                   std::optional<int64_t> ignore_index,
                                   std::optional<int64_t> chunk_bytes, bool sum_rows,
                                   bool fuse_grads, mx::StreamOrDevice s) {
  LinearTopkParams p;
  std::vector<mx::array> inputs;
  p.student = check_head(student, "student", inputs, s);
  auto rows = row_shape(student.hidden);
  auto k_shape = rows;
  if (teacher_ids.ndim() != int(rows.size()) + 1 ||
      !std::equal(rows.begin(), rows.end(), teacher_ids.shape().begin())) {
    fail_value("teacher_ids must have shape ", shape_str(rows), " + (k,) (one row of k class ids per "
               "token), got ", shape_str(teacher_ids.shape()));
  }
  if (teacher_logprobs.shape() != teacher_ids.shape()) {
    fail_value("teacher_logprobs must have teacher_ids' shape ", shape_str(teacher_ids.shape()),
               ", got ", shape_str(teacher_logprobs.shape()));
  }
  if (teacher_ids.shape(-1) == 0) {
    fail_value("teacher_ids must hold at least one class per row (k >= 1)");
  }
  check_float_input(teacher_logprobs, "teacher_logprobs");
  if (chunk_bytes && *chunk_bytes <= 0) {
    fail_value("chunk_bytes must be > 0, got ", *chunk_bytes);
  }
  inputs.push_back(class_indices(teacher_ids, "teacher_ids", s));
  inputs.push_back(mx::astype(teacher_logprobs, mx::float32, s));
  if (targets) {
    if (targets->shape() != rows) {
      fail_value("targets must be class indices of shape ", shape_str(rows),
                 " (the hidden's shape without the last axis), got ", shape_str(targets->shape()),
                 squeeze_hint(targets->shape(), rows));
    }
    ignore_index = ignore_index_for(*targets, ignore_index);
    inputs.push_back(class_indices(*targets, "targets", s));
  }
  p.d = distill_params("kl", 0.5f, temperature, alpha, scale_by_temperature_squared,
                       targets.has_value(), ignore_index);
  p.renormalize = renormalize;
  if (chunk_bytes) {
    p.chunk_bytes = *chunk_bytes;
  }
  p.sum_rows = sum_rows;
  student_head::declare_grads(p, student.hidden, student.weight, fuse_grads);
  return make_forward(inputs, p, {}, s)[0];
}

std::vector<mx::Shape> LinearTopkDistill::output_shapes(const std::vector<mx::array>& inputs) {
  return student_head::forward_shapes(inputs, params_, lt_inputs(params_));
}

std::vector<mx::Shape> LinearTopkDistillVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return student_head::grad_shapes(inputs, params_, lt_inputs(params_));
}

std::vector<mx::array> LinearTopkDistill::vjp(const std::vector<mx::array>& primals,
                                              const std::vector<mx::array>& cotangents,
                                              const std::vector<int>& argnums,
                                              const std::vector<mx::array>& outputs) {
  return student_head::vjp<LinearTopkDistillVJP>("linear_topk_distillation_loss", *this, params_,
                                                 lt_inputs(params_), primals, cotangents, argnums,
                                                 outputs, stream());
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearTopkDistill::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  auto s = stream();
  auto p = params_;
  auto asked = requested;
  return vmap_by_slices(
      inputs, axes, [&](const std::vector<mx::array>& in) { return make_forward(in, p, asked, s); },
      s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearTopkDistillVJP::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  auto s = stream();
  auto p = params_;
  return vmap_by_slices(
      inputs, axes, [&](const std::vector<mx::array>& in) { return make_backward(in, p, s); }, s);
}

// eval_gpu: csrc/metal/linear_distillation.cpp.
#ifndef _METAL_
FL_NO_METAL(LinearTopkDistill)
FL_NO_METAL(LinearTopkDistillVJP)
#endif

} // namespace fl
