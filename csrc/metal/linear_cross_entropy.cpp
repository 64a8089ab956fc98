// eval_gpu of the fused linear cross-entropy (metal/linear_cross_entropy.metal;
// its first comment has the kernels' contract and the backward's design). Built
// only where MLX has Metal (_METAL_). Tile counts, chunking and buffer orders
// come from launch_plan.cpp (lce_plan and the lce_*_plan functions), the same
// plans the CPU harness dispatches (tests/metal_kernels/lce_adaptor.cpp).
//
// One call, in the order of mplan::lce_schedule:
//   forward   lce_forward (per split and row block, in launches of
//             plan.forward_rows rows) -> fl_lce_fwd_finish (per row)
//             [-> fl_pw_sum_finish for the summed loss]
//   backward  per chunk of rows: lce_dz -> fl_lce_dbias, lce_dh, lce_dw (those
//             asked for); the encoder orders each reader after its writer and
//             the next chunk's dZ after the last reader (set_input/output_array).
// The forward with fused gradients (ops/linear_cross_entropy.h) takes the
// stored-Z path instead, per chunk: lce_dz with logits_only (the chunk's logits
// into the dZ buffer) -> fl_lce_rows (the forward's per-row outputs, dZ in
// place for a unit cotangent) -> fl_lce_dbias, lce_dh, lce_dw [-> the sum].
// Command buffers: the schedule's segments, each committed before the next
// starts (gpu::CommandBuffers), hold at most plan.max_buffer_flops of work.
#include <optional>

#include "metal/lce_host.h"

namespace fl {

namespace {

using lcehost::LceCall;
using lcehost::scratch;

// The forward's outputs: loss (per row, or the summed scalar), lse, lse_lo,
// correct, entropy; nullptr: no forward in this call.
struct LceStats {
  std::vector<mx::array>* outputs = nullptr;
  std::optional<mx::array> partials, argmax_partials, target_logit, row_loss; // scratch, or the loss itself
};

struct LceGrads {
  mx::array* dh = nullptr; // float32 [N, H]
  mx::array* dw = nullptr; // float32 [V, H]
  mx::array* dbias = nullptr; // float32 [V]
};

// One launch of the schedule (launch_plan.h lce_schedule).
void run_launch(LceCall& c, const mplan::LceLaunch& l, LceStats& f, const mx::array& lse,
                const mx::array& lse_lo, const mx::array* g, LceGrads& out, std::optional<mx::array>& dz_chunk) {
  using K = mplan::LceKernel;
  const mplan::LcePlan& P = c.plan;
  mx::array* dz = dz_chunk ? &*dz_chunk : nullptr; // set when the call has a backward
  LceArgs args = c.args;
  args.row0 = l.row0;
  if (l.kernel != K::forward && l.kernel != K::finish && l.kernel != K::sum) { // a chunk's
    args.chunk_rows = int(l.rows);
    args.accumulate = l.row0 > 0 ? 1 : 0;
    args.unit_cotangent = g == nullptr ? 1 : 0;
    // A differentiable lse: g is [2, N], the lse's cotangents after the rows'.
    args.lse_cotangent = g != nullptr && c.p.lse_grad ? 1 : 0;
  }
  switch (l.kernel) {
    case K::forward:
      lcehost::launch_forward(c, l, args, *f.partials, *f.target_logit, *f.argmax_partials);
      return;
    case K::finish:
      if (auto x = gpu::launch(c.s, [&](int t) { return mplan::lce_finish_plan(P, t); })) {
        auto& o = *f.outputs;
        auto& enc = x.encoder();
        enc.set_input_array(*f.partials, FL_LCE_FIN_PARTIALS);
        enc.set_input_array(*f.target_logit, FL_LCE_FIN_TARGET_LOGIT);
        enc.set_input_array(c.inputs[c.L.targets], FL_LCE_FIN_TARGETS);
        enc.set_output_array(*f.row_loss, FL_LCE_FIN_LOSS);
        enc.set_output_array(o[kLceLse], FL_LCE_FIN_LSE);
        enc.set_output_array(o[kLceLseLo], FL_LCE_FIN_LSE_LO);
        enc.set_output_array(o[kLceCorrect], FL_LCE_FIN_CORRECT);
        enc.set_output_array(o[kLceEntropy], FL_LCE_FIN_ENTROPY);
        enc.set_input_array(*f.argmax_partials, FL_LCE_FIN_ARGMAX_PARTIALS);
        enc.set_output_array(o[kLceArgmax], FL_LCE_FIN_ARGMAX);
        enc.set_output_array(o[kLceTargetLogit], FL_LCE_FIN_TARGET_OUT);
        enc.set_bytes(args, FL_LCE_FIN_ARGS);
        x.dispatch();
      }
      return;
    case K::sum: {
      // The per-row losses added by one group in a fixed order (the element-wise
      // losses' finish kernel); it always runs and writes 0 for N = 0.
      PwArgs sum = mplan::make_pw_args(uint64_t(P.rows), 0.0f, 0.0f, 1);
      sum.num_partials = uint64_t(P.rows);
      auto x = gpu::launch(c.s, [&](int t) { return mplan::pw_sum_finish_plan(uint64_t(P.rows), t); });
      auto& enc = x.encoder();
      enc.set_input_array(*f.row_loss, FL_PW_SUM_PARTIALS);
      enc.set_output_array((*f.outputs)[kLceLoss], FL_PW_SUM_OUT);
      enc.set_bytes(sum, FL_PW_SUM_ARGS);
      x.dispatch();
      return;
    }
    case K::dz:
    case K::logits: // the stored-Z path: the same kernel writes the chunk's logits
      args.logits_only = l.kernel == K::logits ? 1 : 0;
      if (auto x = gpu::launch(c.s, [&](int t) {
            return mplan::lce_dz_plan(c.hidden_dt, c.head, P, l.rows, t);
          })) {
        auto& enc = x.encoder();
        lcehost::bind_tile_inputs(c, enc);
        // logits_only: lse and g are never read (the forward writes lse later).
        enc.set_input_array(lse, FL_LCE_DZ_LSE);
        enc.set_input_array(lse_lo, FL_LCE_DZ_LSE_LO);
        enc.set_input_array(g ? *g : lse, FL_LCE_DZ_G);
        enc.set_output_array(*dz, FL_LCE_DZ_OUT);
        enc.set_bytes(args, FL_LCE_DZ_ARGS);
        x.dispatch();
      }
      return;
    case K::rows:
      if (auto x = gpu::launch(c.s, [&](int t) { return mplan::lce_rows_plan(P, l.rows, t); })) {
        auto& o = *f.outputs;
        auto& enc = x.encoder();
        enc.set_output_array(*dz, FL_LCE_ROWS_Z); // read, then overwritten with dZ
        enc.set_input_array(c.inputs[c.L.targets], FL_LCE_ROWS_TARGETS);
        enc.set_output_array(*f.row_loss, FL_LCE_ROWS_LOSS);
        enc.set_output_array(o[kLceLse], FL_LCE_ROWS_LSE);
        enc.set_output_array(o[kLceLseLo], FL_LCE_ROWS_LSE_LO);
        enc.set_output_array(o[kLceCorrect], FL_LCE_ROWS_CORRECT);
        enc.set_output_array(o[kLceEntropy], FL_LCE_ROWS_ENTROPY);
        enc.set_output_array(o[kLceArgmax], FL_LCE_ROWS_ARGMAX);
        enc.set_output_array(o[kLceTargetLogit], FL_LCE_ROWS_TARGET_OUT);
        enc.set_bytes(args, FL_LCE_ROWS_ARGS);
        x.dispatch();
      }
      return;
    case K::dbias:
      lcehost::launch_dbias(c, args, *dz, *out.dbias);
      return;
    case K::dh:
      lcehost::launch_dh(c, l, args, *dz, *out.dh);
      return;
    case K::dw:
      lcehost::launch_dw(c, args, *dz, *out.dw);
      return;
  }
}

// Every launch of the call in lce_schedule's order, committing the command
// buffer at each segment boundary. f.outputs null: no forward; lse, lse_lo:
// the forward's (written by it) or the vjp's inputs; g == nullptr: a unit
// cotangent.
void run(LceCall& c, LceStats& f, const mx::array& lse, const mx::array& lse_lo,
         const mx::array* g, LceGrads out) {
  mplan::LceWork w;
  w.forward = f.outputs != nullptr;
  w.sum_rows = w.forward && c.p.sum_rows;
  w.dh = out.dh != nullptr;
  w.dw = out.dw != nullptr;
  w.dbias = out.dbias != nullptr;
  const int64_t N = c.plan.rows;
  const bool stored_z = w.forward && (w.dh || w.dw || w.dbias); // lce_schedule's rule
  if (w.forward) {
    if (!stored_z) { // the forward tiles' per-split states
      f.partials = scratch(c, int64_t(c.plan.splits) * N * 4);
      f.argmax_partials = scratch(c, int64_t(c.plan.splits) * N * 2); // uint2, in float32 slots
      f.target_logit = scratch(c, N);
    }
    f.row_loss = c.p.sum_rows ? scratch(c, N) : (*f.outputs)[kLceLoss];
  }
  std::optional<mx::array> dz;
  if (w.dh || w.dw || w.dbias) {
    dz = scratch(c, c.plan.chunk_rows * c.plan.vocab);
  }
  lcehost::run_schedule(c, w, lse, [&](const mplan::LceLaunch& l) {
    run_launch(c, l, f, lse, lse_lo, g, out, dz);
  });
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
  LceCall c = lcehost::make_call(inputs, outputs, params_, lce_inputs(params_), stream());
  LceStats f;
  f.outputs = &outputs;
  // With gradients: the stored-Z path (lce_schedule), a unit cotangent.
  run(c, f, outputs[kLceLse], outputs[kLceLseLo], nullptr, {grads[0], grads[1], grads[2]});
}

void LinearCrossEntropyVJP::eval_gpu(const std::vector<mx::array>& inputs,
                                     std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  LceCall c = lcehost::make_call(inputs, outputs, params_, lce_inputs(params_), stream());
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
  LceStats none;
  run(c, none, lse, lse_lo, &g, out);
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
  auto x = gpu::launch(stream(), [&](int t) {
    return mplan::lce_scale_plan(gpu::kernel_dtype(out.dtype()), n, t);
  });
  if (!x) {
    return;
  }
  PwArgs args = mplan::make_pw_args(n, 0.0f, 0.0f, 0);
  auto& enc = x.encoder();
  enc.set_input_array(g, FL_LCE_SCALE_G);
  enc.set_input_array(grad, FL_LCE_SCALE_SRC);
  enc.set_output_array(out, FL_LCE_SCALE_OUT);
  enc.set_bytes(args, FL_LCE_SCALE_ARGS);
  x.dispatch();
}

} // namespace fl
