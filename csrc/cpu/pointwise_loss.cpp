// CPU kernels of the element-wise losses: forward reads both inputs once and
// writes the loss (or a fused float32 sum); backward reads them once more and
// writes the gradient once. Formulas: math/smooth_l1.h, math/focal.h.
#include <memory>
#include <vector>

#include "cpu/dtype.h"
#include "cpu/dispatch.h"
#include "cpu/output_buffer.h"
#include "cpu/vectorize.h"
#include "math/focal.h"
#include "math/smooth_l1.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/pointwise_loss.h"

namespace fl {

namespace {

struct PwArgs {
  const void* pred;
  const void* target;
  int64_t size;
  PointwiseParams params;
  float* loss; // element-wise loss, or per-block partial sums for Reduce::Sum
  const float* cotan; // backward: element-wise, or one scalar for Reduce::Sum
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

template <typename T, int kKind>
FL_VECTOR_CLONES void forward_range(const PwArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.pred);
  const T* t = static_cast<const T*>(a.target);
  const PointwiseParams p = a.params;
  if (p.reduce == Reduce::None) {
    FL_SIMD
    for (int64_t i = begin; i < end; ++i) {
      a.loss[i] = loss_of<kKind>(cpu::to_float(x[i]), cpu::to_float(t[i]), p);
    }
    return;
  }
  for (int64_t b0 = begin; b0 < end; b0 += kSumBlock) {
    int64_t b1 = std::min(end, b0 + kSumBlock);
    float sum = 0.0f;
    FL_SIMD_REDUCE(reduction(+ : sum))
    for (int64_t i = b0; i < b1; ++i) {
      sum += loss_of<kKind>(cpu::to_float(x[i]), cpu::to_float(t[i]), p);
    }
    a.loss[b0 / kSumBlock] = sum;
  }
}

// One loop per cotangent layout (a conditional load would keep it scalar);
// everything the loop reads is passed by value so the vectorizer sees it is
// loop-invariant.
template <typename T, int kKind, bool kScalarCotan>
FLM_INLINE void backward_loop(const T* x, const T* t, T* dx, const float* cotan, float g0,
                              PointwiseParams p, int64_t begin, int64_t end) {
  FL_SIMD
  for (int64_t i = begin; i < end; ++i) {
    float g = kScalarCotan ? g0 : cotan[i];
    dx[i] = cpu::from_float<T>(g * grad_of<kKind>(cpu::to_float(x[i]), cpu::to_float(t[i]), p));
  }
}

template <typename T, int kKind>
FL_VECTOR_CLONES void backward_range(const PwArgs& a, int64_t begin, int64_t end) {
  const T* x = static_cast<const T*>(a.pred);
  const T* t = static_cast<const T*>(a.target);
  T* dx = static_cast<T*>(a.grad);
  const PointwiseParams p = a.params;
  if (p.reduce == Reduce::None) {
    backward_loop<T, kKind, false>(x, t, dx, a.cotan, 0.0f, p, begin, end);
  } else {
    // d mean / d x_i = 1/n: the scale is applied here, at evaluation time.
    float g0 = p.reduce == Reduce::Mean ? a.cotan[0] / float(a.size > 0 ? a.size : 1) : a.cotan[0];
    backward_loop<T, kKind, true>(x, t, dx, a.cotan, g0, p, begin, end);
  }
}

using RangeFn = void (*)(const PwArgs&, int64_t, int64_t);

// The instantiation for a dtype and formula; each is cloned per instruction set.
template <typename T>
RangeFn pick_kind(const PointwiseParams& p, bool backward) {
  constexpr int kHuber = int(PointwiseKind::Huber), kFocal = int(PointwiseKind::SigmoidFocal),
                kSmoothL1 = int(PointwiseKind::SmoothL1);
  switch (p.kind) {
    case PointwiseKind::Huber:
      return backward ? backward_range<T, kHuber> : forward_range<T, kHuber>;
    case PointwiseKind::SigmoidFocal:
      if (p.param1 == 2.0f) {
        return backward ? backward_range<T, kFocalGammaTwo> : forward_range<T, kFocalGammaTwo>;
      }
      return backward ? backward_range<T, kFocal> : forward_range<T, kFocal>;
    default:
      return backward ? backward_range<T, kSmoothL1> : forward_range<T, kSmoothL1>;
  }
}

RangeFn pick(mx::Dtype dtype, const PointwiseParams& p, bool backward) {
  RangeFn fn = nullptr;
  cpu::dispatch_float(dtype, [&](auto zero) { fn = pick_kind<decltype(zero)>(p, backward); });
  return fn;
}

} // namespace

void PointwiseLoss::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  auto& out = outputs[0];
  PwArgs a{};
  a.pred = inputs[0].data<void>();
  a.target = inputs[1].data<void>();
  a.size = inputs[0].size();
  a.params = params_;
  RangeFn fn = pick(inputs[0].dtype(), params_, false);
  if (params_.reduce == Reduce::None) {
    // A float32 loss may overwrite float32 predictions nobody else needs.
    cpu::allocate_or_reuse(out, inputs[0], stream());
    a.loss = out.data<float>();
    cpu::dispatch_parallel(stream(), inputs, outputs, a.size, cpu::kMinElementsPerTask,
                           [a, fn](int64_t b, int64_t e) { fn(a, b, e); });
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
                         [a, fn, partial](int64_t b, int64_t e) {
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
  a.cotan = inputs[2].data<float>();
  a.grad = grad.data<void>();
  cpu::dispatch_parallel(stream(), inputs, outputs, a.size, cpu::kMinElementsPerTask,
                         [a, fn = pick(inputs[0].dtype(), params_, true)](int64_t b, int64_t e) { fn(a, b, e); });
}

} // namespace fl
