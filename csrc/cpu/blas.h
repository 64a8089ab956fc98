// The GEMMs of the chunked-head losses: float32 GEMM, row-major, and a
// 16-bit GEMM (bf16 or f16) with float32 accumulation where the CPU has the units.
//
// MLX's Linux wheel links a reference BLAS (~8 GFLOP/s here), so we link an
// optimised one ourselves: OpenBLAS from the scipy-openblas32 wheel on Linux
// (the build NumPy and SciPy ship; its symbols carry a `scipy_` prefix and
// 32-bit integers) and Accelerate on macOS. CMakeLists.txt picks the library.
//
// The 16-bit GEMMs are oneDNN's matmul primitive (bf16 or f16 operands,
// float32 accumulation and output), from a libdnnl found at run time
// (cpu/onednn_gemm.cpp: the `onednn-cpu-gomp` wheel, or one the dynamic loader
// finds), never linked and never required: bf16 is used only where the CPU
// has bf16 dot-product or matrix units (AVX512-BF16, AMX-BF16), f16 where it
// has AVX512-FP16 or AMX-FP16. Elsewhere, or without the library, 16-bit
// operands are widened to float32 for sgemm.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__APPLE__)
#ifndef ACCELERATE_NEW_LAPACK
#define ACCELERATE_NEW_LAPACK
#endif
#include <Accelerate/Accelerate.h>
#define FL_CBLAS_SGEMM cblas_sgemm
#else
#include <cblas.h>
#define FL_CBLAS_SGEMM scipy_cblas_sgemm
#endif

namespace fl::cpu {

// C[m, n] = op(A) op(B) + beta C with op(X) = X or X^T; all row-major with
// leading dimensions lda, ldb, ldc. Dimensions must fit BLAS's 32-bit ints
// (MLX shapes are 32-bit, so they do).
inline void sgemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                  int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {
    // BLAS would scale C by beta; with beta = 0 it must become 0.
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
      }
    }
    return;
  }
  FL_CBLAS_SGEMM(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                 int(m), int(n), int(k), 1.0f, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

// Make this thread's BLAS calls single-threaded: the kernels split the GEMMs
// into tiles themselves, one per task of their pool, and a BLAS that threads a
// GEMM can change its bits (OpenBLAS 0.3.34 run with 2+ threads splits
// e.g. a 300 x 1000 x 700 sgemm differently: other roundings), so results
// would follow OPENBLAS_NUM_THREADS. Called before every tiled phase, not once:
// the setting can be changed by anyone who loads the same library.
//  - OpenBLAS (pthreads build, as in the wheel): one library-wide count, which
//    the wheel does not let us set per thread; it concerns only this copy
//    (NumPy and SciPy load their own). Reading it is a load; set only if
//    someone changed it.
//  - Accelerate: a per-thread setting, macOS 15 and later (earlier systems
//    choose for themselves; nothing to set).
inline void blas_single_thread() {
#if defined(__APPLE__)
#if defined(__MAC_OS_X_VERSION_MAX_ALLOWED) && __MAC_OS_X_VERSION_MAX_ALLOWED >= 150000
  if (__builtin_available(macOS 15.0, *)) {
    BLASSetThreading(BLAS_THREADING_SINGLE_THREADED);
  }
#endif
#else
  if (scipy_openblas_get_num_threads() != 1) {
    scipy_openblas_set_num_threads(1);
  }
#endif
}

// ---- 16-bit GEMMs (cpu/onednn_gemm.cpp) ---------------------------------------

// The operand type of a 16-bit GEMM: bfloat16 or float16 bit patterns.
enum class HalfType { bf16, f16 };

// True when half_gemm(HalfType::bf16 / f16, ...) may be called: the CPU has
// AVX512-BF16 or AMX-BF16 (bf16) / AVX512-FP16 or AMX-FP16 (f16), a oneDNN 3.x
// libdnnl with an OpenMP runtime was loaded (on the first call: later calls
// are a load), and neither FL_BF16_GEMM=0 nor set_bf16_gemm_enabled(false)
// turned it off.
bool bf16_gemm_available();
bool f16_gemm_available();

// C[m, n] = op(A) op(B) + beta C (beta 0 or 1), A and B 16-bit bit patterns of
// `type`, C float32; row-major as sgemm. Products of 16-bit values are exact
// in float32 and accumulate in float32: a 16-bit operand gives the same
// operand values as its float32 widening would, only the order of the float32
// sums differs. oneDNN's matmul primitive (cached per shape), run on the
// calling thread (the library's own threads are set to one per caller).
void half_gemm(HalfType type, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc);

inline void bf16_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                      int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  half_gemm(HalfType::bf16, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

// Where to look for libdnnl besides the dynamic loader's own search path
// (bindings: Python's sys.prefix/lib, where the wheel installs it).
void set_bf16_gemm_search_dirs(const std::vector<std::string>& dirs);

// Test and benchmark hook: use (true) or bypass (false) the 16-bit GEMMs where
// they are available, to compare both paths in one process.
void set_bf16_gemm_enabled(bool enabled);

// What the run-time choice found: the CPU's bf16 units ("amx_bf16",
// "avx512_bf16" or "") and float16 units ("amx_fp16", "avx512_fp16" or ""),
// the library loaded (path, or "") and its version, whether each GEMM is used,
// and why not when the bf16 one is not; `implementation`: oneDNN's name for
// the kernel of the latest matmul created (e.g. "brg:avx512_core_amx").
struct HalfGemmStatus {
  std::string cpu_units;
  std::string f16_units;
  std::string library;
  std::string version;
  std::string implementation;
  bool active = false;
  bool f16_active = false;
  std::string reason;
};
HalfGemmStatus bf16_gemm_status();

} // namespace fl::cpu
