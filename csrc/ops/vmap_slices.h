// vmap by running a primitive's op once per batch element and stacking the
// results: for the head losses, whose outputs sum over rows (a loss summed
// over rows, a weight gradient) and must stay per batch element, which
// flattening the batch into the rows would break.
#pragma once

#include <vector>

#include "ops/common.h"

namespace fl {

// Element b of `x` along `axis`, that axis dropped: a view (mx::take would
// refuse an array with no elements, e.g. a batch of examples without rows).
inline mx::array element_along(const mx::array& x, int b, int axis, mx::StreamOrDevice s) {
  mx::Shape start(x.ndim(), 0);
  mx::Shape stop = x.shape();
  start[axis] = b;
  stop[axis] = b + 1;
  return mx::squeeze(mx::slice(x, start, stop, s), axis, s);
}

// vmap of a primitive: `make` builds it on one batch element's inputs; run
// once per element and stacked (outputs along axis 0).
template <typename Make>
std::pair<std::vector<mx::array>, std::vector<int>> vmap_by_slices(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes,
    Make make,
    mx::StreamOrDevice s) {
  int batch = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) {
      batch = inputs[i].shape(axes[i]);
    }
  }
  std::vector<std::vector<mx::array>> per_output;
  for (int b = 0; b < batch; ++b) {
    std::vector<mx::array> sliced;
    for (size_t i = 0; i < inputs.size(); ++i) {
      sliced.push_back(axes[i] >= 0 ? element_along(inputs[i], b, axes[i], s) : inputs[i]);
    }
    auto outs = make(sliced);
    per_output.resize(outs.size());
    for (size_t o = 0; o < outs.size(); ++o) {
      per_output[o].push_back(outs[o]);
    }
  }
  std::vector<mx::array> stacked;
  if (batch == 0) {
    // No examples: empty outputs of the batched shapes and dtypes. One
    // example's graph (on zeros of an example's shape, never evaluated) says
    // what they are.
    std::vector<mx::array> example;
    for (size_t i = 0; i < inputs.size(); ++i) {
      const auto& x = inputs[i];
      if (axes[i] < 0) {
        example.push_back(x);
        continue;
      }
      mx::Shape shape = x.shape();
      shape.erase(shape.begin() + axes[i]);
      example.push_back(mx::zeros(shape, x.dtype(), s));
    }
    for (const auto& out : make(example)) {
      mx::Shape shape = out.shape();
      shape.insert(shape.begin(), 0);
      stacked.push_back(mx::zeros(shape, out.dtype(), s));
    }
  }
  for (auto& outs : per_output) {
    stacked.push_back(mx::stack(outs, 0, s));
  }
  return {stacked, std::vector<int>(stacked.size(), 0)};
}

} // namespace fl
