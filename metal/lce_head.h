// The head side of the linear CE's tiles, shared by every head loss on them
// (metal/linear_cross_entropy.metal: the linear CE and the row statistics;
// metal/linear_distillation.metal): a dense head (DenseHead<W>, the interface
// every head implements; the quantized heads are metal/quantized_head.h's), the
// B operand of a GEMM against a head, the staging dtype of a head against the
// hidden dtype, and the logits tile Z = H W^T of a row block through a head.
// Included after lce_gemm.h (the tile GEMM) and kernel_args.h (LceArgs).
#pragma once

#include <metal_stdlib>

#include "lce_gemm.h"
#include "../csrc/metal/kernel_args.h"

using namespace metal;

// The kernel-name suffix of a tile, as LceTile::name() spells it on the host
// (launch_plan.h): _bm<BM>_bn<BN>_bk<BK>_wm<WM>_wn<WN>.
#define FL_LCE_TILE_NAME(BM, BN, BK, WM, WN) "_bm" #BM "_bn" #BN "_bk" #BK "_wm" #WM "_wn" #WN

namespace lce {

// A row-major matrix in device memory: element (r, c) at p[r * ld + c], for
// r < rows, c < cols.
template <typename T>
struct MatrixView {
  device const T* p;
  long ld;
  long rows;
  int cols;

  MatrixView(device const T* p_, long ld_, long rows_, int cols_)
      : p(p_), ld(ld_), rows(rows_), cols(cols_) {}

  // Stages the block (r0 + i, c0 + j), i < BR, j < BC, into
  // dst[i * stride_r + j * stride_c] as TT, 0 outside the matrix (never read
  // there). Consecutive threads take consecutive columns (coalesced reads).
  template <int BR, int BC, typename TT>
  void stage(threadgroup TT* dst, long r0, int c0, int stride_r, int stride_c, uint tid,
             uint nthreads) const {
    for (uint e = tid; e < uint(BR * BC); e += nthreads) {
      int i = int(e) / BC;
      int j = int(e) % BC;
      long r = r0 + i;
      int c = c0 + j;
      float v = 0.0f;
      if (r < rows && c < cols) {
        v = float(p[r * ld + c]);
      }
      dst[i * stride_r + j * stride_c] = TT(v);
    }
  }
};

// The weight of a dense head: W [V, H] in its own dtype. The interface every
// head implements (the quantized heads: metal/quantized_head.h):
//   typedef weight_t, scale_t                element types of the three buffers
//   Head(weight, scales, qbiases, args)      built per thread at kernel start
//   stage<BV, BH>(dst, v0, h0, stride_v, stride_h, tid, nthreads)
//       W[v0 + i, h0 + j] as the tile's type into dst[i * stride_v + j * stride_h]
//       for i < BV, j < BH; 0 where v0 + i >= V or h0 + j >= H. Called by all the
//       threads of the group together, between the caller's barriers.
// A dense head's tiles are staged by MLX's BlockLoader instead (HeadOperand).
template <typename W>
struct DenseHead {
  typedef W weight_t;
  typedef W scale_t; // unused: the host binds the weight to the scale slots
  MatrixView<W> w;

  DenseHead(device const W* weight, device const W* scales, device const W* qbiases,
            constant LceArgs& args)
      : w(weight, args.hidden, args.vocab, args.hidden) {}

  template <int BV, int BH, typename TT>
  void stage(threadgroup TT* dst, int v0, int h0, int stride_v, int stride_h, uint tid,
             uint nthreads) const {
    w.template stage<BV, BH>(dst, v0, h0, stride_v, stride_h, tid, nthreads);
  }
};

// The B operand of a GEMM against the head's weight (transposed: the logits,
// B^T = W; not: dH, B = W). A head stages itself (quantized: dequantised into
// the tile); a dense weight is a plain matrix for MLX's loader.
template <typename G, typename Head, bool kTransB>
struct HeadOperand {
  typedef HeadStager<G, Head, kTransB> type;
  static type make(Head head, int n0, threadgroup typename G::stage_t* Bs, ushort sg,
                   ushort lane) {
    return type(head, n0, Bs, sg, lane);
  }
};
template <typename G, typename W, bool kTransB>
struct HeadOperand<G, DenseHead<W>, kTransB> {
  typedef typename BOperand<G, W, kTransB>::type type;
  static type make(DenseHead<W> head, int n0, threadgroup typename G::stage_t* Bs, ushort sg,
                   ushort lane) {
    return BOperand<G, W, kTransB>::make(head.w.p, head.w.ld, n0, Bs, sg, lane);
  }
};

// The staging dtype of a head against the hidden dtype T: a dense weight's
// own type when it is T's, else float; a quantized head's: float. Its
// dequantised values (scale * q + bias, rounded once in float32) are what the
// CPU primitive multiplies; MLX's quantized matmul rounds them again to the
// activations' dtype, which would put a 16-bit rounding (2^-9 relative for
// bfloat16) on every weight of the head.
template <typename T, typename Head>
struct HeadStage {
  typedef float type;
};
template <typename T, typename W>
struct HeadStage<T, DenseHead<W>> {
  typedef typename StageOf<T, W>::type type;
};
// The logits GEMM of hidden dtype T against a head, in the tile the launch plan
// chose for the device class (launch_plan.h lce_forward_tile: MLX's choices).
template <typename T, typename Head, int BM, int BN, int BK, int WM, int WN>
using LogitsGemm = Gemm<typename HeadStage<T, Head>::type, BM, BN, BK, WM, WN, false, true>;

// Z tile (row block m0.., vocabulary tile v0..) of the hidden rows through the
// head, accumulated into `mma` (fresh): Z = H W^T, A = hidden rows [m0, rows),
// B^T = W. The epilogue reads it through Acc<G>.
template <typename G, typename T, typename Head>
inline void logits_tile(thread typename G::mma_t& mma, device const T* hidden, Head head, long m0,
                        int v0, long rows, constant LceArgs& args,
                        threadgroup typename G::stage_t* As, threadgroup typename G::stage_t* Bs,
                        ushort sg, ushort lane) {
  auto a = AOperand<G, T, false>::make(hidden, args.hidden, m0, As, sg, lane);
  auto b = HeadOperand<G, Head, true>::make(head, v0, Bs, sg, lane);
  gemm_k_loop<G>(mma, a, b, args.hidden, int(min(long(G::BM), rows - m0)),
                 min(int(G::BN), args.vocab - v0), As, Bs);
}

} // namespace lce
