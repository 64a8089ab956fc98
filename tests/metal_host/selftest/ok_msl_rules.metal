// The valid twins of static_reject_msl_rules.metal, rule by rule: what MSL accepts
// in place of each construct there. static_check.py must accept all of it, and the
// dynamic harness builds it with the other self-test kernels.
#include <metal_stdlib>
using namespace metal;

template <int kBits>
struct RulesPacking {
  static constexpr constant int kPerWord = 32 / kBits; // static data member in constant
  enum : uint { kMask = (1u << kBits) - 1u }; // or an enumerator
};

constant constexpr int kRulesTiles = 4; // program-scope constant

struct RulesLoss { // no virtual: a plain member function
  float value(float x) const { return x * x; }
};

struct RulesTwice { // a function object in place of a lambda or a function pointer
  float operator()(float v) const { return 2.0f * v; }
};

struct RulesBase {
  float bias;
};
struct RulesDerived : RulesBase {
  float scale;
};

// Threadgroup memory is declared in the kernel and passed by pointer.
static float rules_helper(threadgroup float* partial, uint tid) {
  partial[tid] = 1.0f;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return partial[0];
}

static float rules_weight(int i) {
  static constexpr constant float kTable[4] = {0.5f, 1.0f, 2.0f, 4.0f}; // function-scope static in constant
  return kTable[i % 4];
}

kernel void rules_valid(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    threadgroup float* scratch [[threadgroup(0)]], // kernel pointers name their address space
    uint tid [[thread_index_in_threadgroup]]) {
  threadgroup float partial[32]; // threadgroup array in the kernel body
  const float scale = 0.5f; // float, suffixed literal
  float acc = metal::exp(x[tid]); // the Metal standard library
  float local[4] = {acc, acc, acc, acc}; // a fixed-size array in place of new / a VLA
  RulesDerived d;
  d.bias = 0.0f;
  thread RulesBase* b = &d; // implicit upcast in place of dynamic_cast
  scratch[tid] = 0.0f;
  for (int i = 0; i < kRulesTiles; ++i) { // a loop in place of goto
    acc += RulesTwice()(x[tid]) * scale + b->bias + rules_weight(i) + local[i];
  }
  out[tid] = acc + RulesLoss().value(acc) + rules_helper(partial, tid) + scratch[0]
      + float(RulesPacking<4>::kPerWord + RulesPacking<4>::kMask);
}
