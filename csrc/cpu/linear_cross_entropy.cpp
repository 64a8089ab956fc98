// CPU kernels of the fused linear cross-entropy (contract and gradient
// derivation: ops/linear_cross_entropy.h).
//
// One call walks the rows in chunks (plan_chunks). Per chunk:
//   1. Z = H_c W^T into the float32 chunk buffer (BLAS; a 16-bit or quantized
//      weight is converted / dequantised tile by tile, never as a whole);
//   2. the epilogue, row-parallel on our pool: bias, soft-cap, max, then the
//      log-sum-exp, loss and statistics (forward) and dZ in place (when
//      gradients are wanted), with the formulas of math/cross_entropy.h;
//   3. dbias += column sums of dZ, dH_c = dZ W, dW += dZ^T H_c (BLAS; dW and
//      dbias accumulate in float32).
// The GEMMs run as tiles of fixed shapes on our pool (single-threaded BLAS
// calls; see for_each_tile), the epilogue row-parallel on the same pool.
#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu/blas.h"
#include "cpu/dispatch.h"
#include "cpu/dtype.h"
#include "cpu/output_buffer.h"
#include "cpu/quantized_head.h"
#include "cpu/row_reduce.h"
#include "math/cross_entropy.h"
#include "math/linear_cross_entropy.h"
#include "mlx/allocator.h"
#include "ops/linear_cross_entropy.h"

namespace fl {

namespace {

// Working memory from MLX's allocator, so that mx.get_peak_memory() accounts
// for it (the memory tests rely on that).
class Scratch {
 public:
  explicit Scratch(int64_t bytes) : data_(mx::allocator::malloc(size_t(std::max<int64_t>(bytes, 4)))) {}
  float* data() {
    return static_cast<float*>(data_.buffer().raw_ptr());
  }

 private:
  mx::allocator::Data data_; // returned to the allocator on destruction
};

struct LceArgs {
  LinearCrossEntropyParams p;
  flm::CeSmoothing smoothing;
  float a_sum; // A = sum_j q_j of every kept row (hard targets, no class weights)
  int64_t rows, hidden, vocab;
  const void* hidden_data;
  mx::Dtype hidden_dtype = mx::float32;
  const void* weight_data; // [V, H] float, or [V, H * bits / 32] uint32 (quantized)
  mx::Dtype weight_dtype = mx::float32;
  const void* scales; // quantized: [V, H / group_size] in scale_dtype (fp modes: uint8)
  const void* qbiases;
  const float* global_scale = nullptr; // nvfp4: float32 [1], or null
  mx::Dtype scale_dtype = mx::float32;
  const int64_t* targets;
  const float* bias; // float32 [V] or null
  // forward outputs
  float* row_loss; // [N]
  float* lse; // log-sum-exp as a float32 pair: lse + lse_lo exactly
  float* lse_lo;
  bool* correct;
  float* entropy;
  // backward input: per-row cotangent (null: 1 for every row)
  const float* g_rows;
  // gradients (null when not wanted)
  float* d_hidden;
  float* d_weight;
  float* d_bias;
};

// ---------------------------------------------------------------------------
// Operands as float32: in place when they already are, else converted.
// These run inside one part of a partitioned phase (one thread): serial.

// A block [rows x cols] of a row-major matrix with leading dimension `ld`.
struct Block {
  int64_t row0, rows, col0, cols, ld;
};

template <typename T>
void convert_block(const T* src, Block b, float* dst) {
  for (int64_t i = 0; i < b.rows; ++i) {
    const T* s = src + (b.row0 + i) * b.ld + b.col0;
    float* d = dst + i * b.cols;
    FL_SIMD
    for (int64_t j = 0; j < b.cols; ++j) {
      d[j] = cpu::to_float(s[j]);
    }
  }
}

// A block of the weight as float32, and its leading dimension: W itself when
// it is a dense float32 matrix, else converted / dequantised into `tile`.
std::pair<const float*, int64_t> weight_block(const LceArgs& a, Block b, float* tile) {
  if (!a.p.quantized() && a.weight_dtype == mx::float32) {
    return {static_cast<const float*>(a.weight_data) + b.row0 * a.hidden + b.col0, a.hidden};
  }
  if (a.p.quantized()) {
    cpu::QuantizedMatrix q;
    q.w_q = static_cast<const uint32_t*>(a.weight_data);
    q.scales = a.scales;
    q.biases = a.qbiases;
    q.global_scale = a.global_scale;
    q.scale_dtype = a.scale_dtype;
    q.mode = a.p.quant_mode;
    q.bits = a.p.bits;
    q.group_size = a.p.group_size;
    q.hidden = a.hidden;
    cpu::dequantize_block(q, b.row0, b.rows, b.col0, b.cols, tile);
  } else {
    cpu::dispatch_float(a.weight_dtype, [&](auto zero) {
      convert_block(static_cast<const decltype(zero)*>(a.weight_data), b, tile);
    });
  }
  return {tile, b.cols};
}

// Rows [r0, r0 + n) of hidden as float32 (in place, or converted in parallel).
const float* hidden_rows(const LceArgs& a, int64_t r0, int64_t n, float* buffer) {
  if (a.hidden_dtype == mx::float32) {
    return static_cast<const float*>(a.hidden_data) + r0 * a.hidden;
  }
  cpu::parallel_for(n, 1, [&](int64_t b, int64_t e) {
    cpu::dispatch_float(a.hidden_dtype, [&](auto zero) {
      convert_block(static_cast<const decltype(zero)*>(a.hidden_data),
                    Block{r0 + b, e - b, 0, a.hidden, a.hidden}, buffer + b * a.hidden);
    });
  });
  return buffer;
}

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

// With ref = lse_ref(m) (the max, or 0 for an all -inf row):
struct RowSums {
  float sum_exp; // s = sum_j exp(z_j - ref)
  float sum_gap; // sum_j (ref - z_j)                 (label smoothing)
  float sum_exp_gap; // sum_j exp(z_j - ref) (z_j - ref)  (entropy)
};

// Partial sums per block of a row: element j of a block goes to lane
// j % kSumLanes. Written out rather than left to an `omp simd` reduction so
// that the order of the additions, hence the rounding, is the same whether the
// compiler vectorizes the loop (16, 8 or 4 lanes) or not: unvectorized (the
// ASan/UBSan build), a block of 2048 was summed in a single float, and on
// peaked rows (1 + 2047 terms each below half an ulp of the sum) the lse came
// out ~140 ulp off, 2.6e-5 in the gradients at V = 4097, where 16 lanes lose
// ~20 ulp (tests/test_linear_cross_entropy.py under .ci/sanitize).
constexpr int kSumLanes = 16;

// One pass over a row whose max is known. Each block of kChunk is summed in
// kSumLanes float lanes, and the lanes and blocks in double, so V = 256k
// loses nothing to the sum.
FLM_INLINE RowSums row_sums(const float* z, int64_t V, float m, bool with_gap) {
  double s = 0.0, gap = 0.0, ent = 0.0;
  float shift = flm::lse_ref(m); // an all -inf row: exp(-inf) = 0, not NaN
  for (int64_t c0 = 0; c0 < V; c0 += cpu::kChunk) {
    const int64_t n = std::min<int64_t>(cpu::kChunk, V - c0);
    const int64_t whole = n - n % kSumLanes;
    const float* x = z + c0;
    float bs[kSumLanes] = {}, bg[kSumLanes] = {}, be[kSumLanes] = {};
    auto add = [&](int64_t j, int lane) FL_LAMBDA_INLINE {
      float d = x[j] - shift;
      float e = flm::exp_nonpos_f32(d);
      bs[lane] += e;
      be[lane] += flm::weighted(e, d);
    };
    for (int64_t j = 0; j < whole; j += kSumLanes) {
      FL_SIMD
      for (int lane = 0; lane < kSumLanes; ++lane) {
        add(j + lane, lane);
      }
    }
    for (int64_t j = whole; j < n; ++j) {
      add(j, int(j - whole));
    }
    if (with_gap) {
      for (int64_t j = 0; j < whole; j += kSumLanes) {
        FL_SIMD
        for (int lane = 0; lane < kSumLanes; ++lane) {
          bg[lane] += shift - x[j + lane];
        }
      }
      for (int64_t j = whole; j < n; ++j) {
        bg[j - whole] += shift - x[j];
      }
    }
    for (int lane = 0; lane < kSumLanes; ++lane) {
      s += bs[lane];
      gap += bg[lane];
      ent += be[lane];
    }
  }
  return {float(s), float(gap), float(ent)};
}

// dZ of one row in place: g ((A + 2 z_loss lse) p - q), times the soft-cap's
// derivative. The target's logit is read before the row is overwritten.
template <bool kCap>
FLM_INLINE void row_gradient(const LceArgs& a, float* z, int64_t t, float lse, float lse_lo, float g) {
  const int64_t V = a.vocab;
  const auto c = a.smoothing;
  const float cap = a.p.logit_softcap;
  float coef = flm::ce_row_softmax_coef(g, 0.0f, a.a_sum, lse, a.p.z_loss);
  float g_other = g * c.c_other;
  float z_t = z[t];
  FL_SIMD
  for (int64_t j = 0; j < V; ++j) {
    float d = flm::ce_grad(z[j], lse, lse_lo, coef, g_other);
    if constexpr (kCap) d *= flm::softcap_grad(z[j], cap);
    z[j] = d;
  }
  float d_t = flm::ce_grad(z_t, lse, lse_lo, coef, g_other + g * c.c_target);
  z[t] = kCap ? d_t * flm::softcap_grad(z_t, cap) : d_t;
}

// Rows [b, e) of the chunk starting at global row r0. Forward: statistics and
// loss (and dZ if gradients are wanted); backward: dZ from the saved lse.
template <bool kBias, bool kCap>
FL_VECTOR_CLONES void epilogue_rows(const LceArgs& a, float* logits, int64_t r0, int64_t b, int64_t e,
                                    bool backward, bool want_dz) {
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
      RowSums sums = row_sums(z, V, m, c.c_other != 0.0f);
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
      a.entropy[r] = flm::log_f32(sums.sum_exp) - sums.sum_exp_gap / sums.sum_exp;
    }
    if (!want_dz) {
      continue;
    }
    if (t < 0) {
      cpu::fill_masked_row(z, int(V), t); // ignored: 0, out of range: NaN
      continue;
    }
    float g = a.g_rows ? a.g_rows[r] : 1.0f;
    row_gradient<kCap>(a, z, t, a.lse[r], a.lse_lo[r], g);
  }
}

using EpilogueFn = void (*)(const LceArgs&, float*, int64_t, int64_t, int64_t, bool, bool);

EpilogueFn pick_epilogue(const LinearCrossEntropyParams& p) {
  bool cap = p.logit_softcap != 0.0f;
  if (p.has_bias) return cap ? epilogue_rows<true, true> : epilogue_rows<true, false>;
  return cap ? epilogue_rows<false, true> : epilogue_rows<false, false>;
}

// dbias[j] += sum_i dZ[i, j], parallel over column blocks.
void add_column_sums(const float* dz, int64_t n, int64_t V, float* d_bias) {
  cpu::parallel_for(V, cpu::kChunk, [&](int64_t b, int64_t e) {
    for (int64_t i = 0; i < n; ++i) {
      const float* row = dz + i * V;
      FL_SIMD
      for (int64_t j = b; j < e; ++j) {
        d_bias[j] += row[j];
      }
    }
  });
}

// The GEMMs run as tiles whose shapes come from the chunk plan alone, never
// from the thread count, each a single-threaded BLAS call writing its own
// block of the output (or, for dH, its own columns, adding the vocabulary
// tiles in order). Whichever thread runs a tile, and however many threads
// there are, every output element is computed by the same BLAS call on the
// same operands: the same bits (tests/test_fuzz.py, FL_NUM_THREADS 1/2/3/7).
// One pool owns the cores (OpenBLAS's own threads, competing with ours and
// with other processes on a loaded machine, cost up to 100x on small calls).
// Threads take tiles from a shared counter in order (larger tiles first where
// the caller puts them first), each with its own weight tile buffer (`slot`).
template <typename Body>
void for_each_tile(int64_t tiles, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t slots = std::min<int64_t>(tiles, cpu::num_threads());
  cpu::parallel_for(slots, 1, [&](int64_t b, int64_t e) {
    cpu::blas_single_thread();
    for (int64_t slot = b; slot < e; ++slot) {
      for (int64_t t = next.fetch_add(1); t < tiles; t = next.fetch_add(1)) {
        body(slot, t);
      }
    }
  });
}

int64_t tile_count(int64_t n, int64_t tile) {
  return (n + tile - 1) / tile;
}

// The whole call: forward (stats, loss, and the gradients for a unit cotangent
// when asked) or backward (gradients from saved statistics).
void run_chunks(const LceArgs& a, bool backward) {
  const int64_t N = a.rows, H = a.hidden, V = a.vocab;
  const int threads = cpu::num_threads();
  bool dense_f32 = !a.p.quantized() && a.weight_dtype == mx::float32;
  const LceChunkPlan plan =
      plan_chunks(N, H, V, a.hidden_dtype == mx::float32, dense_f32, threads, a.p.chunk_bytes);
  bool want_dz = a.p.any_grad();
  if (a.d_bias) {
    std::fill(a.d_bias, a.d_bias + V, 0.0f);
  }
  if (a.d_weight && N == 0) {
    std::fill(a.d_weight, a.d_weight + V * H, 0.0f);
  }
  if (N == 0) {
    return;
  }
  Scratch logits_buffer(plan.rows * V * 4);
  Scratch hidden_buffer(a.hidden_dtype == mx::float32 ? 0 : plan.rows * H * 4);
  // One weight tile per thread (a whole number of cache lines each).
  const int64_t tile_floats = dense_f32 ? 0 : (plan.vocab_tile * H + 15) / 16 * 16;
  Scratch tile_buffer(threads * tile_floats * 4);
  float* logits = logits_buffer.data();
  EpilogueFn epilogue = pick_epilogue(a.p);
  int64_t row_grain = std::max<int64_t>(1, cpu::rows_per_task(V));
  const int64_t vocab_tiles = tile_count(V, plan.vocab_tile);
  const int64_t dh_tiles = a.d_hidden ? tile_count(H, plan.hidden_tile) : 0;
  const int64_t dw_tiles = a.d_weight ? tile_count(V, plan.dw_tile) : 0;

  for (int64_t r0 = 0; r0 < N; r0 += plan.rows) {
    const int64_t n = std::min(plan.rows, N - r0);
    const float* h = hidden_rows(a, r0, n, hidden_buffer.data());
    for_each_tile(vocab_tiles, [&](int64_t slot, int64_t t) { // Z = H_c W^T
      const int64_t v0 = t * plan.vocab_tile, nv = std::min(plan.vocab_tile, V - v0);
      auto [w, ldw] = weight_block(a, {v0, nv, 0, H, H}, tile_buffer.data() + slot * tile_floats);
      cpu::sgemm(false, true, n, nv, H, h, H, w, ldw, 0.0f, logits + v0, V);
    });
    cpu::parallel_for(n, row_grain, [&](int64_t b, int64_t e) {
      epilogue(a, logits, r0, b, e, backward, want_dz);
    });
    if (!want_dz) {
      continue;
    }
    if (a.d_bias) {
      add_column_sums(logits, n, V, a.d_bias);
    }
    // dH tiles first: each is the whole vocabulary for its columns, the
    // largest tiles of the phase.
    for_each_tile(dh_tiles + dw_tiles, [&](int64_t slot, int64_t t) {
      if (t < dh_tiles) { // dH_c = dZ W, columns [h0, h0 + nh)
        const int64_t h0 = t * plan.hidden_tile, nh = std::min(plan.hidden_tile, H - h0);
        float* tile = tile_buffer.data() + slot * tile_floats;
        for (int64_t v0 = 0; v0 < V; v0 += plan.vocab_tile) {
          const int64_t nv = std::min(plan.vocab_tile, V - v0);
          auto [w, ldw] = weight_block(a, {v0, nv, h0, nh, H}, tile);
          cpu::sgemm(false, false, n, nh, nv, logits + v0, V, w, ldw, v0 == 0 ? 0.0f : 1.0f,
                     a.d_hidden + r0 * H + h0, H);
        }
      } else { // dW += dZ^T H_c (float32), rows [v0, v0 + nv)
        const int64_t v0 = (t - dh_tiles) * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
        cpu::sgemm(true, false, nv, H, n, logits + v0, V, h, H, r0 == 0 ? 0.0f : 1.0f,
                   a.d_weight + v0 * H, H);
      }
    });
  }
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
  a.hidden_data = hidden.data<void>();
  a.hidden_dtype = hidden.dtype();
  a.weight_data = weight.data<void>();
  a.weight_dtype = weight.dtype();
  if (p.quantized()) {
    a.scales = inputs[L.scales].data<void>();
    a.qbiases = L.qbiases >= 0 ? inputs[L.qbiases].data<void>() : nullptr; // affine only
    a.scale_dtype = inputs[L.scales].dtype();
    a.global_scale = L.global_scale >= 0 ? inputs[L.global_scale].data<float>() : nullptr;
  }
  a.targets = inputs[L.targets].data<int64_t>();
  a.bias = p.has_bias ? inputs[L.bias].data<float>() : nullptr;
  a.smoothing = flm::ce_smoothing(p.label_smoothing, p.smoothing_mode, int(a.vocab));
  a.a_sum = a.smoothing.c_target + a.smoothing.c_other * float(a.vocab);
  return a;
}

void register_and_run(mx::Stream stream, const std::vector<mx::array>& inputs,
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
  a.d_hidden = grads[0];
  a.d_weight = grads[1];
  a.d_bias = grads[2];
  a.lse = outputs[kLceLse].data<float>();
  a.lse_lo = outputs[kLceLseLo].data<float>();
  a.correct = outputs[kLceCorrect].data<bool>();
  a.entropy = outputs[kLceEntropy].data<float>();
  float* loss_out = outputs[kLceLoss].data<float>();
  bool sum_rows = p.sum_rows;
  register_and_run(stream(), inputs, outputs, [a, loss_out, sum_rows]() mutable {
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
  size_t n = inputs.size(); // ..., lse, lse_lo, g
  a.lse = const_cast<float*>(inputs[n - 3].data<float>());
  a.lse_lo = const_cast<float*>(inputs[n - 2].data<float>());
  a.g_rows = inputs[n - 1].data<float>();
  size_t k = 0; // outputs: those flagged, in the order dH, dW, dbias
  a.d_hidden = params_.grad_hidden ? outputs[k++].data<float>() : nullptr;
  a.d_weight = params_.grad_weight ? outputs[k++].data<float>() : nullptr;
  a.d_bias = params_.grad_bias ? outputs[k++].data<float>() : nullptr;
  register_and_run(stream(), inputs, outputs, [a]() { run_chunks(a, true); });
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
