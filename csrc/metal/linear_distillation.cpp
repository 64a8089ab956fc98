// eval_gpu of the fused linear distillation losses (ops/linear_distillation.h:
// a student and a teacher head; ops/linear_topk_distillation.h: a student head
// and an offline top-k teacher) on the linear CE's tiles
// (metal/linear_distillation.metal). Built only where MLX has Metal (_METAL_).
// Each head is a linear CE call of the shared host code (metal/lce_host.h:
// its checks, head name, forward tile, bindings, dH / dW launches, scratch and
// command buffers); launch_plan.h's ld_plan cuts the rows into chunks for both
// heads and ld_schedule orders the launches, per chunk:
//   ld_logits (student) [-> ld_logits (teacher)] -> the rows:
//     forward   kd_forward (two heads; the logits form's kernel on float32
//               rows) / fl_ltk_fwd (top-k): loss and stats of the chunk's rows
//     backward  kd_backward / fl_ltk_bwd: dZ over the student's logits in
//               place, then the linear CE's lce_dh, lce_dw (those asked for)
// The row kernels' per-row buffers are bound at the chunk's first row (a byte
// offset), so they run on a chunk exactly as on a whole logits call. The same
// dispatch sequence runs under the CPU harness (tests/metal_kernels/
// ld_adaptor.cpp).
#include <array>
#include <optional>

#include "math/distillation.h"
#include "metal/lce_host.h"
#include "ops/linear_distillation.h"
#include "ops/linear_topk_distillation.h"

namespace fl {

namespace {

using lcehost::LceCall;

// A head as a linear CE call sees it: its quantization, the chunk bytes of the
// call (ld_plan overrides the plan).
LinearCrossEntropyParams head_params(const HeadQuant& q, int64_t chunk_bytes) {
  LinearCrossEntropyParams p;
  p.bits = q.bits;
  p.group_size = q.group_size;
  p.quant_mode = q.mode;
  p.has_global_scale = q.has_global_scale;
  p.chunk_bytes = chunk_bytes;
  return p;
}

LceInputs head_inputs(int hidden, int weight, int scales, int biases, int global) {
  LceInputs L;
  L.hidden = hidden;
  L.weight = weight;
  L.scales = scales;
  L.qbiases = biases;
  L.global_scale = global;
  L.targets = -1; // the logits kernels read no targets
  L.bias = -1;
  return L;
}

// The per-row buffers of a chunk start at its first row.
int64_t row_offset(const mplan::LdLaunch& l, int64_t bytes_per_row) {
  return l.row0 * bytes_per_row;
}

mplan::LceLaunch lce_launch(const mplan::LdLaunch& l) {
  mplan::LceLaunch c;
  c.row0 = l.row0;
  c.rows = l.rows;
  return c;
}

// Z of the chunk's rows through the call's head.
void launch_logits(LceCall& c, const mplan::LdLaunch& l, mx::array& z) {
  const LceArgs args = lcehost::chunk_args(c, lce_launch(l));
  if (auto x = gpu::launch(c.s, [&](int t) {
        return mplan::ld_logits_plan(c.hidden_dt, c.head, c.plan, l.rows, t);
      })) {
    auto& enc = x.encoder();
    enc.set_input_array(c.inputs[c.L.hidden], FL_LCE_HIDDEN);
    lcehost::bind_head(c, enc);
    enc.set_output_array(z, FL_LD_LOGITS_OUT);
    enc.set_bytes(args, FL_LD_LOGITS_ARGS);
    x.dispatch();
  }
}

// Where a call's row kernels read and write: the forward's per-row loss (the
// loss output, or scratch summed into it) and stats; the backward's saved
// stats and per-row cotangent (null: a unit cotangent, the gradients in the
// forward, whose stats are the ones the forward rows just wrote).
struct RowIo {
  mx::array* loss = nullptr; // [N] per row
  mx::array* loss_sum = nullptr; // the scalar loss output (sum_rows), else null
  mx::array* stats_out = nullptr; // forward
  const mx::array* stats_in = nullptr; // backward
  const mx::array* g = nullptr;
};

// The per-row losses added by one group in a fixed order into the scalar loss
// (the element-wise losses' finish kernel, as the linear CE's summed loss).
void launch_sum(mx::Stream s, const RowIo& io, int64_t rows) {
  PwArgs sum = mplan::make_pw_args(uint64_t(rows), 0.0f, 0.0f, 1);
  sum.num_partials = uint64_t(rows);
  auto x = gpu::launch(s, [&](int t) { return mplan::pw_sum_finish_plan(uint64_t(rows), t); });
  auto& enc = x.encoder();
  enc.set_input_array(*io.loss, FL_PW_SUM_PARTIALS);
  enc.set_output_array(*io.loss_sum, FL_PW_SUM_OUT);
  enc.set_bytes(sum, FL_PW_SUM_ARGS);
  x.dispatch();
}

// The forward's loss buffers: the loss output, or (sum_rows) a scratch row the
// sum launch reads.
void set_loss_buffers(RowIo& io, gpu::CommandBuffers& buffers, std::vector<mx::array>& outputs,
                      bool sum_rows, int64_t rows, std::optional<mx::array>& row_loss) {
  if (sum_rows) {
    row_loss = lcehost::scratch(buffers, rows);
    io.loss = &*row_loss;
    io.loss_sum = &outputs[0];
  } else {
    io.loss = &outputs[0];
  }
  io.stats_out = &outputs[1];
  io.stats_in = &outputs[1];
}

// The call's student (and teacher) heads on one chunk plan, and the launches
// of ld_schedule(plan, w) in order; `rows(l, zs, zt)` launches the row kernels
// (rows_forward / rows_backward) and the sum. zs, zt: the chunk's logits of
// each head (zt is zs without a teacher head).
template <class Rows>
void run_chunks(LceCall& student, LceCall* teacher, const mplan::LdPlan& plan, const mplan::LdWork& w,
                mx::array* dh, mx::array* dw, Rows&& rows) {
  student.plan = plan.student;
  student.args = mplan::make_ld_head_args(plan.student, student.p.bits, student.p.group_size);
  if (teacher) {
    teacher->plan = plan.teacher;
    teacher->args = mplan::make_ld_head_args(plan.teacher, teacher->p.bits, teacher->p.group_size);
  }
  const int64_t chunk = plan.chunk_rows * int64_t(plan.student.vocab);
  mx::array zs = lcehost::scratch(student.buffers, chunk);
  mx::array zt = teacher ? lcehost::scratch(student.buffers, chunk) : zs;
  int segment = 0;
  for (const auto& l : mplan::ld_schedule(plan, w)) {
    if (l.segment != segment) {
      student.buffers.commit();
      segment = l.segment;
    }
    switch (l.kernel) {
      case mplan::LdKernel::logits:
        launch_logits(student, l, zs);
        break;
      case mplan::LdKernel::teacher_logits:
        launch_logits(*teacher, l, zt);
        break;
      case mplan::LdKernel::rows_forward:
      case mplan::LdKernel::rows_backward:
      case mplan::LdKernel::sum:
        rows(l, zs, zt);
        break;
      case mplan::LdKernel::dh:
        lcehost::launch_dh(student, lce_launch(l), lcehost::chunk_args(student, lce_launch(l)), zs, *dh);
        break;
      case mplan::LdKernel::dw:
        lcehost::launch_dw(student, lcehost::chunk_args(student, lce_launch(l)), zs, *dw);
        break;
    }
  }
  student.buffers.finish([&] { lcehost::pad_launch(student.s, zs); });
}

// The gradient outputs a call forms (dH then dW, null where not).
struct GradOutputs {
  mx::array* dh = nullptr;
  mx::array* dw = nullptr;
};

// The backward's: those its params ask for.
template <class Params>
GradOutputs backward_grads(const Params& p, std::vector<mx::array>& outputs) {
  GradOutputs g;
  size_t k = 0;
  g.dh = p.grad_hidden ? &outputs[k++] : nullptr;
  g.dw = p.grad_weight ? &outputs[k++] : nullptr;
  for (auto& out : outputs) {
    gpu::alloc(out);
  }
  return g;
}

// The forward's (ops/student_head_grads.h): the declared gradients after loss
// and stats, allocated and formed where the vjp requested them; a declared one
// nobody requested is neither (as the CPU's).
template <class Params>
GradOutputs forward_grads(const Params& p, const std::array<bool, 2>& requested,
                          std::vector<mx::array>& outputs) {
  GradOutputs g;
  size_t next = student_head::kForwardStats;
  const bool declared[2] = {p.grad_hidden, p.grad_weight};
  mx::array* found[2] = {nullptr, nullptr};
  for (int which = 0; which < 2; ++which) {
    if (!declared[which]) {
      continue;
    }
    mx::array& out = outputs[next++];
    if (requested[which]) {
      gpu::alloc(out);
      found[which] = &out;
    }
  }
  g.dh = found[0];
  g.dw = found[1];
  gpu::alloc(outputs[0]);
  gpu::alloc(outputs[1]);
  return g;
}

// A forward (with its gradients where formed) or a backward call's work.
mplan::LdWork call_work(bool forward, bool sum_rows, const GradOutputs& g) {
  mplan::LdWork w;
  w.forward = forward;
  w.sum_rows = forward && sum_rows;
  w.dh = g.dh != nullptr;
  w.dw = g.dw != nullptr;
  w.backward = w.dh || w.dw;
  return w;
}

void require_int64(const mx::array& a, const char* what) {
  gpu::require_dense(a, what);
  if (a.dtype() != mx::int64) {
    throw std::runtime_error(std::string("mlx_fused_losses: ") + what + " must reach the kernel as int64");
  }
}

// The backward's saved stats and per-row cotangent: its last two inputs.
void set_backward_inputs(RowIo& io, const std::vector<mx::array>& inputs) {
  const size_t n = inputs.size(); // ..., stats, g
  gpu::require_dense(inputs[n - 2], "stats");
  gpu::require_dense(inputs[n - 1], "g_loss");
  io.stats_in = &inputs[n - 2];
  io.g = &inputs[n - 1];
}

constexpr int64_t kStatsBytes = flm::kDistillStats * sizeof(float);

// ---- two heads ---------------------------------------------------------------------------

// The rows of the logits form (metal/distillation.metal) on a chunk: the
// student's and the teacher's float32 logits, per-row buffers at the chunk.
struct KdRows {
  const LinearDistillParams& p;
  const std::vector<mx::array>& inputs;
  const RowIo& io;
  LdInputs L;
  KdArgs args;
  mx::Stream s;
  int64_t rows;

  void operator()(const mplan::LdLaunch& l, mx::array& zs, mx::array& zt) const {
    if (l.kernel == mplan::LdKernel::sum) {
      launch_sum(s, io, rows);
      return;
    }
    const int V = args.vocab;
    const bool forward = l.kernel == mplan::LdKernel::rows_forward;
    auto x = gpu::launch(s, [&](int t) {
      return forward ? mplan::kd_forward_plan(mplan::KDtype::float32, mplan::KDtype::float32, p.d.kind,
                                              l.rows, V, t)
                     : mplan::kd_backward_plan(mplan::KDtype::float32, mplan::KDtype::float32, p.d.kind,
                                               l.rows, V, t);
    });
    if (!x) {
      return;
    }
    auto& enc = x.encoder();
    static_assert(FL_KD_FWD_INDEX == FL_KD_BWD_INDEX && FL_KD_FWD_STUDENT == FL_KD_BWD_STUDENT &&
                      FL_KD_FWD_TEACHER == FL_KD_BWD_TEACHER,
                  "the logits form's input slots");
    enc.set_input_array(zs, FL_KD_FWD_STUDENT);
    enc.set_input_array(zt, FL_KD_FWD_TEACHER);
    if (p.d.has_targets) {
      enc.set_input_array(inputs[L.targets], FL_KD_FWD_INDEX, row_offset(l, sizeof(int64_t)));
    } else {
      enc.set_input_array(zs, FL_KD_FWD_INDEX); // never read
    }
    if (forward) {
      enc.set_output_array(*io.loss, FL_KD_FWD_LOSS, row_offset(l, sizeof(float)));
      enc.set_output_array(*io.stats_out, FL_KD_FWD_STATS, row_offset(l, kStatsBytes));
      enc.set_bytes(args, FL_KD_FWD_ARGS);
    } else {
      KdArgs a = args;
      a.unit_cotangent = io.g == nullptr ? 1 : 0;
      enc.set_input_array(*io.stats_in, FL_KD_BWD_STATS, row_offset(l, kStatsBytes));
      if (io.g) {
        enc.set_input_array(*io.g, FL_KD_BWD_GLOSS, row_offset(l, sizeof(float)));
      } else {
        enc.set_input_array(*io.stats_in, FL_KD_BWD_GLOSS); // never read
      }
      enc.set_output_array(zs, FL_KD_BWD_GRAD); // dZ over the student's logits
      enc.set_bytes(a, FL_KD_BWD_ARGS);
    }
    x.dispatch();
  }
};

// The student's and the teacher's calls on one chunk plan, then the launches.
void run_two_heads(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
                   const LinearDistillParams& p, mx::Stream s, bool forward, GradOutputs g) {
  const LdInputs L = ld_inputs(p);
  const LinearCrossEntropyParams sp = head_params(p.student, p.chunk_bytes);
  const LinearCrossEntropyParams tp = head_params(p.teacher, p.chunk_bytes);
  LceCall student = lcehost::make_call(
      inputs, outputs, sp, head_inputs(L.s_hidden, L.s_weight, L.s_scales, L.s_biases, L.s_global), s);
  LceCall teacher = lcehost::make_call(
      inputs, outputs, tp, head_inputs(L.t_hidden, L.t_weight, L.t_scales, L.t_biases, L.t_global), s);
  if (p.d.has_targets) {
    require_int64(inputs[L.targets], "targets");
  }
  const mplan::LdPlan plan =
      mplan::ld_plan(student.plan.rows, student.plan.vocab, student.plan.hidden, teacher.plan.hidden,
                     p.chunk_bytes, mplan::kLceMaxBufferFlops, student.plan.fwd, teacher.plan.fwd);
  RowIo io;
  std::optional<mx::array> row_loss;
  if (forward) {
    set_loss_buffers(io, student.buffers, outputs, p.sum_rows, plan.rows, row_loss);
  } else {
    set_backward_inputs(io, inputs);
  }
  const KdArgs args = mplan::make_kd_args(plan.student.vocab, p.d.has_targets, p.d.has_ignore_index,
                                          p.d.ignore_index, p.d.inv_temperature, p.d.beta, p.d.d_scale,
                                          p.d.alpha);
  run_chunks(student, &teacher, plan, call_work(forward, p.sum_rows, g), g.dh, g.dw,
             KdRows{p, inputs, io, L, args, s, plan.rows});
}

// ---- an offline top-k teacher ----------------------------------------------------------------

struct TopkRows {
  const LinearTopkParams& p;
  const std::vector<mx::array>& inputs;
  const RowIo& io;
  LtInputs L;
  LtkArgs args;
  mx::Stream s;
  int64_t rows;

  void operator()(const mplan::LdLaunch& l, mx::array& zs, mx::array&) const {
    if (l.kernel == mplan::LdKernel::sum) {
      launch_sum(s, io, rows);
      return;
    }
    const int64_t k = args.topk;
    const bool forward = l.kernel == mplan::LdKernel::rows_forward;
    auto x = gpu::launch(s, [&](int t) {
      return forward ? mplan::ltk_forward_plan(l.rows, args.kd.vocab, t)
                     : mplan::ltk_backward_plan(l.rows, args.kd.vocab, t);
    });
    if (!x) {
      return;
    }
    auto& enc = x.encoder();
    static_assert(FL_LTK_FWD_IDS == FL_LTK_BWD_IDS && FL_LTK_FWD_VALUES == FL_LTK_BWD_VALUES &&
                      FL_LTK_FWD_INDEX == FL_LTK_BWD_INDEX,
                  "the top-k rows' input slots");
    enc.set_input_array(inputs[L.ids], FL_LTK_FWD_IDS, row_offset(l, k * int64_t(sizeof(int64_t))));
    enc.set_input_array(inputs[L.values], FL_LTK_FWD_VALUES, row_offset(l, k * int64_t(sizeof(float))));
    if (p.d.has_targets) {
      enc.set_input_array(inputs[L.targets], FL_LTK_FWD_INDEX, row_offset(l, sizeof(int64_t)));
    } else {
      enc.set_input_array(inputs[L.ids], FL_LTK_FWD_INDEX); // never read
    }
    if (forward) {
      enc.set_input_array(zs, FL_LTK_FWD_LOGITS);
      enc.set_output_array(*io.loss, FL_LTK_FWD_LOSS, row_offset(l, sizeof(float)));
      enc.set_output_array(*io.stats_out, FL_LTK_FWD_STATS, row_offset(l, kStatsBytes));
      enc.set_bytes(args, FL_LTK_FWD_ARGS);
    } else {
      LtkArgs a = args;
      a.kd.unit_cotangent = io.g == nullptr ? 1 : 0;
      enc.set_input_array(*io.stats_in, FL_LTK_BWD_STATS, row_offset(l, kStatsBytes));
      if (io.g) {
        enc.set_input_array(*io.g, FL_LTK_BWD_GLOSS, row_offset(l, sizeof(float)));
      } else {
        enc.set_input_array(*io.stats_in, FL_LTK_BWD_GLOSS); // never read
      }
      enc.set_output_array(zs, FL_LTK_BWD_GRAD); // the logits, overwritten with dZ
      enc.set_bytes(a, FL_LTK_BWD_ARGS);
    }
    x.dispatch();
  }
};

void run_topk(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs,
              const LinearTopkParams& p, mx::Stream s, bool forward, GradOutputs g) {
  const LtInputs L = lt_inputs(p);
  const LinearCrossEntropyParams sp = head_params(p.student, p.chunk_bytes);
  LceCall student = lcehost::make_call(
      inputs, outputs, sp, head_inputs(L.s_hidden, L.s_weight, L.s_scales, L.s_biases, L.s_global), s);
  require_int64(inputs[L.ids], "teacher_ids");
  gpu::require_dense(inputs[L.values], "teacher_logprobs");
  if (inputs[L.values].dtype() != mx::float32) {
    throw std::runtime_error("mlx_fused_losses: teacher_logprobs must reach the kernel as float32");
  }
  if (p.d.has_targets) {
    require_int64(inputs[L.targets], "targets");
  }
  const mplan::LdPlan plan = mplan::ld_plan(student.plan.rows, student.plan.vocab, student.plan.hidden, -1,
                                            p.chunk_bytes, mplan::kLceMaxBufferFlops, student.plan.fwd);
  RowIo io;
  std::optional<mx::array> row_loss;
  if (forward) {
    set_loss_buffers(io, student.buffers, outputs, p.sum_rows, plan.rows, row_loss);
  } else {
    set_backward_inputs(io, inputs);
  }
  const LtkArgs args = mplan::make_ltk_args(plan.student.vocab, inputs[L.ids].shape(-1), p.renormalize,
                                            p.d.has_targets, p.d.has_ignore_index, p.d.ignore_index,
                                            p.d.inv_temperature, p.d.d_scale, p.d.alpha);
  run_chunks(student, nullptr, plan, call_work(forward, p.sum_rows, g), g.dh, g.dw,
             TopkRows{p, inputs, io, L, args, s, plan.rows});
}

} // namespace

void LinearDistill::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  GradOutputs g = forward_grads(params_, requested, outputs);
  run_two_heads(inputs, outputs, params_, stream(), true, g);
}

void LinearDistillVJP::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  GradOutputs g = backward_grads(params_, outputs);
  run_two_heads(inputs, outputs, params_, stream(), false, g);
}

void LinearTopkDistill::eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  GradOutputs g = forward_grads(params_, requested, outputs);
  run_topk(inputs, outputs, params_, stream(), true, g);
}

void LinearTopkDistillVJP::eval_gpu(const std::vector<mx::array>& inputs,
                                    std::vector<mx::array>& outputs) {
  GradOutputs g = backward_grads(params_, outputs);
  run_topk(inputs, outputs, params_, stream(), false, g);
}

} // namespace fl
