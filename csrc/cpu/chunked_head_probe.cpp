// Test hook of the chunked-head driver (cpu/chunked_head.h): the driver's
// GEMMs, chunking and gradient GEMMs observed without any loss epilogue, so
// that tests/test_chunked_head.py checks them against plain matmuls, one head
// or two (dense / 16-bit / quantized, different H), at any chunk size.
#include <cstring>

#include "cpu/chunked_head.h"
#include "mlx/ops.h"
#include "mlx/transforms.h"

namespace fl::cpu {

namespace mx = mlx::core;

namespace {

// The head's inputs laid out as lce_inputs says, contiguous and evaluated, and
// the parameters that describe them.
struct ProbeInputs {
  std::vector<mx::array> arrays;
  LinearCrossEntropyParams p;
  LceInputs where;
};

ProbeInputs probe_inputs(const ProbeHead& h) {
  ProbeInputs in;
  if (h.hidden.ndim() != 2) {
    throw std::invalid_argument("chunked_head_probe: hidden must be 2-D [N, H]");
  }
  const int H = h.hidden.shape(1);
  in.arrays = {mx::contiguous(h.hidden), mx::contiguous(h.weight)};
  if (h.scales) {
    in.p.bits = h.bits;
    in.p.group_size = h.group_size;
    in.p.quant_mode = quant_mode_from_name(h.mode);
    check_quantized_head(h.weight, *h.scales, h.biases, H, h.group_size, h.bits, in.p.quant_mode);
    in.arrays.push_back(mx::contiguous(*h.scales));
    if (in.p.quantized_affine()) {
      in.arrays.push_back(mx::contiguous(mx::astype(*h.biases, h.scales->dtype())));
    }
  } else if (h.weight.ndim() != 2 || h.weight.shape(1) != H) {
    throw std::invalid_argument("chunked_head_probe: weight must be [V, H]");
  }
  in.arrays.push_back(mx::zeros({h.hidden.shape(0)}, mx::int64)); // the targets' slot
  mx::eval(in.arrays);
  in.where = lce_inputs(in.p);
  return in;
}

} // namespace

std::vector<mx::array> chunked_head_probe(const ProbeHead& head, const std::optional<ProbeHead>& second,
                                          const std::optional<mx::array>& dz, int64_t chunk_bytes) {
  ProbeInputs one = probe_inputs(head);
  std::optional<ProbeInputs> two;
  const int N = head.hidden.shape(0), H = head.hidden.shape(1);
  const int V = head.weight.shape(0);
  ChunkedHeadCall call;
  call.rows = N;
  call.chunk_bytes = chunk_bytes;
  call.head = head_operands(one.arrays, one.where, one.p);
  HeadOperands other;
  int V2 = 0;
  if (second) {
    two = probe_inputs(*second);
    if (second->hidden.shape(0) != N) {
      throw std::invalid_argument("chunked_head_probe: both heads need the same rows");
    }
    other = head_operands(two->arrays, two->where, two->p);
    V2 = second->weight.shape(0);
    call.second = &other;
  }
  std::optional<mx::array> g;
  if (dz) {
    if (dz->shape() != mx::Shape{N, V}) {
      throw std::invalid_argument("chunked_head_probe: dz must be [N, V]");
    }
    g = mx::contiguous(mx::astype(*dz, mx::float32));
    mx::eval(*g);
  }
  std::vector<float> z(size_t(N) * V), z2(size_t(N) * V2);
  std::vector<float> d_hidden(g ? size_t(N) * H : 0), d_weight(g ? size_t(V) * H : 0), d_bias(g ? V : 0);
  if (g) {
    call.grads = {d_hidden.data(), d_weight.data(), d_bias.data()};
  }
  int64_t chunks = 0;
  run_chunked_head(call, [&](const HeadChunk& c) {
    ++chunks;
    std::memcpy(z.data() + c.row0 * V, c.z, sizeof(float) * c.rows * V);
    if (c.z2) {
      std::memcpy(z2.data() + c.row0 * V2, c.z2, sizeof(float) * c.rows * V2);
    }
    if (g) {
      c.for_rows([&](int64_t b, int64_t e) {
        std::memcpy(c.z + b * V, g->data<float>() + (c.row0 + b) * V, sizeof(float) * (e - b) * V);
      });
    }
  });
  std::vector<mx::array> out = {mx::array(z.begin(), {N, V}, mx::float32),
                                mx::array(z2.begin(), {N, V2}, mx::float32)};
  if (g) {
    out.push_back(mx::array(d_hidden.begin(), {N, H}, mx::float32));
    out.push_back(mx::array(d_weight.begin(), {V, H}, mx::float32));
    out.push_back(mx::array(d_bias.begin(), {V}, mx::float32));
  }
  out.push_back(mx::array(chunks, mx::int64));
  return out;
}

} // namespace fl::cpu
