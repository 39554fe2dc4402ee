// The thread pool behind parallel_run, and the per-thread scratch buffers.
//
// Deliberately not OpenMP: torch ships its own OpenMP runtime, and a second one in the same process
// oversubscribes the cores. Between jobs the workers poll briefly, then sleep on a condition variable;
// the thread count of each job comes from Python (torch.get_num_threads()).
#include "common.h"

#include <pthread.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace elastic {

namespace {

// How long an idle worker keeps polling for the next job before it sleeps. Layers run back to back with
// a few microseconds of Python between them; a worker that slept would need a futex wake and a trip
// through the scheduler to join the next one, which costs as much as a small kernel.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class ThreadPool {
 public:
  void run(int64_t n, int64_t grain, int threads, RangeFn fn, void* context) {
    const int64_t chunks = ceil_div(n, grain);
    const int helpers = static_cast<int>(min64(threads, chunks)) - 1;
    if (helpers <= 0) {
      fn(context, 0, n);
      return;
    }
    // One job at a time: Python threads may call in concurrently once the GIL is released.
    std::lock_guard<std::mutex> submit(submit_mutex_);
    grow(helpers);
    auto job = std::make_shared<Job>(fn, context, n, grain, chunks);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = job;
      wanted_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    job->work();
    // Wait for the chunks other threads claimed, not for the helpers: one that wakes late finds
    // nothing left to claim and is not waited for.
    const auto deadline = std::chrono::steady_clock::now() + kSpin;
    while (!job->finished() && std::chrono::steady_clock::now() < deadline) cpu_relax();
    if (!job->finished()) {
      std::unique_lock<std::mutex> lock(job->mutex);
      job->done.wait(lock, [&] { return job->finished(); });
    }
    if (job->error) std::rethrow_exception(job->error);
  }

 private:
  // One call's work. A helper keeps the job alive while it looks at it, so one that wakes after the
  // call returned only finds every chunk claimed; it never calls fn, whose context is gone by then.
  struct Job {
    Job(RangeFn fn, void* context, int64_t n, int64_t grain, int64_t chunks)
        : fn(fn), context(context), n(n), grain(grain), remaining(chunks) {}

    bool finished() const { return remaining.load(std::memory_order_acquire) == 0; }

    void work() {
      for (;;) {
        const int64_t begin = next.fetch_add(grain);
        if (begin >= n) return;
        try {
          fn(context, begin, min64(n, begin + grain));
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::current_exception();
        }
        if (remaining.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lock(mutex);  // orders the notify after the caller's last check
          done.notify_one();
        }
      }
    }

    const RangeFn fn;
    void* const context;
    const int64_t n, grain;
    std::atomic<int64_t> next{0}, remaining;
    std::mutex mutex;
    std::condition_variable done;
    std::exception_ptr error;
  };

  void grow(int helpers) {
    while (workers_ < helpers) {
      // Detached: after a fork the child drops the pool without joining threads it does not have.
      std::thread([this, index = workers_] { loop(index); }).detach();
      ++workers_;
    }
  }

  void loop(int index) {
    uint64_t seen = 0;
    for (;;) {
      const auto deadline = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < deadline) {
        cpu_relax();
      }
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        seen = generation_.load();
        if (index < wanted_) job = job_;
      }
      if (job) job->work();
    }
  }

  std::mutex submit_mutex_, mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  std::atomic<uint64_t> generation_{0};
  int wanted_ = 0, workers_ = 0;
};

ThreadPool* pool_instance = nullptr;
std::once_flag atfork_registered;

ThreadPool& pool() {
  std::call_once(atfork_registered, [] {
    // The child of a fork has none of the workers: forget the pool (leaking it) and start afresh.
    pthread_atfork(nullptr, nullptr, [] { pool_instance = nullptr; });
  });
  static std::mutex create;
  std::lock_guard<std::mutex> lock(create);
  if (pool_instance == nullptr) pool_instance = new ThreadPool();
  return *pool_instance;
}

struct ScratchBuffer {
  float* data = nullptr;
  int64_t capacity = 0;
  ~ScratchBuffer() { std::free(data); }
};

}  // namespace

void parallel_run(int64_t n, int64_t grain, int threads, RangeFn fn, void* context) {
  if (n <= 0) return;
  grain = max64(1, grain);
  if (threads <= 1 || n <= grain) {
    fn(context, 0, n);
    return;
  }
  pool().run(n, grain, threads, fn, context);
}

float* scratch(Slot slot, int64_t floats) {
  thread_local ScratchBuffer buffers[static_cast<int>(Slot::kCount)];
  ScratchBuffer& buffer = buffers[static_cast<int>(slot)];
  if (floats > buffer.capacity) {
    std::free(buffer.data);
    const int64_t capacity = ceil_div(max64(floats, 16), 16) * 16;  // whole cache lines
    buffer.data = static_cast<float*>(std::aligned_alloc(64, capacity * sizeof(float)));
    buffer.capacity = buffer.data == nullptr ? 0 : capacity;
    if (buffer.data == nullptr) throw std::bad_alloc();
  }
  return buffer.data;
}

}  // namespace elastic
