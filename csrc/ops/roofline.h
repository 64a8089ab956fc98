// The memory roofline the benchmarks compare our losses with: a primitive that
// only moves bytes. It reads every input once (a sum of its 64-bit words, so
// nothing can be skipped) and, optionally, writes one output array once, on
// the same thread pool and with the same vector width as the loss kernels, so
// "x roofline" compares like with like. Not part of the loss API.
#pragma once

#include "ops/common.h"

namespace fl {

struct RooflineParams {
  bool writes = false;
  bool operator==(const RooflineParams&) const = default;
};

// Returns [checksums (uint64, one per input)] or, when `write_like` is given,
// [checksums, an array of write_like's shape and dtype written once].
std::vector<mx::array> memory_roofline(
    const std::vector<mx::array>& reads,
    const std::optional<mx::array>& write_like,
    mx::StreamOrDevice s = {});

class MemoryRoofline : public LossPrimitive<RooflineParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLossesMemoryRoofline")
};

} // namespace fl
