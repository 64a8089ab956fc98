// Launch plans of the Metal kernels (metal/*.metal): which kernel, how many
// threadgroups of how many threads, how much threadgroup memory, how many
// elements per thread, and the buffer order. Plain C++ with no Metal types:
// the host code (csrc/metal/*.cpp, macOS only) and the CPU harness tests
// (tests/metal_kernels/, every platform) dispatch from the same plan.
//
// Every plan takes the pipeline's maxTotalThreadsPerThreadgroup (a device and
// kernel property, 1024 at most; eval_gpu passes the real one, see
// gpu::fit_plan) and never plans a group larger than it, rounded down to 32.
//
// Kernel choice for the row-wise losses (cross-entropy, softmax focal), with
// R = FL_ROW_READS = 4 elements per thread and T the largest usable group
// (1024, or the pipeline's maxTotalThreadsPerThreadgroup rounded down to 32):
//   block   K <= T * R: ceil(K / R) threads rounded up to a multiple of 32
//           (at least 32), every thread holds its R logits in registers
//   looped  K >  T * R: T threads, online log-sum-exp over strided chunks
// Backward (both losses): grid (ceil(K / (t * R)), rows) of t = min(256, T,
// ceil(K / R) rounded up to 32) threads, R elements per thread.
// Element-wise losses: groups of min(256, T) threads, FL_PW_READS = 4 elements
// per thread; the fused sum uses one group per FL_PW_GROUP_ELEMS elements
// (whatever the group size), then one group of up to T threads adds the
// partial sums.
//
// Identifiers here avoid the MSL keywords (device, constant, kernel, thread,
// threadgroup): the harness compiles this file after the Metal shim's macros.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "metal/kernel_args.h"

namespace fl::mplan {

// The element types the kernels are instantiated for (names as MLX spells them).
enum class KDtype : int { float32 = 0, float16 = 1, bfloat16 = 2 };
constexpr int kNumKDtypes = 3;
const char* dtype_name(KDtype dt);
int dtype_size(KDtype dt);

constexpr int kMaxGroupThreads = 1024;

struct LaunchPlan {
  std::string kernel_name; // the [[host_name]] of the instantiation
  uint32_t grid[3] = {0, 1, 1}; // threadgroups per grid (dispatchThreadgroups)
  uint32_t group[3] = {1, 1, 1}; // threads per threadgroup
  uint32_t threadgroup_bytes = 0; // [[threadgroup(0)]] length; 0: the kernel has none
  int elems_per_thread = 1; // contiguous elements a thread handles per step
  bool looped = false; // row kernels: the looped (online) variant
  std::vector<std::string> buffers; // buffers[i] is bound at [[buffer(i)]]

  // Nothing to launch (zero rows or elements): the host skips the dispatch.
  bool empty() const {
    return grid[0] == 0 || grid[1] == 0 || grid[2] == 0;
  }
  uint64_t total_threads() const {
    return uint64_t(grid[0]) * grid[1] * grid[2] * group[0] * group[1] * group[2];
  }
};

// Block vs looped for a row of K elements, given the largest usable group.
bool row_uses_looped(int num_classes, int max_group_threads = kMaxGroupThreads);

// ---- cross-entropy -------------------------------------------------------------
LaunchPlan ce_forward_plan(KDtype dt, int64_t rows, int num_classes, bool soft_targets,
                           bool class_weights, int max_group_threads = kMaxGroupThreads);
LaunchPlan ce_backward_plan(KDtype dt, int64_t rows, int num_classes, bool soft_targets,
                            bool class_weights, int max_group_threads = kMaxGroupThreads);
// smoothing_mode: flm::kSmoothUniform | flm::kSmoothOthers.
// logit_softcap: 0 for none.
CeArgs make_ce_args(int num_classes, float label_smoothing, int smoothing_mode,
                    bool has_ignore_index, int64_t ignore_index, float z_loss,
                    float logit_softcap = 0.0f, bool stats = false);

// ---- softmax focal -------------------------------------------------------------
LaunchPlan sf_forward_plan(KDtype dt, int64_t rows, int num_classes,
                           int max_group_threads = kMaxGroupThreads);
LaunchPlan sf_backward_plan(KDtype dt, int64_t rows, int num_classes,
                            int max_group_threads = kMaxGroupThreads);
SfArgs make_sf_args(int num_classes, float gamma, float alpha, bool has_class_alpha,
                    bool has_ignore_index, int64_t ignore_index);

// ---- distillation (kl_div, jsd) ---------------------------------------------------
// kind: 0 forward KL, 1 reverse KL, 2 JSD (flm::kDistill*), named kl / rkl / jsd;
// kernels fl_kd_<fwd|bwd>_<kind>_<student dtype>_<teacher dtype>. Rules:
//  - forward: one group per row of min(T, ceil(V / R) rounded up to 32)
//    threads (T the usable pipeline limit, R = FL_ROW_READS), striding over
//    the row; FL_ROW_SCRATCH_FLOATS of threadgroup memory;
//  - backward: row_backward's grid (as the cross-entropy's backward).
const char* kd_kind_name(int kind);
LaunchPlan kd_forward_plan(KDtype student, KDtype teacher, int kind, int64_t rows, int vocab,
                           int max_group_threads = kMaxGroupThreads);
LaunchPlan kd_backward_plan(KDtype student, KDtype teacher, int kind, int64_t rows, int vocab,
                            int max_group_threads = kMaxGroupThreads);
// c = 1 / temperature; d_scale = (1 - alpha), times T^2 when asked.
KdArgs make_kd_args(int vocab, bool has_targets, bool has_ignore_index, int64_t ignore_index,
                    float c, float beta, float d_scale, float alpha);

// ---- row statistics of given logits (ops/row_stats.h's logits form) --------------
// Kernels fl_rs_logits_<fwd|bwd>_<dtype>. Rules:
//  - forward: the distillation forward's (one group per row of min(T,
//    ceil(V / R) rounded up to 32) threads striding over the row,
//    FL_ROW_SCRATCH_FLOATS of threadgroup memory);
//  - backward: row_backward's grid (as the cross-entropy's backward).
LaunchPlan rs_logits_forward_plan(KDtype dt, int64_t rows, int vocab,
                                  int max_group_threads = kMaxGroupThreads);
LaunchPlan rs_logits_backward_plan(KDtype dt, int64_t rows, int vocab,
                                   int max_group_threads = kMaxGroupThreads);
// stats: the flm::RowStat bits the forward writes; cotangents: those whose
// cotangents the backward reads. vocab_start is used only when sharded.
RsArgs make_rs_logits_args(int vocab, bool has_targets, bool has_ignore_index, int64_t ignore_index,
                           bool sharded, int64_t vocab_start, float softcap, float temperature, int stats,
                           int cotangents);

// ---- element-wise losses ---------------------------------------------------------
// The loss kinds the op passes: fl::PointwiseKind's values 0 .. kPwLossKinds - 1
// (ops/pointwise_loss.h asserts the count).
constexpr int kPwLossKinds = 3;
// kind: 0 smooth-L1, 1 Huber, 2 sigmoid focal (fl::PointwiseKind);
// reduce: 0 none, 1 sum, 2 mean (fl::Reduce).
const char* pw_kind_name(int kind);
// The kernel kind for a loss kind and its gamma: the sigmoid focal loss with
// gamma = 2 runs its own instantiation (FL_PW_KIND_FOCAL_GAMMA_TWO), as on the CPU.
int pw_kernel_kind(int kind, float gamma);
// Broadcast targets (the _bcast kernels), rules:
//  - make_pw_target_layout collapses the predictions' axes (unit axes dropped),
//    innermost first, into groups along which the target advances or stays
//    put (neighbouring axes of one kind merge), then drops the outermost
//    groups while they are broadcast (they never move the target index). It
//    returns false, and the target must reach the kernels at full size,
//    when more than FL_PW_MAX_TARGET_GROUPS groups remain.
//  - pw_target_is_identity: the layout maps every i < n to i (one advancing
//    group of stride 1, or n <= 1 and no group): the plain kernels, which
//    read the target at the predictions' index, serve it.
//  - the plans take the layout (null: a target of the predictions' shape) and
//    name the _bcast instantiation unless it is the identity; the group,
//    grid and partition are those of the plain kernels.
bool make_pw_target_layout(const std::vector<int64_t>& pred_shape,
                           const std::vector<int64_t>& target_shape, PwTargetLayout* layout);
bool pw_target_is_identity(const PwTargetLayout& layout, uint64_t n);
// reduce == 0: element-wise kernel; else the partial-sum kernel (followed by
// pw_sum_finish_plan(pw_num_partials(n))).
LaunchPlan pw_forward_plan(KDtype dt, int kind, uint64_t n, int reduce,
                           int max_group_threads = kMaxGroupThreads,
                           const PwTargetLayout* target = nullptr);
uint64_t pw_num_partials(uint64_t n);
LaunchPlan pw_sum_finish_plan(uint64_t num_partials, int max_group_threads = kMaxGroupThreads);
// cotan_in_dtype: the element-wise cotangent has the predictions' dtype (else
// float32, as is the scalar cotangent of a reduced loss).
LaunchPlan pw_backward_plan(KDtype dt, int kind, uint64_t n, bool cotan_in_dtype = false,
                            int max_group_threads = kMaxGroupThreads,
                            const PwTargetLayout* target = nullptr);
PwArgs make_pw_args(uint64_t n, float param0, float param1, int reduce);

// ---- fused linear cross-entropy ----------------------------------------------------
// GEMM tiles (metal/lce_gemm.h, MLX's steel building blocks): dH and dW in the
// default FL_LCE_BM x FL_LCE_BN x FL_LCE_BK tile of FL_LCE_THREADS threads; the
// forward and dZ in the device class's tile (lce_forward_tile below, BM rows in
// every choice). Rules of lce_plan (tested at each threshold +-1):
//  - forward: B = ceil(N / BM) row blocks; the vocabulary is cut into
//    S = clamp(ceil(kLceTargetGroups 128 / threads / B), 1, min(ceil(V / BN), kLceMaxSplits))
//    splits of a whole number of BN tiles, then S = ceil(V / per split) (no
//    empty split). Grid (S, B): at least ~kLceTargetGroups groups when the
//    vocabulary allows, and the per-row states are S x N x 16 bytes
//    (<= 1 KiB per row, never N x V). S depends on N, V and the tile, so results
//    are the same on every GPU of one device class (another class's tile sums in
//    another order, in the last bits, as MLX's own matmul does).
//  - backward: rows per chunk R = clamp(chunk_bytes / (4 V), 1, N), rounded down
//    to a multiple of BM when R > BM; the dZ buffer is R x V float32
//    (<= chunk_bytes unless one row is already larger, as on the CPU).
//  - every GEMM group is its tile's threads (128, or 64): a pipeline limit below
//    that is an error (Apple GPUs allow >= 256 for kernels of this size).
//  - work per launch (command buffers, below): with F = floor(max_buffer_flops /
//    (2 V H)) rows (the rows one GEMM launch may cover; unlimited for H = 0),
//    the forward tiles run in launches of forward_rows = min(N, max(BM, F
//    rounded down to a multiple of BM)) rows, and S above counts the row blocks
//    of one such launch, not of all N rows (B = ceil(forward_rows / BM)); the
//    backward's R is also at most F (at least 1, then the BM rounding).
constexpr int kLceTargetGroups = 512;
constexpr int kLceMaxSplits = 64;

// Command buffers. MLX commits a stream's command buffer between primitives
// (when CommandEncoder::needs_commit(): more than ~40 launches or ~40 MB of
// inputs in it), never inside one primitive's eval_gpu, so a call of the linear
// CE would be one command buffer whatever its size: ~12 s of GPU work at N 8192,
// H 4096, V 151936 on a base M1 (2.6 TFLOP/s fp32), past the macOS GPU watchdog.
// Its eval_gpu commits instead at the segment boundaries of lce_schedule, so no
// command buffer holds more than kLceMaxBufferFlops (2^40 = 1.1e12 FLOPs: 0.42 s
// at a base M1's fp32 peak, 0.08 s at an M-Max's) of the work counted by
// lce_launch_flops, unless one row block of the forward (2 BM V H FLOPs) or one
// row of a GEMM (2 V H) is already more: V H > 2^34 (64 GiB of float32 weight).
constexpr int64_t kLceMaxBufferFlops = int64_t(1) << 40;

// The tile of the forward and dZ kernels, Z = H W^T ("nt"): MLX's own choice for
// that GEMM (mlx/backend/metal/matmul.cpp, GEMM_TPARAM_MACRO, for a large matmul),
// by device class, the last letter of the GPU's architecture name
// (metal::Device::get_architecture(); MLX's device.cpp: 'p' phone, 'g' base and
// Pro, 's' Max, 'd' Ultra):
//   'g', 'p'                      64 x 32 x 32, 2 x 2 SIMD-groups
//   'd', 16-bit operands          64 x 64 x 16, 1 x 2 (64 threads), or 64 x 32 x 32, 2 x 2
//                                 when 2 max(N, V) <= H ("nt with large K")
//   otherwise                     64 x 64 x 16, 2 x 2 (MLX's default)
// "16-bit operands": a dense weight of the hidden dtype, float16 or bfloat16;
// the other heads stage float (a quantized head, a mixed or float32 pair) and take
// MLX's float32 choice. dH and dW (float32 dZ, nn and tn) always take the
// default tile, as MLX does for float32 on every class. BM = 64 in every choice.
struct LceTile {
  int bm = FL_LCE_BM;
  int bn = FL_LCE_BN;
  int bk = FL_LCE_BK;
  int wm = FL_LCE_WM;
  int wn = FL_LCE_WN;
  int threads() const { return wm * wn * 32; }
  // The kernel name suffix, as metal/linear_cross_entropy.metal spells it.
  std::string name() const;
};
LceTile lce_forward_tile(char device_class, KDtype hidden, const std::string& head, int64_t rows,
                         int vocab, int hidden_size);
// Every tile lce_forward_tile can choose for (hidden, head), in the metallib's order.
std::vector<LceTile> lce_forward_tiles(KDtype hidden, const std::string& head);

struct LcePlan {
  LceTile fwd; // the forward and dZ kernels' tile (row_blocks, vocab_tiles, splits use it)
  int64_t rows = 0; // N
  int vocab = 0; // V
  int hidden = 0; // H
  int64_t row_blocks = 0; // ceil(N / BM)
  int64_t vocab_tiles = 0; // ceil(V / BN)
  int splits = 1; // S
  int vocab_per_split = 0; // a multiple of BN
  int64_t chunk_rows = 1; // R
  int64_t forward_rows = 1; // rows of one forward tile launch (a multiple of BM, or N)
  int64_t max_buffer_flops = kLceMaxBufferFlops; // the bound lce_schedule keeps
};
LcePlan lce_plan(int64_t rows, int vocab, int hidden, int64_t chunk_bytes,
                 int64_t max_buffer_flops = kLceMaxBufferFlops, LceTile fwd = LceTile());
// The head name of a dense weight of dtype dt: "w" + dtype name.
std::string lce_dense_head(KDtype weight);
// The head name of a quantized weight (metal/quantized_head.h), mode one of
// flm::kQuant* (math/quantized.h): affine: "q" + bits + "_" + the scales' dtype
// name, e.g. q3_bfloat16, bits 1-6 or 8; the floating-point modes: "mxfp4",
// "mxfp8", "nvfp4" (uint8 scales; `scales` is not read), "nvfp4_global"
// with a global scale. The op checks mode and bits; anything else here is a
// bug and throws. The group size is a runtime argument (LceArgs::group_size).
std::string lce_quantized_head(int mode, int bits, KDtype scales, bool global_scale = false);
// The forward tiles of rows [row0, row0 + launch_rows) (LceArgs::row0 = row0, a
// multiple of BM); launch_rows < 0: all N rows in one launch.
LaunchPlan lce_forward_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                            int max_group_threads = kMaxGroupThreads, int64_t launch_rows = -1);
LaunchPlan lce_finish_plan(const LcePlan& p, int max_group_threads = kMaxGroupThreads);
// The backward kernels of one chunk of `chunk_rows` rows.
LaunchPlan lce_dz_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                       int64_t chunk_rows, int max_group_threads = kMaxGroupThreads);
// Row statistics (ops/row_stats.h) on the same plan: lce_forward_plan's tiles,
// then this finish (one thread per row); the backward's dZ of one chunk, then
// lce_dbias_plan, lce_dh_plan, lce_dw_plan (the schedule: lce_schedule).
LaunchPlan rs_finish_plan(const LcePlan& p, int max_group_threads = kMaxGroupThreads);
LaunchPlan rs_dz_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                      int64_t chunk_rows, int max_group_threads = kMaxGroupThreads);
LaunchPlan lce_dh_plan(const std::string& head, const LcePlan& p, int64_t chunk_rows,
                       int max_group_threads = kMaxGroupThreads);
LaunchPlan lce_dw_plan(KDtype hidden, const LcePlan& p, int max_group_threads = kMaxGroupThreads);
LaunchPlan lce_dbias_plan(const LcePlan& p, int max_group_threads = kMaxGroupThreads);
// The stored-Z path's row kernel (fl_lce_rows) over one chunk of `chunk_rows`
// rows: one group per row of min(FL_LCE_ROW_THREADS, ceil(V / FL_ROW_READS)
// rounded up to 32, the usable pipeline limit) threads. (Its logits GEMM is
// lce_dz_plan's kernel with LceArgs::logits_only.)
LaunchPlan lce_rows_plan(const LcePlan& p, int64_t chunk_rows,
                         int max_group_threads = kMaxGroupThreads);
LaunchPlan lce_scale_plan(KDtype out, uint64_t n, int max_group_threads = kMaxGroupThreads);
// The launches of one linear CE call in order, and the command buffer each goes
// in. A forward: the tile launches of forward_rows rows, the finish (per row),
// the sum of the per-row losses (sum_rows). Then, when gradients are asked for,
// the backward: per chunk of R rows, dZ, then dbias, dH, dW (those asked for);
// N = 0 still has one empty chunk (dW and dbias are written, zeros).
// A forward that also forms gradients (the fused gradients of
// ops/linear_cross_entropy.h: unit cotangent) takes the stored-Z path instead:
// per chunk of R rows, logits (lce_dz_plan's kernel with
// LceArgs::logits_only: the chunk's logits into the dZ buffer), rows
// (lce_rows_plan: the forward's per-row outputs and dZ in place), then dbias,
// dH, dW (those asked for); the sum of the per-row losses last (sum_rows). Its
// step is 6 N V H FLOPs instead of 8 (no forward tiles, no Z recomputed).
// Segments: launches go into the current command buffer (segment 0 is the one
// eval_gpu starts in) until the next launch would take its work past
// p.max_buffer_flops; then the buffer is committed and a new segment starts.
// A segment's work is thus at most the bound, or it is one launch.
enum class LceKernel : int { forward = 0, finish, sum, dz, dbias, dh, dw, logits, rows };
struct LceLaunch {
  LceKernel kernel = LceKernel::forward;
  int64_t row0 = 0; // first row (forward launch or backward chunk)
  int64_t rows = 0; // rows of the forward launch or of the chunk
  int64_t flops = 0; // lce_launch_flops
  int segment = 0;
};
struct LceWork {
  bool forward = false;
  bool sum_rows = false;
  bool dh = false;
  bool dw = false;
  bool dbias = false;
};
// Work of a launch over `rows` rows: 2 rows V H per GEMM (forward tiles, dZ,
// logits, dH, dW; a quantized head's dequantization is not counted), rows V for
// dbias and for the stored-Z path's row kernel (and added to each GEMM's count
// for its epilogue), rows S for the finish, N for the sum.
int64_t lce_launch_flops(const LcePlan& p, LceKernel k, int64_t rows);
std::vector<LceLaunch> lce_schedule(const LcePlan& p, const LceWork& w);

// smoothing_mode: flm::kSmoothUniform | flm::kSmoothOthers; softcap 0: none.
LceArgs make_lce_args(const LcePlan& p, float label_smoothing, int smoothing_mode,
                      bool has_ignore_index, int64_t ignore_index, float z_loss, float softcap,
                      bool has_bias);

// The row statistics' arguments (ops/row_stats.h): the linear CE's without
// smoothing or z-loss, plus the temperature (applied after the cap; 1: none),
// the shard (vocab_start) and whether there are targets.
LceArgs make_rs_args(const LcePlan& p, bool has_ignore_index, int64_t ignore_index, float softcap,
                     bool has_bias, float temperature, bool sharded, int64_t vocab_start, bool has_targets);

// ---- fused linear distillation ------------------------------------------------------
// linear_distillation_loss (a student and a teacher head) and
// linear_topk_distillation_loss (a student head, an offline top-k teacher) on the
// linear CE's tiles (metal/linear_distillation.metal). Per chunk of R rows: each
// head's logits into a float32 chunk buffer [R, V] (ld_logits_plan, in the head's
// forward tile, lce_forward_tile), then the rows on the chunk (two heads: the
// logits form's kd_forward_plan / kd_backward_plan on float32 rows; top-k:
// ltk_forward_plan / ltk_backward_plan), the backward's dZ over the student's
// logits in place, then lce_dh_plan / lce_dw_plan on the student's plan.
// Rules of ld_plan:
//  - each head's LcePlan is lce_plan(N, V, its H, chunk_bytes / heads, ...) with
//    heads = 2 with a teacher head, else 1: its chunk rows are
//    clamp(chunk_bytes / (4 V heads), 1, N) (the CPU's chunked-head rule: both
//    heads' chunks within chunk_bytes), at most F of that head, rounded down to a
//    multiple of BM when > BM;
//  - R = the smaller of the heads' chunk rows (a multiple of BM, or <= BM).
// The top-k rows: one group per row of min(T, ceil(V / R) rounded up to 32)
// threads (kd_forward_plan's rule), FL_ROW_SCRATCH_FLOATS of threadgroup memory,
// forward and backward alike (the backward's pairs follow a barrier).
struct LdPlan {
  LcePlan student; // V, the student's H and forward tile; chunk_rows = R
  LcePlan teacher; // the teacher head's (has_teacher), chunk_rows = R
  bool has_teacher = false;
  int64_t rows = 0; // N
  int64_t chunk_rows = 1; // R
};
// teacher_hidden < 0: no teacher head (top-k).
LdPlan ld_plan(int64_t rows, int vocab, int student_hidden, int teacher_hidden, int64_t chunk_bytes,
               int64_t max_buffer_flops = kLceMaxBufferFlops, LceTile student_tile = LceTile(),
               LceTile teacher_tile = LceTile());
// Z of `chunk_rows` rows through a head (plan: that head's LcePlan).
LaunchPlan ld_logits_plan(KDtype hidden, const std::string& head, const LcePlan& p,
                          int64_t chunk_rows, int max_group_threads = kMaxGroupThreads);
LaunchPlan ltk_forward_plan(int64_t rows, int vocab, int max_group_threads = kMaxGroupThreads);
LaunchPlan ltk_backward_plan(int64_t rows, int vocab, int max_group_threads = kMaxGroupThreads);
// The launches of one call in order, per chunk of R rows (N = 0: one empty
// chunk, so a dW asked for is written, zeros): the student's logits, the
// teacher's (has_teacher), the forward rows (w.forward), the backward rows
// (w.backward: dZ in place, from the saved statistics; after the forward rows:
// the gradients in the forward, a unit cotangent), dH, dW (those asked for);
// then (w.sum_rows) the sum of the per-row losses (pw_sum_finish_plan).
// Segments as lce_schedule's: a command buffer holds at most max_buffer_flops
// of lce_launch_flops' counts (each GEMM: 2 rows V H + rows V), unless one
// launch is more.
enum class LdKernel : int { logits = 0, teacher_logits, rows_forward, rows_backward, dh, dw, sum };
struct LdLaunch {
  LdKernel kernel = LdKernel::logits;
  int64_t row0 = 0; // the chunk's first row
  int64_t rows = 0; // its rows
  int64_t flops = 0;
  int segment = 0;
};
struct LdWork {
  bool forward = false;
  bool sum_rows = false;
  bool backward = false;
  bool dh = false;
  bool dw = false;
};
std::vector<LdLaunch> ld_schedule(const LdPlan& p, const LdWork& w);
// A head's LceArgs (its H, V, quantization; no CE options).
LceArgs make_ld_head_args(const LcePlan& p, int bits, int group_size);
// The top-k rows' arguments (the logits form's, make_kd_args, and the pairs).
LtkArgs make_ltk_args(int vocab, int topk, bool renormalize, bool has_targets, bool has_ignore_index,
                      int64_t ignore_index, float c, float d_scale, float alpha);

// ---- every kernel the host can ask for ------------------------------------------------
// The kernel names of every launch plan eval_gpu can build, found by calling
// the plan functions above over the whole option space: every loss, dtype and
// option (soft/hard targets, class weights, block/looped rows at every usable
// pipeline limit, reductions, gamma = 2, plain/broadcast targets, 16-bit
// cotangents), and for the linear CE every hidden dtype x head (dense weight of
// every dtype; quantized: every mode, bits and scale dtype lce_quantized_head
// names) with its finish, backward and scale kernels. Each entry: the kernel
// name and the plan call that asked for it (for messages). _ext exports it
// (launch_plan_kernels) on every platform; the tests check each name against
// those metal/*.metal defines, and python -m mlx_fused_losses.check_gpu
// against the loaded metallib.
struct PlanKernel {
  std::string kernel;
  std::string plan;
};
std::vector<PlanKernel> enumerate_plan_kernels();

} // namespace fl::mplan
