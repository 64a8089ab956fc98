// Stand-in for MLX's kernels/complex.h in the harness and the static check ONLY
// (build.py and static_check.py put this directory before MLX's headers; the
// metallib built on a Mac includes MLX's own complex.h).
//
// Why: MLX's complex_t overloads its constructors on the address space of `this`
// (`complex_t() thread`, `complex_t() threadgroup`, ...), which C++ cannot express
// once the address spaces are erased. The steel GEMM headers (steel/gemm/mma.h)
// name complex64_t only in specialisations for complex GEMMs (TransformNone,
// BlockMMA<complex64_t, ...>), which no kernel of this project instantiates; this
// declares the type with the members those specialisations spell so that the real
// steel headers compile and run here unchanged.
#pragma once

#include <metal_stdlib>

struct complex64_t {
  float real;
  float imag;
  constexpr complex64_t(float r, float i) : real(r), imag(i) {}
  constexpr complex64_t() : real(0), imag(0) {}
};
