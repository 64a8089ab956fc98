#include "ops/common.h"

#include <cstdint>
#include <cstring>

#include "mlx/backend/common/utils.h"

namespace fl {

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out << (i ? ", " : "") << shape[i];
  }
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

void check_float_input(const mx::array& a, const char* name) {
  auto dt = a.dtype();
  if (dt != mx::float32 && dt != mx::float16 && dt != mx::bfloat16) {
    fail_type(name, " must be float32, float16 or bfloat16, got ", dt);
  }
}

int normalize_axis(int axis, int ndim, const char* name) {
  if (axis < -ndim || axis >= ndim) {
    fail_value(name, "=", axis, " is out of range for an array of rank ", ndim);
  }
  return axis < 0 ? axis + ndim : axis;
}

int check_class_axis(const mx::array& logits, int axis) {
  if (logits.ndim() == 0) {
    fail_value("logits must have a class axis, got a scalar");
  }
  axis = normalize_axis(axis, logits.ndim());
  if (logits.shape(axis) == 0) {
    fail_value("logits must have at least one class along axis ", axis, ", got shape ",
               shape_str(logits.shape()));
  }
  return axis;
}

std::string squeeze_hint(const mx::Shape& got, const mx::Shape& expected) {
  if (got.size() != expected.size() + 1) {
    return "";
  }
  for (size_t i = 0; i < got.size(); ++i) {
    mx::Shape without = got;
    without.erase(without.begin() + i);
    if (got[i] == 1 && without == expected) {
      std::ostringstream hint;
      hint << "; class indices with an extra axis of size 1? squeeze it: targets.squeeze(" << i
           << ") has shape " << shape_str(expected);
      return hint.str();
    }
  }
  return "";
}

mx::array class_indices(const mx::array& targets, const char* name, mx::StreamOrDevice s) {
  if (!mx::issubdtype(targets.dtype(), mx::integer)) {
    fail_type(name, " holds class indices and must have an integer dtype, got ", targets.dtype());
  }
  return mx::astype(targets, mx::int64, s);
}

std::optional<int64_t> ignore_index_for(const mx::array& targets,
                                        std::optional<int64_t> ignore_index) {
  if (!ignore_index) {
    return std::nullopt;
  }
  int64_t v = *ignore_index;
  auto within = [v](int64_t lo, int64_t hi) { return v >= lo && v <= hi; };
  bool representable = true;
  switch (targets.dtype()) {
    case mx::int8: representable = within(INT8_MIN, INT8_MAX); break;
    case mx::uint8: representable = within(0, UINT8_MAX); break;
    case mx::int16: representable = within(INT16_MIN, INT16_MAX); break;
    case mx::uint16: representable = within(0, UINT16_MAX); break;
    case mx::int32: representable = within(INT32_MIN, INT32_MAX); break;
    case mx::uint32: representable = within(0, UINT32_MAX); break;
    case mx::uint64: representable = v >= 0; break;
    default: break;  // int64 holds every value
  }
  return representable ? ignore_index : std::nullopt;
}

mx::array move_axis_last(const mx::array& a, int axis, mx::StreamOrDevice s) {
  return axis == a.ndim() - 1 ? a : mx::moveaxis(a, axis, -1, s);
}

namespace {

// MLX's Contiguous::eval_cpu passes its input on (shares the buffer) when it
// is row-contiguous and its buffer is at most this much larger than the view;
// a small view of a big buffer is copied, so that the rest can be freed.
constexpr size_t kViewSlackBytes = 16384;

// Whether `a` is, or once evaluated will be, laid out as MLX's Contiguous
// would pass it on. Known without evaluating anything for an evaluated array,
// for the two primitives that keep their input's layout (Copy, which mx.vjp
// puts on every primal, shares its input's buffer; AsType of a contiguous
// input copies it with the same strides), for a Full of one value (the
// zero cotangent of an output nobody differentiates), which is written into
// a new dense buffer, and for the outputs of our own kernels.
bool known_dense(const mx::array& a) {
  if (a.is_available()) {
    return a.flags().row_contiguous && a.buffer_size() <= a.nbytes() + kViewSlackBytes;
  }
  if (a.has_primitive() && dynamic_cast<const DenseOutputPrimitive*>(&a.primitive()) != nullptr) {
    return true; // one of our kernels' outputs
  }
  if (!a.has_primitive() || a.inputs().size() != 1) {
    return false;
  }
  const char* name = a.primitive().name();
  const auto& in = a.inputs()[0];
  if (std::strcmp(name, "Full") == 0) {
    // mx.full broadcasts its value to the shape first; a broadcast of one
    // value holds one value (data_size 1), which Full copies as a scalar.
    const auto& value = in.has_primitive() && std::strcmp(in.primitive().name(), "Broadcast") == 0
        ? in.inputs()[0]
        : in;
    return value.is_available() && value.data_size() == 1;
  }
  // (Not AsType of any one-dimensional input: a broadcast counts as
  // contiguous in MLX and keeps its zero strides through the cast.)
  return (std::strcmp(name, "Copy") == 0 || std::strcmp(name, "AsType") == 0) && known_dense(in);
}

} // namespace

mx::array dense(const mx::array& a, mx::StreamOrDevice s) {
  return known_dense(a) ? a : mx::contiguous(a, false, s);
}

mx::Shape row_shape(const mx::array& logits) {
  return mx::Shape(logits.shape().begin(), logits.shape().end() - 1);
}

bool can_take_over_layout(const mx::array& in, const mx::array& out) {
  return in.itemsize() == out.itemsize() && in.size() == out.size() && in.flags().row_contiguous &&
      in.data_shared_ptr() != nullptr;
}

bool can_take_over(const mx::array& in, const mx::array& out) {
  return can_take_over_layout(in, out) && mx::is_donatable(in, out);
}

std::vector<int> axes_from(const mx::array& a, int first) {
  std::vector<int> axes;
  for (int i = first; i < a.ndim(); ++i) {
    axes.push_back(i);
  }
  return axes;
}

mx::array element_count(const mx::array& a, std::vector<int> axes, mx::Dtype dtype,
                        mx::StreamOrDevice s) {
  return mx::number_of_elements(a, std::move(axes), false, dtype, s);
}

mx::array mean_factor(const mx::array& a, std::vector<int> axes, mx::StreamOrDevice s) {
  bool empty = false;
  for (int axis : axes) {
    empty = empty || a.shape(axis) == 0;
  }
  auto inverse = mx::number_of_elements(a, std::move(axes), true, mx::float32, s);
  if (inverse.has_primitive()) {
    // Known when the graph runs: 1 / 0 = inf becomes 1, and 1 / n <= 1 stays.
    return mx::minimum(inverse, mx::array(1.0f), s);
  }
  // Known now (no shapeless trace): MLX's own constant 1 / n, the factor
  // mx.mean multiplies by, bit for bit; 1 instead of 1 / 0.
  return empty ? mx::array(1.0f) : inverse;
}

std::vector<mx::array> vmap_to_front(
    const std::vector<mx::array>& inputs,
    const std::vector<int>& axes,
    const std::vector<bool>& broadcast,
    mx::StreamOrDevice s) {
  int batch = -1;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (axes[i] >= 0) {
      batch = inputs[i].shape(axes[i]);
    }
  }
  std::vector<mx::array> out;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& x = inputs[i];
    if (axes[i] >= 0) {
      out.push_back(axes[i] == 0 ? x : mx::moveaxis(x, axes[i], 0, s));
    } else if (broadcast[i]) {
      mx::Shape shape = x.shape();
      shape.insert(shape.begin(), batch);
      out.push_back(mx::broadcast_to(x, shape, s));
    } else {
      out.push_back(x);
    }
  }
  return out;
}

bool is_known_zero(const mx::array& a) {
  mx::array x = a;
  for (int depth = 0; depth < 8; ++depth) {
    if (!x.has_primitive()) {
      if (x.size() != 1 || !x.is_available() || x.data_shared_ptr() == nullptr) {
        return false;
      }
      // A scalar constant: 0 in every dtype is all zero bits (-0.0: not
      // recognised, a harmless miss).
      const auto* bytes = static_cast<const unsigned char*>(x.data<void>());
      for (size_t i = 0; i < x.itemsize(); ++i) {
        if (bytes[i] != 0) return false;
      }
      return true;
    }
    // (by name: libmlx exports no type information for every primitive)
    const char* name = x.primitive().name();
    if (std::strcmp(name, "Full") != 0 && std::strcmp(name, "Broadcast") != 0 && std::strcmp(name, "AsType") != 0 &&
        std::strcmp(name, "Negative") != 0) {
      return false;
    }
    x = x.inputs()[0];
  }
  return false;
}

mx::StreamOrDevice kernel_stream(mx::StreamOrDevice s, bool has_metal_kernels) {
  mx::Stream st = mx::to_stream(s);
  if (st.device == mx::Device::gpu && !has_metal_kernels) {
    return mx::default_stream(mx::Device::cpu);
  }
  return s;
}

} // namespace fl
