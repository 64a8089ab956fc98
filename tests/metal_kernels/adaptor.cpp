// Harness adaptor for metal/{cross_entropy,softmax_focal,pointwise_loss}.metal
// (tests/test_metal_kernels.py). Compiled by tests/metal_host after the three
// .metal sources, in one translation unit, with -I csrc.
//
// Every entry point builds its launch plan with csrc/metal/launch_plan.cpp --
// the same function eval_gpu uses -- and dispatches the kernel that the plan
// names, found by that name in the harness's kernel table (mh_kernels.h), which
// build.py generates from the .metal sources: a plan can only run a kernel the
// metallib defines under that name.
//
// Notes for the harness (tests/metal_host, not edited from here):
//  - Project kernels include csrc headers by paths relative to metal/
//    ("../csrc/math/...") so that static_check.check(path) works with its
//    default include dirs; this adaptor itself needs include_dirs=("csrc",).
//  - This file is compiled after the Metal shim's keyword macros (device,
//    constant, kernel, thread, threadgroup): it and launch_plan.cpp avoid them
//    as identifiers.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <type_traits>
#include <string>

#include "fenced.h"
#include "plan_runner.h"

namespace {

using fl::mplan::KDtype;
using fl::mplan::LaunchPlan;

using mkp::run_plan;
using mkp::to_dtype;
using mkp::with_dtype;

// ---- cross-entropy -----------------------------------------------------------------

struct CeBufs {
  const void* logits;
  const int64_t* index;
  const void* probs;
  const float* weights;
  float* loss;
  float* lse;
  float* lse_lo;
  float* a_sum;
  const float* g_loss;
  const float* g_lse;
  void* grad;
  // forward with return_stats (CeArgs.stats); otherwise the loss buffer, as eval_gpu binds
  float* stat_lse;
  float* entropy;
  int64_t* argmax;
  uint8_t* correct;
};

// The kernel a plan names, called with the buffers of one call. The function
// type of a family depends on the dtype only (the bool template parameters
// change no argument), so each call site names the family's type for its T.
template <class T>
void ce_fwd_call(const LaunchPlan& p, const CeBufs& b, const CeArgs& a) {
  auto* fn = mh::kernel<decltype(ce_forward<T, false, false, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.logits), reinterpret_cast<const long*>(b.index),
       static_cast<const T*>(b.probs), b.weights, b.loss, b.lse, b.lse_lo, b.a_sum, a,
       b.stat_lse, b.entropy, reinterpret_cast<long*>(b.argmax),
       reinterpret_cast<bool*>(b.correct), t.threadgroup_memory<float>(0), t.threadgroup_position_in_grid.x,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

template <class T>
void ce_bwd_call(const LaunchPlan& p, const CeBufs& b, const CeArgs& a) {
  auto* fn = mh::kernel<decltype(ce_backward<T, false, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.logits), reinterpret_cast<const long*>(b.index),
       static_cast<const T*>(b.probs), b.weights, b.lse, b.lse_lo, b.a_sum, b.g_loss, b.g_lse,
       static_cast<T*>(b.grad), a, t.threadgroup_position_in_grid.xy,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.xy);
  });
}

// ---- softmax focal -------------------------------------------------------------------

struct SfBufs {
  const void* logits;
  const int64_t* index;
  const float* alpha;
  float* loss;
  float* lse;
  float* lse_lo;
  float* coef;
  const float* g_loss;
  void* grad;
};

template <class T>
void sf_fwd_call(const LaunchPlan& p, const SfBufs& b, const SfArgs& a) {
  auto* fn = mh::kernel<decltype(sf_forward<T, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.logits), reinterpret_cast<const long*>(b.index), b.alpha, b.loss,
       b.lse, b.lse_lo, b.coef, a, t.threadgroup_memory<float>(0),
       t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
       t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

template <class T>
void sf_bwd_call(const LaunchPlan& p, const SfBufs& b, const SfArgs& a) {
  auto* fn = mh::kernel<decltype(sf_backward<T>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.logits), reinterpret_cast<const long*>(b.index), b.lse, b.lse_lo,
       b.coef, b.g_loss, static_cast<T*>(b.grad), a, t.threadgroup_position_in_grid.xy,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.xy);
  });
}

// ---- element-wise ----------------------------------------------------------------------

struct PwBufs {
  const void* pred;
  const void* target;
  void* out; // loss (predictions' dtype), or float32 partial sums
  float* result; // sum finish output
  const void* cotan; // float32, or the predictions' dtype (_cot16 kernels)
  void* grad;
  const PwTargetLayout* layout; // bound for every variant, read by the _bcast ones
};

template <class T>
void pw_fwd_call(const LaunchPlan& p, const PwBufs& b, const PwArgs& a) {
  auto* fn = mh::kernel<decltype(pw_forward<T, 0, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.pred), static_cast<const T*>(b.target), static_cast<T*>(b.out), a,
       *b.layout, t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
       t.threads_per_threadgroup.x);
  });
}

template <class T>
void pw_partial_call(const LaunchPlan& p, const PwBufs& b, const PwArgs& a) {
  auto* fn = mh::kernel<decltype(pw_forward_partial<T, 0, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.pred), static_cast<const T*>(b.target), static_cast<float*>(b.out),
       a, *b.layout, t.threadgroup_memory<float>(0), t.threadgroup_position_in_grid.x,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

void pw_finish_call(const LaunchPlan& p, const PwBufs& b, const PwArgs& a) {
  auto* fn = mh::kernel<decltype(fl_pw_sum_finish)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const float*>(b.out), b.result, a, t.threadgroup_memory<float>(0),
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

// G: the cotangent's type (float, or T for the _cot16 kernels).
template <class T, class G>
void pw_bwd_call(const LaunchPlan& p, const PwBufs& b, const PwArgs& a) {
  auto* fn = mh::kernel<decltype(pw_backward<T, G, 0, false>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.pred), static_cast<const T*>(b.target),
       static_cast<const G*>(b.cotan), static_cast<T*>(b.grad), a, *b.layout,
       t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup,
       t.threads_per_threadgroup.x);
  });
}

// Plan summary for Python: looped, grid x/y/z, group x/y/z, threadgroup bytes,
// elements per thread, number of buffers.
void describe(const LaunchPlan& p, uint32_t* out) {
  uint32_t v[10] = {p.looped ? 1u : 0u, p.grid[0], p.grid[1], p.grid[2], p.group[0],
                    p.group[1], p.group[2], p.threadgroup_bytes, uint32_t(p.elems_per_thread),
                    uint32_t(p.buffers.size())};
  std::memcpy(out, v, sizeof v);
}

} // namespace

// The pipeline's maxTotalThreadsPerThreadgroup every plan is made for: eval_gpu
// asks the real pipeline (gpu::fit_plan); tests set smaller limits.
int g_pipeline_limit = fl::mplan::kMaxGroupThreads;

int limited(int max_threads) {
  return max_threads < g_pipeline_limit ? max_threads : g_pipeline_limit;
}

extern "C" {

int set_pipeline_limit(int limit) {
  return mh::guarded([&] { g_pipeline_limit = limit; });
}

// which: 0 ce fwd, 1 ce bwd, 2 sf fwd, 3 sf bwd, 4 pw fwd (a = kind, b = reduce),
// 5 pw bwd (a = kind), 6 pw sum finish (n = partials). Name into name_out (cap 128).
int plan_info(int which, int dt, int64_t rows, int64_t n, int a, int b, int max_threads,
              uint32_t* out, uint8_t* name_out) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    LaunchPlan p;
    KDtype d = to_dtype(dt);
    switch (which) {
      case 0: p = P::ce_forward_plan(d, rows, int(n), a != 0, b != 0, max_threads); break;
      case 1: p = P::ce_backward_plan(d, rows, int(n), a != 0, b != 0, max_threads); break;
      case 2: p = P::sf_forward_plan(d, rows, int(n), max_threads); break;
      case 3: p = P::sf_backward_plan(d, rows, int(n), max_threads); break;
      case 4: p = P::pw_forward_plan(d, a, uint64_t(n), b, max_threads); break;
      case 5: p = P::pw_backward_plan(d, a, uint64_t(n), b != 0, max_threads); break;
      case 6: p = P::pw_sum_finish_plan(uint64_t(n), max_threads); break;
      default: throw mh::Error("plan_info: unknown kernel family");
    }
    describe(p, out);
    std::string s = p.kernel_name;
    for (auto& buf : p.buffers) s += "," + buf;
    if (s.size() + 1 > 512) throw mh::Error("plan_info: name too long");
    std::memcpy(name_out, s.c_str(), s.size() + 1);
  });
}

int ce_forward_run(int dt, int soft, int weighted, int max_threads, const void* logits,
                   const int64_t* index, const void* probs, const float* weights, float* loss,
                   float* lse, float* lse_lo, float* a_sum, int64_t rows, int num_classes,
                   float smoothing,
                   int mode, int has_ignore, int64_t ignore_index, float z_loss, float softcap,
                   int stats, float* stat_lse, float* entropy, int64_t* argmax, uint8_t* correct) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::ce_forward_plan(to_dtype(dt), rows, num_classes, soft != 0,
                                              weighted != 0, limited(max_threads));
    CeArgs args = fl::mplan::make_ce_args(num_classes, smoothing, mode, has_ignore != 0,
                                          ignore_index, z_loss, softcap, stats != 0);
    CeBufs b{logits, index, probs, weights, loss, lse, lse_lo, a_sum, nullptr, nullptr, nullptr,
             stat_lse, entropy, argmax, correct};
    if (stats == 0) { // as eval_gpu: the statistics' slots get the loss buffer
      b.stat_lse = b.entropy = loss;
      b.argmax = reinterpret_cast<int64_t*>(loss);
      b.correct = reinterpret_cast<uint8_t*>(loss);
    }
    with_dtype(to_dtype(dt), [&]<class T>() { ce_fwd_call<T>(p, b, args); });
  });
}

int ce_backward_run(int dt, int soft, int weighted, const void* logits, const int64_t* index,
                    const void* probs, const float* weights, const float* lse,
                    const float* lse_lo, const float* a_sum, const float* g_loss, const float* g_lse, void* grad,
                    int64_t rows, int num_classes, float smoothing, int mode, int has_ignore,
                    int64_t ignore_index, float z_loss, float softcap) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::ce_backward_plan(to_dtype(dt), rows, num_classes, soft != 0,
                                               weighted != 0, g_pipeline_limit);
    CeArgs args = fl::mplan::make_ce_args(num_classes, smoothing, mode, has_ignore != 0,
                                          ignore_index, z_loss, softcap);
    CeBufs b{logits, index, probs, weights, nullptr, const_cast<float*>(lse),
             const_cast<float*>(lse_lo), const_cast<float*>(a_sum), g_loss, g_lse, grad,
             nullptr, nullptr, nullptr, nullptr};
    with_dtype(to_dtype(dt), [&]<class T>() { ce_bwd_call<T>(p, b, args); });
  });
}

int sf_forward_run(int dt, int max_threads, const void* logits, const int64_t* index,
                   const float* alpha, float* loss, float* lse, float* lse_lo, float* coef,
                   int64_t rows,
                   int num_classes, float gamma, float alpha_scalar, int has_class_alpha,
                   int has_ignore, int64_t ignore_index) {
  return mh::guarded([&] {
    LaunchPlan p =
        fl::mplan::sf_forward_plan(to_dtype(dt), rows, num_classes, limited(max_threads));
    SfArgs args = fl::mplan::make_sf_args(num_classes, gamma, alpha_scalar, has_class_alpha != 0,
                                          has_ignore != 0, ignore_index);
    SfBufs b{logits, index, alpha, loss, lse, lse_lo, coef, nullptr, nullptr};
    with_dtype(to_dtype(dt), [&]<class T>() { sf_fwd_call<T>(p, b, args); });
  });
}

int sf_backward_run(int dt, const void* logits, const int64_t* index, const float* lse,
                    const float* lse_lo, const float* coef, const float* g_loss, void* grad, int64_t rows,
                    int num_classes, float gamma, float alpha_scalar, int has_class_alpha,
                    int has_ignore, int64_t ignore_index) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::sf_backward_plan(to_dtype(dt), rows, num_classes, g_pipeline_limit);
    SfArgs args = fl::mplan::make_sf_args(num_classes, gamma, alpha_scalar, has_class_alpha != 0,
                                          has_ignore != 0, ignore_index);
    SfBufs b{logits, index, nullptr, nullptr, const_cast<float*>(lse),
             const_cast<float*>(lse_lo), const_cast<float*>(coef),
             g_loss, grad};
    with_dtype(to_dtype(dt), [&]<class T>() { sf_bwd_call<T>(p, b, args); });
  });
}

} // extern "C"

namespace {

uint64_t element_count(const int64_t* shape, int ndim) {
  uint64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= uint64_t(shape[i]);
  return n;
}

// A target of shape tshape[0 .. tnd) read against predictions of shape
// pshape[0 .. pnd): its layout (launch_plan.cpp's rules; an error if it does
// not fit), and its data, copied against an inaccessible page for fence 1
// (after its end) / 2 (before its start) so that a stray read faults.
struct BcastTarget {
  PwTargetLayout layout;
  uint64_t n; // the predictions' element count
  const void* data;
  std::unique_ptr<mkp::Fenced> fenced;

  BcastTarget(int dt, const void* target, const int64_t* pshape, int pnd, const int64_t* tshape,
              int tnd, int fence)
      : n(element_count(pshape, pnd)), data(target) {
    if (!fl::mplan::make_pw_target_layout(std::vector<int64_t>(pshape, pshape + pnd),
                                          std::vector<int64_t>(tshape, tshape + tnd), &layout)) {
      throw mh::Error("the target broadcasts in more than FL_PW_MAX_TARGET_GROUPS groups");
    }
    if (fence != 0) {
      size_t bytes = size_t(element_count(tshape, tnd)) * size_t(fl::mplan::dtype_size(to_dtype(dt)));
      fenced = std::make_unique<mkp::Fenced>(target, bytes, fence);
      data = fenced->data();
    }
  }
};

void pw_forward_impl(int dt, int kind, int reduce, const void* pred, const void* target,
                     void* out, float* partials, uint64_t n, float p0, float p1,
                     const PwTargetLayout* layout) {
  KDtype d = to_dtype(dt);
  PwArgs args = fl::mplan::make_pw_args(n, p0, p1, reduce);
  LaunchPlan p = fl::mplan::pw_forward_plan(d, fl::mplan::pw_kernel_kind(kind, p1), n, reduce,
                                            g_pipeline_limit, layout);
  PwTargetLayout unread{}; // the plain kernels get a layout they never read
  const PwTargetLayout* bound = layout ? layout : &unread;
  if (reduce == 0) {
    PwBufs b{pred, target, out, nullptr, nullptr, nullptr, bound};
    with_dtype(d, [&]<class T>() { pw_fwd_call<T>(p, b, args); });
    return;
  }
  PwBufs b{pred, target, partials, static_cast<float*>(out), nullptr, nullptr, bound};
  with_dtype(d, [&]<class T>() { pw_partial_call<T>(p, b, args); });
  pw_finish_call(fl::mplan::pw_sum_finish_plan(args.num_partials, g_pipeline_limit), b, args);
}

void pw_backward_impl(int dt, int kind, int reduce, const void* pred, const void* target,
                      const void* cotan, int cotan_in_dtype, void* grad, uint64_t n, float p0,
                      float p1, const PwTargetLayout* layout) {
  PwArgs args = fl::mplan::make_pw_args(n, p0, p1, reduce);
  LaunchPlan p = fl::mplan::pw_backward_plan(to_dtype(dt), fl::mplan::pw_kernel_kind(kind, p1), n,
                                             cotan_in_dtype != 0, g_pipeline_limit, layout);
  PwTargetLayout unread{};
  PwBufs b{pred, target, nullptr, nullptr, cotan, grad, layout ? layout : &unread};
  with_dtype(to_dtype(dt), [&]<class T>() {
    // The _cot16 kernels read a cotangent of the predictions' 16-bit dtype.
    if (cotan_in_dtype != 0 && !std::is_same_v<T, float>) {
      pw_bwd_call<T, T>(p, b, args);
    } else {
      pw_bwd_call<T, float>(p, b, args);
    }
  });
}

} // namespace

extern "C" {

// reduce 0: out[n] = loss. reduce 1/2: partials[max(1, P)] then out[0] = sum (/ n).
int pw_forward_run(int dt, int kind, int reduce, const void* pred, const void* target,
                   void* out, float* partials, uint64_t n, float p0, float p1) {
  return mh::guarded([&] {
    pw_forward_impl(dt, kind, reduce, pred, target, out, partials, n, p0, p1, nullptr);
  });
}

// cotan_in_dtype: the element-wise cotangent has the predictions' dtype.
int pw_backward_run(int dt, int kind, int reduce, const void* pred, const void* target,
                    const void* cotan, int cotan_in_dtype, void* grad, uint64_t n, float p0,
                    float p1) {
  return mh::guarded([&] {
    pw_backward_impl(dt, kind, reduce, pred, target, cotan, cotan_in_dtype, grad, n, p0, p1,
                     nullptr);
  });
}

// The same with a target of its own (row-contiguous) shape that broadcasts to
// the predictions' shape, read through its layout, as eval_gpu binds it
// (fence: see BcastTarget).
int pw_forward_bcast_run(int dt, int kind, int reduce, const void* pred, const void* target,
                         void* out, float* partials, float p0, float p1, const int64_t* pshape,
                         int pnd, const int64_t* tshape, int tnd, int fence) {
  return mh::guarded([&] {
    BcastTarget t(dt, target, pshape, pnd, tshape, tnd, fence);
    pw_forward_impl(dt, kind, reduce, pred, t.data, out, partials, t.n, p0, p1, &t.layout);
  });
}

int pw_backward_bcast_run(int dt, int kind, int reduce, const void* pred, const void* target,
                          const void* cotan, int cotan_in_dtype, void* grad, float p0, float p1,
                          const int64_t* pshape, int pnd, const int64_t* tshape, int tnd,
                          int fence) {
  return mh::guarded([&] {
    BcastTarget t(dt, target, pshape, pnd, tshape, tnd, fence);
    pw_backward_impl(dt, kind, reduce, pred, t.data, cotan, cotan_in_dtype, grad, t.n, p0, p1,
                     &t.layout);
  });
}

// The layout's rules for Python: out = [fits, identity, ndim, size[0..8), stride[0..8)]
// and the forward (which 4, b = reduce) or backward (which 5, b = cot16) plan's
// kernel name into name_out (cap 128).
int pw_layout_info(const int64_t* pshape, int pnd, const int64_t* tshape, int tnd, int which,
                   int dt, int kind, int b, int64_t* out, uint8_t* name_out) {
  return mh::guarded([&] {
    PwTargetLayout layout;
    bool fits = fl::mplan::make_pw_target_layout(std::vector<int64_t>(pshape, pshape + pnd),
                                                 std::vector<int64_t>(tshape, tshape + tnd), &layout);
    uint64_t n = element_count(pshape, pnd);
    out[0] = fits;
    out[1] = fits && fl::mplan::pw_target_is_identity(layout, n);
    out[2] = layout.ndim;
    for (int g = 0; g < FL_PW_MAX_TARGET_GROUPS; ++g) {
      out[3 + g] = layout.size[g];
      out[3 + FL_PW_MAX_TARGET_GROUPS + g] = layout.stride[g];
    }
    std::string name;
    if (fits) {
      LaunchPlan p = which == 4
          ? fl::mplan::pw_forward_plan(to_dtype(dt), kind, n, b, g_pipeline_limit, &layout)
          : fl::mplan::pw_backward_plan(to_dtype(dt), kind, n, b != 0, g_pipeline_limit, &layout);
      name = p.kernel_name;
    }
    std::memcpy(name_out, name.c_str(), name.size() + 1);
  });
}

// Only the finish kernel of the fused sum, over given partials: out[0] = their
// sum (/ n for reduce 2), with the plan for the current pipeline limit.
int pw_sum_finish_run(const float* partials, float* out, uint64_t num_partials, uint64_t n,
                      int reduce) {
  return mh::guarded([&] {
    PwArgs args = fl::mplan::make_pw_args(n, 0.0f, 0.0f, reduce);
    args.num_partials = num_partials;
    PwBufs b{nullptr, nullptr, const_cast<float*>(partials), out, nullptr, nullptr, nullptr};
    pw_finish_call(fl::mplan::pw_sum_finish_plan(num_partials, g_pipeline_limit), b, args);
  });
}

} // extern "C"
