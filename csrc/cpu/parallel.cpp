#include "cpu/parallel.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
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

// A job is a list of chunks that the workers and the caller claim with an
// atomic counter; the caller waits until every chunk has finished.
class Pool {
 public:
  explicit Pool(int threads) {
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
    // One job at a time: MLX may call us from several streams' threads.
    std::lock_guard<std::mutex> job_lock(job_mutex_);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &chunk_body;
      chunks_ = chunks;
      next_.store(0);
      done_ = 0;
      ++generation_;
    }
    wake_.notify_all();
    int64_t mine = claim_and_run();
    std::unique_lock<std::mutex> lock(mutex_);
    done_ += mine;
    finished_.wait(lock, [&] { return done_ == chunks_; });
    body_ = nullptr;
  }

 private:
  int64_t claim_and_run() {
    int64_t count = 0;
    for (int64_t c = next_.fetch_add(1); c < chunks_; c = next_.fetch_add(1)) {
      (*body_)(c);
      ++count;
    }
    return count;
  }

  void work() {
    uint64_t seen = 0;
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stop_ || (generation_ != seen && body_); });
        if (stop_) {
          return;
        }
        seen = generation_;
      }
      int64_t mine = claim_and_run();
      std::lock_guard<std::mutex> lock(mutex_);
      done_ += mine;
      if (done_ == chunks_) {
        finished_.notify_all();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex job_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable finished_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t chunks_ = 0;
  int64_t done_ = 0;
  std::atomic<int64_t> next_{0};
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
