// CPU kernels of the fused linear distillation (contract: ops/linear_distillation.h):
// the chunked-head driver (cpu/chunked_head.h) with the student as its head
// and the teacher as its second head, and the logits primitive's row kernels
// (cpu/distillation.h) as the epilogue, on each chunk's float32 logits:
// forward, the loss and stats of the chunk's rows, and with gradients in the
// forward (requested by the vjp) also dZ for a unit cotangent written over the
// student's logits in place (the fused rows); backward, dZ from the saved
// stats and the per-row cotangent, in place. The driver then forms dH, dW.
#include <functional>
#include <numeric>
#include <vector>

#include "cpu/linear_distillation.h"

#include "cpu/chunked_head.h"
#include "cpu/distillation.h"
#include "cpu/output_buffer.h"
#include "mlx/backend/cpu/encoder.h"
#include "ops/linear_distillation.h"

namespace fl {

namespace cpu {

HeadOperands distill_head(const std::vector<mx::array>& inputs, int hidden, int weight, int scales,
                          int biases, int global, const HeadQuant& q) {
  HeadOperands h;
  const auto& x = inputs[hidden];
  const auto& w = inputs[weight];
  h.hidden = x.data<void>();
  h.hidden_dtype = x.dtype();
  h.hidden_size = x.shape(-1);
  h.vocab = w.shape(0);
  h.weight = w.data<void>();
  h.weight_dtype = w.dtype();
  if (q.quantized()) {
    h.bits = q.bits;
    h.group_size = q.group_size;
    h.quant_mode = q.mode;
    h.scales = inputs[scales].data<void>();
    h.scale_dtype = inputs[scales].dtype();
    h.qbiases = biases >= 0 ? inputs[biases].data<void>() : nullptr;
    h.global_scale = global >= 0 ? inputs[global].data<float>() : nullptr;
  }
  return h;
}

void run_on_stream(mx::Stream stream, const std::vector<mx::array>& inputs,
                   std::vector<mx::array>& outputs, std::function<void()> task) {
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (const auto& in : inputs) {
    enc.set_input_array(in);
  }
  for (auto& out : outputs) {
    enc.set_output_array(out);
  }
  enc.dispatch(std::move(task));
}

} // namespace cpu

namespace {

struct LdCall {
  cpu::ChunkedHeadCall call;
  cpu::HeadOperands teacher;
  cpu::DistillRows rows; // pointers are those of row 0; shifted per chunk
  cpu::DistillRowsFn fn;
  cpu::DistillPass pass;
};

LdCall make_call(const std::vector<mx::array>& inputs, const LinearDistillParams& p,
                 cpu::DistillPass pass) {
  auto L = ld_inputs(p);
  LdCall c;
  c.call.head = cpu::distill_head(inputs, L.s_hidden, L.s_weight, L.s_scales, L.s_biases, L.s_global, p.student);
  c.teacher = cpu::distill_head(inputs, L.t_hidden, L.t_weight, L.t_scales, L.t_biases, L.t_global, p.teacher);
  const auto& sh = inputs[L.s_hidden];
  const int64_t H = sh.shape(-1);
  const int64_t N = H ? int64_t(sh.size()) / H : int64_t(inputs[L.t_hidden].size()) /
                                                     std::max<int64_t>(inputs[L.t_hidden].shape(-1), 1);
  c.call.rows = N;
  c.call.chunk_bytes = p.chunk_bytes;
  const int V = int(c.call.head.vocab);
  c.rows = cpu::distill_rows(p.d, N, V);
  c.rows.class_index = p.d.has_targets ? inputs[L.targets].data<int64_t>() : nullptr;
  // The chunks' logits are float32 whatever the operands' dtypes.
  c.fn = cpu::distill_rows_fn(mx::float32, mx::float32, p.d.kind, pass);
  c.pass = pass;
  return c;
}

// Runs the driver; per chunk, the rows [row0, row0 + n) of `base` shifted there.
void run(LdCall c) {
  c.call.second = &c.teacher;
  const cpu::DistillRows base = c.rows;
  const auto fn = c.fn;
  const bool backward = c.pass == cpu::DistillPass::kBackward;
  cpu::run_chunked_head(c.call, [&](const cpu::HeadChunk& ch) {
    cpu::DistillRows r = base;
    r.student = ch.z;
    r.teacher = ch.z2;
    r.rows = ch.rows;
    r.class_index = base.class_index ? base.class_index + ch.row0 : nullptr;
    if (backward) {
      r.stats_in = base.stats_in + ch.row0 * flm::kDistillStats;
      r.g_loss = base.g_loss + ch.row0;
    } else {
      r.loss = base.loss + ch.row0;
      r.stats = base.stats + ch.row0 * flm::kDistillStats;
    }
    if (c.pass != cpu::DistillPass::kForward) {
      r.grad = ch.z; // dZ over the student's logits (element i after its last read)
    }
    ch.for_rows([&](int64_t b, int64_t e) { fn(r, b, e); });
  });
}

} // namespace

namespace cpu {

void sum_loss_rows(const std::vector<float>& per_row, float* out) {
  // Added in a fixed order in double: the sum does not depend on the thread
  // count (as the linear CE's).
  *out = float(std::accumulate(per_row.begin(), per_row.end(), 0.0));
}

std::array<float*, 2> fused_grad_outputs(std::vector<mx::array>& outputs, bool grad_hidden,
                                         bool grad_weight, const std::array<bool, 2>& requested) {
  std::array<float*, 2> grads{nullptr, nullptr};
  size_t next = 2; // after loss, stats
  const bool declared[2] = {grad_hidden, grad_weight};
  for (int which = 0; which < 2; ++which) {
    if (!declared[which]) {
      continue;
    }
    auto& out = outputs[next++];
    if (requested[which]) { // a declared gradient nobody asked for: no memory, no work
      allocate(out);
      grads[which] = out.data<float>();
    }
  }
  return grads;
}

} // namespace cpu

void LinearDistill::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cpu::allocate(outputs[0]);
  cpu::allocate(outputs[1]);
  auto grads = cpu::fused_grad_outputs(outputs, params_.grad_hidden, params_.grad_weight, requested);
  const bool fused = grads[0] || grads[1];
  LdCall c = make_call(inputs, params_, fused ? cpu::DistillPass::kFused : cpu::DistillPass::kForward);
  c.call.grads.d_hidden = grads[0];
  c.call.grads.d_weight = grads[1];
  c.rows.stats = outputs[1].data<float>();
  float* loss_out = outputs[0].data<float>();
  const bool sum_rows = params_.sum_rows;
  cpu::run_on_stream(stream(), inputs, outputs, [c, loss_out, sum_rows]() mutable {
    std::vector<float> per_row(sum_rows ? size_t(c.call.rows) : 0);
    c.rows.loss = sum_rows ? per_row.data() : loss_out;
    run(c);
    if (sum_rows) {
      cpu::sum_loss_rows(per_row, loss_out);
    }
  });
}

void LinearDistillVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  LdCall c = make_call(inputs, params_, cpu::DistillPass::kBackward);
  const size_t n = inputs.size(); // ..., stats, g
  c.rows.stats_in = inputs[n - 2].data<float>();
  c.rows.g_loss = inputs[n - 1].data<float>();
  size_t k = 0;
  c.call.grads.d_hidden = params_.grad_hidden ? outputs[k++].data<float>() : nullptr;
  c.call.grads.d_weight = params_.grad_weight ? outputs[k++].data<float>() : nullptr;
  cpu::run_on_stream(stream(), inputs, outputs, [c]() { run(c); });
}

} // namespace fl
