// Harness adaptor for metal/distillation.metal (tests/test_metal_distillation.py).
// Compiled by tests/metal_host after that source, with -I csrc. Every entry
// point builds its launch plan with csrc/metal/launch_plan.cpp (what eval_gpu
// uses) and runs the kernel the plan names, found by that name in the table
// build.py derives from the source.
#include <cstdint>

#include "plan_runner.h"

namespace {

using fl::mplan::KDtype;
using fl::mplan::LaunchPlan;
using mkp::run_plan;
using mkp::to_dtype;
using mkp::with_dtype;

struct KdBufs {
  const void* student;
  const void* teacher;
  const int64_t* index;
  float* loss;
  float* stats;
  const float* g_loss;
  void* grad;
};

// The kind changes no argument: one function type per (S, T).
template <class S, class T>
void kd_fwd_call(const LaunchPlan& p, const KdBufs& b, const KdArgs& a) {
  auto* fn = mh::kernel<decltype(kd_forward<S, T, 0>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const S*>(b.student), static_cast<const T*>(b.teacher),
       reinterpret_cast<const long*>(b.index), b.loss, b.stats, a, t.threadgroup_memory<float>(0),
       t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
       t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

template <class S, class T>
void kd_bwd_call(const LaunchPlan& p, const KdBufs& b, const KdArgs& a) {
  auto* fn = mh::kernel<decltype(kd_backward<S, T, 0>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const S*>(b.student), static_cast<const T*>(b.teacher),
       reinterpret_cast<const long*>(b.index), b.stats, b.g_loss, static_cast<S*>(b.grad), a,
       t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
       t.threads_per_threadgroup.xy);
  });
}

template <class F>
void with_dtypes(int sdt, int tdt, F&& f) {
  with_dtype(to_dtype(sdt), [&]<class S>() {
    with_dtype(to_dtype(tdt), [&]<class T>() { f.template operator()<S, T>(); });
  });
}

} // namespace

extern "C" {

// kind: 0 forward KL, 1 reverse KL, 2 JSD; c = 1 / temperature.
int kd_forward_run(int sdt, int tdt, int kind, int max_threads, const void* student,
                   const void* teacher, const int64_t* index, float* loss, float* stats,
                   int64_t rows, int vocab, int has_targets, int has_ignore, int64_t ignore_index,
                   float c, float beta, float d_scale, float alpha) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::kd_forward_plan(to_dtype(sdt), to_dtype(tdt), kind, rows, vocab,
                                              max_threads);
    KdArgs args = fl::mplan::make_kd_args(vocab, has_targets != 0, has_ignore != 0, ignore_index,
                                          c, beta, d_scale, alpha);
    KdBufs b{student, teacher, index, loss, stats, nullptr, nullptr};
    with_dtypes(sdt, tdt, [&]<class S, class T>() { kd_fwd_call<S, T>(p, b, args); });
  });
}

int kd_backward_run(int sdt, int tdt, int kind, int max_threads, const void* student,
                    const void* teacher, const int64_t* index, const float* stats,
                    const float* g_loss, void* grad, int64_t rows, int vocab, int has_targets,
                    int has_ignore, int64_t ignore_index, float c, float beta, float d_scale,
                    float alpha) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::kd_backward_plan(to_dtype(sdt), to_dtype(tdt), kind, rows, vocab,
                                               max_threads);
    KdArgs args = fl::mplan::make_kd_args(vocab, has_targets != 0, has_ignore != 0, ignore_index,
                                          c, beta, d_scale, alpha);
    KdBufs b{student, teacher, index, nullptr, const_cast<float*>(stats), g_loss, grad};
    with_dtypes(sdt, tdt, [&]<class S, class T>() { kd_bwd_call<S, T>(p, b, args); });
  });
}

// The plan's group size (threads) and kernel name, for the tests' checks.
int kd_plan_info(int sdt, int tdt, int kind, int backward, int64_t rows, int vocab,
                 int max_threads, uint32_t* out, uint8_t* name_out) {
  return mh::guarded([&] {
    LaunchPlan p = backward ? fl::mplan::kd_backward_plan(to_dtype(sdt), to_dtype(tdt), kind, rows,
                                                          vocab, max_threads)
                            : fl::mplan::kd_forward_plan(to_dtype(sdt), to_dtype(tdt), kind, rows,
                                                         vocab, max_threads);
    out[0] = p.grid[0];
    out[1] = p.grid[1];
    out[2] = p.group[0];
    out[3] = p.threadgroup_bytes;
    for (size_t i = 0; i < p.kernel_name.size() && i < 127; ++i) {
      name_out[i] = uint8_t(p.kernel_name[i]);
    }
    name_out[p.kernel_name.size() < 127 ? p.kernel_name.size() : 127] = 0;
  });
}

} // extern "C"
