// Chunk converters between the 16-bit storage types and float32, used by every
// CPU kernel at the edges of its float32 loops (a chunk in L1 is widened, the
// loop runs on float32, the results are narrowed back).
//
// Each direction has a portable version (the integer arithmetic of dtype.h,
// vectorized) and, on x86-64, a native one picked once at run time: F16C or
// AVX-512F vcvtph2ps/vcvtps2ph for half, AVX512-BF16 vcvtneps2bf16 for
// bfloat16 (bfloat16 -> float32 is a 16-bit shift either way). The native
// versions are bit-exact with the portable ones on every input (checked in
// tests/test_math.py on all 65536 16-bit patterns and on float32 rounding,
// NaN, infinity and subnormal cases), so the instruction set never changes a
// result.
#pragma once

#include <type_traits>

#include "cpu/dtype.h"
#include "cpu/vectorize.h"

namespace fl::cpu {

void widen(const Half* src, int n, float* dst);
void widen(const BFloat* src, int n, float* dst);
void narrow(const float* src, int n, Half* dst);
void narrow(const float* src, int n, BFloat* dst);

// The implementations, for the bit-exactness tests: `native` is false when
// this CPU (or build) has no native converter for that direction, and then
// the call did nothing.
namespace convert_impl {
void widen_portable(const Half* src, int n, float* dst);
void widen_portable(const BFloat* src, int n, float* dst);
void narrow_portable(const float* src, int n, Half* dst);
void narrow_portable(const float* src, int n, BFloat* dst);
bool widen_native(const Half* src, int n, float* dst);
bool narrow_native(const float* src, int n, Half* dst);
bool narrow_native(const float* src, int n, BFloat* dst);
// "avx512bf16", "avx512f", "f16c" or "portable": what widen/narrow use here.
const char* native_kind(bool half, bool narrowing);
} // namespace convert_impl

// A chunk of 16-bit (or float32) elements as float32: the source itself for
// float32, else widened into `buf` (kChunk floats).
template <typename T>
FLM_INLINE const float* chunk_as_float(const T* src, int n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    widen(src, n, buf);
    return buf;
  }
}

// Asks the caches for elements [c0, c0 + kChunk) of 16-bit elements at x that lie
// below `end` (the row's or the range's end), one chunk ahead of their widening (chunk_as_float). Hardware
// prefetchers follow a stream only within a 4 KB page, and a chunk of 16-bit
// elements is one page that is read in one burst (the widening) between runs
// of arithmetic on L1: without this, each chunk's loads wait for memory anew.
// float32 chunks are read in place by the loops that compute on them (the
// row loop fuses its max pass into them, see row_reduce.h), and there prefetching measured no
// gain, so it is left out. A prefetch never faults; it is kept inside the
// data anyway.
template <typename T>
FLM_INLINE void prefetch_chunk(const T* x, int64_t c0, int64_t end) {
  if constexpr (!std::is_same_v<T, float>) {
    if (c0 >= end) {
      return;
    }
    const char* p = reinterpret_cast<const char*>(x + c0);
    const char* stop = reinterpret_cast<const char*>(x + std::min<int64_t>(c0 + kChunk, end));
    for (; p < stop; p += 64) {
      __builtin_prefetch(p, 0, 3);
    }
  }
}

// Where a loop writes a chunk of float32 results bound for `dst`: `dst`
// itself for float32, else `buf`, to be narrowed by store_chunk.
template <typename T>
FLM_INLINE float* chunk_out(T* dst, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return dst;
  } else {
    return buf;
  }
}

template <typename T>
FLM_INLINE void store_chunk(const float* results, int n, T* dst) {
  if constexpr (!std::is_same_v<T, float>) {
    narrow(results, n, dst);
  }
}

} // namespace fl::cpu
