// How the CPU kernels get SIMD code without -march=native in a wheel.
//
// The hot loops are written as plain loops over float32 with `omp simd`
// reductions (compiled with -fopenmp-simd: vectorization hints only, no OpenMP
// runtime) so the compiler may reorder the sums into vector lanes. On x86-64
// Linux with GCC, each kernel entry point is cloned for the x86-64-v4 level
// (AVX-512 F/BW/CD/DQ/VL with FMA) and the x86-64-v3 level (AVX2, FMA, F16C)
// and the loader picks the best at run time (target_clones, an ifunc).
// Elsewhere (macOS arm64: NEON and FMA are baseline) the default build is used.
//
// Both clones have FMA instructions at every vector width and for scalars,
// which the shared formulas ask for by name (flm::mul_add; the build has
// -ffp-contract=off so nothing else is fused): the zmm body of a loop, its
// ymm or scalar remainder and the other clones compute the same bits. (The
// clones used to be "avx512f" and "avx2": the second had no FMA at all and the
// first none at ymm width.) The baseline x86-64 clone, for CPUs without FMA,
// computes the FMAs in software: same results, much slower.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
// The level names (GCC >= 12) rather than single features: GCC refuses to
// inline a helper built for a target that is not a subset of the caller's.
// Lambdas are marked FL_LAMBDA_INLINE so they are inlined into each clone.
#define FL_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FL_VECTOR_CLONES
#endif

// Lambdas in a cloned kernel must be inlined into each clone, or the hot loop
// ends up in a separate function built for the default target.
#if defined(__GNUC__)
#define FL_LAMBDA_INLINE __attribute__((always_inline))
#else
#define FL_LAMBDA_INLINE
#endif

#define FL_PRAGMA(x) _Pragma(#x)
// A vectorizable loop with the given reduction clause(s).
#define FL_SIMD_REDUCE(clauses) FL_PRAGMA(omp simd clauses)
#define FL_SIMD FL_PRAGMA(omp simd)

namespace fl::cpu {

// Rows are processed in chunks that stay in L1 between the max pass and the
// exp pass, so the logits come from memory exactly once.
constexpr int kChunk = 2048;

// Work smaller than this many elements per thread is not worth a wake-up.
constexpr int64_t kMinElementsPerTask = 1 << 15;

inline int64_t rows_per_task(int64_t row_length) {
  return row_length >= kMinElementsPerTask ? 1 : kMinElementsPerTask / (row_length > 0 ? row_length : 1);
}

} // namespace fl::cpu
