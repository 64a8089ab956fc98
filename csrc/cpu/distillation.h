// The distillation row kernels of csrc/cpu/distillation.cpp, for the logits
// primitive (kl_div, jsd) and as the epilogue of the chunked-head driver
// (linear_distillation_loss: the rows are a chunk's float32 student and
// teacher logits). Formulas: math/distillation.h.
#pragma once

#include <cstdint>

#include "math/distillation.h"
#include "mlx/array.h"
#include "ops/distillation.h"

namespace fl::cpu {

// One call's rows: row r of the student / teacher logits at student + r V /
// teacher + r V (V = vocab), its class index at class_index[r] (null: no
// targets), its outputs at loss[r] and stats + r kDistillStats.
struct DistillRows {
  const void* student;
  const void* teacher;
  const int64_t* class_index;
  int64_t rows;
  int vocab;
  DistillParams params;
  flm::DistillCoefs coefs;
  bool ce_own_sum; // the CE's sum at temperature 1 kept apart (alpha > 0, T != 1)
  // forward outputs
  float* loss;
  float* stats;
  // backward: the saved stats, the per-row cotangent, the gradient (student's
  // dtype, [rows, V]; may be the student's own buffer: element i is written
  // after the row's last read of element i). kFused writes loss, stats and
  // grad (its cotangent is 1).
  const float* stats_in;
  const float* g_loss;
  void* grad;
  // kFused: the cotangent of every row (the logits primitive's row scale).
  float fused_g = 1.0f;
};

// The params' coefficients filled in; pointers left null.
DistillRows distill_rows(const DistillParams& p, int64_t rows, int vocab);

// What a row kernel computes:
//   kForward   loss and stats;
//   kBackward  the gradient from the saved stats and the per-row cotangent;
//   kFused     loss, stats and the gradient for a unit cotangent, in one visit
//              of the row (gradients in the forward: every transcendental of
//              an element computed once, for its term and its gradient).
enum class DistillPass { kForward, kBackward, kFused };

// The kernel over rows [begin, end) for the student's and the teacher's dtypes.
using DistillRowsFn = void (*)(const DistillRows&, int64_t, int64_t);
DistillRowsFn distill_rows_fn(mlx::core::Dtype student, mlx::core::Dtype teacher, int kind,
                              DistillPass pass);

} // namespace fl::cpu
