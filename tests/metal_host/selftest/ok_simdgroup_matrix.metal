// SIMD-group matrices (<metal_simdgroup_matrix>) with results the test recomputes in
// float64 NumPy: one 8x8 product per SIMD-group in every element type (and mixed
// half/bfloat operands with a float accumulator), the lanes' fragments, and a tiled
// GEMM whose tiles are staged through threadgroup memory by 4 SIMD-groups.
// bad_simdgroup_matrix.metal holds the broken variants.
#include <metal_stdlib>
#include <metal_simdgroup_matrix>
using namespace metal;

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
// through thread_elements() (element-wise, layout-independent).
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

// C[M x N] = A[M x K] B[K x N] (row-major; M, N multiples of 32, K of 8). Each
// threadgroup of 4 SIMD-groups computes a 32x32 block of C, each SIMD-group a 16x16
// quarter as 2x2 fragments; K advances 8 at a time through threadgroup tiles
// a_tile[32][8] and b_tile[8][32] that all 128 threads stage together.
//
// The template knobs make the broken variants (bad_simdgroup_matrix.metal); the
// defaults are correct: kStageBarrier orders the staging before the loads,
// kReuseBarrier the loads before the next step's staging, and the tiles are read
// with their true row lengths.
template <typename T, typename Acc, bool kStageBarrier = true, bool kReuseBarrier = true,
          uint kATileStride = 8, uint kBTileStride = 32>
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
  const uint row0 = group.y * 32;
  const uint col0 = group.x * 32;
  const uint sg_row = (sg / 2) * 16;
  const uint sg_col = (sg % 2) * 16;
  simdgroup_matrix<Acc, 8, 8> acc[2][2];
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      acc[i][j] = make_filled_simdgroup_matrix<Acc, 8, 8>(Acc(0));
    }
  }
  for (uint k0 = 0; k0 < k; k0 += 8) {
    for (uint e = tid; e < 256; e += 128) {
      a_tile[e] = a[(row0 + e / 8) * k + k0 + e % 8];
      b_tile[e] = b[(k0 + e / 32) * n + col0 + e % 32];
    }
    if (kStageBarrier) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    simdgroup_matrix<T, 8, 8> a_frag[2];
    simdgroup_matrix<T, 8, 8> b_frag[2];
    for (uint i = 0; i < 2; ++i) {
      simdgroup_load(a_frag[i], a_tile + (sg_row + 8 * i) * 8, kATileStride);
      simdgroup_load(b_frag[i], b_tile + sg_col + 8 * i, kBTileStride);
    }
    for (uint i = 0; i < 2; ++i) {
      for (uint j = 0; j < 2; ++j) {
        simdgroup_multiply_accumulate(acc[i][j], a_frag[i], b_frag[j], acc[i][j]);
      }
    }
    if (kReuseBarrier) {
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  for (uint i = 0; i < 2; ++i) {
    for (uint j = 0; j < 2; ++j) {
      simdgroup_store(acc[i][j], c + (row0 + sg_row + 8 * i) * n + col0 + sg_col + 8 * j, n);
    }
  }
}

template [[host_name("tiled_gemm_f32")]] [[kernel]] decltype(tiled_gemm<float, float>)
    tiled_gemm<float, float>;
template [[host_name("tiled_gemm_f16")]] [[kernel]] decltype(tiled_gemm<half, half>)
    tiled_gemm<half, half>;
template [[host_name("tiled_gemm_bf16")]] [[kernel]] decltype(tiled_gemm<bfloat, bfloat>)
    tiled_gemm<bfloat, bfloat>;
template [[host_name("tiled_gemm_f16_f32")]] [[kernel]] decltype(tiled_gemm<half, float>)
    tiled_gemm<half, float>;
