// What the harness adaptors of tests/metal_kernels/ share: running a launch plan
// (csrc/metal/launch_plan.cpp) under the harness and the dtype codes the Python
// tests pass. The kernel a plan names comes from mh::kernel (mh_kernels.h: the
// table build.py derives from the .metal sources). Included by adaptor.cpp
// and lce_adaptor.cpp after the .metal sources.
#pragma once

#include <string>
#include <vector>

#include "metal_host.h"
#include "mh_kernels.h"

#include "metal/launch_plan.cpp"
#include "metal/launch_plan.h"

namespace mkp {

// dispatchThreadgroups of the plan (nothing for an empty plan).
inline void run_plan(const fl::mplan::LaunchPlan& p, const mh::Kernel& body) {
  if (p.empty()) {
    return;
  }
  std::vector<std::size_t> tg;
  if (p.threadgroup_bytes > 0) {
    tg.push_back(p.threadgroup_bytes);
  }
  mh::dispatch_threadgroups({p.grid[0], p.grid[1], p.grid[2]},
                            {p.group[0], p.group[1], p.group[2]}, tg, body);
}

inline fl::mplan::KDtype to_dtype(int dt) {
  if (dt < 0 || dt > 2) {
    throw mh::Error("dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16)");
  }
  return fl::mplan::KDtype(dt);
}

// f.template operator()<T>() for the element type of dtype code dt.
template <class F>
void with_dtype(fl::mplan::KDtype dt, F&& f) {
  switch (dt) {
    case fl::mplan::KDtype::float32: f.template operator()<float>(); break;
    case fl::mplan::KDtype::float16: f.template operator()<metal::half>(); break;
    case fl::mplan::KDtype::bfloat16: f.template operator()<metal::bfloat>(); break;
  }
}

} // namespace mkp
