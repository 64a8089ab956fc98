// Hand a kernel to MLX's CPU stream: register the arrays (so MLX keeps them
// alive until the task ran) and split the work across the pool when it runs.
#pragma once

#include <utility>
#include <vector>

#include "cpu/parallel.h"
#include "cpu/vectorize.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"

namespace fl::cpu {

// body(begin, end) over [0, n) items, at least `grain` items per task.
template <typename Body>
void dispatch_parallel(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
                       std::vector<mlx::core::array>& outputs, int64_t n, int64_t grain, Body body) {
  auto& enc = mlx::core::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& out : outputs) {
    enc.set_output_array(out);
  }
  enc.dispatch([n, grain, body]() { parallel_for(n, grain, body); });
}

// One task that splits its own work (the chunked-head kernels): run on the
// stream after the arrays are registered.
template <typename Task>
void dispatch_task(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
                   std::vector<mlx::core::array>& outputs, Task task) {
  auto& enc = mlx::core::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& out : outputs) {
    enc.set_output_array(out);
  }
  enc.dispatch(std::move(task));
}

// Row-wise kernels: enough rows per task to amortise waking a thread.
template <typename Body>
void dispatch_rows(mlx::core::Stream stream, const std::vector<mlx::core::array>& inputs,
                   std::vector<mlx::core::array>& outputs, int64_t rows, int64_t row_length,
                   Body body) {
  dispatch_parallel(stream, inputs, outputs, rows, rows_per_task(row_length), body);
}

} // namespace fl::cpu
