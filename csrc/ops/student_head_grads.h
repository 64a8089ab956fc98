// What the two fused linear distillation losses (ops/linear_distillation.cpp,
// ops/linear_topk_distillation.cpp) share on the graph side. Their only
// trainable inputs are the student head's hidden states and dense weight (the
// teacher, the top-k data and the targets are frozen or not differentiable),
// so their forward and backward primitives have the same outputs:
//   forward   per-row loss [...] and per-row statistics [..., kDistillStats]
//             (float32), saved for the backward;
//   backward  inputs: the forward's, then those statistics and the per-row
//             cotangent (float32 [...]); outputs: float32 dH and/or dW, as
//             the params' grad_hidden / grad_weight say, in that order.
// `Where` is the loss's input layout (s_hidden, s_weight, s_scales, s_biases,
// s_global), `Params` its parameters (grad_hidden, grad_weight, student).
#pragma once

#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "math/distillation.h"
#include "ops/common.h"

namespace fl::student_head {

// The forward's output shapes for a student hidden [..., H].
inline std::vector<mx::Shape> forward_shapes(const mx::array& hidden) {
  auto rows = row_shape(hidden);
  auto stats = rows;
  stats.push_back(flm::kDistillStats);
  return {rows, stats};
}

// The backward's output shapes: those of the gradients it forms.
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

// The forward primitive's vjp: the backward primitive for the student's
// hidden and weight (in their dtypes), zeros for every other input asked for.
// `loss` names the op in the errors.
template <class VJP, class Params, class Where>
std::vector<mx::array> vjp(const char* loss, const Params& params, const Where& at,
                           const std::vector<mx::array>& primals,
                           const std::vector<mx::array>& cotangents,
                           const std::vector<int>& argnums,
                           const std::vector<mx::array>& outputs, mx::StreamOrDevice s) {
  Params bp = params;
  for (int arg : argnums) {
    if (arg == at.s_hidden) {
      bp.grad_hidden = true;
    } else if (arg == at.s_weight) {
      if (params.student.quantized()) {
        throw std::invalid_argument(std::string(loss) +
                                    ": a quantized student_weight has no gradient (train an "
                                    "adapter, or pass the dense weight)");
      }
      bp.grad_weight = true;
    } else if (arg == at.s_scales || arg == at.s_biases || arg == at.s_global) {
      throw std::invalid_argument(std::string(loss) +
                                  ": gradients with respect to the student's quantization "
                                  "scales/biases are not implemented");
    }
  }
  std::optional<mx::array> gh, gw;
  if (bp.grad_hidden || bp.grad_weight) {
    std::vector<mx::array> in(primals.begin(), primals.end());
    in.push_back(outputs[1]);
    in.push_back(mx::astype(cotangents[0], mx::float32, s));
    auto g = make_backward<VJP>(in, bp, at, s);
    size_t k = 0;
    if (bp.grad_hidden) {
      gh = mx::astype(g[k++], primals[at.s_hidden].dtype(), s);
    }
    if (bp.grad_weight) {
      gw = mx::astype(g[k++], primals[at.s_weight].dtype(), s);
    }
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    if (arg == at.s_hidden) {
      grads.push_back(*gh);
    } else if (arg == at.s_weight) {
      grads.push_back(*gw);
    } else {
      // The teacher is frozen (stop_gradient semantics); its top-k data and
      // class indices are not differentiable.
      grads.push_back(mx::zeros_like(primals[arg], s));
    }
  }
  return grads;
}

} // namespace fl::student_head
