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
// Pieces. Every GEMM here is the same tile machinery, small and shared:
//   MatrixView / DenseHead::stage   tile loaders, device -> threadgroup float,
//                                   masked (zero outside the matrix, never read
//                                   there), 64-bit offsets, any orientation
//   fragment_multiply               the 8x8 SIMD-group fragments of one staged
//                                   BK step: 4 SIMD-groups, 2 x 2, 16 x 16 each
//   gemm_tile                       the K loop: barrier, stage A and B, barrier,
//                                   multiply
//   store_tile / write_tile         accumulators -> threadgroup tile -> device
// and the loss epilogues (cross_entropy.h / linear_cross_entropy.h maths):
//   lce_forward    (row block, vocabulary split): for each BN-column tile of its
//                  split, Z = H W^T + b, soft-cap, then per row (one SIMD-group
//                  owns 8 rows, a lane owns a column) the online state: tile max
//                  (simd_max), the state moved to it, exp-sum, gap sum and
//                  entropy sum (simd_sum); the target's logit from the one lane
//                  that holds it. Writes one state per (split, row).
//   fl_lce_fwd_finish  one thread per row merges its S states in split order
//                  (deterministic, no atomics), then loss, lse, lse_lo, correct,
//                  entropy with the CPU's formulas.
//   lce_dz         (row tile, vocabulary tile) of a row chunk: Z recomputed,
//                  dZ = g ((A + 2 z lse) p - q) (times 1 - (z/c)^2 under a cap),
//                  from the saved lse; float32 into the chunk's dZ buffer.
//   lce_dh         dH[chunk] = dZ W          (K = V, weight through the head)
//   lce_dw         dW (+)= dZ^T H[chunk]     (K = chunk rows; float32, dense only)
//   fl_lce_dbias   dbias (+)= column sums of dZ, rows in order (as the CPU)
//   lce_scale_grad g * grad in the primal's dtype (the forward's fused gradients)
//
// Backward: why dZ per row chunk, not one pass with partials nor two recomputing
// passes (on paper, N rows, V classes, H hidden, tiles BM = BN = 32; example
// N = 8192, H = 4096, V = 151936, float32 accumulators, an M-series GPU at
// ~14 TFLOP/s fp32 and ~0.4 TB/s; 6 N V H = 31 TFLOP of GEMMs take ~2.2 s):
//   one pass with per-tile partials: each (row block, vocabulary tile) computes
//     Z once and emits partial dH [BM x H] and dW [BN x H] blocks to be reduced
//     afterwards: (V/BN) N H + (N/BM) V H = 2 x 4748 x N x H floats of partials,
//     1.3 TB here. Out of the question without float atomics (which would
//     also make the result depend on timing).
//   two passes recomputing Z (one over row blocks for dH, one over vocabulary
//     blocks for dW): 8 N V H FLOPs (Z twice) instead of 6, and each pass keeps
//     its [BM x H] / [BN x H] accumulator in device memory (too big for a
//     group), read and written once per tile: 8 N V H / BN bytes per pass,
//     2 x 1.3 TB here (~6 s), BN / 2 = 16 FLOP per byte: bandwidth-bound
//     (the GPU needs ~35 FLOP per byte).
//   chosen: per chunk of R rows (R x V x 4 bytes <= chunk_bytes, as the CPU
//     path), dZ written once (float32) and read by the dH GEMM, the dW GEMM and
//     the dbias sum: 6 N V H FLOPs (the minimum: Z, dH, dW), 12 N V bytes of dZ
//     traffic (15 GB here, ~40 ms) and dW read + written once per chunk:
//     8 V H N / R bytes. That is the cost beyond the GEMMs: R = 96 at the
//     default 64 MiB (110 rows rounded down to a multiple of BM) gives 0.43 TB,
//     ~1 s (the dW GEMM of a chunk does R / 4 = 24 FLOP per byte); a larger
//     chunk_bytes divides it (256 MiB: R = 416, 0.1 TB), as on the CPU.
//     Deterministic: every output element is written by one thread per
//     dispatch, chunks in order.
#include <metal_stdlib>

#include "fl_common.h"
#include "quantized_head.h"
#include "../csrc/math/cross_entropy.h"
#include "../csrc/math/linear_cross_entropy.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace lce {

// Tile shape (kernel_args.h, shared with the launch plans) and the padded
// leading dimensions of the threadgroup tiles (+4 floats: rows of a tile start
// on different banks).
enum : int {
  kBM = FL_LCE_BM,
  kBN = FL_LCE_BN,
  kBK = FL_LCE_BK,
  kThreads = FL_LCE_THREADS,
  kLDA = FL_LCE_BK + 4, // As[m][k]: BM x BK
  kLDB = FL_LCE_BN + 4, // Bs[k][n]: BK x BN
  kLDC = FL_LCE_BN + 4, // Cs[m][n]: BM x BN
  kSimd = 32,
  kRowsPerSimd = FL_LCE_BM / (FL_LCE_THREADS / 32), // forward / dZ epilogue rows per SIMD-group
};
static_assert(kBN == kSimd, "the epilogues give each lane one column of a tile");
static_assert(kBM == 32 && kBN == 32 && kThreads == 128, "fragment_multiply: 2 x 2 SIMD-groups of 16 x 16");
static_assert(kBK % 8 == 0, "BK is a whole number of 8x8 fragments");

// ---- tile loaders ------------------------------------------------------------------

// A row-major matrix in device memory, read as float: element (r, c) at
// p[r * ld + c], for r < rows, c < cols.
template <typename T>
struct MatrixView {
  device const T* p;
  long ld;
  long rows;
  int cols;

  MatrixView(device const T* p_, long ld_, long rows_, int cols_)
      : p(p_), ld(ld_), rows(rows_), cols(cols_) {}

  // Stages the block (r0 + i, c0 + j), i < BR, j < BC, into
  // dst[i * stride_r + j * stride_c], 0 outside the matrix (never read there).
  // Consecutive threads take consecutive columns (coalesced reads).
  template <int BR, int BC>
  void stage(threadgroup float* dst, long r0, int c0, int stride_r, int stride_c, uint tid,
             uint nthreads) const {
    for (uint e = tid; e < uint(BR * BC); e += nthreads) {
      int i = int(e) / BC;
      int j = int(e) % BC;
      long r = r0 + i;
      int c = c0 + j;
      float v = 0.0f;
      if (r < rows && c < cols) {
        v = float(p[r * ld + c]);
      }
      dst[i * stride_r + j * stride_c] = v;
    }
  }
};

// The weight of a dense head: W [V, H] in its own dtype. The interface every
// head implements (published for the quantized head in
// notes: lce-metal-interface.md):
//   typedef weight_t, scale_t                element types of the three buffers
//   Head(weight, scales, qbiases, args)      built per thread at kernel start
//   stage<BV, BH>(dst, v0, h0, stride_v, stride_h, tid, nthreads)
//       W[v0 + i, h0 + j] as float into dst[i * stride_v + j * stride_h] for
//       i < BV, j < BH; 0 where v0 + i >= V or h0 + j >= H. Called by all the
//       threads of the group together, between the caller's barriers.
template <typename W>
struct DenseHead {
  typedef W weight_t;
  typedef W scale_t; // unused: the host binds the weight to the scale slots
  MatrixView<W> w;

  DenseHead(device const W* weight, device const W* scales, device const W* qbiases,
            constant LceArgs& args)
      : w(weight, args.hidden, args.vocab, args.hidden) {}

  template <int BV, int BH>
  void stage(threadgroup float* dst, int v0, int h0, int stride_v, int stride_h, uint tid,
             uint nthreads) const {
    w.template stage<BV, BH>(dst, v0, h0, stride_v, stride_h, tid, nthreads);
  }
};

// Operands of a tile GEMM C[BM x BN] += A[BM x K] B[K x BN], each staged one BK
// step at a time into As[m][k] / Bs[k][n]. "Rows": the source's rows are the
// tile's first index; "Cols": transposed while staging.
template <typename Src>
struct RowsA { // As[m][k] = src(m0 + m, k0 + k)
  Src src;
  long m0;
  RowsA(Src s, long m) : src(s), m0(m) {}
  void stage(threadgroup float* As, int k0, uint tid, uint n) const {
    src.template stage<kBM, kBK>(As, m0, k0, kLDA, 1, tid, n);
  }
};

template <typename Src>
struct ColsA { // As[m][k] = src(k0 + k, m0 + m)
  Src src;
  int m0;
  ColsA(Src s, int m) : src(s), m0(m) {}
  void stage(threadgroup float* As, int k0, uint tid, uint n) const {
    src.template stage<kBK, kBM>(As, k0, m0, 1, kLDA, tid, n);
  }
};

template <typename Src>
struct RowsB { // Bs[k][n] = src(k0 + k, n0 + n)
  Src src;
  int n0;
  RowsB(Src s, int n) : src(s), n0(n) {}
  void stage(threadgroup float* Bs, int k0, uint tid, uint n) const {
    src.template stage<kBK, kBN>(Bs, k0, n0, kLDB, 1, tid, n);
  }
};

template <typename Src>
struct ColsB { // Bs[k][n] = src(n0 + n, k0 + k)
  Src src;
  int n0;
  ColsB(Src s, int n) : src(s), n0(n) {}
  void stage(threadgroup float* Bs, int k0, uint tid, uint n) const {
    src.template stage<kBN, kBK>(Bs, n0, k0, 1, kLDB, tid, n);
  }
};

// ---- fragments ----------------------------------------------------------------------

// SIMD-group sg owns the 16 x 16 block (sg / 2, sg % 2) of the tile as 2 x 2
// fragments acc[i * 2 + j].
inline void fragment_multiply(thread simdgroup_float8x8* acc, threadgroup const float* As,
                              threadgroup const float* Bs, uint sg) {
  const uint m = (sg / 2) * 16;
  const uint n = (sg % 2) * 16;
  for (int kk = 0; kk < kBK; kk += 8) {
    simdgroup_float8x8 a0;
    simdgroup_float8x8 a1;
    simdgroup_float8x8 b0;
    simdgroup_float8x8 b1;
    simdgroup_load(a0, As + m * kLDA + kk, kLDA);
    simdgroup_load(a1, As + (m + 8) * kLDA + kk, kLDA);
    simdgroup_load(b0, Bs + kk * kLDB + n, kLDB);
    simdgroup_load(b1, Bs + kk * kLDB + n + 8, kLDB);
    simdgroup_multiply_accumulate(acc[0], a0, b0, acc[0]);
    simdgroup_multiply_accumulate(acc[1], a0, b1, acc[1]);
    simdgroup_multiply_accumulate(acc[2], a1, b0, acc[2]);
    simdgroup_multiply_accumulate(acc[3], a1, b1, acc[3]);
  }
}

// acc = A B over the whole reduction dimension K (masked: zero-filled edges
// add nothing). The first barrier of each step keeps a SIMD-group from
// restaging As/Bs while another still multiplies the previous step.
template <typename OpA, typename OpB>
inline void gemm_tile(thread simdgroup_float8x8* acc, OpA a, OpB b, int K, threadgroup float* As,
                      threadgroup float* Bs, uint tid, uint sg) {
  for (int f = 0; f < 4; ++f) {
    acc[f] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  for (int k0 = 0; k0 < K; k0 += kBK) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
    a.stage(As, k0, tid, uint(kThreads));
    b.stage(Bs, k0, tid, uint(kThreads));
    threadgroup_barrier(mem_flags::mem_threadgroup);
    fragment_multiply(acc, As, Bs, sg);
  }
}

// The accumulators into Cs[BM][BN]; on return every thread may read all of Cs.
// The first barrier: the previous tile's readers of Cs are done (also when
// K = 0 and gemm_tile had no barrier at all).
inline void store_tile(thread simdgroup_float8x8* acc, threadgroup float* Cs, uint sg) {
  const uint m = (sg / 2) * 16;
  const uint n = (sg % 2) * 16;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_store(acc[0], Cs + m * kLDC + n, kLDC);
  simdgroup_store(acc[1], Cs + m * kLDC + n + 8, kLDC);
  simdgroup_store(acc[2], Cs + (m + 8) * kLDC + n, kLDC);
  simdgroup_store(acc[3], Cs + (m + 8) * kLDC + n + 8, kLDC);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

// Cs -> out[(m0 + i) * ld + n0 + j] for the elements inside rows x cols,
// added to what is there when `accumulate`.
inline void write_tile(threadgroup const float* Cs, device float* out, long ld, long m0, int n0,
                       long rows, int cols, bool accumulate, uint tid) {
  for (uint e = tid; e < uint(kBM * kBN); e += uint(kThreads)) {
    int i = int(e) / kBN;
    int j = int(e) % kBN;
    long r = m0 + i;
    int c = n0 + j;
    if (r < rows && c < cols) {
      long at = r * ld + c;
      float v = Cs[i * kLDC + j];
      out[at] = accumulate ? out[at] + v : v;
    }
  }
}

// ---- epilogue pieces ------------------------------------------------------------------

// The logit as the loss sees it: + bias, then the soft-cap (CPU order).
inline float finish_logit(float z, device const float* bias, int v, constant LceArgs& args) {
  if (args.has_bias != 0) {
    z += bias[v];
  }
  return args.softcap != 0.0f ? flm::softcap(z, args.softcap) : z;
}

inline long target_class(device const long* targets, long row, constant LceArgs& args) {
  return flk::row_class(targets[row], args.vocab, args.has_ignore_index, args.ignore_index);
}

// Z tile (row block m0.., vocabulary tile v0..) of the hidden rows through the
// head, into Cs.
template <typename T, typename Head>
inline void logits_tile(device const T* hidden, Head head, long m0, int v0, long rows,
                        constant LceArgs& args, threadgroup float* As, threadgroup float* Bs,
                        threadgroup float* Cs, uint tid, uint sg) {
  RowsA<MatrixView<T>> a(MatrixView<T>(hidden, args.hidden, rows, args.hidden), m0);
  ColsB<Head> b(head, v0);
  simdgroup_float8x8 acc[4];
  gemm_tile(acc, a, b, args.hidden, As, Bs, tid, sg);
  store_tile(acc, Cs, sg);
}

} // namespace lce

// ---- forward ---------------------------------------------------------------------------

// Grid (S splits, row blocks of the launch), FL_LCE_THREADS threads: the rows
// from args.row0 (a multiple of BM; the host cuts N rows into launches of
// bounded work, launch_plan.h lce_schedule).
template <typename T, typename Head>
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
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float As[lce::kBM * lce::kLDA];
  threadgroup float Bs[lce::kBK * lce::kLDB];
  threadgroup float Cs[lce::kBM * lce::kLDC];
  Head head(weight, scales, qbiases, args);
  const int V = args.vocab;
  const long m0 = args.row0 + long(group.y) * lce::kBM;
  const int v_begin = int(group.x) * args.vocab_per_split;
  const int v_end = min(V, v_begin + args.vocab_per_split);

  // Rows r = sg * kRowsPerSimd + i of the block; every lane holds the same state.
  flm::LceRowState st[lce::kRowsPerSimd];
  long t[lce::kRowsPerSimd];
  for (int i = 0; i < lce::kRowsPerSimd; ++i) {
    st[i] = flm::lce_state_empty();
    long row = m0 + long(sg) * lce::kRowsPerSimd + i;
    t[i] = row < args.rows ? lce::target_class(targets, row, args) : -1;
  }

  for (int v0 = v_begin; v0 < v_end; v0 += lce::kBN) {
    lce::logits_tile(hidden, head, m0, v0, args.rows, args, As, Bs, Cs, tid, sg);
    const int v = v0 + int(lane);
    const bool valid = v < V;
    const float count = float(min(int(lce::kBN), V - v0));
    for (int i = 0; i < lce::kRowsPerSimd; ++i) {
      const int r = int(sg) * lce::kRowsPerSimd + i;
      float z = valid ? lce::finish_logit(Cs[r * lce::kLDC + int(lane)], bias, v, args) : -flm::kInf;
      float tile_max = simd_max(z);
      st[i] = flm::lce_state_move(st[i], fmax(st[i].ce.lse.max, tile_max));
      float shift = flm::lse_ref(st[i].ce.lse.max);
      float e = valid ? flm::exp_nonpos_f32(z - shift) : 0.0f;
      float gap = valid ? shift - z : 0.0f;
      float ent = valid ? flm::weighted(e, z - shift) : 0.0f;
      st[i] = flm::lce_state_add(st[i], simd_sum(e), simd_sum(gap), simd_sum(ent), count);
      if (valid && long(v) == t[i]) {
        target_logit[m0 + r] = z; // the one lane of the one tile that holds it
      }
    }
  }
  if (lane == 0) {
    for (int i = 0; i < lce::kRowsPerSimd; ++i) {
      long row = m0 + long(sg) * lce::kRowsPerSimd + i;
      if (row < args.rows) {
        flm::LceRowState s = st[i];
        partials[long(group.x) * args.rows + row] =
            float4(s.ce.lse.max, s.ce.lse.sum, s.ce.all.gap, s.ent);
      }
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
    uint gid [[thread_position_in_grid]]) {
  const long row = long(gid);
  if (row >= args.rows) {
    return;
  }
  flm::LceRowState st = flm::lce_state_empty();
  for (int s = 0; s < args.num_splits; ++s) {
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
}

// ---- backward ---------------------------------------------------------------------------

// dZ of the chunk's rows [row0, row0 + chunk_rows): grid (ceil(V / BN),
// ceil(chunk_rows / BM)). Ignored rows 0, out-of-range rows NaN (as the CPU).
template <typename T, typename Head>
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
  threadgroup float As[lce::kBM * lce::kLDA];
  threadgroup float Bs[lce::kBK * lce::kLDB];
  threadgroup float Cs[lce::kBM * lce::kLDC];
  Head head(weight, scales, qbiases, args);
  const int V = args.vocab;
  const int v0 = int(group.x) * lce::kBN;
  const long m0 = long(group.y) * lce::kBM; // within the chunk
  const long chunk_end = args.row0 + args.chunk_rows;
  lce::logits_tile(hidden, head, args.row0 + m0, v0, chunk_end, args, As, Bs, Cs, tid, sg);

  const int v = v0 + int(lane);
  if (v >= V) {
    return; // no barrier or SIMD function below
  }
  for (int i = 0; i < lce::kRowsPerSimd; ++i) {
    const int r = int(sg) * lce::kRowsPerSimd + i;
    const long local = m0 + r;
    if (local >= args.chunk_rows) {
      break;
    }
    const long row = args.row0 + local;
    const long t = lce::target_class(targets, row, args);
    float d;
    if (t < 0) {
      d = t == -2 ? flm::kNaN : 0.0f;
    } else {
      const float z = lce::finish_logit(Cs[r * lce::kLDC + int(lane)], bias, v, args);
      const float g = args.unit_cotangent != 0 ? 1.0f : g_rows[row];
      const float l = lse[row];
      const float coef = flm::ce_row_softmax_coef(g, 0.0f, args.a_sum, l, args.z_loss);
      const float g_target = g * args.c_other + (long(v) == t ? g * args.c_target : 0.0f);
      d = flm::ce_grad(z, l, lse_lo[row], coef, g_target);
      if (args.softcap != 0.0f) {
        d *= flm::softcap_grad(z, args.softcap);
      }
    }
    dz[local * V + v] = d;
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
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float As[lce::kBM * lce::kLDA];
  threadgroup float Bs[lce::kBK * lce::kLDB];
  threadgroup float Cs[lce::kBM * lce::kLDC];
  Head head(weight, scales, qbiases, args);
  const int n0 = int(group.x) * lce::kBN;
  const long m0 = long(group.y) * lce::kBM;
  lce::MatrixView<float> z(dz, args.vocab, args.chunk_rows, args.vocab);
  lce::RowsA<lce::MatrixView<float>> a(z, m0);
  lce::RowsB<Head> b(head, n0);
  simdgroup_float8x8 acc[4];
  lce::gemm_tile(acc, a, b, args.vocab, As, Bs, tid, sg);
  lce::store_tile(acc, Cs, sg);
  lce::write_tile(Cs, dh + args.row0 * args.hidden, args.hidden, m0, n0, args.chunk_rows,
                  args.hidden, false, tid);
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
    uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float As[lce::kBM * lce::kLDA];
  threadgroup float Bs[lce::kBK * lce::kLDB];
  threadgroup float Cs[lce::kBM * lce::kLDC];
  const int n0 = int(group.x) * lce::kBN;
  const int v0 = int(group.y) * lce::kBM;
  lce::MatrixView<float> z(dz, args.vocab, args.chunk_rows, args.vocab);
  lce::MatrixView<T> h(hidden + args.row0 * args.hidden, args.hidden, args.chunk_rows, args.hidden);
  lce::ColsA<lce::MatrixView<float>> a(z, v0);
  lce::RowsB<lce::MatrixView<T>> b(h, n0);
  simdgroup_float8x8 acc[4];
  lce::gemm_tile(acc, a, b, args.chunk_rows, As, Bs, tid, sg);
  lce::store_tile(acc, Cs, sg);
  lce::write_tile(Cs, dw, args.hidden, v0, n0, args.vocab, args.hidden, args.accumulate != 0, tid);
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

// Host names (launch_plan.cpp builds the same): fl_lce_<fwd|dz>_<hidden>_<head>,
// fl_lce_dh_<head>, fl_lce_dw_<hidden>, fl_lce_fwd_finish, fl_lce_dbias,
// fl_lce_scale_<dtype>; a dense head is named w<dtype>.
#define FL_INST_LCE_TILES(hname, T, head, Head)                                                     \
  template [[host_name("fl_lce_fwd_" #hname "_" #head)]] [[kernel]] decltype(                      \
      lce_forward<T, Head>) lce_forward<T, Head>;                                                  \
  template [[host_name("fl_lce_dz_" #hname "_" #head)]] [[kernel]] decltype(lce_dz<T, Head>)       \
      lce_dz<T, Head>;

#define FL_INST_LCE_HEAD(head, Head)                                                              \
  FL_INST_LCE_TILES(float32, float, head, Head)                                                   \
  FL_INST_LCE_TILES(float16, half, head, Head)                                                    \
  FL_INST_LCE_TILES(bfloat16, bfloat, head, Head)                                                 \
  template [[host_name("fl_lce_dh_" #head)]] [[kernel]] decltype(lce_dh<Head>) lce_dh<Head>;

#define FL_INST_LCE_DTYPE(dname, T)                                                               \
  FL_INST_LCE_HEAD(w##dname, lce::DenseHead<T>)                                                   \
  template [[host_name("fl_lce_dw_" #dname)]] [[kernel]] decltype(lce_dw<T>) lce_dw<T>;           \
  template [[host_name("fl_lce_scale_" #dname)]] [[kernel]] decltype(lce_scale_grad<T>)           \
      lce_scale_grad<T>;

FL_INST_LCE_DTYPE(float32, float)
FL_INST_LCE_DTYPE(float16, half)
FL_INST_LCE_DTYPE(bfloat16, bfloat) // Metal 3.1 (fl_common.h requires it)

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
