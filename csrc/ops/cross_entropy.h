// Fused (label-smoothed, class-weighted, z-loss) cross-entropy: the op and its
// two primitives. See csrc/math/cross_entropy.h for the formulas.
#pragma once

#include "ops/common.h"

namespace fl {

// Everything a cross-entropy kernel needs besides its arrays. Shared with the
// Metal host code, which passes it to the kernels as a constant buffer.
struct CrossEntropyParams {
  float label_smoothing = 0.0f;
  int smoothing_mode = 0; // flm::kSmoothUniform | flm::kSmoothOthers
  bool has_ignore_index = false;
  int64_t ignore_index = -100;
  float z_loss = 0.0f;
  bool soft_targets = false; // targets are probabilities of the logits' shape
  bool has_class_weights = false;
  float logit_softcap = 0.0f; // 0: no cap; else z = c tanh(x / c) (math/softcap.h)
  bool stats = false; // forward: also the row statistics (return_stats)

  bool operator==(const CrossEntropyParams&) const = default;
};

// Checks label_smoothing in [0, 1) and returns the smoothing mode
// (flm::kSmoothUniform for "uniform", flm::kSmoothOthers for "others"); shared
// with the linear cross-entropy.
int check_label_smoothing(float label_smoothing, const std::string& label_smoothing_mode);

// z_loss: a finite number >= 0; shared with the linear cross-entropy.
void check_z_loss(float z_loss);

// logit_softcap: None or a finite number > 0; shared with the linear
// cross-entropy.
void check_logit_softcap(std::optional<float> logit_softcap);

// The checks of cross_entropy's options that need no logits: label
// smoothing, z_loss, and class_weights' rank and dtype (their length is
// checked against the logits by the op). The op runs them first, and
// nn.CrossEntropyLoss at construction (bindings.cpp:
// check_cross_entropy_options), so both reject an option with one message.
// Returns the smoothing mode.
int check_cross_entropy_options(float label_smoothing, const std::string& label_smoothing_mode,
                                float z_loss, const std::optional<mx::array>& class_weights,
                                std::optional<float> logit_softcap = std::nullopt);

// Per-row cross-entropy and log-sum-exp (float32, shape = logits without
// `axis`; the lse is differentiable: the backward takes its cotangent, and is
// 0 on ignored rows). targets: integer class indices (logits' shape without
// `axis`) or probabilities (logits' shape). class_weights: shape [K].
// stats: four more outputs, the row statistics of return_stats, computed in
// the loss's pass and not differentiable: lse (float32, of every row, ignored
// ones too), entropy (float32), argmax (int64) and correct (bool), as
// CrossEntropy's outputs 4-7.
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
    bool stats = false,
    mx::StreamOrDevice s = {});

// Forward. Inputs: logits [..., K] (row-contiguous), targets [...] int64 or
// [..., K] in the logits' dtype, optionally class_weights [K] float32.
// Outputs (float32, shape [...]): loss, lse, lse_lo, a_sum (see
// math/cross_entropy.h; lse + lse_lo is the row's log-sum-exp to more than
// float32 precision, which keeps the gradient accurate at any logit offset).
// With params.stats, then (shape [...]) of the (capped) logits of every row:
// lse (float32), entropy of the softmax (float32; NaN for a row of -inf),
// argmax (int64: the first maximal logit, as mx.argmax) and correct (bool:
// the target's logit is the row's max; soft targets: the first most probable
// class's; false for ignored and out-of-range rows). Their cotangents are
// ignored.
class CrossEntropy : public LossPrimitive<CrossEntropyParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedCrossEntropy")
  FL_VJP
};

// Backward w.r.t. the logits. Inputs: the forward's inputs, then lse, lse_lo,
// a_sum, and the cotangents of loss and lse (float32, shape [...]).
// Output: the gradient [..., K] in the logits' dtype, written once.
class CrossEntropyVJP : public LossPrimitive<CrossEntropyParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedCrossEntropyVJP")
};

} // namespace fl
