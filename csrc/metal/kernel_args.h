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
#define FL_CE_FWD_NBUF 9

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
#define FL_PW_FWD_NBUF 4

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
#define FL_PW_BWD_NBUF 5

// ---- argument structs ----------------------------------------------------------

// Cross-entropy (forward and backward).
struct CeArgs {
  fl_i64 ignore_index; // compared with the row's class when has_ignore_index
  int num_classes; // K (the row length)
  int has_ignore_index; // 0 | 1
  float c_target; // label smoothing: q_j = c_other + c_target * t_j
  float c_other;
  float z_loss;
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

// ---- work per thread -------------------------------------------------------------

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
static_assert(sizeof(CeArgs) == 32, "CeArgs layout");
static_assert(sizeof(SfArgs) == 32, "SfArgs layout");
static_assert(sizeof(PwArgs) == 32, "PwArgs layout");
