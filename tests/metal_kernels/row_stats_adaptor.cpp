// Harness adaptor for metal/row_stats.metal (the row statistics of given logits;
// tests/test_metal_row_stats.py). Compiled by tests/metal_host after that
// source, with -I csrc. Each entry point builds its launch plan and arguments
// with csrc/metal/launch_plan.cpp (what csrc/metal/row_stats.cpp's eval_gpu
// uses) and runs the kernel the plan names, found by that name in the table
// build.py derives from the source.
#include <cstdint>

#include "plan_runner.h"

namespace {

using fl::mplan::LaunchPlan;
using mkp::run_plan;
using mkp::to_dtype;
using mkp::with_dtype;

RsArgs args_of(int vocab, int has_targets, int has_ignore, int64_t ignore_index, int sharded,
               int64_t vocab_start, float softcap, float temperature, int stats, int cot) {
  return fl::mplan::make_rs_logits_args(vocab, has_targets != 0, has_ignore != 0, ignore_index, sharded != 0,
                                        vocab_start, softcap, temperature, stats, cot);
}

} // namespace

extern "C" {

// out: lse, lse_lo, target, logit_sum, expected, expected_lo, max (float32
// [rows] each) and argmax (int64 [rows]); stats: the flm::RowStat bits written.
// has_targets 0: targets (any buffer) never read.
int rs_logits_forward_run(int dt, int max_threads, const void* logits, const int64_t* targets, float* lse,
                          float* lse_lo, float* target, float* logit_sum, float* expected, float* expected_lo,
                          float* max, int64_t* argmax, int64_t rows, int vocab, int has_targets, int has_ignore,
                          int64_t ignore_index, int sharded, int64_t vocab_start, float softcap,
                          float temperature, int stats) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::rs_logits_forward_plan(to_dtype(dt), rows, vocab, max_threads);
    RsArgs a = args_of(vocab, has_targets, has_ignore, ignore_index, sharded, vocab_start, softcap, temperature,
                       stats, 0);
    with_dtype(to_dtype(dt), [&]<class T>() {
      auto* fn = mh::kernel<decltype(rs_logits_forward<T>)>(p.kernel_name);
      const T* y = static_cast<const T*>(logits);
      const long* t = reinterpret_cast<const long*>(targets);
      run_plan(p, [&](const mh::ThreadCtx& c) {
        fn(y, t, lse, lse_lo, target, logit_sum, expected, expected_lo, max, reinterpret_cast<long*>(argmax), a,
           c.threadgroup_memory<float>(0), c.threadgroup_position_in_grid.x, c.thread_index_in_threadgroup,
           c.threads_per_threadgroup.x, c.thread_index_in_simdgroup, c.simdgroup_index_in_threadgroup,
           c.simdgroups_per_threadgroup);
      });
    });
  });
}

// g: the cotangents of lse, target, logit_sum, expected (cot: the bits of
// those bound; absent ones any valid buffer, never read); grad [rows, V] in the
// logits' dtype (may be the logits themselves: in place).
int rs_logits_backward_run(int dt, int max_threads, const void* logits, const int64_t* targets,
                           const float* lse, const float* lse_lo, const float* expected,
                           const float* expected_lo, const float* g_lse, const float* g_target,
                           const float* g_logit_sum, const float* g_expected, int cot, void* grad, int64_t rows,
                           int vocab, int has_targets, int has_ignore, int64_t ignore_index, int sharded, int64_t vocab_start,
                           float softcap, float temperature) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::rs_logits_backward_plan(to_dtype(dt), rows, vocab, max_threads);
    RsArgs a = args_of(vocab, has_targets, has_ignore, ignore_index, sharded, vocab_start, softcap, temperature, 0,
                       cot);
    with_dtype(to_dtype(dt), [&]<class T>() {
      auto* fn = mh::kernel<decltype(rs_logits_backward<T>)>(p.kernel_name);
      const long* t = reinterpret_cast<const long*>(targets);
      run_plan(p, [&](const mh::ThreadCtx& c) {
        fn(static_cast<const T*>(logits), t, lse, lse_lo, expected, expected_lo, g_lse, g_target, g_logit_sum,
           g_expected, static_cast<T*>(grad), a, c.threadgroup_position_in_grid.xy, c.thread_index_in_threadgroup,
           c.threads_per_threadgroup.xy);
      });
    });
  });
}

// The plans' kernel names and shapes, for the tests' checks: out = grid x, grid
// y, group x, threadgroup bytes.
int rs_logits_plan_info(int dt, int backward, int64_t rows, int vocab, int max_threads, uint32_t* out,
                        uint8_t* name_out) {
  return mh::guarded([&] {
    LaunchPlan p = backward ? fl::mplan::rs_logits_backward_plan(to_dtype(dt), rows, vocab, max_threads)
                            : fl::mplan::rs_logits_forward_plan(to_dtype(dt), rows, vocab, max_threads);
    out[0] = p.grid[0];
    out[1] = p.grid[1];
    out[2] = p.group[0];
    out[3] = p.threadgroup_bytes;
    size_t n = p.kernel_name.size() < 127 ? p.kernel_name.size() : 127;
    for (size_t i = 0; i < n; ++i) {
      name_out[i] = uint8_t(p.kernel_name[i]);
    }
    name_out[n] = 0;
  });
}

} // extern "C"
