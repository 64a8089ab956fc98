// Harness adaptor for metal/linear_cross_entropy.metal (with pointwise_loss.metal
// for the summed loss's finish kernel), used by tests/test_metal_linear_cross_entropy.py.
// Compiled by tests/metal_host after the .metal sources, in one translation unit,
// with -I csrc.
//
// Every entry point runs the dispatch sequence of csrc/metal/linear_cross_entropy.cpp
// (eval_gpu) with the plans of csrc/metal/launch_plan.cpp, and looks each kernel up
// by the [[host_name]] the plan names in a registry that mirrors the FL_INST_LCE_*
// macros (the test compares the two). The temporaries eval_gpu allocates (per-split
// states, target logits, per-row losses, the dZ chunk) come from Python, so the
// harness guards and compares them too.
//
// Quantized heads (metal/quantized_head.h) are registered with
// Registry::add_head<Head>(name) like the dense ones; lce_forward_run_q and
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

using mkp::lookup;
using mkp::run_plan;
using mkp::to_dtype;

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
  const float* g;
  float* dz;
  float* dh;
  float* dw;
  float* dbias;
};

using LceFn = void (*)(const LceBufs&, const LceArgs&, const mh::ThreadCtx&);

template <class T, class Head>
void fwd_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  lce_forward<T, Head>(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
                       static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases),
                       reinterpret_cast<const long*>(b.targets), b.bias,
                       reinterpret_cast<metal::float4*>(b.partials), b.target_logit, a,
                       t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
                       t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
}

void finish_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  lce_forward_finish(reinterpret_cast<const metal::float4*>(b.partials), b.target_logit,
                     reinterpret_cast<const long*>(b.targets), b.loss, b.lse, b.lse_lo, b.correct,
                     b.entropy, a, t.thread_position_in_grid.x);
}

template <class T, class Head>
void dz_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  lce_dz<T, Head>(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
                  static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases),
                  reinterpret_cast<const long*>(b.targets), b.bias, b.lse, b.lse_lo, b.g, b.dz, a,
                  t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
                  t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
}

template <class Head>
void dh_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  lce_dh<Head>(b.dz, static_cast<const Wt*>(b.weight), static_cast<const St*>(b.scales),
               static_cast<const St*>(b.qbiases), b.dh, a, t.threadgroup_position_in_grid.xy,
               t.thread_index_in_threadgroup, t.simdgroup_index_in_threadgroup);
}

template <class T>
void dw_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  lce_dw<T>(b.dz, static_cast<const T*>(b.hidden), b.dw, a, t.threadgroup_position_in_grid.xy,
            t.thread_index_in_threadgroup, t.simdgroup_index_in_threadgroup);
}

void dbias_call(const LceBufs& b, const LceArgs& a, const mh::ThreadCtx& t) {
  lce_dbias(b.dz, b.dbias, a, t.thread_position_in_grid.x);
}

// ---- registry: host name -> instantiation (mirrors the FL_INST_LCE_* macros) ----------

struct Registry {
  std::map<std::string, LceFn> lce;
  std::map<std::string, void (*)(const float*, const float*, void*, const PwArgs&,
                                 const mh::ThreadCtx&)> scale;

  // The kernels that read the weight through a head, for every hidden dtype.
  template <class Head>
  void add_head(const std::string& head) {
    lce["fl_lce_fwd_float32_" + head] = fwd_call<float, Head>;
    lce["fl_lce_fwd_float16_" + head] = fwd_call<metal::half, Head>;
    lce["fl_lce_fwd_bfloat16_" + head] = fwd_call<metal::bfloat, Head>;
    lce["fl_lce_dz_float32_" + head] = dz_call<float, Head>;
    lce["fl_lce_dz_float16_" + head] = dz_call<metal::half, Head>;
    lce["fl_lce_dz_bfloat16_" + head] = dz_call<metal::bfloat, Head>;
    lce["fl_lce_dh_" + head] = dh_call<Head>;
  }

  template <class T>
  void add_dtype(const std::string& d) {
    add_head<lce::DenseHead<T>>("w" + d);
    lce["fl_lce_dw_" + d] = dw_call<T>;
    scale["fl_lce_scale_" + d] = [](const float* g, const float* src, void* out, const PwArgs& a,
                                    const mh::ThreadCtx& t) {
      lce_scale_grad<T>(g, src, static_cast<T*>(out), a, t.thread_position_in_grid.x);
    };
  }

  template <class S>
  void add_quantized(const std::string& d) {
    add_head<flk::QuantizedHead1<S>>("q1_" + d);
    add_head<flk::QuantizedHead2<S>>("q2_" + d);
    add_head<flk::QuantizedHead3<S>>("q3_" + d);
    add_head<flk::QuantizedHead4<S>>("q4_" + d);
    add_head<flk::QuantizedHead5<S>>("q5_" + d);
    add_head<flk::QuantizedHead6<S>>("q6_" + d);
    add_head<flk::QuantizedHead8<S>>("q8_" + d);
  }

  Registry() {
    add_dtype<float>("float32");
    add_dtype<metal::half>("float16");
    add_dtype<metal::bfloat>("bfloat16");
    add_quantized<float>("float32");
    add_quantized<metal::half>("float16");
    add_quantized<metal::bfloat>("bfloat16");
    add_head<flk::Mxfp4Head>("mxfp4");
    add_head<flk::Mxfp8Head>("mxfp8");
    add_head<flk::Nvfp4Head>("nvfp4");
    add_head<flk::Nvfp4GlobalHead>("nvfp4_global");
    lce["fl_lce_fwd_finish"] = finish_call;
    lce["fl_lce_dbias"] = dbias_call;
  }
};

const Registry& registry() {
  static const Registry r;
  return r;
}

int g_pipeline_limit = fl::mplan::kMaxGroupThreads;
// The plan's work bound per command buffer (lce_set_max_buffer_flops): small
// values cut the small shapes here into several forward launches and chunks.
int64_t g_max_buffer_flops = fl::mplan::kLceMaxBufferFlops;

void run_lce(const LaunchPlan& p, const LceBufs& b, const LceArgs& a) {
  LceFn fn = lookup(registry().lce, p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) { fn(b, a, t); });
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

int lce_registry_names(uint8_t* out, uint32_t cap) {
  return mh::guarded([&] {
    std::string s;
    for (auto& [k, v] : registry().lce) s += k + "\n";
    for (auto& [k, v] : registry().scale) s += k + "\n";
    if (s.size() + 1 > cap) throw mh::Error("registry_names: buffer too small");
    std::memcpy(out, s.c_str(), s.size() + 1);
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
// 6 scale (n = vocab). out = {grid x, y, z, group x, y, z, threadgroup bytes, buffers};
// name_out: kernel name and buffer names, comma-separated (cap 512).
int lce_launch_info(int which, int hdt, int wdt, int64_t rows, int vocab, int hidden,
                    int64_t chunk_bytes, int64_t chunk_rows, int max_threads, uint32_t* out,
                    uint8_t* name_out) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    LcePlan plan = P::lce_plan(rows, vocab, hidden, chunk_bytes, g_max_buffer_flops);
    std::string head = P::lce_dense_head(to_dtype(wdt));
    KDtype h = to_dtype(hdt);
    LaunchPlan p;
    switch (which) {
      case 0: p = P::lce_forward_plan(h, head, plan, max_threads); break;
      case 1: p = P::lce_finish_plan(plan, max_threads); break;
      case 2: p = P::lce_dz_plan(h, head, plan, chunk_rows, max_threads); break;
      case 3: p = P::lce_dh_plan(head, plan, chunk_rows, max_threads); break;
      case 4: p = P::lce_dw_plan(h, plan, max_threads); break;
      case 5: p = P::lce_dbias_plan(plan, max_threads); break;
      case 6: p = P::lce_scale_plan(h, uint64_t(vocab), max_threads); break;
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
                    int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    LcePlan plan = P::lce_plan(rows, vocab, hidden_size, chunk_bytes, g_max_buffer_flops);
    LceArgs args = args_for(plan, {smoothing, mode, has_ignore, ignore_index, z_loss, softcap, has_bias});
    std::string head = head_for(wdt);
    LceBufs b = tile_inputs(hidden, weight, targets, bias);
    bind_head(b, args);
    b.partials = partials;
    b.target_logit = target_logit;
    b.loss = sum_rows ? row_loss : loss;
    b.lse = lse;
    b.lse_lo = lse_lo;
    b.correct = correct;
    b.entropy = entropy;
    P::LceWork w;
    w.forward = true;
    w.sum_rows = sum_rows != 0;
    for (const P::LceLaunch& l : P::lce_schedule(plan, w)) {
      LceArgs a = args;
      a.row0 = l.row0;
      if (l.kernel == P::LceKernel::forward) {
        run_lce(P::lce_forward_plan(to_dtype(hdt), head, plan, g_pipeline_limit, l.rows), b, a);
      } else if (l.kernel == P::LceKernel::finish) {
        run_lce(P::lce_finish_plan(plan, g_pipeline_limit), b, a);
      } else if (l.kernel != P::LceKernel::sum) {
        throw mh::Error("lce_forward_run: a backward launch in a forward schedule");
      }
    }
    if (sum_rows) {
      PwArgs sum = P::make_pw_args(uint64_t(rows), 0.0f, 0.0f, 1);
      sum.num_partials = uint64_t(rows);
      LaunchPlan f = P::pw_sum_finish_plan(uint64_t(rows), g_pipeline_limit);
      if (f.kernel_name != "fl_pw_sum_finish") throw mh::Error("unexpected finish kernel");
      run_plan(f, [&](const mh::ThreadCtx& t) {
        fl_pw_sum_finish(row_loss, loss, sum, t.threadgroup_memory<float>(0),
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
    LcePlan plan = P::lce_plan(rows, vocab, hidden_size, chunk_bytes, g_max_buffer_flops);
    LceArgs base = args_for(plan, {smoothing, mode, has_ignore, ignore_index, z_loss, softcap, has_bias});
    std::string head = head_for(wdt);
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
      switch (l.kernel) {
        case P::LceKernel::dz: run_lce(P::lce_dz_plan(h, head, plan, n, g_pipeline_limit), b, a); break;
        case P::LceKernel::dbias: run_lce(P::lce_dbias_plan(plan, g_pipeline_limit), b, a); break;
        case P::LceKernel::dh: run_lce(P::lce_dh_plan(head, plan, n, g_pipeline_limit), b, a); break;
        case P::LceKernel::dw: run_lce(P::lce_dw_plan(h, plan, g_pipeline_limit), b, a); break;
        default: throw mh::Error("lce_backward_run: a forward launch in a backward schedule");
      }
    }
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
                      int64_t ignore_index, float z_loss, float softcap, int has_bias) {
  return with_quantized({qmode, global_scale, bits, group_size, sdt, scales, qbiases}, w_q, vocab, hidden_size,
                        [&](const uint32_t* w) {
    return lce_forward_run(hdt, 0, hidden, w, targets, bias, partials, target_logit, row_loss,
                           loss, lse, lse_lo, correct, entropy, rows, vocab, hidden_size,
                           chunk_bytes, sum_rows, smoothing, mode, has_ignore, ignore_index,
                           z_loss, softcap, has_bias);
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
    auto fn = lookup(registry().scale, p.kernel_name);
    run_plan(p, [&](const mh::ThreadCtx& t) { fn(g, src, out, a, t); });
  });
}

} // extern "C"
