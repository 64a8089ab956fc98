// Fused linear cross-entropy: the loss of cross_entropy(hidden @ weight.T + bias,
// targets) without the N x V logits ever existing.
//
// Contract.
//   hidden  [..., H]  float32/float16/bfloat16, row-contiguous (N rows)
//   weight  [V, H]    float (any of the three), or a quantized matrix
//                     w_q [V, H * bits / 32] uint32 with scales (and, in
//                     affine mode, biases) [V, H / group_size] exactly as
//                     mx.quantize returns them: every mode, bits and group
//                     size of mlx 0.32.4 (math/quantized.h)
//   targets [...]     int64 class indices (hidden's shape without H)
//   bias    [V]       optional, float
// The kernel walks the rows in chunks: a chunk's logits [rows, V] (float32) are
// one BLAS GEMM, the epilogue (bias, soft-cap, log-sum-exp, loss, statistics and,
// when gradients are wanted, dZ in place) runs on them, and the chunk buffer is
// reused. Working memory is plan_chunks(...).bytes, bounded by chunk_bytes.
//
// Gradients. With Z the (capped) logits, P = softmax(Z) and Q the smoothed
// one-hot target, row r's loss is sum_j q_j (lse_r - z_rj) + z_loss lse_r^2, so
//     dZ_r = g_r ((A + 2 z_loss lse_r) p_r - q_r)       A = sum_j q_j
//     (times 1 - (z / c)^2 under a soft-cap c, see math/linear_cross_entropy.h)
//     dH = dZ W,   dW = dZ^T H,   dbias = sum_r dZ_r.
// Two ways to get them:
//  - When the loss is summed over rows (reduction "sum"/"mean": one scalar
//    cotangent g) and inputs are traced, the forward primitive declares
//    gradient outputs for them. If its vjp is called before it is evaluated
//    (the usual value_and_grad: the whole graph is built first), the vjp marks
//    it, and its evaluation forms dH, dW, dbias for g = 1 from the logits it
//    already has (3 GEMMs per step instead of 4); the vjp multiplies them by g.
//    Unmarked (a compiled or vmapped loss without gradient), the declared
//    outputs are never computed nor allocated.
//  - Otherwise (reduction "none": one cotangent per row, which cannot be
//    factored out of dW; or a forward already evaluated) the backward
//    primitive recomputes each chunk's logits, takes p from the saved per-row
//    lse (a float32 pair, see math/cross_entropy.h) and applies each row's g_r.
// Both accumulate dW in float32 whatever the input dtype. A quantized weight
// has no gradient (asking for it raises); only hidden's (and bias's).
#pragma once

#include <array>

#include "ops/common.h"

namespace fl {

// Default working-memory budget of one call's chunk (logits + hidden copy), by
// the device the call runs on (lce_default_chunk_bytes): the chunk rule itself
// (rows = chunk_bytes / bytes per row) is the same everywhere.
//  - CPU: 64 MiB.
//  - GPU (Metal): 512 MiB. A Metal chunk's dH GEMM has ceil(H / 64) ceil(R / 64)
//    groups and dW (float32) is read and written once per chunk: at 64 MiB and
//    V = 151936 (R = 64 rows) the model (docs/metal_linear_cross_entropy.md,
//    python -m tools.metal_lce_model) puts a training step at 1.4-3.5x mlx-lm's
//    unfused step on M1-M2 Ultra; at 512 MiB R = 832 (the command-buffer work
//    bound caps it; 505 MB of float32 logits) and 1.05x. Still O(chunk): the
//    unfused step holds N x V bfloat16 logits (2.5 GB at N = 8192).
constexpr int64_t kLceDefaultChunkBytes = int64_t(64) << 20;
constexpr int64_t kLceGpuDefaultChunkBytes = int64_t(512) << 20;
inline int64_t lce_default_chunk_bytes(const mx::Device& device) {
  return device.type == mx::Device::gpu ? kLceGpuDefaultChunkBytes : kLceDefaultChunkBytes;
}
// Weight rows converted (16-bit) or dequantised (quantized) per GEMM tile, as
// float32 bytes: one such tile per thread, on top of the chunk.
constexpr int64_t kLceWeightTileBytes = int64_t(2) << 20;
// Where nothing is converted (a dense float32 weight read in place; dW +=
// dZ^T H): at most this many float32 bytes of weight (or dW) rows per GEMM,
// and at least kLceMinDenseTiles tiles so that that many threads share a
// GEMM. Each tile costs OpenBLAS a repacking of the hidden chunk: at (524
// rows, H 1024, V 32000), single-threaded CPU time over one GEMM for the
// whole vocabulary, tiles of 512 / 2048 / 4096 rows: +8% / +4% / +1% (logits),
// +6% / +1% (dW at 2048 / 4096).
constexpr int64_t kLceDenseTileBytes = int64_t(16) << 20;
constexpr int64_t kLceMinDenseTiles = 8;
// Columns of dH per GEMM: a multiple of every quantization group size (the
// weight's column blocks start on group boundaries).
constexpr int64_t kLceHiddenTile = 512;
// Gradient filtering (filter_eps) on the CPU: columns per block, blocks start
// at multiples of it. A block is kept for one entry above the threshold in
// any row of the chunk, so smaller blocks drop more, but cut the backward
// GEMMs into more, shorter calls.
constexpr int64_t kLceFilterBlock = 256;

struct LinearCrossEntropyParams {
  float label_smoothing = 0.0f;
  int smoothing_mode = 0; // flm::kSmoothUniform | flm::kSmoothOthers
  bool has_ignore_index = false;
  int64_t ignore_index = -100;
  float z_loss = 0.0f;
  float logit_softcap = 0.0f; // 0: no cap
  bool has_bias = false;
  int bits = 0; // 0: dense float weight; else the quantized head's bits
  int group_size = 0;
  int quant_mode = 0; // quantized: flm::kQuantAffine/Mxfp4/Mxfp8/Nvfp4 (math/quantized.h)
  bool has_global_scale = false; // nvfp4 with mx.quantize's global_scale (an input)
  int64_t chunk_bytes = kLceDefaultChunkBytes;
  bool sum_rows = false; // the loss output is the float32 sum over rows (a scalar)
  // Gradient filtering (Cut Cross-Entropy's filter_eps; 0: off): the backward
  // GEMMs skip every vocabulary block of a chunk whose entries all have
  // |dZ_rj| <= filter_eps |g_r| (g_r: the row's cotangent; 1 in the forward's
  // fused gradients, which the vjp scales by g). See cpu/chunked_head.h.
  float filter_eps = 0.0f;
  // The lse output is differentiable (Cut Cross-Entropy's return_lse): the vjp
  // passes its per-row cotangent g_lse to the backward primitive (after the
  // rows' own in its cotangent input, [2, rows...]), whose dZ_r gains
  // g_lse_r p_r (ignored rows too: their lse is defined). No gradients in the
  // forward then (per-row cotangents).
  bool lse_grad = false;
  // Gradients this primitive has as outputs (forward: declared for the traced
  // inputs, for a unit cotangent of the summed loss; backward: those the vjp
  // asked for).
  bool grad_hidden = false;
  bool grad_weight = false;
  bool grad_bias = false;

  bool quantized() const {
    return bits != 0;
  }
  // Affine heads have biases; the floating-point modes only scales (uint8).
  bool quantized_affine() const {
    return quantized() && quant_mode == 0;
  }
  bool any_grad() const {
    return grad_hidden || grad_weight || grad_bias;
  }
  bool operator==(const LinearCrossEntropyParams&) const = default;
};

// How one call is cut into chunks and tiles. Nothing but `bytes` depends on
// the thread count: every GEMM has a shape fixed by (N, H, V, dtypes,
// chunk_bytes) and every output element is written by one tile, so the
// result is the same bits whichever thread runs a tile and however many there
// are (OpenBLAS single-threaded: cpu/blas.h). Rules (tested at their
// thresholds):
//  - a chunk holds whole rows of logits, float32: rows x V x 4 bytes (the
//    softmax of a row needs all of it before dZ can be formed);
//  - a hidden chunk is copied to float32 (rows x H x 4) only when hidden is
//    not float32; BLAS reads a float32 hidden in place;
//  - rows = clamp(chunk_bytes / bytes per row, 1, N): at least one row even
//    when chunk_bytes is smaller than that;
//  - vocab_tile weight rows per logits GEMM (and per step of dH = dZ W): a
//    float32 dense weight is read in place, dense_rows = min(clamp(
//    kLceDenseTileBytes / (4 H), 1, V), ceil(V / kLceMinDenseTiles) rounded
//    up to 16) rows; otherwise (16-bit or quantized) clamp(kLceWeightTileBytes
//    / (4 H), 1, V) rows are converted to float32 per tile, into one tile
//    buffer per thread (working memory: bytes = rows x bytes per row +
//    threads x tile bytes);
//  - dw_tile = dense_rows rows of dW per GEMM;
//  - hidden_tile = min(kLceHiddenTile, H) columns of dH per GEMM.
struct LceChunkPlan {
  int64_t rows; // rows of logits per chunk
  int64_t vocab_tile; // weight rows per logits GEMM tile (and dH step)
  int64_t dw_tile; // rows of dW per GEMM tile
  int64_t hidden_tile; // columns of dH per GEMM tile
  int64_t bytes; // working memory: logits chunk + hidden copy + weight tiles
  int64_t row_bytes; // chunk bytes per row: 4 V (logits) + 4 H where hidden is copied
};
LceChunkPlan plan_chunks(
    int64_t rows,
    int64_t hidden_size,
    int64_t vocab,
    bool hidden_is_f32,
    bool weight_is_dense_f32,
    int threads,
    int64_t chunk_bytes);

// Where each input sits in the primitives' input lists (-1: absent).
struct LceInputs {
  int hidden = 0;
  int weight = 1;
  int scales = -1;
  int qbiases = -1;
  int global_scale = -1; // nvfp4: float32 [1]
  int targets = 2;
  int bias = -1;
  int count = 3; // inputs of the forward; the backward appends max, logsum, g
};

inline LceInputs lce_inputs(const LinearCrossEntropyParams& p) {
  LceInputs in;
  int next = 2;
  if (p.quantized()) {
    in.scales = next++;
  }
  if (p.quantized_affine()) {
    in.qbiases = next++;
  }
  if (p.has_global_scale) {
    in.global_scale = next++;
  }
  in.targets = next++;
  if (p.has_bias) {
    in.bias = next++;
  }
  in.count = next;
  return in;
}

// Outputs of the forward primitive, in this order.
enum LceOutput {
  kLceLoss = 0, // float32, [...] or [] (sum_rows)
  kLceLse, // float32 [...]: log-sum-exp of the row's (capped) logits
  kLceLseLo, // float32 [...]: its rounding error (lse + lse_lo exact, for backward)
  kLceCorrect, // bool [...]: the target's logit is the row's maximum
  kLceEntropy, // float32 [...]: entropy of softmax(z)
  kLceArgmax, // int64 [...]: the first maximal logit's class (as mx.argmax)
  kLceTargetLogit, // float32 [...]: the target's (capped) logit; 0 on ignored/out-of-range rows
  kLceNumStats, // then dH [..., H], dW [V, H], dbias [V] (float32) when asked
};

// The checks of the options that need no inputs (label smoothing, z_loss,
// logit_softcap, chunk_bytes): run by the op and by
// nn.LinearCrossEntropyLoss at construction (bindings.cpp). Returns the
// smoothing mode.
int check_linear_cross_entropy_options(float label_smoothing,
                                       const std::string& label_smoothing_mode, float z_loss,
                                       std::optional<float> logit_softcap,
                                       std::optional<int64_t> chunk_bytes,
                                       float filter_eps = 0.0f);

// The quantization mode named as mx.quantize names it ("affine", "mxfp4",
// "mxfp8", "nvfp4") -> flm::kQuant*; ValueError naming `mode` otherwise.
int quant_mode_from_name(const std::string& mode);

// The checks of a quantized head (w_q, scales, biases as mx.quantize returns
// them for mode, group_size, bits) against H; ValueError/TypeError naming the
// argument otherwise. Also the test hook _ext.dequantize_head's checks.
void check_quantized_head(const mx::array& w_q, const mx::array& scales,
                          const std::optional<mx::array>& qbiases, int hidden_size, int group_size,
                          int bits, int mode,
                          const std::optional<mx::array>& global_scale = std::nullopt);

// The checks of a linear head's operands shared by every head loss (the linear
// CE, the row statistics): hidden [..., H] float; weight [V >= 1, H] float or
// quantized (scales given; check_quantized_head); targets (when given) of
// hidden's row shape, any integer dtype; bias [V]. Fills p's head fields
// (bits, group_size, quant_mode, has_global_scale, has_bias) and returns the
// primitive's inputs: head = hidden, weight, [scales, [qbiases], [global_scale
// float32 [1]]] (as lce_inputs orders them), the targets as int64 and the
// bias as float32.
struct LinearHeadOperands {
  std::vector<mx::array> head;
  std::optional<mx::array> targets;
  std::optional<mx::array> bias;
};
LinearHeadOperands check_linear_head(
    const mx::array& hidden,
    const mx::array& weight,
    const std::optional<mx::array>& targets,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<mx::array>& global_scale,
    LinearCrossEntropyParams& p,
    mx::StreamOrDevice s);

// The op. `scales` given means `weight` is quantized (`mode`: its format). Returns the
// forward primitive's first kLceNumStats outputs (see LceOutput). `sum_rows`
// fuses the sum over rows; `fuse_grads` lets the forward form the gradients of
// the traced inputs (only with sum_rows; false: always the backward primitive).
std::vector<mx::array> linear_cross_entropy(
    const mx::array& hidden,
    const mx::array& weight,
    const mx::array& targets,
    const std::optional<mx::array>& bias,
    const std::optional<mx::array>& scales,
    const std::optional<mx::array>& qbiases,
    int group_size,
    int bits,
    const std::string& mode,
    const std::optional<mx::array>& global_scale,
    float label_smoothing,
    const std::string& label_smoothing_mode,
    std::optional<int64_t> ignore_index,
    float z_loss,
    std::optional<float> logit_softcap,
    bool sum_rows,
    std::optional<int64_t> chunk_bytes,
    bool fuse_grads,
    float filter_eps = 0.0f,
    bool lse_grad = false,
    mx::StreamOrDevice s = {});

// Forward. Inputs: hidden, weight, [scales, [qbiases (affine)], [global_scale
// (nvfp4)]], targets (int64), [bias].
class LinearCrossEntropy : public LossPrimitive<LinearCrossEntropyParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearCrossEntropy")
  FL_VJP
  // Set by vjp on a not yet evaluated forward: which declared gradients
  // (hidden, weight, bias) to compute.
  std::array<bool, 3> requested{};
  // Equal parameters and the same requested gradients: mx.compile merges
  // identical calls, and a forward asked for dH only must not stand in for
  // one asked for dW (whose output it never allocates).
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const LinearCrossEntropy*>(&other);
    return same && LossPrimitive::is_equivalent(other) && requested == same->requested;
  }
};

// Backward (recomputes the logits chunk by chunk). Inputs: the forward's
// inputs, then lse, lse_lo and the per-row cotangent (float32 [...]; with
// lse_grad [2, ...]: then the lse's).
// Outputs (float32): dH, dW, dbias, those flagged in the params, in that order.
class LinearCrossEntropyVJP : public LossPrimitive<LinearCrossEntropyParams> {
 public:
  FL_LOSS_PRIMITIVE("FusedLinearCrossEntropyVJP")
};

// The fused gradients times the cotangent, in the primal's dtype: g * grad.
// Inputs: g (float32 scalar), grad (float32, a gradient output of the
// forward). float32 result: scaled in place in grad's buffer when MLX's
// donation rule allows it (a copy would double the [V, H] weight gradient's
// memory), in a fresh buffer when anything else still reads grad (compile
// merges identical forwards: 2 L(x) + 3 L(x) has two of these on one grad);
// 16-bit: one pass that scales and converts.
class LceScaleGrad : public mx::Primitive {
 public:
  LceScaleGrad(mx::Stream stream, mx::Dtype dtype) : mx::Primitive(stream), dtype_(dtype) {}
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override;
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs, const std::vector<int>& axes) override;
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[1].shape()};
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const LceScaleGrad*>(&other);
    return same && same->dtype_ == dtype_;
  }
  const char* name() const override {
    return "FusedLinearCrossEntropyScaleGrad";
  }

 private:
  mx::Dtype dtype_;
};

} // namespace fl
