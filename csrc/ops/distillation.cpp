#include "ops/distillation.h"

#include <cmath>

#include "math/distillation.h"

namespace fl {

namespace {

mx::Shape stats_shape(const mx::array& student) {
  auto shape = row_shape(student);
  shape.push_back(flm::kDistillStats);
  return shape;
}

std::vector<mx::array> make_forward(const mx::array& student, const mx::array& teacher,
                                    const std::optional<mx::array>& targets,
                                    const DistillParams& params, mx::StreamOrDevice s) {
  std::vector<mx::array> inputs = {dense(student, s), dense(teacher, s)};
  if (targets) {
    inputs.push_back(dense(*targets, s));
  }
  return mx::array::make_arrays({row_shape(student), stats_shape(student)},
                                {mx::float32, mx::float32},
                                std::make_shared<Distill>(mx::to_stream(s), params), inputs);
}

} // namespace

DistillParams distill_params(const std::string& kind, float beta, float temperature, float alpha,
                             bool scale_by_temperature_squared, bool has_targets,
                             std::optional<int64_t> ignore_index) {
  DistillParams p;
  if (kind == "kl") {
    p.kind = flm::kDistillForwardKL;
  } else if (kind == "reverse_kl") {
    p.kind = flm::kDistillReverseKL;
  } else if (kind == "jsd") {
    if (!(beta >= 0.0f && beta <= 1.0f)) {
      fail_value("beta must be in [0, 1], got ", beta);
    }
    // TRL's and Liger's convention: the ends are the two KLs (the mixture
    // formula itself would be 0 there).
    p.kind = beta == 0.0f ? flm::kDistillForwardKL
                          : (beta == 1.0f ? flm::kDistillReverseKL : flm::kDistillJSD);
    p.beta = beta;
  } else {
    fail_value("kind must be 'kl', 'reverse_kl' or 'jsd', got '", kind, "'");
  }
  if (!(temperature > 0.0f) || std::isinf(temperature)) {
    fail_value("temperature must be a finite number > 0, got ", temperature);
  }
  if (!(alpha >= 0.0f && alpha <= 1.0f)) {
    fail_value("alpha must be in [0, 1], got ", alpha);
  }
  if (alpha > 0.0f && !has_targets) {
    fail_value("alpha=", alpha, " mixes in the hard-label cross-entropy: pass targets (class indices)");
  }
  if (ignore_index && !has_targets) {
    fail_value("ignore_index=", *ignore_index, " needs targets: the rows whose target equals it are left out");
  }
  p.inv_temperature = 1.0f / temperature;
  if (!(p.inv_temperature > 0.0f) || std::isinf(p.inv_temperature)) {
    fail_value("temperature=", temperature, ": 1 / temperature overflows or underflows float32");
  }
  p.alpha = alpha;
  p.d_scale = (1.0f - alpha) * (scale_by_temperature_squared ? temperature * temperature : 1.0f);
  p.has_targets = has_targets;
  if (ignore_index) {
    p.has_ignore_index = true;
    p.ignore_index = *ignore_index;
  }
  return p;
}

mx::array distill_loss(const mx::array& student, const mx::array& teacher,
                       const std::optional<mx::array>& targets, const std::string& kind, float beta,
                       float temperature, float alpha, bool scale_by_temperature_squared,
                       std::optional<int64_t> ignore_index, mx::StreamOrDevice s) {
  check_float_input(student, "student_logits");
  check_float_input(teacher, "teacher_logits");
  if (student.ndim() == 0 || student.shape(-1) == 0) {
    fail_value("student_logits must have a vocabulary axis (the last) of size >= 1, got shape ",
               shape_str(student.shape()));
  }
  if (teacher.shape() != student.shape()) {
    fail_value("teacher_logits must have the student_logits' shape ", shape_str(student.shape()),
               ", got ", shape_str(teacher.shape()));
  }
  std::optional<mx::array> t;
  if (targets) {
    auto rows = row_shape(student);
    if (targets->shape() != rows) {
      fail_value("targets must be class indices of shape ", shape_str(rows),
                 " (the logits' shape without the last axis), got ", shape_str(targets->shape()),
                 squeeze_hint(targets->shape(), rows));
    }
    ignore_index = ignore_index_for(*targets, ignore_index);
    t = class_indices(*targets, "targets", s);
  }
  auto params = distill_params(kind, beta, temperature, alpha, scale_by_temperature_squared,
                               targets.has_value(), ignore_index);
  return make_forward(student, teacher, t, params, s)[0];
}

std::vector<mx::Shape> Distill::output_shapes(const std::vector<mx::array>& inputs) {
  return {row_shape(inputs[0]), stats_shape(inputs[0])};
}

std::vector<mx::Shape> DistillVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> Distill::vjp(const std::vector<mx::array>& primals,
                                    const std::vector<mx::array>& cotangents,
                                    const std::vector<int>& argnums,
                                    const std::vector<mx::array>& outputs) {
  // The stats are internal (never returned by the Python API): only the
  // loss's cotangent matters.
  auto s = stream();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      std::vector<mx::array> in = {primals[0], primals[1]};
      if (params_.has_targets) {
        in.push_back(primals[2]);
      }
      in.push_back(outputs[1]);
      in.push_back(dense(mx::astype(cotangents[0], mx::float32, s), s));
      grads.push_back(mx::array(primals[0].shape(), primals[0].dtype(),
                                std::make_shared<DistillVJP>(s, params_), std::move(in)));
    } else {
      // The teacher is frozen (stop_gradient semantics, as mlx_lm's
      // kl_div_loss); class indices are not differentiable.
      grads.push_back(mx::zeros_like(primals[arg], s));
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> Distill::vmap(const std::vector<mx::array>& inputs,
                                                                  const std::vector<int>& axes) {
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, std::vector<bool>(inputs.size(), true), s);
  std::optional<mx::array> targets;
  if (moved.size() > 2) {
    targets = moved[2];
  }
  return {make_forward(moved[0], moved[1], targets, params_, s), {0, 0}};
}

std::pair<std::vector<mx::array>, std::vector<int>> DistillVJP::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, std::vector<bool>(inputs.size(), true), s);
  for (auto& m : moved) {
    m = dense(m, s);
  }
  return {{mx::array(moved[0].shape(), moved[0].dtype(), std::make_shared<DistillVJP>(s, params_),
                     moved)},
          {0}};
}

#ifndef _METAL_
FL_NO_METAL(Distill)
FL_NO_METAL(DistillVJP)
#endif

} // namespace fl
