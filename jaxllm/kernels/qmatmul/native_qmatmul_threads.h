// Runs a kernel call's tasks on this thread and on the library's own helper threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// How long an idle helper, or a caller waiting for a helper's last task, spins before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(100);

inline void CpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Helper threads owned by the library. A call lasts 20-150 us at batch 1, and a helper from XLA's pool
// may start tens of microseconds late (a futex wake-up), which leaves a short call on one core. These
// helpers instead spin for kSpin after their last work, so that the next call's second core starts
// within a microsecond, then sleep on a condition variable: an idle process burns no CPU. While
// spinning they yield to any other thread that wants the core: on a busy machine a helper preempted
// in the middle of a claimed task would stall its caller for a scheduler time slice. One job slot: the
// latest call's offer replaces an earlier one no helper took yet (whose caller then runs its tasks
// alone). Detached and never destroyed: nothing here can block the process's exit (Python never
// unloads the library).
class Helpers {
 public:
  using Work = std::shared_ptr<std::function<void()>>;

  static Helpers& Get() {
    static Helpers* helpers = new Helpers();  // leaked on purpose: detached threads use it until exit
    return *helpers;
  }

  // Asks up to `count` helpers (started here on first need) to run `work` once each.
  void Offer(Work work, int64_t count) {
    std::lock_guard<std::mutex> lock(mu_);
    for (; started_ < count; ++started_) std::thread([this] { Loop(); }).detach();
    job_ = std::move(work);
    wanted_ = count;
    taken_ = 0;
    generation_.fetch_add(1, std::memory_order_release);
    if (sleeping_ > 0) cv_.notify_all();
  }

 private:
  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      for (int i = 1; generation_.load(std::memory_order_acquire) == seen; ++i) {
        CpuRelax();
        if (i % 64 == 0) {
          if (std::chrono::steady_clock::now() > until) break;
          std::this_thread::yield();
        }
      }
      Work work;
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (generation_.load() == seen) {
          ++sleeping_;
          cv_.wait(lock, [&] { return generation_.load() != seen; });
          --sleeping_;
        }
        seen = generation_.load();
        if (taken_ < wanted_) {
          ++taken_;
          work = job_;
        }
      }
      if (work) (*work)();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};  // bumped by every offer
  Work job_;                             // the rest: guarded by mu_
  int64_t wanted_ = 0, taken_ = 0, started_ = 0;
  int sleeping_ = 0;
};

// Calls of at most this many rows of x are short enough (tens of microseconds) for the spinning helpers;
// longer ones use XLA's pool, whose late start is then a small part of the call, and whose threads do
// not spin between calls. Measured on SmolLM2 decode: with the spinning helpers at every batch size,
// batch 32 fell from ~380 to ~290 tok/s (they took the cores from XLA's own ops between the calls);
// with them up to 8 rows, batch 8 read 267-312 tok/s against 344-348 with them up to 2 rows.
constexpr int64_t kSpinMaxRows = 2;

// Runs task(t, scratch) for t in [0, tasks) on this thread and on helpers (the library's spinning
// ones for calls of at most kSpinMaxRows `rows` of x, XLA's pool otherwise). Tasks are claimed from a
// shared counter; this thread waits only for tasks a helper has claimed and is running, never for a
// helper to start: a helper may be busy with another call. A helper that starts late finds nothing to
// claim, so what it touches lives on the heap. At most XLA's intra-op thread count run a call.
template <typename Task>
void ParallelFor(ffi::ThreadPool& pool, int64_t rows, int64_t tasks, int64_t scratch_floats, Task task) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<bool> waiting{false};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto progress = std::make_shared<Progress>();
  auto work = [=]() {
    std::unique_ptr<float[]> raw;
    float* scratch = nullptr;
    for (int64_t t; (t = progress->next.fetch_add(1)) < tasks;) {
      if (scratch_floats && !scratch) {
        raw.reset(new float[scratch_floats + 16]);
        scratch = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(raw.get()) + 63) & ~uintptr_t{63});
      }
      task(t, scratch);
      // seq_cst, against the caller's store to `waiting` then load of `done`: one of them sees the other
      if (progress->done.fetch_add(1) + 1 == tasks && progress->waiting.load()) {
        std::lock_guard<std::mutex> lock(progress->mu);
        progress->cv.notify_all();
      }
    }
  };
  static const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  const int64_t helpers = std::min<int64_t>({pool.num_threads(), cores, tasks}) - 1;
  if (helpers > 0) {
    auto shared = std::make_shared<std::function<void()>>(work);
    if (rows <= kSpinMaxRows) {
      Helpers::Get().Offer(shared, helpers);
    } else {
      for (int64_t w = 0; w < helpers; ++w) pool.Schedule([shared]() { (*shared)(); });
    }
  }
  work();
  // What is left is at most one task per helper, a few microseconds: spin, then sleep.
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (int i = 1; progress->done.load(std::memory_order_acquire) != tasks; ++i) {
    CpuRelax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > until) {
      std::unique_lock<std::mutex> lock(progress->mu);
      progress->waiting.store(true);
      progress->cv.wait(lock, [&] { return progress->done.load() == tasks; });
      break;
    }
  }
}

}  // namespace
