// The host side of the linear CE's tiles, shared by every head loss on them
// (the linear cross-entropy, the row statistics): a call's plan and buffers,
// the head's bindings, the forward tile and dbias / dH / dW launches, and the
// schedule loop that commits command buffers at lce_schedule's segments. The
// epilogue kernels (finish, dZ) are each loss's own (csrc/metal/<loss>.cpp).
// Built only where MLX has Metal (_METAL_).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "math/quantized.h"
#include "metal/host.h"
#include "ops/linear_cross_entropy.h"

namespace fl::lcehost {

// What every launch of one call shares.
struct LceCall {
  const std::vector<mx::array>& inputs;
  const LinearCrossEntropyParams& p;
  LceInputs L;
  mplan::KDtype hidden_dt;
  std::string head; // the weight's head name (kernel name suffix)
  mplan::LcePlan plan;
  LceArgs args;
  mx::Stream s;
  gpu::CommandBuffers buffers;
};

// The head that reads a weight. Dense: the weight's dtype. Quantized
// (metal/quantized_head.h; bits != 0): the mode, bits and (affine) the scales'
// dtype (the ops give scales and biases one dtype; the floating-point modes have
// uint8 scales and no biases, nvfp4 maybe a global scale); w_q must reach the
// kernel as packed uint32. qbiases / global_scale: null where the mode has none.
inline std::string head_name_of(const mx::array& weight, const mx::array* scales,
                                const mx::array* qbiases, const mx::array* global_scale,
                                int quant_mode, int bits) {
  if (bits == 0) {
    return mplan::lce_dense_head(gpu::kernel_dtype(weight.dtype()));
  }
  gpu::require_dense(*scales, "scales");
  if (weight.dtype() != mx::uint32) {
    throw std::runtime_error("mlx_fused_losses: a quantized weight must reach the kernel as uint32");
  }
  if (quant_mode != flm::kQuantAffine) {
    if (scales->dtype() != mx::uint8) {
      throw std::runtime_error("mlx_fused_losses: fp-mode scales must reach the kernel as uint8");
    }
    if (global_scale) {
      gpu::require_dense(*global_scale, "global_scale");
    }
    return mplan::lce_quantized_head(quant_mode, bits, mplan::KDtype::float32, global_scale != nullptr);
  }
  gpu::require_dense(*qbiases, "biases");
  if (qbiases->dtype() != scales->dtype()) {
    throw std::runtime_error(
        "mlx_fused_losses: a quantized weight's scales and biases must reach the kernel in one "
        "dtype");
  }
  return mplan::lce_quantized_head(quant_mode, bits, gpu::kernel_dtype(scales->dtype()));
}

inline std::string head_name(const std::vector<mx::array>& inputs, const LinearCrossEntropyParams& p,
                      const LceInputs& L) {
  if (!p.quantized()) {
    return head_name_of(inputs[L.weight], nullptr, nullptr, nullptr, 0, 0);
  }
  return head_name_of(inputs[L.weight], &inputs[L.scales],
                      p.quantized_affine() ? &inputs[L.qbiases] : nullptr,
                      p.has_global_scale ? &inputs[L.global_scale] : nullptr, p.quant_mode, p.bits);
}

// The call's plan; its inputs and outputs are kept alive by every command
// buffer it fills (gpu::CommandBuffers).
// L: where the inputs are (L.targets -1: none; the rows are hidden's).
inline LceCall make_call(const std::vector<mx::array>& inputs, const std::vector<mx::array>& outputs,
                         const LinearCrossEntropyParams& p, const LceInputs& L, mx::Stream s) {
  const auto& hidden = inputs[L.hidden];
  const auto& weight = inputs[L.weight];
  gpu::require_dense(hidden, "hidden");
  gpu::require_dense(weight, "weight");
  if (L.targets >= 0) {
    gpu::require_dense(inputs[L.targets], "targets");
    if (inputs[L.targets].dtype() != mx::int64) {
      throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
    }
  }
  if (p.has_bias) {
    gpu::require_dense(inputs[L.bias], "bias");
    if (inputs[L.bias].dtype() != mx::float32) {
      throw std::runtime_error("mlx_fused_losses: the bias must reach the kernel as float32");
    }
  }
  int H = hidden.shape(-1);
  int V = weight.shape(0);
  // H = 0: the logits are the bias; the rows are counted from the targets
  // (without targets, from hidden's leading axes).
  int64_t N = 1;
  if (L.targets >= 0) {
    N = int64_t(inputs[L.targets].size());
  } else {
    for (int i = 0; i + 1 < hidden.ndim(); ++i) N *= hidden.shape(i);
  }
  // The forward tile is MLX's choice for the GPU's class, the last letter of its
  // architecture name (launch_plan.h lce_forward_tile, MLX's matmul.cpp).
  const mplan::KDtype hidden_dt = gpu::kernel_dtype(hidden.dtype());
  const std::string head = head_name(inputs, p, L);
  mplan::LcePlan plan = mplan::lce_plan(
      N, V, H, p.chunk_bytes, mplan::kLceMaxBufferFlops,
      mplan::lce_forward_tile(gpu::device_class(s), hidden_dt, head, N, V, H));
  LceArgs args = mplan::make_lce_args(plan, p.label_smoothing, p.smoothing_mode,
                                      p.has_ignore_index, p.ignore_index, p.z_loss,
                                      p.logit_softcap, p.has_bias);
  args.bits = p.bits;
  args.group_size = p.group_size;
  LceCall c{inputs, p, L, hidden_dt, head, plan, args, s, gpu::CommandBuffers(s)};
  for (const auto& a : inputs) {
    c.buffers.keep(a);
  }
  for (const auto& a : outputs) {
    c.buffers.keep(a);
  }
  return c;
}

// Scratch memory of the call. Not an encoder temporary: it may be written in
// one command buffer and read in the next (gpu::CommandBuffers).
inline mx::array scratch(gpu::CommandBuffers& buffers, int64_t floats) {
  mx::array t({int(floats > 0 ? floats : 1)}, mx::float32, nullptr, {});
  gpu::alloc(t);
  buffers.keep(t);
  return t;
}
inline mx::array scratch(LceCall& c, int64_t floats) {
  return scratch(c.buffers, floats);
}

// The head's three buffer slots (a dense head reads only the weight).
inline void bind_head(LceCall& c, mx::metal::CommandEncoder& enc) {
  const auto& w = c.inputs[c.L.weight];
  enc.set_input_array(w, FL_LCE_WEIGHT);
  // The floating-point modes have no biases: their scales fill both slots (the
  // head never reads the second), or nvfp4's global scale the second.
  const auto& scales = c.p.quantized() ? c.inputs[c.L.scales] : w;
  enc.set_input_array(scales, FL_LCE_SCALES);
  enc.set_input_array(c.p.quantized_affine()   ? c.inputs[c.L.qbiases]
                      : c.p.has_global_scale ? c.inputs[c.L.global_scale]
                                             : scales,
                      FL_LCE_QBIASES);
}

// Hidden, head, targets, bias: slots 0-5 of the forward and dZ kernels.
inline void bind_tile_inputs(LceCall& c, mx::metal::CommandEncoder& enc) {
  const auto& hidden = c.inputs[c.L.hidden];
  enc.set_input_array(hidden, FL_LCE_HIDDEN);
  bind_head(c, enc);
  // No targets (row statistics): any valid buffer, never read (LceArgs::no_targets).
  enc.set_input_array(c.L.targets >= 0 ? c.inputs[c.L.targets] : hidden, FL_LCE_TARGETS);
  enc.set_input_array(c.p.has_bias ? c.inputs[c.L.bias] : hidden, FL_LCE_BIAS);
}

// The forward tiles of one launch of the schedule: per (split, row) states and
// the targets' logits (args: the call's, row0 set).
inline void launch_forward(LceCall& c, const mplan::LceLaunch& l, const LceArgs& args, mx::array& partials,
                           mx::array& target_logit, mx::array& argmax_partials) {
  if (auto x = gpu::launch(c.s, [&](int t) {
        return mplan::lce_forward_plan(c.hidden_dt, c.head, c.plan, t, l.rows);
      })) {
    auto& enc = x.encoder();
    bind_tile_inputs(c, enc);
    enc.set_output_array(partials, FL_LCE_FWD_PARTIALS);
    enc.set_output_array(target_logit, FL_LCE_FWD_TARGET_LOGIT);
    enc.set_output_array(argmax_partials, FL_LCE_FWD_ARGMAX_PARTIALS);
    enc.set_bytes(args, FL_LCE_FWD_ARGS);
    x.dispatch();
  }
}

// dbias (+)= column sums of the chunk's dZ.
inline void launch_dbias(LceCall& c, const LceArgs& args, const mx::array& dz, mx::array& dbias) {
  if (auto x = gpu::launch(c.s, [&](int t) { return mplan::lce_dbias_plan(c.plan, t); })) {
    auto& enc = x.encoder();
    enc.set_input_array(dz, FL_LCE_DB_DZ);
    enc.set_output_array(dbias, FL_LCE_DB_OUT);
    enc.set_bytes(args, FL_LCE_DB_ARGS);
    x.dispatch();
  }
}

// dH[chunk] = dZ W.
inline void launch_dh(LceCall& c, const mplan::LceLaunch& l, const LceArgs& args, const mx::array& dz,
                      mx::array& dh) {
  if (auto x = gpu::launch(c.s, [&](int t) { return mplan::lce_dh_plan(c.head, c.plan, l.rows, t); })) {
    auto& enc = x.encoder();
    enc.set_input_array(dz, FL_LCE_DH_DZ);
    bind_head(c, enc);
    enc.set_output_array(dh, FL_LCE_DH_OUT);
    enc.set_bytes(args, FL_LCE_DH_ARGS);
    x.dispatch();
  }
}

// dW (+)= dZ^T H[chunk].
inline void launch_dw(LceCall& c, const LceArgs& args, const mx::array& dz, mx::array& dw) {
  if (auto x = gpu::launch(c.s, [&](int t) { return mplan::lce_dw_plan(c.hidden_dt, c.plan, t); })) {
    auto& enc = x.encoder();
    enc.set_input_array(dz, FL_LCE_DW_DZ);
    enc.set_input_array(c.inputs[c.L.hidden], FL_LCE_DW_HIDDEN);
    enc.set_output_array(dw, FL_LCE_DW_OUT);
    enc.set_bytes(args, FL_LCE_DW_ARGS);
    x.dispatch();
  }
}

// The backward launches' arguments: the chunk's rows, accumulation after the first.
inline LceArgs chunk_args(const LceCall& c, const mplan::LceLaunch& l) {
  LceArgs args = c.args;
  args.row0 = l.row0;
  args.chunk_rows = int(l.rows);
  args.accumulate = l.row0 > 0 ? 1 : 0;
  return args;
}

// A launch that does nothing (lce_scale_grad over 0 elements), to pad the last
// command buffer (gpu::CommandBuffers::finish).
inline void pad_launch(mx::Stream s, const mx::array& any_float32) {
  PwArgs none = mplan::make_pw_args(0, 0.0f, 0.0f, 0);
  auto x = gpu::launch(s, [&](int t) {
    return mplan::lce_scale_plan(mplan::KDtype::float32, 1, t);
  });
  auto& enc = x.encoder();
  enc.set_input_array(any_float32, FL_LCE_SCALE_G);
  enc.set_input_array(any_float32, FL_LCE_SCALE_SRC);
  enc.set_input_array(any_float32, FL_LCE_SCALE_OUT); // never written: size 0
  enc.set_bytes(none, FL_LCE_SCALE_ARGS);
  x.dispatch();
}

// Every launch of lce_schedule(c.plan, w) in order, run(l) each, committing
// the command buffer at each segment boundary; the last buffer padded
// (gpu::CommandBuffers::finish) with launches that read any_float32.
template <typename Run>
void run_schedule(LceCall& c, const mplan::LceWork& w, const mx::array& any_float32, Run&& run) {
  int segment = 0;
  for (const auto& l : mplan::lce_schedule(c.plan, w)) {
    if (l.segment != segment) {
      c.buffers.commit();
      segment = l.segment;
    }
    run(l);
  }
  c.buffers.finish([&] { pad_launch(c.s, any_float32); });
}

} // namespace fl::lcehost
