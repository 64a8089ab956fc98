// The constant-buffer argument structs of the Metal kernels and their buffer
// indices, shared by metal/*.metal (MSL), the host code in csrc/metal/*.cpp and
// the CPU harness adaptors in tests/metal_kernels/ (C++). Written in the common
// subset of both languages: fixed-size scalar members only, laid out so that
// MSL and C++ (LP64) give identical offsets (every member at a multiple of its
// size, 64-bit members first).
//
// The host fills these from the primitives' params (CrossEntropyParams, ...)
// with the make_*_args functions of launch_plan.h; precomputable per-call
// values (the label-smoothing coefficients) are computed once there, on the
// host, with the same csrc/math function the CPU kernels use.
#pragma once

#if defined(__METAL_VERSION__)
typedef long fl_i64;
typedef ulong fl_u64;
#else
#include <cstdint>
typedef int64_t fl_i64;
typedef uint64_t fl_u64;
#endif

// ---- buffer indices ([[buffer(n)]]) ------------------------------------------
// One list per kernel family; an argument that a given instantiation does not
// use (e.g. class weights when there are none) is still bound, by the host, to
// a valid buffer (the first input), so no index is ever left unbound.

// Cross-entropy forward
#define FL_CE_FWD_LOGITS 0 // [rows, K] T
#define FL_CE_FWD_INDEX 1 // [rows] int64 class indices (hard targets)
#define FL_CE_FWD_PROBS 2 // [rows, K] T target probabilities (soft targets)
#define FL_CE_FWD_WEIGHTS 3 // [K] float32 class weights
#define FL_CE_FWD_LOSS 4 // [rows] float32 out
#define FL_CE_FWD_LSE 5 // [rows] float32 out
#define FL_CE_FWD_LSE_LO 6 // [rows] float32 out: lse's rounding error
#define FL_CE_FWD_ASUM 7 // [rows] float32 out
#define FL_CE_FWD_ARGS 8 // constant CeArgs&
// return_stats (args.stats != 0; otherwise bound to the loss buffer, never touched):
#define FL_CE_FWD_STAT_LSE 9 // [rows] float32 out: lse of every row
#define FL_CE_FWD_ENTROPY 10 // [rows] float32 out
#define FL_CE_FWD_ARGMAX 11 // [rows] int64 out
#define FL_CE_FWD_CORRECT 12 // [rows] bool out
#define FL_CE_FWD_NBUF 13

// Cross-entropy backward
#define FL_CE_BWD_LOGITS 0
#define FL_CE_BWD_INDEX 1
#define FL_CE_BWD_PROBS 2
#define FL_CE_BWD_WEIGHTS 3
#define FL_CE_BWD_LSE 4 // [rows] float32
#define FL_CE_BWD_LSE_LO 5 // [rows] float32
#define FL_CE_BWD_ASUM 6 // [rows] float32
#define FL_CE_BWD_GLOSS 7 // [rows] float32 cotangent of loss
#define FL_CE_BWD_GLSE 8 // [rows] float32 cotangent of lse
#define FL_CE_BWD_GRAD 9 // [rows, K] T out
#define FL_CE_BWD_ARGS 10
#define FL_CE_BWD_NBUF 11

// Softmax focal forward
#define FL_SF_FWD_LOGITS 0
#define FL_SF_FWD_INDEX 1
#define FL_SF_FWD_ALPHA 2 // [K] float32 per-class alpha
#define FL_SF_FWD_LOSS 3
#define FL_SF_FWD_LSE 4
#define FL_SF_FWD_LSE_LO 5
#define FL_SF_FWD_COEF 6
#define FL_SF_FWD_ARGS 7
#define FL_SF_FWD_NBUF 8

// Softmax focal backward
#define FL_SF_BWD_LOGITS 0
#define FL_SF_BWD_INDEX 1
#define FL_SF_BWD_LSE 2
#define FL_SF_BWD_LSE_LO 3
#define FL_SF_BWD_COEF 4
#define FL_SF_BWD_GLOSS 5
#define FL_SF_BWD_GRAD 6
#define FL_SF_BWD_ARGS 7
#define FL_SF_BWD_NBUF 8

// Pointwise forward (element-wise loss, or per-threadgroup partial sums)
#define FL_PW_FWD_PRED 0
#define FL_PW_FWD_TARGET 1
#define FL_PW_FWD_OUT 2 // [n] loss in the predictions' dtype, or [groups] float32 partial sums
#define FL_PW_FWD_ARGS 3
#define FL_PW_FWD_TLAYOUT 4 // constant PwTargetLayout& (read by the _bcast kernels only)
#define FL_PW_FWD_NBUF 5

// Pointwise sum finish (one threadgroup: partials -> scalar)
#define FL_PW_SUM_PARTIALS 0
#define FL_PW_SUM_OUT 1
#define FL_PW_SUM_ARGS 2
#define FL_PW_SUM_NBUF 3

// Pointwise backward
#define FL_PW_BWD_PRED 0
#define FL_PW_BWD_TARGET 1
#define FL_PW_BWD_COTAN 2 // [n] float32 or (_cot16 kernels) the 16-bit dtype; [1] float32 for a reduced loss
#define FL_PW_BWD_GRAD 3
#define FL_PW_BWD_ARGS 4
#define FL_PW_BWD_TLAYOUT 5 // constant PwTargetLayout& (read by the _bcast kernels only)
#define FL_PW_BWD_NBUF 6

// Fused linear cross-entropy (metal/linear_cross_entropy.metal). The kernels that
// read the weight through a head (forward tiles, dZ, dH) share its three slots.
#define FL_LCE_HIDDEN 0 // [N, H] T
#define FL_LCE_WEIGHT 1 // [V, H] W (dense head) or the packed matrix of a quantized head
#define FL_LCE_SCALES 2 // quantized head: [V, H / group_size]; dense: the weight again
#define FL_LCE_QBIASES 3 // affine head: biases [V, H / group_size]; fp heads: the scales again,
                         // or nvfp4's global scale (float32 [1]); dense: the weight again
#define FL_LCE_TARGETS 4 // [N] int64 class indices
#define FL_LCE_BIAS 5 // [V] float32 (no bias: any valid buffer, never read)
// forward tiles: per (vocabulary split, row) online states, target logits
#define FL_LCE_FWD_PARTIALS 6 // [S, N] float4 out: (max, sum exp, gap sum, entropy sum)
#define FL_LCE_FWD_TARGET_LOGIT 7 // [N] float32 out: the target's (capped) logit
#define FL_LCE_FWD_ARGS 8
#define FL_LCE_FWD_ARGMAX_PARTIALS 9 // [S, N] uint2 out: (math argmax_key, index) of the split's best
#define FL_LCE_FWD_NBUF 10
// forward finish: merges the S states of a row, in split order
#define FL_LCE_FIN_PARTIALS 0
#define FL_LCE_FIN_TARGET_LOGIT 1
#define FL_LCE_FIN_TARGETS 2
#define FL_LCE_FIN_LOSS 3 // [N] float32 out (sum_rows: a temporary, summed after)
#define FL_LCE_FIN_LSE 4 // [N] float32 out
#define FL_LCE_FIN_LSE_LO 5 // [N] float32 out
#define FL_LCE_FIN_CORRECT 6 // [N] bool out
#define FL_LCE_FIN_ENTROPY 7 // [N] float32 out
#define FL_LCE_FIN_ARGS 8
#define FL_LCE_FIN_ARGMAX_PARTIALS 9 // [S, N] uint2
#define FL_LCE_FIN_ARGMAX 10 // [N] int64 out
#define FL_LCE_FIN_TARGET_OUT 11 // [N] float32 out: the target's logit, 0 on ignored/out-of-range rows
#define FL_LCE_FIN_NBUF 12
// backward dZ of a row chunk (slots 0-5 as the forward)
#define FL_LCE_DZ_LSE 6 // [N] float32
#define FL_LCE_DZ_LSE_LO 7 // [N] float32
#define FL_LCE_DZ_G 8 // [N] float32 cotangent per row (unit_cotangent: never read; lse_cotangent: [2, N])
#define FL_LCE_DZ_OUT 9 // [chunk_rows, V] float32 out
#define FL_LCE_DZ_ARGS 10
#define FL_LCE_DZ_NBUF 11
// backward dH = dZ W of a row chunk (slots 1-3: the head)
#define FL_LCE_DH_DZ 0 // [chunk_rows, V] float32
#define FL_LCE_DH_OUT 4 // [N, H] float32 out (rows row0 .. row0 + chunk_rows)
#define FL_LCE_DH_ARGS 5
#define FL_LCE_DH_NBUF 6
// backward dW (+)= dZ^T H_chunk (dense heads only)
#define FL_LCE_DW_DZ 0
#define FL_LCE_DW_HIDDEN 1 // [N, H] T
#define FL_LCE_DW_OUT 2 // [V, H] float32 in/out
#define FL_LCE_DW_ARGS 3
#define FL_LCE_DW_NBUF 4
// backward dbias (+)= column sums of dZ
#define FL_LCE_DB_DZ 0
#define FL_LCE_DB_OUT 1 // [V] float32 in/out
#define FL_LCE_DB_ARGS 2
#define FL_LCE_DB_NBUF 3
// The stored-Z path (the forward that forms its gradients, launch_plan.h
// lce_schedule): per row of a chunk, the row's logits that lce_dz wrote with
// LceArgs::logits_only -> the forward's per-row outputs (as FL_LCE_FIN_*) and
// dZ for a unit cotangent, in place
#define FL_LCE_ROWS_Z 0 // [chunk_rows, V] float32 in: logits; out: dZ
#define FL_LCE_ROWS_TARGETS 1 // [N] int64
#define FL_LCE_ROWS_LOSS 2 // [N] float32 out (sum_rows: a temporary, summed after)
#define FL_LCE_ROWS_LSE 3 // [N] float32 out
#define FL_LCE_ROWS_LSE_LO 4 // [N] float32 out
#define FL_LCE_ROWS_CORRECT 5 // [N] bool out
#define FL_LCE_ROWS_ENTROPY 6 // [N] float32 out
#define FL_LCE_ROWS_ARGMAX 7 // [N] int64 out
#define FL_LCE_ROWS_TARGET_OUT 8 // [N] float32 out
#define FL_LCE_ROWS_ARGS 9
#define FL_LCE_ROWS_NBUF 10
// Row statistics (ops/row_stats.h) on the linear CE's forward tiles: finish
// merges the S states of a row (as FL_LCE_FIN_*) into the statistics; outputs not
// asked for are written to scratch.
#define FL_RS_FIN_PARTIALS 0
#define FL_RS_FIN_TARGET_LOGIT 1
#define FL_RS_FIN_TARGETS 2
#define FL_RS_FIN_LSE 3 // [N] float32 out
#define FL_RS_FIN_LSE_LO 4 // [N] float32 out
#define FL_RS_FIN_TARGET 5 // [N] float32 out: the target's logit (0 ignored / another shard's, NaN out of range)
#define FL_RS_FIN_LOGIT_SUM 6 // [N] float32 out
#define FL_RS_FIN_EXPECTED 7 // [N] float32 out: E_p[z]
#define FL_RS_FIN_EXPECTED_LO 8 // [N] float32 out
#define FL_RS_FIN_MAX 9 // [N] float32 out
#define FL_RS_FIN_ARGS 10
#define FL_RS_FIN_ARGMAX_PARTIALS 11 // [S, N] uint2: the forward tiles' per-split argmaxes
#define FL_RS_FIN_ARGMAX 12 // [N] int64 out: vocab_start + the first maximal class
#define FL_RS_FIN_NBUF 13
// Row statistics' dZ of a row chunk (slots 0-5 as the linear CE's dZ): the
// saved pairs and one cotangent per differentiable statistic (absent ones,
// per LceArgs::rs_cotangents, any valid buffer, never read)
#define FL_RS_DZ_LSE 6
#define FL_RS_DZ_LSE_LO 7
#define FL_RS_DZ_EXPECTED 8
#define FL_RS_DZ_EXPECTED_LO 9
#define FL_RS_DZ_G_LSE 10
#define FL_RS_DZ_G_TARGET 11
#define FL_RS_DZ_G_LOGIT_SUM 12
#define FL_RS_DZ_G_EXPECTED 13
#define FL_RS_DZ_OUT 14 // [chunk_rows, V] float32 out
#define FL_RS_DZ_ARGS 15
#define FL_RS_DZ_NBUF 16
// g * gradient in the primal's dtype (LceScaleGrad)
#define FL_LCE_SCALE_G 0 // [1] float32
#define FL_LCE_SCALE_SRC 1 // [n] float32
#define FL_LCE_SCALE_OUT 2 // [n] T (float32: may be the source buffer itself)
#define FL_LCE_SCALE_ARGS 3 // constant PwArgs& (size = n)
#define FL_LCE_SCALE_NBUF 4

// Row statistics of given logits (metal/row_stats.metal): forward, one group
// per row. Outputs not asked for (RsArgs::stats) are bound to an asked one and
// never written through their own slot.
#define FL_RS_LOG_FWD_LOGITS 0 // [rows, V] T
#define FL_RS_LOG_FWD_TARGETS 1 // [rows] int64 (no targets: the logits, never read)
#define FL_RS_LOG_FWD_LSE 2 // [rows] float32 out
#define FL_RS_LOG_FWD_LSE_LO 3 // [rows] float32 out
#define FL_RS_LOG_FWD_TARGET 4 // [rows] float32 out
#define FL_RS_LOG_FWD_LOGIT_SUM 5 // [rows] float32 out
#define FL_RS_LOG_FWD_EXPECTED 6 // [rows] float32 out
#define FL_RS_LOG_FWD_EXPECTED_LO 7 // [rows] float32 out
#define FL_RS_LOG_FWD_MAX 8 // [rows] float32 out
#define FL_RS_LOG_FWD_ARGMAX 9 // [rows] int64 out
#define FL_RS_LOG_FWD_ARGS 10 // constant RsArgs&
#define FL_RS_LOG_FWD_NBUF 11
// Row statistics of given logits: backward (dL/dlogits). Saved pairs and
// cotangents absent per RsArgs::cotangents: the logits, never read.
#define FL_RS_LOG_BWD_LOGITS 0
#define FL_RS_LOG_BWD_TARGETS 1
#define FL_RS_LOG_BWD_LSE 2
#define FL_RS_LOG_BWD_LSE_LO 3
#define FL_RS_LOG_BWD_EXPECTED 4
#define FL_RS_LOG_BWD_EXPECTED_LO 5
#define FL_RS_LOG_BWD_G_LSE 6
#define FL_RS_LOG_BWD_G_TARGET 7
#define FL_RS_LOG_BWD_G_LOGIT_SUM 8
#define FL_RS_LOG_BWD_G_EXPECTED 9
#define FL_RS_LOG_BWD_GRAD 10 // [rows, V] T out (may be the logits' buffer: read before written)
#define FL_RS_LOG_BWD_ARGS 11
#define FL_RS_LOG_BWD_NBUF 12

// Distillation (kl_div / jsd) forward
#define FL_KD_FWD_STUDENT 0 // [rows, V] S
#define FL_KD_FWD_TEACHER 1 // [rows, V] T
#define FL_KD_FWD_INDEX 2 // [rows] int64 class indices (bound to the student without targets)
#define FL_KD_FWD_LOSS 3 // [rows] float32 out
#define FL_KD_FWD_STATS 4 // [rows, kDistillStats] float32 out (math/distillation.h)
#define FL_KD_FWD_ARGS 5 // constant KdArgs&
#define FL_KD_FWD_NBUF 6

// Distillation backward (w.r.t. the student)
#define FL_KD_BWD_STUDENT 0
#define FL_KD_BWD_TEACHER 1
#define FL_KD_BWD_INDEX 2
#define FL_KD_BWD_STATS 3 // [rows, kDistillStats] float32
#define FL_KD_BWD_GLOSS 4 // [rows] float32 cotangent of the loss (unit_cotangent: never read)
#define FL_KD_BWD_GRAD 5 // [rows, V] S out
#define FL_KD_BWD_ARGS 6
#define FL_KD_BWD_NBUF 7

// Fused linear distillation (metal/linear_distillation.metal; csrc/metal/
// linear_distillation.cpp). A head's logits of a chunk of rows, Z = H W^T
// (slots 0-3 as the linear CE's tiles: hidden and the head's three slots),
// float32 into the chunk buffer; LceArgs of that head (its H, row0, chunk_rows).
#define FL_LD_LOGITS_OUT 4 // [chunk_rows, V] float32 out
#define FL_LD_LOGITS_ARGS 5
#define FL_LD_LOGITS_NBUF 6
// The rows of an offline (top-k) teacher on a chunk of the student's logits;
// the per-row buffers bound at the chunk's first row (as the logits form's
// FL_KD_* rows of linear_distillation_loss).
#define FL_LTK_FWD_LOGITS 0 // [chunk_rows, V] float32
#define FL_LTK_FWD_IDS 1 // [rows, k] int64 teacher class ids
#define FL_LTK_FWD_VALUES 2 // [rows, k] float32 teacher log-probabilities
#define FL_LTK_FWD_INDEX 3 // [rows] int64 class indices (bound to the ids without targets)
#define FL_LTK_FWD_LOSS 4 // [rows] float32 out
#define FL_LTK_FWD_STATS 5 // [rows, kDistillStats] float32 out
#define FL_LTK_FWD_ARGS 6 // constant LtkArgs&
#define FL_LTK_FWD_NBUF 7
#define FL_LTK_BWD_GRAD 0 // [chunk_rows, V] float32 in/out: the logits, overwritten with dZ
#define FL_LTK_BWD_IDS 1
#define FL_LTK_BWD_VALUES 2
#define FL_LTK_BWD_INDEX 3
#define FL_LTK_BWD_STATS 4 // [rows, kDistillStats] float32
#define FL_LTK_BWD_GLOSS 5 // [rows] float32 cotangent of the loss (unit_cotangent: never read)
#define FL_LTK_BWD_ARGS 6
#define FL_LTK_BWD_NBUF 7

// ---- argument structs ----------------------------------------------------------

// Cross-entropy (forward and backward).
struct CeArgs {
  fl_i64 ignore_index; // compared with the row's class when has_ignore_index
  int num_classes; // K (the row length)
  int has_ignore_index; // 0 | 1
  float c_target; // label smoothing: q_j = c_other + c_target * t_j
  float c_other;
  float z_loss;
  float softcap; // logit_softcap c (the logits become c tanh(x / c)); 0: none
  int stats; // forward: 1 = also write the row statistics (return_stats)
  int pad0;
};

// Softmax focal (forward and backward).
struct SfArgs {
  fl_i64 ignore_index;
  int num_classes;
  int has_ignore_index;
  float gamma;
  float alpha; // scalar alpha, used when there is no per-class alpha buffer
  int has_class_alpha;
  int pad0;
};

// Distillation (forward and backward); the coefficients are flm::DistillCoefs'.
struct KdArgs {
  fl_i64 ignore_index;
  int vocab; // V (the row length)
  int has_ignore_index; // 0 | 1
  int has_targets; // 0 | 1: class indices bound and read
  int ce_own_sum; // 1: the CE's sum at temperature 1 is kept apart (alpha > 0, T != 1)
  float c; // 1 / temperature
  float beta;
  float d_scale;
  float alpha;
  int unit_cotangent; // backward: g = 1 for every row (the linear forms' gradients in the forward)
  int pad0;
};

// An offline teacher's top-k rows: the logits form's options (KdArgs: vocab,
// targets, c, d_scale, alpha; beta unused) and the pairs per row.
struct LtkArgs {
  KdArgs kd;
  int topk; // k >= 1
  int renormalize; // 1: lp_i = c v_i - logsumexp_i(c v) (math/distillation.h)
};

// Row statistics of given logits (forward and backward): z = softcap(y) / T.
struct RsArgs {
  fl_i64 ignore_index;
  fl_i64 vocab_start; // sharded: the global index of class 0 (targets and argmax are global)
  int vocab; // V (the row length)
  int has_ignore_index; // 0 | 1
  int has_targets; // 0 | 1: class indices bound and read
  int sharded; // 0 | 1: a target outside the head is another shard's (0, no gradient)
  int stats; // forward: the flm::RowStat bits whose outputs are bound and written
  int cotangents; // backward: the flm::RowStat bits whose cotangents (and pairs) are bound
  float softcap; // 0: none
  float temperature;
  float inv_temperature; // 1 / temperature, the CPU's factor
  int pad0;
};

// Element-wise losses. kind: 0 smooth-L1, 1 Huber, 2 sigmoid focal
// (= fl::PointwiseKind); reduce: 0 none, 1 sum, 2 mean (= fl::Reduce).
// The kernels have one more kind, FL_PW_KIND_FOCAL_GAMMA_TWO: the sigmoid focal
// loss specialised to gamma = 2 (m * m instead of exp(2 log m), as the CPU's
// kernels do; launch_plan.cpp's pw_kernel_kind picks it).
struct PwArgs {
  fl_u64 size; // n, the element count
  fl_u64 num_partials; // sum finish: partial sums to add
  float param0; // beta | delta | alpha
  float param1; // gamma (focal)
  int reduce;
  int pad0;
};

#define FL_PW_KIND_FOCAL_GAMMA_TWO 3

// A target that broadcasts to the predictions' shape, read in place by the
// _bcast kernels (launch_plan.h, make_pw_target_layout): the predictions' axes
// collapsed into groups, innermost first, along which the target advances
// (stride: target elements per step) or stays put (stride 0). The target
// element that meets flat index i is sum_g (i_g % size[g]) * stride[g] with
// i_g = i / (size[0] ... size[g-1]), in 64-bit arithmetic. Groups past ndim
// are unused.
#define FL_PW_MAX_TARGET_GROUPS 8
struct PwTargetLayout {
  fl_i64 size[FL_PW_MAX_TARGET_GROUPS];
  fl_i64 stride[FL_PW_MAX_TARGET_GROUPS];
  int ndim; // 0: every element meets target element 0 (a scalar target)
  int pad0;
};

// Fused linear cross-entropy: one struct for every kernel of a call; the host
// changes row0 between the forward tile launches, and row0 / chunk_rows /
// accumulate between the chunks of the backward.
struct LceArgs {
  fl_i64 ignore_index;
  fl_i64 rows; // N
  fl_i64 row0; // first row of the forward tile launch or of the backward chunk
  fl_i64 vocab_start; // row statistics, sharded: the global index of class 0 (targets are global)
  int vocab; // V
  int hidden; // H
  int chunk_rows; // backward: rows in the chunk (the dZ buffer's rows)
  int vocab_per_split; // forward: columns per vocabulary split (a multiple of FL_LCE_BN)
  int num_splits; // forward: S
  int has_ignore_index;
  int has_bias;
  int unit_cotangent; // dZ: g = 1 for every row (the forward's fused gradients)
  int accumulate; // dW, dbias: add to the output (chunks after the first)
  int bits; // 0: dense head; else the quantized head's bits (mode: the kernel's head)
  int group_size; // quantized head
  float c_target; // label smoothing: q_j = c_other + c_target * onehot_j
  float c_other;
  float a_sum; // A = sum_j q_j = c_target + c_other * V
  float z_loss;
  float softcap; // 0: none
  // Row statistics (ops/row_stats.h) on the same tiles; 0 for the linear CE.
  int has_temperature; // logits divided by the temperature (after the cap)
  int sharded; // a target outside [vocab_start, vocab_start + V) is another shard's: ignored
  int no_targets; // no targets buffer: every row as ignored (targets never read)
  int rs_cotangents; // dZ: the flm::RowStat bits whose cotangent buffers are bound
  float inv_temperature;
  float temperature;
  int lse_cotangent; // dZ: g is [2, N], the lse's per-row cotangents after the rows' (a differentiable lse)
  // lce_dz writes the chunk's finished logits (bias, cap) instead of dZ: the
  // stored-Z path's forward GEMM (fl_lce_rows then forms dZ in place).
  int logits_only;
};

// ---- work per thread -------------------------------------------------------------

// Linear cross-entropy tiles (metal/lce_gemm.h, MLX's steel loader and
// fragment multiply): BM rows x BN columns of the output per threadgroup of
// FL_LCE_WM x FL_LCE_WN SIMD-groups (FL_LCE_THREADS threads), BK of the
// reduction dimension staged per step: MLX's default steel GEMM tile
// (mlx/backend/metal/matmul.cpp: 64 x 64 x 16, 2 x 2 SIMD-groups of 32 x 32).
#define FL_LCE_BM 64
#define FL_LCE_BN 64
#define FL_LCE_BK 16
#define FL_LCE_WM 2
#define FL_LCE_WN 2
#define FL_LCE_THREADS 128
// Element-wise helpers of the linear cross-entropy (dbias, scale): threads per group.
#define FL_LCE_ROW_THREADS 256

// Row-wise kernels: contiguous elements per thread per step (the block variant
// holds exactly this many per thread).
#define FL_ROW_READS 4
// Element-wise kernels: contiguous elements per thread (per step).
#define FL_PW_READS 4
// Fused sum: threads per group and the fixed block of elements each group
// reduces to one partial (the partition, hence the result, does not depend on
// the device).
#define FL_PW_GROUP_THREADS 256
#define FL_PW_GROUP_ELEMS 8192
// [[threadgroup(0)]] scratch, in floats: row kernels (lse states of up to 32
// SIMD-groups, see metal/fl_common.h) and element-wise sums (one per SIMD-group).
#define FL_ROW_SCRATCH_FLOATS 256
#define FL_PW_SCRATCH_FLOATS 32

// The host copies these structs byte for byte into a constant buffer
// (setBytes): both compilers must agree on their size (and, with 64-bit
// members first and 32-bit ones after, on every offset).
static_assert(sizeof(CeArgs) == 40, "CeArgs layout");
static_assert(sizeof(SfArgs) == 32, "SfArgs layout");
static_assert(sizeof(KdArgs) == 48, "KdArgs layout");
static_assert(sizeof(LtkArgs) == 56, "LtkArgs layout");
static_assert(sizeof(PwArgs) == 32, "PwArgs layout");
static_assert(sizeof(PwTargetLayout) == 16 * FL_PW_MAX_TARGET_GROUPS + 8, "PwTargetLayout layout");
static_assert(sizeof(LceArgs) == 128, "LceArgs layout");
static_assert(sizeof(RsArgs) == 56, "RsArgs layout");
