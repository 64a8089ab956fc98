// The valid twins of the static_reject_* rules: float arithmetic, a `constant`
// table at program scope, a non-recursive helper chain, metal:: functions, a
// struct with a plain member function and a function-scope threadgroup array.
// static_check.py must accept all of it.
#include <metal_stdlib>
using namespace metal;

constant float kWeights[4] = {0.5f, 1.0f, 2.0f, 4.0f};

struct SquareLoss {
  float value(float x) const { return x * x; }
};

static float cube(float x) {
  return x * SquareLoss().value(x);
}

kernel void msl_subset(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float staged[32];
  staged[tid] = metal::exp(x[tid]) * kWeights[tid % 4];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = cube(staged[31 - tid]);
}
