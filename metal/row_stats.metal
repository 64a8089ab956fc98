// Row statistics of given logits (the logits form of ops/row_stats.h: the
// scorer's log_probs / entropy, _ext.row_stats): what csrc/cpu/row_stats.cpp
// computes, with the same formulas (csrc/math/row_stats.h); only the order of
// the float32 sums differs. The linear form runs on the linear CE's tiles
// (linear_cross_entropy.metal: lce_forward, fl_rs_fwd_finish, rs_dz).
//
// Contract. logits [rows, V] T (float32 / float16 / bfloat16), row-contiguous;
// z_j = softcap(y_j) / T (RsArgs); targets [rows] int64, global class indices
// (class j of this head is vocab_start + j), read only with has_targets.
// Forward outputs (float32 [rows], argmax int64), those of RsArgs::stats only:
// lse (pair), target logit, logit_sum, expected = E_p[z] (pair), max, argmax
// (vocab_start + the first maximal class, a NaN above every number: as
// mx.argmax). Saved for the backward: the lse and expected pairs.
//
// Forward: one threadgroup per row, its threads striding over the row R =
// FL_ROW_READS elements at a time (any V; launch_plan.cpp sizes the group);
// one pass: every thread keeps the linear CE's online row state
// (flm::LceRowState: max, exp-sum, gap sum, entropy sum, count) and an argmax,
// merged over the SIMD-group (xor shuffles) then over the SIMD-groups (through
// threadgroup memory, SIMD-group 0); thread 0 finishes the row as
// fl_rs_fwd_finish does (logit_sum = count ref - gap, expected = ref + ent / s).
// Backward: a 2-D grid over (pieces of a row, rows), R elements per thread, no
// threadgroup memory and no barrier: dL/dy_j needs only y_j and the row's
// saved pairs and cotangents (flm::row_stats_grad, row_stats_chain).
// Every thread of a forward group reaches each barrier (no early return).
#include <metal_stdlib>

#include "fl_common.h"
#include "../csrc/math/cross_entropy.h"
#include "../csrc/math/linear_cross_entropy.h"
#include "../csrc/math/row_stats.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace {

// Scratch layout (floats): per SIMD-group, the row state (max, sum, gap, ent,
// count) and the argmax (key, index, stored by bits): 7 rows of 32.
#define RS_SCRATCH_MAX 0
#define RS_SCRATCH_SUM 32
#define RS_SCRATCH_GAP 64
#define RS_SCRATCH_ENT 96
#define RS_SCRATCH_COUNT 128
#define RS_SCRATCH_KEY 160
#define RS_SCRATCH_INDEX 192
static_assert(RS_SCRATCH_INDEX + 32 <= FL_ROW_SCRATCH_FLOATS, "row statistics scratch too small");

// A piece of a row: its online state and its argmax.
struct RsPiece {
  flm::LceRowState st;
  flm::ArgMax best;
};

inline RsPiece rs_piece_empty() {
  RsPiece p;
  p.st = flm::lce_state_empty();
  p.best = flm::argmax_empty();
  return p;
}

inline RsPiece rs_piece_merge(RsPiece a, RsPiece b) {
  a.st = flm::lce_state_merge(a.st, b.st);
  a.best = flm::argmax_merge(a.best, b.best);
  return a;
}

// The pieces of the 32 lanes merged, in every lane (a butterfly: the merges
// are commutative bit for bit, so every lane ends with the same state).
inline RsPiece rs_simd_merge(RsPiece a) {
  for (ushort m = 1; m < 32; m <<= 1) {
    RsPiece b;
    b.st = flm::lce_state_empty();
    b.st.ce.lse.max = simd_shuffle_xor(a.st.ce.lse.max, m);
    b.st.ce.lse.sum = simd_shuffle_xor(a.st.ce.lse.sum, m);
    b.st.ce.all.gap = simd_shuffle_xor(a.st.ce.all.gap, m);
    b.st.ce.all.weight = simd_shuffle_xor(a.st.ce.all.weight, m);
    b.st.ent = simd_shuffle_xor(a.st.ent, m);
    b.best.key = simd_shuffle_xor(a.best.key, m);
    b.best.index = simd_shuffle_xor(a.best.index, m);
    a = rs_piece_merge(a, b);
  }
  return a;
}

// z = softcap(y) / T (the CPU's order: cap, then the temperature's factor).
inline float rs_logit(float y, constant RsArgs& args) {
  y = args.softcap != 0.0f ? flm::softcap(y, args.softcap) : y;
  return y * args.inv_temperature;
}

inline long rs_row_class(device const long* targets, uint row, constant RsArgs& args) {
  if (args.has_targets == 0) {
    return -1;
  }
  return flm::row_stats_class(targets[row], long(args.vocab), args.has_ignore_index != 0, args.ignore_index,
                              args.sharded != 0, args.vocab_start);
}

} // namespace

template <typename T>
[[kernel]] void rs_logits_forward(
    device const T* logits [[buffer(FL_RS_LOG_FWD_LOGITS)]],
    device const long* targets [[buffer(FL_RS_LOG_FWD_TARGETS)]],
    device float* lse [[buffer(FL_RS_LOG_FWD_LSE)]],
    device float* lse_lo [[buffer(FL_RS_LOG_FWD_LSE_LO)]],
    device float* target [[buffer(FL_RS_LOG_FWD_TARGET)]],
    device float* logit_sum [[buffer(FL_RS_LOG_FWD_LOGIT_SUM)]],
    device float* expected [[buffer(FL_RS_LOG_FWD_EXPECTED)]],
    device float* expected_lo [[buffer(FL_RS_LOG_FWD_EXPECTED_LO)]],
    device float* row_max [[buffer(FL_RS_LOG_FWD_MAX)]],
    device long* argmax [[buffer(FL_RS_LOG_FWD_ARGMAX)]],
    constant RsArgs& args [[buffer(FL_RS_LOG_FWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  const uint V = uint(args.vocab);
  device const T* y = logits + ulong(row) * ulong(V); // 64-bit: rows * V may exceed 2^32

  RsPiece acc = rs_piece_empty();
  for (uint j0 = tid * R; j0 < V; j0 += tpg * R) {
    float z[R];
    float step_max = -flm::kInf;
    for (int i = 0; i < R; ++i) {
      z[i] = j0 + i < V ? rs_logit(float(y[j0 + i]), args) : -flm::kInf;
      step_max = fmax(step_max, z[i]);
    }
    acc.st = flm::lce_state_move(acc.st, fmax(acc.st.ce.lse.max, step_max));
    const float shift = flm::lse_ref(acc.st.ce.lse.max);
    float e = 0.0f, gap = 0.0f, ent = 0.0f, count = 0.0f;
    for (int i = 0; i < R; ++i) {
      if (j0 + i < V) {
        const float ec = flm::exp_nonpos_f32(z[i] - shift);
        e += ec;
        gap += shift - z[i];
        ent += flm::weighted(ec, z[i] - shift);
        count += 1.0f;
        flm::ArgMax here;
        here.key = flm::argmax_key(z[i]);
        here.index = int(j0) + i;
        acc.best = flm::argmax_merge(acc.best, here);
      }
    }
    acc.st = flm::lce_state_add(acc.st, e, gap, ent, count);
  }
  acc = rs_simd_merge(acc);
  if (lane == 0) {
    scratch[RS_SCRATCH_MAX + sg] = acc.st.ce.lse.max;
    scratch[RS_SCRATCH_SUM + sg] = acc.st.ce.lse.sum;
    scratch[RS_SCRATCH_GAP + sg] = acc.st.ce.all.gap;
    scratch[RS_SCRATCH_ENT + sg] = acc.st.ent;
    scratch[RS_SCRATCH_COUNT + sg] = acc.st.ce.all.weight;
    scratch[RS_SCRATCH_KEY + sg] = as_type<float>(acc.best.key);
    scratch[RS_SCRATCH_INDEX + sg] = as_type<float>(acc.best.index);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg != 0) {
    return; // (no barrier below)
  }
  RsPiece r = rs_piece_empty();
  if (lane < nsg) { // slots of absent SIMD-groups are never read
    r.st.ce.lse.max = scratch[RS_SCRATCH_MAX + lane];
    r.st.ce.lse.sum = scratch[RS_SCRATCH_SUM + lane];
    r.st.ce.all.gap = scratch[RS_SCRATCH_GAP + lane];
    r.st.ent = scratch[RS_SCRATCH_ENT + lane];
    r.st.ce.all.weight = scratch[RS_SCRATCH_COUNT + lane];
    r.best.key = as_type<uint>(scratch[RS_SCRATCH_KEY + lane]);
    r.best.index = as_type<int>(scratch[RS_SCRATCH_INDEX + lane]);
  }
  r = rs_simd_merge(r);
  if (lane != 0) {
    return;
  }
  const int stats = args.stats;
  const flm::LceRowState st = r.st;
  const float ref = flm::lse_ref(st.ce.lse.max);
  if ((stats & flm::kStatLse) != 0) {
    flm::CeRow fin = flm::ce_finish_row(st.ce.lse, 0.0f, 0.0f, 0.0f);
    lse[row] = fin.lse;
    lse_lo[row] = fin.lse_lo;
  }
  if ((stats & flm::kStatTarget) != 0) {
    const long t = rs_row_class(targets, row, args);
    target[row] = t >= 0 ? rs_logit(float(y[t]), args) : (t == -2 ? flm::kNaN : 0.0f);
  }
  if ((stats & flm::kStatLogitSum) != 0) {
    logit_sum[row] = st.ce.all.weight * ref - st.ce.all.gap;
  }
  if ((stats & flm::kStatExpected) != 0) {
    flm::FloatPair ex = flm::row_expected(ref, st.ce.lse.sum, st.ent);
    expected[row] = ex.hi;
    expected_lo[row] = ex.lo;
  }
  if ((stats & flm::kStatMax) != 0) {
    row_max[row] = st.ce.lse.max;
  }
  if ((stats & flm::kStatArgmax) != 0) {
    argmax[row] = args.vocab_start + long(r.best.index);
  }
}

template <typename T>
[[kernel]] void rs_logits_backward(
    device const T* logits [[buffer(FL_RS_LOG_BWD_LOGITS)]],
    device const long* targets [[buffer(FL_RS_LOG_BWD_TARGETS)]],
    device const float* lse [[buffer(FL_RS_LOG_BWD_LSE)]],
    device const float* lse_lo [[buffer(FL_RS_LOG_BWD_LSE_LO)]],
    device const float* expected [[buffer(FL_RS_LOG_BWD_EXPECTED)]],
    device const float* expected_lo [[buffer(FL_RS_LOG_BWD_EXPECTED_LO)]],
    device const float* g_lse [[buffer(FL_RS_LOG_BWD_G_LSE)]],
    device const float* g_target [[buffer(FL_RS_LOG_BWD_G_TARGET)]],
    device const float* g_logit_sum [[buffer(FL_RS_LOG_BWD_G_LOGIT_SUM)]],
    device const float* g_expected [[buffer(FL_RS_LOG_BWD_G_EXPECTED)]],
    device T* grad [[buffer(FL_RS_LOG_BWD_GRAD)]],
    constant RsArgs& args [[buffer(FL_RS_LOG_BWD_ARGS)]],
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
  device const T* y = logits + offset;
  device T* dy = grad + offset;
  const int n = min(int(V - j0), R);
  const int cot = args.cotangents;
  const long t = rs_row_class(targets, row, args);
  if (t == -2 && (cot & flm::kStatTarget) != 0) { // the NaN target's row: NaN (as the CPU)
    for (int i = 0; i < n; ++i) {
      dy[j0 + i] = T(flm::kNaN);
    }
    return;
  }
  flm::RowStatsCotangent g;
  g.lse = (cot & flm::kStatLse) != 0 ? g_lse[row] : 0.0f;
  g.target = (cot & flm::kStatTarget) != 0 ? g_target[row] : 0.0f;
  g.logit_sum = (cot & flm::kStatLogitSum) != 0 ? g_logit_sum[row] : 0.0f;
  g.expected = (cot & flm::kStatExpected) != 0 ? g_expected[row] : 0.0f;
  // No softmax term without a nonzero lse or expected cotangent: then the
  // pairs are not read (nor bound, when neither cotangent is).
  const bool soft = g.lse != 0.0f || g.expected != 0.0f;
  const float l = soft ? lse[row] : 0.0f;
  const float l_lo = soft ? lse_lo[row] : 0.0f;
  flm::FloatPair e;
  e.hi = soft && (cot & flm::kStatExpected) != 0 ? expected[row] : 0.0f;
  e.lo = soft && (cot & flm::kStatExpected) != 0 ? expected_lo[row] : 0.0f;
  for (int i = 0; i < n; ++i) {
    const uint j = j0 + i;
    // (the gradient may overwrite the logits in place: element j is read
    // before it is written, by this thread only)
    const float z = rs_logit(float(y[j]), args);
    float d = soft ? flm::row_stats_grad(z, l, l_lo, e, g) : g.logit_sum;
    if (long(j) == t) {
      d += g.target;
    }
    dy[j] = T(d * flm::row_stats_chain(z, args.softcap, args.temperature, args.inv_temperature));
  }
}

// Host names: fl_rs_logits_<fwd|bwd>_<dtype> (launch_plan.cpp builds the same).
#define FL_INST_RS_LOGITS(dname, T)                                                              \
  template [[host_name("fl_rs_logits_fwd_" #dname)]] [[kernel]] decltype(rs_logits_forward<T>)   \
      rs_logits_forward<T>;                                                                      \
  template [[host_name("fl_rs_logits_bwd_" #dname)]] [[kernel]] decltype(rs_logits_backward<T>)  \
      rs_logits_backward<T>;

FL_INST_RS_LOGITS(float32, float)
FL_INST_RS_LOGITS(float16, half)
FL_INST_RS_LOGITS(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
