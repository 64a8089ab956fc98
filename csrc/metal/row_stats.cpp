// eval_gpu of the row statistics (ops/row_stats.h). Built only where MLX has
// Metal (_METAL_).
// Linear form: the linear CE's tiles (metal/linear_cross_entropy.metal, host
// side shared: metal/lce_host.h). One call, in lce_schedule's order:
//   forward   lce_forward with the row statistics' arguments (temperature,
//             shard, no targets: mplan::make_rs_args) -> fl_rs_fwd_finish
//             (every statistic, argmax from the tiles' per-split argmaxes)
//   backward  per chunk of rows: rs_dz (the per-row cotangents) -> the linear
//             CE's fl_lce_dbias, lce_dh, lce_dw (those asked for)
// The same dispatch sequence runs under the CPU harness
// (tests/metal_kernels/lce_adaptor.cpp: rs_forward_run, rs_backward_run).
// Logits form: metal/row_stats.metal, one forward launch (a group per row) and
// one backward launch (tests/metal_kernels/row_stats_adaptor.cpp replays them).
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

// The backward's saved statistics and cotangents, read from `inputs` from
// index k (ops/row_stats.h: [lse, lse_lo] when lse or expected has a
// cotangent, [expected, expected_lo] when expected has, then one cotangent per
// bit of `cot`); absent ones stay null. Both are checked dense.
struct RsBackwardInputs {
  const mx::array* saved[4] = {nullptr, nullptr, nullptr, nullptr}; // lse, lse_lo, expected, expected_lo
  const mx::array* g[4] = {nullptr, nullptr, nullptr, nullptr};     // lse, target, logit_sum, expected
};

RsBackwardInputs rs_backward_inputs(const std::vector<mx::array>& inputs, size_t k, int cot) {
  RsBackwardInputs b;
  if (cot & (flm::kStatLse | flm::kStatExpected)) {
    b.saved[0] = &inputs[k++];
    b.saved[1] = &inputs[k++];
  }
  if (cot & flm::kStatExpected) {
    b.saved[2] = &inputs[k++];
    b.saved[3] = &inputs[k++];
  }
  const int bits[4] = {flm::kStatLse, flm::kStatTarget, flm::kStatLogitSum, flm::kStatExpected};
  for (int i = 0; i < 4; ++i) {
    if (cot & bits[i]) b.g[i] = &inputs[k++];
  }
  for (const mx::array* a : b.saved) {
    if (a) gpu::require_dense(*a, "saved statistic");
  }
  for (const mx::array* a : b.g) {
    if (a) gpu::require_dense(*a, "cotangent");
  }
  return b;
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
  // the tiles' per-split argmaxes (uint2, in float32 slots), merged by the finish
  mx::array argmax_partials = lcehost::scratch(c, int64_t(c.plan.splits) * N * 2);
  // Statistics not asked for are written to one scratch row buffer (two
  // floats a row: room for an int64 argmax).
  mx::array spare = lcehost::scratch(c, 2 * N);
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
      enc.set_input_array(argmax_partials, FL_RS_FIN_ARGMAX_PARTIALS);
      enc.set_output_array(out(flm::kStatArgmax, 0), FL_RS_FIN_ARGMAX);
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
  const RsBackwardInputs b = rs_backward_inputs(inputs, size_t(c.L.count), params_.cotangents);
  const auto& saved = b.saved;
  const auto& g = b.g;
  const mx::array& any = inputs[c.L.hidden]; // bound where absent: never read
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

namespace {

// The logits form's layout and arguments (the backward adds its cotangents).
struct RsLogits {
  mplan::KDtype dtype;
  int64_t rows;
  int vocab;
  RsArgs args;
};

RsLogits rs_logits(const std::vector<mx::array>& inputs, const RowStatsParams& p, int stats, int cotangents) {
  const auto& logits = inputs[0];
  RsLogits l;
  l.dtype = gpu::kernel_dtype(logits.dtype());
  l.vocab = logits.shape(-1);
  l.rows = l.vocab ? int64_t(logits.size()) / l.vocab : 0;
  l.args = mplan::make_rs_logits_args(l.vocab, p.has_targets, p.head.has_ignore_index, p.head.ignore_index,
                                      p.sharded, p.vocab_start, p.head.logit_softcap, p.temperature, stats,
                                      cotangents);
  gpu::require_dense(logits, "logits");
  if (p.has_targets) {
    gpu::require_dense(inputs[1], "targets");
    if (inputs[1].dtype() != mx::int64) {
      throw std::runtime_error("mlx_fused_losses: class indices must reach the kernel as int64");
    }
  }
  return l;
}

} // namespace

void RowStats::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  RsLogits l = rs_logits(inputs, params_, params_.stats, 0);
  auto x = gpu::launch(stream(), [&](int t) { return mplan::rs_logits_forward_plan(l.dtype, l.rows, l.vocab, t); });
  if (!x) {
    return;
  }
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_RS_LOG_FWD_LOGITS);
  enc.set_input_array(params_.has_targets ? inputs[1] : inputs[0], FL_RS_LOG_FWD_TARGETS);
  // A statistic not asked for: its slot gets the first output, which the
  // kernel then never writes through that slot (RsArgs::stats).
  auto out = [&](int bit, int lo) -> mx::array& {
    int k = row_stat_output(params_.stats, bit);
    return k < 0 ? outputs[0] : outputs[k + lo];
  };
  enc.set_output_array(out(flm::kStatLse, 0), FL_RS_LOG_FWD_LSE);
  enc.set_output_array(out(flm::kStatLse, 1), FL_RS_LOG_FWD_LSE_LO);
  enc.set_output_array(out(flm::kStatTarget, 0), FL_RS_LOG_FWD_TARGET);
  enc.set_output_array(out(flm::kStatLogitSum, 0), FL_RS_LOG_FWD_LOGIT_SUM);
  enc.set_output_array(out(flm::kStatExpected, 0), FL_RS_LOG_FWD_EXPECTED);
  enc.set_output_array(out(flm::kStatExpected, 1), FL_RS_LOG_FWD_EXPECTED_LO);
  enc.set_output_array(out(flm::kStatMax, 0), FL_RS_LOG_FWD_MAX);
  enc.set_output_array(out(flm::kStatArgmax, 0), FL_RS_LOG_FWD_ARGMAX);
  enc.set_bytes(l.args, FL_RS_LOG_FWD_ARGS);
  x.dispatch();
}

void RowStatsVJP::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  gpu::alloc_or_reuse(grad, inputs[0]);
  const int cot = params_.cotangents;
  RsLogits l = rs_logits(inputs, params_, 0, cot);
  // inputs after logits, [targets] (ops/row_stats.h): [lse, lse_lo], [expected,
  // expected_lo], then one cotangent per bit of `cot`; absent ones are bound
  // to the logits and never read.
  const RsBackwardInputs b = rs_backward_inputs(inputs, params_.has_targets ? 2 : 1, cot);
  const auto& saved = b.saved;
  const auto& g = b.g;
  auto x = gpu::launch(stream(), [&](int t) { return mplan::rs_logits_backward_plan(l.dtype, l.rows, l.vocab, t); });
  if (!x) {
    return;
  }
  const mx::array& any = inputs[0];
  auto& enc = x.encoder();
  enc.set_input_array(inputs[0], FL_RS_LOG_BWD_LOGITS);
  enc.set_input_array(params_.has_targets ? inputs[1] : any, FL_RS_LOG_BWD_TARGETS);
  enc.set_input_array(saved[0] ? *saved[0] : any, FL_RS_LOG_BWD_LSE);
  enc.set_input_array(saved[1] ? *saved[1] : any, FL_RS_LOG_BWD_LSE_LO);
  enc.set_input_array(saved[2] ? *saved[2] : any, FL_RS_LOG_BWD_EXPECTED);
  enc.set_input_array(saved[3] ? *saved[3] : any, FL_RS_LOG_BWD_EXPECTED_LO);
  enc.set_input_array(g[0] ? *g[0] : any, FL_RS_LOG_BWD_G_LSE);
  enc.set_input_array(g[1] ? *g[1] : any, FL_RS_LOG_BWD_G_TARGET);
  enc.set_input_array(g[2] ? *g[2] : any, FL_RS_LOG_BWD_G_LOGIT_SUM);
  enc.set_input_array(g[3] ? *g[3] : any, FL_RS_LOG_BWD_G_EXPECTED);
  enc.set_output_array(grad, FL_RS_LOG_BWD_GRAD);
  enc.set_bytes(l.args, FL_RS_LOG_BWD_ARGS);
  x.dispatch();
}

} // namespace fl
