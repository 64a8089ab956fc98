// Per-row statistics of logits (the scorer's primitive): lse, target logit,
// logit sum, expected logit E_p[z], max and argmax of each row of
// z = softcap(y) / temperature, where y is either given (RowStats: logits) or
// y = hidden @ weight.T + bias of a linear head that never exists as N x V
// (LinearRowStats: the chunked-head driver, cpu/chunked_head.h, with this
// epilogue; on Metal the linear CE's tiles with its epilogue kernels,
// csrc/metal/row_stats.cpp; the logits form: metal/row_stats.metal).
// Formulas and gradients: math/row_stats.h. Both forms run where the caller
// says (CPU or Metal, every statistic).
//
// Contract (the private hooks _ext.linear_row_stats / _ext.row_stats, for the
// public scorer and the other head losses).
//   hidden  [..., H] float32/float16/bfloat16 (N rows), or logits [..., V]
//   weight  [V, H] float, or a quantized head exactly as linear_cross_entropy
//           takes it (w_q, scales, biases, group_size, bits, mode,
//           global_scale); no gradient for a quantized head
//   targets [...] integer class indices, global: class j of this head is
//           vocab_start + j. Needed only for the "target" statistic.
//   bias    [V] optional (linear form)
//   stats   which of "lse", "target", "logit_sum", "expected", "max",
//           "argmax" to compute; only those are outputs and only their work is
//           done (no exp pass without "lse"/"expected"). "expected" computes
//           the lse too (it needs it). lse and expected are float32 pairs
//           (math/row_stats.h): "lse_lo" / "expected_lo" also return their
//           low halves (constants), so that target - lse and lse - expected
//           can be formed to float32 accuracy when the logits are large:
//           log p = (target - lse) - lse_lo,
//           entropy = (lse - expected) + (lse_lo - expected_lo).
//   options temperature > 0, logit_softcap (> 0 or none), ignore_index
//           (target 0 on those rows), vocab_start (none: this head is the whole
//           vocabulary and a target outside [0, V) gives a NaN target; an int:
//           this head is the shard [vocab_start, vocab_start + V) of a larger
//           vocabulary and a target outside it is another shard's: target 0,
//           no gradient), chunk_bytes (linear: working memory per chunk).
// Outputs, float32 [...] (the targets' shape; argmax int64): the requested
// statistics. lse, target, logit_sum and expected are differentiable, each
// with its own per-row cotangent (hidden, weight, bias for the linear form,
// logits for the other); max and argmax (the global index of the first
// maximum) are constants.
// Saved for the backward: the lse and expected pairs (each lo half an extra
// output after its statistic). The backward recomputes each chunk's logits
// (linear) and forms dZ from those and the cotangents: never an N x V array
// beyond the logits form's own input and gradient.
// Rejected before any kernel (ValueError/TypeError naming the argument):
// temperature <= 0 or not finite, logit_softcap <= 0, unknown or no
// statistics, shapes and dtypes as linear_cross_entropy / cross_entropy,
// chunk_bytes < 1.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "ops/common.h"
#include "ops/linear_cross_entropy.h"

namespace fl {

struct RowStatsParams {
  // The head (linear form): format, bias, soft-cap, ignore_index, chunk_bytes
  // and, for the backward, which gradients (grad_hidden, grad_weight,
  // grad_bias). The logits form uses logit_softcap and ignore_index only. The
  // cross-entropy fields (smoothing, z_loss, sum_rows) stay 0.
  LinearCrossEntropyParams head;
  float temperature = 1.0f;
  bool sharded = false; // vocab_start given: targets outside the head are another shard's
  int64_t vocab_start = 0;
  bool has_targets = false;
  int stats = 0; // forward: the flm::RowStat bits computed (= outputs)
  int cotangents = 0; // backward: the differentiable stats whose cotangents are inputs
  bool operator==(const RowStatsParams&) const = default;
};

// The statistics by name, in output order (lse_lo follows lse, expected_lo
// expected).
int row_stat_bit(const std::string& name);
// Index of statistic `bit` among the forward's outputs (-1: not computed);
// a pair's lo half is at row_stat_output(stats, bit) + 1.
int row_stat_output(int stats, int bit);

// Input positions. Linear form: hidden, weight, [scales, [qbiases],
// [global_scale]], [targets], [bias]; logits form: logits, [targets]. The
// backward appends [lse, lse_lo] (when the cotangents include lse or
// expected), [expected, expected_lo] (when they include expected), then one float32 [...]
// cotangent per bit of `cotangents`, in bit order.
LceInputs linear_row_stats_inputs(const RowStatsParams& p);

// Checks shared by both forms (and by Module-like callers): raises
// ValueError naming the argument.
void check_row_stats_options(float temperature, std::optional<float> logit_softcap,
                             std::optional<int64_t> chunk_bytes);

// The ops. Return the requested statistics, in the order of `stats` as given
// (names from row_stat_bit).
std::vector<mx::array> linear_row_stats(
    const mx::array& hidden,
    const mx::array& weight,
    const std::optional<mx::array>& targets,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<mx::array>& global_scale,
    const std::vector<std::string>& stats,
    float temperature,
    std::optional<float> logit_softcap,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> vocab_start,
    std::optional<int64_t> chunk_bytes,
    mx::StreamOrDevice s = {});

std::vector<mx::array> row_stats(
    const mx::array& logits,
    const std::optional<mx::array>& targets,
    const std::vector<std::string>& stats,
    float temperature,
    std::optional<float> logit_softcap,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> vocab_start,
    mx::StreamOrDevice s = {});

// Forward of the linear form. Outputs: the computed statistics (row_stat_output).
class LinearRowStats : public LossPrimitive<RowStatsParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearRowStats")
  FL_VJP
};

// Backward of the linear form: dH, dW, dbias (float32), those flagged in
// params().head, in that order.
class LinearRowStatsVJP : public LossPrimitive<RowStatsParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearRowStatsVJP")
};

// Forward of the logits form.
class RowStats : public LossPrimitive<RowStatsParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedRowStats")
  FL_VJP
};

// Backward of the logits form: dlogits in the logits' dtype.
class RowStatsVJP : public LossPrimitive<RowStatsParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedRowStatsVJP")
};

} // namespace fl
