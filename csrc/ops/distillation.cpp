#include "ops/distillation.h"

#include <cmath>

#include "math/distillation.h"
#include "ops/accurate_sum.h"
#include "ops/linear_cross_entropy.h"
#include "ops/vmap_slices.h"

namespace fl {

namespace {

mx::Shape stats_shape(const mx::array& student) {
  auto shape = row_shape(student);
  shape.push_back(flm::kDistillStats);
  return shape;
}

// The forward's output shapes: loss, stats, the declared gradient.
std::vector<mx::Shape> forward_shapes(const mx::array& student, const DistillParams& p) {
  std::vector<mx::Shape> shapes = {p.sum_rows ? mx::Shape{} : row_shape(student), stats_shape(student)};
  if (p.grad_student) {
    shapes.push_back(student.shape());
  }
  return shapes;
}

// inputs: student, teacher, [targets], [row_scale] (as params say).
std::vector<mx::array> make_forward(std::vector<mx::array> inputs, const DistillParams& params,
                                    bool requested, mx::StreamOrDevice s) {
  for (auto& in : inputs) {
    in = dense(in, s);
  }
  auto shapes = forward_shapes(inputs[0], params);
  auto primitive = std::make_shared<Distill>(mx::to_stream(s), params);
  primitive->requested = requested;
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes, primitive, inputs);
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
                       std::optional<int64_t> ignore_index, bool sum_rows,
                       const std::optional<mx::array>& row_scale, bool fuse_grads,
                       mx::StreamOrDevice s) {
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
  std::vector<mx::array> inputs = {student, teacher};
  if (t) {
    inputs.push_back(*t);
  }
  if (!sum_rows) {
    return make_forward(inputs, params, false, s)[0];
  }
  std::optional<mx::array> scale;
  if (row_scale) {
    if (row_scale->size() != 1) {
      fail_value("row_scale must be a scalar, got shape ", shape_str(row_scale->shape()));
    }
    scale = mx::reshape(mx::astype(*row_scale, mx::float32, s), {}, s);
  }
  // The fused sum (and gradient) is the CPU kernel's, for a float32 student
  // (whose unit gradient is then the user's dtype: the cotangent's scaling
  // is free when it is 1). Elsewhere: per-row values, summed accurately.
  if (mx::to_stream(s).device == mx::Device::cpu && student.dtype() == mx::float32) {
    params.sum_rows = true;
    params.has_scale = scale.has_value();
    params.grad_student = fuse_grads && student.is_tracer();
    if (scale) {
      inputs.push_back(*scale);
    }
    return make_forward(inputs, params, false, s)[0];
  }
  auto total = accurate_sum(make_forward(inputs, params, false, s)[0], s);
  return scale ? mx::multiply(total, *scale, s) : total;
}

std::vector<mx::Shape> Distill::output_shapes(const std::vector<mx::array>& inputs) {
  return forward_shapes(inputs[0], params_);
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
  auto g = mx::astype(cotangents[0], mx::float32, s);
  // Declared and not evaluated yet: the forward forms the gradient (unit
  // cotangent), scaled here by g.
  const bool fused = params_.grad_student && outputs[0].status() == mx::array::Status::unscheduled;
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0 && fused) {
      requested = true;
      auto dtype = primals[0].dtype();
      grads.push_back(mx::array(primals[0].shape(), dtype, std::make_shared<LceScaleGrad>(s, dtype),
                                {mx::reshape(g, {}, s), outputs[2]}));
    } else if (arg == 0) {
      std::vector<mx::array> in = {primals[0], primals[1]};
      if (params_.has_targets) {
        in.push_back(primals[2]);
      }
      in.push_back(outputs[1]);
      if (params_.sum_rows) { // one cotangent for every row, times the row scale
        if (params_.has_scale) {
          g = mx::multiply(g, primals.back(), s);
        }
        g = mx::broadcast_to(g, row_shape(primals[0]), s);
      }
      in.push_back(dense(g, s));
      DistillParams bp = params_; // the backward's: per-row cotangents
      bp.sum_rows = bp.has_scale = bp.grad_student = false;
      grads.push_back(mx::array(primals[0].shape(), primals[0].dtype(),
                                std::make_shared<DistillVJP>(s, bp), std::move(in)));
    } else {
      // The teacher is frozen (stop_gradient semantics, as mlx_lm's
      // kl_div_loss); class indices and the row scale are not differentiable.
      grads.push_back(mx::zeros_like(primals[arg], s));
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> Distill::vmap(const std::vector<mx::array>& inputs,
                                                                  const std::vector<int>& axes) {
  auto s = stream();
  auto p = params_;
  auto asked = requested;
  if (p.sum_rows) { // a sum per example: one call each (vmap_slices.h)
    return vmap_by_slices(
        inputs, axes, [&](const std::vector<mx::array>& in) { return make_forward(in, p, asked, s); },
        s);
  }
  auto moved = vmap_to_front(inputs, axes, std::vector<bool>(inputs.size(), true), s);
  return {make_forward(moved, params_, false, s), {0, 0}};
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
