#include "ops/linear_cross_entropy.h"

#include <algorithm>
#include <cmath>

#include "math/cross_entropy.h"
#include "math/quantized.h"
#include "ops/cross_entropy.h"
#include "ops/vmap_slices.h"

namespace fl {

LceChunkPlan plan_chunks(
    int64_t rows,
    int64_t hidden_size,
    int64_t vocab,
    bool hidden_is_f32,
    bool weight_is_dense_f32,
    int threads,
    int64_t chunk_bytes) {
  LceChunkPlan plan;
  int64_t row_bytes = 4 * std::max<int64_t>(hidden_size, 1);
  auto tile_rows = [&](int64_t tile_bytes) {
    return std::clamp<int64_t>(tile_bytes / row_bytes, 1, std::max<int64_t>(vocab, 1));
  };
  int64_t spread = ((vocab + kLceMinDenseTiles - 1) / kLceMinDenseTiles + 15) / 16 * 16;
  int64_t dense_rows = std::min(tile_rows(kLceDenseTileBytes), std::max<int64_t>(spread, 1));
  plan.vocab_tile = weight_is_dense_f32 ? dense_rows : tile_rows(kLceWeightTileBytes);
  plan.dw_tile = dense_rows;
  plan.hidden_tile = std::clamp<int64_t>(hidden_size, 1, kLceHiddenTile);
  int64_t per_row = std::max<int64_t>(4 * vocab + (hidden_is_f32 ? 0 : row_bytes), 1);
  plan.rows = std::clamp<int64_t>(chunk_bytes / per_row, 1, std::max<int64_t>(rows, 1));
  int64_t tile_bytes = weight_is_dense_f32 ? 0 : std::max(threads, 1) * plan.vocab_tile * row_bytes;
  plan.bytes = plan.rows * per_row + tile_bytes;
  plan.row_bytes = per_row;
  return plan;
}

namespace {

// Build the forward primitive on checked, dense inputs (op, vmap).
std::vector<mx::array> make_forward(
    const std::vector<mx::array>& inputs,
    const LinearCrossEntropyParams& p,
    std::array<bool, 3> requested,
    mx::StreamOrDevice s) {
  auto L = lce_inputs(p);
  std::vector<mx::array> dense_inputs;
  for (const auto& in : inputs) {
    dense_inputs.push_back(dense(in, s));
  }
  const auto& hidden = dense_inputs[L.hidden];
  int vocab = dense_inputs[L.weight].shape(0);
  auto rows = row_shape(hidden);
  std::vector<mx::Shape> shapes = {p.sum_rows ? mx::Shape{} : rows, rows, rows, rows, rows, rows, rows};
  std::vector<mx::Dtype> dtypes = {mx::float32, mx::float32, mx::float32, mx::bool_, mx::float32,
                                   mx::int64, mx::float32}; // (LceOutput's order)
  if (p.grad_hidden) {
    shapes.push_back(hidden.shape());
    dtypes.push_back(mx::float32);
  }
  if (p.grad_weight) {
    shapes.push_back({vocab, hidden.shape(-1)});
    dtypes.push_back(mx::float32);
  }
  if (p.grad_bias) {
    shapes.push_back({vocab});
    dtypes.push_back(mx::float32);
  }
  auto primitive = std::make_shared<LinearCrossEntropy>(mx::to_stream(s), p);
  primitive->requested = requested;
  return mx::array::make_arrays(std::move(shapes), dtypes, primitive, dense_inputs);
}

std::vector<mx::Shape> grad_shapes(const std::vector<mx::array>& inputs,
                                   const LinearCrossEntropyParams& p) {
  auto L = lce_inputs(p);
  const auto& hidden = inputs[L.hidden];
  int vocab = inputs[L.weight].shape(0);
  std::vector<mx::Shape> shapes;
  if (p.grad_hidden) shapes.push_back(hidden.shape());
  if (p.grad_weight) shapes.push_back({vocab, hidden.shape(-1)});
  if (p.grad_bias) shapes.push_back({vocab});
  return shapes;
}

std::vector<mx::array> make_backward(
    const std::vector<mx::array>& inputs,
    const LinearCrossEntropyParams& p,
    mx::StreamOrDevice s) {
  std::vector<mx::array> dense_inputs;
  for (const auto& in : inputs) {
    dense_inputs.push_back(dense(in, s));
  }
  auto shapes = grad_shapes(dense_inputs, p);
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(
      std::move(shapes), dtypes, std::make_shared<LinearCrossEntropyVJP>(mx::to_stream(s), p),
      dense_inputs);
}

} // namespace

namespace {

// What mx.quantize accepts per mode in mlx 0.32.4 (mlx/ops.cpp:
// quantization_params_from_mode and the fp_quantize checks).
struct QuantFormat {
  const char* name;
  int mode;
  int default_group_size, default_bits;
};
constexpr QuantFormat kQuantFormats[] = {
    {"affine", flm::kQuantAffine, 64, 4},
    {"mxfp4", flm::kQuantMxfp4, 32, 4},
    {"mxfp8", flm::kQuantMxfp8, 32, 8},
    {"nvfp4", flm::kQuantNvfp4, 16, 4},
};

const QuantFormat& quant_format(int mode) {
  for (const auto& f : kQuantFormats) {
    if (f.mode == mode) return f;
  }
  throw std::logic_error("unknown quantization mode");
}

} // namespace

int quant_mode_from_name(const std::string& mode) {
  for (const auto& f : kQuantFormats) {
    if (mode == f.name) return f.mode;
  }
  fail_value("mode='", mode, "' is not a quantization mode of mx.quantize: 'affine', 'mxfp4', "
             "'mxfp8' or 'nvfp4'");
}

void check_quantized_head(const mx::array& w_q, const mx::array& scales,
                          const std::optional<mx::array>& qbiases, int hidden_size, int group_size,
                          int bits, int mode, const std::optional<mx::array>& global_scale) {
  const QuantFormat& f = quant_format(mode);
  if (global_scale) {
    if (mode != flm::kQuantNvfp4) {
      fail_value("global_scale is only for mode='nvfp4' (as in mx.quantize), got mode='", f.name,
                 "'");
    }
    check_float_input(*global_scale, "global_scale");
    if (global_scale->size() != 1) {
      fail_value("global_scale must be a single value (as mx.quantize takes it), got shape ",
                 shape_str(global_scale->shape()));
    }
  }
  if (mode == flm::kQuantAffine) {
    if (bits < 1 || bits > 8 || bits == 7) {
      fail_value("bits=", bits, " is not an affine quantization of mx.quantize: bits must be 1, 2, "
                 "3, 4, 5, 6 or 8");
    }
    if (group_size != 32 && group_size != 64 && group_size != 128) {
      fail_value("group_size=", group_size, " is not an affine quantization of mx.quantize: "
                 "group_size must be 32, 64 or 128");
    }
    if (!qbiases) {
      fail_value("a quantized weight of mode='affine' needs both scales= and biases=, as "
                 "mx.quantize returns them");
    }
  } else {
    if (bits != f.default_bits) {
      fail_value("bits=", bits, " does not match mode='", f.name, "', which has bits=",
                 f.default_bits);
    }
    if (group_size != f.default_group_size) {
      fail_value("group_size=", group_size, " does not match mode='", f.name,
                 "', which has group_size=", f.default_group_size);
    }
    if (qbiases) {
      fail_value("mode='", f.name, "' has no biases (mx.quantize returns only w_q and scales); "
                 "pass biases=None");
    }
  }
  if (w_q.dtype() != mx::uint32) {
    fail_type("a quantized weight must be the uint32 matrix mx.quantize returns, got ", w_q.dtype());
  }
  if (w_q.ndim() != 2) {
    fail_value("weight (quantized) must be 2-D (V, H * bits / 32), got ", shape_str(w_q.shape()));
  }
  int64_t columns = int64_t(w_q.shape(1)) * 32 / bits;
  if (int64_t(w_q.shape(1)) * 32 % bits != 0 || columns != hidden_size) {
    fail_value("weight (quantized, bits=", bits, ") of shape ", shape_str(w_q.shape()), " holds ",
               double(w_q.shape(1)) * 32 / bits, " columns, but hidden has H = ", hidden_size);
  }
  if (hidden_size % group_size != 0) {
    fail_value("H = ", hidden_size, " must be a multiple of group_size = ", group_size);
  }
  mx::Shape expected = {w_q.shape(0), hidden_size / group_size};
  std::vector<std::pair<const mx::array*, const char*>> groups = {{&scales, "scales"}};
  if (qbiases) {
    groups.push_back({&*qbiases, "biases"});
  }
  for (auto [arr, name] : groups) {
    if (mode == flm::kQuantAffine) {
      check_float_input(*arr, name);
    } else if (arr->dtype() != mx::uint8) {
      fail_type(name, " of mode='", f.name, "' must be the uint8 codes mx.quantize returns, got ",
                arr->dtype());
    }
    if (arr->shape() != expected) {
      fail_value(name, " must have shape ", shape_str(expected), " (V, H / group_size) for group_size=",
                 group_size, ", got ", shape_str(arr->shape()));
    }
  }
}

LinearHeadOperands check_linear_head(
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
    LinearCrossEntropyParams& p,
    mx::StreamOrDevice s) {
  check_float_input(hidden, "hidden");
  if (hidden.ndim() == 0) {
    fail_value("hidden must have a feature axis [..., H], got a scalar");
  }
  int hidden_size = hidden.shape(-1);
  if (qbiases && !scales) {
    fail_value("biases (of a quantized weight) given without scales");
  }
  const int quant_mode = quant_mode_from_name(mode);
  if (global_scale && !scales) {
    fail_value("global_scale (of an nvfp4 weight) given without scales");
  }
  if (quant_mode != flm::kQuantAffine && !scales) {
    fail_value("mode='", mode, "' describes a quantized weight: pass the scales= that mx.quantize "
               "returned with it");
  }
  if (scales) {
    p.quant_mode = quant_mode;
    check_quantized_head(weight, *scales, qbiases, hidden_size, group_size, bits, p.quant_mode,
                         global_scale);
    p.has_global_scale = global_scale.has_value();
    p.bits = bits;
    p.group_size = group_size;
  } else {
    if (weight.dtype() == mx::uint32) {
      fail_type("weight is uint32: the packed matrix of a quantized head needs the scales= and "
                "biases= that mx.quantize returned with it (w_q, scales, biases = "
                "mx.quantize(W, group_size, bits)), and the same group_size=, bits= and mode=");
    }
    check_float_input(weight, "weight");
    if (weight.ndim() != 2 || weight.shape(1) != hidden_size) {
      fail_value("weight must have shape (V, H) with H = hidden.shape[-1] = ", hidden_size, ", got ",
                 shape_str(weight.shape()));
    }
  }
  int vocab = weight.shape(0);
  if (vocab == 0) {
    fail_value("weight must have at least one row (class), got shape ", shape_str(weight.shape()));
  }
  LinearHeadOperands out;
  if (targets) {
    auto rows = row_shape(hidden);
    if (targets->shape() != rows) {
      fail_value("targets must have shape ", shape_str(rows), " (hidden ", shape_str(hidden.shape()),
                 " without its last axis), got ", shape_str(targets->shape()),
                 squeeze_hint(targets->shape(), rows));
    }
    out.targets = class_indices(*targets, "targets", s);
  }
  if (bias) {
    check_float_input(*bias, "bias");
    if (bias->shape() != mx::Shape{vocab}) {
      fail_value("bias must have shape (", vocab, ",) to match weight's ", vocab, " rows, got ",
                 shape_str(bias->shape()));
    }
    p.has_bias = true;
    // The epilogue adds the bias in float32 (V values: converting is free).
    out.bias = mx::astype(*bias, mx::float32, s);
  }
  out.head = {hidden, weight};
  if (scales && !qbiases) {
    out.head.push_back(*scales); // uint8 codes (floating-point modes)
    if (global_scale) {
      // float32 [1]: read as float32 by the kernels, as mx.dequantize reads it
      out.head.push_back(mx::reshape(mx::astype(*global_scale, mx::float32, s), {1}, s));
    }
  } else if (scales) {
    // The kernels read scales and biases as one dtype: both in their promoted
    // type (mx.dequantize's result type; the conversion is exact, and a no-op
    // for what mx.quantize returns). Before, biases of another dtype than the
    // scales were read as the scales' dtype (garbage, and past their end).
    auto sdt = mx::promote_types(scales->dtype(), qbiases->dtype());
    out.head.push_back(mx::astype(*scales, sdt, s));
    out.head.push_back(mx::astype(*qbiases, sdt, s));
  }
  return out;
}

int check_linear_cross_entropy_options(float label_smoothing,
                                       const std::string& label_smoothing_mode, float z_loss,
                                       std::optional<float> logit_softcap,
                                       std::optional<int64_t> chunk_bytes,
                                       float filter_eps) {
  int mode = check_label_smoothing(label_smoothing, label_smoothing_mode);
  if (!(filter_eps >= 0.0f) || std::isinf(filter_eps)) {
    fail_value("filter_eps must be finite and >= 0 (or None: no filtering, or 'auto'), got ", filter_eps);
  }
  check_z_loss(z_loss);
  check_logit_softcap(logit_softcap);
  if (chunk_bytes && *chunk_bytes <= 0) {
    fail_value("chunk_bytes must be > 0 (or None for the default), got ", *chunk_bytes);
  }
  return mode;
}

std::vector<mx::array> linear_cross_entropy(
    const mx::array& hidden,
    const mx::array& weight,
    const mx::array& targets,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<mx::array>& global_scale,
    float label_smoothing,
    const std::string& label_smoothing_mode,
    std::optional<int64_t> ignore_index,
    float z_loss,
    std::optional<float> logit_softcap,
    bool sum_rows,
    std::optional<int64_t> chunk_bytes,
    bool fuse_grads,
    float filter_eps,
    bool lse_grad,
    mx::StreamOrDevice s) {
  LinearCrossEntropyParams p;
  p.smoothing_mode = check_linear_cross_entropy_options(label_smoothing, label_smoothing_mode,
                                                        z_loss, logit_softcap, chunk_bytes, filter_eps);
  p.filter_eps = filter_eps;
  auto head = check_linear_head(hidden, weight, targets, bias, scales, qbiases, group_size, bits, mode,
                                global_scale, p, s);
  p.label_smoothing = label_smoothing;
  p.z_loss = z_loss;
  if (logit_softcap) {
    p.logit_softcap = *logit_softcap;
  }
  if (ignore_index) {
    p.has_ignore_index = true;
    p.ignore_index = *ignore_index;
  }
  p.chunk_bytes = chunk_bytes ? *chunk_bytes : lce_default_chunk_bytes(mx::to_stream(s).device);
  p.sum_rows = sum_rows;
  p.lse_grad = lse_grad;
  // Gradients in the forward pass need a single cotangent for all rows (not
  // so with the lse's per-row one).
  // (is_tracer: some transform traces the input; whether it is a gradient is
  // known only when vjp is called, see the header.)
  if (fuse_grads && sum_rows && !lse_grad) {
    p.grad_hidden = hidden.is_tracer();
    p.grad_weight = !p.quantized() && weight.is_tracer();
    p.grad_bias = bias && bias->is_tracer();
  }
  std::vector<mx::array> inputs = head.head;
  inputs.push_back(*head.targets);
  if (head.bias) {
    inputs.push_back(*head.bias);
  }
  auto outputs = make_forward(inputs, p, {}, s);
  outputs.erase(outputs.begin() + kLceNumStats, outputs.end()); // gradients: the vjp's business
  return outputs;
}

std::vector<mx::Shape> LinearCrossEntropy::output_shapes(const std::vector<mx::array>& inputs) {
  auto rows = row_shape(inputs[lce_inputs(params_).hidden]);
  std::vector<mx::Shape> shapes = {params_.sum_rows ? mx::Shape{} : rows, rows, rows, rows, rows, rows,
                                   rows};
  for (auto& g : grad_shapes(inputs, params_)) {
    shapes.push_back(g);
  }
  return shapes;
}

std::vector<mx::Shape> LinearCrossEntropyVJP::output_shapes(const std::vector<mx::array>& inputs) {
  return grad_shapes(inputs, params_);
}

std::vector<mx::array> LinearCrossEntropy::vjp(
    const std::vector<mx::array>& primals,
    const std::vector<mx::array>& cotangents,
    const std::vector<int>& argnums,
    const std::vector<mx::array>& outputs) {
  auto s = stream();
  auto L = lce_inputs(params_);
  // The loss is differentiable, and the lse with lse_grad; the other
  // statistics are documented as constants (their cotangents are ignored).
  auto g = mx::astype(cotangents[kLceLoss], mx::float32, s);
  // The forward can still form the gradients it declared if it has not been
  // evaluated yet (the graph of value_and_grad is built before evaluation).
  bool fused_ok = outputs[kLceLoss].status() == mx::array::Status::unscheduled;
  auto fused = [&](int which) {
    bool declared = which == 0 ? params_.grad_hidden : which == 1 ? params_.grad_weight : params_.grad_bias;
    return fused_ok && declared;
  };
  // What is asked, and what the forward forms for a unit cotangent.
  LinearCrossEntropyParams missing = params_;
  missing.grad_hidden = missing.grad_weight = missing.grad_bias = false;
  for (int arg : argnums) {
    if (params_.quantized() && (arg == L.weight || arg == L.scales || arg == L.qbiases ||
                                arg == L.global_scale)) {
      throw std::invalid_argument(
          "linear_cross_entropy: a quantized weight (w_q, scales, biases) is frozen and has no "
          "gradient; differentiate w.r.t. hidden (and bias) only");
    }
    missing.grad_hidden |= arg == L.hidden && !fused(0);
    missing.grad_weight |= arg == L.weight && !fused(1);
    missing.grad_bias |= arg == L.bias && !fused(2);
    for (int which = 0; which < 3; ++which) {
      int index = which == 0 ? L.hidden : which == 1 ? L.weight : L.bias;
      requested[which] = requested[which] || (arg == index && fused(which));
    }
  }
  std::vector<mx::array> recomputed;
  if (missing.any_grad()) {
    auto rows = row_shape(primals[L.hidden]);
    auto g_rows = params_.sum_rows ? mx::broadcast_to(g, rows, s) : g;
    std::vector<mx::array> inputs(primals.begin(), primals.end());
    if (params_.lse_grad) {
      // [2, rows...]: the rows' cotangents, then their lse's (one input, so
      // that the kernels read both from one buffer).
      auto g_lse = mx::astype(cotangents[kLceLse], mx::float32, s);
      g_rows = mx::concatenate({mx::expand_dims(g_rows, 0, s), mx::expand_dims(g_lse, 0, s)}, 0, s);
    }
    inputs.insert(inputs.end(), {outputs[kLceLse], outputs[kLceLseLo], g_rows});
    recomputed = make_backward(inputs, missing, s);
  }
  // Position of a gradient among the fused outputs / the backward's outputs.
  auto position = [](const LinearCrossEntropyParams& p, int which) {
    int pos = 0;
    if (which > 0 && p.grad_hidden) ++pos;
    if (which > 1 && p.grad_weight) ++pos;
    return pos;
  };
  std::vector<mx::array> grads;
  for (int arg : argnums) {
    int which = arg == L.hidden ? 0 : arg == L.weight ? 1 : arg == L.bias ? 2 : -1;
    if (which < 0) {
      grads.push_back(mx::zeros_like(primals[arg], s)); // class indices
      continue;
    }
    if (fused(which)) {
      const auto& unit = outputs[kLceNumStats + position(params_, which)];
      grads.push_back(mx::array(unit.shape(), primals[arg].dtype(), std::make_shared<LceScaleGrad>(s, primals[arg].dtype()),
                                {mx::reshape(g, {}, s), unit}));
    } else {
      grads.push_back(mx::astype(recomputed[position(missing, which)], primals[arg].dtype(), s));
    }
  }
  return grads;
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearCrossEntropy::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  auto asked = requested;
  return vmap_by_slices(
      inputs, axes, [&](const std::vector<mx::array>& in) { return make_forward(in, p, asked, s); }, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LinearCrossEntropyVJP::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  auto p = params_;
  auto s = stream();
  return vmap_by_slices(inputs, axes, [&](const std::vector<mx::array>& in) { return make_backward(in, p, s); }, s);
}

std::pair<std::vector<mx::array>, std::vector<int>> LceScaleGrad::vmap(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes) {
  // Batched: plain ops (the buffer reuse is an optimisation of the usual case).
  auto s = stream();
  auto g = inputs[0];
  auto grad = axes[1] >= 0 ? mx::moveaxis(inputs[1], axes[1], 0, s) : inputs[1];
  if (axes[0] >= 0) {
    mx::Shape shape(grad.ndim() + (axes[1] >= 0 ? 0 : 1), 1);
    shape[0] = g.shape(axes[0]);
    g = mx::reshape(mx::moveaxis(g, axes[0], 0, s), shape, s);
  }
  bool batched = axes[0] >= 0 || axes[1] >= 0;
  return {{mx::astype(mx::multiply(g, grad, s), dtype_, s)}, {batched ? 0 : -1}};
}

// eval_gpu: csrc/metal/linear_cross_entropy.cpp (Metal builds).
#ifndef _METAL_
FL_NO_METAL(LceScaleGrad)
FL_NO_METAL(LinearCrossEntropy)
FL_NO_METAL(LinearCrossEntropyVJP)
#endif

} // namespace fl
