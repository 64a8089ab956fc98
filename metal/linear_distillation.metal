// Fused linear distillation on Metal: linear_distillation_loss (a student head
// and a frozen teacher head) and linear_topk_distillation_loss (a student head
// against an offline teacher's stored top-k log-probabilities), without either
// head's N x V logits beyond one chunk of rows.
//
// Contract (the CPU primitives define the semantics: csrc/cpu/
// linear_distillation.cpp, csrc/cpu/linear_topk_distillation.cpp; the maths,
// once for both devices: csrc/math/distillation.h; the graph side:
// csrc/ops/linear_distillation.h, csrc/ops/linear_topk_distillation.h):
//   hidden  [N, H] T per head (float32 / float16 / bfloat16), row-contiguous;
//           the student and the teacher each with their own H and dtype
//   weight  [V, H] per head, read only through a head policy (lce_head.h's
//           DenseHead<W>, or a quantized head of metal/quantized_head.h)
//   targets, teacher ids / log-probabilities: per row, int64 / float32
// The host (csrc/metal/linear_distillation.cpp) runs, per chunk of R rows
// (launch_plan.h ld_plan / ld_schedule: R x V float32 per head within
// chunk_bytes, as the CPU's chunked-head driver):
//   ld_logits   Z = H[row0, row0 + R) W^T of one head into the chunk's float32
//               buffer [R, V]: the linear CE's logits tile (lce_head.h
//               logits_tile: MLX's steel loader and fragment multiply) stored
//               by lce_gemm.h's store_tile; the student's, then the teacher's
//   the rows    two heads: the logits form's own row kernels on the chunk,
//               unchanged (metal/distillation.metal kd_forward / kd_backward,
//               float32 rows, their per-row buffers bound at the chunk's first
//               row); a top-k teacher: fl_ltk_fwd / fl_ltk_bwd below. The
//               backward writes dZ over the student's logits in place.
//   dH, dW      the linear CE's lce_dh / lce_dw on that dZ (dW: dense student)
// Why the chunk's logits are stored rather than reduced on the accumulators
// (as the linear CE's forward does): every divergence term needs both rows'
// log-sum-exps, so each row is read twice (math/distillation.h: the two-pass
// form keeps the digits where p ~ q, which an online one-pass KL loses);
// the CPU path holds the same two chunk buffers.
#include <metal_stdlib>

#include "fl_common.h"
#include "lce_gemm.h"
#include "lce_head.h"
#include "quantized_head.h"
#include "../csrc/math/distillation.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

// ---- a head's logits of a chunk --------------------------------------------------------

// z[local, v] = (H W^T)[row0 + local, v] for local < chunk_rows, v < V (float32,
// ld V): grid (ceil(V / BN), ceil(chunk_rows / BM)) groups of the tile's threads.
// args: the head's LceArgs (hidden = its H, vocab, bits, group_size, row0,
// chunk_rows).
template <typename T, typename Head, int BM, int BN, int BK, int WM, int WN>
[[kernel]] void ld_logits(
    device const T* hidden [[buffer(FL_LCE_HIDDEN)]],
    device const typename Head::weight_t* weight [[buffer(FL_LCE_WEIGHT)]],
    device const typename Head::scale_t* scales [[buffer(FL_LCE_SCALES)]],
    device const typename Head::scale_t* qbiases [[buffer(FL_LCE_QBIASES)]],
    device float* z [[buffer(FL_LD_LOGITS_OUT)]],
    constant LceArgs& args [[buffer(FL_LD_LOGITS_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::LogitsGemm<T, Head, BM, BN, BK, WM, WN> G;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  Head head(weight, scales, qbiases, args);
  const int v0 = int(group.x) * G::BN;
  const long m0 = long(group.y) * G::BM; // within the chunk
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::logits_tile<G>(mma, hidden, head, args.row0 + m0, v0, args.row0 + args.chunk_rows, args,
                      As, Bs, ushort(sg), ushort(lane));
  lce::store_tile<G>(mma, z, args.vocab, m0, v0, args.chunk_rows, args.vocab, false);
}

// ---- an offline teacher's top-k rows ------------------------------------------------------
//
// One group per row of the chunk (the per-row buffers start at the chunk's
// first row), its threads striding over the row. Maths: math/distillation.h
// ("an offline teacher"), as csrc/cpu/linear_topk_distillation.cpp:
//   forward   the student's scaled log-sum-exp (and the CE's at temperature 1),
//             the teacher's renormalising log-sum-exp over its k values, then
//             D = sum_i p_i (lp_i - lq_{id_i}) and P = sum_i p_i; saved:
//             s_ref, s_log, t_ref = P, t_log = that log-sum-exp, ce_log;
//   backward  dZ_j = g d_scale c P q_j (+ alpha g softmax(s)_j) for every j,
//             then, by one thread in pair order (the CPU's order: ids may
//             repeat), - g d_scale c p_i at each id_i and - alpha g at the class.
// Every thread of a group reaches each barrier: the early returns depend on
// the row alone, after the barriers that decide them.
namespace ltk {

// The reductions' scratch: 32 floats per quantity, two at a time (the plans
// give FL_ROW_SCRATCH_FLOATS).
// The sum of every thread's x, in every thread.
inline float group_sum(float x, threadgroup float* scratch, uint lane, uint sg, uint nsg) {
  x = simd_sum(x);
  if (lane == 0) {
    scratch[sg] = x;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float r = simd_sum(lane < nsg ? scratch[lane] : 0.0f);
  threadgroup_barrier(mem_flags::mem_threadgroup); // the slots are free again
  return r;
}

// The merge of every thread's state (math/distillation.h ScaledLse at c), in
// every thread.
inline flm::ScaledLse group_lse(flm::ScaledLse a, float c, threadgroup float* scratch, uint lane,
                                uint sg, uint nsg) {
  a = flm::scaled_lse_move(a, simd_max(a.max), c);
  a.sum = simd_sum(a.sum);
  if (lane == 0) {
    scratch[sg] = a.max;
    scratch[32 + sg] = a.sum;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  flm::ScaledLse r = flm::scaled_lse_empty();
  if (lane < nsg) {
    r.max = scratch[lane];
    r.sum = scratch[32 + lane];
  }
  r = flm::scaled_lse_move(r, simd_max(r.max), c);
  r.sum = simd_sum(r.sum);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return r;
}

// The row's class (0 without targets), or -1 ignored / -2 out of range; a
// teacher id outside [0, V) makes the row out of range (checked first, as the
// CPU's row_status). Uniform over the group.
inline long row_class(device const long* ids, device const long* class_index, uint row,
                      constant LtkArgs& args, threadgroup float* scratch, uint tid, uint tpg,
                      uint lane, uint sg, uint nsg) {
  const long V = long(args.kd.vocab);
  device const long* id = ids + ulong(row) * ulong(args.topk);
  float bad = 0.0f;
  for (uint i = tid; i < uint(args.topk); i += tpg) {
    bad += (id[i] < 0 || id[i] >= V) ? 1.0f : 0.0f;
  }
  if (group_sum(bad, scratch, lane, sg, nsg) != 0.0f) {
    return -2;
  }
  if (args.kd.has_targets == 0) {
    return 0;
  }
  return flk::row_class(class_index[row], args.kd.vocab, args.kd.has_ignore_index,
                        args.kd.ignore_index);
}

inline flm::DistillCoefs coefs(constant LtkArgs& args) {
  flm::DistillCoefs k;
  k.c = args.kd.c;
  k.beta = args.kd.beta;
  k.d_scale = args.kd.d_scale;
  k.alpha = args.kd.alpha;
  return k;
}

} // namespace ltk

[[kernel]] void fl_ltk_fwd(
    device const float* z [[buffer(FL_LTK_FWD_LOGITS)]],
    device const long* ids [[buffer(FL_LTK_FWD_IDS)]],
    device const float* values [[buffer(FL_LTK_FWD_VALUES)]],
    device const long* class_index [[buffer(FL_LTK_FWD_INDEX)]],
    device float* loss_out [[buffer(FL_LTK_FWD_LOSS)]],
    device float* stats_out [[buffer(FL_LTK_FWD_STATS)]],
    constant LtkArgs& args [[buffer(FL_LTK_FWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  const uint V = uint(args.kd.vocab);
  const uint K = uint(args.topk);
  const float c = args.kd.c;
  const bool own_ce = args.kd.ce_own_sum != 0;
  device float* st_out = stats_out + ulong(row) * ulong(flm::kDistillStats);
  const long y = ltk::row_class(ids, class_index, row, args, scratch, tid, tpg, lane, sg, nsg);
  if (y < 0) { // uniform over the group, after row_class's barriers
    if (tid == 0) {
      const bool bad = y == -2;
      const flm::DistillStats m = flm::distill_masked_stats(bad);
      loss_out[row] = bad ? flm::kNaN : 0.0f;
      st_out[0] = m.s_ref, st_out[1] = m.s_log, st_out[2] = m.t_ref;
      st_out[3] = m.t_log, st_out[4] = m.e_q, st_out[5] = m.ce_log;
    }
    return;
  }
  device const float* zr = z + ulong(row) * ulong(V);
  device const long* id = ids + ulong(row) * ulong(K);
  device const float* v = values + ulong(row) * ulong(K);

  // The student's log-sum-exp at c (and at temperature 1, relative to the same max).
  flm::ScaledLse s = flm::scaled_lse_empty();
  float ce = 0.0f;
  for (uint j0 = tid * R; j0 < V; j0 += tpg * R) {
    float x[R];
    float m = s.max;
    for (int i = 0; i < R; ++i) {
      x[i] = j0 + i < V ? zr[j0 + i] : -flm::kInf; // -inf: exp gives 0
      m = fmax(m, x[i]);
    }
    flm::ScaledLse at_one;
    at_one.max = s.max;
    at_one.sum = ce;
    ce = flm::scaled_lse_move(at_one, m, 1.0f).sum;
    s = flm::scaled_lse_move(s, m, c);
    const float shift = flm::lse_ref(m);
    for (int i = 0; i < R; ++i) {
      s.sum += flm::scaled_exp(x[i], shift, c);
      if (own_ce) {
        ce += flm::exp_nonpos_f32(x[i] - shift);
      }
    }
  }
  flm::ScaledLse at_one;
  at_one.max = s.max;
  at_one.sum = ce;
  s = ltk::group_lse(s, c, scratch, lane, sg, nsg);
  at_one = ltk::group_lse(at_one, 1.0f, scratch, lane, sg, nsg);
  flm::DistillStats st = flm::distill_stats(s, flm::scaled_lse_empty(), own_ce ? at_one.sum : s.sum);

  // The teacher's log-sum-exp over its k values (renormalised), then the pairs.
  const bool renormalize = args.renormalize != 0;
  float t_lse = 0.0f;
  if (renormalize) { // uniform: its barriers are reached by every thread
    flm::ScaledLse t = flm::scaled_lse_empty();
    for (uint i = tid; i < K; i += tpg) {
      const float m = fmax(t.max, v[i]);
      t = flm::scaled_lse_move(t, m, c);
      t.sum += flm::scaled_exp(v[i], flm::lse_ref(m), c);
    }
    t = ltk::group_lse(t, c, scratch, lane, sg, nsg);
    t_lse = c * flm::lse_ref(t.max) + flm::log_f32(t.sum);
  }
  float d = 0.0f;
  float mass = 0.0f;
  for (uint i = tid; i < K; i += tpg) {
    const float lp = flm::topk_log_prob(v[i], c, t_lse, renormalize);
    const float lq = flm::scaled_log_prob(zr[id[i]], st.s_ref, st.s_log, c);
    d += flm::topk_term(lp, lq);
    mass += flm::exp_f32(lp);
  }
  d = ltk::group_sum(d, scratch, lane, sg, nsg);
  mass = ltk::group_sum(mass, scratch, lane, sg, nsg);
  if (tid == 0) {
    const flm::DistillCoefs k = ltk::coefs(args);
    st.t_ref = mass;
    st.t_log = t_lse;
    st.e_q = 0.0f;
    loss_out[row] = flm::distill_row_loss(d, k, st, k.alpha != 0.0f ? zr[y] : 0.0f);
    st_out[0] = st.s_ref, st_out[1] = st.s_log, st_out[2] = st.t_ref;
    st_out[3] = st.t_log, st_out[4] = st.e_q, st_out[5] = st.ce_log;
  }
}

[[kernel]] void fl_ltk_bwd(
    device float* dz [[buffer(FL_LTK_BWD_GRAD)]],
    device const long* ids [[buffer(FL_LTK_BWD_IDS)]],
    device const float* values [[buffer(FL_LTK_BWD_VALUES)]],
    device const long* class_index [[buffer(FL_LTK_BWD_INDEX)]],
    device const float* stats_in [[buffer(FL_LTK_BWD_STATS)]],
    device const float* g_loss [[buffer(FL_LTK_BWD_GLOSS)]],
    constant LtkArgs& args [[buffer(FL_LTK_BWD_ARGS)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]],
    uint nsg [[simdgroups_per_threadgroup]]) {
  const uint V = uint(args.kd.vocab);
  const uint K = uint(args.topk);
  const float c = args.kd.c;
  device float* d = dz + ulong(row) * ulong(V); // the logits, overwritten with dZ
  const long y = ltk::row_class(ids, class_index, row, args, scratch, tid, tpg, lane, sg, nsg);
  if (y < 0) { // uniform over the group
    const float fill = y == -2 ? flm::kNaN : 0.0f;
    for (uint j = tid; j < V; j += tpg) {
      d[j] = fill;
    }
    return;
  }
  device const float* sp = stats_in + ulong(row) * ulong(flm::kDistillStats);
  const float s_ref = sp[0], s_log = sp[1], mass = sp[2], t_lse = sp[3], ce_log = sp[5];
  const flm::DistillCoefs k = ltk::coefs(args);
  const float g = args.kd.unit_cotangent != 0 ? 1.0f : g_loss[row];
  const float coef_q = g * k.d_scale * c * mass;
  const float coef_ce = g * k.alpha;
  // Element j read, then written, by this thread only.
  for (uint j = tid; j < V; j += tpg) {
    const float x = d[j];
    float v = coef_q * flm::exp_nonpos_f32(flm::scaled_log_prob(x, s_ref, s_log, c));
    if (coef_ce != 0.0f) {
      v += coef_ce * flm::exp_nonpos_f32((x - s_ref) - ce_log);
    }
    d[j] = v;
  }
  // The teacher's pairs and the class, in the CPU's order, once the row is written.
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    device const long* id = ids + ulong(row) * ulong(K);
    device const float* v = values + ulong(row) * ulong(K);
    const bool renormalize = args.renormalize != 0;
    for (uint i = 0; i < K; ++i) {
      d[id[i]] -= g * k.d_scale * c * flm::exp_f32(flm::topk_log_prob(v[i], c, t_lse, renormalize));
    }
    if (k.alpha != 0.0f) {
      d[y] = flm::distill_grad_target(d[y], k, g);
    }
  }
}

// ---- instantiations ---------------------------------------------------------------------
// Host names (launch_plan.cpp ld_logits_plan builds the same):
// fl_ld_logits_<hidden>_<head>_<tile>, the head and tile named as the linear
// CE's (a dense head w<dtype>; quantized q<bits>_<scale dtype>, mxfp4, mxfp8,
// nvfp4, nvfp4_global; the tiles of launch_plan.h lce_forward_tiles); plain
// kernels fl_ltk_fwd, fl_ltk_bwd.
#define FL_LD_LOGITS(T, Head, BM, BN, BK, WM, WN) ld_logits<T, Head, BM, BN, BK, WM, WN>
#define FL_INST_LD_TILE(hname, T, head, Head, BM, BN, BK, WM, WN) \
  template [[host_name("fl_ld_logits_" #hname "_" #head FL_LCE_TILE_NAME(BM, BN, BK, WM, WN))]] [[kernel]] decltype(FL_LD_LOGITS(T, Head, BM, BN, BK, WM, WN)) FL_LD_LOGITS(T, Head, BM, BN, BK, WM, WN);
#define FL_INST_LD_TILES(hname, T, head, Head)            \
  FL_INST_LD_TILE(hname, T, head, Head, 64, 64, 16, 2, 2) \
  FL_INST_LD_TILE(hname, T, head, Head, 64, 32, 32, 2, 2)
#define FL_INST_LD_TILES16(hname, T, head, Head) \
  FL_INST_LD_TILES(hname, T, head, Head)         \
  FL_INST_LD_TILE(hname, T, head, Head, 64, 64, 16, 1, 2)
#define FL_INST_LD_HEAD(head, Head)                  \
  FL_INST_LD_TILES(float32, float, head, Head)       \
  FL_INST_LD_TILES(float16, half, head, Head)        \
  FL_INST_LD_TILES(bfloat16, bfloat, head, Head)

FL_INST_LD_TILES(float32, float, wfloat32, lce::DenseHead<float>)
FL_INST_LD_TILES(float16, half, wfloat32, lce::DenseHead<float>)
FL_INST_LD_TILES(bfloat16, bfloat, wfloat32, lce::DenseHead<float>)
FL_INST_LD_TILES(float32, float, wfloat16, lce::DenseHead<half>)
FL_INST_LD_TILES16(float16, half, wfloat16, lce::DenseHead<half>)
FL_INST_LD_TILES(bfloat16, bfloat, wfloat16, lce::DenseHead<half>)
FL_INST_LD_TILES(float32, float, wbfloat16, lce::DenseHead<bfloat>)
FL_INST_LD_TILES(float16, half, wbfloat16, lce::DenseHead<bfloat>)
FL_INST_LD_TILES16(bfloat16, bfloat, wbfloat16, lce::DenseHead<bfloat>) // Metal 3.1 (fl_common.h)

#define FL_INST_LD_QUANTIZED(sname, S)                \
  FL_INST_LD_HEAD(q1_##sname, flk::QuantizedHead1<S>) \
  FL_INST_LD_HEAD(q2_##sname, flk::QuantizedHead2<S>) \
  FL_INST_LD_HEAD(q3_##sname, flk::QuantizedHead3<S>) \
  FL_INST_LD_HEAD(q4_##sname, flk::QuantizedHead4<S>) \
  FL_INST_LD_HEAD(q5_##sname, flk::QuantizedHead5<S>) \
  FL_INST_LD_HEAD(q6_##sname, flk::QuantizedHead6<S>) \
  FL_INST_LD_HEAD(q8_##sname, flk::QuantizedHead8<S>)

FL_INST_LD_QUANTIZED(float32, float)
FL_INST_LD_QUANTIZED(float16, half)
FL_INST_LD_QUANTIZED(bfloat16, bfloat)
FL_INST_LD_HEAD(mxfp4, flk::Mxfp4Head)
FL_INST_LD_HEAD(mxfp8, flk::Mxfp8Head)
FL_INST_LD_HEAD(nvfp4, flk::Nvfp4Head)
FL_INST_LD_HEAD(nvfp4_global, flk::Nvfp4GlobalHead)
