// Test kernel for metal/quantized_head.h (tests/test_metal_quantized_head.py):
// each threadgroup stages one R x C tile of the dequantised weight at
// (v0, k0) = (group.y * R, group.x * C) into threadgroup memory, row-major or
// transposed, and after a barrier copies it to out[(v0 + i) * ld_out + k0 + j]
// (out covers whole tiles, so the zeros past V and H are checked too). Each
// thread copies elements another thread staged: a missing barrier would show.
#include <metal_stdlib>

#include "../../metal/quantized_head.h"

using namespace metal;

template <typename Head, typename TT, int R, int C>
[[kernel]] void qh_stage_tile(
    device const uint* w_q [[buffer(0)]],
    device const typename Head::scale_t* scales [[buffer(1)]],
    device const typename Head::scale_t* biases [[buffer(2)]],
    device TT* out [[buffer(3)]],
    constant int4& shape [[buffer(4)]], // V, H, group_size, transposed
    threadgroup TT* tile [[threadgroup(0)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint2 groups [[threadgroups_per_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint2 tpg [[threads_per_threadgroup]]) {
  const Head head(w_q, scales, biases, shape.x, shape.y, shape.z);
  const bool transposed = shape.w != 0;
  const int v0 = int(group.y) * R;
  const int k0 = int(group.x) * C;
  const int row_stride = transposed ? 1 : C;
  const int col_stride = transposed ? R : 1;
  const uint nthreads = tpg.x * tpg.y;
  head.template stage<R, C>(tile, v0, k0, row_stride, col_stride, tid, nthreads);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const ulong ld_out = ulong(groups.x) * ulong(C);
  // Read in the reverse thread order of the staging loop.
  for (uint u = tid; u < uint(R * C); u += nthreads) {
    const uint e = uint(R * C) - 1u - u;
    const int i = int(e) / C;
    const int j = int(e) % C;
    out[ulong(v0 + i) * ld_out + ulong(k0 + j)] = tile[i * row_stride + j * col_stride];
  }
}

// Host names qh_tile_<head>_<tile type>_<R>x<C>, <head> as the launch plans
// name it (q<bits>_<scale dtype>, mxfp4, mxfp8, nvfp4, nvfp4_global).
#define QH_INST(hname, Head, tname, TT, R, C)                                           \
  template [[host_name("qh_tile_" #hname "_" #tname "_" #R "x" #C)]] [[kernel]]         \
  decltype(qh_stage_tile<Head, TT, R, C>) qh_stage_tile<Head, TT, R, C>;

#define QH_INST_TILES(hname, Head, tname, TT) \
  QH_INST(hname, Head, tname, TT, 32, 32)     \
  QH_INST(hname, Head, tname, TT, 8, 16)      \
  QH_INST(hname, Head, tname, TT, 16, 64)

#define QH_INST_BITS(sname, S, tname, TT)                              \
  QH_INST_TILES(q1_##sname, flk::QuantizedHead1<S>, tname, TT)         \
  QH_INST_TILES(q2_##sname, flk::QuantizedHead2<S>, tname, TT)         \
  QH_INST_TILES(q3_##sname, flk::QuantizedHead3<S>, tname, TT)         \
  QH_INST_TILES(q4_##sname, flk::QuantizedHead4<S>, tname, TT)         \
  QH_INST_TILES(q5_##sname, flk::QuantizedHead5<S>, tname, TT)         \
  QH_INST_TILES(q6_##sname, flk::QuantizedHead6<S>, tname, TT)         \
  QH_INST_TILES(q8_##sname, flk::QuantizedHead8<S>, tname, TT)

QH_INST_BITS(float32, float, float32, float)
QH_INST_BITS(float16, half, float16, half)
QH_INST_BITS(bfloat16, bfloat, bfloat16, bfloat)
QH_INST_BITS(float16, half, float32, float)
QH_INST_BITS(bfloat16, bfloat, float32, float)
QH_INST_BITS(float32, float, float16, half)
QH_INST_BITS(float32, float, bfloat16, bfloat)

#define QH_INST_FP(tname, TT)                        \
  QH_INST_TILES(mxfp4, flk::Mxfp4Head, tname, TT)   \
  QH_INST_TILES(mxfp8, flk::Mxfp8Head, tname, TT)   \
  QH_INST_TILES(nvfp4, flk::Nvfp4Head, tname, TT)   \
  QH_INST_TILES(nvfp4_global, flk::Nvfp4GlobalHead, tname, TT)

QH_INST_FP(float32, float)
QH_INST_FP(float16, half)
QH_INST_FP(bfloat16, bfloat)
