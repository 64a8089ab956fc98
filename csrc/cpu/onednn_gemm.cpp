// The 16-bit GEMMs of cpu/blas.h: oneDNN's matmul primitive (its public C
// API), loaded at run time where the CPU has the units for it.
//
// Why oneDNN, and why loaded rather than linked: the float32 path widens 16-bit
// heads to float32 for OpenBLAS's sgemm, which on a CPU with AMX-BF16 runs
// ~4x below the bf16 tile units (one 508 x 4000 x 1024 tile: ~570 GFLOP/s per
// core on AMX, ~140 for float32 FMAs). scipy-openblas32 is built without
// OpenBLAS's bf16 routines (no sbgemm_ exported); MKL's cblas_gemm_bf16bf16f32
// comes in a 690 MB proprietary wheel. oneDNN is Apache-2.0 and its
// `onednn-cpu-gomp` wheel is 39 MB with no dependencies but the system's
// libgomp. Most users have no such CPU, so the library is an optional extra:
// nothing is linked, nothing fails where it is absent.
//
// The matmul primitive, not dnnl_gemm_bf16bf16f32: that function is exported
// but declared only in oneDNN's test headers (no API promise), and it has no
// float16 form. The matmul C API (oneDNN 3.x: opaque memory descriptors) is
// declared below with the few types it needs; enum values are oneDNN's
// (dnnl_common_types.h / dnnl_types.h, unchanged across 3.x).
//
// Operand types: bf16 x bf16 where the CPU has AVX512-BF16 or AMX-BF16
// (oneDNN's brgemm kernels on AMX tiles or vdpbf16ps), f16 x f16 where it has
// AVX512-FP16 or AMX-FP16 (converted in registers, float32 FMAs: the speed of
// sgemm without widening copies); accumulation and output float32 in both.
// Mixed f32 x bf16 operands are not implemented by oneDNN 3.2 (status 3).
//
// Threads: the chunked-head driver cuts its GEMMs into fixed tiles on our own
// pool (results independent of the thread count), so each call must run on
// the calling thread alone. oneDNN's OpenMP build asks omp_get_max_threads(),
// a per-thread setting: each calling thread sets it to 1 once. Each thread
// has its own oneDNN stream and scratchpad (user scratchpad mode: the
// library's shared scratchpad is not meant for concurrent calls).
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/blas.h"
#include "cpu/convert.h"

#if defined(__x86_64__) && defined(__linux__)
#define FL_ONEDNN_GEMM_SUPPORTED 1
#include <cpuid.h>
#include <dlfcn.h>
#else
#define FL_ONEDNN_GEMM_SUPPORTED 0
#endif

namespace fl::cpu {

namespace {

// ---- the oneDNN 3.x C API subset (all handles are opaque pointers) ----------
using dnnl_status = int; // dnnl_status_t, dnnl_success = 0
constexpr int kDnnlCpu = 1; // dnnl_engine_kind_t dnnl_cpu
constexpr int kDnnlF16 = 1, kDnnlBf16 = 2, kDnnlF32 = 3; // dnnl_data_type_t
constexpr int kDnnlTypeUndef = 0;
constexpr unsigned kDnnlStreamInOrder = 1;
constexpr int kDnnlScratchpadUser = 1; // dnnl_scratchpad_mode_user
constexpr int kDnnlQueryImplInfoStr = 8; // dnnl_query_impl_info_str
constexpr int kDnnlQueryExecArgMd = 255; // dnnl_query_exec_arg_md
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80; // DNNL_ARG_*
struct DnnlExecArg {
  int arg;
  void* memory;
};
struct DnnlVersion {
  int major, minor, patch;
  const char* hash;
  unsigned cpu_runtime, gpu_runtime;
};

struct Api {
  const DnnlVersion* (*version)();
  dnnl_status (*engine_create)(void**, int, size_t);
  dnnl_status (*stream_create)(void**, void*, unsigned);
  dnnl_status (*stream_wait)(void*);
  dnnl_status (*md_create)(void**, int, const int64_t*, int, const int64_t*);
  dnnl_status (*md_destroy)(void*);
  dnnl_status (*md_clone)(void**, const void*);
  size_t (*md_get_size)(const void*);
  dnnl_status (*attr_create)(void**);
  dnnl_status (*attr_destroy)(void*);
  dnnl_status (*attr_set_scratchpad_mode)(void*, int);
  dnnl_status (*attr_set_post_ops)(void*, const void*);
  dnnl_status (*post_ops_create)(void**);
  dnnl_status (*post_ops_destroy)(void*);
  dnnl_status (*post_ops_append_sum)(void*, float, int32_t, int);
  dnnl_status (*matmul_pd_create)(void**, void*, const void*, const void*, const void*, const void*, const void*);
  dnnl_status (*pd_destroy)(void*);
  dnnl_status (*pd_query)(const void*, int, int, void*);
  const void* (*pd_query_md)(const void*, int, int);
  dnnl_status (*primitive_create)(void**, const void*);
  dnnl_status (*primitive_destroy)(void*);
  dnnl_status (*primitive_execute)(const void*, void*, int, const DnnlExecArg*);
  dnnl_status (*memory_create)(void**, const void*, void*, void*);
  dnnl_status (*memory_destroy)(void*);
  void (*omp_set_num_threads)(int);
};

#if FL_ONEDNN_GEMM_SUPPORTED
template <typename F>
bool bind(void* handle, const char* name, F& fn) {
  fn = reinterpret_cast<F>(dlsym(handle, name));
  return fn != nullptr;
}

bool bind_api(void* h, Api& a) {
  return bind(h, "dnnl_version", a.version) && bind(h, "dnnl_engine_create", a.engine_create) &&
         bind(h, "dnnl_stream_create", a.stream_create) && bind(h, "dnnl_stream_wait", a.stream_wait) &&
         bind(h, "dnnl_memory_desc_create_with_strides", a.md_create) &&
         bind(h, "dnnl_memory_desc_destroy", a.md_destroy) && bind(h, "dnnl_memory_desc_clone", a.md_clone) && bind(h, "dnnl_memory_desc_get_size", a.md_get_size) &&
         bind(h, "dnnl_primitive_attr_create", a.attr_create) &&
         bind(h, "dnnl_primitive_attr_destroy", a.attr_destroy) &&
         bind(h, "dnnl_primitive_attr_set_scratchpad_mode", a.attr_set_scratchpad_mode) &&
         bind(h, "dnnl_primitive_attr_set_post_ops", a.attr_set_post_ops) &&
         bind(h, "dnnl_post_ops_create", a.post_ops_create) && bind(h, "dnnl_post_ops_destroy", a.post_ops_destroy) &&
         bind(h, "dnnl_post_ops_append_sum", a.post_ops_append_sum) &&
         bind(h, "dnnl_matmul_primitive_desc_create", a.matmul_pd_create) &&
         bind(h, "dnnl_primitive_desc_destroy", a.pd_destroy) && bind(h, "dnnl_primitive_desc_query", a.pd_query) &&
         bind(h, "dnnl_primitive_desc_query_md", a.pd_query_md) &&
         bind(h, "dnnl_primitive_create", a.primitive_create) &&
         bind(h, "dnnl_primitive_destroy", a.primitive_destroy) &&
         bind(h, "dnnl_primitive_execute", a.primitive_execute) && bind(h, "dnnl_memory_create", a.memory_create) &&
         bind(h, "dnnl_memory_destroy", a.memory_destroy) &&
         // Looked up through the handle: libdnnl's own OpenMP runtime, not another.
         bind(h, "omp_set_num_threads", a.omp_set_num_threads);
}
#endif

struct Loaded {
  Api api{};
  void* engine = nullptr;
  bool bf16 = false, f16 = false; // CPU units and library both there
  HalfGemmStatus status;
};

std::mutex g_dirs_mutex;
std::vector<std::string> g_dirs;
std::atomic<bool> g_enabled{true};

#if FL_ONEDNN_GEMM_SUPPORTED
// The CPU's 16-bit units, as the OS lets us use them: AVX-512 state enabled in
// XCR0 (opmask, ZMM upper halves, ZMM16-31: bits 5-7) for all; AMX reported
// as such only with the tile state (bits 17-18) too.
struct CpuUnits {
  std::string bf16, f16;
};
CpuUnits cpu_units() {
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) {
    return {};
  }
  __cpuid_count(1, 0, a, b, c, d);
  if (!(c & (1u << 27))) { // OSXSAVE: XGETBV usable
    return {};
  }
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool avx512_state = (xcr0_lo & 0xe6u) == 0xe6u; // SSE, AVX, opmask, ZMM
  const bool amx_state = (xcr0_lo & (3u << 17)) == (3u << 17);
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx512f = b & (1u << 16);
  const bool amx_bf16 = d & (1u << 22);
  const bool avx512_fp16 = d & (1u << 23);
  __cpuid_count(7, 1, a, b, c, d);
  const bool avx512_bf16 = a & (1u << 5);
  const bool amx_fp16 = a & (1u << 21);
  if (!avx512_state || !avx512f) {
    return {};
  }
  CpuUnits u;
  u.bf16 = amx_bf16 && amx_state ? "amx_bf16" : (avx512_bf16 ? "avx512_bf16" : "");
  u.f16 = amx_fp16 && amx_state ? "amx_fp16" : (avx512_fp16 ? "avx512_fp16" : "");
  return u;
}

// The first libdnnl 3.x that exports the matmul C API and an OpenMP thread
// setting; its CPU engine.
void load_library(Loaded& out) {
  std::vector<std::string> candidates;
  if (const char* path = std::getenv("FL_ONEDNN_LIBRARY")) {
    candidates.push_back(path);
  } else {
    std::lock_guard<std::mutex> lock(g_dirs_mutex);
    for (const auto& dir : g_dirs) {
      candidates.push_back(dir + "/libdnnl.so.3");
    }
    candidates.push_back("libdnnl.so.3"); // the loader's own search path
  }
  std::string tried;
  for (const auto& path : candidates) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      continue;
    }
    Api api{};
    void* engine = nullptr;
    if (bind_api(handle, api) && api.version()->major == 3 && api.engine_create(&engine, kDnnlCpu, 0) == 0) {
      out.api = api;
      out.engine = engine;
      const DnnlVersion* v = api.version();
      out.status.library = path;
      out.status.version = std::to_string(v->major) + "." + std::to_string(v->minor) + "." + std::to_string(v->patch);
      return;
    }
    tried += (tried.empty() ? "" : ", ") + path;
    dlclose(handle);
  }
  out.status.reason = tried.empty()
                          ? "no libdnnl found (pip install onednn-cpu-gomp, or set FL_ONEDNN_LIBRARY)"
                          : "libdnnl without oneDNN 3.x's matmul C API or an OpenMP runtime: " + tried;
}
#endif

const Loaded& loaded() {
  static const Loaded state = [] {
    Loaded out;
#if FL_ONEDNN_GEMM_SUPPORTED
    CpuUnits units = cpu_units();
    out.status.cpu_units = units.bf16;
    out.status.f16_units = units.f16;
    const char* env = std::getenv("FL_BF16_GEMM");
    if (env && std::string(env) == "0") {
      out.status.reason = "FL_BF16_GEMM=0";
    } else if (units.bf16.empty() && units.f16.empty()) {
      out.status.reason = "the CPU has no AVX512-BF16, AMX-BF16, AVX512-FP16 or AMX-FP16 units";
    } else {
      load_library(out);
    }
    out.bf16 = out.engine && !units.bf16.empty();
    out.f16 = out.engine && !units.f16.empty();
    if (out.engine && !out.bf16) {
      out.status.reason = "the CPU has no AVX512-BF16 or AMX-BF16 units";
    }
#else
    out.status.reason = "only on x86-64 Linux";
#endif
    out.status.active = out.bf16;
    out.status.f16_active = out.f16;
    return out;
  }();
  return state;
}

// One matmul primitive: C[m, n] = op(A) op(B) (+ C), its memory descriptors
// and scratchpad size. Shapes, strides and types are fixed at creation (the
// fast kernels are chosen for them), so primitives are cached by all of them.
struct Matmul {
  void* primitive = nullptr;
  void* md[4] = {nullptr, nullptr, nullptr, nullptr}; // src, weights, dst, scratchpad
  size_t scratchpad = 0;
  std::string implementation;
  // oneDNN's reference kernel (no fast kernel for these strides and types,
  // e.g. float16 with a strided destination): ~1000x slower than sgemm, so
  // half_gemm widens the operands for sgemm instead.
  bool reference = false;
  Matmul() = default;
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;
  ~Matmul() {
    const Api& api = loaded().api;
    if (primitive) {
      api.primitive_destroy(primitive);
    }
    for (void* d : md) {
      if (d) api.md_destroy(d);
    }
  }
};

using Key = std::tuple<int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool>;

void check(dnnl_status s, const char* what) {
  if (s != 0) {
    throw std::runtime_error(std::string("oneDNN ") + what + " failed with status " + std::to_string(s));
  }
}

std::shared_ptr<Matmul> create_matmul(const Key& key) {
  const Api& api = loaded().api;
  auto [type, trans_a, trans_b, m, n, k, lda, ldb, ldc, accumulate] = key;
  auto mm = std::make_shared<Matmul>();
  const int64_t src_dims[2] = {m, k}, src_strides[2] = {trans_a ? 1 : lda, trans_a ? lda : 1};
  const int64_t wei_dims[2] = {k, n}, wei_strides[2] = {trans_b ? 1 : ldb, trans_b ? ldb : 1};
  const int64_t dst_dims[2] = {m, n}, dst_strides[2] = {ldc, 1};
  check(api.md_create(&mm->md[0], 2, src_dims, type, src_strides), "memory descriptor");
  check(api.md_create(&mm->md[1], 2, wei_dims, type, wei_strides), "memory descriptor");
  check(api.md_create(&mm->md[2], 2, dst_dims, kDnnlF32, dst_strides), "memory descriptor");
  void* attr = nullptr;
  void* post_ops = nullptr;
  check(api.attr_create(&attr), "primitive attributes");
  dnnl_status s = api.attr_set_scratchpad_mode(attr, kDnnlScratchpadUser);
  if (s == 0 && accumulate) { // C += A B: a sum post-op with scale 1
    s = api.post_ops_create(&post_ops);
    if (s == 0) s = api.post_ops_append_sum(post_ops, 1.0f, 0, kDnnlTypeUndef);
    if (s == 0) s = api.attr_set_post_ops(attr, post_ops);
  }
  void* pd = nullptr;
  if (s == 0) s = api.matmul_pd_create(&pd, loaded().engine, mm->md[0], mm->md[1], nullptr, mm->md[2], attr);
  if (post_ops) api.post_ops_destroy(post_ops);
  api.attr_destroy(attr);
  check(s, "matmul primitive descriptor");
  const char* impl = nullptr;
  if (api.pd_query(pd, kDnnlQueryImplInfoStr, 0, &impl) == 0 && impl) {
    mm->implementation = impl;
  }
  mm->reference = mm->implementation.rfind("ref", 0) == 0;
  const void* scratchpad_md = api.pd_query_md(pd, kDnnlQueryExecArgMd, kArgScratchpad);
  mm->scratchpad = scratchpad_md ? api.md_get_size(scratchpad_md) : 0;
  s = mm->scratchpad ? api.md_clone(&mm->md[3], scratchpad_md) : 0;
  if (s == 0) s = api.primitive_create(&mm->primitive, pd);
  api.pd_destroy(pd);
  check(s, "matmul primitive");
  return mm;
}

// Primitives by shape (a call of the chunked-head driver uses a handful: its
// tiles and the last chunk's). Bounded: cleared when it grows past kMaxCached
// (callers hold their own reference while they execute).
constexpr size_t kMaxCached = 256;
std::mutex g_cache_mutex;
std::map<Key, std::shared_ptr<Matmul>> g_cache;
std::string g_last_implementation;

std::shared_ptr<Matmul> matmul_for(const Key& key) {
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    auto it = g_cache.find(key);
    if (it != g_cache.end()) {
      return it->second;
    }
  }
  auto mm = create_matmul(key); // outside the lock: creation JIT-compiles
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  if (g_cache.size() >= kMaxCached) {
    g_cache.clear();
  }
  g_last_implementation = mm->implementation;
  return g_cache.emplace(key, mm).first->second;
}

// A calling thread's stream and scratchpad.
struct ThreadState {
  void* stream = nullptr;
  std::vector<char> scratchpad;
};

// op(X) [rows, cols] of a 16-bit row-major matrix (leading dimension ld;
// transposed: X is [cols, rows]) as a dense float32 matrix.
void widen_operand(HalfType type, bool trans, int64_t rows, int64_t cols, const uint16_t* x, int64_t ld,
                   std::vector<float>& out) {
  out.resize(size_t(rows * cols));
  const int64_t outer = trans ? cols : rows, inner = trans ? rows : cols;
  for (int64_t i = 0; i < outer; ++i) {
    if (type == HalfType::bf16) {
      widen(reinterpret_cast<const BFloat*>(x + i * ld), int(inner), out.data() + i * inner);
    } else {
      widen(reinterpret_cast<const Half*>(x + i * ld), int(inner), out.data() + i * inner);
    }
  }
}

void widened_sgemm(HalfType type, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
                   int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  thread_local std::vector<float> wa, wb;
  widen_operand(type, trans_a, m, k, a, lda, wa);
  widen_operand(type, trans_b, k, n, b, ldb, wb);
  sgemm(trans_a, trans_b, m, n, k, wa.data(), trans_a ? m : k, wb.data(), trans_b ? k : n, beta, c, ldc);
}

} // namespace

bool bf16_gemm_available() {
  return g_enabled.load(std::memory_order_relaxed) && loaded().bf16;
}

bool f16_gemm_available() {
  return g_enabled.load(std::memory_order_relaxed) && loaded().f16;
}

void half_gemm(HalfType type, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const Loaded& lib = loaded();
  if (!(type == HalfType::bf16 ? lib.bf16 : lib.f16)) {
    throw std::logic_error("half_gemm called where the oneDNN GEMM of that type is not available");
  }
  if (beta != 0.0f && beta != 1.0f) {
    throw std::logic_error("half_gemm: beta must be 0 or 1");
  }
  if (m == 0 || n == 0) {
    return;
  }
  if (k == 0) {
    if (beta == 0.0f) {
      for (int64_t i = 0; i < m; ++i) {
        std::memset(c + i * ldc, 0, sizeof(float) * size_t(n));
      }
    }
    return;
  }
  thread_local ThreadState thread;
  if (!thread.stream) {
    lib.api.omp_set_num_threads(1);
    check(lib.api.stream_create(&thread.stream, lib.engine, kDnnlStreamInOrder), "stream");
  }
  const Key key{type == HalfType::bf16 ? kDnnlBf16 : kDnnlF16, trans_a, trans_b, m, n, k, lda, ldb, ldc,
                beta != 0.0f};
  std::shared_ptr<Matmul> mm = matmul_for(key);
  if (mm->reference) {
    widened_sgemm(type, trans_a, trans_b, m, n, k, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  if (thread.scratchpad.size() < mm->scratchpad) {
    thread.scratchpad.resize(mm->scratchpad);
  }
  const Api& api = lib.api;
  void* handles[4] = {const_cast<uint16_t*>(a), const_cast<uint16_t*>(b), c, thread.scratchpad.data()};
  const int args_id[4] = {kArgSrc, kArgWeights, kArgDst, kArgScratchpad};
  const int nargs = mm->scratchpad ? 4 : 3;
  DnnlExecArg args[4] = {};
  dnnl_status s = 0;
  for (int i = 0; i < nargs && s == 0; ++i) {
    args[i] = {args_id[i], nullptr};
    s = api.memory_create(&args[i].memory, mm->md[i], lib.engine, handles[i]);
  }
  if (s == 0) s = api.primitive_execute(mm->primitive, thread.stream, nargs, args);
  if (s == 0) s = api.stream_wait(thread.stream);
  for (int i = 0; i < nargs; ++i) {
    if (args[i].memory) api.memory_destroy(args[i].memory);
  }
  check(s, "matmul execution");
}

void set_bf16_gemm_search_dirs(const std::vector<std::string>& dirs) {
  std::lock_guard<std::mutex> lock(g_dirs_mutex);
  g_dirs = dirs;
}

void set_bf16_gemm_enabled(bool enabled) {
  g_enabled.store(enabled, std::memory_order_relaxed);
}

HalfGemmStatus bf16_gemm_status() {
  HalfGemmStatus s = loaded().status;
  {
    std::lock_guard<std::mutex> lock(g_cache_mutex);
    s.implementation = g_last_implementation;
  }
  if (!g_enabled.load(std::memory_order_relaxed) && (s.active || s.f16_active)) {
    s.active = s.f16_active = false;
    s.reason = "disabled by set_bf16_gemm_enabled(False)";
  }
  return s;
}

} // namespace fl::cpu
