#include "ops/softmax_focal.h"

namespace fl {

namespace {

std::vector<mx::array> make_forward(const mx::array& logits, const mx::array& targets,
                                    const std::optional<mx::array>& class_alpha,
                                    const SoftmaxFocalParams& params, mx::StreamOrDevice s) {
  std::vector<mx::array> inputs = {dense(logits, s), dense(targets, s)};
  if (class_alpha) {
    inputs.push_back(dense(*class_alpha, s));
  }
  auto rows = row_shape(logits);
  return mx::array::make_arrays(
      {rows, rows, rows, rows}, {mx::float32, mx::float32, mx::float32, mx::float32},
      std::make_shared<SoftmaxFocal>(mx::to_stream(s), params), inputs);
}

} // namespace

void check_softmax_focal_options(float gamma, std::optional<float> alpha) {
  if (!(gamma >= 0.0f)) {
    fail_value("gamma must be >= 0, got ", gamma);
  }
  // A negative or NaN alpha would flip or poison the loss (sigmoid focal's
  // "alpha < 0 disables it" has no meaning for a per-row softmax weight).
  if (alpha && !(*alpha >= 0.0f)) {
    fail_value("alpha must be >= 0, got ", *alpha);
  }
}

mx::array softmax_focal_loss(
    const mx::array& logits,
    const mx::array& targets,
    int axis,
    float gamma,
    std::optional<float> alpha,
    const std::optional<mx::array>& class_alpha,
    std::optional<int64_t> ignore_index,
    mx::StreamOrDevice s) {
  check_softmax_focal_options(gamma, class_alpha ? std::nullopt : alpha);
  check_float_input(logits, "logits");
  axis = check_class_axis(logits, axis);
  auto expected = logits.shape();
  expected.erase(expected.begin() + axis);
  if (targets.shape() != expected) {
    fail_value("targets must be class indices of shape ", shape_str(expected), " (logits ",
               shape_str(logits.shape()), " without axis ", axis, "), got ",
               shape_str(targets.shape()), squeeze_hint(targets.shape(), expected));
  }
  SoftmaxFocalParams params;
  params.gamma = gamma;
  std::optional<mx::array> per_class;
  if (class_alpha) {
    int k = logits.shape(axis);
    if (class_alpha->ndim() != 1 || class_alpha->shape(0) != k) {
      fail_value("alpha must be a scalar or have shape (", k, ",) to match the classes of logits, got ",
                 shape_str(class_alpha->shape()));
    }
    check_float_input(*class_alpha, "alpha");
    params.has_class_alpha = true;
    per_class = mx::astype(*class_alpha, mx::float32, s);
  } else if (alpha) {
    params.alpha = *alpha;
  }
  ignore_index = ignore_index_for(targets, ignore_index);
  if (ignore_index) {
    params.has_ignore_index = true;
    params.ignore_index = *ignore_index;
  }
  auto t = class_indices(targets, "targets", s);
  return make_forward(move_axis_last(logits, axis, s), t, per_class, params, s)[0];
}

std::vector<mx::Shape> SoftmaxFocal::output_shapes(const std::vector<mx::array>& inputs) {
  auto rows = row_shape(inputs[0]);
  return {rows, rows, rows, rows};
}

std::vector<mx::Shape> SoftmaxFocalVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> SoftmaxFocal::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  // lse, lse_lo and coef are internal outputs that the Python API never
  // returns, so their cotangents are zero; only the loss's cotangent matters.
  auto s = stream();
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      auto g = dense(mx::astype(cotangents[0], mx::float32, s), s);
      grads.push_back(mx::array(
          primals[0].shape(), primals[0].dtype(), std::make_shared<SoftmaxFocalVJP>(s, params_),
          {primals[0], primals[1], outputs[1], outputs[2], outputs[3], g}));
    } else if (arg == 1) {
      grads.push_back(mx::zeros_like(primals[1], s)); // class indices: not differentiable
    } else {
      throw std::invalid_argument(
          "softmax_focal_loss: gradients with respect to alpha are not implemented");
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> SoftmaxFocal::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  if (inputs.size() > 2 && axes[2] >= 0) {
    throw std::invalid_argument("softmax_focal_loss: vmap over alpha is not supported");
  }
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, {true, true, false}, s);
  std::optional<mx::array> class_alpha;
  if (moved.size() > 2) {
    class_alpha = moved[2];
  }
  return {make_forward(moved[0], moved[1], class_alpha, params_, s), {0, 0, 0, 0}};
}

std::pair<std::vector<mx::array>, std::vector<int>> SoftmaxFocalVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, std::vector<bool>(inputs.size(), true), s);
  for (auto& m : moved) {
    m = dense(m, s);
  }
  return {{mx::array(moved[0].shape(), moved[0].dtype(),
                     std::make_shared<SoftmaxFocalVJP>(s, params_), moved)},
          {0}};
}

#ifndef _METAL_
FL_NO_METAL(SoftmaxFocal)
FL_NO_METAL(SoftmaxFocalVJP)
#endif

} // namespace fl
