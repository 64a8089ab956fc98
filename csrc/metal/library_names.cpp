// See library_names.h. Built only where MLX has Metal (_METAL_); compile-checked
// on Linux against MLX's real Metal headers (tests/test_metal_host_code.py).
#include "metal/library_names.h"

#include "metal/host.h"

namespace fl::gpu {

std::vector<std::string> metallib_function_names() {
  // functionNames() returns an autoreleased NS::Array: drain it here, not in
  // whatever pool the Python thread may (not) have.
  auto pool = mx::metal::new_scoped_memory_pool();
  MTL::Library* lib = default_library();
  if (lib == nullptr) {
    throw std::runtime_error("mlx_fused_losses: cannot load mlx_fused_losses.metallib from " +
                             binary_dir());
  }
  NS::Array* names = lib->functionNames();
  std::vector<std::string> out;
  out.reserve(names->count());
  for (NS::UInteger i = 0; i < names->count(); ++i) {
    out.emplace_back(names->object<NS::String>(i)->utf8String());
  }
  return out;
}

} // namespace fl::gpu
