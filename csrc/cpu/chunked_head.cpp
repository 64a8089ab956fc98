// The chunked-head driver (contract: cpu/chunked_head.h).
#include "cpu/chunked_head.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu/blas.h"
#include "cpu/convert.h"
#include "cpu/dtype.h"
#include "cpu/quantized_head.h"
#include "cpu/vectorize.h"
#include "mlx/allocator.h"

namespace fl::cpu {

namespace mx = mlx::core;

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
      d[j] = to_float(s[j]);
    }
  }
}

// A block of the weight as float32, and its leading dimension: W itself when
// it is a dense float32 matrix, else converted / dequantised into `tile`.
std::pair<const float*, int64_t> weight_block(const HeadOperands& h, Block b, float* tile) {
  if (h.dense_f32()) {
    return {static_cast<const float*>(h.weight) + b.row0 * h.hidden_size + b.col0, h.hidden_size};
  }
  if (h.quantized()) {
    QuantizedMatrix q;
    q.w_q = static_cast<const uint32_t*>(h.weight);
    q.scales = h.scales;
    q.biases = h.qbiases;
    q.global_scale = h.global_scale;
    q.scale_dtype = h.scale_dtype;
    q.mode = h.quant_mode;
    q.bits = h.bits;
    q.group_size = h.group_size;
    q.hidden = h.hidden_size;
    dequantize_block(q, b.row0, b.rows, b.col0, b.cols, tile);
  } else {
    dispatch_float(h.weight_dtype, [&](auto zero) {
      convert_block(static_cast<const decltype(zero)*>(h.weight), b, tile);
    });
  }
  return {tile, b.cols};
}

// Whether a head's GEMMs run on the bf16 GEMM (cpu/blas.h): a dense bfloat16
// weight times bfloat16 hidden rows, on a CPU with bf16 units and the library.
// Both operands are then read in place (no float32 copies), and the backward
// GEMMs take dZ as the sum of two bfloat16 parts (split_rows_in_place).
bool uses_bf16_gemm(const HeadOperands& h) {
  return !h.quantized() && h.weight_dtype == mx::bfloat16 && h.hidden_dtype == mx::bfloat16 &&
         bf16_gemm_available();
}

// Whether a head's logits GEMM runs on the float16 GEMM (cpu/blas.h): a dense
// float16 weight times float16 hidden rows, on a CPU with AVX512-FP16 or
// AMX-FP16 and the library: read in place, in the dense tiles, no weight tile
// widened. Its backward stays on sgemm (oneDNN has no f32 x f16 matmul, and
// dZ as float16 would underflow): the weight is widened once per chunk, for
// dH, instead of twice.
bool uses_f16_gemm(const HeadOperands& h) {
  return !h.quantized() && h.weight_dtype == mx::float16 && h.hidden_dtype == mx::float16 &&
         f16_gemm_available();
}

// Which GEMM a head's logits take.
enum class LogitsGemm { sgemm, bf16, f16 };
LogitsGemm logits_gemm_of(const HeadOperands& h) {
  return uses_bf16_gemm(h) ? LogitsGemm::bf16 : (uses_f16_gemm(h) ? LogitsGemm::f16 : LogitsGemm::sgemm);
}

const uint16_t* bf16_rows(const void* matrix, int64_t row0, int64_t ld) {
  return static_cast<const uint16_t*>(matrix) + row0 * ld;
}

// Rows [r0, r0 + n) of hidden as float32 (in place, or converted in parallel;
// not at all when `skip`: the 16-bit GEMMs read them in place: null).
const float* hidden_rows(const HeadOperands& h, bool skip, int64_t r0, int64_t n, float* buffer) {
  const int64_t H = h.hidden_size;
  if (skip) {
    return nullptr;
  }
  if (h.hidden_dtype == mx::float32) {
    return static_cast<const float*>(h.hidden) + r0 * H;
  }
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    dispatch_float(h.hidden_dtype, [&](auto zero) {
      convert_block(static_cast<const decltype(zero)*>(h.hidden), Block{r0 + b, e - b, 0, H, H},
                    buffer + b * H);
    });
  });
  return buffer;
}

// ---------------------------------------------------------------------------
// The backward GEMMs on the bf16 GEMM: dZ rounded once, its rounding made good.
//
// dH = dZ W and dW = dZ^T H_c need dZ (float32) as bfloat16. Split it as
// dZ = hi + lo, hi = bf16(dZ), lo = dZ - hi (exact in float32, |lo| <= 2^-8
// |dZ|). hi goes through the two GEMMs. lo's part is not a third and fourth
// GEMM (the same FLOPs again); it is made good where it can matter, exactly:
//   dH_i = sum_j hi_ij W_j + sum_{j in L_i} lo_ij W_j + sigma_i m
//          + [sum_{j not in L_i} lo_ij (W_j - m)]                    (dropped)
//   dW_j = sum_i hi_ij X_i + sum_{i: j in L_i} lo_ij X_i + s_j mu
//          + [sum_{i: j not in L_i} lo_ij (X_i - mu)]                (dropped)
// with L_i row i's large entries, |dZ_ij| > 2^-8 sum_j |dZ_ij| (at most 255 a
// row), sigma_i = sum_{j not in L_i} lo_ij (row sums of the small entries),
// s_j = sum_{i: j not in L_i} lo_ij (their column sums, rounded to bf16 as a
// GEMM operand: 2^-8 of a sum of terms below 2^-16 of their rows), m the mean
// weight row and mu the chunk's mean hidden row (rounded to bf16: it is an
// operand). The identities hold for any m and mu; these choices take out
// what makes a gradient cancel:
//  - the common part of the weight rows (sum_j dZ_ij = 0 for every softmax
//    loss, so dH cancels it; a single bf16 rounding of dZ left ~2^-10 of
//    sum_j |dZ_ij W_j|, 19x tests/test_bf16_gemm.py's float32-class bound):
//    the sigma_i m term;
//  - the common part of the hidden rows in dW (a target column's positive
//    and negative entries): s_j mu, as one more K row of the dW GEMM (row n of
//    hi holds bf16(s_j), row n of the hidden copy holds mu);
//  - the few large entries of a row (the target, confident classes: near
//    duplicate rows among them cancel): exactly, through L_i.
// What is dropped is at most 2^-8 sum_{small j} |dZ_ij| |W_j - m| (resp.
// |X_i - mu|), each term below 2^-16 of its row's sum, of random sign: the
// error stays float32-class (tests/test_bf16_gemm.py,
// tests/test_chunked_head.py bound it). Three bf16 GEMMs per chunk, as a
// bf16 training step without the correction.

// Large entries per row: at most 255 exceed 2^-8 of the row's |dZ| sum.
constexpr int64_t kLargeCap = 256;

// The per-chunk lo corrections (rows of the plan at most).
struct LoCorrections {
  Scratch index; // int32 [rows, kLargeCap]
  Scratch value; // float [rows, kLargeCap]: lo
  Scratch count; // int32 [rows]
  Scratch sigma; // float [rows]: sum_j lo_ij
  explicit LoCorrections(int64_t rows)
      : index(rows * kLargeCap * 4), value(rows * kLargeCap * 4), count(rows * 4), sigma(rows * 4) {}
  int32_t* idx(int64_t i) {
    return reinterpret_cast<int32_t*>(index.data()) + i * kLargeCap;
  }
  float* val(int64_t i) {
    return value.data() + i * kLargeCap;
  }
  int32_t& n(int64_t i) {
    return reinterpret_cast<int32_t*>(count.data())[i];
  }
  float& sum(int64_t i) {
    return sigma.data()[i];
  }
};

// dZ [n, V] float32 in place -> hi = bf16(dZ) as an [n, V] bf16 matrix with
// leading dimension 2V (row i's first 2V bytes), row i's large entries (index,
// lo), and the small entries' lo: their sum sigma_i, and bf16(lo) in the row's
// other half (0 for the large ones) for the column sums.
// Each row touches only its own bytes (through a row copy): rows run in
// parallel, the sums in a fixed order.
void split_rows_in_place(float* z, int64_t n, int64_t V, LoCorrections& lo) {
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row(static_cast<size_t>(V));
    float rest[kChunk];
    for (int64_t i = b; i < e; ++i) {
      std::memcpy(row.data(), z + i * V, sizeof(float) * size_t(V));
      float total = 0.0f;
      FL_SIMD_REDUCE(reduction(+ : total))
      for (int64_t j = 0; j < V; ++j) {
        total += std::fabs(row[size_t(j)]);
      }
      const float threshold = total * 0x1p-8f;
      BFloat* hi = reinterpret_cast<BFloat*>(z + i * V);
      BFloat* lo_bf16 = hi + V;
      int32_t* idx = lo.idx(i);
      float* val = lo.val(i);
      int32_t count = 0;
      float sigma = 0.0f;
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int m = int(std::min<int64_t>(kChunk, V - c0));
        const float* x = row.data() + c0;
        narrow(x, m, hi + c0);
        bool any_large = false;
        FL_SIMD_REDUCE(reduction(| : any_large))
        for (int j = 0; j < m; ++j) {
          rest[j] = x[j] - to_float(hi[c0 + j]);
          any_large |= std::fabs(x[j]) > threshold;
        }
        for (int j = 0; any_large && j < m; ++j) { // large entries: corrected alone, exactly
          if (std::fabs(x[j]) > threshold && count < kLargeCap) {
            idx[count] = int32_t(c0 + j);
            val[count] = rest[j];
            rest[j] = 0.0f;
            ++count;
          }
        }
        float block_sum = 0.0f;
        FL_SIMD_REDUCE(reduction(+ : block_sum))
        for (int j = 0; j < m; ++j) {
          block_sum += rest[j];
        }
        sigma += block_sum;
        narrow(rest, m, lo_bf16 + c0);
      }
      lo.n(i) = count;
      lo.sum(i) = sigma;
    }
  });
}

// Row n of the hi matrix (leading dimension 2V): bf16 of the column sums of
// lo (as stored, bf16) over the chunk's n rows; parallel over column blocks,
// rows added in order.
void lo_column_sums(float* z, int64_t n, int64_t V) {
  BFloat* hi = reinterpret_cast<BFloat*>(z);
  parallel_for(V, kChunk, [&](int64_t b, int64_t e) {
    float acc[kChunk];
    for (int64_t c0 = b; c0 < e; c0 += kChunk) {
      const int m = int(std::min<int64_t>(kChunk, e - c0));
      std::fill(acc, acc + m, 0.0f);
      for (int64_t i = 0; i < n; ++i) {
        const BFloat* lo_row = hi + i * 2 * V + V + c0;
        FL_SIMD
        for (int j = 0; j < m; ++j) {
          acc[j] += to_float(lo_row[j]);
        }
      }
      narrow(acc, m, hi + n * 2 * V + c0);
    }
  });
}

// The mean of the rows of a bf16 matrix [rows, cols] (leading dimension
// cols), float32; parallel over fixed column blocks, rows added in order.
void bf16_row_mean(const uint16_t* a, int64_t rows, int64_t cols, float* mean) {
  const BFloat* x = reinterpret_cast<const BFloat*>(a);
  parallel_for(cols, 64, [&](int64_t b, int64_t e) {
    for (int64_t c0 = b; c0 < e; c0 += 64) {
      const int64_t m = std::min<int64_t>(64, e - c0);
      float acc[64] = {};
      for (int64_t i = 0; i < rows; ++i) {
        FL_SIMD
        for (int64_t j = 0; j < m; ++j) {
          acc[j] += to_float(x[i * cols + c0 + j]);
        }
      }
      for (int64_t j = 0; j < m; ++j) {
        mean[c0 + j] = rows ? acc[j] / float(rows) : 0.0f;
      }
    }
  });
}

// out[0, n) += scale * row[0, n) (a bf16 row).
FLM_INLINE void add_scaled_row(float* out, const uint16_t* row, int64_t n, float scale) {
  const BFloat* r = reinterpret_cast<const BFloat*>(row);
  FL_SIMD
  for (int64_t k = 0; k < n; ++k) {
    out[k] += scale * to_float(r[k]);
  }
}

// dbias[j] += sum_i dZ[i, j], parallel over column blocks.
void add_column_sums(const float* dz, int64_t n, int64_t V, float* d_bias) {
  parallel_for(V, kChunk, [&](int64_t b, int64_t e) {
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
  const int64_t slots = std::min<int64_t>(tiles, num_threads());
  parallel_for(slots, 1, [&](int64_t b, int64_t e) {
    blas_single_thread();
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

LceChunkPlan head_plan(const HeadOperands& h, int64_t rows, int threads, int64_t chunk_bytes) {
  return plan_chunks(rows, h.hidden_size, h.vocab, h.hidden_dtype == mx::float32, h.dense_f32(), threads,
                     chunk_bytes);
}

// Floats of one weight tile buffer of a head (a whole number of cache lines;
// 0 where the weight is read in place).
int64_t tile_floats(const HeadOperands& h, const LceChunkPlan& plan) {
  return h.dense_f32() ? 0 : (plan.vocab_tile * h.hidden_size + 15) / 16 * 16;
}

// One head's per-chunk state: its chunk of logits and its hidden copy.
// On the bf16 GEMM with gradients the logits buffer has one more row (the
// column sums of lo, a K row of the dW GEMM) and the hidden buffer holds the
// chunk's bf16 rows and their mean (n + 1 rows of 2H bytes).
struct HeadBuffers {
  Scratch logits;
  Scratch hidden;
  HeadBuffers(const HeadOperands& h, int64_t rows, bool extra_row = false)
      : logits((rows + (extra_row ? 1 : 0)) * h.vocab * 4),
        hidden(h.hidden_dtype == mx::float32 ? 0 : rows * h.hidden_size * 4) {}
};

// Z [n, V] = H_c W^T, vocabulary tiles of the plan, each thread with its own
// weight tile buffer. x: the chunk's hidden rows as float32 (unused on the
// 16-bit GEMMs, which read rows [r0, r0 + n) of the 16-bit hidden in place,
// in the dense tiles of the plan: no weight is converted).
void logits_gemm(const HeadOperands& h, LogitsGemm gemm, const LceChunkPlan& plan, int64_t r0, const float* x,
                 int64_t n, float* z, float* tiles, int64_t tile_size) {
  const int64_t H = h.hidden_size, V = h.vocab;
  if (gemm == LogitsGemm::bf16) {
    for_each_tile(tile_count(V, plan.dw_tile), [&](int64_t, int64_t t) {
      const int64_t v0 = t * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
      bf16_gemm(false, true, n, nv, H, bf16_rows(h.hidden, r0, H), H, bf16_rows(h.weight, v0, H), H, 0.0f,
                z + v0, V);
    });
    return;
  }
  if (gemm == LogitsGemm::f16) {
    // oneDNN 3.2 has a fast f16 kernel only for a dense destination: each
    // tile goes to the thread's tile buffer (tile_size floats), then to Z.
    const int64_t cols = std::max<int64_t>(16, tile_size / std::max<int64_t>(n, 1) / 16 * 16);
    for_each_tile(tile_count(V, cols), [&](int64_t slot, int64_t t) {
      const int64_t v0 = t * cols, nv = std::min(cols, V - v0);
      float* tile = tiles + slot * tile_size;
      half_gemm(HalfType::f16, false, true, n, nv, H, bf16_rows(h.hidden, r0, H), H, bf16_rows(h.weight, v0, H),
                H, 0.0f, tile, nv);
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(z + i * V + v0, tile + i * nv, sizeof(float) * size_t(nv));
      }
    });
    return;
  }
  for_each_tile(tile_count(V, plan.vocab_tile), [&](int64_t slot, int64_t t) {
    const int64_t v0 = t * plan.vocab_tile, nv = std::min(plan.vocab_tile, V - v0);
    auto [w, ldw] = weight_block(h, {v0, nv, 0, H, H}, tiles + slot * tile_size);
    sgemm(false, true, n, nv, H, x, H, w, ldw, 0.0f, z + v0, V);
  });
}

// Gradient filtering (ChunkedHeadCall::filter): live[k] = 1 where column
// block k of the chunk's dZ [n, V] holds an entry above its row's threshold
// (or a NaN: !(|d| <= t)), so that NaN rows still poison the gradients.
void mark_live_blocks(const float* dz, int64_t n, int64_t V, const float* threshold, std::vector<uint8_t>& live) {
  live.assign(size_t(tile_count(V, kLceFilterBlock)), 0);
  parallel_for(int64_t(live.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t c0 = k * kLceFilterBlock, c1 = std::min(V, c0 + kLceFilterBlock);
      int any = 0;
      for (int64_t i = 0; i < n && !any; ++i) {
        const float* row = dz + i * V;
        const float t = threshold[i];
        FL_SIMD_REDUCE(reduction(| : any))
        for (int64_t j = c0; j < c1; ++j) {
          any |= !(std::fabs(row[j]) <= t);
        }
      }
      live[size_t(k)] = uint8_t(any != 0);
    }
  });
}

// body(a, b, kept) over the maximal column ranges [a, b) of [v0, v1) that are
// all kept or all filtered out (one range, kept, when `live` is empty: no
// filtering). The backward GEMMs run on the kept ranges only.
template <typename Body>
void for_column_runs(const std::vector<uint8_t>& live, int64_t v0, int64_t v1, Body&& body) {
  if (live.empty()) {
    body(v0, v1, true);
    return;
  }
  auto kept = [&](int64_t v) { return live[size_t(v / kLceFilterBlock)] != 0; };
  for (int64_t a = v0; a < v1;) {
    const bool k = kept(a);
    int64_t b = std::min(v1, (a / kLceFilterBlock + 1) * kLceFilterBlock);
    while (b < v1 && kept(b) == k) {
      b = std::min(v1, b + kLceFilterBlock);
    }
    body(a, b, k);
    a = b;
  }
}

// Whether column j's block is kept (always, without filtering).
bool column_kept(const std::vector<uint8_t>& live, int64_t j) {
  return live.empty() || live[size_t(j / kLceFilterBlock)] != 0;
}

// Zeroes an [n, cols] block of a row-major matrix (leading dimension ld).
void zero_block(float* dst, int64_t n, int64_t cols, int64_t ld) {
  for (int64_t i = 0; i < n; ++i) {
    std::fill(dst + i * ld, dst + i * ld + cols, 0.0f);
  }
}

} // namespace

HeadOperands head_operands(const std::vector<mx::array>& inputs, const LceInputs& where,
                           const LinearCrossEntropyParams& p) {
  const auto& hidden = inputs[where.hidden];
  const auto& weight = inputs[where.weight];
  HeadOperands h;
  h.hidden = hidden.data<void>();
  h.hidden_dtype = hidden.dtype();
  h.hidden_size = hidden.shape(-1);
  h.vocab = weight.shape(0);
  h.weight = weight.data<void>();
  h.weight_dtype = weight.dtype();
  if (p.quantized()) {
    h.bits = p.bits;
    h.group_size = p.group_size;
    h.quant_mode = p.quant_mode;
    h.scales = inputs[where.scales].data<void>();
    h.qbiases = where.qbiases >= 0 ? inputs[where.qbiases].data<void>() : nullptr; // affine only
    h.scale_dtype = inputs[where.scales].dtype();
    h.global_scale = where.global_scale >= 0 ? inputs[where.global_scale].data<float>() : nullptr;
  }
  return h;
}

LceChunkPlan plan_chunked_head(const ChunkedHeadCall& call, int threads, LceChunkPlan* second_plan) {
  LceChunkPlan plan = head_plan(call.head, call.rows, threads, call.chunk_bytes);
  if (!call.second) {
    return plan;
  }
  LceChunkPlan two = head_plan(*call.second, call.rows, threads, call.chunk_bytes);
  const int64_t per_row = std::max<int64_t>(plan.row_bytes + two.row_bytes, 1);
  plan.rows = std::clamp<int64_t>(call.chunk_bytes / per_row, 1, std::max<int64_t>(call.rows, 1));
  two.rows = plan.rows;
  const int64_t tile_bytes = 4 * std::max(threads, 1) *
                             std::max(tile_floats(call.head, plan), tile_floats(*call.second, two));
  plan.bytes = plan.rows * per_row + tile_bytes;
  if (second_plan) {
    *second_plan = two;
  }
  return plan;
}

void run_chunked_head(const ChunkedHeadCall& call, const ChunkEpilogue& epilogue) {
  const HeadOperands& head = call.head;
  const int64_t N = call.rows, H = head.hidden_size, V = head.vocab;
  const HeadGrads& g = call.grads;
  const int threads = num_threads();
  LceChunkPlan plan2{};
  const LceChunkPlan plan = plan_chunked_head(call, threads, &plan2);
  if (g.d_bias) {
    std::fill(g.d_bias, g.d_bias + V, 0.0f);
  }
  if (g.d_weight && N == 0) {
    std::fill(g.d_weight, g.d_weight + V * H, 0.0f);
  }
  if (N == 0) {
    return;
  }
  // The second head (none: empty buffers).
  HeadOperands none;
  const HeadOperands& other = call.second ? *call.second : none;
  // One weight tile per thread, shared by the heads' GEMMs (one at a time).
  const int64_t tile_size = std::max(tile_floats(head, plan), call.second ? tile_floats(other, plan2) : 0);
  // Decided once per call (set_bf16_gemm_enabled may change between calls).
  // The f16 logits go through the tile buffer 16 columns at least.
  auto choose = [&](const HeadOperands& h) {
    LogitsGemm which = logits_gemm_of(h);
    return which == LogitsGemm::f16 && tile_size < 16 * plan.rows ? LogitsGemm::sgemm : which;
  };
  const LogitsGemm gemm = choose(head);
  const LogitsGemm gemm_two = call.second ? choose(other) : LogitsGemm::sgemm;
  const bool bf16 = gemm == LogitsGemm::bf16;
  // The float32 hidden rows: for sgemm's logits, and for dW but on the bf16 GEMM.
  const bool skip_hidden = bf16 || (gemm == LogitsGemm::f16 && !g.d_weight);
  HeadBuffers one(head, plan.rows, bf16 && g.any());
  HeadBuffers two(other, call.second ? plan.rows : 0);
  Scratch tile_buffer(threads * tile_size * 4);
  float* tiles = tile_buffer.data();
  float* logits = one.logits.data();
  const int64_t row_grain = std::max<int64_t>(1, rows_per_task(V + (call.second ? other.vocab : 0)));
  const int64_t dh_tiles = g.d_hidden ? tile_count(H, plan.hidden_tile) : 0;
  const int64_t dw_tiles = g.d_weight ? tile_count(V, plan.dw_tile) : 0;
  // The bf16 backward's lo corrections (split_rows_in_place) and the mean
  // weight row m.
  LoCorrections lo(bf16 && g.any() ? plan.rows : 0);
  Scratch mean_w(bf16 && g.d_hidden ? H * 4 : 0);
  Scratch mean_x(bf16 && g.d_weight ? H * 4 : 0);
  if (bf16 && g.d_hidden) {
    bf16_row_mean(bf16_rows(head.weight, 0, H), V, H, mean_w.data());
  }
  // Gradient filtering: each row's threshold (from the epilogue) and the
  // chunk's kept column blocks (empty: no filtering).
  const bool filter = call.filter && g.any();
  std::vector<float> dz_threshold(filter ? size_t(plan.rows) : 0);
  std::vector<uint8_t> live;

  for (int64_t r0 = 0; r0 < N; r0 += plan.rows) {
    const int64_t n = std::min(plan.rows, N - r0);
    const float* h = hidden_rows(head, skip_hidden, r0, n, one.hidden.data());
    logits_gemm(head, gemm, plan, r0, h, n, logits, tiles, tile_size); // Z = H_c W^T
    HeadChunk chunk{r0, n, logits, V, nullptr, 0, row_grain, filter ? dz_threshold.data() : nullptr};
    if (call.second) {
      const float* h2 = hidden_rows(other, gemm_two != LogitsGemm::sgemm, r0, n, two.hidden.data());
      logits_gemm(other, gemm_two, plan2, r0, h2, n, two.logits.data(), tiles, tile_size);
      chunk.z2 = two.logits.data();
      chunk.vocab2 = other.vocab;
    }
    epilogue(chunk);
    if (!g.any()) {
      continue;
    }
    if (filter) {
      mark_live_blocks(logits, n, V, dz_threshold.data(), live);
    }
    if (g.d_bias) {
      add_column_sums(logits, n, V, g.d_bias);
    }
    if (bf16) {
      // dZ = hi + lo: hi through the GEMMs, lo made good around them (see
      // split_rows_in_place).
      split_rows_in_place(logits, n, V, lo);
      const uint16_t* dz_hi = reinterpret_cast<const uint16_t*>(logits);
      uint16_t* x = nullptr; // the chunk's hidden rows and their mean mu (row n)
      if (g.d_weight) {
        lo_column_sums(logits, n, V);
        x = reinterpret_cast<uint16_t*>(one.hidden.data());
        std::memcpy(x, bf16_rows(head.hidden, r0, H), size_t(n * H) * 2);
        bf16_row_mean(x, n, H, mean_x.data());
        BFloat* mu_row = reinterpret_cast<BFloat*>(x + n * H);
        narrow(mean_x.data(), int(H), mu_row);
      }
      const float* m = mean_w.data();
      for_each_tile(dh_tiles + dw_tiles, [&](int64_t, int64_t t) {
        if (t < dh_tiles) { // dH_c = dZ W, columns [h0, h0 + nh)
          // Vocabulary tiles added in order: oneDNN's matmul runs a long K
          // (the whole vocabulary) at half the speed of K ~ 4000.
          const int64_t h0 = t * plan.hidden_tile, nh = std::min(plan.hidden_tile, H - h0);
          float* dh = g.d_hidden + r0 * H + h0;
          bool first = true;
          for (int64_t v0 = 0; v0 < V; v0 += plan.dw_tile) {
            const int64_t nv = std::min(plan.dw_tile, V - v0);
            for_column_runs(live, v0, v0 + nv, [&](int64_t a, int64_t b, bool kept) {
              if (!kept) return; // filtered out
              const uint16_t* w = bf16_rows(head.weight, a, H) + h0;
              bf16_gemm(false, false, n, nh, b - a, dz_hi + a, 2 * V, w, H, first ? 0.0f : 1.0f, dh, H);
              first = false;
            });
          }
          if (first) zero_block(dh, n, nh, H); // every block filtered out
          for (int64_t i = 0; i < n; ++i) { // + sigma_i m + sum_{L_i} lo_ij W_j
            float* out = dh + i * H;
            const float sigma = lo.sum(i);
            FL_SIMD
            for (int64_t k = 0; k < nh; ++k) {
              out[k] += sigma * m[h0 + k];
            }
            const int32_t* idx = lo.idx(i);
            const float* val = lo.val(i);
            for (int32_t c = 0; c < lo.n(i); ++c) {
              if (column_kept(live, idx[c])) {
                add_scaled_row(out, bf16_rows(head.weight, idx[c], H) + h0, nh, val[c]);
              }
            }
          }
        } else { // dW += dZ^T H_c, rows [v0, v0 + nv): K = n + 1 (the s_j mu row)
          const int64_t v0 = (t - dh_tiles) * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
          for_column_runs(live, v0, v0 + nv, [&](int64_t a, int64_t b, bool kept) {
            float* dw = g.d_weight + a * H;
            if (kept) {
              bf16_gemm(true, false, b - a, H, n + 1, dz_hi + a, 2 * V, x, H, r0 == 0 ? 0.0f : 1.0f, dw, H);
            } else if (r0 == 0) {
              zero_block(dw, b - a, H, H); // filtered out
            }
          });
          for (int64_t i = 0; i < n; ++i) { // + sum_{i: j in L_i} lo_ij X_i
            const int32_t* idx = lo.idx(i);
            const float* val = lo.val(i);
            for (int32_t c = 0; c < lo.n(i); ++c) {
              if (idx[c] >= v0 && idx[c] < v0 + nv && column_kept(live, idx[c])) {
                add_scaled_row(g.d_weight + int64_t(idx[c]) * H, x + i * H, H, val[c]);
              }
            }
          }
        }
      });
      continue;
    }
    // dH tiles first: each is the whole vocabulary for its columns, the
    // largest tiles of the phase.
    for_each_tile(dh_tiles + dw_tiles, [&](int64_t slot, int64_t t) {
      if (t < dh_tiles) { // dH_c = dZ W, columns [h0, h0 + nh)
        const int64_t h0 = t * plan.hidden_tile, nh = std::min(plan.hidden_tile, H - h0);
        float* tile = tiles + slot * tile_size;
        float* dh = g.d_hidden + r0 * H + h0;
        bool first = true;
        for (int64_t v0 = 0; v0 < V; v0 += plan.vocab_tile) {
          const int64_t nv = std::min(plan.vocab_tile, V - v0);
          // (filtered: only the kept rows of the weight are converted)
          for_column_runs(live, v0, v0 + nv, [&](int64_t a, int64_t b, bool kept) {
            if (!kept) return;
            auto [w, ldw] = weight_block(head, {a, b - a, h0, nh, H}, tile);
            sgemm(false, false, n, nh, b - a, logits + a, V, w, ldw, first ? 0.0f : 1.0f, dh, H);
            first = false;
          });
        }
        if (first) zero_block(dh, n, nh, H); // every block filtered out
      } else { // dW += dZ^T H_c (float32), rows [v0, v0 + nv)
        const int64_t v0 = (t - dh_tiles) * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
        for_column_runs(live, v0, v0 + nv, [&](int64_t a, int64_t b, bool kept) {
          if (kept) {
            sgemm(true, false, b - a, H, n, logits + a, V, h, H, r0 == 0 ? 0.0f : 1.0f, g.d_weight + a * H, H);
          } else if (r0 == 0) {
            zero_block(g.d_weight + a * H, b - a, H, H);
          }
        });
      }
    });
  }
}

} // namespace fl::cpu
