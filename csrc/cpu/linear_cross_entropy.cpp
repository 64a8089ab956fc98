// CPU kernels of the fused linear cross-entropy (contract and gradient
// derivation: ops/linear_cross_entropy.h): the chunked-head driver
// (cpu/chunked_head.h: per chunk Z = H_c W^T, then dH, dW, dbias from dZ) with
// the cross-entropy epilogue below, row-parallel on our pool: bias, soft-cap,
// max, then the log-sum-exp, loss and statistics (forward) and dZ in place
// (when gradients are wanted), with the formulas of math/cross_entropy.h.
#include <algorithm>
#include <vector>

#include "cpu/chunked_head.h"
#include "cpu/dispatch.h"
#include "cpu/dtype.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"
#include "cpu/row_sums.h"
#include "math/cross_entropy.h"
#include "math/linear_cross_entropy.h"
#include "ops/linear_cross_entropy.h"

namespace fl {

namespace {

struct LceArgs {
  LinearCrossEntropyParams p;
  flm::CeSmoothing smoothing;
  float a_sum; // A = sum_j q_j of every kept row (hard targets, no class weights)
  int64_t rows, hidden, vocab;
  cpu::HeadOperands head; // hidden and weight, as the driver reads them
  const int64_t* targets;
  const float* bias; // float32 [V] or null
  // forward outputs
  float* row_loss; // [N]
  float* lse; // log-sum-exp as a float32 pair: lse + lse_lo exactly
  float* lse_lo;
  bool* correct;
  float* entropy;
  int64_t* argmax;
  float* target_logit;
  // backward input: per-row cotangent (null: 1 for every row), and the lse's
  // (null: 0; lse_grad)
  const float* g_rows;
  const float* g_lse;
  // gradients (null when not wanted): formed by the driver from dZ
  cpu::HeadGrads grads;
};

// ---------------------------------------------------------------------------
// The epilogue: one row of logits, in the chunk buffer.

// Bias and soft-cap applied in place; returns the row's max.
template <bool kBias, bool kCap>
FLM_INLINE float finish_logits(float* z, int64_t V, const float* bias, float cap) {
  float m = -flm::kInf;
  if constexpr (kBias || kCap) {
    FL_SIMD_REDUCE(reduction(max : m))
    for (int64_t j = 0; j < V; ++j) {
      float v = z[j];
      if constexpr (kBias) v += bias[j];
      if constexpr (kCap) v = flm::softcap(v, cap);
      z[j] = v;
      m = flm::fmax(m, v);
    }
  } else {
    FL_SIMD_REDUCE(reduction(max : m))
    for (int64_t j = 0; j < V; ++j) {
      m = flm::fmax(m, z[j]);
    }
  }
  return m;
}

// dZ of one row in place: g ((A + 2 z_loss lse) p - q) + g_lse p, times the
// soft-cap's derivative. The target's logit is read before the row is
// overwritten. t < 0 (an ignored row, lse_grad): only the lse's term, g_lse p.
template <bool kCap>
FLM_INLINE void row_gradient(const LceArgs& a, float* z, int64_t t, float lse, float lse_lo, float g,
                             float g_lse) {
  const int64_t V = a.vocab;
  const auto c = a.smoothing;
  const float cap = a.p.logit_softcap;
  float coef = t < 0 ? g_lse : flm::ce_row_softmax_coef(g, g_lse, a.a_sum, lse, a.p.z_loss);
  float g_other = t < 0 ? 0.0f : g * c.c_other;
  float z_t = t < 0 ? 0.0f : z[t];
  FL_SIMD
  for (int64_t j = 0; j < V; ++j) {
    float d = flm::ce_grad(z[j], lse, lse_lo, coef, g_other);
    if constexpr (kCap) d *= flm::softcap_grad(z[j], cap);
    z[j] = d;
  }
  if (t < 0) {
    return;
  }
  float d_t = flm::ce_grad(z_t, lse, lse_lo, coef, g_other + g * c.c_target);
  z[t] = kCap ? d_t * flm::softcap_grad(z_t, cap) : d_t;
}

// Rows [b, e) of the chunk starting at global row r0. Forward: statistics and
// loss (and dZ if gradients are wanted); backward: dZ from the saved lse.
// dz_threshold (chunk-local, null without filtering): each row's
// filter_eps |g|, below which its dZ entries may be left out of dH and dW.
template <bool kBias, bool kCap>
FL_VECTOR_CLONES void epilogue_rows(const LceArgs& a, float* logits, int64_t r0, int64_t b, int64_t e,
                                    bool backward, bool want_dz, float* dz_threshold) {
  const int64_t V = a.vocab;
  const auto c = a.smoothing;
  for (int64_t i = b; i < e; ++i) {
    const int64_t r = r0 + i;
    float* z = logits + i * V;
    int64_t t = cpu::checked_class(a.targets[r], int(V), a.p.has_ignore_index, a.p.ignore_index);
    float m = finish_logits<kBias, kCap>(z, V, a.bias, a.p.logit_softcap);
    if (!backward) {
      // The whole row is at hand: one state relative to its final max
      // (math/cross_entropy.h), no rescaling needed.
      cpu::RowSums sums = cpu::row_sums(z, V, m, c.c_other != 0.0f);
      flm::CeState st = flm::ce_state_empty();
      st.lse = {m, sums.sum_exp};
      st.all = {float(V), sums.sum_gap};
      flm::CeRow row = t < 0 ? flm::ce_masked_row(t == cpu::kOutOfRangeRow)
                             : flm::ce_finish_hard(st, c, 1.0f, z[t], a.p.z_loss);
      flm::CeRow stats = flm::ce_finish_row(st.lse, 0.0f, 0.0f, 0.0f); // lse of any row
      a.row_loss[r] = row.loss;
      a.lse[r] = stats.lse;
      a.lse_lo[r] = stats.lse_lo;
      a.correct[r] = t >= 0 && z[t] == m;
      a.argmax[r] = cpu::row_argmax(z, V);
      a.target_logit[r] = t >= 0 ? z[t] : 0.0f;
      a.entropy[r] = flm::log_f32(sums.sum_exp) - sums.sum_exp_gap / sums.sum_exp;
    }
    if (!want_dz) {
      continue;
    }
    const float g = a.g_rows ? a.g_rows[r] : 1.0f;
    const float g_lse = a.g_lse ? a.g_lse[r] : 0.0f;
    if (dz_threshold) {
      // Every entry is at most |g| + |g_lse| times |p_j - q_j|-like terms.
      // (An ignored row's dZ is 0: never kept; a NaN row always is.)
      dz_threshold[i] = a.p.filter_eps * (flm::fabs(g) + flm::fabs(g_lse));
    }
    if (t < 0 && !(t != cpu::kOutOfRangeRow && g_lse != 0.0f)) {
      cpu::fill_masked_row(z, int(V), t); // ignored: 0, out of range: NaN
      continue;
    }
    row_gradient<kCap>(a, z, t, a.lse[r], a.lse_lo[r], g, g_lse);
  }
}

using EpilogueFn = void (*)(const LceArgs&, float*, int64_t, int64_t, int64_t, bool, bool, float*);

EpilogueFn pick_epilogue(const LinearCrossEntropyParams& p) {
  bool cap = p.logit_softcap != 0.0f;
  if (p.has_bias) return cap ? epilogue_rows<true, true> : epilogue_rows<true, false>;
  return cap ? epilogue_rows<false, true> : epilogue_rows<false, false>;
}

// The whole call: forward (stats, loss, and the gradients for a unit cotangent
// when asked) or backward (gradients from saved statistics): the driver with
// this epilogue.
void run_chunks(const LceArgs& a, bool backward) {
  cpu::ChunkedHeadCall call;
  call.rows = a.rows;
  call.head = a.head;
  call.grads = a.grads;
  call.chunk_bytes = a.p.chunk_bytes;
  call.filter = a.p.filter_eps > 0.0f;
  const bool want_dz = a.grads.any();
  const EpilogueFn epilogue = pick_epilogue(a.p);
  cpu::run_chunked_head(call, [&](const cpu::HeadChunk& c) {
    c.for_rows([&](int64_t b, int64_t e) {
      epilogue(a, c.z, c.row0, b, e, backward, want_dz, c.dz_threshold);
    });
  });
}

LceArgs make_args(const std::vector<mx::array>& inputs, const LinearCrossEntropyParams& p) {
  auto L = lce_inputs(p);
  const auto& hidden = inputs[L.hidden];
  const auto& weight = inputs[L.weight];
  LceArgs a{};
  a.p = p;
  a.hidden = hidden.shape(-1);
  a.rows = a.hidden ? hidden.size() / a.hidden : 0;
  if (a.hidden == 0) {
    // H = 0: the logits are all 0 (+ bias); count the rows from the targets.
    a.rows = inputs[L.targets].size();
  }
  a.vocab = weight.shape(0);
  a.head = cpu::head_operands(inputs, L, p);
  a.targets = inputs[L.targets].data<int64_t>();
  a.bias = p.has_bias ? inputs[L.bias].data<float>() : nullptr;
  a.smoothing = flm::ce_smoothing(p.label_smoothing, p.smoothing_mode, int(a.vocab));
  a.a_sum = a.smoothing.c_target + a.smoothing.c_other * float(a.vocab);
  return a;
}

} // namespace

void LinearCrossEntropy::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  // Declared gradient outputs that no vjp asked for are never read: they get
  // no memory and no work.
  for (int k = 0; k < kLceNumStats; ++k) {
    cpu::allocate(outputs[k]);
  }
  auto p = params_;
  float* grads[3] = {nullptr, nullptr, nullptr};
  const bool declared[3] = {p.grad_hidden, p.grad_weight, p.grad_bias};
  size_t next = kLceNumStats;
  for (int which = 0; which < 3; ++which) {
    if (!declared[which]) continue;
    auto& out = outputs[next++];
    if (requested[which]) {
      cpu::allocate(out);
      grads[which] = out.data<float>();
    }
  }
  p.grad_hidden = grads[0] != nullptr;
  p.grad_weight = grads[1] != nullptr;
  p.grad_bias = grads[2] != nullptr;
  LceArgs a = make_args(inputs, p);
  a.grads = {grads[0], grads[1], grads[2]};
  a.lse = outputs[kLceLse].data<float>();
  a.lse_lo = outputs[kLceLseLo].data<float>();
  a.correct = outputs[kLceCorrect].data<bool>();
  a.entropy = outputs[kLceEntropy].data<float>();
  a.argmax = outputs[kLceArgmax].data<int64_t>();
  a.target_logit = outputs[kLceTargetLogit].data<float>();
  float* loss_out = outputs[kLceLoss].data<float>();
  bool sum_rows = p.sum_rows;
  cpu::dispatch_task(stream(), inputs, outputs, [a, loss_out, sum_rows]() mutable {
    // The summed loss needs the per-row values first (O(N)), added in a
    // fixed order in double: the result does not depend on the thread count.
    std::vector<float> per_row(sum_rows ? size_t(a.rows) : 0);
    a.row_loss = sum_rows ? per_row.data() : loss_out;
    run_chunks(a, false);
    if (sum_rows) {
      double total = 0.0;
      for (float v : per_row) {
        total += v;
      }
      *loss_out = float(total);
    }
  });
}

void LinearCrossEntropyVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  LceArgs a = make_args(inputs, params_);
  size_t n = inputs.size(); // ..., lse, lse_lo, g (lse_grad: [2, N], then the lse's)
  a.lse = const_cast<float*>(inputs[n - 3].data<float>());
  a.lse_lo = const_cast<float*>(inputs[n - 2].data<float>());
  a.g_rows = inputs[n - 1].data<float>();
  a.g_lse = params_.lse_grad ? a.g_rows + a.rows : nullptr;
  size_t k = 0; // outputs: those flagged, in the order dH, dW, dbias
  a.grads.d_hidden = params_.grad_hidden ? outputs[k++].data<float>() : nullptr;
  a.grads.d_weight = params_.grad_weight ? outputs[k++].data<float>() : nullptr;
  a.grads.d_bias = params_.grad_bias ? outputs[k++].data<float>() : nullptr;
  cpu::dispatch_task(stream(), inputs, outputs, [a]() { run_chunks(a, true); });
}

} // namespace fl

namespace fl {

void LceScaleGrad::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& grad = inputs[1];
  auto& out = outputs[0];
  // float32: scale the forward's gradient output where it is (no second
  // [V, H] copy) if nothing else reads it; element i from element i only.
  cpu::allocate_or_reuse(out, grad, stream());
  const float* g = inputs[0].data<float>();
  const float* src = grad.data<float>();
  void* dst = out.data<void>();
  mx::Dtype dtype = out.dtype();
  cpu::dispatch_parallel(stream(), inputs, outputs, out.size(), cpu::kMinElementsPerTask,
                         [g, src, dst, dtype](int64_t b, int64_t e) {
                           // A unit cotangent on the gradient's own buffer (a
                           // loss differentiated as is, its mean folded into
                           // the kernel, e.g. kl_div's row scale): nothing to do.
                           if (*g == 1.0f && dst == static_cast<const void*>(src)) {
                             return;
                           }
                           cpu::dispatch_float(dtype, [&](auto zero) {
                             using T = decltype(zero);
                             T* d = static_cast<T*>(dst);
                             float scale = *g;
                             for (int64_t i = b; i < e; ++i) {
                               d[i] = cpu::from_float<T>(scale * src[i]);
                             }
                           });
                         });
}

} // namespace fl
