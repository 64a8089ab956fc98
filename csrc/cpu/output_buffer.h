// Where the CPU kernels' outputs live: every eval_cpu allocates through here.
//
// MLX's CPU allocator keeps at most 32 MB of freed buffers by default, so each
// large output is a fresh glibc mmap whose 4 KB pages fault, and are zeroed,
// one at a time on first touch: 65,536 faults and ~100 ms for a 268 MB
// gradient, more than the kernel itself. Two remedies:
//  * reuse: when MLX allows it (the input is referenced by nothing but this
//    primitive), the output takes over the input's buffer, as MLX's own
//    element-wise ops do: no allocation, no fault, no extra peak memory;
//  * huge pages: a fresh buffer's 2 MB-aligned interior is advised
//    MADV_HUGEPAGE before anything touches it (Linux; a no-op where
//    transparent huge pages are off): one fault per 2 MB, and the kernel's own
//    threads take those faults in parallel as they write their rows.
#pragma once

#include <cstddef>

#include "mlx/array.h"
#include "mlx/stream.h"

namespace fl::cpu {

// A fresh buffer for `out` (MLX's allocator), huge-page advised when large.
void allocate(mlx::core::array& out);

// `out` takes over `in`'s buffer when MLX lets it donate `in` and the layouts
// match element for element (see can_take_over in ops/common.h); otherwise a
// fresh buffer. The kernel must then compute element i of `out` only from
// element i of `in` (it may read and write the same address). Returns whether
// the buffer was reused.
bool allocate_or_reuse(mlx::core::array& out, const mlx::core::array& in, mlx::core::Stream stream);

// Ask for transparent huge pages on the whole huge pages inside [data, data + bytes).
void advise_huge_pages(void* data, size_t bytes);

} // namespace fl::cpu
