// The function names of the loaded mlx_fused_losses.metallib (macOS, _METAL_
// builds only): _ext exports them as metallib_function_names so that
// `python -m mlx_fused_losses.check_gpu` can compare them with every kernel name
// the launch plans can ask for (mplan::enumerate_plan_kernels). No Metal types
// here: bindings.cpp includes it.
#pragma once

#include <string>
#include <vector>

namespace fl::gpu {

// Loads the metallib on the default GPU (as the first eval_gpu would) and lists
// MTL::Library::functionNames(). Throws if the metallib cannot be loaded.
std::vector<std::string> metallib_function_names();

} // namespace fl::gpu
