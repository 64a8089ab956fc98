// The row loop shared by the row-wise losses (cross-entropy, softmax focal):
// an online log-sum-exp over L1-sized chunks, so each logit comes from memory
// once, with a hook for the loss's own per-chunk sums.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/convert.h"
#include "cpu/dtype.h"
#include "cpu/vectorize.h"
#include "math/cross_entropy.h"


namespace fl::cpu {

// Calls f(c0, n) for the chunks [c0, c0 + n) of a row of K elements, in order.
// c0 is 64-bit: with K near 2^31, c0 + kChunk would overflow an int.
template <typename F>
FLM_INLINE void for_each_chunk(int num_classes, F&& f) {
  for (int64_t c0 = 0; c0 < num_classes; c0 += kChunk) {
    f(c0, int(std::min<int64_t>(kChunk, num_classes - c0)));
  }
}

// Max of n floats (in L1). A single vector accumulator would make this a chain
// of dependent max instructions (latency-bound: ~4 cycles per vector); four
// independent ones over the four quarters let it run at load throughput. The
// max is exact, so the split changes no result.
FLM_INLINE float chunk_max(const float* xv, int n) {
  const int q = n / 4;
  float m0 = -flm::kInf, m1 = -flm::kInf, m2 = -flm::kInf, m3 = -flm::kInf;
  FL_SIMD_REDUCE(reduction(max : m0, m1, m2, m3))
  for (int i = 0; i < q; ++i) {
    m0 = flm::fmax(m0, xv[i]);
    m1 = flm::fmax(m1, xv[i + q]);
    m2 = flm::fmax(m2, xv[i + 2 * q]);
    m3 = flm::fmax(m3, xv[i + 3 * q]);
  }
  for (int i = 4 * q; i < n; ++i) {
    m3 = flm::fmax(m3, xv[i]);
  }
  return flm::fmax(flm::fmax(m0, m1), flm::fmax(m2, m3));
}

// Runs one pass over the K logits of row `x`. For each chunk it calls
//     float chunk_fn(const float* xv, int64_t c0, int n, flm::MaxMove mv,
//                    const float* next, float& next_max, auto fuse)
// which must return sum_i exp(xv[i] - mv.shift) over the chunk, after moving
// any sums of its own kept relative to the previous max (mv.scale for
// exp-sums, mv.delta for gaps; see math/cross_entropy.h). When `fuse` is
// std::true_type, `next` holds the following chunk (n elements too) and the
// same loop must also set next_max = the max of next[0, n).
//
// Why fused: a chunk's max has to be known before its exps, so the chunk is
// read twice, once from memory and once from L1. Done as two loops, the
// first waits for memory and the second for the arithmetic, one after the
// other (while the exps run, no load reaches memory and the hardware
// prefetcher idles). Taking the next chunk's max inside this chunk's exp loop
// keeps memory and arithmetic busy together. The max is exact, so where it is
// taken changes no result. The last chunk (shorter) and 16-bit rows (widened
// first, by convert.h's native converters) take their max in a loop of its own.
template <typename T, typename ChunkFn>
FLM_INLINE flm::LseState online_row(const T* x, int num_classes, ChunkFn&& chunk_fn) {
  flm::LseState st = flm::lse_empty();
  constexpr bool kWiden = !std::is_same_v<T, float>;
  float buf[kWiden ? 2 : 1][kWiden ? kChunk : 1];
  int n = int(std::min<int64_t>(kChunk, num_classes));
  const float* xv = chunk_as_float(x, n, buf[0]);
  float cmax = n > 0 ? chunk_max(xv, n) : -flm::kInf;
  int which = 0;
  for (int64_t c0 = 0; c0 < num_classes; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk; // 64-bit: c0 + kChunk may pass 2^31
    const int n1 = c1 < num_classes ? int(std::min<int64_t>(kChunk, num_classes - c1)) : 0;
    float m = flm::fmax(st.max, cmax);
    flm::MaxMove mv = flm::max_move(st.max, m);
    which ^= kWiden ? 1 : 0;
    prefetch_chunk(x, c1 + kChunk, num_classes); // widened by the next step
    const float* next = n1 > 0 ? chunk_as_float(x + c1, n1, buf[which]) : nullptr;
    float next_max = -flm::kInf;
    float s;
    if (!kWiden && n1 == n) {
      s = chunk_fn(xv, c0, n, mv, next, next_max, std::true_type{});
    } else {
      s = chunk_fn(xv, c0, n, mv, next, next_max, std::false_type{});
      next_max = n1 > 0 ? chunk_max(next, n1) : -flm::kInf;
    }
    st.sum = st.sum * mv.scale + s;
    st.max = m;
    xv = next;
    n = n1;
    cmax = next_max;
  }
  return st;
}

// The running argmax (math/cross_entropy.h: the first maximal element, as
// mx.argmax) after a chunk [c0, c0 + n) of floats in L1: the chunk's max key
// (an integer max: vectorizes), then, only where it beats the running one,
// the first index holding it.
FLM_INLINE flm::ArgMax chunk_argmax(flm::ArgMax best, const float* v, int64_t c0, int n) {
  flm::u32 km = 0u;
  FL_SIMD_REDUCE(reduction(max : km))
  for (int i = 0; i < n; ++i) {
    km = std::max(km, flm::argmax_key(v[i]));
  }
  if (km <= best.key) {
    return best; // (a tie: the earlier index stays)
  }
  int i = 0;
  while (flm::argmax_key(v[i]) != km) {
    ++i;
  }
  return flm::ArgMax{km, flm::i32(c0 + i)};
}

// The argmax of a whole row of n floats.
FLM_INLINE int64_t row_argmax(const float* v, int64_t n) {
  flm::ArgMax best = flm::argmax_empty();
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    best = chunk_argmax(best, v + c0, c0, int(std::min<int64_t>(kChunk, n - c0)));
  }
  return best.index;
}

// What a row's class index means: a class in [0, K), or one of these.
constexpr int64_t kIgnoredRow = -1;
constexpr int64_t kOutOfRangeRow = -2;

FLM_INLINE int64_t checked_class(int64_t t, int num_classes, bool has_ignore, int64_t ignore) {
  if (has_ignore && t == ignore) {
    return kIgnoredRow;
  }
  return (t < 0 || t >= num_classes) ? kOutOfRangeRow : t;
}

// The gradient row of an ignored row (zeros) or an out-of-range one (NaN).
template <typename T>
FLM_INLINE void fill_masked_row(T* dx, int num_classes, int64_t status) {
  T fill = from_float<T>(status == kOutOfRangeRow ? flm::kNaN : 0.0f);
  std::fill(dx, dx + num_classes, fill);
}

} // namespace fl::cpu
