// INVALID on purpose: a threadgroup pointer passed where a device pointer is
// expected. `xcrun metal` rejects this; static_check.py must too.
#include <metal_stdlib>
using namespace metal;

static void store(device float* dst, float v) {
  dst[0] = v;
}

kernel void tg_as_device(
    device const float* x [[buffer(0)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  store(slots + tid, x[tid]);
}
