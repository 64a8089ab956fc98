// Fused linear distillation: a divergence (math/distillation.h: forward or
// reverse KL, generalised JSD, the hard-label CE mixed in) between a
// student's head, softmax(student_hidden @ student_weight.T / T), and a frozen
// teacher's, softmax(teacher_hidden @ teacher_weight.T / T), without either
// N x V logits matrix: the chunked-head driver (cpu/chunked_head.h) forms one
// chunk of rows of both heads' logits at a time, and the rows of the logits
// primitive (cpu/distillation.h) are its epilogue, unchanged.
//
// Contract.
//   student_hidden [..., Hs], teacher_hidden [..., Ht]: float32/float16/bfloat16,
//     the same leading shape (N rows), each its own hidden size and dtype;
//   student_weight [V, Hs], teacher_weight [V, Ht]: a dense float matrix, or a
//     quantized one as mx.quantize returns it (any mode, bits, group size;
//     scales, affine biases, nvfp4's global scale), the same V;
//   targets [...]: class indices, for ignore_index and alpha.
// Saved for the backward: the logits primitive's per-row stats (O(N)).
// Gradients (ops/student_head_grads.h): a loss summed over rows forms them in
// the forward, each chunk's logits of both heads computed once (dZ in place
// by cpu/distillation.h's fused rows, for a unit cotangent); otherwise the
// backward recomputes each chunk's logits of both heads and forms dZ in place
// from the saved stats (cpu/distillation.h's backward rows). Either way the
// driver turns dZ into d student_hidden = dZ W_s and d student_weight =
// dZ^T H_s (float32 accumulation). The teacher gets no gradient (zeros); a
// quantized student weight has none either (asking for it raises).
#pragma once

#include "ops/common.h"
#include "ops/distillation.h"
#include "ops/linear_cross_entropy.h"
#include "ops/student_head_grads.h"

namespace fl {

// The quantization of one head (bits 0: a dense float weight).
struct HeadQuant {
  int bits = 0;
  int group_size = 0;
  int mode = 0; // flm::kQuant*
  bool has_global_scale = false;

  bool quantized() const {
    return bits != 0;
  }
  bool affine() const {
    return quantized() && mode == 0;
  }
  bool operator==(const HeadQuant&) const = default;
};

struct LinearDistillParams {
  DistillParams d;
  HeadQuant student;
  HeadQuant teacher;
  int64_t chunk_bytes = kLceDefaultChunkBytes;
  bool sum_rows = false; // the loss output is the float32 sum over rows (a scalar)
  // Forward: the gradients declared (student hidden, student weight; unit
  // cotangent of the summed loss); backward: those asked for.
  bool grad_hidden = false;
  bool grad_weight = false;

  bool operator==(const LinearDistillParams&) const = default;
};

// One head as the op takes it.
struct HeadArgs {
  mx::array hidden;
  mx::array weight;
  std::optional<mx::array> scales;
  std::optional<mx::array> biases;
  int group_size = 64;
  int bits = 4;
  std::string mode = "affine";
  std::optional<mx::array> global_scale;
};

// Checks one head (`who`: "student" / "teacher", naming the arguments in
// messages) and appends hidden, weight and, when quantized, scales and biases
// (or the nvfp4 global scale) to `inputs`; returns its quantization.
HeadQuant check_head(const HeadArgs& h, const char* who, std::vector<mx::array>& inputs,
                     mx::StreamOrDevice s);

// Where each input sits in the primitives' input lists (-1: absent).
struct LdInputs {
  int s_hidden = 0, s_weight = 1, s_scales = -1, s_biases = -1, s_global = -1;
  int t_hidden = 2, t_weight = 3, t_scales = -1, t_biases = -1, t_global = -1;
  int targets = -1;
  int count = 4; // the forward's inputs; the backward appends stats, g
};
LdInputs ld_inputs(const LinearDistillParams& p);

// The float32 loss: per row (the hiddens' leading shape), or its sum over
// rows (a scalar) with `sum_rows`, whose gradients the forward forms when
// `fuse_grads` (ops/student_head_grads.h; false: always the backward).
mx::array linear_distill_loss(const HeadArgs& student, const HeadArgs& teacher,
                              const std::optional<mx::array>& targets, const std::string& kind,
                              float beta, float temperature, float alpha,
                              bool scale_by_temperature_squared,
                              std::optional<int64_t> ignore_index,
                              std::optional<int64_t> chunk_bytes, bool sum_rows = false,
                              bool fuse_grads = true, mx::StreamOrDevice s = {});

// Forward: outputs loss ([rows], or [] with sum_rows), stats [rows,
// kDistillStats], then the declared gradients (float32; student_head_grads.h).
class LinearDistill : public LossPrimitive<LinearDistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearDistill")
  FL_VJP
  FL_STUDENT_HEAD_FORWARD(LinearDistill)
};

// Backward: inputs the forward's, stats, g (float32 [rows]); outputs float32
// d student_hidden [..., Hs] and/or d student_weight [V, Hs] (those asked for).
class LinearDistillVJP : public LossPrimitive<LinearDistillParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearDistillVJP")
};

} // namespace fl
