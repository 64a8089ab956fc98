// The subset of the Metal Shading Language standard library that our kernels use,
// written in C++20 for clang, shared by the two `metal_stdlib` shims:
//   include/metal_stdlib         address spaces erased: the kernels run on the CPU
//   static_include/metal_stdlib  address spaces as clang address_space attributes:
//                                syntax-only check of address-space rules
// Those wrappers include this file and then define the address-space keywords, so
// nothing here may spell `device`, `threadgroup`, `constant` or `thread`.
#pragma once

#include <bit>
#include <cfloat>  // FLT_MAX etc., which metal_stdlib also provides
#include <cmath>  // INFINITY, NAN, HUGE_VALF
#include <cstddef>
#include <cstdint>
#include <limits>
#include <source_location>
#include <type_traits>

#include "mh_hooks.h"

// Shared headers choose their Metal code path on this macro, as under `xcrun metal`
// -std=metal3.1 (CMakeLists.txt). A test may define another version.
#ifndef __METAL_VERSION__
#define __METAL_VERSION__ 310
#endif

// Apple's metal_stdlib spells helper functions METAL_FUNC (MLX's headers use it).
// Apple's is `inline __attribute__((__always_inline__))`; here plain `inline`: at
// -O0 a forced inline would fold a helper's SIMD call into its caller's frame and
// the runtime could no longer tell call paths apart (build.py).
#define METAL_FUNC inline

// MSL's float constants (metal_math).
#define MAXFLOAT 0x1.fffffep+127f
#define M_E_F 2.71828182845904523536028747135266250f
#define M_LOG2E_F 1.44269504088896340735992468100189214f
#define M_LOG10E_F 0.434294481903251827651128918916605082f
#define M_LN2_F 0.693147180559945309417232121458176568f
#define M_LN10_F 2.30258509299404568401799145468436421f
#define M_PI_F 3.14159265358979323846264338327950288f
#define M_PI_2_F 1.57079632679489661923132169163975144f
#define M_PI_4_F 0.785398163397448309615660845819875721f
#define M_1_PI_F 0.318309886183790671537767526745028724f
#define M_2_PI_F 0.636619772367581343075535053490057448f
#define M_2_SQRTPI_F 1.12837916709551257389615890312154517f
#define M_SQRT2_F 1.41421356237309504880168872420969808f
#define M_SQRT1_2_F 0.707106781186547524400844362104849039f

namespace metal {

using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;  // 64-bit, as in MSL
using half = _Float16;
// __bf16 converts and computes like Metal's bfloat: rounding to nearest even on
// every operation once excess precision is turned off (build.py does).
using bfloat = __bf16;
using std::size_t;
using std::ptrdiff_t;

// MSL's vec<T, N> is a clang ext_vector_type too, so swizzles (.x, .xy), element-
// wise arithmetic and splat from a scalar behave as in Metal.
template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

#define MH_VECTOR_TYPES(T)  \
  using T##2 = vec<T, 2>;   \
  using T##3 = vec<T, 3>;   \
  using T##4 = vec<T, 4>;
MH_VECTOR_TYPES(float)
MH_VECTOR_TYPES(half)
MH_VECTOR_TYPES(bfloat)
MH_VECTOR_TYPES(int)
MH_VECTOR_TYPES(uint)
MH_VECTOR_TYPES(short)
MH_VECTOR_TYPES(ushort)
MH_VECTOR_TYPES(char)
MH_VECTOR_TYPES(uchar)
MH_VECTOR_TYPES(long)
MH_VECTOR_TYPES(ulong)
#undef MH_VECTOR_TYPES

// MSL's <metal_type_traits> mirrors the C++ ones in namespace metal (MLX's
// headers spell metal::is_same_v, enable_if, bool_constant ...). Address spaces
// are erased here, so remove_addrspace_t is the identity.
using std::bool_constant;
using std::conditional;
using std::conditional_t;
using std::decay;
using std::decay_t;
using std::enable_if;
using std::enable_if_t;
using std::false_type;
using std::integral_constant;
using std::is_arithmetic;
using std::is_arithmetic_v;
using std::is_convertible;
using std::is_convertible_v;
using std::is_floating_point;
using std::is_floating_point_v;
using std::is_integral;
using std::is_integral_v;
using std::is_same;
using std::is_same_v;
using std::is_signed;
using std::is_signed_v;
using std::make_unsigned;
using std::make_unsigned_t;
using std::remove_const_t;
using std::remove_cv;
using std::remove_cv_t;
using std::remove_reference_t;
using std::true_type;
template <class T>
struct remove_addrspace {
  using type = T;
};
template <class T>
using remove_addrspace_t = typename remove_addrspace<T>::type;

namespace detail {

template <class V>
struct vec_traits {
  static constexpr int size = 1;  // a scalar counts as one element
  using elem = V;
};
template <class T, int N>
struct vec_traits<vec<T, N>> {
  static constexpr int size = N;
  using elem = T;
};
template <class V>
using elem_t = typename vec_traits<V>::elem;
template <class V>
inline constexpr bool is_vector = vec_traits<V>::size > 1;

template <class T>
concept Floating =
    std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;
template <class T>
concept FloatLike = Floating<elem_t<T>>;
template <class T>
concept Arithmetic = Floating<elem_t<T>> || std::is_integral_v<elem_t<T>>;

// Applies f to every element (or to the scalar), computing in float: Metal's half and
// bfloat functions return the correctly rounded float result rounded to the type,
// which is what this models.
template <class T, class F>
inline T map(T x, F f) {
  using E = elem_t<T>;
  if constexpr (is_vector<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::size; ++i) r[i] = E(f(float(x[i])));
    return r;
  } else {
    return E(f(float(x)));
  }
}
template <class T, class F>
inline T map2(T x, T y, F f) {
  using E = elem_t<T>;
  if constexpr (is_vector<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::size; ++i) r[i] = E(f(float(x[i]), float(y[i])));
    return r;
  } else {
    return E(f(float(x), float(y)));
  }
}
template <class T, class F>
inline T map3(T x, T y, T z, F f) {
  using E = elem_t<T>;
  if constexpr (is_vector<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::size; ++i)
      r[i] = E(f(float(x[i]), float(y[i]), float(z[i])));
    return r;
  } else {
    return E(f(float(x), float(y), float(z)));
  }
}

// Element-wise for any arithmetic type, in the element type itself (integers must
// not go through float).
template <class T, class F>
inline T map_native2(T x, T y, F f) {
  if constexpr (is_vector<T>) {
    T r;
    for (int i = 0; i < vec_traits<T>::size; ++i) r[i] = f(x[i], y[i]);
    return r;
  } else {
    return f(x, y);
  }
}

// Flattens constructor arguments (scalars and vectors) into out[k...].
template <class E, class A>
inline void append(E* out, int& k, A a) {
  if constexpr (is_vector<A>) {
    for (int i = 0; i < vec_traits<A>::size; ++i) out[k++] = E(a[i]);
  } else {
    out[k++] = E(a);
  }
}

}  // namespace detail

// Metal's vector constructors: float4(x) splats, float4(h4) converts element-wise,
// float4(a, b, c, d) and float4(v2, z, w) concatenate. C++ has no constructors for
// ext vectors, so the macros at the end of this file route `floatN(...)` here.
template <class T, int N, class... A>
inline vec<T, N> mh_make_vec(A... a) {
  if constexpr (sizeof...(A) == 1 && (detail::is_vector<A> && ...)) {
    static_assert(((detail::vec_traits<A>::size == N) && ...), "vector size mismatch");
    return [](auto v) { return __builtin_convertvector(v, vec<T, N>); }(a...);
  } else if constexpr (sizeof...(A) == 1) {
    return vec<T, N>(T(a...));
  } else {
    static_assert((detail::vec_traits<A>::size + ...) == N,
                  "vector constructor needs exactly N elements");
    T e[N];
    int k = 0;
    (detail::append(e, k, a), ...);
    vec<T, N> r;
    for (int i = 0; i < N; ++i) r[i] = e[i];
    return r;
  }
}

template <class To, class From>
inline To as_type(From x) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs types of equal size");
  return __builtin_bit_cast(To, x);
}

template <class T>
struct numeric_limits : std::numeric_limits<T> {};

// libstdc++ 12 has no numeric_limits for _Float16 or __bf16; the bit patterns are
// those of IEEE binary16 and of bfloat16.
template <class T, uint16_t Inf, uint16_t Max, uint16_t Min, uint16_t Eps, uint16_t NaN>
struct float16_limits {
  static constexpr bool is_specialized = true;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr T infinity() { return __builtin_bit_cast(T, Inf); }
  static constexpr T max() { return __builtin_bit_cast(T, Max); }
  static constexpr T lowest() { return __builtin_bit_cast(T, uint16_t(Max | 0x8000u)); }
  static constexpr T min() { return __builtin_bit_cast(T, Min); }
  static constexpr T epsilon() { return __builtin_bit_cast(T, Eps); }
  static constexpr T quiet_NaN() { return __builtin_bit_cast(T, NaN); }
};
template <>
struct numeric_limits<half> : float16_limits<half, 0x7c00, 0x7bff, 0x0400, 0x1400, 0x7e00> {};
template <>
struct numeric_limits<bfloat>
    : float16_limits<bfloat, 0x7f80, 0x7f7f, 0x0080, 0x3c00, 0x7fc0> {};

// ---- math ---------------------------------------------------------------------

#define MH_UNARY(name, expr)                    \
  template <detail::FloatLike T>                \
  inline T name(T x) {                          \
    return detail::map(x, [](float v) { return expr; }); \
  }

// The float-only functions, shared by metal::, metal::precise:: and metal::fast::.
// The CPU computes them to within an ulp in every flavour; Metal's fast:: versions
// are less accurate, so tests compare against references with tolerances.
#define MH_TRANSCENDENTALS                                      \
  MH_UNARY(exp, std::exp(v))                                    \
  MH_UNARY(exp2, std::exp2(v))                                  \
  MH_UNARY(exp10, std::pow(10.0f, v))                           \
  MH_UNARY(log, std::log(v))                                    \
  MH_UNARY(log2, std::log2(v))                                  \
  MH_UNARY(log10, std::log10(v))                                \
  MH_UNARY(sqrt, std::sqrt(v))                                  \
  MH_UNARY(rsqrt, 1.0f / std::sqrt(v))                          \
  MH_UNARY(tanh, std::tanh(v))                                  \
  MH_UNARY(sin, std::sin(v))                                    \
  MH_UNARY(cos, std::cos(v))                                    \
  template <detail::FloatLike T>                                \
  inline T pow(T x, T y) {                                      \
    return detail::map2(x, y, [](float a, float b) { return std::pow(a, b); }); \
  }                                                             \
  template <detail::FloatLike T>                                \
  inline T powr(T x, T y) {                                     \
    return detail::map2(x, y, [](float a, float b) { return std::pow(a, b); }); \
  }                                                             \
  template <detail::FloatLike T>                                \
  inline T divide(T x, T y) {                                   \
    return x / y;                                               \
  }

MH_TRANSCENDENTALS
namespace precise {
MH_TRANSCENDENTALS
}
namespace fast {
MH_TRANSCENDENTALS
}
#undef MH_TRANSCENDENTALS

MH_UNARY(log1p, std::log1p(v))
MH_UNARY(expm1, std::expm1(v))
MH_UNARY(fabs, std::fabs(v))
MH_UNARY(floor, std::floor(v))
MH_UNARY(ceil, std::ceil(v))
MH_UNARY(trunc, std::trunc(v))
MH_UNARY(round, std::round(v))  // halfway cases away from zero, as in Metal
MH_UNARY(rint, std::rint(v))
MH_UNARY(fract, std::fmin(v - std::floor(v), 0x1.fffffep-1f))
MH_UNARY(saturate, std::fmin(std::fmax(v, 0.0f), 1.0f))
MH_UNARY(sign, v > 0.0f ? 1.0f : v < 0.0f ? -1.0f : v == 0.0f ? v : 0.0f)
MH_UNARY(erf, std::erf(v))
#undef MH_UNARY

template <detail::FloatLike T>
inline T fmax(T x, T y) {
  return detail::map2(x, y, [](float a, float b) { return std::fmax(a, b); });
}
template <detail::FloatLike T>
inline T fmin(T x, T y) {
  return detail::map2(x, y, [](float a, float b) { return std::fmin(a, b); });
}
template <detail::FloatLike T>
inline T copysign(T x, T y) {
  return detail::map2(x, y, [](float a, float b) { return std::copysign(a, b); });
}
template <detail::FloatLike T>
inline T fmod(T x, T y) {
  return detail::map2(x, y, [](float a, float b) { return std::fmod(a, b); });
}
// fma rounds once, like the GPU's fused multiply-add.
template <detail::FloatLike T>
inline T fma(T a, T b, T c) {
  return detail::map3(a, b, c, [](float x, float y, float z) { return std::fma(x, y, z); });
}
template <detail::FloatLike T>
inline T mix(T x, T y, T a) {
  return x + (y - x) * a;
}

// max/min/abs/clamp take floats (with fmax/fmin NaN rules, as Metal's do) and integers.
template <detail::Arithmetic T>
inline T max(T x, T y) {
  if constexpr (detail::FloatLike<T>) return fmax(x, y);
  else return detail::map_native2(x, y, [](auto a, auto b) { return a > b ? a : b; });
}
template <detail::Arithmetic T>
inline T min(T x, T y) {
  if constexpr (detail::FloatLike<T>) return fmin(x, y);
  else return detail::map_native2(x, y, [](auto a, auto b) { return a < b ? a : b; });
}
template <detail::Arithmetic T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}
template <detail::Arithmetic T>
inline T abs(T x) {
  if constexpr (detail::FloatLike<T>) return fabs(x);
  else return detail::map_native2(x, x, [](auto a, auto) { return a < 0 ? -a : a; });
}

template <detail::Floating T>
inline bool isnan(T x) {
  return std::isnan(float(x));
}
template <detail::Floating T>
inline bool isinf(T x) {
  return std::isinf(float(x));
}
template <detail::Floating T>
inline bool isfinite(T x) {
  return std::isfinite(float(x));
}
template <detail::Floating T>
inline bool signbit(T x) {
  return std::signbit(float(x));
}

// select(a, b, c) is c ? b : a, element-wise for a vector condition.
template <class T, class C>
inline T select(T a, T b, C c) {
  if constexpr (detail::is_vector<C>) {
    T r;
    for (int i = 0; i < detail::vec_traits<T>::size; ++i) r[i] = c[i] ? b[i] : a[i];
    return r;
  } else {
    return c ? b : a;
  }
}

template <class T, int N>
inline T dot(vec<T, N> a, vec<T, N> b) {
  T s = a[0] * b[0];
  for (int i = 1; i < N; ++i) s += a[i] * b[i];
  return s;
}

// ---- synchronisation ------------------------------------------------------------

enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(unsigned(a) | unsigned(b));
}

// The flags say which memory the barrier orders; the runtime's strict memory
// model (metal_host.h, Schedule::memory) honours them: mem_none publishes nothing.
inline void threadgroup_barrier(mem_flags flags,
                                std::source_location loc = std::source_location::current()) {
  mh::detail::threadgroup_barrier({"threadgroup_barrier", loc}, unsigned(flags));
}
// A SIMD-group is the runtime's unit of memory visibility, so this only
// synchronises the lanes.
inline void simdgroup_barrier(mem_flags,
                              std::source_location loc = std::source_location::current()) {
  mh::detail::simd_exchange({"simdgroup_barrier", loc}, nullptr, 0);
}

// ---- SIMD-group functions -------------------------------------------------------
//
// Each lane deposits its value (and, for shuffles, its argument) and waits for the
// other live lanes of its SIMD-group at the same call site; then every lane computes
// its own result from all deposits. Results are deterministic (fixed reduction
// order), so runs under different schedules can be compared bit for bit.

namespace detail {

template <class T>
struct Deposit {
  T value;
  uint arg;  // shuffle delta / source lane / mask; must be uniform where Metal says so
};

template <class T>
struct Exchange {
  mh::detail::SimdView view;
  const Deposit<T>& at(unsigned lane) const {
    return *reinterpret_cast<const Deposit<T>*>(view.slots + lane * mh::detail::kSimdSlotBytes);
  }
  T value(unsigned lane) const { return at(lane).value; }
};

template <class T>
inline Exchange<T> exchange(const char* op, std::source_location loc, T x, uint arg = 0) {
  static_assert(sizeof(Deposit<T>) <= mh::detail::kSimdSlotBytes, "SIMD value too large");
  static_assert(std::is_trivially_copyable_v<T>);
  Deposit<T> d{x, arg};
  return {mh::detail::simd_exchange({op, loc}, &d, sizeof d)};
}

template <class T>
inline void require_uniform_arg(const Exchange<T>& e, const char* op, std::source_location loc) {
  for (unsigned i = 0; i < e.view.live; ++i)
    if (e.at(i).arg != e.at(e.view.lane).arg)
      mh::detail::fail({op, loc}, "the lane/delta argument must be the same in all lanes");
}

// Reading a lane that does not exist (beyond a partial SIMD-group, or past lane 31)
// is undefined in Metal: return the schedule's poison so that a kernel relying on
// it produces visibly wrong, schedule-dependent output.
template <class T>
inline T lane_or_poison(const Exchange<T>& e, unsigned src) {
  if (src < e.view.live) return e.value(src);
  unsigned char bytes[sizeof(T)];
  mh::detail::fill_poison(bytes, sizeof bytes);
  return __builtin_bit_cast(T, bytes);
}

// Reduces over the live lanes in butterfly order (lane i with lane i^16, ^8, ...),
// which is how a GPU's tree reduction pairs lanes; every lane gets the same bits.
template <class T, class F>
inline T butterfly(const Exchange<T>& e, F combine) {
  T v[32];
  unsigned n = 1;
  while (n < e.view.live) n *= 2;
  for (unsigned i = 0; i < n; ++i) v[i] = e.value(i < e.view.live ? i : 0);
  for (unsigned width = n / 2; width >= 1; width /= 2)
    for (unsigned i = 0; i < width; ++i)
      v[i] = (i + width < e.view.live) ? combine(v[i], v[i + width]) : v[i];
  return v[0];
}

}  // namespace detail

#define MH_LOC std::source_location loc = std::source_location::current()

template <detail::Arithmetic T>
inline T simd_sum(T x, MH_LOC) {
  auto e = detail::exchange("simd_sum", loc, x);
  return detail::butterfly(e, [](T a, T b) { return T(a + b); });
}
template <detail::Arithmetic T>
inline T simd_product(T x, MH_LOC) {
  auto e = detail::exchange("simd_product", loc, x);
  return detail::butterfly(e, [](T a, T b) { return T(a * b); });
}
template <detail::Arithmetic T>
inline T simd_max(T x, MH_LOC) {
  auto e = detail::exchange("simd_max", loc, x);
  return detail::butterfly(e, [](T a, T b) { return max(a, b); });
}
template <detail::Arithmetic T>
inline T simd_min(T x, MH_LOC) {
  auto e = detail::exchange("simd_min", loc, x);
  return detail::butterfly(e, [](T a, T b) { return min(a, b); });
}
template <detail::Arithmetic T>
inline T simd_prefix_exclusive_sum(T x, MH_LOC) {
  auto e = detail::exchange("simd_prefix_exclusive_sum", loc, x);
  T s = T(0);
  for (unsigned i = 0; i < e.view.lane; ++i) s = T(s + e.value(i));
  return s;
}
template <detail::Arithmetic T>
inline T simd_prefix_inclusive_sum(T x, MH_LOC) {
  auto e = detail::exchange("simd_prefix_inclusive_sum", loc, x);
  T s = e.value(0);
  for (unsigned i = 1; i <= e.view.lane; ++i) s = T(s + e.value(i));
  return s;
}
// Lanes whose source would be past lane 31 keep their own value (Metal does not wrap).
template <class T>
inline T simd_shuffle_down(T x, ushort delta, MH_LOC) {
  auto e = detail::exchange("simd_shuffle_down", loc, x, delta);
  detail::require_uniform_arg(e, "simd_shuffle_down", loc);
  unsigned src = e.view.lane + delta;
  return src < 32 ? detail::lane_or_poison(e, src) : x;
}
template <class T>
inline T simd_shuffle_up(T x, ushort delta, MH_LOC) {
  auto e = detail::exchange("simd_shuffle_up", loc, x, delta);
  detail::require_uniform_arg(e, "simd_shuffle_up", loc);
  return e.view.lane >= delta ? detail::lane_or_poison(e, e.view.lane - delta) : x;
}
template <class T>
inline T simd_shuffle_xor(T x, ushort mask, MH_LOC) {
  auto e = detail::exchange("simd_shuffle_xor", loc, x, mask);
  detail::require_uniform_arg(e, "simd_shuffle_xor", loc);
  return detail::lane_or_poison(e, e.view.lane ^ mask);
}
template <class T>
inline T simd_shuffle(T x, ushort lane, MH_LOC) {
  auto e = detail::exchange("simd_shuffle", loc, x, lane);
  return detail::lane_or_poison(e, lane);
}
template <class T>
inline T simd_broadcast(T x, ushort lane, MH_LOC) {
  auto e = detail::exchange("simd_broadcast", loc, x, lane);
  detail::require_uniform_arg(e, "simd_broadcast", loc);
  return detail::lane_or_poison(e, lane);
}
template <class T>
inline T simd_broadcast_first(T x, MH_LOC) {
  return detail::exchange("simd_broadcast_first", loc, x).value(0);
}
inline bool simd_all(bool x, MH_LOC) {
  auto e = detail::exchange("simd_all", loc, x);
  for (unsigned i = 0; i < e.view.live; ++i)
    if (!e.value(i)) return false;
  return true;
}
inline bool simd_any(bool x, MH_LOC) {
  auto e = detail::exchange("simd_any", loc, x);
  for (unsigned i = 0; i < e.view.live; ++i)
    if (e.value(i)) return true;
  return false;
}
#undef MH_LOC

}  // namespace metal

// `floatN(...)` must construct a vector (see mh_make_vec). A function-like macro only
// expands when the name is followed by '(', so `float4 v;` and `float4 f(...)`
// still name the type; `metal::float4(x)` works too.
#define float2(...) mh_make_vec<float, 2>(__VA_ARGS__)
#define float3(...) mh_make_vec<float, 3>(__VA_ARGS__)
#define float4(...) mh_make_vec<float, 4>(__VA_ARGS__)
#define half2(...) mh_make_vec<::metal::half, 2>(__VA_ARGS__)
#define half3(...) mh_make_vec<::metal::half, 3>(__VA_ARGS__)
#define half4(...) mh_make_vec<::metal::half, 4>(__VA_ARGS__)
#define bfloat2(...) mh_make_vec<::metal::bfloat, 2>(__VA_ARGS__)
#define bfloat3(...) mh_make_vec<::metal::bfloat, 3>(__VA_ARGS__)
#define bfloat4(...) mh_make_vec<::metal::bfloat, 4>(__VA_ARGS__)
#define int2(...) mh_make_vec<int, 2>(__VA_ARGS__)
#define int3(...) mh_make_vec<int, 3>(__VA_ARGS__)
#define int4(...) mh_make_vec<int, 4>(__VA_ARGS__)
#define uint2(...) mh_make_vec<::metal::uint, 2>(__VA_ARGS__)
#define uint3(...) mh_make_vec<::metal::uint, 3>(__VA_ARGS__)
#define uint4(...) mh_make_vec<::metal::uint, 4>(__VA_ARGS__)
#define long2(...) mh_make_vec<long, 2>(__VA_ARGS__)
#define ulong2(...) mh_make_vec<::metal::ulong, 2>(__VA_ARGS__)
#define ulong3(...) mh_make_vec<::metal::ulong, 3>(__VA_ARGS__)
#define short2(...) mh_make_vec<short, 2>(__VA_ARGS__)
#define ushort2(...) mh_make_vec<::metal::ushort, 2>(__VA_ARGS__)

// MSL's scalar and vector type names are global (builtin types), whether or not a
// header says `using namespace metal` (MLX's steel headers spell short2, int2,
// ulong2 ... inside namespace mlx::steel).
using metal::bfloat;
using metal::half;
using metal::uchar;
using metal::uint;
using metal::ulong;
using metal::ushort;
#define MH_GLOBAL_VECTOR_TYPES(T) \
  using metal::T##2;              \
  using metal::T##3;              \
  using metal::T##4;
MH_GLOBAL_VECTOR_TYPES(float)
MH_GLOBAL_VECTOR_TYPES(half)
MH_GLOBAL_VECTOR_TYPES(bfloat)
MH_GLOBAL_VECTOR_TYPES(int)
MH_GLOBAL_VECTOR_TYPES(uint)
MH_GLOBAL_VECTOR_TYPES(short)
MH_GLOBAL_VECTOR_TYPES(ushort)
MH_GLOBAL_VECTOR_TYPES(char)
MH_GLOBAL_VECTOR_TYPES(uchar)
MH_GLOBAL_VECTOR_TYPES(long)
MH_GLOBAL_VECTOR_TYPES(ulong)
#undef MH_GLOBAL_VECTOR_TYPES

// Lets the macros above work with or without `using namespace metal`.
using metal::mh_make_vec;

// Metal kernels are entry points, not C++ declarations: `kernel void f(...)`.
#define kernel
