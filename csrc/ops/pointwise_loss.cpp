#include "ops/pointwise_loss.h"

#include "metal/launch_plan.h"
#include "mlx/utils.h"

namespace fl {

void check_pointwise_inputs(const mx::array& predictions, const mx::array& targets,
                            const char* pred_name) {
  check_float_input(predictions, pred_name);
  if (targets.dtype() == mx::bool_ || mx::issubdtype(targets.dtype(), mx::complexfloating)) {
    fail_type("targets must be real numbers, got ", targets.dtype());
  }
  bool fits = true;
  try {
    fits = mx::broadcast_shapes(predictions.shape(), targets.shape()) == predictions.shape();
  } catch (const std::invalid_argument&) {
    fits = false;
  }
  if (!fits) {
    fail_value(
        pred_name, " and targets must have the same shape (or targets broadcast to it), got ", shape_str(predictions.shape()),
        " and ", shape_str(targets.shape()));
  }
}


namespace {

// Sum a gradient of the predictions' shape down to a target's shape (which
// broadcasts to it: fewer leading axes, or 1 where the predictions are longer).
mx::array sum_to_shape(const mx::array& g, const mx::Shape& shape, mx::StreamOrDevice s) {
  if (g.shape() == shape) {
    return g;
  }
  int lead = g.ndim() - int(shape.size());
  std::vector<int> axes;
  for (int i = 0; i < g.ndim(); ++i) {
    if (i < lead || (shape[i - lead] == 1 && g.shape(i) != 1)) {
      axes.push_back(i);
    }
  }
  return mx::reshape(mx::sum(g, axes, true, s), shape, s);
}

// Under vmap the predictions get the batch axis in front. A vmapped target
// gets it in front too, followed by unit axes up to the predictions' rank, so
// that it still lines up with them from the right; a target that is not
// vmapped lines up as it is (the kernels read it broadcast).
mx::array align_target(const mx::array& target, int axis, int pred_rank, mx::StreamOrDevice s) {
  if (axis < 0) {
    return target;
  }
  auto t = axis == 0 ? target : mx::moveaxis(target, axis, 0, s);
  mx::Shape shape = t.shape();
  shape.insert(shape.begin() + 1, pred_rank - t.ndim(), 1);
  return mx::reshape(t, shape, s);
}

// The target as the kernels of the stream read it: as it is (read in place,
// broadcast) on the CPU, and on Metal too unless its broadcast needs more
// groups than the kernels' layout holds (metal/launch_plan.h,
// make_pw_target_layout: alternating broadcast axes, rank >= 9), then at the
// predictions' full shape.
mx::array target_for_kernels(const mx::array& target, const mx::Shape& pred_shape,
                             mx::StreamOrDevice s) {
  if (mx::to_stream(s).device.type == mx::Device::DeviceType::gpu) {
    PwTargetLayout layout;
    std::vector<int64_t> pshape(pred_shape.begin(), pred_shape.end());
    std::vector<int64_t> tshape(target.shape().begin(), target.shape().end());
    if (!mplan::make_pw_target_layout(pshape, tshape, &layout)) {
      return mx::broadcast_to(target, pred_shape, s);
    }
  }
  return target;
}

mx::array make_forward(const mx::array& pred, const mx::array& target,
                       const PointwiseParams& params, mx::StreamOrDevice s) {
  // Element-wise: the loss in the predictions' dtype, written by the kernel (no
  // float32 array and cast). A fused sum stays a float32 scalar.
  bool reduced = params.reduce != Reduce::None;
  return mx::array(
      reduced ? mx::Shape{} : pred.shape(), reduced ? mx::float32 : pred.dtype(),
      std::make_shared<PointwiseLoss>(mx::to_stream(s), params),
      {dense(pred, s), dense(target, s)});
}

mx::array make_backward(const mx::array& pred, const mx::array& target, const mx::array& cotan,
                        const PointwiseParams& params, mx::StreamOrDevice s,
                        const std::optional<mx::array>& after = std::nullopt) {
  // The kernel reads an element-wise cotangent in the predictions' dtype or in
  // float32, as it comes (the loss's own dtype, normally: no cast); any other
  // dtype, and the scalar cotangent of a reduced loss, as float32.
  bool as_is = params.reduce == Reduce::None &&
      (cotan.dtype() == pred.dtype() || cotan.dtype() == mx::float32);
  auto g = as_is ? cotan : mx::astype(cotan, mx::float32, s);
  std::vector<mx::array> inputs = {dense(pred, s), dense(target, s), dense(g, s)};
  if (after) {
    inputs.push_back(*after);
  }
  return mx::array(
      pred.shape(), pred.dtype(), std::make_shared<PointwiseLossVJP>(mx::to_stream(s), params),
      std::move(inputs));
}

} // namespace

mx::array pointwise_loss(const mx::array& predictions, const mx::array& targets,
                         const PointwiseParams& params, mx::StreamOrDevice s) {
  // The cast touches the targets' own elements only; a target that
  // broadcasts is then read in place by the CPU and Metal kernels (no copy
  // of the predictions' size).
  auto t = mx::astype(targets, predictions.dtype(), s);
  return make_forward(predictions, target_for_kernels(t, predictions.shape(), s), params, s);
}

std::vector<mx::Shape> PointwiseLoss::output_shapes(const std::vector<mx::array>& inputs) {
  return {params_.reduce != Reduce::None ? mx::Shape{} : inputs[0].shape()};
}

std::vector<mx::Shape> PointwiseLossVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> PointwiseLoss::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  // A reduced forward is a scalar: cheap to make the backward wait for it
  // (see PointwiseLossVJP). An element-wise loss is not held that long.
  std::optional<mx::array> after;
  if (params_.reduce != Reduce::None) {
    after = outputs[0];
  }
  auto grad_pred = make_backward(primals[0], primals[1], cotangents[0], params_, s, after);
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == 0) {
      grads.push_back(grad_pred);
    } else if (params_.kind == PointwiseKind::SigmoidFocal) {
      throw std::invalid_argument(
          "sigmoid_focal_loss: gradients with respect to targets are not implemented");
    } else {
      // The regression losses depend on pred - target only; a broadcast
      // target collects the gradient of every element it was compared with.
      grads.push_back(sum_to_shape(mx::negative(grad_pred, s), primals[1].shape(), s));
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> PointwiseLoss::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  auto moved = vmap_to_front(inputs, axes, {true, false}, s);
  moved[1] = target_for_kernels(align_target(inputs[1], axes[1], moved[0].ndim(), s),
                                moved[0].shape(), s);
  if (params_.reduce == Reduce::None) {
    return {{make_forward(moved[0], moved[1], params_, s)}, {0}};
  }
  // A reduced loss under vmap is one reduction per batch entry: keep the
  // elements, then reduce everything but the batch axis.
  PointwiseParams elementwise = params_;
  elementwise.reduce = Reduce::None;
  // (float32, as the fused reduction; the mean of an entry with no elements
  // is 0, and its count is taken when the graph runs: see mean_factor.)
  auto loss = mx::astype(make_forward(moved[0], moved[1], elementwise, s), mx::float32, s);
  auto entry = axes_from(loss, 1);
  auto reduced = mx::sum(loss, entry, false, s);
  if (params_.reduce == Reduce::Mean) {
    reduced = mx::multiply(reduced, mean_factor(loss, entry, s), s);
  }
  return {{reduced}, {0}};
}

std::pair<std::vector<mx::array>, std::vector<int>> PointwiseLossVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto s = stream();
  // The ordering input (a 4th, if any) is left out: the batched backward is
  // a new graph.
  auto moved = vmap_to_front({inputs[0], inputs[1], inputs[2]}, {axes[0], axes[1], axes[2]},
                             {true, false, true}, s);
  moved[1] = target_for_kernels(align_target(inputs[1], axes[1], moved[0].ndim(), s),
                                moved[0].shape(), s);
  auto cotan = moved[2];
  PointwiseParams p = params_;
  if (p.reduce != Reduce::None) {
    // One scalar cotangent per batch entry: spread it over that entry (divided
    // by the entry's size for a mean).
    // (No size is frozen into the graph: the entry's count and shape are
    // those the graph runs at, for a shapeless compile.)
    auto entry = axes_from(moved[0], 1);
    cotan = mx::expand_dims(cotan, entry, s);
    if (p.reduce == Reduce::Mean) {
      cotan = mx::multiply(cotan, mean_factor(moved[0], entry, s), s);
    }
    cotan = mx::broadcast_arrays({cotan, moved[0]}, s)[0];
    p.reduce = Reduce::None;
  }
  return {{make_backward(moved[0], moved[1], cotan, p, s)}, {0}};
}

#ifndef _METAL_
FL_NO_METAL(PointwiseLoss)
FL_NO_METAL(PointwiseLossVJP)
#endif

} // namespace fl
