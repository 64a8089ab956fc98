// Distillation divergence kernels (kl_div, jsd): what csrc/cpu/distillation.cpp
// computes, with the same formulas (csrc/math/distillation.h).
//
// Forward: one threadgroup per row, its threads striding over the row R =
// FL_ROW_READS elements at a time (any V; launch_plan.cpp sizes the group).
//   pass 1: every thread keeps the student's and the teacher's ScaledLse (and
//     the CE's sum at temperature 1); SIMD-group then threadgroup merges;
//     SIMD-group 0 finishes the row's DistillStats and leaves them in
//     threadgroup memory for every thread;
//   pass 2: every thread adds its elements' terms (D and E); a threadgroup sum;
//     thread 0 writes the loss and the stats.
// Backward: a 2-D grid over (pieces of a row, rows), R elements per thread,
// no threadgroup memory and no barrier: each gradient element needs only its
// own two logits and the row's saved stats.
// Every thread of a group reaches each barrier: the only early return (an
// ignored or out-of-range row) depends on the row alone, before any barrier.
#include <metal_stdlib>

#include "fl_common.h"
#include "../csrc/math/distillation.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace {

// Scratch layout (floats): pass 1's per-SIMD-group states [0, 160), the row's
// stats [160, 166), pass 2's per-SIMD-group sums [192, 256).
#define KD_SCRATCH_MS 0
#define KD_SCRATCH_SS 32
#define KD_SCRATCH_MT 64
#define KD_SCRATCH_ST 96
#define KD_SCRATCH_CE 128
#define KD_SCRATCH_STATS 160
#define KD_SCRATCH_D 192
#define KD_SCRATCH_E 224
static_assert(KD_SCRATCH_E + 32 <= FL_ROW_SCRATCH_FLOATS, "distillation scratch too small");
static_assert(KD_SCRATCH_STATS + flm::kDistillStats <= KD_SCRATCH_D, "stats overlap the sums");

// Pass 1 state: both rows' scaled log-sum-exps and, relative to s.max, the
// student's exp-sum at temperature 1 (ce).
struct KdLse {
  flm::ScaledLse s;
  flm::ScaledLse t;
  float ce;
};

inline KdLse kd_lse_empty() {
  KdLse a;
  a.s = flm::scaled_lse_empty();
  a.t = flm::scaled_lse_empty();
  a.ce = 0.0f;
  return a;
}

inline KdLse kd_lse_moved(KdLse a, float ms, float mt, float c) {
  flm::ScaledLse ce;
  ce.max = a.s.max;
  ce.sum = a.ce;
  a.ce = flm::scaled_lse_move(ce, ms, 1.0f).sum;
  a.s = flm::scaled_lse_move(a.s, ms, c);
  a.t = flm::scaled_lse_move(a.t, mt, c);
  return a;
}

// Every lane gets the merged state of its SIMD-group.
inline KdLse kd_simd_merge(KdLse a, float c) {
  a = kd_lse_moved(a, simd_max(a.s.max), simd_max(a.t.max), c);
  a.s.sum = simd_sum(a.s.sum);
  a.t.sum = simd_sum(a.t.sum);
  a.ce = simd_sum(a.ce);
  return a;
}

template <typename X, int R>
inline void kd_load(device const X* row, uint j0, uint V, thread float* out) {
  for (int i = 0; i < R; ++i) {
    uint j = j0 + i;
    out[i] = j < V ? float(row[j]) : -flm::kInf;
  }
}

inline flm::DistillCoefs kd_coefs(constant KdArgs& args) {
  flm::DistillCoefs k;
  k.c = args.c;
  k.beta = args.beta;
  k.d_scale = args.d_scale;
  k.alpha = args.alpha;
  return k;
}

// The row's class (0 without targets), or -1 ignored / -2 out of range.
inline long kd_row_class(device const long* class_index, uint row, constant KdArgs& args) {
  if (args.has_targets == 0) {
    return 0;
  }
  return flk::row_class(class_index[row], args.vocab, args.has_ignore_index, args.ignore_index);
}

inline void kd_store_stats(device float* out, flm::DistillStats st) {
  out[0] = st.s_ref;
  out[1] = st.s_log;
  out[2] = st.t_ref;
  out[3] = st.t_log;
  out[4] = st.e_q;
  out[5] = st.ce_log;
}

} // namespace

template <typename S, typename T, int kKind>
[[kernel]] void kd_forward(
    device const S* student [[buffer(FL_KD_FWD_STUDENT)]],
    device const T* teacher [[buffer(FL_KD_FWD_TEACHER)]],
    device const long* class_index [[buffer(FL_KD_FWD_INDEX)]],
    device float* loss_out [[buffer(FL_KD_FWD_LOSS)]],
    device float* stats_out [[buffer(FL_KD_FWD_STATS)]],
    constant KdArgs& args [[buffer(FL_KD_FWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  const uint V = uint(args.vocab);
  const float c = args.c;
  const bool own_ce = args.ce_own_sum != 0;
  device float* st_out = stats_out + ulong(row) * ulong(flm::kDistillStats);

  const long y = kd_row_class(class_index, row, args);
  if (y < 0) { // uniform over the group, before any barrier
    if (tid == 0) {
      bool bad = y == -2;
      loss_out[row] = bad ? flm::kNaN : 0.0f;
      kd_store_stats(st_out, flm::distill_masked_stats(bad));
    }
    return;
  }
  device const S* s = student + ulong(row) * ulong(V);
  device const T* t = teacher + ulong(row) * ulong(V);

  // pass 1
  KdLse acc = kd_lse_empty();
  for (uint j0 = tid * R; j0 < V; j0 += tpg * R) {
    float sv[R], tv[R];
    kd_load<S, R>(s, j0, V, sv);
    kd_load<T, R>(t, j0, V, tv);
    float ms = acc.s.max, mt = acc.t.max;
    for (int i = 0; i < R; ++i) {
      ms = fmax(ms, sv[i]);
      mt = fmax(mt, tv[i]);
    }
    acc = kd_lse_moved(acc, ms, mt, c);
    const float shs = flm::lse_ref(ms), sht = flm::lse_ref(mt);
    for (int i = 0; i < R; ++i) { // elements past V hold -inf: exp gives 0
      acc.s.sum += flm::scaled_exp(sv[i], shs, c);
      acc.t.sum += flm::scaled_exp(tv[i], sht, c);
      if (own_ce) {
        acc.ce += flm::exp_nonpos_f32(sv[i] - shs);
      }
    }
  }
  acc = kd_simd_merge(acc, c);
  if (lane == 0) {
    scratch[KD_SCRATCH_MS + sg] = acc.s.max;
    scratch[KD_SCRATCH_SS + sg] = acc.s.sum;
    scratch[KD_SCRATCH_MT + sg] = acc.t.max;
    scratch[KD_SCRATCH_ST + sg] = acc.t.sum;
    scratch[KD_SCRATCH_CE + sg] = acc.ce;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    KdLse r = kd_lse_empty();
    if (lane < nsg) { // slots of absent SIMD-groups are never read
      r.s.max = scratch[KD_SCRATCH_MS + lane];
      r.s.sum = scratch[KD_SCRATCH_SS + lane];
      r.t.max = scratch[KD_SCRATCH_MT + lane];
      r.t.sum = scratch[KD_SCRATCH_ST + lane];
      r.ce = scratch[KD_SCRATCH_CE + lane];
    }
    r = kd_simd_merge(r, c);
    if (lane == 0) {
      flm::DistillStats st = flm::distill_stats(r.s, r.t, own_ce ? r.ce : r.s.sum);
      scratch[KD_SCRATCH_STATS + 0] = st.s_ref;
      scratch[KD_SCRATCH_STATS + 1] = st.s_log;
      scratch[KD_SCRATCH_STATS + 2] = st.t_ref;
      scratch[KD_SCRATCH_STATS + 3] = st.t_log;
      scratch[KD_SCRATCH_STATS + 5] = st.ce_log;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  flm::DistillStats st;
  st.s_ref = scratch[KD_SCRATCH_STATS + 0];
  st.s_log = scratch[KD_SCRATCH_STATS + 1];
  st.t_ref = scratch[KD_SCRATCH_STATS + 2];
  st.t_log = scratch[KD_SCRATCH_STATS + 3];
  st.e_q = 0.0f;
  st.ce_log = scratch[KD_SCRATCH_STATS + 5];

  // pass 2
  const flm::DistillCoefs k = kd_coefs(args);
  float d = 0.0f, e = 0.0f;
  for (uint j0 = tid * R; j0 < V; j0 += tpg * R) {
    for (int i = 0; i < R; ++i) {
      uint j = j0 + i;
      if (j < V) {
        float lq = flm::scaled_log_prob(float(s[j]), st.s_ref, st.s_log, c);
        float lp = flm::scaled_log_prob(float(t[j]), st.t_ref, st.t_log, c);
        flm::DistillTerm term = flm::distill_term<kKind>(lq, lp, k.beta);
        d += term.d;
        e += term.e;
      }
    }
  }
  d = simd_sum(d);
  e = simd_sum(e);
  if (lane == 0) {
    scratch[KD_SCRATCH_D + sg] = d;
    scratch[KD_SCRATCH_E + sg] = e;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    d = simd_sum(lane < nsg ? scratch[KD_SCRATCH_D + lane] : 0.0f);
    e = simd_sum(lane < nsg ? scratch[KD_SCRATCH_E + lane] : 0.0f);
    if (lane == 0) {
      st.e_q = e;
      float s_y = k.alpha != 0.0f ? float(s[y]) : 0.0f;
      loss_out[row] = flm::distill_row_loss(d, k, st, s_y);
      kd_store_stats(st_out, st);
    }
  }
}

template <typename S, typename T, int kKind>
[[kernel]] void kd_backward(
    device const S* student [[buffer(FL_KD_BWD_STUDENT)]],
    device const T* teacher [[buffer(FL_KD_BWD_TEACHER)]],
    device const long* class_index [[buffer(FL_KD_BWD_INDEX)]],
    device const float* stats_in [[buffer(FL_KD_BWD_STATS)]],
    device const float* g_loss [[buffer(FL_KD_BWD_GLOSS)]],
    device S* grad [[buffer(FL_KD_BWD_GRAD)]],
    constant KdArgs& args [[buffer(FL_KD_BWD_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint2 group_size [[threads_per_threadgroup]]) {
  // (MSL: the grid-position attributes of one kernel share one vector width.)
  constexpr int R = FL_ROW_READS;
  const uint V = uint(args.vocab);
  const uint row = group.y;
  const uint j0 = (group.x * group_size.x + tid) * uint(R);
  if (j0 >= V) {
    return; // no barriers in this kernel
  }
  const ulong offset = ulong(row) * ulong(V);
  device S* dx = grad + offset;
  const int n = min(int(V - j0), R);
  const long y = kd_row_class(class_index, row, args);
  if (y < 0) {
    S fill = S(y == -2 ? flm::kNaN : 0.0f);
    for (int i = 0; i < n; ++i) {
      dx[j0 + i] = fill;
    }
    return;
  }
  device const S* s = student + offset;
  device const T* t = teacher + offset;
  device const float* sp = stats_in + ulong(row) * ulong(flm::kDistillStats);
  flm::DistillStats st;
  st.s_ref = sp[0];
  st.s_log = sp[1];
  st.t_ref = sp[2];
  st.t_log = sp[3];
  st.e_q = sp[4];
  st.ce_log = sp[5];
  const flm::DistillCoefs k = kd_coefs(args);
  const float g = args.unit_cotangent != 0 ? 1.0f : g_loss[row];
  for (int i = 0; i < n; ++i) {
    uint j = j0 + i;
    // (the gradient may overwrite the student in place: element j is read
    // before it is written, by this thread only)
    float v = flm::distill_grad<kKind>(float(s[j]), float(t[j]), st, k, g);
    if (k.alpha != 0.0f && long(j) == y) {
      v = flm::distill_grad_target(v, k, g);
    }
    dx[j] = S(v);
  }
}

// Host names: fl_kd_<fwd|bwd>_<kl|rkl|jsd>_<student dtype>_<teacher dtype>.
#define FL_INST_KD_KIND(kname, kind, sname, S, tname, T)                                        \
  template [[host_name("fl_kd_fwd_" #kname "_" #sname "_" #tname)]] [[kernel]]                \
      decltype(kd_forward<S, T, kind>) kd_forward<S, T, kind>;                                 \
  template [[host_name("fl_kd_bwd_" #kname "_" #sname "_" #tname)]] [[kernel]]                \
      decltype(kd_backward<S, T, kind>) kd_backward<S, T, kind>;

#define FL_INST_KD(sname, S, tname, T)                                   \
  FL_INST_KD_KIND(kl, 0, sname, S, tname, T)                             \
  FL_INST_KD_KIND(rkl, 1, sname, S, tname, T)                            \
  FL_INST_KD_KIND(jsd, 2, sname, S, tname, T)

// (kind 0, 1, 2: flm::kDistillForwardKL, kDistillReverseKL, kDistillJSD;
// static_asserted below, since a host_name needs the literal)
static_assert(flm::kDistillForwardKL == 0 && flm::kDistillReverseKL == 1 && flm::kDistillJSD == 2,
              "kind numbers of the instantiations");

FL_INST_KD(float32, float, float32, float)
FL_INST_KD(float32, float, float16, half)
FL_INST_KD(float32, float, bfloat16, bfloat)
FL_INST_KD(float16, half, float32, float)
FL_INST_KD(float16, half, float16, half)
FL_INST_KD(float16, half, bfloat16, bfloat)
FL_INST_KD(bfloat16, bfloat, float32, float)
FL_INST_KD(bfloat16, bfloat, float16, half)
FL_INST_KD(bfloat16, bfloat, bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
