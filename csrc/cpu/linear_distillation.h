// What the fused linear distillation kernels share (cpu/linear_distillation.cpp,
// cpu/linear_topk_distillation.cpp).
#pragma once

#include <array>
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

// The summed loss of a forward with sum_rows: the per-row values added in
// a fixed order in double (the result does not depend on the thread count).
void sum_loss_rows(const std::vector<float>& per_row, float* out);

// The forward's declared gradient outputs (after loss and stats; hidden then
// weight, those declared): allocated and returned where the vjp requested
// them, null (and never allocated) otherwise.
std::array<float*, 2> fused_grad_outputs(std::vector<mlx::core::array>& outputs, bool grad_hidden,
                                         bool grad_weight, const std::array<bool, 2>& requested);

} // namespace fl::cpu
