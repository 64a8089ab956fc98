// CPU kernels of the fused linear distillation from an offline top-k teacher
// (contract: ops/linear_topk_distillation.h; maths: math/distillation.h, "an
// offline teacher"): the chunked-head driver with the student's head, and per
// row of a chunk's float32 logits: the student's scaled log-sum-exp (and the
// CE's at temperature 1), then the k teacher pairs (forward); dZ in place
// (backward): P q_j for every class, then -p_i at each teacher id. With
// gradients in the forward (requested by the vjp) each row's forward is
// followed at once by its dZ for a unit cotangent, while the row is in cache.
#include <vector>

#include "cpu/linear_distillation.h"

#include "cpu/distillation.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"
#include "cpu/vectorize.h"
#include "math/distillation.h"
#include "ops/linear_topk_distillation.h"

namespace fl {

namespace {

struct LtArgs {
  LinearTopkParams p;
  flm::DistillCoefs k;
  bool own_ce;
  int64_t vocab;
  int64_t topk;
  const int64_t* ids; // [N, k]
  const float* values; // [N, k]
  const int64_t* targets; // [N] or null
  float* loss;
  float* stats;
  const float* stats_in;
  const float* g; // per-row cotangents, or null: 1 (gradients in the forward)
};

// The row's class (0 without targets) or cpu::kIgnoredRow / kOutOfRangeRow;
// a teacher id outside [0, V) also makes the row out of range.
int64_t row_status(const LtArgs& a, int64_t row) {
  const int64_t* ids = a.ids + row * a.topk;
  for (int64_t i = 0; i < a.topk; ++i) {
    if (ids[i] < 0 || ids[i] >= a.vocab) {
      return cpu::kOutOfRangeRow;
    }
  }
  if (!a.targets) {
    return 0;
  }
  return cpu::checked_class(a.targets[row], int(a.vocab), a.p.d.has_ignore_index, a.p.d.ignore_index);
}

// logsumexp_i(c v_i) over the row's k stored values (renormalising).
float teacher_lse(const float* v, int64_t k, float c) {
  float m = -flm::kInf;
  for (int64_t i = 0; i < k; ++i) {
    m = flm::fmax(m, v[i]);
  }
  const float ref = flm::lse_ref(m);
  float sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) {
    sum += flm::scaled_exp(v[i], ref, c);
  }
  return c * ref + flm::log_f32(sum);
}

template <bool kOwnCe>
FL_VECTOR_CLONES void forward_rows(const LtArgs& a, const float* zc, int64_t row0, int64_t b, int64_t e) {
  const int64_t V = a.vocab;
  const float c = a.k.c;
  for (int64_t i = b; i < e; ++i) {
    const int64_t row = row0 + i;
    float* st_out = a.stats + row * flm::kDistillStats;
    const int64_t y = row_status(a, row);
    if (y < 0) {
      const bool bad = y == cpu::kOutOfRangeRow;
      flm::DistillStats m = flm::distill_masked_stats(bad);
      a.loss[row] = bad ? flm::kNaN : 0.0f;
      st_out[0] = m.s_ref, st_out[1] = m.s_log, st_out[2] = m.t_ref;
      st_out[3] = m.t_log, st_out[4] = m.e_q, st_out[5] = m.ce_log;
      continue;
    }
    const float* z = zc + i * V;
    flm::ScaledLse ls = flm::scaled_lse_empty();
    float ce_sum = 0.0f;
    cpu::for_each_chunk(int(V), [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      const float* zv = z + c0;
      const float m = flm::fmax(ls.max, cpu::chunk_max(zv, n));
      if constexpr (kOwnCe) {
        ce_sum = flm::scaled_lse_move(flm::ScaledLse{ls.max, ce_sum}, m, 1.0f).sum;
      }
      ls = flm::scaled_lse_move(ls, m, c);
      const float shift = flm::lse_ref(m);
      float es = 0.0f, e1 = 0.0f;
      FL_SIMD_REDUCE(reduction(+ : es, e1))
      for (int j = 0; j < n; ++j) {
        es += flm::scaled_exp(zv[j], shift, c);
        if constexpr (kOwnCe) {
          e1 += flm::exp_nonpos_f32(zv[j] - shift);
        }
      }
      ls.sum += es;
      ce_sum += e1;
    });
    flm::DistillStats st = flm::distill_stats(ls, flm::scaled_lse_empty(), kOwnCe ? ce_sum : ls.sum);
    const int64_t* ids = a.ids + row * a.topk;
    const float* v = a.values + row * a.topk;
    const float t_lse = a.p.renormalize ? teacher_lse(v, a.topk, c) : 0.0f;
    float d = 0.0f, mass = 0.0f;
    for (int64_t t = 0; t < a.topk; ++t) {
      const float lp = flm::topk_log_prob(v[t], c, t_lse, a.p.renormalize);
      const float lq = flm::scaled_log_prob(z[ids[t]], st.s_ref, st.s_log, c);
      d += flm::topk_term(lp, lq);
      mass += flm::exp_f32(lp);
    }
    st.t_ref = mass;
    st.t_log = t_lse;
    st.e_q = 0.0f;
    a.loss[row] = flm::distill_row_loss(d, a.k, st, a.k.alpha != 0.0f ? z[y] : 0.0f);
    st_out[0] = st.s_ref, st_out[1] = st.s_log, st_out[2] = st.t_ref;
    st_out[3] = st.t_log, st_out[4] = st.e_q, st_out[5] = st.ce_log;
  }
}

FL_VECTOR_CLONES void backward_rows(const LtArgs& a, float* zc, int64_t row0, int64_t b, int64_t e) {
  const int64_t V = a.vocab;
  const float c = a.k.c;
  for (int64_t i = b; i < e; ++i) {
    const int64_t row = row0 + i;
    float* dz = zc + i * V; // the logits, overwritten with dZ
    const int64_t y = row_status(a, row);
    if (y < 0) {
      cpu::fill_masked_row(dz, int(V), y);
      continue;
    }
    const float* sp = a.stats_in + row * flm::kDistillStats;
    const float s_ref = sp[0], s_log = sp[1], mass = sp[2], t_lse = sp[3], ce_log = sp[5];
    const float g = a.g ? a.g[row] : 1.0f;
    const float coef_q = g * a.k.d_scale * c * mass;
    const float coef_ce = g * a.k.alpha;
    if (coef_ce != 0.0f) {
      FL_SIMD
      for (int64_t j = 0; j < V; ++j) {
        const float x = dz[j];
        dz[j] = coef_q * flm::exp_nonpos_f32(flm::scaled_log_prob(x, s_ref, s_log, c)) +
                coef_ce * flm::exp_nonpos_f32((x - s_ref) - ce_log);
      }
    } else {
      FL_SIMD
      for (int64_t j = 0; j < V; ++j) {
        dz[j] = coef_q * flm::exp_nonpos_f32(flm::scaled_log_prob(dz[j], s_ref, s_log, c));
      }
    }
    const int64_t* ids = a.ids + row * a.topk;
    const float* v = a.values + row * a.topk;
    for (int64_t t = 0; t < a.topk; ++t) {
      dz[ids[t]] -= g * a.k.d_scale * c * flm::exp_f32(flm::topk_log_prob(v[t], c, t_lse, a.p.renormalize));
    }
    if (a.k.alpha != 0.0f) {
      dz[y] = flm::distill_grad_target(dz[y], a.k, g);
    }
  }
}

struct LtCall {
  cpu::ChunkedHeadCall call;
  LtArgs args;
};

LtCall make_call(const std::vector<mx::array>& inputs, const LinearTopkParams& p) {
  auto L = lt_inputs(p);
  LtCall c;
  c.call.head = cpu::distill_head(inputs, L.s_hidden, L.s_weight, L.s_scales, L.s_biases, L.s_global,
                                  p.student);
  const auto& ids = inputs[L.ids];
  c.args.topk = ids.shape(-1);
  c.call.rows = c.args.topk ? int64_t(ids.size()) / c.args.topk : 0;
  c.call.chunk_bytes = p.chunk_bytes;
  c.args.p = p;
  c.args.vocab = c.call.head.vocab;
  c.args.k.c = p.d.inv_temperature;
  c.args.k.beta = p.d.beta;
  c.args.k.d_scale = p.d.d_scale;
  c.args.k.alpha = p.d.alpha;
  c.args.own_ce = p.d.alpha != 0.0f && p.d.inv_temperature != 1.0f;
  c.args.ids = ids.data<int64_t>();
  c.args.values = inputs[L.values].data<float>();
  c.args.targets = p.d.has_targets ? inputs[L.targets].data<int64_t>() : nullptr;
  return c;
}

// pass: kForward, kBackward or kFused (each row's forward, then its dZ for
// g = 1 from the stats just written).
void run(const LtCall& c, cpu::DistillPass pass) {
  const LtArgs a = c.args;
  cpu::run_chunked_head(c.call, [&](const cpu::HeadChunk& ch) {
    ch.for_rows([&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        if (pass != cpu::DistillPass::kBackward) {
          if (a.own_ce) {
            forward_rows<true>(a, ch.z, ch.row0, i, i + 1);
          } else {
            forward_rows<false>(a, ch.z, ch.row0, i, i + 1);
          }
        }
        if (pass != cpu::DistillPass::kForward) {
          backward_rows(a, ch.z, ch.row0, i, i + 1);
        }
      }
    });
  });
}

} // namespace

void LinearTopkDistill::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cpu::allocate(outputs[0]);
  cpu::allocate(outputs[1]);
  auto grads = cpu::fused_grad_outputs(outputs, params_.grad_hidden, params_.grad_weight, requested);
  const bool fused = grads[0] || grads[1];
  LtCall c = make_call(inputs, params_);
  c.call.grads.d_hidden = grads[0];
  c.call.grads.d_weight = grads[1];
  c.args.stats = outputs[1].data<float>();
  c.args.stats_in = c.args.stats; // the fused pass reads the row's stats back
  c.args.g = nullptr;
  float* loss_out = outputs[0].data<float>();
  const bool sum_rows = params_.sum_rows;
  const auto pass = fused ? cpu::DistillPass::kFused : cpu::DistillPass::kForward;
  cpu::run_on_stream(stream(), inputs, outputs, [c, loss_out, sum_rows, pass]() mutable {
    std::vector<float> per_row(sum_rows ? size_t(c.call.rows) : 0);
    c.args.loss = sum_rows ? per_row.data() : loss_out;
    run(c, pass);
    if (sum_rows) {
      cpu::sum_loss_rows(per_row, loss_out);
    }
  });
}

void LinearTopkDistillVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  LtCall c = make_call(inputs, params_);
  const size_t n = inputs.size(); // ..., stats, g
  c.args.stats_in = inputs[n - 2].data<float>();
  c.args.g = inputs[n - 1].data<float>();
  size_t k = 0;
  c.call.grads.d_hidden = params_.grad_hidden ? outputs[k++].data<float>() : nullptr;
  c.call.grads.d_weight = params_.grad_weight ? outputs[k++].data<float>() : nullptr;
  cpu::run_on_stream(stream(), inputs, outputs, [c]() { run(c, cpu::DistillPass::kBackward); });
}

} // namespace fl
