// eval_gpu of AccurateSum (ops/accurate_sum.h): one threadgroup adds the
// elements with fl_pw_sum_finish (metal/pointwise_loss.metal), the kernel
// that finishes the element-wise losses' sums: compensated per thread, then a
// tree. It always runs and writes 0 for no elements.
#include "metal/host.h"
#include "ops/accurate_sum.h"

namespace fl {

void AccurateSum::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& x = inputs[0];
  auto& out = outputs[0];
  gpu::require_dense(x, "accurate_sum input");
  gpu::alloc(out);
  const uint64_t n = x.size();
  PwArgs args = mplan::make_pw_args(n, 0.0f, 0.0f, 1);
  args.num_partials = n;
  // (the plan always has one group: the kernel writes 0 for no elements)
  gpu::Launch l = gpu::launch(stream(), [&](int t) { return mplan::pw_sum_finish_plan(n, t); });
  auto& enc = l.encoder();
  enc.set_input_array(x, FL_PW_SUM_PARTIALS);
  enc.set_output_array(out, FL_PW_SUM_OUT);
  enc.set_bytes(args, FL_PW_SUM_ARGS);
  l.dispatch();
}

} // namespace fl
