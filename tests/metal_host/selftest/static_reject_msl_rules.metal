// INVALID on purpose, one MSL rule per marked line: C++ accepts each of these, `xcrun
// metal` does not (msl_rules.py cites the section of the MSL specification). The
// test asserts that static_check.py reports every line marked `REJECT: <message>`
// at that line. The valid twin of each is in ok_msl_rules.metal.
#include <metal_stdlib>
using namespace metal;

template <int kBits>
struct Packing {
  static constexpr int kPerWord = 32 / kBits; // REJECT: static data member 'kPerWord' not in the constant address space
};

struct Tile {
  static constexpr int kRows = 8; // REJECT: static data member 'kRows' not in the constant address space
};

constexpr int kTiles = 4; // REJECT: program-scope variable 'kTiles' not in the constant address space

thread_local int tl_counter; // REJECT: thread_local 'tl_counter'

threadgroup float shared_sum[32]; // REJECT: threadgroup variable 'shared_sum' outside a kernel body

struct Loss {
  virtual float value(float x) const { return x * x; } // REJECT: virtual function 'value'
};

struct Base {
  float bias;
};
struct Derived : Base {
  float scale;
};

int main() { // REJECT: function named 'main'
  return 0;
}

static float square(float x) {
  return x * x;
}

static float helper_with_threadgroup(uint tid) {
  threadgroup float partial[32]; // REJECT: threadgroup variable 'partial' outside a kernel body
  partial[tid] = 1.0f;
  return partial[0];
}

static float staged_weight(int i) {
  static constexpr float kTable[4] = {0.5f, 1.0f, 2.0f, 4.0f}; // REJECT: function-scope static 'kTable' not in the constant address space
  static int calls = 0; // REJECT: function-scope static 'calls' not in the constant address space
  calls += 1;
  return kTable[i % 4];
}

kernel void rules_violations(
    device const float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    float* scratch [[buffer(2)]], // REJECT: kernel parameter 'scratch' of type float * has no device/constant/threadgroup address space
    uint gid [[thread_position_in_grid]]) {
  auto twice = [](float v) { return 2.0f * v; }; // REJECT: lambda expression
  float (*op)(float) = square; // REJECT: function or member pointer 'op'
  auto scale = 0.5; // REJECT: 'scale' has type double
  float acc = expf(x[gid]); // REJECT: call to 'expf' from the C/C++ standard library
  float* heap = new float(acc); // REJECT: new / delete
  delete heap; // REJECT: new / delete
  Derived d;
  d.bias = 0.0f;
  Base* b = dynamic_cast<Base*>(&d); // REJECT: dynamic_cast / typeid
  int i = 0;
again: // REJECT: goto / label
  acc += op(x[gid]) * float(scale) + twice(b->bias) + staged_weight(i);
  if (++i < kTiles) goto again; // REJECT: goto / label
  out[gid] = acc + scratch[0] + Loss().value(acc) + helper_with_threadgroup(gid)
      + float(Packing<4>::kPerWord + Tile::kRows + tl_counter) + shared_sum[0];
}

kernel float rules_returns_value( // REJECT: kernel 'rules_returns_value' returns float
    device const float* x [[buffer(0)]],
    uint gid [[thread_position_in_grid]]) {
  return x[gid];
}

kernel void rules_overloaded(device float* out [[buffer(0)]]) {
  out[0] = 0.0f;
}
kernel void rules_overloaded(device int* out [[buffer(0)]]) { // REJECT: kernel 'rules_overloaded' overloaded
  out[0] = 0;
}

kernel void rules_compiler_errors(
    device float* out [[buffer(0)]],
    constant uint& n [[buffer(1)]],
    uint gid [[thread_position_in_grid]]) {
  float row[n]; // REJECT: variable length array
  register float r = 0.0f; // REJECT: ISO C++17 does not allow 'register'
  row[0] = r;
  out[gid] = row[0];
}
