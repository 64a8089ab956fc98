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

// What pass 1 keeps of a row for pass 2 (one per thread, reused row after
// row; L2-resident for rows up to ~100k classes): each element's exp against
// its chunk's shift, exp(c (x_j - lse_ref(m_k))) with m_k the running max
// after chunk k (student: es, teacher: et), and m_k (ms, mt). Pass 2 turns
// them into q_j = es_j f_k, p_j = et_j f_k with one exp per chunk,
// f_k = exp(c (lse_ref(m_k) - ref) - log_sum) <= 1 (0 while m_k = -inf: the
// chunk's exps are all 0 then): no exp per element in pass 2. A term that
// flushes to 0 in pass 1 is below FLT_MIN times f_k <= 1: it would flush in
// pass 2 too.
struct RowStash {
  float* es;
  float* et;
  float* ms;
  float* mt;
};

FLM_INLINE RowStash row_stash(int V) {
  thread_local std::vector<float> buf;
  const size_t chunks = (size_t(V) + kChunk - 1) / kChunk;
  const size_t need = 2 * size_t(V) + 2 * chunks;
  if (buf.size() < need) {
    buf.resize(need);
  }
  float* b = buf.data();
  return {b, b + V, b + 2 * size_t(V), b + 2 * size_t(V) + chunks};
}

// f_k of a chunk whose running max was m (see RowStash).
FLM_INLINE float chunk_factor(float m, float ref, float log_sum, float c) {
  return m == -flm::kInf ? 0.0f : flm::exp_nonpos_f32(c * (flm::lse_ref(m) - ref) - log_sum);
}

// Pass 1: both rows' scaled log-sum-exps (and the student's at c = 1 when
// kOwnCe). Each chunk's maxima first (from L1), then its exps against them,
// kept in x for pass 2.
template <bool kOwnCe, typename S, typename T>
FLM_INLINE flm::DistillStats row_lse(const KdArgs& a, const S* s, const T* t, RowStash x) {
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
    x.ms[c0 / kChunk] = ms;
    x.mt[c0 / kChunk] = mt;
    const float shs = flm::lse_ref(ms), sht = flm::lse_ref(mt);
    float* esv = x.es + c0;
    float* etv = x.et + c0;
    float es = 0.0f, et = 0.0f, e1 = 0.0f;
    FL_SIMD_REDUCE(reduction(+ : es, et, e1))
    for (int i = 0; i < n; ++i) {
      const float qe = flm::scaled_exp(sv[i], shs, c);
      const float pe = flm::scaled_exp(tv[i], sht, c);
      esv[i] = qe;
      etv[i] = pe;
      es += qe;
      et += pe;
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
  const RowStash x = row_stash(V);
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
    flm::DistillStats st = a.ce_own_sum ? row_lse<true>(a, s, t, x) : row_lse<false>(a, s, t, x);
    // Pass 2: the terms, every log-probability known (q and p from pass 1).
    float d = 0.0f, e = 0.0f;
    float sbuf[kBuf<S>], tbuf[kBuf<T>];
    cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
      const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
      const float fs = chunk_factor(x.ms[c0 / kChunk], st.s_ref, st.s_log, k.c);
      const float ft = chunk_factor(x.mt[c0 / kChunk], st.t_ref, st.t_log, k.c);
      const float* esv = x.es + c0;
      const float* etv = x.et + c0;
      float dd = 0.0f, ee = 0.0f;
      FL_SIMD_REDUCE(reduction(+ : dd, ee))
      for (int i = 0; i < n; ++i) {
        float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
        float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
        flm::DistillTerm term = flm::distill_term_qp<kKind>(lq, lp, esv[i] * fs, etv[i] * ft, k.beta);
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


// The CE's part of a chunk's gradient, g_ce softmax(s)_j at temperature 1
// (distill_grad's second term), into ce: q_j = qe_j f itself when T = 1
// (ce_log is then s_log), else its own exp. Its own loops, run only with
// alpha > 0 (the main loops carry no select), and before the chunk's
// gradient is written: that may overwrite s (the linear forms' dZ in place).
FLM_INLINE void ce_softmax(float* ce, const float* sv, const float* qe, float f, int n, float g_ce,
                           bool own_ce, const flm::DistillStats& st) {
  if (own_ce) {
    FL_SIMD
    for (int i = 0; i < n; ++i) {
      ce[i] = g_ce * flm::exp_nonpos_f32((sv[i] - st.s_ref) - st.ce_log);
    }
  } else {
    FL_SIMD
    for (int i = 0; i < n; ++i) {
      ce[i] = g_ce * (qe[i] * f);
    }
  }
}

FLM_INLINE void add_chunk(float* gv, const float* ce, int n) {
  FL_SIMD
  for (int i = 0; i < n; ++i) {
    gv[i] += ce[i];
  }
}

// Forward and gradient for the cotangent a.fused_g of every row (1 for the
// linear forms; the logits primitive's row scale) in one visit of the row:
// pass 1 as forward_rows (keeping its exps); pass 2 each element's q and p
// from them (no exp), for its term and its gradient (math/distillation.h's
// distill_term_qp and distill_grad's expressions). The forward KL's gradient
// q - p needs no row sum: pass 2 writes it. The reverse KL's and JSD's need
// E (a sum over the row): pass 2 keeps q and lq - lp (lq - lm) in place of
// the row's exps, pass 3 writes q (u - E) from them, with no transcendental.
// The CE's softmax at temperature 1 is q itself when T = 1 (ce_log is then
// s_log), else one exp per element.
template <typename S, typename T, int kKind>
FL_VECTOR_CLONES void fused_rows(const KdArgs& a, int64_t begin, int64_t end) {
  const int V = a.vocab;
  const auto k = a.coefs;
  const float g = a.fused_g; // every row's cotangent
  const float g_dz = g * k.d_scale * k.c; // as distill_grad
  const float g_ce = g * k.alpha;
  const bool own_ce = a.ce_own_sum;
  constexpr bool kKeepsE = kKind != flm::kDistillForwardKL;
  const RowStash x = row_stash(V);
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
    flm::DistillStats st = own_ce ? row_lse<true>(a, s, t, x) : row_lse<false>(a, s, t, x);
    // Read before any element is overwritten (dx may be s).
    const float s_y = k.alpha != 0.0f ? cpu::to_float(s[y]) : 0.0f;
    const float t_y = k.alpha != 0.0f ? cpu::to_float(t[y]) : 0.0f;
    float d = 0.0f, e = 0.0f;
    float sbuf[kBuf<S>], tbuf[kBuf<T>], gbuf[kBuf<S>], cebuf[kChunk];
    cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
      const float* tv = cpu::chunk_as_float(t + c0, n, tbuf);
      const float fs = chunk_factor(x.ms[c0 / kChunk], st.s_ref, st.s_log, k.c);
      const float ft = chunk_factor(x.mt[c0 / kChunk], st.t_ref, st.t_log, k.c);
      float* esv = x.es + c0;
      float* etv = x.et + c0;
      float dd = 0.0f, ee = 0.0f;
      if constexpr (kKind == flm::kDistillForwardKL) {
        if (k.alpha != 0.0f) {
          ce_softmax(cebuf, sv, esv, fs, n, g_ce, own_ce, st);
        }
        float* gv = cpu::chunk_out(dx + c0, gbuf);
        FL_SIMD_REDUCE(reduction(+ : dd))
        for (int i = 0; i < n; ++i) {
          float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
          float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
          float q = esv[i] * fs;
          float p = etv[i] * ft;
          dd += flm::distill_term_qp<kKind>(lq, lp, q, p, k.beta).d;
          gv[i] = g_dz * (q - p);
        }
        if (k.alpha != 0.0f) {
          add_chunk(gv, cebuf, n);
        }
        cpu::store_chunk(gv, n, dx + c0);
      } else {
        FL_SIMD_REDUCE(reduction(+ : dd, ee))
        for (int i = 0; i < n; ++i) {
          float lq = flm::scaled_log_prob(sv[i], st.s_ref, st.s_log, k.c);
          float lp = flm::scaled_log_prob(tv[i], st.t_ref, st.t_log, k.c);
          float q = esv[i] * fs;
          float p = etv[i] * ft;
          flm::DistillTerm term = flm::distill_term_qp<kKind>(lq, lp, q, p, k.beta);
          dd += term.d;
          ee += term.e;
          float u = lq - lp;
          if constexpr (kKind == flm::kDistillJSD) {
            u = lq - flm::log_f32(k.beta * p + (1.0f - k.beta) * q); // lq - lm, as the term's
          }
          esv[i] = q;
          etv[i] = u;
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
                                            flm::distill_grad<kKind>(s_y, t_y, st, k, g), k, g)
                                      : 0.0f;
    if constexpr (kKeepsE) {
      cpu::for_each_chunk(V, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
        const float* sv = cpu::chunk_as_float(s + c0, n, sbuf);
        const float* qv = x.es + c0;
        const float* uv = x.et + c0;
        if (k.alpha != 0.0f) {
          ce_softmax(cebuf, sv, qv, 1.0f, n, g_ce, own_ce, st);
        }
        float* gv = cpu::chunk_out(dx + c0, gbuf);
        FL_SIMD
        for (int i = 0; i < n; ++i) {
          float dz = flm::weighted(qv[i], uv[i] - e);
          if constexpr (kKind == flm::kDistillJSD) {
            dz = (1.0f - k.beta) * dz;
          }
          gv[i] = g_dz * dz;
        }
        if (k.alpha != 0.0f) {
          add_chunk(gv, cebuf, n);
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
  cpu::allocate(outputs[0]);
  cpu::allocate(outputs[1]);
  KdArgs a = make_args(inputs, params_);
  a.stats = outputs[1].data<float>();
  // A declared gradient nobody requested: no memory, no work.
  const bool fused = params_.grad_student && requested;
  if (fused) {
    cpu::allocate(outputs[2]);
    a.grad = outputs[2].data<void>();
  }
  auto fn = cpu::distill_rows_fn(inputs[0].dtype(), inputs[1].dtype(), params_.kind,
                                 fused ? cpu::DistillPass::kFused : cpu::DistillPass::kForward);
  if (!params_.sum_rows) {
    a.loss = outputs[0].data<float>();
    cpu::dispatch_rows(stream(), inputs, outputs, a.rows, 2 * int64_t(a.vocab),
                       [a, fn](int64_t b, int64_t e) { fn(a, b, e); });
    return;
  }
  const float* scale = params_.has_scale ? inputs[params_.has_targets ? 3 : 2].data<float>() : nullptr;
  float* total = outputs[0].data<float>();
  const int64_t grain = cpu::rows_per_task(2 * int64_t(a.vocab));
  cpu::dispatch_task(stream(), inputs, outputs, [a, fn, scale, total, grain]() mutable {
    // The rows' values first (O(rows)), then added in a fixed order in
    // double: the sum does not depend on the thread count.
    std::vector<float> per_row(size_t(a.rows));
    a.loss = per_row.data();
    a.fused_g = scale ? *scale : 1.0f;
    cpu::parallel_for(a.rows, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
    double sum = 0.0;
    for (float v : per_row) {
      sum += v;
    }
    *total = scale ? float(sum) * *scale : float(sum);
  });
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
