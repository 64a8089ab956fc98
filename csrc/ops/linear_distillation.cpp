#include "ops/linear_distillation.h"

#include "math/distillation.h"
#include "math/quantized.h"
#include "ops/student_head_grads.h"
#include "ops/vmap_slices.h"

namespace fl {

// The checked head's quantization, and its inputs (in LdInputs order) appended.
HeadQuant check_head(const HeadArgs& h, const char* who, std::vector<mx::array>& inputs,
                     mx::StreamOrDevice s) {
  const std::string hidden_name = std::string(who) + "_hidden";
  const std::string weight_name = std::string(who) + "_weight";
  check_float_input(h.hidden, hidden_name.c_str());
  if (h.hidden.ndim() == 0) {
    fail_value(hidden_name, " must have a feature axis [..., H], got a scalar");
  }
  const int hidden_size = h.hidden.shape(-1);
  HeadQuant q;
  if (h.biases && !h.scales) {
    fail_value(who, "_biases (of a quantized weight) given without ", who, "_scales");
  }
  if (h.global_scale && !h.scales) {
    fail_value(who, "_global_scale (of an nvfp4 weight) given without ", who, "_scales");
  }
  const int mode = quant_mode_from_name(h.mode);
  if (mode != flm::kQuantAffine && !h.scales) {
    fail_value(who, "_mode='", h.mode, "' describes a quantized weight: pass the ", who,
               "_scales= that mx.quantize returned with it");
  }
  inputs.push_back(h.hidden);
  inputs.push_back(h.weight);
  if (h.scales) {
    check_quantized_head(h.weight, *h.scales, h.biases, hidden_size, h.group_size, h.bits, mode,
                         h.global_scale);
    q.bits = h.bits;
    q.group_size = h.group_size;
    q.mode = mode;
    q.has_global_scale = h.global_scale.has_value();
    if (!h.biases) {
      inputs.push_back(*h.scales);
      if (h.global_scale) {
        inputs.push_back(mx::reshape(mx::astype(*h.global_scale, mx::float32, s), {1}, s));
      }
    } else {
      // scales and biases read as one dtype (as the linear CE does)
      auto sdt = mx::promote_types(h.scales->dtype(), h.biases->dtype());
      inputs.push_back(mx::astype(*h.scales, sdt, s));
      inputs.push_back(mx::astype(*h.biases, sdt, s));
    }
  } else {
    if (h.weight.dtype() == mx::uint32) {
      fail_type(weight_name, " is uint32: a quantized head needs the ", who, "_scales= (and ", who,
                "_biases=) that mx.quantize returned with it");
    }
    check_float_input(h.weight, weight_name.c_str());
    if (h.weight.ndim() != 2 || h.weight.shape(1) != hidden_size) {
      fail_value(weight_name, " must have shape (V, H) with H = ", hidden_name, ".shape[-1] = ",
                 hidden_size, ", got ", shape_str(h.weight.shape()));
    }
  }
  if (h.weight.shape(0) == 0) {
    fail_value(weight_name, " must have at least one row (class), got shape ",
               shape_str(h.weight.shape()));
  }
  return q;
}

namespace {

std::vector<mx::array> make_forward(std::vector<mx::array> inputs, const LinearDistillParams& p,
                                    std::array<bool, 2> requested, mx::StreamOrDevice s) {
  auto L = ld_inputs(p);
  for (int i : {L.s_hidden, L.t_hidden}) {
    inputs[i] = dense(inputs[i], s);
  }
  return student_head::make_forward<LinearDistill>(inputs, p, L, requested, s);
}

} // namespace

LdInputs ld_inputs(const LinearDistillParams& p) {
  LdInputs in;
  int next = 0;
  in.s_hidden = next++;
  in.s_weight = next++;
  if (p.student.quantized()) {
    in.s_scales = next++;
    if (p.student.affine()) {
      in.s_biases = next++;
    } else if (p.student.has_global_scale) {
      in.s_global = next++;
    }
  }
  in.t_hidden = next++;
  in.t_weight = next++;
  if (p.teacher.quantized()) {
    in.t_scales = next++;
    if (p.teacher.affine()) {
      in.t_biases = next++;
    } else if (p.teacher.has_global_scale) {
      in.t_global = next++;
    }
  }
  if (p.d.has_targets) {
    in.targets = next++;
  }
  in.count = next;
  return in;
}

mx::array linear_distill_loss(const HeadArgs& student, const HeadArgs& teacher,
                              const std::optional<mx::array>& targets, const std::string& kind,
                              float beta, float temperature, float alpha,
                              bool scale_by_temperature_squared,
                              std::optional<int64_t> ignore_index,
                              std::optional<int64_t> chunk_bytes, bool sum_rows, bool fuse_grads,
                              mx::StreamOrDevice s) {
  LinearDistillParams p;
  std::vector<mx::array> inputs;
  p.student = check_head(student, "student", inputs, s);
  p.teacher = check_head(teacher, "teacher", inputs, s);
  auto rows = row_shape(student.hidden);
  if (row_shape(teacher.hidden) != rows) {
    fail_value("teacher_hidden must have the student_hidden's leading shape ", shape_str(rows),
               " (one row per token), got ", shape_str(teacher.hidden.shape()));
  }
  if (teacher.weight.shape(0) != student.weight.shape(0)) {
    fail_value("teacher_weight must have the student_weight's vocabulary (", student.weight.shape(0),
               " rows), got ", teacher.weight.shape(0));
  }
  if (chunk_bytes && *chunk_bytes <= 0) {
    fail_value("chunk_bytes must be > 0, got ", *chunk_bytes);
  }
  if (targets) {
    if (targets->shape() != rows) {
      fail_value("targets must be class indices of shape ", shape_str(rows),
                 " (the hiddens' shape without the last axis), got ", shape_str(targets->shape()),
                 squeeze_hint(targets->shape(), rows));
    }
    ignore_index = ignore_index_for(*targets, ignore_index);
    inputs.push_back(class_indices(*targets, "targets", s));
  }
  p.d = distill_params(kind, beta, temperature, alpha, scale_by_temperature_squared,
                       targets.has_value(), ignore_index);
  if (chunk_bytes) {
    p.chunk_bytes = *chunk_bytes;
  }
  p.sum_rows = sum_rows;
  student_head::declare_grads(p, student.hidden, student.weight, fuse_grads);
  return make_forward(inputs, p, {}, s)[0];
}

std::vector<mx::Shape> LinearDistill::output_shapes(const std::vector<mx::array>& inputs) {
  return student_head::forward_shapes(inputs, params_, ld_inputs(params_));
}

std::vector<mx::Shape> LinearDistillVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return student_head::grad_shapes(inputs, params_, ld_inputs(params_));
}

std::vector<mx::array> LinearDistill::vjp(const std::vector<mx::array>& primals,
                                          const std::vector<mx::array>& cotangents,
                                          const std::vector<int>& argnums,
                                          const std::vector<mx::array>& outputs) {
  return student_head::vjp<LinearDistillVJP>("linear_distillation_loss", *this, params_,
                                             ld_inputs(params_), primals, cotangents, argnums,
                                             outputs, stream());
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearDistill::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  // Vmapped hiddens and targets only, per-row losses and no declared
  // gradients: the batch's rows are more rows of one call. Otherwise (a
  // vmapped head, a loss summed over rows, gradients summed over them): one
  // call per example (vmap_slices.h).
  auto L = ld_inputs(params_);
  std::vector<bool> per_row(inputs.size(), false);
  per_row[L.s_hidden] = per_row[L.t_hidden] = true;
  if (L.targets >= 0) {
    per_row[L.targets] = true;
  }
  bool heads_mapped = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    heads_mapped = heads_mapped || (!per_row[i] && axes[i] >= 0);
  }
  auto s = stream();
  auto p = params_;
  auto asked = requested;
  if (heads_mapped || p.sum_rows || p.grad_hidden || p.grad_weight) {
    return vmap_by_slices(
        inputs, axes, [&](const std::vector<mx::array>& in) { return make_forward(in, p, asked, s); },
        s);
  }
  auto moved = vmap_to_front(inputs, axes, per_row, s);
  return {make_forward(moved, params_, asked, s), {0, 0}};
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearDistillVJP::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  auto s = stream();
  auto p = params_;
  auto L = ld_inputs(p);
  return vmap_by_slices(
      inputs, axes,
      [&](const std::vector<mx::array>& in) {
        return student_head::make_backward<LinearDistillVJP>(in, p, L, s);
      },
      s);
}

// eval_gpu: csrc/metal/linear_distillation.cpp.
#ifndef _METAL_
FL_NO_METAL(LinearDistill)
FL_NO_METAL(LinearDistillVJP)
#endif

} // namespace fl
