// Element-wise losses (smooth-L1, Huber, sigmoid focal): what
// csrc/cpu/pointwise_loss.cpp computes, with the formulas of
// csrc/math/smooth_l1.h and csrc/math/focal.h.
//
//   pw_forward          loss[i] for every element (reduction "none"), in the
//                       predictions' dtype (computed in float32, rounded once)
//   pw_forward_partial  one float32 partial sum per threadgroup over a fixed
//                       block of FL_PW_GROUP_ELEMS elements
//   fl_pw_sum_finish       one threadgroup adds the partials in a fixed order and
//                       divides by n for the mean: the result does not depend
//                       on scheduling (no atomics)
//   pw_backward         grad[i] = g * dloss/dpred, g element-wise (read in its
//                       own dtype: float32, or the predictions' 16-bit dtype)
//                       or the float32 scalar cotangent of the sum (divided by
//                       n for the mean)
// Each thread handles FL_PW_READS contiguous elements (per step), read with an
// unrolled, unmasked fast path and a masked tail.
// Every kernel comes in two variants (the launch plan picks one): the target
// has the predictions' shape and is read at the same index, or (_bcast) it
// broadcasts to them and is read in place through its PwTargetLayout
// (kernel_args.h): no full-size copy of it exists. The contiguous variants
// never read the layout buffer.
#include <metal_stdlib>

#include "fl_common.h"
#include "../csrc/math/focal.h"
#include "../csrc/math/smooth_l1.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace {

// kKind = fl::PointwiseKind: 0 smooth-L1, 1 Huber, 2 sigmoid focal; or
// FL_PW_KIND_FOCAL_GAMMA_TWO: sigmoid focal with gamma = 2 (p1 unused), the
// same instantiation of the formula as the CPU's kernels.
template <int kKind>
inline float pw_loss(float x, float t, float p0, float p1) {
  if (kKind == FL_PW_KIND_FOCAL_GAMMA_TWO) {
    return flm::sigmoid_focal_loss(x, t, p0, flm::GammaTwo{});
  }
  if (kKind == 2) {
    return flm::sigmoid_focal_loss(x, t, p0, p1);
  }
  return flm::regression_loss(kKind, x - t, p0);
}

template <int kKind>
inline float pw_grad(float x, float t, float p0, float p1) {
  if (kKind == FL_PW_KIND_FOCAL_GAMMA_TWO) {
    return flm::sigmoid_focal_grad(x, t, p0, flm::GammaTwo{});
  }
  if (kKind == 2) {
    return flm::sigmoid_focal_grad(x, t, p0, p1);
  }
  return flm::regression_grad(kKind, x - t, p0);
}

// The target element that meets the predictions' flat index i (64-bit: the
// offsets of a large array do not fit 32 bits).
template <bool kBcast>
inline ulong pw_target_index(constant PwTargetLayout& lay, ulong i) {
  if (!kBcast) {
    return i;
  }
  ulong off = 0;
  for (int g = 0; g < lay.ndim; ++g) {
    const ulong size = ulong(lay.size[g]);
    off += (i % size) * ulong(lay.stride[g]);
    i /= size;
  }
  return off;
}

// The target elements of a thread's R contiguous elements i0, i0 + 1, ...:
// within the innermost group's run they step by its stride, so one full
// index (divisions per group) serves the run and only a run boundary inside
// the R elements costs another.
struct PwTargetWalk {
  ulong base; // target element of i0
  ulong run; // elements i0 + k with k < run share i0's innermost run
  ulong step; // the innermost group's stride
};

template <bool kBcast>
inline PwTargetWalk pw_target_walk(constant PwTargetLayout& lay, ulong i0) {
  PwTargetWalk w;
  w.base = pw_target_index<kBcast>(lay, i0);
  w.step = 1;
  w.run = ~ulong(0);
  if (kBcast) {
    w.step = lay.ndim > 0 ? ulong(lay.stride[0]) : 0;
    w.run = lay.ndim > 0 ? ulong(lay.size[0]) - i0 % ulong(lay.size[0]) : ~ulong(0);
  }
  return w;
}

template <bool kBcast>
inline ulong pw_target_at(PwTargetWalk w, constant PwTargetLayout& lay, ulong i0, int k) {
  if (!kBcast) {
    return i0 + ulong(k);
  }
  return ulong(k) < w.run ? w.base + ulong(k) * w.step : pw_target_index<kBcast>(lay, i0 + ulong(k));
}

// Sum of the losses of elements [i0, i0 + R) that are < n.
template <typename T, int kKind, int R, bool kBcast>
inline float pw_chunk_sum(device const T* pred, device const T* target,
                          constant PwTargetLayout& lay, ulong i0, ulong n, float p0, float p1) {
  float s = 0.0f;
  const PwTargetWalk w = pw_target_walk<kBcast>(lay, i0);
  if (i0 + R <= n) {
    for (int k = 0; k < R; ++k) {
      s += pw_loss<kKind>(float(pred[i0 + k]), float(target[pw_target_at<kBcast>(w, lay, i0, k)]),
                          p0, p1);
    }
  } else {
    for (int k = 0; k < R; ++k) {
      if (i0 + k < n) {
        s += pw_loss<kKind>(float(pred[i0 + k]),
                            float(target[pw_target_at<kBcast>(w, lay, i0, k)]), p0, p1);
      }
    }
  }
  return s;
}

} // namespace

template <typename T, int kKind, bool kBcast>
[[kernel]] void pw_forward(
    device const T* pred [[buffer(FL_PW_FWD_PRED)]],
    device const T* target [[buffer(FL_PW_FWD_TARGET)]],
    device T* loss [[buffer(FL_PW_FWD_OUT)]],
    constant PwArgs& args [[buffer(FL_PW_FWD_ARGS)]],
    constant PwTargetLayout& tlayout [[buffer(FL_PW_FWD_TLAYOUT)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  constexpr int R = FL_PW_READS;
  const ulong n = args.size;
  const ulong i0 = (ulong(group) * tpg + tid) * R;
  const float p0 = args.param0;
  const float p1 = args.param1;
  const PwTargetWalk w = pw_target_walk<kBcast>(tlayout, i0);
  if (i0 + R <= n) {
    float xv[R];
    float tv[R];
    for (int k = 0; k < R; ++k) {
      xv[k] = float(pred[i0 + k]);
      tv[k] = float(target[pw_target_at<kBcast>(w, tlayout, i0, k)]);
    }
    for (int k = 0; k < R; ++k) {
      loss[i0 + k] = T(pw_loss<kKind>(xv[k], tv[k], p0, p1));
    }
  } else {
    for (int k = 0; k < R; ++k) {
      if (i0 + k < n) {
        loss[i0 + k] = T(pw_loss<kKind>(
            float(pred[i0 + k]), float(target[pw_target_at<kBcast>(w, tlayout, i0, k)]), p0, p1));
      }
    }
  }
}

template <typename T, int kKind, bool kBcast>
[[kernel]] void pw_forward_partial(
    device const T* pred [[buffer(FL_PW_FWD_PRED)]],
    device const T* target [[buffer(FL_PW_FWD_TARGET)]],
    device float* partials [[buffer(FL_PW_FWD_OUT)]],
    constant PwArgs& args [[buffer(FL_PW_FWD_ARGS)]],
    constant PwTargetLayout& tlayout [[buffer(FL_PW_FWD_TLAYOUT)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_PW_READS;
  const ulong n = args.size;
  // The group's block is fixed by FL_PW_GROUP_ELEMS, whatever tpg is.
  const ulong begin = ulong(group) * FL_PW_GROUP_ELEMS;
  const ulong end = n - begin < ulong(FL_PW_GROUP_ELEMS) ? n : begin + ulong(FL_PW_GROUP_ELEMS);
  float s = 0.0f;
  for (ulong i0 = begin + ulong(tid) * R; i0 < end; i0 += ulong(tpg) * R) {
    s += pw_chunk_sum<T, kKind, R, kBcast>(pred, target, tlayout, i0, end, args.param0,
                                           args.param1);
  }
  s = flk::threadgroup_sum(s, scratch, sg, lane, nsg);
  if (tid == 0) {
    partials[group] = s;
  }
}

// One threadgroup. out[0] = sum(partials) (/ n for the mean).
[[kernel]] void fl_pw_sum_finish(
    device const float* partials [[buffer(FL_PW_SUM_PARTIALS)]],
    device float* out [[buffer(FL_PW_SUM_OUT)]],
    constant PwArgs& args [[buffer(FL_PW_SUM_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  // Each thread's strided run with Neumaier's compensation (c collects the
  // low bits every addition rounds off), so a run of thousands of values
  // (a mean over a million rows, ops/accurate_sum.h) keeps float32 accuracy;
  // the runs' sums then meet in a tree, log2(threads) roundings deep.
  float s = 0.0f;
  float c = 0.0f;
  for (ulong i = tid; i < args.num_partials; i += tpg) {
    float v = partials[i];
    float t = s + v;
    // (an inf or NaN sum carries itself: its rounding error would be NaN)
    if (!flm::is_inf(t) && !flm::is_nan(t)) {
      c += fabs(s) >= fabs(v) ? (s - t) + v : (v - t) + s;
    }
    s = t;
  }
  s = flk::threadgroup_sum(s + c, scratch, sg, lane, nsg);
  if (tid == 0) {
    // Mean over zero elements is 0 (0 / 1), as on the CPU.
    float divisor = (args.reduce == 2 && args.size > 0) ? float(args.size) : 1.0f;
    out[0] = s / divisor;
  }
}

// G: the cotangent's element type (float, or T for an element-wise cotangent
// in the predictions' 16-bit dtype: instantiated as the _cot16 kernels).
template <typename T, typename G, int kKind, bool kBcast>
[[kernel]] void pw_backward(
    device const T* pred [[buffer(FL_PW_BWD_PRED)]],
    device const T* target [[buffer(FL_PW_BWD_TARGET)]],
    device const G* cotan [[buffer(FL_PW_BWD_COTAN)]],
    device T* grad [[buffer(FL_PW_BWD_GRAD)]],
    constant PwArgs& args [[buffer(FL_PW_BWD_ARGS)]],
    constant PwTargetLayout& tlayout [[buffer(FL_PW_BWD_TLAYOUT)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  constexpr int R = FL_PW_READS;
  const ulong n = args.size;
  const ulong i0 = (ulong(group) * tpg + tid) * R;
  if (i0 >= n) {
    return; // no barriers in this kernel
  }
  const bool scalar_cotan = args.reduce != 0;
  // d mean / d x_i = 1/n, applied here as on the CPU.
  float g0 = 0.0f;
  if (scalar_cotan) {
    g0 = args.reduce == 2 ? float(cotan[0]) / float(n > 0 ? n : 1) : float(cotan[0]);
  }
  const float p0 = args.param0;
  const float p1 = args.param1;
  const int count = n - i0 < ulong(R) ? int(n - i0) : R;
  const PwTargetWalk w = pw_target_walk<kBcast>(tlayout, i0);
  for (int k = 0; k < count; ++k) {
    ulong i = i0 + k;
    float g = scalar_cotan ? g0 : float(cotan[i]);
    float t = float(target[pw_target_at<kBcast>(w, tlayout, i0, k)]);
    grad[i] = T(g * pw_grad<kKind>(float(pred[i]), t, p0, p1));
  }
}

// Host names: fl_pw_fwd_<none|partial>_<kind>_<dtype>, fl_pw_bwd_<kind>_<dtype>
// (float32 cotangent), fl_pw_bwd_<kind>_<dtype>_cot16 (16-bit dtypes: the
// cotangent in that dtype), each also with the suffix _bcast (the target read
// through its layout), and fl_pw_sum_finish, a plain kernel, above.
#define FL_INST_PW_KIND_B(kname, K, dname, T, B, sfx)                                            \
  template [[host_name("fl_pw_fwd_none_" #kname "_" #dname sfx)]] [[kernel]] decltype(           \
      pw_forward<T, K, B>) pw_forward<T, K, B>;                                                  \
  template [[host_name("fl_pw_fwd_partial_" #kname "_" #dname sfx)]] [[kernel]] decltype(        \
      pw_forward_partial<T, K, B>) pw_forward_partial<T, K, B>;                                  \
  template [[host_name("fl_pw_bwd_" #kname "_" #dname sfx)]] [[kernel]] decltype(               \
      pw_backward<T, float, K, B>) pw_backward<T, float, K, B>;

#define FL_INST_PW_KIND(kname, K, dname, T)           \
  FL_INST_PW_KIND_B(kname, K, dname, T, false, "")    \
  FL_INST_PW_KIND_B(kname, K, dname, T, true, "_bcast")

#define FL_INST_PW(dname, T)                 \
  FL_INST_PW_KIND(smooth_l1, 0, dname, T)    \
  FL_INST_PW_KIND(huber, 1, dname, T)        \
  FL_INST_PW_KIND(sigmoid_focal, 2, dname, T) \
  FL_INST_PW_KIND(sigmoid_focal_g2, FL_PW_KIND_FOCAL_GAMMA_TWO, dname, T)

#define FL_INST_PW_COT16_KIND_B(kname, K, dname, T, B, sfx)                                    \
  template [[host_name("fl_pw_bwd_" #kname "_" #dname "_cot16" sfx)]] [[kernel]] decltype(      \
      pw_backward<T, T, K, B>) pw_backward<T, T, K, B>;

#define FL_INST_PW_COT16_KIND(kname, K, dname, T)          \
  FL_INST_PW_COT16_KIND_B(kname, K, dname, T, false, "")   \
  FL_INST_PW_COT16_KIND_B(kname, K, dname, T, true, "_bcast")

#define FL_INST_PW_COT16(dname, T)                     \
  FL_INST_PW_COT16_KIND(smooth_l1, 0, dname, T)        \
  FL_INST_PW_COT16_KIND(huber, 1, dname, T)            \
  FL_INST_PW_COT16_KIND(sigmoid_focal, 2, dname, T)   \
  FL_INST_PW_COT16_KIND(sigmoid_focal_g2, FL_PW_KIND_FOCAL_GAMMA_TWO, dname, T)

FL_INST_PW(float32, float)
FL_INST_PW(float16, half)
FL_INST_PW_COT16(float16, half)
FL_INST_PW(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
FL_INST_PW_COT16(bfloat16, bfloat)
