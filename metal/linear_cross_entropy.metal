// Fused linear cross-entropy on Metal: the loss of softcap(H W^T + b) against
// class indices, and its gradients, without the N x V logits in memory.
//
// Contract (the CPU primitive, csrc/cpu/linear_cross_entropy.cpp, defines the
// semantics; csrc/ops/linear_cross_entropy.h derives the gradients):
//   hidden  [N, H] T (float32 / float16 / bfloat16), row-contiguous
//   weight  [V, H], read only through a Head policy (DenseHead<W> here: any of
//           the three float dtypes; a quantized head plugs in the same way)
//   targets [N] int64; ignore_index rows give loss 0 and gradient 0, an index
//           outside [0, V) gives a NaN row and is never used to read memory
//   bias    [V] float32, optional (has_bias)
//   options label smoothing (c_target, c_other), z_loss, logit soft-cap,
//           all in LceArgs (csrc/metal/kernel_args.h), computed on the host with
//           the CPU's csrc/math functions.
// Saved for the backward: lse and lse_lo per row (float32 pair, exact sum).
// Rejected before any kernel runs (csrc/ops): wrong shapes and dtypes.
//
// Pieces. Every GEMM here is one tile assembly, metal/lce_gemm.h, built from
// MLX's steel GEMM headers (the mlx-metal wheel's, included): steel's
// BlockLoader stages BK columns of both operands in their own dtype, a head
// stages itself (quantized: dequantised into float), steel's BlockMMA multiplies
// 8x8 fragments into float accumulators; the epilogues below read those
// accumulators in registers (lce::Acc: each lane's elements of the tile, and
// row_max / row_sum over the 4 lanes that share a fragment row). The kernels
// (loss maths from cross_entropy.h / linear_cross_entropy.h):
//   lce_forward    (row block, vocabulary split): for each BN-column tile of its
//                  split, Z = H W^T + b, soft-cap, then per row and SIMD-group
//                  (its columns of the tile) the online state: tile max
//                  (row_max), the state moved to it, exp-sum, gap sum and
//                  entropy sum (row_sum); the target's logit from the one lane
//                  that holds it. The WN SIMD-groups that share a row merge
//                  their states (and argmaxes: each lane its columns, then the
//                  row's 4 lanes and the WN groups) once, after the split; one
//                  state and one argmax per (split, row).
//   fl_lce_fwd_finish  one thread per row merges its S states in split order
//                  (deterministic, no atomics), then loss, lse, lse_lo, correct,
//                  entropy with the CPU's formulas.
//   lce_dz         (row tile, vocabulary tile) of a row chunk: Z recomputed,
//                  dZ = g ((A + 2 z lse) p - q) (times 1 - (z/c)^2 under a cap),
//                  from the saved lse; float32 into the chunk's dZ buffer; with
//                  a differentiable lse (lse_cotangent) plus g_lse p.
//                  With args.logits_only: the chunk's logits Z instead (the
//                  stored-Z path's forward GEMM).
//   fl_lce_rows    the stored-Z path (a forward that forms its gradients, as a
//                  training step's value_and_grad does): per row of the chunk,
//                  the forward's per-row outputs from the stored Z, then dZ in
//                  place for a unit cotangent. With lce_dz (logits_only), dH and
//                  dW: 6 N V H FLOPs per step instead of 8.
//   lce_dh         dH[chunk] = dZ W          (K = V, weight through the head)
//   lce_dw         dW (+)= dZ^T H[chunk]     (K = chunk rows; float32, dense only)
//   fl_lce_dbias   dbias (+)= column sums of dZ, rows in order (as the CPU)
//   lce_scale_grad g * grad in the primal's dtype (the forward's fused gradients)
//
// Backward: why dZ per row chunk, not one pass with partials nor two recomputing
// passes (on paper, N rows, V classes, H hidden, tiles BM = BN = 64; example
// N = 8192, H = 4096, V = 151936, float32 accumulators, an M-series GPU at
// ~14 TFLOP/s fp32 and ~0.4 TB/s; 6 N V H = 31 TFLOP of GEMMs take ~2.2 s):
//   one pass with per-tile partials: each (row block, vocabulary tile) computes
//     Z once and emits partial dH [BM x H] and dW [BN x H] blocks to be reduced
//     afterwards: (V/BN) N H + (N/BM) V H = 2 x 2374 x N x H floats of partials,
//     0.64 TB here. Out of the question without float atomics (which would
//     also make the result depend on timing).
//   two passes recomputing Z (one over row blocks for dH, one over vocabulary
//     blocks for dW): 8 N V H FLOPs (Z twice) instead of 6, and each pass keeps
//     its [BM x H] / [BN x H] accumulator in device memory (too big for a
//     group), read and written once per tile: 8 N V H / BN bytes per pass,
//     2 x 0.64 TB here (~3 s), BN / 2 = 32 FLOP per byte: bandwidth-bound
//     (the GPU needs ~35 FLOP per byte).
//   chosen: per chunk of R rows (R x V x 4 bytes <= chunk_bytes, as the CPU
//     path), dZ written once (float32) and read by the dH GEMM, the dW GEMM and
//     the dbias sum: 6 N V H FLOPs (the minimum: Z, dH, dW), 12 N V bytes of dZ
//     traffic (15 GB here, ~40 ms) and dW read + written once per chunk:
//     8 V H N / R bytes. That is the cost beyond the GEMMs: R = 64 at the
//     default 64 MiB (110 rows rounded down to a multiple of BM) gives 0.64 TB,
//     ~1.6 s (the dW GEMM of a chunk does R / 4 = 16 FLOP per byte); a larger
//     chunk_bytes divides it (256 MiB: R = 384, 0.1 TB), as on the CPU.
//     Deterministic: every output element is written by one thread per
//     dispatch, chunks in order.
#include <metal_stdlib>

#include "fl_common.h"
#include "lce_gemm.h"
#include "lce_head.h"
#include "quantized_head.h"
#include "../csrc/math/cross_entropy.h"
#include "../csrc/math/linear_cross_entropy.h"
#include "../csrc/math/row_stats.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace lce {

// Tile shape (kernel_args.h, shared with the launch plans): BM x BN outputs per
// group of WM x WN SIMD-groups, BK per staged step; the GEMM itself is
// metal/lce_gemm.h (MLX's steel loader and fragment multiply), the epilogues
// read its accumulators in registers (lce::Acc).
static_assert(FL_LCE_WM * FL_LCE_WN * 32 == FL_LCE_THREADS, "threads = SIMD-groups x 32");

// The tile GEMM of an A dtype against a B dtype (lce_gemm.h: staged in their
// common dtype, else float).
template <typename TA, typename TB, bool kTransA, bool kTransB>
using GemmOf = Gemm<typename StageOf<TA, TB>::type, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM,
                    FL_LCE_WN, kTransA, kTransB>;

// ---- epilogue pieces ------------------------------------------------------------------

// The logit as the loss sees it: + bias, then the soft-cap, then (row
// statistics) times 1 / temperature (the CPU's order).
inline float finish_logit(float z, device const float* bias, int v, constant LceArgs& args) {
  if (args.has_bias != 0) {
    z += bias[v];
  }
  z = args.softcap != 0.0f ? flm::softcap(z, args.softcap) : z;
  return args.has_temperature != 0 ? z * args.inv_temperature : z;
}

// The argmax (csrc/math/cross_entropy.h) over the 4 lanes that hold one
// fragment row (lane bits 0 and 3, as lce_gemm.h's row_max); the same in all 4
// (argmax_merge keeps the larger key, then the lower index, in any order).
inline flm::ArgMax row_argmax(flm::ArgMax a) {
  for (ushort m = 1; m <= 8; m += 7) {
    flm::ArgMax b;
    b.key = simd_shuffle_xor(a.key, m);
    b.index = simd_shuffle_xor(a.index, m);
    a = flm::argmax_merge(a, b);
  }
  return a;
}

// The row's class in this head: [0, V), -1 (ignored, another shard's, or no
// targets) or -2 (out of range: a NaN row). Targets are global indices; this
// head's class j is vocab_start + j (0 but for a sharded head).
inline long target_class(device const long* targets, long row, constant LceArgs& args) {
  if (args.no_targets != 0) {
    return -1;
  }
  const long t = targets[row];
  if (args.sharded == 0) {
    return flk::row_class(t, args.vocab, args.has_ignore_index, args.ignore_index);
  }
  if (args.has_ignore_index != 0 && t == args.ignore_index) {
    return -1;
  }
  // vocab_start >= 0 (checked by the op): t - vocab_start cannot overflow once t >= it.
  return (t < args.vocab_start || t - args.vocab_start >= long(args.vocab)) ? -1 : t - args.vocab_start;
}

} // namespace lce

// ---- forward ---------------------------------------------------------------------------

// Grid (S splits, row blocks of the launch), FL_LCE_THREADS threads: the rows
// from args.row0 (a multiple of BM; the host cuts N rows into launches of
// bounded work, launch_plan.h lce_schedule).
template <typename T, typename Head, int BM, int BN, int BK, int WM, int WN>
[[kernel]] void lce_forward(
    device const T* hidden [[buffer(FL_LCE_HIDDEN)]],
    device const typename Head::weight_t* weight [[buffer(FL_LCE_WEIGHT)]],
    device const typename Head::scale_t* scales [[buffer(FL_LCE_SCALES)]],
    device const typename Head::scale_t* qbiases [[buffer(FL_LCE_QBIASES)]],
    device const long* targets [[buffer(FL_LCE_TARGETS)]],
    device const float* bias [[buffer(FL_LCE_BIAS)]],
    device float4* partials [[buffer(FL_LCE_FWD_PARTIALS)]],
    device float* target_logit [[buffer(FL_LCE_FWD_TARGET_LOGIT)]],
    constant LceArgs& args [[buffer(FL_LCE_FWD_ARGS)]],
    device uint2* argmax_partials [[buffer(FL_LCE_FWD_ARGMAX_PARTIALS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::LogitsGemm<T, Head, BM, BN, BK, WM, WN> G;
  typedef lce::Acc<G> A;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  // The per-row states of the WN SIMD-groups that share rows, merged once at the
  // end: (max, sum, gap, ent) and the count.
  threadgroup float4 xs[G::WN * G::BM];
  threadgroup float xw[G::WN * G::BM];
  threadgroup uint2 xa[G::WN * G::BM]; // and their argmaxes (key, index)
  Head head(weight, scales, qbiases, args);
  const int V = args.vocab;
  const long m0 = args.row0 + long(group.y) * G::BM;
  const int v_begin = int(group.x) * args.vocab_per_split;
  const int v_end = min(V, v_begin + args.vocab_per_split);

  // This lane's rows r_i = A::row(mma, i) of the block (the same for every tile),
  // each with the online state of this SIMD-group's columns; the 4 lanes of a
  // row hold the same state.
  flm::LceRowState st[A::kTM];
  // This lane's argmax of row r_i over its columns (csrc/math/cross_entropy.h;
  // merged with its 3 row neighbours and the WN column groups after the loop:
  // argmax_merge is order-free, the first maximal column wins).
  flm::ArgMax best[A::kTM];
  long t[A::kTM];
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  for (int i = 0; i < A::kTM; ++i) {
    st[i] = flm::lce_state_empty();
    best[i] = flm::argmax_empty();
    const long row = m0 + A::row(mma, i);
    t[i] = row < args.rows ? lce::target_class(targets, row, args) : -1;
  }

  for (int v0 = v_begin; v0 < v_end; v0 += G::BN) {
    mma.Ctile.clear();
    lce::logits_tile<G>(mma, hidden, head, m0, v0, args.rows, args, As, Bs, ushort(sg),
                        ushort(lane));
    for (int i = 0; i < A::kTM; ++i) {
      // This lane's logits of row r_i (-inf past V), then the row's tile max
      // over the SIMD-group's columns.
      float z[A::kTN * 2];
      float lane_max = -flm::kInf;
      float lane_count = 0.0f;
      for (int j = 0; j < A::kTN; ++j) {
        for (int k = 0; k < 2; ++k) {
          const int v = v0 + A::col(mma, j, k);
          const float zz = v < V ? lce::finish_logit(A::value(mma, i, j, k), bias, v, args) : -flm::kInf;
          z[j * 2 + k] = zz;
          lane_max = fmax(lane_max, zz);
          lane_count += v < V ? 1.0f : 0.0f;
        }
      }
      const float tile_max = lce::row_max(lane_max);
      st[i] = flm::lce_state_move(st[i], fmax(st[i].ce.lse.max, tile_max));
      const float shift = flm::lse_ref(st[i].ce.lse.max);
      float e = 0.0f;
      float gap = 0.0f;
      float ent = 0.0f;
      for (int j = 0; j < A::kTN; ++j) {
        for (int k = 0; k < 2; ++k) {
          const int v = v0 + A::col(mma, j, k);
          if (v < V) {
            const float zz = z[j * 2 + k];
            const float ec = flm::exp_nonpos_f32(zz - shift);
            e += ec;
            gap += shift - zz;
            ent += flm::weighted(ec, zz - shift);
            flm::ArgMax here;
            here.key = flm::argmax_key(zz);
            here.index = v;
            best[i] = flm::argmax_merge(best[i], here);
            if (long(v) == t[i]) {
              target_logit[m0 + A::row(mma, i)] = zz; // the one lane of the one tile that holds it
            }
          }
        }
      }
      st[i] = flm::lce_state_add(st[i], lce::row_sum(e), lce::row_sum(gap), lce::row_sum(ent),
                                 lce::row_sum(lane_count));
    }
  }

  // The WN states of each row merged in column-group order, then written by
  // the row's lane of column group 0.
  const int wn = A::column_group(sg);
  for (int i = 0; i < A::kTM; ++i) {
    best[i] = lce::row_argmax(best[i]); // (every lane of the 4 takes part)
  }
  if (A::row_leader(lane)) {
    for (int i = 0; i < A::kTM; ++i) {
      const int at = wn * G::BM + A::row(mma, i);
      xs[at] = float4(st[i].ce.lse.max, st[i].ce.lse.sum, st[i].ce.all.gap, st[i].ent);
      xa[at] = uint2(best[i].key, uint(best[i].index));
      xw[at] = st[i].ce.all.weight;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (wn == 0 && A::row_leader(lane)) {
    for (int i = 0; i < A::kTM; ++i) {
      const int r = A::row(mma, i);
      const long row = m0 + r;
      if (row >= args.rows) {
        continue;
      }
      flm::LceRowState s = st[i];
      flm::ArgMax b = best[i];
      for (int w = 1; w < G::WN; ++w) {
        flm::ArgMax other;
        other.key = xa[w * G::BM + r].x;
        other.index = int(xa[w * G::BM + r].y);
        b = flm::argmax_merge(b, other);
        const float4 p = xs[w * G::BM + r];
        flm::LceRowState piece = flm::lce_state_empty();
        piece.ce.lse.max = p.x;
        piece.ce.lse.sum = p.y;
        piece.ce.all.gap = p.z;
        piece.ent = p.w;
        piece.ce.all.weight = xw[w * G::BM + r];
        s = flm::lce_state_merge(s, piece);
      }
      partials[long(group.x) * args.rows + row] = float4(s.ce.lse.max, s.ce.lse.sum, s.ce.all.gap, s.ent);
      argmax_partials[long(group.x) * args.rows + row] = uint2(b.key, uint(b.index));
    }
  }
}

// One thread per row: the S states of the row merged in split order, then the
// CPU's per-row outputs. Grid ceil(N / threads). A plain kernel: its function
// name is its metallib name, fl_ prefixed like every host name (lce_finish_plan).
[[kernel]] void fl_lce_fwd_finish(
    device const float4* partials [[buffer(FL_LCE_FIN_PARTIALS)]],
    device const float* target_logit [[buffer(FL_LCE_FIN_TARGET_LOGIT)]],
    device const long* targets [[buffer(FL_LCE_FIN_TARGETS)]],
    device float* loss [[buffer(FL_LCE_FIN_LOSS)]],
    device float* lse [[buffer(FL_LCE_FIN_LSE)]],
    device float* lse_lo [[buffer(FL_LCE_FIN_LSE_LO)]],
    device bool* correct [[buffer(FL_LCE_FIN_CORRECT)]],
    device float* entropy [[buffer(FL_LCE_FIN_ENTROPY)]],
    constant LceArgs& args [[buffer(FL_LCE_FIN_ARGS)]],
    device const uint2* argmax_partials [[buffer(FL_LCE_FIN_ARGMAX_PARTIALS)]],
    device long* argmax [[buffer(FL_LCE_FIN_ARGMAX)]],
    device float* target_out [[buffer(FL_LCE_FIN_TARGET_OUT)]],
    uint gid [[thread_position_in_grid]]) {
  const long row = long(gid);
  if (row >= args.rows) {
    return;
  }
  flm::LceRowState st = flm::lce_state_empty();
  flm::ArgMax best = flm::argmax_empty();
  for (int s = 0; s < args.num_splits; ++s) {
    uint2 a = argmax_partials[long(s) * args.rows + row];
    flm::ArgMax piece_best;
    piece_best.key = a.x;
    piece_best.index = int(a.y);
    best = flm::argmax_merge(best, piece_best);
    float4 p = partials[long(s) * args.rows + row];
    int first = s * args.vocab_per_split;
    flm::LceRowState piece;
    piece.ce = flm::ce_state_empty();
    piece.ce.lse.max = p.x;
    piece.ce.lse.sum = p.y;
    piece.ce.all.weight = float(min(args.vocab, first + args.vocab_per_split) - first);
    piece.ce.all.gap = p.z;
    piece.ent = p.w;
    st = flm::lce_state_merge(st, piece);
  }
  const long t = lce::target_class(targets, row, args);
  flm::CeRow stats = flm::ce_finish_row(st.ce.lse, 0.0f, 0.0f, 0.0f); // lse of any row
  lse[row] = stats.lse;
  lse_lo[row] = stats.lse_lo;
  entropy[row] = flm::lce_entropy(st);
  const float z_t = t >= 0 ? target_logit[row] : 0.0f;
  flm::CeSmoothing c;
  c.c_target = args.c_target;
  c.c_other = args.c_other;
  flm::CeRow r = t < 0 ? flm::ce_masked_row(t == -2) : flm::ce_finish_hard(st.ce, c, 1.0f, z_t, args.z_loss);
  loss[row] = r.loss;
  correct[row] = t >= 0 && z_t == st.ce.lse.max;
  argmax[row] = long(best.index);
  target_out[row] = z_t;
}

// ---- backward ---------------------------------------------------------------------------

// dZ of the chunk's rows [row0, row0 + chunk_rows): grid (ceil(chunk_rows / BM),
// ceil(V / BN)), row blocks first: the groups in flight are all the chunk's row
// blocks against a few vocabulary tiles, so each weight tile is read from DRAM
// about once per chunk (its row-block groups run together) and the chunk's
// hidden rows stay in the system-level cache. Ignored rows 0, out-of-range rows
// NaN (as the CPU). With args.logits_only: the chunk's logits instead (the
// stored-Z path).
template <typename T, typename Head, int BM, int BN, int BK, int WM, int WN>
[[kernel]] void lce_dz(
    device const T* hidden [[buffer(FL_LCE_HIDDEN)]],
    device const typename Head::weight_t* weight [[buffer(FL_LCE_WEIGHT)]],
    device const typename Head::scale_t* scales [[buffer(FL_LCE_SCALES)]],
    device const typename Head::scale_t* qbiases [[buffer(FL_LCE_QBIASES)]],
    device const long* targets [[buffer(FL_LCE_TARGETS)]],
    device const float* bias [[buffer(FL_LCE_BIAS)]],
    device const float* lse [[buffer(FL_LCE_DZ_LSE)]],
    device const float* lse_lo [[buffer(FL_LCE_DZ_LSE_LO)]],
    device const float* g_rows [[buffer(FL_LCE_DZ_G)]],
    device float* dz [[buffer(FL_LCE_DZ_OUT)]],
    constant LceArgs& args [[buffer(FL_LCE_DZ_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::LogitsGemm<T, Head, BM, BN, BK, WM, WN> G;
  typedef lce::Acc<G> A;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  Head head(weight, scales, qbiases, args);
  const int V = args.vocab;
  const int v0 = int(group.y) * G::BN;
  const long m0 = long(group.x) * G::BM; // within the chunk
  const long chunk_end = args.row0 + args.chunk_rows;
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::logits_tile<G>(mma, hidden, head, args.row0 + m0, v0, chunk_end, args, As, Bs, ushort(sg),
                      ushort(lane));

  // Element-wise on this lane's accumulators: no barrier or SIMD function below.
  if (args.logits_only != 0) {
    // The stored-Z path: the chunk's logits as the loss sees them (bias, cap);
    // fl_lce_rows forms the row's outputs and dZ from them.
    for (int i = 0; i < A::kTM; ++i) {
      const long local = m0 + A::row(mma, i);
      if (local >= args.chunk_rows) {
        continue;
      }
      for (int j = 0; j < A::kTN; ++j) {
        for (int k = 0; k < 2; ++k) {
          const int v = v0 + A::col(mma, j, k);
          if (v < V) {
            dz[local * V + v] = lce::finish_logit(A::value(mma, i, j, k), bias, v, args);
          }
        }
      }
    }
    return;
  }
  for (int i = 0; i < A::kTM; ++i) {
    const long local = m0 + A::row(mma, i);
    if (local >= args.chunk_rows) {
      continue;
    }
    const long row = args.row0 + local;
    const long t = lce::target_class(targets, row, args);
    const float g = args.unit_cotangent != 0 ? 1.0f : g_rows[row];
    // lse_cotangent: g_rows is [2, N], the lse's cotangents after the rows'.
    const float g_lse = args.lse_cotangent != 0 ? g_rows[args.rows + row] : 0.0f;
    for (int j = 0; j < A::kTN; ++j) {
      for (int k = 0; k < 2; ++k) {
        const int v = v0 + A::col(mma, j, k);
        if (v >= V) {
          continue;
        }
        float d;
        if (t == -2 || (t < 0 && g_lse == 0.0f)) {
          d = t == -2 ? flm::kNaN : 0.0f;
        } else {
          // (an ignored row: only its lse's term, g_lse p)
          const float z = lce::finish_logit(A::value(mma, i, j, k), bias, v, args);
          const float l = lse[row];
          const float coef = t < 0 ? g_lse : flm::ce_row_softmax_coef(g, g_lse, args.a_sum, l, args.z_loss);
          const float g_target = t < 0 ? 0.0f : g * args.c_other + (long(v) == t ? g * args.c_target : 0.0f);
          d = flm::ce_grad(z, l, lse_lo[row], coef, g_target);
          if (args.softcap != 0.0f) {
            d *= flm::softcap_grad(z, args.softcap);
          }
        }
        dz[local * V + v] = d;
      }
    }
  }
}

// dH rows [row0, row0 + chunk_rows) = dZ W: grid (ceil(H / BN), ceil(chunk_rows / BM)).
template <typename Head>
[[kernel]] void lce_dh(
    device const float* dz [[buffer(FL_LCE_DH_DZ)]],
    device const typename Head::weight_t* weight [[buffer(FL_LCE_WEIGHT)]],
    device const typename Head::scale_t* scales [[buffer(FL_LCE_SCALES)]],
    device const typename Head::scale_t* qbiases [[buffer(FL_LCE_QBIASES)]],
    device float* dh [[buffer(FL_LCE_DH_OUT)]],
    constant LceArgs& args [[buffer(FL_LCE_DH_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  // dZ is float32: staged as float against any head (GemmOf<float, W>).
  typedef lce::Gemm<float, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM, FL_LCE_WN, false, false> G;
  threadgroup float As[G::kAElems];
  threadgroup float Bs[G::kBElems];
  Head head(weight, scales, qbiases, args);
  const int n0 = int(group.x) * G::BN;
  const long m0 = long(group.y) * G::BM;
  // A = dZ [chunk_rows x V] (rows m0..), B = W [V x H] (columns n0..), K = V.
  auto a = lce::AOperand<G, float, false>::make(dz, args.vocab, m0, As, ushort(sg), ushort(lane));
  auto b = lce::HeadOperand<G, Head, false>::make(head, n0, Bs, ushort(sg), ushort(lane));
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::gemm_k_loop<G>(mma, a, b, args.vocab, int(min(long(G::BM), long(args.chunk_rows) - m0)),
                      min(int(G::BN), args.hidden - n0), As, Bs);
  lce::store_tile<G>(mma, dh + args.row0 * args.hidden, args.hidden, m0, n0, args.chunk_rows,
                     args.hidden, false);
}

// dW (+)= dZ^T H[rows of the chunk]: grid (ceil(H / BN), ceil(V / BM)).
template <typename T>
[[kernel]] void lce_dw(
    device const float* dz [[buffer(FL_LCE_DW_DZ)]],
    device const T* hidden [[buffer(FL_LCE_DW_HIDDEN)]],
    device float* dw [[buffer(FL_LCE_DW_OUT)]],
    constant LceArgs& args [[buffer(FL_LCE_DW_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::GemmOf<float, T, true, false> G;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  const int n0 = int(group.x) * G::BN;
  const int v0 = int(group.y) * G::BM;
  // A = dZ^T (its source dZ [chunk_rows x V], columns v0..), B = the chunk's
  // hidden rows [chunk_rows x H] (columns n0..), K = chunk_rows.
  auto a = lce::AOperand<G, float, true>::make(dz, args.vocab, v0, As, ushort(sg), ushort(lane));
  auto b = lce::BOperand<G, T, false>::make(hidden + args.row0 * args.hidden, args.hidden, n0, Bs,
                                            ushort(sg), ushort(lane));
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::gemm_k_loop<G>(mma, a, b, args.chunk_rows, min(int(G::BM), args.vocab - v0),
                      min(int(G::BN), args.hidden - n0), As, Bs);
  lce::store_tile<G>(mma, dw, args.hidden, v0, n0, args.vocab, args.hidden, args.accumulate != 0);
}

// dbias[v] (+)= sum over the chunk's rows of dZ[r, v], rows in order (the CPU's
// order): one thread per column. A plain kernel named as lce_dbias_plan asks.
[[kernel]] void fl_lce_dbias(
    device const float* dz [[buffer(FL_LCE_DB_DZ)]],
    device float* dbias [[buffer(FL_LCE_DB_OUT)]],
    constant LceArgs& args [[buffer(FL_LCE_DB_ARGS)]],
    uint gid [[thread_position_in_grid]]) {
  const int v = int(gid);
  if (v >= args.vocab) {
    return;
  }
  float s = args.accumulate != 0 ? dbias[v] : 0.0f;
  for (long r = 0; r < args.chunk_rows; ++r) {
    s += dz[r * args.vocab + v];
  }
  dbias[v] = s;
}

// ---- the stored-Z path: the forward that forms its gradients ---------------------------
//
// lce_schedule runs, per chunk of rows: lce_dz with args.logits_only (the
// chunk's logits, float32, into the dZ buffer), this kernel, then dbias, dH and
// dW on the dZ it leaves: 6 N V H FLOPs for the step instead of 8 (no Z
// recomputed from the saved lse). dZ stays float32: bfloat16 dZ loses 2^-9 of
// each element, and a gradient whose sum cancels (sum_j dZ_j W_j far below
// sum_j |dZ_j W_j|) then misses the float32-class bound of
// tests/test_bf16_gemm.py::test_gradient_with_cancellation by ~18x (measured in
// float64; the CPU's bf16 GEMM splits dZ into hi + lo for the same reason).

// One group per row of the chunk (grid: chunk_rows groups of at most
// FL_LCE_ROW_THREADS threads, a power of two or not). The row's logits z (the
// lce_dz logits_only output) -> its online state per thread over FL_ROW_READS
// contiguous logits at a time (csrc/math/linear_cross_entropy.h, as the forward
// tiles) and argmax -> merged in a fixed tree order (deterministic) -> thread 0
// writes the forward's per-row outputs with fl_lce_fwd_finish's formulas,
// reading the target's logit before anything is overwritten -> every thread
// rewrites the logits it read with dZ for a unit cotangent (lce_dz's formula).
// Ignored rows: outputs of a masked row, dZ 0; out-of-range rows: NaN loss and dZ.
[[kernel]] void fl_lce_rows(
    device float* z [[buffer(FL_LCE_ROWS_Z)]],
    device const long* targets [[buffer(FL_LCE_ROWS_TARGETS)]],
    device float* loss [[buffer(FL_LCE_ROWS_LOSS)]],
    device float* lse [[buffer(FL_LCE_ROWS_LSE)]],
    device float* lse_lo [[buffer(FL_LCE_ROWS_LSE_LO)]],
    device bool* correct [[buffer(FL_LCE_ROWS_CORRECT)]],
    device float* entropy [[buffer(FL_LCE_ROWS_ENTROPY)]],
    device long* argmax [[buffer(FL_LCE_ROWS_ARGMAX)]],
    device float* target_out [[buffer(FL_LCE_ROWS_TARGET_OUT)]],
    constant LceArgs& args [[buffer(FL_LCE_ROWS_ARGS)]],
    uint local_row [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  constexpr int R = FL_ROW_READS;
  // Per-thread states (max, exp sum, gap sum, entropy sum), counts, argmaxes.
  threadgroup float4 xs[FL_LCE_ROW_THREADS];
  threadgroup float xw[FL_LCE_ROW_THREADS];
  threadgroup uint2 xa[FL_LCE_ROW_THREADS];
  threadgroup float xl[2]; // the row's lse pair, for the dZ pass
  const int V = args.vocab;
  const long row = args.row0 + long(local_row);
  device float* zr = z + long(local_row) * long(V);
  const long t = lce::target_class(targets, row, args);

  flm::LceRowState st = flm::lce_state_empty();
  flm::ArgMax best = flm::argmax_empty();
  for (int j0 = int(tid) * R; j0 < V; j0 += int(tpg) * R) {
    const int n = min(R, V - j0);
    float x[R];
    float m = -flm::kInf;
    for (int i = 0; i < R; ++i) {
      x[i] = i < n ? zr[j0 + i] : -flm::kInf;
      m = fmax(m, x[i]);
    }
    st = flm::lce_state_move(st, fmax(st.ce.lse.max, m));
    const float shift = flm::lse_ref(st.ce.lse.max);
    float e = 0.0f;
    float gap = 0.0f;
    float ent = 0.0f;
    for (int i = 0; i < n; ++i) {
      const float ec = flm::exp_nonpos_f32(x[i] - shift);
      e += ec;
      gap += shift - x[i];
      ent += flm::weighted(ec, x[i] - shift);
      flm::ArgMax here;
      here.key = flm::argmax_key(x[i]);
      here.index = j0 + i;
      best = flm::argmax_merge(best, here);
    }
    st = flm::lce_state_add(st, e, gap, ent, float(n));
  }
  xs[tid] = float4(st.ce.lse.max, st.ce.lse.sum, st.ce.all.gap, st.ent);
  xw[tid] = st.ce.all.weight;
  xa[tid] = uint2(best.key, uint(best.index));
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint stride = FL_LCE_ROW_THREADS / 2; stride > 0; stride >>= 1) {
    if (tid < stride && tid + stride < tpg) {
      flm::LceRowState a = flm::lce_state_empty();
      flm::LceRowState b = flm::lce_state_empty();
      const float4 pa = xs[tid];
      const float4 pb = xs[tid + stride];
      a.ce.lse.max = pa.x;
      a.ce.lse.sum = pa.y;
      a.ce.all.gap = pa.z;
      a.ent = pa.w;
      a.ce.all.weight = xw[tid];
      b.ce.lse.max = pb.x;
      b.ce.lse.sum = pb.y;
      b.ce.all.gap = pb.z;
      b.ent = pb.w;
      b.ce.all.weight = xw[tid + stride];
      a = flm::lce_state_merge(a, b);
      xs[tid] = float4(a.ce.lse.max, a.ce.lse.sum, a.ce.all.gap, a.ent);
      xw[tid] = a.ce.all.weight;
      flm::ArgMax ba;
      ba.key = xa[tid].x;
      ba.index = int(xa[tid].y);
      flm::ArgMax bb;
      bb.key = xa[tid + stride].x;
      bb.index = int(xa[tid + stride].y);
      ba = flm::argmax_merge(ba, bb);
      xa[tid] = uint2(ba.key, uint(ba.index));
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (tid == 0) {
    flm::LceRowState s = flm::lce_state_empty();
    s.ce.lse.max = xs[0].x;
    s.ce.lse.sum = xs[0].y;
    s.ce.all.gap = xs[0].z;
    s.ent = xs[0].w;
    s.ce.all.weight = xw[0];
    const flm::CeRow stats = flm::ce_finish_row(s.ce.lse, 0.0f, 0.0f, 0.0f); // lse of any row
    lse[row] = stats.lse;
    lse_lo[row] = stats.lse_lo;
    entropy[row] = flm::lce_entropy(s);
    const float z_t = t >= 0 ? zr[t] : 0.0f; // before the dZ pass overwrites it
    flm::CeSmoothing c;
    c.c_target = args.c_target;
    c.c_other = args.c_other;
    const flm::CeRow r =
        t < 0 ? flm::ce_masked_row(t == -2) : flm::ce_finish_hard(s.ce, c, 1.0f, z_t, args.z_loss);
    loss[row] = r.loss;
    correct[row] = t >= 0 && z_t == s.ce.lse.max;
    argmax[row] = long(xa[0].y);
    target_out[row] = z_t;
    xl[0] = stats.lse;
    xl[1] = stats.lse_lo;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // dZ for g = 1 over the same logits this thread read above.
  const float l = xl[0];
  const float l_lo = xl[1];
  const float coef = flm::ce_row_softmax_coef(1.0f, 0.0f, args.a_sum, l, args.z_loss);
  for (int j0 = int(tid) * R; j0 < V; j0 += int(tpg) * R) {
    const int n = min(R, V - j0);
    for (int i = 0; i < n; ++i) {
      const int v = j0 + i;
      float d;
      if (t < 0) {
        d = t == -2 ? flm::kNaN : 0.0f;
      } else {
        const float zz = zr[v];
        d = flm::ce_grad(zz, l, l_lo, coef, args.c_other + (long(v) == t ? args.c_target : 0.0f));
        if (args.softcap != 0.0f) {
          d *= flm::softcap_grad(zz, args.softcap);
        }
      }
      zr[v] = d;
    }
  }
}

// out[i] = T(g * src[i]); out may be src itself (float32): each thread reads its
// element before writing it.
template <typename T>
[[kernel]] void lce_scale_grad(
    device const float* g [[buffer(FL_LCE_SCALE_G)]],
    device const float* src [[buffer(FL_LCE_SCALE_SRC)]],
    device T* out [[buffer(FL_LCE_SCALE_OUT)]],
    constant PwArgs& args [[buffer(FL_LCE_SCALE_ARGS)]],
    uint gid [[thread_position_in_grid]]) {
  const ulong i = ulong(gid);
  if (i < args.size) {
    out[i] = T(g[0] * src[i]);
  }
}

// ---- row statistics (ops/row_stats.h, math/row_stats.h) on the same tiles -------------
//
// The forward is lce_forward (its states hold everything: max, exp sum, gap sum,
// entropy sum, the target's logit; with LceArgs' temperature and shard fields)
// and this finish; the backward is rs_dz, then the linear CE's dbias, dH, dW.

// One thread per row: the S states merged in split order (as fl_lce_fwd_finish),
// then lse (pair), the target's logit, logit_sum = V ref - gap, expected (pair:
// ref + ent / s), max and argmax (the splits' argmaxes merged: the first
// maximal class, as mx.argmax; global: vocab_start + the head's class), with
// the CPU's formulas.
[[kernel]] void fl_rs_fwd_finish(
    device const float4* partials [[buffer(FL_RS_FIN_PARTIALS)]],
    device const float* target_logit [[buffer(FL_RS_FIN_TARGET_LOGIT)]],
    device const long* targets [[buffer(FL_RS_FIN_TARGETS)]],
    device float* lse [[buffer(FL_RS_FIN_LSE)]],
    device float* lse_lo [[buffer(FL_RS_FIN_LSE_LO)]],
    device float* target [[buffer(FL_RS_FIN_TARGET)]],
    device float* logit_sum [[buffer(FL_RS_FIN_LOGIT_SUM)]],
    device float* expected [[buffer(FL_RS_FIN_EXPECTED)]],
    device float* expected_lo [[buffer(FL_RS_FIN_EXPECTED_LO)]],
    device float* row_max [[buffer(FL_RS_FIN_MAX)]],
    constant LceArgs& args [[buffer(FL_RS_FIN_ARGS)]],
    device const uint2* argmax_partials [[buffer(FL_RS_FIN_ARGMAX_PARTIALS)]],
    device long* argmax [[buffer(FL_RS_FIN_ARGMAX)]],
    uint gid [[thread_position_in_grid]]) {
  const long row = long(gid);
  if (row >= args.rows) {
    return;
  }
  flm::LceRowState st = flm::lce_state_empty();
  flm::ArgMax best = flm::argmax_empty();
  for (int s = 0; s < args.num_splits; ++s) {
    uint2 a = argmax_partials[long(s) * args.rows + row];
    flm::ArgMax piece_best;
    piece_best.key = a.x;
    piece_best.index = int(a.y);
    best = flm::argmax_merge(best, piece_best);
    float4 p = partials[long(s) * args.rows + row];
    int first = s * args.vocab_per_split;
    flm::LceRowState piece;
    piece.ce = flm::ce_state_empty();
    piece.ce.lse.max = p.x;
    piece.ce.lse.sum = p.y;
    piece.ce.all.weight = float(min(args.vocab, first + args.vocab_per_split) - first);
    piece.ce.all.gap = p.z;
    piece.ent = p.w;
    st = flm::lce_state_merge(st, piece);
  }
  const float ref = flm::lse_ref(st.ce.lse.max);
  flm::CeRow r = flm::ce_finish_row(st.ce.lse, 0.0f, 0.0f, 0.0f);
  lse[row] = r.lse;
  lse_lo[row] = r.lse_lo;
  const long t = lce::target_class(targets, row, args);
  target[row] = t >= 0 ? target_logit[row] : (t == -2 ? flm::kNaN : 0.0f);
  logit_sum[row] = st.ce.all.weight * ref - st.ce.all.gap;
  flm::FloatPair e = flm::row_expected(ref, st.ce.lse.sum, st.ent);
  expected[row] = e.hi;
  expected_lo[row] = e.lo;
  row_max[row] = st.ce.lse.max;
  argmax[row] = args.vocab_start + long(best.index);
}

// dL/dy of the chunk's rows [row0, row0 + chunk_rows) from the saved pairs and
// the per-row cotangents (math/row_stats.h): grid (ceil(V / BN), ceil(chunk_rows
// / BM)). A row whose target is out of range gets NaN when the
// target's cotangent is bound (as the CPU).
template <typename T, typename Head, int BM, int BN, int BK, int WM, int WN>
[[kernel]] void rs_dz(
    device const T* hidden [[buffer(FL_LCE_HIDDEN)]],
    device const typename Head::weight_t* weight [[buffer(FL_LCE_WEIGHT)]],
    device const typename Head::scale_t* scales [[buffer(FL_LCE_SCALES)]],
    device const typename Head::scale_t* qbiases [[buffer(FL_LCE_QBIASES)]],
    device const long* targets [[buffer(FL_LCE_TARGETS)]],
    device const float* bias [[buffer(FL_LCE_BIAS)]],
    device const float* lse [[buffer(FL_RS_DZ_LSE)]],
    device const float* lse_lo [[buffer(FL_RS_DZ_LSE_LO)]],
    device const float* expected [[buffer(FL_RS_DZ_EXPECTED)]],
    device const float* expected_lo [[buffer(FL_RS_DZ_EXPECTED_LO)]],
    device const float* g_lse [[buffer(FL_RS_DZ_G_LSE)]],
    device const float* g_target [[buffer(FL_RS_DZ_G_TARGET)]],
    device const float* g_logit_sum [[buffer(FL_RS_DZ_G_LOGIT_SUM)]],
    device const float* g_expected [[buffer(FL_RS_DZ_G_EXPECTED)]],
    device float* dz [[buffer(FL_RS_DZ_OUT)]],
    constant LceArgs& args [[buffer(FL_RS_DZ_ARGS)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::LogitsGemm<T, Head, BM, BN, BK, WM, WN> G;
  typedef lce::Acc<G> A;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  Head head(weight, scales, qbiases, args);
  const int V = args.vocab;
  const int v0 = int(group.x) * G::BN;
  const long m0 = long(group.y) * G::BM; // within the chunk
  const long chunk_end = args.row0 + args.chunk_rows;
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::logits_tile<G>(mma, hidden, head, args.row0 + m0, v0, chunk_end, args, As, Bs, ushort(sg),
                      ushort(lane));

  const int cot = args.rs_cotangents;
  // Element-wise on this lane's accumulators: no barrier or SIMD function below.
  for (int i = 0; i < A::kTM; ++i) {
    const long local = m0 + A::row(mma, i);
    if (local >= args.chunk_rows) {
      continue;
    }
    const long row = args.row0 + local;
    const long t = lce::target_class(targets, row, args);
    flm::RowStatsCotangent g;
    g.lse = (cot & flm::kStatLse) != 0 ? g_lse[row] : 0.0f;
    g.target = (cot & flm::kStatTarget) != 0 ? g_target[row] : 0.0f;
    g.logit_sum = (cot & flm::kStatLogitSum) != 0 ? g_logit_sum[row] : 0.0f;
    g.expected = (cot & flm::kStatExpected) != 0 ? g_expected[row] : 0.0f;
    const bool nan_row = t == -2 && (cot & flm::kStatTarget) != 0;
    const bool soft = g.lse != 0.0f || g.expected != 0.0f;
    const float l = soft ? lse[row] : 0.0f;
    const float l_lo = soft ? lse_lo[row] : 0.0f;
    flm::FloatPair e;
    e.hi = (cot & flm::kStatExpected) != 0 ? expected[row] : 0.0f;
    e.lo = (cot & flm::kStatExpected) != 0 ? expected_lo[row] : 0.0f;
    for (int j = 0; j < A::kTN; ++j) {
      for (int k = 0; k < 2; ++k) {
        const int v = v0 + A::col(mma, j, k);
        if (v >= V) {
          continue;
        }
        float d;
        if (nan_row) {
          d = flm::kNaN;
        } else {
          const float z = lce::finish_logit(A::value(mma, i, j, k), bias, v, args);
          d = soft ? flm::row_stats_grad(z, l, l_lo, e, g) : g.logit_sum;
          if (long(v) == t) {
            d += g.target;
          }
          const float inv_t = args.has_temperature != 0 ? args.inv_temperature : 1.0f;
          const float temp = args.has_temperature != 0 ? args.temperature : 1.0f;
          d *= flm::row_stats_chain(z, args.softcap, temp, inv_t);
        }
        dz[local * V + v] = d;
      }
    }
  }
}

// Host names (launch_plan.cpp builds the same): fl_lce_<fwd|dz>_<hidden>_<head>_<tile>
// (tile: bm<BM>_bn<BN>_bk<BK>_wm<WM>_wn<WN>, lce_head.h FL_LCE_TILE_NAME, launch_plan.h
// lce_forward_tiles),
// fl_rs_dz_<hidden>_<head>_<tile> (row statistics), fl_lce_dh_<head>, fl_lce_dw_<hidden>,
// fl_lce_fwd_finish, fl_rs_fwd_finish, fl_lce_dbias,
// fl_lce_scale_<dtype>; a dense head is named w<dtype>.
#define FL_LCE_FWD(T, Head, BM, BN, BK, WM, WN) lce_forward<T, Head, BM, BN, BK, WM, WN>
#define FL_LCE_DZ(T, Head, BM, BN, BK, WM, WN) lce_dz<T, Head, BM, BN, BK, WM, WN>
#define FL_RS_DZ(T, Head, BM, BN, BK, WM, WN) rs_dz<T, Head, BM, BN, BK, WM, WN>
#define FL_INST_LCE_TILE(hname, T, head, Head, BM, BN, BK, WM, WN) \
  template [[host_name("fl_lce_fwd_" #hname "_" #head FL_LCE_TILE_NAME(BM, BN, BK, WM, WN))]] [[kernel]] decltype(FL_LCE_FWD(T, Head, BM, BN, BK, WM, WN)) FL_LCE_FWD(T, Head, BM, BN, BK, WM, WN); \
  template [[host_name("fl_lce_dz_" #hname "_" #head FL_LCE_TILE_NAME(BM, BN, BK, WM, WN))]] [[kernel]] decltype(FL_LCE_DZ(T, Head, BM, BN, BK, WM, WN)) FL_LCE_DZ(T, Head, BM, BN, BK, WM, WN); \
  template [[host_name("fl_rs_dz_" #hname "_" #head FL_LCE_TILE_NAME(BM, BN, BK, WM, WN))]] [[kernel]] decltype(FL_RS_DZ(T, Head, BM, BN, BK, WM, WN)) FL_RS_DZ(T, Head, BM, BN, BK, WM, WN);

// The tiles of a head staged as float (MLX's float32 choices: default, small
// device) and, for a 16-bit dense head of the hidden dtype, MLX's 16-bit choice on
// the largest devices too (launch_plan.h lce_forward_tiles).
#define FL_INST_LCE_TILES(hname, T, head, Head)                   \
  FL_INST_LCE_TILE(hname, T, head, Head, 64, 64, 16, 2, 2)        \
  FL_INST_LCE_TILE(hname, T, head, Head, 64, 32, 32, 2, 2)
#define FL_INST_LCE_TILES16(hname, T, head, Head)                 \
  FL_INST_LCE_TILES(hname, T, head, Head)                         \
  FL_INST_LCE_TILE(hname, T, head, Head, 64, 64, 16, 1, 2)

#define FL_INST_LCE_HEAD(head, Head)                                                              \
  FL_INST_LCE_TILES(float32, float, head, Head)                                                   \
  FL_INST_LCE_TILES(float16, half, head, Head)                                                    \
  FL_INST_LCE_TILES(bfloat16, bfloat, head, Head)                                                 \
  template [[host_name("fl_lce_dh_" #head)]] [[kernel]] decltype(lce_dh<Head>) lce_dh<Head>;

// A dense head: its tiles against each hidden dtype (the 16-bit choices where both
// are the same 16-bit dtype), dH, and the dW and scale kernels of its dtype.
#define FL_INST_LCE_DTYPE(dname, T)                                                               \
  template [[host_name("fl_lce_dh_w" #dname)]] [[kernel]] decltype(lce_dh<lce::DenseHead<T>>)     \
      lce_dh<lce::DenseHead<T>>;                                                                  \
  template [[host_name("fl_lce_dw_" #dname)]] [[kernel]] decltype(lce_dw<T>) lce_dw<T>;           \
  template [[host_name("fl_lce_scale_" #dname)]] [[kernel]] decltype(lce_scale_grad<T>)           \
      lce_scale_grad<T>;

FL_INST_LCE_DTYPE(float32, float)
FL_INST_LCE_DTYPE(float16, half)
FL_INST_LCE_DTYPE(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)
FL_INST_LCE_TILES(float32, float, wfloat32, lce::DenseHead<float>)
FL_INST_LCE_TILES(float16, half, wfloat32, lce::DenseHead<float>)
FL_INST_LCE_TILES(bfloat16, bfloat, wfloat32, lce::DenseHead<float>)
FL_INST_LCE_TILES(float32, float, wfloat16, lce::DenseHead<half>)
FL_INST_LCE_TILES16(float16, half, wfloat16, lce::DenseHead<half>)
FL_INST_LCE_TILES(bfloat16, bfloat, wfloat16, lce::DenseHead<half>)
FL_INST_LCE_TILES(float32, float, wbfloat16, lce::DenseHead<bfloat>)
FL_INST_LCE_TILES(float16, half, wbfloat16, lce::DenseHead<bfloat>)
FL_INST_LCE_TILES16(bfloat16, bfloat, wbfloat16, lce::DenseHead<bfloat>)

// Quantized heads (metal/quantized_head.h), named as launch_plan.cpp's
// lce_quantized_head names them: q<bits>_<scale dtype> (affine) or the mode
// (mxfp4, mxfp8, nvfp4; nvfp4_global with a global scale): forward tiles, dZ and dH for every hidden dtype; no
// dW (a quantized weight has no gradient, as on the CPU).
#define FL_INST_LCE_QUANTIZED(sname, S)                \
  FL_INST_LCE_HEAD(q1_##sname, flk::QuantizedHead1<S>) \
  FL_INST_LCE_HEAD(q2_##sname, flk::QuantizedHead2<S>) \
  FL_INST_LCE_HEAD(q3_##sname, flk::QuantizedHead3<S>) \
  FL_INST_LCE_HEAD(q4_##sname, flk::QuantizedHead4<S>) \
  FL_INST_LCE_HEAD(q5_##sname, flk::QuantizedHead5<S>) \
  FL_INST_LCE_HEAD(q6_##sname, flk::QuantizedHead6<S>) \
  FL_INST_LCE_HEAD(q8_##sname, flk::QuantizedHead8<S>)

FL_INST_LCE_QUANTIZED(float32, float)
FL_INST_LCE_QUANTIZED(float16, half)
FL_INST_LCE_QUANTIZED(bfloat16, bfloat)
FL_INST_LCE_HEAD(mxfp4, flk::Mxfp4Head)
FL_INST_LCE_HEAD(mxfp8, flk::Mxfp8Head)
FL_INST_LCE_HEAD(nvfp4, flk::Nvfp4Head)
FL_INST_LCE_HEAD(nvfp4_global, flk::Nvfp4GlobalHead)
