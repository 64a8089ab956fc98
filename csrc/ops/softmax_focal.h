// Multi-class (softmax) focal loss, row-wise like cross-entropy; math in
// csrc/math/focal.h.
#pragma once

#include "ops/common.h"

namespace fl {

struct SoftmaxFocalParams {
  float gamma = 2.0f;
  float alpha = 1.0f; // scalar class-balance factor (when no per-class alpha)
  bool has_class_alpha = false; // a per-class alpha array is the third input
  bool has_ignore_index = false;
  int64_t ignore_index = -100;

  bool operator==(const SoftmaxFocalParams&) const = default;
};

// Per-row float32 loss (logits' shape without `axis`). `alpha` is either a
// scalar or an array of shape [K] (per class); neither means 1.
mx::array softmax_focal_loss(
    const mx::array& logits,
    const mx::array& targets,
    int axis,
    float gamma,
    std::optional<float> alpha,
    const std::optional<mx::array>& class_alpha,
    std::optional<int64_t> ignore_index,
    mx::StreamOrDevice s = {});

// Forward. Inputs: logits [..., K], class indices [...] int64, optionally
// alpha [K] float32. Outputs (float32, [...]): loss, lse, coef (alpha_t * C).
class SoftmaxFocal : public mx::Primitive {
 public:
  SoftmaxFocal(mx::Stream stream, SoftmaxFocalParams params)
      : mx::Primitive(stream), params_(params) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::vector<mx::array> vjp(
      const std::vector<mx::array>& primals,
      const std::vector<mx::array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "FusedSoftmaxFocal";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  const SoftmaxFocalParams& params() const {
    return params_;
  }

 private:
  SoftmaxFocalParams params_;
};

// Backward w.r.t. the logits. Inputs: logits, class indices, lse, coef, and
// the cotangent of the loss. Output: gradient in the logits' dtype.
class SoftmaxFocalVJP : public mx::Primitive {
 public:
  SoftmaxFocalVJP(mx::Stream stream, SoftmaxFocalParams params)
      : mx::Primitive(stream), params_(params) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;
  const char* name() const override {
    return "FusedSoftmaxFocalVJP";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  const SoftmaxFocalParams& params() const {
    return params_;
  }

 private:
  SoftmaxFocalParams params_;
};

} // namespace fl
