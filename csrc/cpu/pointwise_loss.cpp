// CPU kernels of the element-wise losses: forward reads both inputs once and
// writes the loss (or a fused float32 sum); backward reads them once more and
// writes the gradient once. Formulas: math/smooth_l1.h, math/focal.h.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/convert.h"
#include "cpu/dtype.h"
#include "cpu/dispatch.h"
#include "cpu/output_buffer.h"
#include "cpu/vectorize.h"
#include "math/focal.h"
#include "ops/broadcast_groups.h"
#include "math/smooth_l1.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/pointwise_loss.h"

namespace fl {

namespace {

using cpu::kChunk;

// A target that broadcasts to the predictions' shape, read in place through
// its broadcast groups (ops/broadcast_groups.h, the rule the Metal kernels use).
struct TargetLayout {
  std::vector<int64_t> size;
  std::vector<int64_t> stride;

  TargetLayout(const mx::Shape& pred, const mx::Shape& target) {
    BroadcastGroups g = collapse_broadcast_groups(pred, target);
    size = std::move(g.size);
    stride = std::move(g.stride);
    if (size.empty()) {
      size.push_back(1);
      stride.push_back(0);
    }
  }

  // The target element that meets the predictions' flat index i.
  int64_t offset(int64_t i) const {
    int64_t off = 0;
    for (size_t g = 0; g < size.size() && i > 0; ++g) {
      off += (i % size[g]) * stride[g];
      i /= size[g];
    }
    return off;
  }
};

// The targets that meet predictions [c0, c0 + n) as float32: the target's own
// chunk where it has the predictions' shape (layout null), else gathered into
// `buf` (kChunk floats) run by run along the innermost group: copied where the
// target advances, replicated where it is broadcast. The loops that read the
// result are the same either way, so a broadcast target gives the very same
// numbers as the caller's full-size copy of it would.
template <typename T>
FLM_INLINE const float* target_chunk(const TargetLayout* layout, const T* t, int64_t c0, int n,
                                     float* buf) {
  if (!layout) {
    return cpu::chunk_as_float(t + c0, n, buf);
  }
  const int64_t inner = layout->size[0];
  const bool advances = layout->stride[0] != 0;
  for (int k = 0; k < n;) {
    int64_t i = c0 + k;
    int m = int(std::min<int64_t>(n - k, inner - i % inner));
    const T* run = t + layout->offset(i);
    if (!advances) {
      std::fill_n(buf + k, m, cpu::to_float(*run));
    } else if constexpr (std::is_same_v<T, float>) {
      std::memcpy(buf + k, run, sizeof(float) * size_t(m));
    } else {
      cpu::widen(run, m, buf + k);
    }
    k += m;
  }
  return buf;
}

struct PwArgs {
  const void* pred;
  const void* target;
  const TargetLayout* layout; // null: the target has the predictions' shape
  int64_t size;
  PointwiseParams params;
  void* loss; // element-wise loss (predictions' dtype), or float32 per-block partial sums
  const void* cotan; // backward: element-wise (its own dtype), or one float32 scalar
  void* grad;
};

// Fixed block size for the fused sum: the partial sums, and so the result,
// do not depend on how many threads ran.
constexpr int64_t kSumBlock = 1 << 16;

// The CPU kernels' own kind: the sigmoid focal loss with gamma = 2 gets its
// own instantiation (m * m instead of a pow per element).
constexpr int kFocalGammaTwo = 3;

template <int kKind>
FLM_INLINE float loss_of(float x, float t, const PointwiseParams& p) {
  if constexpr (kKind == kFocalGammaTwo) {
    return flm::sigmoid_focal_loss(x, t, p.param0, flm::GammaTwo{});
  } else if constexpr (kKind == int(PointwiseKind::SigmoidFocal)) {
    return flm::sigmoid_focal_loss(x, t, p.param0, p.param1);
  } else {
    return flm::regression_loss(kKind, x - t, p.param0);
  }
}

template <int kKind>
FLM_INLINE float grad_of(float x, float t, const PointwiseParams& p) {
  if constexpr (kKind == kFocalGammaTwo) {
    return flm::sigmoid_focal_grad(x, t, p.param0, flm::GammaTwo{});
  } else if constexpr (kKind == int(PointwiseKind::SigmoidFocal)) {
    return flm::sigmoid_focal_grad(x, t, p.param0, p.param1);
  } else {
    return flm::regression_grad(kKind, x - t, p.param0);
  }
}

template <typename T>
constexpr bool kIsFloat = std::is_same_v<T, float>;

// Elements go through float32 chunks in L1 (16-bit ones widened and narrowed
// by convert.h's native converters), so the loops are pure float32.
template <typename T, int kKind>
FL_VECTOR_CLONES void forward_range(const PwArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.pred);
  const T* t = static_cast<const T*>(a.target);
  const PointwiseParams p = a.params;
  float xbuf[kIsFloat<T> ? 1 : kChunk], tbuf[kChunk];
  if (p.reduce == Reduce::None) {
    T* loss = static_cast<T*>(a.loss); // in the predictions' dtype
    float lbuf[kIsFloat<T> ? 1 : kChunk];
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      int n = int(std::min<int64_t>(kChunk, end - c0));
      cpu::prefetch_chunk(x, c0 + kChunk, end);
      cpu::prefetch_chunk(t, a.layout ? end : c0 + kChunk, end); // a broadcast target is small
      const float* xv = cpu::chunk_as_float(x + c0, n, xbuf);
      const float* tv = target_chunk(a.layout, t, c0, n, tbuf);
      float* lv = cpu::chunk_out(loss + c0, lbuf);
      FL_SIMD
      for (int i = 0; i < n; ++i) {
        lv[i] = loss_of<kKind>(xv[i], tv[i], p);
      }
      cpu::store_chunk(lv, n, loss + c0);
    }
    return;
  }
  float* partials = static_cast<float*>(a.loss);
  for (int64_t b0 = begin; b0 < end; b0 += kSumBlock) {
    int64_t b1 = std::min(end, b0 + kSumBlock);
    float sum = 0.0f;
    for (int64_t c0 = b0; c0 < b1; c0 += kChunk) {
      int n = int(std::min<int64_t>(kChunk, b1 - c0));
      cpu::prefetch_chunk(x, c0 + kChunk, end);
      cpu::prefetch_chunk(t, a.layout ? end : c0 + kChunk, end);
      const float* xv = cpu::chunk_as_float(x + c0, n, xbuf);
      const float* tv = target_chunk(a.layout, t, c0, n, tbuf);
      FL_SIMD_REDUCE(reduction(+ : sum))
      for (int i = 0; i < n; ++i) {
        sum += loss_of<kKind>(xv[i], tv[i], p);
      }
    }
    partials[b0 / kSumBlock] = sum;
  }
}

// G: the cotangent's element type (T or float32 element-wise; float32 for the
// scalar cotangent of a reduced loss). One loop per cotangent layout (a
// conditional load would keep it scalar); everything the loop reads is passed
// by value so the vectorizer sees it is loop-invariant.
template <typename T, typename G, int kKind, bool kScalarCotan>
FLM_INLINE void backward_loop(const T* x, const T* t, const TargetLayout* layout, T* dx,
                              const G* cotan, float g0, PointwiseParams p, int64_t begin,
                              int64_t end) {
  float xbuf[kIsFloat<T> ? 1 : kChunk], tbuf[kChunk];
  float gbuf[kIsFloat<G> || kScalarCotan ? 1 : kChunk], dbuf[kIsFloat<T> ? 1 : kChunk];
  for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
    int n = int(std::min<int64_t>(kChunk, end - c0));
    cpu::prefetch_chunk(x, c0 + kChunk, end);
    cpu::prefetch_chunk(t, layout ? end : c0 + kChunk, end); // a broadcast target is small
    if constexpr (!kScalarCotan) {
      cpu::prefetch_chunk(cotan, c0 + kChunk, end);
    }
    const float* xv = cpu::chunk_as_float(x + c0, n, xbuf);
    const float* tv = target_chunk(layout, t, c0, n, tbuf);
    const float* gv = kScalarCotan ? nullptr : cpu::chunk_as_float(cotan + c0, n, gbuf);
    float* dv = cpu::chunk_out(dx + c0, dbuf);
    FL_SIMD
    for (int i = 0; i < n; ++i) {
      float g = kScalarCotan ? g0 : gv[i];
      dv[i] = g * grad_of<kKind>(xv[i], tv[i], p);
    }
    cpu::store_chunk(dv, n, dx + c0);
  }
}

template <typename T, typename G, int kKind>
FL_VECTOR_CLONES void backward_range(const PwArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.pred);
  const T* t = static_cast<const T*>(a.target);
  T* dx = static_cast<T*>(a.grad);
  const PointwiseParams p = a.params;
  if (p.reduce == Reduce::None) {
    backward_loop<T, G, kKind, false>(x, t, a.layout, dx, static_cast<const G*>(a.cotan), 0.0f, p,
                                      begin, end);
  } else {
    // d mean / d x_i = 1/n: the scale is applied here, at evaluation time.
    const float* cotan = static_cast<const float*>(a.cotan);
    float g0 = p.reduce == Reduce::Mean ? cotan[0] / float(a.size > 0 ? a.size : 1) : cotan[0];
    backward_loop<T, float, kKind, true>(x, t, a.layout, dx, cotan, g0, p, begin, end);
  }
}

using RangeFn = void (*)(const PwArgs&, int64_t, int64_t);

// The instantiation for a dtype, cotangent type and formula; each is cloned
// per instruction set.
template <typename T, typename G>
RangeFn pick_kind(const PointwiseParams& p, bool backward) {
  constexpr int kHuber = int(PointwiseKind::Huber), kFocal = int(PointwiseKind::SigmoidFocal),
                kSmoothL1 = int(PointwiseKind::SmoothL1);
  switch (p.kind) {
    case PointwiseKind::Huber:
      return backward ? backward_range<T, G, kHuber> : forward_range<T, kHuber>;
    case PointwiseKind::SigmoidFocal:
      if (p.param1 == 2.0f) {
        return backward ? backward_range<T, G, kFocalGammaTwo> : forward_range<T, kFocalGammaTwo>;
      }
      return backward ? backward_range<T, G, kFocal> : forward_range<T, kFocal>;
    default:
      return backward ? backward_range<T, G, kSmoothL1> : forward_range<T, kSmoothL1>;
  }
}

// cotan_dtype: the element-wise cotangent's dtype (float32 or `dtype`).
RangeFn pick(mx::Dtype dtype, mx::Dtype cotan_dtype, const PointwiseParams& p, bool backward) {
  RangeFn fn = nullptr;
  cpu::dispatch_float(dtype, [&](auto zero) {
    using T = decltype(zero);
    fn = cotan_dtype == dtype ? pick_kind<T, T>(p, backward) : pick_kind<T, float>(p, backward);
  });
  return fn;
}

// The layout of a target of another shape than the predictions (kept alive
// by the task that reads it), or null.
std::shared_ptr<TargetLayout> target_layout(const mx::array& pred, const mx::array& target) {
  if (target.shape() == pred.shape()) {
    return nullptr;
  }
  return std::make_shared<TargetLayout>(pred.shape(), target.shape());
}

} // namespace

void PointwiseLoss::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  PwArgs a{};
  a.pred = inputs[0].data<void>();
  a.target = inputs[1].data<void>();
  a.size = inputs[0].size();
  a.params = params_;
  auto layout = target_layout(inputs[0], inputs[1]);
  a.layout = layout.get();
  RangeFn fn = pick(inputs[0].dtype(), inputs[0].dtype(), params_, false);
  if (params_.reduce == Reduce::None) {
    // The loss (in the predictions' dtype) may overwrite predictions nobody
    // else needs: each chunk is read before its results are written.
    cpu::allocate_or_reuse(out, inputs[0], stream());
    a.loss = out.data<void>();
    cpu::dispatch_parallel(stream(), inputs, outputs, a.size, cpu::kMinElementsPerTask,
                           [a, fn, layout](int64_t b, int64_t e) { fn(a, b, e); });
    return;
  }
  // Fused sum: one partial per fixed block (whole blocks per task), so the
  // result does not depend on the number of threads. The partials live in a
  // buffer shared by the tasks and are added, in order and in double, by the
  // last step (a handful of numbers: free).
  int64_t blocks = (a.size + kSumBlock - 1) / kSumBlock;
  cpu::allocate(out);
  auto partial = std::make_shared<std::vector<float>>(blocks, 0.0f);
  a.loss = partial->data();
  float* result = out.data<float>();
  cpu::dispatch_parallel(stream(), inputs, outputs, blocks, 1,
                         [a, fn, partial, layout](int64_t b, int64_t e) {
                           fn(a, b * kSumBlock, std::min(a.size, e * kSumBlock));
                         });
  double divisor = params_.reduce == Reduce::Mean && a.size > 0 ? double(a.size) : 1.0;
  mx::cpu::get_command_encoder(stream()).dispatch([partial, result, divisor]() {
    double total = 0.0;
    for (float v : *partial) {
      total += v;
    }
    *result = float(total / divisor);
  });
}

void PointwiseLossVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& grad = outputs[0];
  cpu::allocate_or_reuse(grad, inputs[0], stream()); // the first input, when nothing else needs it
  PwArgs a{};
  a.pred = inputs[0].data<void>();
  a.target = inputs[1].data<void>();
  a.size = inputs[0].size();
  a.params = params_;
  a.cotan = inputs[2].data<void>();
  a.grad = grad.data<void>();
  auto layout = target_layout(inputs[0], inputs[1]);
  a.layout = layout.get();
  RangeFn fn = pick(inputs[0].dtype(), inputs[2].dtype(), params_, true);
  cpu::dispatch_parallel(stream(), inputs, outputs, a.size, cpu::kMinElementsPerTask,
                         [a, fn, layout](int64_t b, int64_t e) { fn(a, b, e); });
}

} // namespace fl
