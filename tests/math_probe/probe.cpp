// Element-wise entry points over csrc/math for tests/test_math.py: the shared
// formulas compiled as the CPU kernels compile them (C++ path, same flags that
// matter: strict IEEE, -fno-trapping-math), callable through ctypes.
#include <cstdint>

#include "cpu/dtype.h"
#include "math/focal.h"
#include "math/transcendental.h"

extern "C" {

void probe_exp(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::exp_f32(x[i]);
}

void probe_exp_nonpos(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::exp_nonpos_f32(x[i]);
}

void probe_exp_neg(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::exp_neg_f32(x[i]);
}

void probe_log(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::log_f32(x[i]);
}

void probe_log1p(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::log1p_f32(x[i]);
}

void probe_log1p_unit(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::log1p_unit(x[i]);
}

void probe_pow_unit(const float* x, float gamma, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = flm::pow_unit(x[i], gamma);
}

// float32 -> half / bfloat16 bits -> float32, through the CPU kernels' converters.
void probe_half_roundtrip(const float* x, uint16_t* bits, float* back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    auto h = fl::cpu::from_float<fl::cpu::Half>(x[i]);
    bits[i] = h.bits;
    back[i] = fl::cpu::to_float(h);
  }
}

void probe_bfloat_roundtrip(const float* x, uint16_t* bits, float* back, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    auto b = fl::cpu::from_float<fl::cpu::BFloat>(x[i]);
    bits[i] = b.bits;
    back[i] = fl::cpu::to_float(b);
  }
}
}

// The chunk converters of csrc/cpu/convert.h, native and portable side by side
// (compiled here from the kernels' own source). Each returns 1 when this CPU
// has the native converter (and `native` was written), else 0.
#include "cpu/convert.cpp"

extern "C" {

int probe_widen_half(const uint16_t* x, float* native, float* portable, int64_t n) {
  auto* h = reinterpret_cast<const fl::cpu::Half*>(x);
  fl::cpu::convert_impl::widen_portable(h, int(n), portable);
  return fl::cpu::convert_impl::widen_native(h, int(n), native) ? 1 : 0;
}

int probe_narrow_half(const float* x, uint16_t* native, uint16_t* portable, int64_t n) {
  fl::cpu::convert_impl::narrow_portable(x, int(n), reinterpret_cast<fl::cpu::Half*>(portable));
  return fl::cpu::convert_impl::narrow_native(x, int(n), reinterpret_cast<fl::cpu::Half*>(native)) ? 1 : 0;
}

int probe_narrow_bfloat(const float* x, uint16_t* native, uint16_t* portable, int64_t n) {
  fl::cpu::convert_impl::narrow_portable(x, int(n), reinterpret_cast<fl::cpu::BFloat*>(portable));
  return fl::cpu::convert_impl::narrow_native(x, int(n), reinterpret_cast<fl::cpu::BFloat*>(native)) ? 1 : 0;
}

const char* probe_convert_kind(int half, int narrowing) {
  return fl::cpu::convert_impl::native_kind(half != 0, narrowing != 0);
}
}
