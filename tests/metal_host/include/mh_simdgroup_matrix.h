// <metal_simdgroup_matrix> for both shims: SIMD-group matrices with the semantics of
// an Apple GPU, for the CPU harness (include/metal_stdlib) and for the static check
// (static_include/metal_stdlib, which defines MH_DISTINCT_ADDRESS_SPACES so that
// loads and stores take only device and threadgroup pointers, as in MSL).
//
// Included by those wrappers AFTER they define the address-space keywords, so this
// file may spell `thread`, `device` and `threadgroup`.
//
// What the harness models (MSL specification sections 2.4 and 6.7; MLX's steel GEMM):
//   - An 8x8 matrix is distributed over the 32 lanes of ONE SIMD-group, two
//     elements per lane, in Apple's layout: lane l holds row
//     (l / 4 & 4) + (l / 2) % 4, columns (l / 4 & 2) * 2 + (l % 2) * 2 and the next
//     one (MLX's BaseMMAFrag::get_coord; metal-flash-attention's "Morton order").
//     thread_elements() is that lane's pair and nothing else, so code that assumes
//     another layout computes wrong results here as on the GPU.
//   - simdgroup_load / simdgroup_store / simdgroup_multiply(_accumulate) /
//     operator* are collective: a rendezvous of the 32 lanes (same source site and
//     call path, like simd_sum), carried out at one moment for the whole SIMD-group
//     (by the first lane to resume, runtime.cpp), reading and writing memory under
//     the running schedule's memory model. A lane that skips one, a partial
//     SIMD-group, or arguments that differ between lanes are kernel errors.
//   - The 64 elements a load or store touches must lie in one threadgroup buffer /
//     function-scope threadgroup array / device buffer passed from Python.
//   - A default-constructed matrix holds the schedule's poison (Metal leaves it
//     undefined), so an accumulator never initialised shows as poison.
//   - Products: every element of d is c + sum_k a[i][k] * b[k][j] with k in order
//     0..7, each step a float fused multiply-add; when d is half or bfloat the
//     running sum is rounded to d's type after every step (the least precise
//     reading of hardware whose internal precision is unspecified; the project
//     accumulates in float anyway).
#pragma once

#include <cmath>
#include <cstring>

namespace metal {

#define MH_MATRIX_LOC std::source_location loc = std::source_location::current()

namespace detail {

// Apple's distribution of an 8x8 matrix over the lanes of a SIMD-group: lane l
// holds (matrix_row(l), matrix_col(l)) and (matrix_row(l), matrix_col(l) + 1).
inline constexpr uint matrix_row(uint lane) { return (lane / 4 & 4) + (lane / 2) % 4; }
inline constexpr uint matrix_col(uint lane) { return (lane / 4 & 2) * 2 + (lane % 2) * 2; }

}  // namespace detail

// simdgroup_matrix<T, Cols, Rows>: T is half, bfloat or float; Cols = Rows = 8, as
// in Metal (the only size it supports).
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(detail::Floating<T>,
                "simdgroup_matrix: the element type must be half, bfloat or float");
  static_assert(Cols == 8 && Rows == 8, "simdgroup_matrix: Metal supports only 8x8 matrices");

  // Undefined contents in Metal: the schedule's poison here.
  simdgroup_matrix() thread { mh::detail::fill_poison(&elements_, sizeof elements_); }

  // A diagonal matrix with `diagonal` on the diagonal, zero elsewhere.
  explicit simdgroup_matrix(T diagonal) thread {
    const uint lane = mh::detail::lane_in_simdgroup();
    const uint row = detail::matrix_row(lane), col = detail::matrix_col(lane);
    elements_ = vec<T, 2>(T(0));
    if (row == col) elements_[0] = diagonal;
    if (row == col + 1) elements_[1] = diagonal;
  }

  // The two elements this lane holds (see detail::matrix_row / matrix_col).
  thread vec<T, 2>& thread_elements() thread { return elements_; }
  const thread vec<T, 2>& thread_elements() const thread { return elements_; }

 private:
  vec<T, 2> elements_;
};

using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(const T value) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.thread_elements() = vec<T, 2>(value);
  return m;
}

namespace detail {

// What each lane passes to a load or store; Metal requires the same in every lane.
template <class T>
struct MatrixAccess {
  const void* base;
  ulong elements_per_row;
  ulong origin_x, origin_y;  // column, row
  bool transpose;
  vec<T, 2> elements;  // a store's values
};

// Collective operations need the whole SIMD-group: fail unless all 32 lanes exist.
template <class V>
inline void require_full_simdgroup(const Exchange<V>& e, const char* op, std::source_location loc) {
  if (e.view.live != 32)
    mh::detail::fail({op, loc},
                     "SIMD-group matrix operations need all 32 lanes of the SIMD-group; this one "
                     "has only the lanes that a partial threadgroup gives it (make the "
                     "threadgroup a multiple of 32 threads)");
}

// The addresses of the 64 elements (row-major over the 8x8 matrix) that a load or
// store touches, after checking the arguments are the same in every lane and the
// memory lies in one buffer.
template <class T>
inline void matrix_addresses(const Exchange<MatrixAccess<T>>& e, const char* op,
                             std::source_location loc, const void* out[64]) {
  require_full_simdgroup(e, op, loc);
  const MatrixAccess<T>& a = e.value(0);
  for (uint lane = 1; lane < 32; ++lane) {
    const MatrixAccess<T>& b = e.value(lane);
    if (b.base != a.base || b.elements_per_row != a.elements_per_row ||
        b.origin_x != a.origin_x || b.origin_y != a.origin_y || b.transpose != a.transpose)
      mh::detail::fail({op, loc},
                       "the pointer, elements_per_row, matrix_origin and transpose_matrix "
                       "arguments must be the same in all lanes");
  }
  // The specification does not say whether matrix_origin counts in the memory layout
  // or in the transposed matrix; refuse the combination rather than guess.
  if (a.transpose && (a.origin_x != 0 || a.origin_y != 0))
    mh::detail::fail({op, loc},
                     "matrix_origin with transpose_matrix = true: the MSL specification does not "
                     "define which layout the origin is in; add the offset to the pointer instead");
  const auto* base = static_cast<const T*>(a.base);
  for (uint r = 0; r < 8; ++r)
    for (uint c = 0; c < 8; ++c) {
      // Element (r, c) of the matrix; transposed, memory holds its transpose.
      const ulong at = a.transpose ? c * a.elements_per_row + r
                                   : (a.origin_y + r) * a.elements_per_row + a.origin_x + c;
      out[r * 8 + c] = base + at;
    }
  mh::detail::check_matrix_access({op, loc}, out, 64, sizeof(T));
}

// The slot through which the first lane hands each lane its result.
template <class R>
inline R& result_slot(const mh::detail::SimdView& view, uint lane) {
  static_assert(sizeof(R) <= mh::detail::kSimdSlotBytes);
  return *reinterpret_cast<R*>(view.slots + lane * mh::detail::kSimdSlotBytes);
}

template <class T, int Cols, int Rows>
inline void matrix_load(thread simdgroup_matrix<T, Cols, Rows>& d, const T* src,
                        ulong elements_per_row, ulong2 origin, bool transpose,
                        std::source_location loc) {
  const char* op = "simdgroup_load";
  auto e = exchange(op, loc, MatrixAccess<T>{src, elements_per_row, origin.x, origin.y, transpose, {}});
  if (e.view.first) {
    const void* at[64];
    matrix_addresses(e, op, loc, at);
    for (uint lane = 0; lane < 32; ++lane) {
      const uint i = matrix_row(lane) * 8 + matrix_col(lane);
      result_slot<vec<T, 2>>(e.view, lane) =
          vec<T, 2>{*static_cast<const T*>(at[i]), *static_cast<const T*>(at[i + 1])};
    }
  }
  d.thread_elements() = result_slot<vec<T, 2>>(e.view, e.view.lane);
}

template <class T, int Cols, int Rows>
inline void matrix_store(const thread simdgroup_matrix<T, Cols, Rows>& a, T* dst,
                         ulong elements_per_row, ulong2 origin, bool transpose,
                         std::source_location loc) {
  const char* op = "simdgroup_store";
  auto e = exchange(op, loc, MatrixAccess<T>{dst, elements_per_row, origin.x, origin.y, transpose,
                                             a.thread_elements()});
  if (!e.view.first) return;
  const void* at[64];
  matrix_addresses(e, op, loc, at);
  for (uint lane = 0; lane < 32; ++lane) {
    const uint i = matrix_row(lane) * 8 + matrix_col(lane);
    const vec<T, 2> v = e.value(lane).elements;
    *static_cast<T*>(const_cast<void*>(at[i])) = v[0];
    *static_cast<T*>(const_cast<void*>(at[i + 1])) = v[1];
  }
}

template <class TA, class TB, class TC>
struct Operands {
  vec<TA, 2> a;
  vec<TB, 2> b;
  vec<TC, 2> c;
};

// Unpacks one lane's pair into a full 8x8 matrix (as float).
template <class T>
inline void place(float m[8][8], uint lane, vec<T, 2> v) {
  m[matrix_row(lane)][matrix_col(lane)] = float(v[0]);
  m[matrix_row(lane)][matrix_col(lane) + 1] = float(v[1]);
}

// d = a * b (+ c when accumulate), for the SIMD-group: see the header comment for
// the order and rounding of the sums.
template <class TD, class TA, class TB, class TC>
inline vec<TD, 2> matrix_product(const char* op, std::source_location loc, vec<TA, 2> a,
                                 vec<TB, 2> b, vec<TC, 2> c, bool accumulate) {
  auto e = exchange(op, loc, Operands<TA, TB, TC>{a, b, c});
  if (e.view.first) {
    require_full_simdgroup(e, op, loc);
    float A[8][8], B[8][8], C[8][8];
    for (uint lane = 0; lane < 32; ++lane) {
      const Operands<TA, TB, TC>& x = e.value(lane);
      place(A, lane, x.a);
      place(B, lane, x.b);
      place(C, lane, x.c);
    }
    for (uint lane = 0; lane < 32; ++lane) {
      vec<TD, 2> out;
      for (uint k = 0; k < 2; ++k) {
        const uint i = matrix_row(lane), j = matrix_col(lane) + k;
        float sum = accumulate ? C[i][j] : 0.0f;
        if constexpr (!std::is_same_v<TD, float>) sum = float(TD(sum));
        for (uint p = 0; p < 8; ++p) {
          sum = std::fma(A[i][p], B[p][j], sum);
          if constexpr (!std::is_same_v<TD, float>) sum = float(TD(sum));
        }
        out[k] = TD(sum);
      }
      result_slot<vec<TD, 2>>(e.view, lane) = out;
    }
  }
  return result_slot<vec<TD, 2>>(e.view, e.view.lane);
}

}  // namespace detail

// Loads and stores: MSL overloads them for device and threadgroup pointers.
#if MH_DISTINCT_ADDRESS_SPACES
#define MH_MATRIX_MEMORY_FUNCTIONS(SPACE)                                                      \
  template <class T, int Cols, int Rows>                                                       \
  inline void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const SPACE T* src,    \
                             ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),  \
                             bool transpose_matrix = false, MH_MATRIX_LOC) {                   \
    detail::matrix_load(d, (const T*)src, elements_per_row, matrix_origin, transpose_matrix,   \
                        loc);                                                                  \
  }                                                                                            \
  template <class T, int Cols, int Rows>                                                       \
  inline void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, SPACE T* dst,          \
                              ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0), \
                              bool transpose_matrix = false, MH_MATRIX_LOC) {                  \
    detail::matrix_store(a, (T*)dst, elements_per_row, matrix_origin, transpose_matrix, loc);  \
  }
MH_MATRIX_MEMORY_FUNCTIONS(device)
MH_MATRIX_MEMORY_FUNCTIONS(threadgroup)
#undef MH_MATRIX_MEMORY_FUNCTIONS
#else
// Address spaces are erased in the harness: one overload serves both.
template <class T, int Cols, int Rows>
inline void simdgroup_load(thread simdgroup_matrix<T, Cols, Rows>& d, const T* src,
                           ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                           bool transpose_matrix = false, MH_MATRIX_LOC) {
  detail::matrix_load(d, src, elements_per_row, matrix_origin, transpose_matrix, loc);
}
template <class T, int Cols, int Rows>
inline void simdgroup_store(thread simdgroup_matrix<T, Cols, Rows> a, T* dst,
                            ulong elements_per_row = Cols, ulong2 matrix_origin = ulong2(0),
                            bool transpose_matrix = false, MH_MATRIX_LOC) {
  detail::matrix_store(a, dst, elements_per_row, matrix_origin, transpose_matrix, loc);
}
#endif

// d = a * b + c. The element types may differ (half or bfloat operands with a float
// accumulator, as llama.cpp's shipped Metal GEMM mixes them); shapes are 8x8.
template <class TD, class TA, class TB, class TC, int K, int Rows, int Cols>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, Cols, Rows>& d,
                                          const thread simdgroup_matrix<TA, K, Rows>& a,
                                          const thread simdgroup_matrix<TB, Cols, K>& b,
                                          const thread simdgroup_matrix<TC, Cols, Rows>& c,
                                          MH_MATRIX_LOC) {
  d.thread_elements() = detail::matrix_product<TD>("simdgroup_multiply_accumulate", loc,
                                                   a.thread_elements(), b.thread_elements(),
                                                   c.thread_elements(), true);
}

// d = a * b.
template <class TD, class TA, class TB, int K, int Rows, int Cols>
inline void simdgroup_multiply(thread simdgroup_matrix<TD, Cols, Rows>& d,
                               const thread simdgroup_matrix<TA, K, Rows>& a,
                               const thread simdgroup_matrix<TB, Cols, K>& b, MH_MATRIX_LOC) {
  d.thread_elements() = detail::matrix_product<TD>("simdgroup_multiply", loc, a.thread_elements(),
                                                   b.thread_elements(), vec<TD, 2>(TD(0)), false);
}

// a * b, a collective operation like simdgroup_multiply (reported at this line; the
// call path tells callers apart).
template <class T, int K, int Rows, int Cols>
inline simdgroup_matrix<T, Cols, Rows> operator*(const thread simdgroup_matrix<T, K, Rows>& a,
                                                 const thread simdgroup_matrix<T, Cols, K>& b) {
  simdgroup_matrix<T, Cols, Rows> d;
  d.thread_elements() =
      detail::matrix_product<T>("simdgroup_matrix operator*", std::source_location::current(),
                                a.thread_elements(), b.thread_elements(), vec<T, 2>(T(0)), false);
  return d;
}

#undef MH_MATRIX_LOC

}  // namespace metal
