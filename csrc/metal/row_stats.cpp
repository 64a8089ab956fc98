// eval_gpu of the linear row statistics (ops/row_stats.h) on the linear CE's
// tiles (metal/linear_cross_entropy.metal, host side shared: metal/lce_host.h).
// Built only where MLX has Metal (_METAL_). One call, in lce_schedule's order:
//   forward   lce_forward with the row statistics' arguments (temperature,
//             shard, no targets: mplan::make_rs_args) -> fl_rs_fwd_finish
//   backward  per chunk of rows: rs_dz (the per-row cotangents) -> the linear
//             CE's fl_lce_dbias, lce_dh, lce_dw (those asked for)
// The same dispatch sequence runs under the CPU harness
// (tests/metal_kernels/lce_adaptor.cpp: rs_forward_run, rs_backward_run).
// The logits form (RowStats) and argmax have no Metal kernels: the op runs
// those on the CPU stream (ops/row_stats.cpp, kernel_stream).
#include "math/row_stats.h"
#include "metal/lce_host.h"
#include "ops/row_stats.h"

namespace fl {

namespace {

using lcehost::LceCall;

LceCall make_rs_call(const std::vector<mx::array>& inputs, const std::vector<mx::array>& outputs,
                     const RowStatsParams& p, mx::Stream s) {
  LceInputs L = linear_row_stats_inputs(p);
  LceCall c = lcehost::make_call(inputs, outputs, p.head, L, s);
  c.args = mplan::make_rs_args(c.plan, p.head.has_ignore_index, p.head.ignore_index, p.head.logit_softcap,
                               p.head.has_bias, p.temperature, p.sharded, p.vocab_start, p.has_targets);
  c.args.bits = p.head.bits;
  c.args.group_size = p.head.group_size;
  return c;
}

} // namespace

void LinearRowStats::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  LceCall c = make_rs_call(inputs, outputs, params_, stream());
  const int64_t N = c.plan.rows;
  mx::array partials = lcehost::scratch(c, int64_t(c.plan.splits) * N * 4);
  mx::array target_logit = lcehost::scratch(c, N);
  // (the linear CE's per-split argmaxes, which the tiles write; unread here)
  mx::array argmax_partials = lcehost::scratch(c, int64_t(c.plan.splits) * N * 2);
  // Statistics not asked for are written to one scratch row buffer (max and
  // argmax: argmax never reaches here, the op keeps it on the CPU).
  mx::array spare = lcehost::scratch(c, N);
  auto out = [&](int bit, int lo) -> mx::array& {
    int k = row_stat_output(params_.stats, bit);
    return k < 0 ? spare : outputs[k + lo];
  };
  mplan::LceWork w;
  w.forward = true;
  lcehost::run_schedule(c, w, spare, [&](const mplan::LceLaunch& l) {
    LceArgs args = c.args;
    args.row0 = l.row0;
    if (l.kernel == mplan::LceKernel::forward) {
      lcehost::launch_forward(c, l, args, partials, target_logit, argmax_partials);
      return;
    }
    if (l.kernel != mplan::LceKernel::finish) {
      throw std::logic_error("LinearRowStats::eval_gpu: a launch the forward schedule does not have");
    }
    if (auto x = gpu::launch(c.s, [&](int t) { return mplan::rs_finish_plan(c.plan, t); })) {
      auto& enc = x.encoder();
      enc.set_input_array(partials, FL_RS_FIN_PARTIALS);
      enc.set_input_array(target_logit, FL_RS_FIN_TARGET_LOGIT);
      enc.set_input_array(c.L.targets >= 0 ? inputs[c.L.targets] : partials, FL_RS_FIN_TARGETS);
      enc.set_output_array(out(flm::kStatLse, 0), FL_RS_FIN_LSE);
      enc.set_output_array(out(flm::kStatLse, 1), FL_RS_FIN_LSE_LO);
      enc.set_output_array(out(flm::kStatTarget, 0), FL_RS_FIN_TARGET);
      enc.set_output_array(out(flm::kStatLogitSum, 0), FL_RS_FIN_LOGIT_SUM);
      enc.set_output_array(out(flm::kStatExpected, 0), FL_RS_FIN_EXPECTED);
      enc.set_output_array(out(flm::kStatExpected, 1), FL_RS_FIN_EXPECTED_LO);
      enc.set_output_array(out(flm::kStatMax, 0), FL_RS_FIN_MAX);
      enc.set_bytes(args, FL_RS_FIN_ARGS);
      x.dispatch();
    }
  });
}

void LinearRowStatsVJP::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  LceCall c = make_rs_call(inputs, outputs, params_, stream());
  c.args.rs_cotangents = params_.cotangents;
  // The backward's inputs after the forward's (ops/row_stats.h): the pairs it
  // needs, then one cotangent per bit of params_.cotangents.
  size_t k = size_t(c.L.count);
  const int cot = params_.cotangents;
  const mx::array* saved[4] = {nullptr, nullptr, nullptr, nullptr}; // lse, lse_lo, expected, expected_lo
  if (cot & (flm::kStatLse | flm::kStatExpected)) {
    saved[0] = &inputs[k++];
    saved[1] = &inputs[k++];
  }
  if (cot & flm::kStatExpected) {
    saved[2] = &inputs[k++];
    saved[3] = &inputs[k++];
  }
  const mx::array* g[4] = {nullptr, nullptr, nullptr, nullptr};
  const int bits[4] = {flm::kStatLse, flm::kStatTarget, flm::kStatLogitSum, flm::kStatExpected};
  for (int i = 0; i < 4; ++i) {
    if (cot & bits[i]) g[i] = &inputs[k++];
  }
  const mx::array& any = inputs[c.L.hidden]; // bound where absent: never read
  for (const mx::array* a : saved) {
    if (a) gpu::require_dense(*a, "saved statistic");
  }
  for (const mx::array* a : g) {
    if (a) gpu::require_dense(*a, "cotangent");
  }
  size_t o = 0; // outputs: those flagged, in the order dH, dW, dbias
  mx::array* dh = params_.head.grad_hidden ? &outputs[o++] : nullptr;
  mx::array* dw = params_.head.grad_weight ? &outputs[o++] : nullptr;
  mx::array* dbias = params_.head.grad_bias ? &outputs[o++] : nullptr;
  mx::array dz = lcehost::scratch(c, c.plan.chunk_rows * c.plan.vocab);
  mplan::LceWork w;
  w.dh = dh != nullptr;
  w.dw = dw != nullptr;
  w.dbias = dbias != nullptr;
  lcehost::run_schedule(c, w, dz, [&](const mplan::LceLaunch& l) {
    const LceArgs args = lcehost::chunk_args(c, l);
    switch (l.kernel) {
      case mplan::LceKernel::dz:
        if (auto x = gpu::launch(c.s, [&](int t) {
              return mplan::rs_dz_plan(c.hidden_dt, c.head, c.plan, l.rows, t);
            })) {
          auto& enc = x.encoder();
          lcehost::bind_tile_inputs(c, enc);
          enc.set_input_array(saved[0] ? *saved[0] : any, FL_RS_DZ_LSE);
          enc.set_input_array(saved[1] ? *saved[1] : any, FL_RS_DZ_LSE_LO);
          enc.set_input_array(saved[2] ? *saved[2] : any, FL_RS_DZ_EXPECTED);
          enc.set_input_array(saved[3] ? *saved[3] : any, FL_RS_DZ_EXPECTED_LO);
          enc.set_input_array(g[0] ? *g[0] : any, FL_RS_DZ_G_LSE);
          enc.set_input_array(g[1] ? *g[1] : any, FL_RS_DZ_G_TARGET);
          enc.set_input_array(g[2] ? *g[2] : any, FL_RS_DZ_G_LOGIT_SUM);
          enc.set_input_array(g[3] ? *g[3] : any, FL_RS_DZ_G_EXPECTED);
          enc.set_output_array(dz, FL_RS_DZ_OUT);
          enc.set_bytes(args, FL_RS_DZ_ARGS);
          x.dispatch();
        }
        return;
      case mplan::LceKernel::dbias:
        lcehost::launch_dbias(c, args, dz, *dbias);
        return;
      case mplan::LceKernel::dh:
        lcehost::launch_dh(c, l, args, dz, *dh);
        return;
      case mplan::LceKernel::dw:
        lcehost::launch_dw(c, args, dz, *dw);
        return;
      default:
        throw std::logic_error("LinearRowStatsVJP::eval_gpu: a forward launch in the backward schedule");
    }
  });
}

// The logits form has no Metal kernels: its op puts it on the CPU stream
// (kernel_stream), so MLX never schedules these.
FL_CPU_ONLY(RowStats)
FL_CPU_ONLY(RowStatsVJP)

} // namespace fl
