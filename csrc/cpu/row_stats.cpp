// CPU kernels of the per-row statistics (contract: ops/row_stats.h; formulas
// and gradients: math/row_stats.h).
//   linear form: the chunked-head driver (cpu/chunked_head.h) with the row
//     epilogue below on each chunk of x W^T: forward statistics, or (backward)
//     dL/dy in place of the chunk's logits, from which the driver forms dH,
//     dW and dbias;
//   logits form: the same row functions on each given row, widened to
//     float32 into a per-task row buffer.
// Per row: y (+ bias), soft-cap, times 1 / temperature, and the max in one
// pass; the softmax sums (cpu/row_sums.h, the linear CE's order: its lse bit
// for bit) only when lse or expected is asked; the target's logit read before
// a backward overwrites the row.
#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu/chunked_head.h"
#include "cpu/dispatch.h"
#include "cpu/dtype.h"
#include "cpu/output_buffer.h"
#include "cpu/row_reduce.h"
#include "cpu/row_sums.h"
#include "math/row_stats.h"
#include "mlx/allocator.h"
#include "ops/row_stats.h"

namespace fl {

namespace {

struct RowStatsArgs {
  RowStatsParams p;
  int64_t rows = 0, vocab = 0;
  float cap = 0.0f, temperature = 1.0f, inv_temperature = 1.0f;
  const int64_t* targets = nullptr;
  const float* bias = nullptr;
  // forward outputs (null: not asked)
  float* lse = nullptr;
  float* lse_lo = nullptr;
  float* target = nullptr;
  float* logit_sum = nullptr;
  float* expected = nullptr;
  float* expected_lo = nullptr;
  float* max = nullptr;
  int64_t* argmax = nullptr;
  // backward inputs: saved statistics, cotangents (null: absent)
  const float* saved_lse = nullptr;
  const float* saved_lse_lo = nullptr;
  const float* saved_expected = nullptr;
  const float* saved_expected_lo = nullptr;
  const float* g_lse = nullptr;
  const float* g_target = nullptr;
  const float* g_logit_sum = nullptr;
  const float* g_expected = nullptr;
};

// Row r's class in this head: [0, V), or kIgnoredRow (ignored, another
// shard's, no targets) / kOutOfRangeRow (math/row_stats.h row_stats_class, as
// the Metal kernels).
static_assert(cpu::kIgnoredRow == -1 && cpu::kOutOfRangeRow == -2, "flm::row_stats_class's codes");
FLM_INLINE int64_t local_target(const RowStatsArgs& a, int64_t r) {
  if (!a.targets) {
    return cpu::kIgnoredRow;
  }
  return flm::row_stats_class(a.targets[r], a.vocab, a.p.head.has_ignore_index, a.p.head.ignore_index,
                              a.p.sharded, a.p.vocab_start);
}

// z_j = softcap(y_j + b_j) / T into z (float32; may be y itself); returns the max.
template <typename T, bool kBias, bool kCap>
FLM_INLINE float finish_row(const T* y, float* z, int64_t V, const float* bias, float cap, float inv_t) {
  float m = -flm::kInf;
  FL_SIMD_REDUCE(reduction(max : m))
  for (int64_t j = 0; j < V; ++j) {
    float v = cpu::to_float(y[j]);
    if constexpr (kBias) v += bias[j];
    if constexpr (kCap) v = flm::softcap(v, cap);
    v *= inv_t;
    z[j] = v;
    m = flm::fmax(m, v);
  }
  return m;
}

// The forward statistics of row r from its finished logits z and max m.
FLM_INLINE void forward_row(const RowStatsArgs& a, const float* z, int64_t r, float m) {
  const int64_t V = a.vocab;
  const int stats = a.p.stats;
  if (stats & flm::kStatMax) {
    a.max[r] = m;
  }
  if (stats & flm::kStatArgmax) {
    // The first maximal class, a NaN above every number (mx.argmax;
    // math/cross_entropy.h argmax_key): not the first z == m, which a NaN
    // never equals.
    a.argmax[r] = a.p.vocab_start + cpu::row_argmax(z, V);
  }
  if (flm::row_stats_need_sums(stats)) {
    cpu::RowSums sums = cpu::row_sums(z, V, m, false);
    flm::LseState st = flm::lse_empty();
    st.max = m;
    st.sum = sums.sum_exp;
    flm::CeRow row = flm::ce_finish_row(st, 0.0f, 0.0f, 0.0f);
    a.lse[r] = row.lse;
    a.lse_lo[r] = row.lse_lo;
    if (stats & flm::kStatExpected) {
      flm::FloatPair ex = flm::row_expected(flm::lse_ref(m), sums.sum_exp, sums.sum_exp_gap);
      a.expected[r] = ex.hi;
      a.expected_lo[r] = ex.lo;
    }
  }
  if (stats & flm::kStatTarget) {
    const int64_t t = local_target(a, r);
    a.target[r] = t >= 0 ? z[t] : (t == cpu::kOutOfRangeRow ? flm::kNaN : 0.0f);
  }
  if (stats & flm::kStatLogitSum) {
    a.logit_sum[r] = cpu::row_plain_sum(z, V);
  }
}

// dL/dy of row r into dst (may be z itself) from its finished logits z.
template <typename D, bool kCap>
FLM_INLINE void backward_row(const RowStatsArgs& a, const float* z, D* dst, int64_t r) {
  const int64_t V = a.vocab;
  const int64_t t = local_target(a, r);
  flm::RowStatsCotangent g;
  g.lse = a.g_lse ? a.g_lse[r] : 0.0f;
  g.target = a.g_target ? a.g_target[r] : 0.0f;
  g.logit_sum = a.g_logit_sum ? a.g_logit_sum[r] : 0.0f;
  g.expected = a.g_expected ? a.g_expected[r] : 0.0f;
  if (t == cpu::kOutOfRangeRow && a.g_target) {
    cpu::fill_masked_row(dst, int(V), t); // the NaN target's row: NaN (as the linear CE)
    return;
  }
  const float lse = a.saved_lse ? a.saved_lse[r] : 0.0f;
  const float lse_lo = a.saved_lse_lo ? a.saved_lse_lo[r] : 0.0f;
  flm::FloatPair e;
  e.hi = a.saved_expected ? a.saved_expected[r] : 0.0f;
  e.lo = a.saved_expected_lo ? a.saved_expected_lo[r] : 0.0f;
  const float cap = a.cap, temp = a.temperature, inv_t = a.inv_temperature;
  const float z_t = t >= 0 ? z[t] : 0.0f; // read before dst (maybe z) is written
  if (g.lse != 0.0f || g.expected != 0.0f) {
    FL_SIMD
    for (int64_t j = 0; j < V; ++j) {
      float d = flm::row_stats_grad(z[j], lse, lse_lo, e, g);
      float c = kCap ? flm::row_stats_chain(z[j], cap, temp, inv_t) : inv_t;
      dst[j] = cpu::from_float<D>(d * c);
    }
  } else { // no softmax term: dL/dz_j = g_sum for every j (no exp pass)
    FL_SIMD
    for (int64_t j = 0; j < V; ++j) {
      float c = kCap ? flm::row_stats_chain(z[j], cap, temp, inv_t) : inv_t;
      dst[j] = cpu::from_float<D>(g.logit_sum * c);
    }
  }
  if (t >= 0) {
    float d = g.lse != 0.0f || g.expected != 0.0f ? flm::row_stats_grad(z_t, lse, lse_lo, e, g) : g.logit_sum;
    float c = kCap ? flm::row_stats_chain(z_t, cap, temp, inv_t) : inv_t;
    dst[t] = cpu::from_float<D>((d + g.target) * c);
  }
}

// ---- linear form: the driver's epilogue ---------------------------------------------

// Rows [b, e) of the chunk starting at global row r0, in place.
template <bool kBias, bool kCap>
FL_VECTOR_CLONES void linear_rows(const RowStatsArgs& a, float* logits, int64_t r0, int64_t b, int64_t e,
                                  bool backward) {
  const int64_t V = a.vocab;
  for (int64_t i = b; i < e; ++i) {
    float* z = logits + i * V;
    float m = finish_row<float, kBias, kCap>(z, z, V, a.bias, a.cap, a.inv_temperature);
    if (backward) {
      backward_row<float, kCap>(a, z, z, r0 + i);
    } else {
      forward_row(a, z, r0 + i, m);
    }
  }
}

using LinearRowsFn = void (*)(const RowStatsArgs&, float*, int64_t, int64_t, int64_t, bool);

LinearRowsFn pick_linear_rows(const RowStatsParams& p) {
  bool cap = p.head.logit_softcap != 0.0f;
  if (p.head.has_bias) return cap ? linear_rows<true, true> : linear_rows<true, false>;
  return cap ? linear_rows<false, true> : linear_rows<false, false>;
}

// ---- logits form ----------------------------------------------------------------------

template <typename T, bool kCap>
FL_VECTOR_CLONES void logits_rows(const RowStatsArgs& a, const T* y, T* dy, int64_t b, int64_t e,
                                  float* buf) {
  const int64_t V = a.vocab;
  for (int64_t r = b; r < e; ++r) {
    float m = finish_row<T, false, kCap>(y + r * V, buf, V, nullptr, a.cap, a.inv_temperature);
    if (dy) {
      backward_row<T, kCap>(a, buf, dy + r * V, r);
    } else {
      forward_row(a, buf, r, m);
    }
  }
}

template <typename T>
void run_logits_rows(const RowStatsArgs& a, const void* y, void* dy) {
  const int64_t V = a.vocab;
  auto rows = a.p.head.logit_softcap != 0.0f ? logits_rows<T, true> : logits_rows<T, false>;
  cpu::parallel_for(a.rows, std::max<int64_t>(1, cpu::rows_per_task(V)), [&](int64_t b, int64_t e) {
    std::unique_ptr<float[]> buf(new float[size_t(std::max<int64_t>(V, 1))]);
    rows(a, static_cast<const T*>(y), static_cast<T*>(dy), b, e, buf.get());
  });
}

// ---- arguments ------------------------------------------------------------------------

RowStatsArgs make_args(const RowStatsParams& p, int64_t rows, int64_t vocab) {
  RowStatsArgs a;
  a.p = p;
  a.rows = rows;
  a.vocab = vocab;
  a.cap = p.head.logit_softcap;
  a.temperature = p.temperature;
  a.inv_temperature = 1.0f / p.temperature;
  return a;
}

int64_t row_count(const mx::array& x) {
  int64_t n = 1;
  for (int i = 0; i + 1 < x.ndim(); ++i) n *= x.shape(i);
  return n;
}

// The forward's outputs, allocated, into the args.
void set_outputs(RowStatsArgs& a, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  const int stats = a.p.stats;
  auto at = [&](int bit) { return row_stat_output(stats, bit); };
  if (stats & flm::kStatLse) {
    a.lse = outputs[at(flm::kStatLse)].data<float>();
    a.lse_lo = outputs[at(flm::kStatLse) + 1].data<float>();
  }
  if (stats & flm::kStatTarget) a.target = outputs[at(flm::kStatTarget)].data<float>();
  if (stats & flm::kStatLogitSum) a.logit_sum = outputs[at(flm::kStatLogitSum)].data<float>();
  if (stats & flm::kStatExpected) {
    a.expected = outputs[at(flm::kStatExpected)].data<float>();
    a.expected_lo = outputs[at(flm::kStatExpected) + 1].data<float>();
  }
  if (stats & flm::kStatMax) a.max = outputs[at(flm::kStatMax)].data<float>();
  if (stats & flm::kStatArgmax) a.argmax = outputs[at(flm::kStatArgmax)].data<int64_t>();
}

// The backward's extra inputs (ops/row_stats.h), from position `k`.
void set_backward_inputs(RowStatsArgs& a, const std::vector<mx::array>& inputs, size_t k) {
  const int cot = a.p.cotangents;
  if (cot & (flm::kStatLse | flm::kStatExpected)) {
    a.saved_lse = inputs[k++].data<float>();
    a.saved_lse_lo = inputs[k++].data<float>();
  }
  if (cot & flm::kStatExpected) {
    a.saved_expected = inputs[k++].data<float>();
    a.saved_expected_lo = inputs[k++].data<float>();
  }
  if (cot & flm::kStatLse) a.g_lse = inputs[k++].data<float>();
  if (cot & flm::kStatTarget) a.g_target = inputs[k++].data<float>();
  if (cot & flm::kStatLogitSum) a.g_logit_sum = inputs[k++].data<float>();
  if (cot & flm::kStatExpected) a.g_expected = inputs[k++].data<float>();
}

RowStatsArgs linear_args(const RowStatsParams& p, const std::vector<mx::array>& inputs, cpu::ChunkedHeadCall& call) {
  auto L = linear_row_stats_inputs(p);
  RowStatsArgs a = make_args(p, row_count(inputs[L.hidden]), inputs[L.weight].shape(0));
  a.targets = L.targets >= 0 ? inputs[L.targets].data<int64_t>() : nullptr;
  a.bias = L.bias >= 0 ? inputs[L.bias].data<float>() : nullptr;
  call.rows = a.rows;
  call.head = cpu::head_operands(inputs, L, p.head);
  call.chunk_bytes = p.head.chunk_bytes;
  return a;
}

void run_linear(const RowStatsArgs& a, const cpu::ChunkedHeadCall& call, bool backward) {
  const LinearRowsFn rows = pick_linear_rows(a.p);
  cpu::run_chunked_head(call, [&](const cpu::HeadChunk& c) {
    c.for_rows([&](int64_t b, int64_t e) { rows(a, c.z, c.row0, b, e, backward); });
  });
}

// ---- the backward's rows without a cotangent ---------------------------------------
//
// A row whose every bound cotangent is 0 (a prompt token a preference or RL
// loss masks, an ignored row after log_probs' where) has dH = 0 and adds
// nothing to dW and dbias (math/row_stats.h: a zero cotangent contributes
// exactly 0). Its share of the backward (the logits GEMM, the epilogue, its
// dH rows; its columns of the dW GEMM) is skipped: the live rows' hidden
// rows, targets, saved pairs and cotangents are gathered (O(N H) copies, from
// MLX's allocator), the driver runs on them alone, and their dH rows are
// scattered back, zeros elsewhere. A row whose target is out of range is live
// when the target's cotangent is bound (its gradient row is NaN).

bool row_is_live(const RowStatsArgs& a, int64_t r) {
  // (x != 0 holds for NaN: a NaN cotangent is live)
  return (a.g_lse && a.g_lse[r] != 0.0f) || (a.g_logit_sum && a.g_logit_sum[r] != 0.0f) ||
         (a.g_expected && a.g_expected[r] != 0.0f) ||
         (a.g_target && (a.g_target[r] != 0.0f || local_target(a, r) == cpu::kOutOfRangeRow));
}

// Copies the rows `live` of a [rows, width] array of `bytes` per element.
void gather_rows(const void* src, void* dst, const std::vector<int64_t>& live, int64_t width, size_t bytes) {
  const size_t row_bytes = size_t(width) * bytes;
  for (size_t i = 0; i < live.size(); ++i) {
    std::memcpy(static_cast<char*>(dst) + i * row_bytes, static_cast<const char*>(src) + live[i] * row_bytes,
                row_bytes);
  }
}

void run_linear_backward(RowStatsArgs a, cpu::ChunkedHeadCall call) {
  std::vector<int64_t> live;
  for (int64_t r = 0; r < a.rows; ++r) {
    if (row_is_live(a, r)) live.push_back(r);
  }
  const int64_t n = int64_t(live.size());
  if (n == a.rows) {
    run_linear(a, call, true);
    return;
  }
  const int64_t rows = a.rows, H = call.head.hidden_size;
  float* dh = call.grads.d_hidden;
  // The live rows' per-row inputs, packed: hidden (its dtype), then float32
  // [7][n] (saved pairs, cotangents) and int64 [n] targets.
  const size_t hbytes = mx::size_of(call.head.hidden_dtype);
  mx::allocator::Data buf = mx::allocator::malloc(std::max<size_t>(
      size_t(n) * (size_t(H) * hbytes + 8 * 4 + 8 + (dh ? size_t(H) * 4 : 0)), 8));
  char* at = static_cast<char*>(buf.buffer().raw_ptr());
  auto take = [&](size_t bytes) {
    char* p = at;
    at += (bytes + 7) / 8 * 8;
    return p;
  };
  void* hidden = take(size_t(n) * size_t(H) * hbytes);
  gather_rows(call.head.hidden, hidden, live, H, hbytes);
  call.head.hidden = hidden;
  auto gather_floats = [&](const float*& p) {
    if (p) {
      float* c = reinterpret_cast<float*>(take(size_t(n) * 4));
      gather_rows(p, c, live, 1, 4);
      p = c;
    }
  };
  gather_floats(a.saved_lse);
  gather_floats(a.saved_lse_lo);
  gather_floats(a.saved_expected);
  gather_floats(a.saved_expected_lo);
  gather_floats(a.g_lse);
  gather_floats(a.g_target);
  gather_floats(a.g_logit_sum);
  gather_floats(a.g_expected);
  if (a.targets) {
    int64_t* t = reinterpret_cast<int64_t*>(take(size_t(n) * 8));
    gather_rows(a.targets, t, live, 1, 8);
    a.targets = t;
  }
  float* dh_live = dh ? reinterpret_cast<float*>(take(size_t(n) * size_t(H) * 4)) : nullptr;
  a.rows = n;
  call.rows = n;
  call.grads.d_hidden = dh_live;
  run_linear(a, call, true);
  if (dh) {
    std::fill(dh, dh + rows * H, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      std::memcpy(dh + live[i] * H, dh_live + i * H, size_t(H) * 4);
    }
  }
}

} // namespace

void LinearRowStats::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  cpu::ChunkedHeadCall call;
  RowStatsArgs a = linear_args(params_, inputs, call);
  set_outputs(a, outputs);
  cpu::dispatch_task(stream(), inputs, outputs, [a, call]() { run_linear(a, call, false); });
}

void LinearRowStatsVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    cpu::allocate(out);
  }
  cpu::ChunkedHeadCall call;
  RowStatsArgs a = linear_args(params_, inputs, call);
  set_backward_inputs(a, inputs, size_t(linear_row_stats_inputs(params_).count));
  size_t k = 0; // outputs: those flagged, in the order dH, dW, dbias
  call.grads.d_hidden = params_.head.grad_hidden ? outputs[k++].data<float>() : nullptr;
  call.grads.d_weight = params_.head.grad_weight ? outputs[k++].data<float>() : nullptr;
  call.grads.d_bias = params_.head.grad_bias ? outputs[k++].data<float>() : nullptr;
  cpu::dispatch_task(stream(), inputs, outputs, [a, call]() { run_linear_backward(a, call); });
}

void RowStats::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& logits = inputs[0];
  RowStatsArgs a = make_args(params_, row_count(logits), logits.shape(-1));
  a.targets = params_.has_targets ? inputs[1].data<int64_t>() : nullptr;
  set_outputs(a, outputs);
  const void* y = logits.data<void>();
  const mx::Dtype dtype = logits.dtype();
  cpu::dispatch_task(stream(), inputs, outputs, [a, y, dtype]() {
    cpu::dispatch_float(dtype, [&](auto zero) { run_logits_rows<decltype(zero)>(a, y, nullptr); });
  });
}

void RowStatsVJP::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  const auto& logits = inputs[0];
  auto& out = outputs[0];
  cpu::allocate(out);
  RowStatsArgs a = make_args(params_, row_count(logits), logits.shape(-1));
  a.targets = params_.has_targets ? inputs[1].data<int64_t>() : nullptr;
  set_backward_inputs(a, inputs, params_.has_targets ? 2 : 1);
  const void* y = logits.data<void>();
  void* dy = out.data<void>();
  const mx::Dtype dtype = logits.dtype();
  cpu::dispatch_task(stream(), inputs, outputs, [a, y, dy, dtype]() {
    cpu::dispatch_float(dtype, [&](auto zero) { run_logits_rows<decltype(zero)>(a, y, dy); });
  });
}

} // namespace fl
