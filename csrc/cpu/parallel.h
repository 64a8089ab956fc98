// One persistent worker pool for all CPU kernels.
//
// MLX evaluates a CPU primitive on its stream thread; our kernels split the
// rows (or elements) of one call across a pool that lives for the process, so
// no thread is created per call. Size: FL_NUM_THREADS if set, else the cores
// this process may run on (sched_getaffinity, not the machine's total).
#pragma once

#include <cstdint>
#include <functional>

namespace fl::cpu {

// Number of threads (the caller included) that parallel_for uses.
int num_threads();

// Run body(begin, end) over [0, n) in chunks of at least `grain` items, on the
// pool and the calling thread; returns when all chunks are done. Runs inline
// when the work is a single chunk or the pool has one thread.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body);

} // namespace fl::cpu
