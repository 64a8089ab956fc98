// The row loop shared by the row-wise losses (cross-entropy, softmax focal):
// an online log-sum-exp over L1-sized chunks, so each logit comes from memory
// once, with a hook for the loss's own per-chunk sums.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cpu/dtype.h"
#include "cpu/vectorize.h"
#include "math/cross_entropy.h"

namespace fl::cpu {

// A chunk of a row as float32: the row itself for float32 input, else
// converted into `buf`.
template <typename T>
FLM_INLINE const float* chunk_as_float(const T* src, int n, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    return src;
  } else {
    FL_SIMD
    for (int i = 0; i < n; ++i) {
      buf[i] = to_float(src[i]);
    }
    return buf;
  }
}

// Runs one pass over the K logits of row `x`. For each chunk it calls
//     float chunk_fn(const float* xv, int c0, int n, float shift, float scale)
// which must return sum_i exp(xv[i] - shift) over the chunk; `scale` is the
// factor by which sums relative to the previous max must be multiplied to be
// relative to the new one (for any exp-sums the loss keeps of its own).
template <typename T, typename ChunkFn>
FLM_INLINE flm::LseState online_row(const T* x, int num_classes, ChunkFn&& chunk_fn) {
  flm::LseState st = flm::lse_empty();
  float buf[kChunk];
  for (int c0 = 0; c0 < num_classes; c0 += kChunk) {
    int n = std::min(kChunk, num_classes - c0);
    const float* xv = chunk_as_float(x + c0, n, buf);
    float cmax = -flm::kInf;
    FL_SIMD_REDUCE(reduction(max : cmax))
    for (int i = 0; i < n; ++i) {
      cmax = flm::fmax(cmax, xv[i]);
    }
    float m = flm::fmax(st.max, cmax);
    float shift = m == -flm::kInf ? 0.0f : m; // all -inf so far: exp(-inf) = 0
    float scale = flm::lse_scale(st.max, m);
    st.sum = st.sum * scale + chunk_fn(xv, c0, n, shift, scale);
    st.max = m;
  }
  return st;
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
