// Helpers shared by the ops in this folder: argument checks that raise the
// right Python exception, axis handling, and the base class our primitives
// derive from.
#pragma once

#include <cstring>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>

#include "mlx/array.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace fl {

namespace mx = mlx::core;

// Raised for a wrong dtype; bindings.cpp translates it to Python's TypeError.
// (std::invalid_argument, used for every other bad argument, becomes ValueError.)
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Build a message from streamable parts: fail_value("beta must be >= 0, got ", b).
template <typename... Parts>
[[noreturn]] void fail_value(const Parts&... parts) {
  std::ostringstream msg;
  (msg << ... << parts);
  throw std::invalid_argument(msg.str());
}

template <typename... Parts>
[[noreturn]] void fail_type(const Parts&... parts) {
  std::ostringstream msg;
  (msg << ... << parts);
  throw TypeError(msg.str());
}

std::string shape_str(const mx::Shape& shape);

// Floating inputs we have kernels for: float32, float16, bfloat16.
void check_float_input(const mx::array& a, const char* name);

// Normalise a possibly negative axis of an array of rank `ndim`.
int normalize_axis(int axis, int ndim, const char* name = "axis");

// The class axis of row-wise logits, normalised; it must hold >= 1 class.
int check_class_axis(const mx::array& logits, int axis);

// Reductions fused into the element-wise primitives (the row-wise ones return
// per-row losses and the Python wrappers reduce those O(rows) values). Mean
// divides by the element count at evaluation time, so shapeless mx.compile
// stays correct when the size changes.
enum class Reduce { None = 0, Sum = 1, Mean = 2 };

// A hint for class indices given with an extra axis of size 1 (the [N, 1]
// labels of PyTorch/Keras habits): when `got` is `expected` with one such
// axis inserted, "; squeeze it: targets.squeeze(i) has shape (...)", else "".
std::string squeeze_hint(const mx::Shape& got, const mx::Shape& expected);

// Integer class indices as the kernels read them (int64: any integer dtype
// converts without wrapping into the valid range; a negative or too large
// index is caught by the kernel and yields NaN).
mx::array class_indices(const mx::array& targets, const char* name, mx::StreamOrDevice s);

// ignore_index as the kernels compare it with the int64 indices above: none
// when the targets' dtype cannot hold it (-100 for uint8 or uint64 targets).
// An index compares in its own dtype, so such a value matches no row, and a
// uint64 index of 2^64 - 100 (-100 once read as int64) is out of range.
std::optional<int64_t> ignore_index_for(const mx::array& targets,
                                        std::optional<int64_t> ignore_index);

// Move `axis` of `a` to the end (no copy if it already is).
mx::array move_axis_last(const mx::array& a, int axis, mx::StreamOrDevice s);

// Row-contiguous view or copy, as every kernel expects.
mx::array dense(const mx::array& a, mx::StreamOrDevice s);

// The shape of a row-wise loss: the logits' shape without the last axis.
mx::Shape row_shape(const mx::array& logits);

// Whether a primitive's output may take over the buffer of its input `in`
// instead of a fresh one. Layout: same element size and count, `in` dense
// (row-contiguous, its buffer not much larger than `out`), so element i of
// both is at the same address and a kernel that writes element i from
// element i may work in place.
bool can_take_over_layout(const mx::array& in, const mx::array& out);
// The layout and MLX's own donation rule (mlx/backend/common/utils.h
// is_donatable): nothing but this primitive references `in` or its buffer.
bool can_take_over(const mx::array& in, const mx::array& out);

// Counts that must hold for the shapes a graph is run at, not only for those
// it was built at: under mx.compile(shapeless=True) a graph traced at one
// size is run at others, so a count is a NumberOfElements node evaluated with
// the graph there (mx::number_of_elements; elsewhere it is a constant, no node).
//   element_count: the number of elements of `a` along `axes`, as `dtype`.
//   mean_factor: what a mean over `axes` multiplies the sum by (float32):
//     1 / that number, or 1 where there are none (a mean over nothing is 0).
mx::array element_count(const mx::array& a, std::vector<int> axes, mx::Dtype dtype,
                        mx::StreamOrDevice s);
mx::array mean_factor(const mx::array& a, std::vector<int> axes, mx::StreamOrDevice s);
// The axes [first, a.ndim()).
std::vector<int> axes_from(const mx::array& a, int first);

// Move the vmapped axis of each input to the front; inputs that are not
// vmapped (axis -1) are broadcast to the batch size where `broadcast` says so.
std::vector<mx::array> vmap_to_front(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes,
    const std::vector<bool>& broadcast,
    mx::StreamOrDevice s);

// Base of every primitive in this package: a loss is a set of plain
// parameters (a struct with ==) plus the kernels; equivalence (used by
// mx.compile to merge identical nodes: same type, same inputs) is equality of
// type and parameters. Whatever else changes a primitive's outputs (state set
// after construction, as the linear CE's requested gradients) must be
// compared too, by an override: compile lets the one it keeps stand in for
// the other (tests/test_compile_matrix.py).
// Marks a primitive whose every output is written into a row-contiguous
// buffer of its own size (cpu::allocate / gpu::alloc, or a dense input's
// buffer taken over): dense() passes such outputs on without a Contiguous
// node (a per-row loss into the accurate sum of its mean, for instance).
class DenseOutputPrimitive : public mx::Primitive {
 public:
  using mx::Primitive::Primitive;
};

template <typename Params>
class LossPrimitive : public DenseOutputPrimitive {
 public:
  LossPrimitive(mx::Stream stream, Params params) : DenseOutputPrimitive(stream), params_(params) {}

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* same = dynamic_cast<const LossPrimitive*>(&other);
    return same && std::strcmp(name(), other.name()) == 0 && params_ == same->params_;
  }
  const Params& params() const {
    return params_;
  }

 protected:
  Params params_;
};

// Whether `a` is a zero by construction, known without evaluating anything:
// what mx.vjp passes as the cotangent of an output the function does not use
// (zeros_like: Full of a broadcast scalar 0, maybe through AsType), mx.zeros,
// or their negation (the cotangent of a subtracted output). A backward drops such a cotangent's term (and the work it needs).
// false when unsure (an evaluated array of zeros, say).
bool is_known_zero(const mx::array& a);

// Where a primitive without Metal kernels (or without one for what a call
// asks) runs: on the CPU stream whatever `s` says. On Apple silicon the CPU
// reads the GPU's arrays in place and MLX orders the two streams, so the
// call works on a Mac's default (GPU) stream, only not on the GPU.
mx::StreamOrDevice kernel_stream(mx::StreamOrDevice s, bool has_metal_kernels);

} // namespace fl

// The overrides each loss primitive defines: evaluation (csrc/cpu, csrc/metal),
// vmap and output shapes (csrc/ops). The forward primitives add FL_VJP.
#define FL_LOSS_PRIMITIVE(NAME)                                                                 \
  using LossPrimitive::LossPrimitive;                                                           \
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override; \
  void eval_gpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override; \
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(                                     \
      const std::vector<mx::array>& inputs, const std::vector<int>& axes) override;             \
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override;          \
  const char* name() const override {                                                           \
    return NAME;                                                                                \
  }

#define FL_VJP                                        \
  std::vector<mx::array> vjp(                         \
      const std::vector<mx::array>& primals,          \
      const std::vector<mx::array>& cotangents,       \
      const std::vector<int>& argnums,                \
      const std::vector<mx::array>& outputs) override;

// eval_gpu of a primitive without Metal kernels: its op builds it on the CPU
// stream (fl::kernel_stream), so MLX never schedules this.
#define FL_CPU_ONLY(CLASS)                                                            \
  void CLASS::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {      \
    throw std::logic_error(#CLASS " runs on the CPU stream (no Metal kernels)");      \
  }

// eval_gpu of a build without Metal (Linux): MLX never schedules it there.
#define FL_NO_METAL(CLASS)                                                            \
  void CLASS::eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) {      \
    throw std::runtime_error("mlx_fused_losses was built without Metal");             \
  }
