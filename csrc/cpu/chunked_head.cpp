// The chunked-head driver (contract: cpu/chunked_head.h).
#include "cpu/chunked_head.h"

#include <algorithm>
#include <atomic>
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

const uint16_t* bf16_rows(const void* matrix, int64_t row0, int64_t ld) {
  return static_cast<const uint16_t*>(matrix) + row0 * ld;
}

// Rows [r0, r0 + n) of hidden as float32 (in place, or converted in parallel;
// not at all for the bf16 GEMM, which reads them in place: null).
const float* hidden_rows(const HeadOperands& h, bool bf16, int64_t r0, int64_t n, float* buffer) {
  const int64_t H = h.hidden_size;
  if (bf16) {
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

// dZ [n, V] float32 as the sum of two bfloat16 matrices, hi = bf16(dZ) and
// lo = bf16(dZ - hi), in place: row i's 4V bytes become hi's row then lo's
// row, so hi and lo are [n, V] bf16 matrices with leading dimension 2V, at
// element offsets 0 and V of the buffer. dZ - hi is exact in float32, so
// hi + lo is dZ to within 2^-17 of each element (2^-9 of 2^-9): the backward
// GEMMs on (hi, lo) see dZ to 16 significant bits rather than bfloat16's 8,
// and a gradient with cancellation (sum_j dZ_j W_j much smaller than
// sum_j |dZ_j W_j|) keeps float32-class accuracy. Each row touches only its
// own bytes (through a row copy): rows run in parallel.
void split_rows_in_place(float* z, int64_t n, int64_t V) {
  parallel_for(n, 1, [&](int64_t b, int64_t e) {
    std::vector<float> row(static_cast<size_t>(V));
    float rest[kChunk];
    for (int64_t i = b; i < e; ++i) {
      std::memcpy(row.data(), z + i * V, sizeof(float) * size_t(V));
      BFloat* hi = reinterpret_cast<BFloat*>(z + i * V);
      BFloat* lo = hi + V;
      for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
        const int m = int(std::min<int64_t>(kChunk, V - c0));
        const float* x = row.data() + c0;
        narrow(x, m, hi + c0);
        for (int j = 0; j < m; ++j) {
          rest[j] = x[j] - to_float(hi[c0 + j]);
        }
        narrow(rest, m, lo + c0);
      }
    }
  });
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
struct HeadBuffers {
  Scratch logits;
  Scratch hidden;
  HeadBuffers(const HeadOperands& h, int64_t rows)
      : logits(rows * h.vocab * 4), hidden(h.hidden_dtype == mx::float32 ? 0 : rows * h.hidden_size * 4) {}
};

// Z [n, V] = H_c W^T, vocabulary tiles of the plan, each thread with its own
// weight tile buffer. x: the chunk's hidden rows as float32 (unused on the
// bf16 GEMM, which reads rows [r0, r0 + n) of the bfloat16 hidden in place,
// in the dense tiles of the plan: no weight is converted).
void logits_gemm(const HeadOperands& h, bool bf16, const LceChunkPlan& plan, int64_t r0, const float* x,
                 int64_t n, float* z, float* tiles, int64_t tile_size) {
  const int64_t H = h.hidden_size, V = h.vocab;
  if (bf16) {
    for_each_tile(tile_count(V, plan.dw_tile), [&](int64_t, int64_t t) {
      const int64_t v0 = t * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
      bf16_gemm(false, true, n, nv, H, bf16_rows(h.hidden, r0, H), H, bf16_rows(h.weight, v0, H), H, 0.0f,
                z + v0, V);
    });
    return;
  }
  for_each_tile(tile_count(V, plan.vocab_tile), [&](int64_t slot, int64_t t) {
    const int64_t v0 = t * plan.vocab_tile, nv = std::min(plan.vocab_tile, V - v0);
    auto [w, ldw] = weight_block(h, {v0, nv, 0, H, H}, tiles + slot * tile_size);
    sgemm(false, true, n, nv, H, x, H, w, ldw, 0.0f, z + v0, V);
  });
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
  HeadBuffers one(head, plan.rows);
  // The second head's buffers (empty without one).
  HeadOperands none;
  const HeadOperands& other = call.second ? *call.second : none;
  HeadBuffers two(other, call.second ? plan.rows : 0);
  // One weight tile per thread, shared by the heads' GEMMs (one at a time).
  const int64_t tile_size = std::max(tile_floats(head, plan), call.second ? tile_floats(other, plan2) : 0);
  Scratch tile_buffer(threads * tile_size * 4);
  float* tiles = tile_buffer.data();
  float* logits = one.logits.data();
  const int64_t row_grain = std::max<int64_t>(1, rows_per_task(V + (call.second ? other.vocab : 0)));
  const int64_t dh_tiles = g.d_hidden ? tile_count(H, plan.hidden_tile) : 0;
  const int64_t dw_tiles = g.d_weight ? tile_count(V, plan.dw_tile) : 0;
  // Decided once per call (set_bf16_gemm_enabled may change between calls).
  const bool bf16 = uses_bf16_gemm(head);
  const bool bf16_two = call.second && uses_bf16_gemm(other);

  for (int64_t r0 = 0; r0 < N; r0 += plan.rows) {
    const int64_t n = std::min(plan.rows, N - r0);
    const float* h = hidden_rows(head, bf16, r0, n, one.hidden.data());
    logits_gemm(head, bf16, plan, r0, h, n, logits, tiles, tile_size); // Z = H_c W^T
    HeadChunk chunk{r0, n, logits, V, nullptr, 0, row_grain};
    if (call.second) {
      const float* h2 = hidden_rows(other, bf16_two, r0, n, two.hidden.data());
      logits_gemm(other, bf16_two, plan2, r0, h2, n, two.logits.data(), tiles, tile_size);
      chunk.z2 = two.logits.data();
      chunk.vocab2 = other.vocab;
    }
    epilogue(chunk);
    if (!g.any()) {
      continue;
    }
    if (g.d_bias) {
      add_column_sums(logits, n, V, g.d_bias);
    }
    if (bf16) {
      // dZ as hi + lo bfloat16 (split_rows_in_place), each GEMM twice (lo
      // added with beta 1); products accumulate in float32. dH tiles take the
      // whole vocabulary in one call per part.
      split_rows_in_place(logits, n, V);
      const uint16_t* dz_hi = reinterpret_cast<const uint16_t*>(logits);
      const uint16_t* dz_lo = dz_hi + V;
      for_each_tile(dh_tiles + dw_tiles, [&](int64_t, int64_t t) {
        if (t < dh_tiles) { // dH_c = dZ W, columns [h0, h0 + nh)
          // Vocabulary tiles added in order: oneDNN's matmul runs a long K
          // (the whole vocabulary) at half the speed of K ~ 4000.
          const int64_t h0 = t * plan.hidden_tile, nh = std::min(plan.hidden_tile, H - h0);
          float* dh = g.d_hidden + r0 * H + h0;
          for (int64_t v0 = 0; v0 < V; v0 += plan.dw_tile) {
            const int64_t nv = std::min(plan.dw_tile, V - v0);
            const uint16_t* w = bf16_rows(head.weight, v0, H) + h0;
            bf16_gemm(false, false, n, nh, nv, dz_hi + v0, 2 * V, w, H, v0 == 0 ? 0.0f : 1.0f, dh, H);
            bf16_gemm(false, false, n, nh, nv, dz_lo + v0, 2 * V, w, H, 1.0f, dh, H);
          }
        } else { // dW += dZ^T H_c, rows [v0, v0 + nv)
          const int64_t v0 = (t - dh_tiles) * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
          const uint16_t* x = bf16_rows(head.hidden, r0, H);
          float* dw = g.d_weight + v0 * H;
          bf16_gemm(true, false, nv, H, n, dz_hi + v0, 2 * V, x, H, r0 == 0 ? 0.0f : 1.0f, dw, H);
          bf16_gemm(true, false, nv, H, n, dz_lo + v0, 2 * V, x, H, 1.0f, dw, H);
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
        for (int64_t v0 = 0; v0 < V; v0 += plan.vocab_tile) {
          const int64_t nv = std::min(plan.vocab_tile, V - v0);
          auto [w, ldw] = weight_block(head, {v0, nv, h0, nh, H}, tile);
          sgemm(false, false, n, nh, nv, logits + v0, V, w, ldw, v0 == 0 ? 0.0f : 1.0f,
                g.d_hidden + r0 * H + h0, H);
        }
      } else { // dW += dZ^T H_c (float32), rows [v0, v0 + nv)
        const int64_t v0 = (t - dh_tiles) * plan.dw_tile, nv = std::min(plan.dw_tile, V - v0);
        sgemm(true, false, nv, H, n, logits + v0, V, h, H, r0 == 0 ? 0.0f : 1.0f, g.d_weight + v0 * H, H);
      }
    });
  }
}

} // namespace fl::cpu
