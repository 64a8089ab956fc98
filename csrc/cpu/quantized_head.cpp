// CPU unpacking of quantized heads (contract: cpu/quantized_head.h; formats:
// math/quantized.h).
#include "cpu/quantized_head.h"

#include <stdexcept>

#include "cpu/dtype.h"
#include "cpu/vectorize.h"
#include "math/quantized.h"

namespace fl::cpu {

namespace {

// One affine group of `group` values (a multiple of 32, so it starts on a
// word): d[j] = scale * q_j + shift. kBits is a template argument so that the
// straddle test vanishes for the widths that divide 32 (their loop vectorizes).
template <int kBits>
FLM_INLINE void affine_group(const uint32_t* w, int group, float scale, float shift, float* d) {
  constexpr bool kStraddles = 32 % kBits != 0;
  const int last_word = group * kBits / 32 - 1; // a group's values fill whole words
  FL_SIMD
  for (int j = 0; j < group; ++j) {
    const int o = j * kBits;
    const int word = o >> 5;
    const int shift_bits = o & 31;
    // The next word, which straddled_code reads only when the value reaches
    // into it; loaded unconditionally (the loop vectorizes) but never past the
    // group's last word (the last value of a row never straddles).
    const int next = word < last_word ? word + 1 : word;
    const uint32_t hi = kStraddles ? w[next] : 0u;
    const uint32_t q = flm::straddled_code(w[word], hi, shift_bits, kBits);
    d[j] = scale * float(q) + shift;
  }
}

// The loops are cloned per instruction-set level (cpu/vectorize.h), as every
// CPU kernel's: a plain x86-64 build of them would be SSE2 only.
template <typename S, int kBits>
FL_VECTOR_CLONES void affine_block(const QuantizedMatrix& m, int64_t row0, int64_t rows, int64_t col0,
                  int64_t cols, float* dst) {
  const int group = m.group_size;
  const int64_t words = m.hidden * kBits / 32;
  const int64_t groups = m.hidden / group;
  const int64_t group_words = int64_t(group) * kBits / 32;
  auto sc = static_cast<const S*>(m.scales);
  auto qb = static_cast<const S*>(m.biases);
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t v = row0 + i;
    for (int64_t g = col0 / group; g < (col0 + cols) / group; ++g) {
      affine_group<kBits>(m.w_q + v * words + g * group_words, group,
                          to_float(sc[v * groups + g]), to_float(qb[v * groups + g]),
                          dst + i * cols + (g * group - col0));
    }
  }
}

template <typename S>
void affine_dispatch(const QuantizedMatrix& m, int64_t row0, int64_t rows, int64_t col0,
                     int64_t cols, float* dst) {
  switch (m.bits) {
    case 1: return affine_block<S, 1>(m, row0, rows, col0, cols, dst);
    case 2: return affine_block<S, 2>(m, row0, rows, col0, cols, dst);
    case 3: return affine_block<S, 3>(m, row0, rows, col0, cols, dst);
    case 4: return affine_block<S, 4>(m, row0, rows, col0, cols, dst);
    case 5: return affine_block<S, 5>(m, row0, rows, col0, cols, dst);
    case 6: return affine_block<S, 6>(m, row0, rows, col0, cols, dst);
    case 8: return affine_block<S, 8>(m, row0, rows, col0, cols, dst);
    default: throw std::logic_error("dequantize_block: affine bits must be 1-6 or 8");
  }
}

// Floating-point modes: 4-bit codes 8 per word or 8-bit codes 4 per word,
// lowest first; one uint8 scale code per group.
template <int kMode>
FL_VECTOR_CLONES void fp_block(const QuantizedMatrix& m, int64_t row0, int64_t rows, int64_t col0, int64_t cols,
              float* dst) {
  constexpr int kBits = kMode == flm::kQuantMxfp8 ? 8 : 4;
  constexpr int kPerWord = 32 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1u;
  const int group = m.group_size;
  const int64_t words = m.hidden / kPerWord;
  const int64_t groups = m.hidden / group;
  auto sc = static_cast<const uint8_t*>(m.scales);
  const bool global = m.global_scale != nullptr;
  const float factor = global ? flm::nvfp4_global_factor(*m.global_scale) : 1.0f;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t v = row0 + i;
    for (int64_t g = col0 / group; g < (col0 + cols) / group; ++g) {
      float scale = flm::fp_scale_value(kMode, sc[v * groups + g]);
      if (global) {
        scale = scale * factor;
      }
      const uint32_t* w = m.w_q + v * words + g * group / kPerWord;
      float* d = dst + i * cols + (g * group - col0);
      FL_SIMD
      for (int j = 0; j < group; ++j) {
        const uint32_t code = (w[j / kPerWord] >> ((j % kPerWord) * kBits)) & kMask;
        d[j] = flm::fp_element_value(kMode, code) * scale;
      }
    }
  }
}

} // namespace

void dequantize_block(const QuantizedMatrix& m, int64_t row0, int64_t rows, int64_t col0,
                      int64_t cols, float* dst) {
  switch (m.mode) {
    case flm::kQuantAffine:
      return dispatch_float(m.scale_dtype, [&](auto zero) {
        affine_dispatch<decltype(zero)>(m, row0, rows, col0, cols, dst);
      });
    case flm::kQuantMxfp4: return fp_block<flm::kQuantMxfp4>(m, row0, rows, col0, cols, dst);
    case flm::kQuantMxfp8: return fp_block<flm::kQuantMxfp8>(m, row0, rows, col0, cols, dst);
    case flm::kQuantNvfp4: return fp_block<flm::kQuantNvfp4>(m, row0, rows, col0, cols, dst);
    default: throw std::logic_error("dequantize_block: unknown quantization mode");
  }
}

} // namespace fl::cpu
