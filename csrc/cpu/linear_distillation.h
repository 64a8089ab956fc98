// What the fused linear distillation kernels share (cpu/linear_distillation.cpp,
// cpu/linear_topk_distillation.cpp).
#pragma once

#include <functional>
#include <vector>

#include "cpu/chunked_head.h"
#include "ops/linear_distillation.h"

namespace fl::cpu {

// The driver's view of one head: inputs[hidden], inputs[weight] and, when
// q is quantized, its scales / biases / global scale (-1: absent).
HeadOperands distill_head(const std::vector<mlx::core::array>& inputs, int hidden, int weight,
                          int scales, int biases, int global, const HeadQuant& q);

// Registers the arrays with the stream's encoder and runs `task` there.
void run_on_stream(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
                   std::vector<mlx::core::array>& outputs, std::function<void()> task);

} // namespace fl::cpu
