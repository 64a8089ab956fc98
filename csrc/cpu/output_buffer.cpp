#include "cpu/output_buffer.h"

#include <cstdint>
#include <fstream>

#include "mlx/allocator.h"
#include "mlx/device.h"
#include "ops/common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fl::cpu {

namespace mx = mlx::core;

namespace {

// The transparent huge page size (2 MB on x86-64 and on arm64 with 4 KB base
// pages; the kernel says so in sysfs).
size_t huge_page_bytes() {
  static const size_t bytes = [] {
    size_t value = 0;
    std::ifstream("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") >> value;
    bool power_of_two = value && (value & (value - 1)) == 0;
    return power_of_two ? value : size_t(2) << 20;
  }();
  return bytes;
}

// Below this, waiting for the stream to let go of an input (see
// allocate_or_reuse) costs more than the reuse saves.
constexpr size_t kWaitToReuseBytes = size_t(1) << 20;

} // namespace

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t page = huge_page_bytes();
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
  if (end > begin) {
    // Advice only: EINVAL where THP is compiled out is as good as success.
    madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)bytes;
#endif
}

void allocate(mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  advise_huge_pages(out.data<void>(), out.nbytes());
}

bool allocate_or_reuse(mx::array& out, const mx::array& in, mx::Stream stream) {
  if (!can_take_over(in, out)) {
    // The cheap reasons not to reuse (layout, size) failed, or an extra
    // reference exists. One such reference may be only in flight: MLX keeps
    // the buffers of a primitive's inputs alive until its task has run on the
    // stream, so the forward pass, which read the same logits, still holds
    // them while its task is queued ahead of us. Waiting for the stream to
    // drain lets that reference go; nothing is lost on the CPU, where our
    // task could not start before those anyway. Not where a GPU exists: a
    // queued CPU task may wait on GPU work that is only committed after this
    // graph has been encoded.
    const auto& buffer = in.data_shared_ptr();
    bool held_elsewhere_too = buffer && buffer->is_owned() && buffer.use_count() > 1;
    if (!held_elsewhere_too || !can_take_over_layout(in, out) || out.nbytes() < kWaitToReuseBytes ||
        stream.device != mx::Device::cpu || mx::is_available(mx::Device::gpu)) {
      allocate(out);
      return false;
    }
    mx::synchronize(stream);
    if (!can_take_over(in, out)) {
      allocate(out);
      return false;
    }
  }
  out.copy_shared_buffer(in);
  return true;
}

} // namespace fl::cpu
