// The tile GEMM of the fused linear cross-entropy kernels (and of every head
// loss that plugs an epilogue into them), assembled from MLX's steel GEMM
// building blocks as the mlx-metal wheel ships them: the threadgroup tile
// loader (steel/gemm/loader.h, BlockLoader) and the SIMD-group fragment
// multiply (steel/gemm/mma.h, BlockMMA: 8x8 simdgroup_matrix fragments, WM x WN
// SIMD-groups, float accumulators). Included, never copied: CMakeLists.txt and
// the harness (tests/metal_host) put MLX's kernel headers on the include path.
//
// What is ours: the K loop (steel's GEMMKernel::run stores its tile to device
// memory; our epilogues read the accumulators of a whole reduction in
// registers first), the operands that steel's loader cannot stage (a quantized
// head dequantised while staging, an operand of another dtype converted), and
// the access to the accumulator tile for the epilogues (Acc, row_max/row_sum,
// store_tile).
//
// Contract of one tile C[BM x BN] = A[BM x K] B[K x BN] (+ nothing: C starts at
// zero for every tile):
//   - S, the staging type: both operands are staged in threadgroup memory as S,
//     the operands' own dtype when they share it (16-bit operands stay 16-bit,
//     as in MLX's GEMM), float when they differ (a float32 hidden against a
//     bfloat16 head, float32 dZ against a 16-bit head); the kernels choose
//     (linear_cross_entropy.metal: a quantized head is dequantised into float).
//   - accumulation in float32 (BlockMMA's AccumType).
//   - edges: rows/columns/K beyond the matrices are staged as 0 and never read
//     (steel's load_safe; our stagers mask likewise), so a partial tile adds
//     nothing.
//   - every thread of the group calls everything here together (barriers and
//     SIMD-group matrix operations inside).
#pragma once

#include <metal_stdlib>

// MLX's steel GEMM headers name complex64_t (complex GEMM specialisations that
// we never instantiate) without including its definition; MLX's own kernels
// include it first too.
#include "mlx/backend/metal/kernels/complex.h"
#include "mlx/backend/metal/kernels/steel/gemm/loader.h"
#include "mlx/backend/metal/kernels/steel/gemm/mma.h"

using namespace metal;

namespace lce {

// The staging type of two operand dtypes (see the contract above).
template <typename A, typename B>
struct StageOf {
  typedef float type;
};
template <typename T>
struct StageOf<T, T> {
  typedef T type;
};

// One GEMM tile shape: BM x BN outputs per threadgroup of WM x WN SIMD-groups,
// BK of the reduction staged per step, operands staged as S; transpose_a: A is
// staged as As[k][m] (its source holds A^T row-major), transpose_b: B as
// Bs[n][k] (its source holds B^T row-major). Threadgroup rows are padded by 16
// bytes, as MLX pads them (rows of a tile start on different banks).
template <typename S, int BM_, int BN_, int BK_, int WM_, int WN_, bool kTransA, bool kTransB>
struct Gemm {
  static constexpr constant int BM = BM_;
  static constexpr constant int BN = BN_;
  static constexpr constant int BK = BK_;
  static constexpr constant int WM = WM_;
  static constexpr constant int WN = WN_;
  static constexpr constant int kThreads = WM * WN * 32;
  static constexpr constant int kPad = 16 / int(sizeof(S));
  static constexpr constant int kLda = kTransA ? BM + kPad : BK + kPad;
  static constexpr constant int kLdb = kTransB ? BK + kPad : BN + kPad;
  static constexpr constant int kAElems = kTransA ? BK * kLda : BM * kLda;
  static constexpr constant int kBElems = kTransB ? BN * kLdb : BK * kLdb;
  typedef S stage_t;
  typedef mlx::steel::BlockMMA<S, float, BM, BN, BK, WM, WN, kTransA, kTransB, short(kLda),
                               short(kLdb), float>
      mma_t;
  static_assert(BM % (8 * WM) == 0 && BN % (8 * WN) == 0 && BK % 8 == 0,
                "steel's BlockMMA: whole 8x8 fragments per SIMD-group");
};

// ---- operand stagers -----------------------------------------------------------------
// A stager owns one operand of the K loop: load(k_valid, other_valid) stages the
// current BK step (k_valid <= BK of it inside the matrix, other_valid rows of
// the tile's other dimension), next() moves to the following step.

// A row-major device matrix (leading dimension ld) read as the block
// [BROWS x BCOLS] starting at `src`; the reduction dimension runs along the
// columns (kRedCols) or along the rows. T == S: MLX's BlockLoader (vector
// copies; load_safe at the edges). T != S: converted element by element.
template <typename T, typename S, int BROWS, int BCOLS, int kDstLd, bool kRedCols, int kThreads>
struct MatrixStager {
  typedef mlx::steel::BlockLoader<S, BROWS, BCOLS, kDstLd, kRedCols ? 1 : 0, kThreads> loader_t;
  loader_t loader;
  MatrixStager(device const T* src, int ld, threadgroup S* dst, ushort sg, ushort lane)
      : loader(src, ld, dst, sg, lane) {}
  // k_valid: along the reduction dimension; other: along the other one.
  void load(int k_valid, int other) const {
    const short2 dims = kRedCols ? short2(short(k_valid), short(other))
                                 : short2(short(other), short(k_valid));
    if (dims.x >= BCOLS && dims.y >= BROWS) {
      loader.load_unsafe();
    } else {
      loader.load_safe(dims);
    }
  }
  void next() {
    loader.next();
  }
};

// T != S: the same block, converted to S while staging (coalesced: consecutive
// threads take consecutive columns).
template <typename T, typename S, int BROWS, int BCOLS, int kDstLd, bool kRedCols, int kThreads>
struct ConvertingStager {
  device const T* src;
  long ld;
  threadgroup S* dst;
  uint tid;
  ConvertingStager(device const T* src_, int ld_, threadgroup S* dst_, ushort sg, ushort lane)
      : src(src_), ld(ld_), dst(dst_), tid(uint(sg) * 32 + uint(lane)) {}
  void load(int k_valid, int other) const {
    const int rows = kRedCols ? other : k_valid;
    const int cols = kRedCols ? k_valid : other;
    for (uint e = tid; e < uint(BROWS * BCOLS); e += uint(kThreads)) {
      const int i = int(e) / BCOLS;
      const int j = int(e) % BCOLS;
      dst[i * kDstLd + j] = i < rows && j < cols ? S(float(src[long(i) * ld + j])) : S(0.0f);
    }
  }
  void next() {
    src += kRedCols ? long(BCOLS) : long(BROWS) * ld;
  }
};

template <typename T, typename S, int BROWS, int BCOLS, int kDstLd, bool kRedCols, int kThreads>
struct StagerOf {
  typedef ConvertingStager<T, S, BROWS, BCOLS, kDstLd, kRedCols, kThreads> type;
};
template <typename S, int BROWS, int BCOLS, int kDstLd, bool kRedCols, int kThreads>
struct StagerOf<S, S, BROWS, BCOLS, kDstLd, kRedCols, kThreads> {
  typedef MatrixStager<S, S, BROWS, BCOLS, kDstLd, kRedCols, kThreads> type;
};

// The A operand of a GEMM, its source row-major: not transposed, the source is
// A [M x K] (rows m0.., ld); transposed, the source is A^T [K x M] (columns m0..).
template <typename G, typename T, bool kTransA>
struct AOperand;
template <typename G, typename T>
struct AOperand<G, T, false> {
  typedef typename StagerOf<T, typename G::stage_t, G::BM, G::BK, G::kLda, true, G::kThreads>::type
      type;
  static type make(device const T* src, long ld, long m0, threadgroup typename G::stage_t* As,
                   ushort sg, ushort lane) {
    return type(src + m0 * ld, int(ld), As, sg, lane);
  }
};
template <typename G, typename T>
struct AOperand<G, T, true> {
  typedef typename StagerOf<T, typename G::stage_t, G::BK, G::BM, G::kLda, false, G::kThreads>::type
      type;
  static type make(device const T* src, long ld, long m0, threadgroup typename G::stage_t* As,
                   ushort sg, ushort lane) {
    return type(src + m0, int(ld), As, sg, lane);
  }
};

// The B operand from a row-major source: transposed, the source is B^T [N x K]
// (rows n0..); not transposed, B [K x N] (columns n0..).
template <typename G, typename T, bool kTransB>
struct BOperand;
template <typename G, typename T>
struct BOperand<G, T, true> {
  typedef typename StagerOf<T, typename G::stage_t, G::BN, G::BK, G::kLdb, true, G::kThreads>::type
      type;
  static type make(device const T* src, long ld, long n0, threadgroup typename G::stage_t* Bs,
                   ushort sg, ushort lane) {
    return type(src + n0 * ld, int(ld), Bs, sg, lane);
  }
};
template <typename G, typename T>
struct BOperand<G, T, false> {
  typedef typename StagerOf<T, typename G::stage_t, G::BK, G::BN, G::kLdb, false, G::kThreads>::type
      type;
  static type make(device const T* src, long ld, long n0, threadgroup typename G::stage_t* Bs,
                   ushort sg, ushort lane) {
    return type(src + n0, int(ld), Bs, sg, lane);
  }
};

// A weight operand staged through a head's own stage() (a quantized head
// dequantises there): the block W[v0 + i, k0 + j] (transposed: B^T = W, the
// logits GEMM) or W[k0 + i, n0 + j] (B = W, the dH GEMM). `Head::stage<BV,
// BH>(dst, v0, h0, stride_v, stride_h, tid, nthreads)` masks the edges itself.
template <typename G, typename Head, bool kTransB>
struct HeadStager {
  Head head;
  threadgroup typename G::stage_t* dst;
  int n0;
  int k0;
  uint tid;
  HeadStager(Head h, int n0_, threadgroup typename G::stage_t* dst_, ushort sg, ushort lane)
      : head(h), dst(dst_), n0(n0_), k0(0), tid(uint(sg) * 32 + uint(lane)) {}
  void load(int, int) const {
    if (kTransB) { // Bs[n][k] = W[n0 + n, k0 + k]
      head.template stage<G::BN, G::BK>(dst, n0, k0, G::kLdb, 1, tid, uint(G::kThreads));
    } else { // Bs[k][n] = W[k0 + k, n0 + n]
      head.template stage<G::BK, G::BN>(dst, k0, n0, G::kLdb, 1, tid, uint(G::kThreads));
    }
  }
  void next() {
    k0 += G::BK;
  }
};

// ---- the K loop and the hand-over ----------------------------------------------------

// mma (fresh: zero accumulators) += A B over K, staging a BK step of both
// operands between two barriers, as steel's GEMMKernel does: the first keeps a
// SIMD-group from restaging while another still multiplies the previous step.
// m_valid / n_valid: rows of A and columns of B inside the matrices.
template <typename G, typename OpA, typename OpB>
inline void gemm_k_loop(thread typename G::mma_t& mma, thread OpA& a, thread OpB& b, int K,
                        int m_valid, int n_valid, threadgroup typename G::stage_t* As,
                        threadgroup typename G::stage_t* Bs) {
  for (int k0 = 0; k0 < K; k0 += G::BK) {
    const int k_valid = min(int(G::BK), K - k0);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    a.load(k_valid, m_valid);
    b.load(k_valid, n_valid);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    mma.mma(As, Bs);
    a.next();
    b.next();
  }
}

// ---- the accumulator tile, where the epilogues read it ----------------------------------
// Epilogues work on the accumulators in registers (no threadgroup copy of the
// tile, so a group needs no more threadgroup memory than MLX's GEMM). BlockMMA's
// layout (Apple's 8x8 fragment layout, steel/gemm/mma.h): a lane holds, for
// i < kTM, j < kTN, k < 2, the element
//     row  mma.sm + i * 8 * WM,   column  mma.sn + j * 8 * WN + k
// of the BM x BN tile, value mma.Ctile.frag_at(i, j)[k]. The 4 lanes that hold
// one row of a fragment differ in lane bits 0 and 3; row_max / row_sum reduce
// over them (every lane gets the same bits), so a SIMD-group's per-row value
// covers its own columns of the tile: its WN - 1 neighbours along the row hold
// the others (merge them once, after the tile loop, see the forward kernel).
template <typename G>
struct Acc {
  static constexpr constant int kTM = G::BM / (8 * G::WM);
  static constexpr constant int kTN = G::BN / (8 * G::WN);
  static int row(thread const typename G::mma_t& mma, int i) {
    return int(mma.sm) + i * 8 * G::WM;
  }
  static int col(thread const typename G::mma_t& mma, int j, int k) {
    return int(mma.sn) + j * 8 * G::WN + k;
  }
  static float value(thread const typename G::mma_t& mma, int i, int j, int k) {
    return mma.Ctile.frag_at(i, j)[k];
  }
  // The SIMD-group's column index (0 .. WN - 1) and whether this lane is the one
  // of its 4 that speaks for the row (lane bits 0 and 3 clear).
  static int column_group(uint sg) {
    return int(sg) % G::WN;
  }
  static bool row_leader(uint lane) {
    return (lane & 9u) == 0u;
  }
};

// Max / sum over the 4 lanes holding one fragment row; identical bits in all 4
// (the sums pair lanes in a fixed order and float addition commutes).
inline float row_max(float x) {
  x = fmax(x, simd_shuffle_xor(x, ushort(1)));
  return fmax(x, simd_shuffle_xor(x, ushort(8)));
}
inline float row_sum(float x) {
  x += simd_shuffle_xor(x, ushort(1));
  return x + simd_shuffle_xor(x, ushort(8));
}

// The tile to out[(m0 + r) * ld + n0 + c] for the elements inside rows x cols,
// added to what is there when `accumulate` (dW across chunks). Not steel's
// apply_epilogue_safe: in mlx 0.32.4 it checks only the columns of the tile
// and reads the rows past the matrix.
template <typename G>
inline void store_tile(thread const typename G::mma_t& mma, device float* out, long ld, long m0,
                       int n0, long rows, int cols, bool accumulate) {
  for (int i = 0; i < Acc<G>::kTM; ++i) {
    const long r = m0 + Acc<G>::row(mma, i);
    if (r >= rows) {
      continue;
    }
    for (int j = 0; j < Acc<G>::kTN; ++j) {
      for (int k = 0; k < 2; ++k) {
        const int c = n0 + Acc<G>::col(mma, j, k);
        if (c < cols) {
          const long at = r * ld + c;
          const float v = Acc<G>::value(mma, i, j, k);
          out[at] = accumulate ? out[at] + v : v;
        }
      }
    }
  }
}

} // namespace lce
