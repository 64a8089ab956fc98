// CPU kernels of the fused cross-entropy: one pass over each row forward,
// one read + one write per element backward. Formulas: math/cross_entropy.h.
#include <algorithm>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/dispatch.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"
#include "math/cross_entropy.h"
#include "math/softcap.h"
#include "ops/cross_entropy.h"

namespace fl {

namespace {

using cpu::kChunk;
template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float>;

// Pointers and sizes of one call, captured by the dispatched task.
struct CeArgs {
  const void* logits;
  const int64_t* class_index; // index targets
  const void* target_probs; // soft targets, logits' dtype
  const float* class_weights; // null when absent
  int64_t rows;
  int num_classes;
  CrossEntropyParams params;
  flm::CeSmoothing smoothing;
  // forward outputs / backward inputs
  float* loss;
  float* lse;
  float* lse_lo; // lse + lse_lo = the row's exact max + log(sum)
  float* a_sum;
  // forward with params.stats (return_stats): of every row, ignored ones too
  float* stat_lse;
  float* entropy;
  int64_t* argmax;
  bool* correct;
  // backward only
  const float* g_loss;
  const float* g_lse;
  void* grad;
};

// What return_stats adds to a row's state (math/cross_entropy.h, "row
// statistics"): the entropy sum with the exp-sum it is moved with, and the
// first maximal logit (and, for soft targets, the first maximal probability).
struct RowStats {
  float sum = 0.0f;
  float ent = 0.0f;
  flm::ArgMax argmax = flm::argmax_empty();
  flm::ArgMax target_argmax = flm::argmax_empty();
};

// The state of one row (math/cross_entropy.h), in one pass over its logits
// (and its soft targets). Each chunk's gaps are taken against the chunk's
// shift (the running max after it), after moving the earlier sums there.
// kAll = false: the sums over all classes (r.all) are not kept; hard targets
// without label smoothing never read them (c_other = 0), and dropping them
// takes an add per element out of the hot loop.
// X: the logits' type (T, or float for capped logits); P: the soft targets'.
// kStats: also the row statistics of return_stats (RowStats), in the same loop.
template <bool kSoft, bool kWeighted, bool kAll, bool kStats = false, typename X, typename P>
FLM_INLINE flm::CeState row_state(const CeArgs& a, const X* x, const P* t,
                                  RowStats* stats = nullptr) {
  flm::CeState r = flm::ce_state_empty();
  float tbuf[kSoft ? kChunk : 1];
  r.lse = cpu::online_row(x, a.num_classes, [&](const float* xv, int64_t c0, int n, flm::MaxMove mv,
                                                 const float* next, float& next_max,
                                                 auto fuse) FL_LAMBDA_INLINE {
    const float* tv = nullptr;
    if constexpr (kSoft) {
      cpu::prefetch_chunk(t, c0 + cpu::kChunk, a.num_classes);
      tv = cpu::chunk_as_float(t + c0, n, tbuf);
    }
    const float* wv = kWeighted ? a.class_weights + c0 : nullptr;
    const float shift = mv.shift;
    float s = 0.0f, sw = 0.0f, gw = 0.0f, swt = 0.0f, gwt = 0.0f, nm = -flm::kInf, ent = 0.0f;
    if constexpr (kStats) {
      stats->ent = flm::entropy_sum_moved(stats->ent, stats->sum, mv);
      stats->argmax = cpu::chunk_argmax(stats->argmax, xv, c0, n);
      if constexpr (kSoft) {
        stats->target_argmax = cpu::chunk_argmax(stats->target_argmax, tv, c0, n);
      }
    }
    FL_SIMD_REDUCE(reduction(+ : s, sw, gw, swt, gwt, ent) reduction(max : nm))
    for (int i = 0; i < n; ++i) {
      if constexpr (decltype(fuse)::value) {
        nm = flm::fmax(nm, next[i]);
      }
      float v = xv[i];
      float w = kWeighted ? wv[i] : 1.0f;
      // e = -(shift - v) exactly, so the gaps subtract w * e instead of
      // adding w * (shift - v): same bits, one subtraction fewer.
      float e = v - shift; // <= 0, exact near the max
      float exp_e = flm::exp_nonpos_f32(e);
      s += exp_e;
      if constexpr (kStats) {
        ent += flm::entropy_term(exp_e, e);
      }
      if constexpr (kWeighted && kAll) {
        sw += w;
      }
      if constexpr (kAll) {
        gw -= flm::weighted(w, e);
      }
      if constexpr (kSoft) {
        float wt = w * tv[i];
        swt += wt;
        gwt -= flm::weighted(wt, e);
      }
    }
    if constexpr (!kWeighted) {
      sw = float(n); // sum_j 1: exact, no per-element add
    }
    if constexpr (kAll) {
      r.all = flm::gap_add(flm::gap_moved(r.all, mv), flm::GapSum{sw, gw});
    }
    r.target = flm::gap_add(flm::gap_moved(r.target, mv), flm::GapSum{swt, gwt});
    if constexpr (kStats) {
      stats->sum = stats->sum * mv.scale + s; // online_row's sum, kept here for the moves
      stats->ent += ent;
    }
    next_max = nm;
    return s;
  });
  return r;
}

FLM_INLINE int64_t row_class(const CeArgs& a, int64_t r) {
  return cpu::checked_class(a.class_index[r], a.num_classes, a.params.has_ignore_index,
                            a.params.ignore_index);
}

FLM_INLINE void store_row(const CeArgs& a, int64_t r, flm::CeRow row) {
  a.loss[r] = row.loss;
  a.lse[r] = row.lse;
  a.lse_lo[r] = row.lse_lo;
  a.a_sum[r] = row.a_sum;
}

// The loss of one row whose logits are x (type X): T, or float for capped ones.
template <bool kSoft, bool kWeighted, bool kAll, typename X, typename T>
FLM_INLINE flm::CeRow forward_row(const CeArgs& a, const X* x, const T* probs, int64_t t) {
  const auto c = a.smoothing;
  if constexpr (kSoft) {
    return flm::ce_finish_soft(row_state<true, kWeighted, true>(a, x, probs), c, a.params.z_loss);
  } else {
    flm::CeState st = row_state<false, kWeighted, kAll>(a, x, probs);
    float w_t = kWeighted ? a.class_weights[t] : 1.0f;
    return flm::ce_finish_hard(st, c, w_t, cpu::to_float(x[t]), a.params.z_loss);
  }
}

template <typename T, bool kSoft, bool kWeighted, bool kAll = true>
FL_VECTOR_CLONES void forward_rows(const CeArgs& a, int64_t begin, int64_t end) {
  const int K = a.num_classes;
  const float cap = a.params.logit_softcap;
  // Soft-capped logits: the row is capped once into this buffer (float32,
  // math/softcap.h) and the row loop runs on it as on float32 logits.
  std::vector<float> capped(cap != 0.0f ? size_t(K) : 0);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.logits) + r * K;
    const T* probs = kSoft ? static_cast<const T*>(a.target_probs) + r * K : nullptr;
    int64_t t = kSoft ? 0 : row_class(a, r);
    if (t < 0) {
      store_row(a, r, flm::ce_masked_row(t == cpu::kOutOfRangeRow)); // the row is never read
      continue;
    }
    if (cap != 0.0f) {
      float* z = capped.data();
      cpu::for_each_chunk(K, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
        float buf[kIsFloat<T> ? 1 : kChunk];
        const float* xv = cpu::chunk_as_float(x + c0, n, buf);
        FL_SIMD
        for (int j = 0; j < n; ++j) {
          z[c0 + j] = flm::softcap(xv[j], cap);
        }
      });
      store_row(a, r, forward_row<kSoft, kWeighted, kAll>(a, z, probs, t));
    } else {
      store_row(a, r, forward_row<kSoft, kWeighted, kAll>(a, x, probs, t));
    }
  }
}

// forward_rows with return_stats: every row's loss (as forward_rows) and its
// statistics from the same pass. Ignored and out-of-range rows are reduced too
// (their lse, entropy and argmax are those of their logits), and written with
// the masked row's loss.
template <typename T, bool kSoft, bool kWeighted>
FL_VECTOR_CLONES void forward_rows_stats(const CeArgs& a, int64_t begin, int64_t end) {
  const int K = a.num_classes;
  const float cap = a.params.logit_softcap;
  std::vector<float> capped(cap != 0.0f ? size_t(K) : 0);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.logits) + r * K;
    const T* probs = kSoft ? static_cast<const T*>(a.target_probs) + r * K : nullptr;
    int64_t t = kSoft ? 0 : row_class(a, r);
    auto row = [&](const auto* z) FL_LAMBDA_INLINE {
      RowStats rs;
      flm::CeState st = row_state<kSoft, kWeighted, true, true>(a, z, probs, &rs);
      flm::CeRow out;
      bool correct;
      if constexpr (kSoft) {
        out = flm::ce_finish_soft(st, a.smoothing, a.params.z_loss);
        correct = cpu::to_float(z[rs.target_argmax.index]) == st.lse.max;
      } else if (t >= 0) {
        float w_t = kWeighted ? a.class_weights[t] : 1.0f;
        float z_t = cpu::to_float(z[t]);
        out = flm::ce_finish_hard(st, a.smoothing, w_t, z_t, a.params.z_loss);
        correct = z_t == st.lse.max;
      } else {
        out = flm::ce_masked_row(t == cpu::kOutOfRangeRow);
        correct = false;
      }
      store_row(a, r, out);
      a.stat_lse[r] = flm::ce_finish_row(st.lse, 0.0f, 0.0f, 0.0f).lse;
      a.entropy[r] = flm::softmax_entropy(rs.sum, rs.ent);
      a.argmax[r] = rs.argmax.index;
      a.correct[r] = correct;
    };
    if (cap != 0.0f) {
      float* z = capped.data();
      cpu::for_each_chunk(K, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
        float buf[kIsFloat<T> ? 1 : kChunk];
        const float* xv = cpu::chunk_as_float(x + c0, n, buf);
        FL_SIMD
        for (int j = 0; j < n; ++j) {
          z[c0 + j] = flm::softcap(xv[j], cap);
        }
      });
      row(static_cast<const float*>(z));
    } else {
      row(x);
    }
  }
}

template <typename T, bool kSoft, bool kWeighted>
FL_VECTOR_CLONES void backward_rows(const CeArgs& a, int64_t begin, int64_t end) {
  const auto c = a.smoothing;
  const int K = a.num_classes;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.logits) + r * K;
    T* dx = static_cast<T*>(a.grad) + r * K;
    int64_t t = kSoft ? 0 : row_class(a, r);
    if (t < 0) {
      cpu::fill_masked_row(dx, K, t);
      continue;
    }
    float g = a.g_loss[r];
    float lse = a.lse[r];
    float lse_lo = a.lse_lo[r];
    float coef = flm::ce_row_softmax_coef(g, a.g_lse[r], a.a_sum[r], lse, a.params.z_loss);
    float g_other = g * c.c_other;
    // The gradient may overwrite the logits in place (allocate_or_reuse):
    // read the target's logit before the row loop writes over it.
    const float cap = a.params.logit_softcap;
    float x_t = kSoft ? 0.0f : cpu::to_float(x[t]);
    if (cap != 0.0f) {
      x_t = flm::softcap(x_t, cap);
    }
    const T* tp = kSoft ? static_cast<const T*>(a.target_probs) + r * K : nullptr;
    // 16-bit rows go through float32 chunks in L1 (widened and narrowed by
    // convert.h's native converters), so this loop is pure float32.
    float xbuf[kIsFloat<T> ? 1 : kChunk], tbuf[kSoft && !kIsFloat<T> ? kChunk : 1];
    float gbuf[kIsFloat<T> ? 1 : kChunk];
    cpu::for_each_chunk(K, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      cpu::prefetch_chunk(x, c0 + cpu::kChunk, K);
      if constexpr (kSoft) {
        cpu::prefetch_chunk(tp, c0 + cpu::kChunk, K);
      }
      const float* xv = cpu::chunk_as_float(x + c0, n, xbuf);
      const float* tv = kSoft ? cpu::chunk_as_float(tp + c0, n, tbuf) : nullptr;
      const float* wv = kWeighted ? a.class_weights + c0 : nullptr;
      float* gv = cpu::chunk_out(dx + c0, gbuf);
      if (cap != 0.0f) {
        // d/dx = d/dz * (1 - (z / c)^2) with z = softcap(x) (math/softcap.h)
        FL_SIMD
        for (int j = 0; j < n; ++j) {
          float w = kWeighted ? wv[j] : 1.0f;
          float q = kSoft ? g_other + g * c.c_target * tv[j] : g_other;
          float z = flm::softcap(xv[j], cap);
          gv[j] = flm::ce_grad(z, lse, lse_lo, coef, w * q) * flm::softcap_grad(z, cap);
        }
      } else {
        FL_SIMD
        for (int j = 0; j < n; ++j) {
          float w = kWeighted ? wv[j] : 1.0f;
          float q = kSoft ? g_other + g * c.c_target * tv[j] : g_other;
          gv[j] = flm::ce_grad(xv[j], lse, lse_lo, coef, w * q);
        }
      }
      cpu::store_chunk(gv, n, dx + c0);
    });
    if constexpr (!kSoft) {
      float w_t = kWeighted ? a.class_weights[t] : 1.0f;
      float q_t = g_other + g * c.c_target;
      float d_t = flm::ce_grad(x_t, lse, lse_lo, coef, w_t * q_t);
      dx[t] = cpu::from_float<T>(cap != 0.0f ? d_t * flm::softcap_grad(x_t, cap) : d_t);
    }
  }
}

using RowsFn = void (*)(const CeArgs&, int64_t, int64_t);

// The instantiation for a dtype and layout; each is cloned per instruction set.
// all_sums: the forward must keep the sums over all classes (c_other != 0).
template <typename T>
RowsFn pick_layout(const CrossEntropyParams& p, bool backward, bool all_sums) {
  if (!backward && p.stats) {
    if (p.soft_targets)
      return p.has_class_weights ? forward_rows_stats<T, true, true> : forward_rows_stats<T, true, false>;
    return p.has_class_weights ? forward_rows_stats<T, false, true> : forward_rows_stats<T, false, false>;
  }
  if (p.soft_targets && p.has_class_weights)
    return backward ? backward_rows<T, true, true> : forward_rows<T, true, true>;
  if (p.soft_targets)
    return backward ? backward_rows<T, true, false> : forward_rows<T, true, false>;
  if (backward)
    return p.has_class_weights ? backward_rows<T, false, true> : backward_rows<T, false, false>;
  if (p.has_class_weights)
    return all_sums ? forward_rows<T, false, true> : forward_rows<T, false, true, false>;
  return all_sums ? forward_rows<T, false, false> : forward_rows<T, false, false, false>;
}

RowsFn pick(mx::Dtype dtype, const CeArgs& a, bool backward) {
  RowsFn fn = nullptr;
  cpu::dispatch_float(dtype, [&](auto zero) {
    fn = pick_layout<decltype(zero)>(a.params, backward, a.smoothing.c_other != 0.0f);
  });
  return fn;
}

CeArgs make_args(const std::vector<mx::array>& inputs, const CrossEntropyParams& p) {
  const auto& logits = inputs[0];
  CeArgs a{};
  a.logits = logits.data<void>();
  a.num_classes = logits.ndim() ? logits.shape(-1) : 1;
  a.rows = a.num_classes ? logits.size() / a.num_classes : 0;
  if (p.soft_targets) {
    a.target_probs = inputs[1].data<void>();
  } else {
    a.class_index = inputs[1].data<int64_t>();
  }
  a.class_weights = p.has_class_weights ? inputs[2].data<float>() : nullptr;
  a.params = p;
  a.smoothing = flm::ce_smoothing(p.label_smoothing, p.smoothing_mode, a.num_classes);
  return a;
}

} // namespace

void CrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  CeArgs a = make_args(inputs, params_);
  a.loss = outputs[0].data<float>();
  a.lse = outputs[1].data<float>();
  a.lse_lo = outputs[2].data<float>();
  a.a_sum = outputs[3].data<float>();
  if (params_.stats) { // (outputs: CrossEntropy's contract, ops/cross_entropy.h)
    a.stat_lse = outputs[4].data<float>();
    a.entropy = outputs[5].data<float>();
    a.argmax = outputs[6].data<int64_t>();
    a.correct = outputs[7].data<bool>();
  }
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, a.num_classes,
                     [a, fn = pick(inputs[0].dtype(), a, false)](int64_t b, int64_t e) { fn(a, b, e); });
}

void CrossEntropyVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  cpu::allocate_or_reuse(grad, inputs[0], stream()); // the logits, when nothing else needs them
  CeArgs a = make_args(inputs, params_);
  size_t n = inputs.size();
  // inputs: logits, targets, [class_weights], lse, lse_lo, a_sum, g_loss, g_lse
  a.lse = const_cast<float*>(inputs[n - 5].data<float>());
  a.lse_lo = const_cast<float*>(inputs[n - 4].data<float>());
  a.a_sum = const_cast<float*>(inputs[n - 3].data<float>());
  a.g_loss = inputs[n - 2].data<float>();
  a.g_lse = inputs[n - 1].data<float>();
  a.grad = grad.data<void>();
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, a.num_classes,
                     [a, fn = pick(inputs[0].dtype(), a, true)](int64_t b, int64_t e) { fn(a, b, e); });
}

} // namespace fl
