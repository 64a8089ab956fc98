// Entry points for the self-test kernels (tests/test_metal_harness.py): each takes
// device pointers and sizes from Python and dispatches one kernel. Compiled after
// the selftest/*.metal sources (see build.py), so the kernels are in scope.

#include <cstdint>

#include "metal_host.h"

// Reduction kernels launch one group per row.
template <class T, class Kernel>
static int dispatch_rows(Kernel body, const T* x, float* out, uint32_t rows, uint32_t n,
                         uint32_t threads, bool threadgroup_buffer) {
  return mh::guarded([&] {
    std::vector<std::size_t> tg;
    if (threadgroup_buffer) tg.push_back(32 * sizeof(float));
    mh::dispatch_threadgroups({rows}, {threads}, tg, [&](const mh::ThreadCtx& t) {
      body(x, out, n, t);
    });
  });
}

extern "C" int row_sum_f32(const float* x, float* out, uint32_t rows, uint32_t n,
                           uint32_t threads) {
  return dispatch_rows(
      [](const float* x, float* out, const uint32_t& n, const mh::ThreadCtx& t) {
        row_sum<float>(x, out, n, t.threadgroup_memory<float>(0), t.threadgroup_position_in_grid.x,
                       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x,
                       t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup,
                       t.simdgroups_per_threadgroup);
      },
      x, out, rows, n, threads, true);
}

extern "C" int row_sum_f16(const metal::half* x, float* out, uint32_t rows, uint32_t n,
                           uint32_t threads) {
  return dispatch_rows(
      [](const metal::half* x, float* out, const uint32_t& n, const mh::ThreadCtx& t) {
        row_sum<metal::half>(x, out, n, t.threadgroup_memory<float>(0),
                             t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
                             t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
                             t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
      },
      x, out, rows, n, threads, true);
}

extern "C" int row_max_f32(const float* x, float* out, uint32_t rows, uint32_t n,
                           uint32_t threads) {
  return dispatch_rows(
      [](const float* x, float* out, const uint32_t& n, const mh::ThreadCtx& t) {
        row_max(x, out, n, t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
                t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
                t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
      },
      x, out, rows, n, threads, false);
}

extern "C" int simd_ops_f32(const float* x, metal::float4* out, uint32_t* sizes, uint32_t n,
                            uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threads({n}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      simd_ops(x, out, sizes, t.thread_position_in_grid.x, t.threads_per_threadgroup.x);
    });
  });
}

extern "C" int shim_values_f32(float* out) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {1}, {}, [&](const mh::ThreadCtx&) { shim_values(out); });
  });
}

// The broken kernels: one group of `threads` threads each.

extern "C" int sum_no_barrier_f32(const float* x, float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {threads * sizeof(float)},
                              [&](const mh::ThreadCtx& t) {
      sum_no_barrier(x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup,
                     t.threads_per_threadgroup.x);
    });
  });
}

template <class Kernel>
static int dispatch_uninit(Kernel body, const float* x, float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {32 * sizeof(float)}, [&](const mh::ThreadCtx& t) {
      body(x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup,
             t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
    });
  });
}

extern "C" int sum_uninit_f32(const float* x, float* out, uint32_t threads) {
  return dispatch_uninit(sum_uninit, x, out, threads);
}

extern "C" int max_uninit_f32(const float* x, float* out, uint32_t threads) {
  return dispatch_uninit(max_uninit, x, out, threads);
}

extern "C" int barrier_in_branch_f32(float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {1024 * sizeof(float)},
                              [&](const mh::ThreadCtx& t) {
      barrier_in_branch(out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup);
    });
  });
}

extern "C" int barrier_per_branch_f32(float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {1024 * sizeof(float)},
                              [&](const mh::ThreadCtx& t) {
      barrier_per_branch(out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup);
    });
  });
}

extern "C" int simd_if_else_f32(const float* x, float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      simd_if_else(x, out, t.thread_position_in_grid.x, t.thread_index_in_simdgroup);
    });
  });
}

extern "C" int simd_after_return_f32(const float* x, float* out, uint32_t n, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({(n + threads - 1) / threads}, {threads}, {},
                              [&](const mh::ThreadCtx& t) {
      simd_after_return(x, out, n, t.thread_position_in_grid.x);
    });
  });
}

extern "C" int shuffle_nonuniform_delta_f32(const float* x, float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      shuffle_nonuniform_delta(x, out, t.thread_position_in_grid.x, t.thread_index_in_simdgroup);
    });
  });
}

extern "C" int simd_or_barrier_f32(float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      simd_or_barrier(out, t.thread_position_in_grid.x, t.thread_index_in_simdgroup);
    });
  });
}

extern "C" int shift_right_f32(const float* x, float* out, uint32_t n) {
  return mh::guarded([&] {
    mh::dispatch_threads({n}, {32}, {}, [&](const mh::ThreadCtx& t) {
      shift_right(x, out, t.thread_position_in_grid.x);
    });
  });
}

extern "C" int threadgroup_overrun_f32(const float* x, float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {threads * sizeof(float)},
                              [&](const mh::ThreadCtx& t) {
      threadgroup_overrun(x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup);
    });
  });
}

// Dispatches an empty kernel with the given parameters, to check that the runtime
// enforces Metal's dispatch limits.
extern "C" int empty_dispatch(uint32_t threads, uint32_t threadgroup_bytes) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {threadgroup_bytes}, [](const mh::ThreadCtx&) {});
  });
}

// ---- the harness's newer checks: each broken kernel next to its correct twin ----

// One group of `threads` threads with a [[threadgroup(0)]] buffer of 32 slots.
template <class T, class Kernel>
static int dispatch_partials(Kernel kernel, const T* x, T* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {32 * sizeof(T) < 16 ? 16 : 32 * sizeof(T)},
                              [&](const mh::ThreadCtx& t) {
      kernel(x, out, t.threadgroup_memory<T>(0), t.thread_index_in_threadgroup,
             t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup,
             t.simdgroups_per_threadgroup);
    });
  });
}

extern "C" int scratch_reuse(const float* x, float* out, uint32_t threads, uint32_t fixed) {
  return fixed ? dispatch_partials(sum_and_sum_of_squares<true>, x, out, threads)
               : dispatch_partials(sum_and_sum_of_squares<false>, x, out, threads);
}

extern "C" int extremum_f32(const float* x, float* out, uint32_t threads, uint32_t masked) {
  return masked ? dispatch_partials(extremum_of_partials<float, false, true>, x, out, threads)
                : dispatch_partials(extremum_of_partials<float, false, false>, x, out, threads);
}

extern "C" int extremum_f16(const metal::half* x, metal::half* out, uint32_t threads,
                            uint32_t masked) {
  return masked ? dispatch_partials(extremum_of_partials<metal::half, true, true>, x, out, threads)
                : dispatch_partials(extremum_of_partials<metal::half, true, false>, x, out, threads);
}

extern "C" int extremum_i32(const int* x, int* out, uint32_t threads, uint32_t masked) {
  return masked ? dispatch_partials(extremum_of_partials<int, true, true>, x, out, threads)
                : dispatch_partials(extremum_of_partials<int, true, false>, x, out, threads);
}

extern "C" int exchange_tg(const float* x, float* out, uint32_t threads, uint32_t publish) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {threads * sizeof(float)},
                              [&](const mh::ThreadCtx& t) {
      auto kernel = publish ? exchange_threadgroup<true> : exchange_threadgroup<false>;
      kernel(x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup,
             t.threads_per_threadgroup.x);
    });
  });
}

extern "C" int exchange_dev(const float* x, float* staged, float* out, uint32_t threads,
                            uint32_t publish) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      auto kernel = publish ? exchange_device<true> : exchange_device<false>;
      kernel(x, staged, out, t.thread_index_in_threadgroup, t.threads_per_threadgroup.x);
    });
  });
}

extern "C" int helper_simd(const float* x, float* out, uint32_t threads, uint32_t uniform) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      auto kernel = uniform ? helper_uniform : helper_if_else;
      kernel(x, out, t.thread_position_in_grid.x, t.thread_index_in_simdgroup);
    });
  });
}

extern "C" int helper_barrier(float* out, uint32_t threads) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) {
      helper_barrier_if_else(out, t.thread_index_in_threadgroup);
    });
  });
}

extern "C" int staging_array(const float* x, float* out, uint32_t threads, uint32_t at_limit) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {16}, [&](const mh::ThreadCtx& t) {
      auto kernel = at_limit ? big_staging<8188> : big_staging<8192>;
      kernel(x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup);
    });
  });
}

extern "C" int msl_subset_f32(const float* x, float* out) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {32}, {}, [&](const mh::ThreadCtx& t) {
      msl_subset(x, out, t.thread_index_in_threadgroup);
    });
  });
}

// ---- SIMD-group matrices (ok_simdgroup_matrix.metal, bad_simdgroup_matrix.metal) ----

using metal::bfloat;
using metal::half;

// One SIMD-group: d = a * b + c for 8x8 matrices (b transposed in memory if asked).
template <class T, class Acc>
static int run_mma_8x8(const T* a, const T* b, const Acc* c, Acc* d, uint32_t transpose_b) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {32}, {}, [&](const mh::ThreadCtx&) {
      if (transpose_b) mma_8x8<T, Acc, true>(a, b, c, d);
      else mma_8x8<T, Acc, false>(a, b, c, d);
    });
  });
}

#define MH_MMA_8X8_ENTRY(name, T, Acc)                                                   \
  extern "C" int name(const T* a, const T* b, const Acc* c, Acc* d, uint32_t transpose_b) { \
    return run_mma_8x8<T, Acc>(a, b, c, d, transpose_b);                                 \
  }
MH_MMA_8X8_ENTRY(mma_8x8_f32, float, float)
MH_MMA_8X8_ENTRY(mma_8x8_f16, half, half)
MH_MMA_8X8_ENTRY(mma_8x8_bf16, bfloat, bfloat)
MH_MMA_8X8_ENTRY(mma_8x8_f16_f32, half, float)
MH_MMA_8X8_ENTRY(mma_8x8_bf16_f32, bfloat, float)
#undef MH_MMA_8X8_ENTRY

extern "C" int matrix_forms_f32(const float* a, float* out) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {32}, {}, [&](const mh::ThreadCtx&) { matrix_forms(a, out); });
  });
}

extern "C" int fragment_layout_f32(const float* x, float* lanes, float* out) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {32}, {}, [&](const mh::ThreadCtx& t) {
      fragment_layout(x, lanes, out, t.thread_index_in_simdgroup);
    });
  });
}

// C[m x n] = A[m x k] B[k x n] by 32x32 blocks, 128 threads per block.
template <class T, class Acc, class Kernel>
static int run_tiled_gemm(Kernel kernel, const T* a, const T* b, Acc* c, uint32_t m, uint32_t n,
                          uint32_t k) {
  return mh::guarded([&] {
    const std::size_t tile_bytes = 256 * sizeof(T);
    mh::dispatch_threadgroups({n / 32, m / 32}, {128}, {tile_bytes, tile_bytes},
                              [&](const mh::ThreadCtx& t) {
      kernel(a, b, c, n, k, t.threadgroup_memory<T>(0), t.threadgroup_memory<T>(1),
             {t.threadgroup_position_in_grid.x, t.threadgroup_position_in_grid.y},
             t.thread_index_in_threadgroup, t.simdgroup_index_in_threadgroup);
    });
  });
}

#define MH_TILED_GEMM_ENTRY(name, T, Acc)                                                      \
  extern "C" int name(const T* a, const T* b, Acc* c, uint32_t m, uint32_t n, uint32_t k) {   \
    return run_tiled_gemm<T, Acc>(tiled_gemm<T, Acc>, a, b, c, m, n, k);                       \
  }
MH_TILED_GEMM_ENTRY(tiled_gemm_f32, float, float)
MH_TILED_GEMM_ENTRY(tiled_gemm_f16, half, half)
MH_TILED_GEMM_ENTRY(tiled_gemm_bf16, bfloat, bfloat)
MH_TILED_GEMM_ENTRY(tiled_gemm_f16_f32, half, float)
#undef MH_TILED_GEMM_ENTRY

extern "C" int tiled_gemm_broken_f32(uint32_t fault, const float* a, const float* b, float* c,
                                     uint32_t m, uint32_t n, uint32_t k) {
  switch (fault) {
    case 0: return run_tiled_gemm<float, float>(tiled_gemm_broken<0>, a, b, c, m, n, k);
    case 1: return run_tiled_gemm<float, float>(tiled_gemm_broken<1>, a, b, c, m, n, k);
    case 2: return run_tiled_gemm<float, float>(tiled_gemm_broken<2>, a, b, c, m, n, k);
    default: return run_tiled_gemm<float, float>(tiled_gemm_broken<3>, a, b, c, m, n, k);
  }
}

// One SIMD-group (or `threads` threads) running a kernel(x, out[, lane]).
template <class Kernel>
static int run_one_group(Kernel kernel, uint32_t threads = 32) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {threads}, {}, [&](const mh::ThreadCtx& t) { kernel(t); });
  });
}

extern "C" int strided_copy_f32(const float* x, float* out, uint32_t stride) {
  return run_one_group([&](const mh::ThreadCtx&) { strided_copy(x, out, stride); });
}

extern "C" int lane_skips_f32(const float* x, float* out, uint32_t threads, uint32_t skip) {
  return run_one_group(
      [&](const mh::ThreadCtx& t) {
        (skip ? lane_skips_multiply<true> : lane_skips_multiply<false>)(
            x, out, t.thread_index_in_simdgroup);
      },
      threads);
}

extern "C" int nonuniform_pointer_f32(const float* x, float* out) {
  return run_one_group(
      [&](const mh::ThreadCtx& t) { nonuniform_pointer(x, out, t.thread_index_in_simdgroup); });
}

extern "C" int transposed_origin_f32(const float* x, float* out, uint32_t origin) {
  return run_one_group([&](const mh::ThreadCtx&) {
    (origin ? transposed_with_origin<true> : transposed_with_origin<false>)(x, out);
  });
}

extern "C" int uninitialised_accumulator_f32(const float* x, float* out) {
  return run_one_group([&](const mh::ThreadCtx&) { uninitialised_accumulator(x, out); });
}

extern "C" int fragment_wrong_layout_f32(float* out) {
  return run_one_group(
      [&](const mh::ThreadCtx& t) { fragment_wrong_layout(out, t.thread_index_in_simdgroup); });
}

extern "C" int store_then_read_f32(const float* x, float* out, uint32_t barrier) {
  return mh::guarded([&] {
    mh::dispatch_threadgroups({1}, {64}, {128 * sizeof(float)}, [&](const mh::ThreadCtx& t) {
      (barrier ? store_then_read<true> : store_then_read<false>)(
          x, out, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup,
          t.simdgroup_index_in_threadgroup);
    });
  });
}

extern "C" int subnormal_probe_f32(const float* x, const metal::bfloat* xb, const metal::half* xh,
                                   float* out) {
  return mh::guarded([&] {
    mh::dispatch_threads({1}, {1}, {}, [&](const mh::ThreadCtx& t) {
      subnormal_probe(x, xb, xh, out, t.thread_position_in_grid.x);
    });
  });
}
