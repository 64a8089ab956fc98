// SIMD-group matrices (<metal_simdgroup_matrix>) with results the test recomputes in
// float64 NumPy: one 8x8 product per SIMD-group in every element type (and mixed
// half/bfloat operands with a float accumulator), the lanes' fragments, and a tiled
// GEMM whose tiles are staged through threadgroup memory by 4 SIMD-groups.
// bad_simdgroup_matrix.metal holds the broken variants.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;

#include "simdgroup_tiled_gemm.h"

// D = A * B + C for 8x8 row-major matrices, B read transposed when kTransposeB (then
// the buffer holds B^T). One SIMD-group.
template <typename T, typename Acc, bool kTransposeB>
[[kernel]] void mma_8x8(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device const Acc* c [[buffer(2)]],
    device Acc* d [[buffer(3)]]) {
  simdgroup_matrix<T, 8, 8> ma;
  simdgroup_matrix<T, 8, 8> mb;
  simdgroup_matrix<Acc, 8, 8> mc;
  simdgroup_load(ma, a);
  simdgroup_load(mb, b, 8, ulong2(0), kTransposeB);
  simdgroup_load(mc, c);
  simdgroup_multiply_accumulate(mc, ma, mb, mc);
  simdgroup_store(mc, d);
}

// The other ways to form a product: out[0..63] = 2 I * A (diagonal constructor and
// simdgroup_multiply), out[64..127] = A * A (operator*), out[128..191] = A + 1
// through thread_elements() (element-wise, layout-independent), out[192..255] = A^T
// (transposed store).
kernel void matrix_forms(
    device const float* a [[buffer(0)]],
    device float* out [[buffer(1)]]) {
  simdgroup_float8x8 ma;
  simdgroup_load(ma, a);
  simdgroup_float8x8 two(2.0f);
  simdgroup_float8x8 scaled;
  simdgroup_multiply(scaled, two, ma);
  simdgroup_store(scaled, out);
  simdgroup_float8x8 squared = ma * ma;
  simdgroup_store(squared, out + 64);
  simdgroup_float8x8 shifted = ma;
  shifted.thread_elements() += float2(1.0f);
  simdgroup_store(shifted, out + 128, 8);
  simdgroup_store(ma, out + 192, 8, ulong2(0), true);
}

// Which elements each lane holds: lanes[2 l], lanes[2 l + 1] are lane l's pair after
// loading x (the test fills x[r * 8 + c] = r * 8 + c). Then the lanes write their
// own coordinates into a matrix through thread_elements(), using the layout MLX
// assumes, and store it: out[r * 8 + c] must be r * 8 + c again.
kernel void fragment_layout(
    device const float* x [[buffer(0)]],
    device float* lanes [[buffer(1)]],
    device float* out [[buffer(2)]],
    uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, x);
  lanes[2 * lane] = m.thread_elements()[0];
  lanes[2 * lane + 1] = m.thread_elements()[1];
  const uint quad = lane / 4;
  const uint row = (quad & 4) + (lane / 2) % 4;
  const uint col = (quad & 2) * 2 + (lane % 2) * 2;
  simdgroup_float8x8 coords;
  coords.thread_elements() = float2(float(row * 8 + col), float(row * 8 + col + 1));
  simdgroup_store(coords, out);
}

// C = A B by 32x32 blocks (simdgroup_tiled_gemm.h).
template <typename T, typename Acc>
[[kernel]] void tiled_gemm(
    device const T* a [[buffer(0)]],
    device const T* b [[buffer(1)]],
    device Acc* c [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    constant uint& k [[buffer(4)]],
    threadgroup T* a_tile [[threadgroup(0)]],
    threadgroup T* b_tile [[threadgroup(1)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  gemm_block<T, Acc>(a, b, c, n, k, a_tile, b_tile, group, tid, sg);
}

template [[host_name("tiled_gemm_f32")]] [[kernel]] decltype(tiled_gemm<float, float>)
    tiled_gemm<float, float>;
template [[host_name("tiled_gemm_f16")]] [[kernel]] decltype(tiled_gemm<half, half>)
    tiled_gemm<half, half>;
template [[host_name("tiled_gemm_bf16")]] [[kernel]] decltype(tiled_gemm<bfloat, bfloat>)
    tiled_gemm<bfloat, bfloat>;
template [[host_name("tiled_gemm_f16_f32")]] [[kernel]] decltype(tiled_gemm<half, float>)
    tiled_gemm<half, float>;
