// How a target that broadcasts to the predictions' shape is read in place by the
// element-wise losses: one rule for the CPU kernels (csrc/cpu/pointwise_loss.cpp)
// and the Metal launch plans (csrc/metal/launch_plan.cpp). Plain C++ with no MLX
// and no Metal keywords: the harness compiles it after the .metal sources.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace fl {

// The predictions' axes collapsed, innermost first, into groups along which the
// target either advances with them (stride: target elements per step; the
// target is row-contiguous) or stays put (stride 0). Unit axes are dropped and
// neighbouring axes of one kind merge, so e.g. predictions [4, 5, 6] against a
// target [5, 1] give {size 6 stride 0, size 5 stride 1, size 4 stride 0}.
// Predictions of one element (or none) give no group.
struct BroadcastGroups {
  std::vector<int64_t> size;
  std::vector<int64_t> stride;
};

template <typename PredShape, typename TargetShape>
BroadcastGroups collapse_broadcast_groups(const PredShape& pred, const TargetShape& target) {
  if (target.size() > pred.size()) {
    throw std::invalid_argument("target layout: the target has more axes than the predictions");
  }
  BroadcastGroups g;
  const size_t lead = pred.size() - target.size();
  int64_t step = 1; // target elements per step along the current axis
  for (size_t d = pred.size(); d-- > 0;) {
    const int64_t pn = int64_t(pred[d]);
    const int64_t tn = d >= lead ? int64_t(target[d - lead]) : 1;
    if (tn != 1 && tn != pn) {
      throw std::invalid_argument("target layout: the target does not broadcast to the predictions");
    }
    if (pn == 1) {
      continue;
    }
    const int64_t st = tn == 1 ? 0 : step;
    if (!g.size.empty() && (g.stride.back() == 0) == (st == 0)) {
      g.size.back() *= pn;
    } else {
      g.size.push_back(pn);
      g.stride.push_back(st);
    }
    step *= tn;
  }
  return g;
}

} // namespace fl
