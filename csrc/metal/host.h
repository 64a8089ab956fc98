// Host-side helpers of the eval_gpu implementations (csrc/metal/*.cpp, built
// only under _METAL_): finding our metallib, building pipelines, binding
// arrays, and dispatching a fl::mplan::LaunchPlan.
#pragma once

#include <dlfcn.h>

#include <filesystem>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "metal/launch_plan.h"
#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/metal/device.h"
#include "ops/common.h"

namespace fl::gpu {

namespace mx = mlx::core;

// The directory of this binary (_ext): mlx_fused_losses.metallib is installed
// beside it (CMakeLists.txt).
inline std::string binary_dir() {
  static const std::string dir = [] {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&binary_dir), &info) || info.dli_fname == nullptr) {
      throw std::runtime_error("mlx_fused_losses: cannot locate its own binary (dladdr failed)");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

// Our metallib on device d (MLX loads it once and caches it by name).
inline MTL::Library* library(mx::metal::Device& d) {
  return d.get_library("mlx_fused_losses", binary_dir());
}

// ... on the default GPU: the metallib the first eval_gpu would load
// (library_names.cpp lists its functions for check_gpu).
inline MTL::Library* default_library() {
  return library(mx::metal::device(mx::Device::gpu));
}

// MLX's device class of the stream's GPU: the last letter of its architecture name
// (MLX's device.cpp: 'p' phone, 'g' base and Pro, 's' Max, 'd' Ultra), which MLX's
// matmul.cpp keys its GEMM tiles on; 's' if the name is empty.
inline char device_class(const mx::Stream& s) {
  const std::string& arch = mx::metal::device(s.device).get_architecture();
  return arch.empty() ? 's' : arch.back();
}

inline MTL::ComputePipelineState* pipeline(mx::metal::Device& d, const std::string& name) {
  return d.get_kernel(name, library(d));
}

inline mplan::KDtype kernel_dtype(mx::Dtype dt) {
  if (dt == mx::float32) {
    return mplan::KDtype::float32;
  }
  if (dt == mx::float16) {
    return mplan::KDtype::float16;
  }
  if (dt == mx::bfloat16) {
    return mplan::KDtype::bfloat16;
  }
  throw std::runtime_error("mlx_fused_losses: no Metal kernel for this dtype");
}

// The ops hand the primitives row-contiguous inputs (fl::dense); the kernels
// index them as such, so anything else is a bug to report, not to compute on.
inline void require_dense(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous) {
    throw std::runtime_error(std::string("mlx_fused_losses: Metal kernel input '") + what +
                             "' is not row-contiguous");
  }
}

inline void alloc(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
}

// The gradient in place: `out` takes over `in`'s buffer under MLX's donation
// rule, as MLX's own Metal element-wise ops do, else a fresh buffer. Our
// backward kernels read element i of `in` only in the thread that writes
// element i of `out` (and before it writes it), so sharing is safe.
inline void alloc_or_reuse(mx::array& out, const mx::array& in) {
  if (can_take_over(in, out)) {
    out.copy_shared_buffer(in);
  } else {
    alloc(out);
  }
}

// A plan whose group fits the pipeline: every plan takes the pipeline's
// maxTotalThreadsPerThreadgroup (which depends on the device and on the
// kernel's register use, so it is only known once the pipeline exists), and
// the plan for the real limit can name another kernel (block -> looped), whose
// pipeline then has its own limit. `make(limit)` builds the plan.
template <class MakePlan>
mplan::LaunchPlan fit_plan(mx::metal::Device& d, MakePlan make, MTL::ComputePipelineState** kernel) {
  mplan::LaunchPlan p = make(mplan::kMaxGroupThreads);
  for (int attempt = 0; attempt < 3; ++attempt) {
    *kernel = pipeline(d, p.kernel_name);
    int limit = int((*kernel)->maxTotalThreadsPerThreadgroup());
    if (int(p.group[0] * p.group[1] * p.group[2]) <= limit) {
      return p;
    }
    p = make(limit);
  }
  throw std::runtime_error("mlx_fused_losses: no launch plan fits the pipeline's thread limit");
}

inline void dispatch(mx::metal::CommandEncoder& enc, const mplan::LaunchPlan& p) {
  if (p.threadgroup_bytes > 0) {
    enc.set_threadgroup_memory_length(p.threadgroup_bytes, 0);
  }
  enc.dispatch_threadgroups(MTL::Size(p.grid[0], p.grid[1], p.grid[2]),
                            MTL::Size(p.group[0], p.group[1], p.group[2]));
}

// One kernel launch of an eval_gpu: the plan fitted to its pipeline and, when
// there is work, the stream's encoder with that pipeline set. False (no
// encoder) for an empty plan: nothing to bind or dispatch.
struct Launch {
  mplan::LaunchPlan plan;
  mx::metal::CommandEncoder* enc = nullptr;

  explicit operator bool() const {
    return enc != nullptr;
  }
  mx::metal::CommandEncoder& encoder() const {
    if (enc == nullptr) {
      throw std::logic_error("mlx_fused_losses: a launch with an empty plan has no encoder");
    }
    return *enc;
  }
  void dispatch() const {
    gpu::dispatch(*enc, plan);
  }
};

// The prologue every dispatch of every eval_gpu shares: device, fit_plan, stop
// on an empty plan, encoder, pipeline. The encoder is fetched here, at each
// launch, never kept across launches: a call split across command buffers
// (CommandBuffers below) gets the stream's current one after each commit.
template <class MakePlan>
Launch launch(mx::Stream s, MakePlan make) {
  Launch l;
  MTL::ComputePipelineState* kernel = nullptr;
  l.plan = fit_plan(mx::metal::device(s.device), make, &kernel);
  if (l.plan.empty()) {
    return l;
  }
  l.enc = &mx::metal::get_command_encoder(s);
  l.enc->set_compute_pipeline_state(kernel);
  return l;
}

// One eval_gpu's work split across command buffers (MLX itself commits only
// between primitives: mlx/backend/metal/eval.cpp, gpu::eval). The caller
// launches in order and calls commit() at each segment boundary of its plan,
// then finish() after its last launch.
//  - commit(): CommandEncoder::end_encoding() then commit(), as gpu::eval does.
//    Reads in the next buffer wait for this one's writes through the fences
//    MLX's encoder keeps for every array bound with set_input_array /
//    set_output_array, except temporaries (end_encoding drops them from that
//    bookkeeping), so scratch arrays that cross segments must not be
//    add_temporary'd: keep() them instead. Each buffer of the call ends with
//    end_encoding(wait_in_flight = true), which makes its encoder wait for the
//    fences of every earlier encoder whose outputs are still in flight: the
//    output rows an earlier buffer wrote (dH) are complete when the last
//    buffer, the one MLX signals the outputs' readiness from, is.
//  - keep(a): every committed buffer's completion handler, and the last
//    buffer's, hold the kept arrays (inputs, outputs, scratch), so nothing a
//    buffer reads or writes is freed or reused before it has run.
//  - finish(pad): MLX 0.32.4's gpu::eval keeps the command buffer that was
//    current when eval_gpu started and, unless needs_commit() is true when
//    eval_gpu returns, adds its completion handler to that buffer, which after
//    a commit here is committed already (Metal rejects that). So after a
//    commit, finish pads the last buffer with empty launches (pad()) until
//    needs_commit() holds (more launches than the device's max ops per
//    buffer, 20-50); gpu::eval then commits it. Where MLX_MAX_OPS_PER_BUFFER
//    is set to kMaxPadLaunches or more (padding would cost more than it
//    saves), commit() does nothing and the call stays in one buffer.
// Every launch fetches the encoder anew (launch() above), never across a commit.
class CommandBuffers {
 public:
  static constexpr int kMaxPadLaunches = 256;

  explicit CommandBuffers(mx::Stream s) : s_(s) {
    auto [max_ops, max_mb] = mx::metal::device(s.device).get_max_ops_mb_per_buffer();
    (void)max_mb;
    split_ = max_ops < kMaxPadLaunches;
  }

  void keep(const mx::array& a) {
    if (a.data_shared_ptr()) {
      kept_.push_back(a.data_shared_ptr()); // the buffer, not the graph (as gpu::eval)
    }
  }
  void commit() {
    if (!split_) {
      return;
    }
    auto& enc = mx::metal::get_command_encoder(s_);
    enc.end_encoding(/* wait_in_flight */ true);
    enc.commit([kept = kept_]() {});
    committed_ = true;
  }
  void finish(const std::function<void()>& pad) {
    auto& enc = mx::metal::get_command_encoder(s_);
    enc.get_command_buffer()->addCompletedHandler([kept = kept_](MTL::CommandBuffer*) {});
    if (!committed_) {
      return;
    }
    for (int i = 0; i <= kMaxPadLaunches && !enc.needs_commit(); ++i) {
      pad();
    }
    if (!enc.needs_commit()) {
      throw std::runtime_error("mlx_fused_losses: the last command buffer cannot be handed to MLX");
    }
    enc.end_encoding(/* wait_in_flight */ true); // gpu::eval's own end_encoding is then a no-op
  }

 private:
  mx::Stream s_;
  std::vector<std::shared_ptr<mx::array::Data>> kept_;
  bool split_ = true;
  bool committed_ = false;
};

} // namespace fl::gpu
