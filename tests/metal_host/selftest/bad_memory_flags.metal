// BROKEN on purpose (item: memory flags): each thread reads what a thread of
// another SIMD-group wrote before a barrier whose flags do not cover that memory.
// On a GPU the write need not be visible yet; the strict memory schedule keeps it
// invisible. Each twin uses the flag that makes the read correct.
#include <metal_stdlib>
using namespace metal;

// Threadgroup memory published by mem_none (broken) or mem_threadgroup (twin).
template <bool kPublish>
[[kernel]] void exchange_threadgroup(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* slots [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  slots[tid] = x[tid];
  threadgroup_barrier(kPublish ? mem_flags::mem_threadgroup : mem_flags::mem_none);
  out[tid] = slots[tpg - 1 - tid];
}

// Device memory published by mem_threadgroup (broken) or mem_device (twin).
template <bool kPublish>
[[kernel]] void exchange_device(
    device const float* x [[buffer(0)]],
    device float* staged [[buffer(1)]],
    device float* out [[buffer(2)]],
    uint tid [[thread_index_in_threadgroup]],
    uint tpg [[threads_per_threadgroup]]) {
  staged[tid] = 2.0f * x[tid];
  threadgroup_barrier(kPublish ? mem_flags::mem_device : mem_flags::mem_threadgroup);
  out[tid] = staged[tpg - 1 - tid];
}

template [[host_name("threadgroup_mem_none")]] [[kernel]] decltype(exchange_threadgroup<false>)
    exchange_threadgroup<false>;
template [[host_name("threadgroup_mem_threadgroup")]] [[kernel]] decltype(
    exchange_threadgroup<true>) exchange_threadgroup<true>;
template [[host_name("device_mem_threadgroup")]] [[kernel]] decltype(exchange_device<false>)
    exchange_device<false>;
template [[host_name("device_mem_device")]] [[kernel]] decltype(exchange_device<true>)
    exchange_device<true>;
