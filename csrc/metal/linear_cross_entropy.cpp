// eval_gpu of the fused linear cross-entropy (metal/linear_cross_entropy.metal;
// its first comment has the kernels' contract and the backward's design). Built
// only where MLX has Metal (_METAL_). Tile counts, chunking and buffer orders
// come from launch_plan.cpp (lce_plan and the lce_*_plan functions), the same
// plans the CPU harness dispatches (tests/metal_kernels/lce_adaptor.cpp).
//
// One call:
//   forward   lce_forward (per split and row block) -> lce_forward_finish (per
//             row) [-> fl_pw_sum_finish for the summed loss]
//   backward  per chunk of rows: lce_dz -> lce_dbias, lce_dh, lce_dw (those
//             asked for); the encoder orders each reader after its writer and
//             the next chunk's dZ after the last reader (set_input/output_array).
// The forward with fused gradients (ops/linear_cross_entropy.h) runs the
// backward with a unit cotangent from the lse it has just written.
#include "metal/host.h"
#include "ops/linear_cross_entropy.h"

namespace fl {

namespace {

// What every dispatch of one call shares.
struct LceCall {
  const std::vector<mx::array>& inputs;
  const LinearCrossEntropyParams& p;
  LceInputs L;
  mplan::KDtype hidden_dt;
  std::string head; // the weight's head name (kernel name suffix)
  mplan::LcePlan plan;
  LceArgs args;
  mx::metal::Device& d;
  mx::metal::CommandEncoder& enc;
};

// The head that reads the weight. Dense: the weight's dtype. Quantized
// (metal/quantized_head.h): bits and the scales' dtype (the op gives scales and
// biases one dtype); w_q must reach the kernel as packed uint32.
std::string head_name(const std::vector<mx::array>& inputs, const LinearCrossEntropyParams& p,
                      const LceInputs& L) {
  if (p.quantized() && p.quant_mode != 0) {
    throw std::runtime_error(
        "mlx_fused_losses: the Metal linear cross-entropy reads affine-quantized heads only (the "
        "CPU reads every mode); use stream=mx.cpu");
  }
  if (p.quantized()) {
    const auto& scales = inputs[L.scales];
    const auto& qbiases = inputs[L.qbiases];
    gpu::require_dense(scales, "scales");
    gpu::require_dense(qbiases, "biases");
    if (inputs[L.weight].dtype() != mx::uint32 || qbiases.dtype() != scales.dtype()) {
      throw std::runtime_error(
          "mlx_fused_losses: a quantized weight must reach the kernel as uint32 with scales and "
          "biases of one dtype");
    }
    return mplan::lce_quantized_head(p.bits, gpu::kernel_dtype(scales.dtype()));
  }
  return mplan::lce_dense_head(gpu::kernel_dtype(inputs[L.weight].dtype()));
}

LceCall make_call(const std::vector<mx::array>& inputs, const LinearCrossEntropyParams& p,
                  mx::Stream s) {
  LceInputs L = lce_inputs(p);
  const auto& hidden = inputs[L.hidden];
  const auto& weight = inputs[L.weight];
  const auto& targets = inputs[L.targets];
  gpu::require_dense(hidden, "hidden");
  gpu::require_dense(weight, "weight");
  gpu::require_dense(targets, "targets");
  if (targets.dtype() != mx::int64) {
    throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
  }
  if (p.has_bias) {
    gpu::require_dense(inputs[L.bias], "bias");
    if (inputs[L.bias].dtype() != mx::float32) {
      throw std::runtime_error("mlx_fused_losses: the bias must reach the kernel as float32");
    }
  }
  int H = hidden.shape(-1);
  int V = weight.shape(0);
  // H = 0: the logits are the bias; the rows are counted from the targets.
  int64_t N = int64_t(targets.size());
  mplan::LcePlan plan = mplan::lce_plan(N, V, H, p.chunk_bytes);
  LceArgs args = mplan::make_lce_args(plan, p.label_smoothing, p.smoothing_mode,
                                      p.has_ignore_index, p.ignore_index, p.z_loss,
                                      p.logit_softcap, p.has_bias);
  args.bits = p.bits;
  args.group_size = p.group_size;
  auto& d = mx::metal::device(s.device);
  return LceCall{inputs, p, L, gpu::kernel_dtype(hidden.dtype()), head_name(inputs, p, L),
                 plan, args, d, mx::metal::get_command_encoder(s)};
}

mx::array temporary(LceCall& c, int64_t floats) {
  mx::array t({int(floats > 0 ? floats : 1)}, mx::float32, nullptr, {});
  gpu::alloc(t);
  c.enc.add_temporary(t);
  return t;
}

// The head's three buffer slots (a dense head reads only the weight).
void bind_head(LceCall& c) {
  const auto& w = c.inputs[c.L.weight];
  c.enc.set_input_array(w, FL_LCE_WEIGHT);
  c.enc.set_input_array(c.p.quantized() ? c.inputs[c.L.scales] : w, FL_LCE_SCALES);
  c.enc.set_input_array(c.p.quantized() ? c.inputs[c.L.qbiases] : w, FL_LCE_QBIASES);
}

// Hidden, head, targets, bias: slots 0-5 of the forward and dZ kernels.
void bind_tile_inputs(LceCall& c) {
  const auto& hidden = c.inputs[c.L.hidden];
  c.enc.set_input_array(hidden, FL_LCE_HIDDEN);
  bind_head(c);
  c.enc.set_input_array(c.inputs[c.L.targets], FL_LCE_TARGETS);
  c.enc.set_input_array(c.p.has_bias ? c.inputs[c.L.bias] : hidden, FL_LCE_BIAS);
}

template <class MakePlan>
bool start(LceCall& c, MakePlan make, mplan::LaunchPlan* plan) {
  MTL::ComputePipelineState* kernel = nullptr;
  *plan = gpu::fit_plan(c.d, make, &kernel);
  if (plan->empty()) {
    return false;
  }
  c.enc.set_compute_pipeline_state(kernel);
  return true;
}

// loss (per row, or the summed scalar), lse, lse_lo, correct, entropy.
void run_forward(LceCall& c, std::vector<mx::array>& outputs) {
  const int64_t N = c.plan.rows;
  mx::array partials = temporary(c, int64_t(c.plan.splits) * N * 4);
  mx::array target_logit = temporary(c, N);
  mplan::LaunchPlan lp;
  if (start(c, [&](int t) { return mplan::lce_forward_plan(c.hidden_dt, c.head, c.plan, t); }, &lp)) {
    bind_tile_inputs(c);
    c.enc.set_output_array(partials, FL_LCE_FWD_PARTIALS);
    c.enc.set_output_array(target_logit, FL_LCE_FWD_TARGET_LOGIT);
    c.enc.set_bytes(c.args, FL_LCE_FWD_ARGS);
    gpu::dispatch(c.enc, lp);
  }
  mx::array row_loss = c.p.sum_rows ? temporary(c, N) : outputs[kLceLoss];
  if (start(c, [&](int t) { return mplan::lce_finish_plan(c.plan, t); }, &lp)) {
    c.enc.set_input_array(partials, FL_LCE_FIN_PARTIALS);
    c.enc.set_input_array(target_logit, FL_LCE_FIN_TARGET_LOGIT);
    c.enc.set_input_array(c.inputs[c.L.targets], FL_LCE_FIN_TARGETS);
    c.enc.set_output_array(row_loss, FL_LCE_FIN_LOSS);
    c.enc.set_output_array(outputs[kLceLse], FL_LCE_FIN_LSE);
    c.enc.set_output_array(outputs[kLceLseLo], FL_LCE_FIN_LSE_LO);
    c.enc.set_output_array(outputs[kLceCorrect], FL_LCE_FIN_CORRECT);
    c.enc.set_output_array(outputs[kLceEntropy], FL_LCE_FIN_ENTROPY);
    c.enc.set_bytes(c.args, FL_LCE_FIN_ARGS);
    gpu::dispatch(c.enc, lp);
  }
  if (c.p.sum_rows) {
    // The per-row losses added by one group in a fixed order (the element-wise
    // losses' finish kernel); it always runs and writes 0 for N = 0.
    PwArgs sum = mplan::make_pw_args(uint64_t(N), 0.0f, 0.0f, 1);
    sum.num_partials = uint64_t(N);
    start(c, [&](int t) { return mplan::pw_sum_finish_plan(uint64_t(N), t); }, &lp);
    c.enc.set_input_array(row_loss, FL_PW_SUM_PARTIALS);
    c.enc.set_output_array(outputs[kLceLoss], FL_PW_SUM_OUT);
    c.enc.set_bytes(sum, FL_PW_SUM_ARGS);
    gpu::dispatch(c.enc, lp);
  }
}

struct LceGrads {
  mx::array* dh = nullptr; // float32 [N, H]
  mx::array* dw = nullptr; // float32 [V, H]
  mx::array* dbias = nullptr; // float32 [V]
};

// The gradients asked for, chunk by chunk; g == nullptr: a unit cotangent.
void run_backward(LceCall& c, const mx::array& lse, const mx::array& lse_lo, const mx::array* g,
                  LceGrads out) {
  const int64_t N = c.plan.rows;
  const int64_t R = c.plan.chunk_rows;
  mx::array dz = temporary(c, R * c.plan.vocab);
  const auto& hidden = c.inputs[c.L.hidden];
  // N = 0 still runs one empty chunk: dW and dbias are written (zeros).
  for (int64_t r0 = 0; r0 < N || r0 == 0; r0 += R) {
    const int64_t rows = N - r0 < R ? N - r0 : R;
    LceArgs args = c.args;
    args.row0 = r0;
    args.chunk_rows = int(rows);
    args.accumulate = r0 > 0 ? 1 : 0;
    args.unit_cotangent = g == nullptr ? 1 : 0;
    mplan::LaunchPlan lp;
    if (start(c, [&](int t) { return mplan::lce_dz_plan(c.hidden_dt, c.head, c.plan, rows, t); }, &lp)) {
      bind_tile_inputs(c);
      c.enc.set_input_array(lse, FL_LCE_DZ_LSE);
      c.enc.set_input_array(lse_lo, FL_LCE_DZ_LSE_LO);
      c.enc.set_input_array(g ? *g : lse, FL_LCE_DZ_G);
      c.enc.set_output_array(dz, FL_LCE_DZ_OUT);
      c.enc.set_bytes(args, FL_LCE_DZ_ARGS);
      gpu::dispatch(c.enc, lp);
    }
    if (out.dbias && start(c, [&](int t) { return mplan::lce_dbias_plan(c.plan, t); }, &lp)) {
      c.enc.set_input_array(dz, FL_LCE_DB_DZ);
      c.enc.set_output_array(*out.dbias, FL_LCE_DB_OUT);
      c.enc.set_bytes(args, FL_LCE_DB_ARGS);
      gpu::dispatch(c.enc, lp);
    }
    if (out.dh && start(c, [&](int t) { return mplan::lce_dh_plan(c.head, c.plan, rows, t); }, &lp)) {
      c.enc.set_input_array(dz, FL_LCE_DH_DZ);
      bind_head(c);
      c.enc.set_output_array(*out.dh, FL_LCE_DH_OUT);
      c.enc.set_bytes(args, FL_LCE_DH_ARGS);
      gpu::dispatch(c.enc, lp);
    }
    if (out.dw && start(c, [&](int t) { return mplan::lce_dw_plan(c.hidden_dt, c.plan, t); }, &lp)) {
      c.enc.set_input_array(dz, FL_LCE_DW_DZ);
      c.enc.set_input_array(hidden, FL_LCE_DW_HIDDEN);
      c.enc.set_output_array(*out.dw, FL_LCE_DW_OUT);
      c.enc.set_bytes(args, FL_LCE_DW_ARGS);
      gpu::dispatch(c.enc, lp);
    }
    if (N == 0) {
      break;
    }
  }
}

} // namespace

void LinearCrossEntropy::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (int k = 0; k < kLceNumStats; ++k) {
    gpu::alloc(outputs[k]);
  }
  // Declared gradient outputs no vjp asked for get no memory and no work (as on the CPU).
  mx::array* grads[3] = {nullptr, nullptr, nullptr};
  const bool declared[3] = {params_.grad_hidden, params_.grad_weight, params_.grad_bias};
  size_t next = kLceNumStats;
  for (int which = 0; which < 3; ++which) {
    if (!declared[which]) continue;
    auto& out = outputs[next++];
    if (requested[which]) {
      gpu::alloc(out);
      grads[which] = &out;
    }
  }
  LceCall c = make_call(inputs, params_, stream());
  run_forward(c, outputs);
  if (grads[0] || grads[1] || grads[2]) {
    run_backward(c, outputs[kLceLse], outputs[kLceLseLo], nullptr, {grads[0], grads[1], grads[2]});
  }
}

void LinearCrossEntropyVJP::eval_gpu(const std::vector<mx::array>& inputs,
                                     std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  LceCall c = make_call(inputs, params_, stream());
  size_t n = inputs.size(); // ..., lse, lse_lo, g
  const auto& lse = inputs[n - 3];
  const auto& lse_lo = inputs[n - 2];
  const auto& g = inputs[n - 1];
  gpu::require_dense(lse, "lse");
  gpu::require_dense(lse_lo, "lse_lo");
  gpu::require_dense(g, "g");
  LceGrads out;
  size_t k = 0; // outputs: those flagged, in the order dH, dW, dbias
  out.dh = params_.grad_hidden ? &outputs[k++] : nullptr;
  out.dw = params_.grad_weight ? &outputs[k++] : nullptr;
  out.dbias = params_.grad_bias ? &outputs[k++] : nullptr;
  run_backward(c, lse, lse_lo, &g, out);
}

void LceScaleGrad::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& g = inputs[0];
  const auto& grad = inputs[1];
  auto& out = outputs[0];
  // float32: scaled in place when MLX's donation rule allows, as on the CPU
  // (ops/linear_cross_entropy.h); each thread reads element i, then writes it.
  gpu::alloc_or_reuse(out, grad);
  gpu::require_dense(grad, "grad");
  const uint64_t n = out.size();
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  MTL::ComputePipelineState* kernel = nullptr;
  mplan::LaunchPlan plan = gpu::fit_plan(
      d, [&](int t) { return mplan::lce_scale_plan(gpu::kernel_dtype(out.dtype()), n, t); }, &kernel);
  if (plan.empty()) {
    return;
  }
  PwArgs args = mplan::make_pw_args(n, 0.0f, 0.0f, 0);
  auto& enc = mx::metal::get_command_encoder(s);
  enc.set_compute_pipeline_state(kernel);
  enc.set_input_array(g, FL_LCE_SCALE_G);
  enc.set_input_array(grad, FL_LCE_SCALE_SRC);
  enc.set_output_array(out, FL_LCE_SCALE_OUT);
  enc.set_bytes(args, FL_LCE_SCALE_ARGS);
  gpu::dispatch(enc, plan);
}

} // namespace fl
