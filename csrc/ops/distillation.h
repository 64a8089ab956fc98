// Distillation divergences on logits (kl_div, jsd): a student's and a frozen
// teacher's logits in, one float32 loss per row out. Maths and gradient
// derivation: csrc/math/distillation.h.
#pragma once

#include <string>

#include "ops/common.h"

namespace fl {

struct DistillParams {
  int kind = 0; // flm::kDistillForwardKL / kDistillReverseKL / kDistillJSD
  float beta = 0.5f; // JSD only, 0 < beta < 1
  float inv_temperature = 1.0f;
  float d_scale = 1.0f; // (1 - alpha), times T^2 when asked
  float alpha = 0.0f; // weight of the hard-label cross-entropy
  bool has_targets = false; // class indices are the third input
  bool has_ignore_index = false;
  int64_t ignore_index = -100;

  bool operator==(const DistillParams&) const = default;
};

// kind: "kl" (KL(teacher || student)), "reverse_kl" (KL(student || teacher))
// or "jsd" (generalised JSD; beta 0 and 1 are "kl" and "reverse_kl"). Checks
// the options' values (also run by the Python wrappers before tracing).
// Returns the params the kernels take.
DistillParams distill_params(const std::string& kind, float beta, float temperature, float alpha,
                             bool scale_by_temperature_squared, bool has_targets,
                             std::optional<int64_t> ignore_index);

// Per-row float32 loss, shape: the logits' without the last (vocabulary)
// axis. student and teacher: same shape, float32/float16/bfloat16 each (they
// may differ). targets: integer class indices of the rows' shape, required
// for alpha > 0 and for ignore_index. The teacher gets no gradient (its
// cotangent is zeros, as mlx_lm's kl_div_loss): it is frozen.
mx::array distill_loss(const mx::array& student, const mx::array& teacher,
                       const std::optional<mx::array>& targets, const std::string& kind, float beta,
                       float temperature, float alpha, bool scale_by_temperature_squared,
                       std::optional<int64_t> ignore_index, mx::StreamOrDevice s = {});

// Forward. Inputs: student [..., V], teacher [..., V], optionally targets
// [...] int64. Outputs: loss [...] float32, stats [..., kDistillStats]
// float32 (flm::DistillStats per row: what the backward needs).
class Distill : public LossPrimitive<DistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedDistill")
  FL_VJP
};

// Backward w.r.t. the student. Inputs: student, teacher, [targets], stats,
// the loss's cotangent (float32 [...]). Output: gradient in the student's dtype.
class DistillVJP : public LossPrimitive<DistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedDistillVJP")
};

} // namespace fl
