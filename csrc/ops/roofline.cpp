#include "ops/roofline.h"

namespace fl {

std::vector<mx::array> memory_roofline(
    const std::vector<mx::array>& reads,
    const std::optional<mx::array>& write_like,
    mx::StreamOrDevice s) {
  if (reads.empty()) {
    fail_value("memory_roofline needs at least one array to read");
  }
  std::vector<mx::array> inputs;
  for (const auto& a : reads) {
    inputs.push_back(dense(a, s));
  }
  std::vector<mx::Shape> shapes = {{int(reads.size())}};
  std::vector<mx::Dtype> dtypes = {mx::uint64};
  RooflineParams params;
  if (write_like) {
    params.writes = true;
    shapes.push_back(write_like->shape());
    dtypes.push_back(write_like->dtype());
  }
  return mx::array::make_arrays(
      shapes, dtypes, std::make_shared<MemoryRoofline>(mx::to_stream(s), params), inputs);
}

std::vector<mx::Shape> MemoryRoofline::output_shapes(const std::vector<mx::array>& inputs) {
  return {{int(inputs.size())}};
}

std::pair<std::vector<mx::array>, std::vector<int>> MemoryRoofline::vmap(
    const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::invalid_argument("memory_roofline is a benchmark primitive: no vmap");
}

#ifndef _METAL_
FL_NO_METAL(MemoryRoofline)
#else
void MemoryRoofline::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {
  // bench/ uses MLX's own streaming kernels as the roofline on the GPU.
  throw std::runtime_error("memory_roofline runs on the CPU only");
}
#endif

} // namespace fl
