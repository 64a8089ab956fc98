// CPU kernels of the distillation divergences (kl_div, jsd): per row, pass 1
// takes both log-sum-exps (one read of the student's and the teacher's row),
// pass 2 adds the divergence's terms (a second read, from L2 for rows up to
// ~100k classes); backward is one read of both rows and one write. Rows run
// in parallel; the loops are float32 over L1-sized chunks (16-bit rows are
// widened chunk by chunk, convert.h). Formulas: math/distillation.h.
#include <type_traits>
#include <vector>

#include "cpu/distillation.h"

#include "cpu/dispatch.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"

namespace fl {

namespace {

using cpu::kChunk;
using KdArgs = cpu::DistillRows;

template <typename X>
constexpr int kBuf = std::is_same_v<X, float> ? 1 : kChunk;

// A row's class: 0 without targets (no CE, nothing ignored), else a class
// in [0, V) or cpu::kIgnoredRow / cpu::kOutOfRangeRow.
FLM_INLINE int64_t row_class(const KdArgs& a, int64_t r) {
  if (!a.class_index) {
    return 0;
  }
  return cpu::checked_class(a.class_index[r], a.vocab, a.params.has_ignore_index,
                            a.params.ignore_index);
}

FLM_INLINE void store_stats(float* out, flm::DistillStats st) {
  out[0] = st.s_ref;
  out[1] = st.s_log;
  out[2] = st.t_ref;
  out[3] = st.t_log;
  out[4] = st.e_q;
  out[5] = st.ce_log;
}

FLM_INLINE flm::DistillStats load_stats(const float* in) {
  flm::DistillStats st;
  st.s_ref = in[0];
  st.s_log = in[1];
  st.t_ref = in[2];
  st.t_log = in[3];
  st.e_q = in[4];
  st.ce_log = in[5];
  return st;
}

// Pass 1: both rows' scaled log-sum-exps (and the student's at c = 1 when
// kOwnCe). Each chunk's maxima first (from L1), then its exps against them.
template <bool kOwnCe, typename S, typename T>
FLM_INLINE flm::DistillStats row_lse(const KdArgs& a, const S* s, const T* t) {
  const float c = a.coefs.c;
  flm::ScaledLse ls = flm::scaled_lse_empty(), lt = flm::scaled_lse_empty();
  float ce_sum = 0.0f; // relative to ls.max at c = 1
  float sbuf[kBuf<S>], tbuf[kBuf<T>];
  cpu::for_each_chunk(a.vocab, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
    cpu::prefetch_chunk(s, c0 + kChunk, a.vocab);
    cpu::prefetch_chunk(t, c0 + kChunk, a.vocab);
    const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
    const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
    float ms = flm::fmax(ls.max, cpu::chunk_max(sv, n));
    float mt = flm::fmax(lt.max, cpu::chunk_max(tv, n));
    if constexpr (kOwnCe) {
      ce_sum = flm::scaled_lse_move(flm::ScaledLse{ls.max, ce_sum}, ms, 1.0f).sum;
    }
    ls = flm::scaled_lse_move(ls, ms, c);
    lt = flm::scaled_lse_move(lt, mt, c);
    const float shs = flm::lse_ref(ms), sht = flm::lse_ref(mt);
    float es = 0.0f, et = 0.0f, e1 = 0.0f;
    FL_SIMD_REDUCE(reduction(+ : es, et, e1))
    for (int i = 0; i < n; ++i) {
      es += flm::scaled_exp(sv[i], shs, c);
      et += flm::scaled_exp(tv[i], sht, c);
      if constexpr (kOwnCe) {
        e1 += flm::exp_nonpos_f32(sv[i] - shs);
      }
    }
    ls.sum += es;
    lt.sum += et;
    ce_sum += e1;
  });
  return flm::distill_stats(ls, lt, kOwnCe ? ce_sum : ls.sum);
}

template <typename S, typename T, int kKind>
FL_VECTOR_CLONES void forward_rows(const KdArgs& a, int64_t begin, int64_t end) {
  const int V = a.vocab;
  const auto k = a.coefs;
  for (int64_t r = begin; r < end; ++r) {
    float* stats_out = a.stats + r * flm::kDistillStats;
    int64_t y = row_class(a, r);
    if (y < 0) {
      bool bad = y == cpu::kOutOfRangeRow;
      a.loss[r] = bad ? flm::kNaN : 0.0f;
      store_stats(stats_out, flm::distill_masked_stats(bad));
      continue;
    }
    const S* s = static_cast<const S*>(a.student) + r * V;
    const T* t = static_cast<const T*>(a.teacher) + r * V;
    flm::DistillStats st = a.ce_own_sum ? row_lse<true>(a, s, t) : row_lse<false>(a, s, t);
    // Pass 2: the terms, every log-probability known.
    float d = 0.0f, e = 0.0f;
    float sbuf[kBuf<S>], tbuf[kBuf<T>];
    cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      cpu::prefetch_chunk(s, c0 + kChunk, V);
      cpu::prefetch_chunk(t, c0 + kChunk, V);
      const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
      const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
      float dd = 0.0f, ee = 0.0f;
      FL_SIMD_REDUCE(reduction(+ : dd, ee))
      for (int i = 0; i < n; ++i) {
        float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
        float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
        flm::DistillTerm term = flm::distill_term<kKind>(lq, lp, k.beta);
        dd += term.d;
        ee += term.e;
      }
      d += dd;
      e += ee;
    });
    st.e_q = e;
    float s_y = k.alpha != 0.0f ? cpu::to_float(s[y]) : 0.0f;
    a.loss[r] = flm::distill_row_loss(d, k, st, s_y);
    store_stats(stats_out, st);
  }
}

template <typename S, typename T, int kKind>
FL_VECTOR_CLONES void backward_rows(const KdArgs& a, int64_t begin, int64_t end) {
  const int V = a.vocab;
  const auto k = a.coefs;
  for (int64_t r = begin; r < end; ++r) {
    S* dx = static_cast<S*>(a.grad) + r * V;
    int64_t y = row_class(a, r);
    if (y < 0) {
      cpu::fill_masked_row(dx, V, y);
      continue;
    }
    const S* s = static_cast<const S*>(a.student) + r * V;
    const T* t = static_cast<const T*>(a.teacher) + r * V;
    const flm::DistillStats st = load_stats(a.stats_in + r * flm::kDistillStats);
    const float g = a.g_loss[r];
    // The gradient may overwrite the student's logits in place
    // (allocate_or_reuse): the class's entry is computed before the loop.
    float d_y = 0.0f;
    if (k.alpha != 0.0f) {
      d_y = flm::distill_grad_target(
          flm::distill_grad<kKind>(cpu::to_float(s[y]), cpu::to_float(t[y]), st, k, g), k, g);
    }
    float sbuf[kBuf<S>], tbuf[kBuf<T>], gbuf[kBuf<S>];
    cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      cpu::prefetch_chunk(s, c0 + kChunk, V);
      cpu::prefetch_chunk(t, c0 + kChunk, V);
      const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
      const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
      float* gv = cpu::chunk_out(dx + c0, gbuf);
      FL_SIMD
      for (int i = 0; i < n; ++i) {
        gv[i] = flm::distill_grad<kKind>(sv[i], tv[i], st, k, g);
      }
      cpu::store_chunk(gv, n, dx + c0);
    });
    if (k.alpha != 0.0f) {
      dx[y] = cpu::from_float<S>(d_y);
    }
  }
}


// Forward and gradient for a unit cotangent in one visit of the row: pass 1
// as forward_rows; pass 2 each element's q and/or p once, for its term and its
// gradient (math/distillation.h's distill_term and distill_grad, the same
// expressions, so the same bits as forward_rows then backward_rows with g =
// 1). The forward KL's gradient q - p needs no row sum: pass 2 writes it.
// The reverse KL's and JSD's need E (a sum over the row): pass 2 keeps q and
// lq - lp (lq - lm) per element in a per-thread scratch row, pass 3 writes
// q (u - E) from them, with no transcendental (but the CE's softmax at
// temperature 1 when T != 1).
template <typename S, typename T, int kKind>
FL_VECTOR_CLONES void fused_rows(const KdArgs& a, int64_t begin, int64_t end) {
  const int V = a.vocab;
  const auto k = a.coefs;
  const float g_dz = k.d_scale * k.c; // (g d_scale c) at g = 1, as distill_grad
  constexpr bool kKeepsE = kKind != flm::kDistillForwardKL;
  thread_local std::vector<float> scratch;
  if (kKeepsE && scratch.size() < 2 * size_t(V)) {
    scratch.resize(2 * size_t(V));
  }
  for (int64_t r = begin; r < end; ++r) {
    float* stats_out = a.stats + r * flm::kDistillStats;
    S* dx = static_cast<S*>(a.grad) + r * V;
    int64_t y = row_class(a, r);
    if (y < 0) {
      bool bad = y == cpu::kOutOfRangeRow;
      a.loss[r] = bad ? flm::kNaN : 0.0f;
      store_stats(stats_out, flm::distill_masked_stats(bad));
      cpu::fill_masked_row(dx, V, y);
      continue;
    }
    const S* s = static_cast<const S*>(a.student) + r * V;
    const T* t = static_cast<const T*>(a.teacher) + r * V;
    flm::DistillStats st = a.ce_own_sum ? row_lse<true>(a, s, t) : row_lse<false>(a, s, t);
    // Read before any element is overwritten (dx may be s).
    const float s_y = k.alpha != 0.0f ? cpu::to_float(s[y]) : 0.0f;
    const float t_y = k.alpha != 0.0f ? cpu::to_float(t[y]) : 0.0f;
    float* q_keep = scratch.data();
    float* u_keep = q_keep + V;
    float d = 0.0f, e = 0.0f;
    float sbuf[kBuf<S>], tbuf[kBuf<T>], gbuf[kBuf<S>];
    cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      cpu::prefetch_chunk(s, c0 + kChunk, V);
      cpu::prefetch_chunk(t, c0 + kChunk, V);
      const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
      const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
      float dd = 0.0f, ee = 0.0f;
      if constexpr (kKind == flm::kDistillForwardKL) {
        float* gv = cpu::chunk_out(dx + c0, gbuf);
        FL_SIMD_REDUCE(reduction(+ : dd))
        for (int i = 0; i < n; ++i) {
          float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
          float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
          float q = flm::exp_nonpos_f32(lq);
          float p = flm::exp_nonpos_f32(lp);
          dd += flm::weighted(p, lp - lq);
          float grad = g_dz * (q - p);
          if (k.alpha != 0.0f) {
            grad += k.alpha * flm::exp_nonpos_f32((sv[i] - st.s_ref) - st.ce_log);
          }
          gv[i] = grad;
        }
        cpu::store_chunk(gv, n, dx + c0);
      } else {
        float* qv = q_keep + c0;
        float* uv = u_keep + c0;
        FL_SIMD_REDUCE(reduction(+ : dd, ee))
        for (int i = 0; i < n; ++i) {
          float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
          float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
          float q = flm::exp_nonpos_f32(lq);
          float u, term;
          if constexpr (kKind == flm::kDistillReverseKL) {
            u = lq - lp;
            term = flm::weighted(q, u);
            dd += term;
          } else {
            float p = flm::exp_nonpos_f32(lp);
            float lm = flm::log_f32(k.beta * p + (1.0f - k.beta) * q);
            u = lq - lm;
            term = flm::weighted(q, u);
            dd += k.beta * flm::weighted(p, lp - lm) + (1.0f - k.beta) * term;
          }
          ee += term;
          qv[i] = q;
          uv[i] = u;
        }
      }
      d += dd;
      e += ee;
    });
    st.e_q = kKeepsE ? e : 0.0f;
    a.loss[r] = flm::distill_row_loss(d, k, st, s_y);
    store_stats(stats_out, st);
    // The class's entry, from its logits (saved above): the same value
    // backward_rows gives it.
    const float d_y = k.alpha != 0.0f ? flm::distill_grad_target(
                                            flm::distill_grad<kKind>(s_y, t_y, st, k, 1.0f), k, 1.0f)
                                      : 0.0f;
    if constexpr (kKeepsE) {
      cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
        const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
        const float* qv = q_keep + c0;
        const float* uv = u_keep + c0;
        float* gv = cpu::chunk_out(dx + c0, gbuf);
        FL_SIMD
        for (int i = 0; i < n; ++i) {
          float dz = flm::weighted(qv[i], uv[i] - e);
          if constexpr (kKind == flm::kDistillJSD) {
            dz = (1.0f - k.beta) * dz;
          }
          float grad = g_dz * dz;
          if (k.alpha != 0.0f) {
            grad += k.alpha * flm::exp_nonpos_f32((sv[i] - st.s_ref) - st.ce_log);
          }
          gv[i] = grad;
        }
        cpu::store_chunk(gv, n, dx + c0);
      });
    }
    if (k.alpha != 0.0f) {
      dx[y] = cpu::from_float<S>(d_y);
    }
  }
}

template <typename S, typename T, int kKind>
cpu::DistillRowsFn pick_pass(cpu::DistillPass pass) {
  switch (pass) {
    case cpu::DistillPass::kForward:
      return forward_rows<S, T, kKind>;
    case cpu::DistillPass::kBackward:
      return backward_rows<S, T, kKind>;
    default:
      return fused_rows<S, T, kKind>;
  }
}

template <typename S, typename T>
cpu::DistillRowsFn pick_kind(int kind, cpu::DistillPass pass) {
  switch (kind) {
    case flm::kDistillForwardKL:
      return pick_pass<S, T, flm::kDistillForwardKL>(pass);
    case flm::kDistillReverseKL:
      return pick_pass<S, T, flm::kDistillReverseKL>(pass);
    default:
      return pick_pass<S, T, flm::kDistillJSD>(pass);
  }
}

KdArgs make_args(const std::vector<mx::array>& inputs, const DistillParams& p) {
  const int V = inputs[0].shape(-1);
  KdArgs a = cpu::distill_rows(p, V ? int64_t(inputs[0].size()) / V : 0, V);
  a.student = inputs[0].data<void>();
  a.teacher = inputs[1].data<void>();
  a.class_index = p.has_targets ? inputs[2].data<int64_t>() : nullptr;
  return a;
}

cpu::DistillRowsFn pick(mx::Dtype student, mx::Dtype teacher, int kind, bool backward) {
  return cpu::distill_rows_fn(student, teacher, kind,
                              backward ? cpu::DistillPass::kBackward : cpu::DistillPass::kForward);
}

} // namespace

namespace cpu {

DistillRows distill_rows(const DistillParams& p, int64_t rows, int vocab) {
  DistillRows a{};
  a.vocab = vocab;
  a.rows = rows;
  a.params = p;
  a.coefs.c = p.inv_temperature;
  a.coefs.beta = p.beta;
  a.coefs.d_scale = p.d_scale;
  a.coefs.alpha = p.alpha;
  a.ce_own_sum = p.alpha != 0.0f && p.inv_temperature != 1.0f;
  return a;
}

DistillRowsFn distill_rows_fn(mx::Dtype student, mx::Dtype teacher, int kind, DistillPass pass) {
  DistillRowsFn fn = nullptr;
  dispatch_float(student, [&](auto s0) {
    dispatch_float(teacher, [&](auto t0) {
      fn = pick_kind<decltype(s0), decltype(t0)>(kind, pass);
    });
  });
  return fn;
}

} // namespace cpu

void Distill::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  KdArgs a = make_args(inputs, params_);
  a.loss = outputs[0].data<float>();
  a.stats = outputs[1].data<float>();
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, 2 * int64_t(a.vocab),
                     [a, fn = pick(inputs[0].dtype(), inputs[1].dtype(), params_.kind, false)](
                         int64_t b, int64_t e) { fn(a, b, e); });
}

void DistillVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  cpu::allocate_or_reuse(grad, inputs[0], stream()); // the student's logits, when nothing else needs them
  KdArgs a = make_args(inputs, params_);
  size_t n = inputs.size(); // student, teacher, [targets], stats, g_loss
  a.stats_in = inputs[n - 2].data<float>();
  a.g_loss = inputs[n - 1].data<float>();
  a.grad = grad.data<void>();
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, 2 * int64_t(a.vocab),
                     [a, fn = pick(inputs[0].dtype(), inputs[1].dtype(), params_.kind, true)](
                         int64_t b, int64_t e) { fn(a, b, e); });
}

} // namespace fl
