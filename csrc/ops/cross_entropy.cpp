#include "ops/cross_entropy.h"

#include <cmath>

#include "math/cross_entropy.h"

namespace fl {

namespace {

// Build the forward primitive on already-checked, dense inputs; shared by the
// op, vjp and vmap so that the graph always satisfies the kernels' layout.
std::vector<mx::array> make_forward(
    const mx::array& logits,
    const mx::array& targets,
    const std::optional<mx::array>& class_weights,
    const CrossEntropyParams& params,
    mx::StreamOrDevice s) {
  std::vector<mx::array> inputs = {dense(logits, s), dense(targets, s)};
  if (class_weights) {
    inputs.push_back(dense(*class_weights, s));
  }
  auto rows = row_shape(logits);
  std::vector<mx::Shape> shapes(params.stats ? 8 : 4, rows);
  std::vector<mx::Dtype> dtypes = {mx::float32, mx::float32, mx::float32, mx::float32};
  if (params.stats) {
    dtypes.insert(dtypes.end(), {mx::float32, mx::float32, mx::int64, mx::bool_});
  }
  return mx::array::make_arrays(
      shapes, dtypes, std::make_shared<CrossEntropy>(mx::to_stream(s), params), inputs);
}

void check_class_weights_length(const mx::array& w, int num_classes) {
  if (w.shape(0) != num_classes) {
    fail_value(
        "class_weights must have shape (", num_classes, ",) to match the ", num_classes,
        " classes of logits, got ", shape_str(w.shape()));
  }
}

} // namespace

void check_z_loss(float z_loss) {
  if (!(z_loss >= 0.0f) || !std::isfinite(z_loss)) {
    fail_value("z_loss must be a finite number >= 0, got ", z_loss);
  }
}

void check_logit_softcap(std::optional<float> logit_softcap) {
  if (logit_softcap && (!(*logit_softcap > 0.0f) || !std::isfinite(*logit_softcap))) {
    fail_value("logit_softcap must be a finite number > 0 (or None), got ", *logit_softcap);
  }
}

int check_cross_entropy_options(float label_smoothing, const std::string& label_smoothing_mode,
                                float z_loss, const std::optional<mx::array>& class_weights,
                                std::optional<float> logit_softcap) {
  int mode = check_label_smoothing(label_smoothing, label_smoothing_mode);
  check_z_loss(z_loss);
  check_logit_softcap(logit_softcap);
  if (class_weights) {
    if (class_weights->ndim() != 1) {
      fail_value("class_weights must be 1-D, one weight per class (PyTorch's weight), got shape ",
                 shape_str(class_weights->shape()));
    }
    check_float_input(*class_weights, "class_weights");
  }
  return mode;
}

int check_label_smoothing(float label_smoothing, const std::string& label_smoothing_mode) {
  if (!(label_smoothing >= 0.0f && label_smoothing < 1.0f)) {
    fail_value("label_smoothing must be in [0, 1), got ", label_smoothing);
  }
  if (label_smoothing_mode == "uniform") {
    return flm::kSmoothUniform;
  }
  if (label_smoothing_mode != "others") {
    fail_value(
        "label_smoothing_mode must be 'uniform' or 'others', got '", label_smoothing_mode, "'");
  }
  return flm::kSmoothOthers;
}

std::vector<mx::array> cross_entropy(
    const mx::array& logits,
    const mx::array& targets,
    int axis,
    float label_smoothing,
    const std::string& label_smoothing_mode,
    std::optional<int64_t> ignore_index,
    const std::optional<mx::array>& class_weights,
    float z_loss,
    std::optional<float> logit_softcap,
    bool stats,
    mx::StreamOrDevice s) {
  int smoothing_mode = check_cross_entropy_options(label_smoothing, label_smoothing_mode, z_loss,
                                                   class_weights, logit_softcap);
  check_float_input(logits, "logits");
  axis = check_class_axis(logits, axis);
  CrossEntropyParams params;
  params.label_smoothing = label_smoothing;
  params.smoothing_mode = smoothing_mode;
  params.z_loss = z_loss;
  params.logit_softcap = logit_softcap.value_or(0.0f);
  params.soft_targets = targets.ndim() == logits.ndim();
  params.stats = stats;

  auto x = move_axis_last(logits, axis, s);
  mx::array t = targets;
  auto index_shape = logits.shape();
  index_shape.erase(index_shape.begin() + axis);
  auto index_shape_error = [&](const std::string& hint) {
    fail_value(
        "targets must be class indices of shape ", shape_str(index_shape),
        " (logits ", shape_str(logits.shape()), " without axis ", axis,
        ") or probabilities of the logits' shape, got ", shape_str(targets.shape()), hint);
  };
  if (params.soft_targets) {
    // Integer targets of the logits' rank are class indices with an extra
    // axis ([N, 1] labels), not probabilities: say so.
    if (mx::issubdtype(targets.dtype(), mx::integer)) {
      auto hint = squeeze_hint(targets.shape(), index_shape);
      if (!hint.empty()) {
        index_shape_error(hint);
      }
    }
    if (targets.shape() != logits.shape()) {
      fail_value(
          "targets of probabilities must have the logits' shape ", shape_str(logits.shape()),
          ", got ", shape_str(targets.shape()));
    }
    if (!mx::issubdtype(targets.dtype(), mx::floating)) {
      fail_type("targets of the logits' shape are probabilities and must be floating, got ",
                targets.dtype());
    }
    // As PyTorch: an index cannot apply to probabilities, but a negative
    // one (the Module's default -100) matches no row and is accepted.
    if (ignore_index && *ignore_index >= 0) {
      fail_value("ignore_index=", *ignore_index,
                 " applies to class-index targets, not to probabilities (a negative one, "
                 "PyTorch's default -100, matches no row)");
    }
    ignore_index = std::nullopt;
    t = mx::astype(move_axis_last(targets, axis, s), logits.dtype(), s);
  } else {
    if (targets.shape() != index_shape) {
      index_shape_error("");
    }
    t = class_indices(targets, "targets", s);
  }
  ignore_index = ignore_index_for(targets, ignore_index);
  if (ignore_index) {
    params.has_ignore_index = true;
    params.ignore_index = *ignore_index;
  }
  std::optional<mx::array> w;
  if (class_weights) {
    check_class_weights_length(*class_weights, logits.shape(axis));
    params.has_class_weights = true;
    w = mx::astype(*class_weights, mx::float32, s);
  }
  auto out = make_forward(x, t, w, params, s);
  if (stats) {
    return {out[0], out[1], out[4], out[5], out[6], out[7]};
  }
  return {out[0], out[1]};
}

std::vector<mx::Shape> CrossEntropy::output_shapes(const std::vector<mx::array>& inputs) {
  return std::vector<mx::Shape>(params_.stats ? 8 : 4, row_shape(inputs[0]));
}

std::vector<mx::Shape> CrossEntropyVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> CrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  const auto& logits = primals[0];
  const auto& lse = outputs[1];
  const auto& lse_lo = outputs[2];
  const auto& a_sum = outputs[3];
  // lse_lo is the rounding error of lse (a constant of the evaluation) and
  // a_sum depends on targets and weights only: their cotangents never reach
  // the logits.
  auto g_loss = mx::astype(cotangents[0], mx::float32, s);
  auto g_lse = mx::astype(cotangents[1], mx::float32, s);
  // (the statistics' cotangents, outputs 4-7, are ignored: not differentiable)
  auto backward_params = params_;
  backward_params.stats = false;
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      std::vector<mx::array> inputs(primals.begin(), primals.end());
      inputs.insert(inputs.end(), {lse, lse_lo, a_sum, dense(g_loss, s), dense(g_lse, s)});
      grads.push_back(mx::array(
          logits.shape(), logits.dtype(), std::make_shared<CrossEntropyVJP>(s, backward_params),
          inputs));
    } else if (arg == 1 && params_.soft_targets) {
      // d loss / d t_j = c_target * w_j (lse - x_j): an N x K array by nature,
      // built only when someone differentiates w.r.t. the probabilities.
      auto c = flm::ce_smoothing(
          params_.label_smoothing, params_.smoothing_mode, logits.shape(-1));
      auto x = mx::astype(logits, mx::float32, s);
      if (params_.logit_softcap != 0.0f) { // the loss sees the capped logits
        auto c = mx::array(params_.logit_softcap);
        x = mx::multiply(c, mx::tanh(mx::divide(x, c, s), s), s);
      }
      // (lse - x) + lse_lo: exact where lse and x are close, whatever their size.
      auto d = mx::add(mx::subtract(mx::expand_dims(lse, -1, s), x, s),
                       mx::expand_dims(lse_lo, -1, s), s);
      if (params_.has_class_weights) {
        d = mx::multiply(d, primals[2], s);
      }
      auto scale = mx::multiply(g_loss, mx::array(c.c_target), s);
      d = mx::multiply(d, mx::expand_dims(scale, -1, s), s);
      grads.push_back(mx::astype(d, primals[1].dtype(), s));
    } else if (arg == 1) {
      grads.push_back(mx::zeros_like(primals[1], s)); // class indices: not differentiable
    } else {
      throw std::invalid_argument(
          "cross_entropy: gradients with respect to class_weights are not implemented");
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> CrossEntropy::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  if (inputs.size() > 2 && axes[2] >= 0) {
    throw std::invalid_argument("cross_entropy: vmap over class_weights is not supported");
  }
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, {true, true, false}, s);
  std::optional<mx::array> w;
  if (moved.size() > 2) {
    w = moved[2];
  }
  return {make_forward(moved[0], moved[1], w, params_, s),
          std::vector<int>(params_.stats ? 8 : 4, 0)};
}

std::pair<std::vector<mx::array>, std::vector<int>> CrossEntropyVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  size_t w_index = params_.has_class_weights ? 2 : inputs.size();
  if (w_index < inputs.size() && axes[w_index] >= 0) {
    throw std::invalid_argument("cross_entropy: vmap over class_weights is not supported");
  }
  auto s = stream();
  std::vector<bool> broadcast(inputs.size(), true);
  if (w_index < inputs.size()) {
    broadcast[w_index] = false;
  }
  auto moved = vmap_to_front(inputs, axes, broadcast, s);
  for (auto& m : moved) {
    m = dense(m, s);
  }
  auto grad = mx::array(
      moved[0].shape(), moved[0].dtype(), std::make_shared<CrossEntropyVJP>(s, params_), moved);
  return {{grad}, {0}};
}

#ifndef _METAL_
FL_NO_METAL(CrossEntropy)
FL_NO_METAL(CrossEntropyVJP)
#endif

} // namespace fl
