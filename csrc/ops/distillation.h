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
  // The logits primitive only (CPU stream, float32 student; the linear forms
  // and the Metal kernels leave them false): the loss output is row_scale
  // times the float32 sum over rows (a scalar; row_scale an input when
  // has_scale, else 1), and, declared when the student is traced, its
  // gradient for a unit cotangent is a third output (gradients in the
  // forward, as the linear CE's).
  bool sum_rows = false;
  bool has_scale = false;
  bool grad_student = false;

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
// sum_rows: the float32 scalar row_scale * sum over rows instead (row_scale:
// a float32 scalar, e.g. a mean's 1 / count; none: 1). On the CPU stream with
// a float32 student the primitive sums the rows and, under a gradient
// transform, forms the student's gradient in its one visit of each row
// (fuse_grads; the vjp scales it by the cotangent, a no-op copy-free pass
// when that is 1); elsewhere the per-row primitive and accurate_sum.
mx::array distill_loss(const mx::array& student, const mx::array& teacher,
                       const std::optional<mx::array>& targets, const std::string& kind, float beta,
                       float temperature, float alpha, bool scale_by_temperature_squared,
                       std::optional<int64_t> ignore_index, bool sum_rows = false,
                       const std::optional<mx::array>& row_scale = std::nullopt,
                       bool fuse_grads = true, mx::StreamOrDevice s = {});

// Forward. Inputs: student [..., V], teacher [..., V], optionally targets
// [...] int64, optionally (has_scale) row_scale float32 []. Outputs: loss
// [...] (or [] with sum_rows) float32, stats [..., kDistillStats] float32
// (flm::DistillStats per row: what the backward needs), and when declared
// (grad_student) the student's gradient of the loss for a unit cotangent,
// float32 [..., V], computed only where a vjp requested it.
class Distill : public LossPrimitive<DistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedDistill")
  FL_VJP
  // Set by vjp on a not yet evaluated forward; part of the equivalence (a
  // forward asked for its gradient must not be merged with one that was not).
  bool requested = false;
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const Distill*>(&other);
    return same && LossPrimitive::is_equivalent(other) && requested == same->requested;
  }
};

// Backward w.r.t. the student. Inputs: student, teacher, [targets], stats,
// the loss's cotangent (float32 [...]). Output: gradient in the student's dtype.
class DistillVJP : public LossPrimitive<DistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedDistillVJP")
};

} // namespace fl
