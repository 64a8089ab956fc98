// The bfloat16 GEMM of cpu/blas.h: oneDNN's dnnl_gemm_bf16bf16f32, loaded at
// run time where the CPU has bf16 units.
//
// Why oneDNN, and why loaded rather than linked: the float32 path widens 16-bit
// heads to float32 for OpenBLAS's sgemm, which on a CPU with AMX-BF16 runs
// ~15x below the bf16 tile units (one 2048 x 1024 x 32000 GEMM: ~2 s for
// sgemm on 2 cores, ~0.17 s for oneDNN's bf16 GEMM on AMX). scipy-openblas32
// is built without OpenBLAS's bf16 routines (no sbgemm_ exported); MKL's
// cblas_gemm_bf16bf16f32 comes in a 690 MB proprietary wheel. oneDNN is
// Apache-2.0, its `onednn-cpu-gomp` wheel is 39 MB with no dependencies but
// the system's libgomp, and dnnl_gemm_bf16bf16f32 (a BLAS-like row-major GEMM,
// bf16 in, float32 accumulation and out) is exported by every release from
// 1.x to the current 3.x. Most users have no such CPU, so the library is an
// optional extra: nothing is linked, nothing fails where it is absent.
//
// Threads: the chunked-head driver cuts its GEMMs into fixed tiles on our own
// pool (results independent of the thread count), so each call must run on
// the calling thread alone. oneDNN's OpenMP build asks omp_get_max_threads(),
// a per-thread setting: each calling thread sets it to 1 once.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/blas.h"

#if defined(__x86_64__) && defined(__linux__)
#define FL_BF16_GEMM_SUPPORTED 1
#include <cpuid.h>
#include <dlfcn.h>
#else
#define FL_BF16_GEMM_SUPPORTED 0
#endif

namespace fl::cpu {

namespace {

// dnnl_gemm_bf16bf16f32's signature (dnnl_dim_t is int64_t, bf16 a uint16_t
// pattern, dnnl_status_t an int enum whose success is 0).
using GemmBf16Fn = int (*)(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha,
                           const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                           float* C, int64_t ldc);
using SetThreadsFn = void (*)(int);

struct Loaded {
  GemmBf16Fn gemm = nullptr;
  SetThreadsFn omp_set_num_threads = nullptr;
  Bf16GemmStatus status;
};

std::mutex g_dirs_mutex;
std::vector<std::string> g_dirs;
std::atomic<bool> g_enabled{true};

#if FL_BF16_GEMM_SUPPORTED
// The CPU's bf16 units, as the OS lets us use them: AVX-512 state enabled in
// XCR0 (opmask, ZMM upper halves, ZMM16-31: bits 5-7) for both; AMX-BF16 is
// reported as such only with the tile state (bits 17-18) too.
std::string cpu_bf16_units() {
  unsigned a, b, c, d;
  if (__get_cpuid_max(0, nullptr) < 7) {
    return "";
  }
  __cpuid_count(1, 0, a, b, c, d);
  if (!(c & (1u << 27))) { // OSXSAVE: XGETBV usable
    return "";
  }
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool avx512_state = (xcr0_lo & 0xe6u) == 0xe6u; // SSE, AVX, opmask, ZMM
  const bool amx_state = (xcr0_lo & (3u << 17)) == (3u << 17);
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx512f = b & (1u << 16);
  const bool amx_bf16 = d & (1u << 22);
  __cpuid_count(7, 1, a, b, c, d);
  const bool avx512_bf16 = a & (1u << 5);
  if (!avx512_state || !avx512f) {
    return "";
  }
  if (amx_bf16 && amx_state) {
    return "amx_bf16";
  }
  return avx512_bf16 ? "avx512_bf16" : "";
}

// The first libdnnl that exports the GEMM and an OpenMP thread setting.
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
    candidates.push_back("libdnnl.so.2"); // oneDNN 2.x (Debian's libdnnl2)
  }
  std::string tried;
  for (const auto& path : candidates) {
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
      continue;
    }
    auto gemm = reinterpret_cast<GemmBf16Fn>(dlsym(handle, "dnnl_gemm_bf16bf16f32"));
    // Looked up through the handle: libdnnl's own OpenMP runtime, not another.
    auto set_threads = reinterpret_cast<SetThreadsFn>(dlsym(handle, "omp_set_num_threads"));
    if (gemm && set_threads) {
      out.gemm = gemm;
      out.omp_set_num_threads = set_threads;
      out.status.library = path;
      return;
    }
    tried += (tried.empty() ? "" : ", ") + path;
    dlclose(handle);
  }
  out.status.reason = tried.empty()
                          ? "no libdnnl found (pip install onednn-cpu-gomp, or set FL_ONEDNN_LIBRARY)"
                          : "libdnnl without dnnl_gemm_bf16bf16f32 or an OpenMP runtime: " + tried;
}
#endif

const Loaded& loaded() {
  static const Loaded state = [] {
    Loaded out;
#if FL_BF16_GEMM_SUPPORTED
    out.status.cpu_units = cpu_bf16_units();
    const char* env = std::getenv("FL_BF16_GEMM");
    if (env && std::string(env) == "0") {
      out.status.reason = "FL_BF16_GEMM=0";
    } else if (out.status.cpu_units.empty()) {
      out.status.reason = "the CPU has no AVX512-BF16 or AMX-BF16 units";
    } else {
      load_library(out);
    }
#else
    out.status.reason = "only on x86-64 Linux";
#endif
    out.status.active = out.gemm != nullptr;
    return out;
  }();
  return state;
}

} // namespace

bool bf16_gemm_available() {
  return g_enabled.load(std::memory_order_relaxed) && loaded().gemm != nullptr;
}

void bf16_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const uint16_t* a,
               int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const Loaded& lib = loaded();
  if (!lib.gemm) {
    throw std::logic_error("bf16_gemm called where bf16_gemm_available() is false");
  }
  if (m == 0 || n == 0) {
    return;
  }
  thread_local bool single_threaded = false;
  if (!single_threaded) {
    lib.omp_set_num_threads(1);
    single_threaded = true;
  }
  int status = lib.gemm(trans_a ? 'T' : 'N', trans_b ? 'T' : 'N', m, n, k, 1.0f, a, lda, b, ldb, beta,
                        c, ldc);
  if (status != 0) {
    throw std::runtime_error("oneDNN dnnl_gemm_bf16bf16f32 failed with status " + std::to_string(status));
  }
}

void set_bf16_gemm_search_dirs(const std::vector<std::string>& dirs) {
  std::lock_guard<std::mutex> lock(g_dirs_mutex);
  g_dirs = dirs;
}

void set_bf16_gemm_enabled(bool enabled) {
  g_enabled.store(enabled, std::memory_order_relaxed);
}

Bf16GemmStatus bf16_gemm_status() {
  Bf16GemmStatus s = loaded().status;
  if (s.active && !g_enabled.load(std::memory_order_relaxed)) {
    s.active = false;
    s.reason = "disabled by set_bf16_gemm_enabled(False)";
  }
  return s;
}

} // namespace fl::cpu
