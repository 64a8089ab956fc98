// CPU kernels of the softmax focal loss: one pass per row forward (online
// log-sum-exp that also keeps the non-target mass, so 1 - p_t has no
// cancellation), one read + one write per element backward.
#include "cpu/dispatch.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"
#include "math/focal.h"
#include "ops/softmax_focal.h"

namespace fl {

namespace {

struct FocalArgs {
  const void* logits;
  const int64_t* class_index;
  const float* class_alpha; // null: scalar params.alpha
  int64_t rows;
  int num_classes;
  SoftmaxFocalParams params;
  float* loss;
  float* lse;
  float* lse_lo;
  float* coef;
  const float* g_loss;
  void* grad;
};

FLM_INLINE int64_t row_class(const FocalArgs& a, int64_t r) {
  return cpu::checked_class(a.class_index[r], a.num_classes, a.params.has_ignore_index,
                            a.params.ignore_index);
}

template <typename T>
FL_VECTOR_CLONES void forward_rows(const FocalArgs& a, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    int64_t t = row_class(a, r);
    flm::FocalRow row;
    if (t < 0) {
      row = flm::softmax_focal_masked_row(t == cpu::kOutOfRangeRow);
    } else {
      const T* x = static_cast<const T*>(a.logits) + r * a.num_classes;
      float s_other = 0.0f;
      auto st = cpu::online_row(x, a.num_classes, [&](const float* xv, int64_t c0, int n,
                                                      flm::MaxMove mv, const float* next,
                                                      float& next_max, auto fuse) FL_LAMBDA_INLINE {
        const float shift = mv.shift;
        float s = 0.0f, so = 0.0f, nm = -flm::kInf;
        int64_t local_t = t - c0; // the target's index in this chunk, if inside
        if (local_t >= 0 && local_t < n) {
          FL_SIMD_REDUCE(reduction(+ : s, so) reduction(max : nm))
          for (int i = 0; i < n; ++i) {
            if constexpr (decltype(fuse)::value) {
              nm = flm::fmax(nm, next[i]); // online_row: the next chunk's max
            }
            float e = flm::exp_nonpos_f32(xv[i] - shift);
            s += e;
            so += i == local_t ? 0.0f : e;
          }
        } else {
          // Every chunk but the target's: the non-target sum is the sum
          // itself (the same bits: the masked loop would add the same terms
          // in the same lanes), without a compare and select per element.
          FL_SIMD_REDUCE(reduction(+ : s) reduction(max : nm))
          for (int i = 0; i < n; ++i) {
            if constexpr (decltype(fuse)::value) {
              nm = flm::fmax(nm, next[i]);
            }
            s += flm::exp_nonpos_f32(xv[i] - shift);
          }
          so = s;
        }
        s_other = s_other * mv.scale + so;
        next_max = nm;
        return s;
      });
      float alpha_t = a.class_alpha ? a.class_alpha[t] : a.params.alpha;
      row = flm::softmax_focal_finish_row(st.max, st.sum, s_other, cpu::to_float(x[t]), alpha_t,
                                          a.params.gamma);
    }
    a.loss[r] = row.loss;
    a.lse[r] = row.lse;
    a.lse_lo[r] = row.lse_lo;
    a.coef[r] = row.coef;
  }
}

template <typename T>
FL_VECTOR_CLONES void backward_rows(const FocalArgs& a, int64_t begin, int64_t end) {
  const int K = a.num_classes;
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.logits) + r * K;
    T* dx = static_cast<T*>(a.grad) + r * K;
    int64_t t = row_class(a, r);
    if (t < 0) {
      cpu::fill_masked_row(dx, K, t);
      continue;
    }
    float lse = a.lse[r];
    float lse_lo = a.lse_lo[r];
    float coef = a.g_loss[r] * a.coef[r];
    // 16-bit rows go through float32 chunks in L1 (see convert.h).
    float xbuf[std::is_same_v<T, float> ? 1 : cpu::kChunk];
    float gbuf[std::is_same_v<T, float> ? 1 : cpu::kChunk];
    cpu::for_each_chunk(K, [&](int64_t c0, int n) FL_LAMBDA_INLINE {
      cpu::prefetch_chunk(x, c0 + cpu::kChunk, K);
      const float* xv = cpu::chunk_as_float(x + c0, n, xbuf);
      float* gv = cpu::chunk_out(dx + c0, gbuf);
      const int64_t local_t = t - c0; // the target's index in this chunk, if inside
      FL_SIMD
      for (int j = 0; j < n; ++j) {
        gv[j] = flm::softmax_focal_grad(xv[j], lse, lse_lo, coef, j == local_t);
      }
      cpu::store_chunk(gv, n, dx + c0);
    });
  }
}

using RowsFn = void (*)(const FocalArgs&, int64_t, int64_t);

RowsFn pick(mx::Dtype dtype, bool backward) {
  RowsFn fn = nullptr;
  cpu::dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    fn = backward ? backward_rows<T> : forward_rows<T>;
  });
  return fn;
}

FocalArgs make_args(const std::vector<mx::array>& inputs, const SoftmaxFocalParams& p) {
  FocalArgs a{};
  a.logits = inputs[0].data<void>();
  a.num_classes = inputs[0].shape(-1);
  a.rows = inputs[0].size() / a.num_classes;
  a.class_index = inputs[1].data<int64_t>();
  a.params = p;
  return a;
}

} // namespace

void SoftmaxFocal::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  FocalArgs a = make_args(inputs, params_);
  a.class_alpha = params_.has_class_alpha ? inputs[2].data<float>() : nullptr;
  a.loss = outputs[0].data<float>();
  a.lse = outputs[1].data<float>();
  a.lse_lo = outputs[2].data<float>();
  a.coef = outputs[3].data<float>();
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, a.num_classes,
                     [a, fn = pick(inputs[0].dtype(), false)](int64_t b, int64_t e) { fn(a, b, e); });
}

void SoftmaxFocalVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  cpu::allocate_or_reuse(grad, inputs[0], stream()); // the logits, when nothing else needs them
  FocalArgs a = make_args(inputs, params_);
  a.lse = const_cast<float*>(inputs[2].data<float>());
  a.lse_lo = const_cast<float*>(inputs[3].data<float>());
  a.coef = const_cast<float*>(inputs[4].data<float>());
  a.g_loss = inputs[5].data<float>();
  a.grad = grad.data<void>();
  cpu::dispatch_rows(stream(), inputs, outputs, a.rows, a.num_classes,
                     [a, fn = pick(inputs[0].dtype(), true)](int64_t b, int64_t e) { fn(a, b, e); });
}

} // namespace fl
