// What the two fused linear distillation losses (ops/linear_distillation.cpp,
// ops/linear_topk_distillation.cpp) share on the graph side. Their only
// trainable inputs are the student head's hidden states and dense weight (the
// teacher, the top-k data and the targets are frozen or not differentiable),
// so their forward and backward primitives have the same outputs:
//   forward   the loss: per row [...], or its float32 sum over rows [] when
//             the params' sum_rows says so; per-row statistics
//             [..., kDistillStats] (float32), saved for the backward; then,
//             declared when the op saw the input traced (grad_hidden /
//             grad_weight, sum_rows only), d student_hidden [..., H] and
//             d student_weight [V, H] of the summed loss (float32, unit
//             cotangent): "gradients in the forward";
//   backward  inputs: the forward's, then those statistics and the per-row
//             cotangent (float32 [...]); outputs: float32 dH and/or dW, as
//             the params' grad_hidden / grad_weight say, in that order.
// Gradients in the forward (as the linear CE's, ops/linear_cross_entropy.h):
// a loss summed over rows has one cotangent g for every row, so its gradients
// are g times those of a unit cotangent, which the forward can form while it
// has each chunk's logits (both heads' GEMMs once, dZ in place, then dH / dW:
// no second pass recomputing the logits). The vjp, called on a forward not
// yet evaluated (value_and_grad builds the whole graph first), marks which
// declared gradients to form (`requested`) and returns g times them
// (LceScaleGrad); a declared gradient nobody requested is never computed nor
// allocated. Per-row cotangents (reduction "none", per-row weights) or a
// forward already evaluated take the backward primitive, which recomputes
// each chunk's logits from the saved statistics.
// `Where` is the loss's input layout (s_hidden, s_weight, s_scales, s_biases,
// s_global), `Params` its parameters (sum_rows, grad_hidden, grad_weight,
// student).
#pragma once

#include <array>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "math/distillation.h"
#include "ops/common.h"
#include "ops/linear_cross_entropy.h"

// The forward primitive's mark of the declared gradients a vjp asked for
// (hidden, weight), and mx.compile's equality: equal parameters and the same
// requested gradients (a forward asked for dH only must not stand in for one
// asked for dW, whose output it never allocates).
#define FL_STUDENT_HEAD_FORWARD(CLASS)                                          \
  std::array<bool, 2> requested{};                                              \
  bool is_equivalent(const mx::Primitive& other) const override {               \
    auto* same = dynamic_cast<const CLASS*>(&other);                            \
    return same && LossPrimitive::is_equivalent(other) && requested == same->requested; \
  }

namespace fl::student_head {

// The number of outputs before the declared gradients: loss, stats.
constexpr int kForwardStats = 2;

// The shapes of the gradients flagged in p (grad_hidden, grad_weight).
template <class Params, class Where>
std::vector<mx::Shape> grad_shapes(const std::vector<mx::array>& inputs, const Params& p,
                                   const Where& at) {
  std::vector<mx::Shape> out;
  if (p.grad_hidden) {
    out.push_back(inputs[at.s_hidden].shape());
  }
  if (p.grad_weight) {
    out.push_back(inputs[at.s_weight].shape());
  }
  return out;
}

// The forward's output shapes: loss, stats, then the declared gradients.
template <class Params, class Where>
std::vector<mx::Shape> forward_shapes(const std::vector<mx::array>& inputs, const Params& p,
                                      const Where& at) {
  auto rows = row_shape(inputs[at.s_hidden]);
  auto stats = rows;
  stats.push_back(flm::kDistillStats);
  std::vector<mx::Shape> out = {p.sum_rows ? mx::Shape{} : rows, stats};
  for (auto& g : grad_shapes(inputs, p, at)) {
    out.push_back(g);
  }
  return out;
}

// Declares the gradients the forward may form: those of the traced student
// hidden / dense weight, only for a loss summed over rows (`fuse`: the op's
// choice; false: always the backward primitive).
template <class Params>
void declare_grads(Params& p, const mx::array& hidden, const mx::array& weight, bool fuse) {
  p.grad_hidden = fuse && p.sum_rows && hidden.is_tracer();
  p.grad_weight = fuse && p.sum_rows && !p.student.quantized() && weight.is_tracer();
}

// The forward primitive Fwd on `inputs` (row-contiguous where its kernels
// read them in place: the op passes them so), all outputs float32.
template <class Fwd, class Params, class Where>
std::vector<mx::array> make_forward(const std::vector<mx::array>& inputs, const Params& p,
                                    const Where& at, std::array<bool, 2> requested,
                                    mx::StreamOrDevice s) {
  auto shapes = forward_shapes(inputs, p, at);
  auto primitive = std::make_shared<Fwd>(mx::to_stream(s), p);
  primitive->requested = requested;
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes, primitive, inputs);
}

// The backward primitive VJP on `inputs` (made row-contiguous: its kernels
// read them in place).
template <class VJP, class Params, class Where>
std::vector<mx::array> make_backward(const std::vector<mx::array>& inputs, const Params& p,
                                     const Where& at, mx::StreamOrDevice s) {
  auto shapes = grad_shapes(inputs, p, at);
  std::vector<mx::array> dense_in;
  for (const auto& x : inputs) {
    dense_in.push_back(dense(x, s));
  }
  return mx::array::make_arrays(shapes, std::vector<mx::Dtype>(shapes.size(), mx::float32),
                                std::make_shared<VJP>(mx::to_stream(s), p), dense_in);
}

// The forward primitive's vjp (`fwd`: the forward primitive, whose
// `requested` it marks): the declared gradients times the cotangent where the
// forward can still form them, else the backward primitive, for the student's
// hidden and weight (in their dtypes); zeros for every other input asked for.
// `loss` names the op in the errors.
template <class VJP, class Fwd, class Params, class Where>
std::vector<mx::array> vjp(const char* loss, Fwd& fwd, const Params& params, const Where& at,
                           const std::vector<mx::array>& primals,
                           const std::vector<mx::array>& cotangents,
                           const std::vector<int>& argnums,
                           const std::vector<mx::array>& outputs, mx::StreamOrDevice s) {
  const auto g = mx::astype(cotangents[0], mx::float32, s);
  // Declared and not yet evaluated: the forward forms it (for g = 1).
  const bool unevaluated = outputs[0].status() == mx::array::Status::unscheduled;
  const bool fused[2] = {unevaluated && params.grad_hidden, unevaluated && params.grad_weight};
  Params missing = params; // what the backward primitive forms
  missing.grad_hidden = missing.grad_weight = false;
  for (int arg : argnums) {
    if (arg == at.s_hidden) {
      missing.grad_hidden = !fused[0];
      fwd.requested[0] = fwd.requested[0] || fused[0];
    } else if (arg == at.s_weight) {
      if (params.student.quantized()) {
        throw std::invalid_argument(std::string(loss) +
                                    ": a quantized student_weight has no gradient (train an "
                                    "adapter, or pass the dense weight)");
      }
      missing.grad_weight = !fused[1];
      fwd.requested[1] = fwd.requested[1] || fused[1];
    } else if (arg == at.s_scales || arg == at.s_biases || arg == at.s_global) {
      throw std::invalid_argument(std::string(loss) +
                                  ": gradients with respect to the student's quantization "
                                  "scales/biases are not implemented");
    }
  }
  std::vector<mx::array> recomputed;
  if (missing.grad_hidden || missing.grad_weight) {
    std::vector<mx::array> in(primals.begin(), primals.end());
    in.push_back(outputs[1]);
    auto rows = row_shape(primals[at.s_hidden]);
    in.push_back(params.sum_rows ? mx::broadcast_to(g, rows, s) : g);
    recomputed = make_backward<VJP>(in, missing, at, s);
  }
  // g times a declared gradient (output kForwardStats + its position).
  auto scaled = [&](int which, int arg) {
    const auto& unit = outputs[kForwardStats + (which == 1 && params.grad_hidden ? 1 : 0)];
    auto dtype = primals[arg].dtype();
    return mx::array(unit.shape(), dtype, std::make_shared<LceScaleGrad>(mx::to_stream(s), dtype),
                     {mx::reshape(g, {}, s), unit});
  };
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == at.s_hidden) {
      grads.push_back(fused[0] ? scaled(0, arg)
                               : mx::astype(recomputed[0], primals[arg].dtype(), s));
    } else if (arg == at.s_weight) {
      grads.push_back(fused[1] ? scaled(1, arg)
                               : mx::astype(recomputed[missing.grad_hidden ? 1 : 0],
                                            primals[arg].dtype(), s));
    } else {
      // The teacher is frozen (stop_gradient semantics); its top-k data and
      // class indices are not differentiable.
      grads.push_back(mx::zeros_like(primals[arg], s));
    }
  }
  return grads;
}

} // namespace fl::student_head
