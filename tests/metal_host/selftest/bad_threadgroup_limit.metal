// BROKEN on purpose (item: function-scope threadgroup arrays count toward the
// 32 KiB of threadgroup memory): 32 KiB of array plus the 16-byte
// [[threadgroup(0)]] buffer the host asks for is 16 bytes too many; Metal
// refuses the pipeline or the dispatch. The twin's array is 16 bytes smaller.
#include <metal_stdlib>
using namespace metal;

template <uint kFloats>
[[kernel]] void big_staging(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* extra [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float staging[kFloats];
  staging[tid] = x[tid];
  if (tid == 0) {
    extra[0] = 1.0f;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = staging[tid] + extra[0];
}

template [[host_name("threadgroup_over_limit")]] [[kernel]] decltype(big_staging<8192>)
    big_staging<8192>;
template [[host_name("threadgroup_at_limit")]] [[kernel]] decltype(big_staging<8188>)
    big_staging<8188>;
