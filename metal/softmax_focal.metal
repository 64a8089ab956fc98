// Softmax focal loss kernels: the same row machinery as cross_entropy.metal,
// computing what csrc/cpu/softmax_focal.cpp computes (csrc/math/focal.h).
// Forward keeps, besides the online (max, sum-exp), the exp-sum without the
// target (s_other), so that 1 - p_t = s_other / s has no cancellation.
// Variants (block / looped) and launch: see cross_entropy.metal and
// csrc/metal/launch_plan.cpp.
#include <metal_stdlib>

#include "fl_common.h"
#include "../csrc/math/focal.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace {

template <typename T, int R>
struct SfChunk {
  float x[R];
  bool valid[R];

  void load(device const T* xrow, uint j0, uint K) {
    if (j0 + R <= K) {
      for (int i = 0; i < R; ++i) {
        x[i] = float(xrow[j0 + i]);
        valid[i] = true;
      }
    } else {
      for (int i = 0; i < R; ++i) {
        uint j = j0 + i;
        valid[i] = j < K;
        x[i] = valid[i] ? float(xrow[j]) : -flm::kInf;
      }
    }
  }

  void clear() {
    for (int i = 0; i < R; ++i) {
      x[i] = -flm::kInf;
      valid[i] = false;
    }
  }

  float max() const {
    float m = -flm::kInf;
    for (int i = 0; i < R; ++i) {
      m = fmax(m, x[i]);
    }
    return m;
  }

  // Adds exp(x - shift) to acc.s and, except for the target, to acc.so.
  void accumulate(thread flk::RowAcc& acc, float shift, uint j0, long target) const {
    float s = 0.0f;
    float so = 0.0f;
    for (int i = 0; i < R; ++i) {
      if (valid[i]) {
        float e = flm::exp_nonpos_f32(x[i] - shift);
        s += e;
        so += long(j0 + i) == target ? 0.0f : e;
      }
    }
    acc.s += s;
    acc.so += so;
  }
};

} // namespace

template <typename T, bool kLooped>
[[kernel]] void sf_forward(
    device const T* logits [[buffer(FL_SF_FWD_LOGITS)]],
    device const long* class_index [[buffer(FL_SF_FWD_INDEX)]],
    device const float* class_alpha [[buffer(FL_SF_FWD_ALPHA)]],
    device float* loss_out [[buffer(FL_SF_FWD_LOSS)]],
    device float* lse_out [[buffer(FL_SF_FWD_LSE)]],
    device float* lse_lo_out [[buffer(FL_SF_FWD_LSE_LO)]],
    device float* coef_out [[buffer(FL_SF_FWD_COEF)]],
    constant SfArgs& args [[buffer(FL_SF_FWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  const uint K = uint(args.num_classes);
  device const T* x = logits + ulong(row) * ulong(K);

  // Uniform over the group: all threads return here, before any barrier, or none.
  const long t =
      flk::row_class(class_index[row], args.num_classes, args.has_ignore_index, args.ignore_index);
  if (t < 0) {
    if (tid == 0) {
      flm::FocalRow masked = flm::softmax_focal_masked_row(t == -2);
      loss_out[row] = masked.loss;
      lse_out[row] = masked.lse;
      lse_lo_out[row] = masked.lse_lo;
      coef_out[row] = masked.coef;
    }
    return;
  }

  flk::RowAcc acc = flk::row_acc_empty();
  SfChunk<T, R> c;
  if (kLooped) {
    for (uint j0 = tid * R; j0 < K; j0 += tpg * R) {
      c.load(x, j0, K);
      acc = flk::row_acc_moved(acc, fmax(acc.m, c.max()));
      c.accumulate(acc, flm::lse_ref(acc.m), j0, t);
    }
  } else {
    uint j0 = tid * R;
    if (j0 < K) {
      c.load(x, j0, K);
    } else {
      c.clear();
    }
    float m = flk::threadgroup_max(c.max(), scratch, sg, lane, nsg);
    acc.m = m; // nothing accumulated yet: no sums to move
    c.accumulate(acc, flm::lse_ref(m), j0, t);
  }

  flk::RowAcc r = flk::threadgroup_merge<true, false>(acc, scratch, sg, lane, nsg);
  if (tid == 0) {
    float alpha_t = args.has_class_alpha != 0 ? class_alpha[t] : args.alpha;
    flm::FocalRow out =
        flm::softmax_focal_finish_row(r.m, r.s, r.so, float(x[t]), alpha_t, args.gamma);
    loss_out[row] = out.loss;
    lse_out[row] = out.lse;
    lse_lo_out[row] = out.lse_lo;
    coef_out[row] = out.coef;
  }
}

template <typename T>
[[kernel]] void sf_backward(
    device const T* logits [[buffer(FL_SF_BWD_LOGITS)]],
    device const long* class_index [[buffer(FL_SF_BWD_INDEX)]],
    device const float* lse_in [[buffer(FL_SF_BWD_LSE)]],
    device const float* lse_lo_in [[buffer(FL_SF_BWD_LSE_LO)]],
    device const float* coef_in [[buffer(FL_SF_BWD_COEF)]],
    device const float* g_loss [[buffer(FL_SF_BWD_GLOSS)]],
    device T* grad [[buffer(FL_SF_BWD_GRAD)]],
    constant SfArgs& args [[buffer(FL_SF_BWD_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint2 group_size [[threads_per_threadgroup]]) {
  // (MSL: the grid-position attributes of one kernel share one vector width.)
  const uint tpg = group_size.x;
  constexpr int R = FL_ROW_READS;
  const uint K = uint(args.num_classes);
  const uint row = group.y;
  const uint j0 = (group.x * tpg + tid) * uint(R);
  if (j0 >= K) {
    return; // no barriers in this kernel
  }
  const ulong offset = ulong(row) * ulong(K);
  device const T* x = logits + offset;
  device T* dx = grad + offset;
  const int n = min(int(K - j0), R);

  const long t =
      flk::row_class(class_index[row], args.num_classes, args.has_ignore_index, args.ignore_index);
  if (t < 0) {
    T fill = T(t == -2 ? flm::kNaN : 0.0f);
    for (int i = 0; i < n; ++i) {
      dx[j0 + i] = fill;
    }
    return;
  }
  const float lse = lse_in[row];
  const float lse_lo = lse_lo_in[row];
  const float coef = g_loss[row] * coef_in[row];
  for (int i = 0; i < n; ++i) {
    uint j = j0 + i;
    dx[j] = T(flm::softmax_focal_grad(float(x[j]), lse, lse_lo, coef, long(j) == t));
  }
}

// Host names: fl_sf_fwd_<block|looped>_<dtype>, fl_sf_bwd_<dtype>.
#define FL_INST_SF(dname, T)                                                                    \
  template [[host_name("fl_sf_fwd_block_" #dname)]] [[kernel]] decltype(sf_forward<T, false>)   \
      sf_forward<T, false>;                                                                     \
  template [[host_name("fl_sf_fwd_looped_" #dname)]] [[kernel]] decltype(sf_forward<T, true>)   \
      sf_forward<T, true>;                                                                      \
  template [[host_name("fl_sf_bwd_" #dname)]] [[kernel]] decltype(sf_backward<T>) sf_backward<T>;

FL_INST_SF(float32, float)
FL_INST_SF(float16, half)
FL_INST_SF(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
