// The nanobind module _ext: the C++ ops, with keyword names the Python
// wrappers in python/mlx_fused_losses/losses.py call them by.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <atomic>
#include <memory>

#include "cpu/blas.h"
#include "cpu/chunked_head.h"
#include "cpu/parallel.h"
#include "cpu/quantized_head.h"
#include "mlx/transforms.h"
#include "ops/accurate_sum.h"
#include "metal/launch_plan.h"
#ifdef _METAL_
#include "metal/library_names.h"
#endif
#include "ops/cross_entropy.h"
#include "ops/distillation.h"
#include "ops/linear_distillation.h"
#include "ops/linear_topk_distillation.h"
#include "ops/linear_cross_entropy.h"
#include "ops/row_stats.h"
#include "ops/sigmoid_focal.h"
#include "ops/smooth_l1.h"
#include "ops/softmax_focal.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// Test hook for the thread pool: run `jobs` back-to-back parallel_for calls
// over `n` items each (chunks of `grain`) and count how often every item ran.
// Returns the number of (job, item) pairs that did not run exactly once.
int64_t parallel_for_miscounts(int64_t jobs, int64_t n, int64_t grain) {
  int64_t bad = 0;
  auto counts = std::make_unique<std::atomic<int32_t>[]>(size_t(n));
  for (int64_t j = 0; j < jobs; ++j) {
    for (int64_t i = 0; i < n; ++i) {
      counts[i].store(0, std::memory_order_relaxed);
    }
    fl::cpu::parallel_for(n, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        counts[i].fetch_add(1, std::memory_order_relaxed);
      }
    });
    for (int64_t i = 0; i < n; ++i) {
      bad += counts[i].load(std::memory_order_relaxed) != 1;
    }
  }
  return bad;
}

// The element-wise primitives fuse "sum" and "mean" into the kernel.
fl::Reduce to_reduce(const std::string& reduction) {
  if (reduction == "none") return fl::Reduce::None;
  if (reduction == "sum") return fl::Reduce::Sum;
  if (reduction == "mean") return fl::Reduce::Mean;
  throw std::invalid_argument("reduction must be 'none', 'mean' or 'sum', got '" + reduction + "'");
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "Fused loss primitives for MLX (internal: use mlx_fused_losses).";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fl::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  // cross_entropy: the per-row loss; cross_entropy_outputs: [loss, lse] (the
  // lse differentiable; the wrappers' z term and statistics read it).
  auto cross_entropy_outputs = [](const mlx::core::array& logits, const mlx::core::array& targets,
                                  int axis, float label_smoothing,
                                  const std::string& label_smoothing_mode,
                                  std::optional<int64_t> ignore_index,
                                  std::optional<mlx::core::array> class_weights, float z_loss,
                                  std::optional<float> logit_softcap,
                                  mlx::core::StreamOrDevice stream, bool return_stats) {
    return fl::cross_entropy(logits, targets, axis, label_smoothing, label_smoothing_mode,
                             ignore_index, class_weights, z_loss, logit_softcap, return_stats,
                             stream);
  };
  m.def(
      "cross_entropy",
      [cross_entropy_outputs](const mlx::core::array& logits, const mlx::core::array& targets,
                              int axis, float label_smoothing,
                              const std::string& label_smoothing_mode,
                              std::optional<int64_t> ignore_index,
                              std::optional<mlx::core::array> class_weights, float z_loss,
                              std::optional<float> logit_softcap,
                              mlx::core::StreamOrDevice stream) {
        return cross_entropy_outputs(logits, targets, axis, label_smoothing, label_smoothing_mode,
                                     ignore_index, class_weights, z_loss, logit_softcap,
                                     stream, false)[0];
      },
      "logits"_a, "targets"_a, "axis"_a = -1, "label_smoothing"_a = 0.0f,
      "label_smoothing_mode"_a = "uniform", "ignore_index"_a = nb::none(),
      "class_weights"_a = nb::none(), "z_loss"_a = 0.0f, nb::kw_only(),
      "logit_softcap"_a = nb::none(), "stream"_a = nb::none(),
      "Per-row float32 cross-entropy (no reduction).");
  m.def(
      "cross_entropy_outputs", cross_entropy_outputs, "logits"_a, "targets"_a, "axis"_a = -1,
      "label_smoothing"_a = 0.0f, "label_smoothing_mode"_a = "uniform",
      "ignore_index"_a = nb::none(), "class_weights"_a = nb::none(), "z_loss"_a = 0.0f,
      nb::kw_only(), "logit_softcap"_a = nb::none(), "stream"_a = nb::none(),
      "return_stats"_a = false,
      "As cross_entropy: [per-row float32 loss, per-row log-sum-exp (0 on ignored rows)]; "
      "return_stats: then the row statistics, not differentiable: lse of every row, entropy, "
      "argmax (int64), correct (bool), from the loss's pass.");

  m.def(
      "accurate_sum",
      [](const mlx::core::array& a, mlx::core::StreamOrDevice stream) {
        return fl::accurate_sum(a, stream);
      },
      "a"_a, nb::kw_only(), "stream"_a = nb::none(),
      "float32 sum of all elements of a, accumulated beyond float32 (double on the CPU).");

  m.def(
      "smooth_l1_loss",
      [](const mlx::core::array& predictions, const mlx::core::array& targets, float beta,
         const std::string& reduction, mlx::core::StreamOrDevice stream) {
        return fl::smooth_l1_loss(predictions, targets, beta, to_reduce(reduction), stream);
      },
      "predictions"_a, "targets"_a, "beta"_a = 1.0f, "reduction"_a = "none", nb::kw_only(),
      "stream"_a = nb::none(), "Element-wise, summed or averaged float32 smooth-L1 loss.");

  m.def(
      "huber_loss",
      [](const mlx::core::array& inputs, const mlx::core::array& targets, float delta, const std::string& reduction,
         mlx::core::StreamOrDevice stream) {
        return fl::huber_loss(inputs, targets, delta, to_reduce(reduction), stream);
      },
      "inputs"_a, "targets"_a, "delta"_a = 1.0f, "reduction"_a = "none", nb::kw_only(),
      "stream"_a = nb::none(), "Element-wise, summed or averaged float32 Huber loss.");

  m.def(
      "sigmoid_focal_loss",
      [](const mlx::core::array& inputs, const mlx::core::array& targets, float alpha, float gamma,
         const std::string& reduction, mlx::core::StreamOrDevice stream) {
        return fl::sigmoid_focal_loss(inputs, targets, alpha, gamma, to_reduce(reduction), stream);
      },
      "inputs"_a, "targets"_a, "alpha"_a = 0.25f, "gamma"_a = 2.0f, "reduction"_a = "none",
      nb::kw_only(), "stream"_a = nb::none(),
      "Element-wise, summed or averaged float32 sigmoid focal loss.");

  m.def(
      "softmax_focal_loss",
      [](const mlx::core::array& logits, const mlx::core::array& targets, int axis, float gamma,
         std::optional<float> alpha, std::optional<mlx::core::array> class_alpha,
         std::optional<int64_t> ignore_index, mlx::core::StreamOrDevice stream) {
        return fl::softmax_focal_loss(logits, targets, axis, gamma, alpha, class_alpha,
                                      ignore_index, stream);
      },
      "logits"_a, "targets"_a, "axis"_a = -1, "gamma"_a = 2.0f, "alpha"_a = nb::none(),
      "class_alpha"_a = nb::none(), "ignore_index"_a = nb::none(), nb::kw_only(),
      "stream"_a = nb::none(), "Per-row float32 softmax focal loss (no reduction).");

  m.def(
      "distill_loss",
      [](const mlx::core::array& student, const mlx::core::array& teacher,
         std::optional<mlx::core::array> targets, const std::string& kind, float beta,
         float temperature, float alpha, bool scale_by_temperature_squared,
         std::optional<int64_t> ignore_index, bool sum_rows,
         std::optional<mlx::core::array> row_scale, bool fuse_grads,
         mlx::core::StreamOrDevice stream) {
        return fl::distill_loss(student, teacher, targets, kind, beta, temperature, alpha,
                                scale_by_temperature_squared, ignore_index, sum_rows, row_scale,
                                fuse_grads, stream);
      },
      "student_logits"_a, "teacher_logits"_a, "targets"_a = nb::none(), nb::kw_only(),
      "kind"_a = "kl", "beta"_a = 0.5f, "temperature"_a = 1.0f, "alpha"_a = 0.0f,
      "scale_by_temperature_squared"_a = false, "ignore_index"_a = nb::none(),
      "sum_rows"_a = false, "row_scale"_a = nb::none(), "fuse_grads"_a = true,
      "stream"_a = nb::none(),
      "float32 distillation loss on logits (kind 'kl', 'reverse_kl' or 'jsd'): per row, or with "
      "sum_rows=True row_scale (a float32 scalar; none: 1) times the sum over rows, whose "
      "gradient the CPU kernel forms in the forward for a float32 student unless "
      "fuse_grads=False.");
  m.def(
      "linear_distill_loss",
      [](const mlx::core::array& student_hidden, const mlx::core::array& student_weight,
         const mlx::core::array& teacher_hidden, const mlx::core::array& teacher_weight,
         std::optional<mlx::core::array> targets, const std::string& kind, float beta,
         float temperature, float alpha, bool scale_by_temperature_squared,
         std::optional<int64_t> ignore_index, std::optional<int64_t> chunk_bytes,
         std::optional<mlx::core::array> student_scales, std::optional<mlx::core::array> student_biases,
         int student_group_size, int student_bits, const std::string& student_mode,
         std::optional<mlx::core::array> student_global_scale,
         std::optional<mlx::core::array> teacher_scales, std::optional<mlx::core::array> teacher_biases,
         int teacher_group_size, int teacher_bits, const std::string& teacher_mode,
         std::optional<mlx::core::array> teacher_global_scale, bool sum_rows, bool fuse_grads,
         mlx::core::StreamOrDevice stream) {
        fl::HeadArgs st{student_hidden, student_weight, student_scales, student_biases,
                        student_group_size, student_bits, student_mode, student_global_scale};
        fl::HeadArgs te{teacher_hidden, teacher_weight, teacher_scales, teacher_biases,
                        teacher_group_size, teacher_bits, teacher_mode, teacher_global_scale};
        return fl::linear_distill_loss(st, te, targets, kind, beta, temperature, alpha,
                                       scale_by_temperature_squared, ignore_index, chunk_bytes,
                                       sum_rows, fuse_grads, stream);
      },
      "student_hidden"_a, "student_weight"_a, "teacher_hidden"_a, "teacher_weight"_a,
      "targets"_a = nb::none(), nb::kw_only(), "kind"_a = "kl", "beta"_a = 0.5f,
      "temperature"_a = 1.0f, "alpha"_a = 0.0f, "scale_by_temperature_squared"_a = false,
      "ignore_index"_a = nb::none(), "chunk_bytes"_a = nb::none(), "student_scales"_a = nb::none(),
      "student_biases"_a = nb::none(), "student_group_size"_a = 64, "student_bits"_a = 4,
      "student_mode"_a = "affine", "student_global_scale"_a = nb::none(),
      "teacher_scales"_a = nb::none(), "teacher_biases"_a = nb::none(),
      "teacher_group_size"_a = 64, "teacher_bits"_a = 4, "teacher_mode"_a = "affine",
      "teacher_global_scale"_a = nb::none(), "sum_rows"_a = false, "fuse_grads"_a = true,
      "stream"_a = nb::none(),
      "float32 fused linear distillation loss: per row, or summed over rows (sum_rows=True: the "
      "gradients formed in the forward unless fuse_grads=False).");
  m.def(
      "linear_topk_distill_loss",
      [](const mlx::core::array& student_hidden, const mlx::core::array& student_weight,
         const mlx::core::array& teacher_ids, const mlx::core::array& teacher_logprobs,
         std::optional<mlx::core::array> targets, float temperature, bool renormalize, float alpha,
         bool scale_by_temperature_squared, std::optional<int64_t> ignore_index,
         std::optional<int64_t> chunk_bytes, std::optional<mlx::core::array> student_scales,
         std::optional<mlx::core::array> student_biases, int student_group_size, int student_bits,
         const std::string& student_mode, std::optional<mlx::core::array> student_global_scale,
         bool sum_rows, bool fuse_grads, mlx::core::StreamOrDevice stream) {
        fl::HeadArgs st{student_hidden, student_weight, student_scales, student_biases,
                        student_group_size, student_bits, student_mode, student_global_scale};
        return fl::linear_topk_distill_loss(st, teacher_ids, teacher_logprobs, targets, temperature,
                                            renormalize, alpha, scale_by_temperature_squared,
                                            ignore_index, chunk_bytes, sum_rows, fuse_grads, stream);
      },
      "student_hidden"_a, "student_weight"_a, "teacher_ids"_a, "teacher_logprobs"_a,
      "targets"_a = nb::none(), nb::kw_only(), "temperature"_a = 1.0f, "renormalize"_a = false,
      "alpha"_a = 0.0f, "scale_by_temperature_squared"_a = false, "ignore_index"_a = nb::none(),
      "chunk_bytes"_a = nb::none(), "student_scales"_a = nb::none(), "student_biases"_a = nb::none(),
      "student_group_size"_a = 64, "student_bits"_a = 4, "student_mode"_a = "affine",
      "student_global_scale"_a = nb::none(), "sum_rows"_a = false, "fuse_grads"_a = true,
      "stream"_a = nb::none(),
      "float32 fused linear distillation from an offline top-k teacher: per row, or summed over "
      "rows (sum_rows=True: the gradients formed in the forward unless fuse_grads=False).");
  m.def(
      "check_distill_options",
      [](const std::string& kind, float beta, float temperature, float alpha, bool has_targets,
         std::optional<int64_t> ignore_index) {
        fl::distill_params(kind, beta, temperature, alpha, false, has_targets, ignore_index);
      },
      "kind"_a, "beta"_a, "temperature"_a, "alpha"_a, "has_targets"_a, "ignore_index"_a = nb::none());

  m.def(
      "linear_cross_entropy",
      [](const mlx::core::array& hidden, const mlx::core::array& weight, const mlx::core::array& targets,
         std::optional<mlx::core::array> bias, std::optional<mlx::core::array> scales,
         std::optional<mlx::core::array> biases, int group_size, int bits, const std::string& mode,
         std::optional<mlx::core::array> global_scale, float label_smoothing, const std::string& label_smoothing_mode,
         std::optional<int64_t> ignore_index, float z_loss, std::optional<float> logit_softcap,
         bool sum_rows, std::optional<int64_t> chunk_bytes, bool fuse_grads, float filter_eps,
         bool lse_grad, mlx::core::StreamOrDevice stream) {
        return fl::linear_cross_entropy(hidden, weight, targets, bias, scales, biases, group_size, bits,
                                        mode, global_scale, label_smoothing, label_smoothing_mode, ignore_index, z_loss,
                                        logit_softcap, sum_rows, chunk_bytes, fuse_grads, filter_eps, lse_grad,
                                        stream);
      },
      "hidden"_a, "weight"_a, "targets"_a, "bias"_a = nb::none(), nb::kw_only(), "scales"_a = nb::none(),
      "biases"_a = nb::none(), "group_size"_a = 64, "bits"_a = 4, "mode"_a = "affine",
      "global_scale"_a = nb::none(), "label_smoothing"_a = 0.0f,
      "label_smoothing_mode"_a = "uniform", "ignore_index"_a = nb::none(), "z_loss"_a = 0.0f,
      "logit_softcap"_a = nb::none(), "sum_rows"_a = false, "chunk_bytes"_a = nb::none(),
      "fuse_grads"_a = true, "filter_eps"_a = 0.0f, "lse_grad"_a = false, "stream"_a = nb::none(),
      "Fused linear cross-entropy: [loss (per row, or summed), row max, row log-sum, "
      "target-is-argmax, entropy, then gradients formed in the forward pass].");

  // Per-row statistics (ops/row_stats.h: the contract): the scorer's
  // primitive, also the building block of distillation and of the
  // vocabulary-parallel losses (vocab_start: this head's first global class).
  m.def(
      "linear_row_stats",
      [](const mlx::core::array& hidden, const mlx::core::array& weight, std::optional<mlx::core::array> targets,
         std::optional<mlx::core::array> bias, const std::vector<std::string>& stats,
         std::optional<mlx::core::array> scales, std::optional<mlx::core::array> biases, int group_size, int bits,
         const std::string& mode, std::optional<mlx::core::array> global_scale, float temperature,
         std::optional<float> logit_softcap, std::optional<int64_t> ignore_index, std::optional<int64_t> vocab_start,
         std::optional<int64_t> chunk_bytes, mlx::core::StreamOrDevice stream) {
        return fl::linear_row_stats(hidden, weight, targets, bias, scales, biases, group_size, bits, mode,
                                    global_scale, stats, temperature, logit_softcap, ignore_index, vocab_start,
                                    chunk_bytes, stream);
      },
      "hidden"_a, "weight"_a, "targets"_a = nb::none(), "bias"_a = nb::none(), nb::kw_only(), "stats"_a,
      "scales"_a = nb::none(), "biases"_a = nb::none(), "group_size"_a = 64, "bits"_a = 4, "mode"_a = "affine",
      "global_scale"_a = nb::none(), "temperature"_a = 1.0f, "logit_softcap"_a = nb::none(),
      "ignore_index"_a = nb::none(), "vocab_start"_a = nb::none(), "chunk_bytes"_a = nb::none(),
      "stream"_a = nb::none(),
      "Per-row statistics of z = softcap(hidden @ weight.T + bias) / temperature without the logits: "
      "a list of float32 arrays (argmax int64), one per name in stats ('lse', 'target', 'logit_sum', "
      "'expected', 'max', 'argmax'); see csrc/ops/row_stats.h.");
  m.def("check_row_stats_options", &fl::check_row_stats_options, "temperature"_a, "logit_softcap"_a = nb::none(),
        "chunk_bytes"_a = nb::none(), "The row statistics' option checks (temperature, logit_softcap, chunk_bytes).");
  m.def(
      "row_stats",
      [](const mlx::core::array& logits, std::optional<mlx::core::array> targets,
         const std::vector<std::string>& stats, float temperature, std::optional<float> logit_softcap,
         std::optional<int64_t> ignore_index, std::optional<int64_t> vocab_start,
         mlx::core::StreamOrDevice stream) {
        return fl::row_stats(logits, targets, stats, temperature, logit_softcap, ignore_index, vocab_start,
                             stream);
      },
      "logits"_a, "targets"_a = nb::none(), nb::kw_only(), "stats"_a, "temperature"_a = 1.0f,
      "logit_softcap"_a = nb::none(), "ignore_index"_a = nb::none(), "vocab_start"_a = nb::none(),
      "stream"_a = nb::none(),
      "Per-row statistics of z = softcap(logits) / temperature (class axis last), as linear_row_stats.");

  // Test hook of the CPU unpacking of quantized heads (cpu/quantized_head.h):
  // the whole [V, H] matrix as float32, evaluated now. The kernels never
  // dequantise a whole head; tests compare this with mx.dequantize.
  m.def(
      "dequantize_head",
      [](const mlx::core::array& w_q, const mlx::core::array& scales,
         std::optional<mlx::core::array> biases, int group_size, int bits, const std::string& mode,
         std::optional<mlx::core::array> global_scale) {
        namespace mx = mlx::core;
        int qmode = fl::quant_mode_from_name(mode);
        if (w_q.ndim() != 2) {
          throw std::invalid_argument("dequantize_head: w_q must be 2-D");
        }
        int hidden = bits > 0 ? int(int64_t(w_q.shape(1)) * 32 / bits) : 0;
        fl::check_quantized_head(w_q, scales, biases, hidden, group_size, bits, qmode,
                                 global_scale);
        std::vector<mx::array> in = {mx::contiguous(w_q), mx::contiguous(scales)};
        if (biases) {
          in.push_back(mx::contiguous(mx::astype(*biases, scales.dtype())));
        }
        if (global_scale) {
          in.push_back(mx::reshape(mx::astype(*global_scale, mx::float32), {1}));
        }
        mx::eval(in);
        fl::cpu::QuantizedMatrix q;
        q.w_q = in[0].data<uint32_t>();
        q.scales = in[1].data<void>();
        q.biases = biases ? in[2].data<void>() : nullptr;
        q.scale_dtype = scales.dtype();
        q.mode = qmode;
        q.bits = bits;
        q.group_size = group_size;
        q.hidden = hidden;
        q.global_scale = global_scale ? in.back().data<float>() : nullptr;
        int vocab = w_q.shape(0);
        std::vector<float> out(size_t(vocab) * size_t(hidden));
        fl::cpu::dequantize_block(q, 0, vocab, 0, hidden, out.data());
        return mx::array(out.begin(), mx::Shape{vocab, hidden}, mx::float32);
      },
      "w_q"_a, "scales"_a, "biases"_a = nb::none(), "group_size"_a, "bits"_a, "mode"_a = "affine",
      "global_scale"_a = nb::none(), "The CPU unpacking of a quantized head, as a float32 [V, H] array (test hook).");

  // Test hook of the chunked-head driver (cpu/chunked_head.h): per-chunk Z
  // (and a second head's Z2) copied out, dz written over Z, the driver's dH,
  // dW, dbias; the last output counts the chunks.
  m.def(
      "chunked_head_probe",
      [](const mlx::core::array& hidden, const mlx::core::array& weight, std::optional<mlx::core::array> dz,
         std::optional<mlx::core::array> scales, std::optional<mlx::core::array> biases, int group_size, int bits,
         const std::string& mode, std::optional<mlx::core::array> hidden2, std::optional<mlx::core::array> weight2,
         std::optional<mlx::core::array> scales2, std::optional<mlx::core::array> biases2, int group_size2,
         int bits2, const std::string& mode2, std::optional<int64_t> chunk_bytes) {
        fl::cpu::ProbeHead one{hidden, weight, scales, biases, group_size, bits, mode};
        std::optional<fl::cpu::ProbeHead> two;
        if (hidden2 && weight2) {
          two = fl::cpu::ProbeHead{*hidden2, *weight2, scales2, biases2, group_size2, bits2, mode2};
        }
        return fl::cpu::chunked_head_probe(one, two, dz, chunk_bytes.value_or(fl::kLceDefaultChunkBytes));
      },
      "hidden"_a, "weight"_a, "dz"_a = nb::none(), nb::kw_only(), "scales"_a = nb::none(),
      "biases"_a = nb::none(), "group_size"_a = 64, "bits"_a = 4, "mode"_a = "affine",
      "hidden2"_a = nb::none(), "weight2"_a = nb::none(), "scales2"_a = nb::none(), "biases2"_a = nb::none(),
      "group_size2"_a = 64, "bits2"_a = 4, "mode2"_a = "affine", "chunk_bytes"_a = nb::none(),
      "The chunked-head driver's GEMMs without a loss (test hook): [z, z2, (dH, dW, dbias), chunks].");

  m.def(
      "linear_cross_entropy_plan",
      [](int64_t rows, int64_t hidden_size, int64_t vocab, bool hidden_is_f32, bool weight_is_dense_f32,
         int threads, std::optional<int64_t> chunk_bytes) {
        auto plan = fl::plan_chunks(rows, hidden_size, vocab, hidden_is_f32, weight_is_dense_f32, threads,
                                    chunk_bytes.value_or(fl::kLceDefaultChunkBytes));
        nb::dict d;
        d["rows"] = plan.rows;
        d["vocab_tile"] = plan.vocab_tile;
        d["dw_tile"] = plan.dw_tile;
        d["hidden_tile"] = plan.hidden_tile;
        d["bytes"] = plan.bytes;
        return d;
      },
      "rows"_a, "hidden_size"_a, "vocab"_a, "hidden_is_f32"_a, "weight_is_dense_f32"_a, "threads"_a,
      "chunk_bytes"_a = nb::none(),
      "The linear cross-entropy's chunk plan (ops/linear_cross_entropy.h): rows per chunk, "
      "vocab_tile, dw_tile, hidden_tile, bytes of working memory.");
  m.attr("LINEAR_CE_DEFAULT_CHUNK_BYTES") = fl::kLceDefaultChunkBytes;
  m.attr("LINEAR_CE_FILTER_BLOCK") = fl::kLceFilterBlock; // filter_eps's columns per block (CPU)
  m.attr("LINEAR_CE_GPU_DEFAULT_CHUNK_BYTES") = fl::kLceGpuDefaultChunkBytes;
  m.attr("LINEAR_CE_WEIGHT_TILE_BYTES") = fl::kLceWeightTileBytes;
  m.attr("LINEAR_CE_DENSE_TILE_BYTES") = fl::kLceDenseTileBytes;
  m.attr("LINEAR_CE_MIN_DENSE_TILES") = fl::kLceMinDenseTiles;
  m.attr("LINEAR_CE_HIDDEN_TILE") = fl::kLceHiddenTile;

  // The op's own checks of the options that need no inputs, for the Module
  // classes to run at construction (python/mlx_fused_losses/losses.py: the
  // _*_options functions, shared by each function and its Module).
  m.def(
      "check_cross_entropy_options",
      [](float label_smoothing, const std::string& label_smoothing_mode, float z_loss,
         std::optional<mlx::core::array> class_weights, std::optional<float> logit_softcap) {
        fl::check_cross_entropy_options(label_smoothing, label_smoothing_mode, z_loss, class_weights,
                                        logit_softcap);
      },
      "label_smoothing"_a, "label_smoothing_mode"_a, "z_loss"_a, "class_weights"_a = nb::none(),
      "logit_softcap"_a = nb::none());
  m.def("check_smooth_l1_options", &fl::check_smooth_l1_options, "beta"_a);
  m.def("check_huber_options", &fl::check_huber_options, "delta"_a);
  m.def("check_sigmoid_focal_options", &fl::check_sigmoid_focal_options, "alpha"_a, "gamma"_a);
  m.def("check_softmax_focal_options", &fl::check_softmax_focal_options, "gamma"_a,
        "alpha"_a = nb::none());
  m.def(
      "check_linear_cross_entropy_options",
      [](float label_smoothing, const std::string& label_smoothing_mode, float z_loss,
         std::optional<float> logit_softcap, std::optional<int64_t> chunk_bytes) {
        fl::check_linear_cross_entropy_options(label_smoothing, label_smoothing_mode, z_loss,
                                               logit_softcap, chunk_bytes);
      },
      "label_smoothing"_a, "label_smoothing_mode"_a, "z_loss"_a, "logit_softcap"_a = nb::none(),
      "chunk_bytes"_a = nb::none());

  // Counts for the Python reductions that hold at whatever size a shapeless
  // mx.compile runs the graph (ops/common.h); constants outside such a trace.
  m.def(
      "element_count",
      [](const mlx::core::array& a, mlx::core::Dtype dtype, std::optional<std::vector<int>> axes,
         mlx::core::StreamOrDevice stream) {
        return fl::element_count(a, axes ? *axes : fl::axes_from(a, 0), dtype, stream);
      },
      "a"_a, "dtype"_a = mlx::core::float32, nb::kw_only(), "axes"_a = nb::none(),
      "stream"_a = nb::none(),
      "The number of elements of a (along `axes`; None: all), as a scalar of dtype, counted when "
      "the graph runs.");
  m.def(
      "mean_factor",
      [](const mlx::core::array& a, mlx::core::StreamOrDevice stream) {
        return fl::mean_factor(a, fl::axes_from(a, 0), stream);
      },
      "a"_a, nb::kw_only(), "stream"_a = nb::none(),
      "float32 1 / a.size (1 for an empty a), the factor of a mean, counted when the graph runs.");

  // Plain C++ on every platform: the kernel names every launch plan the host can
  // build asks for (tests/test_kernel_names.py checks them against the names
  // metal/*.metal defines; check_gpu against the loaded metallib).
  m.def(
      "launch_plan_kernels",
      [] {
        std::vector<std::tuple<std::string, std::string>> out;
        for (const auto& k : fl::mplan::enumerate_plan_kernels()) {
          out.emplace_back(k.kernel, k.plan);
        }
        return out;
      },
      "[(kernel name, the launch-plan call that asks for it)] over every option the host "
      "can plan for.");
#ifdef _METAL_
  m.def("metallib_function_names", &fl::gpu::metallib_function_names,
        "The function names of the loaded mlx_fused_losses.metallib (macOS builds only).");
#endif

  // The 16-bit GEMM library (cpu/onednn_gemm.cpp) is looked for in Python's
  // prefix/lib too, where pip installs the onednn-cpu-gomp wheel's libdnnl.
  // Nothing is loaded here: only on the first 16-bit GEMM.
  {
    nb::module_ sys = nb::module_::import_("sys");
    fl::cpu::set_bf16_gemm_search_dirs({nb::cast<std::string>(sys.attr("prefix")) + "/lib"});
  }
  m.def("bf16_gemm_status",
        [] {
          auto s = fl::cpu::bf16_gemm_status();
          nb::dict d;
          d["cpu_units"] = s.cpu_units;
          d["f16_units"] = s.f16_units;
          d["library"] = s.library;
          d["version"] = s.version;
          d["implementation"] = s.implementation;
          d["active"] = s.active;
          d["f16_active"] = s.f16_active;
          d["reason"] = s.reason;
          return d;
        },
        "The run-time choice of oneDNN's 16-bit GEMMs for 16-bit linear heads: {'cpu_units': "
        "'amx_bf16' | 'avx512_bf16' | '', 'f16_units': 'amx_fp16' | 'avx512_fp16' | '', 'library': "
        "the libdnnl loaded or '', 'version', 'implementation': oneDNN's kernel of the latest matmul, "
        "'active': bool (bf16), 'f16_active': bool, 'reason': why bf16 is not active}. Loads the "
        "library if the CPU qualifies.");
  m.def("_set_bf16_gemm_enabled", &fl::cpu::set_bf16_gemm_enabled, "enabled"_a,
        "Test/benchmark hook: use (True) or bypass (False) the bf16 GEMM where it is available.");

  m.def("num_threads", &fl::cpu::num_threads,
        "Threads the CPU kernels use (FL_NUM_THREADS, else the usable cores).");

  m.def("_parallel_for_miscounts", &parallel_for_miscounts, "jobs"_a, "n"_a, "grain"_a = 1,
        nb::call_guard<nb::gil_scoped_release>(),
        "Test hook: run `jobs` back-to-back parallel_for calls over n items on the pool "
        "(GIL released) and return how many items did not run exactly once.");
}
