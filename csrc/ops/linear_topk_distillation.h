// Fused linear distillation from an offline teacher: per row the teacher's
// top-k classes and their log-probabilities (ids [..., k], values [..., k], as
// a data set stores them) against the student's full softmax of
// student_hidden @ student_weight.T / T, without the student's N x V logits
// (the chunked-head driver, one head). Loss, forward KL over the teacher's
// top-k, and gradient: math/distillation.h ("an offline teacher"); with
// `alpha`, the hard-label CE mixed in as for the other distillation losses.
// An id outside [0, V) makes its row NaN. Gradients: student_hidden and a
// dense student_weight; the ids, values and targets get none (zeros). A loss
// summed over rows forms them in the forward (ops/student_head_grads.h).
#pragma once

#include "ops/linear_distillation.h"

namespace fl {

struct LinearTopkParams {
  DistillParams d; // kind unused (forward KL); d_scale, alpha, c, targets, ignore_index
  bool renormalize = false;
  HeadQuant student;
  int64_t chunk_bytes = kLceDefaultChunkBytes;
  bool sum_rows = false; // the loss output is the float32 sum over rows (a scalar)
  // Forward: the gradients declared; backward: those asked for
  // (ops/student_head_grads.h).
  bool grad_hidden = false;
  bool grad_weight = false;

  bool operator==(const LinearTopkParams&) const = default;
};

// Inputs: the student's head (check_head's order), ids int64 [..., k],
// values float32 [..., k], [targets int64 [...]].
struct LtInputs {
  int s_hidden = 0, s_weight = 1, s_scales = -1, s_biases = -1, s_global = -1;
  int ids = 2, values = 3, targets = -1;
  int count = 4;
};
LtInputs lt_inputs(const LinearTopkParams& p);

mx::array linear_topk_distill_loss(const HeadArgs& student, const mx::array& teacher_ids,
                                   const mx::array& teacher_logprobs,
                                   const std::optional<mx::array>& targets, float temperature,
                                   bool renormalize, float alpha, bool scale_by_temperature_squared,
                                   std::optional<int64_t> ignore_index,
                                   std::optional<int64_t> chunk_bytes, bool sum_rows = false,
                                   bool fuse_grads = true, mx::StreamOrDevice s = {});

// Forward: loss ([rows], or [] with sum_rows), stats [rows, kDistillStats],
// then the declared gradients (float32; ops/student_head_grads.h).
class LinearTopkDistill : public LossPrimitive<LinearTopkParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearTopkDistill")
  FL_VJP
  FL_STUDENT_HEAD_FORWARD(LinearTopkDistill)
};

// Backward: the forward's inputs, stats, g; float32 d student_hidden and/or
// d student_weight.
class LinearTopkDistillVJP : public LossPrimitive<LinearTopkParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearTopkDistillVJP")
};

} // namespace fl
