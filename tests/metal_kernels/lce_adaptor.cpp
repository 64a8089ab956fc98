// Harness adaptor for metal/linear_cross_entropy.metal (with pointwise_loss.metal
// for the summed loss's finish kernel), used by tests/test_metal_linear_cross_entropy.py.
// Compiled by tests/metal_host after the .metal sources, in one translation unit,
// with -I csrc.
//
// Every entry point runs the dispatch sequence of csrc/metal/linear_cross_entropy.cpp
// (eval_gpu) with the plans of csrc/metal/launch_plan.cpp, and finds each kernel
// by the name the plan gives it in the harness's kernel table (mh_kernels.h,
// generated from the .metal sources). The temporaries eval_gpu allocates (per-split
// states, target logits, per-row losses, the dZ chunk) come from Python, so the
// harness guards and compares them too.
//
// Quantized heads (metal/quantized_head.h): lce_forward_run_q and
// lce_backward_run_q run the same dispatch sequences with such a head.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fenced.h"
#include "plan_runner.h"

namespace {

using fl::mplan::KDtype;
using fl::mplan::LaunchPlan;
using fl::mplan::LcePlan;

using mkp::run_plan;
using mkp::to_dtype;
using mkp::with_dtype;

// Buffers of one call, type-erased (each kernel casts to its instantiation's types).
struct LceBufs {
  const void* hidden;
  const void* weight;
  const void* scales;
  const void* qbiases;
  const int64_t* targets;
  const float* bias;
  float* partials;
  float* target_logit;
  float* loss;
  float* lse;
  float* lse_lo;
  bool* correct;
  float* entropy;
  uint32_t* argmax_partials; // [S * N * 2]
  int64_t* argmax;
  float* target_out;
  const float* g;
  float* dz;
  float* dh;
  float* dw;
  float* dbias;
};

// The kernel a plan names, with the buffers of one call. A kernel's function type
// depends on the hidden dtype T and on the head's weight and scale types only.
template <class T, class Head>
void fwd_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  // Every tile of a (T, Head) pair has the same function type (the tile is in the name).
  auto* fn = mh::kernel<decltype(lce_forward<T, Head, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM,
                                             FL_LCE_WN>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
       static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases),
       reinterpret_cast<const long*>(b.targets), b.bias,
       reinterpret_cast<metal::float4*>(b.partials), b.target_logit, a,
       reinterpret_cast<metal::uint2*>(b.argmax_partials), t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
       t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

void finish_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  auto* fn = mh::kernel<decltype(fl_lce_fwd_finish)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(reinterpret_cast<const metal::float4*>(b.partials), b.target_logit,
       reinterpret_cast<const long*>(b.targets), b.loss, b.lse, b.lse_lo, b.correct, b.entropy, a,
       reinterpret_cast<const metal::uint2*>(b.argmax_partials), reinterpret_cast<long*>(b.argmax),
       b.target_out, t.thread_position_in_grid.x);
  });
}

template <class T, class Head>
void dz_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  auto* fn = mh::kernel<decltype(lce_dz<T, Head, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM,
                                        FL_LCE_WN>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
       static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases),
       reinterpret_cast<const long*>(b.targets), b.bias, b.lse, b.lse_lo, b.g, b.dz, a,
       t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
       t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

template <class Head>
void dh_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  auto* fn = mh::kernel<decltype(lce_dh<Head>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(b.dz, static_cast<const Wt*>(b.weight), static_cast<const St*>(b.scales),
       static_cast<const St*>(b.qbiases), b.dh, a, t.threadgroup_position_in_grid.xy,
       t.thread_index_in_threadgroup, t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

template <class T>
void dw_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  auto* fn = mh::kernel<decltype(lce_dw<T>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(b.dz, static_cast<const T*>(b.hidden), b.dw, a, t.threadgroup_position_in_grid.xy,
       t.thread_index_in_threadgroup, t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

void dbias_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  auto* fn = mh::kernel<decltype(fl_lce_dbias)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) { fn(b.dz, b.dbias, a, t.thread_position_in_grid.x); });
}

// The stored-Z path's row kernel: outputs of the forward and dZ in place (b.dz).
void rows_call(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  auto* fn = mh::kernel<decltype(fl_lce_rows)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(b.dz, reinterpret_cast<const long*>(b.targets), b.loss, b.lse, b.lse_lo, b.correct,
       b.entropy, reinterpret_cast<long*>(b.argmax), b.target_out, a,
       t.threadgroup_position_in_grid.x, t.thread_index_in_threadgroup, t.threads_per_threadgroup.x);
  });
}

// Row statistics (ops/row_stats.h) on the same tiles: their finish and dZ.
struct RsBufs {
  float* lse;
  float* lse_lo;
  float* target;
  float* logit_sum;
  float* expected;
  float* expected_lo;
  float* max;
  int64_t* argmax;
  const float* g[4]; // cotangents of lse, target, logit_sum, expected (any valid buffer when absent)
};

void rs_finish_call(const LaunchPlan& p, const LceBufs& b, const RsBufs& r, const LceArgs& a) {
  auto* fn = mh::kernel<decltype(fl_rs_fwd_finish)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(reinterpret_cast<const metal::float4*>(b.partials), b.target_logit,
       reinterpret_cast<const long*>(b.targets), r.lse, r.lse_lo, r.target, r.logit_sum, r.expected,
       r.expected_lo, r.max, a, reinterpret_cast<const metal::uint2*>(b.argmax_partials),
       reinterpret_cast<long*>(r.argmax), t.thread_position_in_grid.x);
  });
}

template <class T, class Head>
void rs_dz_call(const LaunchPlan& p, const LceBufs& b, const RsBufs& r, const LceArgs& a) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  auto* fn = mh::kernel<decltype(rs_dz<T, Head, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM, FL_LCE_WN>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
       static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases),
       reinterpret_cast<const long*>(b.targets), b.bias, r.lse, r.lse_lo, r.expected, r.expected_lo,
       r.g[0], r.g[1], r.g[2], r.g[3], b.dz, a, t.threadgroup_position_in_grid.xy,
       t.thread_index_in_threadgroup, t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

int g_pipeline_limit = fl::mplan::kMaxGroupThreads;
// The plan's work bound per command buffer (lce_set_max_buffer_flops): small
// values cut the small shapes here into several forward launches and chunks.
int64_t g_max_buffer_flops = fl::mplan::kLceMaxBufferFlops;
// The device class eval_gpu reads from the GPU's architecture name (lce_set_device_class):
// it picks the forward tile (launch_plan.h lce_forward_tile). 's': MLX's default tile.
char g_device_class = 's';

// eval_gpu's plan of a call: the forward tile of the device class, then lce_plan.
fl::mplan::LcePlan call_plan(int64_t rows, int vocab, int hidden, int64_t chunk_bytes,
                             fl::mplan::KDtype hdt, const std::string& head) {
  const fl::mplan::LceTile t =
      fl::mplan::lce_forward_tile(g_device_class, hdt, head, rows, vocab, hidden);
  return fl::mplan::lce_plan(rows, vocab, hidden, chunk_bytes, g_max_buffer_flops, t);
}

// Options of a call, as eval_gpu gets them from LinearCrossEntropyParams.
struct Options {
  float smoothing;
  int mode;
  int has_ignore;
  int64_t ignore_index;
  float z_loss;
  float softcap;
  int has_bias;
};

LceArgs args_for(const LcePlan& plan, const Options& o) {
  return fl::mplan::make_lce_args(plan, o.smoothing, o.mode, o.has_ignore != 0, o.ignore_index,
                                  o.z_loss, o.softcap, o.has_bias != 0);
}

// The inputs of the tile kernels (a dense head: the weight in the scale slots,
// as eval_gpu binds it).
LceBufs tile_inputs(const void* hidden, const void* weight, const int64_t* targets,
                    const float* bias) {
  LceBufs b{};
  b.hidden = hidden;
  b.weight = weight;
  b.scales = weight;
  b.qbiases = weight;
  b.targets = targets;
  b.bias = bias;
  return b;
}

// The quantized head of the running lce_*_run_q call (bits 0: the weight is
// dense, of dtype code wdt). Set and cleared by those entry points, because
// the harness copies the scale arrays per call. mode: flm::kQuant*; the
// floating-point modes have uint8 scales (scale_dtype unused) and no biases
// (qbiases: the scales again, as eval_gpu binds them, or nvfp4's float32
// global scale).
struct QuantizedWeight {
  int mode = 0;
  int global_scale = 0; // nvfp4: qbiases is the float32 global scale
  int bits = 0;
  int group_size = 0;
  int scale_dtype = 0;
  const void* scales = nullptr;
  const void* qbiases = nullptr;
};
QuantizedWeight g_quantized;

// eval_gpu's choice of head (csrc/metal/linear_cross_entropy.cpp).
std::string head_for(int wdt) {
  if (g_quantized.bits != 0) {
    return fl::mplan::lce_quantized_head(
        g_quantized.mode, g_quantized.bits,
        g_quantized.mode == flm::kQuantAffine ? to_dtype(g_quantized.scale_dtype)
                                              : fl::mplan::KDtype::float32,
        g_quantized.global_scale != 0);
  }
  return fl::mplan::lce_dense_head(to_dtype(wdt));
}

// The head's buffers and arguments, as eval_gpu binds them.
void bind_head(LceBufs& b, LceArgs& a) {
  if (g_quantized.bits != 0) {
    b.scales = g_quantized.scales;
    b.qbiases = g_quantized.mode == flm::kQuantAffine || g_quantized.global_scale != 0
                    ? g_quantized.qbiases
                    : g_quantized.scales;
    a.bits = g_quantized.bits;
    a.group_size = g_quantized.group_size;
  }
}

// lce_set_fence: the _q entries copy w_q, scales and biases against an
// inaccessible page (fenced.h; 0: in place).
int g_fence = 0;
// LceArgs::lse_cotangent of the backward runs (a differentiable lse: g is
// [2, rows], the lse's cotangents after the rows'), as eval_gpu sets it.
int g_lse_cotangent = 0;

// f.template operator()<Head>() with a head of the types eval_gpu binds
// (head_for): dense of dtype code wdt, or the running _q call's quantized
// head. A kernel's function type depends on its head's weight and scale types
// only, so one head stands for every bits value (affine: QuantizedHead4<S>)
// or mode (floating point: Mxfp4Head): the kernel that runs is the one the
// plan's name finds in the table, and mh::kernel checks the type.
template <class F>
void with_head(int wdt, F&& f) {
  if (g_quantized.bits == 0) {
    with_dtype(to_dtype(wdt), [&]<class W>() { f.template operator()<lce::DenseHead<W>>(); });
  } else if (g_quantized.mode != flm::kQuantAffine) {
    f.template operator()<flk::Mxfp4Head>();
  } else {
    with_dtype(to_dtype(g_quantized.scale_dtype),
               [&]<class S>() { f.template operator()<flk::QuantizedHead4<S>>(); });
  }
}

// Runs run(w_q) with the quantized head q (w_q, scales, biases fenced when asked).
template <class F>
int with_quantized(QuantizedWeight q, const uint32_t* w_q, int64_t vocab, int hidden, F run) {
  return mh::guarded([&] {
    std::unique_ptr<mkp::Fenced> fw, fs, fb;
    if (g_fence != 0) {
      const std::size_t words = std::size_t(vocab) * std::size_t(hidden) * q.bits / 32;
      const std::size_t groups = std::size_t(vocab) * std::size_t(hidden / q.group_size);
      const bool affine = q.mode == flm::kQuantAffine;
      const std::size_t scale_bytes = !affine ? 1 : q.scale_dtype == 0 ? 4 : 2;
      fw = std::make_unique<mkp::Fenced>(w_q, words * 4, g_fence);
      fs = std::make_unique<mkp::Fenced>(q.scales, groups * scale_bytes, g_fence);
      w_q = static_cast<const uint32_t*>(fw->data());
      q.scales = fs->data();
      if (affine) {
        fb = std::make_unique<mkp::Fenced>(q.qbiases, groups * scale_bytes, g_fence);
        q.qbiases = fb->data();
      } else if (q.global_scale != 0) {
        fb = std::make_unique<mkp::Fenced>(q.qbiases, sizeof(float), g_fence);
        q.qbiases = fb->data();
      }
    }
    g_quantized = q;
    int rc = run(w_q);
    g_quantized = QuantizedWeight{};
    if (rc != 0) {
      throw mh::Error(mh_last_error());
    }
  });
}

} // namespace

extern "C" {

int lce_set_pipeline_limit(int limit) {
  return mh::guarded([&] { g_pipeline_limit = limit; });
}

// The forward tile's kernel-name suffix eval_gpu's plan takes for this call under the
// current device class (lce_set_device_class), into out (cap bytes, NUL-terminated).
int lce_tile_name(int hdt, const char* head, int64_t rows, int vocab, int hidden, char* out,
                  int cap) {
  return mh::guarded([&] {
    const std::string n =
        call_plan(rows, vocab, hidden, 1, to_dtype(hdt), std::string(head)).fwd.name();
    if (int(n.size()) >= cap) throw mh::Error("lce_tile_name: buffer too small");
    std::memcpy(out, n.c_str(), n.size() + 1);
  });
}

int lce_set_device_class(int device_class) {
  return mh::guarded([&] { g_device_class = char(device_class); });
}

int lce_set_max_buffer_flops(int64_t flops) {
  return mh::guarded([&] { g_max_buffer_flops = flops; });
}

// lce_schedule(lce_plan(..., max_buffer_flops), work): plan = {forward_rows,
// chunk_rows, splits}; out[5 i ..] = {kernel, row0, rows, flops, segment} of
// launch i (at most cap); returns through *count the number of launches.
int lce_schedule_info(int64_t rows, int vocab, int hidden, int64_t chunk_bytes,
                      int64_t max_buffer_flops, int forward, int sum_rows, int dh, int dw,
                      int dbias, int64_t* plan, int64_t* out, int64_t cap, int64_t* count) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    LcePlan p = P::lce_plan(rows, vocab, hidden, chunk_bytes, max_buffer_flops);
    P::LceWork w;
    w.forward = forward != 0;
    w.sum_rows = sum_rows != 0;
    w.dh = dh != 0;
    w.dw = dw != 0;
    w.dbias = dbias != 0;
    std::vector<P::LceLaunch> launches = P::lce_schedule(p, w);
    plan[0] = p.forward_rows;
    plan[1] = p.chunk_rows;
    plan[2] = p.splits;
    *count = int64_t(launches.size());
    if (*count > cap) throw mh::Error("lce_schedule_info: out too small");
    for (size_t i = 0; i < launches.size(); ++i) {
      const P::LceLaunch& l = launches[i];
      int64_t v[5] = {int64_t(l.kernel), l.row0, l.rows, l.flops, l.segment};
      std::memcpy(out + 5 * i, v, sizeof v);
    }
  });
}

// lce_plan's choices (at the bound lce_set_max_buffer_flops set): out = {row_blocks,
// vocab_tiles, splits, vocab_per_split, chunk_rows}.
int lce_plan_info(int64_t rows, int vocab, int hidden, int64_t chunk_bytes, int64_t* out) {
  return mh::guarded([&] {
    LcePlan p = fl::mplan::lce_plan(rows, vocab, hidden, chunk_bytes, g_max_buffer_flops);
    int64_t v[5] = {p.row_blocks, p.vocab_tiles, p.splits, p.vocab_per_split, p.chunk_rows};
    std::memcpy(out, v, sizeof v);
  });
}

// A kernel's launch plan. which: 0 fwd, 1 finish, 2 dz, 3 dh, 4 dw, 5 dbias,
// 6 scale (n = vocab), 7 rows (the stored-Z path). out = {grid x, y, z, group x, y, z, threadgroup bytes, buffers};
// name_out: kernel name and buffer names, comma-separated (cap 512).
int lce_launch_info(int which, int hdt, int wdt, int64_t rows, int vocab, int hidden,
                    int64_t chunk_bytes, int64_t chunk_rows, int max_threads, uint32_t* out,
                    uint8_t* name_out) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = P::lce_dense_head(to_dtype(wdt));
    KDtype h = to_dtype(hdt);
    LcePlan plan = call_plan(rows, vocab, hidden, chunk_bytes, h, head);
    LaunchPlan p;
    switch (which) {
      case 0: p = P::lce_forward_plan(h, head, plan, max_threads); break;
      case 1: p = P::lce_finish_plan(plan, max_threads); break;
      case 2: p = P::lce_dz_plan(h, head, plan, chunk_rows, max_threads); break;
      case 3: p = P::lce_dh_plan(head, plan, chunk_rows, max_threads); break;
      case 4: p = P::lce_dw_plan(h, plan, max_threads); break;
      case 5: p = P::lce_dbias_plan(plan, max_threads); break;
      case 6: p = P::lce_scale_plan(h, uint64_t(vocab), max_threads); break;
      case 7: p = P::lce_rows_plan(plan, chunk_rows, max_threads); break;
      default: throw mh::Error("lce_launch_info: unknown kernel");
    }
    uint32_t v[8] = {p.grid[0], p.grid[1], p.grid[2], p.group[0], p.group[1], p.group[2],
                     p.threadgroup_bytes, uint32_t(p.buffers.size())};
    std::memcpy(out, v, sizeof v);
    std::string s = p.kernel_name;
    for (auto& buf : p.buffers) s += "," + buf;
    if (s.size() + 1 > 512) throw mh::Error("lce_launch_info: name too long");
    std::memcpy(name_out, s.c_str(), s.size() + 1);
  });
}

// The forward of eval_gpu: tiles, finish, and (sum_rows) the sum of the per-row
// losses in row_loss into loss[0]. partials: [S * N * 4], target_logit, row_loss: [N].
int lce_forward_run(int hdt, int wdt, const void* hidden, const void* weight,
                    const int64_t* targets, const float* bias, float* partials,
                    float* target_logit, float* row_loss, float* loss, float* lse, float* lse_lo,
                    bool* correct, float* entropy, int64_t rows, int vocab, int hidden_size,
                    int64_t chunk_bytes, int sum_rows, float smoothing, int mode, int has_ignore,
                    int64_t ignore_index, float z_loss, float softcap, int has_bias,
                    uint32_t* argmax_partials, int64_t* argmax, float* target_out) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = head_for(wdt);
    LcePlan plan = call_plan(rows, vocab, hidden_size, chunk_bytes, to_dtype(hdt), head);
    LceArgs args = args_for(plan, {smoothing, mode, has_ignore, ignore_index, z_loss, softcap, has_bias});
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, args);
    b.partials = partials;
    b.target_logit = target_logit;
    b.loss = sum_rows ? row_loss : loss;
    b.lse = lse;
    b.lse_lo = lse_lo;
    b.correct = correct;
    b.entropy = entropy;
    b.argmax_partials = argmax_partials;
    b.argmax = argmax;
    b.target_out = target_out;
    P::LceWork w;
    w.forward = true;
    w.sum_rows = sum_rows != 0;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      LceArgs a = args;
      a.row0 = l.row0;
      if (l.kernel == P::LceKernel::forward) {
        LaunchPlan tiles = P::lce_forward_plan(to_dtype(hdt), head, plan, g_pipeline_limit, l.rows);
        with_dtype(to_dtype(hdt), [&]<class T>() {
          with_head(wdt, [&]<class Head>() { fwd_call<T, Head>(tiles, b, a); });
        });
      } else if (l.kernel == P::LceKernel::finish) {
        finish_call(P::lce_finish_plan(plan, g_pipeline_limit), b, a);
      } else if (l.kernel != P::LceKernel::sum) {
        throw mh::Error("lce_forward_run: a backward launch in a forward schedule");
      }
    }
    if (sum_rows) {
      PwArgs sum = P::make_pw_args(uint64_t(rows), 0.0f, 0.0f, 1);
      sum.num_partials = uint64_t(rows);
      LaunchPlan f = P::pw_sum_finish_plan(uint64_t(rows), g_pipeline_limit);
      auto* finish = mh::kernel<decltype(fl_pw_sum_finish)>(f.kernel_name);
      run_plan(f, [&](const mh::ThreadCtx& t) {
        finish(row_loss, loss, sum, t.threadgroup_memory<float>(0),
               t.thread_index_in_threadgroup, t.threads_per_threadgroup.x,
               t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup,
               t.simdgroups_per_threadgroup);
      });
    }
  });
}

// The backward of eval_gpu, chunk by chunk (g == nullptr when unit_cotangent):
// dz is the chunk buffer [chunk_rows * V]; dh / dw / dbias those asked for (want_*).
int lce_backward_run(int hdt, int wdt, const void* hidden, const void* weight,
                     const int64_t* targets, const float* bias, const float* lse,
                     const float* lse_lo, const float* g, int unit_cotangent, float* dz, float* dh,
                     float* dw, float* dbias, int want_dh, int want_dw, int want_dbias, int64_t rows,
                     int vocab, int hidden_size, int64_t chunk_bytes, float smoothing, int mode,
                     int has_ignore, int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = head_for(wdt);
    LcePlan plan = call_plan(rows, vocab, hidden_size, chunk_bytes, to_dtype(hdt), head);
    LceArgs base = args_for(plan, {smoothing, mode, has_ignore, ignore_index, z_loss, softcap, has_bias});
    KDtype h = to_dtype(hdt);
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, base);
    b.lse = const_cast<float*>(lse);
    b.lse_lo = const_cast<float*>(lse_lo);
    b.g = g;
    b.dz = dz;
    b.dh = dh;
    b.dw = dw;
    b.dbias = dbias;
    P::LceWork w;
    w.dh = want_dh != 0;
    w.dw = want_dw != 0;
    w.dbias = want_dbias != 0;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      const int64_t n = l.rows;
      LceArgs a = base;
      a.row0 = l.row0;
      a.chunk_rows = int(n);
      a.accumulate = l.row0 > 0 ? 1 : 0;
      a.unit_cotangent = unit_cotangent;
      a.lse_cotangent = g_lse_cotangent;
      switch (l.kernel) {
        case P::LceKernel::dz: {
          LaunchPlan dz = P::lce_dz_plan(h, head, plan, n, g_pipeline_limit);
          with_dtype(h, [&]<class T>() {
            with_head(wdt, [&]<class Head>() { dz_call<T, Head>(dz, b, a); });
          });
          break;
        }
        case P::LceKernel::dbias: dbias_call(P::lce_dbias_plan(plan, g_pipeline_limit), b, a); break;
        case P::LceKernel::dh: {
          LaunchPlan dh = P::lce_dh_plan(head, plan, n, g_pipeline_limit);
          with_head(wdt, [&]<class Head>() { dh_call<Head>(dh, b, a); });
          break;
        }
        case P::LceKernel::dw: {
          LaunchPlan dw = P::lce_dw_plan(h, plan, g_pipeline_limit);
          with_dtype(h, [&]<class T>() { dw_call<T>(dw, b, a); });
          break;
        }
        default: throw mh::Error("lce_backward_run: a forward launch in a backward schedule");
      }
    }
  });
}

// LceArgs::lse_cotangent of the next backward runs (g_lse_cotangent).
int lce_set_lse_cotangent(int on) {
  return mh::guarded([&] { g_lse_cotangent = on; });
}

// The forward with fused gradients of eval_gpu (the stored-Z path of
// lce_schedule): per chunk, lce_dz with logits_only into dz [chunk_rows * V],
// fl_lce_rows (the forward's outputs; dZ in place), then dbias, dH, dW (those
// asked for), and (sum_rows) the sum of row_loss into loss[0]. Unit cotangent.
int lce_fused_run(int hdt, int wdt, const void* hidden, const void* weight,
                  const int64_t* targets, const float* bias, float* row_loss, float* loss,
                  float* lse, float* lse_lo, bool* correct, float* entropy, int64_t* argmax,
                  float* target_out, float* dz, float* dh, float* dw, float* dbias, int want_dh,
                  int want_dw, int want_dbias, int64_t rows, int vocab, int hidden_size,
                  int64_t chunk_bytes, int sum_rows, float smoothing, int mode, int has_ignore,
                  int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = head_for(wdt);
    KDtype h = to_dtype(hdt);
    LcePlan plan = call_plan(rows, vocab, hidden_size, chunk_bytes, h, head);
    LceArgs base = args_for(plan, {smoothing, mode, has_ignore, ignore_index, z_loss, softcap, has_bias});
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, base);
    b.loss = sum_rows ? row_loss : loss;
    b.lse = lse;
    b.lse_lo = lse_lo;
    b.correct = correct;
    b.entropy = entropy;
    b.argmax = argmax;
    b.target_out = target_out;
    b.g = lse; // never read (unit cotangent)
    b.dz = dz;
    b.dh = dh;
    b.dw = dw;
    b.dbias = dbias;
    P::LceWork w;
    w.forward = true;
    w.sum_rows = sum_rows != 0;
    w.dh = want_dh != 0;
    w.dw = want_dw != 0;
    w.dbias = want_dbias != 0;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      const int64_t n = l.rows;
      LceArgs a = base;
      a.row0 = l.row0;
      a.chunk_rows = int(n);
      a.accumulate = l.row0 > 0 ? 1 : 0;
      a.unit_cotangent = 1;
      switch (l.kernel) {
        case P::LceKernel::logits: {
          a.logits_only = 1;
          LaunchPlan zp = P::lce_dz_plan(h, head, plan, n, g_pipeline_limit);
          with_dtype(h, [&]<class T>() {
            with_head(wdt, [&]<class Head>() { dz_call<T, Head>(zp, b, a); });
          });
          break;
        }
        case P::LceKernel::rows: rows_call(P::lce_rows_plan(plan, n, g_pipeline_limit), b, a); break;
        case P::LceKernel::dbias: dbias_call(P::lce_dbias_plan(plan, g_pipeline_limit), b, a); break;
        case P::LceKernel::dh: {
          LaunchPlan dhp = P::lce_dh_plan(head, plan, n, g_pipeline_limit);
          with_head(wdt, [&]<class Head>() { dh_call<Head>(dhp, b, a); });
          break;
        }
        case P::LceKernel::dw: {
          LaunchPlan dwp = P::lce_dw_plan(h, plan, g_pipeline_limit);
          with_dtype(h, [&]<class T>() { dw_call<T>(dwp, b, a); });
          break;
        }
        case P::LceKernel::sum: {
          PwArgs sum = P::make_pw_args(uint64_t(rows), 0.0f, 0.0f, 1);
          sum.num_partials = uint64_t(rows);
          LaunchPlan f = P::pw_sum_finish_plan(uint64_t(rows), g_pipeline_limit);
          auto* finish = mh::kernel<decltype(fl_pw_sum_finish)>(f.kernel_name);
          run_plan(f, [&](const mh::ThreadCtx& t) {
            finish(row_loss, loss, sum, t.threadgroup_memory<float>(0),
                   t.thread_index_in_threadgroup, t.threads_per_threadgroup.x,
                   t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup,
                   t.simdgroups_per_threadgroup);
          });
          break;
        }
        default: throw mh::Error("lce_fused_run: a launch the stored-Z path does not have");
      }
    }
  });
}

int lce_fused_run_q(int hdt, int qmode, int global_scale, int bits, int group_size, int sdt,
                    const void* hidden, const uint32_t* w_q, const void* scales, const void* qbiases,
                    const int64_t* targets, const float* bias, float* row_loss, float* loss,
                    float* lse, float* lse_lo, bool* correct, float* entropy, int64_t* argmax,
                    float* target_out, float* dz, float* dh, float* dw, float* dbias, int want_dh,
                    int want_dw, int want_dbias, int64_t rows, int vocab, int hidden_size,
                    int64_t chunk_bytes, int sum_rows, float smoothing, int mode, int has_ignore,
                    int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  if (want_dw != 0) {
    return mh::guarded([] { throw mh::Error("a quantized weight has no gradient (no dW kernel)"); });
  }
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab,
                        hidden_size, [&](const uint32_t* w) {
    return lce_fused_run(hdt, 0, hidden, w, targets, bias, row_loss, loss, lse, lse_lo, correct,
                         entropy, argmax, target_out, dz, dh, dw, dbias, want_dh, 0, want_dbias,
                         rows, vocab, hidden_size, chunk_bytes, sum_rows, smoothing, mode,
                         has_ignore, ignore_index, z_loss, softcap, has_bias);
  });
}

int lce_set_fence(int where) {
  return mh::guarded([&] { g_fence = where; });
}

// lce_quantized_head(mode, bits, sdt, global_scale) into name_out (cap 64): the suffix
// eval_gpu's plans give a quantized head's kernels.
int lce_quantized_head_name(int mode, int bits, int sdt, int global_scale, uint8_t* name_out) {
  return mh::guarded([&] {
    std::string s = fl::mplan::lce_quantized_head(mode, bits, to_dtype(sdt), global_scale != 0);
    if (s.size() + 1 > 64) throw mh::Error("lce_quantized_head_name: name too long");
    std::memcpy(name_out, s.c_str(), s.size() + 1);
  });
}

// lce_forward_run / lce_backward_run with a quantized weight of mode qmode
// (flm::kQuant*): w_q packed uint32 [V, H * bits / 32], scales and qbiases
// [V, H / group_size] of dtype code sdt (affine), or uint8 scales and qbiases
// ignored (floating-point modes) or the float32 global scale (nvfp4,
// global_scale != 0). A quantized weight has no gradient: want_dw must be 0 (dw is
// never written).
int lce_forward_run_q(int hdt, int qmode, int global_scale, int bits, int group_size, int sdt, const void* hidden,
                      const uint32_t* w_q, const void* scales, const void* qbiases,
                      const int64_t* targets, const float* bias, float* partials,
                      float* target_logit, float* row_loss, float* loss, float* lse, float* lse_lo,
                      bool* correct, float* entropy, int64_t rows, int vocab, int hidden_size,
                      int64_t chunk_bytes, int sum_rows, float smoothing, int mode, int has_ignore,
                      int64_t ignore_index, float z_loss, float softcap, int has_bias,
                      uint32_t* argmax_partials, int64_t* argmax, float* target_out) {
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab, hidden_size,
                        [&](const uint32_t* w) {
    return lce_forward_run(hdt, 0, hidden, w, targets, bias, partials, target_logit, row_loss,
                           loss, lse, lse_lo, correct, entropy, rows, vocab, hidden_size,
                           chunk_bytes, sum_rows, smoothing, mode, has_ignore, ignore_index,
                           z_loss, softcap, has_bias, argmax_partials, argmax, target_out);
  });
}

int lce_backward_run_q(int hdt, int qmode, int global_scale, int bits, int group_size, int sdt, const void* hidden,
                       const uint32_t* w_q, const void* scales, const void* qbiases,
                       const int64_t* targets, const float* bias, const float* lse,
                       const float* lse_lo, const float* g, int unit_cotangent, float* dz,
                       float* dh, float* dw, float* dbias, int want_dh, int want_dw,
                       int want_dbias, int64_t rows, int vocab, int hidden_size,
                       int64_t chunk_bytes, float smoothing, int mode, int has_ignore,
                       int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  if (want_dw != 0) {
    return mh::guarded([] { throw mh::Error("a quantized weight has no gradient (no dW kernel)"); });
  }
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab, hidden_size,
                        [&](const uint32_t* w) {
    return lce_backward_run(hdt, 0, hidden, w, targets, bias, lse, lse_lo, g, unit_cotangent,
                            dz, dh, dw, dbias, want_dh, 0, want_dbias, rows, vocab,
                            hidden_size, chunk_bytes, smoothing, mode, has_ignore, ignore_index,
                            z_loss, softcap, has_bias);
  });
}

int lce_scale_run(int dt, const float* g, const float* src, void* out, uint64_t n) {
  return mh::guarded([&] {
    LaunchPlan p = fl::mplan::lce_scale_plan(to_dtype(dt), n, g_pipeline_limit);
    PwArgs a = fl::mplan::make_pw_args(n, 0.0f, 0.0f, 0);
    with_dtype(to_dtype(dt), [&]<class T>() {
      auto* fn = mh::kernel<decltype(lce_scale_grad<T>)>(p.kernel_name);
      run_plan(p, [&](const mh::ThreadCtx& t) {
        fn(g, src, static_cast<T*>(out), a, t.thread_position_in_grid.x);
      });
    });
  });
}

// The row statistics' forward as eval_gpu runs it (csrc/metal/row_stats.cpp):
// lce_forward tiles with the row statistics' arguments, then fl_rs_fwd_finish.
// targets may be null (has_targets 0: never read). argmax_partials: [S * N * 2].
int rs_forward_run(int hdt, int wdt, const void* hidden, const void* weight, const int64_t* targets,
                   const float* bias, float* partials, float* target_logit, uint32_t* argmax_partials,
                   float* lse, float* lse_lo, float* target, float* logit_sum, float* expected,
                   float* expected_lo, float* max, int64_t* argmax, int64_t rows, int vocab, int hidden_size, int64_t chunk_bytes, int has_ignore,
                   int64_t ignore_index, float softcap, int has_bias, float temperature, int sharded,
                   int64_t vocab_start, int has_targets) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = head_for(wdt);
    LcePlan plan = call_plan(rows, vocab, hidden_size, chunk_bytes, to_dtype(hdt), head);
    LceArgs args = P::make_rs_args(plan, has_ignore != 0, ignore_index, softcap, has_bias != 0, temperature,
                                   sharded != 0, vocab_start, has_targets != 0);
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, args);
    b.partials = partials;
    b.target_logit = target_logit;
    b.argmax_partials = argmax_partials;
    RsBufs r{lse, lse_lo, target, logit_sum, expected, expected_lo, max, argmax, {}};
    P::LceWork w;
    w.forward = true;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      LceArgs a = args;
      a.row0 = l.row0;
      if (l.kernel == P::LceKernel::forward) {
        LaunchPlan tiles = P::lce_forward_plan(to_dtype(hdt), head, plan, g_pipeline_limit, l.rows);
        with_dtype(to_dtype(hdt), [&]<class T>() {
          with_head(wdt, [&]<class Head>() { fwd_call<T, Head>(tiles, b, a); });
        });
      } else if (l.kernel == P::LceKernel::finish) {
        rs_finish_call(P::rs_finish_plan(plan, g_pipeline_limit), b, r, a);
      } else {
        throw mh::Error("rs_forward_run: an unexpected launch in a forward schedule");
      }
    }
  });
}

// The row statistics' backward, chunk by chunk: rs_dz, then the linear CE's
// dbias, dH, dW (those asked for). cot: the flm::RowStat bits of the bound
// cotangents g_lse, g_target, g_logit_sum, g_expected.
int rs_backward_run(int hdt, int wdt, const void* hidden, const void* weight, const int64_t* targets,
                    const float* bias, const float* lse, const float* lse_lo, const float* expected,
                    const float* expected_lo, const float* g_lse, const float* g_target,
                    const float* g_logit_sum, const float* g_expected, int cot, float* dz, float* dh,
                    float* dw, float* dbias, int want_dh, int want_dw, int want_dbias, int64_t rows,
                    int vocab, int hidden_size, int64_t chunk_bytes, int has_ignore, int64_t ignore_index,
                    float softcap, int has_bias, float temperature, int sharded, int64_t vocab_start,
                    int has_targets) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    std::string head = head_for(wdt);
    LcePlan plan = call_plan(rows, vocab, hidden_size, chunk_bytes, to_dtype(hdt), head);
    LceArgs base = P::make_rs_args(plan, has_ignore != 0, ignore_index, softcap, has_bias != 0, temperature,
                                   sharded != 0, vocab_start, has_targets != 0);
    base.rs_cotangents = cot;
    KDtype h = to_dtype(hdt);
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, base);
    b.dz = dz;
    b.dh = dh;
    b.dw = dw;
    b.dbias = dbias;
    RsBufs r{const_cast<float*>(lse), const_cast<float*>(lse_lo), nullptr, nullptr,
             const_cast<float*>(expected), const_cast<float*>(expected_lo), nullptr, nullptr,
             {g_lse, g_target, g_logit_sum, g_expected}};
    P::LceWork w;
    w.dh = want_dh != 0;
    w.dw = want_dw != 0;
    w.dbias = want_dbias != 0;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      const int64_t n = l.rows;
      LceArgs a = base;
      a.row0 = l.row0;
      a.chunk_rows = int(n);
      a.accumulate = l.row0 > 0 ? 1 : 0;
      switch (l.kernel) {
        case P::LceKernel::dz: {
          LaunchPlan dzp = P::rs_dz_plan(h, head, plan, n, g_pipeline_limit);
          with_dtype(h, [&]<class T>() {
            with_head(wdt, [&]<class Head>() { rs_dz_call<T, Head>(dzp, b, r, a); });
          });
          break;
        }
        case P::LceKernel::dbias: dbias_call(P::lce_dbias_plan(plan, g_pipeline_limit), b, a); break;
        case P::LceKernel::dh: {
          LaunchPlan dhp = P::lce_dh_plan(head, plan, n, g_pipeline_limit);
          with_head(wdt, [&]<class Head>() { dh_call<Head>(dhp, b, a); });
          break;
        }
        case P::LceKernel::dw: {
          LaunchPlan dwp = P::lce_dw_plan(h, plan, g_pipeline_limit);
          with_dtype(h, [&]<class T>() { dw_call<T>(dwp, b, a); });
          break;
        }
        default: throw mh::Error("rs_backward_run: a forward launch in a backward schedule");
      }
    }
  });
}

// rs_forward_run / rs_backward_run with a quantized weight (as lce_*_run_q):
// no dW.
int rs_forward_run_q(int hdt, int qmode, int global_scale, int bits, int group_size, int sdt, const void* hidden,
                     const uint32_t* w_q, const void* scales, const void* qbiases, const int64_t* targets,
                     const float* bias, float* partials, float* target_logit, uint32_t* argmax_partials,
                     float* lse, float* lse_lo, float* target, float* logit_sum, float* expected,
                     float* expected_lo, float* max, int64_t* argmax, int64_t rows, int vocab, int hidden_size, int64_t chunk_bytes, int has_ignore,
                     int64_t ignore_index, float softcap, int has_bias, float temperature, int sharded,
                     int64_t vocab_start, int has_targets) {
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab, hidden_size,
                        [&](const uint32_t* w) {
    return rs_forward_run(hdt, 0, hidden, w, targets, bias, partials, target_logit, argmax_partials, lse,
                          lse_lo, target, logit_sum, expected, expected_lo, max, argmax, rows, vocab, hidden_size, chunk_bytes,
                          has_ignore, ignore_index, softcap, has_bias, temperature, sharded, vocab_start,
                          has_targets);
  });
}

int rs_backward_run_q(int hdt, int qmode, int global_scale, int bits, int group_size, int sdt, const void* hidden,
                      const uint32_t* w_q, const void* scales, const void* qbiases, const int64_t* targets,
                      const float* bias, const float* lse, const float* lse_lo, const float* expected,
                      const float* expected_lo, const float* g_lse, const float* g_target,
                      const float* g_logit_sum, const float* g_expected, int cot, float* dz, float* dh,
                      float* dw, float* dbias, int want_dh, int want_dw, int want_dbias, int64_t rows,
                      int vocab, int hidden_size, int64_t chunk_bytes, int has_ignore, int64_t ignore_index,
                      float softcap, int has_bias, float temperature, int sharded, int64_t vocab_start,
                      int has_targets) {
  if (want_dw != 0) {
    return mh::guarded([] { throw mh::Error("a quantized weight has no gradient (no dW kernel)"); });
  }
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab, hidden_size,
                        [&](const uint32_t* w) {
    return rs_backward_run(hdt, 0, hidden, w, targets, bias, lse, lse_lo, expected, expected_lo, g_lse,
                           g_target, g_logit_sum, g_expected, cot, dz, dh, dw, dbias, want_dh, 0, want_dbias,
                           rows, vocab, hidden_size, chunk_bytes, has_ignore, ignore_index, softcap, has_bias,
                           temperature, sharded, vocab_start, has_targets);
  });
}

} // extern "C"

