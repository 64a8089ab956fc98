// The tiled GEMM of the SIMD-group matrix self-tests, shared by
// ok_simdgroup_matrix.metal (correct instantiations) and bad_simdgroup_matrix.metal
// (the broken ones).
#pragma once
#include <metal_stdlib>
using namespace metal;

// C[M x N] = A[M x K] B[K x N] (row-major; M, N multiples of 32, K of 8). Each
// threadgroup of 4 SIMD-groups computes a 32x32 block of C, each SIMD-group a 16x16
// quarter as 2x2 fragments; K advances 8 at a time through threadgroup tiles
// a_tile[32][8] and b_tile[8][32] that all 128 threads stage together.
//
// (The kernels that call it are in the .metal files: the harness build rewrites
// [[threadgroup(n)]] attributes there, not in headers.) The template knobs make the
// broken variants (bad_simdgroup_matrix.metal); the defaults are correct: kStageBarrier orders the staging before the loads,
// kReuseBarrier the loads before the next step's staging, and the tiles are read
// with their true row lengths.
template <typename T, typename Acc, bool kStageBarrier = true, bool kReuseBarrier = true,
          uint kATileStride = 8, uint kBTileStride = 32>
void gemm_block(
    device const T* a,
    device const T* b,
    device Acc* c,
    uint n,
    uint k,
    threadgroup T* a_tile,
    threadgroup T* b_tile,
    uint2 group,
    uint tid,
    uint sg) {
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
