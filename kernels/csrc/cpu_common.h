// What the C++ XLA:CPU kernels in this directory share: vectors of 16 floats (GCC vector
// extensions; -march=native picks the instructions), aligned scratch buffers, and a parallel loop
// on XLA's intra-op thread pool. Built with each kernel by kernels/native_build.py.

#ifndef DEEPJAX_KERNELS_CSRC_CPU_COMMON_H_
#define DEEPJAX_KERNELS_CSRC_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace deepjax {

constexpr int64_t kLanes = 16;  // Floats per vector.

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Splat(float x) { return Vec{} + x; }

inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// A float buffer aligned for Vec loads, zero-filled unless the caller writes all of it first.
struct Buffer {
  explicit Buffer(int64_t n, bool zero = true) {
    const size_t bytes = static_cast<size_t>(RoundUp(std::max<int64_t>(n, 1) * sizeof(float), 64));
    data = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (zero) std::memset(data, 0, bytes);
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  float* data;
};

// Runs fn(0..n-1) on the pool's threads and this one; returns when every index is done.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t n = 0;
    const std::function<void(int64_t)>* fn = nullptr;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->n = n;
  state->fn = &fn;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      (*s.fn)(i);  // Only reached for an unfinished index: the caller is still waiting.
      if (s.done.fetch_add(1) + 1 == s.n) {
        std::lock_guard<std::mutex> lock(s.mu);
        s.cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state, work] { work(*state); });
  work(*state);
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

}  // namespace deepjax

#endif  // DEEPJAX_KERNELS_CSRC_CPU_COMMON_H_
