// Test kernel for metal/lce_gemm.h (tests/test_metal_lce_gemm.py): one output
// tile per threadgroup of C = op(A) op(B), through the shared tile GEMM (MLX's
// steel BlockLoader and BlockMMA, our K loop, stagers and store), for every tile
// shape MLX's matmul.cpp picks for the linear CE's GEMMs and every layout they
// use: nt (logits, dZ), nn (dH), tn (dW).
//   A: transposed ? [K, M] : [M, K]; B: transposed ? [N, K] : [K, N]; C [M, N]
//   float32, += when shape.w != 0.
#include <metal_stdlib>

#include "../../metal/lce_gemm.h"

using namespace metal;

template <typename TA, typename TB, int BM, int BN, int BK, int WM, int WN, bool kTA, bool kTB>
[[kernel]] void gemm_tile_test(
    device const TA* a [[buffer(0)]],
    device const TB* b [[buffer(1)]],
    device float* c [[buffer(2)]],
    constant int4& shape [[buffer(3)]], // M, N, K, accumulate
    uint2 group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint sg [[simdgroup_index_in_threadgroup]]) {
  typedef lce::Gemm<typename lce::StageOf<TA, TB>::type, BM, BN, BK, WM, WN, kTA, kTB> G;
  threadgroup typename G::stage_t As[G::kAElems];
  threadgroup typename G::stage_t Bs[G::kBElems];
  const int M = shape.x;
  const int N = shape.y;
  const int K = shape.z;
  const long m0 = long(group.y) * BM;
  const int n0 = int(group.x) * BN;
  auto ao = lce::AOperand<G, TA, kTA>::make(a, kTA ? M : K, m0, As, ushort(sg), ushort(lane));
  auto bo = lce::BOperand<G, TB, kTB>::make(b, kTB ? K : N, n0, Bs, ushort(sg), ushort(lane));
  typename G::mma_t mma(static_cast<ushort>(sg), static_cast<ushort>(lane));
  lce::gemm_k_loop<G>(mma, ao, bo, K, int(min(long(BM), long(M) - m0)), min(BN, N - n0), As, Bs);
  lce::store_tile<G>(mma, c, N, m0, n0, M, N, shape.w != 0);
}

// gemm_<nt|nn|tn>_<A dtype>_<B dtype>_bm<BM>_bn<BN>_bk<BK>_wm<WM>_wn<WN>
#define GT_NAME(lay, an, bn_, BM, BN, BK, WM, WN) \
  "gemm_" #lay "_" #an "_" #bn_ "_bm" #BM "_bn" #BN "_bk" #BK "_wm" #WM "_wn" #WN
#define GT_FN(TA, TB, BM, BN, BK, WM, WN, kTA, kTB) \
  gemm_tile_test<TA, TB, BM, BN, BK, WM, WN, kTA, kTB>
#define GT_INST(lay, kTA, kTB, an, TA, bn_, TB, BM, BN, BK, WM, WN) \
  template [[host_name(GT_NAME(lay, an, bn_, BM, BN, BK, WM, WN))]] [[kernel]] decltype(GT_FN(TA, TB, BM, BN, BK, WM, WN, kTA, kTB)) GT_FN(TA, TB, BM, BN, BK, WM, WN, kTA, kTB);

#define GT_SHAPES(lay, kTA, kTB, an, TA, bn_, TB)        \
  GT_INST(lay, kTA, kTB, an, TA, bn_, TB, 64, 64, 16, 2, 2) \
  GT_INST(lay, kTA, kTB, an, TA, bn_, TB, 64, 64, 16, 1, 2) \
  GT_INST(lay, kTA, kTB, an, TA, bn_, TB, 64, 32, 32, 2, 2) \
  GT_INST(lay, kTA, kTB, an, TA, bn_, TB, 32, 64, 16, 1, 2) \
  GT_INST(lay, kTA, kTB, an, TA, bn_, TB, 32, 32, 32, 2, 2)

#define GT_LAYOUTS(an, TA, bn_, TB)            \
  GT_SHAPES(nt, false, true, an, TA, bn_, TB)  \
  GT_SHAPES(nn, false, false, an, TA, bn_, TB) \
  GT_SHAPES(tn, true, false, an, TA, bn_, TB)

GT_LAYOUTS(float32, float, float32, float)
GT_LAYOUTS(float16, half, float16, half)
GT_LAYOUTS(bfloat16, bfloat, bfloat16, bfloat)
GT_LAYOUTS(float32, float, bfloat16, bfloat) // staged as float (converted)
