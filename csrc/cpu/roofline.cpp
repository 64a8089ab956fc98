// eval_cpu of the memory-roofline primitive: stream the bytes, nothing else.
#include "cpu/dispatch.h"
#include "ops/roofline.h"

namespace fl {

namespace {

// Sum of 64-bit words: as cheap per byte as a read can be, and its result
// depends on every word so the loads cannot be dropped.
FL_VECTOR_CLONES uint64_t sum_words(const uint64_t* words, int64_t begin, int64_t end) {
  uint64_t sum = 0;
  FL_SIMD_REDUCE(reduction(+ : sum))
  for (int64_t i = begin; i < end; ++i) {
    sum += words[i];
  }
  return sum;
}

FL_VECTOR_CLONES void fill_words(uint64_t* words, int64_t begin, int64_t end) {
  FL_SIMD
  for (int64_t i = begin; i < end; ++i) {
    words[i] = uint64_t(i);
  }
}

// Blocks of the reads and the write, each claimed whole by one task.
constexpr int64_t kBlockWords = 1 << 15;

} // namespace

void MemoryRoofline::eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    out.set_data(mx::allocator::malloc(out.nbytes()));
  }
  auto* checksums = outputs[0].data<uint64_t>();
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto* words = inputs[i].data<uint64_t>();
    int64_t n = int64_t(inputs[i].nbytes() / sizeof(uint64_t)); // a trailing <8 bytes is noise
    int64_t blocks = (n + kBlockWords - 1) / kBlockWords;
    auto partial = std::make_shared<std::vector<uint64_t>>(blocks, 0);
    cpu::dispatch_parallel(stream(), {inputs[i]}, outputs, blocks, 1,
                           [words, n, partial](int64_t b, int64_t e) {
                             for (int64_t k = b; k < e; ++k) {
                               (*partial)[k] = sum_words(words, k * kBlockWords,
                                                         std::min(n, (k + 1) * kBlockWords));
                             }
                           });
    mx::cpu::get_command_encoder(stream()).dispatch([partial, checksums, i]() {
      uint64_t total = 0;
      for (auto v : *partial) {
        total += v;
      }
      checksums[i] = total;
    });
  }
  if (params_.writes) {
    auto* words = static_cast<uint64_t*>(outputs[1].data<void>());
    int64_t n = int64_t(outputs[1].nbytes() / sizeof(uint64_t));
    cpu::dispatch_parallel(stream(), {}, outputs, n, kBlockWords,
                           [words](int64_t b, int64_t e) { fill_words(words, b, e); });
  }
}

} // namespace fl
