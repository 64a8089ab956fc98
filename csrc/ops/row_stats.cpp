#include "ops/row_stats.h"

#include <cmath>

#include "math/row_stats.h"
#include "ops/cross_entropy.h"
#include "ops/vmap_slices.h"

namespace fl {

namespace {

constexpr const char* kStatNames[] = {"lse", "target", "logit_sum", "expected", "max", "argmax"};

// Bits in output order.
constexpr int kStatBits[] = {flm::kStatLse,      flm::kStatTarget, flm::kStatLogitSum,
                             flm::kStatExpected, flm::kStatMax,    flm::kStatArgmax};

// "lse_lo" / "expected_lo" name the low halves of the pairs: the statistic
// whose half they are.
std::string lo_of(const std::string& name) {
  if (name == "lse_lo") return "lse";
  if (name == "expected_lo") return "expected";
  return name;
}

// A statistic kept as a float32 pair: two outputs (hi, lo).
bool is_pair(int bit) {
  return bit == flm::kStatLse || bit == flm::kStatExpected;
}

int parse_stats(const std::vector<std::string>& names) {
  if (names.empty()) {
    fail_value("stats must name at least one of 'lse', 'target', 'logit_sum', 'expected', 'max', "
               "'argmax'");
  }
  int stats = 0;
  for (const auto& name : names) {
    int bit = row_stat_bit(lo_of(name));
    if ((stats & bit) && lo_of(name) == name) {
      fail_value("stats names '", name, "' twice");
    }
    stats |= bit;
  }
  return stats;
}

// What the forward computes for the requested statistics: expected needs the lse.
int computed_stats(int stats) {
  return (stats & flm::kStatExpected) ? stats | flm::kStatLse : stats;
}

std::vector<mx::Shape> stats_shapes(const mx::Shape& rows, int stats) {
  std::vector<mx::Shape> shapes;
  for (int bit : kStatBits) {
    if (stats & bit) {
      shapes.push_back(rows);
      if (is_pair(bit)) shapes.push_back(rows); // its lo half
    }
  }
  return shapes;
}

std::vector<mx::Dtype> stats_dtypes(int stats) {
  std::vector<mx::Dtype> dtypes;
  for (int bit : kStatBits) {
    if (stats & bit) {
      dtypes.push_back(bit == flm::kStatArgmax ? mx::int64 : mx::float32);
      if (is_pair(bit)) dtypes.push_back(mx::float32); // its lo half
    }
  }
  return dtypes;
}

std::vector<mx::array> dense_all(const std::vector<mx::array>& inputs, mx::StreamOrDevice s) {
  std::vector<mx::array> out;
  for (const auto& in : inputs) {
    out.push_back(dense(in, s));
  }
  return out;
}

template <typename Prim>
std::vector<mx::array> make_forward(const std::vector<mx::array>& inputs, const RowStatsParams& p,
                                    mx::StreamOrDevice s) {
  auto in = dense_all(inputs, s);
  auto rows = row_shape(in[0]);
  return mx::array::make_arrays(stats_shapes(rows, p.stats), stats_dtypes(p.stats),
                                std::make_shared<Prim>(mx::to_stream(s), p), in);
}

std::vector<mx::Shape> linear_grad_shapes(const std::vector<mx::array>& inputs, const RowStatsParams& p) {
  auto L = linear_row_stats_inputs(p);
  const auto& hidden = inputs[L.hidden];
  int vocab = inputs[L.weight].shape(0);
  std::vector<mx::Shape> shapes;
  if (p.head.grad_hidden) shapes.push_back(hidden.shape());
  if (p.head.grad_weight) shapes.push_back({vocab, hidden.shape(-1)});
  if (p.head.grad_bias) shapes.push_back({vocab});
  return shapes;
}

std::vector<mx::array> make_linear_backward(const std::vector<mx::array>& inputs, const RowStatsParams& p,
                                            mx::StreamOrDevice s) {
  auto in = dense_all(inputs, s);
  auto shapes = linear_grad_shapes(in, p);
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes,
                                std::make_shared<LinearRowStatsVJP>(mx::to_stream(s), p), in);
}

std::vector<mx::array> make_logits_backward(const std::vector<mx::array>& inputs, const RowStatsParams& p,
                                            mx::StreamOrDevice s) {
  auto in = dense_all(inputs, s);
  return {mx::array(in[0].shape(), in[0].dtype(), std::make_shared<RowStatsVJP>(mx::to_stream(s), p), in)};
}

// The backward's extra inputs after the forward's: the saved statistics it
// needs and one float32 cotangent per differentiable statistic computed.
void append_backward_inputs(std::vector<mx::array>& inputs, int stats, int cot_bits,
                            const std::vector<mx::array>& cotangents, const std::vector<mx::array>& outputs,
                            mx::StreamOrDevice s) {
  if (cot_bits & (flm::kStatLse | flm::kStatExpected)) {
    int k = row_stat_output(stats, flm::kStatLse);
    inputs.push_back(outputs[k]);
    inputs.push_back(outputs[k + 1]);
  }
  if (cot_bits & flm::kStatExpected) {
    int k = row_stat_output(stats, flm::kStatExpected);
    inputs.push_back(outputs[k]);
    inputs.push_back(outputs[k + 1]);
  }
  for (int bit : kStatBits) {
    if (cot_bits & bit) {
      inputs.push_back(mx::astype(cotangents[row_stat_output(stats, bit)], mx::float32, s));
    }
  }
}

// The differentiable statistics computed whose cotangent can be nonzero: a
// known zero (the cotangent mx.vjp gives an unused output, ops/common.h
// is_known_zero) adds nothing, so its term, and the saved pair only it needs,
// are left out of the backward.
int live_cotangents(int stats, const std::vector<mx::array>& cotangents) {
  int bits = 0;
  for (int bit : kStatBits) {
    if ((bit & flm::kStatDifferentiable) && (stats & bit) &&
        !is_known_zero(cotangents[row_stat_output(stats, bit)])) {
      bits |= bit;
    }
  }
  return bits;
}

// The requested statistics in the caller's order, from the forward's outputs.
std::vector<mx::array> in_request_order(const std::vector<mx::array>& outputs, int stats,
                                        const std::vector<std::string>& names) {
  std::vector<mx::array> out;
  for (const auto& name : names) {
    const std::string base = lo_of(name);
    out.push_back(outputs[row_stat_output(stats, row_stat_bit(base)) + (base != name ? 1 : 0)]);
  }
  return out;
}

void set_common(RowStatsParams& p, int stats, float temperature, std::optional<float> logit_softcap,
                std::optional<int64_t> ignore_index, std::optional<int64_t> vocab_start) {
  p.stats = computed_stats(stats);
  p.temperature = temperature;
  if (logit_softcap) {
    p.head.logit_softcap = *logit_softcap;
  }
  if (ignore_index) {
    p.head.has_ignore_index = true;
    p.head.ignore_index = *ignore_index;
  }
  if (vocab_start) {
    if (*vocab_start < 0) {
      fail_value("vocab_start must be >= 0 (the global index of this head's first class), got ", *vocab_start);
    }
    p.sharded = true;
    p.vocab_start = *vocab_start;
  }
}

const std::optional<mx::array>& targets_if_needed(const std::optional<mx::array>& targets, int stats) {
  static const std::optional<mx::array> none;
  if ((stats & flm::kStatTarget) && !targets) {
    fail_value("targets are required for the 'target' statistic");
  }
  return (stats & flm::kStatTarget) ? targets : none;
}

} // namespace

int row_stat_bit(const std::string& name) {
  for (int i = 0; i < 6; ++i) {
    if (name == kStatNames[i]) return kStatBits[i];
  }
  fail_value("stats: unknown statistic '", name, "'; expected 'lse', 'target', 'logit_sum', 'expected', "
             "'max', 'argmax', 'lse_lo' or 'expected_lo'");
}

int row_stat_output(int stats, int bit) {
  if (!(stats & bit)) return -1;
  int k = 0;
  for (int b : kStatBits) {
    if (b == bit) return k;
    if (stats & b) k += is_pair(b) ? 2 : 1;
  }
  return -1;
}

LceInputs linear_row_stats_inputs(const RowStatsParams& p) {
  LceInputs in = lce_inputs(p.head);
  int next = in.targets; // lce_inputs puts the targets right after the head
  in.targets = p.has_targets ? next++ : -1;
  in.bias = p.head.has_bias ? next++ : -1;
  in.count = next;
  return in;
}

void check_row_stats_options(float temperature, std::optional<float> logit_softcap,
                             std::optional<int64_t> chunk_bytes) {
  if (!(temperature > 0.0f) || !std::isfinite(temperature)) {
    fail_value("temperature must be a finite number > 0, got ", temperature);
  }
  check_logit_softcap(logit_softcap);
  if (chunk_bytes && *chunk_bytes <= 0) {
    fail_value("chunk_bytes must be > 0 (or None for the default), got ", *chunk_bytes);
  }
}

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
    mx::StreamOrDevice s) {
  check_row_stats_options(temperature, logit_softcap, chunk_bytes);
  const int asked = parse_stats(stats);
  RowStatsParams p;
  const auto& t = targets_if_needed(targets, asked);
  auto head = check_linear_head(hidden, weight, t, bias, scales, qbiases, group_size, bits, mode, global_scale,
                                p.head, s);
  set_common(p, asked, temperature, logit_softcap, t ? ignore_index_for(*t, ignore_index) : std::nullopt,
             vocab_start);
  if (chunk_bytes) {
    p.head.chunk_bytes = *chunk_bytes;
  }
  std::vector<mx::array> inputs = head.head;
  if (head.targets) {
    p.has_targets = true;
    inputs.push_back(*head.targets);
  }
  if (head.bias) {
    inputs.push_back(*head.bias);
  }
  return in_request_order(make_forward<LinearRowStats>(inputs, p, s), p.stats, stats);
}

std::vector<mx::array> row_stats(
    const mx::array& logits,
    const std::optional<mx::array>& targets,
    const std::vector<std::string>& stats,
    float temperature,
    std::optional<float> logit_softcap,
    std::optional<int64_t> ignore_index,
    std::optional<int64_t> vocab_start,
    mx::StreamOrDevice s) {
  check_row_stats_options(temperature, logit_softcap, std::nullopt);
  const int asked = parse_stats(stats);
  check_float_input(logits, "logits");
  if (logits.ndim() == 0 || logits.shape(-1) == 0) {
    fail_value("logits must have a class axis [..., V] with V >= 1, got shape ", shape_str(logits.shape()));
  }
  RowStatsParams p;
  const auto& t = targets_if_needed(targets, asked);
  std::vector<mx::array> inputs = {logits};
  if (t) {
    auto rows = row_shape(logits);
    if (t->shape() != rows) {
      fail_value("targets must have shape ", shape_str(rows), " (logits ", shape_str(logits.shape()),
                 " without its last axis), got ", shape_str(t->shape()), squeeze_hint(t->shape(), rows));
    }
    inputs.push_back(class_indices(*t, "targets", s));
    p.has_targets = true;
  }
  set_common(p, asked, temperature, logit_softcap, t ? ignore_index_for(*t, ignore_index) : std::nullopt,
             vocab_start);
  return in_request_order(make_forward<RowStats>(inputs, p, s), p.stats, stats);
}

std::vector<mx::Shape> LinearRowStats::output_shapes(const std::vector<mx::array>& inputs) {
  return stats_shapes(row_shape(inputs[0]), params_.stats);
}

std::vector<mx::Shape> RowStats::output_shapes(const std::vector<mx::array>& inputs) {
  return stats_shapes(row_shape(inputs[0]), params_.stats);
}

std::vector<mx::Shape> LinearRowStatsVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return linear_grad_shapes(inputs, params_);
}

std::vector<mx::Shape> RowStatsVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

std::vector<mx::array> LinearRowStats::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  auto L = linear_row_stats_inputs(params_);
  RowStatsParams b = params_;
  b.head.grad_hidden = b.head.grad_weight = b.head.grad_bias = false;
  for (int arg : argnums) {
    if (params_.head.quantized() &&
        (arg == L.weight || arg == L.scales || arg == L.qbiases || arg == L.global_scale)) {
      throw std::invalid_argument(
          "linear row statistics: a quantized weight (w_q, scales, biases) is frozen and has no "
          "gradient; differentiate w.r.t. hidden (and bias) only");
    }
    b.head.grad_hidden |= arg == L.hidden;
    b.head.grad_weight |= arg == L.weight;
    b.head.grad_bias |= arg == L.bias;
  }
  b.cotangents = live_cotangents(params_.stats, cotangents);
  if (b.cotangents == 0) { // every cotangent a known zero: no backward at all
    b.head.grad_hidden = b.head.grad_weight = b.head.grad_bias = false;
  }
  std::vector<mx::array> grads_out;
  if (b.head.any_grad()) {
    std::vector<mx::array> inputs(primals.begin(), primals.end());
    append_backward_inputs(inputs, params_.stats, b.cotangents, cotangents, outputs, s);
    grads_out = make_linear_backward(inputs, b, s);
  }
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    int pos = 0;
    if (b.cotangents == 0) {
      grads.push_back(mx::zeros_like(primals[arg], s));
    } else if (arg == L.hidden || arg == L.weight || arg == L.bias) {
      if (arg != L.hidden && b.head.grad_hidden) ++pos;
      if (arg == L.bias && b.head.grad_weight) ++pos;
      grads.push_back(mx::astype(grads_out[pos], primals[arg].dtype(), s));
    } else {
      grads.push_back(mx::zeros_like(primals[arg], s)); // class indices
    }
  }
  return grads;
}

std::vector<mx::array> RowStats::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  std::vector<mx::array> grads;
  const int live = live_cotangents(params_.stats, cotangents);
  for (int arg : argnums) {
    if (arg != 0 || live == 0) {
      grads.push_back(mx::zeros_like(primals[arg], s)); // class indices, or no live cotangent
      continue;
    }
    RowStatsParams b = params_;
    b.cotangents = live;
    std::vector<mx::array> inputs(primals.begin(), primals.end());
    append_backward_inputs(inputs, params_.stats, b.cotangents, cotangents, outputs, s);
    grads.push_back(make_logits_backward(inputs, b, s)[0]);
  }
  return grads;
}

namespace {

// vmap of the per-row primitives: the statistics (and dH, dlogits) of a row
// depend on that row alone, so when the rows' own input (hidden, logits) is
// vmapped and nothing the rows share (the head, its bias) is, the batch axis
// goes to the front of every per-row input (those not vmapped broadcast:
// targets, saved statistics, cotangents), and ONE primitive runs over the
// batch's rows; its outputs are per row, batch first. Otherwise (a batched
// head, or a backward that sums over rows: dW, dbias) one primitive per batch
// element (vmap_by_slices).
template <typename Make>
std::pair<std::vector<mx::array>, std::vector<int>> vmap_rows(const std::vector<mx::array>& inputs,
                                                              const std::vector<int>& axes,
                                                              const std::vector<bool>& per_row, bool can_fold,
                                                              Make make, mx::StreamOrDevice s) {
  bool fold = can_fold && axes[0] >= 0; // input 0: hidden or logits
  for (size_t i = 0; i < inputs.size(); ++i) {
    fold = fold && (per_row[i] || axes[i] < 0);
  }
  if (!fold) {
    return vmap_by_slices(inputs, axes, make, s);
  }
  auto outs = make(vmap_to_front(inputs, axes, per_row, s));
  return {outs, std::vector<int>(outs.size(), 0)};
}

// Linear form: hidden, the targets and (backward) the inputs after the
// forward's (saved statistics, cotangents) are per row; the head is shared.
std::vector<bool> linear_per_row(const RowStatsParams& p, size_t count) {
  auto L = linear_row_stats_inputs(p);
  std::vector<bool> per_row(count, true);
  for (int i = 0; i < L.count; ++i) {
    per_row[i] = i == L.hidden || i == L.targets;
  }
  return per_row;
}

} // namespace

std::pair<std::vector<mx::array>, std::vector<int>> LinearRowStats::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  return vmap_rows(
      inputs, axes, linear_per_row(p, inputs.size()), true,
      [&](const std::vector<mx::array>& in) { return make_forward<LinearRowStats>(in, p, s); }, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> RowStats::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  return vmap_rows(
      inputs, axes, std::vector<bool>(inputs.size(), true), true,
      [&](const std::vector<mx::array>& in) { return make_forward<RowStats>(in, p, s); }, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearRowStatsVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  // dW and dbias sum over the rows: per batch element, so never folded.
  const bool per_row_outputs = !p.head.grad_weight && !p.head.grad_bias;
  return vmap_rows(
      inputs, axes, linear_per_row(p, inputs.size()), per_row_outputs,
      [&](const std::vector<mx::array>& in) { return make_linear_backward(in, p, s); }, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> RowStatsVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  return vmap_rows(
      inputs, axes, std::vector<bool>(inputs.size(), true), true,
      [&](const std::vector<mx::array>& in) { return make_logits_backward(in, p, s); }, s);
}

// eval_gpu: csrc/metal/row_stats.cpp (Metal builds).
#ifndef _METAL_
FL_NO_METAL(LinearRowStats)
FL_NO_METAL(LinearRowStatsVJP)
FL_NO_METAL(RowStats)
FL_NO_METAL(RowStatsVJP)
#endif

} // namespace fl
