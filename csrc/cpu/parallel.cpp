#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <sched.h>
#endif

namespace fl::cpu {

namespace {

int usable_cores() {
  if (const char* env = std::getenv("FL_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) {
      return n;
    }
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    return std::max(1, CPU_COUNT(&set));
  }
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

// One call of Pool::run: its chunks, its own claim counter and its own count
// of finished chunks. Workers hold it by shared_ptr and only ever touch the
// job they were woken for, so a worker that falls behind (descheduled between
// waking and claiming, or between claiming and comparing) finds its job's
// counter exhausted: it cannot take a ticket of a later job, run a chunk
// twice, or count a chunk against a job it does not belong to. The body it
// points to lives on the caller's stack; that is safe because a chunk is only
// run after claiming a ticket below `chunks`, and the caller does not return
// before every such chunk has been counted in `done`.
struct Job {
  Job(int64_t chunks, const std::function<void(int64_t)>* body) : chunks(chunks), body(body) {}

  const int64_t chunks;
  const std::function<void(int64_t)>* const body;
  std::atomic<int64_t> next{0};

  std::mutex mutex;
  std::condition_variable finished;
  int64_t done = 0;           // guarded by mutex
  std::exception_ptr error;   // the first exception a chunk threw; guarded by mutex

  // Claim and run chunks until none are left, then count them as done.
  void work(bool jitter) {
    int64_t count = 0;
    std::exception_ptr failure;
    for (int64_t c = next.fetch_add(1); maybe_yield(jitter), c < chunks; c = next.fetch_add(1)) {
      try {
        (*body)(c);
      } catch (...) {
        // Keep counting: the caller must not wait forever for this chunk.
        if (!failure) {
          failure = std::current_exception();
        }
      }
      ++count;
    }
    if (count == 0) {
      return;
    }
    std::lock_guard<std::mutex> lock(mutex);
    if (failure && !error) {
      error = failure;
    }
    done += count;
    if (done == chunks) {
      finished.notify_all();
    }
  }

  // FL_POOL_JITTER (tests only): yield where a worker can fall behind, so the
  // stress test in tests/test_thread_pool.py reaches those interleavings often.
  static void maybe_yield(bool jitter) {
    if (jitter) {
      std::this_thread::yield();
    }
  }
};

// Workers sleep until a new job is published; the caller of run() works on
// its own job too and returns when all of its chunks are done. Several
// callers may run jobs at once (MLX evaluates on one thread per stream, and a
// chunk may itself call parallel_for): each caller drains its own job, and the
// workers help with the most recently published one.
class Pool {
 public:
  explicit Pool(int threads) : jitter_(std::getenv("FL_POOL_JITTER") != nullptr) {
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { work(); });
    }
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) {
      w.join();
    }
  }

  int size() const {
    return int(workers_.size()) + 1;
  }

  void run(int64_t chunks, const std::function<void(int64_t)>& chunk_body) {
    auto job = std::make_shared<Job>(chunks, &chunk_body);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_ = job;
      ++generation_;
    }
    wake_.notify_all();
    job->work(jitter_);
    {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->finished.wait(lock, [&] { return job->done == job->chunks; });
    }
    {
      // Workers that wake from now on find nothing to do for this job.
      std::lock_guard<std::mutex> lock(mutex_);
      if (current_ == job) {
        current_.reset();
      }
    }
    if (job->error) {
      std::rethrow_exception(job->error);
    }
  }

 private:
  void work() {
    uint64_t seen = 0;
    while (true) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) {
          return;
        }
        seen = generation_;
        job = current_;
      }
      if (job) {
        Job::maybe_yield(jitter_);
        job->work(jitter_);
      }
    }
  }

  const bool jitter_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;  // guards current_, generation_, stop_
  std::condition_variable wake_;
  std::shared_ptr<Job> current_;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

Pool& pool() {
  // Leaked on purpose: joining threads from a static destructor at interpreter
  // exit can deadlock, and the OS reclaims them anyway.
  static Pool* p = new Pool(usable_cores());
  return *p;
}

} // namespace

int num_threads() {
  return pool().size();
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& body) {
  if (n <= 0) {
    return;
  }
  grain = std::max<int64_t>(grain, 1);
  int threads = num_threads();
  // A few chunks per thread balance uneven rows without much claiming overhead.
  int64_t chunks = std::min<int64_t>((n + grain - 1) / grain, int64_t(threads) * 4);
  if (chunks <= 1 || threads == 1) {
    body(0, n);
    return;
  }
  int64_t per_chunk = (n + chunks - 1) / chunks;
  chunks = (n + per_chunk - 1) / per_chunk;
  pool().run(chunks, [&](int64_t c) {
    int64_t begin = c * per_chunk;
    body(begin, std::min(n, begin + per_chunk));
  });
}

} // namespace fl::cpu
