// Launch plans of the Metal kernels; see launch_plan.h for the rules.
// No Metal types and no standard headers beyond launch_plan.h's: the CPU
// harness compiles this file after the Metal shim's keyword macros.
#include "metal/launch_plan.h"

#include <stdexcept>

#include "math/cross_entropy.h"
#include "math/quantized.h"
#include "ops/broadcast_groups.h"

namespace fl::mplan {

namespace {

constexpr int kSimd = 32;
constexpr int kBackwardThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

int round_up_simd(int64_t n) {
  int64_t r = ceil_div(n, kSimd) * kSimd;
  return int(r < kSimd ? kSimd : r);
}

// The largest usable group: the pipeline's limit rounded down to a SIMD width.
int usable_threads(int max_group_threads) {
  int t = max_group_threads > kMaxGroupThreads ? kMaxGroupThreads : max_group_threads;
  t = t / kSimd * kSimd;
  if (t < kSimd) {
    throw std::invalid_argument("launch plan: a threadgroup of at least 32 threads is required");
  }
  return t;
}

uint32_t grid_dim(int64_t n, const char* what) {
  if (n < 0 || n > int64_t(UINT32_MAX)) {
    throw std::invalid_argument(std::string("launch plan: too many ") + what +
                                " for one Metal dispatch");
  }
  return uint32_t(n);
}

void check_row_shape(int64_t rows, int num_classes) {
  if (rows < 0 || num_classes < 0) {
    throw std::invalid_argument("launch plan: negative rows or classes");
  }
}

// One group per row; block or looped by row_uses_looped.
LaunchPlan row_forward_plan(const std::string& prefix, const std::string& suffix, int64_t rows,
                            int num_classes, int max_group_threads) {
  check_row_shape(rows, num_classes);
  LaunchPlan p;
  int t = usable_threads(max_group_threads);
  p.looped = row_uses_looped(num_classes, t);
  p.kernel_name = prefix + (p.looped ? "looped" : "block") + suffix;
  p.elems_per_thread = FL_ROW_READS;
  p.group[0] = p.looped ? uint32_t(t) : uint32_t(round_up_simd(ceil_div(num_classes, FL_ROW_READS)));
  p.grid[0] = num_classes == 0 ? 0 : grid_dim(rows, "rows");
  p.threadgroup_bytes = FL_ROW_SCRATCH_FLOATS * sizeof(float);
  return p;
}

int64_t min3(int64_t a, int64_t b, int64_t c) {
  int64_t m = a < b ? a : b;
  return m < c ? m : c;
}

// A 2-D grid over (chunks of a row, rows), no threadgroup memory.
LaunchPlan row_backward_plan(const std::string& name, int64_t rows, int num_classes,
                             int max_group_threads) {
  check_row_shape(rows, num_classes);
  LaunchPlan p;
  p.kernel_name = name;
  p.elems_per_thread = FL_ROW_READS;
  int64_t need = round_up_simd(ceil_div(num_classes, FL_ROW_READS));
  p.group[0] = uint32_t(min3(need, kBackwardThreads, usable_threads(max_group_threads)));
  p.grid[0] = uint32_t(ceil_div(num_classes, int64_t(p.group[0]) * FL_ROW_READS));
  p.grid[1] = grid_dim(rows, "rows");
  return p;
}

// One group per row striding over it (any length): min(T, ceil(K / R) rounded
// up to 32) threads, FL_ROW_SCRATCH_FLOATS of threadgroup memory.
LaunchPlan strided_row_plan(const std::string& name, int64_t rows, int num_classes,
                            int max_group_threads) {
  check_row_shape(rows, num_classes);
  LaunchPlan p;
  p.kernel_name = name;
  p.looped = true;
  p.elems_per_thread = FL_ROW_READS;
  int64_t need = round_up_simd(ceil_div(num_classes, FL_ROW_READS));
  int t = usable_threads(max_group_threads);
  p.group[0] = uint32_t(need < t ? need : t);
  p.grid[0] = num_classes == 0 ? 0 : grid_dim(rows, "rows");
  p.threadgroup_bytes = FL_ROW_SCRATCH_FLOATS * sizeof(float);
  return p;
}

// Element-wise: groups of up to 256 threads, FL_PW_READS elements per thread.
LaunchPlan elementwise_plan(const std::string& name, uint64_t n, int max_group_threads) {
  LaunchPlan p;
  p.kernel_name = name;
  p.elems_per_thread = FL_PW_READS;
  int64_t need = round_up_simd(ceil_div(int64_t(n), FL_PW_READS));
  p.group[0] = uint32_t(min3(need, FL_PW_GROUP_THREADS, usable_threads(max_group_threads)));
  p.grid[0] = grid_dim(ceil_div(int64_t(n), int64_t(p.group[0]) * FL_PW_READS), "elements");
  return p;
}

struct NamedIndex {
  int index;
  const char* name;
};

// The buffer order from the [[buffer(n)]] indices of kernel_args.h: every
// index 0 .. count-1 named exactly once.
std::vector<std::string> buffer_names(int count, std::initializer_list<NamedIndex> named) {
  std::vector<std::string> out(count);
  for (const NamedIndex& b : named) {
    if (b.index < 0 || b.index >= count || !out[b.index].empty()) {
      throw std::logic_error("launch plan: inconsistent buffer indices");
    }
    out[b.index] = b.name;
  }
  for (const std::string& name : out) {
    if (name.empty()) {
      throw std::logic_error("launch plan: unnamed buffer index");
    }
  }
  return out;
}

} // namespace

const char* dtype_name(KDtype dt) {
  switch (dt) {
    case KDtype::float16:
      return "float16";
    case KDtype::bfloat16:
      return "bfloat16";
    default:
      return "float32";
  }
}

int dtype_size(KDtype dt) {
  return dt == KDtype::float32 ? 4 : 2;
}

bool row_uses_looped(int num_classes, int max_group_threads) {
  return int64_t(num_classes) > int64_t(usable_threads(max_group_threads)) * FL_ROW_READS;
}

// ---- cross-entropy ---------------------------------------------------------------

LaunchPlan ce_forward_plan(KDtype dt, int64_t rows, int num_classes, bool soft_targets,
                           bool class_weights, int max_group_threads) {
  std::string suffix = std::string("_") + (soft_targets ? "soft" : "hard") + "_" +
      (class_weights ? "w" : "nw") + "_" + dtype_name(dt);
  LaunchPlan p = row_forward_plan("fl_ce_fwd_", suffix, rows, num_classes, max_group_threads);
  p.buffers = buffer_names(FL_CE_FWD_NBUF, {{FL_CE_FWD_LOGITS, "logits"}, {FL_CE_FWD_INDEX, "class_index"},
      {FL_CE_FWD_PROBS, "target_probs"}, {FL_CE_FWD_WEIGHTS, "class_weights"},
      {FL_CE_FWD_LOSS, "loss"}, {FL_CE_FWD_LSE, "lse"}, {FL_CE_FWD_LSE_LO, "lse_lo"},
      {FL_CE_FWD_ASUM, "a_sum"},
      {FL_CE_FWD_ARGS, "args"}, {FL_CE_FWD_STAT_LSE, "stat_lse"}, {FL_CE_FWD_ENTROPY, "entropy"},
      {FL_CE_FWD_ARGMAX, "argmax"}, {FL_CE_FWD_CORRECT, "correct"}});
  return p;
}

LaunchPlan ce_backward_plan(KDtype dt, int64_t rows, int num_classes, bool soft_targets,
                            bool class_weights, int max_group_threads) {
  std::string name = std::string("fl_ce_bwd_") + (soft_targets ? "soft" : "hard") + "_" +
      (class_weights ? "w" : "nw") + "_" + dtype_name(dt);
  LaunchPlan p = row_backward_plan(name, rows, num_classes, max_group_threads);
  p.buffers = buffer_names(FL_CE_BWD_NBUF, {{FL_CE_BWD_LOGITS, "logits"}, {FL_CE_BWD_INDEX, "class_index"},
      {FL_CE_BWD_PROBS, "target_probs"}, {FL_CE_BWD_WEIGHTS, "class_weights"},
      {FL_CE_BWD_LSE, "lse"}, {FL_CE_BWD_LSE_LO, "lse_lo"}, {FL_CE_BWD_ASUM, "a_sum"}, {FL_CE_BWD_GLOSS, "g_loss"},
      {FL_CE_BWD_GLSE, "g_lse"}, {FL_CE_BWD_GRAD, "grad"}, {FL_CE_BWD_ARGS, "args"}});
  return p;
}

CeArgs make_ce_args(int num_classes, float label_smoothing, int smoothing_mode,
                    bool has_ignore_index, int64_t ignore_index, float z_loss, float logit_softcap,
                    bool stats) {
  CeArgs a{};
  flm::CeSmoothing c = flm::ce_smoothing(label_smoothing, smoothing_mode, num_classes);
  a.ignore_index = ignore_index;
  a.num_classes = num_classes;
  a.has_ignore_index = has_ignore_index ? 1 : 0;
  a.c_target = c.c_target;
  a.c_other = c.c_other;
  a.z_loss = z_loss;
  a.softcap = logit_softcap;
  a.stats = stats ? 1 : 0;
  return a;
}

// ---- softmax focal -----------------------------------------------------------------

LaunchPlan sf_forward_plan(KDtype dt, int64_t rows, int num_classes, int max_group_threads) {
  LaunchPlan p = row_forward_plan("fl_sf_fwd_", std::string("_") + dtype_name(dt), rows,
                                  num_classes, max_group_threads);
  p.buffers = buffer_names(FL_SF_FWD_NBUF, {{FL_SF_FWD_LOGITS, "logits"}, {FL_SF_FWD_INDEX, "class_index"},
      {FL_SF_FWD_ALPHA, "class_alpha"}, {FL_SF_FWD_LOSS, "loss"}, {FL_SF_FWD_LSE, "lse"},
      {FL_SF_FWD_LSE_LO, "lse_lo"}, {FL_SF_FWD_COEF, "coef"}, {FL_SF_FWD_ARGS, "args"}});
  return p;
}

LaunchPlan sf_backward_plan(KDtype dt, int64_t rows, int num_classes, int max_group_threads) {
  LaunchPlan p = row_backward_plan(std::string("fl_sf_bwd_") + dtype_name(dt), rows, num_classes,
                                   max_group_threads);
  p.buffers = buffer_names(FL_SF_BWD_NBUF, {{FL_SF_BWD_LOGITS, "logits"}, {FL_SF_BWD_INDEX, "class_index"},
      {FL_SF_BWD_LSE, "lse"}, {FL_SF_BWD_LSE_LO, "lse_lo"}, {FL_SF_BWD_COEF, "coef"}, {FL_SF_BWD_GLOSS, "g_loss"},
      {FL_SF_BWD_GRAD, "grad"}, {FL_SF_BWD_ARGS, "args"}});
  return p;
}

SfArgs make_sf_args(int num_classes, float gamma, float alpha, bool has_class_alpha,
                    bool has_ignore_index, int64_t ignore_index) {
  SfArgs a{};
  a.ignore_index = ignore_index;
  a.num_classes = num_classes;
  a.has_ignore_index = has_ignore_index ? 1 : 0;
  a.gamma = gamma;
  a.alpha = alpha;
  a.has_class_alpha = has_class_alpha ? 1 : 0;
  return a;
}

// ---- distillation ----------------------------------------------------------------------

const char* kd_kind_name(int kind) {
  switch (kind) {
    case 0:
      return "kl";
    case 1:
      return "rkl";
    case 2:
      return "jsd";
    default:
      throw std::invalid_argument("launch plan: unknown distillation kind");
  }
}

namespace {
std::string kd_suffix(KDtype student, KDtype teacher, int kind) {
  return std::string(kd_kind_name(kind)) + "_" + dtype_name(student) + "_" + dtype_name(teacher);
}
} // namespace

LaunchPlan kd_forward_plan(KDtype student, KDtype teacher, int kind, int64_t rows, int vocab,
                           int max_group_threads) {
  LaunchPlan p = strided_row_plan("fl_kd_fwd_" + kd_suffix(student, teacher, kind), rows, vocab,
                                  max_group_threads);
  p.buffers = buffer_names(FL_KD_FWD_NBUF, {{FL_KD_FWD_STUDENT, "student"},
      {FL_KD_FWD_TEACHER, "teacher"}, {FL_KD_FWD_INDEX, "class_index"}, {FL_KD_FWD_LOSS, "loss"},
      {FL_KD_FWD_STATS, "stats"}, {FL_KD_FWD_ARGS, "args"}});
  return p;
}

LaunchPlan kd_backward_plan(KDtype student, KDtype teacher, int kind, int64_t rows, int vocab,
                            int max_group_threads) {
  LaunchPlan p = row_backward_plan("fl_kd_bwd_" + kd_suffix(student, teacher, kind), rows, vocab,
                                   max_group_threads);
  p.buffers = buffer_names(FL_KD_BWD_NBUF, {{FL_KD_BWD_STUDENT, "student"},
      {FL_KD_BWD_TEACHER, "teacher"}, {FL_KD_BWD_INDEX, "class_index"}, {FL_KD_BWD_STATS, "stats"},
      {FL_KD_BWD_GLOSS, "g_loss"}, {FL_KD_BWD_GRAD, "grad"}, {FL_KD_BWD_ARGS, "args"}});
  return p;
}

KdArgs make_kd_args(int vocab, bool has_targets, bool has_ignore_index, int64_t ignore_index,
                    float c, float beta, float d_scale, float alpha) {
  KdArgs a{};
  a.ignore_index = ignore_index;
  a.vocab = vocab;
  a.has_ignore_index = has_ignore_index ? 1 : 0;
  a.has_targets = has_targets ? 1 : 0;
  a.ce_own_sum = (alpha != 0.0f && c != 1.0f) ? 1 : 0;
  a.c = c;
  a.beta = beta;
  a.d_scale = d_scale;
  a.alpha = alpha;
  return a;
}

// ---- element-wise losses -------------------------------------------------------------

const char* pw_kind_name(int kind) {
  switch (kind) {
    case 0:
      return "smooth_l1";
    case 1:
      return "huber";
    case 2:
      return "sigmoid_focal";
    case FL_PW_KIND_FOCAL_GAMMA_TWO:
      return "sigmoid_focal_g2";
    default:
      throw std::invalid_argument("launch plan: unknown pointwise loss kind");
  }
}

int pw_kernel_kind(int kind, float gamma) {
  return kind == 2 && gamma == 2.0f ? FL_PW_KIND_FOCAL_GAMMA_TWO : kind;
}

uint64_t pw_num_partials(uint64_t n) {
  return (n + FL_PW_GROUP_ELEMS - 1) / FL_PW_GROUP_ELEMS;
}

bool make_pw_target_layout(const std::vector<int64_t>& pred_shape,
                           const std::vector<int64_t>& target_shape, PwTargetLayout* layout) {
  *layout = PwTargetLayout{};
  BroadcastGroups groups = collapse_broadcast_groups(pred_shape, target_shape);
  std::vector<int64_t>& size = groups.size;
  std::vector<int64_t>& stride = groups.stride;
  while (!stride.empty() && stride.back() == 0) {
    size.pop_back();
    stride.pop_back();
  }
  if (size.size() > size_t(FL_PW_MAX_TARGET_GROUPS)) {
    return false;
  }
  layout->ndim = int(size.size());
  for (size_t g = 0; g < size.size(); ++g) {
    layout->size[g] = size[g];
    layout->stride[g] = stride[g];
  }
  return true;
}

bool pw_target_is_identity(const PwTargetLayout& layout, uint64_t n) {
  if (layout.ndim == 0) {
    return n <= 1;
  }
  return layout.ndim == 1 && layout.stride[0] == 1 && uint64_t(layout.size[0]) >= n;
}

namespace {

const char* pw_variant(const PwTargetLayout* target, uint64_t n) {
  return target == nullptr || pw_target_is_identity(*target, n) ? "" : "_bcast";
}

} // namespace

LaunchPlan pw_forward_plan(KDtype dt, int kind, uint64_t n, int reduce, int max_group_threads,
                           const PwTargetLayout* target) {
  std::string tail = std::string(pw_kind_name(kind)) + "_" + dtype_name(dt) + pw_variant(target, n);
  if (reduce == 0) {
    LaunchPlan p = elementwise_plan("fl_pw_fwd_none_" + tail, n, max_group_threads);
    p.buffers = buffer_names(FL_PW_FWD_NBUF, {{FL_PW_FWD_PRED, "pred"}, {FL_PW_FWD_TARGET, "target"},
        {FL_PW_FWD_OUT, "loss"}, {FL_PW_FWD_ARGS, "args"}, {FL_PW_FWD_TLAYOUT, "target_layout"}});
    return p;
  }
  // Fixed partition: FL_PW_GROUP_ELEMS elements per group, whatever the device
  // and the group size (the kernel strides over its block with tpg).
  LaunchPlan p;
  p.kernel_name = "fl_pw_fwd_partial_" + tail;
  p.elems_per_thread = FL_PW_READS;
  int t = usable_threads(max_group_threads);
  p.group[0] = uint32_t(t < FL_PW_GROUP_THREADS ? t : FL_PW_GROUP_THREADS);
  p.grid[0] = grid_dim(int64_t(pw_num_partials(n)), "elements");
  p.threadgroup_bytes = FL_PW_SCRATCH_FLOATS * sizeof(float);
  p.buffers = buffer_names(FL_PW_FWD_NBUF, {{FL_PW_FWD_PRED, "pred"}, {FL_PW_FWD_TARGET, "target"},
      {FL_PW_FWD_OUT, "partials"}, {FL_PW_FWD_ARGS, "args"}, {FL_PW_FWD_TLAYOUT, "target_layout"}});
  return p;
}

LaunchPlan pw_sum_finish_plan(uint64_t num_partials, int max_group_threads) {
  LaunchPlan p;
  p.kernel_name = "fl_pw_sum_finish";
  p.elems_per_thread = 1;
  // The kernel strides over the partials with tpg: any group size works.
  int64_t need = round_up_simd(int64_t(num_partials));
  int64_t t = usable_threads(max_group_threads);
  p.group[0] = uint32_t(need < t ? need : t);
  p.grid[0] = 1; // always runs: it writes the result, 0 for no elements
  p.threadgroup_bytes = FL_PW_SCRATCH_FLOATS * sizeof(float);
  p.buffers = buffer_names(FL_PW_SUM_NBUF, {{FL_PW_SUM_PARTIALS, "partials"}, {FL_PW_SUM_OUT, "out"},
      {FL_PW_SUM_ARGS, "args"}});
  return p;
}

LaunchPlan pw_backward_plan(KDtype dt, int kind, uint64_t n, bool cotan_in_dtype,
                            int max_group_threads, const PwTargetLayout* target) {
  // An element-wise cotangent in a 16-bit dtype is read as such (no float32
  // copy); float32 predictions have only the float32 kernel.
  bool cot16 = cotan_in_dtype && dt != KDtype::float32;
  LaunchPlan p = elementwise_plan(std::string("fl_pw_bwd_") + pw_kind_name(kind) + "_" +
                                      dtype_name(dt) + (cot16 ? "_cot16" : "") +
                                      pw_variant(target, n),
                                  n, max_group_threads);
  p.buffers = buffer_names(FL_PW_BWD_NBUF, {{FL_PW_BWD_PRED, "pred"}, {FL_PW_BWD_TARGET, "target"},
      {FL_PW_BWD_COTAN, "cotan"}, {FL_PW_BWD_GRAD, "grad"}, {FL_PW_BWD_ARGS, "args"},
      {FL_PW_BWD_TLAYOUT, "target_layout"}});
  return p;
}

PwArgs make_pw_args(uint64_t n, float param0, float param1, int reduce) {
  PwArgs a{};
  a.size = n;
  a.num_partials = pw_num_partials(n);
  a.param0 = param0;
  a.param1 = param1;
  a.reduce = reduce;
  return a;
}

// ---- fused linear cross-entropy ----------------------------------------------------

namespace {

// A GEMM group is its tile's SIMD-groups x 32 threads (the kernels' fragment layout).
void check_lce_group(int max_group_threads, int threads) {
  if (usable_threads(max_group_threads) < threads) {
    throw std::invalid_argument("launch plan: the linear cross-entropy kernels need " +
                                std::to_string(threads) + " threads per threadgroup");
  }
}

LaunchPlan lce_gemm_plan(const std::string& name, int64_t gx, int64_t gy, int max_group_threads,
                         int threads = FL_LCE_THREADS) {
  check_lce_group(max_group_threads, threads);
  LaunchPlan p;
  p.kernel_name = name;
  p.group[0] = uint32_t(threads);
  p.grid[0] = grid_dim(gx, "linear cross-entropy tiles");
  p.grid[1] = grid_dim(gy, "linear cross-entropy tiles");
  return p;
}

// One thread per element, groups of up to FL_LCE_ROW_THREADS.
LaunchPlan lce_elementwise_plan(const std::string& name, int64_t n, int max_group_threads) {
  LaunchPlan p;
  p.kernel_name = name;
  int64_t t = usable_threads(max_group_threads);
  p.group[0] = uint32_t(min3(round_up_simd(n), FL_LCE_ROW_THREADS, t));
  p.grid[0] = grid_dim(ceil_div(n, p.group[0]), "elements");
  return p;
}

// The work of one row of a GEMM launch: V (2 H + 1) (lce_launch_flops).
int64_t lce_gemm_row_flops(const LcePlan& p) {
  return int64_t(p.vocab) * (2 * int64_t(p.hidden) + 1);
}

// The command buffer of each launch (lce_schedule, ld_schedule): a new segment
// when the next launch would take the current one's work past max_flops.
template <class Launch>
void assign_segments(std::vector<Launch>& out, int64_t max_flops) {
  int segment = 0;
  int64_t work = 0;
  for (auto& l : out) {
    if (work > 0 && l.flops > max_flops - work) {
      ++segment;
      work = 0;
    }
    work += l.flops;
    l.segment = segment;
  }
}

} // namespace

std::string LceTile::name() const {
  return "bm" + std::to_string(bm) + "_bn" + std::to_string(bn) + "_bk" + std::to_string(bk) +
         "_wm" + std::to_string(wm) + "_wn" + std::to_string(wn);
}

namespace {

constexpr LceTile kTileDefault{64, 64, 16, 2, 2};
constexpr LceTile kTileSmallNt{64, 32, 32, 2, 2};
constexpr LceTile kTileLarge16{64, 64, 16, 1, 2};

// Dense weight of the hidden dtype, 16-bit: staged as 16-bit (lce::HeadStage).
bool stages_16bit(KDtype hidden, const std::string& head) {
  return hidden != KDtype::float32 && head == lce_dense_head(hidden);
}

} // namespace

LceTile lce_forward_tile(char device_class, KDtype hidden, const std::string& head, int64_t rows,
                         int vocab, int hidden_size) {
  if (device_class == 'g' || device_class == 'p') {
    return kTileSmallNt;
  }
  if (device_class == 'd' && stages_16bit(hidden, head)) {
    const int64_t mn = rows > int64_t(vocab) ? rows : int64_t(vocab);
    return 2 * mn > int64_t(hidden_size) ? kTileLarge16 : kTileSmallNt;
  }
  return kTileDefault;
}

std::vector<LceTile> lce_forward_tiles(KDtype hidden, const std::string& head) {
  if (stages_16bit(hidden, head)) {
    return {kTileDefault, kTileSmallNt, kTileLarge16};
  }
  return {kTileDefault, kTileSmallNt};
}

LcePlan lce_plan(int64_t rows, int vocab, int hidden, int64_t chunk_bytes,
                 int64_t max_buffer_flops, LceTile fwd) {
  check_row_shape(rows, vocab);
  if (hidden < 0 || chunk_bytes <= 0 || max_buffer_flops <= 0) {
    throw std::invalid_argument(
        "launch plan: negative H, or non-positive chunk_bytes or max_buffer_flops");
  }
  if (fwd.bm != FL_LCE_BM) {
    throw std::invalid_argument("lce_plan: every forward tile has BM rows (FL_LCE_BM)");
  }
  LcePlan p;
  p.fwd = fwd;
  p.rows = rows;
  p.vocab = vocab;
  p.hidden = hidden;
  p.max_buffer_flops = max_buffer_flops;
  p.row_blocks = ceil_div(rows, FL_LCE_BM);
  p.vocab_tiles = ceil_div(vocab, fwd.bn);
  // F: the rows one GEMM launch may cover (unlimited when a row costs nothing).
  const int64_t row_flops = lce_gemm_row_flops(p);
  const int64_t fit_flops = row_flops > 0 ? max_buffer_flops / row_flops : rows;
  int64_t fwd_rows = fit_flops / FL_LCE_BM * FL_LCE_BM;
  fwd_rows = fwd_rows < FL_LCE_BM ? FL_LCE_BM : fwd_rows;
  p.forward_rows = fwd_rows < rows ? fwd_rows : (rows > 0 ? rows : 1);
  const int64_t launch_blocks = ceil_div(p.forward_rows, FL_LCE_BM);
  int64_t tiles = p.vocab_tiles > 0 ? p.vocab_tiles : 1;
  // kLceTargetGroups groups of FL_LCE_THREADS threads: as many threads in flight for a
  // tile of fewer threads (the largest devices' 16-bit tile has 64).
  const int64_t target = int64_t(kLceTargetGroups) * FL_LCE_THREADS / fwd.threads();
  int64_t want = p.row_blocks > 0 ? ceil_div(target, launch_blocks) : 1;
  int64_t cap = tiles < kLceMaxSplits ? tiles : kLceMaxSplits;
  int64_t splits = want < 1 ? 1 : (want > cap ? cap : want);
  p.vocab_per_split = int(ceil_div(tiles, splits) * fwd.bn);
  p.splits = vocab > 0 ? int(ceil_div(vocab, p.vocab_per_split)) : 1;
  int64_t fit = chunk_bytes / (4 * int64_t(vocab > 0 ? vocab : 1));
  fit = fit < fit_flops ? fit : fit_flops;
  int64_t r = fit < 1 ? 1 : fit;
  r = r < rows ? r : (rows > 0 ? rows : 1);
  p.chunk_rows = r > FL_LCE_BM ? r / FL_LCE_BM * FL_LCE_BM : r;
  return p;
}

int64_t lce_launch_flops(const LcePlan& p, LceKernel k, int64_t rows) {
  switch (k) {
    case LceKernel::forward:
    case LceKernel::dz:
    case LceKernel::logits:
    case LceKernel::dh:
    case LceKernel::dw:
      return rows * lce_gemm_row_flops(p);
    case LceKernel::dbias:
    case LceKernel::rows:
      return rows * int64_t(p.vocab);
    case LceKernel::finish:
      return rows * int64_t(p.splits);
    case LceKernel::sum:
      return rows;
  }
  throw std::invalid_argument("lce_launch_flops: unknown kernel");
}

std::vector<LceLaunch> lce_schedule(const LcePlan& p, const LceWork& w) {
  std::vector<LceLaunch> out;
  auto add = [&](LceKernel k, int64_t row0, int64_t rows) {
    LceLaunch l;
    l.kernel = k;
    l.row0 = row0;
    l.rows = rows;
    l.flops = lce_launch_flops(p, k, rows);
    out.push_back(l);
  };
  const int64_t N = p.rows;
  const bool grads = w.dh || w.dw || w.dbias;
  if (w.forward && grads) { // the stored-Z path (launch_plan.h)
    for (int64_t r0 = 0; r0 < N || r0 == 0; r0 += p.chunk_rows) {
      const int64_t rows = N - r0 < p.chunk_rows ? N - r0 : p.chunk_rows;
      add(LceKernel::logits, r0, rows);
      add(LceKernel::rows, r0, rows);
      if (w.dbias) add(LceKernel::dbias, r0, rows);
      if (w.dh) add(LceKernel::dh, r0, rows);
      if (w.dw) add(LceKernel::dw, r0, rows);
      if (N == 0) break;
    }
    if (w.sum_rows) {
      add(LceKernel::sum, 0, N);
    }
  } else if (w.forward) {
    for (int64_t r0 = 0; r0 < N; r0 += p.forward_rows) {
      add(LceKernel::forward, r0, N - r0 < p.forward_rows ? N - r0 : p.forward_rows);
    }
    add(LceKernel::finish, 0, N);
    if (w.sum_rows) {
      add(LceKernel::sum, 0, N);
    }
  }
  if (grads && !w.forward) {
    for (int64_t r0 = 0; r0 < N || r0 == 0; r0 += p.chunk_rows) {
      const int64_t rows = N - r0 < p.chunk_rows ? N - r0 : p.chunk_rows;
      add(LceKernel::dz, r0, rows);
      if (w.dbias) add(LceKernel::dbias, r0, rows);
      if (w.dh) add(LceKernel::dh, r0, rows);
      if (w.dw) add(LceKernel::dw, r0, rows);
      if (N == 0) break;
    }
  }
  assign_segments(out, p.max_buffer_flops);
  return out;
}

std::string lce_dense_head(KDtype weight) {
  return std::string("w") + dtype_name(weight);
}

std::string lce_quantized_head(int mode, int bits, KDtype scales, bool global_scale) {
  if (global_scale && mode != flm::kQuantNvfp4) {
    throw std::invalid_argument("lce_quantized_head: a global scale is nvfp4's only");
  }
  switch (mode) {
    case flm::kQuantAffine:
      if (bits < 1 || bits > 8 || bits == 7) {
        throw std::invalid_argument("lce_quantized_head: affine bits must be 1-6 or 8");
      }
      return "q" + std::to_string(bits) + "_" + dtype_name(scales);
    case flm::kQuantMxfp4: return "mxfp4";
    case flm::kQuantMxfp8: return "mxfp8";
    case flm::kQuantNvfp4: return global_scale ? "nvfp4_global" : "nvfp4";
    default: throw std::invalid_argument("lce_quantized_head: unknown quantization mode");
  }
}

LaunchPlan lce_forward_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                            int max_group_threads, int64_t launch_rows) {
  const int64_t rows = launch_rows < 0 ? p.rows : launch_rows;
  LaunchPlan l = lce_gemm_plan(
      std::string("fl_lce_fwd_") + dtype_name(hidden) + "_" + head + "_" + p.fwd.name(),
      rows > 0 ? p.splits : 0, ceil_div(rows, FL_LCE_BM), max_group_threads, p.fwd.threads());
  l.buffers = buffer_names(FL_LCE_FWD_NBUF, {{FL_LCE_HIDDEN, "hidden"}, {FL_LCE_WEIGHT, "weight"},
      {FL_LCE_SCALES, "scales"}, {FL_LCE_QBIASES, "qbiases"}, {FL_LCE_TARGETS, "targets"},
      {FL_LCE_BIAS, "bias"}, {FL_LCE_FWD_PARTIALS, "partials"},
      {FL_LCE_FWD_TARGET_LOGIT, "target_logit"}, {FL_LCE_FWD_ARGS, "args"},
      {FL_LCE_FWD_ARGMAX_PARTIALS, "argmax_partials"}});
  return l;
}

LaunchPlan lce_finish_plan(const LcePlan& p, int max_group_threads) {
  LaunchPlan l = lce_elementwise_plan("fl_lce_fwd_finish", p.rows, max_group_threads);
  l.buffers = buffer_names(FL_LCE_FIN_NBUF, {{FL_LCE_FIN_PARTIALS, "partials"},
      {FL_LCE_FIN_TARGET_LOGIT, "target_logit"}, {FL_LCE_FIN_TARGETS, "targets"},
      {FL_LCE_FIN_LOSS, "loss"}, {FL_LCE_FIN_LSE, "lse"}, {FL_LCE_FIN_LSE_LO, "lse_lo"},
      {FL_LCE_FIN_CORRECT, "correct"}, {FL_LCE_FIN_ENTROPY, "entropy"}, {FL_LCE_FIN_ARGS, "args"},
      {FL_LCE_FIN_ARGMAX_PARTIALS, "argmax_partials"}, {FL_LCE_FIN_ARGMAX, "argmax"},
      {FL_LCE_FIN_TARGET_OUT, "target_out"}});
  return l;
}

LaunchPlan lce_dz_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                       int64_t chunk_rows, int max_group_threads) {
  LaunchPlan l = lce_gemm_plan(
      std::string("fl_lce_dz_") + dtype_name(hidden) + "_" + head + "_" + p.fwd.name(),
      ceil_div(chunk_rows, FL_LCE_BM), p.vocab_tiles, max_group_threads, p.fwd.threads());
  l.buffers = buffer_names(FL_LCE_DZ_NBUF, {{FL_LCE_HIDDEN, "hidden"}, {FL_LCE_WEIGHT, "weight"},
      {FL_LCE_SCALES, "scales"}, {FL_LCE_QBIASES, "qbiases"}, {FL_LCE_TARGETS, "targets"},
      {FL_LCE_BIAS, "bias"}, {FL_LCE_DZ_LSE, "lse"}, {FL_LCE_DZ_LSE_LO, "lse_lo"},
      {FL_LCE_DZ_G, "g"}, {FL_LCE_DZ_OUT, "dz"}, {FL_LCE_DZ_ARGS, "args"}});
  return l;
}

LaunchPlan rs_finish_plan(const LcePlan& p, int max_group_threads) {
  LaunchPlan l = lce_elementwise_plan("fl_rs_fwd_finish", p.rows, max_group_threads);
  l.buffers = buffer_names(FL_RS_FIN_NBUF, {{FL_RS_FIN_PARTIALS, "partials"},
      {FL_RS_FIN_TARGET_LOGIT, "target_logit"}, {FL_RS_FIN_TARGETS, "targets"}, {FL_RS_FIN_LSE, "lse"},
      {FL_RS_FIN_LSE_LO, "lse_lo"}, {FL_RS_FIN_TARGET, "target"}, {FL_RS_FIN_LOGIT_SUM, "logit_sum"},
      {FL_RS_FIN_EXPECTED, "expected"}, {FL_RS_FIN_EXPECTED_LO, "expected_lo"}, {FL_RS_FIN_MAX, "max"},
      {FL_RS_FIN_ARGS, "args"}, {FL_RS_FIN_ARGMAX_PARTIALS, "argmax_partials"},
      {FL_RS_FIN_ARGMAX, "argmax"}});
  return l;
}

LaunchPlan rs_dz_plan(KDtype hidden, const std::string& head, const LcePlan& p, int64_t chunk_rows,
                      int max_group_threads) {
  LaunchPlan l = lce_gemm_plan(
      std::string("fl_rs_dz_") + dtype_name(hidden) + "_" + head + "_" + p.fwd.name(),
      p.vocab_tiles, ceil_div(chunk_rows, FL_LCE_BM), max_group_threads, p.fwd.threads());
  l.buffers = buffer_names(FL_RS_DZ_NBUF, {{FL_LCE_HIDDEN, "hidden"}, {FL_LCE_WEIGHT, "weight"},
      {FL_LCE_SCALES, "scales"}, {FL_LCE_QBIASES, "qbiases"}, {FL_LCE_TARGETS, "targets"},
      {FL_LCE_BIAS, "bias"}, {FL_RS_DZ_LSE, "lse"}, {FL_RS_DZ_LSE_LO, "lse_lo"},
      {FL_RS_DZ_EXPECTED, "expected"}, {FL_RS_DZ_EXPECTED_LO, "expected_lo"}, {FL_RS_DZ_G_LSE, "g_lse"},
      {FL_RS_DZ_G_TARGET, "g_target"}, {FL_RS_DZ_G_LOGIT_SUM, "g_logit_sum"},
      {FL_RS_DZ_G_EXPECTED, "g_expected"}, {FL_RS_DZ_OUT, "dz"}, {FL_RS_DZ_ARGS, "args"}});
  return l;
}

LaunchPlan lce_dh_plan(const std::string& head, const LcePlan& p, int64_t chunk_rows,
                       int max_group_threads) {
  LaunchPlan l = lce_gemm_plan("fl_lce_dh_" + head, ceil_div(p.hidden, FL_LCE_BN),
                               ceil_div(chunk_rows, FL_LCE_BM), max_group_threads);
  l.buffers = buffer_names(FL_LCE_DH_NBUF, {{FL_LCE_DH_DZ, "dz"}, {FL_LCE_WEIGHT, "weight"},
      {FL_LCE_SCALES, "scales"}, {FL_LCE_QBIASES, "qbiases"}, {FL_LCE_DH_OUT, "dh"},
      {FL_LCE_DH_ARGS, "args"}});
  return l;
}

LaunchPlan lce_dw_plan(KDtype hidden, const LcePlan& p, int max_group_threads) {
  LaunchPlan l = lce_gemm_plan(std::string("fl_lce_dw_") + dtype_name(hidden),
                               ceil_div(p.hidden, FL_LCE_BN), ceil_div(p.vocab, FL_LCE_BM),
                               max_group_threads);
  l.buffers = buffer_names(FL_LCE_DW_NBUF, {{FL_LCE_DW_DZ, "dz"}, {FL_LCE_DW_HIDDEN, "hidden"},
      {FL_LCE_DW_OUT, "dw"}, {FL_LCE_DW_ARGS, "args"}});
  return l;
}

LaunchPlan lce_dbias_plan(const LcePlan& p, int max_group_threads) {
  LaunchPlan l = lce_elementwise_plan("fl_lce_dbias", p.vocab, max_group_threads);
  l.buffers = buffer_names(FL_LCE_DB_NBUF, {{FL_LCE_DB_DZ, "dz"}, {FL_LCE_DB_OUT, "dbias"},
      {FL_LCE_DB_ARGS, "args"}});
  return l;
}

LaunchPlan lce_rows_plan(const LcePlan& p, int64_t chunk_rows, int max_group_threads) {
  LaunchPlan l;
  l.kernel_name = "fl_lce_rows";
  const int64_t t = usable_threads(max_group_threads);
  l.group[0] = uint32_t(min3(round_up_simd(ceil_div(int64_t(p.vocab), FL_ROW_READS)),
                             FL_LCE_ROW_THREADS, t));
  l.grid[0] = grid_dim(chunk_rows, "rows");
  l.buffers = buffer_names(FL_LCE_ROWS_NBUF, {{FL_LCE_ROWS_Z, "z"}, {FL_LCE_ROWS_TARGETS, "targets"},
      {FL_LCE_ROWS_LOSS, "loss"}, {FL_LCE_ROWS_LSE, "lse"}, {FL_LCE_ROWS_LSE_LO, "lse_lo"},
      {FL_LCE_ROWS_CORRECT, "correct"}, {FL_LCE_ROWS_ENTROPY, "entropy"},
      {FL_LCE_ROWS_ARGMAX, "argmax"}, {FL_LCE_ROWS_TARGET_OUT, "target_out"},
      {FL_LCE_ROWS_ARGS, "args"}});
  return l;
}

LaunchPlan lce_scale_plan(KDtype out, uint64_t n, int max_group_threads) {
  LaunchPlan l = lce_elementwise_plan(std::string("fl_lce_scale_") + dtype_name(out), int64_t(n),
                                      max_group_threads);
  l.buffers = buffer_names(FL_LCE_SCALE_NBUF, {{FL_LCE_SCALE_G, "g"}, {FL_LCE_SCALE_SRC, "src"},
      {FL_LCE_SCALE_OUT, "out"}, {FL_LCE_SCALE_ARGS, "args"}});
  return l;
}

LceArgs make_lce_args(const LcePlan& p, float label_smoothing, int smoothing_mode,
                      bool has_ignore_index, int64_t ignore_index, float z_loss, float softcap,
                      bool has_bias) {
  LceArgs a{};
  flm::CeSmoothing c = flm::ce_smoothing(label_smoothing, smoothing_mode, p.vocab);
  a.ignore_index = ignore_index;
  a.rows = p.rows;
  a.row0 = 0;
  a.vocab = p.vocab;
  a.hidden = p.hidden;
  a.chunk_rows = int(p.chunk_rows);
  a.vocab_per_split = p.vocab_per_split;
  a.num_splits = p.splits;
  a.has_ignore_index = has_ignore_index ? 1 : 0;
  a.has_bias = has_bias ? 1 : 0;
  a.c_target = c.c_target;
  a.c_other = c.c_other;
  // The CPU's A for hard targets without class weights (csrc/cpu/linear_cross_entropy.cpp).
  a.a_sum = c.c_target + c.c_other * float(p.vocab);
  a.z_loss = z_loss;
  a.softcap = softcap;
  return a;
}

LceArgs make_rs_args(const LcePlan& p, bool has_ignore_index, int64_t ignore_index, float softcap,
                     bool has_bias, float temperature, bool sharded, int64_t vocab_start, bool has_targets) {
  LceArgs a = make_lce_args(p, 0.0f, 0, has_ignore_index, ignore_index, 0.0f, softcap, has_bias);
  a.has_temperature = temperature != 1.0f ? 1 : 0;
  a.temperature = temperature;
  a.inv_temperature = 1.0f / temperature; // the CPU's factor (csrc/cpu/row_stats.cpp)
  a.sharded = sharded ? 1 : 0;
  a.vocab_start = sharded ? vocab_start : 0;
  a.no_targets = has_targets ? 0 : 1;
  return a;
}

// ---- row statistics of given logits --------------------------------------------------

LaunchPlan rs_logits_forward_plan(KDtype dt, int64_t rows, int vocab, int max_group_threads) {
  LaunchPlan p = strided_row_plan(std::string("fl_rs_logits_fwd_") + dtype_name(dt), rows, vocab,
                                  max_group_threads);
  p.buffers = buffer_names(FL_RS_LOG_FWD_NBUF, {{FL_RS_LOG_FWD_LOGITS, "logits"},
      {FL_RS_LOG_FWD_TARGETS, "targets"}, {FL_RS_LOG_FWD_LSE, "lse"}, {FL_RS_LOG_FWD_LSE_LO, "lse_lo"},
      {FL_RS_LOG_FWD_TARGET, "target"}, {FL_RS_LOG_FWD_LOGIT_SUM, "logit_sum"},
      {FL_RS_LOG_FWD_EXPECTED, "expected"}, {FL_RS_LOG_FWD_EXPECTED_LO, "expected_lo"},
      {FL_RS_LOG_FWD_MAX, "max"}, {FL_RS_LOG_FWD_ARGMAX, "argmax"}, {FL_RS_LOG_FWD_ARGS, "args"}});
  return p;
}

LaunchPlan rs_logits_backward_plan(KDtype dt, int64_t rows, int vocab, int max_group_threads) {
  LaunchPlan p = row_backward_plan(std::string("fl_rs_logits_bwd_") + dtype_name(dt), rows, vocab,
                                   max_group_threads);
  p.buffers = buffer_names(FL_RS_LOG_BWD_NBUF, {{FL_RS_LOG_BWD_LOGITS, "logits"},
      {FL_RS_LOG_BWD_TARGETS, "targets"}, {FL_RS_LOG_BWD_LSE, "lse"}, {FL_RS_LOG_BWD_LSE_LO, "lse_lo"},
      {FL_RS_LOG_BWD_EXPECTED, "expected"}, {FL_RS_LOG_BWD_EXPECTED_LO, "expected_lo"},
      {FL_RS_LOG_BWD_G_LSE, "g_lse"}, {FL_RS_LOG_BWD_G_TARGET, "g_target"},
      {FL_RS_LOG_BWD_G_LOGIT_SUM, "g_logit_sum"}, {FL_RS_LOG_BWD_G_EXPECTED, "g_expected"},
      {FL_RS_LOG_BWD_GRAD, "grad"}, {FL_RS_LOG_BWD_ARGS, "args"}});
  return p;
}

RsArgs make_rs_logits_args(int vocab, bool has_targets, bool has_ignore_index, int64_t ignore_index,
                           bool sharded, int64_t vocab_start, float softcap, float temperature, int stats,
                           int cotangents) {
  RsArgs a{};
  a.ignore_index = ignore_index;
  a.vocab_start = sharded ? vocab_start : 0;
  a.vocab = vocab;
  a.has_ignore_index = has_ignore_index ? 1 : 0;
  a.has_targets = has_targets ? 1 : 0;
  a.sharded = sharded ? 1 : 0;
  a.stats = stats;
  a.cotangents = cotangents;
  a.softcap = softcap;
  a.temperature = temperature;
  a.inv_temperature = 1.0f / temperature; // the CPU's factor (csrc/cpu/row_stats.cpp)
  return a;
}

// ---- fused linear distillation ------------------------------------------------------------

LdPlan ld_plan(int64_t rows, int vocab, int student_hidden, int teacher_hidden, int64_t chunk_bytes,
               int64_t max_buffer_flops, LceTile student_tile, LceTile teacher_tile) {
  LdPlan p;
  p.has_teacher = teacher_hidden >= 0;
  if (chunk_bytes <= 0) {
    throw std::invalid_argument("launch plan: non-positive chunk_bytes");
  }
  // Each head's share of chunk_bytes (at least 1 byte: lce_plan's R is then 1).
  const int64_t share = p.has_teacher ? (chunk_bytes / 2 > 0 ? chunk_bytes / 2 : 1) : chunk_bytes;
  p.student = lce_plan(rows, vocab, student_hidden, share, max_buffer_flops, student_tile);
  p.rows = rows;
  p.chunk_rows = p.student.chunk_rows;
  if (p.has_teacher) {
    p.teacher = lce_plan(rows, vocab, teacher_hidden, share, max_buffer_flops, teacher_tile);
    if (p.teacher.chunk_rows < p.chunk_rows) {
      p.chunk_rows = p.teacher.chunk_rows;
    }
    p.teacher.chunk_rows = p.chunk_rows;
  }
  p.student.chunk_rows = p.chunk_rows;
  return p;
}

LaunchPlan ld_logits_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                          int64_t chunk_rows, int max_group_threads) {
  LaunchPlan l = lce_gemm_plan(
      std::string("fl_ld_logits_") + dtype_name(hidden) + "_" + head + "_" + p.fwd.name(),
      p.vocab_tiles, ceil_div(chunk_rows, FL_LCE_BM), max_group_threads, p.fwd.threads());
  l.buffers = buffer_names(FL_LD_LOGITS_NBUF, {{FL_LCE_HIDDEN, "hidden"}, {FL_LCE_WEIGHT, "weight"},
      {FL_LCE_SCALES, "scales"}, {FL_LCE_QBIASES, "qbiases"}, {FL_LD_LOGITS_OUT, "z"},
      {FL_LD_LOGITS_ARGS, "args"}});
  return l;
}

LaunchPlan ltk_forward_plan(int64_t rows, int vocab, int max_group_threads) {
  LaunchPlan p = strided_row_plan("fl_ltk_fwd", rows, vocab, max_group_threads);
  p.buffers = buffer_names(FL_LTK_FWD_NBUF, {{FL_LTK_FWD_LOGITS, "logits"}, {FL_LTK_FWD_IDS, "ids"},
      {FL_LTK_FWD_VALUES, "values"}, {FL_LTK_FWD_INDEX, "class_index"}, {FL_LTK_FWD_LOSS, "loss"},
      {FL_LTK_FWD_STATS, "stats"}, {FL_LTK_FWD_ARGS, "args"}});
  return p;
}

LaunchPlan ltk_backward_plan(int64_t rows, int vocab, int max_group_threads) {
  // (the backward's pairs follow a barrier: one group per row, as the forward)
  LaunchPlan p = strided_row_plan("fl_ltk_bwd", rows, vocab, max_group_threads);
  p.buffers = buffer_names(FL_LTK_BWD_NBUF, {{FL_LTK_BWD_GRAD, "grad"}, {FL_LTK_BWD_IDS, "ids"},
      {FL_LTK_BWD_VALUES, "values"}, {FL_LTK_BWD_INDEX, "class_index"}, {FL_LTK_BWD_STATS, "stats"},
      {FL_LTK_BWD_GLOSS, "g_loss"}, {FL_LTK_BWD_ARGS, "args"}});
  return p;
}

std::vector<LdLaunch> ld_schedule(const LdPlan& p, const LdWork& w) {
  std::vector<LdLaunch> out;
  const int64_t N = p.rows;
  const int64_t V = p.student.vocab;
  for (int64_t r0 = 0; r0 < N || r0 == 0; r0 += p.chunk_rows) {
    const int64_t rows = N - r0 < p.chunk_rows ? N - r0 : p.chunk_rows;
    auto add = [&](LdKernel k, int64_t flops) {
      LdLaunch l;
      l.kernel = k;
      l.row0 = r0;
      l.rows = rows;
      l.flops = flops;
      out.push_back(l);
    };
    const int64_t gemm = lce_launch_flops(p.student, LceKernel::dz, rows);
    add(LdKernel::logits, gemm);
    if (p.has_teacher) {
      add(LdKernel::teacher_logits, lce_launch_flops(p.teacher, LceKernel::dz, rows));
    }
    if (w.forward) add(LdKernel::rows_forward, rows * V);
    if (w.backward) add(LdKernel::rows_backward, rows * V);
    if (w.dh) add(LdKernel::dh, gemm);
    if (w.dw) add(LdKernel::dw, gemm);
    if (N == 0) break;
  }
  if (w.forward && w.sum_rows) {
    LdLaunch l;
    l.kernel = LdKernel::sum;
    l.rows = N;
    l.flops = N;
    out.push_back(l);
  }
  assign_segments(out, p.student.max_buffer_flops);
  return out;
}

LceArgs make_ld_head_args(const LcePlan& p, int bits, int group_size) {
  LceArgs a = make_lce_args(p, 0.0f, 0, false, 0, 0.0f, 0.0f, false);
  a.bits = bits;
  a.group_size = group_size;
  return a;
}

LtkArgs make_ltk_args(int vocab, int topk, bool renormalize, bool has_targets, bool has_ignore_index,
                      int64_t ignore_index, float c, float d_scale, float alpha) {
  LtkArgs a{};
  a.kd = make_kd_args(vocab, has_targets, has_ignore_index, ignore_index, c, 0.5f, d_scale, alpha);
  a.topk = topk;
  a.renormalize = renormalize ? 1 : 0;
  return a;
}

// ---- every kernel the host can ask for --------------------------------------------------

namespace {

// Collects the plans' kernel names with the call that built them.
struct PlanCollector {
  std::vector<PlanKernel> out;
  void add(const LaunchPlan& p, const std::string& call) {
    out.push_back({p.kernel_name, call});
  }
};

std::string flag(bool b) {
  return b ? "true" : "false";
}

} // namespace

std::vector<PlanKernel> enumerate_plan_kernels() {
  PlanCollector c;
  // eval_gpu plans for kMaxGroupThreads first, then for the pipeline's own
  // limit (gpu::fit_plan), which may be any multiple of 32 up to 1024: the
  // limits at which a plan's choice can change (the row kernels' block/looped
  // boundary moves with it), and class counts on both sides of each.
  const int limits[] = {kMaxGroupThreads, 512, 256, 128, 64, 32};
  const int classes[] = {0, 1, 4 * 32, 4 * 32 + 1, 4 * 1024, 4 * 1024 + 1, 1 << 20};
  for (int d = 0; d < kNumKDtypes; ++d) {
    const KDtype dt = KDtype(d);
    const std::string dn = dtype_name(dt);
    for (int limit : limits) {
      for (int k : classes) {
        const std::string at = ", K=" + std::to_string(k) + ", limit=" + std::to_string(limit);
        for (bool soft : {false, true}) {
          for (bool weights : {false, true}) {
            const std::string opt = dn + ", soft=" + flag(soft) + ", weights=" + flag(weights) + at;
            c.add(ce_forward_plan(dt, 3, k, soft, weights, limit), "ce_forward_plan(" + opt + ")");
            c.add(ce_backward_plan(dt, 3, k, soft, weights, limit), "ce_backward_plan(" + opt + ")");
          }
        }
        c.add(sf_forward_plan(dt, 3, k, limit), "sf_forward_plan(" + dn + at + ")");
        c.add(sf_backward_plan(dt, 3, k, limit), "sf_backward_plan(" + dn + at + ")");
      }
    }
    // Element-wise: every loss kind (gamma = 2 has its own kernels), reduction,
    // cotangent dtype, and target shape (the predictions' own, broadcast along
    // inner or outer axes, a scalar).
    const std::vector<int64_t> pred = {4, 5};
    const std::vector<std::vector<int64_t>> targets = {{4, 5}, {1, 5}, {4, 1}, {}};
    for (int kind = 0; kind < kPwLossKinds; ++kind) {
      for (float gamma : {2.0f, 1.5f}) {
        const int kk = pw_kernel_kind(kind, gamma);
        for (const auto& tshape : targets) {
          PwTargetLayout layout;
          if (!make_pw_target_layout(pred, tshape, &layout)) {
            throw std::logic_error("enumerate_plan_kernels: a target layout that does not fit");
          }
          const std::string opt = dn + ", kind=" + std::to_string(kind) + ", gamma=" +
              (gamma == 2.0f ? "2" : "1.5") + ", target ndim=" + std::to_string(tshape.size()) +
              (tshape.empty() ? "" : " [" + std::to_string(tshape[0]) + "," +
                                         std::to_string(tshape[1]) + "]");
          for (int reduce = 0; reduce < 3; ++reduce) {
            c.add(pw_forward_plan(dt, kk, 20, reduce, kMaxGroupThreads, &layout),
                  "pw_forward_plan(" + opt + ", reduce=" + std::to_string(reduce) + ")");
          }
          for (bool cot : {false, true}) {
            c.add(pw_backward_plan(dt, kk, 20, cot, kMaxGroupThreads, &layout),
                  "pw_backward_plan(" + opt + ", cotan_in_dtype=" + flag(cot) + ")");
          }
        }
      }
    }
    c.add(lce_scale_plan(dt, 10), "lce_scale_plan(" + dn + ")");
    // Distillation: every kind x student dtype x teacher dtype (the group
    // size changes no name).
    for (int td = 0; td < kNumKDtypes; ++td) {
      for (int kind = 0; kind < 3; ++kind) {
        const std::string opt = dn + ", " + dtype_name(KDtype(td)) + ", kind=" + std::to_string(kind);
        c.add(kd_forward_plan(dt, KDtype(td), kind, 3, 100), "kd_forward_plan(" + opt + ")");
        c.add(kd_backward_plan(dt, KDtype(td), kind, 3, 100), "kd_backward_plan(" + opt + ")");
      }
    }
    c.add(rs_logits_forward_plan(dt, 3, 100), "rs_logits_forward_plan(" + dn + ")");
    c.add(rs_logits_backward_plan(dt, 3, 100), "rs_logits_backward_plan(" + dn + ")");
  }
  c.add(pw_sum_finish_plan(7), "pw_sum_finish_plan()");

  // Linear CE: every hidden dtype x head (dW depends on the hidden dtype only).
  std::vector<std::string> heads;
  for (int w = 0; w < kNumKDtypes; ++w) {
    heads.push_back(lce_dense_head(KDtype(w)));
  }
  // Quantized: every mode x bits x scale dtype x global scale lce_quantized_head
  // names a head for (it throws std::invalid_argument for the others; the floating-point
  // modes name one head whatever the bits and dtype).
  for (int mode = flm::kQuantAffine; mode <= flm::kQuantNvfp4; ++mode) {
    for (int bits = 1; bits <= 8; ++bits) {
      for (int s = 0; s < kNumKDtypes; ++s) {
        for (bool global_scale : {false, true}) {
          std::string head;
          try {
            head = lce_quantized_head(mode, bits, KDtype(s), global_scale);
          } catch (const std::invalid_argument&) {
            continue;
          }
          bool seen = false;
          for (const std::string& h : heads) {
            seen = seen || h == head;
          }
          if (!seen) {
            heads.push_back(head);
          }
        }
      }
    }
  }
  const LcePlan plan = lce_plan(100, 1000, 64, int64_t(1) << 20);
  c.add(lce_finish_plan(plan), "lce_finish_plan()");
  c.add(rs_finish_plan(plan), "rs_finish_plan()");
  c.add(lce_dbias_plan(plan), "lce_dbias_plan()");
  c.add(lce_rows_plan(plan, plan.chunk_rows), "lce_rows_plan()");
  c.add(ltk_forward_plan(3, 100), "ltk_forward_plan()");
  c.add(ltk_backward_plan(3, 100), "ltk_backward_plan()");
  // The forward tile of every device class, and of the large class's large-K case.
  const char device_classes[] = {'p', 'g', 's', 'd'};
  for (int h = 0; h < kNumKDtypes; ++h) {
    const KDtype ht = KDtype(h);
    const std::string hn = dtype_name(ht);
    for (const std::string& head : heads) {
      for (char dc : device_classes) {
        for (int hidden_size : {64, 1 << 20}) {
          const LceTile t = lce_forward_tile(dc, ht, head, 100, 1000, hidden_size);
          const LcePlan tp = lce_plan(100, 1000, hidden_size, int64_t(1) << 30,
                                      kLceMaxBufferFlops, t);
          const std::string at = hn + ", " + head + ", class " + dc + ", H " +
                                 std::to_string(hidden_size);
          c.add(lce_forward_plan(ht, head, tp), "lce_forward_plan(" + at + ")");
          c.add(lce_dz_plan(ht, head, tp, tp.chunk_rows), "lce_dz_plan(" + at + ")");
          c.add(rs_dz_plan(ht, head, tp, tp.chunk_rows), "rs_dz_plan(" + at + ")");
          c.add(ld_logits_plan(ht, head, tp, tp.chunk_rows), "ld_logits_plan(" + at + ")");
        }
      }
    }
    c.add(lce_dw_plan(ht, plan), "lce_dw_plan(" + hn + ")");
  }
  for (const std::string& head : heads) {
    c.add(lce_dh_plan(head, plan, plan.chunk_rows), "lce_dh_plan(" + head + ")");
  }
  return c.out;
}

} // namespace fl::mplan
