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
// a_sum. With args.stats (return_stats, a uniform branch) every thread also
// keeps the entropy sum and the first maximal logit (and soft target) of its
// elements (csrc/math/cross_entropy.h, "row statistics"); after the merge the
// row's max is broadcast, each thread moves its entropy sum to it, and one
// more reduction (a sum and two argmax merges) gives thread 0 the statistics.
// Ignored and out-of-range rows are then reduced too (their statistics are
// their logits'), and written with the masked row's loss.
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

  // return_stats: adds this chunk's entropy terms (relative to `shift`, as
  // accumulate) to `ent` and its elements j0, j0 + 1, ... to the argmaxes of
  // the logits and (soft) of the target probabilities.
  void accumulate_stats(
      thread float& ent,
      thread flm::ArgMax& best,
      thread flm::ArgMax& target_best,
      float shift,
      uint j0) const {
    for (int i = 0; i < R; ++i) {
      if (valid[i]) {
        float e = x[i] - shift;
        ent += flm::entropy_term(flm::exp_nonpos_f32(e), e);
        flm::ArgMax here;
        here.key = flm::argmax_key(x[i]);
        here.index = int(j0) + i;
        best = flm::argmax_merge(best, here);
        if (kSoft) {
          here.key = flm::argmax_key(t[i]);
          target_best = flm::argmax_merge(target_best, here);
        }
      }
    }
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

// Scratch slots of the statistics' reduction (floats; keys and indices stored
// by bits). Used only after the row merge's readers are past a barrier.
#define CE_STATS_ENT 0
#define CE_STATS_KEY 32
#define CE_STATS_INDEX 64
#define CE_STATS_TKEY 96
#define CE_STATS_TINDEX 128
// One slot for the row's max, broadcast: the block variant's max slots, free
// once every thread has passed the row merge's barrier (and disjoint from the
// five rows of 32 above, which end at 160 <= FLK_SCRATCH_MAX = 224).
#define CE_STATS_ROW_MAX FLK_SCRATCH_MAX

// The row statistics of the whole group, valid in SIMD-group 0. row_max: the
// merged row's max (valid in SIMD-group 0); ent, best, target_best, acc: this
// thread's. Every thread of the group must call it (two barriers).
struct CeRowStats {
  float ent; // relative to lse_ref(row_max)
  flm::ArgMax best;
  flm::ArgMax target_best;
};

inline CeRowStats ce_stats_merge(
    float row_max,
    float ent,
    flm::ArgMax best,
    flm::ArgMax target_best,
    flk::RowAcc acc,
    threadgroup float* scratch,
    uint tid,
    uint sg,
    uint lane,
    uint nsg) {
  if (tid == 0) {
    scratch[CE_STATS_ROW_MAX] = row_max;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float m = scratch[CE_STATS_ROW_MAX];
  // This thread's entropy sum, moved from its own max to the row's.
  ent = flm::entropy_sum_moved(ent, acc.s, flm::max_move(acc.m, m));
  ent = simd_sum(ent);
  best = flk::simd_argmax(best);
  target_best = flk::simd_argmax(target_best);
  if (lane == 0) {
    scratch[CE_STATS_ENT + sg] = ent;
    scratch[CE_STATS_KEY + sg] = as_type<float>(best.key);
    scratch[CE_STATS_INDEX + sg] = as_type<float>(best.index);
    scratch[CE_STATS_TKEY + sg] = as_type<float>(target_best.key);
    scratch[CE_STATS_TINDEX + sg] = as_type<float>(target_best.index);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  CeRowStats r;
  r.ent = 0.0f;
  r.best = flm::argmax_empty();
  r.target_best = flm::argmax_empty();
  if (sg == 0) {
    if (lane < nsg) {
      r.ent = scratch[CE_STATS_ENT + lane];
      r.best.key = as_type<uint>(scratch[CE_STATS_KEY + lane]);
      r.best.index = as_type<int>(scratch[CE_STATS_INDEX + lane]);
      r.target_best.key = as_type<uint>(scratch[CE_STATS_TKEY + lane]);
      r.target_best.index = as_type<int>(scratch[CE_STATS_TINDEX + lane]);
    }
    r.ent = simd_sum(r.ent);
    r.best = flk::simd_argmax(r.best);
    r.target_best = flk::simd_argmax(r.target_best);
  }
  return r;
}

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
    device float* stat_lse_out [[buffer(FL_CE_FWD_STAT_LSE)]],
    device float* entropy_out [[buffer(FL_CE_FWD_ENTROPY)]],
    device long* argmax_out [[buffer(FL_CE_FWD_ARGMAX)]],
    device bool* correct_out [[buffer(FL_CE_FWD_CORRECT)]],
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

  const bool stats = args.stats != 0; // uniform
  long t = 0;
  if (!kSoft) {
    // Same value in every thread: the whole group returns here or none does,
    // before any barrier. A bad index never reaches a memory access.
    t = flk::row_class(class_index[row], args.num_classes, args.has_ignore_index, args.ignore_index);
    if (t < 0 && !stats) {
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
  float ent = 0.0f; // return_stats (math/cross_entropy.h)
  flm::ArgMax best = flm::argmax_empty();
  flm::ArgMax target_best = flm::argmax_empty();
  if (kLooped) {
    // Online log-sum-exp over this thread's chunks j0, j0 + tpg*R, ...
    for (uint j0 = tid * R; j0 < K; j0 += tpg * R) {
      c.load(x, tp, class_weights, j0, K, args.softcap);
      float to_max = fmax(acc.m, c.max());
      if (stats) {
        ent = flm::entropy_sum_moved(ent, acc.s, flm::max_move(acc.m, to_max));
      }
      acc = flk::row_acc_moved(acc, to_max);
      c.accumulate(acc, flm::lse_ref(acc.m));
      if (stats) {
        c.accumulate_stats(ent, best, target_best, flm::lse_ref(acc.m), j0);
      }
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
      if (stats) {
        c.accumulate_stats(ent, best, target_best, flm::lse_ref(m), j0);
      }
    }
  }

  flk::RowAcc r = flk::threadgroup_merge<false, true>(acc, scratch, sg, lane, nsg);
  CeRowStats rs;
  rs.ent = 0.0f;
  rs.best = flm::argmax_empty();
  rs.target_best = flm::argmax_empty();
  if (stats) {
    rs = ce_stats_merge(r.m, ent, best, target_best, acc, scratch, tid, sg, lane, nsg);
  }
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
    bool correct = false;
    if (kSoft) {
      out = flm::ce_finish_soft(st, c, args.z_loss);
      if (stats) {
        correct = ce_logit(float(x[rs.target_best.index]), args.softcap) == r.m;
      }
    } else if (t >= 0) {
      float w_t = kWeighted ? class_weights[t] : 1.0f;
      float x_t = ce_logit(float(x[t]), args.softcap);
      out = flm::ce_finish_hard(st, c, w_t, x_t, args.z_loss);
      correct = x_t == r.m;
    } else { // (only with stats: without, such rows returned at the start)
      out = flm::ce_masked_row(t == -2);
    }
    if (stats) {
      stat_lse_out[row] = flm::ce_finish_row(st.lse, 0.0f, 0.0f, 0.0f).lse;
      entropy_out[row] = flm::softmax_entropy(r.s, rs.ent);
      argmax_out[row] = long(rs.best.index);
      correct_out[row] = correct;
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
