// Stand-in for MLX's kernels/steel/utils/type_traits.h in the CPU harness ONLY
// (build.py puts this directory before MLX's headers; the static check and the
// metallib built on a Mac use MLX's own file).
//
// Why: MLX specialises pointer_element once per address space (`thread T*`,
// `device T*`, `constant T*`, `threadgroup T*`); with the address spaces erased,
// as the harness must (all memory is host memory), three of those are the same
// specialisation and C++ rejects the redefinition. These are compile-time traits
// only: the same names with the same results for every pointer the steel GEMM
// headers pass, so the loader and MMA code that runs here is MLX's, unchanged.
#pragma once

#include <metal_stdlib>

namespace metal {

template <typename T>
struct is_empty : bool_constant<__is_empty(T)> {};
template <typename T>
constexpr constant bool is_empty_v = is_empty<T>::value;

template <typename... Ts>
struct make_void {
  typedef void type;
};
template <typename... Ts>
using void_t = typename make_void<Ts...>::type;

template <class T>
struct is_static : bool_constant<is_empty<remove_cv_t<T>>::value> {};

// One specialisation serves every address space here.
template <typename T>
struct pointer_element {};
template <typename T>
struct pointer_element<T*> {
  using type = remove_cv_t<T>;
};
template <typename T>
using pointer_element_t = typename pointer_element<remove_cv_t<T>>::type;

}  // namespace metal
