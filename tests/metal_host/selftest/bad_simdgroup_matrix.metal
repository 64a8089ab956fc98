// BROKEN on purpose: misuses of SIMD-group matrices that the harness must report.
// Each has a correct twin (here, or in ok_simdgroup_matrix.metal).
#include <metal_stdlib>
using namespace metal;

#include "simdgroup_tiled_gemm.h"

// The tiled GEMM (simdgroup_tiled_gemm.h) with one fault each (float):
//   kFault 0: no barrier between staging the tiles and loading fragments from them:
//     a SIMD-group that runs ahead loads rows the others have not staged yet;
//   kFault 1: no barrier at the end of a K step: a SIMD-group that runs ahead
//     restages the tiles for the next step while another still loads the current ones;
//   kFault 2: the A tile (32 x 8) read with 9 elements per row: past its end;
//   kFault 3: the B tile (8 x 32) read with 16 elements per row: inside it, wrong values.
template <uint kFault>
[[kernel]] void tiled_gemm_broken(
    device const float* a [[buffer(0)]],
    device const float* b [[buffer(1)]],
    device float* c [[buffer(2)]],
    constant uint& n [[buffer(3)]],
    constant uint& k [[buffer(4)]],
    threadgroup float* a_tile [[threadgroup(0)]],
    threadgroup float* b_tile [[threadgroup(1)]],
    uint2 group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  gemm_block<float, float, kFault != 0, kFault != 1, kFault == 2 ? 9 : 8, kFault == 3 ? 16 : 32>(
      a, b, c, n, k, a_tile, b_tile, group, tid, sg);
}

template [[host_name("gemm_no_stage_barrier")]] [[kernel]] decltype(tiled_gemm_broken<0>)
    tiled_gemm_broken<0>;
template [[host_name("gemm_no_reuse_barrier")]] [[kernel]] decltype(tiled_gemm_broken<1>)
    tiled_gemm_broken<1>;
template [[host_name("gemm_a_stride_9")]] [[kernel]] decltype(tiled_gemm_broken<2>)
    tiled_gemm_broken<2>;
template [[host_name("gemm_b_stride_16")]] [[kernel]] decltype(tiled_gemm_broken<3>)
    tiled_gemm_broken<3>;

// An 8x8 copy through a matrix read with `stride` elements per row from a 64-element
// device buffer: 8 is right (the twin); 9 reads past the buffer.
kernel void strided_copy(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& stride [[buffer(2)]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, x, stride);
  simdgroup_store(m, out);
}

// One lane skips the multiply (lane 5 of every SIMD-group when kSkip): on a GPU the
// whole SIMD-group executes it or the result is undefined. The twin: all lanes.
template <bool kSkip>
[[kernel]] void lane_skips_multiply(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 a;
  simdgroup_load(a, x);
  simdgroup_float8x8 d = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);
  if (!kSkip || lane != 5) {
    simdgroup_multiply_accumulate(d, a, a, d);
  }
  simdgroup_store(d, out);
}

// Lanes pass different pointers (even lanes x, odd lanes x + 64).
kernel void nonuniform_pointer(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint lane [[thread_index_in_simdgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, x + (lane % 2) * 64);
  simdgroup_store(m, out);
}

// An origin together with a transposed load: the specification leaves open which
// layout the origin counts in. The twin offsets the pointer.
template <bool kOrigin>
[[kernel]] void transposed_with_origin(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]]) {
  simdgroup_float8x8 m;
  if (kOrigin) {
    simdgroup_load(m, x, 16, ulong2(8, 0), true);
  } else {
    simdgroup_load(m, x + 8 * 16, 16, ulong2(0), true);
  }
  simdgroup_store(m, out);
}

// An accumulator used without initialisation (Metal leaves its contents undefined).
kernel void uninitialised_accumulator(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]]) {
  simdgroup_float8x8 a;
  simdgroup_load(a, x);
  simdgroup_float8x8 acc;
  simdgroup_multiply_accumulate(acc, a, a, acc);
  simdgroup_store(acc, out);
}

// Fragments written through thread_elements() with a wrong layout assumption (lane
// l holds row l / 4, columns 2 (l % 4) and the next): storing the matrix of the
// intended coordinates does not give 0..63 in order. fragment_layout is the twin.
kernel void fragment_wrong_layout(
    device float* out [[buffer(0)]],
    uint lane [[thread_index_in_simdgroup]]) {
  const uint row = lane / 4;
  const uint col = (lane % 4) * 2;
  simdgroup_float8x8 coords;
  coords.thread_elements() = float2(float(row * 8 + col), float(row * 8 + col + 1));
  simdgroup_store(coords, out);
}

// Each SIMD-group stores its 8x8 matrix into threadgroup memory, then every thread
// reads an element another SIMD-group stored: without the barrier in between
// (kBarrier false) it reads a matrix not yet stored. 64 threads.
template <bool kBarrier>
[[kernel]] void store_then_read(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* tile [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  simdgroup_float8x8 m;
  simdgroup_load(m, x + sg * 64);
  simdgroup_store(m, tile + sg * 64);
  if (kBarrier) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = tile[(tid + 64) % 128];
}
