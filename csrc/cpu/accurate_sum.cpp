// eval_cpu of AccurateSum (ops/accurate_sum.h): the float32 elements added in
// index order in double, rounded to float32 once. O(rows) numbers: one thread.
#include "cpu/output_buffer.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/accurate_sum.h"

namespace fl {

void AccurateSum::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  auto& out = outputs[0];
  cpu::allocate(out);
  auto& enc = mx::cpu::get_command_encoder(stream());
  enc.set_input_array(x);
  enc.set_output_array(out);
  const float* data = x.data<float>();
  const size_t n = x.size();
  float* result = out.data<float>();
  enc.dispatch([data, n, result]() {
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) {
      total += double(data[i]);
    }
    *result = float(total);
  });
}

} // namespace fl
