// The chunk converters of convert.h: portable loops, the x86-64 native ones
// (intrinsics in functions built for their instruction set), and the choice
// between them, made once from CPUID.
#include "cpu/convert.h"

#include "cpu/vectorize.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define FL_NATIVE_X86 1
#include <immintrin.h>
#else
#define FL_NATIVE_X86 0
#endif

namespace fl::cpu {

namespace convert_impl {

namespace {

template <typename T>
FL_VECTOR_CLONES void widen_loop(const T* src, int n, float* dst) {
  FL_SIMD
  for (int i = 0; i < n; ++i) {
    dst[i] = to_float(src[i]);
  }
}

template <typename T>
FL_VECTOR_CLONES void narrow_loop(const float* src, int n, T* dst) {
  FL_SIMD
  for (int i = 0; i < n; ++i) {
    dst[i] = from_float<T>(src[i]);
  }
}

#if FL_NATIVE_X86
// Tails shorter than a vector go through the portable scalar code, which gives
// the same bits.
__attribute__((target("avx512f"))) void widen_half_avx512(const Half* src, int n, float* dst) {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    dst[i] = to_float(src[i]);
  }
}

__attribute__((target("avx512f"))) void narrow_half_avx512(const float* src, int n, Half* dst) {
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
  for (; i < n; ++i) {
    dst[i] = from_float<Half>(src[i]);
  }
}

__attribute__((target("avx,f16c"))) void widen_half_f16c(const Half* src, int n, float* dst) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  for (; i < n; ++i) {
    dst[i] = to_float(src[i]);
  }
}

__attribute__((target("avx,f16c"))) void narrow_half_f16c(const float* src, int n, Half* dst) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) {
    dst[i] = from_float<Half>(src[i]);
  }
}

// vcvtneps2bf16 rounds to nearest even and quiets NaNs as from_float does, but
// treats subnormal inputs as zero. A vector holding a nonzero subnormal (rare:
// |x| < 2^-126) is converted by the portable code instead.
__attribute__((target("avx512f,avx512bf16"))) void narrow_bfloat_avx512(const float* src, int n,
                                                                      BFloat* dst) {
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i min_normal = _mm512_set1_epi32(0x00800000);
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(src + i);
    // |bits| - 1 < 0x7fffff (unsigned): nonzero subnormal.
    __m512i mag = _mm512_and_si512(_mm512_castps_si512(v), abs_mask);
    __mmask16 subnormal = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(mag, one),
                                                  _mm512_sub_epi32(min_normal, one));
    if (__builtin_expect(subnormal != 0, 0)) {
      for (int k = 0; k < 16; ++k) {
        dst[i + k] = from_float<BFloat>(src[i + k]);
      }
      continue;
    }
    __m256bh b = _mm512_cvtneps_pbh(v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), reinterpret_cast<__m256i&>(b));
  }
  for (; i < n; ++i) {
    dst[i] = from_float<BFloat>(src[i]);
  }
}
#endif

// What this CPU has, asked once.
struct Features {
  bool avx512f = false;
  bool avx512bf16 = false;
  bool f16c = false;
};

const Features& features() {
  static const Features f = [] {
    Features r;
#if FL_NATIVE_X86
    __builtin_cpu_init();
    r.avx512f = __builtin_cpu_supports("avx512f");
    r.avx512bf16 = r.avx512f && __builtin_cpu_supports("avx512bf16");
    r.f16c = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
#endif
    return r;
  }();
  return f;
}

} // namespace

void widen_portable(const Half* src, int n, float* dst) {
  widen_loop(src, n, dst);
}
void widen_portable(const BFloat* src, int n, float* dst) {
  widen_loop(src, n, dst);
}
void narrow_portable(const float* src, int n, Half* dst) {
  narrow_loop(src, n, dst);
}
void narrow_portable(const float* src, int n, BFloat* dst) {
  narrow_loop(src, n, dst);
}

bool widen_native(const Half* src, int n, float* dst) {
#if FL_NATIVE_X86
  if (features().avx512f) {
    widen_half_avx512(src, n, dst);
    return true;
  }
  if (features().f16c) {
    widen_half_f16c(src, n, dst);
    return true;
  }
#endif
  (void)src, (void)n, (void)dst;
  return false;
}

bool narrow_native(const float* src, int n, Half* dst) {
#if FL_NATIVE_X86
  if (features().avx512f) {
    narrow_half_avx512(src, n, dst);
    return true;
  }
  if (features().f16c) {
    narrow_half_f16c(src, n, dst);
    return true;
  }
#endif
  (void)src, (void)n, (void)dst;
  return false;
}

bool narrow_native(const float* src, int n, BFloat* dst) {
#if FL_NATIVE_X86
  if (features().avx512bf16) {
    narrow_bfloat_avx512(src, n, dst);
    return true;
  }
#endif
  (void)src, (void)n, (void)dst;
  return false;
}

const char* native_kind(bool half, bool narrowing) {
  const Features& f = features();
  if (half) {
    return f.avx512f ? "avx512f" : (f.f16c ? "f16c" : "portable");
  }
  return narrowing && f.avx512bf16 ? "avx512bf16" : "portable";
}

} // namespace convert_impl

// The choice is a branch on cached flags per chunk (thousands of elements).
void widen(const Half* src, int n, float* dst) {
  if (!convert_impl::widen_native(src, n, dst)) {
    convert_impl::widen_portable(src, n, dst);
  }
}
void widen(const BFloat* src, int n, float* dst) {
  convert_impl::widen_portable(src, n, dst); // a shift: no instruction does better
}
void narrow(const float* src, int n, Half* dst) {
  if (!convert_impl::narrow_native(src, n, dst)) {
    convert_impl::narrow_portable(src, n, dst);
  }
}
void narrow(const float* src, int n, BFloat* dst) {
  if (!convert_impl::narrow_native(src, n, dst)) {
    convert_impl::narrow_portable(src, n, dst);
  }
}

} // namespace fl::cpu
