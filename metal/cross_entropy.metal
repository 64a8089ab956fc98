// Fused cross-entropy kernels (label smoothing, class weights, soft targets,
// z-loss, ignore_index, logit soft-cap). They compute exactly what csrc/cpu/cross_entropy.cpp
// computes, with the same formulas (csrc/math/cross_entropy.h); only the order
// of the float32 sums differs.
//
// Forward: one threadgroup per row, FL_ROW_READS contiguous elements per
// thread per step. Two variants, chosen by the launch plan
// (csrc/metal/launch_plan.cpp):
//   block   K <= threads * FL_ROW_READS: each thread loads its elements once
//           into registers; threadgroup max; then exp-sums relative to it.
//   looped  longer rows: each thread keeps an online (max, sum-exp) state over
//           its strided chunks, one pass over the row.
// Both end with flk::threadgroup_merge; thread 0 writes loss, lse, lse_lo and
// a_sum.
// Backward: a 2-D grid (chunks of a row, rows) of element-wise threads; each
// logit is read once and each gradient element written once.
#include <metal_stdlib>

#include "fl_common.h"
#include "../csrc/math/cross_entropy.h"
#include "../csrc/math/softcap.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace {

// A logit as the loss sees it: soft-capped when args.softcap != 0
// (csrc/math/softcap.h; the same float32 formula as the CPU kernel).
inline float ce_logit(float x, float cap) {
  return cap != 0.0f ? flm::softcap(x, cap) : x;
}

// The per-element part of the forward sums, for one chunk of up to R logits
// (masked lanes have valid[i] = false and are skipped).
template <typename T, bool kSoft, bool kWeighted, int R>
struct CeChunk {
  float x[R];
  float w[R];
  float t[R];
  bool valid[R];

  void load(
      device const T* xrow,
      device const T* trow,
      device const float* weights,
      uint j0,
      uint K,
      float cap) {
    if (j0 + R <= K) {
      for (int i = 0; i < R; ++i) {
        x[i] = ce_logit(float(xrow[j0 + i]), cap);
        w[i] = kWeighted ? weights[j0 + i] : 1.0f;
        t[i] = kSoft ? float(trow[j0 + i]) : 0.0f;
        valid[i] = true;
      }
    } else {
      for (int i = 0; i < R; ++i) {
        uint j = j0 + i;
        valid[i] = j < K;
        x[i] = valid[i] ? ce_logit(float(xrow[j]), cap) : -flm::kInf;
        w[i] = (kWeighted && valid[i]) ? weights[j] : (valid[i] ? 1.0f : 0.0f);
        t[i] = (kSoft && valid[i]) ? float(trow[j]) : 0.0f;
      }
    }
  }

  float max() const {
    float m = -flm::kInf;
    for (int i = 0; i < R; ++i) {
      m = fmax(m, x[i]);
    }
    return m;
  }

  // Adds this chunk's sums to `acc` (already moved to its max): exp-sums and
  // gaps relative to `shift` = flm::lse_ref(acc.m).
  void accumulate(thread flk::RowAcc& acc, float shift) const {
    float s = 0.0f;
    float4 v = float4(0.0f);
    for (int i = 0; i < R; ++i) {
      if (valid[i]) {
        float d = shift - x[i]; // >= 0, exact near the max
        s += flm::exp_nonpos_f32(x[i] - shift);
        v.x += w[i];
        v.y += flm::weighted(w[i], d);
        if (kSoft) {
          float wt = w[i] * t[i];
          v.z += wt;
          v.w += flm::weighted(wt, d);
        }
      }
    }
    acc.s += s;
    acc.v += v;
  }
};

} // namespace

template <typename T, bool kSoft, bool kWeighted, bool kLooped>
[[kernel]] void ce_forward(
    device const T* logits [[buffer(FL_CE_FWD_LOGITS)]],
    device const long* class_index [[buffer(FL_CE_FWD_INDEX)]],
    device const T* target_probs [[buffer(FL_CE_FWD_PROBS)]],
    device const float* class_weights [[buffer(FL_CE_FWD_WEIGHTS)]],
    device float* loss_out [[buffer(FL_CE_FWD_LOSS)]],
    device float* lse_out [[buffer(FL_CE_FWD_LSE)]],
    device float* lse_lo_out [[buffer(FL_CE_FWD_LSE_LO)]],
    device float* a_sum_out [[buffer(FL_CE_FWD_ASUM)]],
    constant CeArgs& args [[buffer(FL_CE_FWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  const uint K = uint(args.num_classes);
  const ulong offset = ulong(row) * ulong(K); // 64-bit: rows * K may exceed 2^32
  device const T* x = logits + offset;
  device const T* tp = target_probs + (kSoft ? offset : 0);

  long t = 0;
  if (!kSoft) {
    // Same value in every thread: the whole group returns here or none does,
    // before any barrier. A bad index never reaches a memory access.
    t = flk::row_class(class_index[row], args.num_classes, args.has_ignore_index, args.ignore_index);
    if (t < 0) {
      if (tid == 0) {
        flm::CeRow masked = flm::ce_masked_row(t == -2);
        loss_out[row] = masked.loss;
        lse_out[row] = masked.lse;
        lse_lo_out[row] = masked.lse_lo;
        a_sum_out[row] = masked.a_sum;
      }
      return;
    }
  }

  flk::RowAcc acc = flk::row_acc_empty();
  CeChunk<T, kSoft, kWeighted, R> c;
  if (kLooped) {
    // Online log-sum-exp over this thread's chunks j0, j0 + tpg*R, ...
    for (uint j0 = tid * R; j0 < K; j0 += tpg * R) {
      c.load(x, tp, class_weights, j0, K, args.softcap);
      acc = flk::row_acc_moved(acc, fmax(acc.m, c.max()));
      c.accumulate(acc, flm::lse_ref(acc.m));
    }
  } else {
    // The whole row is in registers: one load, then max, then exp.
    uint j0 = tid * R;
    if (j0 < K) {
      c.load(x, tp, class_weights, j0, K, args.softcap);
    } else {
      for (int i = 0; i < R; ++i) {
        c.x[i] = -flm::kInf;
        c.valid[i] = false;
      }
    }
    float m = flk::threadgroup_max(c.max(), scratch, sg, lane, nsg);
    acc.m = m; // nothing accumulated yet: no sums to move
    if (j0 < K) {
      c.accumulate(acc, flm::lse_ref(m));
    }
  }

  flk::RowAcc r = flk::threadgroup_merge<false, true>(acc, scratch, sg, lane, nsg);
  if (tid == 0) {
    flm::CeSmoothing c;
    c.c_target = args.c_target;
    c.c_other = args.c_other;
    flm::CeState st;
    st.lse.max = r.m;
    st.lse.sum = r.s;
    st.all.weight = r.v.x;
    st.all.gap = r.v.y;
    st.target.weight = r.v.z;
    st.target.gap = r.v.w;
    flm::CeRow out;
    if (kSoft) {
      out = flm::ce_finish_soft(st, c, args.z_loss);
    } else {
      float w_t = kWeighted ? class_weights[t] : 1.0f;
      out = flm::ce_finish_hard(st, c, w_t, ce_logit(float(x[t]), args.softcap), args.z_loss);
    }
    loss_out[row] = out.loss;
    lse_out[row] = out.lse;
    lse_lo_out[row] = out.lse_lo;
    a_sum_out[row] = out.a_sum;
  }
}

template <typename T, bool kSoft, bool kWeighted>
[[kernel]] void ce_backward(
    device const T* logits [[buffer(FL_CE_BWD_LOGITS)]],
    device const long* class_index [[buffer(FL_CE_BWD_INDEX)]],
    device const T* target_probs [[buffer(FL_CE_BWD_PROBS)]],
    device const float* class_weights [[buffer(FL_CE_BWD_WEIGHTS)]],
    device const float* lse_in [[buffer(FL_CE_BWD_LSE)]],
    device const float* lse_lo_in [[buffer(FL_CE_BWD_LSE_LO)]],
    device const float* a_sum_in [[buffer(FL_CE_BWD_ASUM)]],
    device const float* g_loss [[buffer(FL_CE_BWD_GLOSS)]],
    device const float* g_lse [[buffer(FL_CE_BWD_GLSE)]],
    device T* grad [[buffer(FL_CE_BWD_GRAD)]],
    constant CeArgs& args [[buffer(FL_CE_BWD_ARGS)]],
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

  long t = 0;
  if (!kSoft) {
    t = flk::row_class(class_index[row], args.num_classes, args.has_ignore_index, args.ignore_index);
    if (t < 0) {
      T fill = T(t == -2 ? flm::kNaN : 0.0f);
      for (int i = 0; i < n; ++i) {
        dx[j0 + i] = fill;
      }
      return;
    }
  }

  const float g = g_loss[row];
  const float lse = lse_in[row];
  const float lse_lo = lse_lo_in[row];
  const float coef = flm::ce_row_softmax_coef(g, g_lse[row], a_sum_in[row], lse, args.z_loss);
  const float g_other = g * args.c_other;
  const float g_target = g * args.c_target;
  for (int i = 0; i < n; ++i) {
    uint j = j0 + i;
    float w = kWeighted ? class_weights[j] : 1.0f;
    float q;
    if (kSoft) {
      q = g_other + g * args.c_target * float(target_probs[offset + j]);
    } else {
      q = long(j) == t ? g_other + g_target : g_other;
    }
    // Capped: d/dx = d/dz * (1 - (z / c)^2), z = softcap(x) (csrc/math/softcap.h).
    float z = ce_logit(float(x[j]), args.softcap);
    float d = flm::ce_grad(z, lse, lse_lo, coef, w * q);
    dx[j] = T(args.softcap != 0.0f ? d * flm::softcap_grad(z, args.softcap) : d);
  }
}

// Host names: fl_ce_fwd_<block|looped>_<hard|soft>_<nw|w>_<dtype> and
// fl_ce_bwd_<hard|soft>_<nw|w>_<dtype> (launch_plan.cpp builds the same names).
#define FL_INST_CE_FWD(var, looped, tgt, soft, wn, weighted, dname, T)                            \
  template [[host_name("fl_ce_fwd_" #var "_" #tgt "_" #wn "_" #dname)]] [[kernel]] decltype(      \
      ce_forward<T, soft, weighted, looped>) ce_forward<T, soft, weighted, looped>;

#define FL_INST_CE_BWD(tgt, soft, wn, weighted, dname, T)                                        \
  template [[host_name("fl_ce_bwd_" #tgt "_" #wn "_" #dname)]] [[kernel]] decltype(              \
      ce_backward<T, soft, weighted>) ce_backward<T, soft, weighted>;

#define FL_INST_CE_LAYOUT(tgt, soft, wn, weighted, dname, T)        \
  FL_INST_CE_FWD(block, false, tgt, soft, wn, weighted, dname, T)   \
  FL_INST_CE_FWD(looped, true, tgt, soft, wn, weighted, dname, T)   \
  FL_INST_CE_BWD(tgt, soft, wn, weighted, dname, T)

#define FL_INST_CE(dname, T)                          \
  FL_INST_CE_LAYOUT(hard, false, nw, false, dname, T) \
  FL_INST_CE_LAYOUT(hard, false, w, true, dname, T)   \
  FL_INST_CE_LAYOUT(soft, true, nw, false, dname, T)  \
  FL_INST_CE_LAYOUT(soft, true, w, true, dname, T)

FL_INST_CE(float32, float)
FL_INST_CE(float16, half)
FL_INST_CE(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
