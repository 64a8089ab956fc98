// Helpers shared by the row-wise kernels (cross_entropy.metal,
// softmax_focal.metal) and the element-wise ones (pointwise_loss.metal):
// masked loads of a few contiguous elements, and the SIMD-group + threadgroup
// reductions of a row's partial log-sum-exp state.
//
// Reduction scheme (one threadgroup per row, threads a multiple of 32):
//   1. every SIMD-group merges its 32 lanes' states with simd_max / simd_sum,
//      each lane first moving its sums to the SIMD-group max (row_acc_moved:
//      exp-sums scaled, gaps shifted, as the CPU's chunk loop does);
//   2. lane 0 of each SIMD-group writes its state to threadgroup scratch;
//   3. after one threadgroup barrier, SIMD-group 0 reads the (at most 32)
//      states, lanes past the number of SIMD-groups taking the empty state,
//      and merges them the same way. Only SIMD-group 0 holds the result.
// Every thread of the group reaches the barrier (no early return after the
// row's target check, which is uniform over the group); the SIMD functions in
// step 3 run under `if (sg == 0)`, uniform within each SIMD-group.
#pragma once

#include <metal_stdlib>

// The kernels are instantiated for bfloat, which needs Metal 3.1:
// CMakeLists.txt compiles them with -std=metal3.1 (and -fno-fast-math: they
// rely on IEEE inf/NaN). A build for an older language version fails here
// instead of silently losing the bfloat16 kernels.
#if __METAL_VERSION__ < 310
#error "mlx_fused_losses kernels need Metal 3.1 (-std=metal3.1, macOS 14): bfloat"
#endif

#include "../csrc/math/cross_entropy.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

namespace flk {

// Partial state of a row held by one thread, a SIMD-group or the threadgroup.
//   m:  running max of the logits seen
//   s:  sum exp(x - m) of the logits seen (relative to m; 0 while m = -inf)
//   so: a second exp-sum relative to m (softmax focal: without the target)
//   v:  cross-entropy's two weighted gaps relative to m (flm::GapSum, see
//       csrc/math/cross_entropy.h): (sum_w, sum_w (m - x), sum_wt,
//       sum_wt (m - x)); a gap grows by delta * its weight when m moves
struct RowAcc {
  float m;
  float s;
  float so;
  float4 v;
};

// The same state relative to a new max to_max >= a.m.
inline RowAcc row_acc_moved(RowAcc a, float to_max) {
  flm::MaxMove mv = flm::max_move(a.m, to_max);
  a.m = to_max;
  a.s *= mv.scale;
  a.so *= mv.scale;
  a.v.y += flm::weighted(a.v.x, mv.delta);
  a.v.w += flm::weighted(a.v.z, mv.delta);
  return a;
}

inline RowAcc row_acc_empty() {
  RowAcc a;
  a.m = -flm::kInf;
  a.s = 0.0f;
  a.so = 0.0f;
  a.v = float4(0.0f);
  return a;
}

// Scratch layout (floats): [0,32) m, [32,64) s, [64,96) so, [96,224) v as four
// rows of 32, [224,256) the block variant's max pass. 1 KiB in total.
#define FLK_SCRATCH_M 0
#define FLK_SCRATCH_S 32
#define FLK_SCRATCH_SO 64
#define FLK_SCRATCH_V 96
#define FLK_SCRATCH_MAX 224
static_assert(FLK_SCRATCH_MAX + 32 <= FL_ROW_SCRATCH_FLOATS, "row scratch too small");

// Merges the states of the 32 lanes of the calling SIMD-group; every lane gets
// the merged state. kOther / kSums: whether `so` / `v` are in use.
template <bool kOther, bool kSums>
inline RowAcc simd_merge(RowAcc a) {
  float gm = simd_max(a.m);
  a = row_acc_moved(a, gm); // no change where a.m == gm
  RowAcc r;
  r.m = gm;
  r.s = simd_sum(a.s);
  r.so = kOther ? simd_sum(a.so) : 0.0f;
  r.v = kSums ? simd_sum(a.v) : float4(0.0f);
  return r;
}

// Merges the states of all threads of the group; the result is valid in
// SIMD-group 0 only (where thread 0 writes the row's outputs).
template <bool kOther, bool kSums>
inline RowAcc threadgroup_merge(
    RowAcc a,
    threadgroup float* scratch,
    uint sg,
    uint lane,
    uint nsg) {
  a = simd_merge<kOther, kSums>(a);
  if (lane == 0) {
    scratch[FLK_SCRATCH_M + sg] = a.m;
    scratch[FLK_SCRATCH_S + sg] = a.s;
    if (kOther) {
      scratch[FLK_SCRATCH_SO + sg] = a.so;
    }
    if (kSums) {
      scratch[FLK_SCRATCH_V + sg] = a.v.x;
      scratch[FLK_SCRATCH_V + 32 + sg] = a.v.y;
      scratch[FLK_SCRATCH_V + 64 + sg] = a.v.z;
      scratch[FLK_SCRATCH_V + 96 + sg] = a.v.w;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  RowAcc r = row_acc_empty();
  if (sg == 0) {
    if (lane < nsg) { // slots of absent SIMD-groups are never read
      r.m = scratch[FLK_SCRATCH_M + lane];
      r.s = scratch[FLK_SCRATCH_S + lane];
      if (kOther) {
        r.so = scratch[FLK_SCRATCH_SO + lane];
      }
      if (kSums) {
        r.v = float4(
            scratch[FLK_SCRATCH_V + lane],
            scratch[FLK_SCRATCH_V + 32 + lane],
            scratch[FLK_SCRATCH_V + 64 + lane],
            scratch[FLK_SCRATCH_V + 96 + lane]);
      }
    }
    r = simd_merge<kOther, kSums>(r);
  }
  return r;
}

// The max over the whole group, returned to every thread (block variant).
// Uses scratch[FLK_SCRATCH_MAX, +32), disjoint from threadgroup_merge's slots,
// so the two can follow each other with no barrier in between.
inline float threadgroup_max(float v, threadgroup float* scratch, uint sg, uint lane, uint nsg) {
  v = simd_max(v);
  if (lane == 0) {
    scratch[FLK_SCRATCH_MAX + sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return simd_max(lane < nsg ? scratch[FLK_SCRATCH_MAX + lane] : -flm::kInf);
}

// The plain sum over the whole group, valid in SIMD-group 0 (element-wise
// losses' partial sums). Uses scratch[0, 32) (FL_PW_SCRATCH_FLOATS).
inline float threadgroup_sum(float v, threadgroup float* scratch, uint sg, uint lane, uint nsg) {
  v = simd_sum(v);
  if (lane == 0) {
    scratch[sg] = v;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float r = 0.0f;
  if (sg == 0) {
    r = simd_sum(lane < nsg ? scratch[lane] : 0.0f);
  }
  return r;
}

// The argmax (csrc/math/cross_entropy.h: the first maximal element) over the
// SIMD-group, in every lane: the largest key, and the lowest index among the
// lanes holding it.
inline flm::ArgMax simd_argmax(flm::ArgMax a) {
  flm::ArgMax r;
  r.key = simd_max(a.key);
  r.index = simd_min(a.key == r.key ? a.index : 0x7FFFFFFF);
  return r;
}

// Class index of a row: the index, or -1 (ignored row) / -2 (out of range),
// with the CPU kernels' precedence (ignore_index is checked first).
inline long row_class(long t, int num_classes, int has_ignore_index, long ignore_index) {
  if (has_ignore_index != 0 && t == ignore_index) {
    return -1;
  }
  return (t < 0 || t >= long(num_classes)) ? -2 : t;
}

} // namespace flk
