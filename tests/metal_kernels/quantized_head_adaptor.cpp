// Harness adaptor for tests/metal_kernels/quantized_head_tile.metal (the tile
// stager of metal/quantized_head.h), used by tests/test_metal_quantized_head.py.
//
// `fence` != 0 copies w_q, scales and biases against an inaccessible page right
// after their last byte (fence 1) or before their first (fence 2): fenced.h.
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "fenced.h"
#include "metal_host.h"

namespace {

struct QhBufs {
  const uint32_t* w_q;
  const void* scales;
  const void* biases;
  void* out;
  const metal::int4* shape;
};

using QhFn = void (*)(const QhBufs&, const mh::ThreadCtx&);

template <class Head, class TT, int R, int C>
void qh_call(const QhBufs& b, const mh::ThreadCtx& t) {
  using S = typename Head::scale_t;
  qh_stage_tile<Head, TT, R, C>(
      b.w_q, static_cast<const S*>(b.scales), static_cast<const S*>(b.biases),
      static_cast<TT*>(b.out), *b.shape, t.threadgroup_memory<TT>(0),
      t.threadgroup_position_in_grid.xy, t.threadgroups_per_grid.xy, t.thread_index_in_threadgroup,
      t.threads_per_threadgroup.xy);
}

struct Entry {
  QhFn fn;
  int rows, cols, tile_elem_bytes;
  int bits; // of the packed words
  bool global_scale; // nvfp4_global: `biases` is the float32 global scale
};

struct Registry {
  std::map<std::string, Entry> fns;
  template <class Head, class TT>
  void add_tiles(const std::string& stem, int bits, bool global = false) {
    fns[stem + "_32x32"] = {qh_call<Head, TT, 32, 32>, 32, 32, int(sizeof(TT)), bits, global};
    fns[stem + "_8x16"] = {qh_call<Head, TT, 8, 16>, 8, 16, int(sizeof(TT)), bits, global};
    fns[stem + "_16x64"] = {qh_call<Head, TT, 16, 64>, 16, 64, int(sizeof(TT)), bits, global};
  }
  template <class S, class TT>
  void add(const std::string& sname, const std::string& tname) {
    auto stem = [&](int bits) { return "qh_tile_q" + std::to_string(bits) + "_" + sname + "_" + tname; };
    add_tiles<flk::QuantizedHead1<S>, TT>(stem(1), 1);
    add_tiles<flk::QuantizedHead2<S>, TT>(stem(2), 2);
    add_tiles<flk::QuantizedHead3<S>, TT>(stem(3), 3);
    add_tiles<flk::QuantizedHead4<S>, TT>(stem(4), 4);
    add_tiles<flk::QuantizedHead5<S>, TT>(stem(5), 5);
    add_tiles<flk::QuantizedHead6<S>, TT>(stem(6), 6);
    add_tiles<flk::QuantizedHead8<S>, TT>(stem(8), 8);
  }
  template <class TT>
  void add_fp(const std::string& tname) {
    add_tiles<flk::Mxfp4Head, TT>("qh_tile_mxfp4_" + tname, 4);
    add_tiles<flk::Mxfp8Head, TT>("qh_tile_mxfp8_" + tname, 8);
    add_tiles<flk::Nvfp4Head, TT>("qh_tile_nvfp4_" + tname, 4);
    add_tiles<flk::Nvfp4GlobalHead, TT>("qh_tile_nvfp4_global_" + tname, 4, true);
  }
  Registry() {
    add<float, float>("float32", "float32");
    add<metal::half, metal::half>("float16", "float16");
    add<metal::bfloat, metal::bfloat>("bfloat16", "bfloat16");
    add<metal::half, float>("float16", "float32");
    add<metal::bfloat, float>("bfloat16", "float32");
    add<float, metal::half>("float32", "float16");
    add<float, metal::bfloat>("float32", "bfloat16");
    add_fp<float>("float32");
    add_fp<metal::half>("float16");
    add_fp<metal::bfloat>("bfloat16");
  }
};

const Registry& registry() {
  static const Registry r;
  return r;
}

} // namespace

extern "C" {

int qh_registry_names(uint8_t* out, uint32_t cap) {
  return mh::guarded([&] {
    std::string s;
    for (auto& [k, v] : registry().fns) s += k + "\n";
    if (s.size() + 1 > cap) throw mh::Error("qh_registry_names: buffer too small");
    std::memcpy(out, s.c_str(), s.size() + 1);
  });
}

// out: [ceil(V / R) * R, ceil(H / C) * C] in the tile type. scale_bytes: the
// size of one scale (4, 2, or 1: the uint8 codes of the floating-point modes,
// whose heads have no biases: `biases` is then not fenced, and never read,
// except by nvfp4_global, where it is the float32 global scale);
// fence as above (0: the arrays in place).
int qh_tile_run(const uint8_t* name, const uint32_t* w_q, const void* scales, const void* biases,
                void* out, int vocab, int hidden, int group_size, int transposed, int threads,
                int scale_bytes, int fence) {
  return mh::guarded([&] {
    auto it = registry().fns.find(reinterpret_cast<const char*>(name));
    if (it == registry().fns.end()) throw mh::Error("no such tile kernel");
    const Entry& e = it->second;
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
    const size_t tg = (size_t(e.rows * e.cols * e.tile_elem_bytes) + 15) / 16 * 16;
    mh::dispatch_threadgroups({gx, gy, 1}, {uint32_t(threads), 1, 1}, {tg},
                              [&](const mh::ThreadCtx& t) { e.fn(b, t); });
  });
}

} // extern "C"
