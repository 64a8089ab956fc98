// Harness adaptor for tests/metal_kernels/quantized_head_tile.metal (the tile
// stager of metal/quantized_head.h), used by tests/test_metal_quantized_head.py.
//
// `fence` != 0 copies w_q, scales and biases against an inaccessible page right
// after their last byte (fence 1) or before their first (fence 2): fenced.h.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "fenced.h"
#include "metal_host.h"
#include "mh_kernels.h"

namespace {

struct QhBufs {
  const uint32_t* w_q;
  const void* scales;
  const void* biases;
  void* out;
  const metal::int4* shape;
};

// The dtype code of a dtype name as the kernel names spell it.
int dtype_code(const std::string& d) {
  if (d == "float32") return 0;
  if (d == "float16") return 1;
  if (d == "bfloat16") return 2;
  throw mh::Error("unknown dtype '" + d + "' in a tile kernel name");
}

template <class F>
void with_dtype(int code, F&& f) {
  switch (code) {
    case 0: f.template operator()<float>(); break;
    case 1: f.template operator()<metal::half>(); break;
    default: f.template operator()<metal::bfloat>(); break;
  }
}

// What a kernel name says (QH_INST in quantized_head_tile.metal):
// qh_tile_<head>_<tile dtype>_<R>x<C>, the head q<bits>_<scale dtype> (affine)
// or mxfp4 / mxfp8 / nvfp4 / nvfp4_global. The kernel itself comes from the harness's table
// (mh_kernels.h, generated from the .metal source), by that name.
struct TileName {
  int fp_mode = -1; // flm::kQuant* of a floating-point head, else -1 (affine)
  int scale_dtype = 0, tile_dtype = 0, bits = 0, rows = 0, cols = 0;
  bool global_scale = false; // nvfp4_global: `biases` is the float32 global scale
};

TileName parse(const std::string& name) {
  TileName n;
  char s[16], t[16];
  if (std::sscanf(name.c_str(), "qh_tile_q%d_%15[a-z0-9]_%15[a-z0-9]_%dx%d", &n.bits, s, t, &n.rows,
                  &n.cols) == 5) {
    n.scale_dtype = dtype_code(s);
    n.tile_dtype = dtype_code(t);
    return n;
  }
  char mode[8];
  std::string rest = name;
  const std::string global = "qh_tile_nvfp4_global_";
  if (rest.rfind(global, 0) == 0) {
    n.global_scale = true;
    rest = "qh_tile_nvfp4_" + rest.substr(global.size());
  }
  if (std::sscanf(rest.c_str(), "qh_tile_%5[a-z0-9]_%15[a-z0-9]_%dx%d", mode, t, &n.rows,
                  &n.cols) == 4) {
    const std::string m(mode);
    n.fp_mode = m == "mxfp4" ? flm::kQuantMxfp4 : m == "mxfp8" ? flm::kQuantMxfp8
              : m == "nvfp4" ? flm::kQuantNvfp4 : -1;
    n.bits = m == "mxfp8" ? 8 : 4;
    n.tile_dtype = dtype_code(t);
    if (n.fp_mode >= 0) return n;
  }
  throw mh::Error("not a tile kernel name: " + name);
}

// f.template operator()<Head>() for a head of the name's scale type: the
// function type of a tile kernel depends on the head's scale type and the tile
// type only (bits, mode, R and C are in the name).
template <class F>
void with_head_type(const TileName& n, F&& f) {
  if (n.fp_mode >= 0) {
    f.template operator()<flk::Mxfp4Head>();
    return;
  }
  with_dtype(n.scale_dtype, [&]<class S>() { f.template operator()<flk::QuantizedHead4<S>>(); });
}

} // namespace

extern "C" {

// out: [ceil(V / R) * R, ceil(H / C) * C] in the tile type. scale_bytes: the
// size of one scale (4, 2, or 1: the uint8 codes of the floating-point modes,
// whose heads have no biases: `biases` is then not fenced, and never read,
// except by nvfp4_global, where it is the float32 global scale);
// fence as above (0: the arrays in place).
int qh_tile_run(const uint8_t* name, const uint32_t* w_q, const void* scales, const void* biases,
                void* out, int vocab, int hidden, int group_size, int transposed, int threads,
                int scale_bytes, int fence) {
  return mh::guarded([&] {
    const std::string kname(reinterpret_cast<const char*>(name));
    const TileName e = parse(kname);
    const size_t words = size_t(vocab) * size_t(hidden) * size_t(e.bits) / 32;
    const size_t groups = size_t(vocab) * size_t(hidden / group_size);
    metal::int4 shape = {vocab, hidden, group_size, transposed};
    QhBufs b{w_q, scales, biases, out, &shape};
    std::unique_ptr<mkp::Fenced> fw, fs, fb;
    if (fence != 0) {
      fw = std::make_unique<mkp::Fenced>(w_q, words * 4, fence);
      fs = std::make_unique<mkp::Fenced>(scales, groups * size_t(scale_bytes), fence);
      b.w_q = static_cast<const uint32_t*>(fw->data());
      b.scales = fs->data();
      if (e.global_scale) {
        fb = std::make_unique<mkp::Fenced>(biases, sizeof(float), fence);
        b.biases = fb->data();
      } else if (scale_bytes == 1) {
        b.biases = b.scales;
      } else {
        fb = std::make_unique<mkp::Fenced>(biases, groups * size_t(scale_bytes), fence);
        b.biases = fb->data();
      }
    }
    const uint32_t gx = uint32_t((hidden + e.cols - 1) / e.cols);
    const uint32_t gy = uint32_t((vocab + e.rows - 1) / e.rows);
    with_head_type(e, [&]<class Head>() {
      with_dtype(e.tile_dtype, [&]<class TT>() {
        using S = typename Head::scale_t;
        auto* fn = mh::kernel<decltype(qh_stage_tile<Head, TT, 32, 32>)>(kname);
        const size_t tg = (size_t(e.rows * e.cols) * sizeof(TT) + 15) / 16 * 16;
        mh::dispatch_threadgroups({gx, gy, 1}, {uint32_t(threads), 1, 1}, {tg},
                                  [&](const mh::ThreadCtx& t) {
          fn(b.w_q, static_cast<const S*>(b.scales), static_cast<const S*>(b.biases),
             static_cast<TT*>(b.out), *b.shape, t.threadgroup_memory<TT>(0),
             t.threadgroup_position_in_grid.xy, t.threadgroups_per_grid.xy,
             t.thread_index_in_threadgroup, t.threads_per_threadgroup.xy);
        });
      });
    });
  });
}

} // extern "C"
