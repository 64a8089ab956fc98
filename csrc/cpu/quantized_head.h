// The CPU unpacking of a quantized head: every format mx.quantize produces in
// mlx 0.32.4 (affine 1, 2, 3, 4, 5, 6, 8 bits at group sizes 32, 64, 128;
// mxfp4, mxfp8, nvfp4; layouts and value rules in math/quantized.h), read as
// float32 a block at a time. The one place on the CPU that reads a quantized
// weight: the linear cross-entropy's weight tiles and the test hook
// _ext.dequantize_head (checked bit for bit against mx.dequantize).
//
// Values, bit for bit those of mx.dequantize with float32 scales (and
// biases), dtype=mx.float32:
//   affine  float(scale) * q + float(bias), two float32 roundings (product,
//           then sum): 16-bit scales and biases are converted exactly first
//   fp      element * scale, exact (see math/quantized.h); nvfp4 with a global
//           scale: element * (scale * nvfp4_global_factor(global)), rounded
//           where mx.dequantize rounds
#pragma once

#include <cstdint>

#include "mlx/dtype.h"

namespace fl::cpu {

struct QuantizedMatrix {
  const uint32_t* w_q = nullptr; // [V, hidden * bits / 32]
  const void* scales = nullptr; // [V, hidden / group_size]: affine scale_dtype, fp uint8
  const void* biases = nullptr; // affine: [V, hidden / group_size] in scale_dtype; fp: null
  mlx::core::Dtype scale_dtype = mlx::core::float32; // affine
  int mode = 0; // flm::kQuant*
  int bits = 0;
  int group_size = 0;
  int64_t hidden = 0;
  const float* global_scale = nullptr; // nvfp4: mx.quantize's global_scale, or null
};

// W[row0 + i, col0 + j] as float32 into dst[i * cols + j] for i < rows,
// j < cols. col0 and cols are multiples of group_size (the caller's blocks
// start and end on groups). Serial.
void dequantize_block(const QuantizedMatrix& q, int64_t row0, int64_t rows, int64_t col0,
                      int64_t cols, float* dst);

} // namespace fl::cpu
