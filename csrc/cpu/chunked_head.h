// The chunked-head driver (CPU): everything a loss on the logits of a linear
// head needs except the loss itself. The fused linear cross-entropy, the
// per-row statistics (log-probs, entropy), distillation and the
// vocabulary-parallel statistics are each this driver plus an epilogue.
//
// Contract.
//   A head is hidden [rows, H] (float32 / float16 / bfloat16, row-contiguous)
//   times weight [V, H]^T: a dense float matrix of any of the three dtypes, or a
//   quantized one (every format of math/quantized.h, read through
//   cpu/quantized_head.h one tile at a time, never dequantised whole).
//   run_chunked_head walks the rows in chunks (plan_chunked_head). Per chunk of
//   rows [row0, row0 + n):
//     1. Z = H_c W^T, float32 [n, V] (leading dimension V), into a chunk
//        buffer (BLAS tiles on our pool); with a second head also
//        Z2 = H2_c W2^T [n, V2] into its own buffer (the second head may have
//        another H, dtype or format; it never gets a gradient);
//     2. the epilogue, called once per chunk on the calling thread with a
//        HeadChunk. It may read Z and Z2 freely; it must not write Z2. When
//        the call wants gradients (any of d_hidden / d_weight / d_bias), it
//        must overwrite every element of Z with dL/dZ (dL with respect to the
//        raw x W^T: bias, soft-cap, temperature and the loss are the
//        epilogue's business, so their derivatives are too). HeadChunk::
//        for_rows runs a row-range body on the pool with the driver's grain.
//     3. with gradients: d_bias += column sums of dZ, dH_c = dZ W (written,
//        not accumulated: every row is in exactly one chunk),
//        dW (+)= dZ^T H_c (the first chunk writes, the later ones add), all in
//        float32 whatever the operands' dtypes.
//   Bias, targets, ignore_index, vocab_start (a sharded head's first global
//   class) and every other per-row option belong to the epilogue.
//
// Determinism: every GEMM is a tile whose shape comes from the plan alone, run
// as one single-threaded BLAS call writing its own block of the output (dH:
// its own columns, adding the vocabulary tiles in order), so results are the
// same bits whatever the thread count (tests/test_fuzz.py) provided the
// epilogue's per-row work does not depend on which thread runs it.
//
// Working memory (from MLX's allocator, so mx.get_peak_memory() sees it): the
// chunk buffers, a float32 copy of the hidden rows of a 16-bit hidden, one
// weight tile per thread for a head that is not dense float32
// (plan_chunked_head(...).bytes).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "cpu/parallel.h"
#include "mlx/array.h"
#include "ops/linear_cross_entropy.h"

namespace fl::cpu {

// One linear head and the rows it is applied to.
struct HeadOperands {
  const void* hidden = nullptr; // [rows, H], row-contiguous
  mlx::core::Dtype hidden_dtype = mlx::core::float32;
  int64_t hidden_size = 0; // H
  int64_t vocab = 0; // V
  const void* weight = nullptr; // [V, H] float, or [V, H * bits / 32] uint32 (quantized)
  mlx::core::Dtype weight_dtype = mlx::core::float32;
  // Quantized heads (bits != 0): as mx.quantize returns them.
  int bits = 0;
  int group_size = 0;
  int quant_mode = 0; // flm::kQuant*
  const void* scales = nullptr; // [V, H / group_size]: affine scale_dtype, fp modes uint8
  const void* qbiases = nullptr; // affine only
  const float* global_scale = nullptr; // nvfp4: float32 [1], or null
  mlx::core::Dtype scale_dtype = mlx::core::float32;

  bool quantized() const {
    return bits != 0;
  }
  bool dense_f32() const {
    return !quantized() && weight_dtype == mlx::core::float32;
  }
};

// The head operands of a primitive whose inputs are laid out as lce_inputs(p)
// says (hidden, weight, [scales, [qbiases], [global_scale]], ...), with p's
// quantization parameters.
HeadOperands head_operands(const std::vector<mlx::core::array>& inputs, const LceInputs& where,
                           const LinearCrossEntropyParams& p);

// Gradients of the (first) head, float32; null when not wanted.
struct HeadGrads {
  float* d_hidden = nullptr; // [rows, H]
  float* d_weight = nullptr; // [V, H]
  float* d_bias = nullptr; // [V]
  bool any() const {
    return d_hidden || d_weight || d_bias;
  }
};

// What the epilogue sees of one chunk.
struct HeadChunk {
  int64_t row0; // global index of the chunk's first row
  int64_t rows; // rows in the chunk
  float* z; // [rows, vocab] float32, x W^T of the first head (overwrite with dZ for gradients)
  int64_t vocab;
  const float* z2; // [rows, vocab2] float32, x2 W2^T of the second head, or null
  int64_t vocab2;
  int64_t row_grain; // rows per task of for_rows (from the longer row)
  // Gradient filtering (ChunkedHeadCall::filter), else null: [rows], the
  // epilogue writes every row's threshold with its dZ.
  float* dz_threshold = nullptr;

  // body(b, e) over the chunk's rows [b, e) (chunk-local indices), in
  // parallel on the pool; returns when all are done.
  void for_rows(const std::function<void(int64_t, int64_t)>& body) const {
    parallel_for(rows, row_grain, body);
  }
};

// One call of the driver.
struct ChunkedHeadCall {
  int64_t rows = 0; // N: rows of hidden (and of the second head's hidden)
  HeadOperands head;
  const HeadOperands* second = nullptr; // logits only (no gradient), or null
  HeadGrads grads; // any(): the epilogue writes dZ, the driver forms these
  int64_t chunk_bytes = kLceDefaultChunkBytes;
  // Gradient filtering (Cut Cross-Entropy's filter_eps; with grads only):
  // the epilogue writes a threshold per row (HeadChunk::dz_threshold), and
  // each kLceFilterBlock-column block of a chunk's dZ in which every entry has
  // |dZ_ij| <= threshold_i (a NaN entry never does) is left out of dH and
  // dW: its products are not computed (dW's rows of it gain nothing; the
  // first chunk writes them 0). d_bias still sums every entry.
  bool filter = false;
};

// The chunk plan of a call: plan_chunks (ops/linear_cross_entropy.h) for the
// first head alone. With a second head each head keeps its own tile shapes
// (plan_chunks of its own H, V and dtypes), the rows per chunk are
// clamp(chunk_bytes / (both heads' bytes per row), 1, N), and bytes counts both
// chunks and both heads' weight tiles. `second_plan` (may be null) receives the
// second head's tiles.
LceChunkPlan plan_chunked_head(const ChunkedHeadCall& call, int threads, LceChunkPlan* second_plan);

using ChunkEpilogue = std::function<void(const HeadChunk&)>;

// Runs the whole call (see the contract above). Call it on the primitive's
// task (inside the command encoder's dispatch), never concurrently with itself
// (it uses the shared pool).
void run_chunked_head(const ChunkedHeadCall& call, const ChunkEpilogue& epilogue);

} // namespace fl::cpu

namespace fl::cpu {

// Test hook (_ext.chunked_head_probe): one quantized or dense head given as
// the linear CE's op takes it (scales null: dense).
struct ProbeHead {
  mlx::core::array hidden;
  mlx::core::array weight;
  std::optional<mlx::core::array> scales, biases;
  int group_size = 64;
  int bits = 4;
  std::string mode = "affine";
};

// The driver run now, on evaluated copies of the operands, with an epilogue
// that copies each chunk's Z (and Z2) out and, when dz [N, V] is given,
// writes dz's rows over Z. Returns [z [N, V], z2 [N, V2] (or [0]), and with dz:
// dH, dW, dbias (float32)], plus the number of chunks as a scalar int64.
std::vector<mlx::core::array> chunked_head_probe(const ProbeHead& head, const std::optional<ProbeHead>& second,
                                                 const std::optional<mlx::core::array>& dz,
                                                 int64_t chunk_bytes);

} // namespace fl::cpu
