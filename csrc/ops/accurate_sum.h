// The sum behind every "mean" and "sum" the Python wrappers take over the
// per-row losses (and over the class weights of the kept rows): float32 in,
// a float32 scalar out, accumulated more precisely than float32.
//
// Why a primitive: MLX's float32 sum adds 1269 per-row losses with ~1e-6
// relative error (PyTorch's cascade sum: ~1e-7), so a mean would be less
// accurate than the rows it averages. Here
//   CPU    adds the elements in index order in double: the float32 result is
//          the exact sum rounded once, for any realistic row count;
//   Metal  (no double) one threadgroup adds them: each thread a strided run
//          with compensation (Neumaier), then the group's tree of SIMD sums,
//          fl_pw_sum_finish (metal/pointwise_loss.metal): error ~ log2(n)
//          float32 roundings at worst, not n.
// Gradient: d sum / d x_i = 1, the cotangent broadcast to x's shape (through
// ones_like, which a shapeless mx.compile re-sizes; broadcast_to would keep
// the traced shape). vmap sums each entry with MLX's own float32 sum.
#pragma once

#include "ops/common.h"

namespace fl {

struct AccurateSumParams {
  bool operator==(const AccurateSumParams&) const = default;
};

// The float32 sum of all elements of `a` (converted to float32 first).
mx::array accurate_sum(const mx::array& a, mx::StreamOrDevice s = {});

class AccurateSum : public LossPrimitive<AccurateSumParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedAccurateSum")
  FL_VJP
};

} // namespace fl
