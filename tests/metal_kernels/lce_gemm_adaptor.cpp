// Harness adaptor for tests/metal_kernels/lce_gemm_tile.metal (metal/lce_gemm.h
// on MLX's steel headers), used by tests/test_metal_lce_gemm.py. The kernel comes
// from the harness's table by its name; the name says the tile shape.
#include <cstdio>
#include <string>

#include "metal_host.h"
#include "mh_kernels.h"

namespace {

template <class F>
void with_dtype(int code, F&& f) {
  switch (code) {
    case 0: f.template operator()<float>(); break;
    case 1: f.template operator()<metal::half>(); break;
    default: f.template operator()<metal::bfloat>(); break;
  }
}

}  // namespace

// C (float32 [M, N]) = op(A) op(B) (+ C when accumulate) with the kernel `name`.
extern "C" int gemm_tile_run(const char* name, int adt, int bdt, const void* a, const void* b,
                             float* c, int m, int n, int k, int accumulate) {
  return mh::guarded([&] {
    int bm = 0, bn = 0, bk = 0, wm = 0, wn = 0;
    const std::string s(name);
    const auto at = s.find("_bm");
    if (at == std::string::npos ||
        std::sscanf(s.c_str() + at, "_bm%d_bn%d_bk%d_wm%d_wn%d", &bm, &bn, &bk, &wm, &wn) != 5)
      throw mh::Error("gemm_tile_run: no tile shape in '" + s + "'");
    const metal::int4 shape = {m, n, k, accumulate};
    with_dtype(adt, [&]<class TA>() {
      with_dtype(bdt, [&]<class TB>() {
        if constexpr (std::is_same_v<TA, TB> || std::is_same_v<TA, float>) {
          auto* fn = mh::kernel<decltype(gemm_tile_test<TA, TB, 64, 64, 16, 2, 2, false, true>)>(s);
          mh::dispatch_threadgroups(
              {uint32_t((n + bn - 1) / bn), uint32_t((m + bm - 1) / bm)},
              {uint32_t(32 * wm * wn)}, {}, [&](const mh::ThreadCtx& t) {
                fn(static_cast<const TA*>(a), static_cast<const TB*>(b), c, shape,
                   t.threadgroup_position_in_grid.xy, t.thread_index_in_simdgroup,
                   t.simdgroup_index_in_threadgroup);
              });
        } else {
          throw mh::Error("gemm_tile_run: no kernel for this dtype pair");
        }
      });
    });
  });
}
