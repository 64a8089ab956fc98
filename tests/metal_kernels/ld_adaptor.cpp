// Harness adaptor for metal/linear_distillation.metal, used by
// tests/test_metal_linear_distillation.py. Compiled by tests/metal_host after
// the .metal sources (linear_cross_entropy.metal, pointwise_loss.metal,
// distillation.metal, linear_distillation.metal), in one translation unit,
// with -I csrc.
//
// ld_run and ltk_run replay eval_gpu (csrc/metal/linear_distillation.cpp):
// each head's forward tile (lce_forward_tile for the device class the LCE
// adaptor's lce_set_device_class chose), ld_plan, then the launches of
// ld_schedule in order with the plans eval_gpu builds: ld_logits per head, the
// logits form's kd rows (or the top-k rows) with the per-row buffers at the
// chunk's first row, the linear CE's dH / dW. The chunk buffers (zs, zt) come
// from Python, so the harness guards them too. A head is described by an int32
// spec (Spec below) and its four buffers; the LCE adaptor's quantized-head
// machinery (g_quantized, head_for, with_head, bind_head) serves each head in
// turn.
#include "lce_adaptor.cpp"
#include "distillation_adaptor.cpp"

namespace {

// A head: spec = {hidden dtype, dense weight dtype, H, bits (0: dense), group
// size, mode (flm::kQuant*), global scale?, scale dtype} and its buffers.
struct LdHead {
  int hdt = 0;
  int wdt = 0;
  int hidden_size = 0;
  QuantizedWeight q;
  const void* hidden = nullptr;
  const void* weight = nullptr;
  std::string name;
};

LdHead ld_head(const int32_t* spec, const void* hidden, const void* weight, const void* scales,
               const void* qbiases) {
  LdHead h;
  h.hdt = spec[0];
  h.wdt = spec[1];
  h.hidden_size = spec[2];
  h.q.bits = spec[3];
  h.q.group_size = spec[4];
  h.q.mode = spec[5];
  h.q.global_scale = spec[6];
  h.q.scale_dtype = spec[7];
  h.q.scales = scales;
  h.q.qbiases = qbiases;
  h.hidden = hidden;
  h.weight = weight;
  g_quantized = h.q;
  h.name = head_for(h.wdt);
  g_quantized = QuantizedWeight{};
  return h;
}

// f() with the head's quantization current (the LCE adaptor's helpers read it).
template <class F>
void as_head(const LdHead& h, F&& f) {
  g_quantized = h.q;
  try {
    f();
  } catch (...) {
    g_quantized = QuantizedWeight{};
    throw;
  }
  g_quantized = QuantizedWeight{};
}

// The head's buffers as the linear CE's kernels bind them (bind_head: the
// quantized slots, or the weight in every slot).
LceBufs head_bufs(const LdHead& h, LceArgs& a) {
  LceBufs b = tile_inputs(h.hidden, h.weight, nullptr, nullptr);
  bind_head(b, a);
  return b;
}

template <class T, class Head>
void logits_call(const LaunchPlan& p, const LceBufs& b, float* z, const LceArgs& a) {
  using Wt = typename Head::weight_t;
  using St = typename Head::scale_t;
  auto* fn = mh::kernel<decltype(ld_logits<T, Head, FL_LCE_BM, FL_LCE_BN, FL_LCE_BK, FL_LCE_WM,
                                           FL_LCE_WN>)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(static_cast<const T*>(b.hidden), static_cast<const Wt*>(b.weight),
       static_cast<const St*>(b.scales), static_cast<const St*>(b.qbiases), z, a,
       t.threadgroup_position_in_grid.xy, t.thread_index_in_threadgroup,
       t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup);
  });
}

// The head's chunk args: LceArgs of its plan, the chunk's rows (as chunk_args).
LceArgs chunk_args_of(const fl::mplan::LcePlan& plan, const LdHead& h, const fl::mplan::LdLaunch& l) {
  LceArgs a = fl::mplan::make_ld_head_args(plan, h.q.bits, h.q.group_size);
  a.row0 = l.row0;
  a.chunk_rows = int(l.rows);
  a.accumulate = l.row0 > 0 ? 1 : 0;
  return a;
}

void launch_logits(const LdHead& h, const fl::mplan::LcePlan& plan, const fl::mplan::LdLaunch& l,
                   float* z) {
  as_head(h, [&] {
    LceArgs a = chunk_args_of(plan, h, l);
    LceBufs b = head_bufs(h, a);
    LaunchPlan p = fl::mplan::ld_logits_plan(to_dtype(h.hdt), h.name, plan, l.rows, g_pipeline_limit);
    with_dtype(to_dtype(h.hdt), [&]<class T>() {
      with_head(h.wdt, [&]<class Head>() { logits_call<T, Head>(p, b, z, a); });
    });
  });
}

// eval_gpu's run_chunks: ld_plan from both heads' forward tiles, then the
// launches of ld_schedule; rows(l) runs the row kernels of a chunk.
template <class Rows>
void run_chunks(const LdHead& s, const LdHead* t, int64_t rows, int vocab, int64_t chunk_bytes,
                const fl::mplan::LdWork& w, float* zs, float* zt, float* dh, float* dw, Rows&& rows_of) {
  namespace P = fl::mplan;
  const P::LceTile ts = P::lce_forward_tile(g_device_class, to_dtype(s.hdt), s.name, rows, vocab, s.hidden_size);
  const P::LceTile tt = t ? P::lce_forward_tile(g_device_class, to_dtype(t->hdt), t->name, rows, vocab,
                                                t->hidden_size)
                          : P::LceTile();
  const P::LdPlan plan = P::ld_plan(rows, vocab, s.hidden_size, t ? t->hidden_size : -1, chunk_bytes,
                                    g_max_buffer_flops, ts, tt);
  for (const P::LdLaunch& l : P::ld_schedule(plan, w)) {
    switch (l.kernel) {
      case P::LdKernel::logits: launch_logits(s, plan.student, l, zs); break;
      case P::LdKernel::teacher_logits: launch_logits(*t, plan.teacher, l, zt); break;
      case P::LdKernel::rows_forward:
      case P::LdKernel::rows_backward:
      case P::LdKernel::sum: rows_of(l); break;
      case P::LdKernel::dh:
        as_head(s, [&] {
          LceArgs a = chunk_args_of(plan.student, s, l);
          LceBufs b = head_bufs(s, a);
          b.dz = zs;
          b.dh = dh;
          LaunchPlan p = P::lce_dh_plan(s.name, plan.student, l.rows, g_pipeline_limit);
          with_head(s.wdt, [&]<class Head>() { dh_call<Head>(p, b, a); });
        });
        break;
      case P::LdKernel::dw: {
        LceArgs a = chunk_args_of(plan.student, s, l);
        LceBufs b = tile_inputs(s.hidden, s.weight, nullptr, nullptr);
        b.dz = zs;
        b.dw = dw;
        LaunchPlan p = P::lce_dw_plan(to_dtype(s.hdt), plan.student, g_pipeline_limit);
        with_dtype(to_dtype(s.hdt), [&]<class T>() { dw_call<T>(p, b, a); });
        break;
      }
    }
  }
}

// A forward (its gradients in it where want_dh / want_dw: a unit cotangent)
// or a backward (forward 0: dZ from stats_in and g).
fl::mplan::LdWork ld_work(int forward, int sum_rows, int want_dh, int want_dw) {
  fl::mplan::LdWork w;
  w.forward = forward != 0;
  w.sum_rows = w.forward && sum_rows != 0;
  w.dh = want_dh != 0;
  w.dw = want_dw != 0;
  w.backward = w.dh || w.dw;
  return w;
}

// The summed loss (eval_gpu's launch_sum): the per-row losses into out[0].
void sum_call(const float* row_loss, float* out, int64_t rows) {
  PwArgs sum = fl::mplan::make_pw_args(uint64_t(rows), 0.0f, 0.0f, 1);
  sum.num_partials = uint64_t(rows);
  LaunchPlan f = fl::mplan::pw_sum_finish_plan(uint64_t(rows), g_pipeline_limit);
  auto* finish = mh::kernel<decltype(fl_pw_sum_finish)>(f.kernel_name);
  run_plan(f, [&](const mh::ThreadCtx& t) {
    finish(row_loss, out, sum, t.threadgroup_memory<float>(0), t.thread_index_in_threadgroup,
           t.threads_per_threadgroup.x, t.thread_index_in_simdgroup, t.simdgroup_index_in_threadgroup,
           t.simdgroups_per_threadgroup);
  });
}

void ltk_fwd_call(const LaunchPlan& p, const float* z, const int64_t* ids, const float* values,
                  const int64_t* index, float* loss, float* stats, const LtkArgs& a) {
  auto* fn = mh::kernel<decltype(fl_ltk_fwd)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(z, reinterpret_cast<const long*>(ids), values, reinterpret_cast<const long*>(index), loss,
       stats, a, t.threadgroup_memory<float>(0), t.threadgroup_position_in_grid.x,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

void ltk_bwd_call(const LaunchPlan& p, float* z, const int64_t* ids, const float* values,
                  const int64_t* index, const float* stats, const float* g, const LtkArgs& a) {
  auto* fn = mh::kernel<decltype(fl_ltk_bwd)>(p.kernel_name);
  run_plan(p, [&](const mh::ThreadCtx& t) {
    fn(z, reinterpret_cast<const long*>(ids), values, reinterpret_cast<const long*>(index), stats, g,
       a, t.threadgroup_memory<float>(0), t.threadgroup_position_in_grid.x,
       t.thread_index_in_threadgroup, t.threads_per_threadgroup.x, t.thread_index_in_simdgroup,
       t.simdgroup_index_in_threadgroup, t.simdgroups_per_threadgroup);
  });
}

} // namespace

extern "C" {

// linear_distillation_loss's eval_gpu. forward 1: loss (per row; with
// sum_rows also their sum in loss_sum[0]) and stats, then, where want_dh /
// want_dw, dZ for a unit cotangent in zs and dh / dw (the gradients in the
// forward). forward 0: the backward, dZ from stats_in and g, then dh / dw.
// targets: any int64 buffer when has_targets is 0 (never read). kind:
// flm::kDistill*; c = 1 / temperature.
int ld_run(const int32_t* s_spec, const void* s_hidden, const void* s_weight, const void* s_scales,
           const void* s_qbiases, const int32_t* t_spec, const void* t_hidden, const void* t_weight,
           const void* t_scales, const void* t_qbiases, const int64_t* targets, int has_targets,
           float* zs, float* zt, float* loss, float* loss_sum, float* stats, const float* stats_in,
           const float* g, float* dh, float* dw, int forward, int sum_rows, int want_dh, int want_dw,
           int64_t rows, int vocab, int64_t chunk_bytes, int kind, int has_ignore, int64_t ignore_index,
           float c, float beta, float d_scale, float alpha) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    const LdHead s = ld_head(s_spec, s_hidden, s_weight, s_scales, s_qbiases);
    const LdHead t = ld_head(t_spec, t_hidden, t_weight, t_scales, t_qbiases);
    KdArgs args = P::make_kd_args(vocab, has_targets != 0, has_ignore != 0, ignore_index, c, beta,
                                  d_scale, alpha);
    constexpr int64_t kS = flm::kDistillStats;
    const float* saved = forward ? stats : stats_in;
    run_chunks(s, &t, rows, vocab, chunk_bytes, ld_work(forward, sum_rows, want_dh, want_dw), zs, zt, dh,
               dw, [&](const P::LdLaunch& l) {
      if (l.kernel == P::LdKernel::sum) {
        sum_call(loss, loss_sum, rows);
        return;
      }
      KdBufs b{zs, zt, has_targets ? targets + l.row0 : targets, loss + l.row0, nullptr, nullptr, zs};
      if (l.kernel == P::LdKernel::rows_forward) {
        b.stats = stats + l.row0 * kS;
        kd_fwd_call<float, float>(
            P::kd_forward_plan(P::KDtype::float32, P::KDtype::float32, kind, l.rows, vocab, g_pipeline_limit),
            b, args);
      } else {
        KdArgs a = args;
        a.unit_cotangent = forward;
        b.stats = const_cast<float*>(saved) + l.row0 * kS;
        b.g_loss = forward ? nullptr : g + l.row0;
        kd_bwd_call<float, float>(
            P::kd_backward_plan(P::KDtype::float32, P::KDtype::float32, kind, l.rows, vocab, g_pipeline_limit),
            b, a);
      }
    });
  });
}

// linear_topk_distillation_loss's eval_gpu (as ld_run): ids / values [rows, topk].
int ltk_run(const int32_t* s_spec, const void* s_hidden, const void* s_weight, const void* s_scales,
            const void* s_qbiases, const int64_t* ids, const float* values, int topk, int renormalize,
            const int64_t* targets, int has_targets, float* zs, float* loss, float* loss_sum, float* stats,
            const float* stats_in, const float* g, float* dh, float* dw, int forward, int sum_rows,
            int want_dh, int want_dw, int64_t rows, int vocab, int64_t chunk_bytes, int has_ignore,
            int64_t ignore_index, float c, float d_scale, float alpha) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    const LdHead s = ld_head(s_spec, s_hidden, s_weight, s_scales, s_qbiases);
    const LtkArgs args = P::make_ltk_args(vocab, topk, renormalize != 0, has_targets != 0, has_ignore != 0,
                                          ignore_index, c, d_scale, alpha);
    constexpr int64_t kS = flm::kDistillStats;
    const float* saved = forward ? stats : stats_in;
    run_chunks(s, nullptr, rows, vocab, chunk_bytes, ld_work(forward, sum_rows, want_dh, want_dw), zs,
               nullptr, dh, dw, [&](const P::LdLaunch& l) {
      if (l.kernel == P::LdKernel::sum) {
        sum_call(loss, loss_sum, rows);
        return;
      }
      const int64_t* id = ids + l.row0 * topk;
      const float* v = values + l.row0 * topk;
      const int64_t* index = has_targets ? targets + l.row0 : ids;
      if (l.kernel == P::LdKernel::rows_forward) {
        ltk_fwd_call(P::ltk_forward_plan(l.rows, vocab, g_pipeline_limit), zs, id, v, index, loss + l.row0,
                     stats + l.row0 * kS, args);
      } else {
        LtkArgs a = args;
        a.kd.unit_cotangent = forward;
        ltk_bwd_call(P::ltk_backward_plan(l.rows, vocab, g_pipeline_limit), zs, id, v, index,
                     saved + l.row0 * kS, forward ? nullptr : g + l.row0, a);
      }
    });
  });
}

// ld_plan's choices at the bound lce_set_max_buffer_flops set, for two heads
// (teacher_hidden >= 0) or one, in the default tile: out = {chunk_rows,
// launches, segments}.
int ld_plan_info(int64_t rows, int vocab, int student_hidden, int teacher_hidden, int64_t chunk_bytes,
                 int forward, int want_dh, int want_dw, int64_t* out) {
  return mh::guarded([&] {
    namespace P = fl::mplan;
    const P::LdPlan p = P::ld_plan(rows, vocab, student_hidden, teacher_hidden, chunk_bytes, g_max_buffer_flops);
    const auto launches = P::ld_schedule(p, ld_work(forward, 0, want_dh, want_dw));
    out[0] = p.chunk_rows;
    out[1] = int64_t(launches.size());
    out[2] = launches.empty() ? 0 : launches.back().segment + 1;
  });
}

} // extern "C"
